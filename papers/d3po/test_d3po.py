"""D3PO evidence in three tiers: exact identities, one update on each tiny real pipeline, the claim on the
toy world. `pytest papers/d3po -q`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from common.config import run_main
from common.models.load import load_adapter
from common.rollout import step_log_prob
from papers.d3po.d3po import (
    TIE,
    Config,
    FileOracle,
    RewardOracle,
    d3po_loss,
    d3po_step,
    main,
    preference_signs,
    sample_pairs,
    train,
    train_on_pairs,
)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    adapter = load_adapter("tiny-sd")
    adapter.add_lora(4, 4)
    return adapter


def _config(**kw) -> Config:
    return dataclasses.replace(Config(), **{"num_steps": 4, "guidance_scale": 5.0, **kw})


# ------------------------------------------------------------------ tier 1: exact identities
def test_loss_formula_and_clipping():
    lp = torch.tensor([[0.02, -0.01], [0.5, 0.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.zeros(3, 2)
    signs = preference_signs(torch.tensor([0, 1, TIE]))
    assert signs.tolist() == [[1, -1], [-1, 1], [0, 0]]
    loss, info = d3po_loss(lp, ref, signs, beta=0.1, eps=0.1)
    # pair 0 inside the clip range; pair 1: exp(0.5) > 1.1 is clipped to 1.1; pair 2 is a tie (logit 0)
    logits = torch.tensor([0.1 * (0.02 + 0.01), 0.1 * (-math.log(1.1)), 0.0])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(logits).mean())
    assert info["clipfrac"].item() == pytest.approx(1 / 6)
    loss.backward()
    # d loss / d logp = -beta h sigmoid(-logit) / B inside the range; exactly 0 once clipped or tied
    torch.testing.assert_close(lp.grad[0], -0.1 * torch.tensor([1.0, -1.0]) * torch.sigmoid(-logits[0]) / 3)
    torch.testing.assert_close(lp.grad[1, 1], -0.1 * torch.sigmoid(-logits[1]) / 3)
    assert lp.grad[1, 0] == 0 and (lp.grad[2] == 0).all()


def test_swapping_the_images_and_the_choice_gives_the_same_loss():
    g = torch.Generator().manual_seed(0)
    lp, ref = 0.03 * torch.randn(5, 2, generator=g), 0.03 * torch.randn(5, 2, generator=g)
    choices = torch.tensor([0, 1, 1, 0, 0])
    a = d3po_loss(lp, ref, preference_signs(choices), 0.1, 0.1)[0]
    b = d3po_loss(lp.flip(1), ref.flip(1), preference_signs(1 - choices), 0.1, 0.1)[0]
    torch.testing.assert_close(a, b)


def test_pairs_share_x_T_and_the_loss_starts_at_ln2(tiny):
    config = _config()
    traj = sample_pairs(config, tiny, PROMPTS, torch.Generator().manual_seed(0))
    x_T = traj.latents[:, 0]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    assert not torch.equal(traj.latents[0, -1], traj.latents[1, -1])  # eta = 1: the trajectories branch
    independent = sample_pairs(dataclasses.replace(config, share_noise=False), tiny, PROMPTS,
                               torch.Generator().manual_seed(0))
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])
    # the policy starts as the reference: recomputed log-probs equal the rollout's and the loss is ln 2
    rows, i = torch.arange(4), torch.tensor([1, 1, 1, 1])
    new = step_log_prob(tiny, traj, i, d3po_step, index=rows).log_prob
    with torch.no_grad(), tiny.disable_adapter():
        ref = step_log_prob(tiny, traj, i, d3po_step, index=rows).log_prob
    torch.testing.assert_close(new, traj.log_probs[rows, 1], rtol=0, atol=1e-6)
    loss, info = d3po_loss(new.view(2, 2), ref.view(2, 2), preference_signs(torch.tensor([0, 1])), 0.1, 0.1)
    assert abs(loss.item() - math.log(2)) < 1e-7 and info["clipfrac"] == 0


def test_oracles(tmp_path):
    reward = lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {})  # noqa: E731  brightness
    bright, dark = torch.full((3, 3, 4, 4), 0.8), torch.full((3, 3, 4, 4), 0.2)
    first, second = torch.stack([bright[0], dark[1], dark[2]]), torch.stack([dark[0], bright[1], dark[2]])
    choices = RewardOracle(reward)(["a", "b", "c"], first, second, ["p"] * 3, None)
    assert choices.tolist() == [0, 1, TIE]
    path = tmp_path / "choices.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"pair_id": "a", "choice": 0}, {"pair_id": "b", "choice": 1},
                                                       {"pair_id": "c", "choice": "tie"}]) + "\n")
    assert FileOracle(path)(["c", "a", "b"], first, second, ["p"] * 3, None).tolist() == [TIE, 0, 1]
    with pytest.raises(ValueError, match=r"no choice for pair 'zz'"):
        FileOracle(path)(["a", "zz"], first[:2], second[:2], ["p"] * 2, None)
    path.write_text(json.dumps({"pair_id": "a", "choice": 2}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 needs a pair_id and a choice of 0, 1 or \"tie\""):
        FileOracle(path)


def test_help_and_bad_values_stop_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text
    for argv, field in ([["--model", "toy-flow"], "model"], [["--eta", "0"], "eta"],
                        [["--pairs-per-round", "10"], "pairs_per_round"], [["--choices", "/no/file"], "choices"]):
        with pytest.raises(SystemExit) as bad:
            run_main(main, argv)
        err = capsys.readouterr().err.strip()
        assert bad.value.code == 2 and err.startswith(f"error: {field}:") and "\n" not in err


# ------------------------------------------------------------------ tier 2: tiny real pipelines
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_one_update_on_tiny_pipelines(model):
    torch.manual_seed(0)
    adapter = load_adapter(model)
    adapter.add_lora(4, 4)
    config = _config(train_batch_size=2, num_steps=3)
    traj = sample_pairs(config, adapter, PROMPTS, torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in adapter.trainable_parameters()]
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    grads = {}

    def keep_grads(params):  # called right before the optimizer step
        grads.update({i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None})

    stats = train_on_pairs(config, adapter, traj, preference_signs(torch.tensor([0, 1])), optimizer,
                           torch.Generator().manual_seed(0), reduce=keep_grads)
    assert math.isfinite(stats["loss"]) and abs(stats["loss"] - math.log(2)) < 1e-3
    assert grads and all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0
                                                                                  for g in grads.values())
    names = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any((p != q).any() for p, q in zip(adapter.trainable_parameters(), before))


def test_tied_pairs_still_step_and_a_non_finite_gradient_is_skipped_loudly(tiny):
    config = _config(train_batch_size=2, num_steps=2)
    traj = sample_pairs(config, tiny, PROMPTS, torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(tiny.trainable_parameters(), lr=1e-3)
    tied = preference_signs(torch.tensor([TIE, TIE]))
    stats = train_on_pairs(config, tiny, traj, tied, optimizer, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 1 and stats["skipped_steps"] == 0 and stats["loss"] == pytest.approx(math.log(2))
    before = [p.detach().clone() for p in tiny.trainable_parameters()]

    def poison(params):  # a NaN gradient, as an fp16/bf16 overflow would give
        next(p for p in params if p.grad is not None).grad.fill_(float("nan"))

    with pytest.warns(RuntimeWarning, match="round 7: gradient norm nan is not finite; optimizer step skipped"):
        stats = train_on_pairs(config, tiny, traj, preference_signs(torch.tensor([0, 1])), optimizer,
                               torch.Generator().manual_seed(0), reduce=poison, where="round 7")
    assert stats["optimizer_steps"] == 0 and stats["skipped_steps"] == 1
    assert all(torch.equal(p, q) for p, q in zip(tiny.trainable_parameters(), before))
    assert all(p.grad is None or not p.grad.isnan().any() for p in tiny.trainable_parameters())


def test_a_persons_choices_file_drives_training(tmp_path):
    # pair ids are "round<r>-rank<k>-pair<i>" and the seeded sampler is deterministic, so a person can label
    # the PNGs a --save-pairs run wrote and rerun with the same seed and --choices
    choices = tmp_path / "choices.jsonl"
    choices.write_text('{"pair_id": "round00001-rank0-pair0000", "choice": 1}\n'
                       '{"pair_id": "round00001-rank0-pair0001", "choice": "tie"}\n')
    argv = ["--model", "tiny-sd", "--rounds", "1", "--pairs-per-round", "2", "--train-batch-size", "1",
            "--num-steps", "3", "--eval-prompts", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
            "--save-pairs", "true", "--choices", str(choices)]
    records = main(argv)
    assert records[1]["tie_fraction"] == 0.5 and abs(records[1]["loss"] - math.log(2)) < 1e-3
    assert records[1]["optimizer_steps"] == 2 and records[1]["skipped_steps"] == 0  # the tied pair steps too
    folder = tmp_path / "run" / "pairs" / "round00001"
    listed = [json.loads(s) for s in (folder / "pairs.jsonl").read_text().split("\n") if s]
    assert [r["pair_id"] for r in listed] == ["round00001-rank0-pair0000", "round00001-rank0-pair0001"]
    assert all((folder / r[k]).is_file() for r in listed for k in ("image_0", "image_1"))
    assert (tmp_path / "run" / "reward_curve.png").is_file() and (tmp_path / "run" / "before_after.png").is_file()


# ------------------------------------------------------------------ tier 3: the claim on the toy world
#: toy-unet base, hidden reward JPEG compressibility (one of D3PO's own tasks), 4 rounds of 16 pairs with
#: 4 DDIM steps and no CFG; the high learning rate makes up for the few updates (README "Claim")
CLAIM = dict(model="toy-unet", reward="jpeg_compressibility", rounds=4, pairs_per_round=16, num_steps=4,
             guidance_scale=1.0, learning_rate=1e-2, train_batch_size=4, eval_prompts=48, eval_every=4,
             save_every=4, seed=0, device="cpu", figures=False)


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory):
    return train(Config(out_dir=str(tmp_path_factory.mktemp("claim")), **CLAIM))


def test_claim_reward_rises_from_choices_alone(claim_run):
    base, final = claim_run[0], claim_run[-1]
    # JPEG size falls by >= 2 bytes per 16x16 image and by >= 3 paired standard errors of the evaluation
    gain = final["eval_reward"] - base["eval_reward"]
    assert gain >= max(0.002, 3 * final["eval_gain_se"]), (gain, final)
    # every round took its 16 / 4 optimizer steps, tied pairs or not
    assert [r["optimizer_steps"] for r in claim_run[1:]] == [4] * 4 and not any(r["skipped_steps"] for r in claim_run[1:])
