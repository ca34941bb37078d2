"""DDPO: Training Diffusion Models with Reinforcement Learning (Black et al., ICLR 2024; arXiv 2305.13301).

docs: generated/papers/ddpo.md
bib key: black2023training
official code: kvablack/ddpo-pytorch @ 1958463 (scripts/train.py, config/base.py, config/dgx.py,
    ddpo_pytorch/diffusers_patch/ddim_with_logprob.py, ddpo_pytorch/stat_tracking.py);
    the original JAX code is jannerm/ddpo @ f0b6ca7.

Denoising is a T-step MDP: the state is (c, t, x_t), the action is x_{t-1} ~ p_theta(x_{t-1} | x_t, c)
(one DDIM step with eta = 1, a Gaussian), and the only reward r(x_0, c) comes at the end. DDPO collects
trajectories with the current model, normalises the rewards per prompt, and takes policy-gradient steps on
the per-step Gaussian log-likelihoods:
    DDPO_SF (score function, paper Sec. 4.3): grad J = E[ sum_t grad log p_theta(x_{t-1} | x_t, c) * r ]
    DDPO_IS (importance sampling, Sec. 4.3): the same with the ratio p_theta / p_theta_old, clipped as in PPO.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from common.advantages import PerPromptStatTracker, clip_advantages
from common.config import option, parse_config, require
from common.losses import check_on_policy, ppo_clip_loss
from common.models.base import PromptEmbeds
from common.models.load import load_adapter, require_model
from common.rewards import load_reward
from common.rollout import Trajectory, rollout, step_log_prob
from common.steps import ddim_step
from common.toy.world import TASKS, sample_prompts
from common.train import (
    Checkpointer,
    MetricsLogger,
    image_grid,
    make_accelerator,
    make_optimizer,
    plot_curve,
    seed_everything,
    trainable_state_dict,
)

REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "toy_geneval", "toy_soft")


@dataclass
class Config:
    """DDPO on the toy world by default; `--model DIR --device cuda --dtype bf16` for a real SD pipeline."""

    model: str = option("toy-unet", "toy-unet, tiny-sd, tiny-sdxl or a local diffusers SD/SDXL directory")
    reward: str = option("jpeg_compressibility", "reward to maximise; official config dgx.py "
                         "compressibility()", choices=REWARDS)
    variant: str = option("is", "'is' = DDPO_IS (clipped importance sampling, official code) or 'sf' = "
                          "DDPO_SF (REINFORCE, one step per epoch; paper Sec. 4.3)", choices=("is", "sf"))
    num_epochs: int = option(10, "rounds of sampling then training; toy budget (official dgx.py: 100)")
    num_steps: int = option(4, "DDIM steps per sample; toy budget (official base.py: 50)")
    eta: float = option(1.0, "DDIM noise; 1.0 makes every step a Gaussian policy (official base.py)")
    guidance_scale: float = option(1.0, "classifier-free guidance at sampling and training; toy: 1, no CFG "
                                   "(official base.py: 5.0, which the toy learns slower with)")
    sample_batch_size: int = option(16, "samples per rollout batch per process (official dgx.py: 8)")
    num_batches_per_epoch: int = option(2, "rollout batches per epoch per process (official dgx.py: 4)")
    train_batch_size: int = option(8, "samples per training micro-batch (official dgx.py: 4 per GPU)")
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer step, each over all trained "
                                              "timesteps; toy: 4 = one step per epoch, as 32 samples are "
                                              "too few to split (official dgx.py: 2 -> 4 steps per epoch)")
    num_inner_epochs: int = option(1, "passes over each epoch's samples (official base.py)")
    timestep_fraction: float = option(1.0, "fraction of each sample's steps trained, drawn per sample "
                                      "(official base.py)")
    learning_rate: float = option(1e-2, "AdamW learning rate; toy value (official base.py: 3e-4)")
    max_grad_norm: float = option(1.0, "gradient clipping (official base.py)")
    clip_range: float = option(2e-3, "PPO clip range on the ratio; official base.py 1e-4 for SD's 4x64x64 "
                               "latents; the log-prob is a mean over entries, so the toy's 3x16x16 pixels "
                               "get 1e-4 * 16384 / 768 ~ 2e-3 for the same bound on the summed log-ratio")
    adv_clip_max: float = option(5.0, "advantages are clipped to [-5, 5] (official base.py)")
    per_prompt_stat_tracking: bool = option(True, "per-prompt reward statistics; False = batch "
                                            "normalisation (official base.py: on)")
    tracker_buffer_size: int = option(16, "rewards kept per prompt, across epochs (official dgx.py)")
    tracker_min_count: int = option(16, "fewer rewards than this in a prompt's buffer -> batch statistics "
                                    "(official dgx.py)")
    num_prompts: int = option(8, "size of the toy-world prompt pool each sample draws from (toy choice; "
                              "official: 398 ImageNet animals)")
    prompt_tasks: list[str] = option(["colors", "single_object"], "toy-world tasks of the prompt pool")
    prompt_file: str | None = option(None, "text file with one prompt per line instead of the toy pool "
                                     "(no metadata: JPEG rewards only)")
    prompt_reward_offset: float = option(0.0, "adds offset * k to the reward of pool prompt k (0 = the "
                                         "paper); gives prompts different reward scales")
    lora_rank: int = option(4, "LoRA rank on the attention projections (diffusers LoRAAttnProcessor default "
                            "used by ddpo-pytorch)")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "module names that get LoRA: "
                                     "the attention projections, as the official LoRA attention processors")
    seed: int = option(42, "random seed (official base.py)")
    device: str | None = option(None, "cuda / cpu; default: cuda when available")
    cpu_threads: int = option(1, "torch threads on a CPU run (0: torch's default); one thread is the fastest "
                              "for the toy's tiny models on a busy machine")
    dtype: str = option("fp32", "model weights dtype (LoRA weights stay fp32)", choices=("fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    out_dir: str = option("runs/ddpo", "metrics, figures and checkpoints")
    save_every: int = option(0, "checkpoint every N epochs for exact resume (0: never)")
    eval_samples: int = option(16, "fixed-noise samples (cycling through the prompt pool) scored and drawn "
                               "before and after training (0: none)")

    def __post_init__(self):
        require_model(self.model)
        require(self.reward in REWARDS, "reward", f"unknown reward {self.reward!r}; choose from {REWARDS}")
        require(self.variant in ("is", "sf"), "variant", f"'is' or 'sf', got {self.variant!r}")
        for name in ("num_epochs", "num_steps", "sample_batch_size", "num_batches_per_epoch",
                     "train_batch_size", "gradient_accumulation_steps", "num_inner_epochs", "num_prompts",
                     "tracker_buffer_size", "tracker_min_count"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(0 < self.eta <= 1, "eta", f"must lie in (0, 1] (eta 0 has no policy), got {self.eta}")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction",
                f"must lie in (0, 1], got {self.timestep_fraction}")
        require(int(self.num_steps * self.timestep_fraction) >= 1, "timestep_fraction", "trains no step")
        require(self.clip_range > 0 and self.adv_clip_max > 0, "clip_range", "clip ranges must be > 0")
        require(self.sample_batch_size % self.train_batch_size == 0, "train_batch_size",
                f"must divide sample_batch_size={self.sample_batch_size} (official train.py assertion)")
        samples = self.sample_batch_size * self.num_batches_per_epoch
        require(samples % (self.train_batch_size * self.gradient_accumulation_steps) == 0,
                "gradient_accumulation_steps", f"train_batch_size * accumulation must divide the {samples} "
                "samples of an epoch (official train.py assertion)")
        require(self.variant == "is" or self.num_inner_epochs == 1, "num_inner_epochs",
                "DDPO_SF takes one on-policy step per epoch, so it needs num_inner_epochs = 1")
        require(all(t in TASKS for t in self.prompt_tasks), "prompt_tasks", f"choose from {TASKS}")
        require(self.prompt_file is None or Path(self.prompt_file).is_file(), "prompt_file",
                f"{self.prompt_file!r} is not a file")
        require(self.prompt_file is None or self.reward.startswith("jpeg"), "reward",
                "toy rewards need toy-world metadata; use the toy prompt pool or a JPEG reward")
        require(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")


# --8<-- [start:policy_step]
def ddpo_step(model_output: Tensor, x: Tensor, schedule, i, *, eta: float = 1.0, **kwargs):
    """The DDPO policy: one DDIM step with noise eta, its Gaussian log-prob averaged over pixels.

    x_{t-1} ~ N(mu_theta(x_t, t), s_t^2 I), with x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t),
    s_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)) and
    mu = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s_t^2) eps; the previous timestep is clamped at 0
    (ddim_with_logprob.py), hence convention "ddpo".
    """
    return ddim_step(model_output, x, schedule, i, eta=eta, convention="ddpo", **kwargs)
# --8<-- [end:policy_step]


# --8<-- [start:advantages]
def compute_advantages(prompts: Sequence[str], rewards: Tensor,
                       tracker: PerPromptStatTracker | None) -> Tensor:
    """Per-prompt normalised rewards (tracker) or, without a tracker, whole-batch normalisation.

    tracker: A = (r - mean_p) / (std_p + 1e-6) over prompt p's last 16 rewards, kept across epochs.
    """
    if tracker is not None:
        return tracker.update(prompts, rewards)
    # A = (r - mean(r)) / (std(r) + 1e-8), std with ddof 0 (np.std in train.py)
    return (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-8)
# --8<-- [end:advantages]


# --8<-- [start:timesteps]
def sample_train_timesteps(batch: int, num_steps: int, fraction: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """(batch, K) step indices, K = int(num_steps * fraction): each sample's own random order of the steps,
    cut to its first K (train.py shuffles the time axis independently per sample)."""
    k = int(num_steps * fraction)
    return torch.stack([torch.randperm(num_steps, generator=generator)[:k] for _ in range(batch)])
# --8<-- [end:timesteps]


# --8<-- [start:losses]
def ddpo_is_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """DDPO_IS: importance-sampled policy gradient with PPO's clipped ratio.

    rho = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c);  A <- clip(A, -5, 5)
    L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    Inside the trust region its gradient is DDPO_IS's (Sec. 4.3): E[rho grad log p_theta * A].
    """
    return ppo_clip_loss(log_prob, old_log_prob, clip_advantages(advantages, adv_clip_max), clip_range)


def ddpo_sf_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """DDPO_SF: the score-function (REINFORCE) estimator, valid only on-policy (one step per rollout).

    L = -mean A * log p_theta(x_{t-1} | x_t, c),  so  -grad L = E[grad log p_theta * A]  (DDPO_SF, Sec. 4.3)
    old_log_prob only feeds the diagnostics, which must read ratio 1 and clipfrac 0.
    """
    adv = clip_advantages(advantages, adv_clip_max)
    loss = -(adv * log_prob).mean()
    with torch.no_grad():
        _, info = ppo_clip_loss(log_prob, old_log_prob, adv, clip_range)
    return loss, info
# --8<-- [end:losses]


def concat_trajectories(trajs: Sequence[Trajectory]) -> Trajectory:
    """The rollout batches of one epoch as one Trajectory (same grid, CFG and numerics)."""
    first = trajs[0]
    return dataclasses.replace(
        first,
        prompts=[p for t in trajs for p in t.prompts],
        embeds=PromptEmbeds.cat([t.embeds for t in trajs]),
        neg_embeds=None if first.neg_embeds is None else PromptEmbeds.cat([t.neg_embeds for t in trajs]),
        latents=torch.cat([t.latents for t in trajs]),
        log_probs=torch.cat([t.log_probs for t in trajs]),
        images=None if first.images is None else torch.cat([t.images for t in trajs]),
    )


def _prompt_pool(config: Config) -> list[tuple[str, dict | None]]:
    if config.prompt_file is not None:
        lines = [s.strip() for s in Path(config.prompt_file).read_text().splitlines() if s.strip()]
        return [(p, None) for p in lines]
    pool = sample_prompts(config.num_prompts, config.prompt_tasks, torch.Generator().manual_seed(config.seed))
    return list(dict(pool).items())  # distinct captions, in order


def train(config: Config) -> dict:
    """Run DDPO; returns per-epoch mean rewards, the paired before/after evaluation rewards and the time."""
    start_time = time.time()
    accelerator = make_accelerator(cpu=config.device == "cpu" if config.device else None)
    seed_everything(config.seed + accelerator.process_index)
    device = torch.device(config.device) if config.device else accelerator.device
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    dtype = torch.bfloat16 if config.dtype == "bf16" else None
    adapter = load_adapter(config.model, dtype=dtype, device=None if device.type == "cpu" else device)
    adapter.add_lora(rank=config.lora_rank, target_modules=config.lora_targets)
    params = adapter.trainable_parameters()
    for p in params:  # LoRA weights in fp32 even on a bf16 base
        p.data = p.data.float()
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, lr=config.learning_rate)
    reward_fn = load_reward(config.reward)
    pool = _prompt_pool(config)
    offsets = {p: config.prompt_reward_offset * k for k, (p, _) in enumerate(pool)}
    tracker = (PerPromptStatTracker("ddpo", buffer_size=config.tracker_buffer_size,
                                    min_count=config.tracker_min_count)
               if config.per_prompt_stat_tracking else None)
    step_fn = functools.partial(ddpo_step, eta=config.eta)
    loss_fn = ddpo_is_loss if config.variant == "is" else ddpo_sf_loss
    num_train_t = int(config.num_steps * config.timestep_fraction)
    samples_per_epoch = config.sample_batch_size * config.num_batches_per_epoch
    # accumulation counts micro-batches x trained timesteps (train.py); SF: the whole epoch is one step
    micro_per_update = num_train_t * (config.gradient_accumulation_steps if config.variant == "is"
                                      else samples_per_epoch // config.train_batch_size)

    out = Path(config.out_dir)
    gen = torch.Generator(device=device).manual_seed(config.seed + accelerator.process_index)
    cpu_gen = torch.Generator().manual_seed(config.seed + 1000 + accelerator.process_index)
    log = MetricsLogger(out / "metrics.jsonl", total=config.num_epochs, desc="ddpo epochs",
                        disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=max(config.save_every, 1), accelerator=accelerator)
    named = trainable_state_dict(adapter.denoiser)
    extra: dict = {}
    first_epoch = 0
    if config.save_every:  # resume from the newest checkpoint, if any
        first_epoch = ckpt.load_latest(model_params=named, optimizer=optimizer, extra_state=extra,
                                       generators={"rollout": gen, "train": cpu_gen}, metrics=log) or 0
        if tracker is not None and "tracker" in extra:
            tracker.stats = {p: deque(v, maxlen=tracker.buffer_size) for p, v in extra["tracker"].items()}

    if first_epoch == 0:
        log.truncate(0)  # a fresh run starts a fresh metrics file
    eval_set = [pool[k % len(pool)] for k in range(config.eval_samples)]
    before = evaluate(adapter, eval_set, reward_fn, config) if eval_set and first_epoch == 0 else None
    history = []
    for epoch in range(first_epoch, config.num_epochs):
        # ---- sampling: rollouts with the current policy, rewards, advantages ----
        trajs, rewards, raw = [], [], []
        for _ in range(config.num_batches_per_epoch):
            picks = torch.randint(len(pool), (config.sample_batch_size,), generator=cpu_gen).tolist()
            prompts, meta = [pool[k][0] for k in picks], [pool[k][1] for k in picks]
            traj = rollout(adapter, prompts, num_steps=config.num_steps, step_fn=step_fn,
                           guidance_scale=config.guidance_scale, generator=gen)
            r, _ = reward_fn(traj.images, prompts, None if meta[0] is None else meta)
            raw.append(r.float())
            rewards.append(r.float() + torch.tensor([offsets.get(p, 0.0) for p in prompts], device=r.device))
            trajs.append(traj)
        traj, rewards, raw = concat_trajectories(trajs), torch.cat(rewards), torch.cat(raw)
        all_rewards = accelerator.gather(rewards)
        all_prompts = _gather_strings(accelerator, traj.prompts)
        advantages = compute_advantages(all_prompts, all_rewards.cpu(), tracker)
        advantages = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index].to(device)

        # ---- training: shuffled samples, per-sample shuffled timesteps, gradient accumulation ----
        info: dict[str, list[Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        micro = 0
        for inner in range(config.num_inner_epochs):
            order = torch.randperm(samples_per_epoch, generator=cpu_gen).to(device)
            steps = sample_train_timesteps(samples_per_epoch, config.num_steps, config.timestep_fraction,
                                           cpu_gen).to(device)
            for b in range(0, samples_per_epoch, config.train_batch_size):
                idx = order[b:b + config.train_batch_size]
                for j in range(num_train_t):
                    i = steps[idx, j]
                    out_j = step_log_prob(adapter, traj, i, step_fn, index=idx)
                    old = traj.log_probs[idx, i]
                    if inner == 0 and micro < micro_per_update and accelerator.num_processes == 1 \
                            and config.train_batch_size == config.sample_batch_size:
                        check_on_policy(out_j.log_prob, old)  # nothing has been updated yet: ratio == 1
                    loss, step_info = loss_fn(out_j.log_prob, old, advantages[idx], config.clip_range,
                                              config.adv_clip_max)
                    # accelerate divides by the accumulation count the same way
                    (loss / micro_per_update).backward()
                    micro += 1
                    info["loss"].append(loss.detach())
                    for k, v in step_info.items():
                        info[k].append(v)
                    if micro % micro_per_update == 0:
                        _sync_gradients(accelerator, params)
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)

        mean_reward = accelerator.gather(raw).mean()
        record = {"reward": mean_reward, **{k: torch.stack(v).mean() for k, v in info.items()},
                  "reward_std": accelerator.gather(raw).std(correction=0)}
        if config.prompt_reward_offset:
            record["reward_with_offset"] = all_rewards.mean()
        log.log(epoch + 1, record)
        history.append(float(mean_reward))
        if config.save_every and ckpt.due(epoch + 1):
            extra = {"tracker": {p: list(v) for p, v in (tracker.stats if tracker else {}).items()}}
            ckpt.save(epoch + 1, model_params=named, optimizer=optimizer, extra_state=extra,
                      generators={"rollout": gen, "train": cpu_gen})
    log.close()

    summary = {"rewards": history, "train_time_s": time.time() - start_time}
    if before is not None:
        after = evaluate(adapter, eval_set, reward_fn, config)
        summary |= {"eval_before": before[1].tolist(), "eval_after": after[1].tolist()}
        gain, se = paired_gain(summary["eval_before"], summary["eval_after"])
        summary |= {"eval_gain": gain, "eval_gain_se": se}
        if accelerator.is_main_process:
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            n = min(8, len(eval_set))
            image_grid(torch.cat([before[0][:n], after[0][:n]]), nrow=n, out_png=out / "before_after.png",
                       labels=["before", "after"])
    if accelerator.is_main_process and history:
        plot_curve(out / "metrics.jsonl", "reward", out / "reward_curve.png", title=f"DDPO ({config.reward})")
    return summary


def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of the paired differences after_j - before_j (same noise j) and its standard error (ddof 1)."""
    d = torch.tensor(after) - torch.tensor(before)
    return d.mean().item(), (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0


@torch.no_grad()
def evaluate(adapter, eval_set: list[tuple[str, dict | None]], reward_fn,
             config: Config) -> tuple[Tensor, Tensor]:
    """Images and rewards (no offsets) of fixed-noise samples: the same noise before and after training,
    so the before/after difference is paired."""
    gen = torch.Generator(device=adapter.device).manual_seed(config.seed + 12345)
    prompts, metas = [p for p, _ in eval_set], [m for _, m in eval_set]
    traj = rollout(adapter, prompts, num_steps=config.num_steps,
                   step_fn=functools.partial(ddpo_step, eta=config.eta),
                   guidance_scale=config.guidance_scale, generator=gen)
    scores, _ = reward_fn(traj.images, prompts, None if metas[0] is None else metas)
    return traj.images.float().cpu(), scores.float().cpu()


def _gather_strings(accelerator, strings: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return list(strings)
    from accelerate.utils import gather_object

    return list(gather_object(list(strings)))


def _sync_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average gradients over processes (what DDP does), once per optimizer step."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")


def main(argv: Sequence[str] | None = None) -> dict:
    return train(parse_config(Config, argv))
