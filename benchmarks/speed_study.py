"""Is T-PPO faster, and when? The speed study (#20): fair arms, measured noise, work counted.

Every arm trains the demo's model and task (configs/demo.yaml) from the same SFT
warm-start, on the same prompts in the same order (seeds shared across arms), and is
evaluated on the same held-out problems every ``--eval-every`` prompts. Only training
steps are timed (``time/elapsed_s``). Runs go ``--workers`` at a time, one torch thread
each, arms rotated across seeds so drift and a neighbour's load hit every arm.

Fairness: :data:`COMMON` holds every exact optimisation the library has, and every arm
gets all of it (a test pins that the arms share every override except those that
define them): token-budget micro-batches, logits only at the positions used (always on),
the one-pass pi_old (one update per step: always on). An arm is a list of overrides:

  ppo          synchronous PPO, finished rows leave the decode batch
  tppo         T-PPO, the paper's exact update, W = L/4
  grpo         GRPO, critic-free, synchronous
  partial-ppo  the windowed rollout of T-PPO, each response trained once when it finishes,
               TIS on its older policies' tokens (what training on unfinished windows buys)
  tppo-auto, tppo-refill        T-PPO variants
  tppo-noprefixgrad             an approximation of the gradient (tppo/prefix.py), labelled so

Statistics (benchmarks/stats.py): the starting accuracy's standard error by bootstrap
over problems and samples; the target = start + max(3 SE, ``--min-gain``); per arm the
time to target per seed (null where not reached: reported, never dropped), its ratio to
PPO's with a bootstrap CI over seeds, the same in prompts (the learning factor), the
accuracy at a third, two thirds and the end of PPO's median training time, training time
per prompt (plain, and at the study's median machine speed: :func:`steady_train_s`).

    python benchmarks/speed_study.py            # the study of record (RESULTS.md): see --help for its size
    python benchmarks/speed_study.py --powered  # the main arms long enough for the power rule (POWERED; about 100 min)
    python benchmarks/speed_study.py --quick    # the harness end to end, tiny (a test runs it)
    python benchmarks/speed_study.py --summarize-only

The cost model's check (D, benchmarks/cost_model.py): unit costs fitted on every arm's
first seed, every other run's per-phase seconds predicted from its ``work/*`` counts, the
error per arm and phase in the JSON (:func:`cost_model_check`); each run's seconds measured
against the speed probe it timed after every step (benchmarks/speed_probe.py: the machine's
drift between runs), the plain seconds' check beside it. The GPU conditions table (E) is
benchmarks/gpu_projection.py's, which reads this study's JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_trainer, commit, machine, results_path, run_job_subprocesses, train_with_evals, write_json  # noqa: E402
from cost_model import fit as fit_costs  # noqa: E402
from cost_model import SPEED, in_probe_seconds, relative_errors, run_speed, split_run_factor  # noqa: E402
from speed_probe import SpeedProbe  # noqa: E402
from stats import eval_standard_error, seed_ratios, time_ratio_ci, value_at  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
L = 256  # the demo's max_response_tokens

# The warm-start: the demo's SFT with 20 % injected step mistakes (the demo's 6 % left PPO
# within one SE of its start after 1024 prompts: benchmarks/RESULTS.md, speed study).
SFT_MISTAKE_RATE = 0.2


def sft_recipe(mistake_rate: float = SFT_MISTAKE_RATE) -> list[str]:
    """The warm-start's overrides of the demo's SFT: its mistake rate, and a directory of its own."""
    return [f"sft.mistake_rate={mistake_rate}", f"sft.output_dir=runs/sft-chain-m{round(100 * mistake_rate)}"]


# Every exact optimisation, for every arm (the gradient is unchanged by each).
COMMON = ["train.micro_batch_tokens=4096"]
ARMS: dict[str, list[str]] = {
    "ppo": ["algo.algorithm=ppo"],
    "tppo": ["algo.algorithm=tppo", f"rollout.window_tokens={L // 4}"],
    "grpo": ["algo.algorithm=grpo"],  # W = L and no critic warm-up, derived by the config
    "partial-ppo": ["algo.algorithm=tppo", f"rollout.window_tokens={L // 4}", "algo.train_on=finished", "algo.behavior_correction=tis"],
    "tppo-auto": ["algo.algorithm=tppo", "rollout.window_tokens=auto"],
    # refilled rows cut at the window's end (what the embedded engine's refill did before rollout.window_mode existed)
    "tppo-refill": ["algo.algorithm=tppo", f"rollout.window_tokens={L // 4}", "rollout.refill_within_window=true",
                    "rollout.window_mode=steps"],
    "tppo-noprefixgrad": ["algo.algorithm=tppo", f"rollout.window_tokens={L // 4}", "algo.prefix_grad=false"],
}
MAIN_ARMS = ("ppo", "tppo", "grpo", "partial-ppo")
APPROXIMATIONS = {"tppo-noprefixgrad": "the gradient without the terms through earlier windows (prefix_grad=false)"}
PHASES = ("generate", "score", "values", "old_logprobs", "policy_update", "value_update")
WORK = ("work/decode_steps", "work/row_steps", "work/kv_positions", "work/cache_positions", "work/prefill_tokens", "work/prefill_positions",
        "work/prefill_calls", "work/copy_positions", "work/value_positions", "work/old_logprob_positions", "work/policy_positions",
        "work/policy_prefix_positions", "work/critic_positions", "work/padding_positions")


# The powered study (#20 B): 1024 prompts learn nothing measurable from this warm-start
# (RESULTS.md), so the main arms run three times as long, on twice the problems (SE 0.009,
# the margin 0.027). Evaluations every 256 prompts keep a run's 12 points and the study
# within about 100 minutes; every 128 would take about 150.
POWERED = {"arms": list(MAIN_ARMS), "prompts": 3072, "eval_every": 256, "eval_problems": 2048, "out": "speed_study_powered.json"}


def arm_overrides(arm: str) -> list[str]:
    return [*COMMON, *ARMS[arm]]


@dataclasses.dataclass
class Job:
    arm: str  # an ARMS key, or "init" (the starting evaluation)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/s{self.seed}"


def build_jobs(arms: list[str], seeds: int, variant_seeds: int) -> list[Job]:
    """The starting evaluation, then every arm for each seed (main arms ``seeds`` seeds,
    the others ``variant_seeds``), the order rotated per seed."""
    jobs = [Job("init", 0)]
    for s in range(seeds):
        these = [a for a in arms if a in MAIN_ARMS or s < variant_seeds]
        k = s % len(these)
        jobs += [Job(a, s) for a in these[k:] + these[:k]]
    return jobs


# ---------------------------------------------------------------------- one run (in a subprocess)


def run_job(spec: dict) -> dict:
    """The starting evaluation (per-problem correctness), or one arm's training curve."""
    from tppo.evaluation import evaluate, run_generate_fn

    arm = spec["arm"]
    overrides = [*(arm_overrides(arm) if arm != "init" else []), *spec.get("extra", []), f"log.eval_batch_rows={spec['eval_batch_rows']}"]
    with benchmark_trainer(DEMO, spec["sft_dir"], spec["seed"], spec["eval_problems"], spec["eval_samples"], overrides) as tr:
        if arm == "init":
            res = evaluate(tr.eval_set, run_generate_fn(tr.cfg, tr.policy, tr.tokenizer, tr.eos_ids, tr.device), tr.scorer,
                           samples=tr.cfg.log.eval_samples)
            return {"accuracy": res.avg_at_k, "correct": res.correct}
        return train_curve(tr, spec["prompts"], spec["eval_every"])


