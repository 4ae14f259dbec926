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
GAE), ``sign_agreement``, ``advantage_corr``; with several ranks, of the whole batch
(their sufficient statistics are summed over ranks).
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


def agreement_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(9,) float64 sufficient statistics of how ``a`` matches ``b`` (same tokens): n,
    sum |a - b|, sum (a - b), same-sign count, sum a, sum b, sum a^2, sum b^2, sum ab.
    Sums add over ranks (and over any split of the tokens), so the statistics of a
    data-parallel batch are :func:`agreement_from_sums` of the all-reduced sums."""
    a, b = a.double(), b.double()
    diff = a - b
    return torch.stack([torch.tensor(float(a.numel()), dtype=torch.float64), diff.abs().sum(), diff.sum(),
                        (torch.sign(a) == torch.sign(b)).double().sum(), a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])


def agreement_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Mean |a - b|, mean (a - b), share of tokens with the same sign (both 0 counts as the
    same), Pearson correlation (NaN with fewer than 2 tokens or a constant side; a side
    whose variance is below 1e-12 of its mean square counts as constant)."""
    n, abs_diff, diff, same, sa, sb, saa, sbb, sab = sums.tolist()
    if n == 0:
        return {k: math.nan for k in STATS}
    va, vb = saa / n - (sa / n) ** 2, sbb / n - (sb / n) ** 2
    corr = math.nan
    if n > 1 and va > 1e-12 * saa / n and vb > 1e-12 * sbb / n:
        corr = (sab / n - sa * sb / n**2) / math.sqrt(va * vb)
    return {"advantage_mae": abs_diff / n, "advantage_bias": diff / n, "sign_agreement": same / n, "advantage_corr": corr}


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How EGAE's advantages ``a`` match GAE's ``b`` on one rank's tokens (see
    :func:`agreement_from_sums`)."""
    return agreement_from_sums(agreement_sums(a, b))


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
                lam: float | torch.Tensor, all_reduce=None) -> dict[str, float]:
        """Record this step's cut windows; compare the cut rows that finished. ``rows`` and
        ``window_start`` are the WindowBatch's, ``values_full`` (B, S) the critic's outputs
        over ``prompt + response`` (step 4), ``lam`` the policy's lambda per row (step 5),
        ``all_reduce`` a sum over data-parallel ranks (the metrics are then the whole
        batch's on every rank; every rank must call this each step)."""
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
        return self._metrics(received, reference, all_reduce)

    def _metrics(self, received: dict[str, list[torch.Tensor]], reference: list[torch.Tensor], all_reduce=None) -> dict[str, float]:
        ref = torch.cat(reference) if reference else torch.zeros(0, dtype=torch.float64)
        sums = torch.stack([agreement_sums(torch.cat(received[mode]) if reference else ref, ref) for mode in MODES])
        rows = torch.tensor([float(len(reference))], dtype=torch.float64)
        if all_reduce is not None:  # one collective: the rows and every mode's sums
            both = all_reduce(torch.cat([rows, sums.flatten()]))
            rows, sums = both[:1], both[1:].view(len(MODES), -1)
        out: dict[str, float] = {"egae/rows_compared": int(rows[0])}
        for mode, mode_sums in zip(MODES, sums):
            stats = agreement_from_sums(mode_sums)
            out.update({f"egae/{mode}/{k}": v for k, v in stats.items()})
            if mode == self.configured:
                out.update({f"egae/{k}": v for k, v in stats.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cut": {uid: [dataclasses.asdict(w) for w in ws] for uid, ws in self.cut.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cut = {int(uid): [CutWindow(**w) for w in ws] for uid, ws in state["cut"].items()}
