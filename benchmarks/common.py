"""Helpers shared by the benchmark scripts: provenance (commit, machine) and JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """HEAD's hash, with ``-dirty`` when the tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def machine() -> str:
    """CPU model, core count, torch version and threads, e.g. for RESULTS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def results_path(name: str | Path) -> Path:
    """benchmarks/results/NAME, or NAME itself when it is a path with a directory (a test's
    temporary file)."""
    return Path(name) if Path(name).parent != Path(".") else RESULTS_DIR / name


def write_json(name: str | Path, payload: dict, one_line: str | None = None) -> Path:
    """Write ``payload`` to :func:`results_path` of NAME, indented; with ``one_line``, each
    entry of ``payload[one_line]`` (a run's raw per-step records and rows) on one line of
    its own: indenting them quadrupled the speed study's file (10.6 MB against 2.7 MB)."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if one_line is None or not payload.get(one_line):
        text = json.dumps(payload, indent=2, sort_keys=True)
    else:  # indent around a placeholder per entry, then put each entry's compact JSON in its place
        raw = {k: json.dumps(v, sort_keys=True, separators=(",", ":")) for k, v in payload[one_line].items()}
        marks = {k: f"@@one_line:{i}@@" for i, k in enumerate(raw)}
        text = json.dumps({**payload, one_line: marks}, indent=2, sort_keys=True)
        for k, mark in marks.items():
            text = text.replace(json.dumps(mark), raw[k], 1)
    path.write_text(text + "\n")
    return path


@contextlib.contextmanager
def benchmark_trainer(config: Path, sft_dir: str, seed: int, eval_problems: int, eval_samples: int, overrides: list[str]):
    """A Trainer for one benchmark job: the warm-start ``sft_dir``, ``seed`` for training and
    sampling, one torch thread, no evaluations, checkpoints, TensorBoard or console of its
    own (the job evaluates when it chooses), in a temporary run directory."""
    import tempfile

    import torch

    from tppo.config import load_config
    from tppo.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(config, [f"model.path={sft_dir}", f"train.seed={seed}", f"rollout.seed={seed}", "train.total_steps=100000",
                               "train.torch_threads=1", "log.eval_every=0", "log.checkpoint_every=0", "log.tensorboard=false",
                               "log.progress=false", f"task.eval_problems={eval_problems}", f"log.eval_samples={eval_samples}", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir)
        try:
            yield tr
        finally:
            tr.logger.close()
            tr.scorer.close()


def train_with_evals(tr, prompts: int, eval_every: int, keys: tuple[str, ...], on_step=None) -> tuple[list[dict], list[dict]]:
    """Train ``tr`` (a tppo Trainer) until ``prompts`` prompts were admitted, evaluating each
    time another ``eval_every`` were, and at the end. (per-step ``keys`` of each step's
    metrics, the evaluated curve: prompts, training seconds, generated tokens, step, accuracy).
    ``on_step(tr)`` is called after each step (untimed); a dict it returns joins the step's record."""
    steps, curve, next_eval = [], [], eval_every
    while tr.source.cursor < prompts:
        m = tr.step()
        steps.append({k: m.get(k) for k in keys})
        if on_step is not None:
            steps[-1].update(on_step(tr) or {})
        if tr.source.cursor >= next_eval or tr.source.cursor >= prompts:
            while next_eval <= tr.source.cursor:
                next_eval += eval_every
            curve.append({"prompts": tr.source.cursor, "elapsed_s": tr.elapsed, "tokens": tr.total_generated,
                          "step": tr.step_idx, "accuracy": tr.evaluate()["eval/accuracy"]})
    return steps, curve


def run_job_subprocesses(script: Path, named_specs: list[tuple[str, dict]], workers: int, brief, first: int = 0,
                         journal: Path | None = None) -> dict[str, dict]:
    """Run ``script --job SPEC`` once per (name, spec), ``workers`` at a time; the first
    ``first`` of them (the starting evaluations) before the others. {name: the job's
    result, the JSON of its last stdout line}; a job that fails raises with its stderr.
    ``brief(result)`` is the progress line's summary. ``journal``: each finished job's
    result is appended there as it ends, and a job already in it (same name and spec) is
    not run again, so a study killed after an hour resumes where it stopped."""
    import subprocess
    import sys
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    done = read_journal(journal, dict(named_specs)) if journal else {}
    if journal:
        journal.parent.mkdir(parents=True, exist_ok=True)
    if journal and journal.exists() and not journal.read_bytes().endswith(b"\n"):
        with open(journal, "a") as f:  # a line cut short by a kill: the next record starts on a line of its own
            f.write("\n")
    if done:
        print(f"  {len(done)} jobs already in {journal}: not run again", flush=True)
    lock = threading.Lock()

    def launch(item: tuple[str, dict]) -> tuple[str, dict]:
        name, spec = item
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--job", json.dumps(spec)], capture_output=True, text=True,
                              cwd=Path(script).resolve().parent.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name:<32} {time.perf_counter() - t0:6.0f} s  {brief(res)}", flush=True)
        if journal:
            with lock, open(journal, "a") as f:
                f.write(json.dumps({"name": name, "spec": spec, "result": res}) + "\n")
        return name, res

    results: dict[str, dict] = dict(done)
    with ThreadPoolExecutor(workers) as pool:
        for batch in (named_specs[:first], named_specs[first:]):
            results.update(pool.map(launch, [(n, sp) for n, sp in batch if n not in done]))
    return {name: results[name] for name, _ in named_specs}


def read_journal(journal: Path, specs: dict[str, dict]) -> dict[str, dict]:
    """The results of ``journal`` whose job has the same spec now (a changed spec runs again);
    a line cut short by a kill is ignored."""
    if not journal.exists():
        return {}
    out = {}
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if specs.get(entry["name"]) == entry["spec"]:
            out[entry["name"]] = entry["result"]
    return out