def train_curve(tr, prompts: int, eval_every: int) -> dict:
    """Train until ``prompts`` prompts were admitted, evaluating every ``eval_every``.
    ``rows``: every row the engine drew from the prompt stream, in the order drawn (uid; a
    refill row whose prompt did not fit yet joins later, as the replay models), as [prompt
    tokens, response tokens, finished, correct]: the final length of a finished row, the
    length so far of one still in flight at the end (one still waiting to join then is
    left out); correct: finished with reward >= 1 (the positive-example LM loss's rows).
    The GPU projection's CPU check replays them."""
    rows: dict[int, list[int]] = {}

    probe = SpeedProbe(tr.policy, tr.policy.config.vocab_size)  # the machine's speed beside each step (cost_model.SPEED)

    def record(tr) -> dict[str, float]:
        for r, x in zip(tr.last_window.rows, tr.last_rewards):  # a row is in every window it spans: the last record is its latest
            rows[r.uid] = [len(r.prompt_ids), len(r.response_ids), int(r.finished), int(x is not None and x >= 1.0)]
        return probe()

    steps, curve = train_with_evals(tr, prompts, eval_every, ("time/step_s", *(f"time/{p}_s" for p in PHASES), *WORK,
                                                             "rollout/generated_tokens", "rollout/window_tokens"), on_step=record)
    return {"curve": curve, "steps": len(steps), "prompts": tr.source.cursor, "train_s": tr.elapsed,
            "phase_s": {p: sum(s[f"time/{p}_s"] or 0.0 for s in steps) for p in PHASES},
            "work": {k: sum(s[k] or 0 for s in steps) for k in WORK}, "per_step": steps, "rows": [rows[u] for u in sorted(rows)]}


