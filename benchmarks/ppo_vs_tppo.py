"""T-PPO vs synchronous PPO: held-out accuracy against wall-clock, side by side.

From one SFT checkpoint, with the same seeds and therefore the same prompts in the same
order, every run trains on the same number of prompts (``--prompts``) and is evaluated
on the held-out split each time it has consumed another ``--eval-every`` prompts:

  * ppo        synchronous PPO (W = L), finished rows leave the decode batch (the strong
               baseline: the engine's compaction, not padded ``generate``);
  * tppo-W{w}  T-PPO with window w = L/2, L/4, L/8 (the demo's other settings);
  * ablations  (seed 0, W = L/4): bootstrap next_value / zero, critic on all rows,
               fixed lambda 0.95 instead of the length-adaptive one, in-window refill,
               token-budget micro-batches, the prefix without gradient, both cheaper
               updates (``cheap``); ``--variants`` runs any of them with every seed;
  * short      PPO vs T-PPO W = L/4 on short, nearly uniform chains (where the gain
               should vanish).

Only training steps are timed (``time/elapsed_s``); evaluations are not. Runs execute as
subprocesses, ``--workers`` at a time with one torch thread each, in an order that
rotates algorithms across seeds so machine drift and the neighbour's load hit all of
them. The summary: target = median over seeds of PPO's best accuracy minus ``--margin``;
per seed, time to target (interpolated between evaluations, :func:`tppo.metrics.time_to_target`),
PPO / T-PPO ratio; median, min and max over seeds for the best window; and per run the
sequential decode steps per 1,000 prompts (``rollout/decode_steps``: the hardware-neutral cost).

    python benchmarks/ppo_vs_tppo.py            # the defaults: 1280 prompts, several hours on 2 cores
    python benchmarks/ppo_vs_tppo.py --seeds 3 --windows 64 auto --variants refill cheap \
        --no-ablations --no-short --prompts 768  # the runs of record (RESULTS.md): ~1 h 40 min
    python benchmarks/ppo_vs_tppo.py --quick    # smoke test of the whole pipeline: ~2 min
    python benchmarks/ppo_vs_tppo.py --summarize-only   # redo the report from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, benchmark_trainer, commit, machine, run_job_subprocesses, train_with_evals, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
L = 256  # the demo's max_response_tokens
SHORT_TASK = ["task.chain.median_steps=6", "task.chain.sigma=0.15", "task.chain.max_steps=9"]
PHASES = ("generate", "score", "values", "policy_update", "value_update")
ABLATIONS = ("next_value", "zero", "critic_all", "lam0.95", "refill", "tokens", "noprefixgrad", "cheap")
EGAE_KEYS = tuple(f"egae/{m}/{k}" for m in ("prev_value", "next_value", "zero")
                  for k in ("advantage_mae", "advantage_bias", "sign_agreement", "advantage_corr"))


@dataclasses.dataclass
class Job:
    setting: str  # longtail | short
    label: str  # init (evaluation only) | ppo | tppo-W64 | tppo-W64-zero ...
    seed: int
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.label}/s{self.seed}"


def algo_overrides(label: str) -> list[str]:
    """Config overrides of a run label."""
    if label == "ppo":
        return ["algo.algorithm=ppo", f"rollout.window_tokens={L}"]
    parts = label.split("-")  # tppo-W64[-ablation], tppo-Wauto
    ov = ["algo.algorithm=tppo", f"rollout.window_tokens={parts[1][1:]}"]
    ablation = {"next_value": ["algo.bootstrap=next_value"], "zero": ["algo.bootstrap=zero"],
                "critic_all": ["algo.critic_on=all"], "lam0.95": ["algo.lam_policy=0.95"],
                "refill": ["rollout.refill_within_window=true"], "tokens": ["train.micro_batch_tokens=4096"],
                "noprefixgrad": ["algo.prefix_grad=false"],  # truncated backprop through the context (tppo/prefix.py)
                "cheap": ["train.micro_batch_tokens=4096", "algo.prefix_grad=false"]}  # both cheaper updates
    return ov + (ablation[parts[2]] if len(parts) > 2 else [])


def build_jobs(seeds: int, windows: list[int | str], ablations: list[str], short: bool, variants: list[str] = ()) -> list[Job]:
    """Evaluation-only jobs first, then the runs, algorithms rotated per seed; ``variants``
    are ablations of W = L/4 run with every seed, ``ablations`` with seed 0 only."""
    labels = ["ppo"] + [f"tppo-W{w}" for w in windows] + [f"tppo-W{L // 4}-{v}" for v in variants]
    jobs = [Job("longtail", "init", 0, [])] + ([Job("short", "init", 0, SHORT_TASK)] if short else [])
    for s in range(seeds):
        rotated = labels[s % len(labels):] + labels[: s % len(labels)]
        jobs += [Job("longtail", lab, s, algo_overrides(lab)) for lab in rotated]
        if short:
            mid = f"tppo-W{L // 4}"
            jobs += [Job("short", lab, s, SHORT_TASK + algo_overrides(lab)) for lab in (["ppo", mid] if s % 2 == 0 else [mid, "ppo"])]
    for a in (a for a in ablations if a not in variants):
        jobs += [Job("longtail", f"tppo-W{L // 4}-{a}", 0, algo_overrides(f"tppo-W{L // 4}-{a}"))]
    return jobs


# ---------------------------------------------------------------------- one run (in a subprocess)


def run_job(spec: dict) -> dict:
    """Train one configuration, evaluating every ``eval_every`` prompts; its curve and timings."""
    with benchmark_trainer(DEMO, spec["sft_dir"], spec["seed"], spec["eval_problems"], spec["eval_samples"], spec["overrides"]) as tr:
        if spec["label"] == "init":
            return {"accuracy": tr.evaluate()["eval/accuracy"]}
        return _train_curve(tr, spec["prompts"], spec["eval_every"])


def _train_curve(tr, prompts: int, eval_every: int) -> dict:
    steps, curve = train_with_evals(tr, prompts, eval_every, (
        "rollout/slot_utilization", "rollout/generated_tokens", "reward/accuracy", "rollout/response_length_max", "rollout/window_tokens",
        "rollout/decode_steps", "egae/rows_compared", *EGAE_KEYS, *(f"time/{p}_s" for p in PHASES), "time/step_s"))
    gen = sum(s["rollout/generated_tokens"] for s in steps)
    return {
        "curve": curve,
        "egae": egae_table(steps),
        "window_tokens": [s["rollout/window_tokens"] for s in steps],
        "steps": len(steps),
        "prompts": tr.source.cursor,
        # the hardware-neutral rollout cost: sequential decode steps (a memory-bound GPU pays
        # per step, whatever the batch); per prompt admitted (in-flight rows at the end count)
        "decode_steps_per_1k_prompts": 1000 * sum(s["rollout/decode_steps"] for s in steps) / tr.source.cursor,
        "generated_tokens": gen,
        # token-weighted: generated tokens / slot-steps over the whole run
        "slot_utilization": gen / sum(s["rollout/generated_tokens"] / max(s["rollout/slot_utilization"], 1e-9) for s in steps),
        "phase_s": {p: sum(s[f"time/{p}_s"] for s in steps) for p in PHASES},
        "train_s": tr.elapsed,
    }


def egae_table(steps: list[dict]) -> dict:
    """The EGAE truncation diagnostic of a run (tppo/egae_bias.py): each statistic of each
    bootstrap mode averaged over the steps, weighted by the rows each step compared, over
    the first and the second half of training (does the bias shrink as the critic learns?)."""
    halves = {"first_half": steps[: len(steps) // 2], "second_half": steps[len(steps) // 2:], "all": steps}
    out = {}
    for name, part in halves.items():
        rows = [(s["egae/rows_compared"], s) for s in part if s["egae/rows_compared"]]
        out[name] = {"rows_compared": sum(w for w, _ in rows), **{k: _weighted_mean(rows, k) for k in EGAE_KEYS}}
    return out


def _weighted_mean(rows: list[tuple[int, dict]], key: str) -> float | None:
    valid = [(w, s[key]) for w, s in rows if s[key] is not None and s[key] == s[key]]  # NaN: no value that step
    n = sum(w for w, _ in valid)
    return sum(w * v for w, v in valid) / n if n else None


# ---------------------------------------------------------------------- the driver


def run_all(jobs: list[Job], args, sft_dir: Path) -> dict[str, dict]:
    """Every job in a subprocess of its own, the evaluation-only jobs first."""
    def spec(job: Job) -> dict:
        return {**dataclasses.asdict(job), "sft_dir": str(sft_dir), "prompts": args.prompts, "eval_every": args.eval_every,
                "eval_problems": args.eval_problems, "eval_samples": args.eval_samples}

    ordered = [j for j in jobs if j.label == "init"] + [j for j in jobs if j.label != "init"]
    return run_job_subprocesses(Path(__file__), [(j.name, spec(j)) for j in ordered], args.workers, _brief,
                                first=sum(j.label == "init" for j in jobs))


def _brief(res: dict) -> str:
    if "curve" not in res:
        return f"accuracy {res['accuracy']:.3f}"
    last = res["curve"][-1]
    return f"final {last['accuracy']:.3f} after {res['train_s']:.0f} s of training, {res['steps']} steps, util {res['slot_utilization']:.2f}"


def ensure_sft(args) -> Path:
    """The demo's SFT warm-start (trained once, cached); a tiny one for --quick."""
    from tppo.config import load_config
    from tppo.sft import run_sft

    if args.quick:
        out = Path(tempfile.mkdtemp()) / "sft"
        return run_sft(load_config(DEMO, [f"sft.output_dir={out}", "sft.steps=30", "sft.batch_size=16"]), log_every=1000)
    cfg = load_config(DEMO)
    out = ROOT / cfg.sft.output_dir
    if not (out / "config.json").exists():
        print(f"training the SFT warm-start into {out}")
        run_sft(load_config(DEMO, [f"sft.output_dir={out}"]))
    return out


