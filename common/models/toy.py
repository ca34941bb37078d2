"""The toy-world generators: real diffusers/transformers classes with tiny configs, on 16x16x3 pixels.

- tokenizer: word level over `common.toy.world.VOCABULARY` (a `tokenizers` WordLevel model wrapped
  in PreTrainedTokenizerFast), "<bos> words <eos>" padded with "<pad>" to MAX_TOKENS.
- text encoder: CLIPTextModelWithProjection (2 layers, width 32), frozen at a seeded random init
  with unit-scale embeddings: the base models learn to read its features, as SD learns to read a
  frozen CLIP.
- "unet": UNet2DConditionModel predicting epsilon (SD1.x-like), DDIM sampling on SD1.x's scaled-linear betas;
  wrapped in `SDAdapter` without a VAE (pixel space, states are images in [-1, 1]).
- "flow": SD3Transformer2DModel predicting velocity (SD3-like MMDiT), FlowMatchEulerDiscreteScheduler;
  wrapped in `SD3Adapter` with the one CLIP encoder and no T5 (t5_max_length=0).

`build_toy_adapter(kind)` gives a random model; `load_toy_base(kind)` the shipped base weights
(`common/toy/bases/<kind>.safetensors`, trained by `python -m common.toy.train_bases --kind KIND`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from common.models.sd import SDAdapter
from common.models.sd3 import SD3Adapter
from common.toy.world import IMAGE_SIZE, VOCABULARY

Kind = Literal["unet", "flow"]
KINDS: tuple[str, ...] = ("unet", "flow")
#: "<bos>" + the longest caption (7 words, "a red circle and a blue square") + "<eos>", rounded up
MAX_TOKENS = 10
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")
TEXT_WIDTH = 32
BASES_DIR = Path(__file__).resolve().parents[1] / "toy" / "bases"


# ---- text ---------------------------------------------------------------------------------------
def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one id per word of VOCABULARY, "<bos> ... <eos>", padded with "<pad>"."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=MAX_TOKENS, pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def toy_text_encoder() -> CLIPTextModelWithProjection:
    """CLIP text transformer, 2 layers of width 32, projection 32 (pooled at the first "<eos>")."""
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    config = CLIPTextConfig(vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY), hidden_size=TEXT_WIDTH,
                            intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
                            pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    model = CLIPTextModelWithProjection(config)
    # CLIP initialises embeddings with std 0.02, so a frozen random encoder would hand the denoiser
    # features of size ~0.02 (SD3 reads the penultimate layer, before the final layer norm). With
    # unit-scale token (and half-scale position) embeddings its outputs carry the words at unit scale.
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
        model.text_model.embeddings.position_embedding.weight.normal_(0.0, 0.5)
    return model


# ---- denoisers ----------------------------------------------------------------------------------
def toy_unet() -> UNet2DConditionModel:
    """Epsilon UNet on 16x16x3 pixels: resolutions 16 and 8, attention (self + cross to the CLIP
    tokens) only at 8x8 and in the mid block, where it is cheap (SD1.x has none at its finest level
    either). diffusers reads `attention_head_dim` as the number of heads here: 2 heads of width 16.
    """
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2, norm_num_groups=4)


def toy_transformer() -> SD3Transformer2DModel:
    """Velocity MMDiT on 16x16x3 pixels: 2x2 patches (64 image tokens), 4 joint blocks of width 64."""
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=64, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=IMAGE_SIZE // 2)


def toy_scheduler(kind: Kind) -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """unet: SD1.x's scheduler config (scaled-linear betas 0.00085..0.012 over 1000 steps, DDIM with
    steps_offset 1); flow: rectified flow with shift 1 (the SD3 paper's shift at its lowest resolution).
    """
    if kind == "unet":
        return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1)
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _wrap(kind: Kind, denoiser, text_encoder, tokenizer) -> SDAdapter | SD3Adapter:
    if kind == "unet":
        return SDAdapter(denoiser, text_encoder, tokenizer, toy_scheduler(kind), vae=None)
    return SD3Adapter(denoiser, [text_encoder], [tokenizer], toy_scheduler(kind), vae=None, t5_max_length=0)


def build_toy_adapter(kind: Kind, seed: int = 0) -> SDAdapter | SD3Adapter:
    """A randomly initialised toy model (seeded), wrapped in its family's adapter."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = toy_text_encoder()
        denoiser = toy_unet() if kind == "unet" else toy_transformer()
    return _wrap(kind, denoiser, text_encoder, toy_tokenizer())


def save_toy_weights(adapter: SDAdapter | SD3Adapter, path: str | Path) -> None:
    """Denoiser and text encoder in one safetensors file, keys prefixed "denoiser." / "text_encoder."."""
    text_encoder = adapter.text_encoder if isinstance(adapter, SDAdapter) else adapter.text_encoders[0]
    tensors = {f"denoiser.{k}": v.contiguous() for k, v in adapter.denoiser.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v.contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(tensors, str(path))


def load_toy_base(kind: Kind, path: str | Path | None = None) -> SDAdapter | SD3Adapter:
    """The shipped toy base model `kind` ("unet" or "flow"), or weights saved by `save_toy_weights`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path) if path is not None else BASES_DIR / f"{kind}.safetensors"
    if not path.is_file():
        raise ValueError(f"no toy base weights at {path}; train them with "
                         f"`python -m common.toy.train_bases --kind {kind}`")
    tensors = load_file(str(path))
    adapter = build_toy_adapter(kind)
    text_encoder = adapter.text_encoder if isinstance(adapter, SDAdapter) else adapter.text_encoders[0]
    for prefix, module in (("denoiser.", adapter.denoiser), ("text_encoder.", text_encoder)):
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return adapter


def base_card(kind: Kind) -> dict:
    """The JSON record written next to the shipped weights (config, training run, toy-GenEval scores)."""
    return json.loads((BASES_DIR / f"{kind}.json").read_text())
