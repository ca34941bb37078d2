"""DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models (Fan et al.; arXiv 2305.16381).

docs: generated/papers/dpok.md
bib key: fan2023dpok
official code: google-research/google-research @ 1d49f2c, folder dpok/ (train_online_pg.py,
    scheduling_ddim_extended.py, pipeline_stable_diffusion_extended.py, reward_model.py)

Denoising is an MDP whose actions are DDIM steps with eta = 1 (Gaussian, log-prob known) and whose only
reward r(x_0, c) comes at the end. DPOK minimises  -E[r] + beta * sum_t KL(p_theta(.|x_t) || p_pre(.|x_t))
online: sample with the current model, put every transition into a replay buffer, fit a value function
V(x_t, c, t) to the final reward, and take policy-gradient steps on random transitions with the advantage
r - V, an importance ratio hard-clamped to [1 - eps, 1 + eps], and the KL bounded by the squared difference
of the noise predictions of the policy and the frozen pretrained model (paper Sec. 4, Lemma 4.1).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import option, parse_config, require
from common.losses import denoising_error
from common.models.base import DiffusionAdapter, PromptEmbeds, Schedule
from common.models.load import load_adapter, require_model
from common.rewards import load_reward
from common.rollout import Trajectory, rollout
from common.steps import StepOutput, ddim_step
from common.toy.world import TASKS, sample_prompts
from common.train import (
    Checkpointer,
    MetricsLogger,
    image_grid,
    make_accelerator,
    make_optimizer,
    plot_curve,
    seed_everything,
    trainable_state_dict,
)

REWARDS = ("toy_geneval", "toy_soft", "jpeg_compressibility", "jpeg_incompressibility", "pickscore", "clip_score")
FLOW_NAMES = ("toy-flow", "tiny-sd3", "tiny-flux")


@dataclass
class Config:
    """DPOK on the toy world by default; `--model DIR --device cuda --dtype bf16` for a real SD pipeline."""

    model: str = option("toy-unet", "toy-unet, tiny-sd, tiny-sdxl or a local diffusers SD/SDXL directory "
                        "(epsilon models only: the policy is a DDIM step)")
    reward: str = option("toy_geneval", "reward to maximise (official: ImageReward, train_online_pg.py)",
                         choices=REWARDS)
    reward_path: str | None = option(None, "local weights of pickscore (model_dir) or clip_score (clip_dir)")
    prompts: list[str] = option([], "prompts for a real pipeline; empty: draw toy-world prompts")
    num_prompts: int = option(1, "toy prompts drawn from `task`; 1 = single-prompt training (official default "
                              "single_flag=1)")
    prompt_seed: int = option(0, "seed of the toy prompt draw (kept apart from `seed`)")
    task: str = option("counting", "toy-world task of the drawn prompts; prompt_seed 0 gives 'three circles' "
                       "(the paper also trains on count prompts, e.g. 'Four wolves in the park.')", choices=TASKS)
    rounds: int = option(40, "sampling rounds; toy budget (official: max_train_steps / p_step = 2000)")
    num_steps: int = option(10, "DDIM steps per sample; toy budget (official pipeline: 50)")
    eta: float = option(1.0, "DDIM noise; 1 makes each step a Gaussian policy (official pipeline)")
    guidance_scale: float = option(4.5, "classifier-free guidance at sampling and training; the toy base's own "
                                   "setting (official pipeline: 7.5)")
    samples_per_round: int = option(8, "images sampled per round per process (official g_batch_size 6 x "
                                    "num_samples 1)")
    buffer_size: int = option(240, "replay buffer capacity in transitions, oldest dropped first; three rounds, "
                              "the official proportion (official: 1000 for 6 x 50 transitions a round)")
    policy_updates: int = option(4, "optimizer steps of the policy per round (official p_step: 5)")
    policy_batch_size: int = option(8, "transitions per micro-batch (official p_batch_size: 2)")
    grad_accum: int = option(2, "micro-batches per policy step (official gradient_accumulation_steps: 12)")
    learning_rate: float = option(1e-3, "AdamW lr of the LoRA; toy value (official: 1e-5)")
    clip_norm: float = option(0.1, "gradient norm clip of the policy (official clip_norm)")
    reward_weight: float = option(100.0, "w_r, weight of the policy-gradient term (official reward_weight)")
    kl_weight: float = option(0.01, "beta, weight of the KL regulariser (official kl_weight)")
    kl_warmup: int = option(-1, "the KL term is added only in rounds > kl_warmup (official; -1: always)")
    ratio_clip: float = option(1e-4, "eps of the hard clamp of the importance ratio (official ratio_clip)")
    value_lr: float = option(1e-4, "AdamW lr of the value function (official v_lr)")
    value_batch_size: int = option(64, "transitions per value micro-batch (official v_batch_size: 256)")
    value_updates: int = option(20, "optimizer steps of the value function per round; toy value (official: 1)")
    value_steps: int = option(5, "value micro-batches accumulated into each value step (official v_step)")
    value_width: int = option(256, "hidden width of the value network (official ValueMulti)")
    lora_rank: int = option(4, "LoRA rank on the UNet attention projections (official lora_rank)")
    eval_every: int = option(10, "rounds between evaluations on fixed noise (0: only before and after)")
    eval_samples: int = option(16, "fixed-noise samples for eval reward and distance to the base model")
    seed: int = option(0, "random seed")
    device: str | None = option(None, "cuda / cpu; default: cuda when available")
    cpu_threads: int = option(1, "torch threads on a CPU run (0: torch's default); one thread is the fastest "
                              "for the toy's tiny models on a busy machine")
    dtype: str = option("fp32", "model weights dtype (LoRA and value network stay fp32)", choices=("fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    out_dir: str = option("runs/dpok", "metrics, figures and checkpoints")
    save_every: int = option(0, "checkpoint every N rounds for exact resume (0: never)")

    def __post_init__(self):
        require(self.model not in FLOW_NAMES, "model", f"{self.model} is a flow model; DPOK's policy is a "
                "DDIM step of an epsilon model (toy-unet, tiny-sd, tiny-sdxl, SD/SDXL directories)")
        require_model(self.model)
        require(self.reward in REWARDS, "reward", f"unknown reward {self.reward!r}; choose from {REWARDS}")
        require(self.task in TASKS, "task", f"unknown task {self.task!r}; choose from {TASKS}")
        require(bool(self.prompts) or self.reward.startswith("toy") or self.reward.startswith("jpeg"),
                "prompts", f"reward {self.reward} scores prompt text: give --prompts")
        require(not self.prompts or not self.reward.startswith("toy"), "reward",
                "toy rewards need toy-world metadata; leave --prompts empty to draw toy prompts")
        for name in ("num_prompts", "rounds", "num_steps", "samples_per_round", "buffer_size", "policy_updates",
                     "policy_batch_size", "grad_accum", "value_batch_size", "value_updates", "value_steps", "value_width",
                     "lora_rank", "eval_samples"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        require(0 < self.eta <= 1, "eta", f"must lie in (0, 1] (eta 0 is deterministic: no policy), got {self.eta}")
        require(self.ratio_clip > 0 and self.clip_norm > 0, "ratio_clip", "ratio_clip and clip_norm must be > 0")
        require(self.kl_weight >= 0 and self.reward_weight >= 0, "kl_weight", "weights must be >= 0")
        first = min(self.samples_per_round * self.num_steps, self.buffer_size)
        require(first >= max(self.policy_batch_size, self.value_batch_size), "value_batch_size",
                f"batches are drawn without replacement, but the first round fills the buffer with only {first} "
                f"transitions (< policy/value batch {self.policy_batch_size}/{self.value_batch_size})")


# --8<-- [start:policy_step]
def dpok_step(model_output: Tensor, x: Tensor, schedule: Schedule, i, *, eta: float = 1.0, **kwargs) -> StepOutput:
    """The policy: one DDIM step with noise eta and its Gaussian log-prob (mean over pixels).

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t),  s_t = eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)),
    x_{t-1} ~ N(sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s_t^2) eps, s_t^2 I); at the last step a_prev is the
    scheduler's final_alpha_cumprod (scheduling_ddim_extended.py), hence convention "dpok".
    """
    return ddim_step(model_output, x, schedule, i, eta=eta, convention="dpok", **kwargs)
# --8<-- [end:policy_step]


# --8<-- [start:replay_buffer]
TENSORS = ("state", "next_state", "step", "reward", "log_prob", "text")


@dataclass
class Batch:
    """Transitions x_t -> x_{t-1} with what the losses need; `step` is the index i on the DDIM grid."""

    state: Tensor
    next_state: Tensor
    step: Tensor
    reward: Tensor
    log_prob: Tensor
    text: Tensor
    cond: PromptEmbeds
    uncond: PromptEmbeds | None

    def to_dict(self) -> dict[str, Tensor]:
        """Flat {name: tensor}, all with the transition as first dim (embeddings as "cond.hidden", ...)."""
        flat = {k: getattr(self, k) for k in TENSORS}
        for name in ("cond", "uncond"):
            e = getattr(self, name)
            if e is not None:
                flat |= {f"{name}.hidden": e.hidden, **({f"{name}.pooled": e.pooled} if e.pooled is not None else {}),
                         **{f"{name}.extra.{k}": v for k, v in e.extra.items()}}
        return flat

    @staticmethod
    def from_dict(flat: dict[str, Tensor]) -> Batch:
        def embeds(name: str) -> PromptEmbeds | None:
            if f"{name}.hidden" not in flat:
                return None
            extra = {k.split(".", 2)[2]: v for k, v in flat.items() if k.startswith(f"{name}.extra.")}
            return PromptEmbeds(flat[f"{name}.hidden"], flat.get(f"{name}.pooled"), extra)
        return Batch(*(flat[k] for k in TENSORS), embeds("cond"), embeds("uncond"))


def text_features(embeds: PromptEmbeds) -> Tensor:
    """The prompt vector the value network reads: the pooled embedding, else the mean token embedding."""
    return (embeds.pooled if embeds.pooled is not None else embeds.hidden.mean(dim=1)).float()


def trajectory_transitions(traj: Trajectory, rewards: Tensor) -> Batch:
    """All N transitions of all B samples, step-major (all samples of step 0 first), each with its final reward."""
    b, n = traj.latents.shape[0], traj.latents.shape[1] - 1
    rows = torch.arange(b, device=traj.latents.device).repeat(n)  # sample of each transition
    steps = torch.arange(n, device=traj.latents.device).repeat_interleave(b)
    return Batch(traj.latents[rows, steps], traj.latents[rows, steps + 1], steps, rewards.float()[rows],
                 traj.log_probs[rows, steps], text_features(traj.embeds)[rows], traj.embeds.index(rows),
                 None if traj.neg_embeds is None else traj.neg_embeds.index(rows))


class ReplayBuffer:
    """The last `size` transitions of all rounds, as a dict of tensors (official `state_dict`, trimmed by
    `_trim_buffer`); batches are drawn uniformly without replacement, whatever their step or age."""

    def __init__(self, size: int):
        self.size, self.data = size, {}

    def __len__(self) -> int:
        return len(self.data["state"]) if self.data else 0

    def add(self, batch: Batch) -> None:
        new = batch.to_dict()
        self.data = {k: (torch.cat([self.data[k], v]) if self.data else v)[-self.size:] for k, v in new.items()}

    def take(self, idx: Tensor) -> Batch:
        return Batch.from_dict({k: v[idx.to(v.device)] for k, v in self.data.items()})

    def sample(self, n: int, generator: torch.Generator | None = None) -> Batch:
        if n > len(self):
            raise ValueError(f"n: cannot draw {n} transitions without replacement from {len(self)}")
        return self.take(torch.randperm(len(self), generator=generator)[:n])
# --8<-- [end:replay_buffer]


# --8<-- [start:value_function]
class ConditionalLinear(nn.Module):
    """y = (W x + b) * gamma_t: a linear layer scaled per step by a learned embedding (official reward_model.py)."""

    def __init__(self, num_in: int, num_out: int, num_steps: int):
        super().__init__()
        self.lin, self.embed = nn.Linear(num_in, num_out), nn.Embedding(num_steps, num_out)
        nn.init.uniform_(self.embed.weight)
        nn.init.xavier_normal_(self.lin.weight)

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        return self.lin(x) * self.embed(step)


class ValueNet(nn.Module):
    """V(x_t, c, t): the final reward expected from state x_t at step t (official ValueMulti: three
    step-conditioned layers of width 256 on the flattened state concatenated with the text embedding)."""

    def __init__(self, state_shape: Sequence[int], text_dim: int, num_steps: int, width: int = 256):
        super().__init__()
        d = int(torch.tensor(state_shape).prod()) + text_dim
        self.layers = nn.ModuleList([ConditionalLinear(d, width, num_steps), ConditionalLinear(width, width, num_steps),
                                     ConditionalLinear(width, width, num_steps)])
        self.head = nn.Linear(width, 1)
        nn.init.xavier_normal_(self.head.weight)

    def forward(self, state: Tensor, text: Tensor, step: Tensor) -> Tensor:
        h = torch.cat([state.float().flatten(1), text.float()], dim=1)
        for layer in self.layers:
            h = F.relu(layer(h, step))
        return self.head(h).squeeze(1)


def value_loss(value_net: ValueNet, batch: Batch) -> Tensor:
    """L_V = mean (V(x_t, c, t) - r)^2, regressing every state of a trajectory on its final reward."""
    return F.mse_loss(value_net(batch.state, batch.text, batch.step), batch.reward)
# --8<-- [end:value_function]


# --8<-- [start:loss]
def kl_weight_at(round_: int, kl_weight: float, kl_warmup: int) -> float:
    """beta in round `round_`: the official loop adds the KL term only when count > kl_warmup (a delay)."""
    return kl_weight if round_ > kl_warmup else 0.0


def dpok_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, eps: Tensor, eps_ref: Tensor, *,
              reward_weight: float, kl_weight: float, ratio_clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DPOK's per-transition loss, as in train_online_pg.py `_train_policy_func`.

    The ratio is HARD-clamped, with no min/max against the unclamped term (unlike PPO): outside the band
    [1 - eps, 1 + eps] the policy term has zero gradient, whichever the sign of the advantage.
    """
    # rho = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c)
    ratio = torch.exp(log_prob - old_log_prob)
    # L_pg = mean -w_r * A * clamp(rho, 1 - eps, 1 + eps),  A = r - V(x_t, c, t) (no gradient)
    policy = (-reward_weight * advantages.detach() * torch.clamp(ratio, 1 - ratio_clip, 1 + ratio_clip)).mean()
    # KL(p_theta || p_pre) at step t <= const * ||eps_theta - eps_pre||^2 (Lemma 4.1); CFG applied to both
    kl = denoising_error(eps, eps_ref.detach()).mean()
    # L = L_pg + beta * KL
    loss = policy + kl_weight * kl
    with torch.no_grad():
        info = {"policy_loss": policy, "kl": kl, "ratio": ratio.mean(),
                "clipfrac": ((ratio - 1).abs() > ratio_clip).float().mean(), "advantage": advantages.mean()}
    return loss, info
