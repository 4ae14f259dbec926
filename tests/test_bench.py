"""The benchmark's arithmetic: time to target (interpolated), the PPO-vs-T-PPO summary,
and the GPU cost model (hand-computed decode time, T-PPO == PPO when W = L)."""

from __future__ import annotations

import dataclasses
import math
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


def _run(points, train_s=100.0, decode_steps=1000.0):
    return {"curve": [{"prompts": 10 * (i + 1), "elapsed_s": t, "tokens": 100 * (i + 1), "step": i + 1, "accuracy": a}
                      for i, (t, a) in enumerate(points)],
            "steps": len(points), "generated_tokens": 100 * len(points), "slot_utilization": 0.5,
            "decode_steps_per_1k_prompts": decode_steps,
            "phase_s": {p: 1.0 for p in pvt.PHASES}, "train_s": train_s}


def test_summary_target_and_ratio_by_hand():
    results = {
        "longtail/init/s0": {"accuracy": 0.30},
        "longtail/ppo/s0": _run([(50, 0.34), (100, 0.40)]),  # best 0.40 -> target 0.38 (margin 0.02)
        "longtail/ppo/s1": _run([(50, 0.36), (100, 0.42)]),  # best 0.42; median of bests 0.41 -> target 0.39
        "longtail/tppo-W64/s0": _run([(20, 0.39), (40, 0.41)], train_s=40.0, decode_steps=400.0),
        "longtail/tppo-W64/s1": _run([(30, 0.35), (60, 0.45)], train_s=60.0, decode_steps=800.0),
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
    # decode steps per 1,000 prompts: PPO 1000 on both seeds, T-PPO 400 and 800
    assert r["decode_steps_per_1k_prompts"] == pytest.approx(600.0)
    assert (r["decode_steps_ratio"]["min"], r["decode_steps_ratio"]["max"]) == pytest.approx((1.25, 2.5))


def test_variants_run_every_seed_and_ablations_seed_0():
    jobs = pvt.build_jobs(3, [64], ablations=["zero", "refill"], short=False, variants=["refill"])
    runs = {(j.label, j.seed) for j in jobs if j.label != "init"}
    assert {s for lab, s in runs if lab == "tppo-W64-refill"} == {0, 1, 2}
    assert {s for lab, s in runs if lab == "tppo-W64-zero"} == {0}
    assert len(jobs) == 1 + 3 * 3 + 1  # init, 3 labels x 3 seeds, one ablation
    refill = next(j for j in jobs if j.label == "tppo-W64-refill")
    assert "rollout.refill_within_window=true" in refill.overrides


def _eng(**kw) -> gp.Engine:
    base = dict(step_overhead_s=0.0, weight_read_s=0.0, kv_read_s=0.0, compute_row_s=0.0, attn_s=0.0, prefill_token_s=0.0,
                attn_prefill_s=0.0, train_token_s=0.0, train_attn_s=0.0)
    return gp.Engine("unit", **(base | kw))


def _rows(*targets, prompt=0):
    return [gp.Row(target=t, have=0, prompt=prompt) for t in targets]


def test_decode_step_is_bound_by_memory_or_compute_not_both():
    e = _eng(step_overhead_s=1.0, weight_read_s=10.0, kv_read_s=0.5, compute_row_s=3.0, attn_s=0.25)
    assert e.decode_s(1, rows=2, context=4) == pytest.approx(1.0 + max(10.0 + 2.0, 6.0 + 1.0))
    assert e.decode_s(1, rows=8, context=4) == pytest.approx(1.0 + max(12.0, 24.0 + 1.0))
    assert dataclasses.replace(e, combine="sum").decode_s(1, rows=2, context=4) == pytest.approx(1.0 + 12.0 + 7.0)
    # chunked prefill: its compute joins the decode steps' compute, hidden while memory bounds them
    assert e.decode_s(2, rows=2, context=4, prefill=5.0) == pytest.approx(2 * 1.0 + max(2 * 12.0, 2 * 7.0 + 5.0))
    assert e.decode_s(2, rows=2, context=4, prefill=20.0) == pytest.approx(2 * 1.0 + 2 * 7.0 + 20.0)


def test_engine_time_and_work_by_hand_with_rows_leaving():
    e = _eng(step_overhead_s=1.0, compute_row_s=0.5, combine="sum")
    # 2 steps with 2 rows (1 + 2 x 0.5 each), then 2 steps with 1 row (1.5 each)
    r = gp.run_engine(_rows(2, 4, prompt=3), e)
    assert r.time_s == pytest.approx(2 * 2.0 + 2 * 1.5) and r.decode_steps == 4 and r.preemptions == 0
    assert r.work["row_steps"] == 2 * 2 + 2 * 1 and r.work["prefill_tokens"] == 3 + 3
    # the embedded engine's compaction: a finished row stays in the batch until half of it is done
    lagged = gp.run_engine(_rows(1, 2, 4, 4), e, compact_fraction=0.5)
    assert lagged.work["row_steps"] == 4 + 4 + 2 * 2  # step 2 still holds the first row; after step 2 half are done


def test_kv_capacity_preempts_the_newest_row_and_recomputes_it():
    """Capacity 10, two rows of prompt 2 and 5 tokens each. Both fit (4); 3 steps fill the
    cache (2 x 5); the newest is preempted; the first ends in 2 steps; the second re-enters
    with a prefill of its 5 tokens and ends in 2 more: 7 decode steps, 2 + 2 + 5 prefilled."""
    e = dataclasses.replace(_eng(step_overhead_s=1.0, prefill_token_s=1.0, combine="sum"), kv_capacity_tokens=10)
    rows = _rows(5, 5, prompt=2)
    r = gp.run_engine(rows, e)
    assert (r.decode_steps, r.preemptions) == (7, 1) and r.work["prefill_tokens"] == 9
    assert r.prefill_s == pytest.approx(9.0) and r.time_s == pytest.approx(7 + 9)
    assert all(x.have == 5 for x in rows)
    unbounded = gp.run_engine(_rows(5, 5, prompt=2), dataclasses.replace(e, kv_capacity_tokens=float("inf")))
    assert (unbounded.decode_steps, unbounded.preemptions) == (5, 0)
    with pytest.raises(ValueError, match="does not fit"):
        gp.run_engine(_rows(5, prompt=20), e)


def test_the_library_window_gives_every_row_w_tokens_the_steps_window_ends_after_w_steps():
    e = _eng(step_overhead_s=1.0)
    rows = _rows(3, 10)
    r = gp.run_engine(rows, e, budget=4, max_steps=4)
    assert r.decode_steps == 4 and [x.have for x in rows] == [3, 4]
    rows, queue = _rows(3, 10), _rows(6)
    gp.run_engine(rows, e, budget=4, max_steps=4, new_rows=queue)
    assert not queue and [x.have for x in rows] == [3, 4]
    # a row admitted after the first finished (refill): the steps window cuts it at 1 token, the tokens window gives it 4
    for max_steps, got, steps in ((4, 1, 4), (None, 4, 7)):
        rows, late = _rows(3, 10), _rows(6)
        r = gp.run_engine(rows, e, budget=4, max_steps=max_steps, new_rows=list(late))
        assert (late[0].have, rows[1].have, r.decode_steps) == (got, 4, steps)


def test_training_work_per_pass_by_hand():
    s = gp.Setting(prompts_per_step=1, samples_per_prompt=2, max_response_tokens=8, prompt_tokens=2)
    prefix, window, fin = np.array([2.0, 5.0]), np.array([3.0, 1.0]), np.array([6.0])
    tw = gp.train_work(gp.Arm("tppo", window=4), prefix, window, fin, s, update=True)
    w = tw["work"]
    assert (w["value_positions"], w["old_logprob_positions"], w["policy_positions"], w["critic_positions"]) == (11, 11, 11, 6)
    assert tw["tokens"]["policy_update"] == 4 * 11 and tw["tokens"]["value_update"] == 4 * 6  # forward, backward 2, recompute
    assert tw["pairs"]["values"] == 5 * 6 / 2 + 6 * 7 / 2
    # prefix_grad: false: a carried row's span starts at its last token before the window (shifted frame: prefix - 1)
    cheap = gp.train_work(gp.Arm("tppo", window=4, prefix_grad=False, engine_logprobs=True), prefix, window, fin, s, update=True)
    assert cheap["work"]["old_logprob_positions"] == 0 and cheap["work"]["policy_prefix_positions"] == 1 + 4
    assert cheap["work"]["policy_positions"] == 4 + 2 and cheap["tokens"]["policy_update"] == 5 + 4 * 6
    assert cheap["pairs"]["policy_update"] == (1 + 10) + 4 * ((15 - 1) + (21 - 10))  # the spans attend over the prefix
    grpo = gp.train_work(gp.Arm("grpo"), np.array([2.0]), np.array([4.0]), np.array([6.0]), s, update=True)
    assert grpo["work"]["value_positions"] == grpo["work"]["critic_positions"] == 0 and grpo["work"]["policy_positions"] == 6
    warm = gp.train_work(gp.Arm("ppo"), np.array([2.0]), np.array([4.0]), np.array([6.0]), s, update=False)
    assert warm["work"]["policy_positions"] == 0 and warm["work"]["critic_positions"] == 6
    # the library's token-budget micro-batches: padded to each one's longest row (tppo/batching.py)
    packed = dataclasses.replace(s, micro_batch_tokens=10, micro_batch_rows=4)
    assert gp.positions(np.array([5, 4, 2]), packed) == 2 * 5 + 1 * 2 and gp.positions(np.array([5, 4, 2]), s) == 11
    # prefix_grad: false as the library runs it: the step's widest prefix (3) in every micro-batch, each one's longest span
    assert gp.split_positions(np.array([5, 4, 2]), np.array([3, 0, 1]), packed) == (3 * 2 + 3 * 1, 2 * 4 + 1 * 1)
    assert gp.split_positions(np.array([5, 4, 2]), np.array([3, 0, 1]), s) == (4, 7)
    # a row in its first window has no prefix, nor a finished correct row under the LM loss: the whole row gets the gradient
    first = gp.train_work(gp.Arm("tppo", window=4, prefix_grad=False), prefix, window, fin, s, update=True,
                          carried=np.array([False, True]))
    assert (first["work"]["policy_prefix_positions"], first["work"]["policy_positions"]) == (4, 5 + 2)
    assert first["tokens"]["policy_update"] == 4 + 4 * 7
    whole = gp.train_work(gp.Arm("tppo", window=4, prefix_grad=False), prefix, window, fin, s, update=True,
                          whole=np.array([False, True]))
    assert (whole["work"]["policy_prefix_positions"], whole["work"]["policy_positions"]) == (1, 4 + 6)
    assert list(gp.whole_rows(np.array([True, False, True, True, True]), 0.5)) == [False, False, True, False, True]


def test_a_synchronous_step_waits_for_the_slowest_engine():
    s = gp.Setting(prompts_per_step=2, samples_per_prompt=1, max_response_tokens=100, prompt_tokens=0, engines=2)
    e = _eng(step_overhead_s=1.0)
    r = gp.simulate(np.array([100, 10] * 10), s, e, gp.Arm(), steps=3)
    assert r["generate_s"] == pytest.approx(3 * 100.0) and r["work"]["decode_steps"] == 300
    assert [len(x) for x in gp.deal(_rows(1, 2, 3, 4, 5), 2)] == [3, 2]


def test_arms_trained_beside_one_rollout_are_costed_as_if_simulated_alone():
    s = gp.Setting(prompts_per_step=4, samples_per_prompt=2, max_response_tokens=64, prompt_tokens=5, engines=2)
    lengths = gp.lognormal_lengths(8 * 40, median=16, sigma=1.0, cap=64)
    e = gp.Engine.derive(gp.QWEN_32B, gp.H100, tp=4)
    both = gp.simulate(lengths, s, e, gp.Arm("ppo"), steps=5, trained=[gp.Arm("ppo"), gp.Arm("grpo")])
    assert both["grpo"]["s_per_prompt"] == pytest.approx(gp.simulate(lengths, s, e, gp.Arm("grpo"), steps=5)["s_per_prompt"])
    assert both["grpo"]["train_s"] < both["ppo"]["train_s"], "no critic"


def test_tppo_equals_ppo_when_the_window_covers_equal_lengths():
    s = gp.Setting(prompts_per_step=4, samples_per_prompt=2, max_response_tokens=64, prompt_tokens=5, engines=2)
    lengths = np.full(8 * 30, 64)
    e = gp.Engine.derive(gp.QWEN_32B, gp.H100, tp=4)
    ppo = gp.simulate(lengths, s, e, gp.Arm(), steps=5)
    tppo = gp.simulate(lengths, s, e, gp.Arm("tppo", window=64), steps=5)
    assert tppo["prompts_per_hour"] == pytest.approx(ppo["prompts_per_hour"], rel=1e-9)


def test_windowing_and_refill_help_a_long_tail_when_decode_steps_dominate():
    s = gp.Setting(prompts_per_step=8, samples_per_prompt=4, max_response_tokens=256, prompt_tokens=5)
    lengths = gp.lognormal_lengths(32 * 300, median=20, sigma=1.0, cap=256)
    e = _eng(step_overhead_s=1.0)
    ppo = gp.simulate(lengths, s, e, gp.Arm(), steps=20)
    tppo = gp.simulate(lengths, s, e, gp.Arm("tppo", window=32), steps=60)
    refill = gp.simulate(lengths, s, e, gp.Arm("tppo", window=32, refill=True, window_mode="steps"), steps=60)
    assert tppo["prompts_per_hour"] > 2 * ppo["prompts_per_hour"]
    assert refill["decode_steps_per_1000_prompts"] < tppo["decode_steps_per_1000_prompts"]


def test_derived_engine_from_the_data_sheet():
    e = gp.Engine.derive(gp.QWEN_32B, gp.H100, tp=4, activation_bytes=0.0)
    kv_per_gpu = 2 * 64 * 8 * 128 * 2 / 4  # K and V, 64 layers, 8 KV heads of 128, bf16, over 4 GPUs
    assert e.kv_capacity_tokens == pytest.approx((81559 * 2**20 * 0.9 - 2 * 32.8e9 / 4) / kv_per_gpu)
    assert e.weight_read_s == pytest.approx(2 * 32.8e9 / 4 / 3.35e12)


def test_learning_factors_are_per_arm_paired_by_seed_and_keep_misses():
    curve = lambda *acc: [{"prompts": 100 * (i + 1), "accuracy": a} for i, a in enumerate(acc)]  # noqa: E731
    study = {"initial_accuracy": 0.2, "target_accuracy": 0.3,
             "arms": {"ppo": {"seeds": [0, 1]}, "tppo": {"seeds": [0, 1]}, "grpo": {"seeds": [0, 1]}},
             "results": {"ppo/s0": {"curve": curve(0.25, 0.3)}, "ppo/s1": {"curve": curve(0.3, 0.4)},
                         "tppo/s0": {"curve": curve(0.3, 0.3)}, "tppo/s1": {"curve": curve(0.2, 0.2)},
                         "grpo/s0": {"curve": curve(0.4, 0.4)}, "grpo/s1": {"curve": curve(0.25, 0.35)}}}
    lf = gp.learning_factors(study)
    assert lf["tppo"]["prompts_to_target"] == [100.0, None] and lf["tppo"]["baseline_prompts_to_target"] == [200.0, 100.0]
    assert lf["tppo"]["median"] == pytest.approx((200 / 100 + 0.0) / 2) and lf["tppo"]["n"] == 2  # the miss counts 0
    assert gp.learning_factors(study, "grpo")["tppo"]["baseline_prompts_to_target"] == [pytest.approx(50.0), 150.0]
    assert not lf["tppo"]["decided"] and not lf["tppo"]["power_holds"]  # the study has no power section
    assert gp.learning_factors({**study, "power": {"holds": True}})["tppo"]["power_holds"]


def test_projection_quick_writes_every_section(tmp_path):
    out = tmp_path / "p.json"
    assert gp.main(["--quick", "--steps", "2", "--out", str(out), "--study", str(tmp_path / "none.json")]) == 0
    import json

    res = json.loads(out.read_text())
    assert len(res["conditions"]) == 2 * 3 * 2  # engines x lengths x updates
    row = res["conditions"]["2 engines, median L/6, exact"]
    assert {"tppo_over_ppo", "tppo_over_grpo", "sentence"} <= set(row) and row["tppo_over_ppo"]["end_to_end"] > 0
    assert {"learning", "cpu_check", "commit", "machine"} <= set(res)
    table = gp.markdown(res).splitlines()
    assert len(table) == 2 + len(res["conditions"])  # head, rule, one line per condition
    assert table[2].startswith(f"| 2 | L/12 | exact | {row_x(res, '2 engines, median L/12, exact')}")


def row_x(res: dict, key: str) -> str:
    p = res["conditions"][key]["tppo_over_ppo"]
    return f"{p['end_to_end']:.2f}x / {p['rollout']:.2f}x"


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


def test_projection_reads_the_constants_gpu_check_fitted(tmp_path):
    """An engine from gpu_check.json's fit reproduces the fitted step time a + b B + c B C."""
    import json

    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"machine": "unit", "fit": {"m": {"decode_step_s": 0.01, "decode_row_s": 2e-4, "kv_token_s": 3e-8}},
                                "train_token_s": {"m": 1e-5}}))
    (e,) = gp.fitted_engines(path)
    assert e.decode_s(1, rows=64, context=64 * 4096) == pytest.approx(0.01 + 2e-4 * 64 + 3e-8 * 64 * 4096)
    assert e.train_token_s == 1e-5 and gp.fitted_engines(tmp_path / "absent.json") == []


