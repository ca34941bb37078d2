"""FLUX.1: a velocity-prediction transformer on packed 2x2 latent patches, CLIP pooled + T5 tokens.

Mirrors diffusers' FluxPipeline: CLIP's pooled output and T5's last hidden state, text position ids
all zero, image position ids (0, row, col) per packed patch, the transformer conditioned on
t / 1000 and on a guidance embedding (FLUX.1-dev: 3.5), and the schedule's resolution-dependent
shift mu. States stay unpacked (B, C, H, W); packing happens inside `predict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule, guided_forward


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of `pack_latents`."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed patches: (0, row, col)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(DiffusionAdapter):
    """FLUX.1-dev / schnell adapter.

    guidance: the distilled-guidance value fed to the guidance embedding; FluxPipeline's default 3.5
        when transformer.config.guidance_embeds (dev), None otherwise (schnell). It is separate
        from `predict`'s guidance_scale, which is true CFG with a negative prompt (1.0 = off).
    max_sequence_length: T5 tokens; default the pipeline's 512, capped at tokenizer_2.model_max_length.
    resolution: image size in pixels; default vae.config.sample_size (1024 for FLUX.1, the pipeline's
        default image size).
    """

    prediction = "flow"
    #: Flow-GRPO's LoRA targets (the SD3 list): attention projections of the image and text streams
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        text_encoder_2: nn.Module,
        tokenizer_2,
        scheduler,
        vae: nn.Module,
        *,
        guidance: float | None = None,
        max_sequence_length: int | None = None,
        resolution: int | Sequence[int] | None = None,
    ) -> None:
        if vae is None:
            raise ValueError("vae: FluxAdapter needs a VAE (FLUX has no pixel-space variant)")
        has_embed = bool(transformer.config.guidance_embeds)
        if guidance is not None and not has_embed:
            raise ValueError("guidance: this transformer has no guidance embedding (guidance_embeds=False)")
        self.denoiser = transformer
        self.transformer = transformer
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = scheduler
        self.vae = vae
        self.guidance = (3.5 if guidance is None else float(guidance)) if has_embed else None
        if max_sequence_length is None:
            max_sequence_length = min(512, tokenizer_2.model_max_length)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = vae.config.sample_size if resolution is None else resolution
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        # FluxPipeline: latent side = 2 * (pixels // (vae_factor * 2)), so it packs into 2x2 patches
        self._latent_hw = (2 * (int(height) // (self.vae_scale_factor * 2)),
                           2 * (int(width) // (self.vae_scale_factor * 2)))
        for module in (text_encoder, text_encoder_2, vae):
            module.requires_grad_(False).eval()
        transformer.eval()

    # ---- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a sequence of strings")
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device)).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        hidden = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device)).last_hidden_state
        return PromptEmbeds(hidden=hidden.to(self.device), pooled=pooled.to(self.device))

    # ---- denoiser -------------------------------------------------------------------------------
    def predict(self, x: Tensor, t: Tensor | float, cond: PromptEmbeds, uncond: PromptEmbeds | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        return guided_forward(self._forward, x, t, cond, uncond, guidance_scale)

    def _forward(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        dtype, device = self.dtype, x.device
        batch, _, height, width = x.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x.to(dtype)),
            # the pipeline casts t to the model dtype, then conditions on sigma = t / 1000
            timestep=t.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=embeds.pooled.to(dtype),
            encoder_hidden_states=embeds.hidden.to(dtype),
            txt_ids=torch.zeros(embeds.hidden.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def schedule(self, num_steps: int, device=None) -> Schedule:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        config = scheduler.config
        # FluxPipeline: sigmas = linspace(1, 1/N, N), shifted with mu from the packed token count
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        height, width = self._latent_hw
        seq_len = (height // 2) * (width // 2)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        # mu = base_shift + (max_shift - base_shift) * (L - L_base) / (L_max - L_base)  (calculate_shift)
        slope = (max_shift - base_shift) / (max_len - base_len)
        mu = seq_len * slope + (base_shift - slope * base_len)
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        return Schedule(prediction="flow", timesteps=scheduler.timesteps, sigmas=scheduler.sigmas,
                        ).to(device if device is not None else self.device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels // 4, *self._latent_hw)

    # ---- images ---------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        config = self.vae.config
        # z = x / scaling_factor + shift_factor (FLUX: 0.3611, 0.1159)
        z = x.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- diffusers pipeline layout ----------------------------------------------------------------
    pipeline_class_name = "FluxPipeline"

    def pipeline_components(self) -> dict[str, object]:
        return {"transformer": self.transformer, "scheduler": self.scheduler, "vae": self.vae,
                "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
                "image_encoder": None, "feature_extractor": None}

    @classmethod
    def from_pipeline_components(cls, components: Mapping[str, object], **kwargs) -> FluxAdapter:
        return cls(components["transformer"], components["text_encoder"], components["tokenizer"],
                   components["text_encoder_2"], components["tokenizer_2"], components["scheduler"],
                   components["vae"], **kwargs)
