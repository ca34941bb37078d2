"""Copy one paper into another project: its folder plus exactly the `common` modules it imports.

    python -m common.export flow_grpo /path/to/project

writes `papers/flow_grpo/` and the `common/` modules reached from it (followed transitively through their own
imports, including imports inside functions), the package `__init__.py` files on the way, and the data
folders those packages ship (e.g. the toy base checkpoints). The copy runs on its own:
`cd /path/to/project && python -m pytest papers/flow_grpo`.
"""

from __future__ import annotations

import argparse
import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every `common...` module named by an import statement anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from common.rewards import toy` imports the submodule common.rewards.toy
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "common" or m.startswith("common.")}


def common_closure(slug: str, root: Path = ROOT) -> list[Path]:
    """The `common` files a paper needs, as paths relative to root (sorted)."""
    paper = root / "papers" / slug
    if not (paper / "__init__.py").exists():
        raise ValueError(f"slug: no paper folder papers/{slug}/ with an __init__.py")
    todo = []
    for path in paper.rglob("*.py"):
        todo.extend(_imports(path, f"papers.{slug}.{path.stem}"))
    needed: set[Path] = set()
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module, root)
        if path is None:
            continue  # `from common.x import name` where name is not a module
        needed.add(path.relative_to(root))
        parts = module.split(".")
        for i in range(1, len(parts)):  # parent packages run on import: their imports count too
            todo.append(".".join(parts[:i]))
        todo.extend(_imports(path, module))
    return sorted(needed)


def export(slug: str, dest: Path, root: Path = ROOT) -> list[Path]:
    """Copy the paper and its `common` closure to dest; returns the copied files (relative paths)."""
    files = [p.relative_to(root) for p in (root / "papers" / slug).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    files.append(Path("papers/__init__.py"))
    common_files = common_closure(slug, root)
    files += common_files
    for package in {p.parent for p in common_files}:  # data folders shipped beside the modules
        for sub in (root / package).iterdir():
            if sub.is_dir() and sub.name != "__pycache__" and not any(sub.glob("*.py")):
                files += [p.relative_to(root) for p in sub.rglob("*") if p.is_file()]
    for rel in sorted(set(files)):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return sorted(set(files))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slug", help="the paper's folder name under papers/, e.g. flow_grpo")
    parser.add_argument("dest", type=Path, help="the project directory to copy into")
    args = parser.parse_args(argv)
    try:
        files = export(args.slug, args.dest)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    n_common = sum(f.parts[0] == "common" for f in files)
    print(f"copied {len(files)} files ({n_common} from common/) to {args.dest}")


if __name__ == "__main__":
    main()