def test_rollout_benchmark_quick_runs_at_head(tmp_path):
    """`make bench-rollout`'s script, reduced: it imports what the engine exports now."""
    import json

    import bench_rollout

    out = tmp_path / "rollout.json"
    res = bench_rollout.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["per_config"].keys() == res["per_config"].keys()
    assert {"naive", "compact", "windowed_W=L/4", "windowed+refill_W=L/4"} <= set(res["per_config"])
    # every configuration generated the same forced lengths; windows fill more slots than naive padding
    assert res["slot_utilization"]["windowed"] > res["slot_utilization"]["naive"]


# ---------------------------------------------------------------------- the speed study (#20)


def test_speed_study_arms_share_every_optimisation_but_what_defines_them():
    import speed_study as ss

    from tppo.config import load_config

    defining = {"algo.algorithm", "rollout.window_tokens", "algo.train_on", "algo.behavior_correction",
                "rollout.refill_within_window", "rollout.window_mode", "algo.prefix_grad"}
    for arm in ss.ARMS:
        ov = ss.arm_overrides(arm)
        assert all(c in ov for c in ss.COMMON), arm
        keys = {o.split("=")[0] for o in ov if o not in ss.COMMON}
        assert keys <= defining, (arm, keys - defining)
        load_config(ss.DEMO, ov)  # every arm is a valid config
    assert set(ss.MAIN_ARMS) <= set(ss.ARMS) and "train.micro_batch_tokens=4096" in ss.COMMON
    assert set(ss.APPROXIMATIONS) == {a for a in ss.ARMS if "algo.prefix_grad=false" in ss.ARMS[a]}


