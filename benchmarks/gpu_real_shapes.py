"""One Flow-GRPO-like update at SD3.5-Medium's real shapes on one GPU: samples/s, peak memory, MFU.

The transformer is `SD3Transformer2DModel` with SD3.5-Medium's published config and random weights
(no download); the text side is the real pipeline's layout (77 CLIP tokens + 256 T5 tokens, pooled
width 2048) produced by two small random CLIP encoders and the zero T5 tokens SD3Adapter appends when
T5 is absent, so the transformer sees exactly the shapes of a real run. No VAE and no reward model:
they are outside the model FLOPs counted here.

The update, with the repository's own code (common.rollout, common.steps, common.losses):
  rollout: `rollout` with `flow_sde_step` (noise level 0.7), 10 steps, CFG 4.5 (one batched forward of
           [uncond; cond] per step), bf16 autocast, LoRA r=32 / alpha 64 on the joint attention
           (Flow-GRPO official train_sd3.py);
  train:   one PPO step: `step_log_prob` of one stored transition for the whole batch (CFG, so 2B rows),
           `ppo_clip_loss`, backward, AdamW step.
Both gradient-checkpointing settings are measured, each after one warm-up update. For the overhead, the
same transformer work is also timed bare: `steps` forwards of the CFG batch, and one forward + backward
+ AdamW step; the host-device synchronisations of the update are counted with torch's sync debug mode.

FLOPs are counted analytically (`forward_flops`): every matmul of the transformer as 2*m*n*k, attention
as 4*N^2*d per block (QK^T and PV over all heads), LoRA's two small matmuls on each adapted projection;
norms, activations, softmax and the step kernels are left out (well under 1%). Backward with a frozen
base costs one forward for the linears whose input needs a gradient (after block 0's Q, K, V), two
forwards for attention and two for LoRA (`train_flops`). `--tiny` checks the count against torch's
FlopCounterMode on a small model (they agree exactly).
Recomputation under gradient checkpointing is not model work and is not counted (MFU, not HFU).
MFU = model FLOP/s / the card's dense bf16 peak (datasheet; `--peak-tflops` overrides).

    python -m benchmarks.gpu_real_shapes --out DIR          # one H100/H200, about 2 minutes
    python -m benchmarks.gpu_real_shapes --tiny              # CPU check at a toy size
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS, machine_info, write_result
from benchmarks.tracer import sync

#: SD3.5-Medium transformer: stabilityai/stable-diffusion-3.5-medium, transformer/config.json (diffusers
#: SD3Transformer2DModel). MMDiT-X: 24 joint blocks of width 24 x 64 = 1536, extra image self-attention
#: ("dual attention") in blocks 0-12, RMS-normalised queries and keys; 2.24B parameters.
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}
#: the same structure at a toy size, for `--tiny`
TINY = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 3,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
    "pooled_projection_dim": 16, "pos_embed_max_size": 16, "dual_attention_layers": [0, 1], "qk_norm": "rms_norm",
}
CLIP_TOKENS, TINY_CLIP_TOKENS = 77, 8  # the real CLIP tokenizers' length; the toy check's
#: dense (no sparsity) bf16 tensor-core peaks in FLOP/s from NVIDIA's datasheets; first match wins
PEAK_BF16 = (("H200", 989.4e12), ("GH200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12),
             ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.0e12))
#: Flow-GRPO official SD3.5 settings (config/grpo.py, scripts/train_sd3.py)
LORA_RANK, LORA_ALPHA, NOISE_LEVEL, GUIDANCE, NUM_STEPS = 32, 64, 0.7, 4.5, 10
#: the SD3 LoRA targets per block (SD3Adapter.default_lora_targets): 4 image-stream and 4 text-stream
#: projections of the joint attention (the last block's text stream has no output projection)
LORA_PER_BLOCK = 8


# ---- model ---------------------------------------------------------------------------------------


def build_adapter(config: dict, resolution: int, clip_tokens: int, t5_tokens: int, device: str,
                  dtype: torch.dtype):
    """SD3Adapter around a random SD3Transformer2DModel(config); latents are resolution/8 on a side."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from common.models.sd3 import SD3Adapter
    from common.models.tiny import clip_tokenizer

    pooled = config["pooled_projection_dim"]
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype)
        encoders, tokenizers = [], []
        for _ in range(2):  # CLIP-L and CLIP-G stand-ins: pooled widths add up to pooled_projection_dim
            tokenizer = clip_tokenizer()
            tokenizer.model_max_length = clip_tokens
            clip = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=clip_tokens,
                                  projection_dim=pooled // 2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
            encoders.append(CLIPTextModelWithProjection(clip))
            tokenizers.append(tokenizer)
    latent = resolution // 8  # SD3's VAE downsamples by 8; without a VAE the adapter's "pixels" are latents
    return SD3Adapter(transformer, encoders, tokenizers, FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                      t5_max_length=t5_tokens, resolution=latent)


