"""Building blocks of RL and DPO on image-token generators: pure tensor functions, maths in fp32 (or fp64).

Sequence layout (notes/ar.md 1.1): a causal LM reads [prefix of length L, ending with IMG_START,
y_1 .. y_N] where y are image codes; in a shared vocabulary code k has id OFF + k (Show-o, SimpleAR),
with a separate image head (Janus's gen_head) OFF = 0. Every function here takes codes in [0, K),
and slices logits to the image range [OFF, OFF + K) before any softmax: sampling and scoring must see
the same K-way distribution.

- `image_logits`, `token_log_probs`, `sequence_log_prob`, `sample_codes`: per-token log-probs with the
  off-by-one handled (the logit row at position L - 1 + j predicts y_j, j = 1..N) and temperature.
- `cfg_logits`: classifier-free guidance, standard form and the Show-o / MUSE form.
- `completion_mask`, `random_token_mask`, `pair_masks`, `mask_tokens`: token masks.
- `token_advantages`, `token_policy_loss`: GRPO advantages broadcast to tokens and the clipped token
  surrogate with "grpo" / "dapo" / "dr_grpo" normalisation.
- `token_kl`: k1 / k2 / k3 per token.
- `masked_token_log_prob`, `sequence_dpo_loss`: the one-sample log-prob estimate of masked generators
  (Show-o, UniGen) and the DPO loss on sequence log-probs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.advantages import group_advantages


def _fp32(x: Tensor) -> Tensor:
    """x in at least fp32 (half and bf16 are upcast, fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------
# log-probs of image tokens
# ------------------------------------------------------------------------------------------------
def image_logits(logits: Tensor, prefix_len: int, num_tokens: int, *, offset: int = 0,
                 codebook_size: int | None = None) -> Tensor:
    """The (B, N, K) logit rows that predict y_1..y_N, sliced to the image codes.

    logits: (B, S, V) from one forward over [prefix (L tokens, IMG_START last), y_1 .. y_M] with
    S >= L - 1 + N (the last image token need not be fed). Row L - 1 + j (1-based j) predicts y_j, so
    rows L - 1 .. L + N - 2 are taken; forgetting the IMG_START row (starting at L) is the classic
    off-by-one. codebook_size None means every vocabulary entry from `offset` on is an image code.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits: expected (B, S, V), got {tuple(logits.shape)}")
    if prefix_len < 1:
        raise ValueError(f"prefix_len: must be >= 1 (the prefix ends with IMG_START), got {prefix_len}")
    k = logits.shape[-1] - offset if codebook_size is None else codebook_size
    if offset < 0 or k < 1 or offset + k > logits.shape[-1]:
        raise ValueError(f"offset, codebook_size: image range [{offset}, {offset + k}) does not fit "
                         f"a vocabulary of {logits.shape[-1]}")
    start = prefix_len - 1
    if logits.shape[1] < start + num_tokens:
        raise ValueError(f"logits: {logits.shape[1]} positions, need prefix_len - 1 + num_tokens = "
                         f"{start + num_tokens}")
    return logits[:, start: start + num_tokens, offset: offset + k]


def code_log_probs(img_logits: Tensor, codes: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token log pi(y_j) = log softmax(z_j / T)[y_j], fp32, shape (B, N), from (B, N, K) logits."""
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if codes.shape != img_logits.shape[:-1]:
        raise ValueError(f"codes: expected shape {tuple(img_logits.shape[:-1])}, got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= img_logits.shape[-1]):
        raise ValueError(f"codes: must be image code ids in [0, {img_logits.shape[-1]}) (subtract the "
                         "vocabulary offset first)")
    # l_j = log softmax(z_j / T)[y_j]; the same T as in sampling (trl and AR-GRPO divide, notes 1.2)
    logp = torch.log_softmax(_fp32(img_logits) / temperature, dim=-1)
    return logp.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)


def token_log_probs(logits: Tensor, codes: Tensor, prefix_len: int, *, offset: int = 0,
                    codebook_size: int | None = None, temperature: float = 1.0) -> Tensor:
    """Per-token log-probs (B, N) of image codes `codes` (B, N) from a full-sequence forward's logits."""
    if codes.ndim != 2:
        raise ValueError(f"codes: expected (B, N), got {tuple(codes.shape)}")
    rows = image_logits(logits, prefix_len, codes.shape[1], offset=offset, codebook_size=codebook_size)
    return code_log_probs(rows, codes, temperature)


def sequence_log_prob(token_log_prob: Tensor, mask: Tensor | None = None) -> Tensor:
    """log pi(y | c) = sum_j M_j l_j, shape (B,)."""
    if mask is None:
        return _fp32(token_log_prob).sum(-1)
    if mask.shape != token_log_prob.shape:
        raise ValueError(f"mask: expected shape {tuple(token_log_prob.shape)}, got {tuple(mask.shape)}")
    return (_fp32(token_log_prob) * mask.float()).sum(-1)


def sample_codes(img_logits: Tensor, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample one code per row from softmax(z / T) over the image slice (B, K); returns codes (B,) and their
    log-probs (B,) computed exactly as `code_log_probs` computes them, so a recompute reproduces them."""
    if img_logits.ndim != 2:
        raise ValueError(f"img_logits: expected (B, K), got {tuple(img_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    logp = torch.log_softmax(_fp32(img_logits) / temperature, dim=-1)
    codes = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return codes, logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# classifier-free guidance
# ------------------------------------------------------------------------------------------------
def cfg_logits(cond: Tensor, uncond: Tensor, scale: float,
               form: Literal["standard", "showo"] = "standard") -> Tensor:
    """Mix conditional and unconditional logits (fp32).

    standard (LlamaGen, Janus, T2I-R1, AR-GRPO): z = z_u + s (z_c - z_u); s = 1 is no guidance.
    showo (Show-o, MUSE): z = (1 + s) z_c - s z_u; s = 0 is no guidance. Expanding,
    (1 + s) z_c - s z_u = z_u + (1 + s)(z_c - z_u), so showo(s) == standard(1 + s): Show-o's
    guidance 1.75 is 2.75 in the standard form.
    Janus-Pro-R1 trains on z / s (the standard mixture at temperature s): pass temperature=s to the
    log-prob functions.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond, uncond: shapes differ ({tuple(cond.shape)} vs {tuple(uncond.shape)})")
    zc, zu = _fp32(cond), _fp32(uncond)
    if form == "standard":
        # z = z_u + s (z_c - z_u)
        return zu + scale * (zc - zu)
    if form == "showo":
        # z = (1 + s) z_c - s z_u
        return (1 + scale) * zc - scale * zu
    raise ValueError(f"form: 'standard' or 'showo', got {form!r}")


# ------------------------------------------------------------------------------------------------
# token masks
# ------------------------------------------------------------------------------------------------
def completion_mask(ids: Tensor, eos_id: int) -> Tensor:
    """1 up to and including the first `eos_id` of each row, 0 after (text CoT: T2I-R1, SimpleAR);
    rows without EOS are all ones."""
    if ids.ndim != 2:
        raise ValueError(f"ids: expected (B, T), got {tuple(ids.shape)}")
    is_eos = ids == eos_id
    # position of the first EOS, or T when there is none
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(ids[:, 0], ids.shape[1]))
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).float()


