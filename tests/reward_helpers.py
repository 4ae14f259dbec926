"""Module-level reward functions for scorer tests (workers import them by reference)."""

import signal
import time


def hang_python(prompt, completion, answer):
    while True:  # a Python-level loop: the worker's alarm interrupts it
        time.sleep(0.01)


def hang_ignoring_alarm(prompt, completion, answer):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # like a hang inside C code: no signal gets through
    while True:
        time.sleep(0.01)


def boom(prompt, completion, answer):
    raise RuntimeError("reward function bug")


def nan_reward(prompt, completion, answer):
    return float("nan")


def length_reward(prompt, completion, answer):
    return float(len(completion))


BATCH_CALLS = []


def batched_len_minus_budget(prompts, completions, answers, budget):
    """A batched reward reading a column (a list: one value per completion); records its calls."""
    BATCH_CALLS.append(len(completions))
    return [float(len(c) - b) for c, b in zip(completions, budget)]


batched_len_minus_budget.batched = True


def batched_wrong_length(prompts, completions, answers):
    return [1.0]


def batched_hang(prompts, completions, answers):
    while True:
        time.sleep(0.01)
