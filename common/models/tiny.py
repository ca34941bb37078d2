"""Tiny random versions of the real diffusers pipelines, built in code (no hub, no files).

Each builder returns an adapter whose components are the real classes (UNet2DConditionModel,
SD3Transformer2DModel, FluxTransformer2DModel, AutoencoderKL, CLIPTextModel(WithProjection),
T5EncoderModel, CLIPTokenizer, T5Tokenizer, the real schedulers) with tiny configs: 16x16 images,
8x8 latents, 16-token prompts, a few thousand to ~100k parameters. They make every adapter testable on
a CPU in milliseconds. `save_pipeline_dir` writes an adapter as a diffusers pipeline directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from common.models.flux import FluxAdapter
from common.models.sd import SDAdapter
from common.models.sd3 import SD3Adapter

#: prompt length in tokens of every tiny tokenizer (the real CLIP uses 77)
MAX_TOKENS = 16
#: image side in pixels; the tiny VAEs downsample by 2, so latents are 8x8
IMAGE_SIZE = 16
_CHARS = string.ascii_lowercase + string.digits


# ---- tokenizers ----------------------------------------------------------------------------------
def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with single characters and no merges: every word is spelt out letter by letter."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # a character inside a word, and at its end
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram tokenizer over single characters, with T5's <pad>=0, </s>=1, <unk>=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in _CHARS] + [(c, -4.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


# ---- text encoders and VAE -----------------------------------------------------------------------
def _clip_config(vocab_size: int, hidden: int, projection: int = 8) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _t5(vocab_size: int, width: int = 32) -> T5EncoderModel:
    # T5 v1.1 layout (gated GELU), as the T5-XXL encoders of SD3 and FLUX
    config = T5Config(vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    return T5EncoderModel(config)


def _vae(scaling_factor: float, shift_factor: float | None = None, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, **kwargs)


def _sd_scheduler() -> DDIMScheduler:
    # SD1.x scheduler config (scaled-linear betas, offset 1), as DDPO loads it
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# ---- pipelines -----------------------------------------------------------------------------------
def tiny_sd(seed: int = 0) -> SDAdapter:
    """SD1.x layout: CrossAttn UNet (eps), CLIPTextModel, AutoencoderKL (factor 0.18215), DDIM."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(len(tokenizer), hidden=16))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
        vae = _vae(scaling_factor=0.18215)
    return SDAdapter(unet, text_encoder, tokenizer, _sd_scheduler(), vae=vae)


def tiny_sdxl(seed: int = 0) -> SDAdapter:
    """SDXL layout: two CLIP encoders (the second with projection), text_time added conditioning."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(len(tokenizer), hidden=16))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer_2), hidden=16, projection=8))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
            # added conditioning: 6 time ids x 4 sinusoidal dims + the 8-dim pooled text embedding
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8)
        vae = _vae(scaling_factor=0.13025)
    return SDAdapter(unet, text_encoder, tokenizer, _sd_scheduler(), vae=vae,
                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def tiny_sd3(seed: int = 0, t5: bool = True) -> SD3Adapter:
    """SD3 layout: MMDiT (velocity), CLIP-L + CLIP-G with projection, T5 (or none), shift-3 flow schedule."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers = [clip_tokenizer(), clip_tokenizer()]
        encoders = [CLIPTextModelWithProjection(_clip_config(len(tokenizers[0]), hidden=8, projection=8)),
                    CLIPTextModelWithProjection(_clip_config(len(tokenizers[1]), hidden=16, projection=8))]
        t5_tok = t5_tokenizer() if t5 else None
        t5_enc = _t5(len(t5_tok), width=32) if t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=16, pos_embed_max_size=8)
        # SD3's VAE latent statistics; SD3 has no quant convs
        vae = _vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3 / SD3.5 scheduler config
    return SD3Adapter(transformer, encoders, tokenizers, scheduler, vae=vae, t5_encoder=t5_enc,
                      t5_tokenizer=t5_tok)


def tiny_flux(seed: int = 0) -> FluxAdapter:
    """FLUX.1-dev layout: double + single stream blocks, guidance embedding, CLIP pooled + T5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(len(tokenizer), hidden=16))
        text_encoder_2 = _t5(len(tokenizer_2), width=32)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        vae = _vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    # FLUX.1 scheduler config: resolution-dependent (dynamic) shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxAdapter(transformer, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler, vae)


# ---- diffusers directory -------------------------------------------------------------------------
def save_pipeline_dir(adapter, path: str | Path) -> Path:
    """Write `adapter` as a diffusers pipeline directory: model_index.json + one folder per component.

    Works for any adapter with `pipeline_class_name` and `pipeline_components()` (SD, SDXL, SD3, FLUX).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": adapter.pipeline_class_name,
                                "_diffusers_version": diffusers.__version__}
    for name, component in adapter.pipeline_components().items():
        if component is None:
            index[name] = [None, None]
            continue
        component.save_pretrained(path / name)
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
