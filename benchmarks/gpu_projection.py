"""GPU projection: a cost model of PPO vs T-PPO steps, replaying response-length distributions.

Wall-clock on 2 CPU cores cannot show T-PPO's main gain: on a CPU a decode step costs in
proportion to the rows in it, so idle slots cost little; on a GPU a decode step costs
nearly the same for 1 row as for hundreds (it reads all the weights once), so the slots
PPO leaves idle while it waits for its longest response are pure loss. This script
simulates one data-parallel engine (its share of the generation batch) through PPO and
T-PPO steps with costs per phase:

    decode step    = decode_step_s + n_active * decode_row_s + sum(context of active rows) * kv_token_s
    prefill        prefill_token_s per prompt token (PPO, T-PPO new rows) and per prompt + response
                   token of a carried row (T-PPO recomputes its KV at each window: the weights changed)
    training       train_token_s per token per forward pass over each row's whole context:
                   PPO: values 1 + policy update 3 + critic update 3 passes over every row;
                   T-PPO: values 1 + policy update 3 over every row in the window (its whole
                   prefix is recomputed to get the window's log-probs), critic update 3 over
                   finished rows only.

It reports prompts per hour of each algorithm in steady state and their ratio. Leaves
out: per-prompt correlation of lengths, KV preemption/recompute, communication and
weight sync, the reference model, sequence packing, KV-cache capacity (the whole batch
is assumed resident: at the paper's scale PPO's 512 rows per engine at a 5K average
context need ~2.8M tokens of KV against ~0.76M on 4 H100s, so a real engine queues or
preempts rows, which would slow PPO's bulk and T-PPO's carried rows alike), and accuracy: the time-to-target
projection multiplies the throughput ratio by the prompts-to-target ratio measured on
the CPU (benchmarks/results/ppo_vs_tppo.json), assuming learning per prompt transfers.

    python benchmarks/gpu_projection.py          # both presets, both length distributions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, commit, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Costs (seconds) of one engine; see the module docstring for where each enters."""

    name: str
    decode_step_s: float
    decode_row_s: float
    kv_token_s: float
    prefill_token_s: float
    train_token_s: float


# Qwen2.5-32B in bf16 on one engine of 4 H100s (tensor parallel 4), colocated training:
# weights 65 GB / 4 GPUs read at ~2.3 TB/s -> 7 ms + 5 ms launch overhead per decode step;
# KV 262 KB per token (64 layers x 8 KV heads x 128 x 2 x 2 B) / 4 GPUs at 2.3 TB/s;
# 65 GFLOP per token / 4 GPUs at 50 % of 990 TFLOP/s for decode and prefill compute,
# 40 % for training.
H100_32B = Hardware("qwen2.5-32b on 4xH100 (TP 4)", decode_step_s=0.012, decode_row_s=3.3e-5, kv_token_s=2.85e-8,
                    prefill_token_s=3.3e-5, train_token_s=4.1e-5)
# The embedded tiny model on this 2-core CPU (design.md / RESULTS.md rollout section:
# 1.6 ms + 0.09 ms per row per decode step); train_token_s from the PPO runs' update times.
CPU_TINY = Hardware("tiny llama on 2 CPU cores", decode_step_s=1.6e-3, decode_row_s=9e-5, kv_token_s=0.0,
                    prefill_token_s=2e-6, train_token_s=1.1e-5)


@dataclasses.dataclass(frozen=True)
class Setting:
    prompts_per_step: int  # per engine
    samples_per_prompt: int
    max_response_tokens: int  # L
    prompt_tokens: int


PAPER = Setting(prompts_per_step=32, samples_per_prompt=16, max_response_tokens=24_576, prompt_tokens=256)  # 512 x 16 over 16 engines
EMBEDDED = Setting(prompts_per_step=16, samples_per_prompt=4, max_response_tokens=256, prompt_tokens=10)


