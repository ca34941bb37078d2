"""DRaFT: Directly Fine-Tuning Diffusion Models on Differentiable Rewards (Clark, Vicol, Swersky, Fleet; ICLR 2024).

docs: generated/papers/draft.md
bib key: clark2023directly
official code: none released; this follows the paper (arXiv 2309.17400, Sec. 3-4) and the reference notes
    on it. Values marked [recall] come from the paper as remembered, not from code, and are worth checking.

The sampler is a differentiable function of the model weights, so a differentiable reward of the final
image can be maximised by plain backpropagation through every denoising step:
    DRaFT      L = -r(x_0, c), x_0 = S_theta(x_T, c), gradient through all T steps
    DRaFT-K    the same with x_K <- sg(x_K): gradient through the last K steps only (K = 1 works best)
    DRaFT-LV   K = 1 with less variance: sample x_0 without gradient, re-noise it n times to the noise
               level of the last step, x~^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps^i, and average the
               reward of one graded denoising step from each copy.
Memory stays bounded by LoRA and by checkpointing every denoiser call (activations are recomputed in
the backward pass instead of stored for all T steps).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from common.config import option, parse_config, require
from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule
from common.models.load import load_adapter, require_model
from common.rewards import load_reward
from common.steps import ddim_step, euler_step
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

#: differentiable rewards this script can train on (toy_soft needs toy-world prompts and metadata)
REWARDS = ("toy_soft", "clip_score", "pickscore")
VARIANTS = ("full", "k", "lv")


@dataclass
class Config:
    """DRaFT on the toy world by default; `--model DIR --device cuda --dtype bf16` for a real pipeline."""

    variant: str = option("lv", "full = DRaFT (all steps), k = DRaFT-K, lv = DRaFT-LV (paper Sec. 3)",
                          choices=VARIANTS)
    k: int = option(1, "DRaFT-K: final steps that carry gradient; K = 1 was best in the paper (Sec. 4)")
    lv_copies: int = option(2, "DRaFT-LV: re-noised copies n of each final sample (paper: n = 2 [recall])")
    model: str = option("toy-unet", "toy-unet, toy-flow, tiny-sd, tiny-sd3 or a local diffusers directory")
    reward: str = option("toy_soft", "differentiable reward; the paper uses aesthetic, HPSv2, PickScore",
                         choices=REWARDS)
    reward_path: str | None = option(None, "local weights directory of clip_score / pickscore (model and "
                                     "processor files together)")
    num_steps: int = option(10, "sampling steps; toy budget (paper: 50 DDIM steps on SD 1.4 [recall])")
    guidance_scale: float = option(4.5, "CFG scale in training and sampling; toy base default "
                                   "(common/toy/train_bases.py; paper: 7.5 [recall])")
    timestep_spacing: str = option("trailing", "grid of epsilon models: trailing ends with a step from t = T/N to 0 "
                                   "like the paper's sampler; diffusers' SD default leading ends at t = 1, where "
                                   "the last step barely changes x (see README)", choices=("trailing", "leading"))
    eta: float = option(1.0, "DDIM noise of epsilon models; at 1 (ancestral sampling) DRaFT-LV's re-noised copies "
                        "follow the sampler's own x_1 given x_0 (see README); flow models use the Euler ODE")
    tasks: list[str] = option(list(TASKS), "toy-world tasks the training prompts are drawn from")
    steps: int = option(40, "optimizer updates (toy budget)")
    batch_size: int = option(8, "prompts per update per process")
    learning_rate: float = option(3e-3, "AdamW learning rate of the LoRA weights (toy value)")
    max_grad_norm: float = option(1.0, "gradient clipping")
    lora_rank: int = option(4, "LoRA rank on the attention projections")
    gradient_checkpointing: bool = option(True, "checkpoint every denoiser call (torch.utils.checkpoint, "
                                          "non-reentrant), as the paper does to fit full backprop in memory")
    variance_draws: int = option(16, "gradient draws (4 prompts each) for the DRaFT-1 vs DRaFT-LV variance "
                                 "check before training (0: skip)")
    variance_tasks: list[str] = option(["colors"], "toy-world tasks of the variance check's prompts; the claim "
                                       "is measured on colors (README: on mixed tasks 64 draws do not settle it)")
    eval_prompts: int = option(48, "held-out prompts scored with fixed noise before and after training")
    seed: int = option(0, "random seed")
    device: str | None = option(None, "cuda / cpu; default: accelerate's device")
    dtype: str = option("fp32", "model weights dtype (LoRA weights stay fp32)", choices=("fp32", "bf16"))
    out_dir: str = option("runs/draft", "metrics, figures and checkpoints")
    save_every: int = option(0, "checkpoint every N updates for exact resume (0: never)")

    def __post_init__(self):
        require_model(self.model)
        require(self.variant in VARIANTS, "variant", f"choose from {VARIANTS}, got {self.variant!r}")
        require(self.reward in REWARDS, "reward", f"unknown reward {self.reward!r}; choose from {REWARDS}")
        require(self.reward == "toy_soft" or self.reward_path is not None, "reward_path",
                f"the {self.reward} reward needs a local weights directory")
        for name in ("num_steps", "steps", "batch_size", "lv_copies", "lora_rank", "k", "eval_prompts"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.k <= self.num_steps, "k", f"must be <= num_steps={self.num_steps}, got {self.k}")
        require(0 <= self.eta <= 1, "eta", f"must lie in [0, 1], got {self.eta}")
        for name in ("tasks", "variance_tasks"):
            require(bool(getattr(self, name)) and all(t in TASKS for t in getattr(self, name)), name,
                    f"choose from {TASKS}")
        require(self.variance_draws == 0 or self.variance_draws >= 2, "variance_draws", "0 or at least 2")


# --8<-- [start:sampler]
def denoise(adapter: DiffusionAdapter, x: Tensor, t: Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None,
            guidance_scale: float, checkpointed: bool) -> Tensor:
    """One (CFG) denoiser call; with `checkpointed` its activations are recomputed in the backward pass."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(adapter.predict, x, t, cond, uncond, guidance_scale, use_reentrant=False)
    return adapter.predict(x, t, cond, uncond, guidance_scale)


