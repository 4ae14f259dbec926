"""Tasks: the chain task's statistics and splits, dataset loaders, prompt stream, evaluation."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from tppo.config import ChainConfig, ConfigError
from tppo.evaluation import avg_at_k_se, evaluate, pass_at_k
from tppo.models import build_tiny_tokenizer
from tppo.rewards import RewardScorer, exact_reward
from tppo.tasks import (
    ChainTask,
    DatasetError,
    Example,
    PromptSource,
    epoch_stream,
    format_prompt,
    load_examples,
    normalize_answer,
)
from tppo.tasks.chain import Chain, is_heldout, prompt_text, solution_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- chain task


def test_chain_solution_hand_example():
    problem = Chain(174, 9, 6)
    assert prompt_text(problem) == "174-9*6:"
    assert solution_text(problem) == "165 156 147 138 129 120=120"
    ex = ChainTask().example(problem)
    assert ex.answer == "120" and ex.meta == {"n": 174, "d": 9, "k": 6}
    assert exact_reward(ex.prompt, solution_text(problem), ex.answer) == 1.0


def test_chain_injected_mistakes_stay_consistent_and_spoil_the_answer():
    rng = random.Random(0)
    wrong = 0
    for _ in range(200):
        problem = Chain(rng.randint(300, 999), rng.randint(2, 9), rng.randint(1, 20))
        text = solution_text(problem, rng, mistake_rate=1.0)
        values = [int(v) for v in text.split("=")[0].split()]
        assert len(values) == problem.k
        prev = problem.n
        for v in values:  # every step is off by exactly one, from the previous (wrong) value
            assert abs(v - (prev - problem.d)) == 1
            prev = v
        wrong += text.split("=")[1] != str(problem.answer)
    # The end is off by a sum of k signs: zero only when they cancel (k even, ~C(k, k/2) / 2^k).
    assert wrong > 0.7 * 200


def test_chain_steps_follow_the_lognormal_spec():
    spec = ChainConfig(median_steps=6, sigma=0.9, max_steps=60, max_start=10_000)
    task, rng = ChainTask(spec), random.Random(1)
    ks = [task.sample_steps(rng) for _ in range(20000)]
    assert 5 <= statistics.median(ks) <= 7
    logs = [math.log(k) for k in ks if 1 < k < 60]
    # Rounding, the floor at 1 and the cap at 60 shrink the spread: sigma within 15 %.
    assert statistics.pstdev(logs) == pytest.approx(0.9, rel=0.15)
    flat = ChainTask(ChainConfig(median_steps=6, sigma=0.0))
    assert {flat.sample_steps(rng) for _ in range(100)} == {6}


def test_chain_problems_respect_the_spec_and_have_a_long_tail():
    task, rng = ChainTask(), random.Random(2)
    problems = [task.sample_problem(rng, "train") for _ in range(20000)]
    spec = task.spec
    assert all(spec.min_steps <= p.k <= spec.max_steps and spec.min_divisor <= p.d <= spec.max_divisor for p in problems)
    assert all(spec.min_end <= p.answer and p.n <= spec.max_start for p in problems)
    lengths = [len(solution_text(p)) + 1 for p in problems]
    assert all(n == 4 * p.k + 4 for n, p in zip(lengths, problems))  # k values, '=', answer, EOS
    assert max(lengths) / statistics.median(lengths) >= 8  # the long tail T-PPO targets


def test_chain_problem_space_is_large_at_every_length():
    """The start is independent of the length: short chains are not a handful of
    problems repeated (the first version's flaw), so a stream rarely repeats itself."""
    task = ChainTask()
    stream = task.stream("train", 0)
    prompts = [next(stream).prompt for _ in range(2000)]
    assert len(set(prompts)) > 0.9 * len(prompts)
    short = [p for p in prompts if p.endswith("*1:")]
    assert len(short) > 50 and len(set(short)) > 0.9 * len(short)
    evaluation = task.distinct("heldout", 1234, 300)
    assert len({e.prompt for e in evaluation}) == 300


def test_chain_splits_never_overlap_and_have_the_stated_share():
    task = ChainTask()
    rng = random.Random(3)
    train = {task.sample_problem(rng, "train") for _ in range(5000)}
    heldout = {task.sample_problem(rng, "heldout") for _ in range(2000)}
    assert not train & heldout
    space = [Chain(n, d, k) for d in range(2, 10) for k in (1, 7, 40) for n in range(d * k + 100, 1000, 7)]
    share = sum(is_heldout(p, 0.1) for p in space) / len(space)
    assert share == pytest.approx(0.1, abs=0.02)


def test_chain_spec_rejects_lengths_without_problems():
    with pytest.raises(ConfigError, match="min_end"):
        ChainConfig(max_steps=100)  # 100 * 9 + 100 > 999: the longest chains would not fit


def test_chain_streams_are_seeded():
    task = ChainTask()
    take = lambda split, seed: [next(s) for s in [task.stream(split, seed)] for _ in range(50)]  # noqa: E731
    assert take("train", 0) == take("train", 0)
    assert take("train", 0) != take("train", 1)
    with pytest.raises(ValueError, match="split"):
        task.sample_problem(random.Random(0), "test")


# ----------------------------------------------------------------------------- prompt stream


def test_prompt_source_resumes_at_the_cursor_and_counts_skips():
    tok = build_tiny_tokenizer()
    examples = [Example("1-2:", "1"), Example("x" * 50, "0"), Example("", "0"), Example("9-3:", "0"), Example("8-3:", "2")]
    src = PromptSource(lambda: epoch_stream(examples, seed=0, shuffle=False), tok, max_prompt_tokens=10)
    first = [next(src) for _ in range(3)]
    assert [p.meta["answer"] for p in first] == ["1", "0", "2"]
    assert [p.prompt_id for p in first] == [0, 3, 4]  # ids are stream positions: skipped ones leave gaps
    assert src.skipped_long == 1 and src.skipped_empty == 1
    state = src.state_dict()
    ref = [next(src) for _ in range(4)]
    resumed = PromptSource(lambda: epoch_stream(examples, seed=0, shuffle=False), tok, max_prompt_tokens=10)
    resumed.load_state_dict(state)
    assert [(p.prompt_id, p.prompt_ids) for p in (next(resumed) for _ in range(4))] == [(p.prompt_id, p.prompt_ids) for p in ref]


def test_chat_template_is_applied_when_present():
    tok = build_tiny_tokenizer()
    assert format_prompt(tok, "2+2?", "Q: {prompt}") == "Q: 2+2?"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert format_prompt(tok, "2+2?", system="Be brief.") == "<system>Be brief.\n<user>2+2?\n<assistant>"


def test_epoch_stream_reshuffles_each_epoch_and_rejects_empty():
    examples = [Example(str(i), str(i)) for i in range(20)]
    stream = epoch_stream(examples, seed=0)
    e1, e2 = [next(stream).prompt for _ in range(20)], [next(stream).prompt for _ in range(20)]
    assert sorted(e1) == sorted(e2) == sorted(e.prompt for e in examples) and e1 != e2
    with pytest.raises(ValueError, match="empty"):
        next(epoch_stream([], seed=0))


# ----------------------------------------------------------------------------- dataset loaders


@pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").exists(), reason="shared/data/gsm8k not present")
def test_gsm8k_file_loads_with_reward_ready_answers():
    ds = load_examples(SHARED / "gsm8k" / "test.jsonl", answer_format="gsm8k")
    assert len(ds.examples) == 1319 and not ds.skipped
    assert ds.examples[0].answer == "18" and ds.examples[0].prompt.startswith("Janet")
    assert all(e.answer and "####" not in e.answer and "," not in e.answer for e in ds.examples)


def write_lines(path: Path, lines: list) -> Path:
    with path.open("wb") as f:
        for line in lines:
            data = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            f.write(data + b"\n")
    return path


GOOD = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}


