"""CLIP score and PickScore: dual-encoder rewards on transformers' `CLIPModel`.

Both embed the image and the prompt with a CLIP model, L2-normalise the two embeddings and score their
cosine similarity; they differ in the weights and in the scale.

- `ClipScore`: `scale * cos(f_img, f_txt)` (optionally `max(cos, 0)` first). The scale is a convention:
  raw cosine here by default (scale 1, range [-1, 1]). CLIPScore (Hessel et al. 2021, arXiv 2104.08718)
  reports `2.5 * max(cos, 0)`; torchmetrics' CLIPScore reports `100 * max(cos, 0)`; the Flow-GRPO
  `clipscore` reward (flow_grpo/clip_scorer.py) is `logits_per_image.diag() / 30`, i.e.
  `100 * cos / 30` with openai/clip-vit-large-patch14 (whose `exp(logit_scale)` is 100), and resizes
  with torchvision's default (bilinear) filter instead of the processor's bicubic one.
  HPS v1 (notes/reward.md B.1) is `100 * cos` on its fine-tuned CLIP-L.
- `PickScore` (Kirstain et al. 2023, arXiv 2305.01569; notes/reward.md B.3): a CLIP-H/14 fine-tuned on
  Pick-a-Pic; `score = exp(logit_scale) * cos` (about 20-23 for real images), and `probs(prompt, images)`
  is the softmax of those scores over candidate images, as in the PickScore README. Flow-GRPO divides the
  score by 26 to use it as a reward (pass weight 1/26 in `CombinedReward` for the same).

Images go through `ClipPreprocess` (torch, differentiable), so both rewards back-propagate to the pixels;
the CLIP weights are frozen. `tiny=True` builds a small random CLIP and a small BPE tokenizer in code
(no downloads) for tests.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from common.rewards.base import Metadata, check_inputs, check_scores
from common.rewards.preprocess import ClipPreprocess

# ---------------------------------------------------------------------------------------------------
# Tiny random CLIP for tests (notes/reward.md 0.4: hidden 32, 2 layers, image 32, patch 8)
# ---------------------------------------------------------------------------------------------------

TINY_IMAGE_SIZE = 32
_TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"), ("i", "n"),
                ("r", "e"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real `CLIPTokenizer` over a ~150-entry byte-level BPE vocabulary (lower-case letters, digits,
    punctuation, a few merges). The special tokens take the last two ids, as in CLIP's vocabulary."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _TINY_MERGES)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _TINY_MERGES))
        return CLIPTokenizer.from_pretrained(tmp)


def tiny_clip_config(tokenizer: CLIPTokenizer, projection_dim: int = 32) -> CLIPConfig:
    """A CLIP config small enough for CPU tests; token ids agree with `tokenizer`."""
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tokenizer), max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=TINY_IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def tiny_clip(seed: int = 0, projection_dim: int = 32) -> tuple[CLIPModel, CLIPTokenizer, ClipPreprocess]:
    """Random tiny CLIP (the same weights for the same seed), its tokenizer and a 32-px preprocess."""
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(tokenizer, projection_dim))
    return model, tokenizer, ClipPreprocess(size=TINY_IMAGE_SIZE, crop_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))


# ---------------------------------------------------------------------------------------------------
# Loading real weights from a local directory
# ---------------------------------------------------------------------------------------------------

def require_local_dir(path: str | Path | None, field: str) -> Path:
    """A local directory or a ValueError naming `field` (nothing is ever fetched from a hub)."""
    if path is None or not Path(path).is_dir():
        raise ValueError(f"{field} must be an existing local directory, got {path!r} "
                         "(models are never downloaded; save them to disk first)")
    return Path(path)


def load_clip_model(clip_dir: str | Path, field: str = "clip_dir") -> CLIPModel:
    """`CLIPModel` from a local directory holding config.json and safetensors weights (pickled
    pytorch_model.bin is refused)."""
    directory = require_local_dir(clip_dir, field)
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"{field}: no *.safetensors weights in {directory}; only safetensors are loaded "
                         "(convert pytorch_model.bin once with save_pretrained in a trusted environment)")
    return CLIPModel.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)


def load_clip(clip_dir: str | Path, processor_dir: str | Path | None = None
              ) -> tuple[CLIPModel, CLIPTokenizer, ClipPreprocess]:
    """Model from `clip_dir`; tokenizer files and preprocessor_config.json from `processor_dir`
    (default: `clip_dir`). PickScore ships its weights apart from the CLIP-H processor it was trained
    with, hence the two directories."""
    model = load_clip_model(clip_dir)
    proc_dir = require_local_dir(processor_dir if processor_dir is not None else clip_dir, "processor_dir")
    preprocess = ClipPreprocess.from_pretrained(proc_dir)
    has_vocab = (proc_dir / "vocab.json").is_file() and (proc_dir / "merges.txt").is_file()
    if not ((proc_dir / "tokenizer.json").is_file() or has_vocab):
        raise ValueError(f"processor_dir: no tokenizer files (tokenizer.json, or vocab.json + merges.txt) in "
                         f"{proc_dir}")
    tokenizer = CLIPTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
    return model, tokenizer, preprocess


def image_features(model: CLIPModel, pixel_values: Tensor) -> Tensor:
    """Projected image embedding (B, D); transformers 5 wraps it in a ModelOutput, 4.x returns it."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, Tensor) else out.pooler_output


