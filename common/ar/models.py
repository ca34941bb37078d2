"""The toy image-token generators on the toy tokenizer's codes: raster autoregressive and masked.

Raster AR (LlamaGen / Janus layout, notes/ar.md 1.1): a tiny `transformers.LlamaForCausalLM` reads

    [BOS, w_1 .. w_P (left-padded prompt words), IMG_START, y_1 .. y_64]

with one vocabulary: the toy text ids (`common.models.toy.toy_tokenizer`, 24 words and specials), a
NULL id (the unconditional prompt), IMG_START, then the 128 codes of `common.toy.vq` at offset OFFSET
(Show-o / SimpleAR put image ids after the text vocabulary). Logits are sliced to the code range both
for sampling and for scoring (`common.ar.tokens`), so both see the same 128-way distribution.

Classifier-free guidance: the unconditional prefix has every prompt position replaced by NULL (Janus
replaces the prompt by pad ids; LlamaGen learns a null embedding, which a NULL token is) with an
all-ones attention mask; training drops the condition with probability 0.1. Sampling feeds one new
token per step and reuses the cached keys and values of the sequence so far, and mixes
z = z_u + s (z_c - z_u) (standard form), then samples from softmax(z / T).

Masked parallel decoder (MaskGIT, Chang et al. 2022; Show-o): a tiny bidirectional
`transformers.BertForMaskedLM` reads the same sequence with image positions either a code or [MASK]
and predicts every masked code at once (row j predicts y_j, no shift). Decoding starts all-masked and
runs T = 8 steps; after step t the n_t = floor(N cos(pi/2 (t + 1) / T)) least confident sampled
tokens are masked again (confidence: log-prob plus annealed Gumbel noise). CFG in Show-o's form
z = (1 + s) z_c - s z_u, s = 1.75. It has no chain-rule likelihood; `log_probs(prompts, codes, mask)`
is the one-sample estimate of the Show-o / UniGen DPO trainers (sum over the masked positions).

`load_ar_base(kind)` returns a shipped base (`common/ar/bases/<kind>.safetensors`, trained by
`python -m common.ar.train_bases --kind KIND`) as a `RasterAR` or `MaskedAR`:
`sample(prompts, generator, cfg_scale, temperature) -> (codes (B, 64), images (B, 3, 16, 16))`,
`logits(...)` the CFG-mixed (B, 64, 128) code logits; for `RasterAR`,
`log_probs(prompts, codes, cfg_scale, temperature)` (B, 64) is computed exactly as in sampling
(`sample(..., return_log_probs=True)` also returns the sampling log-probs).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from common.ar.tokens import (
    cfg_logits,
    code_log_probs,
    image_logits,
    mask_tokens,
    masked_token_log_prob,
    sample_codes,
)
from common.models.toy import toy_tokenizer
from common.toy.vq import ToyVQ, load_toy_vq

BASES_DIR = Path(__file__).resolve().parent / "bases"
KINDS: tuple[str, ...] = ("raster", "masked")

_TOKENIZER = toy_tokenizer()
TEXT_VOCAB = len(_TOKENIZER)  #: toy text ids 0 .. 23 ("<pad>" 0, "<bos>" 1, words)
PAD = _TOKENIZER.pad_token_id
BOS = _TOKENIZER.bos_token_id
NULL = TEXT_VOCAB  #: fills every prompt position of the unconditional prefix
IMG_START = TEXT_VOCAB + 1
OFFSET = TEXT_VOCAB + 2  #: code k has id OFFSET + k
CODEBOOK_SIZE = 128  #: the toy tokenizer's codes (common/toy/bases/vq.json)
NUM_TOKENS = 64  #: 8 x 8 code grid
PROMPT_LEN = 8  #: the longest caption has 7 words ("a red circle and a blue square"), rounded up
PREFIX_LEN = 1 + PROMPT_LEN + 1  #: L: BOS, prompt, IMG_START
VOCAB_SIZE = OFFSET + CODEBOOK_SIZE
MASK = VOCAB_SIZE  #: the masked generator's [MASK] id (its vocabulary is one larger)

#: default sampling: CFG 4.0 as LlamaGen T2I during RL (AR-GRPO, notes/ar.md 1.3), temperature 1
CFG_SCALE = 4.0
TEMPERATURE = 1.0

#: the shipped raster model: 4 layers of width 128 (notes/ar.md 1.10 uses width 64, 2 layers for 16 codes)
DEFAULT_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": PREFIX_LEN + NUM_TOKENS,
    "bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": None, "tie_word_embeddings": False,
}
#: the shipped masked model: a bidirectional BERT of the same size, no dropout (the toy data is noise-free)
MASKED_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE + 1, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "max_position_embeddings": PREFIX_LEN + NUM_TOKENS, "pad_token_id": PAD,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
#: masked decoding defaults: Show-o's CFG form with guidance 1.75 (= 2.75 standard), MaskGIT's 8 to 12
#: steps (8 here: 64 tokens), Gumbel noise on the confidences annealed from 4.5 (MaskGIT / Show-o default)
MASKED_CFG_SCALE = 1.75
MASKED_STEPS = 8
MASKED_NOISE = 4.5


def encode_prompts(prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Conditional prefixes (B, L) and attention masks (B, L): [BOS, left-padded words, IMG_START]."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a sequence of strings, got one string")
    ids = torch.full((len(prompts), PREFIX_LEN), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, 0], ids[:, -1] = BOS, IMG_START
    mask[:, 0], mask[:, -1] = 1, 1
    for i, prompt in enumerate(prompts):
        words = _TOKENIZER(prompt, add_special_tokens=False)["input_ids"]
        if len(words) > PROMPT_LEN:
            raise ValueError(f"prompts: {prompt!r} has {len(words)} words, at most {PROMPT_LEN} fit")
        if words:
            # left padding: the words end right before IMG_START
            ids[i, PREFIX_LEN - 1 - len(words): PREFIX_LEN - 1] = torch.tensor(words)
            mask[i, PREFIX_LEN - 1 - len(words): PREFIX_LEN - 1] = 1
    return ids, mask


def null_prefix(batch: int) -> tuple[Tensor, Tensor]:
    """Unconditional prefixes (B, L): [BOS, NULL x P, IMG_START], all attended."""
    ids = torch.full((batch, PREFIX_LEN), NULL, dtype=torch.long)
    ids[:, 0], ids[:, -1] = BOS, IMG_START
    return ids, torch.ones_like(ids)


#: the forward argument that carries the key/value cache: `cache` in recent transformers, `past_key_values` before
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def build_raster_model(config: dict | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised (seeded) tiny Llama."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**dict(DEFAULT_CONFIG if config is None else config)))
    return model


class RasterAR(torch.nn.Module):
    """A raster-order image-token generator with CFG, decoding through the toy tokenizer."""

    def __init__(self, model: LlamaForCausalLM, vq: ToyVQ | None = None):
        super().__init__()
        self.model = model
        self.vq = vq if vq is not None else load_toy_vq()

    # ---- scoring -------------------------------------------------------------------------------
    def sequence_logits(self, prefix: Tensor, prefix_mask: Tensor, codes: Tensor) -> Tensor:
        """(B, N', K) code logits of a teacher-forced forward over [prefix, codes[:, :-1]] (N' = N).

        Row j predicts y_{j+1}; slicing is `common.ar.tokens.image_logits` (the IMG_START row first).
        """
        if codes.ndim != 2 or codes.shape[0] != prefix.shape[0]:
            raise ValueError(f"codes: expected (B, N) with B = {prefix.shape[0]}, got {tuple(codes.shape)}")
        n = codes.shape[1]
        ids = torch.cat([prefix, codes[:, : n - 1] + OFFSET], 1)
        mask = torch.cat([prefix_mask, torch.ones_like(codes[:, : n - 1])], 1)
        out = self.model(input_ids=ids, attention_mask=mask).logits
        return image_logits(out, prefix.shape[1], n, offset=OFFSET, codebook_size=CODEBOOK_SIZE)

    def logits(self, prompts: Sequence[str], codes: Tensor, cfg_scale: float = CFG_SCALE) -> Tensor:
        """(B, N, K) code logits of `codes` given `prompts`, CFG-mixed (fp32); cfg_scale 1 is conditional only."""
        prefix, mask = encode_prompts(prompts)
        cond = self.sequence_logits(prefix, mask, codes)
        if cfg_scale == 1.0:
            return cond.float()
        uncond = self.sequence_logits(*null_prefix(len(prompts)), codes)
        # z = z_u + s (z_c - z_u)
        return cfg_logits(cond, uncond, cfg_scale)

    def log_probs(self, prompts: Sequence[str], codes: Tensor, cfg_scale: float = CFG_SCALE,
                  temperature: float = TEMPERATURE) -> Tensor:
        """Per-token log pi(y_j | c, y_<j) = log softmax(z_j / T)[y_j] (B, N), z the CFG-mixed code logits."""
        return code_log_probs(self.logits(prompts, codes, cfg_scale), codes, temperature)

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: torch.Generator | None = None,
               cfg_scale: float = CFG_SCALE, temperature: float = TEMPERATURE, *, decode: bool = True,
               return_log_probs: bool = False) -> tuple[Tensor, ...]:
        """Sample codes (B, N) in raster order and decode them: returns (codes, images) or, with
        return_log_probs, (codes, images, log_probs (B, N)); images is None when decode=False.

        Rows [cond; uncond] read [prefix, y_1 .. y_{j-1}] (the prefix once, then one new token per step with
        the key/value cache); the last row of each is sliced to the codes, mixed z = z_u + s (z_c - z_u),
        and y_j ~ softmax(z / T). The cache changes float rounding only: a teacher-forced `log_probs`
        reproduces the sampling log-probs to within 1e-4 (CFG 4 amplifies the logits' rounding). PPO-style
        ratios should take the old log-probs from `log_probs` too, as trl does, so that the first ratio is
        exactly 1.
        """
        b = len(prompts)
        prefix, mask = encode_prompts(prompts)
        if cfg_scale != 1.0:
            u_ids, u_mask = null_prefix(b)
            prefix, mask = torch.cat([prefix, u_ids]), torch.cat([mask, u_mask])
        new, cache = prefix, None
        codes = torch.zeros(b, 0, dtype=torch.long)
        logps = []
        for _ in range(NUM_TOKENS):
            out = self.model(input_ids=new, attention_mask=mask, use_cache=True, **{_CACHE_ARG: cache})
            cache = getattr(out, _CACHE_ARG)
            last = out.logits[:, -1, OFFSET: OFFSET + CODEBOOK_SIZE]
            z = cfg_logits(last[:b], last[b:], cfg_scale) if cfg_scale != 1.0 else last.float()
            y, logp = sample_codes(z, temperature, generator)
            codes = torch.cat([codes, y[:, None]], 1)
            logps.append(logp)
            new = (y + OFFSET)[:, None].repeat(prefix.shape[0] // b, 1)  # the same token for cond and uncond
            mask = torch.cat([mask, torch.ones_like(new)], 1)
        images = self.vq.decode(codes) if decode else None
        if return_log_probs:
            return codes, images, torch.stack(logps, 1)
        return codes, images


def build_masked_model(config: dict | None = None, seed: int = 0) -> BertForMaskedLM:
    """A randomly initialised (seeded) tiny BERT (bidirectional attention)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(BertConfig(**dict(MASKED_CONFIG if config is None else config)))
    return model


def unmasked_after(step: int, num_steps: int, num_tokens: int = NUM_TOKENS) -> int:
    """Tokens still masked after decoding step `step` (0-based) of `num_steps`: the cosine schedule
    n_t = floor(N cos(pi/2 (t + 1) / T)) (MaskGIT, Chang et al. 2022; Show-o), 0 after the last step."""
    return int(math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_steps)))


