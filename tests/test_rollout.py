"""Tests of the embedded rollout engine: carry-over, caps, refill, log-probs, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mock_models import BOS, EOS, PAD, count_token, countdown_model
from vllm_cases import CASES as VLLM_CASES
from tppo.algos import logprobs_from_logits
from tppo.config import ConfigError, RolloutConfig
from tppo.config import TinyModelConfig
from tppo.models import build_tiny
from tppo.rollout import EmbeddedEngine, PromptItem, Row, sample_tokens


def countdown_prompts(lengths, start_id=0):
    return [PromptItem(start_id + i, [BOS, count_token(n)]) for i, n in enumerate(lengths)]


def run_all(engine, model, max_windows=100):
    """Generate windows until the stream is exhausted and nothing is carried."""
    windows = []
    for v in range(max_windows):
        wb = engine.generate_window(model, version=v)
        if not wb.rows:
            return windows
        windows.append(wb)
    raise AssertionError("engine did not drain")


@pytest.fixture(scope="module")
def countdown():
    return countdown_model(64)


def expected_response(n):
    return [count_token(n) - k for k in range(1, n)] + [EOS]


def test_synchronous_rollout_forced_lengths(countdown):
    lengths = [3, 10, 1, 7]
    cfg = RolloutConfig(prompts_per_step=4, samples_per_prompt=1, window_tokens=16, max_response_tokens=16)
    eng = EmbeddedEngine(cfg, countdown_prompts(lengths), eos_token_ids=EOS, pad_token_id=PAD)
    wb = eng.generate_window(countdown, version=0)
    assert [r.response_ids for r in wb.rows] == [expected_response(n) for n in lengths]
    assert all(r.finish_reason == "eos" for r in wb.rows)
    assert eng.carried == []
    # One window of max(lengths) decode steps over 4 slots.
    assert wb.stats.decode_steps == 10
    assert wb.stats.generated_tokens == sum(lengths)
    assert wb.stats.slot_utilization == pytest.approx(21 / 40)


MODES = {"naive": dict(remove_finished=False), "compact": dict(), "refill": dict(refill_within_window=True)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("W", [1, 3, 4, 7, 12])
def test_carry_over_keeps_every_token_exactly_once(countdown, W, mode):
    lengths = [3, 10, 1, 7, 12, 5, 2, 9]
    L = 12
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, window_tokens=W, max_response_tokens=L, **MODES[mode])
    eng = EmbeddedEngine(cfg, countdown_prompts(lengths), eos_token_ids=EOS, pad_token_id=PAD)
    windows = run_all(eng, countdown)
    seen, final = {}, {}
    for v, wb in enumerate(windows):
        assert wb.stats.generated_tokens <= wb.stats.slots * wb.stats.decode_steps  # never more live rows than slots
        if mode != "refill":  # refilled slots hold several rows in one window
            assert len(wb.rows) <= cfg.num_slots
        for i, row in enumerate(wb.rows):
            new = wb.window_tokens(i)
            assert 1 <= len(new) <= W
            assert row.versions[wb.window_start[i]:] == [v] * len(new)
            # Earlier windows' tokens and log-probs are unchanged context.
            prev = seen.get(row.uid, ([], []))
            assert row.response_ids[: len(prev[0])] == prev[0]
            assert row.logprobs[: len(prev[1])] == prev[1]
            assert wb.window_start[i] == len(prev[0])
            seen[row.uid] = (list(row.response_ids), list(row.logprobs))
            if row.finished:
                assert row.uid not in final, "a row finished twice"
                final[row.uid] = row
    assert len(final) == len(lengths) * 2  # every row of every prompt, none lost
    for row in final.values():
        n = lengths[row.prompt_id]
        assert row.response_ids == expected_response(n)
        assert row.finish_reason == "eos"
        if mode != "refill":  # a row admitted mid-window may need one window more
            assert row.windows == math.ceil(n / W)
        assert len(row.logprobs) == len(row.versions) == n
        assert all(lp > -1e-6 for lp in row.logprobs)  # the countdown model is (almost) certain


def test_response_cap_and_per_prompt_cap(countdown):
    prompts = countdown_prompts([20, 20, 3])
    prompts[1].max_response_tokens = 5
    cfg = RolloutConfig(prompts_per_step=3, samples_per_prompt=1, window_tokens=4, max_response_tokens=8)
    eng = EmbeddedEngine(cfg, prompts, eos_token_ids=EOS, pad_token_id=PAD)
    final = {r.prompt_id: r for wb in run_all(eng, countdown) for r in wb.rows if r.finished}
    assert len(final[0].response_ids) == 8 and final[0].finish_reason == "length"
    assert len(final[1].response_ids) == 5 and final[1].finish_reason == "length"
    assert final[2].response_ids == expected_response(3) and final[2].finish_reason == "eos"
    assert final[0].windows == 2 == cfg.max_windows


def test_ignore_eos_runs_to_cap(countdown):
    cfg = RolloutConfig(prompts_per_step=1, samples_per_prompt=1, window_tokens=6, max_response_tokens=6, ignore_eos=True)
    eng = EmbeddedEngine(cfg, countdown_prompts([2]), eos_token_ids=EOS, pad_token_id=PAD)
    row = eng.generate_window(countdown, 0).rows[0]
    assert len(row.response_ids) == 6 and row.finish_reason == "length"


def test_refill_order_and_counts(countdown):
    # 3 prompts x G=2 = 6 slots; W = 4. Prompt 0 needs 9 tokens (3 windows), others finish at once.
    lengths = [9, 2, 3, 1, 2, 4, 2, 2]
    cfg = RolloutConfig(prompts_per_step=3, samples_per_prompt=2, window_tokens=4, max_response_tokens=16)
    eng = EmbeddedEngine(cfg, countdown_prompts(lengths), eos_token_ids=EOS, pad_token_id=PAD)
    w0 = eng.generate_window(countdown, 0)
    assert [(r.prompt_id, r.sample_idx) for r in w0.rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r.uid for r in eng.carried] == [0, 1]
    w1 = eng.generate_window(countdown, 1)
    # Carried rows first, then two new groups fill the 4 free slots.
    assert [(r.prompt_id, r.sample_idx) for r in w1.rows] == [(0, 0), (0, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert w1.window_start == [4, 4, 0, 0, 0, 0]
    w2 = eng.generate_window(countdown, 2)
    assert [r.prompt_id for r in w2.rows] == [0, 0, 5, 5, 6, 6]
    assert all(r.finished for r in w2.rows[:2])


def test_partial_group_is_not_admitted(countdown):
    # 2 prompts x G=2 = 4 slots. Prompt 0 is carried (2 rows); 2 free slots take one group.
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, window_tokens=4, max_response_tokens=8)
    eng = EmbeddedEngine(cfg, countdown_prompts([6, 1, 1, 1]), eos_token_ids=EOS, pad_token_id=PAD)
    eng.generate_window(countdown, 0)
    assert len(eng.carried) == 2
    assert [r.prompt_id for r in eng.generate_window(countdown, 1).rows] == [0, 0, 2, 2]
    # 3 slots with G = 3 and 1 row carried: a group of 3 does not fit, the slots stay empty.
    cfg3 = RolloutConfig(prompts_per_step=1, samples_per_prompt=3, window_tokens=2, max_response_tokens=8)
    eng3 = EmbeddedEngine(cfg3, countdown_prompts([5, 1]), eos_token_ids=EOS, pad_token_id=PAD)
    eng3.generate_window(countdown, 0)
    state = eng3.state_dict()
    state["carried"] = state["carried"][:1]  # only one row still in flight
    eng3.load_state_dict(state)
    assert [r.prompt_id for r in eng3.generate_window(countdown, 1).rows] == [0]
    assert [r.prompt_id for r in eng3.generate_window(countdown, 2).rows] == [0]  # 5 tokens: 3 windows of 2
    assert [r.prompt_id for r in eng3.generate_window(countdown, 3).rows] == [1, 1, 1]


def test_a_windows_prefill_costs_its_rows_left_padded_to_the_widest_context(countdown):
    # 2 slots, W = 2: A needs 6 tokens, B 1. Window 1 prefills the two 2-token prompts; window 2
    # prefills A's prompt + 2 tokens (4) beside C's new prompt (2), padded to 4: 8 positions for 6 tokens.
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=2, max_response_tokens=8)
    eng = EmbeddedEngine(cfg, countdown_prompts([6, 1, 3]), eos_token_ids=EOS, pad_token_id=PAD)
    first, second = eng.generate_window(countdown, 0).stats, eng.generate_window(countdown, 1).stats
    assert (first.prefill_tokens, first.prefill_positions) == (4, 4)
    assert (second.prefill_tokens, second.prefill_positions) == (4 + 2, 2 * 4)


def test_refill_within_window_fills_freed_slots_hand_computed(countdown):
    # 2 slots, W = L = 8: row B needs 8 tokens; A, C, D, E need 2 each and take turns in
    # the other slot (C joins at step 1, D at 3, E at 5): 16 tokens in 2 x 8 slot-steps.
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=8, max_response_tokens=8, refill_within_window=True)
    eng = EmbeddedEngine(cfg, countdown_prompts([2, 8, 2, 2, 2]), eos_token_ids=EOS, pad_token_id=PAD)
    wb = eng.generate_window(countdown, 0)
    assert [r.prompt_id for r in wb.rows] == [0, 1, 2, 3, 4]
    assert [r.response_ids for r in wb.rows] == [expected_response(n) for n in [2, 8, 2, 2, 2]]
    assert wb.window_start == [0] * 5
    assert wb.stats.decode_steps == 8 and wb.stats.generated_tokens == 16
    assert wb.stats.slot_utilization == 1.0
    # the work counters, by hand: 7 decode forwards (the 8th token's logits are never needed) of 2 entries over
    # a static cache of P + 16 (window_mode tokens: a row joining late may run W = 8 steps past the first rows'
    # 8); one prefill for A and B, then one join each for C, D and E (a row of the cache copied in apiece)
    P, width = max(len(r.prompt_ids) for r in wb.rows[:2]), max(len(r.prompt_ids) for r in wb.rows[:2]) + 16
    assert wb.stats.cache_positions == 7 * 2 * width and wb.stats.kv_positions == sum(2 * (P + s + 1) for s in range(7))
    assert wb.stats.prefill_calls == 4 and wb.stats.copy_positions == 3 * width
    # the prefills compute their padded batches: A and B padded to P, then each joining row's prompt but its last token
    assert wb.stats.prefill_positions == 2 * P + sum(len(r.prompt_ids) - 1 for r in wb.rows[2:])
    # Without refill the same window leaves the second slot idle after step 2.
    eng = EmbeddedEngine(dataclasses.replace(cfg, refill_within_window=False), countdown_prompts([2, 8, 2, 2, 2]), eos_token_ids=EOS, pad_token_id=PAD)
    assert eng.generate_window(countdown, 0).stats.slot_utilization == pytest.approx(10 / 16)


def test_window_mode_steps_cuts_joined_rows_at_the_window_end_tokens_gives_them_w(countdown):
    """2 slots, W = 4: A needs 2, B 8, C 6. C joins at step 2 (A done). ``steps``: the window
    ends after 4 decode steps, C has 2 tokens; ``tokens``: C gets its W = 4, the window
    runs 6 steps (B is cut at its 4 on step 4 and leaves the batch)."""
    for mode, c_tokens, steps in (("steps", 2, 4), ("tokens", 4, 6)):
        cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=4, max_response_tokens=8,
                            refill_within_window=True, window_mode=mode)
        eng = EmbeddedEngine(cfg, countdown_prompts([2, 8, 6]), eos_token_ids=EOS, pad_token_id=PAD)
        wb = eng.generate_window(countdown, 0)
        got = {r.prompt_id: len(r.response_ids) for r in wb.rows}
        assert got == {0: 2, 1: 4, 2: c_tokens} and wb.stats.decode_steps == steps, mode
        final = {r.prompt_id: r.response_ids for w in [wb] + run_all(eng, countdown) for r in w.rows if r.finished}
        assert final == {k: expected_response(n) for k, n in enumerate([2, 8, 6])}, "carried on exactly in both modes"


def test_refill_cuts_joined_rows_at_the_window_end_and_defers_long_prompts(countdown):
    prompts = countdown_prompts([2, 6, 5, 3])
    prompts[2].prompt_ids = [BOS] * 20 + [count_token(5)]  # too long to join before step 19
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=4, max_response_tokens=8, refill_within_window=True,
                        window_mode="steps")
    eng = EmbeddedEngine(cfg, prompts, eos_token_ids=EOS, pad_token_id=PAD)
    w0 = eng.generate_window(countdown, 0)
    # Prompt 2 was pulled at step 1 but did not fit; prompt 3 could not jump the queue.
    assert [r.prompt_id for r in w0.rows] == [0, 1]
    assert [r["prompt_id"] for r in eng.state_dict()["pending"]] == [2]
    w1 = eng.generate_window(countdown, 1)
    assert [r.prompt_id for r in w1.rows][:2] == [1, 2]
    final = {r.prompt_id: r for wb in [w0, w1] + run_all(eng, countdown) for r in wb.rows if r.finished}
    assert {k: r.response_ids for k, r in final.items()} == {k: expected_response(n) for k, n in enumerate([2, 6, 5, 3])}


def test_refill_requires_remove_finished():
    with pytest.raises(ConfigError, match="refill_within_window"):
        RolloutConfig(refill_within_window=True, remove_finished=False)


def test_empty_prompt_is_rejected(countdown):
    cfg = RolloutConfig(prompts_per_step=1, samples_per_prompt=1, window_tokens=4, max_response_tokens=8)
    eng = EmbeddedEngine(cfg, [PromptItem(7, [])], eos_token_ids=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt 7 is empty"):
        eng.generate_window(countdown, 0)


# ------------------------------------------------------------------ real (random) tiny model


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return model.eval(), tok


def text_prompts(tok, n, start=0):
    texts = [f"Q{i}: {'1+' * (i % 5)}2=" for i in range(start, start + n)]
    return [PromptItem(start + i, tok(t, add_special_tokens=False).input_ids) for i, t in enumerate(texts)]


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_equal_teacher_forced_forward(tiny, mode):
    model, tok = tiny
    cfg = RolloutConfig(prompts_per_step=3, samples_per_prompt=2, window_tokens=5, max_response_tokens=12, seed=3, **MODES[mode])
    prompts = text_prompts(tok, 10)
    prompts[3].prompt_ids = prompts[3].prompt_ids[:1]  # a one-token prompt (nothing to prefill when joining)
    prompts[4].max_response_tokens = 2  # finishes early: frees slots mid-window
    prompts[5].max_response_tokens = 1
    eng = EmbeddedEngine(cfg, prompts, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rows = {}
    for wb in run_all(eng, model):
        for r in wb.rows:
            rows[r.uid] = r
    assert any(r.windows > 1 for r in rows.values())
    with torch.no_grad():
        for r in rows.values():
            seq = torch.tensor([r.prompt_ids + r.response_ids])
            logits = model(input_ids=seq).logits[0, len(r.prompt_ids) - 1 : -1]
            ref = logprobs_from_logits(logits, torch.tensor(r.response_ids))
            torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-5, rtol=0)


def test_same_seed_same_output_different_seed_different(tiny):
    model, tok = tiny

    def run(seed):
        cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, window_tokens=4, max_response_tokens=10, seed=seed)
        eng = EmbeddedEngine(cfg, text_prompts(tok, 4), eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [(r.uid, r.response_ids, r.logprobs) for wb in run_all(eng, model) for r in wb.rows]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_state_dict_resume_is_exact(tiny):
    model, tok = tiny
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, window_tokens=3, max_response_tokens=9, seed=5)
    prompts = text_prompts(tok, 8)

    def engine(stream):
        return EmbeddedEngine(cfg, stream, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def snapshot(wb):
        return [(r.uid, r.response_ids, r.logprobs, r.versions, r.finish_reason, r.windows) for r in wb.rows]

    a = engine(iter(prompts))
    for v in range(2):
        a.generate_window(model, v)
    state = a.state_dict()
    assert state["carried"], "the test needs rows in flight at the checkpoint"
    ref = [snapshot(a.generate_window(model, v)) for v in range(2, 5)]
    # A fresh engine from the state; the stream resumes after the prompts admitted so far.
    b = engine(iter(prompts[state["next_uid"] // cfg.samples_per_prompt :]))
    b.load_state_dict(state)
    assert [snapshot(b.generate_window(model, v)) for v in range(2, 5)] == ref


def test_pack_window_masks(countdown):
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=2, max_response_tokens=8)
    eng = EmbeddedEngine(cfg, countdown_prompts([3, 1]), eos_token_ids=EOS, pad_token_id=PAD)
    eng.generate_window(countdown, 0)
    wb = eng.generate_window(countdown, 1)  # row 0 (3 tokens) finishes: window = its 3rd token
    packed = wb.pack(PAD)
    assert packed.input_ids.shape == (1, 5)
    assert packed.input_ids[0].tolist() == [BOS, count_token(3)] + expected_response(3)
    assert packed.response_mask[0].tolist() == [False, False, True, True, True]
    assert packed.window_mask[0].tolist() == [False, False, False, False, True]
    assert packed.versions[0].tolist() == [0, 0, 0, 0, 1]
    assert packed.finished.tolist() == [True]
    assert packed.response_lengths.tolist() == [3]


# ------------------------------------------------------------------ sampling


def test_sampling_greedy_topk_topp():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 200)
    g = torch.Generator().manual_seed(0)
    greedy, lp = sample_tokens(logits, temperature=0.0)
    assert greedy.eq(1).all()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[:, 1])
    top1, _ = sample_tokens(logits, top_k=1, generator=g)
    assert top1.eq(1).all()
    nucleus, _ = sample_tokens(logits, top_p=0.5, generator=g)  # p(1) = 0.66 >= 0.5
    assert nucleus.eq(1).all()
    top2, lp2 = sample_tokens(logits, top_k=2, temperature=0.5, generator=g)
    assert set(top2.tolist()) == {1, 2}
    # Recorded log-probs are the untruncated, temperature-scaled ones.
    torch.testing.assert_close(lp2, torch.log_softmax(logits / 0.5, -1).gather(-1, top2[:, None]).squeeze(-1))


def test_sampling_frequencies_match_probabilities():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    tokens, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_rollout_config_errors():
    with pytest.raises(ConfigError, match="window_tokens"):
        RolloutConfig(window_tokens=300, max_response_tokens=256)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        RolloutConfig(samples_per_prompt=0)
    with pytest.raises(ConfigError, match="top_p"):
        RolloutConfig(top_p=0.0)


def test_vllm_engine_imports_without_vllm_and_says_how_to_get_it():
    import importlib.util

    from tppo.config import RolloutConfig
    from tppo.rollout.vllm_engine import VLLMEngine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"pip install 'tppo\[vllm\]'"):
        VLLMEngine(RolloutConfig(), [], model_path="unused", eos_token_ids=0)
    with pytest.raises(ValueError, match="top_p=1"):
        VLLMEngine(RolloutConfig(top_p=0.9), [], model_path="unused", eos_token_ids=0)


# ---------------------------------------------------------------------- the vLLM engine's pure parts (no vLLM needed)


@dataclasses.dataclass
class FakeLogprob:  # the fields of vllm.logprobs.Logprob the engine reads
    logprob: float


@dataclasses.dataclass
class FakeCompletion:  # the fields of vllm.outputs.CompletionOutput the engine reads
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list
    finish_reason: str | None


@pytest.mark.parametrize("case", VLLM_CASES, ids=lambda c: c[0])
def test_vllm_output_handling(case):
    from vllm_cases import run_case

    expected = case[-1]
    if expected == "error":
        with pytest.raises(RuntimeError, match="vLLM"):
            run_case(FakeCompletion, FakeLogprob, case)
        return
    row, n = run_case(FakeCompletion, FakeLogprob, case)
    assert row.finish_reason == expected and n == len(case[1])
    assert row.logprobs[-n:] == [-0.25 * (i + 1) for i in range(n)] and row.versions[-n:] == [3] * n


def test_vllm_engine_refuses_what_vllm_would_run_differently():
    from tppo.rollout.vllm_engine import check_rollout_config, llm_kwargs, sampling_kwargs

    for bad, match in ((dict(temperature=2.5), "temperature"), (dict(temperature=0.005), "temperature"),
                       (dict(top_p=0.9), "top_p=1"), (dict(top_k=5), "top_k=0"), (dict(remove_finished=False), "remove_finished")):
        with pytest.raises(ValueError, match=match):
            check_rollout_config(RolloutConfig(**bad))
    for ok in (0.0, 0.01, 0.7, 2.0):
        check_rollout_config(RolloutConfig(temperature=ok))
    cfg = RolloutConfig(window_tokens=8, max_response_tokens=24)
    kw = llm_kwargs(cfg, model_path="m", dtype="float32", gpu_memory_utilization=0.3, tensor_parallel_size=1, sleep=False,
                    max_model_len=1024 + 24, world_size=2)
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["max_model_len"] == 1048
    assert kw["logprobs_mode"] == "processed_logprobs"
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        llm_kwargs(cfg, model_path="m", dtype="float32", gpu_memory_utilization=0.3, tensor_parallel_size=2, sleep=False,
                   max_model_len=99, world_size=2)
    row = Row(0, 0, 0, [1], {}, 24, [5] * 20, [0.0] * 20, [0] * 20)
    assert sampling_kwargs(cfg, row, 8, seed=11, eos=[2, 7])["max_tokens"] == 4  # the cap leaves 4


def test_vllm_engine_sends_the_names_of_the_saved_checkpoint(model_dir):
    """The weight names sent to vLLM are the Hugging Face checkpoint's, the names vLLM's
    loaders read at start (tied lm_head included: vLLM skips it as the embeddings' alias)."""
    from safetensors import safe_open

    from tppo.models import load_pretrained
    from tppo.rollout.vllm_engine import weights_for_vllm

    model, _ = load_pretrained(model_dir)
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        saved = set(f.keys())
    sent = dict(weights_for_vllm(model, to_cpu=True))
    assert saved <= set(sent) and set(sent) - saved <= {"lm_head.weight"}
    assert all(t.device.type == "cpu" for t in sent.values())


def test_vllm_engine_keeps_the_trainers_random_state():
    import random

    import numpy as np

    from tppo.rollout.vllm_engine import preserved_rng

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expect = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with preserved_rng():  # what in-process vLLM does when it starts
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert torch.equal(torch.rand(2), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]


@pytest.mark.parametrize("mode", ["naive", "compact"])
def test_row_steps_count_the_decode_batch_padding_included(countdown, mode):
    """16 rows of lengths 1-10 over 16 slots, 10 decode steps: naive padding keeps every row
    for every step (160 row-steps); compaction drops finished rows once an eighth of the
    batch is dead (COMPACT_FRACTION), so it counts the decode batch's size per step by
    that rule (a naive loop here), between the generated tokens and 160."""
    import tppo.rollout.embedded as emb

    lengths = [3, 10, 1, 7, 5, 5, 8, 2, 9, 4, 6, 6, 10, 3, 7, 8]
    cfg = RolloutConfig(prompts_per_step=16, samples_per_prompt=1, window_tokens=16, max_response_tokens=16, **MODES[mode])
    wb = EmbeddedEngine(cfg, countdown_prompts(lengths), eos_token_ids=EOS, pad_token_id=PAD).generate_window(countdown, 0)
    expected = 160
    P = max(len(r.prompt_ids) for r in wb.rows)
    width = P + 16  # the static cache: the prompts and the window's W = 16 steps
    entries, copied = [16] * 9, 0  # naive: 9 decode forwards (the 10th token's logits are never needed) of all 16 entries
    if mode == "compact":
        batch, expected, entries = list(lengths), 0, []
        for s in range(1, max(lengths) + 1):
            expected += len(batch)
            dead = sum(n <= s for n in batch)
            if dead and dead >= emb.COMPACT_FRACTION * len(batch):
                batch = [n for n in batch if n > s]
                copied += len(batch) * width  # the survivors' rows of the cache, copied
            if batch:
                entries.append(len(batch))  # the next step's decode forward
        assert sum(lengths) < expected < 160
    assert wb.stats.row_steps == expected and wb.stats.generated_tokens == sum(lengths)
    assert wb.stats.kv_positions == sum(n * (P + s + 1) for s, n in enumerate(entries))
    assert wb.stats.cache_positions == sum(entries) * width and wb.stats.prefill_calls == 1 and wb.stats.copy_positions == copied
    assert wb.stats.prefill_positions == 16 * P >= wb.stats.prefill_tokens  # one prefill of the batch left padded to P


def test_a_vllm_rank_without_rows_still_takes_the_new_weights(monkeypatch):
    """Under train.fsdp gathering the weights for vLLM is a collective: a rank whose prompts
    ran out must still make it (else the other ranks wait in it forever), then sleep again."""
    import types

    import tppo.rollout.vllm_engine as ve

    calls = []

    class LLM:  # the calls of vllm.LLM the engine makes, recorded
        def __init__(self, **kwargs):
            pass

        def collective_rpc(self, name, kwargs):
            calls.append(name)

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

        def sleep(self, level):
            calls.append("sleep")

        def wake_up(self):
            calls.append("wake_up")

    monkeypatch.setattr(ve, "_import_vllm", lambda: types.SimpleNamespace(LLM=LLM, SamplingParams=dict, TokensPrompt=dict))
    monkeypatch.setattr(ve, "weights_for_vllm", lambda model, to_cpu: calls.append("gather") or [])
    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=1, window_tokens=4, max_response_tokens=8)
    eng = ve.VLLMEngine(cfg, iter([]), model_path="unused", eos_token_ids=EOS, sleep_between_windows=True)
    wb = eng.generate_window(torch.nn.Linear(1, 1), version=1)
    assert wb.rows == [] and calls == ["gather", "reload_weights", "reset_prefix_cache", "sleep"]
    eng.generate_window(torch.nn.Linear(1, 1), version=1)  # the same weights: nothing to gather
    assert calls[4:] == ["wake_up", "sleep"]


def test_the_vllm_engine_refuses_the_steps_window_and_in_window_refill():
    from tppo.rollout.vllm_engine import check_rollout_config

    check_rollout_config(RolloutConfig(window_mode="tokens"))
    with pytest.raises(ValueError, match="window_mode=steps"):
        check_rollout_config(RolloutConfig(window_mode="steps"))
    with pytest.raises(ValueError, match="refill_within_window is the embedded engine's"):
        check_rollout_config(RolloutConfig(refill_within_window=True))
