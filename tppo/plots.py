"""PNG plots of one or more runs, overlaid so PPO and T-PPO compare at a glance."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tppo.metrics import read_metrics

# (y key, x key, y label, x label): one panel each; the figure overlays every run.
PANELS = [
    ("eval/accuracy", "time/elapsed_s", "held-out accuracy (avg@k)", "training time (s, evaluations excluded)"),
    ("reward/accuracy", "time/elapsed_s", "training accuracy (finished rows)", "training time (s)"),
    ("reward/accuracy", "step", "training accuracy (finished rows)", "step"),
    ("reward/mean", "rollout/total_generated_tokens", "mean reward (finished rows)", "generated tokens"),
    ("rollout/response_length", "step", "finished response length (tokens)", "step"),
    ("rollout/slot_utilization", "step", "slot utilization (tokens / slot-steps)", "step"),
    ("policy/loss", "step", "policy loss", "step"),
    ("policy/approx_kl", "step", "approx. KL(pi_old || pi) per token", "step"),
    ("policy/entropy", "step", "policy entropy (nats per token)", "step"),
    ("value/loss", "step", "value loss", "step"),
    ("value/explained_variance", "step", "critic explained variance", "step"),
    ("rollout/mismatch_kl", "step", "engine / trainer mismatch KL(mu || pi_old)", "step"),
]
MIN_POINTS = 2  # a series with fewer points is left out of its panel (and the panel says so)
STYLES = ["-", "--", "-.", ":"]


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 10) -> Path:
    """Write a grid of the :data:`PANELS` for every run to ``out`` (a .png path).

    Per-step series are drawn faint with their ``smooth``-step rolling mean on top (the
    caption says so); held-out accuracy is drawn as its evaluations, the one before RL at
    x = 0. Runs differ in colour and line style, so equal curves stay visible; one legend
    serves the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for d in run_dirs:
        if not (Path(d) / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{d} has no metrics.jsonl: not a run directory (tppo train writes one)")
        runs[Path(d).name] = (read_metrics(d), _initial_eval(d))
    fig, axes = plt.subplots(3, 4, figsize=(20, 12))
    for ax, (y, x, ylabel, xlabel) in zip(axes.flat, PANELS):
        skipped = [name for i, (name, (rows, initial)) in enumerate(runs.items()) if not _draw(ax, rows, initial, x, y, i, smooth)]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if skipped:
            ax.text(0.5, 0.5, f"fewer than {MIN_POINTS} points: {', '.join(skipped)}", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="gray", wrap=True)
    handles = [plt.Line2D([], [], color=f"C{i}", linestyle=STYLES[i % len(STYLES)], label=name) for i, name in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False)
    fig.text(0.5, 0.005, f"Faint: the per-step value; bold: its rolling mean over {smooth} steps. Held-out accuracy: each "
             f"evaluation (x = 0: before RL).", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    return _save(fig, out, dpi=80, layout=False)


def _draw(ax, rows: list[dict], initial: dict, x: str, y: str, i: int, smooth: int) -> bool:
    """One run's series on ``ax``; False when it has too few points to draw."""
    pts = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and r.get(x) is not None]
    if y in initial:
        pts.insert(0, (0, initial[y]))
    if len(pts) < MIN_POINTS:
        return False
    xs, ys = zip(*pts)
    style = dict(color=f"C{i}", linestyle=STYLES[i % len(STYLES)])
    if y.startswith("eval/"):
        ax.plot(xs, ys, marker="o", **style)
    else:
        ax.plot(xs, ys, alpha=0.2, color=style["color"], linewidth=0.8)
        ax.plot(xs, _rolling_mean(ys, smooth), linewidth=1.8, **style)
    return True


def _save(fig, out: str | Path, dpi: int, layout: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if layout:
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
