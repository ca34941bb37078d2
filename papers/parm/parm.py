"""PARM / PARM++: Can We Generate Images with CoT? Let's Verify and Reinforce Image Generation Step by Step
(Guo et al., CVPR 2025, arXiv 2501.13926).

Docs page: generated/papers/parm.md. Bib key: guo2025can (survey.bib).
Official code: github.com/ZiyuGuo99/Image-Generation-CoT at 1ff33eb (parm.py `t2i_generate`, orm.py,
selector.py `ImageSelector.parm / clarity_judgement / potential_assessment / orm`, training/train_dpo.py,
scripts/dpo.yaml).

A masked-token generator (Show-o; here the toy `MaskedAR`) decodes N candidate paths. At every
decoding step the image decoded from the current predicted tokens goes to one judge with three jobs:
(1) clarity: "is this intermediate image clear enough to judge?"; (2) potential, asked ONCE per path at
its first clear step: "can this path still end up satisfying the prompt?"; (3) best-of-N': among the
paths with potential pick the highest outcome (ORM) yes-probability, else the path with the lowest
p(no). The paper truncates paths without potential; the released code decodes them to the end. PARM++
reflects on a failed final image and regenerates. The DPO stage aligns the generator on pairs ranked by
the judge with the masked-token DPO loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from common.ar.models import (
    MASK,
    MASKED_CFG_SCALE,
    MASKED_STEPS,
    NUM_TOKENS,
    OFFSET,
    MaskedAR,
    load_ar_base,
)
from common.ar.tokens import pair_masks, sequence_dpo_loss
from common.config import option, parse_config, require
from common.toy.evaluator import COVERAGE_THRESHOLD, color_coverage, connected_components, evaluate
from common.toy.soft import soft_geneval
from common.toy.world import TASKS, sample_prompts
from common.train import MetricsLogger, image_grid, make_optimizer, plot_curve, read_metrics, seed_everything

QUESTIONS = ("clear", "potential", "outcome")


@dataclass
class Config:
    """PARM test-time verification, PARM++ reflection and the DPO stage. "toy" marks scaled-down defaults."""

    model: str = option("toy-masked", "toy-masked or weights saved by common.ar.models.save_ar_weights")
    judge: str = option("toy", "toy (rule-based judge on the toy world) or a local VLM directory (VLMJudge)")
    out_dir: str = option("runs/parm", "metrics.jsonl and figures go here")
    seed: int = option(0, "random seed")
    device: str = option("cpu", "cpu or cuda")
    dtype: str = option("fp32", "fp32 or bf16 (official DPO: bf16 mixed precision)", choices=("fp32", "bf16"))
    tasks: list[str] = option(list(TASKS), "toy tasks the prompts are drawn from")
    # ---- test-time search ----
    num_paths: int = option(8, "candidate paths N per prompt; official main.py search_num 20, toy 8")
    num_steps: int = option(MASKED_STEPS, "MaskGIT decoding steps; official 18, toy base 8")
    cfg_scale: float = option(MASKED_CFG_SCALE, "Show-o CFG (1 + s) z_c - s z_u; official inference 1.75")
    truncate: bool = option(True, "stop decoding paths judged without potential (paper Sec. 3); the "
                            "official parm.py decodes them to the end (False)")
    verdict: str = option("greedy", "yes/no verdict: greedy (p_yes > 0.5) or sample (official: sampled "
                          "first token)", choices=("greedy", "sample"))
    prm_aggregate: str = option("mean", "how PRM combines its per-step yes-probabilities (choice here)",
                                choices=("mean", "min", "last"))
    eval_prompts: int = option(48, "prompts for the selection comparison (toy)")
    # ---- toy judge (its calibration; see README) ----
    clarity_slack: int = option(1, "toy clarity: clear when colour blobs <= objects asked for + slack")
    potential_center: float = option(0.02, "toy potential: soft score where p_yes = 0.5")
    outcome_center: float = option(0.12, "toy ORM: soft score where p_yes = 0.5")
    judge_slope: float = option(3.0, "toy judge: slope of the logistic on log soft score / blob margin")
    # ---- PARM++ ----
    reflection_rounds: int = option(3, "PARM++: at most this many reflect-and-regenerate rounds (paper: 3)")
    remask_ratio: float = option(0.5, "PARM++ toy regeneration: fraction of the failed image's tokens re-masked")
    # ---- DPO ----
    dpo_prompts: int = option(48, "prompts whose N paths are ranked into DPO pairs (toy)")
    ranker: str = option("orm", "who ranks the pairs: orm (best vs worst yes-prob) or parm (PARM's pick vs "
                         "worst); official data orm.json + parm.json", choices=("orm", "parm"))
    dpo_steps: int = option(40, "DPO updates (official: 1 epoch over the pairs; toy 40)")
    batch_size: int = option(10, "pairs per update; official batch_size_t2i 10")
    beta: float = option(0.1, "DPO beta; official scripts/dpo.yaml training.beta")
    learning_rate: float = option(1e-4, "AdamW lr; official 1e-5 full fine-tuning of Show-o, toy 1e-4")
    weight_decay: float = option(0.01, "AdamW weight decay; official 0.01")
    warmup_ratio: float = option(0.1, "cosine schedule warm-up fraction; official 0.1")
    reward_coef: float = option(0.1, "PARM guidance reward_coef * (-log p_yes); official 0.1. Built from "
                                "floats: it carries NO gradient (official train_dpo.py), only the logged loss")
    lora_rank: int = option(0, "0: full fine-tuning (official); > 0: LoRA on query/key/value via peft")
    figures: bool = option(True, "write reward_curve.png and before_after.png")

    def __post_init__(self) -> None:
        require(self.model == "toy-masked" or Path(self.model).is_file(), "model",
                f"{self.model!r} is neither toy-masked nor a weights file saved by save_ar_weights")
        require(self.judge == "toy" or Path(self.judge).is_dir(), "judge",
                f"{self.judge!r} is neither 'toy' nor a local VLM directory")
        require(len(self.tasks) > 0 and all(t in TASKS for t in self.tasks), "tasks", f"choose from {TASKS}")
        for name in ("num_paths", "num_steps", "eval_prompts", "dpo_prompts", "batch_size"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("dpo_steps", "reflection_rounds", "lora_rank", "clarity_slack"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.potential_center > 0 and self.outcome_center > 0 and self.judge_slope > 0,
                "judge_slope", "toy judge centres and slope must be > 0")
        for name, allowed in (("ranker", ("orm", "parm")), ("verdict", ("greedy", "sample")),
                              ("prm_aggregate", ("mean", "min", "last")), ("dtype", ("fp32", "bf16"))):
            require(getattr(self, name) in allowed, name, f"choose from {allowed}")
        require(0 < self.remask_ratio < 1, "remask_ratio", "must lie in (0, 1)")
        require(self.beta > 0 and self.learning_rate > 0, "beta", "beta and learning_rate must be > 0")
        require(self.reward_coef >= 0 and 0 <= self.warmup_ratio < 1, "reward_coef", "need reward_coef >= 0 "
                "and warmup_ratio in [0, 1)")


# --8<-- [start:judge]
class Judge(Protocol):
    """The interface of a yes/no VLM judge: p("yes") for each image, question in QUESTIONS."""

    def p_yes(self, images: Tensor, prompts: list[str], metadata: list[dict], question: str) -> Tensor: ...


class ToyJudge:
    """A rule-based judge on the toy world with a VLM judge's interface (its own calibration, not the
    evaluator that scores the claim): clear = few colour blobs; potential and outcome = a logistic of
    the soft toy-GenEval score (common.toy.soft) on the intermediate / final image."""

    def __init__(self, clarity_slack: int = 1, potential_center: float = 0.02, outcome_center: float = 0.12,
                 slope: float = 3.0):
        self.slack, self.slope = clarity_slack, slope
        self.center = {"potential": potential_center, "outcome": outcome_center}

    def p_yes(self, images: Tensor, prompts: list[str], metadata: list[dict], question: str) -> Tensor:
        if question not in QUESTIONS:
            raise ValueError(f"question: one of {QUESTIONS}, got {question!r}")
        if question == "clear":
            asked = torch.tensor([float(sum(c["count"] for c in m["include"])) for m in metadata])
            # p = sigmoid(slope (asked + slack + 1/2 - blobs)): yes while blobs <= asked + slack
            return torch.sigmoid(self.slope * (asked + self.slack + 0.5 - count_blobs(images)))
        score = soft_geneval(images.float(), metadata)[0].detach().clamp_min(1e-8)
        # p = sigmoid(slope (log s - log s_0)): yes when the soft score exceeds the question's centre s_0
        return torch.sigmoid(self.slope * (score.log() - math.log(self.center[question])))


def count_blobs(images: Tensor) -> Tensor:
    """Connected regions of palette colour per image (the toy evaluator's pixel rule), shape (B,)."""
    alpha, residual = color_coverage(images.float())
    best = torch.zeros_like(alpha, dtype=torch.bool).scatter_(1, residual.argmin(1, keepdim=True), True)
    b, k, h, w = alpha.shape
    labels = connected_components((best & (alpha >= COVERAGE_THRESHOLD)).reshape(b * k, h, w))
    return torch.tensor([float(len(lab.unique()) - 1) for lab in labels]).view(b, k).sum(1)
# --8<-- [end:judge]


class VLMJudge:
    """A local yes/no VLM (e.g. LLaVA-OneVision, the official selector's judge) loaded from a directory
    with transformers; p_yes = softmax of the first answer token's logits at "yes", asked the official
    selector.py questions (potential as a second turn after the clarity question answered "yes")."""

    ASK = {"clear": "The above image is a certain step in the text to image generation process. It is not the "
                    "final one and will keep iterating. The prompt is '{}'. Can this image be used to judge whether "
                    "it has the potential to iterate to an image satisfying the prompt? Answer yes or no.",
           "potential": "Do you think the image has the potential to iterate to the image satisfied the prompt? "
                        "Answer yes or no.",
           "outcome": "This image is generated by a prompt: {}. Does this image accurately represent the prompt? "
                      "Answer yes or no."}

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: PLC0415 (only when used)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        self.yes = self.processor.tokenizer.convert_tokens_to_ids("yes")

    @torch.no_grad()
    def p_yes(self, images: Tensor, prompts: list[str], metadata: list[dict], question: str) -> Tensor:
        out = []
        for image, prompt in zip(images, prompts):
            turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.ASK[
                "clear" if question == "potential" else question].format(prompt)}]}]
            if question == "potential":
                turns += [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
                          {"role": "user", "content": [{"type": "text", "text": self.ASK["potential"]}]}]
            text = self.processor.apply_chat_template(turns, add_generation_prompt=True)
            inputs = self.processor(images=[image.float().clamp(0, 1)], text=text, return_tensors="pt",
                                    do_rescale=False).to(self.model.device)
            out.append(self.model(**inputs).logits[0, -1].float().softmax(-1)[self.yes].item())
        return torch.tensor(out)


