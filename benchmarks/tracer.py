"""Trace the model calls of a training run and split the run into updates and phases.

`Tracer` hooks the denoiser, VAE, text encoders and reward of an adapter, `Tensor.backward`, the
optimizers' steps and the tokenizers, records one `Event` per top-level call and keeps the inputs of
each distinct call for a later replay. `split_updates`, `event_phases` and `phase_report` turn the
events into per-update, per-phase tables (rules in benchmarks/harness.py's docstring).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PHASES = ("prompt_encoding", "rollout", "decode", "reward", "advantage", "training", "other")
TRAINING_KINDS = ("backward", "optimizer")


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timers see it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()



@dataclass
class Event:
    """One top-level traced call."""

    kind: str  #: tokenize, text, denoiser, vae_encode, vae_decode, reward, backward, optimizer
    start: float
    end: float
    grad: bool  #: grad mode at the call
    key: tuple | None = None  #: replay key (None: not replayed)


@dataclass
class _Replay:
    call: Callable[..., Any]
    args: tuple
    kwargs: dict
    grad: bool
    count: int = 0


def _signature(value: Any) -> Any:
    """Hashable description of a call's inputs: shapes, dtypes and small constants."""
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, list | tuple):
        return (type(value).__name__, len(value), tuple(_signature(v) for v in value[:4]))
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    if value is None or isinstance(value, bool | int | float | str):
        return value if not isinstance(value, str) or len(value) < 32 else "str"
    return type(value).__name__


def _snapshot(value: Any) -> Any:
    """A detached copy of the tensors in `value` (keeping requires_grad), for a later replay."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, list | tuple):
        for v in value:
            if (t := _first_tensor(v)) is not None:
                return t
    if hasattr(value, "to_tuple"):  # diffusers / transformers output dataclasses
        return _first_tensor(value.to_tuple())
    return None


class _TracedReward:
    """Wraps a reward that is not an nn.Module; attributes pass through."""

    def __init__(self, reward: Callable, tracer: Tracer):
        self._reward, self._tracer = reward, tracer
        self._call = reward.__call__  # one bound method, so its id keys the replay

    def __call__(self, images, prompts, metadata=None, **kwargs):
        with self._tracer.span("reward", self._call, (images, prompts, metadata), kwargs):
            return self._call(images, prompts, metadata, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reward, name)


class Tracer:
    """Times the model calls of a training run (see the module docstring) and keeps inputs to replay them."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.events: list[Event] = []
        self.replays: dict[tuple, _Replay] = {}
        self.active = True
        self._depth = 0
        self._start: list[tuple[float, bool]] = []
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any]] = []

    # -- the clock around one call --
    def _enter(self) -> None:
        if not self.active:
            return
        if self._depth == 0:
            sync(self.device)
            self._start.append((time.perf_counter(), torch.is_grad_enabled()))
        self._depth += 1

    def _exit(self, kind: str, key: tuple | None) -> None:
        if not self.active:
            return
        self._depth -= 1
        if self._depth == 0:
            sync(self.device)
            start, grad = self._start.pop()
            self.events.append(Event(kind, start, time.perf_counter(), grad, key))

    def _register(self, kind: str, call: Callable, args: tuple, kwargs: dict) -> tuple | None:
        """The replay key of a top-level call; inputs are copied the first time a key is seen."""
        if self._depth != 0 or not self.active:
            return None
        grad = torch.is_grad_enabled()
        key = (kind, id(call), grad, _signature(args), _signature(kwargs))
        if key not in self.replays:
            self.replays[key] = _Replay(call, _snapshot(args), _snapshot(kwargs), grad)
        self.replays[key].count += 1
        return key

    @contextlib.contextmanager
    def span(self, kind: str, call: Callable | None = None, args: tuple = (), kwargs: dict | None = None
             ) -> Iterator[None]:
        key = self._register(kind, call, args, kwargs or {}) if call is not None else None
        self._enter()
        try:
            yield
        finally:
            self._exit(kind, key)

    # -- what is traced --
    def module(self, module: nn.Module, kind: str) -> None:
        """Trace every forward of `module` (hooks survive deepcopy, so frozen copies are traced too)."""
        keys: list[tuple | None] = []

        def pre(mod, args, kwargs):
            keys.append(self._register(kind, mod, args, kwargs))
            self._enter()

        def post(mod, args, kwargs, output):
            self._exit(kind, keys.pop())

        self._handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                          module.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def adapter(self, adapter) -> None:
        """Trace an adapter's denoiser, text encoders and VAE (its encoder and decoder modules)."""
        components = (adapter.pipeline_components() if hasattr(adapter, "pipeline_components")
                      else vars(adapter))
        seen: set[int] = set()
        modules: list[nn.Module] = [adapter.denoiser]
        for value in components.values():
            modules += [v for v in (value if isinstance(value, list | tuple) else [value]) if isinstance(v, nn.Module)]
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            if module is adapter.denoiser:
                self.module(module, "denoiser")
            elif hasattr(module, "decoder") and hasattr(module, "encoder") and hasattr(module, "decode"):
                self.module(module.decoder, "vae_decode")
                self.module(module.encoder, "vae_encode")
            elif not any(p.requires_grad for p in module.parameters()) or hasattr(module, "get_input_embeddings"):
                self.module(module, "text")

    def reward(self, reward: Callable) -> Callable:
        """Trace a reward: hooks on an nn.Module reward, a wrapper around any other callable."""
        if isinstance(reward, nn.Module):
            self.module(reward, "reward")
            return reward
        return _TracedReward(reward, self)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Tracer]:
        """Trace `Tensor.backward` and every optimizer step while the block runs; drop all hooks after."""
        original_backward = torch.Tensor.backward
        tracer = self

        @functools.wraps(original_backward)
        def backward(tensor, *args, **kwargs):
            with tracer.span("backward"):
                return original_backward(tensor, *args, **kwargs)

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        handles = [register_optimizer_step_pre_hook(lambda opt, a, k: self._enter()),
                   register_optimizer_step_post_hook(lambda opt, a, k: self._exit("optimizer", None))]
        torch.Tensor.backward = backward
        with contextlib.suppress(ImportError):  # tokenizers: prompt encoding, but no model call
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase

            original_tokenize = PreTrainedTokenizerBase.__call__

            @functools.wraps(original_tokenize)
            def tokenize(tok, *args, **kwargs):
                with tracer.span("tokenize"):
                    return original_tokenize(tok, *args, **kwargs)

            self.patch(PreTrainedTokenizerBase, "__call__", tokenize)
        try:
            yield self
        finally:
            self.active = False  # hooks left on deep copies of traced modules stay silent from now on
            torch.Tensor.backward = original_backward
            for h in handles + self._handles:
                h.remove()
            self._handles = []
            for obj, name, value in reversed(self._patched):
                setattr(obj, name, value)
            self._patched = []

    def patch(self, obj: Any, name: str, value: Any) -> None:
        """setattr(obj, name, value) until `installed` exits."""
        self._patched.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    # -- replay --
    def replay_times(self, reps: int, warmup: int = 1) -> dict[tuple, tuple[float, float]]:
        """(forward, backward) median seconds of each distinct call replayed alone; backward (of the
        output's sum) only for calls that ran with grad and gave an output that needs it, else 0."""
        out = {}
        for key, r in self.replays.items():
            fwd, bwd = [], []
            for k in range(warmup + reps):
                args, kwargs = _snapshot(r.args), _snapshot(r.kwargs)
                sync(self.device)
                t0 = time.perf_counter()
                with torch.set_grad_enabled(r.grad):
                    t = _first_tensor(r.call(*args, **kwargs))
                sync(self.device)
                t1 = time.perf_counter()
                if r.grad and t is not None and t.requires_grad:
                    t.float().sum().backward()
                    sync(self.device)
                t2 = time.perf_counter()
                if k >= warmup:
                    fwd.append(t1 - t0)
                    bwd.append(t2 - t1)
            out[key] = (statistics.median(fwd), statistics.median(bwd))
        return out


