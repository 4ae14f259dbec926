"""Reward functions for ``task.reward=examples/rewards.py:NAME`` (see the README).

A reward is ``fn(prompt, completion, answer, **columns) -> float`` (or a dict with
``score`` and extra named values): the prompt as the dataset gave it (before the
template), the decoded completion, the example's reference answer and any other dataset
column it names. Several combine as a weighted sum (``task.reward=[a, b]
task.reward_weights=[1.0, 0.2]``). It
runs under tppo's fault-tolerant scorer: a call that raises, hangs past
``task.reward_timeout_s`` or returns NaN scores 0 and is counted (``reward/errors``).
"""

from __future__ import annotations

from tppo.rewards import exact_reward


def length_penalised_exact(prompt: str, completion: str, answer: str) -> float:
    """The chain task's exact reward, minus 0.001 per character past 200: correct and short."""
    return exact_reward(prompt, completion, answer) - 0.001 * max(0, len(completion) - 200)


def exact_within_budget(prompt: str, completion: str, answer: str, max_chars: int) -> dict:
    """A reward that reads a dataset column (``max_chars``, an extra column of the JSONL)
    and returns extra values: the exact reward, halved past the row's character budget;
    ``over_budget`` is logged as ``reward/over_budget`` (its mean over the finished rows)."""
    over = len(completion) > int(max_chars)
    return {"score": exact_reward(prompt, completion, answer) * (0.5 if over else 1.0), "over_budget": float(over)}


def batched_exact(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The batched form (``batched = True`` below, or ``task.reward_batched: true``): lists in,
    one value per completion out, one call per batch of responses. A reward that calls a
    judge model or a code sandbox would send the whole batch in one request here."""
    return [exact_reward(p, c, a) for p, c, a in zip(prompts, completions, answers)]


batched_exact.batched = True
