"""One denoising step as a Gaussian policy x' ~ N(mean, std^2 I), with its log-probability.

Two layers:
- formula functions on explicit tensors (`ddim_eta`, `flow_sde`, `dance_sde`, `cps`, `euler`, `dpmpp_1`,
  `dpmpp_2`) that return (mean, std) and carry the equation next to the code;
- schedule-indexed steps that rollouts and training loops call, all with one call shape:
  `step_fn(model_output, x, schedule, i, *, prev_sample=None, generator=None, noise=None, **kernel)`.
  `i` is an int or a (B,) LongTensor (per-sample step index). With `prev_sample` given no noise is
  drawn and the log-prob of that sample is returned (the recompute in training).

Numerics: all maths runs in fp32 whatever the input dtype. `prev_sample` comes back in x's dtype and
its log-prob is computed from that rounded tensor, so recomputing with the stored sample reproduces
the rollout's log-prob bit for bit when both calls see the same inputs.

Log-prob reduction: the mean (not the sum) over all non-batch dims of the Gaussian log-density with
its constants, as in the official DDPO, Flow-GRPO and DanceGRPO code; this divides the true log-ratio
by D, which is why their PPO clip ranges are 1e-4. CPS's official code instead uses -mean (x' - mean)^2
(no 1/(2 std^2), no constants); `cps_step` does that by default and offers the true density.
Deterministic steps (std == 0: Euler, DDIM eta=0, ODE DPM-Solver++, the last CPS step, noise level 0)
return log_prob 0 and std 0 for those samples instead of the 0/0 the official code produces.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from common.models.base import Schedule

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class StepOutput(NamedTuple):
    prev_sample: Tensor  #: x', in x's dtype
    log_prob: Tensor  #: (B,) fp32, log N(x'; mean, std^2) averaged over non-batch dims
    mean: Tensor  #: fp32, shape of x
    std: Tensor  #: fp32, broadcastable to x ((B, 1, ..., 1) from the step functions)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, *, simplified: bool = False) -> Tensor:
    """Per-sample log-density of `sample` (detached) under N(mean, std^2), averaged over non-batch dims.

    simplified=True is CPS's official definition -mean (x' - mean)^2. Where std == 0 the result is 0.
    """
    sample = sample.detach().float()
    if simplified:
        lp = -((sample - mean) ** 2)
    else:
        safe = torch.where(std > 0, std, torch.ones_like(std))
        # log N(x'; mu, s^2) = -(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)
        lp = -((sample - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


# ---- formula layer: explicit coefficients in, (mean, std) out --------------------------------------


def _f32(v, like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=like.device)


def ddim_eta(eps: Tensor, x: Tensor, alpha_cumprod: Tensor | float, alpha_cumprod_prev: Tensor | float,
             eta: float) -> tuple[Tensor, Tensor]:
    """DDIM step with noise eta (DDIM paper eq. 12 and 16) for an epsilon model."""
    a, a_prev = _f32(alpha_cumprod, x), _f32(alpha_cumprod_prev, x)
    # x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    # s_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    std = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    # mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s_t^2) eps
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - std**2) * eps
    return mean, std


def flow_sde(v: Tensor, x: Tensor, sigma, sigma_next, noise_level: float,
             sigma_max=None) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's SDE step (Euler-Maruyama of the marginal-preserving reverse SDE), velocity model.

    sigma_max: the official code uses 1 - sigma_max (= 1 - sigmas[1]) as the denominator where
    sigma == 1 instead of 1 - sigma = 0. Without it a step from sigma == 1 is infinite.
    """
    s, s_next = _f32(sigma, x), _f32(sigma_next, x)
    dt = s_next - s  # < 0
    denom_sigma = s if sigma_max is None else torch.where(s == 1, _f32(sigma_max, x), s)
    # sigma_t = a * sqrt(sigma / (1 - sigma))
    sigma_t = noise_level * torch.sqrt(s / (1 - denom_sigma))
    # mean = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
    mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    # std = sigma_t sqrt(-dt)
    return mean, sigma_t * torch.sqrt(-dt)


