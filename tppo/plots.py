"""PNG plots of one or more runs, overlaid so PPO and T-PPO compare at a glance."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tppo.metrics import read_metrics

PANELS = [
    ("reward/accuracy", "time/elapsed_s", "training accuracy (finished rows) vs wall-clock (s)"),
    ("reward/accuracy", "step", "training accuracy vs step"),
    ("eval/accuracy", "time/elapsed_s", "held-out accuracy vs wall-clock (s)"),
    ("rollout/response_length", "step", "finished response length vs step"),
    ("rollout/slot_utilization", "step", "slot utilization vs step"),
    ("reward/mean", "rollout/total_generated_tokens", "reward vs generated tokens"),
]


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 10) -> Path:
    """Write a grid of the :data:`PANELS` for every run to ``out`` (a .png path).

    Per-step series are drawn faint, with their ``smooth``-step rolling mean on top;
    the held-out accuracy before RL (``eval_initial.json``) is the point at x = 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: (read_metrics(d), _initial_eval(d)) for d in run_dirs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (y, x, title) in zip(axes.flat, PANELS):
        for i, (name, (rows, initial)) in enumerate(runs.items()):
            pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
            if y in initial:
                pts.insert(0, (0, initial[y]))
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = f"C{i}"
            if y.startswith("eval/"):
                ax.plot(xs, ys, marker="o", color=color, label=name)
            else:
                ax.plot(xs, ys, color=color, alpha=0.25)
                ax.plot(xs, _rolling_mean(ys, smooth), color=color, label=name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    labelled = next((ax for ax in axes.flat if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:  # a run too short for some curves still gets its legend
        labelled.legend()
    return _save(fig, out, dpi=90)


def _save(fig, out: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _initial_eval(run_dir) -> dict:
    path = Path(run_dir) / "eval_initial.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _rolling_mean(ys, n: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


# tppo report: panels of one run's partial trajectories and EGAE diagnostic. Each panel
# draws a family of series, one line per key matching its pattern ({k}: window round, {m}: mode).
REPORT_PANELS = [
    ("rounds/k{k}/finished_rows", "finished rows by windows spanned (k)"),
    ("rounds/k{k}/accuracy", "accuracy of finished rows by windows spanned (k)"),
    ("rounds/k{k}/versions_per_response", "policy versions per response by windows spanned (k)"),
    ("egae/{m}/advantage_mae", "EGAE truncation error: mean |A_EGAE - A_GAE| by bootstrap"),
    ("egae/{m}/advantage_bias", "EGAE truncation bias: mean A_EGAE - A_GAE by bootstrap"),
    ("egae/{m}/sign_agreement", "EGAE vs GAE: share of advantages with the same sign"),
    ("rollout/carried_token_share", "share of policy tokens from carried rows"),
    ("rollout/oldest_row_windows", "windows spent by the oldest row in flight"),
    ("rollout/window_tokens", "window length W"),
]


def plot_report(run_dir: str | Path, out: str | Path, smooth: int = 10) -> Path:
    """Write the :data:`REPORT_PANELS` of one run to ``out`` (a .png path): per-step
    series faint, their ``smooth``-step rolling mean on top (NaN steps skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k in r})
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    for ax, (pattern, title) in zip(axes.flat, REPORT_PANELS):
        for i, key in enumerate(k for k in keys if _matches(k, pattern)):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=f"C{i}", alpha=0.25)
            ax.plot(xs, _rolling_mean(ys, smooth), color=f"C{i}", label=key.split("/")[1] if "{" in pattern else key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{Path(run_dir).name}: partial trajectories and the EGAE truncation diagnostic")
    return _save(fig, out, dpi=80)


def _matches(key: str, pattern: str) -> bool:
    """Whether ``key`` is one of ``pattern``'s series: {k} a round number, {m} a mode name."""
    regex = re.escape(pattern).replace(r"\{k\}", r"\d+").replace(r"\{m\}", r"(prev_value|next_value|zero)")
    return re.fullmatch(regex, key) is not None