def random_token_mask(batch: int, num_tokens: int, generator: torch.Generator | None = None,
                      ratio: Tensor | float | None = None) -> Tensor:
    """(batch, N) bool: which tokens a masked generator must predict (True = masked).

    Show-o / MUSE training: gamma = cos(pi/2 * u), u ~ U(0, 1), round(gamma * N) tokens masked
    (at least one), chosen uniformly at random; pass `ratio` to fix gamma.
    """
    if batch < 0 or num_tokens < 1:
        raise ValueError(f"batch, num_tokens: need batch >= 0 and num_tokens >= 1, got {batch}, {num_tokens}")
    if ratio is None:
        # gamma = cos(pi / 2 * u) (cosine schedule)
        ratio = torch.cos(torch.rand(batch, generator=generator) * math.pi / 2)
    ratio = torch.as_tensor(ratio, dtype=torch.float32).expand(batch)
    count = (ratio * num_tokens).round().clamp(min=1)
    order = torch.rand(batch, num_tokens, generator=generator).argsort(-1).argsort(-1)  # a random rank per token
    return order < count[:, None]


def pair_masks(num_pairs: int, num_tokens: int, generator: torch.Generator | None = None,
               shared: bool = True) -> tuple[Tensor, Tensor]:
    """Masks for the winner and loser of each DPO pair. shared=True uses one mask (and one gamma) for
    both, which cancels the mask's noise in the winner - loser difference; the Show-o and UniGen DPO
    trainers draw them independently (shared=False). Deviation noted in notes/ar.md 1.8."""
    mask_w = random_token_mask(num_pairs, num_tokens, generator)
    return (mask_w, mask_w.clone()) if shared else (mask_w, random_token_mask(num_pairs, num_tokens, generator))