# ---------------------------------------------------------------------- the driver


def run_all(jobs: list[Job], args, sft_dir: Path, weights: str) -> dict[str, dict]:
    """Every job in a subprocess of its own, the starting evaluation first."""
    def spec(job: Job) -> dict:
        return {"arm": job.arm, "seed": job.seed, "sft_dir": str(sft_dir), "sft_sha256": weights, "prompts": args.prompts,
                "eval_every": args.eval_every, "eval_problems": args.eval_problems, "eval_samples": args.eval_samples,
                "eval_batch_rows": args.eval_batch_rows, "extra": args.extra}

    def brief(res: dict) -> str:
        return f"final {res['curve'][-1]['accuracy']:.3f}, {res['train_s']:.0f} s training" if "curve" in res else f"accuracy {res['accuracy']:.3f}"

    ordered = [j for j in jobs if j.arm == "init"] + [j for j in jobs if j.arm != "init"]
    return run_job_subprocesses(Path(__file__), [(j.name, spec(j)) for j in ordered], args.workers, brief,
                                first=sum(j.arm == "init" for j in jobs), journal=args.journal)


def warm_start_id(sft_dir: Path) -> str:
    """The SHA-256 of the warm-start's weight files: ``runs/`` caches the SFT across
    sessions and code changes, so the study names the weights it started from."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(sft_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def journal_path(out: str) -> Path:
    """Where a study's finished runs are kept until its JSON is written (beside the JSON)."""
    return results_path(out).with_suffix(".runs.jsonl")


def ensure_sft(quick: bool, mistake_rate: float = SFT_MISTAKE_RATE) -> Path:
    """The study's SFT warm-start (trained once into ``runs/``, cached): the demo's, with
    more injected step mistakes so RL has room to learn within a run (:func:`sft_recipe`).
    Another ``mistake_rate`` trains another start (``runs/sft-chain-m<percent>``), for pilots."""
    from ppo_vs_tppo import ensure_sft as demo_sft

    from tppo.config import load_config
    from tppo.sft import run_sft

    if quick:
        return demo_sft(argparse.Namespace(quick=True))
    recipe = sft_recipe(mistake_rate)
    out = ROOT / load_config(DEMO, recipe).sft.output_dir
    if not (out / "config.json").exists():
        print(f"training the study's SFT warm-start into {out}")
        run_sft(load_config(DEMO, [*recipe, f"sft.output_dir={out}"]))
    return out


