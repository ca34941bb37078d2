"""Test-suite time: `pytest --durations=0` on each paper folder (then common/ and tests/), one at a time.

Each folder runs in its own single-process pytest, so its time is what `nox -s test-<slug>` costs.
The whole suite's time is the sum over the folders; a folder still running after `--timeout` seconds
is killed (it counts with its wall time, a lower bound, and the test it was in is recorded). The design's budget is 30 s per paper on 2 CPU
cores: a paper over it is reported and the run exits with status 1 (after writing its result file),
so `nox -s bench` fails loudly. `--check FILE` (or `--check latest`) re-reads a result file and applies the same rule.

    python -m benchmarks.suite_time                     # every paper, common/ and tests/
    python -m benchmarks.suite_time --folders papers/ddpo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, load_average, machine_info, write_result

ROOT = Path(__file__).resolve().parent.parent
PAPER_BUDGET_S = 30.0  # DESIGN.md section 5: a paper's tests take at most 30 s on 2 CPU cores
_DURATION = re.compile(r"^([\d.]+)s\s+(setup|call|teardown)\s+(\S+)")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)")
_SESSION = re.compile(r" in ([\d.]+)s")
_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def default_folders(papers_only: bool = False) -> list[str]:
    """papers/<slug> for every paper package, then common and tests (the whole suite)."""
    papers = sorted(f"papers/{p.name}" for p in (ROOT / "papers").iterdir()
                    if p.is_dir() and (p / "__init__.py").exists())
    return papers if papers_only else papers + ["common", "tests"]


def parse_pytest(output: str) -> dict[str, Any]:
    """Session seconds, outcome counts and per-test seconds (setup + call + teardown) from pytest's output."""
    per_test: dict[str, float] = {}
    for line in output.splitlines():
        if m := _DURATION.match(line.strip()):
            per_test[m.group(3)] = per_test.get(m.group(3), 0.0) + float(m.group(1))
    last = [line for line in output.splitlines() if _SESSION.search(line)]
    counts = {kind: int(n) for n, kind in _SUMMARY.findall(last[-1])} if last else {}
    session = float(_SESSION.search(last[-1]).group(1)) if last else None
    slowest = sorted(per_test.items(), key=lambda kv: -kv[1])[:5]
    return {"session_s": session, "counts": counts, "slowest": [[name, round(s, 2)] for name, s in slowest]}


def time_folder(folder: str, timeout_s: float, python: str = sys.executable) -> dict[str, Any]:
    """Run one folder's tests; its pytest session time, wall time (with start-up) and slowest tests."""
    # -v prints each test's id when it starts, so a killed run still names the test it was in
    cmd = [python, "-m", "pytest", folder, "-v", "--durations=0", "-p", "no:cacheprovider"]
    load = load_average()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # keep output up to a kill
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:  # a hanging test must not hang the benchmark
        code, stdout, stderr = "timeout", _text(err.stdout), f"killed after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    row = {"folder": folder, "exit_code": code, "wall_s": round(wall, 2), "loadavg_before": load,
           **parse_pytest(stdout)}
    if row["session_s"] is None:
        row["error"] = (stdout + stderr)[-1500:]
        row["running_test"] = running_test(stdout)
    return row


def running_test(output: str) -> str | None:
    """The test a killed `pytest -v` was in: the last test id printed without an outcome after it."""
    lines = [line.strip() for line in output.splitlines() if "::" in line]
    if lines and not _OUTCOME.search(lines[-1]):
        return lines[-1].split()[0]
    return None


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def over_budget(rows: Sequence[dict[str, Any]], budget_s: float = PAPER_BUDGET_S) -> list[dict[str, Any]]:
    """Paper folders whose pytest session took longer than budget_s (or that did not run)."""
    return [r for r in rows if r["folder"].startswith("papers/")
            and (r["session_s"] is None or r["session_s"] > budget_s)]


def check(rows: Sequence[dict[str, Any]], budget_s: float = PAPER_BUDGET_S) -> int:
    """Print the verdict; 1 when a paper is over budget, else 0 (failing tests only warn)."""
    for r in rows:
        if r["exit_code"] not in (0, 5):  # 5: no tests collected
            print(f"[suite_time] WARNING {r['folder']}: pytest exit code {r['exit_code']} ({r['counts']})",
                  file=sys.stderr)
    late = over_budget(rows, budget_s)
    for r in late:
        took = (f"took {r['session_s']:.1f} s > {budget_s:.0f} s" if r["session_s"] is not None else
                f"killed after {r['wall_s']:.0f} s, in {r.get('running_test') or 'collection or an unknown test'}")
        print(f"[suite_time] OVER BUDGET {r['folder']}: {took} (load average {r['loadavg_before']})", file=sys.stderr)
    return 1 if late else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", nargs="*", help="default: every paper folder, then common and tests")
    parser.add_argument("--papers-only", action="store_true", help="only the paper folders")
    parser.add_argument("--budget", type=float, default=PAPER_BUDGET_S, help="seconds allowed per paper")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a folder's pytest is killed")
    parser.add_argument("--check", metavar="FILE", help="apply the budget to a result file ('latest': the newest "
                        "in --out) and exit")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.check:
        path = Path(args.check) if args.check != "latest" else max(Path(args.out).glob("suite-cpu-*.json"))
        return check(json.loads(path.read_text())["rows"], args.budget)
    rows, start = [], time.perf_counter()
    for folder in args.folders or default_folders(args.papers_only):
        print(f"[suite_time] {folder} ...", file=sys.stderr, flush=True)
        rows.append(time_folder(folder, args.timeout))
        r = rows[-1]
        print(f"[suite_time]   {r['session_s']} s (wall {r['wall_s']} s) {r['counts']}", file=sys.stderr, flush=True)
    # a killed folder counts with its wall time, a lower bound; `incomplete` says which
    sessions = [r["session_s"] if r["session_s"] is not None else r["wall_s"] for r in rows]
    payload = {"machine": machine_info(), "wall_s": time.perf_counter() - start,
               "settings": {"device": "cpu", "budget_s": args.budget, "timeout_s": args.timeout,
                            "folders": [r["folder"] for r in rows]},
               "total_session_s": sum(sessions),
               "papers_session_s": sum(s for r, s in zip(rows, sessions) if r["folder"].startswith("papers/")),
               "incomplete": [r["folder"] for r in rows if r["session_s"] is None], "rows": rows}
    print(write_result("suite", payload, args.out))
    return check(rows, args.budget)


if __name__ == "__main__":
    sys.exit(main())
