"""The benchmarks run at a tiny setting and write result files the report can read."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_real_shapes, harness, kernels, report, suite_time
from benchmarks.tracer import Event, event_phases, phase_report


def test_harness_writes_a_valid_result_file(tmp_path):
    path = harness.main(["--methods", "common_grpo", "--models", "tiny-sd3", "--updates", "2", "--reps", "1",
                         "--small", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert data["kind"] == "harness" and data["machine"]["torch"] == torch.__version__
    (row,) = data["rows"]
    assert row["status"] == "ok", row.get("traceback")
    # --small: 2 prompts x group 2, 2 steps with CFG; SD3 has three text encoders, each behind a tokenizer
    assert row["calls"] == {"tokenize": 3, "text": 3, "denoiser": 2, "vae_decode": 1, "reward": 1,
                            "denoiser_grad": 2, "backward": 2, "optimizer": 1}
    assert set(row["phases"]) == set(harness.PHASES)
    assert row["update_s"] == pytest.approx(sum(p["time_s"] for p in row["phases"].values()))
    assert row["raw_s"] > 0 and row["phases"]["rollout"]["raw_s"] > 0 and row["phases"]["training"]["raw_s"] > 0
    assert "common_grpo" in report.render(tmp_path)


def test_phases_of_a_synthetic_update():
    def ev(kind, start, grad=False):
        # as the Tracer records them: backward and optimizer steps are not replayed
        return Event(kind, start, start + 1.0, grad, key=None if kind in ("backward", "optimizer") else (kind, grad))

    events = [ev("text", 0), ev("denoiser", 2), ev("denoiser", 4), ev("vae_decode", 6), ev("reward", 8),
              ev("denoiser", 12), ev("denoiser", 14, grad=True), ev("backward", 16, grad=True), ev("optimizer", 18)]
    phases = event_phases(events)
    # a lone no-grad call beside training is a reference forward; two in a row are a rollout
    assert phases == ["prompt_encoding", "rollout", "rollout", "decode", "reward", "training", "training",
                      "training", "training"]
    raw = {e.key: (0.5, 0.25 if e.grad else 0.0) for e in events if e.key is not None}
    table = phase_report(events, (0.0, 19.0), raw)
    assert table["advantage"]["time_s"] == pytest.approx(3.0)  # reward end (9) -> first training call (12)
    assert table["prompt_encoding"]["time_s"] == pytest.approx(1.0)  # the gap after it is the rollout's set-up
    assert table["rollout"]["time_s"] == pytest.approx(1.0 + 2.0 + 2.0)
    assert table["training"]["raw_s"] == pytest.approx(0.5 + 0.5 + 0.25 + 1.0)  # 2 fwd, 1 bwd, optimizer
    assert sum(p["time_s"] for p in table.values()) == pytest.approx(19.0)


def test_kernels_at_the_toy_shape():
    rows = kernels.measure((3, 8, 8), "cpu", torch.float32, budget_s=0.005)
    assert rows[0]["kernel"].startswith("floor") and len(rows) == 1 + 2 * len(kernels.kernels())
    assert all(r["min_ms"] > 0 and r["ops"] >= 1 for r in rows)
    euler = [r for r in rows if r["kernel"] == "euler_step"]
    ddim = [r for r in rows if r["kernel"].startswith("ddim_step")]
    assert euler[0]["ops"] < ddim[0]["ops"]


def test_analytic_flops_match_torch_counter():
    counts = gpu_real_shapes.check_flop_count(gpu_real_shapes.TINY, resolution=64, t5_tokens=8)
    assert counts["forward_analytic"] == counts["forward_counted"]
    assert counts["train_analytic"] == counts["train_counted"]


def test_suite_time_parses_pytest_and_applies_the_budget():
    out = ("3.50s call     papers/x/test_x.py::test_slow\n0.20s setup    papers/x/test_x.py::test_slow\n"
           "0.10s call     papers/x/test_x.py::test_fast\n========= 2 passed, 1 skipped in 12.34s =========\n")
    parsed = suite_time.parse_pytest(out)
    assert parsed["session_s"] == 12.34 and parsed["counts"] == {"passed": 2, "skipped": 1}
    assert parsed["slowest"][0] == ["papers/x/test_x.py::test_slow", 3.7]
    rows = [{"folder": "papers/x", "session_s": 31.0, "exit_code": 0, "counts": {}, "loadavg_before": []},
            {"folder": "common", "session_s": 99.0, "exit_code": 0, "counts": {}, "loadavg_before": []}]
    assert [r["folder"] for r in suite_time.over_budget(rows, 30.0)] == ["papers/x"]
    assert suite_time.check(rows, 30.0) == 1 and suite_time.check(rows[1:], 30.0) == 0
    killed = "papers/x/test_x.py::test_a PASSED    [ 50%]\npapers/x/test_x.py::test_b "
    assert suite_time.running_test(killed) == "papers/x/test_x.py::test_b"
    assert suite_time.running_test("papers/x/test_x.py::test_a PASSED    [100%]") is None
