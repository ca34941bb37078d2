"""PARM / PARM++ tests. Tier 1: exact identities on hand-built inputs and tiny decodes; tier 2: one DPO
update on a randomly initialised tiny BertForMaskedLM with LoRA; tier 3: the claims on the toy world."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from common.ar.models import MASK, NUM_TOKENS, OFFSET, MaskedAR, build_masked_model, load_ar_base
from common.ar.tokens import pair_masks, sequence_dpo_loss
from common.toy.world import sample_scene
from papers.parm.parm import (
    Config,
    Paths,
    ToyJudge,
    compare_selection,
    dpo_pairs,
    guidance_term,
    masked_dpo_loss,
    orm_select,
    parm_select,
    prm_select,
    run_paths,
    start_paths,
)


@pytest.fixture(scope="module")
def base() -> MaskedAR:
    return load_ar_base("masked")


class StubJudge:
    """Scripted answers: clear from step `clear_from` of each row's decode; potential / outcome read from
    metadata; counts every potential question per row id."""

    def __init__(self, clear_from: int = 2):
        self.clear_from, self.calls, self.asked = clear_from, {}, {}

    def p_yes(self, images, prompts, metadata, question):
        out = []
        for m in metadata:
            if question == "clear":
                self.calls[m["id"]] = self.calls.get(m["id"], 0) + 1
                out.append(1.0 if self.calls[m["id"]] > self.clear_from else 0.0)
            elif question == "potential":
                self.asked[m["id"]] = self.asked.get(m["id"], 0) + 1
                out.append(m["potential"])
            else:
                out.append(m["outcome"])
        return torch.tensor(out)


def _paths(n: int, potential: list[bool], p_no: list[float], outcome: list[float], steps: int = 8) -> Paths:
    rows = len(potential)
    meta = [{"id": i, "potential": 0.9, "outcome": outcome[i]} for i in range(rows)]
    p = Paths(["a circle"] * rows, meta, torch.full((rows, NUM_TOKENS), OFFSET), [steps] * rows,
              [torch.Generator().manual_seed(i) for i in range(rows)], [0] * rows, list(potential), list(p_no),
              [[] for _ in range(rows)])
    return p


# ---------------------------------------------------------------------------------------------- tier 1
def test_potential_asked_exactly_once_per_path_at_first_clear_step(base):
    judge, c = StubJudge(clear_from=2), Config(num_steps=4)
    meta = [{"id": i, "potential": [0.9, 0.1, 0.8][i], "outcome": 0.5} for i in range(3)]
    paths = run_paths(base, judge, start_paths(["a circle"] * 3, meta, 1, 0), c, truncate=False)
    assert judge.asked == {0: 1, 1: 1, 2: 1}
    assert paths.clear_step == [2, 2, 2] and paths.potential == [True, False, True]
    assert paths.p_no == pytest.approx([0.1, 0.9, 0.2])
    assert paths.forwards == 12 and judge.calls == {0: 3, 1: 3, 2: 3}  # clarity stops once clear


def test_truncation_stops_non_potential_paths_and_keeps_the_pick(base):
    c = Config(num_steps=4)
    meta = [{"id": i, "potential": [0.9, 0.1, 0.8][i], "outcome": [0.2, 0.9, 0.7][i]} for i in range(3)]
    full = run_paths(base, StubJudge(1), start_paths(["a circle"] * 3, meta, 1, 0), c, truncate=False)
    cut = run_paths(base, StubJudge(1), start_paths(["a circle"] * 3, meta, 1, 0), c, truncate=True)
    assert full.forwards == 12 and cut.forwards == 4 + 4 + 2  # path 1 stops after its clear step 1
    pick_full, pick_cut = parm_select(base, StubJudge(), full, 3, c), parm_select(base, StubJudge(), cut, 3, c)
    assert pick_full == pick_cut == [2]  # potential paths 0, 2: the higher ORM yes-prob (0.7)
    assert torch.equal(full.ids[2], cut.ids[2])  # each path its own generator: truncation changes nothing else


def test_selection_rule_and_fallback(base):
    c = Config()
    p = _paths(4, [False, True, True, False], [0.5, 0.6, 0.7, 0.1], [0.9, 0.3, 0.4, 0.0])
    assert parm_select(base, StubJudge(), p, 4, c) == [2]  # among potential: highest ORM, not the 0.9
    p = _paths(4, [False] * 4, [0.5, 0.3, 0.7, 0.3], [0.9, 0.1, 0.4, 0.0])
    p.step[1] = 3  # truncated: the fallback finishes it
    p.ids[1] = torch.full((NUM_TOKENS,), MASK)
    assert parm_select(base, StubJudge(), p, 4, c) == [1]  # lowest p(no), first on ties (official min)
    assert p.step[1] == c.num_steps and (p.ids[1] != MASK).all()
    assert orm_select(torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.1]), 3).tolist() == [1, 3]
    p.step_yes = [[0.9, 0.1], [0.6, 0.5], [0.2, 0.7], [0.0, 0.0]]
    assert prm_select(p, 4, "mean").item() == 1 and prm_select(p, 4, "min").item() == 1
    assert prm_select(p, 4, "last").item() == 2


def test_toy_judge_interface():
    judge, gen = ToyJudge(), torch.Generator().manual_seed(0)
    metas = [sample_scene("counting", gen) for _ in range(3)]
    from common.toy.world import draw
    images = torch.stack([draw(m, gen) for m in metas])
    for q in ("clear", "potential", "outcome"):
        p = judge.p_yes(images, [m["prompt"] for m in metas], metas, q)
        assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    assert (judge.p_yes(images, [""] * 3, metas, "clear") > 0.5).all()  # clean drawings are clear
    noisy = torch.rand(3, 3, 16, 16, generator=gen)
    assert (judge.p_yes(noisy, [""] * 3, metas, "clear") < 0.5).all()  # noise has many blobs
    with pytest.raises(ValueError, match="question"):
        judge.p_yes(images, [""] * 3, metas, "pretty")


def test_dpo_log2_and_zero_gradient_identities(base):
    policy = MaskedAR(copy.deepcopy(base.model), base.vq)
    policy.model.requires_grad_(True)
    codes = base.sample(["a circle", "two squares"], torch.Generator().manual_seed(0), decode=False)[0]
    gen = torch.Generator().manual_seed(1)
    loss, info = masked_dpo_loss(policy, base, ["a circle", "two squares"], codes, codes.flip(0), gen, 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and info["margin"] == 0  # policy = reference
    # winner = loser: with ONE shared mask the loss is log 2 for every policy and the gradient vanishes
    # (up to float summation order); the official independent masks give the same pair a real gradient
    norms = []
    for shared in (True, False):
        policy.model.zero_grad(set_to_none=True)
        mw, ml = pair_masks(2, NUM_TOKENS, torch.Generator().manual_seed(2), shared=shared)
        lw, ll = (policy.log_probs(["a circle"] * 2, codes, m, 0.0) for m in (mw, ml))
        with torch.no_grad():
            rw, rl = (base.log_probs(["a circle"] * 2, codes, m, 0.0) for m in (mw, ml))
        loss = sequence_dpo_loss(lw, ll, rw, rl, 0.1)[0]
        loss.backward()
        norms.append(sum(p.grad.norm() ** 2 for p in policy.model.parameters() if p.grad is not None) ** 0.5)
        if shared:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert norms[0] < 1e-6 and norms[1] > 1e-2


def test_guidance_term_changes_the_loss_not_the_gradient(base):
    policy = MaskedAR(copy.deepcopy(base.model), base.vq)
    policy.model.requires_grad_(True)
    codes = base.sample(["a circle", "a square"], torch.Generator().manual_seed(0), decode=False)[0]
    grads, losses = [], []
    for coef in (0.0, 0.1):
        policy.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            policy.model.bert.embeddings.word_embeddings.weight.add_(0)  # same policy for both runs
        dpo, _ = masked_dpo_loss(policy, base, ["a circle", "a square"], codes, codes.flip(0),
                                 torch.Generator().manual_seed(5), 0.1)
        term = guidance_term([0.3, 0.6], coef)
        assert not term.requires_grad
        loss = dpo + term
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None]))
    assert losses[1] - losses[0] == pytest.approx(0.1 * -(math.log(0.3) + math.log(0.6)) / 2, rel=1e-5)
    assert torch.equal(grads[0], grads[1])


def test_config_errors_name_the_field():
    for kwargs, name in [({"num_paths": 0}, "num_paths"), ({"ranker": "clip"}, "ranker"),
                         ({"model": "/nope.safetensors"}, "model"), ({"remask_ratio": 1.0}, "remask_ratio"),
                         ({"tasks": ["poetry"]}, "tasks"), ({"judge": "/no/such/dir"}, "judge")]:
        with pytest.raises(ValueError, match=name):
            Config(**kwargs)


# ---------------------------------------------------------------------------------------------- tier 2
def test_one_dpo_update_on_tiny_bert_with_lora():
    from peft import LoraConfig, get_peft_model

    from common.ar.models import MASKED_CONFIG
    cfg = {**MASKED_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2}
    ref = MaskedAR(build_masked_model(cfg, seed=0).eval().requires_grad_(False))
    policy = MaskedAR(get_peft_model(copy.deepcopy(ref.model), LoraConfig(r=4, lora_alpha=4,
                      target_modules=["query", "key", "value"], init_lora_weights=False)), ref.vq)
    prompts = ["a circle", "two squares"]
    win, lose = torch.randint(0, 128, (2, NUM_TOKENS)), torch.randint(0, 128, (2, NUM_TOKENS))
    loss, _ = masked_dpo_loss(policy, ref, prompts, win, lose, torch.Generator().manual_seed(0), 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    lora = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in policy.model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------------------------------- tier 3
SELECTION = {"eval_prompts": 16, "num_paths": 8}
DPO = {"dpo_steps": 30, "learning_rate": 3e-4}


@pytest.fixture(scope="module")
def selection(base):
    c = Config(**SELECTION)
    return c, compare_selection(base, ToyJudge(), c, seed=1, prm=False)


def test_claim_parm_beats_random_near_orm_with_fewer_steps(selection):
    _, r = selection
    assert r["parm"] - r["random"] >= 0.1
    assert r["parm"] >= r["orm"] - 0.1
    assert r["parm_truncated"] == r["parm"] and r["parm_truncated_step_fraction"] <= 0.9


def dpo_fit(base, selection, steps: int) -> tuple[float, float]:
    """Masked DPO on the ORM-ranked pairs of the selection paths; loss and implicit preference accuracy
    on all pairs afterwards, under a fresh shared mask."""
    c, r = selection
    c = Config(**SELECTION, **DPO)
    prompts, _, win, lose = dpo_pairs(base, ToyJudge(), r["paths"], c)
    policy = MaskedAR(copy.deepcopy(base.model), base.vq).train()
    policy.model.requires_grad_(True)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(6)
    for _ in range(steps):
        idx = torch.randint(len(prompts), (c.batch_size,), generator=gen)
        loss, _ = masked_dpo_loss(policy, base, [prompts[i] for i in idx], win[idx], lose[idx], gen, c.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss, info = masked_dpo_loss(policy.eval(), base, prompts, win, lose, torch.Generator().manual_seed(9), c.beta)
    return loss.item(), info["accuracy"].item()


def test_claim_masked_dpo_fits_judge_ranked_pairs(base, selection):
    loss, accuracy = dpo_fit(base, selection, DPO["dpo_steps"])
    assert loss < 0.5 and accuracy >= 0.9  # the base (0 updates): loss log 2 = 0.693, accuracy 0
