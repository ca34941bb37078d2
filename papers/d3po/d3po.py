"""D3PO: Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model (Yang et al., CVPR 2024).

Docs page: generated/papers/d3po.md. Bib key: yang2023using (survey.bib).
Official code: github.com/yk7333/d3po at 40d3175 (scripts/rm/train_d3po.py: online loop with a
preference oracle; scripts/train.py: the same loss on human labels; config/base.py;
d3po_pytorch/diffusers_patch/ddim_with_logprob.py).

The recipe: sample two images for a prompt from the SAME initial noise with the current model, storing
every denoising step; ask someone which image is better; then apply DPO to every step of the two
trajectories, as if each step of the preferred trajectory were a preferred action in the same state:

    loss_k = -log sigmoid( beta * [ log r_k(preferred) - log r_k(rejected) ] ),
    r_k = clip( pi_theta(x_{k+1} | x_k) / pi_ref(x_{k+1} | x_k), 1 - eps, 1 + eps )

with pi the Gaussian of one stochastic DDIM step (eta = 1) and pi_ref the frozen initial model. Only
the choice enters the loss: there is no reward model. Here the choice comes from an oracle: a hidden
reward on the toy world, or a JSONL file of a person's choices.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import option, parse_config, require
from common.models.base import DiffusionAdapter
from common.models.load import load_adapter, require_model
from common.rewards import REWARD_NAMES, load_reward
from common.rollout import Trajectory, rollout, step_log_prob
from common.steps import ddim_step, ode_step
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

#: a choice: 0 = the first image of the pair is preferred, 1 = the second, TIE = no preference
TIE = -1


@dataclass
class Config:
    """D3PO online loop. Defaults marked "toy" are scaled down so the job runs on a CPU."""

    # ---- model, preferences, run ----
    model: str = option("toy-unet", "toy-unet, tiny-sd, tiny-sdxl or a local diffusers SD directory "
                        "(epsilon models: the policy is a DDIM step)")
    reward: str = option("jpeg_compressibility", "hidden reward behind the toy oracle (it only answers which "
                         "image is better); official config/base.py reward_fn", choices=REWARD_NAMES)
    choices: str | None = option(None, "JSONL of {pair_id, choice} (0, 1 or \"tie\"): a person's choices "
                                 "replace the reward oracle; pair ids are those --save-pairs writes")
    save_pairs: bool = option(False, "write every round's pairs as PNGs + pairs.jsonl for labelling")
    out_dir: str = option("runs/d3po", "metrics.jsonl, figures, pairs and checkpoints go here")
    seed: int = option(0, "random seed (official config/base.py: 0)")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    dtype: str = option("fp32", "denoiser weights: fp32 or bf16 (official: fp16 mixed precision)",
                        choices=("fp32", "bf16"))
    lora_rank: int = option(4, "LoRA rank on the attention projections (LoRAAttnProcessor default, official)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (official: on for SD)")
    # ---- sampling ----
    share_noise: bool = option(True, "both images of a pair start from the same x_T (official: the second "
                               "pipeline call reuses the first's latents); False is the ablation")
    rounds: int = option(10, "sample-then-train rounds; official num_epochs 400, toy 10")
    pairs_per_round: int = option(32, "pairs per round per process; official 10 x 2 batches = 20, toy 32")
    num_steps: int = option(8, "DDIM steps; official 20, toy 8")
    eta: float = option(1.0, "DDIM noise; 1.0 makes every step a Gaussian policy (official)")
    guidance_scale: float = option(5.0, "CFG scale at sampling and training (official sample.guidance_scale)")
    tasks: list[str] = option(["single_object", "colors", "two_object"], "toy tasks the prompts are drawn from")
    # ---- training ----
    beta: float = option(0.1, "DPO temperature; official train.beta")
    eps: float = option(0.1, "ratio clip to [1 - eps, 1 + eps]; official train.eps")
    learning_rate: float = option(3e-3, "AdamW lr; official 3e-5 for SD (400 epochs), toy 3e-3 (10 rounds)")
    train_batch_size: int = option(4, "pairs per micro-batch (one AdamW step each); official 1, toy 4")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step, each over all trained "
                                              "timesteps (official 1)")
    num_inner_epochs: int = option(1, "passes over each round's pairs (official 1)")
    timestep_fraction: float = option(1.0, "fraction of each pair's steps trained, drawn per pair (official 1.0)")
    weight_decay: float = option(1e-4, "AdamW weight decay (official 1e-4)")
    max_grad_norm: float = option(1.0, "gradient clipping (official 1.0)")
    # ---- evaluation and checkpoints ----
    eval_prompts: int = option(32, "fixed evaluation prompts, two images each (fixed noise: before/after "
                               "is paired)")
    eval_every: int = option(5, "evaluate every this many rounds (and at 0 and the end)")
    save_every: int = option(5, "checkpoint every this many rounds; a rerun resumes from the newest")
    figures: bool = option(True, "write reward_curve.png and before_after.png at the end")

    def __post_init__(self) -> None:
        require_model(self.model)
        require(self.model not in ("toy-flow", "tiny-sd3", "tiny-flux"), "model",
                "D3PO's policy is a DDIM step of an epsilon model (toy-unet, tiny-sd, tiny-sdxl, SD dirs)")
        require(self.reward in REWARD_NAMES, "reward", f"unknown {self.reward!r}; choose from {REWARD_NAMES}")
        require(self.choices is None or Path(self.choices).is_file(), "choices", f"no such file {self.choices!r}")
        require(all(t in TASKS for t in self.tasks) and len(self.tasks) > 0, "tasks", f"choose from {TASKS}")
        require(0 < self.eta <= 1, "eta", "must lie in (0, 1]: with eta 0 a step has no log-probability")
        require(self.beta > 0 and 0 < self.eps < 1, "eps", "need beta > 0 and 0 < eps < 1")
        for name in ("rounds", "num_steps", "train_batch_size", "gradient_accumulation_steps",
                     "num_inner_epochs", "eval_prompts", "eval_every", "save_every", "lora_rank"):
            require(getattr(self, name) >= (0 if name == "rounds" else 1), name, "must be >= 1")
        require(self.pairs_per_round % (self.train_batch_size * self.gradient_accumulation_steps) == 0,
                "pairs_per_round", "must be a multiple of train_batch_size * gradient_accumulation_steps "
                "(official train_d3po.py assertion)")
        require(0 < self.timestep_fraction <= 1 and int(self.num_steps * self.timestep_fraction) >= 1,
                "timestep_fraction", "must lie in (0, 1] and leave at least one trained step")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")


# --8<-- [start:policy]
def d3po_step(model_output: Tensor, x: Tensor, schedule, i, *, eta: float = 1.0, **kwargs):
    """The policy of one denoising step: stochastic DDIM, x_{k+1} ~ N(mu_theta(x_k), s_k^2 I), log-prob
    averaged over pixels, the previous timestep clamped at 0 (official ddim_with_logprob.py)."""
    return ddim_step(model_output, x, schedule, i, eta=eta, convention="ddpo", **kwargs)


@torch.no_grad()
def sample_pairs(config: Config, adapter: DiffusionAdapter, prompts: list[str],
                 generator: torch.Generator | None) -> Trajectory:
    """Two trajectories per prompt, rows (2p, 2p + 1), every step stored with its log-prob; with
    share_noise both start from one x_T (official: the second call reuses latents1[:, 0])."""
    return rollout(adapter, prompts, group_size=2, num_steps=config.num_steps,
                   step_fn=functools.partial(d3po_step, eta=config.eta), guidance_scale=config.guidance_scale,
                   shared_noise=config.share_noise, generator=generator)
# --8<-- [end:policy]


# --8<-- [start:oracles]
class RewardOracle:
    """A stand-in for a person: prefers the image with the higher hidden reward (equal rewards: TIE).
    Only the choice leaves the oracle, never the reward value."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn

    def __call__(self, pair_ids: list[str], first: Tensor, second: Tensor, prompts: list[str],
                 metadata: list[dict] | None) -> Tensor:
        r0 = self.reward_fn(first, prompts, metadata)[0]
        r1 = self.reward_fn(second, prompts, metadata)[0]
        return torch.where(r0 > r1, 0, torch.where(r1 > r0, 1, TIE)).long().cpu()


