"""Atomic checkpoints: models, optimizers, schedulers, RNGs, data cursor, rows in flight.

A checkpoint is a directory ``run_dir/checkpoints/step-NNNNNN`` holding ``policy/`` and
``critic/`` (``save_pretrained``, safetensors) and ``trainer_state.pt`` (everything
else, including the engine's unfinished rows with their tokens, log-probs and
versions). It is written under a temporary name, flushed, then renamed: a directory
with the final name is always complete, and a crash mid-write leaves the previous
checkpoint intact (its half-written temporary directory is ignored by readers and
removed by the next save). Only the last ``keep`` checkpoints are kept; an old one is
renamed out of sight before it is deleted, so a kill mid-prune leaves no partial
checkpoint under a final name either.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, write_models: Callable[[Path], None], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune to the last ``keep``.

    ``write_models(tmp_dir)`` saves the models into the directory being written.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".del-step-*")]:  # left by a writer killed mid-save or mid-prune
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write_models(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (after a resume): replace it whole
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted one ever carries a final name: rename
    it out of the readers' sight (atomic), then delete it."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    # The state holds RNG states and optimizer tensors written by tppo itself.
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