def dance_sde(v: Tensor, x: Tensor, sigma, sigma_next, eta: float) -> tuple[Tensor, Tensor]:
    """DanceGRPO's SDE step (`flux_step` with sde_solver): constant diffusion coefficient eta."""
    s, s_next = _f32(sigma, x), _f32(sigma_next, x)
    d_sigma = s_next - s  # < 0
    x0 = x - s * v
    # score = -(x - (1 - sigma) x0_hat) / sigma^2
    score = -(x - (1 - s) * x0) / s**2
    # mean = x + d_sigma v - eta^2 / 2 * score * d_sigma
    mean = x + d_sigma * v - 0.5 * eta**2 * score * d_sigma
    # std = eta sqrt(sigma - sigma_next)
    return mean, eta * torch.sqrt(-d_sigma)


def cps(v: Tensor, x: Tensor, sigma, sigma_next, noise_level: float) -> tuple[Tensor, Tensor]:
    """Coefficients-Preserving Sampling: x' keeps the (1 - sigma') x0 + sigma' noise marginal level."""
    s, s_next = _f32(sigma, x), _f32(sigma_next, x)
    # std = sigma' sin(a pi / 2)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0 = x - s * v  # x0_hat
    x1 = x + (1 - s) * v  # noise estimate
    # mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat
    mean = (1 - s_next) * x0 + torch.sqrt(s_next**2 - std**2) * x1
    return mean, std


def euler(v: Tensor, x: Tensor, sigma, sigma_next) -> tuple[Tensor, Tensor]:
    """Euler ODE step of a flow model, x' = x + (sigma' - sigma) v. std is 0."""
    s, s_next = _f32(sigma, x), _f32(sigma_next, x)
    mean = x + (s_next - s) * v
    return mean, torch.zeros_like(s)


def _dpmpp(x: Tensor, data: Tensor, s: Tensor, s_next: Tensor, sde: bool) -> tuple[Tensor, Tensor]:
    # rectified flow as a VP-like process: alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda' - lambda;
    # e^{-h} = sigma' alpha / (sigma alpha') is finite at sigma = 1 and sigma' = 0
    a, a_next = 1 - s, 1 - s_next
    e = s_next * a / (s * a_next)
    if sde:
        # mean = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D,  std = sigma' sqrt(1 - e^{-2h})
        return (s_next / s) * e * x + a_next * (1 - e**2) * data, s_next * torch.sqrt(1 - e**2)
    # x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D
    return (s_next / s) * x - a_next * (e - 1) * data, torch.zeros_like(s)


