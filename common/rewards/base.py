"""The one reward signature: `reward(images, prompts, metadata) -> (scores, info)`.

- images: float tensor (B, 3, H, W) in [0, 1] (differentiable rewards keep the graph);
- prompts: list of B strings;
- metadata: list of B dicts (or None), e.g. the toy world's ground-truth attributes;
- scores: float tensor (B,); info: dict of extra per-sample tensors or numbers for logging.

`check_inputs` and `check_scores` give the clear error messages every reward shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

Metadata = Sequence[dict[str, Any]] | None


class Reward(Protocol):
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]: ...


def check_inputs(images: Tensor, prompts: Sequence[str], metadata: Metadata = None, *,
                 name: str = "reward", atol: float = 1e-3) -> None:
    """Raise ValueError naming the field and the reason when the inputs break the signature."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be float in [0, 1], got dtype {images.dtype}")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -atol or hi > 1 + atol or lo != lo or hi != hi:
            bad = int(((images < -atol) | (images > 1 + atol) | images.isnan()).flatten(1).any(1).nonzero()[0])
            raise ValueError(f"{name}: images must lie in [0, 1]; image {bad} has values in [{lo:.3g}, {hi:.3g}]"
                             " (decode to [0, 1] before scoring)")
    if isinstance(prompts, str):
        raise ValueError(f"{name}: prompts must be a list of strings, got a single string")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: prompts has {len(prompts)} items but images has {images.shape[0]}")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise ValueError(f"{name}: metadata has {len(metadata)} items but images has {images.shape[0]}")


def check_scores(scores: Tensor, *, name: str = "reward") -> Tensor:
    """Scores must be a finite (B,) float tensor; a NaN names the sample that produced it."""
    if scores.ndim != 1:
        raise ValueError(f"{name}: scores must have shape (B,), got {tuple(scores.shape)}")
    bad = ~torch.isfinite(scores.detach())
    if bad.any():
        raise ValueError(f"{name}: score of sample {int(bad.nonzero()[0])} is {float(scores[bad][0])}"
                         " (not finite)")
    return scores
