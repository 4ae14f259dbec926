"""Rewards: exact and math answers on a table of cases, and a scorer that survives faults."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

import reward_helpers
from tppo.config import ConfigError, load_config
from tppo.rewards import REWARD_FNS, RewardScorer, exact_reward, final_answer, last_boxed, math_reward

MATH_TABLE = [
    # (completion, gold, expected reward)
    ("\\boxed{ 42 }", "42", 1.0),
    ("so x = \\frac{1}{2}. \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is 0.5", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("Janet makes 18 dollars.\n#### 18", "18", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("\\boxed{42 \\text{ dollars}}", "42", 1.0),  # units
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{7}. Done! Great.", "7", 1.0),  # trailing text
    ("The answer is 42 apples", "42", 1.0),
    ("\\boxed{43}", "42", 0.0),  # wrong
    ("#### 17", "18", 0.0),
    ("\\boxed{", "42", 0.0),  # malformed
    ("", "42", 0.0),
    ("no number here", "42", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", MATH_TABLE)
def test_math_reward_table(completion, gold, expected):
    assert math_reward("", completion, gold) == expected


def test_math_reward_tuples_split_over_boxes():
    """One box per solution is read as the set of them, and every tuple has to match."""
    completion = "\\boxed{(2, 2)} and \\boxed{(6, 2)}"
    assert math_reward("", completion, "(2, 2), (6, 2)") == 1.0
    assert math_reward("", completion, "(2, 2), (6, 3)") == 0.0


MATH_CASES = Path(__file__).parent / "data" / "math_cases.jsonl"


def test_math_reward_agrees_with_math_verify_verdicts_on_written_cases():
    """Cases of our own writing, in the kinds math-verify's suites test, right and wrong. Each
    expected verdict is both math-verify's (gold and completion parsed as math_reward parses
    them, a bare gold in $...$) and the mathematically right one. Scored inline under the
    scorer's alarm, so a hang fails its case instead of the run."""
    cases = [json.loads(line) for line in MATH_CASES.read_text().splitlines() if line.strip()]
    scorer = RewardScorer("math", workers=0, timeout_s=10.0)
    rewards = scorer.score([""] * len(cases), [c["completion"] for c in cases], [c["gold"] for c in cases])
    failures = collections.defaultdict(list)
    for case, reward in zip(cases, rewards):
        if reward != case["expected"]:
            failures[case["category"]].append((case["completion"], case["gold"], case["expected"], reward))
    assert not failures, "\n".join(f"{category}: {len(f)} wrong: {f}" for category, f in sorted(failures.items()))


