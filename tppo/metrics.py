"""Metric sinks: one JSON object per step in ``metrics.jsonl``, TensorBoard, a console line.

Metric names are a public API (``namespace/name``), each documented with its formula in
docs/metrics.md; :data:`STEP_KEYS` lists the ones every training step logs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STEP_KEYS = (
    "step", "rollout/window_tokens",
    "rollout/slot_utilization", "rollout/decode_steps", "rollout/tokens_per_s", "time/prefill_s", "time/decode_s", "rollout/generated_tokens", "rollout/finished_rows",
    "rollout/carried_rows", "rollout/windows_per_response", "rollout/windows_per_response_max",
    "rollout/versions_per_response", "rollout/response_length", "rollout/response_length_max",
    "rollout/truncated_at_cap", "rollout/prompts_consumed", "rollout/total_generated_tokens",
    "rollout/carried_token_share", "rollout/oldest_row_windows",
    "egae/rows_compared", "egae/advantage_mae", "egae/advantage_bias", "egae/sign_agreement", "egae/advantage_corr",
    "data/skipped_long_prompts", "data/skipped_empty_prompts", "train/nonfinite_skips",
    "reward/mean", "reward/accuracy", "reward/errors", "reward/timeouts",
    "policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy", "policy/tokens", "policy/grad_norm",
    "policy/updated", "policy/skipped_steps", "policy/ratio_min", "policy/ratio_max",
    "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/mismatch_kl", "rollout/stale_token_frac",
    "policy/is_weight_mean", "policy/is_clipped_frac", "policy/is_masked_frac", "train/filtered_groups",
    "value/loss", "value/explained_variance", "value/tokens", "value/clipfrac", "value/grad_norm",
    "time/generate_s", "time/score_s", "time/values_s", "time/old_logprobs_s", "time/policy_update_s", "time/value_update_s",
    "time/step_s", "time/elapsed_s",
)
TIME_PREFIX = "time/"


class MetricsLogger:
    """Appends step metrics to ``run_dir/metrics.jsonl`` (and TensorBoard when asked).

    On resume, lines of steps after the checkpoint (logged before a crash, about to be
    redone) are dropped first, so the file keeps exactly one line per step.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, clean["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_line(m: dict[str, Any]) -> str:
    """The one-line console summary of a step."""
    acc = m.get("eval/accuracy")
    eval_part = f" | eval acc {acc:.3f}" if acc is not None else ""
    return (f"step {m['step']:>4} | reward {m['reward/mean']:.3f} acc {m['reward/accuracy']:.3f} | "
            f"len {m['rollout/response_length']:.1f} (max {m['rollout/response_length_max']}) | "
            f"util {m['rollout/slot_utilization']:.2f} | carried {m['rollout/carried_rows']} | "
            f"{m['time/step_s']:.2f} s{eval_part}")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; None reads as "undefined this step"
    return v


def time_to_target(xs: list[float], accuracies: list[float], target: float) -> float | None:
    """The first x (seconds, tokens, steps...) at which an accuracy curve reaches ``target``.

    The curve is the evaluated points ``(xs[i], accuracies[i])`` in increasing x, joined
    by straight lines: the crossing is interpolated between the last point below the
    target and the first point at or above it (evaluations are sparse, so taking the
    first point at or above would round every run up to its next evaluation). None when
    the curve never reaches the target.
    """
    if len(xs) != len(accuracies):
        raise ValueError(f"time_to_target: {len(xs)} x values but {len(accuracies)} accuracies")
    for i, (x, acc) in enumerate(zip(xs, accuracies)):
        if acc >= target:
            if i == 0:
                return float(x)
            x0, a0 = xs[i - 1], accuracies[i - 1]
            return float(x0 + (x - x0) * (target - a0) / (acc - a0))
    return None
