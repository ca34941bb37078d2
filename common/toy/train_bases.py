"""Train the toy base models on the toy world and ship them: `python -m common.toy.train_bases --kind unet`.

Plain text-to-image pretraining with classifier-free-guidance dropout, on 20,000 drawn scenes:
- "unet" (epsilon): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..999},
  loss = |eps_theta(x_t, t, c) - eps|^2 (DDPM, Ho et al. 2020);
- "flow" (velocity): x_t = (1 - sigma) x0 + sigma eps, sigma ~ logit-normal(0, 1) (SD3 paper, Sec. 3.1),
  loss = |v_theta(x_t, 1000 sigma, c) - (eps - x0)|^2 (rectified flow).
The text encoder stays frozen and random. Training stops at `--steps`, or earlier at the first
evaluation whose toy-GenEval overall reaches `--stop-at`: the bases are meant to be IMPERFECT
(overall between 0.3 and 0.8) so that alignment methods have headroom.

Writes common/toy/bases/<kind>.safetensors and <kind>.json (config, seed, steps, command, date, and
the toy-GenEval scores per task at the default sampling settings below). Other modes:
`--rescore` re-evaluates a shipped base, `--grid PATH` draws the docs figure, `--init PATH`
continues training from saved weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.losses import noisy_state
from common.models.base import DiffusionAdapter, PromptEmbeds
from common.models.toy import BASES_DIR, KINDS, MAX_TOKENS, build_toy_adapter, load_toy_base, save_toy_weights
from common.steps import ode_step
from common.toy.evaluator import geneval_scores
from common.toy.world import TASKS, Metadata, dataset, sample_scene

#: default sampling settings of the toy bases (Flow-GRPO's SD3.5 evaluation uses 40 steps, CFG 4.5;
#: 20 steps keep the toy fast)
SAMPLE_STEPS = 20
GUIDANCE_SCALE = 4.5
#: probability of training on the empty prompt (SD1.x / SD3 training recipes drop 10% of captions)
CFG_DROPOUT = 0.1
EVAL_SEED = 1234


def eval_prompts(per_task: int, seed: int = EVAL_SEED) -> tuple[list[str], list[Metadata]]:
    """`per_task` scenes of each of the six tasks, seeded (the fixed evaluation set of the bases)."""
    generator = torch.Generator().manual_seed(seed)
    metas = [sample_scene(task, generator) for task in TASKS for _ in range(per_task)]
    return [m["prompt"] for m in metas], metas


@torch.no_grad()
def sample_images(adapter: DiffusionAdapter, prompts: Sequence[str], num_steps: int = SAMPLE_STEPS,
                  guidance_scale: float = GUIDANCE_SCALE, seed: int = 0, batch_size: int = 256) -> Tensor:
    """Deterministic sampling (DDIM eta=0 / Euler ODE) with CFG from seeded noise; images in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=generator)
    schedule = adapter.schedule(num_steps, device="cpu")
    uncond = adapter.encode_prompts([""])
    out = []
    for start in range(0, len(prompts), batch_size):
        x = noise[start: start + batch_size].to(adapter.device, adapter.dtype)
        cond = adapter.encode_prompts(prompts[start: start + batch_size])
        for i in range(num_steps):
            pred = adapter.predict(x, schedule.timesteps[i], cond, uncond, guidance_scale)
            x = ode_step(pred, x, schedule, i).prev_sample
        out.append(adapter.decode(x))
    return torch.cat(out)


def evaluate_base(adapter: DiffusionAdapter, per_task: int = 32, num_steps: int = SAMPLE_STEPS,
                  guidance_scale: float = GUIDANCE_SCALE, seed: int = 0) -> dict[str, float]:
    """Toy-GenEval scores of `adapter` on the fixed evaluation set (per_task prompts per task)."""
    prompts, metas = eval_prompts(per_task)
    images = sample_images(adapter, prompts, num_steps, guidance_scale, seed)
    return geneval_scores(images, metas)


def _embed_table(adapter: DiffusionAdapter, prompts: Sequence[str]) -> tuple[PromptEmbeds, dict[str, int]]:
    """Encode each distinct prompt once; row 0 is the empty prompt (the CFG unconditional)."""
    unique = [""] + sorted(set(prompts) - {""})
    return adapter.encode_prompts(unique), {p: i for i, p in enumerate(unique)}


