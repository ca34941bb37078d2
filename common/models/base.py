"""The one small interface every generator family implements.

A paper's training loop talks to a model only through `DiffusionAdapter`: it encodes prompts once,
asks for the (CFG-combined) model output at a state and timestep, reads the noise schedule, decodes
states to images, and toggles LoRA. Each family (toy, SD1.x/SDXL, SD3, FLUX, ...) is one file that
subclasses it; `docs/common/adapters.md` explains how to write a new one.

Conventions shared by every adapter
- States `x` are always unpacked latents of shape (B, C, H, W), in the model's own dtype. Families
  whose denoiser wants a packed sequence (FLUX) pack and unpack inside `predict`.
- `t` passed to `predict` is in diffusers' scheduler units: the integer DDPM timestep for
  epsilon models, `sigma * 1000` (float) for flow models. `Schedule.timesteps[i]` is exactly that.
- Images are float tensors in [0, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor, nn

Prediction = Literal["epsilon", "flow"]


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch. Fields a family does not use stay None.

    hidden: (B, L, D) token embeddings; pooled: (B, D') pooled embedding (SD3, FLUX, SDXL);
    extra: other per-sample tensors with batch first (SDXL time ids, FLUX text ids, masks).
    """

    hidden: Tensor
    pooled: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(
            hidden=fn(self.hidden),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={k: fn(v) for k, v in self.extra.items()},
        )

    def index(self, idx) -> PromptEmbeds:
        """Select rows (int tensor, slice or bool mask)."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each prompt n times in a row: the group layout [p0]*n + [p1]*n + ..."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> PromptEmbeds:
        return self._map(lambda t: t.detach())

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        first = items[0]
        return PromptEmbeds(
            hidden=torch.cat([e.hidden for e in items]),
            pooled=None if first.pooled is None else torch.cat([e.pooled for e in items]),
            extra={k: torch.cat([e.extra[k] for e in items]) for k in first.extra},
        )


@dataclass
class Schedule:
    """The sampling grid of one run with `num_steps` denoising steps.

    timesteps: (N,) what the denoiser is conditioned on at step i (diffusers units, see module doc).
    sigmas: flow models only, (N + 1,) noise levels with sigmas[0] the start and sigmas[N] = 0.
    alphas_cumprod: epsilon models only, (T,) the training schedule's cumulative alphas (fp32).
    prev_timesteps: epsilon models only, (N,) the DDPM timestep each step lands on (t - T/N); may be
        negative at the last step, where `final_alpha_cumprod` applies.
    """

    prediction: Prediction
    timesteps: Tensor
    sigmas: Tensor | None = None
    alphas_cumprod: Tensor | None = None
    prev_timesteps: Tensor | None = None
    final_alpha_cumprod: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device) -> Schedule:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device)
        return replace(self, **moved)


def guided_forward(
    forward: Callable[[Tensor, Tensor, PromptEmbeds], Tensor],
    x: Tensor,
    t: Tensor | float,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Classifier-free guidance around one raw denoiser call `forward(x, t, embeds)` with t of shape (B,).

    With `uncond` and guidance_scale != 1 the unconditional and conditional halves run as ONE batch
    [uncond; cond] (the diffusers pipelines' order). `uncond` may hold a single row for the whole batch.
    """
    batch = x.shape[0]
    if len(cond) != batch:
        raise ValueError(f"cond: {len(cond)} prompt embeddings for a batch of {batch} states")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    if uncond is None or guidance_scale == 1.0:
        return forward(x, t, cond)
    if len(uncond) == 1 and batch > 1:
        uncond = uncond.index(torch.zeros(batch, dtype=torch.long, device=uncond.hidden.device))
    if len(uncond) != batch:
        raise ValueError(f"uncond: {len(uncond)} embeddings for a batch of {batch} (give 1 or {batch})")
    out_uncond, out_cond = forward(torch.cat([x, x]), torch.cat([t, t]), PromptEmbeds.cat([uncond, cond])).chunk(2)
    # CFG (Ho & Salimans 2022): out = u + s * (c - u)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


class DiffusionAdapter(ABC):
    """What a paper needs from a diffusion or flow generator, and nothing more."""

    #: "epsilon" (DDPM/DDIM family) or "flow" (rectified flow, velocity = noise - x0)
    prediction: Prediction
    #: the module that is trained (UNet or transformer); LoRA is injected here
    denoiser: nn.Module

    # ---- text ---------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode prompts without gradient. Call once per batch and reuse the result."""

    # ---- denoiser -----------------------------------------------------------------------------
    @abstractmethod
    def predict(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: PromptEmbeds,
        uncond: PromptEmbeds | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Model output (eps or velocity) at state x and timestep t.

        With `uncond` given and guidance_scale != 1, classifier-free guidance is applied in one
        batched forward: out = u + s * (c - u). `t` is a scalar or a (B,) tensor.
        """

    @abstractmethod
    def schedule(self, num_steps: int, device=None) -> Schedule:
        """The diffusers scheduler's grid for `num_steps` steps (so it matches the real pipeline)."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one state."""

    # ---- images -------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """States to images in [0, 1], (B, 3, H, W). Differentiable (reward backprop needs it)."""

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, *, sample: bool = False) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) to states, the inverse of `decode` (no gradient: data preparation).

        Pixel-space models (no `vae`): x0 = 2 x - 1. Latent models: z is the VAE posterior's mean, or with
        sample=True a draw from it with `generator` (Diffusion-DPO's trainer samples), then
        x0 = (z - shift) * scale (SD1.x: scale 0.18215; SD3: shift 0.0609, scale 1.5305; FLUX: 0.1159,
        0.3611), or x0 = (z - mean) * scale / std with per-channel latent statistics (SDXL-style VAEs).
        """
        x = images.to(self.device) * 2 - 1
        vae = getattr(self, "vae", None)
        if vae is None:
            return x.to(self.dtype)
        posterior = vae.encode(x.to(vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
            std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(shape)
            # x0 = (z - mean) * scale / std
            return ((z - mean) * config.scaling_factor / std).to(self.dtype)
        # x0 = (z - shift) * scale
        return ((z - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor).to(self.dtype)

    # ---- training -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def add_lora(self, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                 init_lora_weights: bool | str = True) -> None:
        """Freeze the denoiser and inject a peft LoRA adapter named "default" into it."""
        from peft import LoraConfig

        targets = list(target_modules or self.default_lora_targets)
        self.denoiser.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                            target_modules=targets, init_lora_weights=init_lora_weights)
        self.denoiser.add_adapter(config)

    #: attention projections, the usual LoRA targets in diffusers' training scripts
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model (the reference policy) with LoRA switched off."""
        if not getattr(self.denoiser, "_hf_peft_config_loaded", False):
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
