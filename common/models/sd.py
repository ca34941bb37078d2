"""Stable Diffusion 1.x and SDXL: an epsilon-prediction UNet, CLIP text encoder(s), the DDIM grid.

Mirrors diffusers' StableDiffusionPipeline and StableDiffusionXLPipeline (prompt encoding, added
conditioning, latent decoding) so that a rollout through this adapter reproduces the pipeline.
With `vae=None` the model works in pixel space (the toy UNet): states are images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule, guided_forward


def _pair(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


def _tokenize(tokenizer, prompts: list[str], encoder: nn.Module) -> tuple[Tensor, Tensor]:
    """Pad/truncate to the tokenizer's max length, as every diffusers pipeline does for CLIP."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tokens.get("attention_mask", torch.ones_like(tokens.input_ids))
    return tokens.input_ids.to(device), mask.to(device)


class SDAdapter(DiffusionAdapter):
    """SD1.x (one CLIPTextModel) or SDXL (adds text_encoder_2 with projection and its tokenizer).

    The scheduler is converted to DDIM, as ddpo-pytorch does with the pipeline's scheduler (train.py):
    every epsilon-model RL step here (DDIM-eta) assumes the DDIM grid t_k, t_k - T/N.
    `resolution` is the image size in pixels; the default is the pipeline's,
    unet.config.sample_size * vae_scale_factor.
    """

    prediction = "epsilon"

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        vae: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        *,
        resolution: int | Sequence[int] | None = None,
    ) -> None:
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"scheduler.prediction_type: SDAdapter supports 'epsilon' models, "
                             f"got {scheduler.config.prediction_type!r}")
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2/tokenizer_2: give both (SDXL) or neither (SD1.x)")
        self.denoiser = unet
        self.unet = unet
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.vae = vae
        self.scheduler = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        default = unet.config.sample_size * self.vae_scale_factor
        self.resolution = _pair(resolution if resolution is not None else default)
        if any(r % self.vae_scale_factor for r in self.resolution):
            raise ValueError(f"resolution: {self.resolution} is not divisible by the VAE factor {self.vae_scale_factor}")
        # Only the denoiser is ever trained; eval() keeps every forward deterministic (rollout == recompute).
        for module in (text_encoder, text_encoder_2, vae):
            if module is not None:
                module.requires_grad_(False).eval()
        unet.eval()

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    # ---- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a sequence of strings")
        if not self.is_sdxl:
            # SD1.x: the last hidden state of CLIP (after its final layer norm), pipeline clip_skip=None
            ids, mask = _tokenize(self.tokenizer, prompts, self.text_encoder)
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            hidden = self.text_encoder(ids, attention_mask=mask if use_mask else None).last_hidden_state
            return PromptEmbeds(hidden=hidden.to(self.device))
        # SDXL: penultimate hidden states of both encoders side by side; pooled = projected text embeds
        # of the second encoder; time ids = original size, crop top-left (0, 0), target size.
        states = []
        for encoder, tokenizer in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            ids, _ = _tokenize(tokenizer, prompts, encoder)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out.text_embeds
        height, width = self.resolution
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return PromptEmbeds(
            hidden=torch.cat(states, dim=-1).to(self.device),
            pooled=pooled.to(self.device),
            extra={"time_ids": time_ids.expand(len(prompts), -1).to(self.device)},
        )

    # ---- denoiser -------------------------------------------------------------------------------
    def predict(self, x: Tensor, t: Tensor | float, cond: PromptEmbeds, uncond: PromptEmbeds | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        return guided_forward(self._forward, x, t, cond, uncond, guidance_scale)

    def _forward(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        dtype = self.dtype
        added = None
        if self.is_sdxl:
            added = {"text_embeds": embeds.pooled.to(dtype), "time_ids": embeds.extra["time_ids"].to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=embeds.hidden.to(dtype),
                         added_cond_kwargs=added, return_dict=False)[0]

    def schedule(self, num_steps: int, device=None) -> Schedule:
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        # DDIMScheduler.step: prev_t = t - T // N
        prev = scheduler.timesteps - scheduler.config.num_train_timesteps // num_steps
        return Schedule(
            prediction="epsilon",
            timesteps=scheduler.timesteps,
            alphas_cumprod=scheduler.alphas_cumprod.float(),
            prev_timesteps=prev,
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
        ).to(device if device is not None else self.device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # ---- images ---------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        if self.vae is None:
            # pixel space: states are images in [-1, 1]
            return ((x.float() + 1) / 2).clamp(0, 1)
        config = self.vae.config
        z = x.to(self.vae.dtype)
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            # SDXL pipeline with per-channel latent statistics: z = x * std / scale + mean
            shape = (1, -1, 1, 1)
            mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
            std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(shape)
            z = z * std / config.scaling_factor + mean
        else:
            # z = x / scaling_factor (0.18215 for SD1.x, 0.13025 for SDXL)
            z = z / config.scaling_factor
        image = self.vae.decode(z, return_dict=False)[0]
        # VaeImageProcessor: [-1, 1] -> [0, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- diffusers pipeline layout ----------------------------------------------------------------
    @property
    def pipeline_class_name(self) -> str:
        return "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"

    def pipeline_components(self) -> dict[str, object]:
        """The components under diffusers' names (None for the optional ones this adapter leaves out)."""
        parts = {"unet": self.unet, "scheduler": self.scheduler, "vae": self.vae,
                 "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.is_sdxl:
            parts |= {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
                      "image_encoder": None, "feature_extractor": None}
        else:
            parts |= {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
        return parts

    @classmethod
    def from_pipeline_components(cls, components: Mapping[str, object], **kwargs) -> SDAdapter:
        """Build from a diffusers pipeline's `components` dict (or what `load_adapter` read from disk)."""
        return cls(components["unet"], components["text_encoder"], components["tokenizer"],
                   components["scheduler"], vae=components.get("vae"),
                   text_encoder_2=components.get("text_encoder_2"), tokenizer_2=components.get("tokenizer_2"),
                   **kwargs)