# ---------------------------------------------------------------------- the summary


def summarize(results: dict[str, dict], min_gain: float, commit_: str, machine_: str) -> dict:
    """The JSON of record (the file format #20 names); see the module docstring."""
    init = results["init/s0"]
    start, se = init["accuracy"], eval_standard_error(init["correct"])
    target = start + max(3 * se, min_gain)
    arms = sorted({k.split("/")[0] for k in results if not k.startswith("init/")}, key=lambda a: list(ARMS).index(a))
    seeds = sorted({int(k.split("/s")[1]) for k in results if not k.startswith("init/")})

    def curve(arm: str, s: int):
        return run_curve(results, start, f"{arm}/s{s}")

    def ttt(arm: str, s: int, x: str = "elapsed_s") -> float | None:
        return to_target(results, start, target, f"{arm}/s{s}", x)

    steady = steady_train_s(results)
    per_prompt = lambda k: results[k]["train_s"] / results[k]["prompts"]  # noqa: E731
    per_prompt_steady = lambda k: steady[k] / results[k]["prompts"]  # noqa: E731
    ppo_train = [results[f"ppo/s{s}"]["train_s"] for s in seeds if f"ppo/s{s}" in results]
    marks = {f"{f:.2f}": f * statistics.median(ppo_train) for f in (1 / 3, 2 / 3, 1.0)} if ppo_train else {}
    out_arms, ratios = {}, {}
    for arm in arms:
        ran = [s for s in seeds if f"{arm}/s{s}" in results]
        rs = [results[f"{arm}/s{s}"] for s in ran]
        out_arms[arm] = {
            "overrides": arm_overrides(arm),
            "approximation": APPROXIMATIONS.get(arm),
            "seeds": ran,
            "final_accuracy": [r["curve"][-1]["accuracy"] for r in rs],
            "time_to_target_s": [ttt(arm, s) for s in ran],
            "reached_target": sum(ttt(arm, s) is not None for s in ran),
            "train_s": [r["train_s"] for r in rs],
            "train_s_per_prompt": [r["train_s"] / r["prompts"] for r in rs],
            "accuracy_at_ppo_time": {k: [value_at(*curve(arm, s), t) for s in ran] for k, t in marks.items()},
            "phase_s": {p: statistics.median(r["phase_s"][p] for r in rs) for p in PHASES},
            "work": {k: statistics.median(r["work"][k] for r in rs) for k in WORK},
        }
        if arm != "ppo" and "ppo" in arms:
            both = [s for s in ran if f"ppo/s{s}" in results]
            ratios[arm] = {
                "time_to_target": time_ratio_ci(seed_ratios([ttt("ppo", s) for s in both], [ttt(arm, s) for s in both])),
                "prompts_to_target": time_ratio_ci(seed_ratios([ttt("ppo", s, "prompts") for s in both], [ttt(arm, s, "prompts") for s in both])),
                "per_prompt": time_ratio_ci([per_prompt(f"ppo/s{s}") / per_prompt(f"{arm}/s{s}") for s in both]),
                **({"per_prompt_steady": time_ratio_ci([per_prompt_steady(f"ppo/s{s}") / per_prompt_steady(f"{arm}/s{s}") for s in both])}
                   if steady else {}),
            }
    return {"commit": commit_, "machine": machine_, "seeds": seeds, "initial_accuracy": start, "eval_se": se,
            "target_accuracy": target, "target_margin_se": (target - start) / se if se else None,
            "power": power(out_arms, start, target),
            "ppo_time_marks_s": marks, "arms": out_arms, "ratios": ratios, "cost_model": cost_model_check(results)}