def test_speed_study_jobs_rotate_arms_and_give_variants_fewer_seeds():
    import speed_study as ss

    jobs = ss.build_jobs(["ppo", "tppo", "tppo-auto"], seeds=3, variant_seeds=1)
    assert jobs[0].name == "init/s0"
    assert [j.name for j in jobs[1:]] == ["ppo/s0", "tppo/s0", "tppo-auto/s0", "tppo/s1", "ppo/s1", "ppo/s2", "tppo/s2"]


def test_eval_standard_error_bootstrap_matches_the_closed_form():
    import random

    import stats
    from tppo.evaluation import avg_at_k_se

    rng = random.Random(3)  # problems of varied difficulty, 4 samples each: both terms matter
    correct = [[rng.random() < q for _ in range(4)] for q in (rng.random() for _ in range(300))]
    assert stats.eval_standard_error(correct, draws=2000) == pytest.approx(avg_at_k_se(correct), rel=0.06)


def test_eval_standard_error_matches_the_binomial_one():
    """k = 1 sample per problem, n problems at accuracy p: SE = sqrt(p (1 - p) / n)."""
    import stats

    correct = [[True]] * 300 + [[False]] * 700
    assert stats.eval_standard_error(correct, draws=1000) == pytest.approx((0.3 * 0.7 / 1000) ** 0.5, rel=0.1)
    # samples within a problem that always agree add nothing: SE is the problems' alone
    same = [[True] * 4] * 300 + [[False] * 4] * 700
    assert stats.eval_standard_error(same, draws=1000) == pytest.approx((0.3 * 0.7 / 1000) ** 0.5, rel=0.1)