class FileOracle:
    """A person's choices from a JSONL file, one {"pair_id": str, "choice": 0 | 1 | "tie"} per line."""

    def __init__(self, path: str | Path):
        self.path, self.choices = Path(path), {}
        for k, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "pair_id" not in row or row.get("choice") not in (0, 1, "tie"):
                raise ValueError(f"{self.path}: line {k} needs a pair_id and a choice of 0, 1 or \"tie\"")
            self.choices[str(row["pair_id"])] = TIE if row["choice"] == "tie" else int(row["choice"])

    def __call__(self, pair_ids: list[str], first: Tensor, second: Tensor, prompts: list[str],
                 metadata: list[dict] | None) -> Tensor:
        missing = [p for p in pair_ids if p not in self.choices]
        if missing:
            raise ValueError(f"{self.path}: no choice for pair {missing[0]!r} ({len(missing)} pairs missing)")
        return torch.tensor([self.choices[p] for p in pair_ids], dtype=torch.long)


def preference_signs(choices: Tensor) -> Tensor:
    """(B,) choices -> (B, 2) signs h: (+1, -1) when image 0 is preferred, (-1, +1) when image 1 is,
    (0, 0) for a tie (official `compare`)."""
    first = (choices == 0).float() - (choices == 1).float()
    return torch.stack([first, -first], dim=1)