def _lambda(sigma: Tensor) -> Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def dpmpp_1(v: Tensor, x: Tensor, sigma, sigma_next, sde: bool = False) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(1) of a flow model (x0_hat = x - sigma v), ODE or SDE form (diffusers' formulas).

    The ODE form equals Euler for rectified flow; the SDE form equals CPS with sin(a pi/2) = sqrt(1 - e^{-2h}).
    """
    s, s_next = _f32(sigma, x), _f32(sigma_next, x)
    return _dpmpp(x, x - s * v, s, s_next, sde)


def dpmpp_2(v: Tensor, x: Tensor, sigma, sigma_next, sigma_prev, x0_prev: Tensor,
            sde: bool = False) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M), midpoint form, from the current and previous x0_hat (multistep history).

    Falls back to first order where the correction is undefined: sigma_prev == sigma (no history),
    sigma_prev == 1 or sigma_next == 0 (infinite lambda; diffusers also steps first order at the end).
    """
    s, s_next, s_prev = _f32(sigma, x), _f32(sigma_next, x), _f32(sigma_prev, x)
    # lambda = log(alpha / sigma); h = lambda' - lambda, h_prev = lambda - lambda_prev
    h, h0 = _lambda(s_next) - _lambda(s), _lambda(s) - _lambda(s_prev)
    ok = torch.isfinite(h) & torch.isfinite(h0) & (h0 > 0)
    # D1 = (m0 - m1) / r0 with r0 = h_prev / h; the midpoint rule uses D0 + D1 / 2
    inv_r0 = torch.where(ok, h / torch.where(ok, h0, torch.ones_like(h0)), torch.zeros_like(h))
    x0 = x - s * v
    return _dpmpp(x, x0 + 0.5 * inv_r0 * (x0 - x0_prev.float()), s, s_next, sde)


# ---- schedule-indexed layer ----------------------------------------------------------------------


def step_index(i, batch: int, n: int, device: torch.device) -> Tensor:
    """i (int or (B,) integer tensor) as a (batch,) LongTensor on `device`, checked against n steps.

    No host-device synchronisation: an int is checked in Python and broadcast with `torch.full`; an index
    tensor on the CPU is checked there; one already on an accelerator is checked asynchronously (a
    device-side assert), since reading it back would stall the launch queue once per denoising step.
    """
    if isinstance(i, int) and not isinstance(i, bool):
        if not 0 <= i < n:
            raise ValueError(f"i: step index out of range [0, {n}) (got {i})")
        return torch.full((batch,), i, device=device, dtype=torch.long)
    idx = torch.as_tensor(i)
    if idx.dtype not in (torch.int64, torch.int32) or idx.ndim > 1:
        raise ValueError(f"i: expected an int or a (B,) integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.ndim == 1 and idx.shape[0] != batch:
        raise ValueError(f"i: {idx.shape[0]} step indices for a batch of {batch}")
    if idx.device.type == "cpu":
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"i: step index out of range [0, {n})")
    else:
        torch._assert_async(((idx >= 0) & (idx < n)).all(), f"i: step index out of range [0, {n})")
    idx = idx.to(device=device, dtype=torch.long)
    return idx.expand(batch) if idx.ndim == 0 else idx


def _index(i, x: Tensor, n: int) -> Tensor:
    return step_index(i, x.shape[0], n, x.device)


def _at(values: Tensor, idx: Tensor, x: Tensor) -> Tensor:
    """values[idx] in fp32, shaped (B, 1, ..., 1) to broadcast against x."""
    return values.to(x.device)[idx].float().view(-1, *([1] * (x.ndim - 1)))


def _flow_sigmas(schedule: Schedule, i, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if schedule.prediction != "flow" or schedule.sigmas is None:
        raise ValueError(f"schedule.prediction: this step needs a flow schedule with sigmas, got {schedule.prediction!r}")
    idx = _index(i, x, schedule.num_steps)
    return idx, _at(schedule.sigmas, idx, x), _at(schedule.sigmas, idx + 1, x)


def _finish(mean: Tensor, std: Tensor, x: Tensor, prev_sample, generator, noise, stochastic: bool,
            simplified: bool = False) -> StepOutput:
    if prev_sample is None:
        if stochastic:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            elif noise.shape != x.shape:
                raise ValueError(f"noise: shape {tuple(noise.shape)} differs from x {tuple(x.shape)}")
            # x' = mean + std * xi
            prev_sample = (mean + std * noise.float()).to(x.dtype)
        else:
            prev_sample = mean.to(x.dtype)
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample: shape {tuple(prev_sample.shape)} differs from x {tuple(x.shape)}")
    std = std.expand(x.shape[0], *([1] * (x.ndim - 1))) if std.ndim < x.ndim else std
    if stochastic:
        log_prob = gaussian_log_prob(prev_sample, mean, std, simplified=simplified)
    else:  # std == 0: the density is degenerate and reported as 0, as gaussian_log_prob would (15 ops saved)
        log_prob = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    return StepOutput(prev_sample.to(x.dtype), log_prob, mean, std)


def ddim_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
              generator: torch.Generator | None = None, noise: Tensor | None = None, eta: float = 1.0,
              convention: Literal["ddpo", "dpok"] = "ddpo") -> StepOutput:
    """DDIM-eta step (eta = 1.0: DDPO and DPOK configs).

    convention "ddpo" clamps the previous timestep at 0 (official ddpo-pytorch), so the last step uses
    alphas_cumprod[0]; "dpok" (and diffusers) use final_alpha_cumprod when it is negative. They agree
    for SD (set_alpha_to_one=False).
    """
    if schedule.prediction != "epsilon" or schedule.alphas_cumprod is None or schedule.prev_timesteps is None:
        raise ValueError("schedule: ddim_step needs an epsilon schedule with alphas_cumprod and prev_timesteps")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta: must lie in [0, 1], got {eta}")
    if convention not in ("ddpo", "dpok"):
        raise ValueError(f"convention: 'ddpo' or 'dpok', got {convention!r}")
    idx = _index(i, x, schedule.num_steps)
    ac = schedule.alphas_cumprod.to(x.device).float()
    t = schedule.timesteps.to(x.device)[idx].long()
    t_prev = schedule.prev_timesteps.to(x.device)[idx].long()
    shape = (-1, *([1] * (x.ndim - 1)))
    a_prev = ac[t_prev.clamp(min=0)]
    if convention == "dpok":
        a_prev = torch.where(t_prev >= 0, a_prev, torch.full_like(a_prev, schedule.final_alpha_cumprod))
    mean, std = ddim_eta(model_output.float(), x.float(), ac[t].view(shape), a_prev.view(shape), eta)
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=eta > 0)