# --8<-- [end:loss]


def transition_loss(adapter: DiffusionAdapter, value_net: ValueNet, batch: Batch, schedule: Schedule,
                    config: Config, kl_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Recompute the policy and reference noise predictions on replayed transitions, then `dpok_loss`."""
    t = schedule.timesteps[batch.step]
    eps = adapter.predict(batch.state, t, batch.cond, batch.uncond, config.guidance_scale)
    with torch.no_grad(), adapter.disable_adapter():
        eps_ref = adapter.predict(batch.state, t, batch.cond, batch.uncond, config.guidance_scale)
    out = dpok_step(eps, batch.state, schedule, batch.step, eta=config.eta, prev_sample=batch.next_state)
    with torch.no_grad():
        advantages = batch.reward - value_net(batch.state, batch.text, batch.step)
    return dpok_loss(out.log_prob, batch.log_prob, advantages, eps.float(), eps_ref.float(),
                     reward_weight=config.reward_weight, kl_weight=kl_weight, ratio_clip=config.ratio_clip)


@torch.no_grad()
def sample_fixed(adapter: DiffusionAdapter, prompts: list[str], config: Config, seed: int) -> Tensor:
    """Samples of the training sampler from fixed noise (initial and per step): equal seeds, comparable images."""
    gen = torch.Generator(device=adapter.device).manual_seed(seed)
    traj = rollout(adapter, prompts, num_steps=config.num_steps, step_fn=functools.partial(dpok_step, eta=config.eta),
                   guidance_scale=config.guidance_scale, generator=gen)
    return traj.images.float()


def _prompt_pool(config: Config) -> list[tuple[str, dict | None]]:
    if config.prompts:
        return [(p, None) for p in config.prompts]
    pool = sample_prompts(config.num_prompts, [config.task], torch.Generator().manual_seed(config.prompt_seed))
    return list(dict(pool).items())  # distinct captions


def _load_reward(config: Config):
    kwargs = {"pickscore": {"model_dir": config.reward_path}, "clip_score": {"clip_dir": config.reward_path}}
    return load_reward(config.reward, **(kwargs.get(config.reward, {}) if config.reward_path else {}))


def _optimizer_step(accelerator, params: list[nn.Parameter], optimizer, clip: float | None) -> Tensor | None:
    """Average gradients over processes (what DDP does), clip, step, zero."""
    if accelerator.num_processes > 1:
        for p in params:
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train(config: Config) -> dict:
    """Run DPOK; returns {"eval": [(round, reward, distance), ...], "rewards": [...], "wall_time_s": ...}."""
    start = time.time()
    accelerator = make_accelerator(cpu=config.device == "cpu" if config.device else None)
    rank = accelerator.process_index
    seed_everything(config.seed + rank)
    device = torch.device(config.device) if config.device else accelerator.device
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    adapter = load_adapter(config.model, dtype=torch.bfloat16 if config.dtype == "bf16" else None, device=device)
    if adapter.prediction != "epsilon":
        raise ValueError(f"model: {config.model} predicts {adapter.prediction!r}; DPOK needs an epsilon model")
    adapter.add_lora(rank=config.lora_rank)
    params = adapter.trainable_parameters()
    for p in params:  # LoRA weights in fp32 even on a bf16 base
        p.data = p.data.float()
    if config.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=0.0)  # official adam_weight_decay 0
    schedule = adapter.schedule(config.num_steps, device)
    pool = _prompt_pool(config)
    text_dim = text_features(adapter.encode_prompts([pool[0][0]])).shape[1]
    value_net = ValueNet(adapter.latent_shape, text_dim, config.num_steps, config.value_width).to(device)
    value_params = list(value_net.parameters())
    value_opt = torch.optim.AdamW(value_params, lr=config.value_lr)  # torch defaults otherwise, as official
    reward_fn = _load_reward(config)
    buffer = ReplayBuffer(config.buffer_size)
    step_fn = functools.partial(dpok_step, eta=config.eta)

    out = Path(config.out_dir)
    gen = torch.Generator(device=device).manual_seed(config.seed + rank)
    cpu_gen = torch.Generator().manual_seed(config.seed + 1000 + rank)
    log = MetricsLogger(out / "metrics.jsonl", total=config.rounds, desc="dpok rounds",
                        disable=not accelerator.is_main_process)
    ckpt = Checkpointer(out / "checkpoints", every=max(config.save_every, 1), accelerator=accelerator)
    named = {**trainable_state_dict(adapter.denoiser),
             **{f"value.{k}": p.detach() for k, p in value_net.named_parameters()}}
    generators = {"rollout": gen, "train": cpu_gen}
    extra: dict = {}
    first_round = 0
    if config.save_every:
        first_round = ckpt.load_latest(model_params=named, optimizer=optimizer, extra_state=extra,
                                       generators=generators, metrics=log) or 0
        if first_round:
            value_opt.load_state_dict(extra["value_optimizer"])
            buffer.data = {k: v.to(device) for k, v in extra["buffer"].items()}
    elif accelerator.is_main_process and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

    eval_prompts = [pool[k % len(pool)][0] for k in range(config.eval_samples)]
    eval_meta = [pool[k % len(pool)][1] for k in range(config.eval_samples)]
    with adapter.disable_adapter():
        base_images = sample_fixed(adapter, eval_prompts, config, seed=config.seed + 12345)
    evals, rewards_seen, last_images = [], [], {}

    def evaluate(round_: int) -> dict:
        images = last_images["after"] = sample_fixed(adapter, eval_prompts, config, seed=config.seed + 12345)
        r, _ = reward_fn(images, eval_prompts, None if eval_meta[0] is None else eval_meta)
        # distance to the base model: mean over images and pixels of (x - x_base)^2, same noise
        dist = ((images - base_images) ** 2).mean()
        evals.append((round_, float(r.mean()), float(dist)))
        return {"eval_reward": r.mean(), "eval_distance": dist}

    if first_round == 0:
        log.log(0, evaluate(0))
    for round_ in range(first_round, config.rounds):
        # ---- sampling: rollouts of the current policy go into the replay buffer with their final reward ----
        picks = torch.randint(len(pool), (config.samples_per_round,), generator=cpu_gen).tolist()
        prompts, meta = [pool[k][0] for k in picks], [pool[k][1] for k in picks]
        traj = rollout(adapter, prompts, num_steps=config.num_steps, step_fn=step_fn,
                       guidance_scale=config.guidance_scale, generator=gen)
        rewards, _ = reward_fn(traj.images, prompts, None if meta[0] is None else meta)
        buffer.add(trajectory_transitions(traj, rewards.to(device)))

        # ---- value function: steps of v_step accumulated micro-batches each (official _train_value_func) ----
        v_loss = 0.0
        for _ in range(config.value_updates):
            for _ in range(config.value_steps):
                loss = value_loss(value_net, buffer.sample(config.value_batch_size, cpu_gen)) / config.value_steps
                loss.backward()
                v_loss += loss.item() / config.value_updates
            _optimizer_step(accelerator, value_params, value_opt, clip=None)

        # ---- policy: p_step optimizer steps, each on grad_accum random minibatches of transitions ----
        beta = kl_weight_at(round_, config.kl_weight, config.kl_warmup)
        infos: dict[str, list[Tensor]] = {}
        for _ in range(config.policy_updates):
            for _ in range(config.grad_accum):
                loss, info = transition_loss(adapter, value_net, buffer.sample(config.policy_batch_size, cpu_gen),
                                             schedule, config, beta)
                (loss / config.grad_accum).backward()
                for k, v in {"loss": loss.detach(), **info}.items():
                    infos.setdefault(k, []).append(v)
            infos.setdefault("grad_norm", []).append(_optimizer_step(accelerator, params, optimizer, config.clip_norm))

        mean_reward = accelerator.gather(rewards.float().to(device)).mean()
        rewards_seen.append(float(mean_reward))
        record = {"reward": mean_reward, "value_loss": v_loss, "kl_weight": beta,
                  **{k: torch.stack(v).float().mean() for k, v in infos.items()}}
        if round_ + 1 == config.rounds or (config.eval_every and (round_ + 1) % config.eval_every == 0):
            record |= evaluate(round_ + 1)
        log.log(round_ + 1, record)
        if config.save_every and ckpt.due(round_ + 1):
            extra = {"value_optimizer": value_opt.state_dict(), "buffer": buffer.data}
            ckpt.save(round_ + 1, model_params=named, optimizer=optimizer, extra_state=extra, generators=generators)
    log.close()

    if accelerator.is_main_process and rewards_seen:
        plot_curve(out / "metrics.jsonl", "reward", out / "reward_curve.png", title=f"DPOK ({config.reward})")
        after = last_images["after"]  # the final round is always evaluated
        n = min(8, config.eval_samples)
        image_grid(torch.cat([base_images[:n], after[:n]]), nrow=n, out_png=out / "before_after.png",
                   labels=["before", "after"])
    return {"eval": evals, "rewards": rewards_seen, "wall_time_s": time.time() - start}


def main(argv: Sequence[str] | None = None) -> dict:
    return train(parse_config(Config, argv))