@pytest.mark.parametrize(
    "bad,match",
    [
        ("{not json", r":2: invalid JSON"),
        ({"answer": "#### 1"}, r":2: missing field 'question'"),
        ({"question": "q"}, r":2: missing field 'answer'"),
        ({"question": 7, "answer": "#### 1"}, r":2: field 'question' must be a string"),
        ({"question": "  ", "answer": "#### 1"}, r":2: field 'question' is empty"),
        ({"question": "q", "answer": "no marker"}, r":2: field 'answer': no '#### <answer>' line"),
        (b"\xff\xfe{}", r":2: not valid UTF-8"),
        ([1, 2], r":2: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad, match):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DatasetError, match=match) as err:
        load_examples(path)
    assert str(path) in str(err.value)
    skipped = load_examples(path, skip_bad_rows=True)
    assert len(skipped.examples) == 2 and len(skipped.skipped) == 1 and str(path) in skipped.skipped[0]


def test_blank_lines_are_not_rows_and_line_numbers_stay_true(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", {"question": "q"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:3: missing field 'answer'"):
        load_examples(path)


def test_parquet_and_answer_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"problem": ["Find x.", "Find y."], "answer": ["042", "7"]}), path)
    ds = load_examples(path, prompt_field="problem", answer_format="integer")
    assert [e.answer for e in ds.examples] == ["42", "7"]
    pq.write_table(pa.table({"problem": ["Find x."], "answer": ["four"]}), path)
    with pytest.raises(DatasetError, match=r"aime.parquet:1: field 'answer': expected an integer"):
        load_examples(path, prompt_field="problem", answer_format="integer")
    assert normalize_answer("so \\boxed{\\frac{1}{2}}.", "boxed") == "\\frac{1}{2}"
    assert normalize_answer(" 12 ", "raw") == "12"
    with pytest.raises(ValueError, match="boxed"):
        normalize_answer("none", "boxed")
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- evaluation


