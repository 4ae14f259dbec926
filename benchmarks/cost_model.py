"""This machine's cost model (#20 D): each phase's seconds as its counted work times unit
costs, fitted on one calibration run and checked on the runs it did not see.

    seconds(phase, step) = sum_k  c[phase, k] * work[k, step]        (c >= 0)

The work units are the library's own counters (``work/*``, docs/metrics.md): decode steps,
row-steps and prefill tokens for generation, token positions for the forward passes and
the updates. The unit costs are fitted by non-negative least squares over the calibration
run's steps (a cost is never negative; a unit whose best fit is negative is dropped and
the rest refitted). The check is each predicted run's total seconds per phase against the
measured ones: the relative error the speed study reports per arm and phase.

    python benchmarks/cost_model.py results/speed_study_pilot.json --calibrate ppo/s0

Attention's cost grows with the context (a decode step over long rows costs more):
``work/kv_positions`` carries it, and ``work/cache_positions`` what the embedded engine's
static cache makes every decode step attend over (its whole width: static_cache.py);
``work/prefill_calls`` and ``work/copy_positions`` the fixed cost of a prefill or an
in-window join and the cache copies of compaction; ``work/prefill_positions`` the
prefill's padded batch, what a prefill costs (its tokens, ``work/prefill_tokens``, do not:
a T-PPO window pads its new prompts to its longest carried row; static_cache.py). Runs
before a counter have none; the fit drops a unit that never varies. A calibration run
whose steps barely vary a unit (T-PPO: every window ~W decode steps) leaves that unit's
cost ill-determined: calibrate on runs that vary them (the speed study pools one run of
each arm).

The machine's own speed drifts between runs on a shared VM (the same work up to 8 % slower
or 18 % faster): a run that logged the speed probe (benchmarks/speed_probe.py, ``probe/*`` per
step) has its seconds measured in probe-seconds: each phase's seconds divided by the run's
median probe of the kind that phase is made of (:data:`SPEED`) before the fit, and the
prediction multiplied by the predicted run's (``speed``). The costs are then per unit of
work in the probe's time, and the check is the counts' error with the machine's drift
measured by a clock beside it, not fitted from the phases predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PHASE_WORK = {
    "generate": ("work/decode_steps", "work/row_steps", "work/kv_positions", "work/cache_positions", "work/prefill_tokens",
                 "work/prefill_positions", "work/prefill_calls", "work/copy_positions"),
    "values": ("work/value_positions",),
    "old_logprobs": ("work/old_logprob_positions",),
    "policy_update": ("work/policy_positions", "work/policy_prefix_positions"),
    "value_update": ("work/critic_positions",),
}

# the probe each phase's seconds are measured against (speed_probe.py): decode steps are small
# matmuls and per-call overhead, the passes over token positions dense ones
SPEED = {phase: "probe/decode_s" if phase == "generate" else "probe/dense_s" for phase in PHASE_WORK}


def nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, by dropping the most negative
    coefficient and refitting until none is (exact for the few units a phase has)."""
    active = [j for j in range(X.shape[1]) if X[:, j].any()]
    coef = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def fit(steps: list[dict]) -> dict[str, dict[str, float]]:
    """Unit costs per phase (seconds per unit of work) from one run's per-step records
    (``time/<phase>_s`` and the ``work/*`` counters)."""
    out = {}
    for phase, keys in PHASE_WORK.items():
        X = np.array([[float(s.get(k) or 0) for k in keys] for s in steps])
        y = np.array([float(s.get(f"time/{phase}_s") or 0) for s in steps])
        out[phase] = dict(zip(keys, nnls(X, y).tolist()))
    return out


def run_speed(steps: list[dict]) -> dict[str, float] | None:
    """A run's speed per phase: the median over its steps of the probe the phase is measured
    against (:data:`SPEED`); None for a run that did not log the probe on every step."""
    kinds = set(SPEED.values())
    if not steps or any(not s.get(k) for s in steps for k in kinds):
        return None
    med = {k: float(np.median([s[k] for s in steps])) for k in kinds}
    return {phase: med[k] for phase, k in SPEED.items()}


def in_probe_seconds(steps: list[dict], speed: dict[str, float] | None) -> list[dict]:
    """The steps with each phase's seconds divided by the run's probe (``run_speed``); the
    steps themselves when ``speed`` is None (a check in plain seconds)."""
    if speed is None:
        return steps
    return [{**s, **{f"time/{p}_s": (s.get(f"time/{p}_s") or 0.0) / speed[p] for p in speed}} for s in steps]


def predict(costs: dict[str, dict[str, float]], work: dict[str, float], speed: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per phase of a run with the total ``work`` counters; ``speed``: the run's
    probe (``run_speed``), for costs fitted in probe-seconds."""
    return {phase: sum(c * float(work.get(k) or 0) for k, c in units.items()) * (speed[phase] if speed else 1.0)
            for phase, units in costs.items()}


def relative_errors(costs: dict[str, dict[str, float]], run: dict, speed: dict[str, float] | None = None) -> dict[str, float | None]:
    """Predicted / measured - 1 per phase of a run (``work`` and ``phase_s`` totals); None
    for a phase the run did no work in (its seconds are the timer's). ``speed``: the run's
    probe (``run_speed``), for costs fitted in probe-seconds."""
    pred = predict(costs, run["work"], speed)
    did = {p: any(float(run["work"].get(k) or 0) for k in keys) for p, keys in PHASE_WORK.items()}
    return {p: (pred[p] / run["phase_s"][p] - 1.0) if did[p] and run["phase_s"].get(p) else None for p in PHASE_WORK}


def split_run_factor(errors: dict[str, float | None]) -> tuple[float, dict[str, float]]:
    """A run's relative errors (``relative_errors``) split into the run's own speed and the
    phases' shares: 1 + e_p = (1 + f) (1 + r_p), with 1 + f the median over phases of 1 + e_p.

    f is what every phase of the run shares: the machine ran that run faster or slower than
    the calibration (on a shared 2-core VM its speed drifts by several % between runs, and
    the partner run on the other core changes too). r_p is what the counts get wrong about
    how the run's time divides between phases. A model of counts alone can predict r, never
    f (the speed probe measures it: ``run_speed``); the speed study reports both beside the
    plain error. Returns (f, {phase: r_p}).
    """
    kept = {p: e for p, e in errors.items() if e is not None}
    if not kept:
        return float("nan"), {}
    scale = float(np.median([1.0 + e for e in kept.values()]))
    return scale - 1.0, {p: (1.0 + e) / scale - 1.0 for p, e in kept.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a speed study JSON (its results/*/per_step)")
    ap.add_argument("--calibrate", default="ppo/s0", help="the run the unit costs are fitted on (never predicted)")
    args = ap.parse_args(argv)
    data = json.loads(args.results.read_text())
    runs = {k: v for k, v in data["results"].items() if "per_step" in v}
    speeds = {k: run_speed(r["per_step"]) for k, r in runs.items()}
    probed = all(v is not None for v in speeds.values())
    if not probed:  # every run in plain seconds
        speeds = dict.fromkeys(runs)
    costs = fit(in_probe_seconds(runs[args.calibrate]["per_step"], speeds[args.calibrate]))
    errors = {k: relative_errors(costs, r, speeds[k]) for k, r in runs.items() if k != args.calibrate}
    print(json.dumps({"calibration": args.calibrate, "measured_against": "speed probe" if probed else "seconds",
                      "unit_costs": costs, "relative_error": errors}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
