"""The statistics of the speed study (benchmarks/speed_study.py), as pure functions.

Every number the study reports stands next to its noise:

* :func:`eval_standard_error`: the standard error of one held-out evaluation (avg@k over
  problems x samples), by a two-level bootstrap (problems, then samples within each),
  the noise a target must clear;
* :func:`time_ratio_ci`: a per-seed ratio (PPO's time / an arm's) summarised by its
  median with a bootstrap confidence interval over seeds; a seed where the arm never
  reached the target counts as ratio 0 and one where PPO never did as +inf, so no seed
  is dropped (the median stays defined while more than half the seeds reached it);
* :func:`value_at`: a curve (x, y) read at x by linear interpolation, for accuracy at
  equal training time.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Sequence


def eval_standard_error(correct: Sequence[Sequence[bool]], draws: int = 2000, seed: int = 0) -> float:
    """Bootstrap SE of avg@k: resample problems with replacement, then each problem's k
    samples with replacement; the standard deviation of the resampled means (its closed
    form is ``tppo.evaluation.avg_at_k_se``, logged by the trainer as ``eval/accuracy_se``)."""
    rng = random.Random(seed)
    rows = [list(map(float, r)) for r in correct if len(r)]
    if len(rows) < 2:
        return float("nan")
    means = []
    for _ in range(draws):
        total = n = 0.0
        for _ in range(len(rows)):
            r = rows[rng.randrange(len(rows))]
            total += sum(r[rng.randrange(len(r))] for _ in range(len(r)))
            n += len(r)
        means.append(total / n)
    return statistics.stdev(means)


def seed_ratios(baseline: Sequence[float | None], arm: Sequence[float | None]) -> list[float]:
    """Per seed, baseline / arm (a time: above 1, the arm is faster); a seed where the arm
    did not reach the target is 0, one where only the baseline did not is +inf, one where
    neither did is dropped from the ratio but not from the report (its count is kept
    beside it)."""
    out = []
    for b, a in zip(baseline, arm):
        if a is None and b is None:
            continue
        out.append(0.0 if a is None else math.inf if b is None else b / a)
    return out


def time_ratio_ci(ratios: Sequence[float], draws: int = 4000, level: float = 0.95, seed: int = 0) -> dict:
    """Median of the per-seed ratios with a percentile bootstrap CI over seeds;
    ``n`` the number of seeds in it."""
    xs = list(ratios)
    if not xs:
        return {"median": None, "ci_low": None, "ci_high": None, "n": 0}
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    lo, hi = meds[int((1 - level) / 2 * (draws - 1))], meds[int((1 + level) / 2 * (draws - 1))]
    return {"median": statistics.median(xs), "ci_low": lo, "ci_high": hi, "n": len(xs)}


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y of the piecewise-linear curve through (xs, ys) (xs increasing) at x; None beyond
    its last point (the run had not trained that long), its first y before the first."""
    if not xs or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]
