"""The toy image tokenizer: a small `diffusers.VQModel` that turns 16x16 toy-world images into a grid
of discrete codes and back. It is the tokenizer of the toy image-token generators (AR and masked).

    python -m common.toy.vq --train      # trains and ships common/toy/bases/vq.safetensors + vq.json
    python -m common.toy.vq --rescore    # re-measures the shipped tokenizer and updates its card

Model: VQ-VAE (van den Oord et al. 2017) as diffusers builds it for VQ-GAN / Kandinsky: conv encoder ->
1x1 conv -> nearest-codebook quantiser with straight-through gradients -> 1x1 conv -> conv decoder.
Training loss (diffusers' `VectorQuantizer`, legacy form, beta = 0.25):

    L = |x - D(z_q)|^2 + |sg[z_q] - z|^2 + beta |z_q - sg[z]|^2

(reconstruction + the VQ terms diffusers returns as `commit_loss`), images scaled to [-1, 1].
One addition to plain training, common in VQ code (e.g. the "dead code restart" of Jukebox, Dhariwal
et al. 2020): codes that no encoder output picked during the last `restart_every` steps are moved onto
random encoder outputs of the current batch, so the codebook is used rather than collapsing onto a few
entries. Restarts stop after 3/4 of training so that the final codebook is settled.

Quality is measured with the toy evaluator: toy GenEval of `decode(encode(drawing))` against the
drawings' own score on the bases' fixed evaluation prompts (`common.toy.train_bases.eval_prompts`),
plus pixel error and codebook usage; all recorded in the card ("quality", 50 prompts per task, and
"quality_check", 4 per task, which the tests reproduce).

API: `load_toy_vq()` -> `ToyVQ`; `ToyVQ.encode(images (B, 3, 16, 16) in [0, 1]) -> (B, h, w) long`,
`ToyVQ.decode(codes (B, h, w)) -> (B, 3, 16, 16) in [0, 1]`; `vq_card()` the JSON card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import VQModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.toy.evaluator import geneval_scores
from common.toy.world import IMAGE_SIZE, TASKS, dataset, draw, sample_scene

BASES_DIR = Path(__file__).resolve().parent / "bases"
EVAL_SEED = 1234  # the toy bases' evaluation prompts (common.toy.train_bases.EVAL_SEED)
DRAW_SEED = 99  # the generator that draws the evaluation scenes
#: prompts per task of the small evaluation the card also records, which the tests reproduce exactly
CHECK_PER_TASK = 4

#: the shipped architecture: 16x16 -> 8x8 codes (two blocks, one 2x downsampling), 128 codes of
#: dimension 8, 170k parameters. A 4x4 grid does not keep the shapes: at the same budget (800 steps of
#: 32 images) reconstructions scored toy-GenEval overall 0.40 with 128 codes and 0.50 with 512 codes
#: (blocks 16, 32, 64), against 0.93 for this 8x8 grid (20 prompts per task; drawings score 1.0).
DEFAULT_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 8, "vq_embed_dim": 8,
    "num_vq_embeddings": 128, "norm_num_groups": 8, "sample_size": IMAGE_SIZE,
}


def build_toy_vq(config: dict | None = None, seed: int = 0) -> ToyVQ:
    """A randomly initialised (seeded) tokenizer; `config` are VQModel keyword arguments."""
    config = dict(DEFAULT_CONFIG if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQModel(**config)
    return ToyVQ(model)


class ToyVQ(torch.nn.Module):
    """A VQModel with index-level encode / decode on [0, 1] images."""

    def __init__(self, model: VQModel):
        super().__init__()
        self.model = model
        downsample = 2 ** (len(model.config.block_out_channels) - 1)
        self.grid = IMAGE_SIZE // downsample  #: the code grid is (grid, grid)
        self.codebook_size = int(model.config.num_vq_embeddings)

    @property
    def num_tokens(self) -> int:
        """Codes per image, N = h * w (raster order)."""
        return self.grid * self.grid

    def latents(self, images: Tensor) -> Tensor:
        """Pre-quantisation encoder output (B, C, h, w) of images in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images: expected (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        return self.model.encode(images.float() * 2 - 1).latents

    def encode(self, images: Tensor) -> Tensor:
        """Codes (B, h, w) long, raster order when flattened, of images (B, 3, 16, 16) in [0, 1]."""
        z = self.latents(images)
        # diffusers returns the indices flat, (B * h * w,), from z permuted to (B, h, w, C)
        _, _, (_, _, idx) = self.model.quantize(z)
        return idx.reshape(z.shape[0], z.shape[2], z.shape[3]).long()

    def decode(self, codes: Tensor) -> Tensor:
        """Images (B, 3, 16, 16) in [0, 1] from codes (B, h, w) (or (B, h * w) in raster order)."""
        if codes.ndim == 2 and codes.shape[1] == self.num_tokens:
            codes = codes.reshape(-1, self.grid, self.grid)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"codes: expected (B, {self.grid}, {self.grid}) or (B, {self.num_tokens}), "
                             f"got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32) or codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes: expected integer ids in [0, {self.codebook_size}), got dtype {codes.dtype}")
        b, h, w = codes.shape
        dim = self.model.quantize.vq_embed_dim
        z_q = self.model.quantize.get_codebook_entry(codes.reshape(-1).long(), (b, h, w, dim))
        out = self.model.decode(z_q, force_not_quantize=True).sample
        return ((out.float() + 1) / 2).clamp(0, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(encode(images))."""
        return self.decode(self.encode(images))


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def save_toy_vq(vq: ToyVQ, path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in vq.model.state_dict().items()}, str(path))


def vq_card(path: str | Path | None = None) -> dict:
    """The JSON card shipped next to the tokenizer weights."""
    path = Path(path) if path is not None else BASES_DIR / "vq.json"
    return json.loads(path.read_text())


def load_toy_vq(path: str | Path | None = None) -> ToyVQ:
    """The shipped tokenizer (or weights saved by `train` at `path`, with its card beside it), in eval mode."""
    path = Path(path) if path is not None else BASES_DIR / "vq.safetensors"
    if not path.is_file():
        raise ValueError(f"path: no tokenizer weights at {path}; train them with `python -m common.toy.vq --train`")
    vq = build_toy_vq(vq_card(path.with_suffix(".json"))["config"])
    vq.model.load_state_dict(load_file(str(path)), strict=True)
    return vq.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def eval_scenes(per_task: int, seed: int = EVAL_SEED) -> tuple[Tensor, list[dict]]:
    """Drawings of the bases' fixed evaluation prompts (`per_task` per task) and their metadata.

    The prompts are those of `common.toy.train_bases.eval_prompts` (rebuilt here so that this module
    does not pull in the diffusion bases).
    """
    prompt_generator = torch.Generator().manual_seed(seed)
    metas = [sample_scene(task, prompt_generator) for task in TASKS for _ in range(per_task)]
    generator = torch.Generator().manual_seed(DRAW_SEED)
    return torch.stack([draw(m, generator) for m in metas]), metas


@torch.no_grad()
def evaluate_vq(vq: ToyVQ, per_task: int = 50, batch_size: int = 256) -> dict:
    """Toy GenEval of the drawings and of their reconstructions, pixel error, codebook usage."""
    images, metas = eval_scenes(per_task)
    codes = torch.cat([vq.encode(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
    recon = torch.cat([vq.decode(codes[i: i + batch_size]) for i in range(0, len(codes), batch_size)])
    mse = F.mse_loss(recon, images).item()
    counts = torch.bincount(codes.flatten(), minlength=vq.codebook_size).float()
    p = counts / counts.sum()
    # perplexity = exp(entropy of the code histogram)
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return {
        "eval_prompts_per_task": per_task, "eval_seed": EVAL_SEED, "draw_seed": DRAW_SEED,
        "toy_geneval_drawings": geneval_scores(images, metas),
        "toy_geneval_reconstructed": geneval_scores(recon, metas),
        "mse": round(mse, 6), "psnr": round(-10 * torch.log10(torch.tensor(mse)).item(), 2),
        "codes_used": int((counts > 0).sum()), "perplexity": round(perplexity, 2),
    }


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, flush=True)


def train(steps: int = 1500, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, num_images: int = 10000,
          restart_every: int = 100, config: dict | None = None, eval_per_task: int = 50,
          out_dir: Path | None = BASES_DIR, log=_log) -> tuple[ToyVQ, dict]:
    """Train the tokenizer on drawn scenes of all six tasks; write weights and card to out_dir (if given)."""
    if steps < 1 or batch_size < 1 or num_images < batch_size:
        raise ValueError(f"steps, batch_size, num_images: need steps >= 1 and num_images >= batch_size >= 1, "
                         f"got {steps}, {batch_size}, {num_images}")
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vq = build_toy_vq(config, seed)
    model = vq.model.train()
    images, _, _ = dataset(num_images, seed=seed)
    x_all = images * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay to 0 after a 100-step linear warm-up
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    used = torch.zeros(vq.codebook_size, dtype=torch.bool)
    restarts = 0
    for step in range(1, steps + 1):
        x = x_all[torch.randint(num_images, (batch_size,), generator=generator)]
        z = model.encode(x).latents
        z_q, commit_loss, (_, _, idx) = model.quantize(z)
        recon = model.decode(z_q, force_not_quantize=True).sample
        # L = |x - D(z_q)|^2 + |sg[z_q] - z|^2 + beta |z_q - sg[z]|^2
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + commit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        used[idx] = True
        if step % restart_every == 0:
            dead = (~used).nonzero().flatten()
            if len(dead) and step <= 3 * steps // 4:
                # dead-code restart: move unused codes onto random encoder outputs of this batch
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                pick = torch.randint(len(flat), (len(dead),), generator=generator)
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = flat[pick]
                restarts += len(dead)
            used.zero_()
        if step % 100 == 0 or step == 1:
            log(f"[vq] step {step} rec {rec_loss.item():.5f} vq {commit_loss.item():.5f} "
                f"restarted {restarts} ({time.time() - start:.0f}s)")
    vq.eval().requires_grad_(False)
    metrics = evaluate_vq(vq, eval_per_task)
    seconds = round(time.time() - start, 1)
    log(f"[vq] done in {seconds}s: " + json.dumps(metrics))
    card = {
        "model_class": "diffusers.VQModel",
        "config": dict(DEFAULT_CONFIG if config is None else config),
        "params": sum(p.numel() for p in model.parameters()),
        "grid": [vq.grid, vq.grid], "codebook_size": vq.codebook_size,
        "train": {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "num_images": num_images,
                  "restart_every": restart_every, "codes_restarted": restarts, "threads": torch.get_num_threads(),
                  "seconds": seconds},
        "command": "python -m common.toy.vq " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "quality": metrics,
        "quality_check": evaluate_vq(vq, CHECK_PER_TASK),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_toy_vq(vq, out_dir / "vq.safetensors")
        (out_dir / "vq.json").write_text(json.dumps(card, indent=2) + "\n")
    return vq, card


def rescore(per_task: int = 50, out_dir: Path = BASES_DIR) -> dict:
    """Re-measure the shipped tokenizer with the current evaluator and update its card."""
    path = Path(out_dir) / "vq.json"
    card = json.loads(path.read_text())
    vq = load_toy_vq(Path(out_dir) / "vq.safetensors")
    card["quality"] = evaluate_vq(vq, per_task)
    card["quality_check"] = evaluate_vq(vq, CHECK_PER_TASK)
    card["rescored"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train and ship the tokenizer")
    parser.add_argument("--rescore", action="store_true", help="re-measure the shipped tokenizer, update its card")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=10000, help="drawn training scenes")
    parser.add_argument("--restart-every", type=int, default=100, help="dead-code restart period (steps)")
    parser.add_argument("--codebook-size", type=int, default=DEFAULT_CONFIG["num_vq_embeddings"])
    parser.add_argument("--grid", type=int, default=8, choices=(4, 8), help="code grid side (8: 64 codes, 4: 16)")
    parser.add_argument("--eval-per-task", type=int, default=50)
    parser.add_argument("--out-dir", type=Path, default=BASES_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rescore:
        print(json.dumps(rescore(args.eval_per_task, args.out_dir)["quality"]))
        return
    if not args.train:
        parser.error("choose --train or --rescore")
    config = dict(DEFAULT_CONFIG, num_vq_embeddings=args.codebook_size)
    if args.grid == 4:  # one more downsampling block
        config |= {"down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                   "block_out_channels": [16, 32, 64]}
    train(args.steps, args.batch_size, args.lr, args.seed, args.num_images, args.restart_every, config,
          args.eval_per_task, args.out_dir)


if __name__ == "__main__":
    main()
