"""Write docs/performance.md from the newest result files in benchmarks/results/ (and benchmarks/changes.md).

    python -m benchmarks.report [--results DIR] [--out docs/performance.md]

The page is generated output: edit this file or changes.md, never the page.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import PHASES, RESULTS

ROOT = Path(__file__).resolve().parent.parent
CHANGES = Path(__file__).parent / "changes.md"


def latest(results: Path, prefix: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest `<prefix>-<stamp>.json` (names sort by their UTC stamp)."""
    files = sorted(p for p in results.glob(f"{prefix}-*.json") if p.stem[len(prefix) + 1:][:1].isdigit())
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def machine_line(path: Path, data: dict[str, Any]) -> str:
    m, s = data["machine"], data.get("settings", {})
    parts = [f"{m.get('gpu') or m['cpu']}" + ("" if m.get("gpu") else f", {m['cores']} cores"),
             f"torch {m['torch']}", f"diffusers {m.get('diffusers', '?')}", f"{m['date_utc']} UTC",
             f"load average {m['loadavg']}"]
    if "threads" in s:
        parts.insert(1, f"{s['threads']} torch thread(s)")
    if "dtype" in s:
        parts.insert(1, s["dtype"])
    return f"*{'; '.join(parts)}; file `{path.name}`, {data['wall_s']:.0f} s.*"


