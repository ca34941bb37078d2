"""The toy world: 16x16 RGB images of coloured shapes with GenEval-style captions and metadata.

A scene is a GenEval prompt in miniature. The six tasks, their captions and their metadata follow
GenEval's `prompts/evaluation_metadata.jsonl` (Ghosh et al., NeurIPS 2023 D&B), with COCO classes
replaced by three shapes and the colour list cut to four:

    task           caption                          include clauses (what must be in the image)
    single_object  "a circle"                       circle x1
    two_object     "a circle and a square"          circle x1, square x1
    counting       "two squares"                    square x2   (+ exclude: square x3)
    colors         "a red circle"                   red circle x1
    position       "a circle left of a square"      square x1, circle x1 left of clause 0
    color_attr     "a red circle and a blue square" red circle x1, blue square x1

Metadata is a dict with GenEval's keys: `task` (GenEval calls it `tag`), `prompt`, `include` (list of
`{"class", "count", ["color"], ["position": (relation, clause index)]}`) and `exclude` (list of
`{"class", "count"}`: fail when at least `count` such shapes are present). As in GenEval, a colour
only appears in the colors and color_attr tasks, and extra objects are allowed unless excluded.

Images are float tensors in [0, 1] of shape (3, 16, 16): shapes are drawn inside integer bounding
boxes with 4x4 supersampled anti-aliasing on a random dark background, never touching each other
(a gap of at least `MIN_GAP` pixels), so the evaluator can read every attribute back from pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: every word that can appear in a caption (the toy tokenizer is built from this list)
VOCABULARY: tuple[str, ...] = (
    "a", "and", "of", "left", "right", "above", "below",
    *NUMBERS.values(), *COLORS, *SHAPES, *PLURALS.values(),
)

#: RGB of each colour name; drawings jitter each channel by up to +-COLOR_JITTER
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.18),
    "blue": (0.15, 0.30, 0.98),
    "yellow": (0.95, 0.88, 0.12),
}
COLOR_JITTER = 0.04
#: background is a uniform colour with every channel in [0, MAX_BACKGROUND]
MAX_BACKGROUND = 0.12
IMAGE_SIZE = 16
#: smallest empty band (pixels) between two objects' bounding boxes
MIN_GAP = 2
#: side of a shape's (square) bounding box, by number of objects in the scene
SIZE_RANGE: dict[int, tuple[int, int]] = {1: (6, 10), 2: (5, 8), 3: (5, 6)}
SUPERSAMPLE = 4

Metadata = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# scenes and captions
# ------------------------------------------------------------------------------------------------
def _choice(options: Sequence, generator: torch.Generator | None) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _pick_distinct(options: Sequence, k: int, generator: torch.Generator | None) -> list:
    order = torch.randperm(len(options), generator=generator)[:k]
    return [options[int(i)] for i in order]


def sample_scene(task: str, generator: torch.Generator | None = None) -> Metadata:
    """Random metadata (with its caption under "prompt") for one prompt of `task`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "single_object":
        include = [{"class": _choice(SHAPES, generator), "count": 1}]
    elif task == "two_object":
        a, b = _pick_distinct(SHAPES, 2, generator)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif task == "counting":
        include = [{"class": _choice(SHAPES, generator), "count": _choice(list(NUMBERS), generator)}]
    elif task == "colors":
        include = [{"class": _choice(SHAPES, generator), "count": 1, "color": _choice(COLORS, generator)}]
    elif task == "position":
        # GenEval lists the reference object first; the located object points at it by index
        ref, obj = _pick_distinct(SHAPES, 2, generator)
        include = [{"class": ref, "count": 1},
                   {"class": obj, "count": 1, "position": (_choice(RELATIONS, generator), 0)}]
    else:  # color_attr
        a, b = _pick_distinct(SHAPES, 2, generator)
        ca, cb = _pick_distinct(COLORS, 2, generator)
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
    exclude = [{"class": include[0]["class"], "count": include[0]["count"] + 1}] if task == "counting" else []
    meta: Metadata = {"task": task, "include": include, "exclude": exclude}
    meta["prompt"] = caption(meta)
    return meta