def sampler_schedule(adapter: DiffusionAdapter, config: Config) -> Schedule:
    """The sampling grid; epsilon models can use DDIM's trailing spacing (flow grids already end at sigma_N-1)."""
    if adapter.prediction == "flow" or config.timestep_spacing == "leading":
        return adapter.schedule(config.num_steps)
    ddim = DDIMScheduler.from_config(adapter.scheduler.config, timestep_spacing=config.timestep_spacing)
    ddim.set_timesteps(config.num_steps)
    # t_prev = t - T / N, as DDIMScheduler.step computes it; the last step lands on final_alpha_cumprod
    prev = ddim.timesteps - ddim.config.num_train_timesteps // config.num_steps
    return Schedule(prediction="epsilon", timesteps=ddim.timesteps, alphas_cumprod=ddim.alphas_cumprod.float(),
                    prev_timesteps=prev, final_alpha_cumprod=float(ddim.final_alpha_cumprod)).to(adapter.device)


def sampler_step(adapter: DiffusionAdapter, eta: float):
    """The sampler's transition: DDIM-eta for epsilon models, the Euler ODE for flow models."""
    if adapter.prediction == "flow":
        return euler_step
    return functools.partial(ddim_step, eta=eta, convention="dpok")


def run_steps(adapter: DiffusionAdapter, x: Tensor, schedule: Schedule, start: int, stop: int,
              cond: PromptEmbeds, uncond: PromptEmbeds | None, config: Config,
              generator: torch.Generator | None = None) -> Tensor:
    """Steps start..stop-1 of the sampler from state x; differentiable wherever grad mode is on."""
    step = sampler_step(adapter, config.eta)
    for i in range(start, stop):
        out = denoise(adapter, x, schedule.timesteps[i], cond, uncond, config.guidance_scale,
                      config.gradient_checkpointing)
        x = step(out, x, schedule, i, generator=generator).prev_sample
    return x


def renoise(x0: Tensor, schedule: Schedule, i: int, noise: Tensor) -> Tensor:
    """The forward process to the noise level of step i (DRaFT-LV's x~)."""
    if schedule.prediction == "flow":
        sigma = schedule.sigmas[i].float()
        # x~ = (1 - sigma_i) x_0 + sigma_i eps
        return ((1 - sigma) * x0.float() + sigma * noise).to(x0.dtype)
    a = schedule.alphas_cumprod[schedule.timesteps[i].long()].float()
    # x~ = sqrt(a_i) x_0 + sqrt(1 - a_i) eps
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise).to(x0.dtype)
# --8<-- [end:sampler]