# ---- phases of one update ------------------------------------------------------------------------


def split_updates(events: Sequence[Event], num_updates: int, run_start: float) -> list[tuple[float, float]]:
    """[start, end) of each update: update k ends where its last optimizer step ends."""
    steps = [e for e in events if e.kind == "optimizer"]
    if not steps or len(steps) % num_updates:
        raise RuntimeError(f"{len(steps)} optimizer steps do not split into {num_updates} equal updates")
    per = len(steps) // num_updates
    ends = [steps[(k + 1) * per - 1].end for k in range(num_updates)]
    return list(zip([run_start] + ends[:-1], ends))


def event_phases(events: Sequence[Event]) -> list[str]:
    """The phase of each event (rules in the module docstring)."""
    base = []
    for e in events:
        if e.kind in ("tokenize", "text"):
            base.append("prompt_encoding")
        elif e.kind in ("vae_encode", "vae_decode"):
            base.append("decode")
        elif e.kind == "reward":
            base.append("reward")
        elif e.kind in TRAINING_KINDS or (e.kind == "denoiser" and e.grad):
            base.append("training")
        else:
            base.append("rollout")
    phases = list(base)
    k = 0
    while k < len(events):  # runs of no-grad denoiser calls
        if base[k] != "rollout":
            k += 1
            continue
        end = k
        while end + 1 < len(events) and base[end + 1] == "rollout":
            end += 1
        near_training = (k > 0 and base[k - 1] == "training") or (end + 1 < len(events) and base[end + 1] == "training")
        if end == k and near_training:
            phases[k] = "training"
        k = end + 1
    return phases


def _gap_phase(before: str, after: str) -> str:
    """Phase of the time between two traced calls: the earlier call's, except after a reward (advantage
    when training follows, else other) and after prompt encoding (the next phase's set-up)."""
    if before == "reward":
        return "advantage" if after == "training" else "other"
    if before == "prompt_encoding":
        return after
    return before


def phase_report(events: Sequence[Event], window: tuple[float, float], raw: dict[tuple, tuple[float, float]]
                 ) -> dict[str, dict[str, float]]:
    """Wall time, raw model time and call counts per phase inside one update window."""
    t0, t1 = window
    inside = [e for e in events if e.start >= t0 and e.end <= t1]
    phases = event_phases(inside)
    out = {p: {"time_s": 0.0, "raw_s": 0.0, "model_s": 0.0, "calls": 0} for p in PHASES}
    cursor, current = t0, "other"
    for e, phase in zip(inside, phases):
        out[_gap_phase(current, phase)]["time_s"] += e.start - cursor
        out[phase]["time_s"] += e.end - e.start
        if e.kind != "tokenize":
            out[phase]["model_s"] += e.end - e.start
        if e.kind == "optimizer":
            out[phase]["raw_s"] += e.end - e.start
        elif e.key is not None:
            forward, backward = raw[e.key]
            out[phase]["raw_s"] += forward
            out["training"]["raw_s"] += backward  # the backward runs inside the training phase
            out[phase]["calls"] += 1
        cursor, current = e.end, phase
    out[_gap_phase(current, "other")]["time_s"] += t1 - cursor
    return out


def call_counts(events: Sequence[Event], window: tuple[float, float]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        if e.start >= window[0] and e.end <= window[1]:
            name = f"{e.kind}_grad" if e.kind == "denoiser" and e.grad else e.kind
            counts[name] = counts.get(name, 0) + 1
    return counts
