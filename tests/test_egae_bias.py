"""The EGAE truncation-bias diagnostic (tppo/egae_bias.py) and the partial-trajectory
metrics (tppo/monitoring.py): hand-computed bookkeeping, a naive reference, resume."""

from __future__ import annotations

import math

import pytest
import torch

from tppo.egae_bias import MODES, CutWindow, TruncationTracker, agreement, agreement_from_sums, agreement_sums, compare_row
from tppo.monitoring import carry_metrics, round_metrics
from tppo.rollout import Row


def row(uid, prompt_len, response, windows, finished):
    return Row(uid, uid, 0, [9] * prompt_len, {}, 100, list(response), [0.0] * len(response), [0] * len(response),
               windows=windows, finish_reason="eos" if finished else None)


def test_a_row_cut_twice_by_hand():
    """Prompt of 1 token, response of 6 in three windows of 2, a new critic each step.
    Frame: values_full[:, p] is V(state ending at token p); response token t sits at p = 1 + t.
    lam = gamma = 1, so GAE over the whole response is R - V(s_t) and EGAE in a cut window is
    V_boot - V(s_t) with V_boot = V(s_{l-1}) (prev_value), V(s_l) (next_value) or 0 (zero)."""
    tracker = TruncationTracker(gamma=1.0, configured="prev_value")
    steps = [  # (values_full over prompt + response so far, response so far, window start, reward)
        (torch.tensor([[0.1, 0.2, 0.3]]), [5, 6], 0, None),                     # V(s0)=.1 V(s1)=.2, V(s2)=.3 after the cut
        (torch.tensor([[0.0, 0.0, 0.35, 0.4, 0.5]]), [5, 6, 7, 8], 2, None),     # V(s2)=.35 V(s3)=.4, V(s4)=.5 after the cut
        (torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.6, 0.7, 0.0]]), [5, 6, 7, 8, 9, 2], 4, 1.0),  # V(s4)=.6 V(s5)=.7, reward 1
    ]
    for k, (values, response, start, reward) in enumerate(steps, start=1):
        m = tracker.observe([row(0, 1, response, k, reward is not None)], [start], values, [reward], 1.0)
    assert not tracker.cut and m["egae/rows_compared"] == 1
    # GAE on the 4 cut tokens: 1 - (.1, .2, .35, .4) = (.9, .8, .65, .6)
    # prev_value: (.2-.1, 0, .4-.35, 0) -> diffs (-.8, -.8, -.6, -.6); signs (+, 0, +, 0) vs all +
    assert m["egae/prev_value/advantage_mae"] == pytest.approx(0.7)
    assert m["egae/prev_value/advantage_bias"] == pytest.approx(-0.7)
    assert m["egae/prev_value/sign_agreement"] == pytest.approx(0.5)
    # next_value: (.3-.1, .3-.2, .5-.35, .5-.4) -> diffs (-.7, -.7, -.5, -.5)
    assert m["egae/next_value/advantage_mae"] == pytest.approx(0.6)
    assert m["egae/next_value/advantage_bias"] == pytest.approx(-0.6)
    assert m["egae/next_value/sign_agreement"] == 1.0
    # zero: (-.1, -.2, -.35, -.4) -> diffs all -1, every sign wrong
    assert m["egae/zero/advantage_mae"] == pytest.approx(1.0) and m["egae/zero/sign_agreement"] == 0.0
    # corr of next_value's (.2, .1, .15, .1) with (.9, .8, .65, .6)
    expected = torch.corrcoef(torch.tensor([[0.2, 0.1, 0.15, 0.1], [0.9, 0.8, 0.65, 0.6]], dtype=torch.float64))[0, 1]
    assert m["egae/next_value/advantage_corr"] == pytest.approx(float(expected))
    # the configured mode's stats are also logged unprefixed
    assert all(m[f"egae/{k}"] == m[f"egae/prev_value/{k}"] for k in ("advantage_mae", "advantage_bias", "sign_agreement"))


