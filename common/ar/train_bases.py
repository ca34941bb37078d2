"""Train the toy image-token bases and ship them: `python -m common.ar.train_bases --kind raster|masked`.

Toy-world scenes are drawn once and tokenised once by the toy VQ (`common.toy.vq`). The models are
those of `common.ar.models`:
- "raster", next-token pretraining (LlamaGen): L = -(1/N) sum_j log softmax(z_{L-1+j}[codes])[y_j];
- "masked", masked-token pretraining (MaskGIT / Show-o): a fraction gamma = cos(pi/2 u), u ~ U(0, 1), of
  the codes is replaced by [MASK] and L = -(1/|M|) sum_{j in M} log softmax(z_j[codes])[y_j];
both cross-entropies over the 128-way code slice (the slice sampling uses), with the prompt replaced by
the NULL prefix for 10% of the sequences (CFG dropout, as the diffusion toy bases and LlamaGen's
class/caption dropout of 0.1). Training stops at `--steps`, or earlier at the first periodic
evaluation (toy GenEval of sampled, VQ-decoded images) whose overall reaches `--stop-at`: the base is
meant to be IMPERFECT (overall between 0.3 and 0.8) so that alignment has headroom.

Writes common/ar/bases/<kind>.safetensors and <kind>.json (config, seed, steps, command, date, wall
time, history, and toy GenEval per task at the default sampling settings of `common.ar.models`).
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

from common.ar.models import (
    BASES_DIR,
    CFG_SCALE,
    CODEBOOK_SIZE,
    DEFAULT_CONFIG,
    KINDS,
    MASK,
    MASKED_CFG_SCALE,
    MASKED_CONFIG,
    MASKED_NOISE,
    MASKED_STEPS,
    NULL,
    OFFSET,
    PREFIX_LEN,
    TEMPERATURE,
    MaskedAR,
    RasterAR,
    build_masked_model,
    build_raster_model,
    encode_prompts,
    save_ar_weights,
)
from common.ar.tokens import code_log_probs, mask_tokens, masked_token_log_prob, random_token_mask
from common.toy.evaluator import geneval_scores
from common.toy.train_bases import EVAL_SEED, eval_prompts, framed_grid
from common.toy.vq import load_toy_vq
from common.toy.world import dataset

#: probability of training on the unconditional (NULL) prompt (LlamaGen: 0.1)
CFG_DROPOUT = 0.1


@torch.no_grad()
def evaluate_ar(model: RasterAR | MaskedAR, per_task: int = 16, cfg_scale: float | None = None,
                temperature: float = TEMPERATURE, seed: int = 0, batch_size: int = 128) -> dict[str, float]:
    """Toy-GenEval of sampled, decoded images on the bases' fixed evaluation prompts (cfg_scale None:
    the model family's default)."""
    if cfg_scale is None:
        cfg_scale = CFG_SCALE if isinstance(model, RasterAR) else MASKED_CFG_SCALE
    prompts, metas = eval_prompts(per_task)
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([model.sample(prompts[i: i + batch_size], generator, cfg_scale, temperature)[1]
                        for i in range(0, len(prompts), batch_size)])
    return geneval_scores(images, metas)


