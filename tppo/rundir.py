"""A run directory belongs to one run: what it holds, and the rule that runs never mix.

Training into a directory that already holds a run would overwrite its ``config.yaml``
and ``metrics.jsonl`` while keeping its checkpoints, so that a later ``--resume``
continues the old weights under the new config (issue #22). :func:`claim` refuses that;
the caller either resumes the run or asks to start again, which first removes every
artifact of the old run (and nothing else the directory may hold).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tppo.config import ConfigError

# Everything a run writes into its directory (tppo/trainer.py, metrics.py, checkpoint.py,
# plots.py). A file not listed here is the user's and is never removed.
RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "eval_initial.json", "samples.jsonl", "checkpoints", "tensorboard",
                 "plots.png", "report.png", "trackers")


class RunDirInUse(ConfigError):
    """The run directory holds another run, and neither resume nor overwrite was asked."""


def run_artifacts(run_dir: str | Path) -> list[Path]:
    """The artifacts of a run present in ``run_dir`` (empty: no run there)."""
    root = Path(run_dir)
    return [root / name for name in RUN_ARTIFACTS if (root / name).exists()]


def claim(run_dir: str | Path, *, overwrite: bool) -> list[Path]:
    """Make ``run_dir`` ready for a new run; the artifacts removed (with ``overwrite``).

    Raises :class:`RunDirInUse`, before anything is written, when the directory holds a
    run and ``overwrite`` is false: the directory is left byte-identical.
    """
    found = run_artifacts(run_dir)
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise RunDirInUse(f"{run_dir} already holds a run ({names}). Continue it with `tppo train --resume {run_dir}`, "
                          f"start it again with --overwrite (removes its checkpoints and metrics), or choose another --run-dir")
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found
