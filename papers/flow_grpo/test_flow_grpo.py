"""Flow-GRPO evidence in three tiers: exact identities, one update on each tiny real pipeline, the claim
on the toy world. `pytest papers/flow_grpo -q`."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from common.advantages import PerPromptStatTracker
from common.config import run_main
from common.rollout import rollout
from common.steps import flow_sde_step
from common.train import read_metrics
from papers.flow_grpo.flow_grpo import (
    Config,
    fast_rollout,
    grpo_loss,
    keep_mask,
    main,
    policy_step,
    setup,
    trained_steps,
)

TOY = "toy-flow"
PROMPTS = ["a red circle", "a blue square"]


def _batch(traj, steps, advantages):
    i = torch.tensor(steps)
    return {"latents": traj.latents[:, i], "next_latents": traj.latents[:, i + 1], "log_probs": traj.log_probs[:, i],
            "steps": i.expand(len(traj), -1), "embeds": traj.embeds, "neg": traj.neg_embeds,
            "advantages": advantages}


@pytest.fixture(scope="module")
def toy():
    """The toy-flow base with a fresh LoRA, as `train` sets it up (CFG on, KL on)."""
    torch.manual_seed(0)
    config = Config(model=TOY, guidance_scale=4.5, lora_rank=4, group_size=4, num_steps=6)
    _, adapter, _, _ = setup(config)
    return config, adapter


# ------------------------------------------------------------------ tier 1: exact identities
def test_first_inner_step_ratio_is_exactly_one(toy):
    config, adapter = toy
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    traj = rollout(adapter, PROMPTS, group_size=4, num_steps=config.num_steps, step_fn=step_fn,
                   guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(0))
    window, steps = trained_steps(config, torch.Generator())
    assert window == (0, 6) and steps == [0, 1, 2, 3, 4]  # int(6 * 0.99) = 5: all steps but the last
    batch = _batch(traj, steps, torch.randn(len(traj)))
    schedule = adapter.schedule(config.num_steps)
    for j in range(len(steps)):
        loss, info = grpo_loss(config, adapter, schedule, batch, j, step_fn)
        assert info["max_log_ratio"] == 0 and info["ratio"] == 1 and info["clipfrac"] == 0
        assert info["kl_loss"] == 0 and torch.isfinite(loss)


def test_noise_level_zero_is_the_euler_step(toy):
    _, adapter = toy
    schedule = adapter.schedule(10)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
    scheduler.set_timesteps(10)
    x, v = torch.randn(2, *adapter.latent_shape), torch.randn(2, *adapter.latent_shape)
    for i in (0, 4, 9):
        scheduler._step_index = i
        euler = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
        out = flow_sde_step(v, x, schedule, i, noise_level=0.0)
        torch.testing.assert_close(out.prev_sample, euler, rtol=0, atol=1e-6)
        assert (out.std == 0).all() and (out.log_prob == 0).all()
    # a > 0 at sigma = 1 stays finite: the official denominator 1 - sigmas[1] replaces 1 - sigma = 0
    assert torch.isfinite(flow_sde_step(v, x, schedule, 0, noise_level=0.7).log_prob).all()


def test_zero_advantages_give_zero_gradient(toy):
    config, adapter = toy
    config = dataclasses.replace(config, beta=0.0)
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    traj = rollout(adapter, PROMPTS, group_size=2, num_steps=config.num_steps, step_fn=step_fn,
                   guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(1))
    batch = _batch(traj, [0, 3], torch.zeros(len(traj)))
    adapter.denoiser.zero_grad()
    loss, _ = grpo_loss(config, adapter, adapter.schedule(config.num_steps), batch, 1, step_fn)
    loss.backward()
    grads = [p.grad for p in adapter.trainable_parameters()]
    assert all(g is not None and (g == 0).all() for g in grads)
    adapter.denoiser.zero_grad()


def test_advantages_have_zero_mean_per_prompt_and_global_std():
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    adv = PerPromptStatTracker("flow_grpo", global_std=True).update(prompts, rewards)
    for g in adv.reshape(3, 4):
        assert abs(g.sum().item()) < 1e-6
    # global std: every group is divided by the std of all 12 rewards (ddof 0) + 1e-4
    assert adv[0].item() == pytest.approx(0.5 / (rewards.std(correction=0).item() + 1e-4), rel=1e-6)
    assert (adv[8:] == 0).all()  # a group with one reward for all has advantage exactly 0


def test_keep_mask_drops_zero_advantages_and_keeps_batches_even():
    adv = torch.tensor([0.5, -0.5, 0, 0, 0, 0, 1.0, -1.0, 0.3, 0, 0, 0])
    keep = keep_mask(adv, num_batches=3, generator=torch.Generator().manual_seed(0))
    assert keep[adv != 0].all() and int(keep.sum()) == 6  # 5 non-zero + 1 re-added to divide by 3
    assert int(keep_mask(torch.zeros(8), 2, torch.Generator()).sum()) == 2  # all zero: keep one per batch


def test_fast_window_and_branching(toy):
    config, adapter = toy
    config = dataclasses.replace(config, fast=True, num_steps=6, sde_window_size=2, sde_window_range=[0, 3])
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(30):
        (a, b), steps = trained_steps(config, gen)
        assert b - a == 2 and 0 <= a <= 1 and steps == [a, a + 1]
        starts.add(a)
    assert starts == {0, 1}
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    kwargs = dict(group_size=3, num_steps=6, window=(2, 4), step_fn=step_fn, guidance_scale=4.5)
    fast = fast_rollout(adapter, PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs)
    same = rollout(adapter, PROMPTS, shared_noise=True, generator=torch.Generator().manual_seed(5), **kwargs)
    # the group shares the ODE prefix, branches in the window and only the window has log-probs
    prefix = fast.latents[:, :3].reshape(2, 3, -1)
    assert (prefix == prefix[:, :1]).all() and not (fast.latents[0, 4] == fast.latents[1, 4]).all()
    assert (fast.log_probs[:, [0, 1, 4, 5]] == 0).all() and (fast.log_probs[:, 2:4] != 0).all()
    # same random draws as the shared-noise windowed rollout, without running the prefix per image
    torch.testing.assert_close(fast.latents, same.latents, rtol=0, atol=1e-5)


def test_an_update_moves_log_probs_along_the_advantages(toy):
    config, adapter = toy
    config = dataclasses.replace(config, beta=0.0)
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    traj = rollout(adapter, PROMPTS, group_size=4, num_steps=config.num_steps, step_fn=step_fn,
                   guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(3))
    adv = torch.tensor([1.0, -1.0] * 4)
    batch, schedule = _batch(traj, [2], adv), adapter.schedule(config.num_steps)
    saved = [p.detach().clone() for p in adapter.trainable_parameters()]
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    grpo_loss(config, adapter, schedule, batch, 0, step_fn)[0].backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        args = (batch["latents"][:, 0], batch["next_latents"][:, 0], batch["steps"][:, 0], batch["embeds"],
                batch["neg"], config.guidance_scale, step_fn)
        change = policy_step(adapter, schedule, *args).log_prob - batch["log_probs"][:, 0]
        for p, q in zip(adapter.trainable_parameters(), saved):
            p.copy_(q)
    assert (change[adv > 0] > 0).all() and (change[adv < 0] < 0).all(), change


def test_cfg_training_detaches_the_unconditional_branch(toy):
    config, adapter = toy
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    traj = rollout(adapter, PROMPTS, group_size=1, num_steps=4, step_fn=step_fn, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(2))
    schedule, step = traj.schedule, torch.tensor([1, 1])
    x, nxt = traj.latents[:, 1], traj.latents[:, 2]
    params = adapter.trainable_parameters()
    with_cfg = policy_step(adapter, schedule, x, nxt, step, traj.embeds, traj.neg_embeds, 4.5, step_fn)
    g_cfg = torch.autograd.grad(with_cfg.mean.sum(), params)
    cond_only = policy_step(adapter, schedule, x, nxt, step, traj.embeds, None, 1.0, step_fn)
    g_cond = torch.autograd.grad(cond_only.mean.sum(), params)
    v_full = adapter.predict(x, schedule.timesteps[step], traj.embeds, traj.neg_embeds, 4.5)  # no detach
    g_full = torch.autograd.grad(step_fn(v_full, x, schedule, step, prev_sample=nxt).mean.sum(), params)

    def rel(a, b):
        return (torch.cat([(p - q).flatten() for p, q in zip(a, b)]).norm()
                / torch.cat([q.flatten() for q in b]).norm()).item()

    # the mean is linear in v = u + s (c - u): with u detached, d mean / d theta = s * d mean_cond / d theta
    scaled = [4.5 * g for g in g_cond]
    assert rel(g_cfg, scaled) < 1e-4 and rel(g_full, scaled) > 1e-2


# ------------------------------------------------------------------ tier 2: tiny real pipelines
@pytest.mark.parametrize("model,guidance", [("tiny-sd3", 4.5), ("tiny-flux", 1.0)])
def test_one_update_on_tiny_pipelines(model, guidance):
    torch.manual_seed(0)
    config = Config(model=model, guidance_scale=guidance, lora_rank=4, num_steps=4, group_size=2)
    _, adapter, _, optimizer = setup(config)
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    traj = rollout(adapter, PROMPTS, group_size=2, num_steps=4, step_fn=step_fn, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(0))
    batch = _batch(traj, [0, 1, 2], torch.tensor([1.0, -1.0, 0.5, -0.5]))
    schedule = adapter.schedule(4)
    loss, info = grpo_loss(config, adapter, schedule, batch, 1, step_fn)
    loss.backward()
    assert torch.isfinite(loss) and info["ratio"] == 1
    grads = {n: p.grad for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert grads and all("lora" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    before = [p.detach().clone() for p in adapter.trainable_parameters()]
    optimizer.step()
    assert any((p != q).any() for p, q in zip(adapter.trainable_parameters(), before))


# ------------------------------------------------------------------ command line and resume
def test_help_lists_every_field_and_bad_values_stop_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text and field.metadata["help"].split()[0] in text
    for argv, field in ([["--group-size", "1"], "group_size"], [["--model", "/no/such/dir"], "model"],
                        [["--sde-window-range", "4", "2"], "sde_window_range"],
                        [["--batches-per-epoch", "3"], "batches_per_epoch"]):
        with pytest.raises(SystemExit) as bad:
            run_main(main, argv)
        err = capsys.readouterr().err.strip()
        assert bad.value.code == 2 and err.startswith(f"error: {field}:") and "\n" not in err


#: a small run for the resume and the two-process tests: the soft toy score (smooth in the pixels, so float
#: rounding cannot move it by more than rounding; no ties, so no sample is filtered), 2 prompts x 4 images
#: per epoch in one training batch, a checkpoint every epoch
SMALL = ["--reward", "toy_soft", "--guidance-scale", "1", "--eval-guidance-scale", "1",
         "--prompts-per-epoch", "2", "--batches-per-epoch", "1", "--group-size", "4", "--num-steps", "4",
         "--eval-num-steps", "4", "--eval-prompts", "2", "--eval-every", "2", "--save-every", "1", "--lora-rank", "4",
         "--learning-rate", "1e-2"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """(output folder, records) of 2 uninterrupted epochs of SMALL in this process."""
    out = tmp_path_factory.mktemp("small") / "full"
    return out, main(SMALL + ["--epochs", "2", "--out-dir", str(out)])


def test_resume_continues_exactly(two_epochs, tmp_path):
    _, full = two_epochs
    main(SMALL + ["--epochs", "1", "--out-dir", str(tmp_path / "half")])
    resumed = main(SMALL + ["--epochs", "2", "--out-dir", str(tmp_path / "half")])
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in full]
    assert strip[-1] == {k: v for k, v in resumed[-1].items() if k not in drop}
    assert strip[1]["reward_mean"] == resumed[1]["reward_mean"]
    assert read_metrics(tmp_path / "half" / "metrics.jsonl")[-1]["step"] == 2


def test_fast_rollout_shards_draw_the_one_process_noise(toy):
    """Two shards of a Fast rollout (rank 0 and 1 of 2, one prompt each) are the rows of the one-process
    rollout of both prompts: each sample gets its noise whatever the number of processes."""
    config, adapter = toy
    kwargs = dict(group_size=2, num_steps=4, window=(1, 3), step_fn=partial(flow_sde_step, noise_level=0.7),
                  guidance_scale=1.0)

    def run(prompts, shard):
        return fast_rollout(adapter, prompts, generator=torch.Generator().manual_seed(3), shard=shard, **kwargs)

    whole = run(PROMPTS, (0, 1))
    parts = [run(PROMPTS[r: r + 1], (r, 2)) for r in range(2)]
    assert torch.allclose(torch.cat([p.latents for p in parts]), whole.latents, atol=1e-5)
    assert torch.allclose(torch.cat([p.log_probs for p in parts]), whole.log_probs, atol=1e-4)


def test_two_gloo_processes_train_like_one(two_epochs, tmp_path):
    """Two gloo processes on the CPU, one prompt each, sample the rollouts of one process with the same
    global batch (same prompts, noise and rewards) and reach the same LoRA weights after their update, up to
    float rounding. The processes get the environment `torchrun --nproc_per_node 2` would give them
    (README), without torchrun's own launcher process."""
    one_dir, one = two_epochs
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "papers.flow_grpo", *SMALL, "--epochs", "1", "--out-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [0, 1]
    assert one[1]["reward_mean"] == pytest.approx(two[1]["reward_mean"], abs=1e-5)  # the same rollouts
    assert one[1]["denoiser_rows"] == two[1]["denoiser_rows"]  # counted over both processes
    w1, w2 = (load_file(d / "checkpoints" / "checkpoint-00000001" / "model.safetensors")
              for d in (one_dir, tmp_path / "two"))
    scale = max(w.abs().max() for w in w1.values())
    assert max((w1[k] - w2[k]).abs().max() for k in w1) < 1e-2 * scale


