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