def test_time_ratios_keep_the_seeds_that_missed_the_target():
    import stats

    assert stats.seed_ratios([10.0, 10.0, None, None], [5.0, None, 4.0, None]) == [2.0, 0.0, float("inf")]
    ci = stats.time_ratio_ci([2.0, 0.0, float("inf")], draws=500)
    assert ci["median"] == 2.0 and ci["n"] == 3 and ci["ci_low"] == 0.0 and ci["ci_high"] == float("inf")
    tight = stats.time_ratio_ci([1.5] * 5, draws=200)
    assert tight["ci_low"] == tight["ci_high"] == tight["median"] == 1.5
    assert stats.time_ratio_ci([]) == {"median": None, "ci_low": None, "ci_high": None, "n": 0}


def test_value_at_interpolates_and_never_extrapolates():
    import stats

    assert stats.value_at([0.0, 10.0, 20.0], [0.3, 0.5, 0.4], 5.0) == pytest.approx(0.4)
    assert stats.value_at([0.0, 10.0], [0.3, 0.5], 10.0) == 0.5
    assert stats.value_at([0.0, 10.0], [0.3, 0.5], 11.0) is None


def test_speed_study_quick_runs_end_to_end(tmp_path):
    """`python benchmarks/speed_study.py --quick`: the four main arms, one seed, tiny; the
    JSON has the fields the study of record reports."""
    import json

    import speed_study as ss

    out = tmp_path / "study.json"
    assert ss.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"commit", "machine", "seeds", "initial_accuracy", "eval_se", "target_accuracy", "arms", "ratios"} <= set(res)
    # the warm-start it ran from, named by its weights (runs/ caches it across code changes)
    import hashlib

    weights = Path(res["sft"]["dir"]) / "model.safetensors"
    assert res["sft"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(res["arms"]) == set(ss.MAIN_ARMS) and set(res["ratios"]) == set(ss.MAIN_ARMS) - {"ppo"}
    for arm, a in res["arms"].items():
        assert a["overrides"] == ss.arm_overrides(arm) and len(a["final_accuracy"]) == len(a["time_to_target_s"]) == 1
        assert a["work"]["work/decode_steps"] > 0 and a["work"]["work/policy_positions"] > 0
        assert (a["work"]["work/value_positions"] == 0) == (arm == "grpo")  # GRPO runs no value pass
        run = res["results"][f"{arm}/s0"]
        # every admitted row, once, in admission order: its tokens are every token the run generated
        assert len(run["rows"]) == run["prompts"] * 4 and sum(r[1] for r in run["rows"]) == sum(s["rollout/generated_tokens"] for s in run["per_step"])
        assert all(f in (0, 1) and c <= f for *_, f, c in run["rows"]) and sum(r[2] for r in run["rows"]) >= len(run["rows"]) / 2
    assert res["target_accuracy"] >= res["initial_accuracy"] + 3 * res["eval_se"]
    for r in res["ratios"].values():
        assert {"median", "ci_low", "ci_high", "n"} == set(r["per_prompt"]) and r["per_prompt"]["n"] == 1
    cm = res["cost_model"]  # fitted on PPO's run, checked on every other arm's
    assert cm["calibration"] == ["ppo/s0"] and set(cm["relative_error"]) == set(ss.MAIN_ARMS) - {"ppo"}
    assert cm["measured_against"] == "speed probe" and set(cm["run_speed"]) == {f"{a}/s0" for a in ss.MAIN_ARMS}
    assert all(s["probe/decode_s"] > 0 and s["probe/dense_s"] > 0 for r in res["results"].values() for s in r.get("per_step", []))
    # the projection's CPU check replays each run's rows: every work counter the trainer logged, exactly
    check = gp.cpu_check(res)
    assert set(check["arms"]) == set(ss.MAIN_ARMS) - {"ppo"}
    for arm, c in check["arms"].items():
        assert c["admitted_over_run"] == 1.0 and len(c["work_relative_error"]) >= 7, arm
        assert c["work_relative_error"] == pytest.approx(dict.fromkeys(c["work_relative_error"], 0.0), abs=1e-12), arm


def test_lora_benchmark_quick_runs_end_to_end(tmp_path):
    """`python benchmarks/lora.py --quick`: both arms on the tiny model; LoRA trains a few
    percent of the weights, and its critic holds no second copy of the backbone."""
    import json

    pytest.importorskip("peft")
    import lora as bench

    out = tmp_path / "lora.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    full, lo = res["arms"]["full"], res["arms"]["lora"]
    assert full["policy_trainable"] == full["held_parameters"] - full["critic_trainable"], "a full critic: two backbones"
    assert 0 < res["lora_over_full"]["trainable"] < 0.2
    assert lo["held_parameters"] < 1.2 * full["policy_trainable"], "one backbone (the policy's), the adapters and heads"
    assert lo["steps"] == full["steps"] == 2 and lo["peak_rss_mib"] > 0


def test_cost_model_recovers_known_unit_costs_and_predicts_another_run():
    import cost_model as cm

    rng = np.random.default_rng(0)
    truth = {"work/decode_steps": 2e-3, "work/row_steps": 1e-4, "work/kv_positions": 2e-7, "work/cache_positions": 1e-7, "work/prefill_tokens": 5e-6,
             "work/prefill_positions": 6e-6, "work/prefill_calls": 3e-3, "work/copy_positions": 4e-8, "work/value_positions": 3e-6,
             "work/policy_positions": 9e-6, "work/policy_prefix_positions": 3e-6, "work/critic_positions": 8e-6}

    def steps(n, decode, rows):
        out = []
        for _ in range(n):
            w = {"work/decode_steps": int(rng.integers(*decode)), "work/prefill_tokens": int(rng.integers(500, 3000)),
                 "work/value_positions": int(rng.integers(5e3, 2e4)), "work/policy_positions": int(rng.integers(5e3, 2e4)),
                 "work/policy_prefix_positions": 0, "work/critic_positions": int(rng.integers(2e3, 1e4)), "work/old_logprob_positions": 0}
            w["work/row_steps"] = w["work/decode_steps"] * int(rng.integers(*rows))
            w["work/kv_positions"] = w["work/row_steps"] * int(rng.integers(20, 300))  # the rows' contexts vary apart
            w["work/cache_positions"] = w["work/kv_positions"] + w["work/row_steps"] * int(rng.integers(0, 64))  # the cache's unused tail
            w["work/prefill_calls"], w["work/copy_positions"] = int(rng.integers(1, 12)), int(rng.integers(0, 10**5))
            w["work/prefill_positions"] = w["work/prefill_tokens"] + int(rng.integers(0, 2000))  # left padding
            t = {f"time/{p}_s": sum(truth.get(k, 0) * w[k] for k in keys) for p, keys in cm.PHASE_WORK.items()}
            out.append({**w, **t})
        return out

    costs = cm.fit(steps(40, (20, 256), (4, 64)))
    for phase, units in costs.items():
        for k, c in units.items():
            if k in ("work/policy_prefix_positions", "work/old_logprob_positions"):
                assert c == 0.0  # never varied: no cost to fit, none made up
            else:
                assert c == pytest.approx(truth[k], rel=1e-6), (phase, k)
    other = steps(30, (60, 65), (30, 64))
    run = {"work": {k: sum(s[k] for s in other) for k in truth | {"work/old_logprob_positions": 0}},
           "phase_s": {p: sum(s[f"time/{p}_s"] for s in other) for p in cm.PHASE_WORK}}
    errors = cm.relative_errors(costs, run)
    assert errors["old_logprobs"] is None and all(abs(e) < 1e-6 for p, e in errors.items() if e is not None)


def test_the_study_calibrates_on_every_arms_first_seed_where_ppo_alone_cannot_tell_prefill_apart():
    """PPO's steps prefill the same prompts every step (prefill in a fixed ratio to its
    decode steps); a windowed arm re-prefills its carried rows. Fitted on PPO alone, the
    prefill's cost hides in the decode step's and the windowed arm is mispredicted; fitted
    on every arm's first seed, the other seeds are predicted exactly."""
    import speed_study as ss

    rng = np.random.default_rng(1)
    gen = {"work/decode_steps": 2e-3, "work/prefill_tokens": 1e-4}

    def run(windowed: bool) -> dict:
        steps = []
        for _ in range(12):
            d = int(rng.integers(40, 256)) if not windowed else 64
            w = {"work/decode_steps": d, "work/row_steps": 0, "work/kv_positions": 0,
                 "work/prefill_tokens": int(rng.integers(100, 4000)) if windowed else 5 * d}
            steps.append({**w, "time/generate_s": sum(c * w[k] for k, c in gen.items())})
        return {"per_step": steps, "work": {k: sum(s[k] for s in steps) for k in steps[0] if k.startswith("work/")},
                "phase_s": {"generate": sum(s["time/generate_s"] for s in steps)}}

    results = {f"{arm}/s{seed}": run(arm == "tppo") for arm in ("ppo", "tppo") for seed in (0, 1)}
    slow = run(True)  # a run the machine made 1.2x slower in every phase: the factor, not the model
    results["tppo/s2"] = {**slow, "phase_s": {p: 1.2 * t for p, t in slow["phase_s"].items()}}
    cm = ss.cost_model_check(results)
    assert cm["calibration"] == ["ppo/s0", "tppo/s0"] and cm["lengths_run"] == "ppo/s0"
    assert cm["measured_against"] == "seconds" and "seconds" not in cm  # no run logged the probe
    assert cm["run_factor"]["tppo/s2"] == pytest.approx(1 / 1.2 - 1) and abs(cm["run_factor"]["tppo/s1"]) < 1e-6
    assert abs(cm["phase_share_error"]["tppo"]["generate"]) < 1e-6
    assert abs(cm["relative_error"]["ppo"]["generate"]) < 1e-6
    assert cm["relative_error"]["tppo"]["generate"] == pytest.approx((0 + (1 / 1.2 - 1)) / 2)  # the median of s1 and s2
    assert cm["ppo_only"]["calibration"] == ["ppo/s0"] and abs(cm["ppo_only"]["relative_error"]["tppo"]["generate"]) > 0.1


def _probed_run(rng, factor: float, decode: float, dense: float) -> dict:
    """Ten steps of known work whose seconds are ``factor`` x the truth, with a speed probe
    that saw the same machine, within +-2 % on every step (so its median is too)."""
    steps = []
    for _ in range(10):
        w = {"work/decode_steps": int(rng.integers(40, 256)), "work/value_positions": int(rng.integers(5e3, 2e4))}
        steps.append({**w, "time/generate_s": factor * 2e-3 * w["work/decode_steps"], "time/values_s": factor * 3e-6 * w["work/value_positions"],
                      "probe/decode_s": factor * decode * rng.uniform(0.98, 1.02), "probe/dense_s": factor * dense * rng.uniform(0.98, 1.02)})
    return {"per_step": steps, "work": {k: sum(s[k] for s in steps) for k in steps[0] if k.startswith("work/")},
            "phase_s": {p: sum(s[f"time/{p}_s"] for s in steps) for p in ("generate", "values")}}


def test_the_speed_probe_measures_the_machines_drift_the_counts_cannot():
    """Runs whose seconds the machine stretched 0.8x-1.3x, their probes with them: in probe-seconds the
    other seeds are predicted to the probe's noise (within (1.02 / 0.98)^2 - 1), in plain seconds
    each run is off by its factor; the run speed is the median of each probe per step."""
    import cost_model as cm
    import speed_study as ss

    rng = np.random.default_rng(3)
    factors = {"ppo/s0": 1.0, "ppo/s1": 1.3, "ppo/s2": 0.8, "tppo/s0": 1.1, "tppo/s1": 1.25}
    results = {k: _probed_run(rng, f, 0.02, 0.05) for k, f in factors.items()}
    check = ss.cost_model_check(results)
    assert check["measured_against"] == "speed probe" and check["seconds"]["measured_against"] == "seconds"
    speed = check["run_speed"]["ppo/s1"]
    assert speed["generate"] == pytest.approx(np.median([s["probe/decode_s"] for s in results["ppo/s1"]["per_step"]]))
    assert speed["values"] == speed["policy_update"] == pytest.approx(np.median([s["probe/dense_s"] for s in results["ppo/s1"]["per_step"]]))
    for arm, phases in check["relative_error"].items():
        assert all(abs(e) < 0.085 for e in phases.values()), (arm, phases)
    plain = check["seconds"]["run_factor"]
    assert plain["ppo/s1"] < -0.15 and plain["ppo/s2"] > 0.15  # the drift itself, in plain seconds
    assert all(abs(f) < 0.085 for f in check["run_factor"].values())
    assert check["run_factor_sd"] < 0.05 < 0.15 < check["seconds"]["run_factor_sd"]
    table = ss.cost_markdown({"arms": {"ppo": {}, "tppo": {}}, "cost_model": check}).splitlines()
    assert table[0] == "| arm | error per phase, speed probe | error per phase, plain seconds |" and len(table) == 5
    assert table[-1] == f"| SD of the runs' common factor | {check['run_factor_sd']:.1%} | {check['seconds']['run_factor_sd']:.1%} |"
    # the costs are in probe-seconds: predicting with the run's probe gives seconds back
    costs = check["unit_costs"]
    pred = cm.predict(costs, results["tppo/s1"]["work"], check["run_speed"]["tppo/s1"])
    assert pred["generate"] == pytest.approx(results["tppo/s1"]["phase_s"]["generate"], rel=0.085)
    results["ppo/s2"]["per_step"][4].pop("probe/dense_s")  # one step without the probe: no run is measured against it
    assert cm.run_speed(results["ppo/s2"]["per_step"]) is None and ss.cost_model_check(results)["measured_against"] == "seconds"


def test_the_powered_preset_sets_the_studys_size_and_yields_to_explicit_flags():
    import speed_study as ss

    args = ss.parse_args(["--powered"])
    assert (args.arms, args.prompts, args.eval_every, args.eval_problems, args.out) == (
        ["ppo", "tppo", "grpo", "partial-ppo"], 3072, 256, 2048, "speed_study_powered.json")
    assert args.seeds == 5 and args.eval_samples == 1  # what the preset leaves alone keeps its default
    mine = ss.parse_args(["--powered", "--prompts", "4096", "--arms", "ppo", "tppo"])
    assert (mine.prompts, mine.arms, mine.eval_problems) == (4096, ["ppo", "tppo"], 2048)
    assert ss.parse_args([]).prompts == 1024


def test_training_seconds_at_the_median_speed_take_the_drift_out_and_runs_reach_the_target_by_hand():
    """Run b did run a's work on a machine twice as slow (both probes doubled): at the
    study's median speed (1.5x a's probe, 0.75x b's) both take 31.5 s, the untimed second
    (a) and two (b) scaled with their phases. The target is crossed by interpolation."""
    import speed_study as ss

    def run(slow: float, untimed: float) -> dict:
        steps = [{"probe/decode_s": 0.02 * slow, "probe/dense_s": 0.05 * slow}] * 4
        return {"per_step": steps, "train_s": 20 * slow + untimed,
                "phase_s": {"generate": 10 * slow, "values": 5 * slow, "policy_update": 5 * slow, "score": 0.0}}

    results = {"a/s0": run(1.0, 1.0), "b/s0": run(2.0, 2.0)}
    steady = ss.steady_train_s(results)
    assert steady == pytest.approx({"a/s0": 21 * 30 / 20, "b/s0": 42 * 30 / 40}) and steady["a/s0"] == pytest.approx(31.5)
    results["b/s0"]["per_step"] = [{"probe/decode_s": 0.04}] * 4  # a run without the dense probe: no steady seconds at all
    assert ss.steady_train_s(results) is None
    curve = {"r/s0": {"curve": [{"prompts": 64, "elapsed_s": 10.0, "accuracy": 0.25}, {"prompts": 128, "elapsed_s": 20.0, "accuracy": 0.35}]}}
    assert ss.to_target(curve, 0.2, 0.3, "r/s0", "prompts") == pytest.approx(96.0)
    assert ss.to_target(curve, 0.2, 0.3, "r/s0") == pytest.approx(15.0)
    assert ss.to_target(curve, 0.2, 0.4, "r/s0") is None and ss.to_target(curve, 0.2, 0.3, "missing/s0") is None


def test_the_speed_probe_leaves_the_policy_and_the_random_streams_alone():
    import torch
    from speed_probe import SpeedProbe

    from tppo.config import TinyModelConfig
    from tppo.models import build_tiny

    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2))
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    probe = SpeedProbe(model, len(tok), decode_rows=4, decode_calls=2, dense_rows=2, dense_tokens=8)
    t = probe()
    assert set(t) == {"probe/decode_s", "probe/dense_s"} and all(v > 0 for v in t.values())
    assert torch.equal(torch.get_rng_state(), state), "the training's random stream moved"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and all(p.grad is None for p in model.parameters())
    assert probe.model is not model and all(p.grad is None for p in probe.model.parameters())