EXACT_TABLE = [
    ("38 29 20 11 2=2", "2", 1.0),
    ("38 29 20 11 2= 2 ", "2", 1.0),
    ("38 29 20 11 2=3", "2", 0.0),
    ("38 29 20 11 2", "2", 0.0),  # no final answer
    ("1=2=2", "2", 1.0),  # the last '=' counts
    ("#### 18", "18", 1.0),
    ("\\boxed{18} = 18", "18", 1.0),  # boxed wins over '='
    ("=", "2", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", EXACT_TABLE)
def test_exact_reward_table(completion, gold, expected):
    assert exact_reward("", completion, gold) == expected


def test_extraction_helpers():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer("no answer") is None
    assert set(REWARD_FNS) >= {"exact", "math"}


def test_scorer_inline_and_pool_agree():
    completions = [c for c, _, _ in MATH_TABLE]
    golds = [g for _, g, _ in MATH_TABLE]
    expected = [e for _, _, e in MATH_TABLE]
    with RewardScorer("math", workers=0) as inline, RewardScorer("math", workers=2) as pooled:
        assert inline.score([""] * len(golds), completions, golds) == expected
        assert pooled.score([""] * len(golds), completions, golds) == expected
        assert pooled.errors == pooled.timeouts == 0


def test_scorer_counts_errors_and_non_finite_as_zero():
    with RewardScorer(reward_helpers.boom, workers=1) as s:
        assert s.score(["p", "p"], ["a", "b"], ["x", "y"]) == [0.0, 0.0]
        assert s.errors == 2 and s.calls == 2
    s = RewardScorer(reward_helpers.nan_reward, workers=0)
    assert s.score(["p"], ["a"], ["x"]) == [0.0] and s.errors == 1


def test_scorer_times_out_python_level_hang_and_keeps_going():
    with RewardScorer(reward_helpers.hang_python, workers=2, timeout_s=0.5, batch_slack_s=2.0) as s:
        t0 = time.monotonic()
        assert s.score(["p"] * 3, ["a"] * 3, ["x"] * 3) == [0.0] * 3
        assert time.monotonic() - t0 < 5.0
        assert s.timeouts == 3 and s.pool_restarts == 0  # the alarm ended each call


def test_scorer_restarts_pool_on_hang_no_signal_can_stop():
    with RewardScorer(reward_helpers.hang_ignoring_alarm, workers=1, timeout_s=0.3, batch_slack_s=0.5) as s:
        assert s.score(["p"], ["a"], ["x"]) == [0.0]
        assert s.timeouts == 1 and s.pool_restarts == 1
        s.fns = [reward_helpers.length_reward]  # the restarted pool scores the next batch
        assert s.score(["p", "p"], ["ab", "abc"], ["x", "x"]) == [2.0, 3.0]


def test_math_verify_adversarial_power_is_survived():
    """A tower of powers scores 0 within the batch deadline, however this machine's sympy takes it.

    Here sympy computes 9^(9^(9^9)) in C, which no alarm interrupts: the batch deadline
    ends it, the pool restarts and the whole batch counts as timed out. Another build
    (e.g. sympy over gmpy2) may refuse the power at once; then nothing times out and the
    well-formed answer next to it must still score. The timeout machinery itself is
    pinned by the deterministic hangs above.
    """
    with RewardScorer("math", workers=1, timeout_s=1.0, batch_slack_s=1.0) as s:
        t0 = time.monotonic()
        rewards = s.score(["", ""], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{4}"], ["1", "4"])
        assert time.monotonic() - t0 < 10.0
        assert rewards[0] == 0.0 and s.calls == 2
        if s.timeouts:  # the alarm ended the call (pool intact), or the deadline the whole blocked batch
            assert (s.pool_restarts, rewards[1], s.timeouts) in {(0, 1.0, 1), (1, 0.0, 2)}
        else:
            assert rewards[1] == 1.0
        assert s.score([""], ["\\boxed{4}"], ["4"]) == [1.0]  # the scorer keeps going


def test_format_penalty():
    s = RewardScorer("exact", workers=0, format_penalty=0.5)
    assert s.score(["", ""], ["1 0=0", "1 0"], ["0", "0"]) == [1.0, -0.5]


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="task.reward 'bogus' is not a registered reward"):
        RewardScorer("bogus")


# ---------------------------------------------------------------------- rewards from the config (#23)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "rewards.py"


def test_a_reward_is_a_name_a_module_function_or_a_file_function(tmp_path):
    from tppo.rewards import REWARD_FNS, RewardSpecError, exact_reward, resolve_reward

    assert resolve_reward("math") is REWARD_FNS["math"] and resolve_reward("tppo.rewards:exact_reward") is exact_reward
    fn = resolve_reward(f"{EXAMPLES}:length_penalised_exact")
    assert fn("p", "x" * 300 + "=7", "7") == pytest.approx(1.0 - 0.001 * 102) and fn("p", "=8", "7") == 0.0
    (tmp_path / "two.py").write_text("def one(p):\n    return 1.0\nraise_it = 3\n")
    for spec, match in (("exact_match", "not a registered reward"), ("nope.module:f", "cannot import nope.module"),
                        (f"{tmp_path}/missing.py:f", "no file"), (f"{tmp_path}/two.py:absent", "has no function 'absent'"),
                        (f"{tmp_path}/two.py:raise_it", "has no function"), (f"{tmp_path}/two.py:one", "must accept")):
        with pytest.raises(RewardSpecError, match=match):
            resolve_reward(spec)


def test_a_reward_from_a_file_scores_in_worker_processes():
    from tppo.rewards import RewardScorer

    with RewardScorer(f"{EXAMPLES}:length_penalised_exact", workers=2, timeout_s=5) as scorer:
        assert scorer.score(["p"] * 3, ["=7", "=8", "x" * 250 + "=7"], ["7"] * 3) == pytest.approx([1.0, 0.0, 1.0 - 0.001 * 52])
    assert scorer.errors == 0


def test_a_wrong_reward_is_one_line_and_exit_2_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import time

    import tppo.trainer
    from tppo.cli import main

    monkeypatch.setattr(tppo.trainer, "load_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model loaded")))
    t0 = time.perf_counter()
    assert main(["train", "--run-dir", str(tmp_path / "r"), "task.reward=exact_match"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 10 and err.count("\n") == 1 and "Traceback" not in err and "'exact_match'" in err
    (tmp_path / "bad.py").write_text("def r(p, c, a):\n    raise KeyError('column')\n")
    assert main(["train", "--run-dir", str(tmp_path / "r"), f"task.reward={tmp_path}/bad.py:r"]) == 2
    assert "a call on a sample raised KeyError" in capsys.readouterr().err


def test_a_reward_reads_dataset_columns_and_logs_its_extra_values(smol_tiny_dir, tmp_path):
    """A JSONL with an extra column; the example reward takes it as a keyword argument and
    returns a dict: the score trains, reward/over_budget is logged."""
    import json

    from tppo.metrics import read_metrics
    from tppo.rewards import RewardScorer, checked_reward
    from tppo.trainer import Trainer
    from trainer_helpers import make_cfg

    spec = f"{EXAMPLES}:exact_within_budget"
    assert checked_reward(spec)  # it needs a column a sample lacks: the signature is checked, no call
    with RewardScorer(spec, workers=0) as scorer:
        assert scorer.score(["p", "p"], ["=7", "xxxxxx=7"], ["7", "7"], [{"max_chars": 4}, {"max_chars": 4}]) == [1.0, 0.5]
        assert scorer.last_extras == [{"over_budget": 0.0}, {"over_budget": 1.0}]
        assert scorer.score(["p"], ["=7"], ["7"]) == [0.0] and scorer.errors == 1  # no column: the call fails, counted
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} + 1 =", "answer": f"#### {a + 1}", "max_chars": 5}) + "\n" for a in range(20)))
    cfg = make_cfg(smol_tiny_dir, tmp_path / "run", "task.name=file", f"task.train_path={data}", f"task.reward={spec}",
                   "rollout.window_tokens=18")
    Trainer(cfg, tmp_path / "run").train()
    rows = read_metrics(tmp_path / "run")
    assert all(m["reward/errors"] == 0 for m in rows) and any(m.get("reward/over_budget") is not None for m in rows)


def test_several_rewards_are_a_weighted_sum_each_logged_by_name():
    from tppo.rewards import RewardScorer

    with RewardScorer(["exact", f"{EXAMPLES}:length_penalised_exact"], weights=[1.0, 0.5], workers=0) as scorer:
        got = scorer.score(["p", "p"], ["=7", "x" * 300 + "=7"], ["7", "7"])
        assert got == pytest.approx([1.0 + 0.5 * 1.0, 1.0 + 0.5 * (1.0 - 0.001 * 102)])
        assert scorer.last_extras == [{"exact": 1.0, "length_penalised_exact": 1.0},
                                      {"exact": 1.0, "length_penalised_exact": pytest.approx(1.0 - 0.001 * 102)}]
        assert scorer.calls == 4, "one call per response and reward"
    with pytest.raises(ValueError, match="2 reward weights for 1 rewards"):
        RewardScorer("exact", weights=[1.0, 2.0])


def test_rewards_that_share_a_function_name_are_logged_apart():
    """Two rewards named alike (two modules' ``accuracy``, two lambdas, one reward listed
    twice) each keep their own reward/<name>: neither value overwrites the other."""
    from tppo.rewards import RewardScorer, reward_names

    assert reward_names(["a.rewards:accuracy", "b.rewards:accuracy", "exact"]) == ["a.rewards.accuracy", "b.rewards.accuracy", "exact"]
    assert reward_names(["exact", "exact"]) == ["exact", "exact_2"]
    assert reward_names([f"{EXAMPLES}:length_penalised_exact", "exact"]) == ["length_penalised_exact", "exact"]
    half, one = (lambda p, c, a: 0.5), (lambda p, c, a: 1.0)
    with RewardScorer([half, one], workers=0) as scorer:
        assert scorer.score(["p"], ["c"], ["a"]) == [1.5]
        (names,) = [list(e) for e in scorer.last_extras]
        assert len(set(names)) == 2 and sorted(scorer.last_extras[0].values()) == [0.5, 1.0]


def test_a_batched_reward_is_called_once_per_batch_with_column_lists():
    import reward_helpers as rh

    from tppo.rewards import RewardScorer

    rh.BATCH_CALLS.clear()
    with RewardScorer([rh.batched_len_minus_budget, "exact"], workers=2, timeout_s=0.5) as scorer:
        got = scorer.score(["p"] * 3, ["=7", "=12", "abc=7"], ["7", "7", "7"], [{"budget": 1}, {"budget": 2}, {"budget": 3}])
        assert got == [2.0 - 1 + 1.0, 3.0 - 2 + 0.0, 5.0 - 3 + 1.0] and rh.BATCH_CALLS == [3]
        assert scorer.errors == 0
    for fn, failure in ((rh.batched_wrong_length, "errors"), (rh.batched_hang, "timeouts")):
        with RewardScorer(fn, batched=False, timeout_s=0.3, workers=0) as scorer:
            assert scorer.batched == [False]
        with RewardScorer(fn, batched=True, timeout_s=0.3, workers=0) as scorer:
            assert scorer.score(["p"] * 2, ["=7", "=7"], ["7", "7"]) == [0.0, 0.0], "the whole batch fails, scored 0"
            assert getattr(scorer, failure) == 2 and scorer.calls == 2


def test_reward_lists_and_batched_rewards_are_checked_before_anything_loads(tmp_path):
    from tppo.rewards import RewardSpecError, checked_rewards

    assert len(checked_rewards(["exact", f"{EXAMPLES}:batched_exact"])) == 2
    (tmp_path / "b.py").write_text("def scalar(ps, cs, ans):\n    return 1.0\n")
    with pytest.raises(RewardSpecError, match="batched: called on 1 completion it must return a list of 1"):
        checked_rewards([f"{tmp_path}/b.py:scalar"], batched=True)
    with pytest.raises(ConfigError, match="3 weights for 2 rewards"):
        load_config(None, ["task.reward=[exact, math]", "task.reward_weights=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="empty list"):
        load_config(None, ["task.reward=[]"])


def test_a_run_with_two_rewards_logs_each(model_dir, tmp_path):
    from tppo.metrics import read_metrics
    from tppo.trainer import Trainer
    from trainer_helpers import make_cfg

    cfg = make_cfg(model_dir, tmp_path, f"task.reward=[exact, {EXAMPLES}:batched_exact]", "task.reward_weights=[0.5, 0.5]",
                   "train.total_steps=3")
    Trainer(cfg, tmp_path).train()
    rows = [m for m in read_metrics(tmp_path) if "reward/exact" in m]
    assert rows and all(m["reward/exact"] == m["reward/batched_exact"] for m in rows), "the same reward, two forms"
    assert all(m["reward/mean"] == pytest.approx(m["reward/exact"]) for m in rows), "0.5 + 0.5 of the same value"
