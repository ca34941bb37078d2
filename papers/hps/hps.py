"""HPS v1: Human Preference Score: Better Aligning Text-to-Image Models with Human Preference (Wu et al., ICCV 2023).

docs: generated/papers/hps.md
bib key: wu2023humana
official code: tgxs002/align_sd @ 78a49a3 (README.md, evaluate_hps.py, process_diffusiondb.py,
    select_training_images.py, train_text_to_image_lora.py, scripts/train_lora.sh, generate_images.py).
    The classifier's training script was never released; its loss follows the paper (Sec. 3).

Two steps:
1. The human preference classifier (HPC): CLIP fine-tuned on Discord choices. For a prompt c and the
   n images x_1..x_n a user chose among, with logits l_j = exp(s) cos(f(x_j), g(c)) (s CLIP's learned
   temperature), L = -log softmax(l)_chosen. The Human Preference Score is HPS = 100 cos(f(x), g(c)).
2. Alignment: score the base model's own generations with HPS; per prompt, the clearly preferred image
   becomes a positive example with its prompt and the clearly rejected one a negative example with the
   prompt prefixed by "Weird image. "; fine-tune LoRA weights with the ordinary denoising loss on both
   (plus regularisation images). At sampling, "Weird image." is the negative prompt of CFG, so the
   model steers away from what it learned to call weird.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from common.config import option, parse_config, require
from common.losses import denoising_loss
from common.models.base import DiffusionAdapter
from common.models.load import load_adapter, require_model
from common.models.toy import MAX_TOKENS, SPECIAL_TOKENS, toy_tokenizer
from common.rewards.base import check_inputs, check_scores
from common.rewards.clip import image_features, load_clip_model, text_features
from common.rewards.preprocess import ClipPreprocess
from common.steps import ode_step
from common.toy.evaluator import evaluate as toy_evaluate
from common.toy.world import IMAGE_SIZE, TASKS, VOCABULARY, dataset, draw, perturb_scene, sample_prompts
from common.train import (
    MetricsLogger,
    image_grid,
    make_accelerator,
    make_optimizer,
    plot_curve,
    seed_everything,
)

#: the prefix of negative captions and the negative prompt at sampling (train_text_to_image_lora.py,
#: generate_images.py)
NEGATIVE_PREFIX = "Weird image. "


@dataclass
class Config:
    """Train a toy HPC on simulated choices, then align a toy generator with it (`--stage` picks one)."""

    stage: str = option("both", "classifier, align, or both (classifier first)", choices=("both", "classifier", "align"))
    tasks: list[str] = option(["colors"], "toy-world tasks of every prompt")
    hpc_path: str | None = option(None, "local CLIP directory (config.json + safetensors, tokenizer, "
                                  "preprocessor_config.json) of a classifier to align with instead of training one")
    # ---- classifier ---------------------------------------------------------------------------
    choices: int = option(300, "simulated choices (prompt + candidates + the chosen one) to train on")
    candidates: int = option(4, "images per choice (Discord batches: ~98k images / 25k prompts ~ 4)")
    hpc_steps: int = option(150, "optimizer steps (toy budget)")
    hpc_batch_size: int = option(32, "choices per step")
    hpc_lr: float = option(1e-3, "Adam learning rate (toy value: the toy CLIP starts from scratch)")
    width: int = option(32, "hidden size of the toy CLIP encoders (CLIP ViT-L/14: 768 text, 1024 image)")
    # ---- alignment ----------------------------------------------------------------------------
    model: str = option("toy-unet", "toy-unet, toy-flow, tiny-sd, tiny-sd3 or a local diffusers directory")
    pool_prompts: int = option(48, "prompts whose base-model generations are scored and selected")
    pool_images: int = option(4, "generations per prompt (select_training_images.py keeps prompts with >= 4)")
    reg_images: int = option(48, "regularisation image-caption pairs (toy drawings standing in for LAION)")
    negative_prefix: str = option(NEGATIVE_PREFIX, "prefix of non-preferred captions and the negative prompt")
    lora_rank: int = option(4, "LoRA rank (train_text_to_image_lora.py --lora_rank default)")
    align_steps: int = option(150, "LoRA updates (toy budget; train_lora.sh: 10000)")
    batch_size: int = option(16, "image-caption pairs per update (train_lora.sh: 40)")
    learning_rate: float = option(3e-4, "AdamW learning rate (toy value; train_lora.sh: 1e-5)")
    max_grad_norm: float = option(1.0, "gradient clipping (train_text_to_image_lora.py)")
    num_steps: int = option(20, "DDIM / Euler steps of every sampler call (toy base default; official: 50)")
    guidance_scale: float = option(4.5, "CFG scale (toy base default; SD pipeline default 7.5)")
    eval_prompts: int = option(32, "held-out prompts sampled before and after alignment")
    gradient_checkpointing: bool = option(False, "diffusers gradient checkpointing of the denoiser")
    seed: int = option(0, "random seed (train_lora.sh: 42)")
    device: str = option("cpu", "cpu or cuda")
    dtype: str = option("fp32", "generator weights dtype (LoRA weights stay fp32)", choices=("fp32", "bf16"))
    out_dir: str = option("runs/hps", "metrics, figures and the classifier")

    def __post_init__(self):
        require_model(self.model)
        require(bool(self.tasks) and all(t in TASKS for t in self.tasks), "tasks", f"choose from {TASKS}")
        for name in ("choices", "hpc_steps", "hpc_batch_size", "width", "pool_prompts", "lora_rank",
                     "align_steps", "batch_size", "num_steps", "eval_prompts"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("candidates", "pool_images"):
            require(getattr(self, name) >= 2, name, f"a choice needs >= 2 images, got {getattr(self, name)}")
        require(self.reg_images >= 0, "reg_images", f"must be >= 0, got {self.reg_images}")
        require(self.hpc_path is None or Path(self.hpc_path).is_dir(), "hpc_path", f"{self.hpc_path!r} is not a directory")
        require(self.stage != "align" or self.hpc_path is not None, "hpc_path", "stage align needs a classifier")
        require(self.stage == "classifier" or self.model.startswith("toy-") or self.hpc_path is not None, "model",
                "a classifier trained here knows only the 16x16 toy world; pass --hpc-path to align a real model")
        require(self.model.startswith("toy-") or self.reg_images == 0, "reg_images",
                "the regularisation pairs are 16x16 toy drawings; use 0 with a real pipeline")


# ============================================================================ the classifier
# --8<-- [start:classifier]
class HumanPreferenceClassifier(nn.Module):
    """A CLIP dual encoder; `forward(images, prompts, metadata)` returns the HPS, 100 cos(f(x), g(c))."""

    name = "hps"

    def __init__(self, clip: CLIPModel, tokenizer, preprocess: ClipPreprocess):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess = clip, tokenizer, preprocess

    @classmethod
    def toy(cls, width: int = 32) -> HumanPreferenceClassifier:
        """A tiny CLIP (2 layers per tower, 16x16 images in 4x4 patches) on the toy vocabulary, random."""
        ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        text = CLIPTextConfig(vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY), hidden_size=width,
                              intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=MAX_TOKENS, pad_token_id=ids["<pad>"],
                              bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
        vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=4)
        clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=width))
        return cls(clip, toy_tokenizer(), ClipPreprocess(size=IMAGE_SIZE, crop_size=(IMAGE_SIZE, IMAGE_SIZE)))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HumanPreferenceClassifier:
        """A local directory as `save` writes it, or the released HPC converted to transformers' CLIP format
        (README): config.json + *.safetensors, tokenizer files, preprocessor_config.json."""
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(load_clip_model(path, "hpc_path"), tokenizer, ClipPreprocess.from_pretrained(path)).eval()

    def save(self, path: str | Path) -> Path:
        """safetensors weights, the tokenizer and the preprocessing settings: `from_pretrained` reads them."""
        self.clip.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        p = self.preprocess
        (Path(path) / "preprocessor_config.json").write_text(json.dumps({
            "size": p.size, "crop_size": {"height": p.crop_size[0], "width": p.crop_size[1]},
            "image_mean": list(p.mean), "image_std": list(p.std)}))
        return Path(path)

    def embed(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm image and text embeddings (B, D); differentiable in the images."""
        device = self.clip.logit_scale.device
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.clip.config.text_config.max_position_embeddings).to(device)
        f_img = image_features(self.clip, self.preprocess(images.to(device)).to(self.clip.dtype))
        f_txt = text_features(self.clip, tokens.input_ids, tokens.attention_mask)
        return F.normalize(f_img.float(), dim=-1), F.normalize(f_txt.float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str], metadata=None) -> tuple[Tensor, dict]:
        check_inputs(images, prompts, metadata, name=self.name)
        f_img, f_txt = self.embed(images, prompts)
        # HPS = 100 * <f_img / |f_img|, f_txt / |f_txt|>   (process_diffusiondb.py: similarity * 100)
        return check_scores(100 * (f_img * f_txt).sum(-1), name=self.name), {}