def verdicts(p: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """yes/no from p_yes: greedy p > 0.5, or a sampled answer as the official generate(do_sample=True)."""
    return p > 0.5 if mode == "greedy" else torch.rand(p.shape, generator=generator) < p


# --8<-- [start:decode]
@dataclass
class Paths:
    """N paths for each of P prompts (rows prompt-major) and what the judge said along the way."""
    prompts: list[str]
    metadata: list[dict]
    ids: Tensor                       # (B, 64) current ids (codes + OFFSET or MASK)
    step: list[int]                   # next step index of each row (num_steps = finished)
    gens: list[torch.Generator]
    clear_step: list[int | None]      # first step judged clear (None: never)
    potential: list[bool]             # the ONE potential verdict (False until asked, as official)
    p_no: list[float]                 # 1 - p_yes of that assessment (1.0 until asked, as official)
    step_yes: list[list[float]]       # outcome yes-prob of every intermediate image (PRM), when recorded
    forwards: int = 0                 # path-steps decoded: one model forward (cond + uncond rows) each


def start_paths(prompts: list[str], metadata: list[dict], n: int, seed: int, ids: Tensor | None = None) -> Paths:
    rows = [p for p in prompts for _ in range(n)]
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(rows))]
    start = torch.full((len(rows), NUM_TOKENS), MASK) if ids is None else ids.repeat_interleave(n, 0)
    return Paths(rows, [m for m in metadata for _ in range(n)], start, [0] * len(rows), gens,
                 [None] * len(rows), [False] * len(rows), [1.0] * len(rows), [[] for _ in rows])


