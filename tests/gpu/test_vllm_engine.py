"""The vLLM rollout engine on a GPU with a small random Llama built here. Skipped
without CUDA or vLLM (CPU CI); run on a GPU machine with ``pytest tests/gpu``.

Prompts are >= 40 tokens, more than two of vLLM's 16-token KV blocks, so the prefix cache
holds them and a weight update without ``reset_prefix_cache`` would reuse stale KV (and
fail the log-prob check below)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tppo.config import RolloutConfig, TinyModelConfig
from tppo.models import build_tiny, save_pretrained
from tppo.rollout import PromptItem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                                reason="needs a CUDA GPU and vLLM (pip install 'tppo[vllm]')")

SPEC = TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vllm")
    model, tok = build_tiny(SPEC, seed=0)
    save_pretrained(model, tok, path)
    return str(path), model.cuda().float(), tok


def make_engine(path, tok, sleep=False, **kw):
    from tppo.rollout.vllm_engine import VLLMEngine

    cfg = RolloutConfig(prompts_per_step=4, samples_per_prompt=2, window_tokens=8, max_response_tokens=24, **kw)
    text = "987654321 " * 4 + "12-3:"  # 45 characters: 45 tokens of the character tokenizer
    prompts = [PromptItem(i, tok(text, add_special_tokens=False).input_ids + [5 + i], meta={}) for i in range(10)]
    assert all(len(p.prompt_ids) >= 40 for p in prompts)
    return VLLMEngine(cfg, prompts, model_path=path, eos_token_ids=tok.eos_token_id, gpu_memory_utilization=0.2,
                      dtype="float32", max_prompt_tokens=64, sleep_between_windows=sleep), cfg


def test_windows_carry_rows_over_without_loss_or_duplicates(tiny):
    path, model, tok = tiny
    engine, cfg = make_engine(path, tok)
    finished, seen = [], set()
    for version in range(30):
        wb = engine.generate_window(model, version=0)
        if not wb.rows:
            break
        assert len(wb.rows) <= cfg.num_slots
        for row, start in zip(wb.rows, wb.window_start):
            assert len(row.response_ids) - start <= cfg.window_tokens
            assert len(row.response_ids) == len(row.logprobs) == len(row.versions)
            assert row.windows <= math.ceil(cfg.max_response_tokens / cfg.window_tokens)
            if row.finished:
                assert row.uid not in seen
                seen.add(row.uid)
                finished.append(row)
    assert len(finished) == 10 * cfg.samples_per_prompt


def test_logprobs_match_the_trainer_recomputation_and_weights_sync(tiny):
    path, model, tok = tiny
    engine, cfg = make_engine(path, tok, temperature=0.7)
    for version, scale in ((0, 1.0), (1, 1.5)):
        if scale != 1.0:
            with torch.no_grad():
                model.lm_head.weight.mul_(scale)  # a "policy update" the engine must pick up
        wb = engine.generate_window(model, version)
        row, start = wb.rows[0], wb.window_start[0]  # a carried row's earlier tokens came from the old weights
        ids = torch.tensor([row.prompt_ids + row.response_ids], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(row.prompt_ids) - 1 : -1].float() / cfg.temperature
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(row.prompt_ids):, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(row.logprobs[start:], device="cuda"), lp[start:], atol=2e-3, rtol=1e-3)
        assert set(row.versions[start:]) == {version}


def test_sleep_mode_frees_and_wakes_between_windows(tiny):
    path, model, tok = tiny
    engine, cfg = make_engine(path, tok, sleep=True)
    for version in range(3):
        wb = engine.generate_window(model, version)
        assert wb.rows and engine.asleep
    assert not any(math.isnan(lp) for r in wb.rows for lp in r.logprobs)


def test_ignore_eos_runs_every_row_to_its_cap(tiny):
    path, model, tok = tiny
    engine, cfg = make_engine(path, tok, ignore_eos=True)
    for _ in range(cfg.max_windows):
        wb = engine.generate_window(model, 0)
    assert all(r.finish_reason == "length" and len(r.response_ids) == cfg.max_response_tokens for r in wb.rows if r.finished)


def test_resume_continues_the_rows_in_flight(tiny):
    """state_dict / load_state_dict: the rows in flight and the request seeds move to a new
    engine; its next window continues them (none lost, none duplicated)."""
    path, model, tok = tiny
    first, cfg = make_engine(path, tok)
    wb = first.generate_window(model, 0)
    carried = {r.uid: len(r.response_ids) for r in wb.rows if not r.finished}
    assert carried, "a window of 8 tokens leaves rows of a random model in flight"
    state = first.state_dict()
    del first
    second, _ = make_engine(path, tok)
    second.load_state_dict(state)
    nxt = second.generate_window(model, 1)
    continued = {r.uid: len(r.response_ids) for r in nxt.rows if r.uid in carried}
    assert set(continued) == set(carried) and all(continued[u] > carried[u] for u in carried)