def test_split_run_factor_by_hand_and_a_uniformly_faster_run_moves_only_its_factor():
    import cost_model as cm

    f, r = cm.split_run_factor({"generate": 0.10, "values": 0.21, "policy_update": -0.01, "old_logprobs": None})
    assert f == pytest.approx(0.10)  # the median of 1.10, 1.21, 0.99
    assert r == pytest.approx({"generate": 0.0, "values": 0.10, "policy_update": -0.10})
    costs = {"generate": {"work/decode_steps": 2.0}, "values": {"work/value_positions": 0.5}}
    run = {"work": {"work/decode_steps": 10.0, "work/value_positions": 40.0}, "phase_s": {"generate": 25.0, "values": 16.0}}
    faster = {**run, "phase_s": {p: t / 1.25 for p, t in run["phase_s"].items()}}  # the machine, not the model
    f1, r1 = cm.split_run_factor(cm.relative_errors(costs, run))
    f2, r2 = cm.split_run_factor(cm.relative_errors(costs, faster))
    assert r1 == pytest.approx(r2) and (1 + f2) == pytest.approx(1.25 * (1 + f1))
    assert math.isnan(cm.split_run_factor({"values": None})[0])


def test_nnls_drops_a_negative_cost_and_refits():
    import cost_model as cm

    X = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    y = np.array([3.0, 2.0, 1.0])  # the best unconstrained fit has a negative slope
    coef = cm.nnls(X, y)
    assert coef[0] == 0.0 and coef[1] == pytest.approx(2.0)