# --8<-- [start:losses]
def draft_k_loss(adapter: DiffusionAdapter, reward_fn, noise: Tensor, cond: PromptEmbeds,
                 uncond: PromptEmbeds | None, prompts: Sequence[str], metadata, k: int, config: Config,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DRaFT-K (k = num_steps is full DRaFT): L = -mean r(x_0), gradient through the last k steps only."""
    _check_batch(prompts, noise)
    schedule = sampler_schedule(adapter, config)
    n = schedule.num_steps
    with torch.no_grad():
        x = run_steps(adapter, noise, schedule, 0, n - k, cond, uncond, config, generator)
    # x_K <- sg(x_K): nothing before the last k steps is differentiated
    x = run_steps(adapter, x.detach(), schedule, n - k, n, cond, uncond, config, generator)
    rewards, _ = reward_fn(adapter.decode(x), list(prompts), metadata)
    # L = -r(x_0, c)
    return -rewards.mean(), rewards.detach()


def draft_lv_loss(adapter: DiffusionAdapter, reward_fn, x0: Tensor, cond: PromptEmbeds,
                  uncond: PromptEmbeds | None, prompts: Sequence[str], metadata, copies: int, config: Config,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DRaFT-LV from final samples x0 (drawn without gradient): n re-noised copies, one graded step each.

    L_LV = -(1/n) sum_i r(x_0^i),  x_0^i = step_theta(x~^i),  x~^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps^i
    The n copies of the batch run as one batch.
    """
    _check_batch(prompts, x0)
    schedule = sampler_schedule(adapter, config)
    last = schedule.num_steps - 1
    x0 = x0.detach().repeat(copies, *([1] * (x0.ndim - 1)))
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    x_tilde = renoise(x0, schedule, last, eps)
    rep = torch.arange(len(cond), device=x0.device).repeat(copies)
    x = run_steps(adapter, x_tilde, schedule, last, last + 1, cond.index(rep),
                  None if uncond is None else uncond.index(rep), config, generator)
    meta = None if metadata is None else list(metadata) * copies
    rewards, _ = reward_fn(adapter.decode(x), list(prompts) * copies, meta)
    return -rewards.mean(), rewards.detach().view(copies, -1).mean(0)
# --8<-- [end:losses]


# --8<-- [start:variance]
def gradient_estimates(adapter: DiffusionAdapter, reward_fn, prompts: Sequence[str], metadata, draws: int,
                       config: Config, seed: int = 0) -> dict[str, Tensor]:
    """(draws, D) flattened LoRA gradients of DRaFT-1 and DRaFT-LV at the current weights.

    Each draw samples fresh initial noise; both estimators share that draw's no-grad chain (x_1 and x_0),
    so they differ only in how the last step is graded.
    """
    params = adapter.trainable_parameters()
    schedule = sampler_schedule(adapter, config)
    n = schedule.num_steps
    cond, uncond = _embeds(adapter, prompts, config)
    gen = torch.Generator(device=adapter.device).manual_seed(seed)
    grads: dict[str, list[Tensor]] = {"draft_1": [], "draft_lv": []}
    for _ in range(draws):
        noise = torch.randn(len(prompts), *adapter.latent_shape, generator=gen, device=adapter.device)
        with torch.no_grad():
            x1 = run_steps(adapter, noise.to(adapter.dtype), schedule, 0, n - 1, cond, uncond, config, gen)
            x0 = run_steps(adapter, x1, schedule, n - 1, n, cond, uncond, config, gen)
        for name in grads:
            if name == "draft_1":
                x = run_steps(adapter, x1, schedule, n - 1, n, cond, uncond, config, gen)
                loss = -reward_fn(adapter.decode(x), list(prompts), metadata)[0].mean()
            else:
                loss, _ = draft_lv_loss(adapter, reward_fn, x0, cond, uncond, prompts, metadata,
                                        config.lv_copies, config, gen)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads[name].append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten().float()
                                          for gi, p in zip(g, params)]))
    return {k: torch.stack(v) for k, v in grads.items()}


def total_variance(g: Tensor) -> Tensor:
    """Trace of the covariance of gradient draws g (draws, D): sum_d Var(g_d), unbiased."""
    return g.var(dim=0, correction=1).sum()
# --8<-- [end:variance]


def _check_batch(prompts: Sequence[str], x: Tensor) -> None:
    if isinstance(prompts, str) or len(prompts) != x.shape[0]:
        n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} items"
        raise ValueError(f"prompts: got {n} for a batch of {x.shape[0]} states (one prompt per sample)")


def _embeds(adapter: DiffusionAdapter, prompts: Sequence[str], config: Config):
    cond = adapter.encode_prompts(list(prompts))
    uncond = adapter.encode_prompts([""]).index(torch.zeros(len(prompts), dtype=torch.long, device=adapter.device)) \
        if config.guidance_scale != 1.0 else None
    return cond, uncond


def _reward(config: Config):
    if config.reward == "toy_soft":
        return load_reward("toy_soft")
    key = {"clip_score": "clip_dir", "pickscore": "model_dir"}[config.reward]
    reward = load_reward(config.reward, **{key: config.reward_path})
    return reward.requires_grad_(False)


@torch.no_grad()
def evaluate(adapter: DiffusionAdapter, reward_fn, prompts, metadata, config: Config) -> tuple[Tensor, Tensor]:
    """Images and rewards of the full sampler from fixed noise (paired before/after comparison)."""
    gen = torch.Generator(device=adapter.device).manual_seed(config.seed + 12345)
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=gen, device=adapter.device)
    cond, uncond = _embeds(adapter, prompts, config)
    schedule = sampler_schedule(adapter, config)
    x = run_steps(adapter, noise.to(adapter.dtype), schedule, 0, schedule.num_steps, cond, uncond, config, gen)
    images = adapter.decode(x)
    return images.float().cpu(), reward_fn(images, list(prompts), metadata)[0].float().cpu()


