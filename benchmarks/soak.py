"""Long-run checks: memory over hundreds of steps, and SIGKILL-and-resume many times.

    python benchmarks/soak.py memory [--steps 300]   # RSS each step; slope after warm-up
    python benchmarks/soak.py kills  [--kills 20]    # random SIGKILLs, resume, compare

``memory`` trains the demo configuration in this process (SFT warm-start from
runs/sft-chain, built if missing) and samples the resident set size after every step;
it reports the least-squares slope of RSS over the steps after ``--warmup``, the largest
number of carried rows and of windows per response (bounded by the slots and by
ceil(L / W)). ``kills`` runs a small training job as a subprocess, SIGKILLs it at random
points ``--kills`` times (resuming each time), and checks that its metrics and final
weights equal an uninterrupted run's. Results go to benchmarks/results/soak_*.json and
docs/reliability.md quotes them. tests/test_reliability.py runs the kill harness in
``make test`` with 3 kills.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, write_json  # noqa: E402

from tppo.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from trainer_helpers import deterministic_metrics, make_cfg, save_tiny  # noqa: E402


# ---------------------------------------------------------------------- the kill harness


def train_cmd(cfg_path: Path, run_dir: Path, resume: bool) -> list[str]:
    """Resume the run in ``run_dir``, or start it (again, over a run killed before its first
    checkpoint: --overwrite)."""
    return [sys.executable, "-m", "tppo.cli", "train", *(["--resume", str(run_dir)] if resume else
                                                         ["--config", str(cfg_path), "--run-dir", str(run_dir), "--overwrite"])]


def logged_steps(run_dir: Path) -> int:
    """Training steps logged so far (step 0, the evaluation before RL, is not one)."""
    path = run_dir / "metrics.jsonl"
    # lines, not parsed JSON: the file is read while a run appends to it
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.startswith('{"step": 0,')) if path.exists() else 0


def run_with_kills(cfg_path: Path, run_dir: Path, total_steps: int, kills: int, seed: int) -> int:
    """Train, SIGKILL the process ``kills`` times at random points (each a random 0-0.15 s
    after a random next step was logged: inside generation, an update or a checkpoint
    write), resume each time, then run to the end. After every kill each checkpoint on
    disk must load. Returns the number of kills that hit a live process."""
    rng, landed = random.Random(seed), 0
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for _ in range(kills):
        proc = subprocess.Popen(train_cmd(cfg_path, run_dir, latest_checkpoint(run_dir) is not None), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = min(total_steps - 1, logged_steps(run_dir) + rng.randint(1, 3))
        while proc.poll() is None and logged_steps(run_dir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
        for ckpt in list_checkpoints(run_dir):  # never a partial checkpoint under a final name
            load_trainer_state(ckpt)
            load_file(ckpt / "policy" / "model.safetensors")
            load_file(ckpt / "critic" / "model.safetensors")
    final = subprocess.run(train_cmd(cfg_path, run_dir, latest_checkpoint(run_dir) is not None), env=env,
                           capture_output=True, text=True)
    if final.returncode != 0:
        raise RuntimeError(f"the final resumed run failed:\n{final.stderr[-2000:]}")
    return landed


def compare_runs(a: Path, b: Path) -> None:
    """Assert equal final weights (bit for bit) and equal metrics except timings."""
    for part in ("policy", "critic"):
        wa = load_file(latest_checkpoint(a) / part / "model.safetensors")
        wb = load_file(latest_checkpoint(b) / part / "model.safetensors")
        assert wa.keys() == wb.keys()
        diff = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
        assert not diff, (part, diff)
    ma, mb = deterministic_metrics(a), deterministic_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x == y, {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)}


def small_config(tmp: Path, total_steps: int) -> Path:
    """A tiny random model and a config that checkpoints every step."""
    from tppo.config import save_config

    cfg = make_cfg(save_tiny(tmp / "model"), tmp / "unused", f"train.total_steps={total_steps}", "log.checkpoint_every=1",
                   "log.keep_checkpoints=2", "train.torch_threads=1", "train.device=cpu")
    save_config(cfg, tmp / "config.yaml")
    return tmp / "config.yaml"


def soak_kills(kills: int, total_steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = small_config(tmp, total_steps)
        subprocess.run(train_cmd(cfg, tmp / "clean", False), check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        landed = run_with_kills(cfg, tmp / "killed", total_steps, kills, seed)
        compare_runs(tmp / "clean", tmp / "killed")
    return {"kills_attempted": kills, "kills_survived": landed, "steps": total_steps, "equal_to_uninterrupted": True}


# ---------------------------------------------------------------------- memory


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def soak_memory(steps: int, warmup: int, overrides: list[str]) -> dict:
    from tppo.config import load_config
    from tppo.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"train.total_steps={steps}", "log.eval_every=0", "log.progress=false",
                                                       "log.tensorboard=false", "log.checkpoint_every=50", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir)
        rss, carried, windows = [], [], []
        for _ in range(steps):
            m = tr.step()
            rss.append(rss_mb())
            carried.append(m["rollout/carried_rows"])
            windows.append(m["rollout/windows_per_response_max"])
        tr.logger.close()
        tr.scorer.close()
    xs = list(range(warmup + 1, steps + 1))
    bound = math.ceil(cfg.rollout.max_response_tokens / cfg.rollout.window_tokens)
    return {"steps": steps, "warmup": warmup, "rss_mb": rss, "rss_slope_mb_per_100_steps": 100 * slope(xs, rss[warmup:]),
            "rss_after_warmup_mb": rss[warmup - 1], "rss_final_mb": rss[-1], "max_carried_rows": max(carried),
            "slots": cfg.rollout.num_slots, "max_windows_per_response": max(windows), "windows_bound": bound}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["memory", "kills"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides for the memory soak")
    args = ap.parse_args()
    if args.what == "memory":
        res = soak_memory(args.steps, args.warmup, args.overrides)
        print(f"RSS slope after warm-up: {res['rss_slope_mb_per_100_steps']:+.2f} MB / 100 steps "
              f"({res['rss_after_warmup_mb']:.0f} -> {res['rss_final_mb']:.0f} MB); carried rows <= {res['max_carried_rows']} "
              f"of {res['slots']} slots; windows per response <= {res['max_windows_per_response']} (bound {res['windows_bound']})")
    else:
        res = soak_kills(args.kills, total_steps=max(3 * args.kills, 12), seed=args.seed)
        print(f"{res['kills_survived']} of {res['kills_attempted']} SIGKILLs hit the run; resumed each time; "
              f"metrics and weights equal to the uninterrupted run")
    path = write_json(f"soak_{args.what}.json", {"commit": commit(), "machine": machine(), "args": vars(args), **res})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
