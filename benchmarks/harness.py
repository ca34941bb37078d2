"""Time one full update of each method on the tiny real pipelines, per phase, against its raw model calls.

How a number is made
1. A run trains for `updates` updates (epochs, rounds, iterations or optimizer steps, whatever the method
   calls one sample-then-train cycle) at the fixed small settings in `PAPERS` / `common_grpo`.
2. A `Tracer` times every top-level call of the denoiser, the VAE (encoder, decoder), the text encoders
   and the reward, every `Tensor.backward` and every optimizer step, and keeps one copy of the inputs of
   each distinct call (same module, shapes, dtypes and grad mode).
3. The optimizer steps split the run into updates: update k ends where its last optimizer step ends.
   Update 1 carries the warm-up (and the method's first evaluation) and is dropped; the others are
   the repetitions, and their median is reported.
4. Inside an update each traced call, and the time after it until the next call, belongs to a phase:
   tokenizer and text encoder -> prompt_encoding (the time after them is the next phase's set-up);
   denoiser without grad -> rollout (a lone no-grad call next to a training call is a reference
   forward -> training); VAE -> decode; reward -> reward, and the time from it to the first training
   call -> advantage (to anything else -> other); denoiser with grad, backward, optimizer step ->
   training; the start of the update until its first call -> other (logging, data).
5. Raw model time: each distinct call is replayed alone, `reps` times, on its stored inputs, and the
   median is multiplied by its count. A call that ran with grad is replayed with a backward of its
   output's sum; that backward counts in the training phase, where the real backward runs (so a
   reward-backprop method's reward and VAE backward land there too). Optimizer steps count as raw
   with their own measured time.
   overhead = update time / raw model time, per phase and for the whole update; 1.0 means no time is
   spent outside the model calls.
6. In-run overhead = update time / the traced calls' own durations in the same update (backward passes
   included, tokenizers not). It needs no replay, so a change of machine load between the run and the
   replays cannot move it; it misses only what runs inside the calls' backward (the step kernels' and
   the loss's backward are counted as model time).

`python -m benchmarks.harness` (CPU, a few minutes) or `--device cuda --dtype bf16` on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.tracer import PHASES, Tracer, call_counts, phase_report, split_updates

RESULTS = Path(__file__).parent / "results"


# ---- machine, timing, results --------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, library versions, GPU (if any), load average and UTC date."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(terse=True), "loadavg": load_average(),
    }
    for lib in ("diffusers", "transformers", "peft"):
        with contextlib.suppress(ImportError):
            info[lib] = importlib.import_module(lib).__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write_result(kind: str, payload: dict[str, Any], out_dir: str | Path = RESULTS) -> Path:
    """Write `payload` as results/<kind>-<device>-<UTC stamp>.json and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    device = str(payload.get("settings", {}).get("device", "cpu")).split(":")[0]
    path = out_dir / f"{kind}-{device}-{stamp}.json"
    path.write_text(json.dumps({"kind": kind, **payload}, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---- the methods ---------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype | None:
    return torch.bfloat16 if name == "bf16" else None


def common_grpo(tracer: Tracer, model: str, updates: int, out_dir: Path, device: str, dtype: str,
                small: bool = False) -> None:
    """A GRPO-style update written only with common/: rollout with the Flow-GRPO SDE (flow models) or
    DDIM eta = 1 (epsilon models), JPEG reward, group advantages, PPO-clip on every step, one AdamW step."""
    from common.advantages import group_advantages
    from common.losses import ppo_clip_loss
    from common.models.load import load_adapter
    from common.rewards import load_reward
    from common.rollout import rollout, step_log_prob
    from common.steps import ddim_step, flow_sde_step
    from common.train import make_optimizer

    torch.manual_seed(0)
    adapter = load_adapter(model, dtype=_dtype(dtype), device=device)
    adapter.add_lora(rank=4)
    params = adapter.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    tracer.adapter(adapter)
    reward = tracer.reward(load_reward("jpeg_compressibility"))
    optimizer = make_optimizer(params, lr=1e-4)
    step_fn = flow_sde_step if adapter.prediction == "flow" else functools.partial(ddim_step, eta=1.0)
    prompts, group, steps = ["a red circle", "two blue squares"], (2 if small else 4), (2 if small else 6)
    guidance = 1.0 if model == "tiny-flux" else 4.5
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bf16")
    for _ in range(updates):
        with autocast:
            traj = rollout(adapter, prompts, group_size=group, num_steps=steps, step_fn=step_fn,
                           guidance_scale=guidance, generator=generator)
        scores, _ = reward(traj.images, traj.prompts, None)
        advantages = group_advantages(scores.float(), group)
        for j in range(steps):
            with autocast:
                new = step_log_prob(adapter, traj, j, step_fn)
            loss, _ = ppo_clip_loss(new.log_prob, traj.log_probs[:, j], advantages, clip_range=1e-4)
            (loss / steps).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _write_toy_pairs(module, out_dir: Path, model: str) -> dict[str, Any]:
    """Diffusion-DPO on a tiny pipeline reads preference pairs from a file: write 8 random ones."""
    from common.models.tiny import IMAGE_SIZE as side

    g = torch.Generator().manual_seed(0)
    path = out_dir / "pairs" / "pairs.jsonl"
    module.write_pairs(path, [f"prompt {k}" for k in range(8)], torch.rand(8, 3, side, side, generator=g),
                       torch.rand(8, 3, side, side, generator=g))
    return {"pairs": str(path)}


@dataclass(frozen=True)
class PaperMethod:
    """How to run one paper's own `train(config)` for a fixed number of updates at small settings."""

    module: str  #: the module holding Config and train
    updates_field: str  #: the Config field that counts updates
    models: tuple[str, ...]  #: tiny pipelines it supports
    settings: dict[str, Any]  #: fixed small settings (evaluation and checkpoints pushed out of the loop)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare: Callable[[Any, Path, str], dict[str, Any]] | None = None  #: extra settings written to disk


_QUIET = {"eval_every": 10_000, "save_every": 10_000}
PAPERS: dict[str, PaperMethod] = {
    "flow_grpo": PaperMethod(
        "papers.flow_grpo.flow_grpo", "epochs", ("tiny-sd3", "tiny-flux"),
        {**_QUIET, "reward": "jpeg_compressibility", "tasks": ["colors"], "lora_rank": 4, "group_size": 4,
         "prompts_per_epoch": 2, "batches_per_epoch": 1, "num_steps": 6, "eval_num_steps": 1,
         "eval_prompts": 1, "eval_images_per_prompt": 1},
        {"tiny-sd3": {"guidance_scale": 4.5}}),
    "dance_grpo": PaperMethod(
        "papers.dance_grpo.dance_grpo", "iterations", ("tiny-flux", "tiny-sd3", "tiny-sd"),
        {**_QUIET, "reward": "jpeg_compressibility", "lora_rank": 4, "group_size": 4, "prompts_per_iteration": 2,
         "num_steps": 6, "train_batch_size": 4, "eval_prompts": 1}),
    "ddpo": PaperMethod(
        "papers.ddpo.ddpo", "num_epochs", ("tiny-sd",),
        {"save_every": 0, "reward": "jpeg_compressibility", "num_steps": 6, "sample_batch_size": 8,
         "num_batches_per_epoch": 1, "train_batch_size": 8, "gradient_accumulation_steps": 1, "eval_samples": 1}),
    "dpok": PaperMethod(
        "papers.dpok.dpok", "rounds", ("tiny-sd",),
        {"save_every": 0, "eval_every": 0, "reward": "jpeg_compressibility", "num_steps": 6,
         "samples_per_round": 8, "policy_updates": 2, "policy_batch_size": 8, "grad_accum": 1,
         "value_batch_size": 8, "eval_samples": 1}),
    "d3po": PaperMethod(
        "papers.d3po.d3po", "rounds", ("tiny-sd",),
        {**_QUIET, "num_steps": 6, "pairs_per_round": 4, "train_batch_size": 4, "eval_prompts": 1}),
    "diffusion_dpo": PaperMethod(
        "papers.diffusion_dpo.diffusion_dpo", "steps", ("tiny-sd", "tiny-sd3"),
        {**_QUIET, "batch_size": 8, "lora_rank": 4, "eval_prompts": 1, "num_heldout": 8},
        prepare=_write_toy_pairs),
    "draft": PaperMethod(
        "papers.draft.draft", "steps", ("tiny-sd", "tiny-sd3"),
        {"save_every": 0, "variant": "k", "k": 1, "num_steps": 6, "batch_size": 4, "variance_draws": 0,
         "eval_prompts": 8}),
    "image_reward": PaperMethod(
        "papers.image_reward.image_reward", "refl_steps", ("tiny-sd", "tiny-sd3"),
        {"stage": "refl", "refl_reward": "toy_soft", "num_steps": 10, "stop_min": 5, "stop_max": 8,
         "batch_size": 4, "eval_prompts": 8, "eval_steps": 1}),
}


def run_paper(spec: PaperMethod, tracer: Tracer, model: str, updates: int, out_dir: Path, device: str,
              dtype: str, small: bool = False) -> None:
    """Build the paper's Config at the spec's settings and run its own `train` under the tracer."""
    module = importlib.import_module(spec.module)
    settings = {**spec.settings, **spec.per_model.get(model, {}), "model": model, "out_dir": str(out_dir),
                "device": device, "dtype": dtype, spec.updates_field: updates}
    if spec.prepare is not None:
        settings |= spec.prepare(module, out_dir, model)
    names = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"settings: {module.__name__}.Config has no field(s) {', '.join(unknown)}")
    config = module.Config(**settings)

    def traced_adapter(*args, **kwargs):
        adapter = original_adapter(*args, **kwargs)
        tracer.adapter(adapter)
        return adapter

    def traced_reward(*args, **kwargs):
        return tracer.reward(original_reward(*args, **kwargs))

    original_adapter = module.load_adapter
    tracer.patch(module, "load_adapter", traced_adapter)
    if hasattr(module, "load_reward"):
        original_reward = module.load_reward
        tracer.patch(module, "load_reward", traced_reward)
    module.train(config)


def methods() -> dict[str, tuple[Callable[..., None], tuple[str, ...]]]:
    """method name -> (runner, models)."""
    table: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {
        "common_grpo": (common_grpo, ("tiny-sd3", "tiny-flux", "tiny-sd"))}
    for name, spec in PAPERS.items():
        table[name] = (functools.partial(run_paper, spec), spec.models)
    return table


# ---- one measurement ------------------------------------------------------------------------------


def _sdpa_math(enabled: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if enabled else contextlib.nullcontext()


def measure(method: str, model: str, *, updates: int = 4, reps: int = 5, device: str = "cpu",
            dtype: str = "fp32", small: bool = False) -> dict[str, Any]:
    """Run `method` on `model` for `updates` updates under a Tracer; the per-phase table of its updates 2..n."""
    runner, _ = methods()[method]
    tracer = Tracer(device)
    row: dict[str, Any] = {"method": method, "model": model, "loadavg_before": load_average()}
    # tiny-FLUX on CUDA (torch 2.11, H200): the default scaled-dot-product-attention path returns non-finite
    # LoRA gradients in bf16 training steps (changes.md); the math kernel does not, so it runs with that one
    math_sdpa = model == "tiny-flux" and torch.device(device).type == "cuda"
    if math_sdpa:
        row["sdpa"] = "math"
    with tempfile.TemporaryDirectory() as tmp, _sdpa_math(math_sdpa):
        with tracer.installed():
            run_start = time.perf_counter()
            runner(tracer, model, updates, Path(tmp), device, dtype, small=small)
        raw = tracer.replay_times(reps)
    windows = split_updates(tracer.events, updates, run_start)[1:]
    tables = [phase_report(tracer.events, w, raw) for w in windows]
    phases = {}
    for p in PHASES:
        med = {k: statistics.median(t[p][k] for t in tables) for k in ("time_s", "raw_s", "model_s")}
        phases[p] = med | {"calls": tables[0][p]["calls"],
                           "overhead": med["time_s"] / med["raw_s"] if med["raw_s"] > 0 else None}
    totals = [sum(t[p]["time_s"] for p in PHASES) for t in tables]
    update_s = statistics.median(totals)
    raw_s = statistics.median(sum(t[p]["raw_s"] for p in PHASES) for t in tables)
    model_s = statistics.median(sum(t[p]["model_s"] for p in PHASES) for t in tables)
    return row | {"status": "ok", "update_s": update_s, "update_s_all": totals, "raw_s": raw_s,
                  "overhead": update_s / raw_s if raw_s > 0 else None, "model_s": model_s,
                  "inrun_overhead": update_s / model_s if model_s > 0 else None, "phases": phases,
                  "calls": call_counts(tracer.events, windows[0]), "loadavg_after": load_average()}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--methods", nargs="*", help="default: every method (common_grpo and the papers)")
    parser.add_argument("--models", nargs="*", help="default: every tiny pipeline the method supports")
    parser.add_argument("--updates", type=int, default=4, help="updates per run; the first is warm-up")
    parser.add_argument("--reps", type=int, default=5, help="replays of each distinct raw model call")
    parser.add_argument("--small", action="store_true", help="tiny common_grpo settings (the tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 keeps a shared machine's "
                        "contention from multiplying every op's latency")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.updates < 2:
        parser.error("--updates: need at least 2 (the first update is warm-up)")
    table = methods()
    unknown = sorted(set(args.methods or []) - set(table))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(table)}")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the methods' progress bars
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows, start = [], time.perf_counter()
    for name in args.methods or list(table):
        for model in table[name][1]:
            if args.models and model not in args.models:
                continue
            print(f"[harness] {name} on {model} ...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(name, model, updates=args.updates, reps=args.reps, device=args.device,
                                    dtype=args.dtype, small=args.small))
            except Exception as err:  # a paper being rewritten must not stop the others
                rows.append({"method": name, "model": model, "status": f"error: {type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-2000:]})
            print(f"[harness]   {_summary(rows[-1])}", file=sys.stderr, flush=True)
    payload = {"machine": machine_info(args.device), "wall_s": time.perf_counter() - start,
               "settings": {"device": args.device, "dtype": args.dtype, "updates": args.updates, "reps": args.reps,
                            "small": args.small, "threads": args.threads}, "rows": rows}
    path = write_result("harness", payload, args.out)
    print(path)
    return path


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"update {row['update_s'] * 1e3:.0f} ms, raw {row['raw_s'] * 1e3:.0f} ms, overhead {row['overhead']:.2f}"


if __name__ == "__main__":
    main()