def test_pass_at_k_against_brute_force():
    from itertools import combinations

    for n, c in [(5, 0), (5, 2), (6, 3), (4, 4)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_avg_at_k_se_by_hand_and_by_exact_enumeration():
    from itertools import product

    # by hand: two problems always right / always wrong (between-problem spread only) ...
    assert avg_at_k_se([[True, True], [False, False]]) == pytest.approx((0.25 / 2) ** 0.5)
    # ... and two coin-flip problems (within-problem noise only): each resampled mean 0, 1/2, 1
    # with probabilities 1/4, 1/2, 1/4 has variance 1/8; the mean of two, 1/16
    assert avg_at_k_se([[True, False], [False, True]]) == pytest.approx(0.25)
    # a naive reference: every two-stage resampling of 3 problems x 2 samples enumerated
    correct = [[True, False], [True, True], [False, False]]
    n, k = len(correct), len(correct[0])
    means = []
    for picks in product(range(n), repeat=n):
        for draws in product(range(k), repeat=n * k):
            means.append(sum(correct[p][draws[j * k + i]] for j, p in enumerate(picks) for i in range(k)) / (n * k))
    exact = statistics.pstdev(means)
    assert avg_at_k_se(correct) == pytest.approx(exact, rel=1e-12)
    # invariant to the order of problems and of samples within a problem
    assert avg_at_k_se([[False, False], [True, True], [False, True]]) == pytest.approx(exact, rel=1e-12)
    assert math.isnan(avg_at_k_se([[True]]))
    with pytest.raises(ValueError, match="same number of samples"):
        avg_at_k_se([[True], [True, False]])


def test_evaluate_avg_and_pass_at_k_with_a_scripted_generator():
    examples = [Example("a", "1"), Example("b", "2")]

    def generate(prompts, k):  # problem a: 1 of 4 right, problem b: 4 of 4
        return [["=1", "=0", "=0", "=0"], ["=2"] * 4]

    res = evaluate(examples, generate, RewardScorer("exact", workers=0), samples=4, ks=(1, 2))
    assert res.avg_at_k == pytest.approx(5 / 8)
    assert res.pass_at_k[1] == pytest.approx((0.25 + 1.0) / 2)
    assert res.pass_at_k[2] == pytest.approx((0.5 + 1.0) / 2)


def test_eval_batch_prompts_divides_the_batch_rows_over_the_samples():
    from tppo.config import load_config
    from tppo.evaluation import eval_batch_prompts

    assert eval_batch_prompts(load_config(None, ["rollout.prompts_per_step=16", "rollout.samples_per_prompt=4", "log.eval_samples=4"])) == 16
    assert eval_batch_prompts(load_config(None, ["log.eval_batch_rows=1024", "log.eval_samples=1"])) == 1024
    assert eval_batch_prompts(load_config(None, ["log.eval_batch_rows=10", "log.eval_samples=4"])) == 2
    assert eval_batch_prompts(load_config(None, ["log.eval_batch_rows=3", "log.eval_samples=8"])) == 1  # at least one problem
    with pytest.raises(ConfigError, match="log.eval_batch_rows must be >= 1"):
        load_config(None, ["log.eval_batch_rows=0"])


def test_greedy_evaluation_is_the_same_whatever_its_batch():
    """Left padding and finished rows leaving the batch change nothing a row decodes: the
    greedy completions of 12 chain prompts, one at a time or 5 or all 12 at once."""
    from tppo.config import TinyModelConfig, load_config
    from tppo.evaluation import run_generate_fn
    from tppo.models import build_tiny

    import torch

    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2), seed=3)
    with torch.no_grad():  # larger weights: completions that differ per prompt, some ending early (EOS) and leaving the batch
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    rng = random.Random(1)
    prompts = [prompt_text(Chain(rng.randint(300, 999), rng.randint(2, 9), rng.randint(1, 20))) for _ in range(12)]
    outs = []
    for rows in (1, 5, 12):
        cfg = load_config(None, ["rollout.temperature=0", "rollout.max_response_tokens=24", "rollout.window_tokens=24", f"log.eval_batch_rows={rows}",
                                 "log.eval_samples=1", "log.progress=false"])
        outs.append(run_generate_fn(cfg, model.eval(), tok, [tok.eos_token_id], "cpu")(prompts, 1))
    assert outs[0] == outs[1] == outs[2]
    lengths = {len(o[0]) for o in outs[0]}
    assert len({o[0] for o in outs[0]}) == 12 and min(lengths) < 24 == max(lengths)  # distinct, some finished early: the comparison can fail


