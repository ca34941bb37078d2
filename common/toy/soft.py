"""Differentiable toy GenEval: a soft score in [0, 1] for reward backpropagation (ReFL, DRaFT, ...).

The hard evaluator (`evaluator.py`) thresholds pixels and counts connected components, so it has
no gradient. Here every step is smooth in the pixels:

1. colour maps   m_k(p) = softmax_k(-residual_k(p)^2 / TAU_COLOR) * alpha_k(p)   (soft palette coverage)
2. shape maps    H_{k,s}(p) = max_z exp(-MSE(window_z(p), template_{s,z}) / TAU_SHAPE)
                 a matched filter: how well a shape s of size z, in colour k, centred at p explains
                 the coverage in its box plus a one-pixel empty ring (computed with conv2d).
3. per clause    Q(p) = H_{k,s}(p) for the clause's colour (max over colours when none is given)
                 presence = max_p Q(p);  soft count = sum over local maxima of sigmoid((Q - 0.5) / 0.05);
                 soft centre = sum_p softmax(Q / TAU_CENTER)(p) * p.
4. per image     the product of the clause terms (all clauses must hold, as in GenEval):
                 presence of each include clause, exp(-(count_hat - n)^2 / (2 * 0.5^2)) for counting,
                 and for position a sigmoid of GenEval's margin rule on the soft centres.

The score ranks correct drawings above incorrect ones and has a nonzero gradient almost everywhere;
it is a surrogate, not equal to the hard evaluator (the tests check the ranking, not equality).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.toy.evaluator import (
    TEMPLATE_BLURS,
    check_metadata,
    color_coverage,
    estimate_background,
    gaussian_blur,
)
from common.toy.world import COLORS, SHAPES, SIZE_RANGE, shape_coverage

#: softmax temperature over palette colours on squared residuals
TAU_COLOR = 0.02
#: shape fit: exp(-MSE / TAU_SHAPE); a wrong shape of the right size has MSE ~0.1
TAU_SHAPE = 0.03
#: softmax temperature over pixels for soft centres
TAU_CENTER = 0.05
#: template sizes: every box side the world draws
SIZES = tuple(range(min(lo for lo, _ in SIZE_RANGE.values()), max(hi for _, hi in SIZE_RANGE.values()) + 1))
#: GenEval's position margin, as a fraction of the two objects' summed sizes
POSITION_THRESHOLD = 0.1


def soft_color_maps(images: Tensor) -> Tensor:
    """(B, K, H, W) soft coverage of each palette colour; the background estimate is not differentiated."""
    alpha, residual = color_coverage(images, estimate_background(images).detach())
    weight = torch.softmax(-residual.pow(2) / TAU_COLOR, dim=1)
    return weight * alpha


@lru_cache(maxsize=32)
def _bank(size: int) -> Tensor:
    """(S * len(TEMPLATE_BLURS), 1, size + 2, size + 2): each shape in a box with an empty ring."""
    out = []
    for shape in SHAPES:
        canvas = F.pad(shape_coverage(shape, size, size), (3, 3, 3, 3))
        for b in TEMPLATE_BLURS:
            out.append(gaussian_blur(canvas, b)[2:-2, 2:-2])
    return torch.stack(out)[:, None]


def shape_heatmaps(maps: Tensor) -> Tensor:
    """(B, K, S, H, W) fit in [0, 1] of each shape of each colour centred at each pixel.

    MSE(window, T) = (sum c^2 - 2 sum c T + sum T^2) / n over the (size + 2)^2 window, with both sums
    over the window computed as convolutions; the best size and blur level is kept.
    """
    b, k, h, w = maps.shape
    x = maps.reshape(b * k, 1, h, w)
    best = None
    for size in SIZES:
        bank = _bank(size).to(maps)
        ks = size + 2
        # pad so that output pixel o sees the window whose centre rounds down to o
        lo = (ks - 1) // 2
        xp = F.pad(x, (lo, ks - 1 - lo, lo, ks - 1 - lo))
        cross = F.conv2d(xp, bank)  # (BK, S*nb, H, W)
        energy = F.conv2d(xp.pow(2), torch.ones_like(bank[:1]))
        mse = (energy - 2 * cross + bank.pow(2).sum((1, 2, 3)).view(1, -1, 1, 1)) / ks**2
        fit = torch.exp(-mse.clamp_min(0) / TAU_SHAPE).view(b * k, len(SHAPES), -1, h, w).amax(2)
        best = fit if best is None else torch.maximum(best, fit)
    return best.view(b, k, len(SHAPES), h, w)


def _clause_map(heat: Tensor, clause: dict[str, Any]) -> Tensor:
    """(H, W) fit map of one clause from one image's (K, S, H, W) heatmaps."""
    s = SHAPES.index(clause["class"])
    if "color" in clause:
        return heat[COLORS.index(clause["color"]), s]
    return heat[:, s].amax(0)


