"""Toy GenEval: read colours, shapes, counts and positions back from pixels and check the prompt.

The pipeline mirrors GenEval (Ghosh et al. 2023, `evaluation/evaluate_images.py`) with its two
learned parts swapped for rules that are exact on the toy world:

- detector (Mask2Former in GenEval) -> per-pixel palette assignment + connected components.
  A pixel belongs to colour k when, of all palette colours, the segment background -> colour k
  explains it best and it covers at least half the pixel (coverage `alpha_k` >= 0.5). Each
  8-connected component of one colour with at least `MIN_AREA` pixels and a near-square box of
  side <= `MAX_BOX` is a candidate; its area plays the part of the detector's confidence.
- shape: the coverage around the component is compared with a circle, a square and a triangle
  inscribed in boxes up to `BOX_SLACK` pixels larger than its thresholded box, sharp and blurred;
  the closest template (mean squared error) names the shape. This is the fill-ratio test
  (square ~1, circle ~pi/4, triangle ~1/2) made position-aware and tolerant of soft edges. A
  candidate that no template explains (error > `MAX_SHAPE_ERROR`) is a blob, not an object: the
  role of GenEval's confidence threshold.
- colour classifier (CLIP in GenEval) -> the palette colour of the component.
- position: box centres with GenEval's margin rule (`world.relative_position`).

Scoring rules are GenEval's: every include clause needs at least `count` objects of its class; the
top-`count` of them (by confidence) must carry the clause's colour and satisfy its relation to every
top object of the referenced clause; an exclude clause fails the image when `count` or more objects
of its class are present. Task accuracy is the mean over images; "overall" the unweighted mean over
tasks (GenEval summary_scores.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.toy.world import COLORS, PALETTE, SHAPES, TASKS, relative_position, shape_coverage

#: smallest component (pixels) that counts as an object: the smallest drawn shape (a size-5
#: triangle) covers 12 pixels, 9 after blur (sigma 0.8); smaller blobs are specks, not objects
MIN_AREA = 8
#: a pixel is foreground for a colour when the colour covers at least this fraction of it
COVERAGE_THRESHOLD = 0.5
#: the background is this quantile of each channel (objects cover well under half the image)
BACKGROUND_QUANTILE = 0.25
#: the world draws shapes in square boxes of side 5 to 10: a component whose thresholded box is
#: larger than MAX_BOX, or whose sides differ by more than MAX_ASPECT_GAP, is not an object
MAX_BOX = 12
MAX_ASPECT_GAP = 3
#: a component is an object only if some shape template explains its region this well (mean squared
#: coverage error); the role of GenEval's detector confidence threshold (0.3). Clean drawings stay
#: below 0.002, drawings blurred (sigma 0.8) and noised (std 0.05) below 0.011, ragged but recognisable
#: generated shapes at 0.01-0.03; shapeless blobs and noise score 0.04 and up.
MAX_SHAPE_ERROR = 0.03
#: counting prompts use a stricter threshold, as GenEval raises the confidence to 0.9 for them
MAX_SHAPE_ERROR_COUNTING = 0.02
#: blur levels (Gaussian sigma, pixels) of the shape templates
TEMPLATE_BLURS = (0.0, 0.5, 0.8)


def palette_tensor(device=None, dtype=torch.float32) -> Tensor:
    """(K, 3) RGB of `world.COLORS` in order."""
    return torch.tensor([PALETTE[c] for c in COLORS], device=device, dtype=dtype)


def estimate_background(images: Tensor) -> Tensor:
    """(B, 3, 1, 1) per-channel BACKGROUND_QUANTILE of each image (differentiable almost everywhere)."""
    return images.flatten(2).quantile(BACKGROUND_QUANTILE, dim=2)[..., None, None]


def color_coverage(images: Tensor, background: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Coverage of each palette colour at each pixel, and how well that colour explains the pixel.

    With background b and palette colour c_k, a pixel p is modelled as p = b + alpha_k (c_k - b):
        alpha_k = clamp(<p - b, c_k - b> / |c_k - b|^2, 0, 1),   residual_k = |p - b - alpha_k (c_k - b)|.
    Returns alpha (B, K, H, W) and residual (B, K, H, W); differentiable in images.
    """
    if background is None:
        background = estimate_background(images)
    palette = palette_tensor(images.device, images.dtype)  # (K, 3)
    direction = palette[None, :, :, None, None] - background[:, None]  # (B, K, 3, 1, 1)
    diff = (images - background)[:, None]  # (B, 1, 3, H, W)
    alpha = ((diff * direction).sum(2) / direction.pow(2).sum(2).clamp_min(1e-6)).clamp(0, 1)
    residual = (diff - alpha[:, :, None] * direction).pow(2).sum(2).clamp_min(1e-12).sqrt()
    return alpha, residual