def _phrase(clause: dict, counting: bool) -> str:
    n = clause["count"]
    words = [NUMBERS[n] if (counting or n > 1) else "a"]
    if "color" in clause:
        words.append(clause["color"])
    words.append(PLURALS[clause["class"]] if n > 1 else clause["class"])
    return " ".join(words)


def caption(metadata: Metadata) -> str:
    """The prompt of a scene, e.g. "a circle left of a square" or "two blue triangles"."""
    include = metadata["include"]
    counting = metadata.get("task") == "counting"
    located = [c for c in include if "position" in c]
    if located:
        obj = located[0]
        relation, ref_index = obj["position"]
        return f"{_phrase(obj, counting)} {relation} {_phrase(include[ref_index], counting)}"
    return " and ".join(_phrase(c, counting) for c in include)


def perturb_scene(metadata: Metadata, generator: torch.Generator | None = None) -> Metadata:
    """A scene of the same task that no drawing of `metadata` satisfies (a hard negative caption).

    single_object / two_object: one shape swapped for one absent from the scene; counting: another
    count; colors: another colour; position: another relation; color_attr: the colours swapped
    between the two objects (the attribute-binding error GenEval's color_attr task probes).
    """
    task = metadata["task"]
    include = [dict(c) for c in metadata["include"]]
    if task in ("single_object", "two_object"):
        present = {c["class"] for c in include}
        absent = [s for s in SHAPES if s not in present]
        include[int(torch.randint(len(include), (1,), generator=generator))]["class"] = _choice(absent, generator)
    elif task == "counting":
        include[0]["count"] = _choice([n for n in NUMBERS if n != include[0]["count"]], generator)
    elif task == "colors":
        include[0]["color"] = _choice([c for c in COLORS if c != include[0]["color"]], generator)
    elif task == "position":
        relation, ref = include[1]["position"]
        include[1]["position"] = (_choice([r for r in RELATIONS if r != relation], generator), ref)
    elif task == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    else:
        raise ValueError(f"metadata task must be one of {TASKS}, got {task!r}")
    exclude = [{"class": include[0]["class"], "count": include[0]["count"] + 1}] if task == "counting" else []
    out: Metadata = {"task": task, "include": include, "exclude": exclude}
    out["prompt"] = caption(out)
    return out


def sample_prompts(n: int, tasks: Sequence[str] | None = None,
                   generator: torch.Generator | None = None) -> list[tuple[str, Metadata]]:
    """n (prompt, metadata) pairs, tasks drawn uniformly from `tasks` (default: all six)."""
    tasks = tuple(tasks) if tasks is not None else TASKS
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; choose from {TASKS}")
    scenes = [sample_scene(_choice(tasks, generator), generator) for _ in range(n)]
    return [(m["prompt"], m) for m in scenes]


