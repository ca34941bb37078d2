"""DanceGRPO: Unleashing GRPO on Visual Generation (Xue et al., 2025), for flow and epsilon models.

Docs page: generated/papers/dance_grpo.md. Bib key: xue2025dancegrpo (survey.bib).
Official code: github.com/XueZeyue/DanceGRPO at 15cc71d: fastvideo/train_grpo_flux.py (the FLUX recipe
followed here), train_grpo_flux_lora.py (LoRA), train_grpo_hunyuan.py (best-of-N selection),
train_grpo_sd.py with fastvideo/config_sd/ (Stable Diffusion, DDIM), scripts/finetune/*.sh (hyperparameters).

The recipe: draw ONE initial noise per prompt and sample a group of G images from it with a stochastic
sampler whose every step is a Gaussian policy (flow models: DanceGRPO's SDE with a constant diffusion
coefficient eta on the FastVideo sigma grid; SD: DDIM with eta = 1). Score each image, normalise the
rewards inside its group, and update with the PPO-clipped surrogate on a random 60% of each sample's
denoising steps (never the last one). Best-of-N (the HunyuanVideo recipe) trains only the best_of_n / 2
highest- and lowest-rewarded samples of each group, which cuts the backward passes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from common.advantages import clip_advantages, group_advantages
from common.config import option, parse_config, require
from common.losses import ppo_clip_loss
from common.models.base import DiffusionAdapter, Schedule
from common.models.load import load_adapter, require_model
from common.rewards import REWARD_NAMES, load_reward
from common.rollout import Trajectory, rollout, step_log_prob
from common.steps import dance_sde_step, ddim_step, ode_step
from common.toy.evaluator import geneval_scores
from common.toy.world import TASKS, sample_prompts
from common.train import (
    Checkpointer,
    MetricsLogger,
    image_grid,
    make_accelerator,
    make_optimizer,
    plot_curve,
    read_metrics,
    seed_everything,
    trainable_state_dict,
)

#: per-family defaults of the fields left at None: flow = FLUX script finetune_flux_grpo.sh
#: (--sampling_steps 16 --eta 0.3 --cfg 0.0 --timestep_fraction 0.6); epsilon = SD config
#: config_sd/base.py (sample.num_steps 50, sample.eta 1.0, guidance_scale 5.0, timestep_fraction 1.0)
FAMILY_DEFAULTS = {
    "flow": {"num_steps": 16, "eta": 0.3, "guidance_scale": 1.0, "timestep_fraction": 0.6},
    "epsilon": {"num_steps": 50, "eta": 1.0, "guidance_scale": 5.0, "timestep_fraction": 1.0},
}
#: LoRA targets of the official train_grpo_flux_lora.py (peft matches them as name suffixes)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: where `--reward-path` goes for the rewards that load weights from a local directory (or a URL)
REWARD_PATH_ARG = {"pickscore": "model_dir", "clip_score": "clip_dir", "aesthetic": "clip_dir", "http": "url"}


@dataclass
class Config:
    """DanceGRPO. Fields marked "toy" are scaled down so that the main job runs on a CPU in minutes."""

    # ---- model, reward, run ----
    model: str = option("toy-flow", "toy-flow, toy-unet, tiny-flux, tiny-sd, tiny-sd3 or a local diffusers "
                        "directory (FLUX, SD3, SD1.x/SDXL)")
    reward: str = option("jpeg_compressibility", "reward (common.rewards.load_reward); official: HPS-v2.1, CLIP "
                         "score, VideoAlign, PickScore, and jpeg_compressibility (config_sd/base.py reward_fn)",
                         choices=REWARD_NAMES)
    reward_path: str | None = option(None, "local weights directory (pickscore, clip_score, aesthetic) or URL (http)")
    partial_credit: bool = option(True, "with --reward toy_geneval: score the fraction of the prompt's clauses "
                                  "that hold instead of all-or-nothing; toy")
    prompt_file: str | None = option(None, "prompts, one per line; None draws toy-world scenes")
    tasks: list[str] = option(list(TASKS), "toy-world tasks the prompts are drawn from (GenEval's six)")
    out_dir: str = option("runs/dance_grpo", "metrics.jsonl, figures and checkpoints go here")
    seed: int = option(42, "random seed; official scripts --seed 42")
    device: str = option("cpu", "cpu or cuda (each accelerate process takes its own GPU)")
    cpu_threads: int = option(1, "torch threads on a CPU run (0: torch's default); the toy models are tiny, and "
                              "one thread is the fastest on a busy machine")
    dtype: str = option("fp32", "denoiser weights: fp32 or bf16 (official: bf16); LoRA weights stay fp32",
                        choices=("fp32", "bf16"))
    lora_rank: int = option(8, "LoRA rank; official LoRA script 128, toy 8 (0 = train every weight, as the "
                            "official full fine-tuning scripts do)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward; official scripts on")
    # ---- sampling ----
    num_steps: int | None = option(None, "denoising steps N; None = 16 for flow (FLUX script), 50 for SD")
    eta: float | None = option(None, "step noise: Dance-SDE eta (None = 0.3, FLUX script) or DDIM eta "
                               "(None = 1.0, SD config)")
    shift: float = option(3.0, "sigma-grid shift s of flow models; official FLUX script --shift 3")
    guidance_scale: float | None = option(None, "CFG scale of rollouts and training; None = 1 for flow "
                                          "(FLUX scripts --cfg 0.0), 5 for SD (config_sd/base.py)")
    group_size: int = option(12, "images per prompt G; official FLUX --num_generations 12 (SD 16, Hunyuan 24)")
    prompts_per_iteration: int = option(2, "prompts (groups) per iteration and process; official 1 per GPU, toy 2")
    shared_noise: bool = option(True, "one initial noise per group; official --init_same_noise")
    # ---- training ----
    iterations: int = option(30, "sample-then-train iterations; official FLUX 300, toy 30")
    best_of_n: int = option(0, "train only the best_of_n/2 best and best_of_n/2 worst samples of each group; "
                            "official Hunyuan --bestofn 8 of 24; 0 trains all G")
    timestep_fraction: float | None = option(None, "trained share of the N - 1 steps, random per sample; "
                                             "None = 0.6 for flow (FLUX script), 1.0 for SD (config)")
    learning_rate: float = option(1e-2, "AdamW lr; official 1e-5 full fine-tuning, 3e-4 LoRA script, toy 1e-2")
    weight_decay: float = option(1e-4, "AdamW weight decay; official scripts --weight_decay 0.0001")
    train_batch_size: int = option(12, "samples per micro-batch; official 1 (FLUX), toy 12 for speed")
    gradient_accumulation_steps: int = option(2, "micro-batches per optimizer step; official FLUX 4, toy 2 (one "
                                              "step per iteration)")
    clip_range: float = option(1e-4, "PPO clip epsilon; official --clip_range 1e-4")
    adv_clip_max: float = option(5.0, "advantages clamped to [-max, max]; official --adv_clip_max 5.0")
    max_grad_norm: float = option(1.0, "gradient clipping; official --max_grad_norm 1.0")
    # ---- evaluation and checkpoints ----
    eval_every: int = option(5, "evaluate every this many iterations (and at 0 and the end)")
    eval_prompts: int = option(16, "evaluation prompts (fixed toy scenes, or fixed lines of the prompt file)")
    save_every: int = option(10, "checkpoint every this many iterations; a rerun resumes from the newest")

    def __post_init__(self) -> None:
        require_model(self.model)
        require(self.reward in REWARD_NAMES, "reward", f"unknown {self.reward!r}; choose from {REWARD_NAMES}")
        require(not self.reward.startswith("toy") or self.prompt_file is None, "reward",
                "toy rewards read toy-world metadata; drop --prompt-file or pick another reward")
        require(self.prompt_file is None or Path(self.prompt_file).is_file(), "prompt_file", "no such file")
        require(len(self.tasks) > 0 and all(t in TASKS for t in self.tasks), "tasks", f"choose from {TASKS}")
        require(self.device in ("cpu", "cuda"), "device", f"cpu or cuda, got {self.device!r}")
        require(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        require(self.group_size >= 2, "group_size", "the group std (ddof 1) needs at least 2 images per prompt")
        require(self.best_of_n == 0 or (self.best_of_n % 2 == 0 and 2 <= self.best_of_n <= self.group_size),
                "best_of_n", f"0, or an even number in [2, group_size={self.group_size}]")
        require(self.num_steps is None or self.num_steps >= 2, "num_steps", "need >= 2 (the last is never trained)")
        require(self.eta is None or self.eta > 0, "eta", "must be > 0 (eta = 0 leaves no policy to train)")
        require(self.shift > 0, "shift", "must be > 0")
        require(self.timestep_fraction is None or 0 < self.timestep_fraction <= 1, "timestep_fraction",
                "must lie in (0, 1]")
        require(min(self.prompts_per_iteration, self.iterations + 1, self.train_batch_size,
                    self.gradient_accumulation_steps, self.eval_every, self.eval_prompts, self.save_every) >= 1,
                "prompts_per_iteration", "sizes and counts must be >= 1 (iterations >= 0)")
        trained = self.prompts_per_iteration * (self.best_of_n or self.group_size)
        require(trained % (self.train_batch_size * self.gradient_accumulation_steps) == 0,
                "train_batch_size", f"train_batch_size x gradient_accumulation_steps must divide the {trained} "
                "samples trained per iteration (the official loop drops a partial accumulation)")
        require(self.lora_rank >= 0, "lora_rank", "must be >= 0")
        require(self.clip_range > 0 and self.learning_rate > 0 and self.adv_clip_max > 0, "clip_range",
                "clip_range, learning_rate and adv_clip_max must be > 0")


def with_family_defaults(config: Config, prediction: str) -> Config:
    """Fill the fields left at None with the defaults of the model family ("flow" or "epsilon")."""
    filled = {k: v for k, v in FAMILY_DEFAULTS[prediction].items() if getattr(config, k) is None}
    config = replace(config, **filled)
    require(int((config.num_steps - 1) * config.timestep_fraction) >= 1, "timestep_fraction",
            f"int((num_steps - 1) * timestep_fraction) is 0 with num_steps={config.num_steps}")
    return config


# --8<-- [start:sigma_grid]
def fastvideo_schedule(num_steps: int, shift: float, device=None) -> Schedule:
    """The sigma grid of DanceGRPO's flow models (official sample_reference_model), not diffusers' grid.

    The denoiser is conditioned on int(1000 sigma) (official `timestep_value`); the step uses exact sigma.
    """
    # sigma_k = 1 - k / N, k = 0..N: ends at exactly 0, unlike diffusers' linspace(1, 1/N, N) + [0]
    sigmas = torch.linspace(1, 0, num_steps + 1)
    # sd3_time_shift: sigma' = s sigma / (1 + (s - 1) sigma)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas[:-1] * 1000).long().float()
    return Schedule(prediction="flow", timesteps=timesteps, sigmas=sigmas).to(device or "cpu")


def use_fastvideo_grid(adapter: DiffusionAdapter, shift: float) -> None:
    """Make `adapter.schedule` (read by common.rollout) return the FastVideo grid for this adapter."""
    adapter.schedule = lambda num_steps, device=None: fastvideo_schedule(num_steps, shift, device or adapter.device)
# --8<-- [end:sigma_grid]


# --8<-- [start:sampling]
def policy_step_fn(prediction: str, eta: float):
    """The Gaussian step policy: Dance-SDE for flow models, DDIM-eta (DDPO's convention) for SD."""
    if prediction == "flow":
        # mean = x + dsigma [v - eta^2 / 2 * score], std = eta sqrt(sigma - sigma')  (official flux_step)
        return partial(dance_sde_step, eta=eta)
    # official train_grpo_sd.py samples with ddim_step_with_logprob of ddpo-pytorch
    return partial(ddim_step, eta=eta, convention="ddpo")


def sample_groups(adapter: DiffusionAdapter, prompts: list[str], config: Config,
                  generator: torch.Generator | None) -> Trajectory:
    """G samples per prompt, all G starting from the prompt's one shared noise.

    Flow models: the last step is Euler to sigma = 0, whose result is exactly x0_hat = x - sigma v of the
    last state, the image the official code decodes and scores (`latents = pred_original`). The official
    code samples that step with the SDE too but never trains it, so nothing trained differs.
    SD: every step is DDIM-eta and the final latent is decoded (official pipeline_with_logprob).
    """
    flow = adapter.prediction == "flow"
    return rollout(adapter, prompts, group_size=config.group_size, num_steps=config.num_steps,
                   step_fn=policy_step_fn(adapter.prediction, config.eta), guidance_scale=config.guidance_scale,
                   window=(0, config.num_steps - 1) if flow else None, shared_noise=config.shared_noise,
                   generator=generator)
# --8<-- [end:sampling]


# --8<-- [start:advantages]
def dance_advantages(rewards: Tensor, group_size: int, adv_clip_max: float) -> Tensor:
    """A_i = (r_i - mean_group) / (std_group + 1e-8), torch std (ddof 1), clamped to [-5, 5] (official)."""
    return clip_advantages(group_advantages(rewards, group_size, std="group", eps=1e-8, ddof=1), adv_clip_max)


def best_of_n(rewards: Tensor, group_size: int, n: int) -> Tensor:
    """Indices of the n/2 lowest and n/2 highest rewards of every group (official train_grpo_hunyuan.py
    sorts the group's advantages, keeps both ends and trains only those; advantages stay those of the
    full group)."""
    order = rewards.view(-1, group_size).argsort(dim=1)  # ascending
    keep = torch.cat([order[:, : n // 2], order[:, group_size - n // 2:]], dim=1)
    offsets = torch.arange(keep.shape[0], device=rewards.device)[:, None] * group_size
    return (keep + offsets).flatten()
# --8<-- [end:advantages]


# --8<-- [start:update]
def trained_steps(num_samples: int, num_steps: int, fraction: float, generator: torch.Generator) -> Tensor:
    """(num_samples, T) step indices: a fresh random order of steps 0..N-2 per sample (the last step is
    dropped), cut to its first T = int((N - 1) * fraction) entries (official: N=16 -> 9 of 15 steps)."""
    n = num_steps - 1
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(num_samples)])[:, : int(n * fraction)]


def grpo_update(adapter: DiffusionAdapter, traj: Trajectory, advantages: Tensor, samples: Tensor, config: Config,
                optimizer: torch.optim.Optimizer, generator: torch.Generator, accelerator=None) -> dict[str, float]:
    """One pass over `samples` (indices into traj), in micro-batches of train_batch_size; each micro-batch
    back-propagates its T random steps one at a time, and every gradient_accumulation_steps micro-batches
    the optimizer steps (official train_one_step)."""
    step_fn = policy_step_fn(adapter.prediction, config.eta)
    steps = trained_steps(len(samples), config.num_steps, config.timestep_fraction, generator)
    num_t, accum = steps.shape[1], config.gradient_accumulation_steps
    params = adapter.trainable_parameters()
    stats: dict[str, list[float]] = {"loss": [], "clipfrac": [], "approx_kl": [], "grad_norm": []}
    first_dev, backward = 0.0, 0
    for k, (mb, mb_steps) in enumerate(zip(samples.split(config.train_batch_size),
                                            steps.split(config.train_batch_size))):
        for j in range(num_t):
            i = mb_steps[:, j].to(traj.latents.device)
            new = step_log_prob(adapter, traj, i, step_fn, index=mb)
            # rho = exp(logp - logp_old); L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
            loss, info = ppo_clip_loss(new.log_prob, traj.log_probs[mb, i], advantages[mb], config.clip_range)
            # L / (grad_accum * T): one optimizer step averages its micro-batches and their T steps
            (loss / (accum * num_t)).backward()
            backward += len(mb)
            if k < accum:  # before the first optimizer step the policy is the rollout's: rho must be 1
                first_dev = max(first_dev, (new.log_prob.detach() - traj.log_probs[mb, i]).abs().max().item())
            stats["loss"].append(loss.item())
            stats["clipfrac"].append(info["clipfrac"].item())
            stats["approx_kl"].append(info["approx_kl"].item())
        if (k + 1) % accum == 0:
            if accelerator is not None and accelerator.num_processes > 1:
                for p in params:  # data parallel by hand: average the trained weights' gradients
                    p.grad = accelerator.reduce(p.grad, "mean")
            stats["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
            optimizer.step()
            optimizer.zero_grad()
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    return {**out, "first_logprob_dev": first_dev, "backward_passes": backward}
# --8<-- [end:update]


def load_prompts(config: Config, n: int, generator: torch.Generator) -> tuple[list[str], list[dict] | None]:
    """n prompts with their toy-world metadata, or n random lines of the prompt file (no metadata)."""
    if config.prompt_file is None:
        pairs = sample_prompts(n, config.tasks, generator)
        return [p for p, _ in pairs], [m for _, m in pairs]
    lines = [s.strip() for s in Path(config.prompt_file).read_text().splitlines() if s.strip()]
    return [lines[k] for k in torch.randint(len(lines), (n,), generator=generator).tolist()], None


def make_reward(config: Config):
    kwargs = {REWARD_PATH_ARG[config.reward]: config.reward_path} if config.reward_path else {}
    if config.reward == "toy_geneval":
        kwargs["fractional"] = config.partial_credit
    return load_reward(config.reward, **kwargs)


@torch.no_grad()
def evaluate(adapter: DiffusionAdapter, reward_fn, prompts: list[str], metadata, config: Config,
             seed: int) -> tuple[dict[str, float], Tensor, Tensor]:
    """Deterministic sampling (Euler / DDIM eta=0 on the training grid) from fixed noise: mean reward and
    toy GenEval accuracy on toy prompts; also the images and the reward of each prompt."""
    traj = rollout(adapter, prompts, num_steps=config.num_steps, step_fn=ode_step, window=(0, 0),
                   guidance_scale=config.guidance_scale, generator=torch.Generator(adapter.device).manual_seed(seed))
    rewards, _ = reward_fn(traj.images, prompts, metadata)
    metrics = {"eval_reward": rewards.mean().item()}
    if metadata is not None:
        metrics["eval_geneval"] = geneval_scores(traj.images, metadata)["overall"]
    return metrics, traj.images, rewards.float().cpu()


def record_eval(out: Path, it: int, rewards: Tensor) -> None:
    """Append the per-prompt evaluation rewards to eval_rewards.jsonl (for the paired standard error)."""
    with open(out / "eval_rewards.jsonl", "a") as f:
        f.write(json.dumps({"iteration": it, "rewards": rewards.tolist()}) + "\n")


def setup(config: Config):
    """Accelerator, adapter (FastVideo grid for flow, LoRA or full fine-tuning), optimizer, reward."""
    accelerator = make_accelerator(cpu=config.device == "cpu")
    if config.device == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None,
                           device=accelerator.device)
    config = with_family_defaults(config, adapter.prediction)
    if adapter.prediction == "flow":
        use_fastvideo_grid(adapter, config.shift)
    if config.lora_rank > 0:
        # official LoRA script: init_lora_weights=True (B = 0, so training starts at the base), alpha = 2 r
        adapter.add_lora(config.lora_rank, 2 * config.lora_rank, LORA_TARGETS)
        for p in adapter.trainable_parameters():
            p.data = p.data.float()  # LoRA weights and their AdamW state stay fp32
    else:
        adapter.denoiser.requires_grad_(True)  # full fine-tuning keeps the loaded dtype
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = make_optimizer(adapter.trainable_parameters(), lr=config.learning_rate,
                               weight_decay=config.weight_decay)
    return config, accelerator, adapter, optimizer, make_reward(config)


# --8<-- [start:train]
def train(config: Config) -> dict[str, float]:
    """Sample groups, score, normalise per group, optionally keep the best/worst, PPO update; repeat."""
    seed_everything(config.seed)
    config, accelerator, adapter, optimizer, reward_fn = setup(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.out_dir)
    data_gen = torch.Generator().manual_seed(config.seed)  # prompts, step orders: the same on every process
    noise_gen = torch.Generator(adapter.device).manual_seed(config.seed + 1000 * (rank + 1))  # official seed + rank
    gens = {"data": data_gen, "noise": noise_gen}
    eval_prompts, eval_meta = load_prompts(config, config.eval_prompts, torch.Generator().manual_seed(12345))
    log = MetricsLogger(out / "metrics.jsonl", total=config.iterations, disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=config.save_every, accelerator=accelerator)
    params = trainable_state_dict(adapter.denoiser)
    it = ckpt.load_latest(model_params=params, optimizer=optimizer, generators=gens, metrics=log) or 0
    before = after = None
    if it == 0:
        metrics, before, eval_rewards = evaluate(adapter, reward_fn, eval_prompts, eval_meta, config, config.seed + 1)
        log.log(0, metrics, backward_passes=0)
        if accelerator.is_main_process:
            (out / "eval_rewards.jsonl").unlink(missing_ok=True)
            record_eval(out, 0, eval_rewards)
        after = before
    backward = int(read_metrics(out / "metrics.jsonl")[-1].get("backward_passes", 0)) if it else 0
    while it < config.iterations:
        start = time.time()
        prompts, meta = load_prompts(config, config.prompts_per_iteration * world, data_gen)
        prompts, meta = prompts[rank::world], None if meta is None else meta[rank::world]
        traj = sample_groups(adapter, prompts, config, noise_gen)
        rewards, _ = reward_fn(traj.images, traj.prompts, None if meta is None else
                               [m for m in meta for _ in range(config.group_size)])
        advantages = dance_advantages(rewards.float(), config.group_size, config.adv_clip_max)
        samples = (best_of_n(rewards, config.group_size, config.best_of_n) if config.best_of_n
                   else torch.arange(len(traj), device=rewards.device))
        # shuffled so that one optimizer step mixes groups, as the official all-rank average does
        samples = samples[torch.randperm(len(samples), generator=data_gen).to(samples.device)]
        info = grpo_update(adapter, traj, advantages, samples, config, optimizer, data_gen, accelerator)
        backward += info.pop("backward_passes") * world
        it += 1
        gathered = accelerator.gather(rewards.float())
        flat = rewards.view(-1, config.group_size)
        metrics = {"reward_mean": gathered.mean(), "reward_std": gathered.std(), **info,
                   "zero_std_groups": (flat.amax(1) == flat.amin(1)).float().mean(),
                   "backward_passes": backward, "seconds": time.time() - start}
        if it % config.eval_every == 0 or it == config.iterations:
            eval_metrics, after, eval_rewards = evaluate(adapter, reward_fn, eval_prompts, eval_meta, config,
                                                         config.seed + 1)
            metrics.update(eval_metrics)
            if accelerator.is_main_process:
                record_eval(out, it, eval_rewards)
        log.log(it, metrics)
        if ckpt.due(it) or it == config.iterations:
            ckpt.save(it, model_params=params, optimizer=optimizer, generators=gens)
    log.close()
    if accelerator.is_main_process and after is not None:
        write_figures(out, before, after)
    return summary(out / "metrics.jsonl")
# --8<-- [end:train]


def write_figures(out: Path, before: Tensor | None, after: Tensor) -> None:
    """reward_curve.png and samples.png (first 8 evaluation prompts: before above, after below)."""
    if any("reward_mean" in r for r in read_metrics(out / "metrics.jsonl")):
        plot_curve(out / "metrics.jsonl", "reward_mean", out / "reward_curve.png", title="DanceGRPO rollout reward")
    if before is not None:
        n = min(8, len(after))
        image_grid(torch.cat([before[:n], after[:n]]), nrow=n, out_png=out / "samples.png",
                   labels=["before", "after"])


def summary(metrics_path: Path) -> dict[str, float]:
    """First and last evaluation, the standard error of their paired difference over the evaluation
    prompts, and the total backward passes (one sample through one step)."""
    records = read_metrics(metrics_path)
    evals = [r for r in records if "eval_reward" in r]
    result = {"eval_reward_before": evals[0]["eval_reward"], "eval_reward_after": evals[-1]["eval_reward"],
              "backward_passes": records[-1].get("backward_passes", 0)}
    per_prompt = metrics_path.parent / "eval_rewards.jsonl"
    if per_prompt.is_file():
        lines = [json.loads(s) for s in per_prompt.read_text().splitlines() if s.strip()]
        diff = torch.tensor(lines[-1]["rewards"]) - torch.tensor(lines[0]["rewards"])
        # SE = std(after_j - before_j) / sqrt(n), j over the n fixed evaluation prompts (ddof 1)
        result["eval_gain_se"] = (diff.std() / len(diff) ** 0.5).item() if len(diff) > 1 else 0.0
    if "eval_geneval" in evals[0]:
        result |= {"eval_geneval_before": evals[0]["eval_geneval"], "eval_geneval_after": evals[-1]["eval_geneval"]}
    (metrics_path.parent / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> dict[str, float]:
    return train(parse_config(Config, argv))
