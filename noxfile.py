"""Sessions: `nox -l` lists them.

Every session runs in the project's own environment (the interpreter that runs nox), so torch and the
rest are installed once by the README's setup command, never once per session.

    nox -s test-flow_grpo     one paper's tests (one session per folder under papers/)
    nox -s tests              the whole suite
    nox -s docs               generate the site's pages and build it with --strict
    nox -s lint               ruff and the import contracts
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PY = sys.executable  # the project's interpreter; `venv_backend="none"` keeps nox from making its own
nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"


def _titles() -> dict[str, str]:
    """slug -> title from survey.bib (empty when bibtexparser is missing: nox -l still works)."""
    try:
        import bibtexparser
    except ImportError:
        return {}
    library = bibtexparser.parse_file(str(ROOT / "survey.bib")) if (ROOT / "survey.bib").exists() else None
    if library is None:
        return {}
    titles = {}
    for entry in library.entries:
        fields = {f.key.lower(): f.value for f in entry.fields}
        if "slug" in fields:
            titles[fields["slug"]] = " ".join(fields.get("title", "").replace("{", "").replace("}", "").split())
    return titles


def _paper_session(slug: str, title: str):
    def session(s: nox.Session) -> None:
        s.run(PY, "-m", "pytest", f"papers/{slug}", "-q", *s.posargs)

    session.__doc__ = title or slug
    return session


TITLES = _titles()
for _folder in sorted(p for p in (ROOT / "papers").iterdir() if p.is_dir() and (p / "__init__.py").exists()):
    nox.session(name=f"test-{_folder.name}", venv_backend="none")(
        _paper_session(_folder.name, TITLES.get(_folder.name, "")))


@nox.session(venv_backend="none")
def tests(s: nox.Session) -> None:
    """The whole suite (common, papers, repo-wide checks), on every core."""
    s.run(PY, "-m", "pytest", "-n", "auto", "--durations=15", *s.posargs)


@nox.session(venv_backend="none")
def docs(s: nox.Session) -> None:
    """Generate the taxonomy, paper and status pages, then `mkdocs build --strict`."""
    s.run(PY, "docs/gen.py")
    s.run(PY, "-m", "mkdocs", "build", "--strict", *s.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(venv_backend="none")
def lint(s: nox.Session) -> None:
    """ruff, then the import contracts (papers independent; common never imports papers)."""
    s.run(PY, "-m", "ruff", "check", ".")
    s.run(str(Path(PY).with_name("lint-imports")), "--no-cache", external=True)


@nox.session(venv_backend="none")
def bench(s: nox.Session) -> None:
    """Benchmarks on the CPU, then docs/performance.md; fails when a paper's tests take over 30 s.

    The paper folders' times are measured one folder at a time (common/ and tests/ are timed by CI's own
    run); `nox -s bench -- --all` adds them.
    """
    s.run(PY, "-m", "benchmarks.harness", "--updates", "3", "--reps", "2")
    s.run(PY, "-m", "benchmarks.kernels", "--budget", "0.2")
    scope = [] if "--all" in s.posargs else ["--papers-only"]
    # a folder still running after 120 s (4x a paper's budget) is killed; the verdict comes after the report
    s.run(PY, "-m", "benchmarks.suite_time", "--timeout", "120", *scope, success_codes=[0, 1])
    s.run(PY, "-m", "benchmarks.report")
    s.run(PY, "-m", "benchmarks.suite_time", "--check", "latest")