def naive_gae(values, reward, lam, gamma, last_value=0.0):
    """Textbook backward loop over one row."""
    adv, running = [0.0] * len(values), 0.0
    for t in reversed(range(len(values))):
        nxt = values[t + 1] if t + 1 < len(values) else last_value
        r = reward if t == len(values) - 1 else 0.0
        running = r + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_compare_row_matches_a_naive_loop_at_lambda_below_one():
    g = torch.Generator().manual_seed(0)
    windows = [CutWindow(torch.rand(n, generator=g).tolist(), float(torch.rand(1, generator=g)), lam) for n, lam in ((3, 0.9), (4, 0.95))]
    final, reward, final_lam, gamma = torch.rand(2, generator=g).tolist(), 1.0, 0.97, 0.99
    received, reference = compare_row(windows, final, reward, final_lam, gamma)
    all_values = windows[0].values + windows[1].values + final
    torch.testing.assert_close(reference, torch.tensor(naive_gae(all_values, reward, final_lam, gamma)[:7], dtype=torch.float64))
    for mode in MODES:
        expect = []
        for w in windows:
            boot = {"prev_value": w.values[-1], "next_value": w.next_value, "zero": 0.0}[mode]
            expect += naive_gae(w.values, 0.0, w.lam, gamma, last_value=boot)
        torch.testing.assert_close(received[mode], torch.tensor(expect, dtype=torch.float64))


def test_agreement_edge_cases():
    assert all(math.isnan(v) for v in agreement(torch.zeros(0), torch.zeros(0)).values())
    one = agreement(torch.tensor([1.0]), torch.tensor([-1.0]))
    assert one["advantage_bias"] == 2.0 and one["sign_agreement"] == 0.0 and math.isnan(one["advantage_corr"])