def advance(model: MaskedAR, judge: Judge, paths: Paths, rows: list[int], c: Config, *, parm: bool = True,
            prm: bool = False, vgen: torch.Generator | None = None) -> None:
    """Decode one step of `rows`; PARM's clarity / potential on the intermediate images (PRM: outcome
    yes-prob at every step)."""
    # one MaskGIT step per row at its own depth, each path with its own generator (common.ar.models)
    pred, nxt = model.decode_step([paths.prompts[r] for r in rows], paths.ids[rows], [paths.step[r] for r in rows],
                                  [paths.gens[r] for r in rows], c.cfg_scale, num_steps=c.num_steps)
    paths.ids[rows] = nxt
    paths.forwards += len(rows)
    for r in rows:
        paths.step[r] += 1
    meta, prom = [paths.metadata[r] for r in rows], [paths.prompts[r] for r in rows]
    if prm:
        for r, p in zip(rows, judge.p_yes(model.vq.decode(pred), prom, meta, "outcome").tolist()):
            paths.step_yes[r].append(p)
    # --8<-- [start:parm_step]
    ask = [k for k, r in enumerate(rows) if paths.clear_step[r] is None]  # clear paths are never re-assessed
    if not parm or not ask:
        return
    images = model.vq.decode(pred[ask])
    clear = verdicts(judge.p_yes(images, [prom[k] for k in ask], [meta[k] for k in ask], "clear"), c.verdict, vgen)
    now = [k for j, k in enumerate(ask) if clear[j]]  # first clear step: potential, asked exactly once
    if not now:
        return
    sel = torch.tensor([j for j in range(len(ask)) if clear[j]])
    p_pot = judge.p_yes(images[sel], [prom[k] for k in now], [meta[k] for k in now], "potential")
    pot = verdicts(p_pot, c.verdict, vgen)
    for j, k in enumerate(now):  # the verdict and p(no) are stored; the path is never re-assessed
        r = rows[k]
        paths.clear_step[r], paths.potential[r], paths.p_no[r] = paths.step[r] - 1, bool(pot[j]), 1 - float(p_pot[j])
    # --8<-- [end:parm_step]