def run_curve(results: dict[str, dict], start: float, name: str, x: str = "elapsed_s") -> tuple[list[float], list[float]] | None:
    """Run ``name``'s accuracy curve against its training seconds (``x="elapsed_s"``) or
    prompts (``x="prompts"``), from (0, start); None for a run that did not run."""
    r = results.get(name)
    if r is None:
        return None
    pts = [{x: 0.0, "accuracy": start}] + r["curve"]
    return [p[x] for p in pts], [p["accuracy"] for p in pts]


def to_target(results: dict[str, dict], start: float, target: float, name: str, x: str = "elapsed_s") -> float | None:
    """Run ``name``'s training seconds or prompts (``x``, as :func:`run_curve`) to the
    target: its curve interpolated at the first crossing (tppo.metrics.time_to_target);
    None where it never reached it, or did not run."""
    from tppo.metrics import time_to_target

    c = run_curve(results, start, name, x)
    return None if c is None else time_to_target(*c, target)


def steady_train_s(results: dict[str, dict]) -> dict[str, float] | None:
    """Each run's training seconds at the study's median machine speed, or None unless every
    run logged the speed probe. Each phase's seconds are scaled by the study's median probe
    over the run's own (cost_model.SPEED), and the untimed rest of the step by their
    weighted mean. The arms' rotation over seeds spreads the machine's drift between runs
    evenly only in expectation. A per-prompt ratio of these seconds shows what the drift did
    to the plain one."""
    runs = {k: r for k, r in results.items() if "per_step" in r}
    speed = {k: run_speed(r["per_step"]) for k, r in runs.items()}
    if not runs or any(v is None for v in speed.values()):
        return None
    median = {p: statistics.median(v[p] for v in speed.values()) for p in SPEED}
    out = {}
    for k, r in runs.items():
        timed = sum(r["phase_s"].get(p, 0.0) for p in SPEED)
        scaled = sum(r["phase_s"].get(p, 0.0) * median[p] / speed[k][p] for p in SPEED)
        out[k] = r["train_s"] * scaled / timed if timed else r["train_s"]
    return out


def power(arms: dict[str, dict], start: float, target: float) -> dict:
    """#20 B's bar: the median main arm's median gain by the end is at least twice the
    target's margin over the start (else a time to target is decided by the noise)."""
    gains = {a: statistics.median(v["final_accuracy"]) - start for a, v in arms.items() if a in MAIN_ARMS}
    median_gain = statistics.median(gains.values()) if gains else None
    margin = target - start
    return {"gain_by_arm": gains, "median_gain": median_gain, "margin": margin,
            "gain_over_margin": median_gain / margin if median_gain is not None and margin > 0 else None,
            "holds": median_gain is not None and median_gain >= 2 * margin}


def cost_model_check(results: dict[str, dict]) -> dict | None:
    """benchmarks/cost_model.py: unit costs fitted on a calibration set, then, per arm and
    phase, the median over the runs it did not see of the predicted / measured seconds - 1.

    The calibration set is every arm's first seed (the other seeds are predicted): PPO's
    run alone cannot tell prefill and attention (``kv_positions``) from a decode step, as
    its steps hold them in a fixed ratio (every step prefills the same prompts), while the
    windowed arms re-prefill carried rows and attend over longer contexts; fitted on PPO
    alone (``ppo_only``, kept for the record) T-PPO's generation is off by about 40 %. With
    one seed (``--quick``) the calibration is PPO's run and the other arms are predicted.
    Why a set and not one run of its own (#20 D's wording): no single arm exercises every
    unit (the joins' cache copies are in-window refill's, the no-grad prefix
    ``prefix_grad: false``'s, the re-prefilled carried rows the windowed arms'); a run
    that varied batch and W would still leave those unfitted. None of the set is predicted.

    Where every run logged the speed probe (benchmarks/speed_probe.py), the seconds are
    measured against it (``measured_against``, cost_model.SPEED) and the check in plain
    seconds is kept beside it (``seconds``): what the machine's drift adds to the error."""
    ran = sorted(k for k in results if "per_step" in results[k])
    if not any(k.startswith("ppo/") for k in ran):
        return None
    first = {}
    for k in ran:
        first.setdefault(k.split("/")[0], k)
    ppo_run = first["ppo"]
    pooled = sorted(first.values()) if len(ran) > len(first) else [ppo_run]
    speed = {k: run_speed(results[k]["per_step"]) for k in ran}
    probed = all(v is not None for v in speed.values())
    plain = dict.fromkeys(ran)  # every run in plain seconds
    out = {**_check(results, pooled, speed if probed else plain), "lengths_run": ppo_run}
    if pooled != [ppo_run]:
        out["ppo_only"] = _check(results, [ppo_run], speed if probed else plain)
    if probed:
        out["seconds"] = _check(results, pooled, plain)
    return out


