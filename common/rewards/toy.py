"""Toy-world rewards with known ground truth: toy GenEval (hard) and its differentiable surrogate.

Both read the scene from `metadata` (the dicts `common.toy.world` produces), not from the prompt
text, exactly as GenEval scores an image against its prompt's metadata line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from common.rewards.base import Metadata, check_inputs, check_scores
from common.toy.evaluator import check_metadata, detect, evaluate_objects
from common.toy.soft import soft_geneval


def _require_metadata(metadata: Metadata, name: str) -> None:
    if metadata is None:
        raise ValueError(f"{name}: metadata is required (one toy-world scene dict per image, as returned by "
                         "common.toy.world.sample_prompts); the prompt text alone is not scored")


class ToyGenEvalReward:
    """Toy GenEval correctness of each image: 1.0 if every clause holds, else 0.0 (no gradient).

    fractional=True gives partial credit instead: the fraction of the scene's include and exclude
    clauses that hold on their own, so a reward curve moves before whole prompts are solved.
    """

    name = "toy_geneval"

    def __init__(self, fractional: bool = False):
        self.fractional = fractional

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        _require_metadata(metadata, self.name)
        for i, m in enumerate(metadata):
            check_metadata(m, i)
        found = detect(images)
        correct, fraction = [], []
        for objects, meta in zip(found, metadata):
            ok, _ = evaluate_objects(objects, meta)
            correct.append(float(ok))
            fraction.append(_clause_fraction(objects, meta))
        correct_t = torch.tensor(correct, dtype=torch.float32, device=images.device)
        fraction_t = torch.tensor(fraction, dtype=torch.float32, device=images.device)
        scores = fraction_t if self.fractional else correct_t
        return check_scores(scores, name=self.name), {"correct": correct_t, "clause_fraction": fraction_t}


def _clause_fraction(objects: list[dict[str, Any]], meta: dict[str, Any]) -> float:
    """Fraction of clauses that pass when checked one at a time (a position clause keeps its target)."""
    include, exclude = meta["include"], meta.get("exclude", [])
    passed = 0
    for clause in include:
        if "position" in clause:
            ref = clause["position"][1]
            sub = {"include": [include[ref], {**clause, "position": (clause["position"][0], 0)}], "exclude": []}
        else:
            sub = {"include": [{k: v for k, v in clause.items() if k != "position"}], "exclude": []}
        passed += evaluate_objects(objects, sub)[0]
    for clause in exclude:
        passed += evaluate_objects(objects, {"include": [], "exclude": [clause]})[0]
    return passed / (len(include) + len(exclude))


class ToySoftReward:
    """Differentiable soft toy GenEval in [0, 1] (`common.toy.soft.soft_geneval`) for reward backprop."""

    name = "toy_soft"

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        _require_metadata(metadata, self.name)
        scores, info = soft_geneval(images, metadata)
        return check_scores(scores, name=self.name), info
