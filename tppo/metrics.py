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
    "work/decode_steps", "work/row_steps", "work/kv_positions", "work/cache_positions", "work/prefill_tokens",
    "work/prefill_positions", "work/prefill_calls", "work/copy_positions", "work/value_positions", "work/old_logprob_positions",
    "work/policy_positions", "work/policy_prefix_positions", "work/critic_positions", "work/padding_positions",
    "value/loss", "value/explained_variance", "value/tokens", "value/clipfrac", "value/grad_norm",
    "train/policy_lr", "train/critic_lr",
    "time/generate_s", "time/score_s", "time/values_s", "time/old_logprobs_s", "time/policy_update_s", "time/value_update_s",
    "time/step_s", "time/elapsed_s",
)
TIME_PREFIX = "time/"


class MetricsLogger:
    """Appends step metrics to ``run_dir/metrics.jsonl`` (and TensorBoard when asked).

    On resume, lines of steps after the checkpoint (logged before a crash, about to be
    redone) are dropped first, so the file keeps exactly one line per step. Step 0 is the
    evaluation before RL (``eval/*`` only); a run resumed at step 0 evaluates again and
    writes it anew.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None, trackers: list | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.path.parent / "samples.jsonl"):
            _keep_steps_up_to(path, resume_step)
        self.trackers = list(trackers or [])  # tppo/trackers.py: W&B, MLflow
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for tracker in self.trackers:
            tracker.log(clean)
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, clean["step"])

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append completions (``split``, ``prompt``, ``completion``, ``reward``, ``finished``,
        ``windows``) of ``step`` to ``samples.jsonl``, and to TensorBoard as text."""
        with (self.path.parent / "samples.jsonl").open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in s.items()}}) + "\n")
        for tracker in self.trackers if samples else []:
            tracker.log_samples(step, samples)
        if self._tb is not None and samples:
            rows = "\n".join(f"| {s['split']} | {_md(s['prompt'])} | {_md(s['completion'])} | {s['reward']} | {s['finished']} |" for s in samples)
            self._tb.add_text(f"samples/{samples[0]['split']}", "| split | prompt | completion | reward | finished |\n|---|---|---|---|---|\n" + rows, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()


def _keep_steps_up_to(path: Path, resume_step: int | None) -> None:
    """A JSONL file of step lines as a resume from ``resume_step`` needs it: lines of later
    steps dropped (they are about to be redone), the whole file for a new run (None)."""
    if not path.exists():
        return
    if resume_step is None:
        path.unlink()
        return
    steps = [(line, json.loads(line)["step"]) for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line, step in steps if 0 < step <= resume_step or (step == 0 and resume_step > 0)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def read_metrics(run_dir: str | Path, initial: bool = False) -> list[dict[str, Any]]:
    """The run's step lines (with ``initial``, also step 0: the evaluation before RL)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in rows if initial or m["step"] > 0]


def summary_line(m: dict[str, Any], total_steps: int | None = None, eta_s: float | None = None) -> str:
    """The one-line console summary of a step; an undefined value (no row finished, no
    update) shows as ``-``, never ``nan``. Its KL is ``kl(mu)``, the trained tokens'
    KL(mu || pi_old) (``rollout/mismatch_kl``: the engine's numerics and the older
    policies of carried tokens), not ``policy/approx_kl``, which is 0 by construction with
    one update per step (the default: pi_old is the update's own forward)."""
    step = f"step {m['step']:>4}" + (f"/{total_steps}" if total_steps else "")
    eta = f" | eta {_duration(eta_s)}" if eta_s is not None else ""
    acc = m.get("eval/accuracy")
    eval_part = ""
    if acc is not None:
        se = m.get("eval/accuracy_se")
        eval_part = f" | eval acc {_fmt(acc, '.3f')}" + (f" (SE {_fmt(se, '.3f')})" if se is not None else "")
    return (f"{step} | reward {_fmt(m.get('reward/mean'), '.3f')} acc {_fmt(m.get('reward/accuracy'), '.3f')} | "
            f"pg {_fmt(m.get('policy/loss'), '.4f')} kl(mu) {_fmt(m.get('rollout/mismatch_kl'), '.1e')} "
            f"lr {_fmt(m.get('train/policy_lr'), '.1e')} | W {m.get('rollout/window_tokens', '-')} | "
            f"len {_fmt(m.get('rollout/response_length'), '.1f')} (max {m.get('rollout/response_length_max', '-')}) | "
            f"util {_fmt(m.get('rollout/slot_utilization'), '.2f')} | carried {m.get('rollout/carried_rows', '-')} | "
            f"{_fmt(m.get('time/step_s'), '.2f')} s{eta}{eval_part}")


def _fmt(v: Any, spec: str) -> str:
    """``v`` formatted, or ``-`` when it is undefined (None, NaN, inf)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _md(text: str) -> str:
    """A string as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def sample_line(s: dict[str, Any], width: int = 160) -> str:
    """One sample on one console line: prompt -> completion [reward]."""
    flat = lambda t: " ".join(t.split())  # noqa: E731
    return (f"sample ({s['split']}): {flat(s['prompt'])[-width // 3:]!r} -> {flat(s['completion'])[: 2 * width // 3]!r} "
            f"[reward {_fmt(s['reward'], '.2f')}{'' if s['finished'] else ', unfinished'}]")


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
