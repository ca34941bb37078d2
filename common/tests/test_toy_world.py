"""The toy world, its GenEval-style evaluator, the soft (differentiable) score and the toy rewards."""

from __future__ import annotations

import pytest
import torch

from common.rewards.toy import ToyGenEvalReward, ToySoftReward
from common.toy import world
from common.toy.evaluator import evaluate, evaluate_objects, gaussian_blur, geneval_scores
from common.toy.soft import soft_geneval
from common.toy.world import TASKS, VOCABULARY, caption, dataset, perturb_scene, relative_position


@pytest.fixture(scope="module")
def scenes():
    """20 drawn scenes per task, task by task."""
    parts = [dataset(20, seed=i, tasks=[task]) for i, task in enumerate(TASKS)]
    images = torch.cat([p[0] for p in parts])
    prompts = [q for p in parts for q in p[1]]
    metas = [m for p in parts for m in p[2]]
    return images, prompts, metas


@pytest.fixture(scope="module")
def negatives(scenes):
    generator = torch.Generator().manual_seed(7)
    return [perturb_scene(m, generator) for m in scenes[2]]


# ---- world ---------------------------------------------------------------------------------------
def test_vocabulary_covers_every_caption():
    pairs = world.sample_prompts(400, generator=torch.Generator().manual_seed(0))
    words = {w for prompt, _ in pairs for w in prompt.split()}
    assert words <= set(VOCABULARY)
    assert {m["task"] for _, m in pairs} == set(TASKS)
    assert len(set(VOCABULARY)) == len(VOCABULARY)


def test_captions_follow_geneval_templates():
    position = {"task": "position", "include": [{"class": "square", "count": 1},
                                                {"class": "circle", "count": 1, "position": ("left of", 0)}]}
    assert caption(position) == "a circle left of a square"
    assert caption({"task": "counting", "include": [{"class": "triangle", "count": 3}]}) == "three triangles"
    assert caption({"task": "counting", "include": [{"class": "circle", "count": 1}]}) == "one circle"
    assert caption({"task": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                                      {"class": "square", "count": 1, "color": "blue"}]}
                   ) == "a red circle and a blue square"
    meta = world.sample_scene("counting", torch.Generator().manual_seed(3))
    assert meta["exclude"] == [{"class": meta["include"][0]["class"], "count": meta["include"][0]["count"] + 1}]
    with pytest.raises(ValueError, match="task"):
        world.sample_scene("colour", None)


def test_dataset_is_deterministic_and_in_range():
    a, pa, ma = dataset(12, seed=5)
    b, pb, mb = dataset(12, seed=5)
    c, _, _ = dataset(12, seed=6)
    assert a.shape == (12, 3, 16, 16) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and pa == pb and ma == mb
    assert not torch.equal(a, c)
    assert all(m["prompt"] == p for p, m in zip(pa, ma))


def test_relative_position_uses_geneval_margin():
    left, right = (0, 4, 5, 9), (10, 4, 15, 9)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((4, 0, 9, 5), (4, 10, 9, 15)) == {"above"}
    # heavily overlapping boxes: the margin shrinks the offset to zero, so no relation at all
    assert relative_position((4, 4, 10, 10), (5, 4, 11, 10)) == set()


# ---- evaluator -----------------------------------------------------------------------------------
def test_world_drawings_score_near_one(scenes):
    images, _, metas = scenes
    scores = geneval_scores(images, metas)
    assert all(scores[t] >= 0.95 for t in TASKS), scores


def test_mismatched_captions_score_near_zero(scenes, negatives):
    images = scenes[0]
    scores = geneval_scores(images, negatives)
    assert all(scores[t] <= 0.05 for t in TASKS), scores


