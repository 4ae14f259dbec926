"""EGAE truncation-bias diagnostic: what the window cut did to a response's advantages.

EGAE gives the tokens of a window that was cut an advantage without knowing the rest of
the response: the value after the cut is bootstrapped (T-PPO spec, "EGAE"; the paper's
V(s_l) = V(s_{l-1}) has no error analysis). Once such a row finishes, the rest is known.
This module compares, token by token over the row's *cut* windows:

* the advantage each token received: EGAE over its window with the window's own critic
  values and lambda (recomputed here from what was kept, before whitening and
  ``window_ignore_tokens``, so it is the estimator's output, not the loss's input);
* ordinary GAE over the complete response with the same values (each token's value from
  the step that generated it) and the final reward, at the lambda a finished row of that
  length gets: what synchronous PPO would have computed with this critic.

The difference is the truncation error alone (the values are the same on both sides).
It is computed for every bootstrap mode side by side on the same rows, whatever mode
trains. The cost: per row in flight, one float per generated token and two per cut,
kept by :class:`TruncationTracker` (checkpointed with the run), and a few
length-L recursions when a cut row finishes.

Metrics (docs/metrics.md): ``egae/rows_compared`` and, for the configured bootstrap and
per mode under ``egae/<mode>/``: ``advantage_mae``, ``advantage_bias`` (mean of EGAE -
GAE), ``sign_agreement``, ``advantage_corr``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from tppo import algos

MODES = ("prev_value", "next_value", "zero")
STATS = ("advantage_mae", "advantage_bias", "sign_agreement", "advantage_corr")


@dataclasses.dataclass
class CutWindow:
    """One window of a row that was cut: its tokens' state values V(s_t) (from the step
    that generated them), the critic's value after the cut V(s_l), and its lambda."""

    values: list[float]
    next_value: float
    lam: float


def window_advantages(window: CutWindow, mode: str, gamma: float) -> torch.Tensor:
    """(n,) EGAE advantages of a cut window's tokens under bootstrap ``mode``."""
    values = torch.tensor([window.values], dtype=torch.float64)
    adv, _ = algos.egae(torch.zeros_like(values), values, torch.ones_like(values, dtype=torch.bool), torch.tensor([False]),
                        gamma, window.lam, bootstrap=mode, next_values=torch.tensor([window.next_value], dtype=torch.float64))
    return adv[0]


def full_gae(values: Sequence[float], reward: float, lam: float, gamma: float) -> torch.Tensor:
    """(R,) GAE advantages of a finished response: reward on its last token, V(s_R) = 0."""
    v = torch.tensor([list(values)], dtype=torch.float64)
    r = torch.zeros_like(v)
    r[0, -1] = reward
    adv, _ = algos.gae(r, v, torch.ones_like(v, dtype=torch.bool), gamma, lam)
    return adv[0]


def compare_row(windows: list[CutWindow], final_values: Sequence[float], reward: float, final_lam: float,
                gamma: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({mode: EGAE advantages of the cut windows' tokens}, GAE advantages of the same
    tokens over the complete response), each (n,) with n = tokens in cut windows."""
    cut_values = [v for w in windows for v in w.values]
    reference = full_gae(cut_values + list(final_values), reward, final_lam, gamma)[: len(cut_values)]
    received = {mode: torch.cat([window_advantages(w, mode, gamma) for w in windows]) for mode in MODES}
    return received, reference


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How EGAE's advantages ``a`` match GAE's ``b`` (same tokens): mean |a - b|, mean
    (a - b), share of tokens with the same sign (both 0 counts as the same), Pearson
    correlation (NaN with fewer than 2 tokens or a constant side)."""
    if a.numel() == 0:
        return {k: math.nan for k in STATS}
    diff = a - b
    corr = math.nan
    if a.numel() > 1 and float(a.std()) > 0 and float(b.std()) > 0:
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {"advantage_mae": float(diff.abs().mean()), "advantage_bias": float(diff.mean()),
            "sign_agreement": float((torch.sign(a) == torch.sign(b)).double().mean()), "advantage_corr": corr}


class TruncationTracker:
    """Keeps the cut windows of the rows in flight and compares them when the rows finish.

    Args:
        gamma: the discount.
        configured: the bootstrap mode training uses (its stats are also logged unprefixed).
    """

    def __init__(self, gamma: float, configured: str) -> None:
        self.gamma, self.configured = gamma, configured
        self.cut: dict[int, list[CutWindow]] = {}

    def observe(self, rows, window_start: list[int], values_full: torch.Tensor, rewards: list[float | None],
                lam: float | torch.Tensor) -> dict[str, float]:
        """Record this step's cut windows; compare the cut rows that finished. ``rows`` and
        ``window_start`` are the WindowBatch's, ``values_full`` (B, S) the critic's outputs
        over ``prompt + response`` (step 4), ``lam`` the policy's lambda per row (step 5)."""
        lams = torch.as_tensor(lam, dtype=torch.float64).expand(len(rows)).tolist()
        received: dict[str, list[torch.Tensor]] = {mode: [] for mode in MODES}
        reference: list[torch.Tensor] = []
        for b, (row, start, reward) in enumerate(zip(rows, window_start, rewards)):
            P, R = len(row.prompt_ids), len(row.response_ids)
            values = values_full[b, P + start - 1 : P + R - 1].double().tolist()  # V(s_t) of this window's tokens
            if reward is None:  # cut: keep the window for when the row finishes
                self.cut.setdefault(row.uid, []).append(CutWindow(values, float(values_full[b, P + R - 1]), lams[b]))
            elif row.uid in self.cut:  # finished after at least one cut (a row never cut has nothing to compare)
                got, ref = compare_row(self.cut.pop(row.uid), values, reward, lams[b], self.gamma)
                for mode in MODES:
                    received[mode].append(got[mode])
                reference.append(ref)
        return self._metrics(received, reference)

    def _metrics(self, received: dict[str, list[torch.Tensor]], reference: list[torch.Tensor]) -> dict[str, float]:
        ref = torch.cat(reference) if reference else torch.zeros(0, dtype=torch.float64)
        out: dict[str, float] = {"egae/rows_compared": len(reference)}
        for mode in MODES:
            stats = agreement(torch.cat(received[mode]) if reference else ref, ref)
            out.update({f"egae/{mode}/{k}": v for k, v in stats.items()})
            if mode == self.configured:
                out.update({f"egae/{k}": v for k, v in stats.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cut": {uid: [dataclasses.asdict(w) for w in ws] for uid, ws in self.cut.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cut = {int(uid): [CutWindow(**w) for w in ws] for uid, ws in state["cut"].items()}
