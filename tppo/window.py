"""Automatic window length (``rollout.window_tokens: auto``): W chosen every step from what
the run has measured, not from a guess.

The trade-off. A small W keeps the decode batch full (no step waits for the longest
response) but every response spans more windows: more steps re-read its whole context
(prefill, critic values, the update's forward and backward), and more of its tokens get
an EGAE advantage bootstrapped at a cut. A large W is synchronous PPO's waiting.

The rule: among the candidates W = window_min, 2 window_min, ... <= window_max, take the
one with the most predicted finished prompts per second whose predicted truncation error
stays <= ``window_bias_cap``; ties go to the larger W (less truncation); if none meets the
cap, the largest W. Until the run has measured enough (:data:`MIN_LENGTHS` finished
responses and one timed step), W = window_max, which also measures the length tail
without cuts. The truncation error is measured before it is trusted: while no error has
been measured, or after :data:`STALE_STEPS` steps without a new measurement (a run held
at window_max cuts nothing, so an old, worse estimate would hold it there for good), the
step probes the mildest cut, the largest candidate below window_max, whose cut rows
measure the error when they finish.

The prediction for a candidate W (:func:`predict`), from the measured inputs
(:class:`WindowHistory`, kept with the checkpoint, so the choice is deterministic given
the run's history and resume stays exact):

* the empirical distribution of response lengths l (the last :data:`LENGTHS_KEPT`
  finished ones) and the mean prompt length P;
* a slot runs one response after another (renewal): per step it finishes 1 / E[n]
  responses, n = ceil(l / W) its windows, and its context (prompt + response so far,
  what every non-decode phase reads) averages E[sum_k (P + min(l, k W))] / E[n] tokens;
* the decode steps of a window are the largest number of tokens any of the B slots
  writes in it: E[max of B draws of g], g = min(W, tokens left) over the slot-windows;
* step seconds = (decode seconds per decode step) x decode steps + (seconds of the
  rest of a step per context token) x B x context per slot, both the mean of the last
  :data:`TIMED_STEPS` steps' ``time/*`` metrics (what this machine and model cost);
* truncation error per policy token = (measured ``egae/advantage_mae`` per cut-window
  token, the configured bootstrap, last :data:`TIMED_STEPS` steps that compared rows)
  x (share of response tokens in cut windows, E[min(l, (n - 1) W)] / E[l]); 0 until
  a cut row has finished.

Approximations, stated: in-window refill is not modelled (it only makes small W
cheaper); a decode step costs the same whatever the batch size; groups of G samples
per prompt count as G responses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LENGTHS_KEPT = 1024
MIN_LENGTHS = 16
TIMED_STEPS = 20
STALE_STEPS = 10  # steps without a new truncation-error measurement before a probe


@dataclasses.dataclass
class WindowHistory:
    """What the run has measured (see the module docstring); plain lists for checkpoints."""

    lengths: list[int] = dataclasses.field(default_factory=list)
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)
    decode_s_per_step: list[float] = dataclasses.field(default_factory=list)
    other_s_per_token: list[float] = dataclasses.field(default_factory=list)
    cut_token_error: list[float] = dataclasses.field(default_factory=list)
    steps_since_error: int = 0  # steps recorded since the last truncation-error measurement

    def record(self, *, lengths: list[int], prompt_lengths: list[int], decode_s: float, decode_steps: int, other_s: float,
               context_tokens: int, egae_mae: float, rows_compared: int) -> None:
        """Add one step's measurements (its finished rows, its time/* split, its EGAE diagnostic)."""
        self.lengths = (self.lengths + list(lengths))[-LENGTHS_KEPT:]
        self.prompt_lengths = (self.prompt_lengths + list(prompt_lengths))[-LENGTHS_KEPT:]
        if decode_steps > 0 and context_tokens > 0:
            self.decode_s_per_step = (self.decode_s_per_step + [decode_s / decode_steps])[-TIMED_STEPS:]
            self.other_s_per_token = (self.other_s_per_token + [max(0.0, other_s) / context_tokens])[-TIMED_STEPS:]
        if rows_compared and math.isfinite(egae_mae):
            self.cut_token_error = (self.cut_token_error + [egae_mae])[-TIMED_STEPS:]
            self.steps_since_error = 0
        else:
            self.steps_since_error += 1

    @property
    def ready(self) -> bool:
        return len(self.lengths) >= MIN_LENGTHS and bool(self.decode_s_per_step)


@dataclasses.dataclass(frozen=True)
class Prediction:
    window: int
    prompts_per_s: float
    truncation_error: float
    step_s: float


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def predict(W: int, h: WindowHistory, slots: int, group: int) -> Prediction:
    """Predicted prompts per second and truncation error per policy token at window W."""
    P = _mean(h.prompt_lengths)
    windows = [math.ceil(max(1, l) / W) for l in h.lengths]
    contexts = [sum(P + min(l, k * W) for k in range(1, n + 1)) for l, n in zip(h.lengths, windows)]
    per_window = sorted(min(W, l - (k - 1) * W) for l, n in zip(h.lengths, windows) for k in range(1, n + 1))
    decode_steps = _expected_max(per_window, slots, W)
    mean_n = _mean(windows)
    step_s = _mean(h.decode_s_per_step) * decode_steps + _mean(h.other_s_per_token) * slots * sum(contexts) / sum(windows)
    cut_share = sum(min(l, (n - 1) * W) for l, n in zip(h.lengths, windows)) / max(1, sum(h.lengths))
    return Prediction(W, slots / group / mean_n / max(step_s, 1e-12), _mean(h.cut_token_error) * cut_share, step_s)


def _expected_max(sorted_values: list[int], draws: int, cap: int) -> float:
    """E[max of ``draws`` independent draws] from the empirical distribution of
    ``sorted_values`` (integers in [1, cap]): sum over x < cap of 1 - F(x)^draws."""
    n, total, i = len(sorted_values), 0.0, 0
    for x in range(cap):
        while i < n and sorted_values[i] <= x:
            i += 1
        total += 1.0 - (i / n) ** draws
    return total


def choose_window(h: WindowHistory, *, window_min: int, window_max: int, bias_cap: float, slots: int, group: int) -> int:
    """The window of the next step (the rule in the module docstring)."""
    if not h.ready:
        return window_max
    windows = sorted({*range(window_min, window_max + 1, window_min), window_max})
    if (not h.cut_token_error or h.steps_since_error >= STALE_STEPS) and len(windows) > 1:
        return windows[-2]  # measure the error (again) at the mildest cut before trusting throughput
    candidates = [predict(W, h, slots, group) for W in windows]
    allowed = [p for p in candidates if p.truncation_error <= bias_cap]
    if not allowed:
        return window_max
    return max(allowed, key=lambda p: (p.prompts_per_s, p.window)).window


def history_state(h: WindowHistory) -> dict[str, Any]:
    return dataclasses.asdict(h)


def history_from_state(state: dict[str, Any]) -> WindowHistory:
    return WindowHistory(**state)