def test_the_earlier_study_quick_runs_at_head(tmp_path, monkeypatch):
    """`python benchmarks/ppo_vs_tppo.py --quick` (the earlier study, kept for the record)."""
    import json

    monkeypatch.setattr(sys, "argv", ["ppo_vs_tppo.py", "--quick", "--name", str(tmp_path / "pvt")])
    assert pvt.main() == 0
    res = json.loads((tmp_path / "pvt.json").read_text())
    assert {"ppo", "tppo-W64"} <= set(res["summary"]["longtail"]["runs"]) and (tmp_path / "pvt.png").exists()


def test_a_study_journal_keeps_finished_runs_and_runs_only_the_rest(tmp_path):
    """benchmarks/common.run_job_subprocesses with a journal: a run already in it (same spec)
    is not run again, a changed spec is, a line cut short by a kill is ignored."""
    import json

    from common import run_job_subprocesses

    script = tmp_path / "bin" / "job.py"
    script.parent.mkdir()
    log = tmp_path / "ran.txt"
    script.write_text("import json, sys\nspec = json.loads(sys.argv[2])\n"
                      f"open({str(log)!r}, 'a').write(str(spec['x']) + '\\n')\nprint(json.dumps({{'y': 2 * spec['x']}}))\n")
    journal = tmp_path / "study.runs.jsonl"
    journal.write_text(json.dumps({"name": "a", "spec": {"x": 1}, "result": {"y": 2}}) + "\n"
                       + json.dumps({"name": "b", "spec": {"x": 5}, "result": {"y": 10}}) + "\n" + '{"name": "c", "sp')
    out = run_job_subprocesses(script, [("a", {"x": 1}), ("b", {"x": 2}), ("c", {"x": 3})], 2, str, journal=journal)
    assert out == {"a": {"y": 2}, "b": {"y": 4}, "c": {"y": 6}}
    assert sorted(log.read_text().split()) == ["2", "3"], "a was not run again; b's spec changed"
    again = run_job_subprocesses(script, [("a", {"x": 1}), ("b", {"x": 2}), ("c", {"x": 3})], 2, str, journal=journal)
    assert again == out and sorted(log.read_text().split()) == ["2", "3"]


