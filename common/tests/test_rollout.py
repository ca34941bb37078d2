"""rollout / step_log_prob on the tiny SD (epsilon, DDIM-eta) and SD3 (flow, Flow-SDE) pipelines."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from common.models.tiny import tiny_flux, tiny_sd, tiny_sd3
from common.rollout import Trajectory, draw_noise, rollout, step_log_prob
from common.steps import dance_sde_step, ddim_step, flow_sde_step, ode_step

PROMPTS = ["a red circle", "two blue squares"]
KERNELS = {"sd": (tiny_sd, partial(ddim_step, eta=1.0)), "sd3": (tiny_sd3, partial(flow_sde_step, noise_level=0.7))}


@pytest.fixture(params=list(KERNELS))
def family(request):
    build, step = KERNELS[request.param]
    return build(), step


def _rollout(adapter, step, **kwargs) -> Trajectory:
    options = {"group_size": 2, "num_steps": 4, "guidance_scale": 4.5, "generator": torch.Generator().manual_seed(0)}
    return rollout(adapter, PROMPTS, step_fn=step, **(options | kwargs))


def test_shapes_and_group_layout(family):
    adapter, step = family
    traj = _rollout(adapter, step)
    c, h, w = adapter.latent_shape
    assert len(traj) == 4 and traj.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert traj.latents.shape == (4, 5, c, h, w) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (4, 4) and traj.log_probs.dtype == torch.float32
    assert traj.stochastic.tolist() == [True] * 4 and traj.timesteps.shape == (4,)
    assert torch.equal(traj.timesteps, adapter.schedule(4).timesteps)
    assert traj.images.shape == (4, 3, 16, 16) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.group_size == 2 and traj.guidance_scale == 4.5
    # per-sample embeddings: equal inside a group, different across groups
    assert len(traj.embeds) == 4 and len(traj.neg_embeds) == 4
    assert torch.equal(traj.embeds.hidden[0], traj.embeds.hidden[1])
    assert not torch.equal(traj.embeds.hidden[1], traj.embeds.hidden[2])
    assert torch.equal(traj.neg_embeds.hidden[0], traj.neg_embeds.hidden[3])
    assert torch.equal(traj.images, adapter.decode(traj.latents[:, -1]))
    # no_grad, not inference_mode: the stored tensors can enter autograd later
    assert not traj.latents.is_inference() and not traj.embeds.hidden.is_inference()
    assert "float32" in traj.numerics and "autocast(cpu)=off" in traj.numerics


def test_prompts_are_encoded_once(family):
    adapter, step = family
    calls = []
    encode = adapter.encode_prompts
    adapter.encode_prompts = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    _rollout(adapter, step)
    assert calls == [PROMPTS + [""]]
    calls.clear()
    traj = _rollout(adapter, step, guidance_scale=1.0, decode=False)
    assert calls == [PROMPTS] and traj.neg_embeds is None and traj.images is None


def test_shared_noise_within_groups(family):
    adapter, step = family
    x0 = _rollout(adapter, step, shared_noise=True, num_steps=2).latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[2], x0[3])
    assert not torch.equal(x0[0], x0[2])
    free = _rollout(adapter, step, num_steps=2).latents[:, 0]
    assert not torch.equal(free[0], free[1])


def test_seeded_and_stochastic(family):
    adapter, step = family
    a, b = _rollout(adapter, step, num_steps=2), _rollout(adapter, step, num_steps=2)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    # shared initial noise, yet the SDE noise makes the group members diverge
    shared = _rollout(adapter, step, num_steps=2, shared_noise=True).latents
    assert not torch.equal(shared[0, -1], shared[1, -1])


@pytest.mark.parametrize("shared_noise", [False, True])
def test_shards_sample_what_one_process_samples(family, shared_noise):
    """Rank r of 2 with prompt r (generator seeded alike) reproduces rows of the one-process rollout."""
    adapter, step = family
    whole = _rollout(adapter, step, num_steps=3, shared_noise=shared_noise)
    parts = [rollout(adapter, PROMPTS[r: r + 1], step_fn=step, group_size=2, num_steps=3, guidance_scale=4.5,
                     shared_noise=shared_noise, generator=torch.Generator().manual_seed(0), shard=(r, 2))
             for r in range(2)]
    assert torch.allclose(torch.cat([p.latents for p in parts]), whole.latents, atol=1e-5)
    assert torch.allclose(torch.cat([p.log_probs for p in parts]), whole.log_probs, atol=1e-4)


def test_draw_noise_shards():
    one = draw_noise((4, 3), torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(one, torch.randn((4, 3), generator=torch.Generator().manual_seed(1)))  # world 1: unchanged
    halves = [draw_noise((2, 3), torch.Generator().manual_seed(1), "cpu", shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(halves), one)
    with pytest.raises(ValueError, match="shard"):
        draw_noise((2, 3), None, "cpu", shard=(2, 2))


def test_window_semantics(family):
    adapter, step = family
    traj = _rollout(adapter, step, num_steps=5, window=(1, 3))
    assert traj.stochastic.tolist() == [False, True, True, False, False]
    assert (traj.log_probs[:, [0, 3, 4]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    # outside the window each transition is the deterministic ODE step of the stored state
    for i in (0, 3, 4):
        x = traj.latents[:, i]
        out = adapter.predict(x, traj.timesteps[i], traj.embeds, traj.neg_embeds, traj.guidance_scale)
        assert torch.equal(ode_step(out, x, traj.schedule, i).prev_sample, traj.latents[:, i + 1])
    with pytest.raises(ValueError, match="window"):
        _rollout(adapter, step, num_steps=3, window=(2, 4))


def test_recompute_gives_ratio_exactly_one(family):
    adapter, step = family
    adapter.add_lora(rank=2)
    traj = _rollout(adapter, step)
    for i in range(traj.schedule.num_steps):
        new = step_log_prob(adapter, traj, i, step)
        assert torch.equal(new.log_prob, traj.log_probs[:, i])
        assert torch.equal(torch.exp(new.log_prob - traj.log_probs[:, i]), torch.ones(4))
    # with gradient, reaching the LoRA parameters
    new.log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())


def test_recompute_per_sample_steps_and_subsets(family):
    adapter, step = family
    traj = _rollout(adapter, step)
    steps = torch.tensor([3, 0, 2, 1])
    new = step_log_prob(adapter, traj, steps, step)
    assert torch.equal(new.log_prob, traj.log_probs[torch.arange(4), steps])
    # a different batch composition may round differently (batch-size invariance), hence allclose
    index = torch.tensor([2, 0])
    sub = step_log_prob(adapter, traj, steps[:2], step, index=index)
    torch.testing.assert_close(sub.log_prob, traj.log_probs[index, steps[:2]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="step indices"):
        step_log_prob(adapter, traj, steps[:3], step)


def test_numerics_guard(family):
    adapter, step = family
    traj = _rollout(adapter, step, num_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="numerics differ"):
        step_log_prob(adapter, traj, 0, step)
    step_log_prob(adapter, traj, 0, step)  # back at the rollout's numerics
    adapter.denoiser.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        step_log_prob(adapter, traj, 0, step)


def test_bf16_rollout_and_recompute():
    adapter = tiny_sd3()
    for part in (adapter.transformer, *adapter.text_encoders, adapter.t5_encoder, adapter.vae):
        part.to(torch.bfloat16)
    step = KERNELS["sd3"][1]
    traj = _rollout(adapter, step, num_steps=3)
    assert "bfloat16" in traj.numerics and traj.latents.dtype == torch.float32
    assert torch.equal(step_log_prob(adapter, traj, 1, step).log_prob, traj.log_probs[:, 1])


def test_flux_rollout_with_dance_sde():
    adapter = tiny_flux()
    step = partial(dance_sde_step, eta=0.3)
    traj = rollout(adapter, PROMPTS, group_size=2, num_steps=3, step_fn=step, window=(0, 2),
                   generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (4, 4, *adapter.latent_shape) and traj.neg_embeds is None
    assert torch.equal(step_log_prob(adapter, traj, 1, step).log_prob, traj.log_probs[:, 1])


def test_bad_inputs():
    adapter, step = KERNELS["sd"][0](), KERNELS["sd"][1]
    with pytest.raises(ValueError, match="group_size"):
        rollout(adapter, PROMPTS, group_size=0, num_steps=2, step_fn=step)
    with pytest.raises(ValueError, match="prompts"):
        rollout(adapter, [], num_steps=2, step_fn=step)
    traj = rollout(adapter, PROMPTS, num_steps=2, step_fn=step)
    with pytest.raises(ValueError, match="out of range"):
        step_log_prob(adapter, traj, 2, step)
