"""Diffusion-DPO: Diffusion Model Alignment Using Direct Preference Optimization (Wallace et al., CVPR 2024).

Docs page: generated/papers/diffusion_dpo.md. Bib key: wallace2023diffusion (survey.bib).
Official code: github.com/SalesforceAIResearch/DiffusionDPO at 5233e75 (train.py, launchers/sd15.sh).
LoRA port: huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py at 071190d.
Velocity target (Flow-DPO): yifan123/flow_grpo scripts/train_sd3_dpo.py.

DPO needs the likelihood ratio of whole images, which a diffusion model does not give; Diffusion-DPO bounds
it by the denoising error at one random timestep. Noise the preferred image (winner) and the rejected one
(loser) with the SAME timestep and noise, and reward the model for lowering its error on the winner more
than on the loser, each relative to the frozen reference:
    loss = -log sigmoid(-k [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])
Training is offline on (prompt, winner, loser) images; the SFT baseline fits the winners only.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageOps
from torch import Tensor

from common.config import option, parse_config, require
from common.losses import denoising_error, dpo_logistic_loss, noisy_state
from common.models.base import DiffusionAdapter, PromptEmbeds
from common.models.load import load_adapter, require_model
from common.rewards import REWARD_NAMES, load_reward
from common.rollout import rollout
from common.steps import ode_step
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


@dataclass
class Config:
    """Diffusion-DPO (and its SFT baseline). Defaults marked "toy" are scaled down for a CPU."""

    # ---- model, data, run ----
    model: str = option("toy-unet", "toy-unet / tiny-sd (eps target), toy-flow / tiny-sd3 / tiny-flux (velocity "
                        "target, Flow-DPO) or a local diffusers directory")
    pairs: str | None = option(None, "JSONL of {prompt, winner, loser} image paths; None: toy pairs from the base")
    heldout_pairs: str | None = option(None, "JSONL of held-out pairs for implicit accuracy (toy: its own split)")
    method: str = option("dpo", "dpo, or sft: denoising loss on winners only (official --sft)", choices=("dpo", "sft"))
    out_dir: str = option("runs/diffusion_dpo", "metrics, figures, toy pairs and checkpoints go here")
    seed: int = option(0, "random seed")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    dtype: str = option("fp32", "weights and autocast (official: fp16 mixed precision)", choices=("fp32", "bf16"))
    lora_rank: int = option(0, "0: full fine-tuning, frozen copy as reference (official); >0: LoRA, LoRA-off "
                            "reference (diffusers port: 8)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (real pipelines)")
    resolution: int | None = option(None, "training image size; None = the model's default")
    # ---- the DPO objective ----
    beta: float = option(5000.0, "beta_dpo: official launchers 5000 (k = beta/2); diffusers port 2500 (k = "
                         "beta); flow_grpo Flow-DPO 100 (k = 50)")
    beta_convention: str = option("official", "official: k = beta / 2 (train.py -0.5 * beta); diffusers: k = beta",
                                  choices=("official", "diffusers"))
    share_noise: bool = option(True, "pair shares t and noise (official chunk(2)[0].repeat(2)); False: ablation")
    caption_dropout: float = option(0.2, "empty prompt for the pair; official proportion_empty_prompts 0.2")
    hflip: bool = option(False, "flip both images at random; official on, toy off (prompts say left/right)")
    # ---- optimisation ----
    steps: int = option(150, "optimizer steps; official 2000, toy 150")
    batch_size: int = option(16, "pairs per process per step; official 1 x 128 accumulation x 16 GPUs, toy 16")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step; official 128")
    learning_rate: float = option(2.048e-5, "AdamW lr; official 1e-8 x 2048 (scale_lr); diffusers LoRA 1e-5")
    warmup_steps: int = option(10, "linear warm-up, then constant; official 500 (SD1.5), toy 10")
    weight_decay: float = option(1e-2, "AdamW weight decay; official 1e-2")
    max_grad_norm: float = option(1.0, "gradient clipping; official 1.0")
    # ---- toy pairs, evaluation, checkpoints ----
    reward: str = option("jpeg_compressibility", "hidden reward labelling toy pairs and scoring samples",
                         choices=REWARD_NAMES)
    tasks: list[str] = option(["single_object", "colors", "two_object"], "toy tasks the prompts are drawn from")
    num_pairs: int = option(384, "toy training pairs (two base samples per prompt, ties dropped)")
    num_heldout: int = option(128, "toy held-out pairs")
    heldout_draws: int = option(4, "shared (t, eps) draws averaged per held-out pair")
    sample_steps: int = option(10, "ODE steps for toy pairs and evaluation; toy bases 20, toy 10")
    guidance_scale: float = option(4.5, "CFG scale for toy pairs and evaluation; toy bases 4.5")
    eval_prompts: int = option(64, "evaluation prompts, two samples each (fixed scenes and noise)")
    eval_every: int = option(50, "evaluate every this many steps (and at 0 and the end)")
    save_every: int = option(50, "checkpoint every this many steps; a rerun resumes from the newest")
    figures: bool = option(True, "write reward_curve.png and before_after.png at the end")

    def __post_init__(self) -> None:
        require_model(self.model)
        for name in ("pairs", "heldout_pairs"):
            require(getattr(self, name) is None or Path(getattr(self, name)).is_file(), name, "no such file")
        require(self.pairs is not None or self.model.startswith("toy-"), "pairs",
                "toy pairs are drawn from a toy model; give --pairs for other models")
        require(self.reward in REWARD_NAMES, "reward", f"unknown {self.reward!r}; choose from {REWARD_NAMES}")
        require(all(t in TASKS for t in self.tasks) and len(self.tasks) > 0, "tasks", f"choose from {TASKS}")
        require(self.beta > 0 and self.learning_rate > 0, "beta", "beta and learning_rate must be > 0")
        require(0 <= self.caption_dropout < 1, "caption_dropout", "must lie in [0, 1)")
        for name in ("lora_rank", "steps", "warmup_steps", "num_heldout"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("batch_size", "gradient_accumulation_steps", "num_pairs", "heldout_draws", "sample_steps",
                     "eval_prompts", "eval_every", "save_every"):
            require(getattr(self, name) >= 1, name, "must be >= 1")


# --8<-- [start:pairs]
@dataclass
class PreferencePairs:
    """Offline pairs: for prompts[i], image winners[i] is preferred to losers[i]. On disk: a JSONL file, one
    {"prompt", "winner", "loser"} per line, image paths relative to the file; images are read per batch."""

    prompts: list[str]
    winners: list[Path]
    losers: list[Path]

    def __len__(self) -> int:
        return len(self.prompts)


def read_pairs(path: str | Path) -> PreferencePairs:
    """Read a pairs JSONL file; errors name the line, or the item and the missing image."""
    path, rows = Path(path), []
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            rows.append(json.loads(line))
            missing = [key for key in ("prompt", "winner", "loser") if key not in rows[-1]]
            if missing:
                raise ValueError(f"{path}: line {k} lacks {missing} (need prompt, winner, loser)")
    pairs = PreferencePairs([str(r["prompt"]) for r in rows], [path.parent / r["winner"] for r in rows],
                            [path.parent / r["loser"] for r in rows])
    for i, (w, lo) in enumerate(zip(pairs.winners, pairs.losers)):
        for role, image in (("winner", w), ("loser", lo)):
            if not image.is_file():
                raise ValueError(f"pairs: item {i} ({pairs.prompts[i]!r}): {role} image {image} does not exist")
    return pairs


def write_pairs(path: str | Path, prompts: list[str], winners: Tensor, losers: Tensor) -> PreferencePairs:
    """Save images (N, 3, H, W) in [0, 1] as PNGs in <stem>_images/ next to the JSONL file `path`."""
    path = Path(path)
    if not len(prompts) == len(winners) == len(losers):
        raise ValueError(f"pairs: {len(prompts)} prompts, {len(winners)} winners, {len(losers)} losers")
    for role, images in (("winners", winners), ("losers", losers)):
        bad = ((images < 0) | (images > 1) | images.isnan()).flatten(1).any(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"pairs: {role}[{i}] ({prompts[i]!r}) has values outside [0, 1]")
    folder = path.parent / f"{path.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt, "winner": f"{folder.name}/{i:06d}_w.png", "loser": f"{folder.name}/{i:06d}_l.png"}
        for key, images in (("winner", winners), ("loser", losers)):
            Image.fromarray((images[i] * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
                path.parent / row[key])
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return read_pairs(path)


def load_image(path: Path, resolution: tuple[int, int], item: int) -> Tensor:
    """(3, H, W) in [0, 1], resized on the shorter side and centre-cropped (official: Resize + crop)."""
    try:
        image = ImageOps.fit(Image.open(path).convert("RGB"), resolution[::-1], Image.BILINEAR)
    except OSError as err:
        raise ValueError(f"pairs: item {item}: cannot read image {path} ({err})") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
# --8<-- [end:pairs]


# --8<-- [start:noising]
def forward_noise(adapter: DiffusionAdapter, x0: Tensor, share_noise: bool,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t for the denoiser, regression target) for a batch [winners; losers] of 2B states.

    eps models: t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps (official train.py).
    flow models: u ~ logit-normal(0, 1), sigma = scheduler sigma at index floor(1000 u), t = 1000 sigma,
    x_t = (1 - sigma) x0 + sigma eps, target eps - x0 (flow_grpo train_sd3_dpo.py).
    share_noise: the loser half reuses the winner half's t and eps (official `chunk(2)[0].repeat(2)`).
    """
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device="cpu" if generator is None else generator.device)
    if adapter.prediction == "epsilon":
        abar = adapter.scheduler.alphas_cumprod.float()
        index = torch.randint(0, len(abar), (n,), generator=generator, device=noise.device)
    else:
        sigmas = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config).sigmas.float()
        u = torch.sigmoid(torch.randn(n, generator=generator, device=noise.device))
        index = (u * len(sigmas)).long().clamp(max=len(sigmas) - 1)
    if share_noise:
        noise, index = noise.chunk(2)[0].repeat(2, 1, 1, 1), index.chunk(2)[0].repeat(2)
    noise, index = noise.to(x0.device, torch.float32), index.to(x0.device)
    x0 = x0.float()
    if adapter.prediction == "epsilon":
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps
        x_t, target = noisy_state(x0, noise, abar.to(x0.device)[index], "epsilon")
        return x_t, index, target
    s = sigmas.to(x0.device)[index]
    # x_s = (1 - s) x0 + s eps, target eps - x0; the transformer sees t = 1000 s
    x_t, target = noisy_state(x0, noise, s, "flow")
    return x_t, s * 1000, target