def connected_components(mask: Tensor) -> Tensor:
    """8-connected component labels of a (N, H, W) bool mask: 0 = off, else an id per component.

    Each on-pixel starts with its own id and repeatedly takes the largest id in its 3x3
    neighbourhood (restricted to on-pixels) until nothing changes.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, h, w)
    on = mask.float()
    labels = ids * on
    for _ in range(h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * on
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (..., H, W) with zero padding (radius 2 pixels)."""
    if sigma <= 0:
        return x
    r = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    k = torch.exp(-r.pow(2) / (2 * sigma**2))
    k = k / k.sum()
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    y = F.conv2d(y, k.view(1, 1, 1, 5), padding=(0, 2))
    y = F.conv2d(y, k.view(1, 1, 5, 1), padding=(2, 0))
    return y.reshape(shape)


#: the fitted box may extend the thresholded box by up to this many pixels on each side
BOX_SLACK = 1
#: pixels of context kept around the thresholded box when fitting
MARGIN = BOX_SLACK + 2


_coverage = lru_cache(maxsize=1024)(shape_coverage)  # read-only tensors, shared between templates


@lru_cache(maxsize=256)
def _templates(height: int, width: int) -> Tensor:
    """(S, N, h + 2 MARGIN, w + 2 MARGIN) candidate renderings around an (h, w) thresholded box.

    For each shape: inscribed in every box that extends the thresholded box by 0..BOX_SLACK pixels
    per side, at every blur level. Soft (blurred) edges fall below the 0.5 coverage threshold, so
    the thresholded box of a blurred triangle loses its apex; the candidates let it be found again.
    """
    grow = range(BOX_SLACK + 1)
    canvases = []
    for shape in SHAPES:
        for left, top, right, bottom in itertools.product(grow, grow, grow, grow):
            h, w = height + top + bottom, width + left + right
            canvas = torch.zeros(height + 2 * MARGIN, width + 2 * MARGIN)
            canvas[MARGIN - top: MARGIN - top + h, MARGIN - left: MARGIN - left + w] = _coverage(shape, h, w)
            canvases.append(canvas)
    boxes = torch.stack(canvases).view(len(SHAPES), -1, height + 2 * MARGIN, width + 2 * MARGIN)
    return torch.cat([gaussian_blur(boxes, b) for b in TEMPLATE_BLURS], dim=1)


def classify_shape(region: Tensor) -> tuple[str, list[float]]:
    """Shape that best explains a coverage region (the thresholded box plus MARGIN on each side).

    Each shape's error is the smallest mean squared error over its candidate boxes and blurs.
    """
    h, w = region.shape[0] - 2 * MARGIN, region.shape[1] - 2 * MARGIN
    templates = _templates(h, w).to(region)
    errors = (templates - region).pow(2).mean(dim=(2, 3)).amin(dim=1)
    return SHAPES[int(errors.argmin())], errors.tolist()


@torch.no_grad()
def detect(images: Tensor) -> list[list[dict[str, Any]]]:
    """Candidate objects in each image: dicts with class, color, box (x0, y0, x1, y1), area and
    shape_errors (one per SHAPES entry; `evaluate_objects` drops candidates whose best error is
    above the confidence threshold). Sorted by area, largest first: the detector-confidence order
    GenEval's top-`count` rule relies on.
    """
    images = images.detach().float()
    alpha, residual = color_coverage(images)
    best = residual.argmin(dim=1, keepdim=True)  # (B, 1, H, W): colour that explains the pixel best
    is_best = torch.zeros_like(alpha, dtype=torch.bool).scatter_(1, best, True)
    fg = is_best & (alpha >= COVERAGE_THRESHOLD)  # (B, K, H, W)
    b, k, h, w = fg.shape
    labels = connected_components(fg.reshape(b * k, h, w)).reshape(b, k, h, w)
    found: list[list[dict[str, Any]]] = []
    for i in range(b):
        objects = []
        for ci in range(k):
            lab = labels[i, ci]
            ids, areas = lab.unique(return_counts=True)
            for comp, area in zip(ids.tolist(), areas.tolist()):
                if comp == 0 or area < MIN_AREA:
                    continue
                ys, xs = (lab == comp).nonzero(as_tuple=True)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                if max(x1 - x0, y1 - y0) > MAX_BOX or abs((x1 - x0) - (y1 - y0)) > MAX_ASPECT_GAP:
                    continue  # far larger or less square than any drawn shape: not an object
                # coverage of this colour where it explains the pixel best, other components removed
                other = (lab != comp) & (lab != 0)
                cover = F.pad(alpha[i, ci] * (is_best[i, ci] & ~other), (MARGIN,) * 4)
                shape, errors = classify_shape(cover[y0: y1 + 2 * MARGIN, x0: x1 + 2 * MARGIN])
                objects.append({"class": shape, "color": COLORS[ci], "box": (x0, y0, x1, y1),
                                "area": area, "shape_errors": errors})
        objects.sort(key=lambda o: -o["area"])
        found.append(objects)
    return found