# --8<-- [end:oracles]


# --8<-- [start:loss]
def d3po_loss(log_prob: Tensor, ref_log_prob: Tensor, signs: Tensor, beta: float, eps: float
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-step DPO on a pair's transitions (official train_d3po.py); all inputs (B, 2), one column per image.

    r = clip(exp(log pi_theta - log pi_ref), 1 - eps, 1 + eps)   (clipped before the log: zero gradient outside)
    loss = -log sigmoid(beta * (h_0 log r_0 + h_1 log r_1))
    """
    ratio = torch.clamp(torch.exp(log_prob - ref_log_prob), 1 - eps, 1 + eps)
    logit = beta * (signs * torch.log(ratio)).sum(dim=1)
    loss = -F.logsigmoid(logit).mean()
    with torch.no_grad():
        raw = torch.exp(log_prob - ref_log_prob)
        info = {"clipfrac": ((raw < 1 - eps) | (raw > 1 + eps)).float().mean(), "logit": logit.mean()}
    return loss, info
# --8<-- [end:loss]


# --8<-- [start:update]
def train_on_pairs(config: Config, adapter: DiffusionAdapter, traj: Trajectory, signs: Tensor, optimizer,
                   generator: torch.Generator, reduce=None, where: str = "") -> dict[str, float]:
    """One round of training on stored pairs (official train_d3po.py): shuffle pairs, shuffle each pair's
    steps, and for each micro-batch backpropagate the loss of every trained step (accumulated over steps
    and micro-batches) before one clipped AdamW step. The reference is the LoRA-off model. Tied pairs
    (signs 0) stay in their batch, as in the official loop: no gradient, but the step is always taken.
    The one exception: a non-finite gradient norm skips that step with a warning (`skipped_steps`)."""
    num_pairs, n = signs.shape[0], config.num_steps
    k_train = int(n * config.timestep_fraction)
    per_update = k_train * config.gradient_accumulation_steps
    stats: dict[str, float] = {"optimizer_steps": 0, "skipped_steps": 0}
    step_fn = functools.partial(d3po_step, eta=config.eta)
    for _ in range(config.num_inner_epochs):
        order = torch.randperm(num_pairs, generator=generator)
        steps = torch.stack([torch.randperm(n, generator=generator) for _ in range(num_pairs)])  # per pair
        for b, start in enumerate(range(0, num_pairs, config.train_batch_size)):
            pairs = order[start:start + config.train_batch_size]
            rows = torch.cat([2 * pairs, 2 * pairs + 1]).to(traj.latents.device)  # image 0s, then image 1s
            for j in range(k_train):
                i = steps[pairs, j].repeat(2).to(traj.latents.device)  # both images at the same step
                new = step_log_prob(adapter, traj, i, step_fn, index=rows).log_prob
                with torch.no_grad(), adapter.disable_adapter():
                    ref = step_log_prob(adapter, traj, i, step_fn, index=rows).log_prob
                loss, info = d3po_loss(new.view(2, -1).T, ref.view(2, -1).T, signs[pairs].to(new.device),
                                       config.beta, config.eps)
                (loss / per_update).backward()
                for key, value in {"loss": loss.detach(), **info}.items():
                    stats[key] = stats.get(key, 0.0) + float(value)
            if (b + 1) % config.gradient_accumulation_steps == 0:
                params = adapter.trainable_parameters()
                if reduce is not None:
                    reduce(params)
                norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                if math.isfinite(norm):
                    stats["grad_norm"] = stats.get("grad_norm", 0.0) + norm
                    optimizer.step()
                    stats["optimizer_steps"] += 1
                else:  # a NaN/inf gradient (e.g. fp16/bf16 overflow) would ruin the LoRA: skip, and say so
                    warnings.warn(f"d3po {where}: gradient norm {norm} is not finite; optimizer step skipped",
                                  RuntimeWarning, stacklevel=2)
                    stats["skipped_steps"] += 1
                optimizer.zero_grad()
    per_loss = config.num_inner_epochs * (num_pairs // config.train_batch_size) * k_train  # loss evaluations
    out = {k: v / per_loss for k, v in stats.items() if k not in ("optimizer_steps", "skipped_steps", "grad_norm")}
    out["grad_norm"] = stats.get("grad_norm", 0.0) / max(stats["optimizer_steps"], 1)
    return {**out, "optimizer_steps": stats["optimizer_steps"], "skipped_steps": stats["skipped_steps"]}
# --8<-- [end:update]


def save_pair_images(folder: Path, pair_ids: list[str], images: Tensor, prompts: list[str]) -> None:
    """PNG files <pair_id>_0.png / _1.png and pairs.jsonl lines {pair_id, prompt, image_0, image_1}, the
    material a person labels (official: scripts/sample.py, then labels in a JSON file)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.jsonl", "a") as fh:
        for k, pid in enumerate(pair_ids):
            for m in (0, 1):
                image_grid(images[2 * k + m:2 * k + m + 1], nrow=1, upscale=1, pad=0,
                           out_png=folder / f"{pid}_{m}.png")
            fh.write(json.dumps({"pair_id": pid, "prompt": prompts[k], "image_0": f"{pid}_0.png",
                                 "image_1": f"{pid}_1.png"}) + "\n")


@torch.no_grad()
def evaluate(config: Config, adapter: DiffusionAdapter, reward_fn, prompts: list[str], metadata
             ) -> tuple[Tensor, Tensor]:
    """Two images per fixed prompt, deterministic DDIM (eta = 0) from fixed independent x_T, whatever
    `share_noise` is: before/after differences are paired; returns images and hidden rewards."""
    traj = rollout(adapter, prompts, group_size=2, num_steps=config.num_steps, step_fn=ode_step, window=(0, 0),
                   guidance_scale=config.guidance_scale,
                   generator=torch.Generator(adapter.device).manual_seed(config.seed + 999))
    meta = None if metadata is None else [m for m in metadata for _ in range(2)]
    return traj.images, reward_fn(traj.images, traj.prompts, meta)[0].float()


# --8<-- [start:train]
def train(config: Config) -> list[dict]:
    """Each round: sample pairs from the current model, get the oracle's choices, train every step of
    every pair (ties carry no gradient). Returns the metrics records (one per round, plus round 0)."""
    seed_everything(config.seed)
    accelerator = make_accelerator(mixed_precision="bf16" if config.dtype == "bf16" else "no",
                                   cpu=config.device == "cpu" if config.device else None)
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None,
                           device=accelerator.device)
    adapter.add_lora(config.lora_rank, config.lora_rank)  # B = 0: the policy starts as the reference
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = accelerator.prepare(make_optimizer(adapter.trainable_parameters(), lr=config.learning_rate,
                                                   weight_decay=config.weight_decay))
    rank, world, out = accelerator.process_index, accelerator.num_processes, Path(config.out_dir)
    reward_fn = load_reward(config.reward)
    oracle = FileOracle(config.choices) if config.choices else RewardOracle(reward_fn)

    def reduce(params):  # data parallel: average gradients over processes
        for p in params:
            if world > 1 and p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")

    gens = {"data": torch.Generator().manual_seed(config.seed + rank),
            "noise": torch.Generator(adapter.device).manual_seed(config.seed + 1 + rank)}
    eval_scenes = sample_prompts(config.eval_prompts, config.tasks, torch.Generator().manual_seed(12345))
    eval_prompts, eval_meta = [p for p, _ in eval_scenes], [m for _, m in eval_scenes]
    log = MetricsLogger(out / "metrics.jsonl", total=config.rounds, disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=config.save_every, accelerator=accelerator)
    params = trainable_state_dict(adapter.denoiser)
    done = ckpt.load_latest(model_params=params, optimizer=optimizer, generators=gens, metrics=log) or 0
    first = []  # per-sample rewards at the first evaluation: later gains are paired with them

    def evaluation() -> dict[str, Tensor]:
        scores = evaluate(config, adapter, reward_fn, eval_prompts, eval_meta)[1].cpu()
        if not first:
            first.append(scores)
        return {"eval_reward": scores.mean(), "eval_gain_se": (scores - first[0]).std() / len(scores) ** 0.5}

    if done == 0 and accelerator.is_main_process:
        log.log(0, evaluation())
    for rnd in range(done + 1, config.rounds + 1):
        start = time.time()
        scenes = sample_prompts(config.pairs_per_round, config.tasks, gens["data"])
        prompts, metadata = [p for p, _ in scenes], [m for _, m in scenes]
        with accelerator.autocast():
            traj = sample_pairs(config, adapter, prompts, gens["noise"])
        pair_ids = [f"round{rnd:05d}-rank{rank}-pair{k:04d}" for k in range(len(prompts))]
        if config.save_pairs:
            save_pair_images(out / "pairs" / f"round{rnd:05d}", pair_ids, traj.images, prompts)
        choices = oracle(pair_ids, traj.images[0::2], traj.images[1::2], prompts, metadata)
        # every pair is trained, ties with h = (0, 0) (official): each round takes the same number of steps
        metrics = {"tie_fraction": (choices == TIE).float().mean(),
                   "reward_mean": reward_fn(traj.images, traj.prompts,
                                            [m for m in metadata for _ in range(2)])[0].mean()}
        with accelerator.autocast():
            metrics.update(train_on_pairs(config, adapter, traj, preference_signs(choices), optimizer,
                                          gens["data"], reduce, where=f"round {rnd}"))
        metrics["seconds"] = time.time() - start
        if (rnd % config.eval_every == 0 or rnd == config.rounds) and accelerator.is_main_process:
            metrics.update(evaluation())
        log.log(rnd, metrics)
        if ckpt.due(rnd) or rnd == config.rounds:
            ckpt.save(rnd, model_params=params, optimizer=optimizer, generators=gens)
    log.close()
    if accelerator.is_main_process and config.figures:
        write_figures(config, adapter, reward_fn, eval_prompts, eval_meta, out)
    return read_metrics(out / "metrics.jsonl") if accelerator.is_main_process else []
# --8<-- [end:train]


def write_figures(config: Config, adapter, reward_fn, prompts: list[str], metadata, out: Path) -> None:
    """reward_curve.png (hidden reward of the fixed evaluation samples) and before_after.png."""
    plot_curve(out / "metrics.jsonl", "eval_reward", out / "reward_curve.png",
               title=f"D3PO: hidden {config.reward} (oracle choices only)")
    with adapter.disable_adapter():
        before = evaluate(config, adapter, reward_fn, prompts[:4], metadata[:4])[0]
    after = evaluate(config, adapter, reward_fn, prompts[:4], metadata[:4])[0]
    image_grid(torch.cat([before, after]), nrow=len(before), out_png=out / "before_after.png",
               labels=["base", "trained"])


def main(argv=None) -> list[dict]:
    return train(parse_config(Config, argv, description=__doc__.split("\n\n")[0]))