def denoising_loss(adapter: DiffusionAdapter, x0: Tensor, cond: PromptEmbeds, generator: torch.Generator) -> Tensor:
    """The pretraining loss of the adapter's family on clean images x0 in [-1, 1] (see module doc)."""
    noise = torch.randn(x0.shape, generator=generator)
    b = x0.shape[0]
    if adapter.prediction == "epsilon":
        abar = adapter.scheduler.alphas_cumprod
        t = torch.randint(0, len(abar), (b,), generator=generator)
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps
        xt, target = noisy_state(x0, noise, abar[t].float(), "epsilon")
        return F.mse_loss(adapter.predict(xt, t, cond), target)
    # logit-normal sigma (SD3: m = 0, s = 1)
    sigma = torch.sigmoid(torch.randn(b, generator=generator))
    # x_t = (1 - sigma) x0 + sigma eps, target velocity eps - x0
    xt, target = noisy_state(x0, noise, sigma, "flow")
    return F.mse_loss(adapter.predict(xt, sigma * 1000, cond), target)


def _log(message: str) -> None:
    print(message, flush=True)


def _copy(values: list[Tensor], model: torch.nn.Module) -> None:
    with torch.no_grad():
        for v, p in zip(values, model.parameters()):
            p.copy_(v)


def train(kind: str, steps: int = 6000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
          num_images: int = 20000, eval_every: int = 500, eval_per_task: int = 16, final_per_task: int = 50,
          stop_at: float = 0.5, ema_decay: float = 0.995, out_dir: Path = BASES_DIR,
          init: Path | None = None, log=_log) -> dict:
    """Train one toy base and write its weights and card; returns the card.

    init: continue from weights saved by an earlier run; its card's training record is kept under
    train.continued_from.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    adapter = build_toy_adapter(kind, seed=seed) if init is None else load_toy_base(kind, init)
    previous = json.loads(Path(init).with_suffix(".json").read_text())["train"] if init is not None else None
    images, prompts, _ = dataset(num_images, seed=seed)
    x_all = images * 2 - 1  # pixel-space states live in [-1, 1]
    table, index = _embed_table(adapter, prompts)
    prompt_ids = torch.tensor([index[p] for p in prompts])

    model = adapter.denoiser
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10 + 1)
    lr_at = lambda k: min(1.0, (k + 1) / warmup)  # noqa: E731  (linear warm-up, then constant)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    # exponential moving average of the weights: what is evaluated and shipped (as in DDPM / SD training)
    ema = [p.detach().clone() for p in model.parameters()]
    run = {"kind": kind, "seed": seed, "steps": 0, "max_steps": steps, "batch_size": batch_size, "lr": lr,
           "ema_decay": ema_decay, "num_images": num_images, "cfg_dropout": CFG_DROPOUT, "stop_at": stop_at}
    if previous is not None:
        run["continued_from"] = previous
    history, start = [], time.time()
    for step in range(1, steps + 1):
        batch = torch.randint(num_images, (batch_size,), generator=generator)
        ids = prompt_ids[batch]
        drop = torch.rand(batch_size, generator=generator) < CFG_DROPOUT
        ids = torch.where(drop, torch.zeros_like(ids), ids)
        loss = denoising_loss(adapter, x_all[batch], table.index(ids), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        # EMA warm-up as in diffusers' EMAModel: decay_k = min(decay, (1 + k) / (10 + k))
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                # ema <- decay * ema + (1 - decay) * theta
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"[{kind}] step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if step % eval_every == 0 or step == steps:
            model.eval()
            live = [p.detach().clone() for p in model.parameters()]
            _copy(ema, model)
            scores = evaluate_base(adapter, eval_per_task)
            history.append({"step": step, **scores})
            log(f"[{kind}] step {step} toy-GenEval " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
            run["steps"], run["seconds"] = step, round(time.time() - start, 1)
            _write_base(adapter, out_dir, run, scores, history, eval_per_task)  # a checkpoint
            _copy(live, model)
            model.train()
            if scores["overall"] >= stop_at:
                break
    # the card's scores: the shipped (EMA) weights on the full evaluation set
    model.eval()
    _copy(ema, model)
    scores = evaluate_base(adapter, final_per_task)
    log(f"[{kind}] final toy-GenEval ({final_per_task} prompts per task) "
        + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
    run["seconds"] = round(time.time() - start, 1)
    return _write_base(adapter, out_dir, run, scores, history, final_per_task)


def _write_base(adapter: DiffusionAdapter, out_dir: Path, run: dict, scores: dict, history: list,
                eval_per_task: int) -> dict:
    """Save the adapter's current weights and its card (<kind>.safetensors, <kind>.json)."""
    kind = run["kind"]
    model = adapter.denoiser
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_toy_weights(adapter, out_dir / f"{kind}.safetensors")
    card = {
        "kind": kind,
        "denoiser_class": type(model).__name__,
        "denoiser_config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "denoiser_params": sum(p.numel() for p in model.parameters()),
        "scheduler": {k: v for k, v in dict(adapter.scheduler.config).items() if not k.startswith("_")},
        "text_encoder": "CLIPTextModelWithProjection, frozen at its seeded random init (common/models/toy.py)",
        "max_tokens": MAX_TOKENS,
        "train": {k: v for k, v in run.items() if k != "kind"},
        "command": "python -m common.toy.train_bases " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "sampling": {"num_steps": SAMPLE_STEPS, "guidance_scale": GUIDANCE_SCALE,
                     "sampler": "DDIM eta=0" if adapter.prediction == "epsilon" else "Euler ODE",
                     "eval_prompts_per_task": eval_per_task, "eval_seed": EVAL_SEED, "noise_seed": 0},
        "toy_geneval": scores,
        "history": history,
    }
    (out_dir / f"{kind}.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return card



def rescore(kind: str, per_task: int = 50, out_dir: Path = BASES_DIR) -> dict:
    """Re-evaluate a shipped base with the current evaluator and update the scores in its card."""
    path = Path(out_dir) / f"{kind}.json"
    card = json.loads(path.read_text())
    card["toy_geneval"] = evaluate_base(load_toy_base(kind, Path(out_dir) / f"{kind}.safetensors"), per_task)
    card["sampling"]["eval_prompts_per_task"] = per_task
    card["rescored"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return card


def save_grid(path: str | Path, per_task: int = 2, seed: int = 0) -> Path:
    """A figure of world drawings and each shipped base's samples for the same prompts (docs image).

    Columns: `per_task` prompts of each task; rows: the world's own drawing, then each base at the
    default sampling settings.
    """
    from common.toy.world import draw

    prompts, metas = eval_prompts(per_task, seed=EVAL_SEED + 1)
    generator = torch.Generator().manual_seed(seed)
    rows = {"world drawing": torch.stack([draw(m, generator) for m in metas])}
    for kind in KINDS:
        rows[f"{kind} base"] = sample_images(load_toy_base(kind), prompts, seed=seed)
    return framed_grid(rows, prompts, metas, path)


def framed_grid(rows: dict[str, Tensor], prompts: list[str], metas: list[dict], path: str | Path) -> Path:
    """Save a figure with one row per entry of `rows` (images (N, 3, H, W) in [0, 1], one per prompt) and
    one column per prompt; a green / red frame marks toy-GenEval correct / wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.toy.evaluator import evaluate

    fig, axes = plt.subplots(len(rows), len(prompts), figsize=(1.25 * len(prompts), 1.45 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        correct, _ = evaluate(images, metas)
        for c in range(len(prompts)):
            ax = axes[r, c]
            ax.imshow(images[c].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if correct[c] else "tab:red")
                spine.set_linewidth(3)
            if r == 0:
                ax.set_title(prompts[c].replace(" and ", "\nand ").replace(" of ", " of\n")
                             .replace(" above ", "\nabove ").replace(" below ", "\nbelow "), fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, help="the base to train")
    parser.add_argument("--grid", type=Path, help="instead of training, draw the docs figure of the shipped bases here")
    parser.add_argument("--rescore", action="store_true",
                        help="instead of training, re-evaluate the shipped base --kind and update its card")
    parser.add_argument("--steps", type=int, default=6000, help="most optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20000, help="drawn training scenes")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-per-task", type=int, default=16, help="prompts per task in the periodic evaluations")
    parser.add_argument("--final-per-task", type=int, default=50, help="prompts per task in the card's evaluation")
    parser.add_argument("--stop-at", type=float, default=0.5,
                        help="stop at the first periodic evaluation whose toy-GenEval overall reaches this")
    parser.add_argument("--out-dir", type=Path, default=BASES_DIR)
    parser.add_argument("--init", type=Path, help="continue from these weights (a <kind>.json card beside them)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.grid is not None:
        print(save_grid(args.grid))
        return
    if args.kind is None:
        parser.error("--kind is required (or --grid PATH)")
    if args.rescore:
        print(rescore(args.kind, args.final_per_task, args.out_dir)["toy_geneval"])
        return
    train(args.kind, args.steps, args.batch_size, args.lr, args.seed, args.num_images, args.eval_every,
          args.eval_per_task, args.final_per_task, args.stop_at, args.ema_decay, args.out_dir, args.init)


if __name__ == "__main__":
    main()
