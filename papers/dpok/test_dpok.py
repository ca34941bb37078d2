"""DPOK evidence: tier 1 maths identities, tier 2 one update on tiny SD, tier 3 the KL claim on the toy world."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from diffusers import DDIMScheduler

from common.models.tiny import tiny_sd
from common.rewards import load_reward
from common.rollout import rollout
from papers.dpok.dpok import (
    Config,
    ReplayBuffer,
    ValueNet,
    dpok_loss,
    dpok_step,
    kl_weight_at,
    text_features,
    train,
    trajectory_transitions,
    transition_loss,
    value_loss,
)


def _setup(steps: int = 4, batch: int = 4, seed: int = 0):
    """tiny SD with a zero LoRA, one rollout of `batch` samples in the replay buffer, a value network."""
    torch.manual_seed(seed)
    adapter = tiny_sd(seed)
    adapter.add_lora(rank=4)
    config = Config(model="tiny-sd", reward="jpeg_compressibility", num_steps=steps, samples_per_round=batch,
                    policy_batch_size=2, value_batch_size=4)
    gen = torch.Generator().manual_seed(seed)
    traj = rollout(adapter, ["a cat"] * (batch // 2) + ["a dog"] * (batch - batch // 2), num_steps=steps,
                   step_fn=functools.partial(dpok_step, eta=1.0), guidance_scale=config.guidance_scale,
                   generator=gen)
    rewards, _ = load_reward("jpeg_compressibility")(traj.images, traj.prompts)
    buffer = ReplayBuffer(config.buffer_size)
    buffer.add(trajectory_transitions(traj, rewards))
    value_net = ValueNet(adapter.latent_shape, text_features(traj.embeds).shape[1], steps, width=32)
    return adapter, config, traj, buffer, value_net


# ------------------------------------------------------------------------------------------ tier 1
def test_first_inner_step_ratio_is_exactly_one():
    adapter, config, traj, buffer, value_net = _setup()
    b = len(traj)
    for i in range(config.num_steps):  # every step, recomputed on the rollout's own batch: bit-exact
        batch = buffer.take(torch.arange(i * b, (i + 1) * b))
        _, info = transition_loss(adapter, value_net, batch, traj.schedule, config, kl_weight=0.01)
        assert info["ratio"].item() == 1.0 and info["clipfrac"].item() == 0.0
        assert info["kl"].item() == 0.0  # LoRA B = 0: the policy IS the pretrained model
    # a random replayed minibatch of another size stays far inside the 1e-4 band
    _, info = transition_loss(adapter, value_net, buffer.sample(3, torch.Generator().manual_seed(1)),
                              traj.schedule, config, kl_weight=0.01)
    assert abs(info["ratio"].item() - 1.0) < 1e-6 and info["clipfrac"].item() == 0.0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_matches_diffusers_ddim(eta):
    adapter = tiny_sd(0)
    n = 5
    schedule = adapter.schedule(n, "cpu")
    scheduler = DDIMScheduler.from_config(adapter.scheduler.config)
    scheduler.set_timesteps(n)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):  # includes the last step, where a_prev = final_alpha_cumprod
        x, eps, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        ours = dpok_step(eps, x, schedule, i, eta=eta, noise=noise)
        ref = scheduler.step(eps, scheduler.timesteps[i], x, eta=eta, variance_noise=noise if eta else None).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)
        if eta == 0:
            assert float(ours.std.abs().max()) == 0.0 and float(ours.log_prob.abs().max()) == 0.0


def test_zero_advantage_and_zero_beta_give_zero_gradient():
    adapter, config, traj, buffer, value_net = _setup()
    with torch.no_grad():  # move the policy off the reference so that the KL term has a gradient to lose
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = buffer.take(torch.arange(4, 8))
    params = adapter.trainable_parameters()

    def grad_norm(advantage: float, beta: float) -> float:
        t = traj.schedule.timesteps[batch.step]
        eps = adapter.predict(batch.state, t, batch.cond, batch.uncond, config.guidance_scale)
        with torch.no_grad(), adapter.disable_adapter():
            eps_ref = adapter.predict(batch.state, t, batch.cond, batch.uncond, config.guidance_scale)
        out = dpok_step(eps, batch.state, traj.schedule, batch.step, prev_sample=batch.next_state)
        loss, _ = dpok_loss(out.log_prob, batch.log_prob, torch.full((4,), advantage), eps, eps_ref,
                            reward_weight=100.0, kl_weight=beta, ratio_clip=1.0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))

    assert grad_norm(0.0, 0.0) == 0.0
    assert grad_norm(1.0, 0.0) > 0.0 and grad_norm(0.0, 1.0) > 0.0  # each term alone does reach the LoRA


def test_hard_clamp_zeroes_the_gradient_outside_the_band():
    log_prob = torch.zeros(4, requires_grad=True)
    eps = torch.zeros(4, 3, requires_grad=True)
    for old, expect_zero in ((torch.zeros(4), False), (torch.full((4,), -1e-3), True), (torch.full((4,), 1e-3), True)):
        loss, _ = dpok_loss(log_prob, old, torch.tensor([1.0, -1.0, 2.0, -2.0]), eps, eps.detach(),
                            reward_weight=100.0, kl_weight=0.0, ratio_clip=1e-4)
        (g,) = torch.autograd.grad(loss, [log_prob])
        assert (float(g.abs().max()) == 0.0) == expect_zero  # no min/max: both signs of A lose the gradient


def test_kl_weight_delay():
    assert kl_weight_at(0, 0.01, -1) == 0.01
    assert kl_weight_at(3, 0.01, 5) == 0.0 and kl_weight_at(6, 0.01, 5) == 0.01


def test_value_loss_decreases_on_a_fixed_target():
    adapter, config, traj, buffer, value_net = _setup()
    batch = buffer.take(torch.arange(len(buffer)))
    batch.reward = torch.linspace(-1, 1, len(buffer))  # a fixed target
    opt = torch.optim.AdamW(value_net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = value_loss(value_net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_buffer_keeps_the_newest_transitions():
    adapter, config, traj, buffer, value_net = _setup()
    small = ReplayBuffer(10)
    small.add(trajectory_transitions(traj, torch.zeros(len(traj))))
    small.add(trajectory_transitions(traj, torch.ones(len(traj))))
    assert len(small) == 10 and float(small.data["reward"].min()) == 1.0
    with pytest.raises(ValueError, match="n: cannot draw"):
        small.sample(11)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^model: toy-flow is a flow model"):
        Config(model="toy-flow")
    with pytest.raises(ValueError, match="^eta:"):
        Config(eta=0.0)
    with pytest.raises(ValueError, match="^value_batch_size:"):
        Config(num_steps=2, samples_per_round=2, value_batch_size=64)


# ------------------------------------------------------------------------------------------ tier 2
def test_one_update_on_tiny_sd_reaches_lora_and_value_net():
    adapter, config, traj, buffer, value_net = _setup()
    with torch.no_grad():  # an off-reference policy, so that the KL term also carries gradient
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    gen = torch.Generator().manual_seed(0)
    v_loss = value_loss(value_net, buffer.sample(config.value_batch_size, gen))
    v_loss.backward()
    loss, info = transition_loss(adapter, value_net, buffer.sample(config.policy_batch_size, gen), traj.schedule,
                                 config, kl_weight=config.kl_weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v_loss) and info["kl"] > 0
    lora = [p for n, p in adapter.denoiser.named_parameters() if "lora" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert sum(float(p.grad.abs().sum()) for p in lora) > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in value_net.parameters())
    assert sum(float(p.grad.abs().sum()) for p in value_net.parameters()) > 0


# ------------------------------------------------------------------------------------------ tier 3
#: the claim runs (README "Claim"): toy-unet base, JPEG compressibility of one toy prompt, 8 rounds of 16
#: samples with 4 DDIM steps (eta 1, no CFG), a one-round buffer, one policy step of 32 transitions a round,
#: a small value network fitted 50 steps a round; 32 fixed-noise samples before and after.
CLAIM = dict(model="toy-unet", reward="jpeg_compressibility", task="counting", prompt_seed=0, rounds=8,
             num_steps=4, guidance_scale=1.0, samples_per_round=16, buffer_size=64, policy_updates=1,
             grad_accum=1, policy_batch_size=32, learning_rate=3e-2, value_width=32, value_lr=3e-3,
             value_batch_size=64, value_steps=1, value_updates=50, eval_every=0, eval_samples=32, seed=0)
#: beta on the toy (the official 0.01 is sized for SD's 64x64x4 latents and ImageReward's scale)
CLAIM_KL = 1.0
#: the KL run must end at most this fraction of beta = 0's distance (six seeds measured 0.03-0.28)
MAX_RATIO = 0.5
#: beta = 0 must have moved at least this far (mean squared pixel difference; six seeds measured 0.022-0.069)
MIN_MOVE = 5e-3


@pytest.fixture(scope="module")
def claim_runs(tmp_path_factory):
    return {beta: train(Config(**CLAIM, kl_weight=beta, out_dir=str(tmp_path_factory.mktemp(f"kl{beta}"))))
            for beta in (0.0, CLAIM_KL)}


def check_claim(free: tuple[int, float, float], kl: tuple[int, float, float]) -> float:
    """(round, reward, distance) of both runs after the same training: beta = 0 must have moved away from
    the base model (distance >= MIN_MOVE), and the KL run must end at most MAX_RATIO of that distance.
    Returns the distance ratio."""
    assert free[0] == kl[0]
    assert free[2] >= MIN_MOVE, f"beta = 0 did not move away from the base: {free}"
    assert kl[2] <= MAX_RATIO * free[2], f"the KL run is not closer to the base: {kl} vs {free}"
    return kl[2] / free[2]


def test_claim_kl_stays_closer_to_the_base(claim_runs):
    free, kl = claim_runs[0.0]["eval"], claim_runs[CLAIM_KL]["eval"]
    assert free[0] == kl[0]  # same base model, same evaluation noise
    ratio = check_claim(free[-1], kl[-1])
    print(f"\nbeta=0: {free}\nbeta={CLAIM_KL}: {kl}\ndistance ratio {ratio:.3f}")


def test_claim_fails_on_the_untrained_base(claim_runs):
    base = claim_runs[0.0]["eval"][0]  # zero rounds: both settings are still the base model
    with pytest.raises(AssertionError, match="did not move"):
        check_claim(base, base)