def run_paths(model: MaskedAR, judge: Judge, paths: Paths, c: Config, *, parm: bool = True, prm: bool = False,
              truncate: bool = False, vgen: torch.Generator | None = None) -> Paths:
    """Decode every path to the end; with truncate, a path judged without potential stops there."""
    while True:
        rows = [r for r, s in enumerate(paths.step) if s < c.num_steps
                and not (truncate and paths.clear_step[r] is not None and not paths.potential[r])]
        if not rows:
            return paths
        advance(model, judge, paths, rows, c, parm=parm, prm=prm, vgen=vgen)
# --8<-- [end:decode]


# --8<-- [start:select]
def finals(model: MaskedAR, judge: Judge, paths: Paths, rows: list[int]) -> Tensor:
    """ORM yes-probabilities of finished rows."""
    images = model.vq.decode(paths.ids[rows] - OFFSET)
    return judge.p_yes(images, [paths.prompts[r] for r in rows], [paths.metadata[r] for r in rows], "outcome")


def parm_select(model: MaskedAR, judge: Judge, paths: Paths, n: int, c: Config) -> list[int]:
    """Best-of-N' per prompt: among paths with potential the highest ORM yes-prob; if none has
    potential, the lowest p(no) (finished first if it was truncated: the same path, its own generator)."""
    chosen = []
    for p in range(len(paths.prompts) // n):
        rows = list(range(p * n, (p + 1) * n))
        keep = [r for r in rows if paths.potential[r]]
        if keep:
            chosen.append(keep[int(finals(model, judge, paths, keep).argmax())])
            continue
        best = min(rows, key=lambda r: paths.p_no[r])  # official: min over no_prob_list, first on ties
        while paths.step[best] < c.num_steps:
            advance(model, judge, paths, [best], c, parm=False)
        chosen.append(best)
    return chosen


def orm_select(scores: Tensor, n: int) -> Tensor:
    """ORM best-of-N: the highest final yes-probability of each prompt's N paths (row indices)."""
    return scores.view(-1, n).argmax(1) + torch.arange(0, len(scores), n)


def prm_select(paths: Paths, n: int, aggregate: str) -> Tensor:
    """PRM best-of-N: yes-probabilities of every intermediate image, combined per path."""
    s = torch.tensor(paths.step_yes)
    s = s.mean(1) if aggregate == "mean" else s.amin(1) if aggregate == "min" else s[:, -1]
    return s.view(-1, n).argmax(1) + torch.arange(0, len(s), n)
# --8<-- [end:select]


# --8<-- [start:reflect]
@torch.no_grad()
def parm_plus_plus(model: MaskedAR, judge: Judge, prompts: list[str], metadata: list[dict], codes: Tensor,
                   c: Config, seed: int) -> tuple[Tensor, list[int]]:
    """PARM++ (simplified): while the ORM says "no" to the selected image (at most reflection_rounds
    times), reflect and regenerate. The toy reflection is the model's own least confident tokens of the
    failed image (no text); regeneration re-masks that remask_ratio of them and decodes again with
    PARM selection, conditioned on the rest of the previous image. Returns codes and rounds used."""
    rounds = [0] * len(prompts)
    for rnd in range(c.reflection_rounds):
        p_yes = judge.p_yes(model.vq.decode(codes), prompts, metadata, "outcome")
        bad = [i for i in range(len(prompts)) if p_yes[i] <= 0.5]
        if not bad:
            break
        sub_p, sub_m = [prompts[i] for i in bad], [metadata[i] for i in bad]
        ids = codes[bad] + OFFSET
        logp = model.logits(sub_p, ids, c.cfg_scale).log_softmax(-1).gather(-1, codes[bad, :, None])[..., 0]
        k = int(c.remask_ratio * NUM_TOKENS)
        ids = ids.scatter(1, logp.argsort(1)[:, :k], MASK)  # reflection: the least plausible tokens
        paths = run_paths(model, judge, start_paths(sub_p, sub_m, c.num_paths, seed + 1 + rnd, ids), c,
                          truncate=c.truncate, vgen=torch.Generator().manual_seed(seed + rnd))
        picked = parm_select(model, judge, paths, c.num_paths, c)
        for j, i in enumerate(bad):
            codes[i], rounds[i] = paths.ids[picked[j]] - OFFSET, rounds[i] + 1
    return codes, rounds
# --8<-- [end:reflect]


# --8<-- [start:dpo]
def masked_dpo_loss(policy: MaskedAR, ref: MaskedAR, prompts: list[str], win: Tensor, lose: Tensor,
                    generator: torch.Generator, beta: float) -> tuple[Tensor, dict]:
    """Masked-token DPO: log pi(y) ~ sum over a random masked set M of log p(y_j | y_not M, c), one
    shared M (and gamma) for winner and loser, the same M for pi and pi_ref, conditional logits (the
    official training forward has no CFG), then L = -log sigmoid(beta [(lw - lw_ref) - (ll - ll_ref)])."""
    mask, _ = pair_masks(len(prompts), NUM_TOKENS, generator, shared=True)
    lw, ll = policy.log_probs(prompts, win, mask, 0.0), policy.log_probs(prompts, lose, mask, 0.0)
    with torch.no_grad():
        rw, rl = ref.log_probs(prompts, win, mask, 0.0), ref.log_probs(prompts, lose, mask, 0.0)
    return sequence_dpo_loss(lw, ll, rw, rl, beta)


def guidance_term(p_yes: list[float], reward_coef: float) -> Tensor:
    """Official "DPO with PARM guidance": reward_coef * mean(-log max(p_yes, 1e-7)) over freshly generated
    samples. p_yes are plain floats, so the term is a constant: it shifts the loss, never the gradient."""
    return reward_coef * -torch.log(torch.tensor([float(p) for p in p_yes]).clamp(min=1e-7)).mean()
# --8<-- [end:dpo]


def load_model(c: Config) -> MaskedAR:
    return load_ar_base("masked", None if c.model == "toy-masked" else c.model)


def load_judge(c: Config) -> Judge:
    if c.judge == "toy":
        return ToyJudge(c.clarity_slack, c.potential_center, c.outcome_center, c.judge_slope)
    return VLMJudge(c.judge, c.device)


def correct(model: MaskedAR, codes: Tensor, metadata: list[dict]) -> Tensor:
    """Toy GenEval correctness (the evaluator, not the judge) of final codes."""
    return evaluate(model.vq.decode(codes), metadata)[0].float()


def compare_selection(model: MaskedAR, judge: Judge, c: Config, seed: int, prm: bool = True) -> dict:
    """Random / ORM / PRM / PARM selection among the same N paths per prompt (each path its own
    generator), scored by the toy evaluator; PARM is rerun with truncation to count its forwards."""
    scenes = sample_prompts(c.eval_prompts, c.tasks, torch.Generator().manual_seed(seed))
    prompts, metas = [p for p, _ in scenes], [m for _, m in scenes]
    n, full_steps = c.num_paths, len(prompts) * c.num_paths * c.num_steps
    full = run_paths(model, judge, start_paths(prompts, metas, n, seed), c, prm=prm,
                     vgen=torch.Generator().manual_seed(seed))
    ok = correct(model, full.ids - OFFSET, full.metadata)
    orm = orm_select(finals(model, judge, full, list(range(len(ok)))), n)
    parm = torch.tensor(parm_select(model, judge, full, n, c))
    out = {"random": ok.mean(), "orm": ok[orm].mean(), "parm": ok[parm].mean(), "oracle": ok.view(-1, n).amax(1).mean(),
           "parm_minus_random_se": (ok[parm] - ok.view(-1, n).mean(1)).std() / len(prompts) ** 0.5,
           "potential_fraction": torch.tensor(full.potential).float().mean(),
           "clear_step": torch.tensor([s for s in full.clear_step if s is not None]).float().mean()}
    if prm:
        out["prm"] = ok[prm_select(full, n, c.prm_aggregate)].mean()
    if c.truncate:
        cut = run_paths(model, judge, start_paths(prompts, metas, n, seed), c, truncate=True,
                        vgen=torch.Generator().manual_seed(seed))
        cut_pick = parm_select(model, judge, cut, n, c)
        out["parm_truncated"] = ok[cut_pick].mean()
        out["parm_truncated_step_fraction"] = cut.forwards / full_steps
    out["codes"], out["metadata"], out["pick"], out["paths"] = full.ids - OFFSET, full.metadata, parm, full
    return out


def dpo_pairs(model: MaskedAR, judge: Judge, paths: Paths, c: Config) -> tuple[list[str], list[dict], Tensor, Tensor]:
    """Pairs from decoded paths (N per prompt), ranked by the ORM (best vs worst yes-prob) or PARM (its
    pick vs the worst); pairs whose two yes-probs tie are dropped."""
    n, rows = c.num_paths, list(range(len(paths.prompts)))
    yes = finals(model, judge, paths, rows).view(-1, n)
    codes = (paths.ids - OFFSET).view(-1, n, NUM_TOKENS)
    win = yes.argmax(1) if c.ranker == "orm" else torch.tensor(parm_select(model, judge, paths, n, c)) % n
    lose, keep = yes.argmin(1), yes.amax(1) > yes.amin(1)
    ar, kept = torch.arange(len(yes)), [i for i in range(len(yes)) if keep[i]]
    return ([paths.prompts[i * n] for i in kept], [paths.metadata[i * n] for i in kept],
            codes[ar, win][keep], codes[ar, lose][keep])


@torch.no_grad()
def sampled_reward(model: MaskedAR, c: Config, scenes: list, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Toy GenEval correctness and soft reward of one sample per scene, fixed seed (paired before/after)."""
    prompts, metas = [p for p, _ in scenes], [m for _, m in scenes]
    codes, images = model.sample(prompts, torch.Generator().manual_seed(seed), c.cfg_scale, num_steps=c.num_steps)
    return evaluate(images, metas)[0].float(), soft_geneval(images, metas)[0], images


# --8<-- [start:train]
def train(c: Config) -> list[dict]:
    """Selection comparison on the base, PARM++ on PARM's picks, then DPO on judge-ranked pairs."""
    if c.device == "cpu":
        torch.set_num_threads(1)  # the toy models are tiny: one thread is the fastest on a CPU
    seed_everything(c.seed)
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    base, judge = load_model(c), load_judge(c)
    log = MetricsLogger(out / "metrics.jsonl", total=c.dpo_steps, desc="parm dpo")
    sel = compare_selection(base, judge, c, c.seed + 1)
    plus, rounds = parm_plus_plus(base, judge, [m["prompt"] for m in sel["metadata"][::c.num_paths]],
                                  sel["metadata"][::c.num_paths], sel["codes"][sel["pick"]].clone(), c, c.seed + 2)
    sel["parm_plus_plus"] = correct(base, plus, sel["metadata"][::c.num_paths]).mean()
    sel["reflection_rounds_mean"] = sum(rounds) / len(rounds)
    policy = MaskedAR(copy.deepcopy(base.model), base.vq).train()
    if c.lora_rank > 0:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415
        policy.model = get_peft_model(policy.model, LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank,
                                                               target_modules=["query", "key", "value"]))
    else:
        policy.model.requires_grad_(True)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, c.learning_rate, weight_decay=c.weight_decay)
    warm = max(1, int(c.warmup_ratio * c.dpo_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * max(0, s - warm) / max(1, c.dpo_steps - warm))))
    scenes = sample_prompts(c.dpo_prompts, c.tasks, torch.Generator().manual_seed(c.seed + 3))
    ps, ms = [p for p, _ in scenes], [m for _, m in scenes]
    decoded = run_paths(base, judge, start_paths(ps, ms, c.num_paths, c.seed + 3), c, parm=c.ranker == "parm",
                        vgen=torch.Generator().manual_seed(c.seed + 3))
    prompts, metas, win, lose = dpo_pairs(base, judge, decoded, c)
    eval_scenes = sample_prompts(c.eval_prompts * 2, c.tasks, torch.Generator().manual_seed(c.seed + 4))
    ok0, soft0, img0 = sampled_reward(base, c, eval_scenes, c.seed + 5)
    log.log(0, {k: v for k, v in sel.items() if k not in ("codes", "metadata", "pick", "paths")},
            num_pairs=len(prompts), sampled_geneval=ok0.mean(), sampled_soft=soft0.mean())
    gen = torch.Generator().manual_seed(c.seed + 6)
    for step in range(1, c.dpo_steps + 1):
        idx = torch.randint(len(prompts), (c.batch_size,), generator=gen)
        batch = [prompts[i] for i in idx]
        dpo, info = masked_dpo_loss(policy, base, batch, win[idx], lose[idx], gen, c.beta)
        loss = dpo
        if c.reward_coef > 0:  # PARM guidance on a fresh sample of the policy (no gradient, as official)
            with torch.no_grad():
                fresh = policy.sample(batch, gen, c.cfg_scale, num_steps=c.num_steps)[1]
            p_yes = judge.p_yes(fresh, batch, [metas[i] for i in idx], "outcome").tolist()
            loss = dpo + guidance_term(p_yes, c.reward_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        record = {"loss": loss.detach(), "dpo_loss": dpo.detach(), **info}
        if step % max(1, c.dpo_steps // 4) == 0 or step == c.dpo_steps:
            policy.eval()
            ok1, soft1, img1 = sampled_reward(policy, c, eval_scenes, c.seed + 5)
            policy.train()
            record.update(sampled_geneval=ok1.mean(), sampled_soft=soft1.mean(),
                          gain_se=(ok1 - ok0).std() / len(ok0) ** 0.5)
        log.log(step, record)
    log.close()
    if c.figures and c.dpo_steps > 0:
        plot_curve(out / "metrics.jsonl", "sampled_geneval", out / "reward_curve.png",
                   title="PARM DPO: toy GenEval of samples")
        image_grid(torch.cat([img0[:8], img1[:8]]), nrow=8, out_png=out / "before_after.png",
                   labels=["base", "DPO"])
    return read_metrics(out / "metrics.jsonl")
# --8<-- [end:train]


def main(argv=None) -> list[dict]:
    return train(parse_config(Config, argv, description=__doc__.split("\n\n")[0]))