def _check(results: dict[str, dict], calibration: list[str], speed: dict[str, dict | None]) -> dict:
    """The fit on ``calibration`` and, per arm and phase, the median over the other runs of
    the relative error; beside it each run's common factor and the phase-share error
    (cost_model.split_run_factor: what the machine did to a run, and what the model did).
    ``speed``: per run, its speed probe (cost_model.run_speed) the seconds are measured
    against, or None for every run (plain seconds)."""
    runs = {k: r for k, r in results.items() if "per_step" in r}
    probed = all(speed[k] is not None for k in runs)
    costs = fit_costs([s for k in calibration for s in in_probe_seconds(runs[k]["per_step"], speed[k])])
    errors: dict[str, dict[str, list[float]]] = {}
    shares: dict[str, dict[str, list[float]]] = {}
    run_factor: dict[str, float] = {}
    for name, run in runs.items():
        if name in calibration:
            continue
        arm, errs = name.split("/")[0], relative_errors(costs, run, speed[name])
        run_factor[name], share = split_run_factor(errs)
        for phase, err in errs.items():
            if err is not None:
                errors.setdefault(arm, {}).setdefault(phase, []).append(err)
                shares.setdefault(arm, {}).setdefault(phase, []).append(share[phase])
    med = lambda d: {arm: {p: statistics.median(e) for p, e in ph.items()} for arm, ph in d.items()}  # noqa: E731
    factors = [f for f in run_factor.values() if f == f]
    return {"calibration": calibration, "measured_against": "speed probe" if probed else "seconds", "unit_costs": costs,
            "relative_error": med(errors), "run_factor": run_factor, "phase_share_error": med(shares),
            "run_factor_sd": statistics.stdev(factors) if len(factors) > 1 else None,
            **({"run_speed": speed} if probed else {})}


