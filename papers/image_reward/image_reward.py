"""ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation (Xu et al., NeurIPS 2023).

docs: generated/papers/image_reward.md
bib key: xu2023imagereward
official code: THUDM/ImageReward @ c1392c6dd0fd (ImageReward/ImageReward.py, ImageReward/utils.py,
    ImageReward/ReFL.py, ImageReward/ReFL_SDXL.py, train/src/ImageReward.py, train/src/train.py,
    train/scripts/train_one_node.sh, scripts/train_refl.sh)

Two contributions, both here:
1. ImageReward, a reward model: BLIP's text encoder reads the prompt while cross-attending to the ViT's
   image patches; its [CLS] state goes through an MLP to one number, normalised by fixed constants.
   It is trained on expert rankings of k images per prompt, expanded into all k(k-1)/2 pairs, with
   L = -E log sigmoid(r(c, x_better) - r(c, x_worse)).
2. ReFL (reward feedback learning): ImageReward only becomes informative late in sampling, so run the
   sampler without gradient to a random late step t, take one graded denoiser call there, predict
   x0_hat in one step, decode it and push L = lambda * relu(2 - r(c, x0_hat)) into the generator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (
    BertTokenizerFast,
    BlipTextConfig,
    BlipVisionConfig,
    BlipVisionModel,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.modeling_blip_text import BlipTextModel

from common.config import option, parse_config, require
from common.losses import denoising_loss
from common.models.base import DiffusionAdapter
from common.models.load import load_adapter, require_model
from common.rewards import load_reward
from common.rewards.base import check_inputs, check_scores
from common.rewards.preprocess import clip_preprocess
from common.steps import ddim_step, euler_step, ode_step
from common.toy.world import IMAGE_SIZE, TASKS, VOCABULARY, draw, perturb_scene, sample_prompts
from common.train import (
    MetricsLogger,
    image_grid,
    make_accelerator,
    make_optimizer,
    plot_curve,
    seed_everything,
)

#: output normalisation of the released model: r = (raw - MEAN) / STD (ImageReward/ImageReward.py)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


@dataclass
class Config:
    """Train a toy ImageReward, then ReFL a toy generator against it (`--stage` picks one)."""

    stage: str = option("both", "reward_model, refl, or both (reward model first)",
                        choices=("both", "reward_model", "refl"))
    # ---- reward model --------------------------------------------------------------------------
    rm_path: str | None = option(None, "local ImageReward directory for ReFL instead of training one: one "
                                 "saved here, or the released weights (README: med_config.json, "
                                 "ImageReward.safetensors, BERT tokenizer files)")
    rm_tasks: list[str] = option(["colors"], "toy-world tasks of the synthetic ranked lists")
    rm_prompts: int = option(300, "training prompts, each with rm_candidates ranked images (toy size)")
    rm_candidates: int = option(4, "images per prompt; ImageRewardDB has up to 9 (code README)")
    rm_steps: int = option(300, "optimizer steps (toy budget; official: 10 epochs)")
    rm_batch_size: int = option(32, "prompts per step, all their pairs (toy; official 4 x 4 accum x 4 GPUs)")
    rm_lr: float = option(1e-3, "Adam learning rate, constant; toy value for a from-scratch backbone "
                          "(official: 1e-5 with cosine decay)")
    fix_rate: float = option(0.0, "fraction of text/vision layers frozen (official train_one_node.sh: 0.7, "
                             "on pretrained BLIP; the toy backbone starts random, see README)")
    width: int = option(32, "hidden size of the toy text encoder and ViT (BLIP-L: 768 / 1024)")
    layers: int = option(2, "layers of each toy encoder (BLIP: 12 text, 24 ViT)")
    head_dropout: bool = option(False, "dropout 0.2/0.2/0.1 in the head while training, as official; off for "
                                "the from-scratch toy (it stalls the linear head, see README)")
    max_length: int = option(35, "prompt tokens, padded and truncated (official ImageReward.py)")
    # ---- ReFL ---------------------------------------------------------------------------------
    model: str = option("toy-unet", "toy-unet, toy-flow, tiny-sd, tiny-sd3 or a local diffusers directory")
    refl_reward: str = option("image_reward", "image_reward (the model above) or toy_soft",
                              choices=("image_reward", "toy_soft"))
    refl_tasks: list[str] = option(["colors"], "toy-world tasks of the ReFL prompts")
    num_steps: int = option(40, "sampler grid (official ReFL.py: set_timesteps(40))")
    stop_min: int = option(30, "earliest graded step index, inclusive (official: randint(30, 39))")
    stop_max: int = option(39, "latest graded step index, inclusive (official: randint(30, 39))")
    hinge: float = option(2.0, "L = relu(hinge - r) (official ReFL.py: relu(-r + 2))")
    grad_scale: float = option(1e-3, "lambda, the loss weight (official train_refl.sh --grad_scale 0.001)")
    pretrain_loss: bool = option(False, "alternate an epsilon-MSE step on real (toy) images with each ReFL step "
                                 "(paper Alg. 1; ReFL_SDXL.py --apply_pre_loss; off in ReFL.py)")
    refl_steps: int = option(20, "ReFL updates (toy budget; official train_refl.sh: 100)")
    batch_size: int = option(8, "prompts per update (official: 2 x 4 accumulation x 8 GPUs)")
    learning_rate: float = option(1e-4, "AdamW learning rate (toy value; official train_refl.sh: 1e-5)")
    max_grad_norm: float = option(1.0, "gradient clipping (official train_refl.sh)")
    lora_rank: int = option(0, "0 = fine-tune the whole denoiser, as the official trainer does; > 0: LoRA")
    gradient_checkpointing: bool = option(False, "diffusers gradient checkpointing (train_refl.sh: on)")
    eval_prompts: int = option(32, "held-out prompts sampled with fixed noise before and after ReFL")
    eval_steps: int = option(20, "sampler steps of the evaluation (toy base default, DDIM)")
    guidance_scale: float = option(4.5, "CFG of the evaluation sampler (toy base default; ReFL trains without)")
    seed: int = option(0, "random seed")
    device: str = option("cpu", "cpu or cuda")
    dtype: str = option("fp32", "generator weights dtype (trained weights stay fp32)", choices=("fp32", "bf16"))
    out_dir: str = option("runs/image_reward", "metrics, figures and the reward model")

    def __post_init__(self):
        require_model(self.model)
        require(self.rm_path is None or Path(self.rm_path).is_dir(), "rm_path", f"{self.rm_path!r} is not a directory")
        require(self.stage != "refl" or self.rm_path is not None or self.refl_reward == "toy_soft", "rm_path",
                "stage refl with the image_reward reward needs --rm-path (or --stage both)")
        for name in ("rm_prompts", "rm_steps", "rm_batch_size", "width", "layers", "num_steps", "refl_steps",
                     "batch_size", "eval_steps", "max_length"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.rm_candidates >= 2, "rm_candidates", f"a ranking needs >= 2 images, got {self.rm_candidates}")
        require(0 <= self.fix_rate <= 1, "fix_rate", f"must lie in [0, 1], got {self.fix_rate}")
        require(0 <= self.stop_min <= self.stop_max < self.num_steps, "stop_min",
                f"need 0 <= stop_min <= stop_max < num_steps, got {self.stop_min}, {self.stop_max}, {self.num_steps}")
        for name in ("rm_tasks", "refl_tasks"):
            require(bool(getattr(self, name)) and all(t in TASKS for t in getattr(self, name)), name,
                    f"choose from {TASKS}")
        require(not self.pretrain_loss or self.model.startswith("toy-"), "pretrain_loss",
                "the pre-training images here are toy-world drawings; use a toy model")
        require(self.lora_rank >= 0, "lora_rank", f"must be >= 0, got {self.lora_rank}")


# ============================================================================ the reward model
def toy_tokenizer(max_length: int = 35) -> PreTrainedTokenizerFast:
    """BERT-style word tokenizer over the toy vocabulary: "[CLS] words [SEP]", padded with [PAD]."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