def test_evaluator_is_robust_to_mild_blur_and_noise(scenes):
    images, _, metas = scenes
    noisy = (gaussian_blur(images, 0.6) + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    scores = geneval_scores(noisy.clamp(0, 1), metas)
    assert all(scores[t] >= 0.9 for t in TASKS), scores


def test_noise_and_blank_images_fail(scenes):
    _, _, metas = scenes
    noise = torch.rand(len(metas), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert geneval_scores(noise, metas)["overall"] <= 0.05
    assert not evaluate(torch.zeros(len(metas), 3, 16, 16), metas)[0].any()


def _obj(cls, color, box, area=20):
    return {"class": cls, "color": color, "box": box, "area": area, "shape_errors": [0.0, 0.0, 0.0]}


def test_geneval_rules_on_detections():
    two = {"task": "counting", "include": [{"class": "circle", "count": 2}],
           "exclude": [{"class": "circle", "count": 3}]}
    circles = [_obj("circle", "red", (0, 0, 5, 5)), _obj("circle", "red", (8, 0, 13, 5)),
               _obj("circle", "red", (0, 8, 5, 13))]
    assert evaluate_objects(circles[:2], two)[0]
    assert not evaluate_objects(circles, two)[0]  # the exclude clause fires at 3
    assert not evaluate_objects(circles[:1], two)[0]
    # colour is read from the top-`count` detections by confidence (area), as in GenEval
    red = {"task": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "exclude": []}
    assert not evaluate_objects([_obj("square", "blue", (0, 0, 6, 6), 36), _obj("square", "red", (9, 9, 14, 14), 25)],
                                red)[0]
    assert evaluate_objects([_obj("square", "red", (0, 0, 6, 6), 36), _obj("square", "blue", (9, 9, 14, 14), 25)],
                            red)[0]
    right = {"task": "position", "include": [{"class": "square", "count": 1},
                                             {"class": "circle", "count": 1, "position": ("right of", 0)}]}
    assert evaluate_objects([_obj("square", "red", (0, 4, 5, 9)), _obj("circle", "red", (10, 4, 15, 9))], right)[0]
    assert not evaluate_objects([_obj("square", "red", (4, 4, 10, 10)), _obj("circle", "red", (5, 4, 11, 10))],
                                right)[0]
    # a shapeless blob (all template errors large) is not an object
    blob = {**_obj("circle", "red", (0, 0, 6, 6)), "shape_errors": [0.2, 0.2, 0.2]}
    single = {"task": "single_object", "include": [{"class": "circle", "count": 1}], "exclude": []}
    assert not evaluate_objects([blob], single)[0]


def test_overall_is_mean_of_task_accuracies(scenes, negatives):
    images, _, metas = scenes
    # 20 correct single_object images and 4 wrong colors images (by perturbed metadata)
    idx_single = [i for i, m in enumerate(metas) if m["task"] == "single_object"]
    idx_colors = [i for i, m in enumerate(metas) if m["task"] == "colors"][:4]
    sel = idx_single + idx_colors
    scores = geneval_scores(images[sel], [metas[i] for i in idx_single] + [negatives[i] for i in idx_colors])
    assert scores["single_object"] == 1.0 and scores["colors"] == 0.0
    assert scores["overall"] == pytest.approx(0.5)  # the image-level mean would be 20/24


def test_evaluator_input_errors(scenes):
    images, _, metas = scenes
    with pytest.raises(ValueError, match="metadata"):
        evaluate(images[:2], None)
    with pytest.raises(ValueError, match="metadata"):
        evaluate(images[:2], metas[:3])
    with pytest.raises(ValueError, match="class"):
        evaluate(images[:1], [{"task": "single_object", "include": [{"class": "dog", "count": 1}]}])
    with pytest.raises(ValueError, match="shape"):
        evaluate(images[:, :1], metas)


# ---- soft score ----------------------------------------------------------------------------------
def test_soft_score_ranks_correct_over_incorrect(scenes, negatives):
    images, _, metas = scenes
    good, _ = soft_geneval(images, metas)
    bad, _ = soft_geneval(images, negatives)
    assert float(good.min()) >= 0 and float(good.max()) <= 1
    assert (good > bad).float().mean() >= 0.95
    assert float(good.mean()) - float(bad.mean()) >= 0.5


def test_soft_score_has_a_gradient(scenes):
    images, _, metas = scenes
    generator = torch.Generator().manual_seed(0)
    x = (gaussian_blur(images[::10], 0.8) + 0.05 * torch.randn(images[::10].shape, generator=generator)).clamp(0, 1)
    x.requires_grad_(True)
    scores, info = soft_geneval(x, metas[::10])
    scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    assert set(info) == {"presence", "count", "relation"}


def test_soft_score_gradient_ascent_moves_towards_the_prompt():
    """A few gradient steps on a blank image raise the soft score of "a red square"."""
    meta = {"task": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "exclude": []}
    x = torch.full((1, 3, 16, 16), 0.05)
    x[:, 0, 4:11, 4:11] = 0.45  # a dim reddish patch
    x.requires_grad_(True)
    start = float(soft_geneval(x.detach(), [meta])[0])
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(8):
        opt.zero_grad()
        (-soft_geneval(x.clamp(0, 1), [meta])[0].sum()).backward()
        opt.step()
    assert float(soft_geneval(x.detach().clamp(0, 1), [meta])[0]) > start + 0.3


# ---- rewards -------------------------------------------------------------------------------------
def test_toy_geneval_reward(scenes, negatives):
    images, prompts, metas = scenes
    scores, info = ToyGenEvalReward()(images[:30], prompts[:30], metas[:30])
    assert scores.shape == (30,) and scores.dtype == torch.float32
    assert torch.equal(scores, evaluate(images[:30], metas[:30])[0].float())
    wrong, _ = ToyGenEvalReward()(images[:30], prompts[:30], negatives[:30])
    partial, info = ToyGenEvalReward(fractional=True)(images[:30], prompts[:30], negatives[:30])
    assert wrong.sum() == 0
    assert ((partial >= wrong) & (partial <= 1)).all() and (partial > 0).any()
    assert torch.equal(info["correct"], wrong)


def test_toy_rewards_require_metadata(scenes):
    images, prompts, metas = scenes
    for reward in (ToyGenEvalReward(), ToySoftReward()):
        with pytest.raises(ValueError, match="metadata is required"):
            reward(images[:2], prompts[:2])
        with pytest.raises(ValueError, match="prompts"):
            reward(images[:2], prompts[:3], metas[:2])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            reward(images[:2] * 2 - 1, prompts[:2], metas[:2])


def test_toy_soft_reward_is_differentiable(scenes):
    images, prompts, metas = scenes
    x = images[:4].clone().mul(0.9).requires_grad_(True)
    scores, _ = ToySoftReward()(x, prompts[:4], metas[:4])
    assert scores.shape == (4,) and scores.requires_grad
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
