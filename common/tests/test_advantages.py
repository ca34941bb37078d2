"""Checks of common.advantages against hand-computed statistics (numpy where the official code uses it)."""

import numpy as np
import pytest
import torch

from common.advantages import PerPromptStatTracker, clip_advantages, group_advantages


def test_group_advantages_match_dancegrpo_formula_and_have_unit_group_std():
    torch.manual_seed(0)
    r = torch.randn(12) * 3 + 1
    a = group_advantages(r, 4)
    for k in range(3):
        block = r[4 * k:4 * k + 4]
        want = (block - block.mean()) / (block.std() + 1e-8)  # torch .std() is ddof=1
        torch.testing.assert_close(a[4 * k:4 * k + 4], want)
        torch.testing.assert_close(a[4 * k:4 * k + 4].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(a[4 * k:4 * k + 4].std(), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_group_advantages_global_std_none_and_ddof():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    means = torch.tensor([2.0, 2.0, 2.0, 20.0, 20.0, 20.0])
    torch.testing.assert_close(group_advantages(r, 3, std="none"), r - means)
    torch.testing.assert_close(group_advantages(r, 3, std="global", eps=1e-4),
                               (r - means) / (r.std() + 1e-4))
    a0 = group_advantages(r, 3, ddof=0)
    torch.testing.assert_close(a0[:3], torch.from_numpy((np.array([1, 2, 3]) - 2) / (np.std([1, 2, 3]) + 1e-8)).float())


def test_group_advantages_columns_are_independent():
    r = torch.tensor([[1.0, 5.0], [3.0, 5.0], [0.0, 1.0], [4.0, 2.0]])
    a = group_advantages(r, 2)
    torch.testing.assert_close(a[:, 0], group_advantages(r[:, 0], 2))
    torch.testing.assert_close(a[:, 1], group_advantages(r[:, 1], 2))
    assert torch.equal(a[:2, 1], torch.zeros(2))


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_equal_rewards_give_exact_zeros_in_group_advantages(std):
    # six float32 copies of 0.3 do not average to exactly 0.3: the naive formula leaves a residue
    const = torch.full((6,), 0.3)
    assert const.mean() != const[0]
    r = torch.cat([const, torch.tensor([0.7, 0.2, 0.9, 0.1, 0.4, 0.5]), const])
    a = group_advantages(r, 6, std=std)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:6], torch.zeros(6)) and torch.equal(a[12:], torch.zeros(6))
    assert a[6:12].abs().sum() > 0
    assert torch.equal(group_advantages(torch.cat([const, const]), 6, std=std), torch.zeros(12))


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="ddof"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(4), 2, std="batch")


def test_clip_advantages():
    a = torch.tensor([-9.0, -1.0, 0.0, 4.0, 7.5])
    assert torch.equal(clip_advantages(a), torch.tensor([-5.0, -1.0, 0.0, 4.0, 5.0]))
    assert torch.equal(clip_advantages(a, max=1.0), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))


def _ddpo_reference(batches, buffer_size, min_count):
    """DDPO's tracker, written out with numpy and plain lists."""
    buffers, out = {}, []
    for prompts, rewards in batches:
        prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
        adv = np.empty_like(rewards)
        for p in np.unique(prompts):
            buf = buffers.setdefault(p, [])
            buf.extend(rewards[prompts == p])
            del buf[:-buffer_size]
            src = rewards if len(buf) < min_count else np.array(buf)
            adv[prompts == p] = (rewards[prompts == p] - src.mean()) / (src.std() + 1e-6)
        out.append(adv)
    return out


