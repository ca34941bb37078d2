"""Tier-1 checks of common.ar.tokens: token log-probs and their off-by-one, CFG forms, masks, the clipped
token surrogate, KL estimators (values and gradient directions) and sequence / masked DPO."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.ar import tokens as T

# vocabulary of the toy layout: BOS 0, prompt ids 1..4, IMG_START 5, then K image codes at OFF
BOS, IMG_START, OFF, K = 0, 5, 6, 8
VOCAB = OFF + K
N = 6  # image tokens


class CausalToy(nn.Module):
    """A causal LM in miniature: position t sees tokens 0..t only (running mean of embeddings)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(VOCAB, 16, generator=g))
        self.pos = nn.Parameter(torch.randn(32, 16, generator=g))
        self.head = nn.Parameter(torch.randn(16, VOCAB, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb[ids]
        steps = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32)[None, :, None]
        h = torch.tanh(e.cumsum(1) / steps + self.pos[: ids.shape[1]])
        return 3 * h @ self.head  # (B, S, V)


def _prefix(batch: int, g: torch.Generator) -> torch.Tensor:
    prompt = torch.randint(1, 5, (batch, 2), generator=g)
    return torch.cat([torch.full((batch, 1), BOS), prompt, torch.full((batch, 1), IMG_START)], 1)


@torch.no_grad()
def _sample(model: CausalToy, prefix: torch.Tensor, temperature: float, g: torch.Generator):
    """Token-by-token AR sampling on the image slice; returns codes (B, N) and sampling log-probs."""
    ids, codes, logps = prefix, [], []
    for _ in range(N):
        last = model(ids)[:, -1, OFF: OFF + K]
        c, lp = T.sample_codes(last, temperature, g)
        codes.append(c)
        logps.append(lp)
        ids = torch.cat([ids, (c + OFF)[:, None]], 1)
    return torch.stack(codes, 1), torch.stack(logps, 1)


def _off_by_one_log_probs(logits, codes, prefix_len, temperature):
    """The classic bug: starting at the first image token's row instead of IMG_START's."""
    rows = logits[:, prefix_len: prefix_len + codes.shape[1], OFF: OFF + K]
    return torch.log_softmax(rows.float() / temperature, -1).gather(-1, codes[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_log_prob_equals_sampling_and_off_by_one_fails(temperature):
    g = torch.Generator().manual_seed(0)
    model = CausalToy()
    prefix = _prefix(5, g)
    codes, sampled = _sample(model, prefix, temperature, g)
    full = torch.cat([prefix, codes + OFF], 1)
    with torch.no_grad():
        logits = model(full)
    recomputed = T.token_log_probs(logits, codes, prefix.shape[1], offset=OFF, codebook_size=K,
                                   temperature=temperature)
    torch.testing.assert_close(recomputed, sampled, rtol=0, atol=1e-6)
    torch.testing.assert_close(T.sequence_log_prob(recomputed), sampled.sum(1))
    # the same check rejects a shifted slice, a missing temperature and a full-vocabulary softmax
    shifted = _off_by_one_log_probs(logits, codes, prefix.shape[1], temperature)
    assert (shifted - sampled).abs().max() > 0.1
    if temperature != 1.0:
        no_t = T.token_log_probs(logits, codes, prefix.shape[1], offset=OFF, codebook_size=K)
        assert (no_t - sampled).abs().max() > 0.01
    full_vocab = torch.log_softmax(logits[:, 3: 3 + N] / temperature, -1).gather(-1, (codes + OFF)[..., None])
    assert (full_vocab.squeeze(-1) - sampled).abs().max() > 0.01


def test_image_logits_validates_layout():
    logits = torch.randn(2, 9, VOCAB)
    assert T.image_logits(logits, 4, N, offset=OFF).shape == (2, N, K)  # codebook = rest of vocabulary
    with pytest.raises(ValueError, match="positions"):
        T.image_logits(logits, 5, N, offset=OFF)
    with pytest.raises(ValueError, match="offset"):
        T.image_logits(logits, 4, N, offset=OFF, codebook_size=K + 1)
    with pytest.raises(ValueError, match="codes"):
        T.token_log_probs(logits, torch.full((2, N), K), 4, offset=OFF)  # vocabulary ids, not codes


def test_cfg_forms_agree_with_shifted_scale():
    zc, zu = torch.randn(3, N, K), torch.randn(3, N, K)
    for s in (0.0, 1.75, 4.0):
        torch.testing.assert_close(T.cfg_logits(zc, zu, s, "showo"), T.cfg_logits(zc, zu, 1 + s, "standard"))
    torch.testing.assert_close(T.cfg_logits(zc, zu, 1.0), zc)  # standard s = 1: no guidance
    torch.testing.assert_close(T.cfg_logits(zc, zu, 0.0, "showo"), zc)
    with pytest.raises(ValueError, match="form"):
        T.cfg_logits(zc, zu, 2.0, "janus")


def test_masks():
    ids = torch.tensor([[7, 7, 2, 9, 2], [7, 7, 7, 7, 7], [2, 1, 1, 1, 1]])
    assert T.completion_mask(ids, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
    g = torch.Generator().manual_seed(0)
    m = T.random_token_mask(200, 16, g)
    counts = m.sum(1)
    assert m.dtype == torch.bool and counts.min() >= 1 and counts.max() <= 16
    # E[cos(pi u / 2)] = 2 / pi of the tokens are masked on average
    assert abs(counts.float().mean().item() / 16 - 2 / math.pi) < 0.06
    assert (T.random_token_mask(4, 10, g, ratio=0.5).sum(1) == 5).all()
    w, lo = T.pair_masks(6, 16, g)
    assert torch.equal(w, lo)
    w, lo = T.pair_masks(6, 16, g, shared=False)
    assert not torch.equal(w, lo)
    codes = torch.arange(16).reshape(1, 16)
    masked = T.mask_tokens(codes, w[:1], mask_id=99)
    assert torch.equal(masked == 99, w[:1]) and torch.equal(masked[~w[:1]], codes[~w[:1]])


def test_token_advantages_broadcast_and_zero_for_equal_rewards():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    a = T.token_advantages(r, group_size=4, num_tokens=N)
    assert a.shape == (8, N) and torch.equal(a[:, 0:1].expand(-1, N), a)
    g0 = r[:4]
    torch.testing.assert_close(a[:4, 0], (g0 - g0.mean()) / (g0.std() + 1e-4))
    assert (a[4:] == 0).all()
    torch.testing.assert_close(T.token_advantages(r, 4, 1, scale_by_std=False)[:4, 0], g0 - g0.mean())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_first_inner_step_ratio_is_one(loss_type):
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(6, N, generator=g).requires_grad_()
    adv = torch.randn(6, generator=g)
    loss, info = T.token_policy_loss(logp, logp.detach().clone(), adv, loss_type=loss_type)
    torch.testing.assert_close(loss, -adv.mean())
    assert info["clipfrac"] == 0 and info["ratio"] == 1 and info["approx_kl"] == 0
    loss.backward()  # d loss / d l_it = -A_i / (B N) for every normalisation when all tokens are active
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(-1, N) / (6 * N))


def test_normalisations_differ_only_with_a_mask():
    old = torch.zeros(2, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.0], [1.1, 1.0, 1.0, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # per-token min(rho A, clip(rho) A): row 0: 1.2, 0.5 (masked 1, 1); row 1: -1.1, -1, -1, -1
    grpo, info = T.token_policy_loss(logp, old, adv, mask, loss_type="grpo")
    dapo, _ = T.token_policy_loss(logp, old, adv, mask, loss_type="dapo")
    dr, _ = T.token_policy_loss(logp, old, adv, mask, loss_type="dr_grpo")
    torch.testing.assert_close(grpo, torch.tensor(-((1.2 + 0.5) / 2 + (-4.1) / 4) / 2))
    torch.testing.assert_close(dapo, torch.tensor(-(1.7 - 4.1) / 6))
    torch.testing.assert_close(dr, torch.tensor(-(1.7 - 4.1) / 8))
    assert info["clipfrac"] == pytest.approx(1 / 6)  # only rho = 1.5 with A > 0 is clipped
    kl = torch.ones(2, 4)
    with_kl, _ = T.token_policy_loss(logp, old, adv, mask, loss_type="dapo", kl=kl, beta=0.1)
    torch.testing.assert_close(with_kl, dapo + 0.1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_zero_at_reference(estimator):
    logp = torch.randn(4, N)
    assert (T.token_kl(logp, logp.clone(), estimator) == 0).all()


def test_kl_estimator_values_and_gradient_directions():
    """Exact expectations over a categorical pi = softmax(theta) (samples held fixed for gradients):
    E[k1] = E[k3] = KL(pi || ref); grad E[k1] = 0, grad E[k2] = grad KL(pi || ref),
    grad E[k3] = grad KL(ref || pi)."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    weights = logp.exp().detach()  # the sampling distribution, not differentiated

    def expected_grad(est):
        value = (weights * T.token_kl(logp, ref, est).double()).sum()
        return value, torch.autograd.grad(value, theta, retain_graph=True)[0]

    reverse = (logp.exp() * (logp - ref)).sum()
    forward = (ref.exp() * (ref - logp)).sum()
    g_reverse = torch.autograd.grad(reverse, theta, retain_graph=True)[0]
    g_forward = torch.autograd.grad(forward, theta, retain_graph=True)[0]
    v1, g1 = expected_grad("k1")
    v2, g2 = expected_grad("k2")
    v3, g3 = expected_grad("k3")
    torch.testing.assert_close(v1, reverse.detach())
    torch.testing.assert_close(v3, reverse.detach())
    assert (T.token_kl(logp, ref, "k3") >= 0).all()
    torch.testing.assert_close(g1, torch.zeros_like(g1), atol=1e-12, rtol=0)  # float64 sums cancel to ~1e-16
    torch.testing.assert_close(g2, g_reverse)
    torch.testing.assert_close(g3, g_forward)
    assert (g3 - g_reverse).abs().max() > 1e-3  # k3's gradient is NOT the reverse KL's


def test_masked_dpo_is_ln2_at_reference_and_learns_the_pair():
    g = torch.Generator().manual_seed(4)
    codes_w, codes_l = torch.randint(K, (5, N), generator=g), torch.randint(K, (5, N), generator=g)
    mask_w, mask_l = T.pair_masks(5, N, g)
    logits = torch.randn(10, N, K, generator=g, requires_grad=True)
    lw = T.masked_token_log_prob(logits[:5], codes_w, mask_w)
    ll = T.masked_token_log_prob(logits[5:], codes_l, mask_l)
    loss, info = T.sequence_dpo_loss(lw, ll, lw.detach(), ll.detach(), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert info["accuracy"] == 0 and info["margin"] == 0
    loss.backward()
    # the gradient raises the winner's masked tokens, lowers the loser's, and leaves unmasked ones alone
    gw = logits.grad[:5].gather(-1, codes_w[..., None]).squeeze(-1)
    gl = logits.grad[5:].gather(-1, codes_l[..., None]).squeeze(-1)
    assert (gw[mask_w] < 0).all() and (gl[mask_l] > 0).all()
    assert (logits.grad[:5][~mask_w] == 0).all()
    # ln 2 also for sequence (AR) log-probs, and the hand formula off the reference
    s = torch.randn(4, generator=g)
    torch.testing.assert_close(T.sequence_dpo_loss(s, s + 1, s, s + 1)[0], torch.tensor(math.log(2)))
    loss, info = T.sequence_dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), 0.5)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.tensor(0.5)))
    assert info["accuracy"] == 1


def test_bad_inputs_name_the_field():
    x = torch.zeros(2, N)
    with pytest.raises(ValueError, match="loss_type"):
        T.token_policy_loss(x, x, torch.zeros(2), loss_type="ppo")
    with pytest.raises(ValueError, match="estimator"):
        T.token_kl(x, x, "k4")
    with pytest.raises(ValueError, match="temperature"):
        T.sample_codes(torch.zeros(2, K), temperature=0)
    with pytest.raises(ValueError, match="group_size"):
        T.token_advantages(torch.zeros(6), group_size=4, num_tokens=N)