def mask_tokens(ids: Tensor, mask: Tensor, mask_id: int) -> Tensor:
    """The masked generator's input: `ids` with masked positions replaced by `mask_id`."""
    if ids.shape != mask.shape:
        raise ValueError(f"mask: expected shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return torch.where(mask.bool(), torch.full_like(ids, mask_id), ids)


# ------------------------------------------------------------------------------------------------
# GRPO on tokens
# ------------------------------------------------------------------------------------------------
def token_advantages(rewards: Tensor, group_size: int, num_tokens: int, *, eps: float = 1e-4,
                     scale_by_std: bool = True) -> Tensor:
    """One group-relative advantage per sequence, repeated over its N tokens: (B, N).

    A_i = (r_i - mean_g r) / (std_g r + eps), torch std (N - 1), eps 1e-4 (T2I-R1, SimpleAR, GCPO,
    STAGE, AR-GRPO); scale_by_std=False gives Dr.GRPO's r_i - mean_g r. Groups are contiguous
    ([p0]*G + [p1]*G + ...); a group of equal rewards gets exactly 0.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected (B,), got {tuple(rewards.shape)}")
    adv = group_advantages(_fp32(rewards), group_size, std="group" if scale_by_std else "none", eps=eps, ddof=1)
    return adv[:, None].expand(-1, num_tokens)


def token_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor | None = None,
                      *, clip_low: float = 0.2, clip_high: float | None = None,
                      loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo", kl: Tensor | None = None,
                      beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped token surrogate with an optional per-token KL term.

        rho_it = exp(l_it - l_it^old)
        L = -(1/Z) sum_it M_it [min(rho_it A_i, clip(rho_it, 1 - e_low, 1 + e_high) A_i) - beta KL_it]

    Z: "grpo" averages each sequence over its active tokens, then the batch; "dapo" (trl's default)
    divides by the number of active tokens in the batch; "dr_grpo" by B * T (T the padded length).
    eps 0.2 (trl GRPOConfig); clip_high None means symmetric. advantages: (B,) or (B, T).
    info (detached): clipfrac (fraction of active tokens where the clip binds, trl's definition: rho < 1 - e_low
    with A < 0 or rho > 1 + e_high with A > 0), ratio, approx_kl (means over active tokens).
    """
    if log_prob.ndim != 2 or log_prob.shape != old_log_prob.shape:
        raise ValueError(f"log_prob, old_log_prob: expected equal (B, T) shapes, got {tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)}")
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = _fp32(advantages).expand_as(log_prob)
    mask = torch.ones_like(log_prob, dtype=torch.float32) if mask is None else mask.float()
    if mask.shape != log_prob.shape:
        raise ValueError(f"mask: expected shape {tuple(log_prob.shape)}, got {tuple(mask.shape)}")
    clip_high = clip_low if clip_high is None else clip_high
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip_low, clip_high: must be > 0, got {clip_low}, {clip_high}")
    log_ratio = _fp32(log_prob) - _fp32(old_log_prob)
    # rho = exp(l - l_old)
    ratio = torch.exp(log_ratio)
    # per-token objective min(rho A, clip(rho) A) - beta KL
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages)
    if kl is not None and beta != 0.0:
        if kl.shape != log_prob.shape:
            raise ValueError(f"kl: expected shape {tuple(log_prob.shape)}, got {tuple(kl.shape)}")
        surrogate = surrogate - beta * _fp32(kl)
    per_token = -surrogate * mask
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / per_token.numel()
    else:
        raise ValueError(f"loss_type: 'grpo', 'dapo' or 'dr_grpo', got {loss_type!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
        info = {"clipfrac": (clipped.float() * mask).sum() / n, "ratio": (ratio * mask).sum() / n,
                "approx_kl": (0.5 * log_ratio**2 * mask).sum() / n}
    return loss, info


def token_kl(log_prob: Tensor, ref_log_prob: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi, with r = pi_ref / pi (fp32).

    k1 = -log r (unbiased, can be negative); k2 = (log r)^2 / 2 (biased, low variance);
    k3 = r - 1 - log r (unbiased and >= 0; the term T2I-R1, GCPO, STAGE, AR-GRPO put in the loss).
    All are 0 where pi = pi_ref. Values and gradients say different things: with the sampled tokens
    held fixed, the expected gradient of k1 is zero (it is the score function, so k1 as a loss term
    pulls towards nothing on average); k2's expected gradient is that of the reverse KL(pi || pi_ref);
    k3's is that of the forward KL(pi_ref || pi). So "k3 in the loss" regularises in the forward-KL
    direction even though its value estimates the reverse KL (test_ar checks all three exactly).
    """
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"log_prob, ref_log_prob: shapes differ ({tuple(log_prob.shape)}, "
                         f"{tuple(ref_log_prob.shape)})")
    log_r = _fp32(ref_log_prob) - _fp32(log_prob)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        # r - 1 - log r, with expm1 for accuracy near r = 1
        return torch.expm1(log_r) - log_r
    raise ValueError(f"estimator: 'k1', 'k2' or 'k3', got {estimator!r}")


# ------------------------------------------------------------------------------------------------
# masked generators and DPO
# ------------------------------------------------------------------------------------------------
def masked_token_log_prob(img_logits: Tensor, codes: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """One-sample log-prob estimate of a masked generator (Show-o, UniGen DPO trainers): the sum of
    log p(y_j | unmasked tokens) over the masked positions j only, shape (B,).

    img_logits: (B, N, K) image-code logits of the model fed `mask_tokens(codes, mask, MASK)` (a
    bidirectional model: row j predicts y_j, no shift). The official code sets labels to -100 off the
    mask; multiplying by the mask is the same sum.
    """
    if mask.shape != codes.shape:
        raise ValueError(f"mask: expected shape {tuple(codes.shape)}, got {tuple(mask.shape)}")
    return sequence_log_prob(code_log_probs(img_logits, codes, temperature), mask.float())


def sequence_dpo_loss(log_prob_w: Tensor, log_prob_l: Tensor, ref_log_prob_w: Tensor, ref_log_prob_l: Tensor,
                      beta: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO on sequence log-probs (Rafailov et al. 2023), winners w and losers l, shapes (B,):

        L = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

    beta 0.1 (PARM / Show-o and UniGen DPO configs). For masked generators pass the
    `masked_token_log_prob` estimates, with the same mask for pi and pi_ref. ln 2 at pi = pi_ref.
    info (detached): accuracy (margin > 0), margin (mean of the bracket times beta).
    """
    shapes = {tuple(t.shape) for t in (log_prob_w, log_prob_l, ref_log_prob_w, ref_log_prob_l)}
    if len(shapes) != 1 or log_prob_w.ndim != 1:
        raise ValueError(f"log-probs: expected four (B,) tensors of one shape, got {sorted(shapes)}")
    # margin = beta [(l_w - l_ref_w) - (l_l - l_ref_l)]
    margin = beta * ((_fp32(log_prob_w) - _fp32(ref_log_prob_w)) - (_fp32(log_prob_l) - _fp32(ref_log_prob_l)))
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        info = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, info