def check_metadata(metadata: dict[str, Any], index: int = 0) -> None:
    """ValueError naming the field when a metadata dict is not a toy GenEval scene."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata[{index}] must be a dict, got {type(metadata).__name__}")
    if "include" not in metadata:
        raise ValueError(f"metadata[{index}] has no 'include' list (keys: {sorted(metadata)})")
    for clause in list(metadata["include"]) + list(metadata.get("exclude", [])):
        if clause.get("class") not in SHAPES:
            raise ValueError(f"metadata[{index}]: clause class must be one of {SHAPES}, got {clause.get('class')!r}")
        if not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise ValueError(f"metadata[{index}]: clause count must be a positive int, got {clause.get('count')!r}")
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(f"metadata[{index}]: clause color must be one of {COLORS}, got {clause['color']!r}")


def evaluate_objects(objects: list[dict[str, Any]], metadata: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's rules on a list of detected objects; returns (correct, reason it failed or "")."""
    limit = MAX_SHAPE_ERROR_COUNTING if metadata.get("task") == "counting" else MAX_SHAPE_ERROR
    objects = [o for o in objects if min(o["shape_errors"]) <= limit]
    matched: list[list[dict] | None] = []
    correct, reason = True, ""
    for clause in metadata["include"]:
        found = [o for o in objects if o["class"] == clause["class"]]
        if len(found) < clause["count"]:
            correct = False
            reason = reason or f"expected {clause['class']} >= {clause['count']}, found {len(found)}"
            matched.append(None)
            continue
        top = found[: clause["count"]]
        if "color" in clause:
            colors = [o["color"] for o in top]
            if colors.count(clause["color"]) < clause["count"]:
                correct = False
                reason = reason or f"expected {clause['color']} {clause['class']}, found {colors}"
        if "position" in clause:
            relation, ref = clause["position"]
            if matched[ref] is None:
                correct = False
                reason = reason or f"no target {metadata['include'][ref]['class']}"
            else:
                for obj in top:
                    for target in matched[ref]:
                        rels = relative_position(obj["box"], target["box"])
                        if relation not in rels:
                            correct = False
                            reason = reason or f"expected {clause['class']} {relation} target, found {sorted(rels)}"
        matched.append(top)
    for clause in metadata.get("exclude", []):
        n = sum(o["class"] == clause["class"] for o in objects)
        if n >= clause["count"]:
            correct = False
            reason = reason or f"expected {clause['class']} < {clause['count']}, found {n}"
    return correct, reason


def evaluate(images: Tensor, metadata: Sequence[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """Per-image GenEval correctness: (B,) bool tensor and per-sample details (task, reason, objects)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if metadata is None or len(metadata) != images.shape[0]:
        n = None if metadata is None else len(metadata)
        raise ValueError(f"metadata must be a list of {images.shape[0]} dicts (one per image), got {n}")
    for i, m in enumerate(metadata):
        check_metadata(m, i)
    found = detect(images)
    correct, details = [], []
    for objects, meta in zip(found, metadata):
        ok, reason = evaluate_objects(objects, meta)
        correct.append(ok)
        details.append({"task": meta.get("task"), "correct": ok, "reason": reason, "objects": objects})
    return torch.tensor(correct, dtype=torch.bool), details


def geneval_scores(images: Tensor, metadata: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per task present, and "overall" = unweighted mean of the task accuracies (GenEval)."""
    correct, details = evaluate(images, metadata)
    scores: dict[str, float] = {}
    for task in TASKS:
        hits = [bool(c) for c, d in zip(correct, details) if d["task"] == task]
        if hits:
            scores[task] = sum(hits) / len(hits)
    scores["overall"] = sum(scores.values()) / len(scores) if scores else float("nan")
    return scores
