"""Generate the site's pages from survey.bib and papers/*/ (run by `nox -s docs`; never edit the output).

Writes under docs/generated/:
  taxonomy.md          the survey's sections as a tree, with a table per node
  status.md            one row per surveyed work (all of them), implemented or planned
  references.md        every work's citation, with its BibTeX
  papers/<slug>.md     one page per work: status, citation, and for implemented works the claim and its
                       measured result, the core code (embedded from the source by named snippet sections,
                       so the page cannot drift from the code), the Config table and the folder's README
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from dataclasses import dataclass, is_dataclass
from pathlib import Path

import bibtexparser

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "generated"

# The survey's sections, in its own order: node -> (title, what the section covers).
TAXONOMY: dict[str, tuple[str, str]] = {
    "diffusion/rl": ("Reinforcement learning (policy gradient, GRPO)",
                     "Each denoising step is an action of a Gaussian policy; the reward of the final image "
                     "is optimised with policy gradients (DDPO, DPOK) or group-relative advantages (GRPO)."),
    "diffusion/dpo": ("DPO-style preference optimisation",
                      "Direct preference optimisation on pairs or lists of images, with the denoising loss "
                      "standing in for the intractable likelihood."),
    "diffusion/reward_feedback": ("Reward feedback learning",
                                  "Back-propagating a differentiable reward through (part of) the sampling "
                                  "chain."),
    "diffusion/tech_reports": ("Technical reports",
                               "Alignment stages of industrial image and video generators."),
    "ar": ("Alignment of autoregressive generators",
           "GRPO, DPO, verifiers and chains of thought for image-token generators."),
    "benchmarks": ("Benchmarks", "How text-to-image and text-to-video models are evaluated."),
    "reward_models": ("Reward models", "Learned models of human preference used as rewards and judges."),
    "prompt": ("Prompt optimisation", "Aligning generation by rewriting the prompt."),
}
GROUPS = {"diffusion": "Alignment on diffusion and flow models"}
SNIPPET = re.compile(r"^\s*#\s*--8<--\s*\[start:([\w-]+)\]", re.M)


@dataclass
class Work:
    key: str
    slug: str
    title: str
    authors: str
    year: str
    taxonomy: str
    url: str
    venue: str
    bibtex: str

    @property
    def folder(self) -> Path:
        return ROOT / "papers" / self.slug

    @property
    def implemented(self) -> bool:
        return (self.folder / "README.md").exists() and (self.folder / "__init__.py").exists()

    @property
    def status(self) -> str:
        return "implemented" if self.implemented else "planned"

    @property
    def page(self) -> str:
        return f"papers/{self.slug}.md"


def _clean(text: str) -> str:
    """BibTeX field text as plain text: no protecting braces, LaTeX superscripts as Unicode."""
    text = re.sub(r"\$\^\{?(\d)\}?\$", lambda m: "⁰¹²³⁴⁵⁶⁷⁸⁹"[int(m.group(1))], text)
    return " ".join(text.replace("{", "").replace("}", "").split())


def _full_names(authors: str) -> str:
    """"Last, First and Last, First" -> "First Last, First Last"."""
    names = [a.strip() for a in authors.split(" and ") if a.strip()]
    names = [" ".join(reversed([p.strip() for p in n.split(",", 1)])) if "," in n else n for n in names]
    names = ["et al." if n == "others" else n for n in names]
    return ", ".join(names)


def _short_authors(authors: str) -> str:
    names = [a.strip() for a in authors.replace("\n", " ").split(" and ") if a.strip()]
    last = [n.split(",")[0].strip() if "," in n else n.split()[-1] for n in names if n != "others"]
    if not last:
        return ""
    return last[0] + (" et al." if len(names) > 2 else (" and " + last[1] if len(last) == 2 else ""))


def read_works(bib: Path = ROOT / "survey.bib") -> list[Work]:
    library = bibtexparser.parse_file(str(bib))
    if library.failed_blocks:
        raise ValueError(f"survey.bib: {len(library.failed_blocks)} blocks fail to parse, first at line "
                         f"{library.failed_blocks[0].start_line}")
    works = []
    for entry in library.entries:
        f = {field.key.lower(): str(field.value) for field in entry.fields}
        eprint = f.get("eprint", "")
        url = f.get("url") or (f"https://arxiv.org/abs/{eprint}" if eprint else "")
        venue = f.get("booktitle") or f.get("journal") or ""
        single = bibtexparser.Library([entry])
        works.append(Work(key=entry.key, slug=f.get("slug", ""), title=_clean(f.get("title", "")),
                          authors=_clean(f.get("author", "")), year=f.get("year", ""),
                          taxonomy=f.get("taxonomy", ""), url=url, venue=_clean(venue),
                          bibtex=bibtexparser.write_string(single).strip()))
    return works


def _row_link(w: Work, prefix: str = "") -> str:
    return f"[{w.title}]({prefix}{w.page})"


def _test_command(w: Work) -> str:
    return f"`nox -s test-{w.slug}`" if w.implemented else "—"


def taxonomy_page(works: list[Work]) -> str:
    lines = ["# Taxonomy", "",
             "The survey's sections, each with its works. *Implemented* works link to a page with the",
             "paper's claim, its core code and how to run it; *planned* works show their citation.", ""]
    # the tree
    done = sum(w.implemented for w in works)
    lines.append(f"**{len(works)} works, {done} implemented.**")
    lines.append("")
    seen_groups = set()
    for node, (title, _) in TAXONOMY.items():
        members = [w for w in works if w.taxonomy == node]
        group = node.split("/")[0] if "/" in node else None
        indent = ""
        if group:
            if group not in seen_groups:
                lines.append(f"- {GROUPS[group]}")
                seen_groups.add(group)
            indent = "    "
        anchor = node.replace("/", "-").replace("_", "-")
        n_impl = sum(w.implemented for w in members)
        lines.append(f"{indent}- [{title}](#{anchor}) ({n_impl}/{len(members)} implemented)")
    lines.append("")
    for node, (title, about) in TAXONOMY.items():
        members = [w for w in works if w.taxonomy == node]  # the survey's own order
        anchor = node.replace("/", "-").replace("_", "-")
        parent = GROUPS.get(node.split("/")[0], "") if "/" in node else ""
        lines += [f"## {title} {{#{anchor}}}", "", (f"*{parent}.* " if parent else "") + about, "",
                  "| Work | Year | Status | Test |", "|---|---|---|---|"]
        for w in members:
            lines.append(f"| {_row_link(w)} | {w.year} | {w.status} | {_test_command(w)} |")
        lines.append("")
    return "\n".join(lines)


def status_page(works: list[Work]) -> str:
    lines = ["# Status of every work", "",
             f"All {len(works)} works of the survey, in the survey's order. A work is *implemented* when its "
             "folder under `papers/` has its code, README and tests.", "",
             "| # | Work | Authors | Year | Section | Status | Test |", "|---|---|---|---|---|---|---|"]
    for i, w in enumerate(works, 1):
        section = TAXONOMY.get(w.taxonomy, (w.taxonomy, ""))[0]
        lines.append(f"| {i} | {_row_link(w)} | {_short_authors(w.authors)} | {w.year} | {section} | "
                     f"{w.status} | {_test_command(w)} |")
    return "\n".join(lines) + "\n"


def references_page(works: list[Work]) -> str:
    lines = ["# References", "", "Every surveyed work, as cited in `survey.bib`.", ""]
    for w in sorted(works, key=lambda w: w.key):
        venue = f" *{w.venue}*." if w.venue else ""
        lines.append(f"- <a id=\"{w.key}\"></a>**{w.key}**: {_full_names(w.authors)}. [{w.title}]({w.url}).{venue} "
                     f"{w.year}. [page]({w.page})")
    return "\n".join(lines) + "\n"


LIST_ITEM = re.compile(r"^(\d+\.|[-*+]) ")


def _list_continuations(text: str) -> str:
    """Re-indent the continuation lines of top-level list items from the marker's width to 4 spaces.

    READMEs follow CommonMark (GitHub): an item's later paragraphs, tables and sub-lists are indented by
    the marker's width, 3 spaces after "1. " and 2 after "- ". Python-Markdown, which builds this site,
    needs 4, and otherwise ends the list there. Each item's block is shifted as a whole, so nesting keeps
    its shape.
    """
    out: list[str] = []
    width = 0
    fenced = False  # inside a code fence that starts at the margin: copied as it is
    for line in text.splitlines():
        if line.startswith("```"):
            fenced, width = not fenced, 0
        item = None if fenced else LIST_ITEM.match(line)
        if fenced or line.startswith("```"):
            pass
        elif item:
            width = len(item.group(0))
        elif line.strip() and not line.startswith(" " * max(width, 1)):
            width = 0  # a line at the margin ends the item
        elif width and line.strip():
            line = " " * (4 - width) + line if width < 4 else line
        out.append(line)
    return "\n".join(out)


def _readme_parts(text: str) -> tuple[str, str]:
    """(the README's body with headings demoted one level, its `## Claim` section).

    The title is dropped (the page has its own) and the claim is left out of the body: the page shows it
    in its own box at the top.
    """
    body: list[str] = []
    claim: list[str] = []
    in_claim = False
    for line in _list_continuations(text).splitlines():
        heading = re.match(r"^(#+)\s+(.*)", line)
        if heading and len(heading.group(1)) == 1:
            continue
        if heading and len(heading.group(1)) == 2:
            in_claim = heading.group(2).strip().lower().startswith("claim")
            if in_claim:
                continue
        if in_claim:
            claim.append(line)
        else:
            body.append("#" + line if heading else line)
    return "\n".join(body), "\n".join(claim).strip()


def config_rows(slug: str) -> list[dict[str, str]]:
    from common.config import describe

    module = importlib.import_module(f"papers.{slug}.{slug}")
    cls = getattr(module, "Config", None)
    return describe(cls) if cls is not None and is_dataclass(cls) else []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def paper_page(w: Work) -> str:
    lines = [f"# {w.title}", "",
             f"{_full_names(w.authors)}, {w.year}." + (f" *{w.venue}*." if w.venue else ""), "",
             f"[Paper]({w.url}) · section: {TAXONOMY.get(w.taxonomy, (w.taxonomy,))[0]} · "
             f"bib key `{w.key}` · status: **{w.status}**", ""]
    if not w.implemented:
        lines += ['!!! note "Planned"', f"    `papers/{w.slug}/` does not exist yet.", ""]
    else:
        readme = (w.folder / "README.md").read_text()
        body, claim = _readme_parts(readme)
        lines += [f"Code: `papers/{w.slug}/` · run `python -m papers.{w.slug}` · test "
                  f"`nox -s test-{w.slug}`", ""]
        if claim:
            lines += ['!!! success "Claim and measured result"', ""]
            lines += ["    " + line for line in claim.splitlines()] + [""]
        source = w.folder / f"{w.slug}.py"
        names = SNIPPET.findall(source.read_text()) if source.exists() else []
        if names:
            lines += ["## Core code", "",
                      f"Embedded from `papers/{w.slug}/{w.slug}.py` at build time, section by section.", ""]
            for name in names:
                lines += [f"### `{name}`", "", "```python", f'--8<-- "papers/{w.slug}/{w.slug}.py:{name}"',
                          "```", ""]
        rows = config_rows(w.slug) if source.exists() else []
        if rows:
            lines += ["## Config", "", f"`python -m papers.{w.slug} --help` prints the same table.", "",
                      "| Field | Type | Default | Meaning |", "|---|---|---|---|"]
            lines += [f"| `{r['name']}` | {_cell(r['type'])} | `{_cell(r['default'])}` | {_cell(r['help'])} |"
                      for r in rows]
            lines.append("")
        lines += ["## README", "", body, ""]
    lines += ["## Citation", "", "```bibtex", w.bibtex, "```", ""]
    return "\n".join(lines)


def generate(out: Path = OUT, bib: Path = ROOT / "survey.bib") -> list[Work]:
    sys.path.insert(0, str(ROOT))
    works = read_works(bib)
    unknown = sorted({w.taxonomy for w in works} - set(TAXONOMY))
    if unknown:
        raise ValueError(f"survey.bib: taxonomy nodes unknown to the docs: {unknown}")
    if out.exists():
        shutil.rmtree(out)
    (out / "papers").mkdir(parents=True)
    (out / "taxonomy.md").write_text(taxonomy_page(works))
    (out / "status.md").write_text(status_page(works))
    (out / "references.md").write_text(references_page(works))
    for w in works:
        (out / w.page).write_text(paper_page(w))
    return works


if __name__ == "__main__":
    works = generate()
    print(f"docs: {len(works)} works, {sum(w.implemented for w in works)} implemented -> {OUT}")
