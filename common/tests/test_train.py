"""Tests for common/train.py: exact resume, safetensors-only checkpoints, metrics, figures, 2-process DDP.

Run as a script (`accelerate launch ... test_train.py OUT`) this file is the worker of the 2-process test.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.train import (
    Checkpointer,
    MetricsLogger,
    image_grid,
    load_trainable_state_dict,
    lora_state_dict,
    make_accelerator,
    make_optimizer,
    plot_curve,
    read_metrics,
    seed_everything,
    trainable_state_dict,
    truncate_metrics,
)


def _lora_mlp(seed: int) -> nn.Module:
    """Tiny MLP with dropout and peft LoRA (with LoRA dropout) on both linears; only LoRA is trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    seed_everything(seed)
    base = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 16), act=nn.Tanh(), drop=nn.Dropout(0.2),
                                     fc2=nn.Linear(16, 2)))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.1)
    return inject_adapter_in_model(config, base)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state; start and end every test without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _train(out: Path, stop_at: int, total: int = 8, scramble: bool = False, cpu: bool = True,
           mixed_precision: str = "no") -> tuple[dict, int | None]:
    """Train the LoRA MLP until step `stop_at`, resuming from out/ckpt if a checkpoint is there.

    The loop draws from every RNG a loop may use: a torch.Generator (data), numpy and python random
    (noise, loss weight) and the global torch RNG (dropout). scramble=True reseeds all of them before
    resuming, so only a faithful RNG restore can reproduce the uninterrupted run."""
    accelerator = make_accelerator(mixed_precision=mixed_precision, cpu=cpu)
    model = _lora_mlp(seed=0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: moving a module to the GPU gives its parameters new storage, and views taken before
    # would go on holding the CPU weights (saved and restored while the model trains on without them)
    params = trainable_state_dict(accelerator.unwrap_model(model))
    gen = torch.Generator().manual_seed(1)
    if scramble:
        seed_everything(1234)
        gen.manual_seed(99)
    extra = {"ema": torch.zeros(()), "seen": 0}
    log = MetricsLogger(out / "metrics.jsonl", total=total)
    ckpt = Checkpointer(out / "ckpt", every=3, keep=2, accelerator=accelerator)
    resumed = ckpt.load_latest(model_params=params, optimizer=optimizer, extra_state=extra,
                               generators={"data": gen}, metrics=log)
    step = resumed or 0
    while step < stop_at:
        x = torch.randn(8, 4, generator=gen)
        y = x[:, :2].sin() + 0.1 * torch.from_numpy(np.random.randn(8, 2)).float()
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        loss = (1.0 + random.random()) * F.mse_loss(model(x), y)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        extra["ema"] = 0.9 * extra["ema"] + 0.1 * loss.detach()
        extra["seen"] += x.shape[0]
        log.log(step, loss=loss, grad_norm=grad_norm, ema=extra["ema"], seen=extra["seen"])
        if ckpt.due(step):
            ckpt.save(step, model_params=params, optimizer=optimizer, extra_state=extra,
                      generators={"data": gen})
    log.close()
    return {k: v.cpu().clone() for k, v in params.items()}, resumed


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (CUDA RNG states and the fp16 grad scaler)")])])
def test_exact_resume_matches_uninterrupted_run(tmp_path, device):
    kw = dict(cpu=True) if device == "cpu" else dict(cpu=False, mixed_precision="fp16")
    full, _ = _train(tmp_path / "a", stop_at=8, **kw)
    _train(tmp_path / "b", stop_at=5, **kw)  # checkpoint at 3, then "killed" at 5 with metrics 4-5 on disk
    resumed_params, resumed_from = _train(tmp_path / "b", stop_at=8, scramble=True, **kw)
    assert resumed_from == 3
    assert full.keys() == resumed_params.keys() and all("lora_" in k for k in full)
    for name in full:
        assert torch.equal(full[name], resumed_params[name]), name
    a, b = read_metrics(tmp_path / "a/metrics.jsonl"), read_metrics(tmp_path / "b/metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))  # no duplicated steps after the resume
    assert a == b  # identical floats, not just close
    assert [p.name for p in Checkpointer(tmp_path / "b/ckpt", every=3).checkpoints()] == [
        "checkpoint-00000003", "checkpoint-00000006"]


def _assert_same_tree(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def test_optimizer_and_extra_state_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    extra = {"scheduler": scheduler.state_dict(), "buffer": torch.arange(4, dtype=torch.float64),
             "per_prompt": {"a red circle": [1.0, 2.5]}, "pair": (1, "x"), "none": None}
    ckpt = Checkpointer(tmp_path, every=1)
    ckpt.save(3, model_params=trainable_state_dict(model), optimizer=optimizer, extra_state=extra)

    other_opt = make_optimizer(other.parameters(), lr=0.5, betas=(0.5, 0.6), weight_decay=0.3)
    restored: dict = {"stale": 1}
    assert ckpt.load_latest(model_params=trainable_state_dict(other), optimizer=other_opt,
                            extra_state=restored) == 3
    _assert_same_tree(optimizer.state_dict(), other_opt.state_dict())
    _assert_same_tree(extra, restored)
    # one more identical step keeps both models bit-identical
    x = torch.randn(5, 3)
    for m, opt in ((model, optimizer), (other, other_opt)):
        m(x).square().mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_pickle_is_refused(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(tmp_path, every=1)
    path = ckpt.save(1, model_params=trainable_state_dict(model), optimizer=optimizer)
    kwargs = dict(model_params=trainable_state_dict(model), optimizer=optimizer)

    (path / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle next to the real files
    with pytest.raises(ValueError, match="pickle"):
        ckpt.load(path, **kwargs)
    (path / "optimizer.pt").unlink()
    torch.save(trainable_state_dict(model), path / "model.safetensors")  # a pickle under a safe name
    with pytest.raises(ValueError, match="pickle"):
        ckpt.load(path, **kwargs)
    with pytest.raises(ValueError, match="extra_state.fn"):  # nothing falls back to pickle on save
        ckpt.save(2, model_params=trainable_state_dict(model), optimizer=optimizer,
                  extra_state={"fn": object()})


def test_keep_last_k_atomic_and_empty(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(tmp_path / "ck", every=2, keep=2)
    kwargs = dict(model_params=trainable_state_dict(model), optimizer=optimizer)
    assert ckpt.load_latest(**kwargs) is None
    for step in range(1, 6):
        ckpt.save(step, **kwargs)
    assert [p.name for p in ckpt.checkpoints()] == ["checkpoint-00000004", "checkpoint-00000005"]
    (tmp_path / "ck/.tmp-checkpoint-00000009").mkdir()  # a save killed half way is ignored
    assert ckpt.load_latest(**kwargs) == 5
    assert [ckpt.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    with pytest.raises(ValueError, match="every"):
        Checkpointer(tmp_path, every=0)
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_latest(model_params={"other": torch.zeros(2)}, optimizer=optimizer)


def test_generators_must_have_been_saved(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(tmp_path, every=1)
    ckpt.save(1, model_params=trainable_state_dict(model), optimizer=optimizer)
    with pytest.raises(ValueError, match="generators"):
        ckpt.load_latest(model_params=trainable_state_dict(model), optimizer=optimizer,
                         generators={"data": torch.Generator()})


def test_metrics_logger_read_and_truncate(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsLogger(path, total=4, desc="t") as log:
        rec = log.log(1, {"loss": torch.tensor(0.5)}, acc=np.float32(0.25), n=3)
        log.log(2, loss=torch.tensor([0.125]))
        with pytest.raises(ValueError, match="'loss'.*scalar"):
            log.log(3, loss=torch.ones(2))
        with pytest.raises(ValueError, match="'name'"):
            log.log(3, name="x")
    assert rec == {"step": 1, "loss": 0.5, "acc": 0.25, "n": 3}
    assert read_metrics(path) == [rec, {"step": 2, "loss": 0.125}]
    with open(path, "a") as fh:
        fh.write('{"step": 3, "lo')  # torn by a kill
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    truncate_metrics(path, 1)
    assert read_metrics(path) == [rec]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    MetricsLogger(tmp_path / "off.jsonl", disable=True).log(1, loss=1.0)
    assert not (tmp_path / "off.jsonl").exists()


def test_plot_curve_and_image_grid(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as log:
        for s in range(1, 6):
            log.log(s, reward=s**0.5)
    out = plot_curve(path, "reward", tmp_path / "reward.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'loss'"):
        plot_curve(path, "loss", tmp_path / "loss.png")

    images = torch.rand(3, 3, 2, 2)
    grid = image_grid(images, nrow=2, out_png=tmp_path / "grid.png", upscale=3, pad=1)
    assert grid.size == (2 * (6 + 1) + 1, 2 * (6 + 1) + 1) and (tmp_path / "grid.png").exists()
    pixels = np.asarray(grid)
    expected = (images[1, :, 1, 0] * 255).round().to(torch.uint8).numpy()  # image 1, row 1, column 0
    for dy in range(3):
        for dx in range(3):  # nearest upscaling: the whole 3x3 block has the source pixel's colour
            assert (pixels[1 + 3 + dy, 1 + 7 + dx] == expected).all()
    labelled = image_grid(images, nrow=2, labels=["before", "after"], upscale=3, pad=1)
    assert labelled.size[0] > grid.size[0] and labelled.size[1] == grid.size[1]
    with pytest.raises(ValueError, match="labels"):
        image_grid(images, nrow=2, labels=["only one"])
    with pytest.raises(ValueError, match="images"):
        image_grid(torch.rand(3, 2, 2), nrow=2)


def test_trainable_and_lora_state_dicts():
    model = _lora_mlp(seed=0)
    sd = trainable_state_dict(model)
    assert sorted(sd) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sd and all("lora_" in k for k in sd)
    new = {k: torch.full_like(v, 0.5) for k, v in sd.items()}
    load_trainable_state_dict(model, new)
    assert all(torch.equal(p, new[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state_dict(model, dict(list(new.items())[1:]))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state_dict(model, {k: v[..., :1] for k, v in new.items()})
    peft_sd = lora_state_dict(model)
    assert len(peft_sd) == len(sd) and not any(".default" in k for k in peft_sd)


def test_factories_validate_and_use_cited_defaults():
    group = make_optimizer(nn.Linear(2, 2).parameters(), lr=3e-4).param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.9, 0.999), 1e-4, 1e-8)
    with pytest.raises(ValueError, match="params"):
        make_optimizer([], lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(nn.Linear(2, 2).parameters(), lr=0.0)
    with pytest.raises(ValueError, match="mixed_precision"):
        make_accelerator(mixed_precision="fp8")
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(1))
    seed_everything(7)
    assert a == (random.random(), np.random.rand(), torch.rand(1))


# ------------------------------------------------------------------------------- two gloo processes
def _ddp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    seed_everything(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(8, 5)
    return model, x, x.sum(1, keepdim=True).cos()


def _ddp_worker(out: Path) -> None:
    """Each of the 2 processes takes half of the global batch; DDP averages the gradients."""
    accelerator = make_accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    model, x, y = _ddp_problem()
    optimizer = make_optimizer(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    half = slice(4 * accelerator.process_index, 4 * accelerator.process_index + 4)
    accelerator.backward(F.mse_loss(model(x[half]), y[half]))
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_file({n: p.grad.contiguous() for n, p in unwrapped.named_parameters()}, out / "grads.safetensors")
    optimizer.step()
    ckpt = Checkpointer(out / "ckpt", every=1, accelerator=accelerator)
    gen = torch.Generator().manual_seed(accelerator.process_index)
    kwargs = dict(model_params=trainable_state_dict(unwrapped), optimizer=optimizer, generators={"g": gen})
    ckpt.save(1, **kwargs)
    expected = torch.randint(0, 1000, (4,), generator=gen)
    assert ckpt.load_latest(**kwargs) == 1
    assert torch.equal(torch.randint(0, 1000, (4,), generator=gen), expected)  # each rank's own RNG back
    accelerator.end_training()


@pytest.mark.slow  # two interpreter start-ups: about 8 s on 2 idle cores, 20+ s when they are busy
def test_two_gloo_processes_average_gradients_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), __file__, str(tmp_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, x, y = _ddp_problem()
    F.mse_loss(model(x), y).backward()
    grads = load_file(tmp_path / "grads.safetensors")
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max() <= 1e-6, name
    files = {p.name for p in (tmp_path / "ckpt/checkpoint-00000001").iterdir()}
    assert {"rng-rank0.json", "rng-rank1.json", "model.safetensors", "optimizer.json"} <= files
    assert json.loads((tmp_path / "ckpt/checkpoint-00000001/state.json").read_text())


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
