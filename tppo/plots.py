"""PNG plots of one or more runs, overlaid so PPO and T-PPO compare at a glance."""

from __future__ import annotations

from pathlib import Path

from tppo.metrics import read_metrics

PANELS = [
    ("reward/accuracy", "time/elapsed_s", "training accuracy vs wall-clock (s)"),
    ("reward/accuracy", "step", "training accuracy vs step"),
    ("eval/accuracy", "time/elapsed_s", "held-out accuracy vs wall-clock (s)"),
    ("rollout/response_length", "step", "finished response length vs step"),
    ("rollout/slot_utilization", "step", "slot utilization vs step"),
    ("reward/mean", "rollout/total_generated_tokens", "reward vs generated tokens"),
]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write a grid of the :data:`PANELS` for every run to ``out`` (a .png path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (y, x, title) in zip(axes.flat, PANELS):
        for name, rows in runs.items():
            pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