# --8<-- [end:noising]


# --8<-- [start:loss]
def pair_errors(adapter: DiffusionAdapter, reference, x_w: Tensor, x_l: Tensor, cond: PromptEmbeds,
                share_noise: bool, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Per-sample errors e = mean_d (prediction - target)^2 of the policy (with grad) and of the reference
    (no grad) on the batch [winners; losers], all noised by `forward_noise`."""
    x_t, t, target = forward_noise(adapter, torch.cat([x_w, x_l]), share_noise, generator)
    both = PromptEmbeds.cat([cond, cond])
    err = denoising_error(adapter.predict(x_t, t, both), target)
    with torch.no_grad():
        ref_err = denoising_error(reference.predict(x_t, t, both), target)
    return err, ref_err


def dpo_loss(config: Config, adapter: DiffusionAdapter, reference, x_w: Tensor, x_l: Tensor, cond: PromptEmbeds,
             generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss on a batch of pairs (official train.py); states x_w, x_l of shape (B, C, H, W).

    loss = -log sigmoid(-k [(e_w - e_ref_w) - (e_l - e_ref_l)]), k = beta/2 (official) or beta (diffusers).
    """
    err, ref_err = pair_errors(adapter, reference, x_w, x_l, cond, config.share_noise, generator)
    (err_w, err_l), (ref_w, ref_l) = err.chunk(2), ref_err.chunk(2)
    loss, acc = dpo_logistic_loss(err_w, err_l, ref_w, ref_l, config.beta, convention=config.beta_convention)
    return loss, {"implicit_acc": acc, "model_mse": err.detach().mean(), "ref_mse": ref_err.mean()}


def sft_loss(adapter: DiffusionAdapter, x_w: Tensor, cond: PromptEmbeds, generator: torch.Generator | None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT baseline (official --sft): the pretraining loss mean (prediction - target)^2 on winners only."""
    x_t, t, target = forward_noise(adapter, x_w, share_noise=False, generator=generator)
    loss = F.mse_loss(adapter.predict(x_t, t, cond).float(), target)
    return loss, {"model_mse": loss.detach()}
# --8<-- [end:loss]


def pair_batch(config: Config, adapter: DiffusionAdapter, pairs: PreferencePairs, index: list[int],
               generator: torch.Generator, augment: bool = True) -> tuple[Tensor, Tensor, PromptEmbeds]:
    """States of the winners and losers of items `index` and their prompt embeddings. With `augment`, both
    images of a pair get the same horizontal flip (--hflip) and lose the caption together (official)."""
    w, lo = (torch.stack([load_image(paths[i], adapter.resolution, i) for i in index])
             for paths in (pairs.winners, pairs.losers))
    prompts = [pairs.prompts[i] for i in index]
    if augment and config.hflip:
        flip = (torch.rand(len(index), generator=generator) < 0.5).view(-1, 1, 1, 1)
        w, lo = torch.where(flip, w.flip(-1), w), torch.where(flip, lo.flip(-1), lo)
    if augment:
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
    # the VAE posterior is sampled, as the official trainer does (latent_dist.sample())
    x_w, x_l = adapter.encode(w, generator, sample=True), adapter.encode(lo, generator, sample=True)
    return x_w, x_l, adapter.encode_prompts(prompts)


# --8<-- [start:heldout]
@torch.no_grad()
def heldout_accuracy(config: Config, adapter: DiffusionAdapter, reference, pairs: PreferencePairs,
                     batch_size: int = 64) -> float:
    """Implicit accuracy on held-out pairs: fraction with -k E[Delta] > 0, where E[Delta] averages
    `heldout_draws` shared (t, eps) draws, the same seeded draws at every evaluation (ties count as wrong)."""
    generator, correct = torch.Generator().manual_seed(config.seed + 4242), 0
    for start in range(0, len(pairs), batch_size):
        index = list(range(start, min(start + batch_size, len(pairs))))
        x_w, x_l, cond = pair_batch(config, adapter, pairs, index, generator, augment=False)
        delta = torch.zeros(len(index), device=adapter.device)
        for _ in range(config.heldout_draws):
            err, ref_err = pair_errors(adapter, reference, x_w, x_l, cond, True, generator)
            gap_w, gap_l = (err - ref_err).chunk(2)
            # Delta = (e_w - e_ref_w) - (e_l - e_ref_l)
            delta += gap_w - gap_l
        correct += int((delta < 0).sum())
    return correct / max(len(pairs), 1)


def gradient_noise(config: Config, adapter: DiffusionAdapter, reference, x_w: Tensor, x_l: Tensor,
                   cond: PromptEmbeds, draws: int = 3) -> dict[str, float]:
    """Mean squared norm of the DPO gradient of one batch over `draws` (t, eps) draws, with the noise shared
    inside each pair and with it drawn independently for winner and loser, at policy = reference.
    There sigmoid(0) = 1/2 for every pair, so both gradients have the same expectation (k/2) grad E[e_w - e_l];
    E|g|^2 = |E g|^2 + tr Cov(g), and the independent-minus-shared difference is pure noise."""
    params, out = adapter.trainable_parameters(), {}
    for share in (True, False):
        generator, total = torch.Generator().manual_seed(config.seed + 777), 0.0
        for _ in range(draws):
            err, ref_err = pair_errors(adapter, reference, x_w, x_l, cond, share, generator)
            (err_w, err_l), (ref_w, ref_l) = err.chunk(2), ref_err.chunk(2)
            loss, _ = dpo_logistic_loss(err_w, err_l, ref_w, ref_l, config.beta, convention=config.beta_convention)
            total += sum(float(g.float().square().sum()) for g in torch.autograd.grad(loss, params))
        out["grad_sq_" + ("shared" if share else "independent")] = total / draws
    return out
# --8<-- [end:heldout]


def frozen_reference(adapter: DiffusionAdapter) -> DiffusionAdapter:
    """Official reference for full fine-tuning: the adapter with a frozen copy of the initial denoiser
    (text encoders and VAE are shared)."""
    reference, frozen = copy.copy(adapter), copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
    for name, value in vars(adapter).items():
        if value is adapter.denoiser:  # `denoiser` and its family name (`unet`, `transformer`)
            setattr(reference, name, frozen)
    return reference


class LoraOff:
    """The diffusers port's reference for LoRA: the same adapter with its LoRA switched off."""

    def __init__(self, adapter: DiffusionAdapter):
        self.adapter = adapter

    def predict(self, *args, **kwargs) -> Tensor:
        with self.adapter.disable_adapter():
            return self.adapter.predict(*args, **kwargs)


@torch.no_grad()
def sample_images(config: Config, adapter: DiffusionAdapter, prompts: list[str], per_prompt: int,
                  seed: int) -> Tensor:
    """ODE samples (DDIM eta=0 / Euler) with CFG, from seeded noise, images in [0, 1]."""
    traj = rollout(adapter, prompts, group_size=per_prompt, num_steps=config.sample_steps, step_fn=ode_step,
                   window=(0, 0), guidance_scale=config.guidance_scale,
                   generator=torch.Generator(adapter.device).manual_seed(seed))
    return traj.images


@torch.no_grad()
def make_toy_pairs(config: Config, adapter: DiffusionAdapter, reward_fn, n: int, path: Path, seed: int
                   ) -> PreferencePairs:
    """Two base-model samples per toy prompt, labelled by the hidden reward (higher wins), ties dropped,
    written as PNG + JSONL: the offline data the paper gets from people (Pick-a-Pic)."""
    generator = torch.Generator().manual_seed(seed)
    scenes = sample_prompts(int(n * 1.25) + 8, config.tasks, generator)  # spare prompts for dropped ties
    prompts, metadata = [p for p, _ in scenes], [m for _, m in scenes]
    images = torch.cat([sample_images(config, adapter, prompts[k:k + 128], 2, seed + k)
                        for k in range(0, len(prompts), 128)])
    scores = reward_fn(images, [p for p in prompts for _ in range(2)],
                       [m for m in metadata for _ in range(2)])[0].view(-1, 2).cpu()
    keep = (scores[:, 0] != scores[:, 1]).nonzero().squeeze(1)[:n]
    win = (scores[keep, 1] > scores[keep, 0]).long()  # which of the two is the winner
    images = images.view(-1, 2, *images.shape[1:]).cpu()
    return write_pairs(path, [prompts[k] for k in keep], images[keep, win], images[keep, 1 - win])


def load_pairs(config: Config, adapter, reward_fn, accelerator, out: Path
               ) -> tuple[PreferencePairs, PreferencePairs | None]:
    """The given pair files, or toy pairs drawn once from the base (written under out/pairs/)."""
    if config.pairs is not None:
        return read_pairs(config.pairs), read_pairs(config.heldout_pairs) if config.heldout_pairs else None
    files = out / "pairs" / "train.jsonl", out / "pairs" / "heldout.jsonl"
    if accelerator.is_main_process and not files[1].is_file():
        with accelerator.autocast():
            for path, n, seed in zip(files, (config.num_pairs, config.num_heldout), (config.seed, config.seed + 1)):
                make_toy_pairs(config, adapter, reward_fn, n, path, seed)
    accelerator.wait_for_everyone()
    return read_pairs(files[0]), read_pairs(files[1])


# --8<-- [start:train]
def train(config: Config) -> list[dict]:
    """Offline DPO (or SFT): each step draws `batch_size` pairs, encodes them, and takes one AdamW step on
    the loss, with constant lr after a linear warm-up (official). Returns the metrics records."""
    seed_everything(config.seed)
    accelerator = make_accelerator(mixed_precision="bf16" if config.dtype == "bf16" else "no",
                                   cpu=config.device == "cpu" if config.device else None)
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None,
                           device=accelerator.device)
    if config.resolution is not None:
        adapter.resolution = (config.resolution, config.resolution)
    rank, world, out = accelerator.process_index, accelerator.num_processes, Path(config.out_dir)
    reward_fn = load_reward(config.reward) if config.model.startswith("toy-") else None

    pairs, heldout = load_pairs(config, adapter, reward_fn, accelerator, out)
    # trained parameters and the frozen reference
    if config.lora_rank > 0:
        adapter.add_lora(config.lora_rank, config.lora_rank)  # default init: B = 0, policy starts at the base
        reference = LoraOff(adapter)
    else:
        reference = frozen_reference(adapter)
        adapter.denoiser.requires_grad_(True)
    for p in adapter.trainable_parameters():
        p.data = p.data.float()  # trained weights (and their AdamW state) stay fp32 under bf16
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = accelerator.prepare(make_optimizer(adapter.trainable_parameters(), lr=config.learning_rate,
                                                   weight_decay=config.weight_decay))

    gens = {"data": torch.Generator().manual_seed(config.seed),  # same pair order on every rank
            "noise": torch.Generator().manual_seed(config.seed + 1 + rank)}
    eval_scenes = sample_prompts(config.eval_prompts, config.tasks, torch.Generator().manual_seed(12345))
    eval_prompts, eval_meta = [p for p, _ in eval_scenes], [m for _, m in eval_scenes]
    log = MetricsLogger(out / "metrics.jsonl", total=config.steps, disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=config.save_every, accelerator=accelerator)
    params = trainable_state_dict(adapter.denoiser)
    step = ckpt.load_latest(model_params=params, optimizer=optimizer, generators=gens, metrics=log) or 0

    first = []  # per-sample rewards at the first evaluation: later gains are paired with them

    def evaluation(at_start: bool = False) -> dict[str, float]:
        adapter.denoiser.eval()
        with accelerator.autocast():
            metrics = {}
            if reward_fn is not None:  # hidden reward of fixed-noise ODE samples, 2 per prompt
                images = sample_images(config, adapter, eval_prompts, 2, config.seed + 999)
                scores = reward_fn(images, [p for p in eval_prompts for _ in range(2)],
                                   [m for m in eval_meta for _ in range(2)])[0].float().cpu()
                if not first:
                    first.append(scores)
                gain = scores - first[0]
                metrics.update(eval_reward=scores.mean(), eval_gain_se=gain.std() / len(gain) ** 0.5)
            if at_start and reward_fn is not None:  # toy diagnostic on the first batch: shared vs independent
                x_w, x_l, cond = pair_batch(config, adapter, pairs, list(range(min(config.batch_size, len(pairs)))),
                                            torch.Generator().manual_seed(config.seed), augment=False)
                metrics.update(gradient_noise(config, adapter, reference, x_w, x_l, cond))
            # at step 0 the policy is the reference, every Delta is exactly 0 (tier-1 tested): accuracy 0
            if heldout is not None and len(heldout) and not at_start:
                metrics["heldout_acc"] = heldout_accuracy(config, adapter, reference, heldout)
        return metrics

    if step == 0 and accelerator.is_main_process:
        log.log(0, evaluation(at_start=True))
    accum = config.gradient_accumulation_steps
    while step < config.steps:
        stats = {}
        adapter.denoiser.train()
        for group in optimizer.param_groups:  # official constant_with_warmup: linear ramp, then constant
            group["lr"] = config.learning_rate * min(1.0, (step + 1) / (config.warmup_steps + 1))
        for _ in range(accum):
            index = torch.randint(len(pairs), (config.batch_size * world,), generator=gens["data"])[rank::world]
            x_w, x_l, cond = pair_batch(config, adapter, pairs, index.tolist(), gens["noise"])
            with accelerator.autocast():
                if config.method == "dpo":
                    loss, info = dpo_loss(config, adapter, reference, x_w, x_l, cond, gens["noise"])
                else:
                    loss, info = sft_loss(adapter, x_w, cond, gens["noise"])
            accelerator.backward(loss / accum)
            for k, v in {"loss": loss.detach(), **info}.items():
                stats[k] = stats.get(k, 0.0) + float(v) / accum
        for p in adapter.trainable_parameters():  # data parallel: average gradients over processes
            if world > 1 and p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")
        stats["grad_norm"] = float(accelerator.clip_grad_norm_(adapter.trainable_parameters(), config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if (step % config.eval_every == 0 or step == config.steps) and accelerator.is_main_process:
            stats.update(evaluation())
        log.log(step, stats)
        if ckpt.due(step) or step == config.steps:
            ckpt.save(step, model_params=params, optimizer=optimizer, generators=gens)
    log.close()
    if accelerator.is_main_process and reward_fn is not None and config.figures:
        write_figures(config, adapter, reference, eval_prompts, out)
    return read_metrics(out / "metrics.jsonl") if accelerator.is_main_process else []
# --8<-- [end:train]


def write_figures(config: Config, adapter: DiffusionAdapter, reference, prompts: list[str], out: Path) -> None:
    """reward_curve.png (hidden reward of evaluation samples), before_after.png (reference vs trained)."""
    plot_curve(out / "metrics.jsonl", "eval_reward", out / "reward_curve.png",
               title=f"Diffusion-DPO ({config.method}): hidden {config.reward}")
    lora = isinstance(reference, LoraOff)
    with adapter.disable_adapter() if lora else contextlib.nullcontext():
        before = sample_images(config, adapter if lora else reference, prompts[:8], 1, config.seed + 7)
    after = sample_images(config, adapter, prompts[:8], 1, config.seed + 7)
    image_grid(torch.cat([before, after]), nrow=len(before), out_png=out / "before_after.png",
               labels=["base", "trained"])


def main(argv=None) -> list[dict]:
    return train(parse_config(Config, argv, description=__doc__.split("\n\n")[0]))