def preference_loss(model: HumanPreferenceClassifier, images: Tensor, prompts: Sequence[str],
                    chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over each prompt's n candidates with CLIP's learned temperature (paper Sec. 3).

    images (P, n, 3, H, W), prompts P, chosen (P,) index of the preferred candidate.
    l_j = exp(s) cos(f(x_j), g(c));  L = -mean log softmax(l)_chosen;  accuracy = mean[argmax l == chosen].
    """
    p, n = images.shape[:2]
    f_img, f_txt = model.embed(images.flatten(0, 1), [c for c in prompts for _ in range(n)])
    logits = model.clip.logit_scale.exp() * (f_img * f_txt).sum(-1).view(p, n)
    return F.cross_entropy(logits, chosen), (logits.argmax(1) == chosen).float().mean().detach()
# --8<-- [end:classifier]


def simulated_choices(n: int, candidates: int, tasks: Sequence[str], generator: torch.Generator
                      ) -> tuple[Tensor, list[str], Tensor]:
    """Toy Discord choices: for each prompt, one candidate shows the prompt's scene and the others a
    perturbed scene (one attribute changed); the simulated user picks the one that shows the prompt.
    Returns images (n, K, 3, H, W), prompts, chosen (n,) with the chosen position uniform over 0..K-1."""
    images, prompts, chosen = [], [], []
    for prompt, meta in sample_prompts(n, tasks, generator):
        prompts.append(prompt)
        k = int(torch.randint(candidates, (1,), generator=generator))
        images += [draw(meta if j == k else perturb_scene(meta, generator), generator) for j in range(candidates)]
        chosen.append(k)
    return torch.stack(images).view(n, candidates, 3, IMAGE_SIZE, IMAGE_SIZE), prompts, torch.tensor(chosen)


@torch.no_grad()
def choice_accuracy(model: HumanPreferenceClassifier, images: Tensor, prompts: Sequence[str], chosen: Tensor) -> float:
    """Held-out accuracy: how often the top-scoring candidate is the one the user chose (chance 1/n)."""
    model.eval()
    return float(preference_loss(model, images, prompts, chosen)[1])


def train_classifier(config: Config, log=None) -> tuple[HumanPreferenceClassifier, dict]:
    """Fit the HPC on simulated choices; returns it with its held-out choice accuracy before and after."""
    gen = torch.Generator().manual_seed(config.seed)
    train_set = simulated_choices(config.choices, config.candidates, config.tasks, gen)
    test_set = simulated_choices(max(config.choices // 3, 1), config.candidates, config.tasks, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = HumanPreferenceClassifier.toy(config.width).to(config.device)
    before = choice_accuracy(model, *test_set)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.hpc_lr)
    model.train()
    for step in range(config.hpc_steps):
        idx = torch.randint(config.choices, (config.hpc_batch_size,), generator=gen)
        loss, acc = preference_loss(model, train_set[0][idx], [train_set[1][i] for i in idx.tolist()],
                                    train_set[2][idx].to(config.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log.log(step + 1, hpc_loss=loss.detach(), hpc_train_acc=acc)
    model.requires_grad_(False).eval()
    return model, {"hpc_acc_before": before, "hpc_acc": choice_accuracy(model, *test_set),
                   "chance": 1 / config.candidates}


# ============================================================================ alignment
# --8<-- [start:selection]
def select_examples(scores: Tensor) -> tuple[Tensor, Tensor]:
    """select_training_images.py, per prompt (rows of scores (P, n), HPS units):
    p = softmax(s - mean s); the best image is a positive if max p > 2/n; likewise the worst image (softmax
    of -s) is a negative if its probability exceeds 2/n. Returns (positive, negative) indices, -1 if none."""
    n = scores.shape[1]
    probs = torch.softmax(scores - scores.mean(1, keepdim=True), dim=1)
    neg_probs = torch.softmax(-(scores - scores.mean(1, keepdim=True)), dim=1)
    pos = torch.where(probs.max(1).values > 2 / n, probs.argmax(1), -1)
    neg = torch.where(neg_probs.max(1).values > 2 / n, neg_probs.argmax(1), -1)
    return pos, neg


def weird_captions(prompts: Sequence[str], positive: Sequence[bool], prefix: str = NEGATIVE_PREFIX) -> list[str]:
    """train_text_to_image_lora.py: a non-preferred image is captioned prefix + prompt."""
    return [p if ok else prefix + p for p, ok in zip(prompts, positive)]
# --8<-- [end:selection]


# --8<-- [start:sampling]
@torch.no_grad()
def sample(adapter: DiffusionAdapter, prompts: Sequence[str], negative_prompt: str, config: Config,
           seed: int) -> Tensor:
    """Deterministic CFG sampling from seeded noise: eps = u + w (c - u), u conditioned on the negative
    prompt ("Weird image. " after alignment, generate_images.py; "" for the base model)."""
    gen = torch.Generator(device=adapter.device).manual_seed(seed)
    x = torch.randn(len(prompts), *adapter.latent_shape, generator=gen, device=adapter.device).to(adapter.dtype)
    cond, uncond = adapter.encode_prompts(list(prompts)), adapter.encode_prompts([negative_prompt] * len(prompts))
    schedule = adapter.schedule(config.num_steps)
    for i in range(config.num_steps):
        x = ode_step(adapter.predict(x, schedule.timesteps[i], cond, uncond, config.guidance_scale), x,
                     schedule, i).prev_sample
    return adapter.decode(x).float()
# --8<-- [end:sampling]


def build_alignment_set(adapter: DiffusionAdapter, hpc: HumanPreferenceClassifier, config: Config
                        ) -> tuple[Tensor, list[str], dict]:
    """Generate, score with HPS, select; returns images, captions (weird-prefixed negatives, regularisation
    captions) and counts."""
    pool = [p for p, _ in sample_prompts(config.pool_prompts, config.tasks, torch.Generator().manual_seed(config.seed))]
    prompts = [p for p in pool for _ in range(config.pool_images)]
    images = sample(adapter, prompts, "", config, seed=config.seed + 1)
    scores = hpc(images, prompts)[0].view(len(pool), config.pool_images).cpu()
    pos, neg = select_examples(scores)
    picked, ok = [], []
    for k in range(len(pool)):
        for idx, good in ((pos[k], True), (neg[k], False)):
            if idx >= 0:
                picked.append(k * config.pool_images + int(idx))
                ok.append(good)
    reg_images, reg_prompts, _ = dataset(config.reg_images, seed=config.seed + 2, tasks=config.tasks)
    captions = weird_captions([prompts[i] for i in picked], ok, config.negative_prefix) + list(reg_prompts)
    all_images = torch.cat([images[picked].cpu(), reg_images])
    return all_images, captions, {"positives": int(sum(ok)), "negatives": len(ok) - int(sum(ok)),
                                  "pool_hps": float(scores.mean())}


def evaluate(adapter: DiffusionAdapter, hpc: HumanPreferenceClassifier, prompts: Sequence[str], metadata,
             negative_prompt: str, config: Config) -> tuple[Tensor, dict]:
    """Samples of fixed noise and their mean HPS; on toy models also the toy evaluator's accuracy, i.e. how
    often the simulated user's criterion (the image shows the prompt) holds."""
    images = sample(adapter, prompts, negative_prompt, config, seed=config.seed + 3)
    scores = {"hps": float(hpc(images, prompts)[0].mean())}
    if config.model.startswith("toy-"):
        scores["toy_accuracy"] = float(toy_evaluate(images, metadata)[0].float().mean())
    return images.cpu(), scores


def train(config: Config) -> dict:
    """Stage 1: the HPC on simulated choices (or one loaded from --hpc-path). Stage 2: LoRA alignment."""
    start = time.time()
    accelerator = make_accelerator(cpu=config.device == "cpu")
    seed_everything(config.seed)  # the same data and classifier on every process
    out, device = Path(config.out_dir), accelerator.device
    fit = config.hpc_path is None
    total = config.hpc_steps * fit + config.align_steps * (config.stage != "classifier")
    log = MetricsLogger(out / "metrics.jsonl", total=total, desc="hps", disable=not accelerator.is_main_process)
    summary: dict = {}
    if fit:
        hpc, summary = train_classifier(config, log)
        if accelerator.is_main_process:
            hpc.save(out / "classifier")
    else:
        hpc = HumanPreferenceClassifier.from_pretrained(config.hpc_path).requires_grad_(False)
    hpc.to(device)
    summary["hpc_time_s"] = time.time() - start
    if config.stage == "classifier":
        log.close()
        return summary
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None, device=device)
    eval_set = sample_prompts(config.eval_prompts, config.tasks, torch.Generator().manual_seed(10_000))
    eval_prompts, eval_meta = [p for p, _ in eval_set], [m for _, m in eval_set]
    before, scores = evaluate(adapter, hpc, eval_prompts, eval_meta, "", config)
    summary |= {f"{k}_before": v for k, v in scores.items()}
    images, captions, counts = build_alignment_set(adapter, hpc, config)
    summary |= counts
    adapter.add_lora(rank=config.lora_rank)
    params = adapter.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    # AdamW with weight decay 1e-2 (train_text_to_image_lora.py --adam_weight_decay default)
    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=1e-2)
    gen = torch.Generator(device=device).manual_seed(config.seed + 4 + accelerator.process_index)
    pick = torch.Generator().manual_seed(config.seed + 5 + accelerator.process_index)
    for step in range(config.align_steps):
        idx = torch.randint(len(captions), (config.batch_size,), generator=pick)
        # the LoRA fine-tuning objective (train_text_to_image_lora.py): the plain denoising loss
        loss = denoising_loss(adapter, adapter.encode(images[idx]),
                              adapter.encode_prompts([captions[i] for i in idx.tolist()]), gen)
        loss.backward()
        for p in params if accelerator.num_processes > 1 else []:  # average over processes, as DDP does
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(config.hpc_steps * fit + step + 1, align_loss=accelerator.reduce(loss.detach(), reduction="mean"))
    log.close()
    # the paper samples the aligned model with "Weird image. " as the negative prompt; "" isolates the LoRA
    after, scores = evaluate(adapter, hpc, eval_prompts, eval_meta, config.negative_prefix, config)
    summary |= {f"{k}_after": v for k, v in scores.items()}
    summary |= {f"{k}_after_plain": v for k, v in evaluate(adapter, hpc, eval_prompts, eval_meta, "", config)[1].items()}
    if accelerator.is_main_process:
        n = min(8, len(eval_prompts))  # one row before, one row after
        image_grid(torch.cat([before[:n], after[:n]]), nrow=n, out_png=out / "before_after.png",
                   labels=["before", "after"])
        if fit:
            plot_curve(out / "metrics.jsonl", "hpc_loss", out / "classifier_loss.png", title="HPC preference loss")
        plot_curve(out / "metrics.jsonl", "align_loss", out / "align_loss.png", title="LoRA denoising loss")
    return summary | {"train_time_s": time.time() - start}


def main(argv: Sequence[str] | None = None) -> dict:
    summary = train(parse_config(Config, argv))
    print(summary)
    return summary