# ---------------------------------------------------------------------- the summary


def summarize(results: dict[str, dict], margin: float) -> dict:
    """Targets, times to target and ratios per setting; see the module docstring."""
    from tppo.metrics import time_to_target

    out: dict = {}
    for setting in sorted({k.split("/")[0] for k in results}):
        runs = {k: v for k, v in results.items() if k.startswith(setting + "/") and "curve" in v}
        init = results.get(f"{setting}/init/s0", {}).get("accuracy")
        labels = sorted({k.split("/")[1] for k in runs})
        seeds = sorted({int(k.split("/")[2][1:]) for k in runs})
        ppo_best = [max(p["accuracy"] for p in runs[f"{setting}/ppo/s{s}"]["curve"]) for s in seeds if f"{setting}/ppo/s{s}" in runs]
        if not ppo_best:
            continue
        target = statistics.median(ppo_best) - margin

        def ttt(label: str, seed: int, axis: str) -> float | None:
            r = runs.get(f"{setting}/{label}/s{seed}")
            if r is None:
                return None
            pts = [{"prompts": 0, "elapsed_s": 0.0, "tokens": 0, "step": 0, "accuracy": init}] if init is not None else []
            pts += r["curve"]
            return time_to_target([p[axis] for p in pts], [p["accuracy"] for p in pts], target)

        def ratio_to_ppo(label: str, ran: list[int], key: str) -> dict | None:
            """PPO's ``key`` / this run's, per seed that both ran (and recorded it): their spread."""
            pairs = [(runs.get(f"{setting}/ppo/s{s}"), runs[f"{setting}/{label}/s{s}"]) for s in ran]
            return _spread([p[key] / r[key] for p, r in pairs if p is not None and key in p and key in r])

        ppo_times = {s: ttt("ppo", s, "elapsed_s") for s in seeds}
        per_label = {}
        for lab in labels:
            ran = [s for s in seeds if f"{setting}/{lab}/s{s}" in runs]  # ablations ran seed 0 only
            these = [runs[f"{setting}/{lab}/s{s}"] for s in ran]
            times = {s: ttt(lab, s, "elapsed_s") for s in ran}
            ratios = [ppo_times[s] / t for s, t in times.items() if t and ppo_times[s]]
            per_label[lab] = {
                "seeds": len(these),
                "final_accuracy": statistics.median(r["curve"][-1]["accuracy"] for r in these),
                "best_accuracy": statistics.median(max(p["accuracy"] for p in r["curve"]) for r in these),
                "time_to_target_s": times,
                "tokens_to_target": {s: ttt(lab, s, "tokens") for s in ran},
                "steps_to_target": {s: ttt(lab, s, "step") for s in ran},
                "reached_target": sum(t is not None for t in times.values()),
                "time_to_target_ratio": _spread(ratios),
                "train_s": statistics.median(r["train_s"] for r in these),
                "steps": statistics.median(r["steps"] for r in these),
                "generated_tokens": statistics.median(r["generated_tokens"] for r in these),
                "slot_utilization": statistics.median(r["slot_utilization"] for r in these),
                "decode_steps_per_1k_prompts": _median_of(these, "decode_steps_per_1k_prompts"),
                "decode_steps_ratio": ratio_to_ppo(lab, ran, "decode_steps_per_1k_prompts"),
                "phase_s": {p: statistics.median(r["phase_s"][p] for r in these) for p in PHASES},
                "train_time_ratio": ratio_to_ppo(lab, ran, "train_s"),
                "egae": these[0].get("egae") if len(these) == 1 else {s: runs[f"{setting}/{lab}/s{s}"].get("egae") for s in ran},
                "window_tokens_mean": statistics.mean(w for r in these for w in r.get("window_tokens") or [float("nan")]),
            }
        main = [lab for lab in labels if lab.startswith("tppo") and lab.count("-") == 1 and lab != "tppo-Wauto"]
        # the best window reaches the target in the most seeds, then has the highest median ratio
        best = max(main, key=lambda lab: (per_label[lab]["reached_target"], (per_label[lab]["time_to_target_ratio"] or {}).get("median", 0.0)),
                   default=None)
        out[setting] = {"initial_accuracy": init, "target_accuracy": target, "margin": margin, "best_window": best,
                        "runs": per_label}
    return out


