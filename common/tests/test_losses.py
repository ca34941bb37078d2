"""Checks of common.losses: PPO surrogate identities, KL estimators, Diffusion-DPO and the on-policy guard."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from common import losses as L
from common import steps as S
from common.models.base import Schedule


def test_ratio_one_gives_no_clipping_and_minus_mean_advantage():
    logp = torch.randn(8)
    adv = torch.randn(8)
    loss, info = L.ppo_clip_loss(logp, logp.clone(), adv, clip_range=1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0 and info["ratio"] == 1


def test_ppo_clip_matches_the_surrogate_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.95])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    loss, info = L.ppo_clip_loss(logp, old, adv, clip_range=0.2)
    # per sample: max(-A r, -A clip(r)) = -1.2, -0.5, 2.1, 1.9
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 2.1 + 1.9) / 4))
    assert info["clipfrac"] == 0.5
    torch.testing.assert_close(info["approx_kl"], 0.5 * (logp.detach() ** 2).mean())
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0  # the clipped sample gets no gradient


def test_zero_advantages_give_zero_gradient():
    logp = torch.randn(6, requires_grad=True)
    loss, _ = L.ppo_clip_loss(logp, logp.detach() + 0.01 * torch.randn(6), torch.zeros(6), 1e-4)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(6)) and loss == 0


def test_ppo_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        L.ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), 1e-4)
    with pytest.raises(ValueError, match="clip_range"):
        L.ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)


def _flow_schedule(n=10, shift=3.0):
    # the shifted linear sigma grid of SD3-style pipelines, ending at 0
    t = torch.linspace(1, 0, n + 1)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return Schedule("flow", timesteps=sigmas[:-1] * 1000, sigmas=sigmas)


def test_check_on_policy_passes_exact_recompute_and_catches_a_precision_mismatch():
    sched = _flow_schedule()
    torch.manual_seed(0)
    x, v = torch.randn(4, 4, 8, 8), 1.4 * torch.randn(4, 4, 8, 8)
    i = 8  # the last step Flow-GRPO trains, lowest noise
    roll = S.flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(0))
    L.check_on_policy(S.flow_sde_step(v, x, sched, i, prev_sample=roll.prev_sample).log_prob, roll.log_prob)
    bf16 = S.flow_sde_step(v.bfloat16(), x, sched, i, prev_sample=roll.prev_sample)
    with pytest.raises(RuntimeError, match="bf16"):
        L.check_on_policy(bf16.log_prob, roll.log_prob)
    with pytest.raises(RuntimeError, match="nan"):
        L.check_on_policy(torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_kl_estimators_vanish_when_policy_is_reference():
    logp, mean, std = torch.randn(5), torch.randn(5, 3, 4, 4), torch.rand(5, 1, 1, 1) + 0.1
    assert torch.equal(L.kl_k1(logp, logp), torch.zeros(5))
    assert torch.equal(L.kl_k3(logp, logp), torch.zeros(5))
    assert torch.equal(L.gaussian_mean_kl(mean, mean.clone(), std), torch.zeros(5))
    assert torch.equal(L.gaussian_mean_kl(mean, mean.clone(), None), torch.zeros(5))


def test_k1_and_k3_estimate_the_kl_from_policy_samples():
    torch.manual_seed(0)
    pi, ref = Normal(0.0, 1.0), Normal(0.3, 1.2)
    x = pi.sample(torch.Size([200_000]))
    true = kl_divergence(pi, ref).item()
    k1 = L.kl_k1(pi.log_prob(x), ref.log_prob(x))
    k3 = L.kl_k3(pi.log_prob(x), ref.log_prob(x))
    assert (k3 >= 0).all()
    assert abs(k1.mean().item() - true) < 0.01 and abs(k3.mean().item() - true) < 0.01


def test_gaussian_mean_kl_is_the_step_kl_and_flow_grpo_scales_it_by_minus_dt():
    torch.manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    true = kl_divergence(Normal(mean, std), Normal(ref, std)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(L.gaussian_mean_kl(mean, ref, std), true)
    dt = torch.tensor([-0.05, -0.1, -0.2])
    torch.testing.assert_close(L.gaussian_mean_kl(mean, ref, std, dt=dt), true * -dt)
    torch.testing.assert_close(L.gaussian_mean_kl(mean, ref, None), ((mean - ref) ** 2).mean(dim=(1, 2, 3)))


def test_denoising_error_and_targets():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pred = noise + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    torch.testing.assert_close(L.denoising_error(pred, L.eps_target(x0, noise)), torch.tensor([0.01, 0.04]))
    err_bf16 = L.denoising_error(pred.bfloat16(), noise.bfloat16())
    assert err_bf16.dtype == torch.float32 and err_bf16.shape == (2,)
    # the velocity is d x_s / ds along x_s = (1 - s) x0 + s noise
    s, h = 0.4, 1e-3
    x_s = lambda s: (1 - s) * x0 + s * noise  # noqa: E731
    torch.testing.assert_close(L.velocity_target(x0, noise), (x_s(s + h) - x_s(s - h)) / (2 * h),
                               atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="pred, target"):
        L.denoising_error(pred, noise[:1])


def test_dpo_loss_is_ln2_at_the_reference_and_conventions_agree():
    e = torch.rand(16)
    e_l = torch.rand(16)
    loss, acc = L.dpo_logistic_loss(e, e_l, e.clone(), e_l.clone(), beta=5000)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert acc == 0  # ties are not correct in the official code
    _, acc_d = L.dpo_logistic_loss(e, e_l, e.clone(), e_l.clone(), beta=2500, convention="diffusers")
    assert acc_d == 0.5
    # the policy lowered the winner's error relative to the reference: loss below ln 2, accuracy 1
    w = (e - 1e-4).requires_grad_()
    off, acc = L.dpo_logistic_loss(w, e_l, e, e_l, beta=5000)
    dif, _ = L.dpo_logistic_loss(w, e_l, e, e_l, beta=2500, convention="diffusers")
    torch.testing.assert_close(off, dif)
    torch.testing.assert_close(off, -torch.nn.functional.logsigmoid(torch.tensor(0.25)))
    assert acc == 1
    off.backward()
    assert (w.grad > 0).all()  # descending the loss lowers the winner's error further


# ---- forward process and the pretraining loss ----------------------------------------------------
def test_noisy_state_is_each_familys_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    level = torch.tensor([0.0, 0.5, 1.0])
    x_t, target = L.noisy_state(x0, noise, level, "epsilon")  # abar = 0: pure noise, abar = 1: clean
    assert torch.equal(x_t[0], noise[0]) and torch.equal(x_t[2], x0[2]) and torch.equal(target, noise)
    torch.testing.assert_close(x_t[1], 0.5**0.5 * (x0[1] + noise[1]))
    x_s, v = L.noisy_state(x0, noise, level, "flow")  # sigma = 0: clean, sigma = 1: pure noise
    assert torch.equal(x_s[0], x0[0]) and torch.equal(x_s[2], noise[2]) and torch.equal(v, noise - x0)
    # the flow target is the velocity of the straight path: d x_s / d sigma
    torch.testing.assert_close(L.noisy_state(x0, noise, level + 1e-3, "flow")[0] - x_s, 1e-3 * v, atol=1e-5,
                               rtol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        L.noisy_state(x0, noise, level, "sample")


@pytest.mark.parametrize("kind", ["unet", "flow"])
def test_denoising_loss_is_seeded_and_trains(kind):
    from common.models.toy import build_toy_adapter

    adapter = build_toy_adapter(kind)
    x0 = adapter.encode(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    cond = adapter.encode_prompts(["a red circle"] * 4)
    losses = [L.denoising_loss(adapter, x0, cond, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert losses[0].item() == losses[1].item() and losses[0] > 0
    losses[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.denoiser.parameters())