class MaskedAR(torch.nn.Module):
    """A masked-token parallel decoder (MaskGIT / Show-o) over [BOS, prompt, IMG_START, 64 codes]."""

    def __init__(self, model: BertForMaskedLM, vq: ToyVQ | None = None):
        super().__init__()
        self.model = model
        self.vq = vq if vq is not None else load_toy_vq()

    def masked_logits(self, prefix: Tensor, prefix_mask: Tensor, image_ids: Tensor) -> Tensor:
        """(B, N, K) code logits at the image positions (no shift: row j predicts y_j) of
        [prefix, image_ids], image_ids being codes + OFFSET or MASK."""
        ids = torch.cat([prefix, image_ids], 1)
        mask = torch.cat([prefix_mask, torch.ones_like(image_ids)], 1)
        out = self.model(input_ids=ids, attention_mask=mask).logits
        return out[:, prefix.shape[1]:, OFFSET: OFFSET + CODEBOOK_SIZE]

    def logits(self, prompts: Sequence[str], image_ids: Tensor, cfg_scale: float = MASKED_CFG_SCALE) -> Tensor:
        """CFG-mixed code logits (fp32), Show-o form z = (1 + s) z_c - s z_u (s = 0: conditional only)."""
        prefix, mask = encode_prompts(prompts)
        cond = self.masked_logits(prefix, mask, image_ids)
        if cfg_scale == 0.0:
            return cond.float()
        uncond = self.masked_logits(*null_prefix(len(prompts)), image_ids)
        # z = (1 + s) z_c - s z_u
        return cfg_logits(cond, uncond, cfg_scale, form="showo")

    def log_probs(self, prompts: Sequence[str], codes: Tensor, mask: Tensor, cfg_scale: float = MASKED_CFG_SCALE,
                  temperature: float = TEMPERATURE) -> Tensor:
        """One-sample log-prob estimate (B,): sum over masked j of log softmax(z_j / T)[y_j], the model fed
        `codes` with `mask` (True = masked) replaced by MASK (Show-o / UniGen DPO, notes/ar.md 1.2)."""
        z = self.logits(prompts, mask_tokens(codes + OFFSET, mask, MASK), cfg_scale)
        return masked_token_log_prob(z, codes, mask, temperature)

    @torch.no_grad()
    def decode_step(self, prompts: Sequence[str], ids: Tensor, step: int | Sequence[int],
                    generator: torch.Generator | Sequence[torch.Generator] | None = None,
                    cfg_scale: float = MASKED_CFG_SCALE, temperature: float = TEMPERATURE, *,
                    num_steps: int = MASKED_STEPS, noise: float = MASKED_NOISE) -> tuple[Tensor, Tensor]:
        """One MaskGIT step on ids (B, N) (codes + OFFSET, or MASK), each row at its decoding step `step`
        (one int, or one per row: paths at different depths). Returns (pred, next_ids):

        - pred (B, N) codes: every masked position sampled from softmax(z / T), the image a verifier
          sees in the middle of decoding (PARM's intermediate image);
        - next_ids: pred with the n_t least confident new tokens masked again, n_t = floor(N cos(pi/2
          (t + 1) / T)); confidence = log p(y) + Gumbel noise scaled by noise (1 - (t + 1) / T).

        generator: one for the whole batch, or one per row, so that a row's draws do not depend on
        which other rows are decoded with it (paths stopped early leave the others unchanged).
        """
        b = len(prompts)
        steps = [step] * b if isinstance(step, int) else list(step)
        if ids.shape != (b, NUM_TOKENS) or len(steps) != b:
            raise ValueError(f"ids, step: expected ({b}, {NUM_TOKENS}) ids and {b} steps, got "
                             f"{tuple(ids.shape)} and {len(steps)}")
        masked = ids == MASK
        z = self.logits(prompts, ids, cfg_scale)
        if isinstance(generator, (list, tuple)):
            draws = [sample_codes(z[i], temperature, g) + (torch.rand(NUM_TOKENS, generator=g),)
                     for i, g in enumerate(generator)]
            y, logp, u = (torch.stack(d) for d in zip(*draws))
        else:
            y, logp = sample_codes(z.reshape(-1, CODEBOOK_SIZE), temperature, generator)
            y, logp = y.view(b, NUM_TOKENS), logp.view(b, NUM_TOKENS)
            u = torch.rand(b, NUM_TOKENS, generator=generator)
        u = u.clamp(1e-20, 1 - 1e-7)
        anneal = torch.tensor([noise * (1 - (t + 1) / num_steps) for t in steps]).view(b, 1)
        # confidence = log p(y) + annealed Gumbel noise; tokens decoded earlier are never re-masked
        confidence = logp + anneal * -torch.log(-torch.log(u))
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))
        pred = torch.where(masked, y + OFFSET, ids)
        next_ids = pred.clone()
        for i, t in enumerate(steps):
            # n_t stay masked (cosine schedule), and at least one new token is kept
            n = min(unmasked_after(t, num_steps), int(masked[i].sum()) - 1)
            if n > 0:
                next_ids[i, confidence[i].argsort()[:n]] = MASK
        return pred - OFFSET, next_ids

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: torch.Generator | None = None,
               cfg_scale: float = MASKED_CFG_SCALE, temperature: float = TEMPERATURE, *,
               num_steps: int = MASKED_STEPS, noise: float = MASKED_NOISE, decode: bool = True) -> tuple[Tensor, ...]:
        """MaskGIT decoding: start all-masked and run `decode_step` for t = 0 .. T - 1. Returns (codes, images)."""
        if num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
        ids = torch.full((len(prompts), NUM_TOKENS), MASK, dtype=torch.long)
        for t in range(num_steps):
            _, ids = self.decode_step(prompts, ids, t, generator, cfg_scale, temperature, num_steps=num_steps,
                                      noise=noise)
        codes = ids - OFFSET
        return codes, (self.vq.decode(codes) if decode else None)


# ---- save / load --------------------------------------------------------------------------------
def save_ar_weights(model: RasterAR | MaskedAR, path: str | Path) -> None:
    """The transformer's weights (BERT's tied embedding / decoder tensors are stored once)."""
    save_model(model.model, str(path))


def ar_card(kind: str = "raster") -> dict:
    """The JSON card shipped next to a base's weights."""
    return json.loads((BASES_DIR / f"{kind}.json").read_text())


def load_ar_base(kind: str = "raster", path: str | Path | None = None) -> RasterAR | MaskedAR:
    """The shipped AR base `kind` (or weights saved by `save_ar_weights`, card beside them), in eval mode."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    path = Path(path) if path is not None else BASES_DIR / f"{kind}.safetensors"
    if not path.is_file():
        raise ValueError(f"path: no {kind} weights at {path}; train them with "
                         f"`python -m common.ar.train_bases --kind {kind}`")
    config = json.loads(path.with_suffix(".json").read_text())["config"]
    model = build_raster_model(config) if kind == "raster" else build_masked_model(config)
    load_model(model, str(path), strict=True)
    wrapper = RasterAR if kind == "raster" else MaskedAR
    return wrapper(model.eval().requires_grad_(False))
