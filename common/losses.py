"""Policy-gradient and preference losses shared by the RL and DPO papers.

- `ppo_clip_loss`: the clipped surrogate of DDPO, Flow-GRPO, DanceGRPO and their descendants.
- `check_on_policy`: the guard for the first inner step, where the ratio must be exactly 1.
- KL estimators: `kl_k1`, `kl_k3` on log-probs, `gaussian_mean_kl` on step means (Flow-GRPO).
- `noisy_state` (the forward process and the family's regression target), `denoising_loss` (the
  pretraining objective, for papers that keep it as a regulariser), `denoising_error` and its targets,
  and `dpo_logistic_loss` (Diffusion-DPO).

Log-probs here are those of `common.steps`: per-sample means over dimensions, so log-ratios are
small and clip ranges are 1e-4 (DDPO, Flow-GRPO) or 1e-5 (Flow-GRPO-Fast with CPS).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.models.base import DiffusionAdapter, PromptEmbeds


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                  clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, averaged over the batch (PPO paper eq. 7, as in DDPO and Flow-GRPO).

    info (detached): approx_kl = 1/2 mean (logp - logp_old)^2, clipfrac = mean(|ratio - 1| > clip_range),
    ratio = mean ratio.
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(f"log_prob, old_log_prob, advantages: shapes differ ({tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)})")
    if clip_range <= 0:
        raise ValueError(f"clip_range: must be > 0, got {clip_range}")
    # rho = exp(logp - logp_old)
    ratio = torch.exp(log_prob - old_log_prob)
    # L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "ratio": ratio.mean(),
        }
    return loss, info


def check_on_policy(log_prob: Tensor, old_log_prob: Tensor, atol: float = 1e-5) -> None:
    """Raise if a recompute at the rollout's own parameters does not reproduce its log-probs.

    Call it on the first inner step, before any optimizer step: the ratio must be 1 there. An fp32
    rollout recomputed under bf16 autocast is off by ~1e-3 in log-prob, ten times a 1e-4 clip range,
    which would silently clip most samples.
    """
    diff = (log_prob.detach().float() - old_log_prob.detach().float()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    if not worst <= atol:  # also catches NaN
        raise RuntimeError(
            f"check_on_policy: recomputed log-probs differ from the rollout's by up to {worst:.3g} "
            f"(atol {atol:g}) before any update, so the importance ratio is not 1. The rollout and the "
            "recompute most likely ran under different numerics: fp32 vs bf16/fp16 autocast or model "
            "dtype, a different micro-batch size, a different CFG scale or prompt embeddings, timesteps "
            "in different units or dtype, dropout or another LoRA state in one of the passes. Make both "
            "passes identical, or loosen atol knowingly (it must stay well below the clip range)."
        )


def kl_k1(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Per-sample k1 estimate of KL(pi || pi_ref) from samples of pi: log pi - log pi_ref."""
    return log_prob - ref_log_prob