@pytest.mark.parametrize("mode,pads", [("ppo", 0), ("tppo", 0), ("refill-tokens", 0), ("refill-steps", 0), ("tppo", 20),
                                       ("refill-tokens", 20), ("refill-steps", 20), ("near-cap", 0), ("auto", 0)])
def test_the_projection_counts_the_embedded_engines_work_exactly_on_the_same_rows(mode, pads, monkeypatch):
    """The model's window is the library's: the embedded engine on the countdown model
    (each prompt's rows write a known number of tokens, some past the cap) and the
    projection's lockstep simulation of the same rows, window for window, count the same
    decode steps, row-steps, KV and cache positions, prefill tokens and calls and copies.
    ``pads``: a fifth of the prompts that many tokens longer, so that a refill row whose
    prompt does not fit before the shared write position yet waits (embedded._admit's
    deferral); near-cap: a
    steps-mode window whose rows all end within W of the cap (its horizon is below W); auto:
    each window its own W (``rollout.window_tokens: auto``), replayed from the list."""
    from mock_models import BOS, EOS, PAD, count_token, countdown_model

    from tppo.config import RolloutConfig
    from tppo.rollout import EmbeddedEngine, PromptItem
    import tppo.rollout.embedded as emb
    from tppo.rollout.embedded import COMPACT_FRACTION

    deferred = []  # rows waiting after an in-window admission: prompts that did not fit yet
    admit = emb._Window._admit
    monkeypatch.setattr(emb._Window, "_admit", lambda self, s: (admit(self, s), deferred.append(len(self.engine._pending)))[0])
    rng = np.random.default_rng(3)
    if mode == "near-cap":  # A and B carried into window 2 with 1 and 2 tokens to go: C (3) joins when A ends, cut at 1
        L, W, G, pps, windows, lengths = 8, 6, 1, 2, 6, [7, 8, 3, 5, 7, 8, 2, 4, 5, 1] * 4
    else:
        L, W, G, pps, windows, lengths = 24, 6, 2, 4, 8, [int(x) for x in rng.integers(1, 31, 200)]
    prompts = [[BOS] * (pads if rng.random() < 0.2 else 0) + [BOS, count_token(n)] for n in lengths]
    refill, steps_mode = mode.startswith("refill") or mode == "near-cap", mode in ("refill-steps", "near-cap")
    cfg = RolloutConfig(prompts_per_step=pps, samples_per_prompt=G, window_tokens=L if mode == "ppo" else W, max_response_tokens=L,
                        refill_within_window=refill, window_mode="steps" if steps_mode else "tokens")
    eng = EmbeddedEngine(cfg, [PromptItem(i, p) for i, p in enumerate(prompts)], eos_token_ids=EOS, pad_token_id=PAD)
    model = countdown_model(32)
    chosen = [6, 2, 9, 4, 3, 7, 5, 8] if mode == "auto" else None  # each window's W, as auto chose them
    stats = [eng.generate_window(model, v, chosen[v] if chosen else None).stats for v in range(windows)]
    s = gp.Setting(prompts_per_step=pps, samples_per_prompt=G, max_response_tokens=L, prompt_tokens=2, compact_fraction=COMPACT_FRACTION,
                   lockstep=True)
    arm = gp.Arm("ppo") if mode == "ppo" else gp.Arm("tppo", window=W, refill=refill, window_mode="steps" if steps_mode else "tokens")
    cpu = gp.Engine("CPU (work only)", 0, 0, 0, 0, 0, 0, 0, 0, 0, combine="sum")
    rows = np.array([(len(p), min(n, L)) for p, n in zip(prompts, lengths) for _ in range(G)])
    sim = gp.simulate(rows, s, cpu, arm, steps=windows, windows=chosen)
    assert sum(st.prefill_calls for st in stats) > windows or not refill, "the case has in-window joins"
    assert sum(st.copy_positions for st in stats) > 0, "and compactions"
    assert any(deferred) or not (refill and pads), "and a refill row deferred"
    for key in gp.GEN_WORK:
        assert sim["work"][key] == sum(getattr(st, key) for st in stats), key


def test_static_cache_benchmark_quick_runs_at_head(tmp_path):
    """`python benchmarks/static_cache.py --quick`: every width x context case timed."""
    import json

    import static_cache

    assert static_cache.main(["--quick", "--out", str(tmp_path / "sc.json")]) == 0
    res = json.loads((tmp_path / "sc.json").read_text())
    assert len(res["decode_forward_ms"]) == 4 and all(v > 0 for v in res["decode_forward_ms"].values())
    assert res["width_ratio_at_short_context"] > 0 and res["context_ratio_at_widest"] > 0


def test_eval_batch_benchmark_quick_runs_at_head(tmp_path):
    """`python benchmarks/eval_batch.py --quick`: every batch size timed and scored."""
    import json

    import eval_batch

    assert eval_batch.main(["--quick", "--out", str(tmp_path / "eb.json")]) == 0
    res = json.loads((tmp_path / "eb.json").read_text())
    assert set(res["seconds"]) == {"4", "16"} and all(v > 0 for v in res["seconds"].values())
    assert res["speedup_over_fewest_rows"]["4"] == 1.0
    assert all(0 <= a["accuracy"] <= 1 for r in res["accuracy"].values() for a in r)


def test_write_json_puts_each_run_on_one_line_and_reads_back_equal(tmp_path):
    import json

    from common import write_json

    payload = {"b": [1, 2], "results": {"ppo/s0": {"rows": [[3, 4, 1, 0], [5, 6, 0, 0]], "x": "@@"}, "tppo/s0": {"rows": []}}, "a": {"c": 1.5}}
    path = write_json(tmp_path / "r.json", payload, one_line="results")
    text = path.read_text()
    assert json.loads(text) == payload
    lines = text.splitlines()
    assert sum('"ppo/s0": {"rows":[[3,4,1,0],[5,6,0,0]],"x":"@@"}' in ln for ln in lines) == 1  # one run, one line
    assert '  "b": [\n    1,' in text  # the rest indented as before
    assert json.loads(write_json(tmp_path / "e.json", {"results": {}}, one_line="results").read_text()) == {"results": {}}


def test_power_pilots_quick_runs_at_head(tmp_path):
    """`python benchmarks/power_pilots.py --quick`: the start, two pilots, their learning metrics by quarter."""
    import json

    import power_pilots

    assert power_pilots.main(["--quick", "--out", str(tmp_path / "pp.json")]) == 0
    res = json.loads((tmp_path / "pp.json").read_text())
    assert set(res["pilots"]) == {"ppo", "grpo"} and 0 <= res["initial_accuracy"] <= 1
    for p in res["pilots"].values():
        assert p["gain"] == pytest.approx(p["final_accuracy"] - res["initial_accuracy"])
        assert len(p["by_quarter"]["rollout/response_length"]) == 4 and p["by_quarter"]["rollout/response_length"][0] > 0
    assert res["pilots"]["grpo"]["by_quarter"]["value/explained_variance"] == [None] * 4  # GRPO has no critic
    assert not (tmp_path / "pp.runs.jsonl").exists()


