"""JPEG compressibility and incompressibility, DDPO's two hand-written rewards (arXiv 2305.13301).

Each image is rounded to 8 bits and saved as a JPEG at quality 95; the reward is the file size in kB
(bytes / 1000): incompressibility = size, compressibility = -size (ddpo-pytorch `ddpo_pytorch/rewards.py`).
The size depends on the image only through PIL's encoder, so the reward has no gradient.

Flow-GRPO's copy (flow_grpo/rewards.py) divides compressibility by 500; use a `CombinedReward` weight
of 1/500 to reproduce that scale.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from common.rewards.base import Metadata, check_inputs, check_scores

JPEG_QUALITY = 95  # ddpo-pytorch rewards.py, jpeg_incompressibility


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounding as ddpo-pytorch does."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """File size in kB (1 kB = 1000 bytes) of each image saved as JPEG at `quality`; (B,) float32."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegIncompressibility:
    """`r(x) = size_kB(JPEG_q95(x))`: larger, more detailed images score higher."""

    name = "jpeg_incompressibility"

    def __init__(self, quality: int = JPEG_QUALITY):
        if not 1 <= quality <= 100:
            raise ValueError(f"{self.name}: quality must be in [1, 100], got {quality}")
        self.quality = quality

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        size = jpeg_size_kb(images, self.quality)
        return check_scores(size, name=self.name), {"jpeg_kb": size}


class JpegCompressibility(JpegIncompressibility):
    """`r(x) = -size_kB(JPEG_q95(x))`: smooth, low-detail images score higher."""

    name = "jpeg_compressibility"

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        size = jpeg_size_kb(images, self.quality)
        return check_scores(-size, name=self.name), {"jpeg_kb": size}