def train(config: Config) -> dict:
    """Fine-tune LoRA weights with DRaFT / DRaFT-K / DRaFT-LV; returns a summary of the run."""
    start_time = time.time()
    accelerator = make_accelerator(cpu=config.device == "cpu" if config.device else None)
    seed_everything(config.seed + accelerator.process_index)
    device = torch.device(config.device) if config.device else accelerator.device
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None, device=device)
    adapter.add_lora(rank=config.lora_rank)
    params = adapter.trainable_parameters()
    for p in params:  # LoRA weights in fp32 even on a bf16 base
        p.data = p.data.float()
    optimizer = make_optimizer(params, lr=config.learning_rate)
    reward_fn = _reward(config)
    if isinstance(reward_fn, torch.nn.Module):
        reward_fn.to(device)
    toy = config.reward == "toy_soft"
    data_gen = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1 + accelerator.process_index)
    eval_set = sample_prompts(config.eval_prompts, config.tasks, torch.Generator().manual_seed(10_000 + config.seed))
    eval_prompts, eval_meta = [p for p, _ in eval_set], [m for _, m in eval_set] if toy else None

    out = Path(config.out_dir)
    log = MetricsLogger(out / "metrics.jsonl", total=config.steps, desc=f"draft-{config.variant}",
                        disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=max(config.save_every, 1), accelerator=accelerator)
    named = trainable_state_dict(adapter.denoiser)
    first = 0
    if config.save_every:
        first = ckpt.load_latest(model_params=named, optimizer=optimizer,
                                 generators={"data": data_gen, "noise": gen}, metrics=log) or 0
    summary: dict = {}
    if first == 0 and config.variance_draws:
        pm = sample_prompts(4, config.variance_tasks, torch.Generator().manual_seed(777))
        g = gradient_estimates(adapter, reward_fn, [p for p, _ in pm], [m for _, m in pm] if toy else None,
                               config.variance_draws, config, seed=config.seed)
        summary["grad_variance"] = {k: float(total_variance(v)) for k, v in g.items()}
    before = evaluate(adapter, reward_fn, eval_prompts, eval_meta, config) if first == 0 else None

    for step in range(first, config.steps):
        pm = sample_prompts(config.batch_size, config.tasks, data_gen)
        prompts, meta = [p for p, _ in pm], ([m for _, m in pm] if toy else None)
        cond, uncond = _embeds(adapter, prompts, config)
        noise = torch.randn(len(prompts), *adapter.latent_shape, generator=gen, device=device).to(adapter.dtype)
        if config.variant == "lv":
            with torch.no_grad():
                schedule = sampler_schedule(adapter, config)
                x0 = run_steps(adapter, noise, schedule, 0, schedule.num_steps, cond, uncond, config, gen)
            loss, rewards = draft_lv_loss(adapter, reward_fn, x0, cond, uncond, prompts, meta,
                                          config.lv_copies, config, gen)
        else:
            k = config.num_steps if config.variant == "full" else config.k
            loss, rewards = draft_k_loss(adapter, reward_fn, noise, cond, uncond, prompts, meta, k, config, gen)
        loss.backward()
        _sync_gradients(accelerator, params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(step + 1, reward=accelerator.gather(rewards).mean(), loss=loss.detach(), grad_norm=grad_norm)
        if config.save_every and ckpt.due(step + 1):
            ckpt.save(step + 1, model_params=named, optimizer=optimizer, generators={"data": data_gen, "noise": gen})
    log.close()

    summary["train_time_s"] = time.time() - start_time
    if before is not None:
        after = evaluate(adapter, reward_fn, eval_prompts, eval_meta, config)
        summary |= {"eval_before": float(before[1].mean()), "eval_after": float(after[1].mean())}
        if accelerator.is_main_process:  # one row before, one row after (fewer than 8 prompts: shorter rows)
            n = min(8, len(eval_prompts))
            image_grid(torch.cat([before[0][:n], after[0][:n]]), nrow=n, out_png=out / "before_after.png",
                       labels=["before", "after"])
    if accelerator.is_main_process and config.steps > first:
        plot_curve(out / "metrics.jsonl", "reward", out / "reward_curve.png", title=f"DRaFT-{config.variant}")
    return summary


def _sync_gradients(accelerator, params) -> None:
    """Average gradients over processes (what DDP does); a no-op on one process."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")


def main(argv: Sequence[str] | None = None) -> dict:
    summary = train(parse_config(Config, argv))
    print({k: v for k, v in summary.items()})
    return summary