def text_features(model: CLIPModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Projected text embedding (B, D) at the end-of-text token."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------

class _ClipEmbedder(nn.Module):
    """Frozen CLIP model + tokenizer + differentiable preprocessing; unit-norm embeddings."""

    name = "clip"

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, preprocess: ClipPreprocess):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit vectors; keeps the graph to `images`."""
        pixels = self.preprocess(images.to(self.device)).to(self.model.dtype)
        return F.normalize(image_features(self.model, pixels).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """list of B prompts -> (B, D) unit vectors (truncated to the model's 77 positions)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        feats = text_features(self.model, tokens["input_ids"].to(self.device),
                              tokens["attention_mask"].to(self.device))
        return F.normalize(feats.float(), dim=-1)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        # cos_i = <f_img_i / |f_img_i|, f_txt_i / |f_txt_i|>
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def _model_tokenizer_preprocess(model_dir: str | Path | None, processor_dir: str | Path | None, tiny: bool,
                                field: str) -> tuple[CLIPModel, CLIPTokenizer, ClipPreprocess]:
    if tiny:
        if model_dir is not None:
            raise ValueError(f"pass either {field} or tiny=True, not both")
        return tiny_clip()
    if model_dir is None:
        raise ValueError(f"{field} is required: a local directory with a transformers CLIPModel "
                         "(config.json + *.safetensors); use tiny=True for a random test model")
    return load_clip(model_dir, processor_dir)


class ClipScore(_ClipEmbedder):
    """`score = scale * cos(f_img, f_txt)`, or `scale * max(cos, 0)` with `clamp_at_zero=True`.

    Real weights: `ClipScore("path/to/clip-vit-large-patch14")` (the Flow-GRPO choice) with the
    tokenizer files and preprocessor_config.json in the same directory.
    Defaults: raw cosine. `scale=2.5, clamp_at_zero=True` gives Hessel et al.'s CLIP-S;
    `scale=100/30` gives Flow-GRPO's clipscore reward.
    """

    name = "clip_score"

    def __init__(self, clip_dir: str | Path | None = None, *, processor_dir: str | Path | None = None,
                 tiny: bool = False, scale: float = 1.0, clamp_at_zero: bool = False):
        super().__init__(*_model_tokenizer_preprocess(clip_dir, processor_dir, tiny, "clip_dir"))
        self.scale = float(scale)
        self.clamp_at_zero = clamp_at_zero

    def forward(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        cos = self.cosine(images, prompts)
        # CLIP-S = w * max(cos, 0)  (Hessel et al. 2021, eq. 1, w = 2.5)
        scores = self.scale * (cos.clamp(min=0) if self.clamp_at_zero else cos)
        return check_scores(scores, name=self.name), {"cosine": cos.detach()}


class PickScore(_ClipEmbedder):
    """`score = exp(logit_scale) * cos(f_img, f_txt)` with the PickScore_v1 CLIP-H weights.

    Real weights: `PickScore("path/to/PickScore_v1", processor_dir="path/to/CLIP-ViT-H-14-laion2B-s32B-b79K")`.
    """

    name = "pickscore"

    def __init__(self, model_dir: str | Path | None = None, *, processor_dir: str | Path | None = None,
                 tiny: bool = False):
        super().__init__(*_model_tokenizer_preprocess(model_dir, processor_dir, tiny, "model_dir"))

    def forward(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        cos = self.cosine(images, prompts)
        # s(x, c) = exp(logit_scale) * <f_txt, f_img>   (PickScore README)
        scores = self.model.logit_scale.exp().float() * cos
        return check_scores(scores, name=self.name), {"cosine": cos.detach()}

    def probs(self, prompt: str, images: Tensor) -> Tensor:
        """Preference probabilities of N candidate images for one prompt: softmax of their scores."""
        if not isinstance(prompt, str):
            raise ValueError(f"pickscore: probs takes one prompt string, got {type(prompt).__name__}")
        scores, _ = self(images, [prompt] * images.shape[0])
        # p_i = exp(s_i) / sum_j exp(s_j)
        return scores.softmax(dim=0)