def decode_time(budget: np.ndarray, context: np.ndarray, hw: Hardware, chunk: int = 16) -> float:
    """Seconds to generate ``budget[i]`` tokens for each row whose context is ``context[i]``.

    Every row starts at once and leaves the batch when done (the engine's compaction);
    time advances ``chunk`` decode steps at a time, or to the next finish if sooner.
    """
    rem, ctx = budget.astype(np.int64).copy(), context.astype(np.float64).copy()
    active, t = rem > 0, 0.0
    while active.any():
        steps = int(min(chunk, rem[active].min()))
        n = int(active.sum())
        t += steps * (hw.decode_step_s + n * hw.decode_row_s + (ctx[active].sum() + n * steps / 2) * hw.kv_token_s)
        rem[active] -= steps
        ctx[active] += steps
        active = rem > 0
    return t


def simulate_ppo(lengths: np.ndarray, s: Setting, hw: Hardware, steps: int) -> dict:
    """Synchronous PPO: each step generates whole responses for a fresh batch."""
    rows = s.prompts_per_step * s.samples_per_prompt
    gen = train = prefill = 0.0
    for k in range(steps):
        lens = lengths[k * rows:(k + 1) * rows]
        prefill += rows * s.prompt_tokens * hw.prefill_token_s
        gen += decode_time(lens, np.full(rows, s.prompt_tokens), hw)
        train += 7 * (lens + s.prompt_tokens).sum() * hw.train_token_s
    total = gen + train + prefill
    prompts = steps * s.prompts_per_step
    return {"prompts": prompts, "time_s": total, "generate_s": gen + prefill, "train_s": train,
            "prompts_per_hour": 3600 * prompts / total, "generate_s_per_prompt": (gen + prefill) / prompts}


def simulate_tppo(lengths: np.ndarray, s: Setting, hw: Hardware, window: int, steps: int) -> dict:
    """T-PPO: windows of at most ``window`` tokens, carry-over, refill of free slots.

    Steady state: prompts counted (finished rows / G) and time over the steps after the
    first ceil(L / W) (the warm-up while the first long rows are still in flight).
    """
    slots, G = s.prompts_per_step * s.samples_per_prompt, s.samples_per_prompt
    next_row, done_rows = 0, 0
    target = np.zeros(0, dtype=np.int64)  # total length of each row in flight
    have = np.zeros(0, dtype=np.int64)  # tokens generated so far
    warm = math.ceil(s.max_response_tokens / window)
    t_total = t_warm = gen_warm = 0.0
    rows_at_warm = 0
    gen = train = 0.0
    for k in range(steps):
        free = slots - target.size
        n_new = (free // G) * G
        target = np.concatenate([target, lengths[next_row:next_row + n_new]])
        have = np.concatenate([have, np.zeros(n_new, dtype=np.int64)])
        next_row += n_new
        ctx = s.prompt_tokens + have
        step_prefill = ctx.sum() * hw.prefill_token_s  # new prompts and carried rows' KV recomputed
        budget = np.minimum(window, target - have)
        step_gen = decode_time(budget, ctx, hw) + step_prefill
        have = have + budget
        finished = have >= target
        # values (1) + policy update (3) over every row's whole context; critic (3) on finished rows
        step_train = (4 * (s.prompt_tokens + have).sum() + 3 * (s.prompt_tokens + have[finished]).sum()) * hw.train_token_s
        done_rows += int(finished.sum())
        target, have = target[~finished], have[~finished]
        gen, train = gen + step_gen, train + step_train
        t_total += step_gen + step_train
        if k + 1 == warm:
            t_warm, gen_warm, rows_at_warm = t_total, gen, done_rows
    prompts = (done_rows - rows_at_warm) / G
    time_s = t_total - t_warm
    return {"prompts": prompts, "time_s": time_s, "generate_s": gen - gen_warm, "train_s": train,
            "prompts_per_hour": 3600 * prompts / time_s, "generate_s_per_prompt": (gen - gen_warm) / prompts}


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 1, cap).astype(np.int64)