# --8<-- [start:model]
class MLP(nn.Module):
    """The official head: 4 hidden linear layers with dropout (0.2, 0.2, 0.1) and NO activations (the ReLUs
    are commented out in ImageReward.py), weights N(0, (1 / (d + 1))^2), biases 0."""

    def __init__(self, input_size: int, dropout: Sequence[float] = (0.2, 0.2, 0.1)):
        super().__init__()
        d1, d2, d3 = dropout
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(d1), nn.Linear(1024, 128),
                                    nn.Dropout(d2), nn.Linear(128, 64), nn.Dropout(d3), nn.Linear(64, 16),
                                    nn.Linear(16, 1))
        for name, param in self.layers.named_parameters():
            nn.init.normal_(param, 0.0, 1.0 / (input_size + 1)) if "weight" in name else nn.init.zeros_(param)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageReward(nn.Module):
    """BLIP cross-encoder + MLP head. `forward(images, prompts, metadata)` follows common.rewards' signature."""

    name = "image_reward"

    def __init__(self, arch: dict, tokenizer: PreTrainedTokenizerFast, mean: float = REWARD_MEAN,
                 std: float = REWARD_STD):
        """arch: width / layers / heads of the text encoder, vision_width / vision_layers / vision_heads of
        the ViT (default: the text's), image_size, patch_size, max_length, max_positions. The released
        model (BLIP-L) is 768 / 12 / 12 text, 1024 / 24 / 16 ViT, 224, 16, 35, 512 (`BLIP_LARGE`)."""
        super().__init__()
        self.arch, self.tokenizer, self.mean, self.std = dict(arch), tokenizer, float(mean), float(std)
        w, n, heads = arch["width"], arch["layers"], arch.get("heads", 2)
        vw = arch.get("vision_width", w)
        self.visual_encoder = BlipVisionModel(BlipVisionConfig(  # BLIP's ViT: LayerNorm eps 1e-6 (vit.py)
            hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=arch.get("vision_layers", n),
            num_attention_heads=arch.get("vision_heads", heads), image_size=arch["image_size"],
            patch_size=arch["patch_size"], layer_norm_eps=1e-6))
        ids = tokenizer.convert_tokens_to_ids
        self.text_encoder = BlipTextModel(BlipTextConfig(
            vocab_size=len(tokenizer), hidden_size=w, encoder_hidden_size=vw, intermediate_size=4 * w,
            num_hidden_layers=n, num_attention_heads=heads,
            max_position_embeddings=arch.get("max_positions", max(arch["max_length"], 35)),
            pad_token_id=ids(tokenizer.pad_token), bos_token_id=ids(tokenizer.cls_token),
            sep_token_id=ids(tokenizer.sep_token), eos_token_id=ids(tokenizer.sep_token),
            is_decoder=True), add_pooling_layer=False)  # is_decoder builds cross-attention; forward stays bidirectional
        self.mlp = MLP(w, arch.get("head_dropout", (0.2, 0.2, 0.1)))

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        # padded to the batch's longest prompt: with the attention mask this equals padding to max_length
        t = self.tokenizer(list(prompts), padding="longest", truncation=True, max_length=self.arch["max_length"],
                           return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def raw_score(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        """The head's output (B, 1) before normalisation; train/src/ImageReward.py trains on it."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        # the prompt attends to itself and, through cross-attention, to every image patch
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return self.mlp(text.last_hidden_state[:, 0, :].float())  # the [CLS] state

    def score_grad(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        """Differentiable normalised reward (B, 1) of preprocessed images (official name: score_gard)."""
        # r = (raw - mean) / std
        return (self.raw_score(input_ids, attention_mask, pixel_values) - self.mean) / self.std

    score_gard = score_grad  # the released package's spelling

    def pixels(self, images: Tensor) -> Tensor:
        """Resize(size, bicubic) -> CenterCrop(size) -> CLIP normalisation, on tensors (ReFL.py)."""
        size = self.arch["image_size"]
        return clip_preprocess(images.to(self.device), size=size, crop_size=(size, size))

    def forward(self, images: Tensor, prompts: Sequence[str], metadata=None) -> tuple[Tensor, dict]:
        """(B, 3, H, W) in [0, 1] and B prompts -> (B,) rewards; differentiable in the images."""
        check_inputs(images, prompts, metadata, name=self.name)
        scores = self.score_grad(*self.tokenize(prompts), self.pixels(images)).squeeze(1)
        return check_scores(scores, name=self.name), {}
# --8<-- [end:model]

    # ---- the API of the `image-reward` package: score, inference_rank, save / load --------------
    @torch.no_grad()
    def score(self, prompt: str, images) -> float | list[float]:
        """Reward of one image (float) or of a list of images (list); PIL images, paths or tensors."""
        if isinstance(images, list | tuple):
            return self.inference_rank(prompt, images)[1]
        return self.inference_rank(prompt, [images])[1][0]

    @torch.no_grad()
    def inference_rank(self, prompt: str, images: Sequence) -> tuple[list[int], list[float]]:
        """(ranking, rewards): ranking[i] is image i's 1-based rank (1 = best), as in the package."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected one string, got {type(prompt).__name__}")
        rewards, _ = self(torch.stack([_to_tensor(x, i) for i, x in enumerate(images)]), [prompt] * len(images))
        order = torch.argsort(rewards, descending=True)
        return (torch.argsort(order) + 1).tolist(), rewards.tolist()

    def save(self, path: str | Path) -> Path:
        """config.json + model.safetensors + tokenizer files: no pickle anywhere."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"arch": self.arch, "mean": self.mean, "std": self.std},
                                                     indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        self.tokenizer.save_pretrained(str(path))
        return path


def _to_tensor(image, index: int) -> Tensor:
    """One image as a (3, H, W) float tensor in [0, 1]; a clear error names the bad item."""
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise ValueError(f"images[{index}]: {image} is not a file")
        image = Image.open(image)
    if isinstance(image, Image.Image):
        return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(
            image.height, image.width, 3).permute(2, 0, 1).float() / 255
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"images[{index}]: expected a PIL image, a path or a (3, H, W) tensor")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"images[{index}]: values must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return image.float()


def official_to_transformers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the released checkpoint (BLIP's own modules under `blip.`) to this module's names.

    ViT (timm names) -> BlipVisionModel; the BERT text encoder and the head keep their names; BLIP's
    contrastive projections (`blip.vision_proj`, `blip.text_proj`) and position-id buffers are dropped.
    """
    vit = [("blip.visual_encoder.cls_token", "visual_encoder.embeddings.class_embedding"),
           ("blip.visual_encoder.pos_embed", "visual_encoder.embeddings.position_embedding"),
           ("blip.visual_encoder.patch_embed.proj.", "visual_encoder.embeddings.patch_embedding."),
           ("blip.visual_encoder.norm.", "visual_encoder.post_layernorm."),
           ("blip.visual_encoder.blocks.", "visual_encoder.encoder.layers.")]
    block = [(".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
             (".attn.proj.", ".self_attn.projection.")]
    out = {}
    for key, value in state_dict.items():
        if "_proj." in key or key.endswith("position_ids"):
            continue
        new = key.replace("blip.text_encoder.", "text_encoder.", 1)
        for old, rep in vit:
            if new.startswith(old):
                new = rep + new[len(old):]
                if old.endswith("blocks."):
                    for a, b in block:
                        new = new.replace(a, b, 1)
        out[new] = value
    return out


def _bert_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC], as blip.py init_tokenizer adds them."""
    tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load(path: str | Path, device: str | torch.device = "cpu") -> ImageReward:
    """ImageReward from a local directory, either as written by `ImageReward.save` (config.json +
    model.safetensors + tokenizer) or the released weights: `med_config.json` + `ImageReward.safetensors`
    (the official ImageReward.pt converted once, see README) + the bert-base-uncased tokenizer files.
    Pickled checkpoints are refused: unpickling can run code."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: refusing a pickled checkpoint (loading it can run code); "
                         "convert it to safetensors once in an environment you trust (README)")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        config = json.loads((path / "config.json").read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        model = ImageReward(config["arch"], tokenizer, config["mean"], config["std"])
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    elif (path / "med_config.json").is_file() and (path / "ImageReward.safetensors").is_file():
        med = json.loads((path / "med_config.json").read_text())
        weights = official_to_transformers(load_file(str(path / "ImageReward.safetensors")))
        pos = weights["visual_encoder.embeddings.position_embedding"]
        patch = weights["visual_encoder.embeddings.patch_embedding.weight"]
        vision_layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("visual_encoder.encoder."))
        arch = {"width": med["hidden_size"], "layers": med["num_hidden_layers"], "heads": med["num_attention_heads"],
                "vision_width": patch.shape[0], "vision_layers": vision_layers,
                "vision_heads": patch.shape[0] // 64,  # ViT-B and ViT-L heads have 64 channels
                "patch_size": patch.shape[-1], "image_size": patch.shape[-1] * round((pos.shape[1] - 1) ** 0.5),
                "max_length": 35, "max_positions": med["max_position_embeddings"]}
        model = ImageReward(arch, _bert_tokenizer(path))
        model.load_state_dict(weights, strict=True)
    else:
        pickles = [p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES] if path.is_dir() else []
        raise ValueError(f"{path}: not an ImageReward directory (config.json + model.safetensors, or "
                         f"med_config.json + ImageReward.safetensors)"
                         + (f"; {pickles} are pickles: convert them to safetensors first (README)" if pickles else ""))
    return model.to(device).eval()

# --8<-- [start:freeze]
def freeze_layers(model: ImageReward, fix_rate: float) -> None:
    """train/src/ImageReward.py walks each encoder's parameters in order, freezing them, and stops after the
    first tensor of layer k = int(L * fix_rate): the embeddings, layers 0..k-1 and that one tensor stay fixed
    (BERT: layer k's query weight; BLIP's ViT: blocks.k.norm1, named layer_norm1 here); k = L freezes all."""
    if fix_rate <= 0:
        return
    n_text, n_vision = model.arch["layers"], model.arch.get("vision_layers", model.arch["layers"])
    for encoder, prefix, n, first in ((model.text_encoder, "encoder.layer.", n_text, "attention.self.query.weight"),
                                      (model.visual_encoder, "encoder.layers.", n_vision, "layer_norm1.weight")):
        k = int(n * fix_rate)
        for name, param in encoder.named_parameters():
            layer = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
            if (k >= n or name.startswith("embeddings.") or (layer is not None and layer < k)
                    or name == f"{prefix}{k}.{first}"):
                param.requires_grad_(False)
# --8<-- [end:freeze]


# --8<-- [start:ranking]
def ranked_lists(n_prompts: int, candidates: int, tasks: Sequence[str], generator: torch.Generator
                 ) -> tuple[Tensor, list[str], Tensor]:
    """Synthetic ImageRewardDB: (P, K, 3, H, W) images, P prompts, (P, K) ranks (1 = best, ties share).

    Each candidate draws the prompt's scene or a perturbed one (half each) at an object contrast a drawn
    from {0.6, 0.8, 1.0}. The hidden reward is r* = [the image shows the prompt] * a: a wrong image is
    worth 0 however clean, so wrong images tie (and their pairs are skipped).
    """
    images, prompts, hidden = [], [], []
    for prompt, meta in sample_prompts(n_prompts, tasks, generator):
        prompts.append(prompt)
        for _ in range(candidates):
            correct = bool(torch.rand(1, generator=generator) < 0.5)
            x = draw(meta if correct else perturb_scene(meta, generator), generator)
            a = 0.6 + 0.2 * int(torch.randint(3, (1,), generator=generator))
            background = x.flatten(1).quantile(0.25, dim=1)[:, None, None]
            images.append(background + a * (x - background))  # contrast a towards the background
            hidden.append(a * correct)
    r = torch.tensor(hidden).view(n_prompts, candidates)
    ranks = 1 + (r[:, None, :] > r[:, :, None]).sum(-1)  # 1 + number of strictly better candidates
    return torch.stack(images).view(n_prompts, candidates, 3, IMAGE_SIZE, IMAGE_SIZE), prompts, ranks


def ranking_pairs(ranks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The K-choose-2 expansion (train/src/ImageReward.py encode_data): (prompt, better, worse) index
    triples over every pair of a prompt's list with different ranks; tied pairs are skipped."""
    k = ranks.shape[1]
    i, j = torch.triu_indices(k, k, 1)
    p = torch.arange(ranks.shape[0]).repeat_interleave(len(i))
    i, j = i.repeat(ranks.shape[0]), j.repeat(ranks.shape[0])
    ri, rj = ranks[p, i], ranks[p, j]
    keep = ri != rj
    better = torch.where(ri < rj, i, j)
    worse = torch.where(ri < rj, j, i)
    return p[keep], better[keep], worse[keep]


def ranking_loss(r_better: Tensor, r_worse: Tensor) -> tuple[Tensor, Tensor]:
    """train.py loss_func: cross-entropy over [r_better, r_worse] with target 0, i.e.
    L = -mean log sigmoid(r_better - r_worse); accuracy = mean[r_better > r_worse] (ties count wrong)."""
    logits = torch.stack([r_better, r_worse], dim=1)
    loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    return loss, (r_better > r_worse).float().mean().detach()
# --8<-- [end:ranking]


def list_rewards(model: ImageReward, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """(P, K) raw head outputs of P ranked lists of K images (training and accuracy use them unnormalised)."""
    p, k = images.shape[:2]
    ids, mask = model.tokenize([c for c in prompts for _ in range(k)])
    return model.raw_score(ids, mask, model.pixels(images.flatten(0, 1))).view(p, k)


@torch.no_grad()
def calibrate(model: ImageReward, images: Tensor, prompts: Sequence[str]) -> None:
    """Set the output normalisation to the mean and std of the raw scores of a set of images, so that
    r = (raw - mean) / std has mean 0 and std 1 there (the released model's two constants are fixed
    numbers in ImageReward.py; a toy model trained from scratch needs its own)."""
    raw = list_rewards(model.eval(), images, prompts)
    model.mean, model.std = float(raw.mean()), float(raw.std())


@torch.no_grad()
def pairwise_accuracy(model: ImageReward, images: Tensor, prompts: Sequence[str], ranks: Tensor) -> float:
    """Held-out accuracy over every non-tied pair (the metric of train.py)."""
    was_training = model.training
    model.eval()
    r = list_rewards(model, images, prompts)
    p, b, w = ranking_pairs(ranks)
    model.train(was_training)
    return float((r[p, b] > r[p, w]).float().mean())


def train_reward_model(config: Config, log=None) -> tuple[ImageReward, dict]:
    """Fit ImageReward on synthetic ranked lists; returns the model and its held-out accuracy."""
    gen = torch.Generator().manual_seed(config.seed)
    train_set = ranked_lists(config.rm_prompts, config.rm_candidates, config.rm_tasks, gen)
    test_set = ranked_lists(max(config.rm_prompts // 3, 1), config.rm_candidates, config.rm_tasks, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        arch = {"width": config.width, "layers": config.layers, "image_size": IMAGE_SIZE, "patch_size": 4,
                "max_length": config.max_length, "head_dropout": (0.2, 0.2, 0.1) if config.head_dropout else (0, 0, 0)}
        model = ImageReward(arch, toy_tokenizer(config.max_length))
    freeze_layers(model, config.fix_rate)
    model.to(config.device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.rm_lr)
    before = pairwise_accuracy(model, *test_set)
    for step in range(config.rm_steps):
        idx = torch.randint(config.rm_prompts, (config.rm_batch_size,), generator=gen)
        r = list_rewards(model, train_set[0][idx], [train_set[1][i] for i in idx.tolist()])
        p, b, w = ranking_pairs(train_set[2][idx])
        loss, acc = ranking_loss(r[p, b], r[p, w])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log.log(step + 1, rm_loss=loss.detach(), rm_train_acc=acc)
    calibrate(model, train_set[0], train_set[1])
    return model, {"rm_acc_before": before, "rm_acc": pairwise_accuracy(model, *test_set)}


# ============================================================================ ReFL
# --8<-- [start:refl]
def refl_prefix(adapter: DiffusionAdapter, noise: Tensor, cond, schedule, stop: int,
                generator: torch.Generator | None = None) -> Tensor:
    """The no-grad part: ancestral steps 0..stop-1 from noise, conditional only (no CFG), as ReFL.py.

    DDIM with eta = 1 on the strided grid is the DDPM ancestral step of the official DDPMScheduler; flow
    models take Euler ODE steps (no official flow trainer exists).
    """
    x = noise
    with torch.no_grad():
        for i in range(stop):
            out = adapter.predict(x, schedule.timesteps[i], cond)
            x = (euler_step(out, x, schedule, i) if adapter.prediction == "flow" else
                 ddim_step(out, x, schedule, i, eta=1.0, convention="dpok", generator=generator)).prev_sample
    return x


def one_step_x0(adapter: DiffusionAdapter, x: Tensor, schedule, i: int, cond) -> Tensor:
    """The single graded denoiser call and its one-step clean estimate (pred_original_sample)."""
    out = adapter.predict(x, schedule.timesteps[i], cond)
    if adapter.prediction == "flow":
        # x0_hat = x_sigma - sigma v
        return (x.float() - schedule.sigmas[i].float() * out.float()).to(x.dtype)
    a = schedule.alphas_cumprod[schedule.timesteps[i].long()].float()
    # x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    return ((x.float() - (1 - a).sqrt() * out.float()) / a.sqrt()).to(x.dtype)


def refl_loss(rewards: Tensor, hinge: float = 2.0, grad_scale: float = 1e-3) -> Tensor:
    """L = lambda * mean relu(hinge - r): the gradient vanishes once the reward passes the hinge."""
    return grad_scale * F.relu(hinge - rewards).mean()
# --8<-- [end:refl]


def refl_step(adapter: DiffusionAdapter, reward_fn, prompts, metadata, mid: int, config: Config,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One ReFL loss: no-grad prefix to step mid, one graded call, x0_hat, decode, reward, hinge."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single string")
    schedule = adapter.schedule(config.num_steps)
    cond = adapter.encode_prompts(list(prompts))
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=generator, device=adapter.device)
    x = refl_prefix(adapter, noise.to(adapter.dtype), cond, schedule, mid, generator)
    images = adapter.decode(one_step_x0(adapter, x, schedule, mid, cond))
    rewards, _ = reward_fn(images, list(prompts), metadata)
    return refl_loss(rewards, config.hinge, config.grad_scale), rewards.detach()


@torch.no_grad()
def sample(adapter: DiffusionAdapter, prompts: Sequence[str], config: Config) -> Tensor:
    """Deterministic evaluation samples (DDIM eta=0 / Euler, CFG) from fixed noise; images in [0, 1]."""
    gen = torch.Generator(device=adapter.device).manual_seed(config.seed + 12345)
    x = torch.randn(len(prompts), *adapter.latent_shape, generator=gen, device=adapter.device).to(adapter.dtype)
    cond, uncond = adapter.encode_prompts(list(prompts)), adapter.encode_prompts([""] * len(prompts))
    schedule = adapter.schedule(config.eval_steps)
    for i in range(config.eval_steps):
        x = ode_step(adapter.predict(x, schedule.timesteps[i], cond, uncond, config.guidance_scale), x,
                     schedule, i).prev_sample
    return adapter.decode(x).float()


def evaluate(adapter, prompts, metadata, reward_model, toy_reward, config: Config) -> tuple[Tensor, dict]:
    """Evaluation samples and their mean toy reward (and ImageReward score, when there is a model)."""
    images = sample(adapter, prompts, config)
    scores = {"toy_soft": toy_reward(images, prompts, metadata)[0].mean().item()}
    if reward_model is not None:
        with torch.no_grad():
            scores["image_reward"] = reward_model(images, prompts)[0].mean().item()
    return images.cpu(), scores


def train(config: Config) -> dict:
    """Stage 1: fit ImageReward on ranked lists. Stage 2: ReFL a generator against it (or toy_soft)."""
    start = time.time()
    accelerator = make_accelerator(cpu=config.device == "cpu")
    seed_everything(config.seed + accelerator.process_index)
    device, main_process = accelerator.device, accelerator.is_main_process
    out = Path(config.out_dir)
    fit_rm = config.stage != "refl" and config.rm_path is None
    total = config.rm_steps * fit_rm + config.refl_steps * (config.stage != "reward_model")
    log = MetricsLogger(out / "metrics.jsonl", total=total, desc="image_reward", disable=not main_process)
    summary: dict = {}
    reward_model = load(config.rm_path, device) if config.rm_path is not None else None
    if fit_rm:
        reward_model, accuracy = train_reward_model(config, log)
        summary |= accuracy | {"rm_time_s": time.time() - start}
        if main_process:
            reward_model.save(out / "reward_model")
    if config.stage == "reward_model":
        log.close()
        return summary | {"train_time_s": time.time() - start}
    if reward_model is not None:
        reward_model = reward_model.to(device).requires_grad_(False).eval()

    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None, device=device)
    if config.lora_rank:
        adapter.add_lora(rank=config.lora_rank)
    else:
        adapter.denoiser.requires_grad_(True)
    params = adapter.trainable_parameters()
    for p in params:  # trained weights in fp32 even on a bf16 base
        p.data = p.data.float()
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    # AdamW, weight decay 1e-2: diffusers' train_text_to_image default, which ReFL.py inherits
    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=1e-2)
    toy_reward = load_reward("toy_soft")
    reward_fn = reward_model if config.refl_reward == "image_reward" else toy_reward
    data_gen = torch.Generator().manual_seed(config.seed + 1 + accelerator.process_index)
    gen = torch.Generator(device=device).manual_seed(config.seed + 2 + accelerator.process_index)
    eval_set = sample_prompts(config.eval_prompts, config.refl_tasks, torch.Generator().manual_seed(10_000))
    eval_prompts, eval_meta = [p for p, _ in eval_set], [m for _, m in eval_set]
    before_images, before = evaluate(adapter, eval_prompts, eval_meta, reward_model, toy_reward, config)

    def update(loss: Tensor) -> None:
        loss.backward()
        for p in params if accelerator.num_processes > 1 else []:  # average over processes, as DDP does
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(config.refl_steps):
        pm = sample_prompts(config.batch_size, config.refl_tasks, data_gen)
        prompts, meta = [p for p, _ in pm], [m for _, m in pm]
        record = {}
        if config.pretrain_loss:  # paper Alg. 1 / ReFL_SDXL.py: a pre-training step, then a ReFL step
            real = torch.stack([draw(m, data_gen) for m in meta])
            # ReFL_SDXL.py _pretrain_loss: the plain denoising loss on real images
            record["pretrain_loss"] = denoising_loss(adapter, adapter.encode(real), adapter.encode_prompts(prompts), gen)
            update(record["pretrain_loss"])
        # mid ~ U{stop_min..stop_max} (ReFL.py: random.randint(30, 39))
        mid = int(torch.randint(config.stop_min, config.stop_max + 1, (1,), generator=data_gen))
        loss, rewards = refl_step(adapter, reward_fn, prompts, meta, mid, config, gen)
        update(loss)
        log.log(fit_rm * config.rm_steps + step + 1, reward=accelerator.gather(rewards).mean(),
                refl_loss=loss.detach(), **{k: v.detach() for k, v in record.items()})
    log.close()
    after_images, after = evaluate(adapter, eval_prompts, eval_meta, reward_model, toy_reward, config)
    summary |= {f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()}
    if main_process:
        n = min(8, len(eval_prompts))  # one row before, one row after
        image_grid(torch.cat([before_images[:n], after_images[:n]]), nrow=n, out_png=out / "before_after.png",
                   labels=["before", "after"])
        plot_curve(out / "metrics.jsonl", "reward", out / "reward_curve.png", title=f"ReFL ({config.refl_reward})")
    return summary | {"train_time_s": time.time() - start}


def main(argv: Sequence[str] | None = None) -> dict:
    summary = train(parse_config(Config, argv))
    print(summary)
    return summary