# ---------------------------------------------------------------------- conversational prompts, chat template off (#23)


def _conversation_jsonl(path):
    rows = [{"prompt": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"What is {a} + {b}?"}],
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(2, 12) for b in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("chat_template", [True, False])
def test_conversational_prompts_and_chat_template_off_train_with_smollm2s_tokenizer(smol_tiny_dir, tmp_path, capsys, chat_template):
    from tppo.cli import main

    data = _conversation_jsonl(tmp_path / "conv.jsonl") if chat_template else None
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"question": f"{a} + 1 =", "answer": f"#### {a + 1}"}) + "\n" for a in range(20)))
    task = ([f"task.train_path={data}", "task.prompt_field=prompt"] if chat_template else
            [f"task.train_path={plain}", "task.chat_template=false", "task.template='{prompt} Answer:'"])
    argv = ["train", "--run-dir", str(tmp_path / "run"), f"model.path={smol_tiny_dir}", "task.name=file", *task, "task.reward=math",
            "task.eval_problems=2", "log.eval_samples=1", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.window_tokens=8", "rollout.max_response_tokens=8", "train.total_steps=1", "log.tensorboard=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    first = out.split("first training prompt, as the model sees it:\n", 1)[1]
    if chat_template:  # the dataset's own system turn, SmolLM2's template
        assert first.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\nWhat is ")
    else:  # the templated text as it is: no chat markup
        assert first.split("\n")[0].endswith("+ 1 = Answer:") and "<|im_start|>" not in first.split("\n")[0]


def test_a_malformed_conversation_names_the_line_and_message(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "#### 1"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "text": "hi"}], "answer": "#### 1"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: field 'prompt'\[0\]: a message must be an object with string 'role' and 'content'"):
        load_examples(path, prompt_field="prompt", answer_field="answer", answer_format="gsm8k")