def chain_lengths(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Response lengths of the embedded chain task's correct solutions, scaled from its
    L = 256 to ``cap`` (the shape of the embedded long tail at another scale)."""
    from tppo.config import ChainConfig
    from tppo.tasks.chain import Chain, ChainTask, solution_text

    stream = ChainTask(ChainConfig()).stream("train", seed)
    metas = [next(stream).meta for _ in range(min(n, 20_000))]
    base = np.array([len(solution_text(Chain(**m))) + 1 for m in metas])  # characters = tokens, + EOS
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.choice(base, n) * cap / 256), 1, cap).astype(np.int64)


def project(hw: Hardware, s: Setting, lengths: np.ndarray, windows: list[int], ppo_steps: int, tppo_steps: int) -> dict:
    ppo = simulate_ppo(lengths, s, hw, ppo_steps)
    out = {"ppo": ppo}
    for w in windows:
        r = simulate_tppo(lengths, s, hw, w, tppo_steps(w))
        r["throughput_ratio"] = r["prompts_per_hour"] / ppo["prompts_per_hour"]
        r["generation_ratio"] = ppo["generate_s_per_prompt"] / r["generate_s_per_prompt"]  # rollout alone
        out[f"tppo-W{w}"] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ppo-steps", type=int, default=6)
    args = ap.parse_args()
    L = PAPER.max_response_tokens
    rows = PAPER.prompts_per_step * PAPER.samples_per_prompt
    n = rows * 200
    dists = {"lognormal(median 4K, sigma 0.8)": lognormal_lengths(n, 4096, 0.8, L),
             "chain task, scaled to L = 24K": chain_lengths(n, L)}
    report: dict = {"commit": commit(), "model": __doc__.split("\n\n")[1], "paper_scale": {}, "embedded_scale": {}}
    for name, lengths in dists.items():
        stats = {"mean": float(lengths.mean()), "p50": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)),
                 "truncated_at_L": float((lengths >= L).mean())}
        res = project(H100_32B, PAPER, lengths, [L // 2, L // 3, L // 6], args.ppo_steps, lambda w: 3 * math.ceil(L / w) + 8)
        report["paper_scale"][name] = {"hardware": H100_32B.name, "lengths": stats, "results": res}
    # Sensitivity: what the paper-scale ratio needs (more per-step overhead, cheaper training).
    report["sensitivity"] = {}
    lengths = dists["lognormal(median 4K, sigma 0.8)"]
    for step_x, train_x in ((1, 1), (4, 1), (1, 0.25), (4, 0.25), (4, 0.0)):
        hw = dataclasses.replace(H100_32B, decode_step_s=H100_32B.decode_step_s * step_x, train_token_s=H100_32B.train_token_s * train_x)
        res = project(hw, PAPER, lengths, [L // 3], args.ppo_steps, lambda w: 3 * math.ceil(L / w) + 8)[f"tppo-W{L // 3}"]
        report["sensitivity"][f"decode_step_s x{step_x}, train_token_s x{train_x}"] = float(res["throughput_ratio"])
    emb = chain_lengths(EMBEDDED.prompts_per_step * EMBEDDED.samples_per_prompt * 400, 256)
    for hw in (CPU_TINY, dataclasses.replace(H100_32B, name="the paper's hardware, embedded lengths")):
        res = project(hw, EMBEDDED, emb, [128, 64, 32], 40, lambda w: 3 * math.ceil(256 / w) + 60)
        report["embedded_scale"][hw.name] = {"results": res}
    path = write_json("gpu_projection.json", report)
    for scale in ("paper_scale", "embedded_scale"):
        for name, block in report[scale].items():
            ratios = {k: (round(float(v["throughput_ratio"]), 2), round(float(v["generation_ratio"]), 2))
                      for k, v in block["results"].items() if k != "ppo"}
            print(f"{scale:>14} | {name:<40} | T-PPO / PPO (prompts per hour, rollout alone): {ratios}")
    for k, v in report["sensitivity"].items():
        print(f"   sensitivity | lognormal, W = L/3, {k:<36} | T-PPO / PPO prompts per hour: {v:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