def test_agreement_sums_add_over_any_split_of_the_tokens():
    """What the ranks' all-reduce relies on: the statistics of the whole are those of the
    summed sums of its parts, and the correlation is Pearson's (torch.corrcoef)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    b = 0.6 * a + b
    whole = agreement(a, b)
    parts = agreement_from_sums(agreement_sums(a[:13], b[:13]) + agreement_sums(a[13:], b[13:]))
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-12)
    assert whole["advantage_corr"] == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), rel=1e-12)
    assert whole["advantage_mae"] == pytest.approx(float((a - b).abs().mean()))
    assert math.isnan(agreement(torch.full((5,), 0.3), b[:5])["advantage_corr"])  # a constant side


def test_tracker_metrics_are_the_whole_batch_with_an_all_reduce():
    """Two 'ranks' each cut and then finish one row; with an all-reduce that adds the other
    rank's tensor, each reports what one tracker seeing both rows in one batch reports."""
    rows_of = {0: (0.1, 1.0), 1: (0.5, 0.0)}  # uid: (first value, reward)

    def steps(uids):
        cut = ([row(u, 1, [5, 6], 1, False) for u in uids], [0] * len(uids),
               torch.tensor([[rows_of[u][0], rows_of[u][0] + 0.1, rows_of[u][0] + 0.2] for u in uids]), [None] * len(uids))
        done = ([row(u, 1, [5, 6, 7, 2], 2, True) for u in uids], [2] * len(uids),
                torch.tensor([[0.0, 0.0, rows_of[u][0], 0.3, 0.0] for u in uids]), [rows_of[u][1] for u in uids])
        return cut, done

    def run(tracker, uids, all_reduce=None):
        return [tracker.observe(*step, 1.0, all_reduce) for step in steps(uids)][-1]

    together = run(TruncationTracker(1.0, "prev_value"), [0, 1])
    sent = []
    run(TruncationTracker(1.0, "prev_value"), [1], lambda x: sent.append(x) or x)  # rank 1's tensors, step by step
    calls = iter(sent)
    rank0 = run(TruncationTracker(1.0, "prev_value"), [0], lambda x: x + next(calls))
    alone = run(TruncationTracker(1.0, "prev_value"), [0])
    assert together["egae/rows_compared"] == rank0["egae/rows_compared"] == 2 and alone["egae/rows_compared"] == 1
    for k, v in together.items():
        assert rank0[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    assert alone["egae/advantage_mae"] != pytest.approx(together["egae/advantage_mae"])


def test_tracker_state_round_trips():
    tracker = TruncationTracker(1.0, "prev_value")
    tracker.observe([row(7, 1, [5, 6], 1, False)], [0], torch.tensor([[0.1, 0.2, 0.3]]), [None], 1.0)
    other = TruncationTracker(1.0, "prev_value")
    other.load_state_dict(tracker.state_dict())
    assert other.cut == tracker.cut and 7 in other.cut


def test_round_and_carry_metrics_by_hand():
    rows = [row(0, 1, [5, 2], 1, True), row(1, 1, [5, 5, 5, 2], 2, True), row(2, 1, [5, 5, 5, 5], 2, False), row(3, 1, [5, 5], 1, False)]
    rows[1].versions = [0, 0, 1, 1]
    m = round_metrics(rows, [1.0, 0.0, None, None], max_windows=3)
    assert m["rounds/k1/finished_rows"] == 1 and m["rounds/k1/accuracy"] == 1.0 and m["rounds/k1/response_length"] == 2
    assert m["rounds/k2/finished_rows"] == 1 and m["rounds/k2/accuracy"] == 0.0 and m["rounds/k2/versions_per_response"] == 2
    assert m["rounds/k3/finished_rows"] == 0 and math.isnan(m["rounds/k3/accuracy"])
    # this window: rows 1 and 2 entered carried (2 tokens each of 2 + 2 + 2 + 2)
    c = carry_metrics(rows, [0, 2, 2, 0], carried=[rows[2], rows[3]])
    assert c["rollout/carried_token_share"] == 0.5 and c["rollout/oldest_row_windows"] == 2


# ---------------------------------------------------------------------- automatic window (tppo/window.py)


def test_window_prediction_by_hand():
    """Lengths 10 and 30, prompt 5, 2 slots, G = 1, 1 s per decode step, 0.01 s per context token.
    W = 10: windows (1, 3), E[n] = 2; every slot-window writes 10 tokens: 10 decode steps; context per
    slot-step (15 + (15 + 25 + 35)) / 4 = 22.5 -> 10 + 2 * 22.5 * 0.01 = 10.45 s; 2 / 2 / 10.45 prompts/s;
    cut windows hold 0 + 20 of 40 tokens. W = 30: one window each, E[max of 2 draws of {10, 30}] =
    10 + 20 * (1 - 0.5^2) = 25 steps, context (15 + 35) / 2 = 25 -> 25.5 s; 2 / 1 / 25.5 prompts/s."""
    from tppo.window import WindowHistory, choose_window, predict

    h = WindowHistory(lengths=[10, 30], prompt_lengths=[5, 5], decode_s_per_step=[1.0], other_s_per_token=[0.01], cut_token_error=[0.2])
    p10, p30 = predict(10, h, slots=2, group=1), predict(30, h, slots=2, group=1)
    assert p10.step_s == pytest.approx(10.45) and p10.prompts_per_s == pytest.approx(1 / 10.45)
    assert p10.truncation_error == pytest.approx(0.2 * 0.5)
    assert p30.step_s == pytest.approx(25.5) and p30.prompts_per_s == pytest.approx(2 / 25.5) and p30.truncation_error == 0
    h.lengths, h.prompt_lengths = [10, 30] * 8, [5] * 16  # enough lengths to choose
    assert choose_window(h, window_min=10, window_max=30, bias_cap=1.0, slots=2, group=1) == 10
    assert choose_window(h, window_min=10, window_max=30, bias_cap=0.05, slots=2, group=1) == 30  # the cap forbids cuts
    assert choose_window(WindowHistory(), window_min=10, window_max=30, bias_cap=1.0, slots=2, group=1) == 30  # warm-up


def test_auto_window_measures_the_error_before_trusting_throughput_and_refreshes_it():
    """(#21) With no truncation error measured yet, throughput alone would take the smallest
    W (predicted error 0): the first choice probes the mildest cut instead. Held at
    window_max by an old, bad estimate, it probes again after STALE_STEPS steps without a
    measurement, and a fresh, small error lets it cut."""
    from tppo.window import STALE_STEPS, WindowHistory, choose_window

    choose = lambda h: choose_window(h, window_min=10, window_max=40, bias_cap=0.05, slots=2, group=1)  # noqa: E731
    h = WindowHistory(lengths=[10, 40] * 8, prompt_lengths=[5] * 16, decode_s_per_step=[1.0], other_s_per_token=[0.001])
    assert choose(h) == 30  # not 10: nothing measured
    h.record(lengths=[], prompt_lengths=[], decode_s=1.0, decode_steps=1, other_s=0.1, context_tokens=10, egae_mae=0.9, rows_compared=2)
    assert choose(h) == 40  # a large error: no cut allowed
    for _ in range(STALE_STEPS):  # held at W = L nothing is cut, nothing measured
        assert choose(h) == 40
        h.record(lengths=[], prompt_lengths=[], decode_s=1.0, decode_steps=1, other_s=0.1, context_tokens=10, egae_mae=float("nan"),
                 rows_compared=0)
    assert choose(h) == 30  # the probe
    for _ in range(20):  # the critic learned: the probe's rows measure a small error
        h.record(lengths=[], prompt_lengths=[], decode_s=1.0, decode_steps=1, other_s=0.1, context_tokens=10, egae_mae=0.01, rows_compared=2)
    assert h.steps_since_error == 0 and choose(h) < 40


def test_auto_window_runs_logs_its_choice_and_resumes_exactly(model_dir, tmp_path, monkeypatch):
    """rollout.window_tokens=auto: W is logged every step and, given the run's history
    (checkpointed), chosen the same way after a resume. The choice reads the step's
    time/* metrics, so the test's clock counts model calls (as a memory-bound GPU pays
    for a decode step whatever the batch): the same work reads the same time in every
    run. Long-tailed lengths (3 of 4 prompts stop after 2 tokens, 1 at 18) make short
    windows pay, so the choice moves off the warm-up's W = L."""
    import time

    from tppo.trainer import Trainer, resume_config
    from trainer_helpers import capped_prompts, deterministic_metrics, make_cfg

    calls = [0]
    monkeypatch.setattr(time, "perf_counter", lambda: calls[0] * 0.01)

    def prepared(trainer):
        for model in (trainer.policy, trainer.critic):
            model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        capped_prompts(trainer, lambda pid: 18 if pid % 4 == 0 else 2)
        return trainer

    common = ("rollout.window_tokens=auto", "rollout.window_min=3", "train.total_steps=6", "log.checkpoint_every=2", "log.eval_every=2",
              "rollout.prompts_per_step=8", "rollout.window_bias_cap=10")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    prepared(Trainer(make_cfg(model_dir, full_dir, *common), full_dir)).train()
    prepared(Trainer(make_cfg(model_dir, cut_dir, *common, "train.total_steps=2"), cut_dir)).train()
    resumed = prepared(Trainer(resume_config(cut_dir, make_cfg(model_dir, cut_dir, *common)), cut_dir, resume=True))
    assert resumed.window_history.lengths, "the window history must survive the checkpoint"
    resumed.train()
    full = deterministic_metrics(full_dir)
    assert deterministic_metrics(cut_dir) == full
    windows = [m["rollout/window_tokens"] for m in full]
    assert windows[0] == 18 and min(windows) < 18, windows
