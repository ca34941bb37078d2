"""Sample a batch through any adapter with a step function, keeping what policy-gradient training needs.

`rollout` runs the sampler without gradient and records every state on the grid, the log-prob of
each stochastic transition, the prompt embeddings and the numerics it ran with. `step_log_prob`
recomputes one transition WITH gradient for the training loss; at the same parameters and numerics
it reproduces the stored log-prob bit for bit, so the importance ratio of the first update is exactly 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule
from common.steps import StepOutput, ode_step, step_index

#: step_fn(model_output, x, schedule, i, *, prev_sample=None, generator=None, noise=None) -> StepOutput
StepFn = Callable[..., StepOutput]


@dataclass
class Trajectory:
    """One batch of sampled trajectories. B = len(prompts), N = number of denoising steps.

    prompts: B strings, each prompt repeated group_size times in a row.
    embeds / neg_embeds: per-sample prompt embeddings (neg_embeds None without CFG).
    latents: (B, N + 1, C, H, W) fp32 states on the grid; latents[:, 0] is the initial noise,
        latents[:, i + 1] the result of transition i.
    log_probs: (B, N) fp32 log-prob of each transition; 0 at deterministic steps.
    stochastic: (N,) bool, which steps were sampled with step_fn.
    images: (B, 3, H, W) in [0, 1], decoded from the last state, or None.
    numerics: model dtype and autocast state at rollout, checked again by `step_log_prob`.
    """

    prompts: list[str]
    embeds: PromptEmbeds
    neg_embeds: PromptEmbeds | None
    latents: Tensor
    log_probs: Tensor
    stochastic: Tensor
    schedule: Schedule
    timesteps: Tensor
    guidance_scale: float
    images: Tensor | None
    group_size: int
    numerics: str

    def __len__(self) -> int:
        return len(self.prompts)


def draw_noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
               shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Standard normal fp32 noise of `shape`, drawn on the generator's device and moved to `device`.

    shard=(rank, world): draw the noise of the whole batch over `world` processes (rank-major rows,
    world * shape[0] of them) and keep this rank's rows. With one generator seeded alike on every
    process, sample k of the global batch then gets the same noise whatever the number of processes,
    and world = 1 draws exactly what an unsharded call draws.
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard: need 0 <= rank < world, got {shard}")
    n = shape[0]
    noise_device = generator.device if generator is not None else device
    full = torch.randn((world * n, *shape[1:]), generator=generator, device=noise_device, dtype=torch.float32)
    return full[rank * n: (rank + 1) * n].to(device)


def current_numerics(adapter: DiffusionAdapter) -> str:
    """The settings that change a forward's rounding: denoiser dtype, autocast (and TF32 on CUDA)."""
    device = adapter.device.type
    autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "off"
    text = f"dtype={adapter.dtype}, autocast({device})={autocast}"
    if device == "cuda":
        text += f", tf32={torch.backends.cuda.matmul.allow_tf32}"
    return text


@torch.no_grad()
def rollout(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    *,
    group_size: int = 1,
    num_steps: int,
    step_fn: StepFn,
    ode_step_fn: StepFn | None = None,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
    window: tuple[int, int] | None = None,
    shared_noise: bool = False,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
    decode: bool = True,
    progress: bool = False,
) -> Trajectory:
    """Sample group_size trajectories per prompt.

    window=(a, b): steps a..b-1 use step_fn (stochastic, log-prob recorded), the others ode_step_fn
        (default: common.steps.ode_step, Euler or DDIM eta=0); None makes every step stochastic.
    shared_noise: one initial noise per group (DanceGRPO `init_same_noise`, Flow-GRPO `same_latent`).
    shard=(rank, world): this process holds rows rank * B .. (rank + 1) * B - 1 of a batch split over
        `world` processes; every noise is drawn for the whole batch and sliced (`draw_noise`), so a
        generator seeded alike on every process gives each sample the noise one process would.
    guidance_scale != 1 applies CFG against `negative_prompt` in one batched forward per step.
    Runs under torch.no_grad (not inference_mode), so stored tensors can enter autograd later.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a non-empty sequence of strings")
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    start, stop = window if window is not None else (0, num_steps)
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"window: need 0 <= a <= b <= num_steps={num_steps}, got {window}")
    ode_step_fn = ode_step_fn or ode_step
    device = adapter.device
    batch = len(prompts) * group_size
    use_cfg = guidance_scale != 1.0

    # prompts (and the negative prompt) are encoded once, in one call
    encoded = adapter.encode_prompts(prompts + [negative_prompt] if use_cfg else prompts)
    embeds = encoded.index(torch.arange(len(prompts), device=device)).repeat_interleave(group_size)
    neg_embeds = encoded.index(torch.full((batch,), len(prompts), device=device)) if use_cfg else None

    schedule = adapter.schedule(num_steps, device)
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    stochastic[start:stop] = True

    # initial noise x_T ~ N(0, I), drawn in fp32 on the generator's device
    n_noise = len(prompts) if shared_noise else batch
    x = draw_noise((n_noise, *adapter.latent_shape), generator, device, shard)
    if shared_noise:
        x = x.repeat_interleave(group_size, dim=0)

    latents = [x]
    log_probs = torch.zeros(batch, num_steps, device=device)
    for i in tqdm(range(num_steps), disable=not progress, desc="rollout"):
        model_output = adapter.predict(x, schedule.timesteps[i], embeds, neg_embeds, guidance_scale)
        if stochastic[i]:
            # the step's noise comes from `generator` on its own device (a CPU generator can drive a GPU run)
            xi = draw_noise(x.shape, generator, device, shard)
            out = step_fn(model_output, x, schedule, i, noise=xi)
            log_probs[:, i] = out.log_prob.float()
        else:
            out = ode_step_fn(model_output, x, schedule, i)
        x = out.prev_sample
        latents.append(x)

    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)],
        embeds=embeds,
        neg_embeds=neg_embeds,
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        stochastic=stochastic,
        schedule=schedule,
        timesteps=schedule.timesteps,
        guidance_scale=guidance_scale,
        images=adapter.decode(x) if decode else None,
        group_size=group_size,
        numerics=current_numerics(adapter),
    )


def step_log_prob(adapter: DiffusionAdapter, traj: Trajectory, i: int | Tensor, step_fn: StepFn, *,
                  index: Tensor | None = None) -> StepOutput:
    """Recompute transition i of samples `index` (default all) WITH gradient, same CFG as the rollout.

    i: an int, or a LongTensor with one step index per selected sample. Returns step_fn's StepOutput
    for the stored next state, whose log_prob is the new policy's log-prob of that action.
    """
    now = current_numerics(adapter)
    if now != traj.numerics:
        raise RuntimeError(f"numerics differ: the rollout ran with [{traj.numerics}] but this recompute runs "
                           f"with [{now}]; the log-prob ratio would drift (~1e-3) without any update. "
                           "Recompute under the same dtype and autocast as the rollout.")
    device = traj.latents.device
    index = torch.arange(len(traj), device=device) if index is None else torch.as_tensor(index, device=device)
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    per_sample = step_index(i, index.shape[0], traj.schedule.num_steps, device)
    x = traj.latents[index, per_sample]
    x_next = traj.latents[index, per_sample + 1]
    cond = traj.embeds.index(index)
    uncond = traj.neg_embeds.index(index) if traj.neg_embeds is not None else None
    model_output = adapter.predict(x, traj.timesteps[per_sample], cond, uncond, traj.guidance_scale)
    return step_fn(model_output, x, traj.schedule, i if isinstance(i, int) else per_sample, prev_sample=x_next)