def _median_of(runs: list[dict], key: str) -> float | None:
    """Median of ``key`` over the runs that have it (results from before it was recorded lack it)."""
    xs = [r[key] for r in runs if key in r]
    return statistics.median(xs) if xs else None


def _spread(xs: list[float]) -> dict | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def headline(summary: dict) -> dict:
    """The fields issue #6 asks for at the top of the JSON (the long-tail setting)."""
    s = summary.get("longtail")
    if not s:
        return {}
    best = s["best_window"]
    return {
        "target_accuracy": s["target_accuracy"],
        "best_window": best,
        "time_to_target_ratio": s["runs"][best]["time_to_target_ratio"] if best else None,
        "final_accuracy": {lab: r["final_accuracy"] for lab, r in s["runs"].items()},
        "slot_utilization": {lab: r["slot_utilization"] for lab, r in s["runs"].items()},
    }


def plot(results: dict[str, dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summary)
    fig, axes = plt.subplots(len(settings), 4, figsize=(20, 4.2 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        s = summary[setting]
        labels = [lab for lab in s["runs"] if lab.count("-") <= 1 or s["runs"][lab]["seeds"] > 1]  # not seed-0 ablations
        for lab, color in zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for key, r in results.items():
                if not key.startswith(f"{setting}/{lab}/") or "curve" not in r:
                    continue
                pts = [{"elapsed_s": 0.0, "tokens": 0, "step": 0, "accuracy": s["initial_accuracy"]}] + r["curve"]
                first = key.endswith("/s0")
                for ax, axis in zip(row[:3], ("elapsed_s", "tokens", "step")):
                    ax.plot([p[axis] for p in pts], [p["accuracy"] for p in pts], "-o", ms=3, color=color, alpha=0.8,
                            label=lab if first else None)
        for ax, xl in zip(row[:3], ("training wall-clock (s, evaluations excluded)", "generated tokens", "steps")):
            ax.axhline(s["target_accuracy"], color="gray", ls="--", lw=1)
            ax.set_xlabel(xl)
            ax.set_ylabel("held-out avg@k")
            ax.set_title(f"{setting}: accuracy vs {xl.split(' (')[0]}")
            ax.legend(fontsize=8)
        bottom = [0.0] * len(labels)
        for p in PHASES:
            vals = [s["runs"][lab]["phase_s"][p] for lab in labels]
            row[3].bar(labels, vals, bottom=bottom, label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        row[3].set_ylabel("seconds (median over seeds)")
        row[3].set_title(f"{setting}: time per phase")
        row[3].legend(fontsize=8)
        row[3].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny SFT, one seed, few prompts: checks the pipeline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1280, help="prompts each run trains on")
    ap.add_argument("--eval-every", type=int, default=256, help="evaluate after every this many prompts")
    ap.add_argument("--eval-problems", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.02, help="target = PPO's best accuracy minus this")
    ap.add_argument("--windows", nargs="+", help="T-PPO windows, integers or auto (default: L/2 L/4 L/8)")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), help=f"seed-0 variants of W = L/4 (default: all of {', '.join(ABLATIONS)})")
    ap.add_argument("--no-ablations", action="store_const", dest="ablations", const=[], help="same as --ablations with none")
    ap.add_argument("--variants", nargs="*", default=[], choices=ABLATIONS, help="variants of W = L/4 run with every seed, like the windows")
    ap.add_argument("--no-short", action="store_true")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--name", help="results file stem (default: ppo_vs_tppo, ppo_vs_tppo_quick with --quick)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    name = args.name or ("ppo_vs_tppo_quick" if args.quick else "ppo_vs_tppo")
    if args.summarize_only:
        payload = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        results = payload["results"]
    else:
        if args.quick:
            args.seeds, args.prompts, args.eval_every, args.eval_problems, args.eval_samples = 1, 32, 16, 16, 2
        windows = args.windows or ([L // 2, L // 4, L // 8] if not args.quick else [L // 4])
        jobs = build_jobs(args.seeds, windows,
                          ablations=[] if args.quick else args.ablations, short=not (args.no_short or args.quick),
                          variants=[] if args.quick else args.variants)
        sft_dir = ensure_sft(args)
        print(f"{len(jobs)} runs, {args.workers} at a time, {args.prompts} prompts each")
        t0 = time.perf_counter()
        results = run_all(jobs, args, sft_dir)
        payload = {"commit": commit(), "machine": machine(), "wall_s": time.perf_counter() - t0,
                   "args": {k: v for k, v in vars(args).items() if k != "job"}, "results": results}
    summary = summarize(results, args.margin)
    payload.update(headline(summary), summary=summary)
    path = write_json(f"{name}.json", payload)
    plot(results, summary, RESULTS_DIR / f"{name}.png")
    print(json.dumps(headline(summary), indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