# ---- FLOPs ---------------------------------------------------------------------------------------


def forward_flops(config: dict, image_tokens: int, text_tokens: int, lora_rank: int = 0) -> dict[str, float]:
    """Matmul FLOPs of one transformer forward for ONE row, grouped by what their backward costs.

    With a frozen base and LoRA on the joint attention, nothing before block 0's LoRA needs a gradient:
    linear: linears whose input gradient the backward computes; frozen_input: linears whose input needs
    none (embeddings, adaLN modulations fed by the time embedding, block 0's Q, K, V and its image-only
    attention branch); attention / frozen_attention: S = Q K^T and S V with / without a backward (block 0's
    image-only attention has no trainable input); lora: LoRA's x A and (x A) B, lora_block0: those on
    block 0's Q, K, V (no input gradient).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, ni, nt = config["patch_size"], image_tokens, text_tokens
    n = ni + nt
    dual = set(config.get("dual_attention_layers") or [])
    out = dict.fromkeys(("linear", "frozen_input", "attention", "frozen_attention", "lora", "lora_block0"), 0.0)
    # before the blocks: patch embedding, text projection, timestep and pooled-text MLPs; final adaLN
    out["frozen_input"] += 2 * ni * (p * p * config["in_channels"]) * d + 2 * nt * config["joint_attention_dim"] * d
    out["frozen_input"] += 2 * (256 * d + d * d) + 2 * (config["pooled_projection_dim"] * d + d * d) + 2 * d * 2 * d
    out["linear"] += 2 * ni * d * (p * p * config["out_channels"])  # final projection to patches
    for k in range(config["num_layers"]):
        last, first = k == config["num_layers"] - 1, k == 0  # last: the text stream stops after Q, K, V
        out["frozen_input"] += 2 * d * (9 if k in dual else 6) * d + 2 * d * (2 if last else 6) * d  # adaLN
        # joint Q, K, V of both streams; output projections; 4x GELU MLPs
        out["frozen_input" if first else "linear"] += 3 * 2 * n * d * d
        out["linear"] += 2 * ni * d * d + 16 * ni * d * d + (0 if last else 2 * nt * d * d + 16 * nt * d * d)
        # joint attention over all n tokens, over all heads
        out["attention"] += 4 * n * n * d
        if k in dual:  # image-only self-attention: Q, K, V, output projection, attention
            out["frozen_input" if first else "linear"] += 4 * 2 * ni * d * d
            out["frozen_attention" if first else "attention"] += 4 * ni * ni * d
        # LoRA: x A (d -> r) and (x A) B (r -> d) on Q, K, V and the output projection of each stream
        qkv_tokens, out_tokens = 3 * ni + 3 * nt, ni + (0 if last else nt)
        out["lora_block0" if first else "lora"] += 2 * qkv_tokens * lora_rank * 2 * d
        out["lora"] += 2 * out_tokens * lora_rank * 2 * d
    return out


def train_flops(fwd: dict[str, float]) -> float:
    """Forward + backward FLOPs with a frozen base: 1x the forward of the linears whose input needs a
    gradient, 2x attention (dS with dQ, dK, dV), 2x LoRA (dB, dh, dA, dx), 1.5x block 0's Q, K, V LoRA
    (no dx)."""
    return sum(fwd.values()) + fwd["linear"] + 2 * fwd["attention"] + 2 * fwd["lora"] + 1.5 * fwd["lora_block0"]


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def check_flop_count(config: dict, resolution: int, t5_tokens: int) -> dict[str, float]:
    """The analytic count against torch's FlopCounterMode (math attention), forward and forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    adapter = build_adapter(config, resolution, TINY_CLIP_TOKENS, t5_tokens, "cpu", torch.float32)
    adapter.add_lora(rank=4, alpha=8)
    embeds = adapter.encode_prompts(["a cat"])
    x = torch.randn(1, *adapter.latent_shape)
    t = torch.tensor([500.0])
    counted = {}
    for mode in ("forward", "train"):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = adapter.predict(x, t, embeds)
            if mode == "train":
                out.float().sum().backward()
        counted[mode] = counter.get_total_flops()
    ni = (x.shape[-1] // config["patch_size"]) ** 2
    fwd = forward_flops(config, ni, embeds.hidden.shape[1], lora_rank=4)
    analytic = {"forward": sum(fwd.values()), "train": train_flops(fwd)}
    return {f"{m}_{k}": v for m in counted for k, v in (("counted", counted[m]), ("analytic", analytic[m]))}


# ---- the update ----------------------------------------------------------------------------------


def measure(args, checkpointing: bool) -> dict[str, Any]:
    """Warm-up update, then `reps` timed updates (rollout + one PPO step) with one checkpointing setting."""
    from common.losses import ppo_clip_loss
    from common.rollout import rollout, step_log_prob
    from common.steps import flow_sde_step
    from common.train import make_optimizer

    config = TINY if args.tiny else SD35_MEDIUM
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    clip_tokens = TINY_CLIP_TOKENS if args.tiny else CLIP_TOKENS
    adapter = build_adapter(config, args.resolution, clip_tokens, args.t5_tokens, args.device, dtype)
    adapter.add_lora(rank=args.lora_rank, alpha=2 * args.lora_rank)
    params = adapter.trainable_parameters()
    for p in params:
        p.data = p.data.float()  # LoRA weights and their AdamW state in fp32 (as the papers do)
    if checkpointing:
        adapter.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, lr=3e-4)
    step_fn = functools.partial(flow_sde_step, noise_level=NOISE_LEVEL)
    prompts = [f"prompt {k}" for k in range(args.batch // args.group)]
    generator = torch.Generator(args.device).manual_seed(0)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=not args.tiny)

    j = args.steps // 2  # the trained transition

    def do_rollout():
        with autocast:
            return rollout(adapter, prompts, group_size=args.group, num_steps=args.steps, step_fn=step_fn,
                           guidance_scale=GUIDANCE, generator=generator, decode=False)

    def do_train(traj) -> None:
        with autocast:
            new = step_log_prob(adapter, traj, j, step_fn)
        advantages = torch.linspace(-1, 1, len(traj), device=args.device)
        loss, _ = ppo_clip_loss(new.log_prob, traj.log_probs[:, j], advantages, clip_range=1e-4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the same transformer work with nothing around it: `steps` CFG-batch forwards; one forward + backward
    rows = 2 * args.batch  # CFG: [uncond; cond] in every forward
    c, h, w = adapter.latent_shape
    inputs = {"hidden_states": torch.randn(rows, c, h, w, device=args.device, dtype=dtype),
              "timestep": torch.full((rows,), 500.0, device=args.device),
              "encoder_hidden_states": torch.randn(rows, clip_tokens + args.t5_tokens,
                                                   config["joint_attention_dim"], device=args.device, dtype=dtype),
              "pooled_projections": torch.randn(rows, config["pooled_projection_dim"], device=args.device, dtype=dtype)}

    def raw_rollout() -> None:
        with torch.no_grad(), autocast:
            for _ in range(args.steps):
                adapter.transformer(**inputs, return_dict=False)

    def raw_train() -> None:
        with autocast:
            out = adapter.transformer(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn, *a):
        sync(args.device)
        start = time.perf_counter()
        out = fn(*a)
        sync(args.device)
        return time.perf_counter() - start, out

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    do_train(do_rollout())  # warm-up: kernel selection, allocator growth, AdamW state
    times = []
    for _ in range(args.reps):
        rollout_s, traj = timed(do_rollout)
        times.append((rollout_s, timed(do_train, traj)[0]))
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    raw_rollout()
    raw_times = [(timed(raw_rollout)[0], timed(raw_train)[0]) for _ in range(args.reps)]
    syncs = {"rollout": count_syncs(do_rollout), "train_step": count_syncs(do_train, traj)} if cuda else None
    rollout_s = statistics.median(t[0] for t in times)
    train_s = statistics.median(t[1] for t in times)
    raw_rollout_s = statistics.median(t[0] for t in raw_times)
    raw_train_s = statistics.median(t[1] for t in raw_times)
    image_tokens = (h // config["patch_size"]) * (w // config["patch_size"])
    text_tokens = clip_tokens + args.t5_tokens
    fwd = forward_flops(config, image_tokens, text_tokens, lora_rank=args.lora_rank)
    flops_rollout = args.steps * rows * sum(fwd.values())
    flops_train = rows * train_flops(fwd)
    peak = peak_flops(machine_info(args.device).get("gpu", ""), args.peak_tflops)

    def mfu(flops: float, seconds: float) -> float | None:
        return flops / seconds / peak if peak else None

    return {
        "gradient_checkpointing": checkpointing, "batch": args.batch, "rows_per_forward": rows,
        "image_tokens": image_tokens, "text_tokens": text_tokens, "rollout_s": rollout_s, "train_step_s": train_s,
        "update_s": rollout_s + train_s, "samples_per_s": args.batch / (rollout_s + train_s),
        "rollout_samples_per_s": args.batch / rollout_s,
        "raw_rollout_s": raw_rollout_s, "raw_train_step_s": raw_train_s,
        "overhead_rollout": rollout_s / raw_rollout_s, "overhead_train_step": train_s / raw_train_s,
        "tflop_rollout": flops_rollout / 1e12, "tflop_train_step": flops_train / 1e12,
        "mfu_rollout": mfu(flops_rollout, rollout_s), "mfu_train_step": mfu(flops_train, train_s),
        "mfu_update": mfu(flops_rollout + flops_train, rollout_s + train_s),
        "mfu_raw_rollout": mfu(flops_rollout, raw_rollout_s), "mfu_raw_train_step": mfu(flops_train, raw_train_s),
        "peak_memory_gib": peak_memory, "host_syncs": syncs, "times_s": times, "raw_times_s": raw_times,
    }


def count_syncs(fn, *args) -> int:
    """Host-device synchronisations inside fn (torch's CUDA sync debug mode, one warning each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy-size model on the CPU (a check that it runs)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents / 8)")
    parser.add_argument("--batch", type=int, default=8, help="images per update (prompts x group)")
    parser.add_argument("--group", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=NUM_STEPS, help="rollout steps (Flow-GRPO: 10)")
    parser.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens after the 77 CLIP ones "
                        "(diffusers' max_sequence_length default)")
    parser.add_argument("--lora-rank", type=int, default=LORA_RANK)
    parser.add_argument("--reps", type=int, default=3, help="timed updates per setting after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.resolution, args.batch, args.group, args.steps, args.t5_tokens, args.reps = 64, 2, 2, 2, 8, 1
        args.lora_rank = min(args.lora_rank, 4)
    args.device = args.device or "cuda"
    if args.device == "cpu":
        torch.set_num_threads(1)  # see benchmarks.harness: a shared CPU multiplies multi-thread latency
    if args.batch % args.group:
        parser.error("--batch: must be a multiple of --group")
    start = time.perf_counter()
    rows = []
    for checkpointing in (False, True):
        print(f"[gpu_real_shapes] gradient checkpointing {checkpointing} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(args, checkpointing))
        except torch.OutOfMemoryError as err:
            rows.append({"gradient_checkpointing": checkpointing, "error": f"out of memory: {err}"[:300]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[gpu_real_shapes]   {rows[-1]}", file=sys.stderr, flush=True)
    payload = {"machine": machine_info(args.device), "wall_s": time.perf_counter() - start,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "config": TINY if args.tiny else SD35_MEDIUM, "rows": rows}
    if args.tiny:
        payload["flop_check"] = check_flop_count(TINY, args.resolution, args.t5_tokens)
    path = write_result("gpu-tiny" if args.tiny else "gpu", payload, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
