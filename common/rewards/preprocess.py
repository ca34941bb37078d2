"""Differentiable CLIP image preprocessing in torch.

CLIP reward models were trained on images that went through the CLIP image processor: resize the
shortest side to `size` (bicubic), center crop to `crop_size`, scale to [0, 1] and normalise with the
CLIP mean/std. The processor works on PIL images, so gradients cannot flow through it. `ClipPreprocess`
performs the same three steps on a float tensor so that a reward can be back-propagated to the pixels
(ReFL, AlignProp, DRaFT all preprocess tensors for this reason; notes/reward.md F.1).

Difference from transformers' `CLIPImageProcessor` (PIL backend): the processor first quantises the
image to uint8 and resizes it with PIL's bicubic filter, which rounds the result to uint8 again; here the
image stays float throughout. torch's `interpolate(mode="bicubic", antialias=True)` uses the same
kernel as PIL (cubic coefficient a = -0.5, support widened by the scale factor when downsampling); on
float images the two agree to 1e-5. On uint8 input the processor differs by its rounding: at most about
1/255 per pixel on smooth images (tested). Near sharp edges PIL also clips the overshoot of its first
(horizontal) pass to [0, 255] before the vertical pass, which moves a few pixels by up to ~10/255.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The OpenAI CLIP normalisation constants (also used by LAION's OpenCLIP ViT-H-14 and by PickScore).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest_side(size: int, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) when the shortest side becomes `size`; the long side is truncated to int,
    as in transformers' `get_resize_output_image_size`."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def clip_preprocess(images: Tensor, size: int = 224, crop_size: tuple[int, int] = (224, 224),
                    mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, crop_h, crop_w) normalised float32 pixel values.

    Differentiable with respect to `images`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    height, width = x.shape[-2:]
    new_h, new_w = resize_shortest_side(size, height, width)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        # PIL clips bicubic overshoot to the valid pixel range; do the same
        x = x.clamp(0.0, 1.0)
    crop_h, crop_w = crop_size
    if crop_h > new_h or crop_w > new_w:
        raise ValueError(f"clip_preprocess: crop_size {crop_size} is larger than the resized image "
                         f"({new_h}, {new_w}); set size >= crop_size")
    # same offsets as transformers' center_crop: floor((H - h) / 2)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[..., top:top + crop_h, left:left + crop_w]
    # x_norm = (x - mean) / std, per channel
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _as_int_size(value: Any, field: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"preprocessor config: {field} must be an int or {{'shortest_edge': n}}, got {value!r}")


def _as_hw(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    raise ValueError(f"preprocessor config: {field} must be an int or {{'height', 'width'}}, got {value!r}")


@dataclass(frozen=True)
class ClipPreprocess:
    """The CLIP processor's image settings, applied by `clip_preprocess` when called.

    Defaults are those of `openai/clip-vit-large-patch14` and `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
    (shortest side 224, center crop 224, OpenAI mean/std).
    """

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.size, self.crop_size, self.mean, self.std)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPreprocess:
        """From the fields of a `preprocessor_config.json` (size, crop_size, image_mean, image_std)."""
        for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
            if config.get(flag, True) is False:
                raise ValueError(f"preprocessor config: {flag}=False is not supported by ClipPreprocess")
        size = _as_int_size(config.get("size", 224), "size")
        crop = _as_hw(config.get("crop_size", size), "crop_size")
        return cls(size=size, crop_size=crop, mean=tuple(config.get("image_mean", CLIP_MEAN)),
                   std=tuple(config.get("image_std", CLIP_STD)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipPreprocess:
        """Read `preprocessor_config.json` from a local model directory."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise ValueError(f"ClipPreprocess: no preprocessor_config.json in {directory} (copy it from the "
                             "CLIP processor the model was trained with)")
        return cls.from_config(json.loads(path.read_text()))

    @classmethod
    def from_image_processor(cls, processor: Any) -> ClipPreprocess:
        """From a transformers `CLIPImageProcessor` object."""
        return cls.from_config(processor.to_dict())
