"""Repo-wide checks: survey.bib <-> paper folders, import rules, the docs, the export of a paper."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bibtexparser
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen  # noqa: E402  (docs/gen.py, the site generator)

PAPERS = sorted(p.name for p in (ROOT / "papers").iterdir() if (p / "__init__.py").exists())
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


@pytest.fixture(scope="module")
def works() -> list[gen.Work]:
    return gen.read_works()


def test_bib_has_every_surveyed_work_once(works):
    assert len(works) == 122
    slugs = [w.slug for w in works]
    assert len(set(slugs)) == len(slugs), "a slug appears twice"
    assert len({w.key for w in works}) == len(works), "a citation key appears twice"


def test_bib_entries_are_complete(works):
    for w in works:
        assert w.slug.isidentifier(), f"{w.key}: slug {w.slug!r} is not a Python identifier"
        assert w.taxonomy in gen.TAXONOMY, f"{w.key}: taxonomy {w.taxonomy!r} unknown to the docs"
        assert w.title and w.authors and w.year.isdigit(), f"{w.key}: title, author and year are required"
        assert w.url.startswith("https://"), f"{w.key}: needs an eprint or url"


def test_bib_records_the_lists_corrections(works):
    by_slug = {w.slug: w for w in works}
    # the list links 2501.06655 (the PPD paper) for B2-DiffuRL; its own id is 2503.11240
    assert "2503.11240" in by_slug["b2_diffurl"].url
    assert "2501.06655" in by_slug["ppd"].url


def test_bib_is_parsed_without_failures():
    library = bibtexparser.parse_file(str(ROOT / "survey.bib"))
    assert not library.failed_blocks, [b.start_line for b in library.failed_blocks]


def test_every_paper_folder_has_its_parts(works):
    slugs = {w.slug for w in works}
    for slug in PAPERS:
        folder = ROOT / "papers" / slug
        assert slug in slugs, f"papers/{slug}: no survey.bib entry with slug = {{{slug}}}"
        for part in ("README.md", f"{slug}.py", "__main__.py", f"test_{slug}.py"):
            assert (folder / part).exists(), f"papers/{slug}: missing {part}"
        readme = (folder / "README.md").read_text()
        assert "\n## Claim" in readme, f"papers/{slug}/README.md: needs a '## Claim' section"
        tree = ast.parse((folder / f"{slug}.py").read_text())
        assert any(isinstance(n, ast.ClassDef) and n.name == "Config" for n in tree.body), \
            f"papers/{slug}/{slug}.py: needs a Config dataclass"


def test_nox_registers_a_session_per_paper():
    out = subprocess.run([sys.executable, "-m", "nox", "-l"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for slug in PAPERS:
        assert f"test-{slug} " in out, f"nox -l does not list test-{slug}"
    for name in ("tests", "docs", "lint"):
        assert f" {name} " in out


def test_import_contracts_hold():
    result = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_can_fail(tmp_path):
    """A paper importing another paper, and common importing papers, both break the contracts."""
    for pkg in ("common", "papers", "papers/a", "papers/b"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "papers/a/a.py").write_text("import papers.b.b\n")
    (tmp_path / "papers/b/b.py").write_text("X = 1\n")
    (tmp_path / "common/c.py").write_text("import papers.a\n")
    config = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(config[config.index("[tool.importlinter]"):])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "papers.a -> papers.b" in result.stdout or "papers.a.a -> papers.b.b" in result.stdout
    assert "BROKEN" in result.stdout and result.stdout.count("BROKEN") == 2, result.stdout


def test_docs_generate_and_build_strict(tmp_path):
    works = gen.generate()
    status = (gen.OUT / "status.md").read_text()
    assert sum(line.startswith("| ") and line[2:3].isdigit() for line in status.splitlines()) == len(works)
    for slug in PAPERS:
        page = (gen.OUT / "papers" / f"{slug}.md").read_text()
        assert "Claim and measured result" in page and "--8<--" in page, f"{slug}: page lacks claim or code"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "generated" / "status" / "index.html").exists()


def _smallest_paper() -> str | None:
    if not PAPERS:
        return None
    return min(PAPERS, key=lambda s: sum(p.stat().st_size for p in (ROOT / "papers" / s).rglob("*.py")))


def test_export_copies_exactly_what_a_paper_needs(tmp_path):
    from common.export import common_closure, export

    (tmp_path / "papers/demo").mkdir(parents=True)
    (tmp_path / "papers/__init__.py").write_text("")
    (tmp_path / "papers/demo/__init__.py").write_text("")
    (tmp_path / "papers/demo/demo.py").write_text("from common.config import option\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common/__init__.py").write_text("")
    (tmp_path / "common/config.py").write_text("def option(): pass\n")
    (tmp_path / "common/unused.py").write_text("")
    assert [str(p) for p in common_closure("demo", tmp_path)] == ["common/__init__.py", "common/config.py"]
    copied = export("demo", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out/common/unused.py").exists() and len(copied) == 5


@pytest.mark.skipif(not PAPERS, reason="no paper folder yet")
def test_exported_paper_runs_its_tests_alone(tmp_path):
    from common.export import export

    slug = _smallest_paper()
    export(slug, tmp_path)
    probe = "import common, papers; print(common.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True).stdout
    assert where.startswith(str(tmp_path)), f"the copy imported common from {where}"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             f"papers/{slug}"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_config_help_and_errors():
    from dataclasses import dataclass

    from common.config import describe, option, parse_config, require

    @dataclass
    class Config:
        group_size: int = option(4, "images per prompt")
        reward: str = option("toy_geneval", "reward name", choices=["toy_geneval", "jpeg_compressibility"])
        steps: list[int] = option([1, 2], "steps")

        def __post_init__(self):
            require(self.group_size > 0, "group_size", f"must be positive, got {self.group_size}")

    assert parse_config(Config, ["--group-size", "8", "--steps", "3", "4"]) == Config(8, "toy_geneval", [3, 4])
    with pytest.raises(ValueError, match="group_size: must be positive, got -1"):
        parse_config(Config, ["--group-size", "-1"])
    with pytest.raises(SystemExit):
        parse_config(Config, ["--reward", "nope"])
    assert [r["name"] for r in describe(Config)] == ["group_size", "reward", "steps"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = textwrap.dedent(readme.split("<!-- test-command -->")[1].split("```bash")[1].split("```")[0]).strip()
    assert command and command in ci, f"README's test command {command!r} is not what .ci/run runs"


def test_readme_list_items_keep_their_paragraphs_on_the_site():
    """CommonMark continuation (marker width) becomes Python-Markdown's 4 spaces; fenced code is left alone."""
    readme = "1. **One.** text\n   more\n\n   | a |\n   |---|\n2. Two\nplain\n```\n- x\n  y\n```\n"
    assert gen._list_continuations(readme).splitlines() == [
        "1. **One.** text", "    more", "", "    | a |", "    |---|", "2. Two", "plain", "```", "- x", "  y", "```"]
