"""DDPO evidence in three tiers: exact maths, one update on tiny real pipelines, the claims on the toy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

from common.advantages import PerPromptStatTracker
from common.models import tiny
from common.rollout import rollout, step_log_prob
from papers.ddpo.ddpo import (
    Config,
    compute_advantages,
    ddpo_is_loss,
    ddpo_sf_loss,
    ddpo_step,
    main,
    paired_gain,
    sample_train_timesteps,
    train,
)


def _lora_tiny_sd(kind: str = "sd"):
    adapter = tiny.tiny_sd() if kind == "sd" else tiny.tiny_sdxl()
    adapter.add_lora(rank=2)
    return adapter


def _rollout(adapter, n: int = 4, steps: int = 3, guidance: float = 5.0):
    prompts = ["a red circle", "two squares"] * (n // 2)
    return rollout(adapter, prompts, num_steps=steps, step_fn=ddpo_step, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(0))


# ---- tier 1: maths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_fn", [ddpo_is_loss, ddpo_sf_loss])
def test_first_inner_step_ratio_is_exactly_one_with_shuffled_timesteps(loss_fn):
    adapter = _lora_tiny_sd()
    traj = _rollout(adapter)
    steps = sample_train_timesteps(len(traj), traj.schedule.num_steps, 1.0, torch.Generator().manual_seed(1))
    for j in range(steps.shape[1]):
        out = step_log_prob(adapter, traj, steps[:, j], ddpo_step)  # CFG recomputed, per-sample timesteps
        old = traj.log_probs[torch.arange(len(traj)), steps[:, j]]
        _, info = loss_fn(out.log_prob, old, torch.randn(len(traj)))
        assert torch.equal(out.log_prob.detach(), old)
        assert info["ratio"].item() == 1.0 and info["clipfrac"].item() == 0.0
        assert info["approx_kl"].item() == 0.0


def test_eta_zero_is_the_ddim_step_and_eta_one_matches_diffusers_noise():
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    adapter = tiny.tiny_sd()
    schedule = adapter.schedule(5, device="cpu")
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        x, eps, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        ours = ddpo_step(eps, x, schedule, i, eta=0.0)
        ref = scheduler.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-6, rtol=1e-5)
        assert torch.all(ours.log_prob == 0)  # deterministic step: no policy
        ours1 = ddpo_step(eps, x, schedule, i, eta=1.0, noise=noise)
        ref1 = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours1.prev_sample, ref1, atol=1e-5, rtol=1e-5)


def test_log_prob_is_the_per_pixel_mean_gaussian_density():
    adapter = tiny.tiny_sd()
    schedule = adapter.schedule(4, device="cpu")
    x, eps, x_next = torch.randn(3, 2, 4, 8, 8)
    out = ddpo_step(eps, x, schedule, 1, prev_sample=x_next)
    s = out.std.flatten()[0].double()
    # log N(x'; mu, s^2), averaged over the 256 latent entries
    by_hand = (-(x_next.double() - out.mean.double()) ** 2 / (2 * s**2) - torch.log(s)
               - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), by_hand, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [ddpo_is_loss, ddpo_sf_loss])
def test_zero_advantages_give_zero_gradient(loss_fn):
    adapter = _lora_tiny_sd()
    traj = _rollout(adapter)
    out = step_log_prob(adapter, traj, 1, ddpo_step)
    loss, _ = loss_fn(out.log_prob, traj.log_probs[:, 1], torch.zeros(len(traj)))
    loss.backward()
    grads = [p.grad for p in adapter.trainable_parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # and a non-zero advantage does reach the LoRA weights
    adapter.denoiser.zero_grad()
    out = step_log_prob(adapter, traj, 1, ddpo_step)
    loss_fn(out.log_prob, traj.log_probs[:, 1], torch.tensor([1.0, -1.0, 0.5, 2.0]))[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())


def test_advantages_are_clipped_at_five_and_sf_gradient_is_the_score_function():
    log_prob = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([10.0, -7.0, 1.0])
    ddpo_sf_loss(log_prob, log_prob.detach(), adv)[0].backward()
    # d/dlogp of -mean(A logp) = -clip(A) / B
    torch.testing.assert_close(log_prob.grad, -torch.tensor([5.0, -5.0, 1.0]) / 3)
    log_prob.grad = None
    ddpo_is_loss(log_prob, log_prob.detach(), adv)[0].backward()  # on-policy: same gradient as SF
    torch.testing.assert_close(log_prob.grad, -torch.tensor([5.0, -5.0, 1.0]) / 3)
    # past the clip range (ratio > 1 + 1e-4 with A > 0) the IS gradient vanishes
    log_prob.grad = None
    ddpo_is_loss(log_prob, log_prob.detach() - 1e-3, torch.ones(3))[0].backward()
    assert torch.count_nonzero(log_prob.grad) == 0


def test_per_prompt_tracker_zero_mean_per_prompt_and_persists_across_epochs():
    prompts = ["a"] * 4 + ["b"] * 4
    gen = torch.Generator().manual_seed(0)
    r1 = torch.randn(8, generator=gen) + torch.tensor([0.0] * 4 + [100.0] * 4)
    tracker = PerPromptStatTracker("ddpo", buffer_size=8, min_count=4)
    a1 = compute_advantages(prompts, r1, tracker)
    for k in (slice(0, 4), slice(4, 8)):
        assert abs(a1[k].mean().item()) < 1e-5
        torch.testing.assert_close(a1[k].std(correction=0), torch.tensor(1.0), atol=1e-4, rtol=0)
    # epoch 2: the statistics include epoch 1's rewards (the buffer persists)
    r2 = torch.randn(8, generator=gen) + 5
    a2 = compute_advantages(prompts, r2, tracker)
    both = torch.cat([r1[:4], r2[:4]]).double()
    expected = (r2[:4].double() - both.mean()) / (both.std(correction=0) + 1e-6)
    torch.testing.assert_close(a2[:4].double(), expected, atol=1e-5, rtol=1e-5)
    assert a2[:4].mean() > 0.5  # better than the remembered rewards; an epoch-only tracker would give mean 0
    # below min_count the whole batch's statistics are used
    fresh = compute_advantages(prompts, r1, PerPromptStatTracker("ddpo", buffer_size=16, min_count=16))
    torch.testing.assert_close(fresh, (r1 - r1.mean()) / (r1.std(correction=0) + 1e-6), atol=1e-5, rtol=1e-5)
    # without a tracker: batch normalisation, mean 0 and std 1 over the batch
    batch = compute_advantages(prompts, r1, None)
    assert abs(batch.mean().item()) < 1e-5 and abs(batch.std(correction=0).item() - 1) < 1e-5


def test_trained_timesteps_are_a_per_sample_permutation():
    steps = sample_train_timesteps(64, 10, 0.5, torch.Generator().manual_seed(0))
    assert steps.shape == (64, 5)
    assert all(len(set(row.tolist())) == 5 for row in steps)
    assert len({tuple(row.tolist()) for row in steps}) > 50  # samples get their own orders
    assert sample_train_timesteps(3, 10, 1.0).sort(dim=1).values.eq(torch.arange(10)).all()


def test_config_errors_name_the_field(capsys):
    with pytest.raises(ValueError, match="reward"):
        Config(reward="nope")
    with pytest.raises(ValueError, match="train_batch_size"):
        Config(sample_batch_size=6, train_batch_size=4)
    with pytest.raises(ValueError, match="num_inner_epochs"):
        Config(variant="sf", num_inner_epochs=2)
    with pytest.raises(SystemExit):
        from common.config import run_main
        run_main(main, ["--model", "/does/not/exist"])
    assert "model" in capsys.readouterr().err


# ---- tier 2: one update on each tiny real pipeline ------------------------------------------------------
@pytest.mark.parametrize("model,variant", [("tiny-sd", "is"), ("tiny-sdxl", "sf")])
def test_one_update_on_tiny_pipelines(tmp_path, model, variant):
    config = Config(model=model, variant=variant, num_epochs=1, num_steps=2, sample_batch_size=2,
                    num_batches_per_epoch=1, train_batch_size=2, gradient_accumulation_steps=1,
                    out_dir=str(tmp_path), eval_samples=2,
                    learning_rate=1e-2)
    result = train(config)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and record["ratio"] == 1.0 and record["clipfrac"] == 0.0
    assert math.isfinite(result["rewards"][0])
    assert (tmp_path / "before_after.png").exists() and (tmp_path / "reward_curve.png").exists()


def test_resume_reproduces_an_uninterrupted_run_including_the_tracker(tmp_path):
    tiny_run = dict(model="tiny-sd", num_steps=2, sample_batch_size=4, num_batches_per_epoch=1,
                    train_batch_size=2, gradient_accumulation_steps=1, eval_samples=0, num_prompts=2,
                    tracker_min_count=2, save_every=1)
    straight = train(Config(**tiny_run, num_epochs=2, out_dir=str(tmp_path / "a")))
    train(Config(**tiny_run, num_epochs=1, out_dir=str(tmp_path / "b")))
    resumed = train(Config(**tiny_run, num_epochs=2, out_dir=str(tmp_path / "b")))
    assert resumed["rewards"] == straight["rewards"][1:]
    lines = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("a", "b")]
    assert lines[0] == lines[1]  # losses depend on the per-prompt buffers saved in the checkpoint


def test_gradients_reach_lora_on_tiny_sd_with_cfg():
    adapter = _lora_tiny_sd()
    traj = _rollout(adapter)
    steps = sample_train_timesteps(len(traj), 3, 1.0, torch.Generator().manual_seed(0))
    loss, _ = ddpo_is_loss(step_log_prob(adapter, traj, steps[:, 0], ddpo_step).log_prob,
                           traj.log_probs[torch.arange(4), steps[:, 0]], torch.tensor([1.0, -1.0, 2.0, -2.0]))
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p.grad).all() for p in lora_b if p.grad is not None)
    assert sum(p.grad.abs().sum().item() for p in lora_b if p.grad is not None) > 0


# ---- tier 3: the claims on the toy world ---------------------------------------------------------------
#: the claim runs (README "Claim"): toy-unet base, JPEG compressibility, two prompts whose rewards are offset
#: by 1 kB, 8 epochs of 32 samples with 8 DDIM steps, no CFG, 2 of each sample's 8 steps trained, four
#: updates per epoch (official dgx.py: 4). The per-prompt tracker removes the offsets, so its run is the
#: same as a run without offsets; batch normalisation turns them into "which prompt" advantages.
CLAIM = dict(model="toy-unet", reward="jpeg_compressibility", num_epochs=8, num_steps=8, guidance_scale=1.0,
             sample_batch_size=16, num_batches_per_epoch=2, train_batch_size=8, gradient_accumulation_steps=1,
             timestep_fraction=0.25, learning_rate=1e-2, num_prompts=2, prompt_reward_offset=1.0,
             tracker_min_count=8, eval_samples=64)


@pytest.fixture(scope="module")
def claim_runs(tmp_path_factory):
    runs = {}
    for tracking in (True, False):
        out = tmp_path_factory.mktemp(f"tracking_{tracking}")
        runs[tracking] = train(Config(**CLAIM, per_prompt_stat_tracking=tracking, out_dir=str(out)))
    return runs


def check_rise(before: list[float], after: list[float]) -> None:
    """The paired gain after - before must exceed 4 standard errors and 0.001 kB (one byte)."""
    gain, se = paired_gain(before, after)
    assert gain > 4 * se and gain > 0.001, (gain, se)


def test_claim_compressibility_rises_by_several_standard_errors(claim_runs):
    run = claim_runs[True]
    check_rise(run["eval_before"], run["eval_after"])


def test_claim_fails_on_the_untrained_base(claim_runs):
    before = claim_runs[True]["eval_before"]  # the base model's evaluation: zero epochs of training
    with pytest.raises(AssertionError):
        check_rise(before, before)


def test_claim_per_prompt_tracker_beats_batch_normalisation_with_offset_prompts(claim_runs):
    per_prompt, batch = claim_runs[True], claim_runs[False]
    assert per_prompt["eval_before"] == batch["eval_before"]  # same base, same evaluation noise
    gain, se = paired_gain(batch["eval_after"], per_prompt["eval_after"])
    assert gain > 4 * se, (gain, se)
    assert paired_gain(batch["eval_before"], batch["eval_after"])[0] < 0.5 * gain
