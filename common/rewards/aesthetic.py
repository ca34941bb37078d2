"""LAION aesthetic predictor: a small MLP on CLIP ViT-L/14 image embeddings (DDPO's aesthetic reward).

The predictor (christophschuhmann/improved-aesthetic-predictor, weights `sac+logos+ava1-l14-linearMSE`)
maps the L2-normalised 768-d CLIP ViT-L/14 image embedding to a 1-10 rating. Its MLP is
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout 0.2 / 0.2 / 0.1 and, as published, no activation
functions between the linear layers (the ReLUs are commented out in the official code and in
ddpo-pytorch's copy, `ddpo_pytorch/aesthetic_scorer.py`), so at inference it is one affine map.
The layer indices of `AestheticHead.layers` match the official state-dict keys (layers.0, .2, .4, .6, .7).

Differences from ddpo-pytorch: DDPO rounds images to uint8 and preprocesses them with the PIL CLIP
processor under `torch.no_grad`; here images stay float and go through `ClipPreprocess`, so the reward is
differentiable (as AlignProp uses it). The score differs from DDPO's by the preprocessing rounding only
(see `common/rewards/preprocess.py`).

Weights are loaded from safetensors only. The official head is a pickled `.pth`; convert it once in an
environment you trust (see docs/common/rewards.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from common.rewards.base import Metadata, check_inputs, check_scores
from common.rewards.clip import image_features, load_clip_model, tiny_clip
from common.rewards.preprocess import ClipPreprocess

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (official layer sizes; dropout, no activations)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, embed_dim) unit-norm CLIP image embeddings -> (B, 1) ratings."""
        return self.layers(embeds)


def load_safetensors(path: str | Path, field: str = "head_path") -> dict[str, Tensor]:
    """State dict from a .safetensors file; pickle formats are refused (unpickling runs code)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{field}: {path.name} is a pickle file; only .safetensors is loaded. Convert it once "
                         "in a trusted environment: safetensors.torch.save_file(torch.load(p, weights_only=True), "
                         "'head.safetensors')")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{field}: expected a .safetensors file, got {path.name!r}")
    if not path.is_file():
        raise ValueError(f"{field}: file not found: {path}")
    return load_file(str(path))


class AestheticReward(nn.Module):
    """`score = MLP(f_img / |f_img|)`, f_img the CLIP image embedding (ViT-L/14 for the real predictor).

    Real weights: `AestheticReward(clip_dir="path/to/clip-vit-large-patch14",
    head_path="path/to/sac+logos+ava1-l14-linearMSE.safetensors")`; the directory holds the CLIPModel
    (config.json, *.safetensors) and preprocessor_config.json.
    `tiny=True`: a random tiny CLIP and a random head (or the head in `head_path`, sized to it).
    """

    name = "aesthetic"

    def __init__(self, clip_dir: str | Path | None = None, head_path: str | Path | None = None,
                 tiny: bool = False):
        super().__init__()
        if tiny:
            if clip_dir is not None:
                raise ValueError("aesthetic: pass either clip_dir or tiny=True, not both")
            clip, _, preprocess = tiny_clip()
        else:
            if clip_dir is None or head_path is None:
                raise ValueError("aesthetic: clip_dir (local CLIP ViT-L/14 directory) and head_path (the MLP "
                                 "weights as .safetensors) are both required unless tiny=True")
            clip = load_clip_model(clip_dir)
            preprocess = ClipPreprocess.from_pretrained(clip_dir)
        self.clip = clip.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.head = AestheticHead(embed_dim=clip.config.projection_dim)
        if head_path is not None:
            state = load_safetensors(head_path)
            try:
                self.head.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"aesthetic: head_path {head_path} does not fit AestheticHead("
                                 f"embed_dim={clip.config.projection_dim}): {err}") from err
        self.head.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm CLIP image embeddings (differentiable)."""
        pixels = self.preprocess(images.to(self.device)).to(self.clip.dtype)
        # e = f_img / ||f_img||_2   (the predictor was trained on normalised embeddings)
        return F.normalize(image_features(self.clip, pixels), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        scores = self.head(self.embed(images)).squeeze(1).float()
        return check_scores(scores, name=self.name), {}
