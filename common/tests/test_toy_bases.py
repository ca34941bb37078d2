"""The toy models and the shipped toy bases: fast to load, deterministic, imperfect on toy GenEval."""

from __future__ import annotations

import time

import pytest
import torch

from common.models.base import PromptEmbeds
from common.models.sd import SDAdapter
from common.models.sd3 import SD3Adapter
from common.models.toy import BASES_DIR, KINDS, base_card, build_toy_adapter, load_toy_base, toy_tokenizer
from common.toy.evaluator import geneval_scores
from common.toy.train_bases import GUIDANCE_SCALE, SAMPLE_STEPS, eval_prompts, sample_images
from common.toy.world import TASKS, VOCABULARY


def test_tokenizer_covers_the_vocabulary():
    tok = toy_tokenizer()
    ids = tok(list(VOCABULARY), padding="max_length", max_length=tok.model_max_length).input_ids
    words = [row[1] for row in ids]  # "<bos> word <eos> <pad> ..."
    assert len(set(words)) == len(VOCABULARY) and tok.unk_token_id not in words
    longest = tok(["a yellow triangle and a green square"]).input_ids[0]
    assert longest[0] == tok.bos_token_id and longest[-1] == tok.eos_token_id
    assert len(longest) <= tok.model_max_length


@pytest.mark.parametrize("kind", KINDS)
def test_random_toy_adapter(kind):
    adapter = build_toy_adapter(kind)
    assert isinstance(adapter, SDAdapter if kind == "unet" else SD3Adapter)
    assert adapter.prediction == ("epsilon" if kind == "unet" else "flow")
    assert adapter.latent_shape == (3, 16, 16)
    assert sum(p.numel() for p in adapter.denoiser.parameters()) < 2_000_000
    cond = adapter.encode_prompts(["a red circle", "two squares"])
    assert isinstance(cond, PromptEmbeds) and len(cond) == 2
    out = adapter.predict(torch.randn(2, 3, 16, 16), adapter.schedule(4).timesteps[0], cond,
                          adapter.encode_prompts([""]), guidance_scale=4.5)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="kind"):
        build_toy_adapter("vae")


@pytest.mark.parametrize("kind", KINDS)
def test_base_files_and_card(kind):
    assert sorted(p.name for p in BASES_DIR.iterdir() if p.name.startswith(kind + ".")) == \
        [f"{kind}.json", f"{kind}.safetensors"]
    assert (BASES_DIR / f"{kind}.safetensors").stat().st_size < 8_000_000
    card = base_card(kind)
    assert card["kind"] == kind and card["command"].startswith("python -m common.toy.train_bases")
    assert {"seed", "steps"} <= set(card["train"]) and card["date"]
    assert card["sampling"]["num_steps"] == SAMPLE_STEPS and card["sampling"]["guidance_scale"] == GUIDANCE_SCALE
    scores = card["toy_geneval"]
    assert set(scores) == {*TASKS, "overall"}


@pytest.mark.parametrize("kind", KINDS)
def test_base_scores_leave_headroom(kind):
    scores = base_card(kind)["toy_geneval"]
    assert 0.3 <= scores["overall"] <= 0.8, scores  # imperfect: alignment has headroom


@pytest.mark.parametrize("kind", KINDS)
def test_load_base_is_fast(kind):
    load_toy_base(kind)  # warm the imports
    start = time.perf_counter()
    adapter = load_toy_base(kind)
    assert time.perf_counter() - start < 1.0
    assert adapter.denoiser.training is False
    with pytest.raises(ValueError, match="no toy base weights"):
        load_toy_base(kind, BASES_DIR / "missing.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_base_is_imperfect_and_deterministic(kind):
    adapter = load_toy_base(kind)
    prompts, metas = eval_prompts(per_task=6)
    images = sample_images(adapter, prompts, seed=0)
    first = sample_images(adapter, prompts[:3], seed=0)
    assert torch.equal(first, sample_images(adapter, prompts[:3], seed=0))
    assert torch.allclose(first, images[:3], atol=1e-4)  # the noise of prompt i does not depend on the batch
    assert not torch.allclose(first, sample_images(adapter, prompts[:3], seed=1), atol=1e-2)
    assert images.shape == (36, 3, 16, 16)
    scores = geneval_scores(images, metas)
    # a small sample: a wider band than the card's 0.3-0.8, and close to the card's overall
    assert 0.2 <= scores["overall"] <= 0.9, scores
    assert abs(scores["overall"] - base_card(kind)["toy_geneval"]["overall"]) <= 0.25, scores
