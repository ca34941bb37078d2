"""IGTR: Autoregressive Image Generation Guided by Chains of Thought (Cai et al., arXiv 2502.16965, 2025).

Docs page: generated/papers/ar_cot_guided.md. Bib key: cai2025autoregressive (survey.bib).
Official code: none found (no repository is linked from the paper; a code search found none either).

The recipe: keep a raster-order AR image model (LlamaGen style) exactly as it is, architecture and
raster order unchanged, and insert image-related "reasoning prompt" tokens between the condition and
the image tokens. The model is trained with ordinary next-token cross-entropy on

    [condition c, reasoning tokens r_1 .. r_R, image tokens y_1 .. y_N]

so at sampling time it first writes down global information about the picture it is going to draw,
then the picture: log p(r, y | c) = sum_i log p(r_i | c, r_<i) + sum_j log p(y_j | c, r, y_<j).
No reward and no RL. The paper reports about 20% better FID-type scores than the same AR model
trained without the prompts.

How the reasoning tokens are built here is an INTERPRETATION (the paper's abstract only says they
let the model "first perceive overall distribution information" of the image): a colour-layout
sketch, one token per cell of a coarse g x g grid over the image, naming the palette colour that
covers most of the cell (or background). It is a deterministic function of the image tokens,
r = S(D(y)) with D the toy VQ decoder and S the toy evaluator's per-pixel colour rule, and it
decodes back to a g x g picture (`render_sketch`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ar.models import (
    CODEBOOK_SIZE,
    DEFAULT_CONFIG,
    IMG_START,
    NULL,
    NUM_TOKENS,
    OFFSET,
    PREFIX_LEN,
    VOCAB_SIZE,
    build_raster_model,
    encode_prompts,
    load_ar_base,
    null_prefix,
)
from common.ar.tokens import cfg_logits, code_log_probs, image_logits, sample_codes
from common.ar.train_bases import tokenize_dataset
from common.config import option, parse_config, require
from common.toy.evaluator import COVERAGE_THRESHOLD, color_coverage, detect, geneval_scores
from common.toy.train_bases import eval_prompts
from common.toy.vq import load_toy_vq
from common.toy.world import COLORS, IMAGE_SIZE, PALETTE, SHAPES, draw
from common.train import Checkpointer, MetricsLogger, image_grid, read_metrics, seed_everything

#: vocabulary grown past the shipped raster layout: a REASON marker, then one id per sketch value
REASON = VOCAB_SIZE
SKETCH_VALUES: tuple[str, ...] = ("background", *COLORS)
SKETCH_OFFSET = REASON + 1
IGTR_VOCAB = SKETCH_OFFSET + len(SKETCH_VALUES)
#: sketch cells drawn as background (a dark grey, inside the world's background range)
SKETCH_BACKGROUND = 0.06


@dataclass
class Config:
    """IGTR on the toy world: two arms from one init (with / without reasoning tokens), same data and steps."""

    model: str = option("scratch", "scratch (a randomly initialised tiny Llama, as pretraining), toy-raster "
                        "(the shipped raster base, vocabulary grown) or a path saved by save_ar_weights")
    hidden_size: int = option(64, "scratch model width (notes/ar.md 1.10 tiny kit: 64)")
    num_layers: int = option(2, "scratch model depth (notes/ar.md 1.10 tiny kit: 2)")
    sketch_grid: int = option(4, "reasoning tokens: a g x g colour-layout sketch, R = g^2 tokens (interpretation; "
                              "the paper does not fix a toy construction)")
    min_cell_fraction: float = option(0.25, "a sketch cell names a colour when that colour covers at least this "
                                      "fraction of the cell's pixels, else background")
    arms: list[str] = option(["baseline", "igtr"], "which arms to train: baseline (no reasoning tokens, the paper's "
                             "'AR without prompts') and igtr", choices=("baseline", "igtr"))
    num_images: int = option(2000, "drawn training scenes, tokenised once (toy; the paper trains on ImageNet)")
    steps: int = option(600, "optimizer steps per arm (toy)")
    batch_size: int = option(32, "sequences per step (common/ar/train_bases.py: 32)")
    learning_rate: float = option(2e-3, "AdamW lr, betas (0.9, 0.95), wd 0.05 (common/ar/train_bases.py; "
                                  "LlamaGen's optimizer settings)")
    warmup: int = option(20, "linear warm-up steps, constant after")
    cfg_dropout: float = option(0.1, "probability of the NULL condition in training (LlamaGen: 0.1)")
    cfg_scale: float = option(2.0, "CFG at sampling, standard form z_u + s (z_c - z_u), applied to reasoning "
                              "and image tokens (LlamaGen C2I: 2.0)")
    temperature: float = option(1.0, "sampling temperature (LlamaGen: 1.0)")
    lora_rank: int = option(0, "0: train every weight (IGTR is pretraining); > 0: LoRA on q/k/v/o via peft, "
                            "embeddings and head trained in full (the new reasoning ids need them)")
    eval_per_task: int = option(32, "evaluation prompts per toy task (6 tasks)")
    eval_every: int = option(200, "evaluate every this many steps")
    seed: int = option(0, "seed of the init, the data order and sampling (one init shared by both arms)")
    data_seed: int = option(0, "seed of the drawn training scenes")
    out_dir: str = option("runs/ar_cot_guided", "metrics.jsonl, figures and checkpoints go here")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    dtype: str = option("fp32", "autocast dtype on cuda: fp32 or bf16", choices=("fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    save_every: int = option(100, "checkpoint every this many steps (resume picks up the newest)")
    figures: bool = option(True, "write the curve and the sample grid at the end")

    def __post_init__(self):
        require(self.model in ("scratch", "toy-raster") or Path(self.model).is_file(), "model",
                f"must be scratch, toy-raster or a weights file saved by save_ar_weights, got {self.model!r}")
        require(self.hidden_size > 0 and self.hidden_size % 4 == 0, "hidden_size", "must be a positive multiple of 4")
        require(self.num_layers >= 1, "num_layers", "must be >= 1")
        require(self.sketch_grid in (1, 2, 4, 8, 16), "sketch_grid", "must divide the 16-pixel image: 1, 2, 4, 8 or 16")
        require(0 < self.min_cell_fraction <= 1, "min_cell_fraction", "must lie in (0, 1]")
        require(len(self.arms) > 0 and len(set(self.arms)) == len(self.arms), "arms", "must name baseline and/or igtr once")
        require(self.num_images >= self.batch_size >= 1, "num_images", "must be >= batch_size >= 1")
        require(self.steps >= 0, "steps", "must be >= 0")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(0 <= self.cfg_dropout < 1, "cfg_dropout", "must lie in [0, 1)")
        require(self.cfg_scale >= 1, "cfg_scale", "must be >= 1 (1 is no guidance)")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.lora_rank >= 0, "lora_rank", "must be >= 0")
        require(self.eval_per_task >= 1 and self.eval_every >= 1, "eval_per_task", "and eval_every must be >= 1")

    @property
    def num_reasoning(self) -> int:
        return self.sketch_grid ** 2


# --8<-- [start:reasoning]
def sketch_tokens(images: Tensor, grid: int = 4, min_fraction: float = 0.25) -> Tensor:
    """The reasoning tokens of images (B, 3, 16, 16): a (B, grid^2) raster-order colour-layout sketch, values
    0 = background, 1 + k = palette colour k (deterministic: ties go to the earlier colour).

    A pixel shows colour k when k explains it best and covers at least half of it (the toy evaluator's rule,
    alpha_k >= 0.5); a cell takes the colour with most such pixels if they fill >= min_fraction of it.
    """
    alpha, residual = color_coverage(images.float())  # (B, K, H, W)
    best = F.one_hot(residual.argmin(1), len(COLORS)).permute(0, 3, 1, 2).bool()
    shown = (best & (alpha >= COVERAGE_THRESHOLD)).float()
    cell = IMAGE_SIZE // grid
    # fraction of each cell's pixels showing colour k: (B, K, grid, grid)
    fraction = F.avg_pool2d(shown, cell)
    top, colour = fraction.max(1)
    sketch = torch.where(top >= min_fraction, colour + 1, torch.zeros_like(colour))
    return sketch.flatten(1)


def render_sketch(tokens: Tensor) -> Tensor:
    """Decode sketch tokens (B, g^2) into images (B, 3, 16, 16): each cell painted its palette colour or the
    background grey; `sketch_tokens(render_sketch(r)) == r` for sketches of toy scenes."""
    grid = int(round(tokens.shape[1] ** 0.5))
    colours = torch.tensor([(SKETCH_BACKGROUND,) * 3] + [PALETTE[c] for c in COLORS])  # (1 + K, 3)
    cells = colours[tokens.long().cpu()].view(-1, grid, grid, 3).permute(0, 3, 1, 2)
    return cells.repeat_interleave(IMAGE_SIZE // grid, 2).repeat_interleave(IMAGE_SIZE // grid, 3)
# --8<-- [end:reasoning]


# --8<-- [start:layout]
def condition_prefix(prompts: Sequence[str], reasoning: bool, unconditional: bool = False) -> tuple[Tensor, Tensor]:
    """(B, L) ids and masks of the condition: [BOS, left-padded words, IMG_START] (common.ar.models), with
    IMG_START replaced by REASON when reasoning tokens follow; `unconditional` gives the NULL prefix."""
    ids, mask = null_prefix(len(prompts)) if unconditional else encode_prompts(prompts)
    if reasoning:
        ids = ids.clone()
        ids[:, -1] = REASON
    return ids, mask


def sequence_logits(model, prefix: Tensor, prefix_mask: Tensor, reasoning: Tensor | None, codes: Tensor
                    ) -> tuple[Tensor | None, Tensor]:
    """One teacher-forced forward over [prefix, (r_1..r_R, IMG_START), y_1..y_{N-1}]: the (B, R, |S|) rows
    predicting r (sliced to the sketch ids) and the (B, N, K) rows predicting y (sliced to the codes).

    With L = len(prefix): row L - 1 + i predicts r_i; the image prefix then has length L' = L + R + 1
    (IMG_START included) and row L' - 1 + j predicts y_j (without reasoning L' = L)."""
    parts, masks = [prefix], [prefix_mask]
    if reasoning is not None:
        start = torch.full_like(reasoning[:, :1], IMG_START)
        parts.append(torch.cat([reasoning + SKETCH_OFFSET, start], 1))
        masks.append(torch.ones_like(parts[-1]))
    parts.append(codes[:, :-1] + OFFSET)
    masks.append(torch.ones_like(parts[-1]))
    logits = model(input_ids=torch.cat(parts, 1), attention_mask=torch.cat(masks, 1)).logits
    length = prefix.shape[1]
    if reasoning is None:
        return None, image_logits(logits, length, codes.shape[1], offset=OFFSET, codebook_size=CODEBOOK_SIZE)
    r = reasoning.shape[1]
    sketch = image_logits(logits, length, r, offset=SKETCH_OFFSET, codebook_size=len(SKETCH_VALUES))
    return sketch, image_logits(logits, length + r + 1, codes.shape[1], offset=OFFSET, codebook_size=CODEBOOK_SIZE)
# --8<-- [end:layout]


# --8<-- [start:loss]
def igtr_loss(model, prefix: Tensor, prefix_mask: Tensor, reasoning: Tensor | None, codes: Tensor) -> Tensor:
    """Next-token cross-entropy over every reasoning and image token; the condition is never a target:

        L = -(1 / (R + N)) [ sum_i log p(r_i | c, r_<i) + sum_j log p(y_j | c, r, y_<j) ],  batch mean

    (R = 0 for the baseline arm). Each softmax is over its own slice, the one sampling uses."""
    sketch_logits, code_logits = sequence_logits(model, prefix, prefix_mask, reasoning, codes)
    logp = code_log_probs(code_logits, codes)
    if reasoning is not None:
        logp = torch.cat([code_log_probs(sketch_logits, reasoning), logp], 1)
    return -logp.mean()
# --8<-- [end:loss]


# --8<-- [start:sample]
def _next(model, ids: Tensor, mask: Tensor, cache, batch: int, cfg_scale: float, offset: int, size: int):
    """Last-row logits of the new ids (KV cache), sliced to [offset, offset + size), CFG-mixed when the
    batch holds [cond; uncond] rows."""
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    last = out.logits[:, -1, offset: offset + size]
    z = cfg_logits(last[:batch], last[batch:], cfg_scale) if cfg_scale != 1.0 else last.float()
    return z, out.cache


@torch.no_grad()
def sample(model, prompts: Sequence[str], num_reasoning: int, generator: torch.Generator | None = None,
           cfg_scale: float = 2.0, temperature: float = 1.0) -> dict[str, Tensor | None]:
    """Reasoning tokens first (num_reasoning of them; 0 = the plain AR model), then IMG_START, then the 64
    codes in raster order. Every step mixes z = z_u + s (z_c - z_u) over the current slice and draws from
    softmax(z / T); the drawn token is appended to the cond and the uncond row alike.
    Returns {"reasoning": (B, R) or None, "codes": (B, N), "reasoning_log_probs", "code_log_probs"}."""
    b, device = len(prompts), next(model.parameters()).device
    reasoning = num_reasoning > 0
    ids, mask = condition_prefix(prompts, reasoning)
    if cfg_scale != 1.0:
        u_ids, u_mask = condition_prefix(prompts, reasoning, unconditional=True)
        ids, mask = torch.cat([ids, u_ids]), torch.cat([mask, u_mask])
    ids, mask = ids.to(device), mask.to(device)
    rows = ids.shape[0] // b
    out: dict[str, list] = {"reasoning": [], "reasoning_log_probs": [], "codes": [], "code_log_probs": []}
    cache, new = None, ids
    plan = [("reasoning", "reasoning_log_probs", SKETCH_OFFSET, len(SKETCH_VALUES))] * num_reasoning
    plan += [("codes", "code_log_probs", OFFSET, CODEBOOK_SIZE)] * NUM_TOKENS
    for k, (name, lp_name, offset, size) in enumerate(plan):
        if k == num_reasoning and reasoning:  # the reasoning is written: open the image
            new = torch.cat([new, torch.full_like(new, IMG_START)], 1)
            mask = torch.cat([mask, torch.ones_like(new[:, :1])], 1)
        z, cache = _next(model, new, mask, cache, b, cfg_scale, offset, size)
        token, logp = sample_codes(z, temperature, generator)
        out[name].append(token)
        out[lp_name].append(logp)
        new = (token + offset)[:, None].repeat(rows, 1)
        mask = torch.cat([mask, torch.ones_like(new)], 1)
    return {k: (torch.stack(v, 1) if v else None) for k, v in out.items()}


def sequence_log_probs(model, prompts: Sequence[str], reasoning: Tensor | None, codes: Tensor,
                       cfg_scale: float = 2.0, temperature: float = 1.0) -> tuple[Tensor | None, Tensor]:
    """Teacher-forced per-token log-probs (B, R) and (B, N) computed as `sample` computes them."""
    device = next(model.parameters()).device
    with_r = reasoning is not None
    cond = sequence_logits(model, *(t.to(device) for t in condition_prefix(prompts, with_r)), reasoning, codes)
    if cfg_scale != 1.0:
        uncond = sequence_logits(model, *(t.to(device) for t in condition_prefix(prompts, with_r, True)),
                                 reasoning, codes)
        cond = tuple(None if c is None else cfg_logits(c, u, cfg_scale) for c, u in zip(cond, uncond))
    sketch = None if reasoning is None else code_log_probs(cond[0], reasoning, temperature)
    return sketch, code_log_probs(cond[1], codes, temperature)
# --8<-- [end:sample]


# --8<-- [start:metrics]
def image_features(images: Tensor) -> Tensor:
    """(B, 11) features of the toy evaluator's reading of each image: detected objects per colour (4) and per
    shape (3), kept at GenEval's confidence rule, and the fraction of pixels showing each colour (4)."""
    from common.toy.evaluator import MAX_SHAPE_ERROR

    rows = []
    for objects in detect(images):
        kept = [o for o in objects if min(o["shape_errors"]) <= MAX_SHAPE_ERROR]
        rows.append([sum(o["color"] == c for o in kept) for c in COLORS]
                    + [sum(o["class"] == s for o in kept) for s in SHAPES])
    counts = torch.tensor(rows, dtype=torch.float64).view(len(rows), len(COLORS) + len(SHAPES))
    cover = sketch_tokens(images, grid=IMAGE_SIZE, min_fraction=1.0)  # per-pixel colour (0 = background)
    fractions = torch.stack([(cover == k + 1).double().mean(1) for k in range(len(COLORS))], 1)
    return torch.cat([counts, fractions], 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Toy FID: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets
    (Heusel et al. 2017, with the toy evaluator's features in place of Inception's)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    # tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), all symmetric PSD
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


@torch.no_grad()
def reference_images(metas: Sequence[dict], seed: int, vq=None) -> Tensor:
    """Data images for evaluation prompts: fresh drawings, VQ encode-decoded (what the AR models learn)."""
    vq = vq or load_toy_vq()
    generator = torch.Generator().manual_seed(seed)
    return vq.reconstruct(torch.stack([draw(m, generator) for m in metas]))


@torch.no_grad()
def evaluate_arm(model, num_reasoning: int, prompts: Sequence[str], metas: Sequence[dict], reference: Tensor,
                 config: Config, vq=None) -> tuple[dict[str, float], dict[str, Tensor | None]]:
    """Sample one image per prompt; toy FID against the data images, toy GenEval, and (with reasoning) how
    often the sketch of the drawn image agrees with the sketch the model wrote first."""
    vq = vq or load_toy_vq()
    model.eval()
    out = sample(model, prompts, num_reasoning, torch.Generator(next(model.parameters()).device).manual_seed(
        config.seed + 1000), config.cfg_scale, config.temperature)
    model.train()
    out["images"] = vq.decode(out["codes"].cpu())
    scores = {"toy_fid": frechet_distance(image_features(out["images"]), image_features(reference)),
              "geneval": geneval_scores(out["images"], metas)["overall"]}
    if out["reasoning"] is not None:
        # does the picture follow the plan written before it? agreement of the drawn image's sketch with its
        # own reasoning, against the reasoning of the next prompt (the same task: the eval set is grouped)
        drawn, written = sketch_tokens(out["images"], config.sketch_grid, config.min_cell_fraction), out["reasoning"].cpu()
        scores["sketch_agreement"] = (drawn == written).float().mean().item()
        scores["sketch_agreement_shuffled"] = (drawn == written.roll(1, 0)).float().mean().item()
        scores["plan_gain"] = scores["sketch_agreement"] - scores["sketch_agreement_shuffled"]
    return scores, out
# --8<-- [end:metrics]


def build_models(config: Config) -> dict:
    """One initial model (seeded), copied into each arm: both arms start from identical weights and
    the same (grown) vocabulary and position range; only the sequences they are trained on differ."""
    positions = PREFIX_LEN + config.num_reasoning + 1 + NUM_TOKENS
    if config.model == "scratch":
        h = config.hidden_size
        base = build_raster_model({**DEFAULT_CONFIG, "vocab_size": IGTR_VOCAB, "hidden_size": h,
                                   "intermediate_size": 2 * h, "num_hidden_layers": config.num_layers,
                                   "max_position_embeddings": positions}, seed=config.seed)
    else:  # the shipped raster base (or saved weights): grow the vocabulary by REASON and the sketch ids
        base = load_ar_base("raster", None if config.model == "toy-raster" else config.model).model
        torch.manual_seed(config.seed)
        base.resize_token_embeddings(IGTR_VOCAB)
        base.config.max_position_embeddings = max(base.config.max_position_embeddings, positions)
        base.requires_grad_(True)
    models = {arm: copy.deepcopy(base).train() for arm in config.arms}
    for arm, model in models.items():
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if config.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            models[arm] = get_peft_model(model, LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                modules_to_save=["embed_tokens", "lm_head"]))
    return models