_MV_TEST_ALL = '''
import pytest


def compare_strings(gold, pred, match_types=("latex", "expr"), precision=6, strict=True, allow_set_relation_comp=False):
    raise AssertionError("the benchmark reads this suite; it never runs it")


@pytest.mark.parametrize("gold,pred,expected", [("$2$", "so $\\\\boxed{2}$", 1), ("$3$", "so $\\\\boxed{4}$", 0)])
def test_numbers(gold, pred, expected):
    assert compare_strings(gold, pred) == expected


@pytest.mark.parametrize("gold,pred,expected", [("$9$", "Answer $ \\n 9 \\n $", 0)])
def test_latex_notation(gold, pred, expected):
    assert compare_strings(gold, pred, match_types=["latex"]) == expected


@pytest.mark.parametrize("gold,pred,expected", [("$1.23$", "$1.2$", 1)])
def test_rounding(gold, pred, expected):
    assert compare_strings(gold, pred, precision=1) == expected


@pytest.mark.parametrize("gold,pred,expected", [("$1$", "$1$", 1)])
def test_swapped(gold, pred, expected):
    assert compare_strings(pred, gold) == expected


def test_helper():
    assert compare_strings("$1$", "$1$") == 1
'''

_MV_OPEN_THOUGHTS = '''
import pytest

from tests.test_all import compare_strings


@pytest.mark.parametrize("gold,pred,expected", [("$\\\\frac{1}{2}$", "$\\\\boxed{\\\\frac{2}{4}}$", 1)])
def test_open_thoughts(gold, pred, expected):
    assert compare_strings(gold, pred) == expected
'''

_MV_NUMINA = '''
import pytest

from tests.test_all import compare_strings


@pytest.mark.parametrize("gold,pred,expected,strict", [("$10$", "$\\\\boxed{10}$", 1, True), ("$10$", "ten", 0, False)])
def test_numina(gold, pred, expected, strict):
    assert compare_strings(gold, pred, strict=strict) == expected
'''


def test_math_reward_agreement_runs_on_a_suite_of_math_verify_shape(tmp_path):
    """`benchmarks/math_reward_agreement.py` on a small suite shaped like math-verify's tests/
    (the real one is a checkout; tests/ has none): which tests and cases it keeps and why,
    every case scored by math_reward and math-verify, and a case that the test's narrower
    extraction targets decide (our verdict follows math-verify's default targets) counted so."""
    import json
    import subprocess

    suite = tmp_path / "mv" / "tests"
    suite.mkdir(parents=True)
    (suite / "__init__.py").write_text("")
    for name, text in [("test_all", _MV_TEST_ALL), ("test_open_thoughts", _MV_OPEN_THOUGHTS), ("test_numina_cases", _MV_NUMINA)]:
        (suite / f"{name}.py").write_text(text)
    out = tmp_path / "agreement.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "math_reward_agreement.py"
    proc = subprocess.run([sys.executable, str(script), "--math-verify-dir", str(suite.parent), "--math-verify-commit", "fixture",
                           "--workers", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["math_verify_commit"] == "fixture"
    assert {k: v["cases"] for k, v in res["per_file"].items()} == {"test_all": 3, "test_open_thoughts": 1, "test_numina_cases": 1}
    assert res["total"]["cases"] == 5 and res["total"]["agree"] == 4 and res["total"]["agreement_pct"] == 80.0
    reasons = {e["test"]: e["reason"] for e in res["excluded"]}
    assert set(reasons) == {"test_all.py::test_rounding", "test_all.py::test_swapped", "test_all.py::test_helper",
                            "test_numina_cases.py::test_numina"}
    assert reasons["test_all.py::test_rounding"].startswith("precision=1")
    assert "not (gold, pred)" in reasons["test_all.py::test_swapped"]
    assert reasons["test_all.py::test_helper"].startswith("no parametrized cases")
    assert reasons["test_numina_cases.py::test_numina"].startswith("strict=False")
    [d] = res["disagreements"]  # latex alone reads no answer in "$ \n 9 \n $"; latex + expr does
    assert d["test"] == "test_all.py::test_latex_notation" and (d["ours"], d["math_verify"], d["math_verify_default_targets"]) == (1, 0, 1)
    assert d["targets_decide"] and not d["timeout"]
    assert res["total"]["targets_decide"] == 1 and res["total"]["agreement_pct_targets_not_deciding"] == 100.0
    assert res["total"]["math_verify_agrees"] == 5


def test_condition_row_says_why_time_to_target_is_undecided():
    """A condition's time to target: throughput x the CPU's learning factor where its CI is on
    one side of 1, else undecided with the reason: no factor at all (no seed where both arms
    reached the target), a study whose power rule failed, or a CI that spans 1."""
    res = {arm: {"s_per_prompt": s, "generate_s_per_prompt": s / 2, "preemptions": 0}
           for arm, s in (("tppo", 1.0), ("ppo", 2.0), ("grpo", 1.5))}
    none = gp.condition_row(res, {}, 16, "L/6", "exact")
    assert none["tppo_over_ppo"]["end_to_end"] == pytest.approx(2.0) and none["tppo_over_ppo"]["rollout"] == pytest.approx(2.0)
    assert none["tppo_over_ppo"]["time_to_target"] is None
    assert "no learning factor" in none["tppo_over_ppo"]["undecided_because"] and "no learning factor" in none["sentence"]
    weak = gp.condition_row(res, {"ppo": {"tppo": {"median": 0.8, "ci_low": 0.6, "ci_high": 0.9, "power_holds": False}}}, 16, "L/6", "exact")
    assert weak["tppo_over_ppo"]["time_to_target"] is None and "power rule fails" in weak["sentence"]
    spans = gp.condition_row(res, {"ppo": {"tppo": {"median": 0.6, "ci_low": 0.2, "ci_high": 0.9, "power_holds": True}}}, 16, "L/6", "exact")
    assert spans["tppo_over_ppo"]["time_to_target"] is None and "spans 1" in spans["sentence"]  # 2 x [0.2, 0.9] = [0.4, 1.8]
    decided = gp.condition_row(res, {"ppo": {"tppo": {"median": 0.8, "ci_low": 0.6, "ci_high": 0.9, "power_holds": True}}}, 16, "L/6", "exact")
    ttt = decided["tppo_over_ppo"]["time_to_target"]
    assert (ttt["median"], ttt["ci_low"], ttt["ci_high"]) == pytest.approx((1.6, 1.2, 1.8))
    assert decided["tppo_over_ppo"]["undecided_because"] is None and "to the target 1.60x [1.20, 1.80]" in decided["sentence"]
