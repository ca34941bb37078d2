"""Stable Diffusion 3 / 3.5: a velocity-prediction MMDiT, CLIP encoders with projection (+ optional T5).

Mirrors diffusers' StableDiffusion3Pipeline: the CLIP penultimate hidden states side by side, zero-padded
to the joint attention width, followed by the T5 tokens (zeros when T5 is left out, as the pipeline does);
pooled = the projected CLIP text embeddings side by side. The encoders are given as lists, so the real
model passes [CLIP-L, CLIP-G] and a one-encoder model (the toy flow transformer) passes [clip].
With `vae=None` the model works in pixel space: states are images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule, guided_forward


def _pair(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


def _tokens(tokenizer, prompts: list[str], max_length: int, encoder: nn.Module) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(next(encoder.parameters()).device)


class SD3Adapter(DiffusionAdapter):
    """SD3-family adapter.

    text_encoders / tokenizers: CLIPTextModelWithProjection models and their tokenizers, in the
        pipeline's order (CLIP-L, CLIP-G); one is fine.
    t5_encoder / t5_tokenizer: optional T5EncoderModel. t5_max_length is the pipeline's
        max_sequence_length, 256 (capped at the T5 tokenizer's model_max_length); without T5 that many
        zero tokens are appended, as in the pipeline, and t5_max_length=0 appends none (a CLIP-only model).
    resolution: image size in pixels; default transformer.config.sample_size * vae_scale_factor.
    """

    prediction = "flow"
    #: Flow-GRPO's SD3 LoRA targets (official train_sd3.py): joint attention of image and text streams
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(
        self,
        transformer: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        scheduler,
        vae: nn.Module | None = None,
        t5_encoder: nn.Module | None = None,
        t5_tokenizer=None,
        *,
        t5_max_length: int | None = None,
        resolution: int | Sequence[int] | None = None,
    ) -> None:
        text_encoders, tokenizers = list(text_encoders), list(tokenizers)
        if not text_encoders or len(text_encoders) != len(tokenizers):
            raise ValueError(f"text_encoders/tokenizers: need one tokenizer per encoder and at least one, got "
                             f"{len(text_encoders)} encoders and {len(tokenizers)} tokenizers")
        if (t5_encoder is None) != (t5_tokenizer is None):
            raise ValueError("t5_encoder/t5_tokenizer: give both or neither")
        if t5_max_length is None:
            t5_max_length = min(256, t5_tokenizer.model_max_length) if t5_tokenizer is not None else 256
        if t5_max_length < 0:
            raise ValueError(f"t5_max_length: must be >= 0, got {t5_max_length}")
        self.denoiser = transformer
        self.transformer = transformer
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.t5_encoder, self.t5_tokenizer, self.t5_max_length = t5_encoder, t5_tokenizer, t5_max_length
        self.scheduler = scheduler
        self.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        default = transformer.config.sample_size * self.vae_scale_factor
        self.resolution = _pair(resolution if resolution is not None else default)
        step = self.vae_scale_factor * transformer.config.patch_size
        if any(r % step for r in self.resolution):
            raise ValueError(f"resolution: {self.resolution} is not divisible by VAE factor x patch size = {step}")
        for module in (*text_encoders, t5_encoder, vae):
            if module is not None:
                module.requires_grad_(False).eval()
        transformer.eval()

    # ---- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a sequence of strings")
        # the pipeline uses the first tokenizer's length (77) for every CLIP encoder
        clip_length = self.tokenizers[0].model_max_length
        states, pooled = [], []
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            out = encoder(_tokens(tokenizer, prompts, clip_length, encoder), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        width = self.transformer.config.joint_attention_dim
        if clip.shape[-1] > width:
            raise ValueError(f"text_encoders: CLIP widths add up to {clip.shape[-1]} > joint_attention_dim {width}")
        if self.t5_encoder is not None:
            ids = _tokens(self.t5_tokenizer, prompts, self.t5_max_length, self.t5_encoder)
            t5 = self.t5_encoder(ids).last_hidden_state
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_max_length, width)
        # [CLIP tokens zero-padded to the T5 width ; T5 tokens] along the sequence
        hidden = torch.cat([F.pad(clip, (0, width - clip.shape[-1])), t5.to(clip.dtype)], dim=1)
        return PromptEmbeds(hidden=hidden.to(self.device), pooled=torch.cat(pooled, dim=-1).to(self.device))

    # ---- denoiser -------------------------------------------------------------------------------
    def predict(self, x: Tensor, t: Tensor | float, cond: PromptEmbeds, uncond: PromptEmbeds | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        return guided_forward(self._forward, x, t, cond, uncond, guidance_scale)

    def _forward(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        dtype = self.dtype
        # the transformer is conditioned on t = sigma * 1000 in fp32, as the pipeline passes it
        return self.transformer(hidden_states=x.to(dtype), timestep=t.float(),
                                encoder_hidden_states=embeds.hidden.to(dtype),
                                pooled_projections=embeds.pooled.to(dtype), return_dict=False)[0]

    def schedule(self, num_steps: int, device=None) -> Schedule:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            # resolution-dependent shift, as StableDiffusion3Pipeline computes it
            _, height, width = self.latent_shape
            patch = self.transformer.config.patch_size
            kwargs["mu"] = _shift_mu((height // patch) * (width // patch), scheduler.config, max_shift=1.16)
        scheduler.set_timesteps(num_steps, **kwargs)
        return Schedule(prediction="flow", timesteps=scheduler.timesteps, sigmas=scheduler.sigmas,
                        ).to(device if device is not None else self.device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # ---- images ---------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        if self.vae is None:
            return ((x.float() + 1) / 2).clamp(0, 1)
        config = self.vae.config
        # z = x / scaling_factor + shift_factor (SD3: 1.5305, 0.0609)
        z = x.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- diffusers pipeline layout ----------------------------------------------------------------
    pipeline_class_name = "StableDiffusion3Pipeline"

    def pipeline_components(self) -> dict[str, object]:
        """The components under diffusers' names (None for the ones this model does not have)."""
        if len(self.text_encoders) > 2:
            raise ValueError("text_encoders: a diffusers SD3 directory holds at most two CLIP encoders")
        encoders = self.text_encoders + [None] * (2 - len(self.text_encoders))
        tokenizers = self.tokenizers + [None] * (2 - len(self.tokenizers))
        return {"transformer": self.transformer, "scheduler": self.scheduler, "vae": self.vae,
                "text_encoder": encoders[0], "tokenizer": tokenizers[0],
                "text_encoder_2": encoders[1], "tokenizer_2": tokenizers[1],
                "text_encoder_3": self.t5_encoder, "tokenizer_3": self.t5_tokenizer,
                "image_encoder": None, "feature_extractor": None}

    @classmethod
    def from_pipeline_components(cls, components: Mapping[str, object], **kwargs) -> SD3Adapter:
        """Build from a diffusers pipeline's `components` dict (missing encoders are skipped)."""
        names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
        present = [(components[e], components[t]) for e, t in names if components.get(e) is not None]
        return cls(components["transformer"], [e for e, _ in present], [t for _, t in present],
                   components["scheduler"], vae=components.get("vae"),
                   t5_encoder=components.get("text_encoder_3"), t5_tokenizer=components.get("tokenizer_3"),
                   **kwargs)


def _shift_mu(image_seq_len: int, config, max_shift: float) -> float:
    """Linear interpolation of the shift exponent mu in the image token count (diffusers calculate_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    # mu = base_shift + (max_shift - base_shift) * (L - L_base) / (L_max - L_base)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)
