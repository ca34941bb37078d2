"""Flow-GRPO: Training Flow Matching Models via Online RL (Liu et al., NeurIPS 2025), with Flow-GRPO-Fast.

Docs page: generated/papers/flow_grpo.md. Bib key: liu2025flowgrpo (survey.bib).
Official code: github.com/yifan123/flow_grpo at ac4c86e (scripts/train_sd3.py, config/grpo.py,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, flow_grpo/stat_tracking.py); Flow-GRPO-Fast from the
same repository's README and scripts/train_sd3_fast.py at 74db691.

The recipe: turn the deterministic flow ODE into an SDE with the same marginals so that every denoising
step is a Gaussian policy with a log-probability (`common.steps.flow_sde_step`); sample a group of images
per prompt with few steps (10), score them, normalise rewards within each prompt's group, and update a
LoRA with the PPO-clipped surrogate plus a KL to the LoRA-off model. Evaluation uses the ODE with more
steps (40). Flow-GRPO-Fast keeps the ODE everywhere except a short random window where the group
branches, and trains only that window.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import Tensor

from common.advantages import PerPromptStatTracker
from common.config import option, parse_config, require
from common.losses import gaussian_mean_kl, ppo_clip_loss
from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule
from common.models.load import load_adapter, require_model
from common.rewards import REWARD_NAMES, load_reward
from common.rollout import Trajectory, current_numerics, draw_noise, rollout
from common.steps import StepOutput, euler_step, flow_sde_step
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
    truncate_metrics,
)

#: where `--reward-path` goes for the rewards that load weights from a local directory (or a URL)
REWARD_PATH_ARG = {"pickscore": "model_dir", "clip_score": "clip_dir", "aesthetic": "clip_dir", "http": "url"}


@dataclass
class Config:
    """Flow-GRPO / Flow-GRPO-Fast. Defaults marked "toy" are scaled down so the job runs on a CPU."""

    # ---- model, reward, run ----
    model: str = option("toy-flow", "toy-flow, tiny-sd3, tiny-flux or a local diffusers SD3/FLUX directory")
    reward: str = option("toy_geneval", "reward name (common.rewards.load_reward); official GenEval task "
                         "uses the GenEval detector, toy_geneval is its toy-world twin")
    reward_path: str | None = option(None, "local weights directory (pickscore, clip_score, aesthetic) or URL (http)")
    prompt_file: str | None = option(None, "prompts: .txt (one per line) or GenEval-style .jsonl with a 'prompt' "
                                     "key; None draws toy-world scenes")
    tasks: list[str] = option(["single_object"], "toy tasks the prompts come from (GenEval's six); toy budget: one")
    out_dir: str = option("runs/flow_grpo", "metrics.jsonl, figures and checkpoints go here")
    seed: int = option(42, "random seed; official config/base.py")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    dtype: str = option("fp32", "denoiser weights and autocast: fp32 or bf16 (official FLUX/Wan: bf16)")
    lora_rank: int = option(32, "LoRA rank; official train_sd3.py r=32")
    lora_alpha: float | None = option(None, "LoRA alpha; None = 2 * rank (official: alpha 64 for r 32)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (real pipelines)")
    # ---- sampling ----
    num_steps: int = option(10, "denoising steps of training rollouts; official geneval_sd3 (denoising reduction)")
    eval_num_steps: int = option(40, "ODE steps at evaluation; official geneval_sd3")
    guidance_scale: float = option(4.5, "CFG scale of rollouts and training; official geneval_sd3 4.5 "
                                   "(nocfg configs 1; FLUX 1, its guidance embedding carries 3.5)")
    eval_guidance_scale: float = option(4.5, "CFG scale at evaluation; official geneval_sd3 4.5")
    noise_level: float = option(0.7, "a in sigma_t = a sqrt(sigma / (1 - sigma)); official SD3.5 0.7, FLUX 0.9")
    group_size: int = option(8, "images per prompt G; official 24, toy 8")
    prompts_per_epoch: int = option(4, "prompts (groups) per epoch over all processes; official 48, toy 4")
    batches_per_epoch: int = option(2, "rollout = training batches per epoch; official sample.num_batches_per_epoch")
    same_latent: bool = option(False, "one initial noise per group; official sample.same_latent (False)")
    # ---- Flow-GRPO-Fast ----
    fast: bool = option(False, "Flow-GRPO-Fast: ODE, a short SDE window where the group branches, ODE; "
                        "only the window is trained (official README)")
    sde_window_size: int = option(2, "SDE steps in the Fast window; README: 1 or 2, refactored configs 3")
    sde_window_range: list[int] | None = option(None, "steps [lo, hi) the Fast window lies in; None = "
                                                "[0, num_steps // 2] (official fast configs)")
    # ---- training ----
    epochs: int = option(10, "outer iterations (sample, then train); official runs until stopped")
    learning_rate: float = option(1e-3, "AdamW lr; official config/base.py 3e-4, toy 1e-3 (few epochs)")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step; official num_batches_per_epoch // 2")
    clip_range: float = option(1e-4, "PPO clip epsilon; official config/base.py")
    adv_clip_max: float = option(5.0, "advantages clamped to [-max, max]; official config/base.py")
    beta: float = option(0.04, "KL weight; official geneval_sd3 0.04, pickscore 0.01, FLUX and Fast 0")
    timestep_fraction: float = option(0.99, "train steps 0..int(N * fraction) - 1; official 0.99 = all but last")
    global_std: bool = option(True, "divide by the std of all rewards (official SD3 configs) instead of per prompt")
    train_cfg: bool = option(True, "recompute with the rollout's CFG in training; official train.cfg")
    max_grad_norm: float = option(1.0, "gradient clipping; official config/base.py")
    # ---- evaluation and checkpoints ----
    eval_every: int = option(5, "evaluate every this many epochs (and at 0 and the end)")
    eval_prompts: int = option(24, "evaluation prompts (fixed toy scenes, or random lines of the prompt file)")
    eval_images_per_prompt: int = option(2, "evaluation samples per prompt (fixed noise, paired across evals)")
    save_every: int = option(5, "checkpoint every this many epochs; resume picks up the newest")

    def __post_init__(self) -> None:
        require_model(self.model)
        require(self.model not in ("tiny-sd", "tiny-sdxl", "toy-unet"), "model", "Flow-GRPO needs a flow model")
        require(self.dtype in ("fp32", "bf16"), "dtype", f"fp32 or bf16, got {self.dtype!r}")
        require(self.reward in REWARD_NAMES, "reward", f"unknown {self.reward!r}; choose from {REWARD_NAMES}")
        require(not self.reward.startswith("toy") or self.prompt_file is None, "reward",
                "toy rewards read toy-world metadata; drop --prompt-file or pick another reward")
        require(self.prompt_file is None or Path(self.prompt_file).is_file(), "prompt_file", "no such file")
        require(len(self.tasks) > 0 and all(t in TASKS for t in self.tasks), "tasks", f"choose from {TASKS}")
        require(self.group_size >= 2, "group_size", "needs at least 2 images per prompt to compare")
        require(self.batches_per_epoch >= 1 and self.prompts_per_epoch % self.batches_per_epoch == 0,
                "batches_per_epoch", f"must divide prompts_per_epoch={self.prompts_per_epoch} (whole groups)")
        require(self.gradient_accumulation_steps >= 1 and self.batches_per_epoch % self.gradient_accumulation_steps
                == 0, "gradient_accumulation_steps", "must be >= 1 and divide batches_per_epoch")
        require(self.num_steps >= 2 and self.eval_num_steps >= 1, "num_steps", "need num_steps >= 2")
        require(self.noise_level >= 0, "noise_level", "must be >= 0")
        require(0 < self.timestep_fraction <= 1 and int(self.num_steps * self.timestep_fraction) >= 1,
                "timestep_fraction", "must lie in (0, 1] and leave at least one trained step")
        self.sde_window_range = self.sde_window_range or [0, self.num_steps // 2]
        lo, hi = (list(self.sde_window_range) + [0, 0])[:2]
        require(len(self.sde_window_range) == 2 and 0 <= lo < hi <= self.num_steps, "sde_window_range",
                f"need two ints 0 <= lo < hi <= num_steps={self.num_steps}")
        require(not self.fast or 1 <= self.sde_window_size <= hi - lo, "sde_window_size", f"must lie in [1, {hi - lo}]")
        for name in ("clip_range", "learning_rate", "adv_clip_max", "lora_rank", "prompts_per_epoch", "eval_every",
                     "save_every", "eval_prompts", "eval_images_per_prompt"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.beta >= 0 and self.epochs >= 0, "beta", "beta and epochs must be >= 0")


# --8<-- [start:fast_rollout]
@torch.no_grad()
def fast_rollout(adapter: DiffusionAdapter, prompts: list[str], *, group_size: int, num_steps: int,
                 window: tuple[int, int], step_fn, guidance_scale: float,
                 generator: torch.Generator | None, shard: tuple[int, int] = (0, 1)) -> Trajectory:
    """Flow-GRPO-Fast sampling (official README): one ODE trajectory per prompt up to the window start,
    then the state is copied into the group, which branches with SDE steps inside the window and
    finishes with the ODE. Only the window carries log-probs; the prefix costs one row per prompt.
    Noise is drawn for the batch of all processes and sliced (`common.rollout.draw_noise`)."""
    a, b = window
    cfg = guidance_scale != 1.0
    encoded = adapter.encode_prompts(prompts + [""] if cfg else prompts)
    m = len(prompts)
    embeds, neg = encoded.index(torch.arange(m)), encoded.index(torch.full((m,), m)) if cfg else None
    schedule = adapter.schedule(num_steps, adapter.device)
    x = draw_noise((m, *adapter.latent_shape), generator, adapter.device, shard)
    states = [x]
    for i in range(num_steps):
        if i == a:  # branch: the group starts from the same state x_a
            x, states = x.repeat_interleave(group_size, 0), [s.repeat_interleave(group_size, 0) for s in states]
            embeds = embeds.repeat_interleave(group_size)
            neg = neg.repeat_interleave(group_size) if neg is not None else None
            log_probs = torch.zeros(len(x), num_steps, device=x.device)
        v = adapter.predict(x, schedule.timesteps[i], embeds, neg, guidance_scale)
        if a <= i < b:
            out = step_fn(v, x, schedule, i, noise=draw_noise(x.shape, generator, adapter.device, shard))
        else:
            out = euler_step(v, x, schedule, i)
        if a <= i < b:
            log_probs[:, i] = out.log_prob
        x = out.prev_sample
        states.append(x)
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    stochastic[a:b] = True
    return Trajectory(prompts=[p for p in prompts for _ in range(group_size)], embeds=embeds, neg_embeds=neg,
                      latents=torch.stack(states, 1), log_probs=log_probs, stochastic=stochastic,
                      schedule=schedule, timesteps=schedule.timesteps, guidance_scale=guidance_scale,
                      images=adapter.decode(x), group_size=group_size, numerics=current_numerics(adapter))
# --8<-- [end:fast_rollout]


# --8<-- [start:trained_steps]
def trained_steps(config: Config, generator: torch.Generator) -> tuple[tuple[int, int], list[int]]:
    """(SDE window of the rollout, steps that are trained).

    Flow-GRPO: every step is SDE; steps 0 .. int(N * 0.99) - 1 are trained, in order (all but the last).
    Fast: start ~ U{lo, ..., hi - W} (official randint over sde_window_range), window [start, start + W).
    """
    if not config.fast:
        return (0, config.num_steps), list(range(int(config.num_steps * config.timestep_fraction)))
    lo, hi = config.sde_window_range
    start = int(torch.randint(lo, hi - config.sde_window_size + 1, (1,), generator=generator))
    return (start, start + config.sde_window_size), list(range(start, start + config.sde_window_size))
# --8<-- [end:trained_steps]


# --8<-- [start:keep_mask]
def keep_mask(advantages: Tensor, num_batches: int, generator: torch.Generator) -> Tensor:
    """Drop samples whose advantage is exactly 0 (groups where every image got the same reward), then put
    random dropped ones back until the count divides into `num_batches` equal batches (official
    train_sd3.py; when nothing is left it keeps one batch's worth, as train_sd3_fast.py does)."""
    keep = advantages != 0
    count = int(keep.sum())
    short = num_batches if count == 0 else -count % num_batches
    dropped = (~keep).nonzero().squeeze(1)
    if short and len(dropped) >= short:
        keep[dropped[torch.randperm(len(dropped), generator=generator)[:short]]] = True
    return keep
# --8<-- [end:keep_mask]


# --8<-- [start:policy_step]
def policy_step(adapter: DiffusionAdapter, schedule: Schedule, x: Tensor, next_x: Tensor, step: Tensor,
                embeds: PromptEmbeds, neg: PromptEmbeds | None, guidance_scale: float, step_fn) -> StepOutput:
    """log pi_theta(x_{t-1} | x_t, c) of stored transitions, with gradient, under the rollout's CFG.

    CFG runs [uncond; cond] as one batch, as in sampling, and the unconditional half is detached
    (official train_sd3.py): the gradient flows through the conditional branch only."""
    t = schedule.timesteps[step]
    if neg is None or guidance_scale == 1.0:
        v = adapter.predict(x, t, embeds)
    else:
        v_uncond, v_cond = adapter.predict(torch.cat([x, x]), torch.cat([t, t]), PromptEmbeds.cat([neg, embeds])
                                           ).chunk(2)
        v_uncond = v_uncond.detach()
        # v = v_u + s (v_c - v_u)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return step_fn(v, x, schedule, step, prev_sample=next_x)
# --8<-- [end:policy_step]


# --8<-- [start:loss]
def grpo_loss(config: Config, adapter: DiffusionAdapter, schedule: Schedule, batch: dict, j: int, step_fn
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip on the j-th trained step of a batch, plus beta * KL to the LoRA-off reference."""
    step = batch["steps"][:, j]
    args = (batch["latents"][:, j], batch["next_latents"][:, j], step, batch["embeds"], batch["neg"],
            config.guidance_scale if config.train_cfg else 1.0, step_fn)
    new = policy_step(adapter, schedule, *args)
    # A clipped to [-5, 5]; L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old)
    adv = batch["advantages"].clamp(-config.adv_clip_max, config.adv_clip_max)
    loss, info = ppo_clip_loss(new.log_prob, batch["log_probs"][:, j], adv, config.clip_range)
    info["policy_loss"] = loss.detach()
    info["max_log_ratio"] = (new.log_prob - batch["log_probs"][:, j]).abs().max().detach()
    if config.beta > 0:
        with torch.no_grad(), adapter.disable_adapter():
            ref = policy_step(adapter, schedule, *args)
        # KL = mean_d (mu_theta - mu_ref)^2 / (2 sigma_t^2), sigma_t = std / sqrt(-dt) (official, issue #78)
        dt = schedule.sigmas[step + 1] - schedule.sigmas[step]
        kl = gaussian_mean_kl(new.mean, ref.mean, new.std, dt=dt).mean()
        info["kl_loss"] = kl.detach()
        loss = loss + config.beta * kl
    return loss, info
# --8<-- [end:loss]


def load_prompts(config: Config, n: int, generator: torch.Generator) -> tuple[list[str], list[dict] | None]:
    """n prompts (and GenEval metadata): toy scenes, or random lines of the prompt file."""
    if config.prompt_file is None:
        pairs = sample_prompts(n, config.tasks, generator)
        return [p for p, _ in pairs], [m for _, m in pairs]
    path = Path(config.prompt_file)
    lines = [s for s in path.read_text().splitlines() if s.strip()]
    rows = [json.loads(s) for s in lines] if path.suffix == ".jsonl" else [{"prompt": s.strip()} for s in lines]
    pick = torch.randint(len(rows), (n,), generator=generator).tolist()
    return [rows[k]["prompt"] for k in pick], [rows[k] for k in pick] if path.suffix == ".jsonl" else None


@torch.no_grad()
def ode_samples(config: Config, adapter: DiffusionAdapter, prompts: list[str], per_prompt: int,
                num_steps: int | None = None) -> Trajectory:
    """Evaluation sampling: the ODE (noise level 0) with `eval_num_steps` and a fixed initial noise."""
    return rollout(adapter, prompts, group_size=per_prompt, num_steps=num_steps or config.eval_num_steps,
                   step_fn=euler_step, window=(0, 0), guidance_scale=config.eval_guidance_scale,
                   generator=torch.Generator(adapter.device).manual_seed(config.seed + 12345))


def evaluate(config: Config, adapter: DiffusionAdapter, reward_fn, prompts: list[str], metadata
             ) -> tuple[dict[str, float], dict[str, list[float]], Tensor]:
    """Mean training reward of ODE samples with `eval_num_steps`, and with the training rollouts'
    `num_steps` (does training at few steps carry over to more?). For the toy base on toy-world prompts
    also toy GenEval overall (mean over tasks): what a reward other than GenEval does to prompt fidelity.
    Returns the scores, every image's reward and the `eval_num_steps` images (for the figure)."""
    meta = None if metadata is None else [m for m in metadata for _ in range(config.eval_images_per_prompt)]
    out, per_image, images = {}, {}, []
    for key, steps in (("", config.eval_num_steps), ("_train_steps", config.num_steps)):
        traj = ode_samples(config, adapter, prompts, config.eval_images_per_prompt, steps)
        rewards = reward_fn(traj.images, traj.prompts, meta)[0].float()
        out["eval_reward" + key], per_image["eval_reward" + key] = rewards.mean().item(), rewards.tolist()
        if config.model == "toy-flow" and config.prompt_file is None:
            out["eval_geneval" + key] = geneval_scores(traj.images, meta)["overall"]
        images.append(traj.images)
    return out, per_image, images[0]


def log_eval_rewards(path: Path, epoch: int, per_image: dict[str, list[float]]) -> None:
    """One line per evaluation with every image's reward; images are paired across evaluations (same
    prompts, same noise), so the standard error of a gain is that of the per-image differences."""
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": epoch, **per_image}) + "\n")


def setup(config: Config):
    """Accelerator, adapter with a Gaussian-init LoRA (B = 0: the policy starts as the base), reward, AdamW."""
    accelerator = make_accelerator(mixed_precision="bf16" if config.dtype == "bf16" else "no",
                                   cpu=config.device == "cpu" if config.device else None)
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None,
                           device=accelerator.device)
    adapter.add_lora(config.lora_rank, config.lora_alpha or 2 * config.lora_rank, init_lora_weights="gaussian")
    for p in adapter.trainable_parameters():
        p.data = p.data.float()  # LoRA weights (and so their AdamW state) stay fp32 under bf16
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    reward_fn = load_reward(config.reward, **({REWARD_PATH_ARG[config.reward]: config.reward_path}
                                              if config.reward_path else {}))
    optimizer = accelerator.prepare(make_optimizer(adapter.trainable_parameters(), lr=config.learning_rate))
    return accelerator, adapter, reward_fn, optimizer


def _select(samples: dict, idx: Tensor) -> dict:
    return {k: None if v is None else v.index(idx) if isinstance(v, PromptEmbeds) else v[idx]
            for k, v in samples.items()}


def sample_epoch(config: Config, accelerator, adapter, reward_fn, step_fn, gens) -> tuple[dict, list, Tensor]:
    """Roll out `batches_per_epoch` batches of whole groups on this process; keep only the trained steps."""
    rank, world = accelerator.process_index, accelerator.num_processes
    parts, prompts, rewards = [], [], []
    for _ in range(config.batches_per_epoch):
        per_batch = config.prompts_per_epoch // config.batches_per_epoch
        require(per_batch % world == 0, "prompts_per_epoch", f"each batch's {per_batch} prompts must split over {world}")
        batch_prompts, meta = load_prompts(config, per_batch, gens["data"])
        # contiguous shares: rank r holds rows r * n .. (r + 1) * n - 1 of the gathered batch
        share = slice(rank * per_batch // world, (rank + 1) * per_batch // world)
        batch_prompts, meta = batch_prompts[share], None if meta is None else meta[share]
        window, steps = trained_steps(config, gens["data"])
        kwargs = dict(group_size=config.group_size, num_steps=config.num_steps, window=window, step_fn=step_fn,
                      guidance_scale=config.guidance_scale, generator=gens["noise"], shard=(rank, world))
        with accelerator.autocast():
            traj = (fast_rollout(adapter, batch_prompts, **kwargs) if config.fast else
                    rollout(adapter, batch_prompts, shared_noise=config.same_latent, **kwargs))
        meta = None if meta is None else [m for m in meta for _ in range(config.group_size)]
        rewards.append(reward_fn(traj.images, traj.prompts, meta)[0].float())
        prompts += traj.prompts
        i = torch.tensor(steps, device=traj.latents.device)
        parts.append({"latents": traj.latents[:, i], "next_latents": traj.latents[:, i + 1],
                      "log_probs": traj.log_probs[:, i], "steps": i.expand(len(traj), -1),
                      "embeds": traj.embeds, "neg": traj.neg_embeds})
    samples = {k: None if parts[0][k] is None else PromptEmbeds.cat([p[k] for p in parts])
               if isinstance(parts[0][k], PromptEmbeds) else torch.cat([p[k] for p in parts]) for k in parts[0]}
    return samples, prompts, torch.cat(rewards)


# --8<-- [start:train]
def train(config: Config) -> list[dict]:
    """Each epoch: sample groups, score, per-prompt advantages, drop zero-advantage samples, then PPO
    updates on every trained step in order. Returns the metrics records (one per epoch)."""
    seed_everything(config.seed)
    accelerator, adapter, reward_fn, optimizer = setup(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.out_dir)
    # prompts, windows and noise: the same streams on every process (each takes its share of the batch, so
    # 1 or n processes sample the same global batch); filtering and shuffling of local samples: per process
    gens = {"data": torch.Generator().manual_seed(config.seed),
            "noise": torch.Generator(adapter.device).manual_seed(config.seed + 1),
            "shuffle": torch.Generator().manual_seed(config.seed + 2 + rank)}
    step_fn = partial(flow_sde_step, noise_level=config.noise_level)
    tracker = PerPromptStatTracker("flow_grpo", global_std=config.global_std)
    rows = [0, 0]  # images through the denoiser (a CFG pair counts 2), and those with gradient

    def count_rows(module, args, kwargs):
        n = (args[0] if args else kwargs["hidden_states"]).shape[0]
        rows[0] += n
        rows[1] += n if torch.is_grad_enabled() else 0

    adapter.denoiser.register_forward_pre_hook(count_rows, with_kwargs=True)
    eval_prompts, eval_meta = load_prompts(config, config.eval_prompts, torch.Generator().manual_seed(12345))
    log = MetricsLogger(out / "metrics.jsonl", total=config.epochs, disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=config.save_every, accelerator=accelerator)
    params = trainable_state_dict(adapter.denoiser)
    epoch = ckpt.load_latest(model_params=params, optimizer=optimizer, generators=gens, metrics=log) or 0
    log.bar.n = epoch
    rewards_path = out / "eval_rewards.jsonl"
    if accelerator.is_main_process:  # drop the records this run will write (again, after a resume)
        truncate_metrics(rewards_path, epoch if epoch > 0 else -1)
    before = after = None  # evaluation images of the base and of the last evaluation, for the figure
    if epoch == 0:
        with accelerator.autocast():
            scores, per_image, before = evaluate(config, adapter, reward_fn, eval_prompts, eval_meta)
        log.log(0, scores)
        if accelerator.is_main_process:
            log_eval_rewards(rewards_path, 0, per_image)
    def every(value) -> Tensor:
        """One logged number from each process, gathered: logs cover all processes (rewards already are)."""
        return accelerator.gather(torch.as_tensor(value, dtype=torch.float32, device=accelerator.device)[None])

    while epoch < config.epochs:
        start, rows[:] = time.time(), [0, 0]
        samples, prompts, rewards = sample_epoch(config, accelerator, adapter, reward_fn, step_fn, gens)
        # per-prompt mean, global std, over the samples of every process (official stat_tracking.py)
        rewards, prompts = accelerator.gather(rewards), gather_object(prompts)
        tracker.clear()
        samples["advantages"] = tracker.update(prompts, rewards).chunk(world)[rank]
        keep = keep_mask(samples["advantages"], config.batches_per_epoch, gens["shuffle"])
        samples = _select(samples, keep)
        schedule = adapter.schedule(config.num_steps, adapter.device)
        perm = torch.randperm(int(keep.sum()), generator=gens["shuffle"]).to(keep.device)
        num_t, accum = samples["steps"].shape[1], config.gradient_accumulation_steps
        stats: dict[str, list[Tensor]] = {}
        for b, idx in enumerate(perm.reshape(config.batches_per_epoch, -1)):
            batch = _select(samples, idx)
            for j in range(num_t):  # trained steps in order, one backward each (official)
                with accelerator.autocast():
                    loss, info = grpo_loss(config, adapter, schedule, batch, j, step_fn)
                accelerator.backward(loss / (num_t * accum))
                for k, v in info.items():
                    stats.setdefault(k, []).append(v)
            if (b + 1) % accum == 0:
                for p in adapter.trainable_parameters():  # data parallel: average LoRA gradients
                    p.grad = accelerator.reduce(p.grad, "mean") if world > 1 else p.grad
                accelerator.clip_grad_norm_(adapter.trainable_parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        epoch += 1
        metrics = {"reward_mean": rewards.mean(), "kept_fraction": every(keep.float().mean()).mean(),
                   "first_max_log_ratio": every(stats.pop("max_log_ratio")[0]).max(),
                   "denoiser_rows": every(rows[0]).sum(), "trained_rows": every(rows[1]).sum(),
                   "seconds": time.time() - start, **{k: every(torch.stack(v).mean()).mean() for k, v in stats.items()}}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            with accelerator.autocast():
                scores, per_image, after = evaluate(config, adapter, reward_fn, eval_prompts, eval_meta)
            metrics.update(scores)
            if accelerator.is_main_process:
                log_eval_rewards(rewards_path, epoch, per_image)
        log.log(epoch, metrics)
        if ckpt.due(epoch) or epoch == config.epochs:
            ckpt.save(epoch, model_params=params, optimizer=optimizer, generators=gens)
    log.close()
    if accelerator.is_main_process:
        write_figures(config, adapter, eval_prompts, out, before, after)
    return read_metrics(out / "metrics.jsonl") if accelerator.is_main_process else []
# --8<-- [end:train]


def write_figures(config: Config, adapter, prompts: list[str], out: Path, before: Tensor | None,
                  after: Tensor | None) -> None:
    """reward_curve.png (training reward), eval_curve.png (eval reward) and before_after.png (base vs
    trained, same noise: the evaluation images, sampled here only when this process has not made them)."""
    if config.epochs > 0:
        plot_curve(out / "metrics.jsonl", "reward_mean", out / "reward_curve.png", title="Flow-GRPO reward")
    plot_curve(out / "metrics.jsonl", "eval_reward", out / "eval_curve.png",
               title=f"{config.reward} ({config.eval_num_steps} ODE steps)")
    if before is None:
        with adapter.disable_adapter():
            before = ode_samples(config, adapter, prompts, config.eval_images_per_prompt).images
    if after is None:
        after = ode_samples(config, adapter, prompts, config.eval_images_per_prompt).images
    first = slice(0, 8 * config.eval_images_per_prompt, config.eval_images_per_prompt)  # up to 8 prompts
    before, after = before[first], after[first]
    image_grid(torch.cat([before, after]), nrow=len(before), out_png=out / "before_after.png",
               labels=["base", "trained"])


def main(argv=None) -> list[dict]:
    return train(parse_config(Config, argv, description=__doc__.split("\n\n")[0]))
