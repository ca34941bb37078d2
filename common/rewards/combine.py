"""Weighted sum of rewards, as in multi-reward training (Flow-GRPO `multi_score`, DanceGRPO, MixGRPO).

`r(x, c) = sum_k w_k * r_k(x, c)`. `info` keeps each component's scores under its name (detached) and
each component's own info under `"<name>/<key>"`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from common.rewards.base import Metadata, Reward, check_inputs, check_scores


class CombinedReward:
    """`CombinedReward({"pickscore": (PickScore(...), 1.0), "jpeg": (JpegCompressibility(), 0.1)})`.

    Differentiable where every component with a nonzero weight is; components are called in order.
    Scores are moved to the device of `images`.
    """

    name = "combined"

    def __init__(self, components: Mapping[str, tuple[Reward, float]]):
        if not components:
            raise ValueError("combined: components is empty; give {name: (reward, weight)}")
        self.components: dict[str, tuple[Reward, float]] = {}
        for key, value in components.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"combined: component name must be a non-empty string without '/', got {key!r}")
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ValueError(f"combined: component {key!r} must be a (reward, weight) tuple")
            reward, weight = value
            if not callable(reward):
                raise ValueError(f"combined: component {key!r} reward is not callable")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"combined: component {key!r} weight must be a finite number, got {weight!r}")
            self.components[key] = (reward, float(weight))

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        total: Tensor | None = None
        info: dict[str, Any] = {}
        for key, (reward, weight) in self.components.items():
            scores, extra = reward(images, prompts, metadata)
            scores = check_scores(scores, name=f"combined[{key}]").to(images.device)
            if scores.shape[0] != images.shape[0]:
                raise ValueError(f"combined: component {key!r} returned {scores.shape[0]} scores for "
                                 f"{images.shape[0]} images")
            info[key] = scores.detach()
            info.update({f"{key}/{k}": v for k, v in extra.items()})
            # r = sum_k w_k * r_k
            total = weight * scores if total is None else total + weight * scores
        assert total is not None
        return total, info
