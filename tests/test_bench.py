"""The benchmark's arithmetic: time to target (interpolated), the PPO-vs-T-PPO summary,
and the GPU cost model (hand-computed decode time, T-PPO == PPO when W = L)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import chain_failures as cf  # noqa: E402
import gpu_check  # noqa: E402
import gpu_projection as gp  # noqa: E402
import ppo_vs_tppo as pvt  # noqa: E402

from tppo.metrics import time_to_target  # noqa: E402
from tppo.tasks.chain import Chain  # noqa: E402


def test_time_to_target_interpolates_between_evaluations():
    assert time_to_target([0, 10, 20], [0.2, 0.3, 0.5], 0.4) == pytest.approx(15.0)
    assert time_to_target([0, 10, 20], [0.2, 0.3, 0.5], 0.5) == pytest.approx(20.0)
    assert time_to_target([0, 10], [0.6, 0.7], 0.5) == 0.0  # already there at the start
    assert time_to_target([0, 10, 20], [0.2, 0.45, 0.3], 0.5) is None
    with pytest.raises(ValueError):
        time_to_target([0, 1], [0.1], 0.2)


def _run(points, train_s=100.0):
    return {"curve": [{"prompts": 10 * (i + 1), "elapsed_s": t, "tokens": 100 * (i + 1), "step": i + 1, "accuracy": a}
                      for i, (t, a) in enumerate(points)],
            "steps": len(points), "generated_tokens": 100 * len(points), "slot_utilization": 0.5,
            "phase_s": {p: 1.0 for p in pvt.PHASES}, "train_s": train_s}


def test_summary_target_and_ratio_by_hand():
    results = {
        "longtail/init/s0": {"accuracy": 0.30},
        "longtail/ppo/s0": _run([(50, 0.34), (100, 0.40)]),  # best 0.40 -> target 0.38 (margin 0.02)
        "longtail/ppo/s1": _run([(50, 0.36), (100, 0.42)]),  # best 0.42; median of bests 0.41 -> target 0.39
        "longtail/tppo-W64/s0": _run([(20, 0.39), (40, 0.41)], train_s=40.0),
        "longtail/tppo-W64/s1": _run([(30, 0.35), (60, 0.45)], train_s=60.0),
    }
    s = pvt.summarize(results, margin=0.02)["longtail"]
    assert s["target_accuracy"] == pytest.approx(0.39)
    r = s["runs"]["tppo-W64"]
    # seed 0: PPO crosses 0.39 at 50 + 50 * (0.05 / 0.06); T-PPO at 20 (first point 0.39).
    # seed 1: PPO at 50 + 50 * (0.03 / 0.06) = 75; T-PPO at 30 + 30 * (0.04 / 0.10) = 42.
    ratios = sorted([(50 + 50 * 0.05 / 0.06) / 20, 75 / 42])
    assert r["time_to_target_ratio"]["min"] == pytest.approx(ratios[0])
    assert r["time_to_target_ratio"]["max"] == pytest.approx(ratios[1])
    assert s["best_window"] == "tppo-W64" and r["reached_target"] == 2
    assert pvt.headline({"longtail": s})["final_accuracy"]["tppo-W64"] == pytest.approx((0.41 + 0.45) / 2)


def test_decode_time_by_hand():
    hw = gp.Hardware("unit", decode_step_s=1.0, decode_row_s=0.5, kv_token_s=0.0, prefill_token_s=0.0, train_token_s=0.0)
    # 2 steps with 2 rows (1 + 2 x 0.5 each), then 2 steps with 1 row (1.5 each)
    assert gp.decode_time(np.array([2, 4]), np.array([0, 0]), hw) == pytest.approx(2 * 2.0 + 2 * 1.5)
    kv = gp.Hardware("kv", decode_step_s=0.0, decode_row_s=0.0, kv_token_s=1.0, prefill_token_s=0.0, train_token_s=0.0)
    # one row, context 10, 2 steps: a chunk charges the context at its middle, 2 x (10 + 1)
    assert gp.decode_time(np.array([2]), np.array([10]), kv) == pytest.approx(2 * (10 + 1))


def test_tppo_equals_ppo_when_the_window_covers_equal_lengths():
    s = gp.Setting(prompts_per_step=4, samples_per_prompt=2, max_response_tokens=64, prompt_tokens=5)
    lengths = np.full(8 * 30, 64)
    ppo = gp.simulate_ppo(lengths, s, gp.H100_32B, steps=5)
    tppo = gp.simulate_tppo(lengths, s, gp.H100_32B, window=64, steps=6)
    assert tppo["prompts_per_hour"] == pytest.approx(ppo["prompts_per_hour"], rel=1e-9)


def test_windowing_helps_a_long_tail_when_decode_steps_dominate():
    s = gp.Setting(prompts_per_step=8, samples_per_prompt=4, max_response_tokens=256, prompt_tokens=5)
    lengths = gp.lognormal_lengths(32 * 300, median=20, sigma=1.0, cap=256)
    hw = gp.Hardware("step-bound", decode_step_s=1.0, decode_row_s=0.0, kv_token_s=0.0, prefill_token_s=0.0, train_token_s=0.0)
    ppo = gp.simulate_ppo(lengths, s, hw, steps=20)
    tppo = gp.simulate_tppo(lengths, s, hw, window=32, steps=60)
    assert tppo["prompts_per_hour"] > 2 * ppo["prompts_per_hour"]


def test_chain_failure_modes_by_hand():
    p = Chain(174, 9, 3)  # 165 156 147 = 147
    assert cf.failure_mode(p, "165 156 147=147") == "correct"
    assert cf.failure_mode(p, "165 157 148=148") == "arith"  # off by one, then consistent
    assert cf.failure_mode(p, "165 157=157") == "arith"  # a slip and a wrong count: the slip counts
    assert cf.failure_mode(p, "165 156=156") == "count"
    assert cf.failure_mode(p, "165 156 147=174") == "copy"
    assert cf.failure_mode(p, "165 156 147 138") == "unfinished"
    assert cf.failure_mode(p, "165 15x 147=1") == "malformed"


def test_gpu_check_cpu_smoke_runs_every_measurement(tmp_path):
    """benchmarks/gpu_check.py --cpu-smoke: the GPU check's whole code path, tiny, on the CPU."""
    import json

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu-smoke" and len(res["decode"]["tiny"]) == 4
    assert all(p["step_s"] > 0 for p in res["decode"]["tiny"]) and set(res["fit"]["tiny"]) >= {"decode_step_s", "decode_row_s", "kv_token_s"}
    r = res["replay"]
    # every configuration generated every prompt, to its forced length
    assert r["ppo"]["finished"] == r["tppo"]["finished"] == r["tppo_refill"]["finished"] == 8
    assert r["tppo_decode_step_ratio"] > 0 and res["train_token_s"]["tiny"] > 0


def test_gpu_check_fit_recovers_known_constants():
    points = [{"batch": b, "context": c, "step_s": 0.01 + 2e-4 * b + 3e-8 * b * c} for b in (1, 8, 64) for c in (1024, 4096)]
    f = gpu_check.fit(points)
    assert f["decode_step_s"] == pytest.approx(0.01) and f["decode_row_s"] == pytest.approx(2e-4) and f["kv_token_s"] == pytest.approx(3e-8)