def report(summary: dict) -> str:
    pw = summary["power"]
    lines = [f"start {summary['initial_accuracy']:.3f} (SE {summary['eval_se']:.4f}), target {summary['target_accuracy']:.3f}; "
             f"median gain {pw['median_gain'] or 0:+.3f} = {pw['gain_over_margin'] or 0:.2f}x the margin "
             f"({'meets' if pw['holds'] else 'misses'} the 2x bar)"]
    for arm, a in summary["arms"].items():
        r = summary["ratios"].get(arm, {})
        fmt = lambda k: "-" if not r.get(k) or r[k].get("median") is None else f"{r[k]['median']:.2f}x [{r[k]['ci_low']:.2f}, {r[k]['ci_high']:.2f}]"  # noqa: E731
        lines.append(f"{arm:<18} final {statistics.median(a['final_accuracy']):.3f}  reached {a['reached_target']}/{len(a['seeds'])}  "
                     f"time to target vs PPO {fmt('time_to_target')}  prompts to target {fmt('prompts_to_target')}  "
                     f"per prompt {fmt('per_prompt')} (at the median speed {fmt('per_prompt_steady')})")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path:
    """Held-out accuracy against training seconds, per arm: the median over seeds of the
    curves (each interpolated on a common time grid, up to the shortest seed's end) and the
    band from the lowest to the highest seed; the start and the target as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    start, target = payload["initial_accuracy"], payload["target_accuracy"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, a in payload["arms"].items():
        curves = []
        for seed in a["seeds"]:
            pts = [(0.0, start)] + [(p["elapsed_s"], p["accuracy"]) for p in payload["results"][f"{arm}/s{seed}"]["curve"]]
            curves.append((np.array([t for t, _ in pts]), np.array([y for _, y in pts])))
        end = min(t[-1] for t, _ in curves)
        grid = np.linspace(0.0, end, 50)
        ys = np.array([np.interp(grid, t, y) for t, y in curves])
        line, = ax.plot(grid, np.median(ys, axis=0), label=f"{arm} ({len(curves)} seeds)",
                        linestyle="--" if arm in APPROXIMATIONS else "-")
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.12, linewidth=0)
    ax.axhline(start, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(target, color="black", linewidth=0.8, linestyle="--")
    margin = payload["target_margin_se"]
    ax.text(0, target, f" target {target:.3f}" + (f" (start + {margin:.1f} SE)" if margin is not None else ""), va="bottom", fontsize=8)
    ax.set_xlabel("training seconds (one torch thread; evaluations not counted)")
    ax.set_ylabel(f"held-out accuracy ({payload['args']['eval_problems']} problems x {payload['args']['eval_samples']})")
    ax.set_title("Speed study: median over seeds, band = lowest to highest seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(summary: dict) -> str:
    """The study's table for RESULTS.md, from its JSON (numbers never copied by hand)."""
    def ci(d: dict | None) -> str:
        if not d or d.get("median") is None:
            return "-"
        return f"{d['median']:.2f}x [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"

    def med(xs) -> str:
        xs = [x for x in xs if x is not None]
        return f"{statistics.median(xs):.3f}" if xs else "-"

    marks = list(summary["ppo_time_marks_s"])
    cm = (summary.get("cost_model") or {}).get("relative_error", {})
    head = ("| arm | seeds reaching the target | final accuracy, median (min-max) | accuracy at " + " / ".join(marks)
            + " of PPO's time | time to target, PPO / arm | prompts to target, PPO / arm | s per prompt (median) | PPO / arm per prompt "
            "| the same at the median speed | cost model error per phase |")
    lines = [head, "|" + "---|" * 10]
    for arm, a in summary["arms"].items():
        r = summary["ratios"].get(arm, {})
        fa = a["final_accuracy"]
        at = " / ".join(med(a["accuracy_at_ppo_time"][k]) for k in marks)
        errs = ", ".join(f"{p} {e:+.0%}" for p, e in cm.get(arm, {}).items()) or "(calibration)"
        name = arm + (" (approximation)" if a.get("approximation") else "")
        lines.append(f"| {name} | {a['reached_target']}/{len(a['seeds'])} | {statistics.median(fa):.3f} ({min(fa):.3f}-{max(fa):.3f}) | "
                     f"{at} | {ci(r.get('time_to_target'))} | {ci(r.get('prompts_to_target'))} | {statistics.median(a['train_s_per_prompt']):.3f} | "
                     f"{ci(r.get('per_prompt'))} | {ci(r.get('per_prompt_steady'))} | {errs} |")
    return "\n".join(lines)