# ------------------------------------------------------------------ tier 3: the claim on the toy world
#: the claim runs (README, Claim): toy-flow, DDPO's JPEG compressibility (minus the kB of the q95 JPEG),
#: 4 epochs of 2 prompts x 8 images with one optimizer step each, 10-step rollouts (noise level 0.7, no
#: CFG); evaluation with the 40-step and the 10-step Euler ODE on 8 fixed prompts x 2 fixed noises.
#: Flow-GRPO-Fast adds --fast true.
CLAIM = ["--reward", "jpeg_compressibility", "--tasks", "single_object", "colors", "--guidance-scale", "1",
         "--eval-guidance-scale", "1", "--beta", "0", "--learning-rate", "1e-2", "--prompts-per-epoch", "2",
         "--batches-per-epoch", "1", "--eval-prompts", "8", "--eval-images-per-prompt", "2",
         "--eval-every", "100", "--save-every", "100"]
CLAIM_EPOCHS = 4  # with 0 every claim test fails (README, Claim)
#: gain of the mean eval reward (kB) to reach: 3 to 4 paired standard errors of the 16-image evaluation
#: (0.012-0.016 measured); Flow-GRPO-Fast gained 0.066-0.144 over six seeds
MARGIN = 0.05


@pytest.fixture(scope="module")
def claim_runs(tmp_path_factory):
    """(Flow-GRPO records, Flow-GRPO-Fast records), one record per epoch; record 0 is the base."""
    out = tmp_path_factory.mktemp("claim")
    claim = CLAIM + ["--epochs", str(CLAIM_EPOCHS)]
    return (main(claim + ["--out-dir", str(out / "grpo")]),
            main(claim + ["--fast", "true", "--out-dir", str(out / "fast")]))


