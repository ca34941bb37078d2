"""HPS v1 evidence in three tiers: exact maths, one update on tiny real pipelines, the claims on the toy world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.losses import denoising_loss
from common.models import tiny
from papers.hps.hps import (
    NEGATIVE_PREFIX,
    Config,
    HumanPreferenceClassifier,
    main,
    preference_loss,
    select_examples,
    train_classifier,
    weird_captions,
)


# ---- tier 1: maths -------------------------------------------------------------------------------------
def test_hps_is_100_times_the_cosine_and_the_loss_a_softmax_over_candidates():
    torch.manual_seed(0)
    model = HumanPreferenceClassifier.toy(width=16).eval()
    images = torch.rand(2, 3, 3, 16, 16)
    prompts = ["a red circle", "a blue square"]
    f_img, f_txt = model.embed(images.flatten(0, 1), [p for p in prompts for _ in range(3)])
    cos = (f_img * f_txt).sum(-1)
    torch.testing.assert_close(model(images.flatten(0, 1), [p for p in prompts for _ in range(3)])[0], 100 * cos)
    chosen = torch.tensor([2, 0])
    loss, acc = preference_loss(model, images, prompts, chosen)
    logits = model.clip.logit_scale.exp() * cos.view(2, 3)  # CLIP's learned temperature, ln(1/0.07) at init
    torch.testing.assert_close(loss, F.cross_entropy(logits, chosen))
    torch.testing.assert_close(model.clip.logit_scale.exp(), torch.tensor(1 / 0.07), rtol=1e-4, atol=0)
    assert acc == (logits.argmax(1) == chosen).float().mean()


def test_selection_keeps_only_confident_best_and_worst_images():
    # p = softmax(s - mean s); positive if max p > 2/n, negative if max softmax(-s) > 2/n
    scores = torch.tensor([[20.0, 10.0, 10.0, 10.0],   # one clear best, no clear worst (three tie)
                           [10.0, 10.0, 10.0, 0.0],    # one clear worst, no clear best
                           [10.0, 10.2, 10.1, 10.0]])  # nothing clear
    pos, neg = select_examples(scores)
    assert pos.tolist() == [0, -1, -1] and neg.tolist() == [-1, 3, -1]


def test_non_preferred_captions_carry_the_weird_prefix():
    assert weird_captions(["a red circle", "two squares"], [True, False]) == ["a red circle",
                                                                             "Weird image. two squares"]
    assert NEGATIVE_PREFIX == "Weird image. "


def test_bad_input_names_the_field():
    model = HumanPreferenceClassifier.toy(width=16)
    with pytest.raises(ValueError, match="prompts has 1 items but images has 2"):
        model(torch.rand(2, 3, 16, 16), ["a red circle"])
    with pytest.raises(ValueError, match="image 1 has values"):
        model(torch.cat([torch.rand(1, 3, 16, 16), torch.full((1, 3, 16, 16), -0.5)]), ["a", "b"])
    for bad, field in (({"candidates": 1}, "candidates"), ({"tasks": ["nope"]}, "tasks"),
                       ({"model": "tiny-sd"}, "model"), ({"reg_images": -1}, "reg_images")):
        with pytest.raises(ValueError, match=field):
            Config(**bad)


def test_classifier_saves_and_loads_from_a_local_directory(tmp_path):
    torch.manual_seed(0)
    model = HumanPreferenceClassifier.toy(width=16).eval()
    images, prompts = torch.rand(2, 3, 16, 16), ["a red circle", "a blue square"]
    loaded = HumanPreferenceClassifier.from_pretrained(model.save(tmp_path / "hpc"))
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (tmp_path / "hpc").iterdir())
    torch.testing.assert_close(loaded(images, prompts)[0], model(images, prompts)[0])
    with pytest.raises(ValueError, match="hpc_path"):
        Config(stage="align", hpc_path=str(tmp_path / "missing"))


# ---- tier 2: one update on each tiny real pipeline -------------------------------------------------------
@pytest.mark.parametrize("build", [tiny.tiny_sd, tiny.tiny_sd3])
def test_one_lora_update_on_positive_and_weird_negative_captions(build):
    adapter = build()
    adapter.add_lora(rank=2)
    captions = weird_captions(["a red circle", "a blue square"], [True, False])
    loss = denoising_loss(adapter, adapter.encode(torch.rand(2, 3, 16, 16)), adapter.encode_prompts(captions),
                          torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = [p.grad for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and torch.isfinite(g).all() for g in lora_b)
    assert any(g.abs().sum() > 0 for g in lora_b)


def test_main_job_end_to_end_with_fewer_than_8_eval_prompts(tmp_path):
    summary = main(["--choices", "8", "--hpc-steps", "1", "--pool-prompts", "2", "--reg-images", "2",
                    "--align-steps", "1", "--batch-size", "2", "--num-steps", "2", "--eval-prompts", "3",
                    "--out-dir", str(tmp_path)])
    assert {"hps_before", "hps_after", "hps_after_plain", "toy_accuracy_before", "toy_accuracy_after"} <= set(summary)
    assert all((tmp_path / f).is_file() for f in ("metrics.jsonl", "before_after.png", "align_loss.png",
                                                   "classifier/config.json"))
    # a real pipeline aligns with a classifier loaded from a local directory
    summary = main(["--stage", "align", "--hpc-path", str(tmp_path / "classifier"), "--model", "tiny-sd",
                    "--reg-images", "0", "--pool-prompts", "2", "--align-steps", "1", "--batch-size", "2",
                    "--num-steps", "2", "--eval-prompts", "2", "--out-dir", str(tmp_path / "sd")])
    assert {"hps_before", "hps_after"} <= set(summary) and (tmp_path / "sd" / "before_after.png").is_file()


# ---- tier 3: the claims on the toy world --------------------------------------------------------------------
def test_claim_classifier_predicts_held_out_choices_well_above_chance():
    """Trained on 150 simulated choices among 4 images (50 steps of 16), the classifier picks the chosen image
    of 50 held-out choices with accuracy >= 0.8, chance being 0.25 (README: 1.0); untrained: 0.42."""
    _, acc = train_classifier(Config(choices=150, hpc_steps=50, hpc_batch_size=16, seed=0))
    assert acc["hpc_acc_before"] < 0.8
    assert acc["hpc_acc"] >= 0.8