def flow_sde_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
                  generator: torch.Generator | None = None, noise: Tensor | None = None,
                  noise_level: float = 0.7) -> StepOutput:
    """Flow-GRPO SDE step; noise_level a = 0.7 for SD3.5 (official config grpo.py), 0.9 for FLUX.

    `std` is the transition std sigma_t * sqrt(-dt); the official function returns sigma_t alone and
    its KL divides by that (see `common.losses.gaussian_mean_kl(..., dt=...)`).
    """
    if noise_level < 0:
        raise ValueError(f"noise_level: must be >= 0, got {noise_level}")
    _, s, s_next = _flow_sigmas(schedule, i, x)
    mean, std = flow_sde(model_output.float(), x.float(), s, s_next, noise_level, sigma_max=schedule.sigmas[1])
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=noise_level > 0)


def dance_sde_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
                   generator: torch.Generator | None = None, noise: Tensor | None = None,
                   eta: float = 0.3) -> StepOutput:
    """DanceGRPO SDE step; eta = 0.3 for FLUX and Wan (official scripts), 0.25 for HunyuanVideo."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    _, s, s_next = _flow_sigmas(schedule, i, x)
    mean, std = dance_sde(model_output.float(), x.float(), s, s_next, eta)
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=eta > 0)


def cps_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
             generator: torch.Generator | None = None, noise: Tensor | None = None, noise_level: float = 0.8,
             true_gaussian: bool = False) -> StepOutput:
    """CPS step; noise_level 0.8 (flow_grpo README / fast configs).

    log_prob is the official simplified -mean (x' - mean)^2 unless true_gaussian=True, which gives the
    Gaussian log-density like the other kernels. Pick one and use it for rollout and training alike.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level: must be >= 0, got {noise_level}")
    _, s, s_next = _flow_sigmas(schedule, i, x)
    mean, std = cps(model_output.float(), x.float(), s, s_next, noise_level)
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=noise_level > 0,
                   simplified=not true_gaussian)


def euler_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
               generator: torch.Generator | None = None, noise: Tensor | None = None) -> StepOutput:
    """Euler ODE step of a flow model (= FlowMatchEulerDiscreteScheduler.step). log_prob and std are 0."""
    _, s, s_next = _flow_sigmas(schedule, i, x)
    mean, std = euler(model_output.float(), x.float(), s, s_next)
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=False)


def dpmpp_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
               generator: torch.Generator | None = None, noise: Tensor | None = None, order: int = 1,
               sde: bool = False, x0_prev: Tensor | None = None) -> StepOutput:
    """DPM-Solver++ step of a flow model (MixGRPO-Flash's ODE tail uses order 2).

    order=2 needs x0_prev, the x0_hat = x - sigma v of the previous step; without it (or at i == 0) the
    step is first order. The caller keeps the history: x0_hat = x - sigma_i * model_output.
    """
    if order not in (1, 2):
        raise ValueError(f"order: 1 or 2, got {order}")
    idx, s, s_next = _flow_sigmas(schedule, i, x)
    v, xf = model_output.float(), x.float()
    if order == 1 or x0_prev is None:
        mean, std = dpmpp_1(v, xf, s, s_next, sde=sde)
    else:
        s_prev = _at(schedule.sigmas, (idx - 1).clamp(min=0), x)
        mean, std = dpmpp_2(v, xf, s, s_next, s_prev, x0_prev, sde=sde)
    return _finish(mean, std, x, prev_sample, generator, noise, stochastic=sde)


def ode_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, prev_sample: Tensor | None = None,
             generator: torch.Generator | None = None, noise: Tensor | None = None) -> StepOutput:
    """Deterministic step for evaluation: Euler for flow, DDIM eta=0 (diffusers' convention) for epsilon.

    generator and noise are accepted for the common call shape and unused.
    """
    if schedule.prediction == "flow":
        return euler_step(model_output, x, schedule, i, prev_sample=prev_sample)
    return ddim_step(model_output, x, schedule, i, prev_sample=prev_sample, eta=0.0, convention="dpok")