def soft_count(q: Tensor) -> Tensor:
    """Detections in a fit map: local maxima (5x5) weighted by sigmoid((q - 0.5) / 0.05)."""
    peak = (q >= F.max_pool2d(q[None, None], 5, stride=1, padding=2)[0, 0]).float()
    return (peak * torch.sigmoid((q - 0.5) / 0.05)).sum()


def soft_center(q: Tensor) -> Tensor:
    """(x, y) pixel-centre coordinates of the soft argmax of a fit map."""
    h, w = q.shape
    weight = torch.softmax(q.flatten() / TAU_CENTER, 0).view(h, w)
    ys = torch.arange(h, dtype=q.dtype, device=q.device) + 0.5
    xs = torch.arange(w, dtype=q.dtype, device=q.device) + 0.5
    return torch.stack([(weight.sum(0) * xs).sum(), (weight.sum(1) * ys).sum()])


def soft_relation(center_a: Tensor, center_b: Tensor, relation: str, size_sum: float = 12.0) -> Tensor:
    """Soft GenEval relation of A to B: sigmoid((+-revised_offset_axis / |offset| - 0.5) / 0.1).

    revised = sign(o) * softplus(|o| - POSITION_THRESHOLD * size_sum) per axis (a smooth relu);
    size_sum is the two objects' summed box sizes (12 px is typical of the world's drawings).
    """
    offset = center_a - center_b
    revised = offset.sign() * F.softplus(offset.abs() - POSITION_THRESHOLD * size_sum, beta=4.0)
    ratio = revised / offset.norm().clamp_min(1e-3)
    value = {"left of": -ratio[0], "right of": ratio[0], "above": -ratio[1], "below": ratio[1]}[relation]
    return torch.sigmoid((value - 0.5) / 0.1)


def soft_geneval(images: Tensor, metadata: Sequence[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Soft correctness (B,) in [0, 1] and per-sample terms (presence, count, relation)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if metadata is None or len(metadata) != images.shape[0]:
        n = None if metadata is None else len(metadata)
        raise ValueError(f"metadata must be a list of {images.shape[0]} dicts (one per image), got {n}")
    for i, m in enumerate(metadata):
        check_metadata(m, i)
    heat = shape_heatmaps(soft_color_maps(images))
    scores, presence, count_terms, relation_terms = [], [], [], []
    one = images.new_ones(())
    for i, meta in enumerate(metadata):
        maps = [_clause_map(heat[i], c) for c in meta["include"]]
        present = one
        count_term = one
        for clause, q in zip(meta["include"], maps):
            if meta.get("task") == "counting":
                # the exclude clause (count + 1 present fails) is covered by the two-sided penalty
                count_term = count_term * torch.exp(-(soft_count(q) - clause["count"]).pow(2) / (2 * 0.5**2))
            else:
                present = present * q.max()
        relation_term = one
        for clause, q in zip(meta["include"], maps):
            if "position" in clause:
                relation, ref = clause["position"]
                relation_term = relation_term * soft_relation(soft_center(q), soft_center(maps[ref]), relation)
        scores.append(present * count_term * relation_term)
        presence.append(present)
        count_terms.append(count_term)
        relation_terms.append(relation_term)
    info = {"presence": torch.stack(presence).detach(), "count": torch.stack(count_terms).detach(),
            "relation": torch.stack(relation_terms).detach()}
    return torch.stack(scores), info