def harness_section(path: Path, data: dict[str, Any]) -> list[str]:
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    lines = [f"## Update overhead ({data['settings']['device']})", "", machine_line(path, data), "",
             f"One update = one sample-then-train cycle at the fixed small settings of `benchmarks/harness.py`; "
             f"median of updates 2..{data['settings']['updates']} of one run (update 1 is warm-up). Raw = the "
             "same model calls replayed alone at the same shapes (training: forward + backward), plus the "
             "optimizer steps. Overhead = update / raw: 1.00 means no time outside model calls. In-run = update / "
             "the traced calls' own time inside the same update (immune to load changing between the run and "
             "the replays; a gap between the two columns is load noise).", ""]
    rows = []
    for r in ok:
        c = r["calls"]
        calls = (f"{c.get('denoiser', 0)} + {c.get('denoiser_grad', 0)} grad / {c.get('text', 0)} / "
                 f"{c.get('vae_decode', 0) + c.get('vae_encode', 0)} / {c.get('reward', 0)}")
        rows.append([r["method"], r["model"], _ms(r["update_s"]), _ms(r["raw_s"]), f"**{_x(r['overhead'])}**",
                     _x(r.get("inrun_overhead")), calls,
                     f"{r['loadavg_before'][0]:.1f}" if r.get("loadavg_before") else "-"])
    lines += _table(["method", "model", "update ms", "raw ms", "overhead", "in-run", "denoiser / text / VAE / reward "
                     "calls", "load"], rows)
    lines += ["", "Per phase: wall ms (overhead = wall / raw of the phase's model calls; `-`: no model call).", ""]
    rows = [[r["method"], r["model"]] + [f"{_ms(r['phases'][p]['time_s'])} ({_x(r['phases'][p]['overhead'])})"
                                         for p in PHASES] for r in ok]
    lines += _table(["method", "model", *PHASES], rows)
    failed = [r for r in data["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Not measured:", ""] + [f"- {r['method']} on {r['model']}: `{r['status'][:200]}`" for r in failed]
    return lines + [""]


def kernels_section(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [f"## Step kernels ({data['settings']['device']}, {data['settings']['dtype']})", "",
             machine_line(path, data), "",
             f"Batch {data['settings']['batch']}, step {data['settings']['step']} of a 10-step grid. Cells: best "
             "time in ms (passes = best time / best time of one `x.add(y)` over the same tensor). `ops` = torch "
             "calls that produce a full-size tensor: a kernel costs about that many passes when each "
             "operation runs at the speed of the floor.", ""]
    labels = list(data["tables"])
    groups: dict[str, list[str]] = {}
    for label in labels:  # one table per allocator setting, shapes as columns
        shape, _, allocator = label.partition(", ")
        groups.setdefault(allocator or "-", []).append(label)
    for allocator, group in groups.items():
        if allocator != "-":
            lines += [f"**{allocator}**", ""]
        first = data["tables"][group[0]]["rows"]
        rows = []
        for k, row in enumerate(first):
            cells = [row["kernel"], row["use"], row["ops"]]
            for label in group:
                r = data["tables"][label]["rows"][k]
                cells.append(f"{r['min_ms']:.3g} ({r['passes']:.0f})")
            rows.append(cells)
        lines += _table(["kernel", "use", "ops", *[g.partition(", ")[0] for g in group]], rows) + [""]
        floors = [f"{g.partition(', ')[0]}: {data['tables'][g]['rows'][0]['floor_gbps']:.0f} GB/s" for g in group]
        lines += [f"Floor bandwidth: {'; '.join(floors)}.", ""]
    return lines


def gpu_section(results: Path) -> list[str]:
    """Every gpu-cuda file, oldest first: a before/after pair shows what a change bought at real shapes."""
    lines = ["## Real shapes on one GPU", ""]
    files = sorted(p for p in results.glob("gpu-cuda-*.json"))
    if not files:
        return lines + ["Not measured yet: `python -m benchmarks.gpu_real_shapes --out DIR` on one H100 or H200 "
                        "(about two minutes) writes the table; copy the file into `benchmarks/results/`. "
                        "`--tiny` checks the script on a CPU.", ""]
    s = json.loads(files[-1].read_text())["settings"]
    lines += [f"SD3.5-Medium transformer (random weights, published config), {s['resolution']} px, batch {s['batch']} "
              f"(groups of {s['group']}), {s['steps']} Flow-SDE steps with CFG (one batched forward of "
              f"{2 * s['batch']} rows), LoRA r={s['lora_rank']}, bf16 autocast; update = rollout + one PPO step on one "
              "stored transition. MFU = counted model FLOPs / time / the card's dense bf16 peak (recomputation under "
              "checkpointing not counted). Raw = the same transformer calls alone; overhead = measured / raw. "
              "Syncs = host-device synchronisations counted by torch's CUDA sync debug mode.", ""]
    for path in files:
        data = json.loads(path.read_text())
        lines += [f"**{data.get('label', path.stem)}**", "", machine_line(path, data), ""]
        rows = []
        for r in data["rows"]:
            if "error" in r:
                rows.append([r["gradient_checkpointing"], r["error"][:60], *[""] * 9])
                continue
            syncs = r.get("host_syncs") or {}
            rows.append([r["gradient_checkpointing"], f"{r['samples_per_s']:.2f}", f"{r['rollout_s']:.3f}",
                         f"{r['train_step_s']:.3f}", _x(r["overhead_rollout"]), _x(r["overhead_train_step"]),
                         f"{syncs.get('rollout', '-')} / {syncs.get('train_step', '-')}",
                         _pct(r["mfu_rollout"]), _pct(r["mfu_train_step"]), _pct(r["mfu_update"]),
                         "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"])
        lines += _table(["checkpointing", "samples/s", "rollout s", "train step s", "overhead rollout",
                         "overhead train", "syncs rollout / train", "MFU rollout", "MFU train", "MFU update",
                         "peak GiB"], rows) + [""]
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def suite_section(path: Path, data: dict[str, Any]) -> list[str]:
    budget = data["settings"]["budget_s"]
    incomplete = data.get("incomplete", [])
    at_least = "at least " if incomplete else ""
    lines = ["## Test-suite time", "", machine_line(path, data), "",
             f"One single-process pytest per folder (`nox -s test-<slug>` for a paper). Budget: {budget:.0f} s per "
             f"paper. Whole suite, folder by folder: **{at_least}{data['total_session_s']:.0f} s** "
             f"(papers {at_least}{data['papers_session_s']:.0f} s)"
             + (f"; killed after {data['settings'].get('timeout_s', 0):.0f} s: {', '.join(incomplete)}." if incomplete
                else "."), ""]
    rows = []
    for r in data["rows"]:
        s = r["session_s"]
        verdict = "" if not r["folder"].startswith("papers/") else ("ok" if s is not None and s <= budget else "**over**")
        counts = ", ".join(f"{n} {k}" for k, n in r["counts"].items())
        slowest = (f"`{r['slowest'][0][0].split('::')[-1]}` {r['slowest'][0][1]:.1f} s" if r["slowest"] else
                   f"killed in `{r['running_test'].split('::')[-1]}`" if r.get("running_test") else "-")
        rows.append([r["folder"], "-" if s is None else f"{s:.1f}", f"{r['wall_s']:.1f}", counts, slowest, verdict])
    return lines + _table(["folder", "pytest s", "wall s", "tests", "slowest test", "budget"], rows) + [""]


def render(results: Path) -> str:
    lines = ["# Performance", "",
             "Generated by `python -m benchmarks.report` from the newest files in `benchmarks/results/`; "
             "`nox -s bench` re-measures on the CPU and regenerates this page. Numbers from a shared machine "
             "carry its load average (runnable processes per core-minute); compare runs only at similar load.", ""]
    if CHANGES.exists():
        lines += ["## What was changed", "", CHANGES.read_text().strip(), ""]
    for device in ("cpu", "cuda"):
        if found := latest(results, f"harness-{device}"):
            lines += harness_section(*found)
        if found := latest(results, f"kernels-{device}"):
            lines += kernels_section(*found)
    lines += gpu_section(results)
    if found := latest(results, "suite-cpu"):
        lines += suite_section(*found)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.write_text(render(Path(args.results)))
    print(out)
    return out


if __name__ == "__main__":
    main()
