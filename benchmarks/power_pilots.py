"""Can the speed study's runs learn enough to decide a time to target? Pilots for #20 B's power rule.

#20 B asks that the median main arm gain, by the end of a run, at least twice the
target's margin over the start (3 SE): on the study's 1024 problems (SE about 0.013),
about +0.08 in 1024 prompts. The study of record gained 0.55x that. Each pilot here is
one run of the study's length (1024 prompts, seed 0) from the study's warm-start with
the study's settings (``speed_study.arm_overrides``) and the pilot's overrides,
evaluated every 128 prompts on the study's problems in one batch. Each also logs, per
step, what shows how a run learns or fails: training accuracy, response length, the
policy's entropy, the critic's explained variance. One seed each: a pilot finds a
setting worth a study, it is no result.

    python benchmarks/power_pilots.py                    # every pilot, two at a time (about 50 min here)
    python benchmarks/power_pilots.py --only grpo ppo    # some of them
    python benchmarks/power_pilots.py --only ppo grpo --prompts 2560 --out power_pilots_long.json   # longer runs
    python benchmarks/power_pilots.py --only ppo grpo --sft-mistake-rate 0.35 --out power_pilots_m35.json   # another start
    python benchmarks/power_pilots.py --only ppo tppo grpo --prompts 2560 --out power_pilots_long_a786.json   # the study of record's start
    python benchmarks/power_pilots.py --quick            # tiny, two pilots (a test runs it)

A killed run resumes from its journal (``results/power_pilots.runs.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_trainer, commit, machine, run_job_subprocesses, train_with_evals, write_json  # noqa: E402

# name: (the study's arm, the pilot's overrides on top of it)
PILOTS: dict[str, tuple[str, list[str]]] = {
    "ppo": ("ppo", []),
    "ppo-4-mini-batches": ("ppo", ["train.mini_batches=4"]),
    "ppo-8-prompts-x-8": ("ppo", ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=8"]),
    "ppo-lr-1e-4": ("ppo", ["train.policy_lr=1e-4"]),
    "ppo-lr-warmup-16": ("ppo", ["train.lr_warmup_steps=16"]),
    "ppo-lr-1e-4-warmup-16": ("ppo", ["train.policy_lr=1e-4", "train.lr_warmup_steps=16"]),
    "ppo-critic-warmup-16": ("ppo", ["train.critic_warmup_steps=16"]),
    "ppo-seq-mean-token-mean": ("ppo", ["algo.loss_agg=seq-mean-token-mean"]),
    "ppo-no-lm-loss": ("ppo", ["algo.lm_loss_coef=0"]),
    "grpo": ("ppo", ["algo.algorithm=grpo"]),  # the study's grpo arm: the same config
    "tppo": ("tppo", []),  # the study's T-PPO arm
}
LEARNING = ("reward/accuracy", "rollout/response_length", "policy/entropy", "policy/clipfrac", "policy/approx_kl", "policy/grad_norm",
            "value/explained_variance", "rollout/truncated_at_cap", "time/step_s")


def run_job(spec: dict) -> dict:
    """The starting evaluation, or one pilot's curve and per-step learning metrics."""
    import speed_study as ss

    if spec["pilot"] == "start":
        overrides = [f"log.eval_batch_rows={spec['eval_batch_rows']}"]
    else:
        arm, extra = PILOTS[spec["pilot"]]
        overrides = [*ss.arm_overrides(arm), f"log.eval_batch_rows={spec['eval_batch_rows']}", *extra, *spec["extra"]]
    with benchmark_trainer(ss.DEMO, spec["sft_dir"], spec["seed"], spec["eval_problems"], 1, overrides) as tr:
        if spec["pilot"] == "start":  # the trainer's own evaluation, as each point of the curves
            return {"accuracy": tr.evaluate()["eval/accuracy"]}
        steps, curve = train_with_evals(tr, spec["prompts"], spec["eval_every"], LEARNING)
        return {"curve": curve, "steps": steps, "train_s": tr.elapsed}


def quarters(steps: list[dict], key: str) -> list[float | None]:
    """The mean of ``key`` over each quarter of the run's steps (steps without it left out)."""
    n, out = len(steps), []
    for i in range(4):
        xs = [s[key] for s in steps[i * n // 4:(i + 1) * n // 4] if s.get(key) is not None and s[key] == s[key]]
        out.append(statistics.mean(xs) if xs else None)
    return out


def summarize(results: dict[str, dict]) -> dict:
    start = results["start"]["accuracy"]
    out = {}
    for name, r in results.items():
        if name == "start":
            continue
        acc = [p["accuracy"] for p in r["curve"]]
        out[name] = {"overrides": PILOTS[name][1], "curve": acc, "final_accuracy": acc[-1], "gain": acc[-1] - start,
                     "best_gain": max(acc) - start, "train_s": r["train_s"],
                     "by_quarter": {k: quarters(r["steps"], k) for k in ("reward/accuracy", "rollout/response_length", "policy/entropy",
                                                                           "value/explained_variance")}}
    return {"initial_accuracy": start, "pilots": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(PILOTS), help="these pilots (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny SFT, two pilots of 64 prompts (4 steps): checks the harness end to end")
    ap.add_argument("--prompts", type=int, default=1024, help="prompts each pilot trains on (the study's: 1024)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sft-mistake-rate", type=float, help="pilot another warm-start: the SFT's injected mistakes (the study's: 0.2)")
    ap.add_argument("--out", help="output JSON (default: results/power_pilots.json; --quick: results/power_pilots_quick.json)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    import speed_study as ss

    names = ["ppo", "grpo"] if args.quick else (args.only or list(PILOTS))
    size = ({"prompts": 64, "eval_every": 64, "eval_problems": 8, "extra": ["train.critic_warmup_steps=1"]} if args.quick else
            {"prompts": args.prompts, "eval_every": 128, "eval_problems": 1024, "extra": []})
    rate = ss.SFT_MISTAKE_RATE if args.sft_mistake_rate is None else args.sft_mistake_rate
    sft = ss.ensure_sft(args.quick, rate)
    base = {"sft_dir": str(sft), "sft_sha256": ss.warm_start_id(sft), "sft_mistake_rate": rate, "seed": 0, "eval_batch_rows": 1024, **size}
    out = args.out or ("power_pilots_quick.json" if args.quick else "power_pilots.json")
    specs = [("start", {**base, "pilot": "start"})] + [(n, {**base, "pilot": n}) for n in names]

    def brief(res: dict) -> str:
        return f"accuracy {res['accuracy']:.3f}" if "accuracy" in res else f"final {res['curve'][-1]['accuracy']:.3f}, {res['train_s']:.0f} s"

    journal, commit_ = ss.journal_path(out), commit()  # the code that runs (the tree may be edited while it does)
    results = run_job_subprocesses(Path(__file__), specs, args.workers, brief, first=1, journal=journal)
    payload = {"commit": commit_, "machine": machine(), "args": {**base, "pilots": names}, **summarize(results), "results": results}
    path = write_json(out, payload, one_line="results")
    journal.unlink(missing_ok=True)
    start = payload["initial_accuracy"]
    print(f"start {start:.3f}")
    for n, p in payload["pilots"].items():
        print(f"  {n:<26} final {p['final_accuracy']:.3f} ({p['gain']:+.3f}), best {p['best_gain']:+.3f}; "
              f"length by quarter {' '.join('-' if x is None else f'{x:.0f}' for x in p['by_quarter']['rollout/response_length'])}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
