"""Shared training plumbing: seeding, accelerate, AdamW, a metrics log, figures, exact-resume checkpoints.

Nothing here decides what a training step does; each paper's loop stays in the paper's own file:

    accelerator = make_accelerator(mixed_precision="bf16")
    optimizer = make_optimizer(trainable_parameters, lr=3e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = trainable_state_dict(accelerator.unwrap_model(model))  # live views of the trained tensors
    log = MetricsLogger(out / "metrics.jsonl", total=num_steps, disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=50, accelerator=accelerator)
    step = ckpt.load_latest(model_params=params, optimizer=optimizer, generators={"data": gen}, metrics=log) or 0
    while step < num_steps:
        loss = ...                                       # the paper's loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad()
        step += 1
        log.log(step, loss=loss)
        if ckpt.due(step):
            ckpt.save(step, model_params=params, optimizer=optimizer, generators={"data": gen})

Checkpoints are safetensors + JSON only: nothing is ever pickled or unpickled, so loading a checkpoint
from someone else cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

PathLike = str | os.PathLike


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                     cpu: bool | None = None, log_dir: PathLike | None = None):
    """An `accelerate.Accelerator`; one process by default, DDP under `accelerate launch`.

    cpu=None picks the CPU when no CUDA device is visible; several CPU processes then talk over gloo.
    log_dir becomes the project/logging directory used by `accelerator.init_trackers` and `save_state`.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision: expected 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps: must be >= 1, got {gradient_accumulation_steps}")
    project = None if log_dir is None else ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir))
    _forget_accelerator_state()
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available() if cpu is None else cpu, project_config=project)


def _forget_accelerator_state() -> None:
    """Let one process build Accelerators with different settings one after the other (a notebook, the
    tests, the benchmarks): accelerate keeps its state process-wide and refuses a second mixed precision.
    A multi-process group is kept; a single process forgets everything, its device choice included."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if AcceleratorState._shared_state or PartialState._shared_state:
        single = not PartialState._shared_state or PartialState().num_processes == 1
        AcceleratorState._reset_state(reset_partial_state=single)
        GradientState._reset_state()


def make_optimizer(params: Iterable, lr: float, *, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 1e-4, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW. Defaults: betas (0.9, 0.999), weight decay 1e-4, eps 1e-8 as in the DDPO official config
    (kvablack/ddpo-pytorch config/base.py) and the Flow-GRPO official config (config/base.py). Note that
    diffusers' training examples (e.g. the Diffusion-DPO script) default to weight decay 1e-2 instead."""
    params = list(params)
    if not params:
        raise ValueError("params: the optimizer got no parameters (did add_lora / requires_grad run?)")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


