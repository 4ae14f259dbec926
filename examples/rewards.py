"""Reward functions for ``task.reward=examples/rewards.py:NAME`` (see the README).

A reward is ``fn(prompt, completion, answer) -> float``: the prompt as the dataset gave
it (before the template), the decoded completion and the example's reference answer. It
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