def _gain(run: list[dict], key: str = "eval_reward") -> float:
    return run[-1][key] - run[0][key]


def test_claim_reward_rises_at_40_ode_steps(claim_runs):
    _, fast = claim_runs
    assert _gain(fast) >= MARGIN, f"eval reward {fast[0]['eval_reward']:.4f} -> {fast[-1]['eval_reward']:.4f}"


def test_claim_training_at_10_steps_carries_over_to_40_ode_steps(claim_runs):
    _, fast = claim_runs
    gain_40, gain_10 = _gain(fast), _gain(fast, "eval_reward_train_steps")
    # rollouts only ever had 10 steps; the 40-step ODE keeps at least half of the 10-step ODE's gain
    assert gain_10 >= MARGIN and gain_40 >= MARGIN and gain_40 >= 0.5 * gain_10, (gain_10, gain_40)


def test_claim_fast_gains_as_much_as_flow_grpo_with_fewer_denoiser_rows(claim_runs):
    grpo, fast = claim_runs
    rows = [sum(r["denoiser_rows"] for r in run[1:]) / max(1, len(run) - 1) for run in (grpo, fast)]
    # per epoch of 16 images: Flow-GRPO 160 rollout + 144 trained = 304 rows; Fast 164-192 (the ODE prefix
    # runs once per prompt, 2 trained steps per image)
    assert 0 < rows[1] <= 0.7 * rows[0], rows
    assert _gain(fast) >= MARGIN and _gain(fast) >= _gain(grpo), (_gain(grpo), _gain(fast))
