"""Diffusion-DPO evidence in three tiers: exact identities, one update on each tiny real pipeline, the claim
on the toy world. `pytest papers/diffusion_dpo -q`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from common.config import run_main
from common.models.load import load_adapter
from common.models.toy import build_toy_adapter
from common.train import read_metrics
from papers.diffusion_dpo.diffusion_dpo import (
    Config,
    LoraOff,
    dpo_loss,
    forward_noise,
    frozen_reference,
    load_image,
    main,
    read_pairs,
    sft_loss,
    train,
    write_pairs,
)

PROMPTS = ["a red circle", "a blue square", "two triangles"]


def _config(**kw) -> Config:
    return Config(**kw)


def _batch(adapter, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    w, lo = torch.rand(n, 3, 16, 16, generator=g), torch.rand(n, 3, 16, 16, generator=g)
    return (adapter.encode(w, g, sample=True), adapter.encode(lo, g, sample=True),
            adapter.encode_prompts(PROMPTS[:n]))


@pytest.fixture(scope="module")
def toy_unet():
    return build_toy_adapter("unet", seed=0)


# ------------------------------------------------------------------ tier 1: exact identities
@pytest.mark.parametrize("lora", [False, True])
def test_loss_is_ln2_and_accuracy_zero_when_policy_is_reference(lora):
    adapter = build_toy_adapter("unet", seed=1)
    if lora:
        adapter.add_lora(4, 4)
        reference = LoraOff(adapter)
    else:
        reference = frozen_reference(adapter)
        adapter.denoiser.requires_grad_(True)
    x_w, x_l, cond = _batch(adapter)
    for convention, beta in (("official", 5000.0), ("diffusers", 2500.0)):
        config = _config(beta=beta, beta_convention=convention)
        loss, info = dpo_loss(config, adapter, reference, x_w, x_l, cond, torch.Generator().manual_seed(3))
        assert abs(loss.item() - math.log(2)) < 1e-6
        # strict accuracy (official) counts ties as wrong; the diffusers port counts them as 1/2
        assert info["implicit_acc"].item() == (0.0 if convention == "official" else 0.5)


def test_winner_and_loser_share_t_and_noise(toy_unet):
    for model in ("unet", "flow"):
        adapter = toy_unet if model == "unet" else build_toy_adapter("flow")
        x0 = torch.randn(2, *adapter.latent_shape).repeat(2, 1, 1, 1)  # winner == loser
        x_t, t, target = forward_noise(adapter, x0, True, torch.Generator().manual_seed(0))
        assert torch.equal(x_t[:2], x_t[2:]) and torch.equal(t[:2], t[2:]) and torch.equal(target[:2], target[2:])
        x_t, t, _ = forward_noise(adapter, x0, False, torch.Generator().manual_seed(0))
        assert not torch.equal(x_t[:2], x_t[2:])


def test_targets_eps_and_velocity(toy_unet):
    x0 = torch.randn(4, 3, 16, 16)
    x_t, t, target = forward_noise(toy_unet, x0, False, torch.Generator().manual_seed(0))
    a = toy_unet.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # eps model: x_t = sqrt(a) x0 + sqrt(1 - a) eps, the target is eps, t is an integer DDPM step
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * target)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 1000
    flow = build_toy_adapter("flow")
    x_t, t, target = forward_noise(flow, x0, False, torch.Generator().manual_seed(0))
    s = (t / 1000).view(-1, 1, 1, 1)
    noise = target + x0  # velocity target v = eps - x0
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
    assert ((s > 0) & (s <= 1)).all()


def test_official_and_diffusers_conventions_agree_and_swapping_flips_the_gradient(toy_unet):
    adapter = toy_unet
    reference = frozen_reference(adapter)
    with torch.no_grad():  # move the policy away from the reference
        for p in adapter.denoiser.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    adapter.denoiser.requires_grad_(True)
    x_w, x_l, cond = _batch(adapter, seed=4)
    official = dpo_loss(_config(beta=5000.0), adapter, reference, x_w, x_l, cond, torch.Generator().manual_seed(1))
    diffusers = dpo_loss(_config(beta=2500.0, beta_convention="diffusers"), adapter, reference, x_w, x_l, cond,
                         torch.Generator().manual_seed(1))
    torch.testing.assert_close(official[0], diffusers[0])
    # at the reference sigmoid(0) = 1/2 for every pair, so swapping winner and loser flips the gradient exactly
    fresh = build_toy_adapter("unet", seed=2)
    ref2 = frozen_reference(fresh)
    fresh.denoiser.requires_grad_(True)
    grads = []
    for a, b in ((x_w, x_l), (x_l, x_w)):
        loss, _ = dpo_loss(_config(), fresh, ref2, a, b, cond, torch.Generator().manual_seed(7))
        grads.append(torch.autograd.grad(loss, list(fresh.denoiser.parameters()), allow_unused=True))
    pairs = [(g, h) for g, h in zip(*grads) if g is not None]
    assert pairs and any(g.abs().sum() > 0 for g, _ in pairs)
    flat_g, flat_h = torch.cat([g.flatten() for g, _ in pairs]), torch.cat([h.flatten() for _, h in pairs])
    assert ((flat_g + flat_h).norm() / flat_g.norm()).item() < 1e-5  # equal up to float32 summation order


def test_sft_is_the_denoising_loss_on_winners(toy_unet):
    x_w, _, cond = _batch(toy_unet, seed=5)
    loss, _ = sft_loss(toy_unet, x_w, cond, torch.Generator().manual_seed(2))
    x_t, t, target = forward_noise(toy_unet, x_w, False, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ((toy_unet.predict(x_t, t, cond) - target) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_pairs_roundtrip_and_clear_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, lo = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    pairs = write_pairs(tmp_path / "train.jsonl", PROMPTS, w, lo)
    assert len(pairs) == 3 and pairs.prompts == PROMPTS
    w2, lo2 = load_image(pairs.winners[2], (16, 16), 2), load_image(pairs.losers[0], (16, 16), 0)
    assert (w2 - w[2]).abs().max() <= 0.5 / 255 + 1e-6 and (lo2 - lo[0]).abs().max() <= 0.5 / 255 + 1e-6
    assert load_image(pairs.winners[1], (8, 8), 1).shape == (3, 8, 8)  # resized to the model's resolution
    with pytest.raises(ValueError, match=r"pairs: 3 prompts, 2 winners"):
        write_pairs(tmp_path / "bad.jsonl", PROMPTS, w[:2], lo)
    with pytest.raises(ValueError, match=r"losers\[1\] \('a blue square'\) has values outside \[0, 1\]"):
        write_pairs(tmp_path / "bad.jsonl", PROMPTS, w, torch.cat([lo[:1], lo[1:2] + 1, lo[2:]]))
    pairs.losers[1].unlink()
    with pytest.raises(ValueError, match=r"item 1 \('a blue square'\): loser image .*000001_l.png does not exist"):
        read_pairs(tmp_path / "train.jsonl")
    (tmp_path / "short.jsonl").write_text(json.dumps({"prompt": "x", "winner": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 lacks \['loser'\]"):
        read_pairs(tmp_path / "short.jsonl")


def test_help_and_bad_values_stop_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
    for argv, field in ([["--model", "/no/such/dir"], "model"], [["--beta", "-1"], "beta"],
                        [["--model", "tiny-sd"], "pairs"], [["--pairs", "/no/such.jsonl"], "pairs"]):
        with pytest.raises(SystemExit) as bad:
            run_main(main, argv)
        err = capsys.readouterr().err.strip()
        assert bad.value.code == 2 and err.startswith(f"error: {field}:") and "\n" not in err


# ------------------------------------------------------------------ tier 2: tiny real pipelines
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_one_update_on_tiny_pipelines(model):
    torch.manual_seed(0)
    adapter = load_adapter(model)
    adapter.add_lora(4, 4)
    x_w, x_l, cond = _batch(adapter, n=2)
    assert x_w.shape[1:] == adapter.latent_shape  # images went through the VAE encoder
    loss, info = dpo_loss(_config(), adapter, LoraOff(adapter), x_w, x_l, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(2)) < 1e-6
    grads = {n: p.grad for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert grads and all("lora" in n for n in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_train_loop_end_to_end_on_tiny_sd3(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_pairs(tmp_path / "pairs.jsonl", PROMPTS[:2], torch.rand(2, 3, 16, 16, generator=g),
                torch.rand(2, 3, 16, 16, generator=g))
    argv = ["--model", "tiny-sd3", "--pairs", str(tmp_path / "pairs.jsonl"), "--lora-rank", "4", "--steps", "2",
            "--batch-size", "2", "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--beta", "100"]
    records = main(argv)
    assert [r["step"] for r in records] == [0, 1, 2] and all(math.isfinite(r.get("loss", 0)) for r in records)
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[1]["implicit_acc"] == 0.0


# ------------------------------------------------------------------ tier 3: the claim on the toy world
#: toy-unet base, hidden reward JPEG compressibility; 96 training and 96 held-out pairs from 4-step DDIM
#: samples without CFG, 20 full fine-tuning steps of 12 pairs (README "Claim": the numbers and the command)
CLAIM = dict(model="toy-unet", reward="jpeg_compressibility", num_pairs=96, num_heldout=96, heldout_draws=2,
             sample_steps=4, guidance_scale=1.0, eval_prompts=32, steps=20, batch_size=12, learning_rate=1e-4,
             eval_every=20, save_every=20, seed=0, device="cpu", figures=False)


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory):
    return train(Config(out_dir=str(tmp_path_factory.mktemp("claim")), **CLAIM))


def test_claim_dpo_learns_the_hidden_preference(claim_run):
    base, final = claim_run[0], claim_run[-1]
    # held-out implicit accuracy: 0 at the base (not logged at step 0: every Delta is 0, every pair a tie, tier 1);
    # after training >= 0.6, two binomial standard errors (0.05 for 96 pairs) above chance
    assert final.get("heldout_acc", 0.0) >= 0.6, final
    # the hidden reward (-JPEG kB) of fixed-noise samples rises by >= 5 bytes and 3 paired standard errors
    gain = final["eval_reward"] - base["eval_reward"]
    assert gain >= max(0.005, 3 * final["eval_gain_se"]), (gain, final)


def test_claim_sharing_the_noise_inside_a_pair_lowers_the_gradient_noise(claim_run):
    # at the base both gradients have the same expectation; independent noise adds >= 50% to E|g|^2
    base = claim_run[0]
    assert base["grad_sq_independent"] >= 1.5 * base["grad_sq_shared"], base
