"""The vLLM engine's output cases, shared by the CPU tests (tests/test_rollout.py, with
stand-ins shaped like vLLM's classes) and ``make test-vllm`` (tests/vllm/, with vLLM's own
``CompletionOutput`` and ``Logprob``): (description, tokens, finish_reason, row's tokens so
far, its cap, the window, expected finish or an error)."""

from __future__ import annotations

EOS, STOP = 2, 7  # the tokenizer's EOS; an extra EOS from generation_config (a stop token to vLLM)

CASES = [
    ("EOS inside the window", [5, 6, EOS], "stop", 0, 24, 8, "eos"),
    ("a generation_config EOS: 'stop' on a stop token", [5, STOP], "stop", 4, 24, 8, "eos"),
    ("cut at W: carried over", [5] * 8, "length", 0, 24, 8, None),
    ("the cap inside the window", [5] * 3, "length", 21, 24, 8, "length"),
    ("'length' below W and below the cap (the context limit)", [5] * 3, "length", 0, 24, 8, "error"),
    ("an aborted request", [], "abort", 0, 24, 8, "error"),
    ("an unexpected reason", [5], "repetition", 0, 24, 8, "error"),
]


def run_case(completion_cls, logprob_cls, case):
    """Apply one case to a fresh row with the engine's output handling; (row, returned count)."""
    from tppo.rollout import Row
    from tppo.rollout.vllm_engine import apply_completion

    _, tokens, reason, so_far, cap, W, _ = case
    row = Row(0, 0, 0, [9, 9], {}, cap, [5] * so_far, [-1.0] * so_far, [0] * so_far)
    logprobs = [{t: logprob_cls(logprob=-0.25 * (i + 1))} for i, t in enumerate(tokens)]
    completion = completion_cls(index=0, text="", token_ids=tokens, cumulative_logprob=None, logprobs=logprobs, finish_reason=reason)
    n = apply_completion(row, completion, version=3, max_tokens=min(W, cap - so_far), eos=[EOS, STOP], ignore_eos=False)
    return row, n