@torch.no_grad()
def tokenize_dataset(num_images: int, seed: int, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """Drawn scenes -> (prefix ids (n, L), prefix masks (n, L), codes (n, 64)), computed once."""
    images, prompts, _ = dataset(num_images, seed=seed)
    vq = load_toy_vq()
    codes = torch.cat([vq.encode(images[i: i + batch_size]).flatten(1) for i in range(0, num_images, batch_size)])
    prefix, mask = encode_prompts(prompts)
    return prefix, mask, codes


def _log(message: str) -> None:
    print(message, flush=True)


def train(kind: str = "raster", steps: int = 2000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
          num_images: int = 10000, eval_every: int = 250, eval_per_task: int = 8, final_per_task: int = 50,
          stop_at: float = 0.5, out_dir: Path = BASES_DIR, init: Path | None = None, log=_log) -> dict:
    """Train one AR base and write its weights and card (a checkpoint at every evaluation); returns the card.

    init: continue from weights saved by an earlier run (its card's training record is kept under
    train.continued_from; the learning-rate schedule restarts)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    if steps < 1 or batch_size < 1 or num_images < batch_size:
        raise ValueError(f"steps, batch_size, num_images: need steps >= 1 and num_images >= batch_size >= 1, "
                         f"got {steps}, {batch_size}, {num_images}")
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    prefix_all, mask_all, codes_all = tokenize_dataset(num_images, seed)
    log(f"[{kind}] tokenised {num_images} scenes ({time.time() - start:.0f}s)")
    config = DEFAULT_CONFIG if kind == "raster" else MASKED_CONFIG
    model = RasterAR(build_raster_model(config, seed)) if kind == "raster" else MaskedAR(build_masked_model(config, seed))
    previous = None
    if init is not None:
        from common.ar.models import load_ar_base

        model = load_ar_base(kind, init)
        model.model.requires_grad_(True)
        previous = json.loads(Path(init).with_suffix(".json").read_text())["train"]
    lm = model.model.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    # linear warm-up over 100 steps, then cosine decay to 10% (a common GPT / LlamaGen-style schedule)
    warmup = min(100, steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(k, steps) / steps))))
    run = {"kind": kind, "seed": seed, "steps": 0, "max_steps": steps, "batch_size": batch_size, "lr": lr,
           "num_images": num_images, "cfg_dropout": CFG_DROPOUT, "stop_at": stop_at,
           "threads": torch.get_num_threads()}
    if previous is not None:
        run["continued_from"] = previous
    history = []
    scores: dict[str, float] = {}
    for step in range(1, steps + 1):
        batch = torch.randint(num_images, (batch_size,), generator=generator)
        prefix, mask, codes = prefix_all[batch].clone(), mask_all[batch].clone(), codes_all[batch]
        drop = torch.rand(batch_size, generator=generator) < CFG_DROPOUT
        # CFG dropout: the unconditional prefix [BOS, NULL x P, IMG_START], all attended
        prefix[drop, 1: PREFIX_LEN - 1] = NULL
        mask[drop] = 1
        if kind == "raster":
            # L = -(1/N) sum_j log p(y_j | c, y_<j) over the code slice
            loss = -code_log_probs(model.sequence_logits(prefix, mask, codes), codes).mean()
        else:
            # gamma = cos(pi/2 u) of the codes masked; L = -(1/|M|) sum_{j in M} log p(y_j | c, y_unmasked)
            masked = random_token_mask(batch_size, codes.shape[1], generator)
            z = model.masked_logits(prefix, mask, mask_tokens(codes + OFFSET, masked, MASK))
            loss = -masked_token_log_prob(z, codes, masked).sum() / masked.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            log(f"[{kind}] step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if step % eval_every == 0 or step == steps:
            lm.eval()
            scores = evaluate_ar(model, eval_per_task)
            lm.train()
            history.append({"step": step, "loss": round(loss.item(), 4), **scores})
            log(f"[{kind}] step {step} toy-GenEval " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
            run["steps"], run["seconds"] = step, round(time.time() - start, 1)
            _write_base(model, out_dir, run, scores, history, eval_per_task)  # a checkpoint
            if scores["overall"] >= stop_at:
                break
    lm.eval()
    if final_per_task != eval_per_task:
        scores = evaluate_ar(model, final_per_task)
    log(f"[{kind}] final toy-GenEval ({final_per_task} prompts per task) "
        + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
    run["seconds"] = round(time.time() - start, 1)
    return _write_base(model, out_dir, run, scores, history, final_per_task)


def _write_base(model: RasterAR | MaskedAR, out_dir: Path, run: dict, scores: dict, history: list, per_task: int) -> dict:
    kind = run["kind"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_ar_weights(model, out_dir / f"{kind}.safetensors")
    card = {
        "kind": kind,
        "model_class": "transformers." + type(model.model).__name__,
        "config": dict(DEFAULT_CONFIG if kind == "raster" else MASKED_CONFIG),
        "params": sum(p.numel() for p in model.model.parameters()),
        "layout": {"prefix_len": PREFIX_LEN, "offset": OFFSET, "codebook_size": CODEBOOK_SIZE,
                   "tokenizer": "common/toy/bases/vq.safetensors"},
        "train": {k: v for k, v in run.items() if k != "kind"},
        "command": "python -m common.ar.train_bases " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "sampling": {**({"cfg_scale": CFG_SCALE, "cfg_form": "standard"} if kind == "raster" else
                        {"cfg_scale": MASKED_CFG_SCALE, "cfg_form": "showo", "num_steps": MASKED_STEPS,
                         "noise": MASKED_NOISE}),
                     "temperature": TEMPERATURE, "eval_prompts_per_task": per_task, "eval_seed": EVAL_SEED, "sample_seed": 0},
        "toy_geneval": scores,
        "history": history,
    }
    (out_dir / f"{kind}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def rescore(kind: str, per_task: int = 50, out_dir: Path = BASES_DIR) -> dict:
    """Re-evaluate a shipped base at its default sampling settings and update the scores in its card."""
    from common.ar.models import load_ar_base

    path = Path(out_dir) / f"{kind}.json"
    card = json.loads(path.read_text())
    card["toy_geneval"] = evaluate_ar(load_ar_base(kind, path.with_suffix(".safetensors")), per_task)
    card["sampling"]["eval_prompts_per_task"] = per_task
    card["rescored"] = {"date": datetime.date.today().isoformat(),
                        "command": "python -m common.ar.train_bases " + " ".join(sys.argv[1:])}
    path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def save_grid(path: str | Path, per_task: int = 2, seed: int = 0) -> Path:
    """The docs figure: world drawings, their VQ reconstructions and each shipped base's samples.

    Columns: `per_task` prompts of each task; a green / red frame marks toy-GenEval correct / wrong.
    """
    from common.ar.models import load_ar_base
    from common.toy.world import draw

    prompts, metas = eval_prompts(per_task, seed=EVAL_SEED + 1)
    drawings = torch.stack([draw(m, torch.Generator().manual_seed(seed + i)) for i, m in enumerate(metas)])
    rows = {"world drawing": drawings, "VQ encode-decode": load_toy_vq().reconstruct(drawings)}
    for kind in KINDS:
        rows[f"{kind} base"] = load_ar_base(kind).sample(prompts, torch.Generator().manual_seed(seed))[1]
    return framed_grid(rows, prompts, metas, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default="raster")
    parser.add_argument("--grid", type=Path, help="instead of training, draw the docs figure of the shipped bases here")
    parser.add_argument("--rescore", action="store_true",
                        help="instead of training, re-evaluate the shipped base --kind (--final-per-task prompts)")
    parser.add_argument("--steps", type=int, default=2000, help="most optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=10000, help="drawn training scenes")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-per-task", type=int, default=8, help="prompts per task in the periodic evaluations")
    parser.add_argument("--final-per-task", type=int, default=50, help="prompts per task in the card's evaluation")
    parser.add_argument("--stop-at", type=float, default=0.5,
                        help="stop at the first periodic evaluation whose toy-GenEval overall reaches this")
    parser.add_argument("--out-dir", type=Path, default=BASES_DIR)
    parser.add_argument("--init", type=Path, help="continue from these weights (a <kind>.json card beside them)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.grid is not None:
        print(save_grid(args.grid))
        return
    if args.rescore:
        print(rescore(args.kind, args.final_per_task, args.out_dir)["toy_geneval"])
        return
    train(args.kind, args.steps, args.batch_size, args.lr, args.seed, args.num_images, args.eval_every,
          args.eval_per_task, args.final_per_task, args.stop_at, args.out_dir, args.init)


if __name__ == "__main__":
    main()
