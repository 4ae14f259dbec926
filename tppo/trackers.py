"""The experiment trackers a user already runs, beside ``metrics.jsonl``: Weights & Biases
and MLflow (``log.report_to``; TensorBoard is written by tppo/metrics.py itself).

Each receives the same metric names as ``metrics.jsonl`` at the same steps (step 0: the
evaluation before RL), the resolved config as the run's parameters, and the completions
of ``samples.jsonl`` as a table. Offline use is the trackers' own: ``WANDB_MODE=offline``
writes a W&B run under ``RUN_DIR/trackers/wandb`` for a later ``wandb sync``; MLflow writes
to ``log.mlflow_tracking_uri``, by default a file store in ``RUN_DIR/trackers/mlruns``.
A resumed run continues the same tracker run (its id is kept in ``RUN_DIR/trackers``).
A tracker whose package is missing is a clear error naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

from tppo.config import Config, _flatten, to_dict

EXTRAS = {"wandb": ("wandb", "tppo[wandb]"), "mlflow": ("mlflow", "tppo[mlflow]")}


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed."""
    for name in report_to:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ImportError(f"log.report_to lists {name}, but the '{EXTRAS[name][0]}' package is not installed: "
                              f"pip install '{EXTRAS[name][1]}'")


def make_trackers(cfg: Config, run_dir: Path, resume: bool) -> list:
    check_trackers(cfg.log.report_to)
    kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    return [kinds[name](cfg, run_dir, resume) for name in cfg.log.report_to if name in kinds]


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics (undefined ones, null in metrics.jsonl, are not sent)."""
    out = {}
    for k, v in metrics.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _run_id(path: Path, resume: bool) -> str | None:
    return path.read_text().strip() if resume and path.exists() else None


SAMPLE_COLUMNS = ["step", "split", "prompt", "completion", "reward", "finished", "windows"]


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool) -> None:
        import wandb

        self.wandb = wandb
        root = run_dir / "trackers"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "wandb_id"
        self.run = wandb.init(project=cfg.log.project, name=cfg.log.run_name or run_dir.name, dir=str(root), config=to_dict(cfg),
                              id=_run_id(id_file, resume), resume="allow")
        id_file.write_text(self.run.id)
        # The trainer's step is the x-axis, W&B's own step only counts calls: a resumed run redoes
        # the steps after its checkpoint, and W&B drops a step below its own as already logged.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log({**_numbers(metrics), "step": int(metrics["step"])})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=SAMPLE_COLUMNS, data=[[step, *(s.get(c) for c in SAMPLE_COLUMNS[1:])] for s in samples])
        self.run.log({f"samples/{samples[0]['split']}": table, "step": step})

    def close(self) -> None:
        self.run.finish()


# MLflow's names allow letters, digits, _ - . / space and colon; '@' (pass@k) is spelled _at_.
_MLFLOW_BAD = re.compile(r"[^\w\-./ :]")


def mlflow_name(key: str) -> str:
    return _MLFLOW_BAD.sub(lambda m: "_at_" if m.group() == "@" else "_", key)


class MlflowTracker:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool) -> None:
        import mlflow

        self.mlflow = mlflow
        root = run_dir / "trackers"
        root.mkdir(parents=True, exist_ok=True)
        if cfg.log.mlflow_tracking_uri is None:  # the file store: no server, no database; MLflow 3.x asks for the opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(cfg.log.mlflow_tracking_uri or (root / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.log.project)
        id_file = root / "mlflow_run_id"
        self.run = mlflow.start_run(run_id=_run_id(id_file, resume), run_name=cfg.log.run_name or run_dir.name)
        id_file.write_text(self.run.info.run_id)
        if not resume:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(to_dict(cfg)).items()})

    def log(self, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics({mlflow_name(k): v for k, v in _numbers(metrics).items()}, step=int(metrics["step"]))

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        data = {c: [step if c == "step" else s.get(c) for s in samples] for c in SAMPLE_COLUMNS}
        self.mlflow.log_table(data, artifact_file=f"samples/{samples[0]['split']}-step-{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()