def kl_k3(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Per-sample k3 estimate of KL(pi || pi_ref): (r - 1) - log r with r = pi_ref / pi (>= 0, unbiased)."""
    log_r = ref_log_prob - log_prob
    return torch.expm1(log_r) - log_r


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float | None,
                     *, dt: Tensor | float | None = None) -> Tensor:
    """Per-sample KL between two step Gaussians with the same std: mean_d (mu - mu_ref)^2 / (2 std^2).

    Given the transition std (StepOutput.std) this is the true per-step KL averaged over dims.
    Flow-GRPO divides by its sigma_t = std / sqrt(-dt) instead, i.e. it returns the true KL times
    (-dt) (intentional, flow_grpo issue #78); pass `dt` = sigma_next - sigma to get that form.
    std=None gives CPS's form mean_d (mu - mu_ref)^2 (no denominator).
    """
    sq = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    if std is None:
        return sq
    s = torch.as_tensor(std, dtype=torch.float32, device=mean.device).reshape(-1)
    if dt is not None:
        s = s / torch.sqrt(-torch.as_tensor(dt, dtype=torch.float32, device=mean.device).reshape(-1))
    return sq / (2 * s**2)


def denoising_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch dims, in fp32: e = mean_d (pred - target)^2."""
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: shapes differ ({tuple(pred.shape)} vs {tuple(target.shape)})")
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


def eps_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Regression target of an epsilon model for x_t = sqrt(a) x0 + sqrt(1 - a) noise: the noise."""
    return noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Regression target of a rectified-flow model for x_s = (1 - s) x0 + s noise: v = noise - x0."""
    return noise - x0


def noisy_state(x0: Tensor, noise: Tensor, level: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """The forward process at a per-sample noise level, and the regression target of the model family.

    epsilon (DDPM): level = abar_t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps.
    flow (rectified flow): level = sigma, x_s = (1 - sigma) x0 + sigma eps, target v = eps - x0.
    level: (B,) (one per sample) or already broadcastable to x0.
    """
    if level.ndim == 1:
        level = level.view(-1, *([1] * (x0.ndim - 1)))
    if prediction == "epsilon":
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        return level.sqrt() * x0 + (1 - level).sqrt() * noise, eps_target(x0, noise)
    if prediction == "flow":
        # x_s = (1 - sigma) x0 + sigma eps
        return (1 - level) * x0 + level * noise, velocity_target(x0, noise)
    raise ValueError(f"prediction: 'epsilon' or 'flow', got {prediction!r}")


def denoising_loss(adapter: DiffusionAdapter, x0: Tensor, cond: PromptEmbeds,
                   generator: torch.Generator | None = None) -> Tensor:
    """The plain pretraining objective on clean states x0 (diffusers' train_text_to_image scripts):
    eps models |eps_theta(x_t, t, c) - eps|^2 with t ~ U{0 .. T-1}; flow models |v_theta(x_s, s, c) -
    (eps - x0)|^2 with s ~ U(0, 1) (the transformer sees t = 1000 s). Noise and levels are drawn on x0's
    device from `generator`."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    u = torch.rand(len(x0), generator=generator, device=x0.device)
    if adapter.prediction == "flow":
        x_t, target = noisy_state(x0, eps, u, "flow")
        t = u * 1000
    else:
        abar = adapter.scheduler.alphas_cumprod.to(x0.device)
        t = (u * len(abar)).long().clamp(max=len(abar) - 1)
        x_t, target = noisy_state(x0, eps, abar[t].float(), "epsilon")
    pred = adapter.predict(x_t.to(adapter.dtype), t, cond)
    return F.mse_loss(pred.float(), target.float())


def dpo_logistic_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float,
                      *, convention: Literal["official", "diffusers"] = "official") -> tuple[Tensor, Tensor]:
    """Diffusion-DPO loss on per-sample denoising errors of winners (w) and losers (l), and implicit accuracy.

    logit = -k * [(e_w - e_ref_w) - (e_l - e_ref_l)],  loss = mean -log sigmoid(logit).
    "official" (SalesforceAIResearch/DiffusionDPO): k = beta / 2 with beta = 5000; accuracy counts
    logit > 0 (ties are wrong). "diffusers" (examples/research_projects/diffusion_dpo): k = beta with
    beta = 2500, the same strength; ties count 1/2. With policy == reference the loss is ln 2.
    """
    if convention not in ("official", "diffusers"):
        raise ValueError(f"convention: 'official' or 'diffusers', got {convention!r}")
    kappa = beta / 2 if convention == "official" else beta
    # logit = -kappa * ((e_w - e_ref_w) - (e_l - e_ref_l))
    logit = -kappa * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(logit).mean()
    with torch.no_grad():
        acc = (logit > 0).float().mean()
        if convention == "diffusers":
            acc = acc + 0.5 * (logit == 0).float().mean()
    return loss, acc