# ------------------------------------------------------------------------------------------------
# geometry shared by the drawing and the evaluator
# ------------------------------------------------------------------------------------------------
def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's relations of box A to box B; boxes are (x0, y0, x1, y1), y points down.

    offset = centre_A - centre_B; each axis shrinks towards 0 by threshold * (size_A + size_B), then
    is divided by |offset|: "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5,
    "below" if dy > 0.5 (GenEval evaluate_images.py, POSITION_THRESHOLD = 0.1).
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    sizes = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def shape_coverage(shape: str, height: int, width: int, supersample: int = SUPERSAMPLE) -> Tensor:
    """Fraction of each pixel of a (height, width) box covered by the shape inscribed in it.

    circle: the inscribed ellipse; square: the whole box; triangle: apex at the top centre, base
    along the bottom edge. Returns (height, width) in [0, 1].
    """
    s = supersample
    ys = (torch.arange(height * s, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(width * s, dtype=torch.float32) + 0.5) / s
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        inside = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1
    elif shape == "square":
        inside = torch.ones_like(x, dtype=torch.bool)
    elif shape == "triangle":
        # half-width grows linearly from 0 at the apex (y = 0) to width / 2 at the base (y = height)
        inside = (x - width / 2).abs() <= (width / 2) * (y / height)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return inside.float().reshape(height, s, width, s).mean(dim=(1, 3))


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _objects_of(metadata: Metadata, generator: torch.Generator | None) -> list[dict]:
    """The objects a drawing of `metadata` contains: one per counted instance, colour filled in."""
    objects = []
    task = metadata.get("task")
    for clause in metadata["include"]:
        for _ in range(clause["count"]):
            color = clause.get("color")
            if color is None:
                color = _choice(COLORS, generator)
            objects.append({"class": clause["class"], "color": color})
    if task == "color_attr" and len(objects) == 2 and objects[0]["color"] == objects[1]["color"]:
        raise ValueError("metadata: color_attr clauses must have different colours")
    return objects


def _separated(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in others:
        gap_x = max(a0 - x1, x0 - a1)
        gap_y = max(b0 - y1, y0 - b1)
        if max(gap_x, gap_y) < MIN_GAP:
            return False
    return True


def _place(metadata: Metadata, n: int, generator: torch.Generator | None,
           tries: int = 2000) -> list[tuple[int, int, int, int]]:
    """Integer boxes (x0, y0, x1, y1) for n objects that keep MIN_GAP and the scene's relation."""
    lo, hi = SIZE_RANGE[min(n, 3)]
    located = [c for c in metadata["include"] if "position" in c]
    for _ in range(tries):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            s = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            x0, y0 = (int(v) for v in torch.randint(IMAGE_SIZE - s + 1, (2,), generator=generator))
            box = (x0, y0, x0 + s, y0 + s)
            if not _separated(box, boxes):
                break
            boxes.append(box)
        if len(boxes) < n:
            continue
        if located:
            relation = located[0]["position"][0]
            # the relation must hold with GenEval's margin, and be the only one even without the
            # margin, so that a box read back a pixel off still gives an unambiguous answer
            if relation not in relative_position(boxes[1], boxes[0]):
                continue
            if relative_position(boxes[1], boxes[0], threshold=0.0) != {relation}:
                continue
        return boxes
    raise RuntimeError(f"could not place {n} objects for {metadata.get('prompt')!r} in {tries} tries")


def draw(metadata: Metadata, generator: torch.Generator | None = None) -> Tensor:
    """A random (3, 16, 16) image in [0, 1] that satisfies `metadata`."""
    objects = _objects_of(metadata, generator)
    boxes = _place(metadata, len(objects), generator)
    background = torch.rand(3, 1, 1, generator=generator) * MAX_BACKGROUND
    image = background.expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
    for obj, (x0, y0, x1, y1) in zip(objects, boxes):
        jitter = (torch.rand(3, generator=generator) * 2 - 1) * COLOR_JITTER
        color = (torch.tensor(PALETTE[obj["color"]]) + jitter).clamp(0, 1).view(3, 1, 1)
        alpha = shape_coverage(obj["class"], y1 - y0, x1 - x0)
        patch = image[:, y0:y1, x0:x1]
        # alpha compositing: pixel = (1 - a) * below + a * colour
        image[:, y0:y1, x0:x1] = (1 - alpha) * patch + alpha * color
    return image


def dataset(n: int, seed: int = 0, tasks: Sequence[str] | None = None
            ) -> tuple[Tensor, list[str], list[Metadata]]:
    """n drawn scenes: images (n, 3, 16, 16), prompts, metadata; deterministic given seed."""
    generator = torch.Generator().manual_seed(seed)
    pairs = sample_prompts(n, tasks, generator)
    images = torch.stack([draw(m, generator) for _, m in pairs]) if n else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return images, [p for p, _ in pairs], [m for _, m in pairs]
