"""Micro-benchmarks of the step-with-log-prob kernels of common/steps.py against an elementwise floor.

Each kernel is timed in its two uses: `sample` (rollout: draws x' from given noise and returns its
log-prob) and `recompute` (training: the log-prob of a stored x'). The floor is one elementwise pass
over the same tensor, `x.add(y)` (reads 2 tensors, writes 1); `passes` = kernel time / floor time (best
of the repetitions for both: the least disturbed by other processes) says how many such passes the
kernel costs, and `ops` counts its torch calls that produce a full-size tensor. A step is a few dozen
elementwise operations in fp32, so passes of the order of ops is the expected cost; far above means
memory allocation or cache misses dominate. On CPU the kernels run twice: with glibc's default
allocator, then with its large-block thresholds raised (`tune_glibc_malloc`).

Shapes (batch 8): toy 3x16x16, SD3.5-Medium latents 16x64x64 (512 px) and 16x128x128 (1024 px).
`python -m benchmarks.kernels` (CPU) or `--device cuda --dtype bf16`.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.harness import RESULTS, load_average, machine_info, write_result
from benchmarks.tracer import sync
from common.models.base import Schedule
from common.steps import cps_step, dance_sde_step, ddim_step, dpmpp_step, euler_step, flow_sde_step

BATCH = 8
SHAPES = {"toy 3x16x16": (3, 16, 16), "SD3.5-M 512px 16x64x64": (16, 64, 64),
          "SD3.5-M 1024px 16x128x128": (16, 128, 128)}
STEP = 3  # a step in the middle of a 10-step grid (sigma away from 0 and 1)


def schedules(device: str) -> dict[str, Schedule]:
    """10-step grids of the real schedulers: SD3 flow (shift 3) and SD1.x DDIM."""
    from common.models.tiny import tiny_sd, tiny_sd3

    return {"flow": tiny_sd3().schedule(10, device), "epsilon": tiny_sd().schedule(10, device)}


def kernels() -> dict[str, tuple[str, Callable[..., Any]]]:
    """name -> (schedule kind, step function with its defaults)."""
    return {
        "ddim_step (eta 1)": ("epsilon", ddim_step),
        "flow_sde_step": ("flow", flow_sde_step),
        "dance_sde_step": ("flow", dance_sde_step),
        "cps_step": ("flow", cps_step),
        "euler_step": ("flow", euler_step),
        "dpmpp_step (1, sde)": ("flow", functools.partial(dpmpp_step, order=1, sde=True)),
        "dpmpp_step (2, sde)": ("flow", functools.partial(dpmpp_step, order=2, sde=True)),
    }


def timed(fn: Callable[[], Any], device: str, budget_s: float, max_reps: int = 200) -> tuple[float, float]:
    """(median, min) seconds of fn over as many repetitions (3 .. max_reps) as fit in about budget_s."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    reps = int(min(max_reps, max(3, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


class _CountOps(torch.overrides.TorchFunctionMode):
    """Counts torch calls that return a tensor of `numel` elements (full-size elementwise work)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.numel() == self.numel:
            self.count += 1
        return out


def full_size_ops(fn: Callable[[], Any], numel: int) -> int:
    with _CountOps(numel) as counter:
        fn()
    return counter.count


def tune_glibc_malloc(threshold: int = 32 * 2**20) -> bool:
    """Keep freed blocks of up to 32 MiB in the heap (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD).

    By default glibc maps large blocks fresh from the OS and unmaps them on free, so a kernel whose
    temporaries are a few MiB each pays a page fault per 4 KiB on every operation. True when applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def measure(shape: tuple[int, int, int], device: str, dtype: torch.dtype, budget_s: float) -> list[dict]:
    """Every kernel in both uses, and the floor, at (BATCH, *shape)."""
    g = torch.Generator(device).manual_seed(0)
    x, v, noise, prev, x0_prev = (torch.randn(BATCH, *shape, generator=g, device=device).to(dtype)
                                  for _ in range(5))
    floor_med, floor_min = timed(lambda: x.add(v), device, budget_s)
    nbytes = 3 * x.numel() * x.element_size()
    rows = [{"kernel": "floor: x.add(y)", "use": "-", "median_ms": floor_med * 1e3, "min_ms": floor_min * 1e3,
             "ops": 1, "passes": 1.0, "floor_gbps": nbytes / floor_min / 1e9}]
    grids = schedules(device)
    with torch.no_grad():
        for name, (kind, step) in kernels().items():
            extra = {"x0_prev": x0_prev} if "(2," in name else {}
            call = functools.partial(step, v, x, grids[kind], STEP, **extra)
            uses = {"sample": functools.partial(call, noise=noise),
                    "recompute": functools.partial(call, prev_sample=prev)}
            for use, fn in uses.items():
                med, best = timed(fn, device, budget_s)
                rows.append({"kernel": name, "use": use, "median_ms": med * 1e3, "min_ms": best * 1e3,
                             "ops": full_size_ops(fn, x.numel()), "passes": best / floor_min})
    return rows


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), help="default: all three")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of repetitions per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see benchmarks.harness)")
    parser.add_argument("--no-mallopt", action="store_true", help="CPU: skip the second pass with "
                        "glibc's large-block thresholds raised (tune_glibc_malloc)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tables, start = {}, time.perf_counter()
    allocators = ["default"]
    if args.device == "cpu" and not args.no_mallopt:
        allocators.append("mallopt")  # measured second: the setting cannot be undone
    for allocator in allocators:
        if allocator == "mallopt" and not tune_glibc_malloc():
            break
        for label in args.shapes or list(SHAPES):
            print(f"[kernels] {label}, {allocator} allocator ...", file=sys.stderr, flush=True)
            tables[f"{label}, {allocator} allocator" if args.device == "cpu" else label] = {
                "loadavg": load_average(), "rows": measure(SHAPES[label], args.device, dtype, args.budget)}
    payload = {"machine": machine_info(args.device), "wall_s": time.perf_counter() - start,
               "settings": {"device": args.device, "dtype": args.dtype, "batch": BATCH, "step": STEP,
                            "threads": args.threads, "budget_s": args.budget}, "tables": tables}
    path = write_result("kernels", payload, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