@torch.no_grad()
def training_data(config: Config) -> dict[str, Tensor]:
    """Drawn scenes tokenised once (common.ar.train_bases.tokenize_dataset), and their sketches r = S(D(y))."""
    prefix, mask, codes = tokenize_dataset(config.num_images, config.data_seed)
    vq = load_toy_vq()
    sketches = torch.cat([sketch_tokens(vq.decode(codes[i: i + 500]), config.sketch_grid, config.min_cell_fraction)
                          for i in range(0, len(codes), 500)])
    return {"prefix": prefix, "mask": mask, "codes": codes, "reasoning": sketches}


# --8<-- [start:train]
def train(config: Config) -> list[dict]:
    """Train the arms side by side on the same batches (same scenes, same CFG dropout draws, same steps,
    one AdamW over both parameter sets with a per-arm gradient clip); evaluate both with the same prompts."""
    seed_everything(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(config.out_dir)
    data = training_data(config)
    models = {arm: m.to(device) for arm, m in build_models(config).items()}
    reasoning_len = {"baseline": 0, "igtr": config.num_reasoning}
    params = {arm: [p for p in m.parameters() if p.requires_grad] for arm, m in models.items()}
    optimizer = torch.optim.AdamW([{"params": p} for p in params.values()], lr=config.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.05)
    generators = {"data": torch.Generator().manual_seed(config.seed)}
    prompts, metas = eval_prompts(config.eval_per_task)
    vq = load_toy_vq()
    reference = reference_images(metas, config.seed + 2000, vq)
    log = MetricsLogger(out / "metrics.jsonl", total=config.steps, desc="igtr")
    ckpt = Checkpointer(out / "checkpoints", every=config.save_every)
    state = {f"{arm}.{k}": v for arm, m in models.items() for k, v in m.named_parameters() if v.requires_grad}
    done = ckpt.load_latest(model_params=state, optimizer=optimizer, generators=generators, metrics=log) or 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")
    samples: dict[str, dict] = {}

    def evaluation() -> dict[str, float]:
        metrics = {}
        for arm, model in models.items():
            with autocast:
                scores, samples[arm] = evaluate_arm(model, reasoning_len[arm], prompts, metas, reference, config, vq)
            metrics.update({f"{arm}_{k}": v for k, v in scores.items()})
        return metrics

    if done == 0:
        floor = frechet_distance(image_features(reference_images(metas, config.seed + 3000, vq)),
                                 image_features(reference))
        log.log(0, {"data_toy_fid": floor, **evaluation()})
    for step in range(done + 1, config.steps + 1):
        start = time.time()
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = config.learning_rate * min(1.0, step / max(config.warmup, 1))
        batch = torch.randint(config.num_images, (config.batch_size,), generator=generators["data"])
        drop = torch.rand(config.batch_size, generator=generators["data"]) < config.cfg_dropout
        prefix, mask = data["prefix"][batch].clone(), data["mask"][batch].clone()
        prefix[drop, 1:-1], mask[drop] = NULL, 1  # CFG dropout: the NULL condition, all attended
        metrics = {}
        optimizer.zero_grad(set_to_none=True)
        for arm, model in models.items():
            arm_prefix = prefix.clone()
            reasoning = None
            if reasoning_len[arm]:
                arm_prefix[:, -1] = REASON
                reasoning = data["reasoning"][batch].to(device)
            with autocast:
                loss = igtr_loss(model, arm_prefix.to(device), mask.to(device), reasoning, data["codes"][batch].to(device))
            loss.backward()
            metrics[f"{arm}_loss"] = loss.detach()
            metrics[f"{arm}_grad_norm"] = torch.nn.utils.clip_grad_norm_(params[arm], 1.0)
        optimizer.step()
        metrics["seconds"] = time.time() - start
        if step % config.eval_every == 0 or step == config.steps:
            metrics.update(evaluation())
        log.log(step, metrics)
        if ckpt.due(step) or step == config.steps:
            ckpt.save(step, model_params=state, optimizer=optimizer, generators=generators)
    log.close()
    if config.figures:
        if not samples:
            evaluation()
        write_figures(config, samples, reference, out)
    return read_metrics(out / "metrics.jsonl")
# --8<-- [end:train]


def write_figures(config: Config, samples: dict[str, dict], reference: Tensor, out: Path) -> None:
    """toy_fid_curve.png (both arms against steps) and samples.png (data / baseline / IGTR sketch / IGTR)."""
    from matplotlib.figure import Figure

    records = read_metrics(out / "metrics.jsonl")
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for arm in config.arms:
        points = [(r["step"], r[f"{arm}_toy_fid"]) for r in records if f"{arm}_toy_fid" in r]
        ax.plot(*zip(*points), marker=".", label=arm)
    floor = [r["data_toy_fid"] for r in records if "data_toy_fid" in r]
    if floor:
        ax.axhline(floor[0], color="grey", ls="--", label="data vs data")
    ax.set(xlabel="step", ylabel="toy FID (lower is better)", title="IGTR vs the same AR without reasoning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "toy_fid_curve.png", dpi=120)
    # two prompts of each task, one column each
    cols = [t * config.eval_per_task + k for t in range(6) for k in range(min(2, config.eval_per_task))]
    rows, labels = [reference[cols]], ["data (VQ)"]
    if "baseline" in samples:
        rows.append(samples["baseline"]["images"][cols])
        labels.append("baseline")
    if "igtr" in samples:
        rows += [render_sketch(samples["igtr"]["reasoning"][cols].cpu()), samples["igtr"]["images"][cols]]
        labels += ["IGTR sketch", "IGTR"]
    image_grid(torch.cat(rows), nrow=len(cols), out_png=out / "samples.png", labels=labels)


def main(argv=None) -> list[dict]:
    return train(parse_config(Config, argv, description=__doc__.split("\n\n")[0]))