# ----------------------------------------------------------------------------------------------- params
def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """{name: tensor} of the parameters with requires_grad (e.g. only the LoRA weights after peft injection).

    The tensors are detached views sharing storage with the parameters, so loading into them updates the
    module. Take them once the module is on its device (after `.to(device)` or `accelerator.prepare`):
    moving a module gives its parameters new storage, and views taken before go stale. Pass the unwrapped
    module (`accelerator.unwrap_model`) so names carry no DDP prefix."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy `state_dict` into the module's trainable parameters; names and shapes must match exactly."""
    _copy_into(trainable_state_dict(module), state_dict, "module")


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The LoRA weights of a peft-injected model (diffusers `add_adapter`) in peft's key format, the input
    diffusers' `convert_state_dict_to_diffusers` / `save_lora_weights` expect."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def _copy_into(targets: Mapping[str, Tensor], source: Mapping[str, Tensor], what: str) -> None:
    missing, unexpected = sorted(set(targets) - set(source)), sorted(set(source) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{what}: parameter names differ; missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in targets.items():
            if target.shape != source[name].shape:
                raise ValueError(f"{what}: {name} has shape {tuple(source[name].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(source[name])


# ---------------------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Append one JSON object per line, `{"step": s, name: float, ...}`, and drive a tqdm bar.

    Files are opened per line, so a killed run leaves at most one torn last line (which `read_metrics`
    skips). disable=True (non-main processes) makes every call a no-op."""

    def __init__(self, path: PathLike, total: int | None = None, desc: str = "train", initial: int = 0,
                 disable: bool = False, postfix_keys: int = 4):
        self.path, self.disable, self.postfix_keys = Path(path), disable, postfix_keys
        if not disable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **scalars: Any) -> dict:
        """Write `step` and the scalars (tensors and numpy numbers become floats); returns the record."""
        record = {"step": int(step)}
        record.update({k: _to_float(k, v) for k, v in {**(metrics or {}), **scalars}.items()})
        if self.disable:
            return record
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.bar.update(record["step"] - self.bar.n)
        shown = list(record.items())[1:1 + self.postfix_keys]
        self.bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in shown), refresh=False)
        return record

    def truncate(self, step: int) -> None:
        """Drop lines after `step` (used on resume) and move the bar back to it."""
        if not self.disable:
            truncate_metrics(self.path, step)
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_float(name: str, value: Any) -> float | int:
    if isinstance(value, Tensor | np.ndarray):
        if int(np.prod(value.shape)) != 1:
            raise ValueError(f"metric {name!r}: expected a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {name!r}: expected a number, got {type(value).__name__}")
    return value


def read_metrics(path: PathLike) -> list[dict]:
    """All records of a metrics file, in order. A torn last line (a run killed mid-write) is skipped."""
    lines = Path(path).read_text().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the unterminated final line may be partial
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def truncate_metrics(path: PathLike, step: int) -> None:
    """Keep only records with record["step"] <= step (atomically), so a resumed run writes no duplicates."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def plot_curve(metrics_path: PathLike, key: str, out_png: PathLike, title: str | None = None) -> Path:
    """Plot metric `key` against step into a PNG (Agg canvas; pyplot's global state is never touched)."""
    from matplotlib.figure import Figure

    points = [(r["step"], r[key]) for r in read_metrics(metrics_path) if key in r]
    if not points:
        raise ValueError(f"key: {key!r} does not occur in {metrics_path}")
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
    ax.set(xlabel="step", ylabel=key, title=title or key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return Path(out_png)


def image_grid(images: Tensor, nrow: int, out_png: PathLike | None = None, upscale: int = 4,
               labels: Sequence[str] | None = None, pad: int = 2):
    """Tile images (N, 3, H, W) in [0, 1] with `nrow` images per row, nearest-neighbour upscaled
    (tiny 16x16 samples stay crisp); optional `labels` (one per row) are written on the left.
    Values are clamped to [0, 1]. Returns the PIL image and saves it when out_png is given."""
    from PIL import Image, ImageDraw

    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a tensor (N, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if nrow < 1 or upscale < 1:
        raise ValueError(f"nrow and upscale: must be >= 1, got {nrow} and {upscale}")
    n, rows = images.shape[0], -(-images.shape[0] // nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"labels: expected {rows} (one per row), got {len(labels)}")
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(0, 1)
    x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    x = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, h, w, 3)
    h, w = x.shape[1:3]
    boxes = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), s) for s in labels or []]
    margin = max((b[2] for b in boxes), default=-2 * pad) + 2 * pad
    grid = Image.new("RGB", (margin + nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i in range(n):
        r, c = divmod(i, nrow)
        grid.paste(Image.fromarray(x[i]), (margin + pad + c * (w + pad), pad + r * (h + pad)))
    draw = ImageDraw.Draw(grid)
    for r, (text, box) in enumerate(zip(labels or [], boxes)):  # vertically centred on its row
        draw.text((pad, pad + r * (h + pad) + (h - box[3] - box[1]) // 2), text, fill="black")
    if out_png is not None:
        grid.save(out_png)
    return grid


# ------------------------------------------------------------------------------------------ checkpoints
# A nested state (optimizer.state_dict(), RNG states, extra_state) is split into a JSON tree and a flat
# {key: tensor} safetensors file; tensors in the tree become {"__tensor__": key}, tuples {"__tuple__": [...]}
# and dicts {"__dict__": [[key, value], ...]} (the optimizer's state is keyed by int parameter ids).
def _encode(obj: Any, tensors: dict[str, Tensor], key: str) -> Any:
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in obj):
            raise ValueError(f"{key}: dict keys must be str or int, got {list(obj)[:5]}")
        return {"__dict__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise ValueError(f"{key}: cannot store a {type(obj).__name__} (only tensors, numbers, str, None, "
                     f"lists, tuples and dicts; pickle is never used)")


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """load_file, after checking the header really is safetensors (8-byte length, then JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{path}: not a safetensors file; pickle / torch.save files are refused because "
                         f"loading them can run arbitrary code")
    return load_file(path)


def _save_tree(obj: Any, folder: Path, name: str) -> None:
    tensors: dict[str, Tensor] = {}
    tree = _encode(obj, tensors, name)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(tree))


def _load_tree(folder: Path, name: str) -> Any:
    if not (folder / f"{name}.json").exists():
        raise ValueError(f"{folder}: missing {name}.json (incomplete checkpoint or another world size?)")
    tensors = _load_safetensors(folder / f"{name}.safetensors")
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generators: Mapping[str, torch.Generator]) -> None:
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ValueError(f"generators: {missing} were not saved in this checkpoint")
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


class Checkpointer:
    """Atomic safetensors + JSON checkpoints `directory/checkpoint-<step>/` for exact resume; keeps `keep`.

    Files: model.safetensors (the given params, by name), optimizer.*, state.* (step, extra_state, fp16
    grad scaler), rng-rank<r>.* (python, numpy, torch CPU/CUDA, named generators; one per process). Written
    to a hidden temp folder, renamed when complete. With an `accelerator` the main process writes the shared
    files (DDP: the optimizer state is the same on every process) and each process its RNG file."""

    def __init__(self, directory: PathLike, every: int, keep: int = 3, accelerator=None):
        if every < 1 or keep < 1:
            raise ValueError(f"every and keep: must be >= 1, got {every} and {keep}")
        self.directory, self.every, self.keep, self.accelerator = Path(directory), every, keep, accelerator
        self.rank = 0 if accelerator is None else accelerator.process_index
        self.is_main = accelerator is None or accelerator.is_main_process
        self._barrier = (lambda: None) if accelerator is None else accelerator.wait_for_everyone

    def due(self, step: int) -> bool:
        """True every `every` steps."""
        return step % self.every == 0

    def checkpoints(self) -> list[Path]:
        """Completed checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("checkpoint-*") if p.is_dir())

    def save(self, step: int, *, model_params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
             extra_state: Mapping[str, Any] | None = None,
             generators: Mapping[str, torch.Generator] | None = None) -> Path:
        """Write checkpoint `step`; extra_state may hold numbers, strings, tensors, lists and dicts."""
        final = self.directory / f"checkpoint-{step:08d}"
        tmp = self.directory / f".tmp-checkpoint-{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        _save_tree(_rng_state(generators or {}), tmp, f"rng-rank{self.rank}")
        if self.is_main:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_params.items()},
                      tmp / "model.safetensors")
            _save_tree(optimizer.state_dict(), tmp, "optimizer")
            state = {"step": step, "extra_state": dict(extra_state or {})}
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            _save_tree(state, tmp, "state")
        self._barrier()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.keep]:
                shutil.rmtree(old)
        self._barrier()
        return final

    def load(self, path: PathLike, *, model_params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
             extra_state: dict | None = None, generators: Mapping[str, torch.Generator] | None = None,
             metrics: MetricsLogger | PathLike | None = None) -> int:
        """Restore everything `save` wrote, in place; returns the checkpoint's step. `extra_state` is
        cleared and refilled; the metrics file is cut back to the checkpoint's step."""
        path = Path(path)
        refused = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if refused:
            raise ValueError(f"{path}: refusing pickle files {refused}; checkpoints are safetensors + JSON only")
        _copy_into(model_params, _load_safetensors(path / "model.safetensors"), "model_params")
        optimizer.load_state_dict(_load_tree(path, "optimizer"))
        state = _load_tree(path, "state")
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if extra_state is not None:
            extra_state.clear()
            extra_state.update(state["extra_state"])
        if isinstance(metrics, MetricsLogger):
            metrics.truncate(state["step"])
        elif metrics is not None and self.is_main:
            truncate_metrics(metrics, state["step"])
        _set_rng_state(_load_tree(path, f"rng-rank{self.rank}"), generators or {})
        self._barrier()
        return state["step"]

    def load_latest(self, **kwargs) -> int | None:
        """`load` the newest completed checkpoint and return its step, or None when there is none."""
        found = self.checkpoints()
        return None if not found else self.load(found[-1], **kwargs)