def test_ddpo_tracker_falls_back_to_batch_stats_then_uses_its_persistent_buffer():
    rng = np.random.default_rng(0)
    prompts = ["cat", "dog", "cat", "dog", "cat", "dog"]
    batches = [(prompts, rng.normal(size=6) + np.array([0, 5] * 3)) for _ in range(5)]
    tracker = PerPromptStatTracker("ddpo", buffer_size=4, min_count=4)
    want = _ddpo_reference(batches, buffer_size=4, min_count=4)
    for (p, r), w in zip(batches, want):
        got = tracker.update(p, torch.tensor(r))
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-5, atol=1e-6)
    assert tracker.get_stats()["cat"]["count"] == 4
    # first call: 3 rewards per prompt < min_count, so both prompts are normalised by the batch
    first = PerPromptStatTracker("ddpo", buffer_size=4, min_count=4).update(prompts, torch.tensor(batches[0][1]))
    r0 = batches[0][1]
    np.testing.assert_allclose(first.numpy(), (r0 - r0.mean()) / (r0.std() + 1e-6), rtol=1e-5)


def test_flow_grpo_tracker_uses_the_epoch_mean_and_global_std_and_clears():
    tracker = PerPromptStatTracker("flow_grpo", global_std=True)
    prompts = ["a", "b", "a", "b"]
    r1 = np.array([1.0, 10.0, 3.0, 30.0])
    got = tracker.update(prompts, torch.tensor(r1))
    want = np.empty(4)
    want[[0, 2]] = (r1[[0, 2]] - 2.0) / (r1.std() + 1e-4)
    want[[1, 3]] = (r1[[1, 3]] - 20.0) / (r1.std() + 1e-4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # a second call in the same epoch: prompt means include the first call's rewards
    r2 = np.array([5.0, 20.0, 7.0, 40.0])
    got2 = tracker.update(prompts, torch.tensor(r2))
    np.testing.assert_allclose(got2[0].item(), (5.0 - 4.0) / (r2.std() + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(got2[1].item(), (20.0 - 25.0) / (r2.std() + 1e-4), rtol=1e-6)
    tracker.clear()
    assert tracker.stats == {}
    np.testing.assert_allclose(tracker.update(prompts, torch.tensor(r2))[0].item(),
                               (5.0 - 6.0) / (r2.std() + 1e-4), rtol=1e-6)


def test_flow_grpo_tracker_per_prompt_std_and_columns():
    tracker = PerPromptStatTracker("flow_grpo")
    r = torch.tensor([[1.0, 2.0], [3.0, 2.0], [0.0, 9.0], [4.0, 1.0]], dtype=torch.float64)
    a = tracker.update(["x", "x", "y", "y"], r)
    assert a.dtype == torch.float32 and a.shape == (4, 2)
    col = r[:2, 0].numpy()
    np.testing.assert_allclose(a[:2, 0].numpy(), (col - col.mean()) / (col.std() + 1e-4), rtol=1e-6)
    assert torch.equal(a[:2, 1], torch.zeros(2))


@pytest.mark.parametrize("mode,kwargs", [("ddpo", {}), ("ddpo", {"min_count": 2}), ("flow_grpo", {}),
                                         ("flow_grpo", {"global_std": True})])
def test_tracker_equal_rewards_give_exact_zeros(mode, kwargs):
    # three float64 copies of 0.7 do not average to exactly 0.7
    const = torch.full((3,), 0.7, dtype=torch.float64)
    assert const.mean() != const[0]
    tracker = PerPromptStatTracker(mode, **kwargs)
    for _ in range(3):  # in DDPO mode the buffer fills up and takes over from the batch
        a = tracker.update(["p", "p", "p"], const)
        assert torch.equal(a, torch.zeros(3))
    if mode == "flow_grpo":
        mixed = tracker.update(["p", "p", "q", "q"], torch.tensor([0.7, 0.7, 0.3, 0.9], dtype=torch.float64))
        assert torch.isfinite(mixed).all() and torch.equal(mixed[:2], torch.zeros(2)) and mixed[2:].abs().sum() > 0


def test_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        PerPromptStatTracker("grpo")
    with pytest.raises(ValueError, match="rewards"):
        PerPromptStatTracker().update(["a", "b"], torch.zeros(3))
    with pytest.raises(ValueError, match="rewards"):
        PerPromptStatTracker("ddpo").update(["a"], torch.zeros(1, 2))
