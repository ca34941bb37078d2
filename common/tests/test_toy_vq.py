"""The shipped toy image tokenizer: index round trip, reconstruction of drawings, and its card."""

from __future__ import annotations

import pytest
import torch

from common.toy.train_bases import eval_prompts
from common.toy.vq import (
    BASES_DIR,
    CHECK_PER_TASK,
    ToyVQ,
    build_toy_vq,
    eval_scenes,
    evaluate_vq,
    load_toy_vq,
    vq_card,
)
from common.toy.world import dataset


@pytest.fixture(scope="module")
def vq() -> ToyVQ:
    return load_toy_vq()


@pytest.fixture(scope="module")
def drawings() -> torch.Tensor:
    return dataset(24, seed=7)[0]  # not the training scenes (seed 0)


def test_round_trip_shapes_and_dtypes(vq, drawings):
    card = vq_card()
    codes = vq.encode(drawings[:4])
    assert codes.shape == (4, *card["grid"]) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < card["codebook_size"] == vq.codebook_size
    images = vq.decode(codes)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    # raster order: a flat (B, N) sequence decodes to the same images; codes of a decoded image are stable
    torch.testing.assert_close(vq.decode(codes.flatten(1)), images)
    assert vq.num_tokens == codes[0].numel()
    with pytest.raises(ValueError, match="codes"):
        vq.decode(torch.full_like(codes, vq.codebook_size))
    with pytest.raises(ValueError, match="codes"):
        vq.decode(codes.float())
    with pytest.raises(ValueError, match="images"):
        vq.encode(torch.zeros(1, 3, 8, 8))


def test_reconstruction_is_close_to_the_drawing(vq, drawings):
    recon = vq.reconstruct(drawings)
    per_image = ((recon - drawings) ** 2).flatten(1).mean(1)
    # the card's mean squared error over 300 drawings is ~0.002; a random tokenizer is ~50x worse
    assert per_image.mean() < 3 * vq_card()["quality"]["mse"]
    assert per_image.max() < 0.02
    random_vq = build_toy_vq(vq_card()["config"]).eval()
    with torch.no_grad():
        assert ((random_vq.reconstruct(drawings) - drawings) ** 2).mean() > 10 * per_image.mean()


def test_card_records_the_run_and_its_numbers_reproduce(vq):
    card = vq_card()
    assert sorted(p.name for p in BASES_DIR.iterdir() if p.name.startswith("vq.")) == ["vq.json", "vq.safetensors"]
    assert (BASES_DIR / "vq.safetensors").stat().st_size < 2_000_000
    assert card["command"].startswith("python -m common.toy.vq") and card["date"]
    assert {"seed", "steps", "seconds"} <= set(card["train"])
    quality = card["quality"]
    # the tokenizer keeps what the toy evaluator reads: reconstructions score near the drawings
    assert quality["toy_geneval_drawings"]["overall"] == 1.0
    assert quality["toy_geneval_reconstructed"]["overall"] >= 0.9
    # the evaluation prompts are the toy bases' own
    assert eval_scenes(2)[1] == eval_prompts(2)[1]
    # the small evaluation recorded in the card is reproduced exactly by the shipped weights
    check = evaluate_vq(vq, CHECK_PER_TASK)
    expected = card["quality_check"]
    assert check["toy_geneval_reconstructed"] == expected["toy_geneval_reconstructed"]
    assert check["toy_geneval_drawings"] == expected["toy_geneval_drawings"]
    assert check["codes_used"] == expected["codes_used"]
    assert check["mse"] == pytest.approx(expected["mse"], rel=1e-3, abs=1e-6)
