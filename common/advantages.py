"""Advantages from rewards: group normalisation and per-prompt statistics.

Each repository normalises a little differently; the defaults below cite where they come from.

| source                         | mean over                    | std                   | ddof | eps  |
|--------------------------------|------------------------------|-----------------------|------|------|
| DanceGRPO / MixGRPO / BranchGRPO / Pref-GRPO (torch .std()) | contiguous group | group | 1 | 1e-8 |
| DDPO (`stat_tracking.py`)      | per-prompt buffer (16), persists across epochs; batch if < 16 | same source | 0 | 1e-6 |
| Flow-GRPO (`stat_tracking.py`) | per-prompt, current epoch only | per prompt, or global | 0 | 1e-4 |

A group (or statistics source) whose rewards are all equal gets advantage exactly 0, never NaN: the
official formulas give 0 / eps there, which is 0 up to rounding of the mean; we make it exact so that
Flow-GRPO's "drop samples with zero advantage" filter sees it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


def _normalise(r: Tensor, mean: Tensor, std: Tensor | None, eps: float, constant: Tensor) -> Tensor:
    # A = (r - mean) / (std + eps), or r - mean without std; exactly 0 where the rewards are constant
    a = r - mean if std is None else (r - mean) / (std + eps)
    return torch.where(constant, torch.zeros_like(a), a)


def group_advantages(rewards: Tensor, group_size: int, *, std: Literal["group", "global", "none"] = "group",
                     eps: float = 1e-8, ddof: int = 1) -> Tensor:
    """Advantages for the contiguous layout [p0]*G + [p1]*G + ... (prompts repeat_interleave'd).

    rewards: (B,) or (B, T) (columns, e.g. per-timestep rewards, are normalised independently).
    std: "group" divides by each group's std (DanceGRPO), "global" by the std of all rewards,
    "none" only subtracts the group mean. Defaults: DanceGRPO (torch std, ddof=1, eps 1e-8).
    """
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards: expected shape (B,) or (B, T), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {rewards.shape[0]}")
    if std not in ("group", "global", "none"):
        raise ValueError(f"std: 'group', 'global' or 'none', got {std!r}")
    if std == "group" and ddof >= group_size:
        raise ValueError(f"ddof: {ddof} needs groups larger than {group_size}")
    r = rewards.reshape(-1, group_size, *rewards.shape[1:])
    mean = r.mean(dim=1, keepdim=True)
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    if std == "group":
        scale = r.std(dim=1, keepdim=True, correction=ddof)
    elif std == "global":
        scale = rewards.std(dim=0, correction=ddof)
    else:
        scale = None
    return _normalise(r, mean, scale, eps, constant).reshape(rewards.shape)


def clip_advantages(a: Tensor, max: float = 5.0) -> Tensor:
    """Clamp to [-max, max] (adv_clip_max = 5 in DDPO, Flow-GRPO and DanceGRPO configs)."""
    return a.clamp(-max, max)


class PerPromptStatTracker:
    """Per-prompt reward statistics for layouts where a prompt's samples are not contiguous.

    mode="ddpo" (DDPO official): each prompt keeps a deque of its last `buffer_size` rewards that
    persists across epochs; while it holds fewer than `min_count`, the current batch's mean and std
    are used instead. np.std semantics (ddof 0), eps 1e-6.

    mode="flow_grpo" (Flow-GRPO official): the mean over all of the prompt's rewards seen since the
    last `clear()` (call it every epoch); std per prompt or, with global_std=True (every official SD3
    config), the std of all rewards in this `update` call. ddof 0, eps 1e-4. Rewards of shape (B, T)
    are normalised column by column.

    Both compute in float64 and return float32 on the rewards' device.
    """

    def __init__(self, mode: Literal["ddpo", "flow_grpo"] = "ddpo", *, buffer_size: int = 16,
                 min_count: int = 16, global_std: bool = False, eps: float | None = None):
        if mode not in ("ddpo", "flow_grpo"):
            raise ValueError(f"mode: 'ddpo' or 'flow_grpo', got {mode!r}")
        if mode == "ddpo" and (buffer_size < 1 or min_count < 1):
            raise ValueError("buffer_size, min_count: must be >= 1")
        self.mode = mode
        self.buffer_size = buffer_size  # DDPO config: 16 (32 for the aesthetic task)
        self.min_count = min_count  # DDPO config: 16
        self.global_std = global_std
        self.eps = eps if eps is not None else (1e-6 if mode == "ddpo" else 1e-4)
        self.stats: dict[str, deque | list] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Add this batch's rewards to the statistics and return its advantages."""
        rewards = torch.as_tensor(rewards)
        if rewards.ndim not in (1, 2) or rewards.shape[0] != len(prompts):
            raise ValueError(f"rewards: expected ({len(prompts)},) or ({len(prompts)}, T), "
                             f"got {tuple(rewards.shape)}")
        if self.mode == "ddpo" and rewards.ndim != 1:
            raise ValueError("rewards: mode 'ddpo' takes one reward per sample, shape (B,)")
        r = rewards.detach().to("cpu", torch.float64)
        prompts = list(prompts)
        for p, row in zip(prompts, r):
            if p not in self.stats:
                self.stats[p] = deque(maxlen=self.buffer_size) if self.mode == "ddpo" else []
            if self.mode == "flow_grpo":
                self.stats[p].append(row)
        adv = torch.empty_like(r)
        for p in dict.fromkeys(prompts):
            rows = torch.tensor([k for k, q in enumerate(prompts) if q == p])
            if self.mode == "ddpo":
                self.stats[p].extend(r[rows].tolist())
                source = torch.tensor(list(self.stats[p]), dtype=torch.float64)
                if len(source) < self.min_count:
                    source = r  # batch fallback
                scale = source.std(correction=0)
            else:
                source = torch.stack(self.stats[p])
                scale = (r if self.global_std else source).std(dim=0, correction=0)
            constant = (source.amax(dim=0) == source.amin(dim=0)) & (r[rows] == source[0])
            adv[rows] = _normalise(r[rows], source.mean(dim=0), scale, self.eps, constant)
        return adv.to(device=rewards.device, dtype=torch.float32)

    def clear(self) -> None:
        """Forget all statistics (Flow-GRPO calls this at the start of every epoch)."""
        self.stats = {}

    def get_stats(self) -> dict[str, dict[str, float]]:
        out = {}
        for p, v in self.stats.items():
            t = torch.tensor(list(v), dtype=torch.float64) if self.mode == "ddpo" else torch.stack(v)
            out[p] = {"mean": t.mean().item(), "std": t.std(correction=0).item(), "count": len(v)}
        return out