def cost_markdown(summary: dict) -> str:
    """The cost model's check for RESULTS.md: per arm and phase the median error measured
    against the speed probe and in plain seconds, and the runs' common factors' SD."""
    cm = summary.get("cost_model") or {}
    plain = cm.get("seconds") or cm
    fmt = lambda d: ", ".join(f"{p} {e:+.1%}" for p, e in d.items()) or "(calibration)"  # noqa: E731
    sd = lambda c: "-" if c.get("run_factor_sd") is None else f"{c['run_factor_sd']:.1%}"  # noqa: E731
    lines = [f"| arm | error per phase, {cm.get('measured_against', 'seconds')} | error per phase, plain seconds |", "|---|---|---|"]
    for arm in summary["arms"]:
        lines.append(f"| {arm} | {fmt(cm.get('relative_error', {}).get(arm, {}))} | {fmt(plain.get('relative_error', {}).get(arm, {}))} |")
    lines.append(f"| SD of the runs' common factor | {sd(cm)} | {sd(plain)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny SFT, one seed, few prompts: checks the harness end to end")
    ap.add_argument("--powered", action="store_true", help="the main arms, long enough for the power rule: " + ", ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in POWERED.items()))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the main arms (ppo, tppo, grpo, partial-ppo)")
    ap.add_argument("--variant-seeds", type=int, default=4, help="seeds of the other arms (one is the cost model's calibration)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1024, help="prompts each run trains on")
    ap.add_argument("--eval-every", type=int, default=128)
    ap.add_argument("--eval-problems", type=int, default=1024)
    ap.add_argument("--eval-samples", type=int, default=1, help="1 sample of 1024 problems: the SE of 512 x 2 is larger at the same cost (problems differ more than samples)")
    ap.add_argument("--eval-batch-rows", type=int, default=1024,
                    help="rows an evaluation decodes at once (log.eval_batch_rows): 1024 evaluates the 1024 problems 3.5x "
                         "faster than 16 (results/eval_batch.json; evaluations are not training time)")
    ap.add_argument("--min-gain", type=float, default=0.02, help="the target is at least this far above the start")
    ap.add_argument("--out", help="output JSON (default: results/speed_study.json; --quick: results/speed_study_quick.json)")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.extra = []  # overrides of every arm (--quick only)
    if args.powered:  # the preset's sizes, where no flag set them
        vars(args).update({k: v for k, v in POWERED.items() if getattr(args, k) == ap.get_default(k)})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    out = args.out or ("speed_study_quick.json" if args.quick else "speed_study.json")
    if args.summarize_only:
        payload = json.loads(results_path(out).read_text())
        results = payload["results"]
        payload["summary_commit"] = commit()  # the runs keep their own commit; this is the summary's code
    else:
        if args.quick:
            args.arms, args.seeds, args.variant_seeds = [a for a in args.arms if a in MAIN_ARMS], 1, 0
            # every arm updates its policy at least once: one step of critic warm-up, three steps of PPO
            args.prompts, args.eval_every, args.eval_problems, args.eval_samples = 48, 48, 8, 2
            args.extra = ["train.critic_warmup_steps=1"]
        args.journal = journal_path(out)  # every finished run, as it ends: a killed study resumes (run the same command)
        jobs = build_jobs(args.arms, args.seeds, args.variant_seeds)
        sft_dir = ensure_sft(args.quick)
        print(f"{len(jobs)} runs, {args.workers} at a time, {args.prompts} prompts each", flush=True)
        t0, commit_ = time.perf_counter(), commit()  # the code that runs (the tree may be edited while it does)
        weights = warm_start_id(sft_dir)  # in every run's spec: a resumed study reuses only runs from these very weights
        results = run_all(jobs, args, sft_dir, weights)
        payload = {"commit": commit_, "wall_s": time.perf_counter() - t0, "args": {k: v for k, v in vars(args).items() if k not in ("job", "journal")},
                   "sft": {"dir": str(sft_dir), "sha256": weights}, "results": results}
    # a re-summary keeps the provenance of the runs it summarises
    payload.update(summarize(results, args.min_gain, payload.get("commit") or commit(), payload.get("machine") or machine()))
    path = write_json(out, payload, one_line="results")
    if not args.summarize_only:
        args.journal.unlink(missing_ok=True)  # its runs are in the JSON now
    print(report(payload))
    print(markdown(payload))
    print(cost_markdown(payload))
    print(f"wrote {path} and {plot(payload, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
