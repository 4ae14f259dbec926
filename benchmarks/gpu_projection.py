"""GPU projection: a cost model of synchronous PPO vs T-PPO steps at the paper's scale.

Wall-clock on 2 CPU cores cannot show T-PPO's main gain: on a CPU a decode step costs in
proportion to the rows in it, so idle slots cost little; on a GPU a decode step reads
every weight once whatever the batch, so the slots PPO leaves idle while it waits for its
longest response are lost. This script replays response-length distributions through
every inference engine of a cluster, step by step, and charges each phase:

decode step (one engine)   overhead + max(weight read + KV read of every active row's
                           context, per-row matmul compute + attention compute over the
                           context): a step is bound by memory or by compute, not their sum.
KV capacity                an engine holds ``kv_capacity_tokens`` of KV (HBM after the
                           weights); rows are admitted first come, first served while they
                           fit, and when the running rows outgrow the cache the newest is
                           preempted (vLLM's V1 scheduler), freed, and re-enters later with a
                           prefill of its whole context (recompute).
prefill                    compute-bound: tokens x (matmul + attention over the context so
                           far). New prompts, preempted rows and T-PPO's carried rows (the
                           weights changed since their KV was computed) pay it.
synchronous step           every engine gets its share of the rows; the step waits for the
                           slowest engine, then trains on all GPUs, then syncs weights.
training (all GPUs)        forward passes over each row's context (a backward = 2 forwards):
                           old log-probs 1 + values 1 + policy update 3 + critic update 3.
                           PPO: all 8 over every row. T-PPO: old log-probs, values and
                           policy over every row of the window, each over its whole context
                           (prefix + window), the critic's 3 over finished rows only; with
                           ``prefix_grad=False`` the prefix of a carried row is forward only
                           (1 pass, no backward) and only the window back-propagates.
                           Attention's quadratic term is charged in every pass.

T-PPO variants: the window ends after W decode steps of an engine (rows preempted or
queued during it get fewer than W tokens and carry more); carried rows re-dealt across
engines each step (``redeal``) or kept where they are; in-window refill (a finished
row's slot takes a new prompt's row at once, up to the window's end); prefix without
gradient. The throughput figure is steady state: prompts whose rows finished, per hour,
after the first ceil(L / W) steps.

Time to a score, not throughput: the paper's "2.5x" is time to a score (its figure:
"reduces training time by 60 % compared to the previous SOTA", VAPO, on AIME), where
fewer steps to the score count as much as faster steps. This model gives the time per
prompt; the projected time to target multiplies its ratio by the prompts-to-target ratio
measured on the CPU (``results/ppo_vs_tppo.json``), which assumes learning per prompt
transfers across scales: an assumption, stated as such in the output.

Constants are derived below from the model's shape and the GPU's data sheet (sources in
the comments); ``results/gpu_check.json`` (benchmarks/gpu_check.py on a real GPU), when
it exists, adds an engine with the fitted constants of the models it timed. Left out:
per-prompt correlation of lengths, communication other than the weight sync, a
reference model (the paper's runs use no KL), sequence packing in training.

    python benchmarks/gpu_projection.py          # writes results/gpu_projection.json
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


# ---------------------------------------------------------------------- constants


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the costs need from a checkpoint's config.json."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:  # K and V, every layer, bf16
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def flops_per_token(self) -> float:  # matmuls of one forward, 2 FLOPs per MAC
        return 2.0 * self.params

    @property
    def attn_flops_per_context_token(self) -> float:  # QK^T and AV: 2 x 2 FLOPs x hidden per layer
        return 4.0 * self.layers * self.hidden


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes: float
    bandwidth: float  # bytes/s
    flops: float  # dense bf16 FLOP/s


# Qwen2.5-32B config.json: 64 layers, hidden 5120, 8 KV heads of 128, 32.8B parameters.
QWEN_32B = ModelShape("Qwen2.5-32B", params=32.8e9, layers=64, hidden=5120, kv_heads=8, head_dim=128)
# H100 SXM data sheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s dense bf16.
H100 = Gpu("H100 SXM", hbm_bytes=80e9, bandwidth=3.35e12, flops=989e12)


@dataclasses.dataclass(frozen=True)
class Engine:
    """Costs (seconds) of one inference engine and of training per GPU; see the module doc.

    ``combine``: ``max`` (memory- or compute-bound decode step) or ``sum`` (the additive form
    fitted by gpu_check.py: overhead + compute_row_s * B + kv_read_s * context).
    """

    name: str
    step_overhead_s: float  # launch and scheduling, per decode step
    weight_read_s: float  # all weights once, per decode step
    kv_read_s: float  # per context token of an active row, per decode step
    compute_row_s: float  # matmuls of one row's token
    attn_s: float  # attention compute per context token of an active row
    prefill_token_s: float  # matmuls of one prefilled token (attention: attn_prefill_s)
    attn_prefill_s: float  # per (token, context token) pair in a prefill
    train_token_s: float  # one forward pass of one token on one GPU
    train_attn_s: float  # one forward pass, per (token, context token) pair, one GPU
    kv_capacity_tokens: float = math.inf
    gpus: int = 1  # per engine
    weight_sync_s: float = 0.0  # per step: the trained weights into the engines
    combine: str = "max"

    @classmethod
    def derive(cls, model: ModelShape, gpu: Gpu, tp: int, *, mem_util: float = 0.9, activation_bytes: float = 4e9,
               mfu_decode: float = 0.5, mfu_prefill: float = 0.5, mfu_train: float = 0.4, overhead_s: float = 5e-3,
               sync_bandwidth: float = 100e9) -> "Engine":
        """One engine of ``tp`` GPUs (tensor parallel) from data-sheet figures.

        mem_util 0.9 is vLLM's ``gpu_memory_utilization`` default; activation_bytes a
        reserve for vLLM's activation profile run; MFUs: decode and prefill matmuls at 50 %,
        training at 40 % (typical of Megatron/FSDP bf16 on H100); overhead 5 ms per decode
        step (scheduler, sampling, kernel launches without full CUDA graphs);
        sync_bandwidth: the bf16 weights broadcast at 100 GB/s per GPU (NCCL over NVLink
        and InfiniBand, each GPU receiving its shard).
        """
        weights = 2.0 * model.params  # bf16
        kv_per_gpu = model.kv_bytes_per_token / tp
        free = gpu.hbm_bytes * mem_util - weights / tp - activation_bytes
        return cls(name=f"{model.name} on {tp}x{gpu.name} (TP {tp})", step_overhead_s=overhead_s,
                   weight_read_s=weights / tp / gpu.bandwidth, kv_read_s=kv_per_gpu / gpu.bandwidth,
                   compute_row_s=model.flops_per_token / tp / (gpu.flops * mfu_decode),
                   attn_s=model.attn_flops_per_context_token / tp / (gpu.flops * mfu_decode),
                   prefill_token_s=model.flops_per_token / tp / (gpu.flops * mfu_prefill),
                   attn_prefill_s=model.attn_flops_per_context_token / tp / (gpu.flops * mfu_prefill),
                   train_token_s=model.flops_per_token / (gpu.flops * mfu_train),
                   train_attn_s=model.attn_flops_per_context_token / (gpu.flops * mfu_train),
                   kv_capacity_tokens=free / kv_per_gpu, gpus=tp, weight_sync_s=weights / tp / sync_bandwidth)

    def decode_step_s(self, rows: int, context: float) -> float:
        """One decode step of ``rows`` active rows holding ``context`` tokens of KV in all."""
        memory = self.weight_read_s + context * self.kv_read_s
        compute = rows * self.compute_row_s + context * self.attn_s
        return self.step_overhead_s + (memory + compute if self.combine == "sum" else max(memory, compute))

    def prefill_s(self, old: np.ndarray | float, new: np.ndarray | float) -> float:
        """Prefill ``new`` tokens after ``old`` tokens of context (attention over both)."""
        old, new = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
        return float((new * self.prefill_token_s + (new * old + new * (new + 1) / 2) * self.attn_prefill_s).sum())


# The embedded tiny model on this 2-core CPU (RESULTS.md rollout section: 1.6 ms + 0.09 ms
# per row per decode step; compute-bound, no weight-read floor); training per token from the
# PPO runs' update times. The validation row: this model next to the CPU measurement.
CPU_TINY = Engine("tiny llama on 2 CPU cores", step_overhead_s=1.6e-3, weight_read_s=0.0, kv_read_s=0.0,
                  compute_row_s=9e-5, attn_s=0.0, prefill_token_s=2e-6, attn_prefill_s=0.0,
                  train_token_s=1.1e-5, train_attn_s=0.0, combine="sum")


@dataclasses.dataclass(frozen=True)
class Setting:
    prompts_per_step: int  # global, all engines
    samples_per_prompt: int
    max_response_tokens: int  # L
    prompt_tokens: int
    engines: int = 1


# The paper: 512 prompts x 16 samples per step, L = 24K; 64 GPUs as 16 engines of TP 4.
PAPER = Setting(prompts_per_step=512, samples_per_prompt=16, max_response_tokens=24_576, prompt_tokens=256, engines=16)
EMBEDDED = Setting(prompts_per_step=16, samples_per_prompt=4, max_response_tokens=256, prompt_tokens=10)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How T-PPO runs (window None: synchronous PPO, every row to its end)."""

    window: int | None = None
    redeal: bool = True  # carried rows dealt across engines again each step
    refill: bool = False  # a finished row's slot takes a new row at once, within the window
    prefix_grad: bool = True  # False: a carried row's prefix is forward-only in the update

    @property
    def name(self) -> str:
        if self.window is None:
            return "ppo"
        extra = ("" if self.redeal else "-stay") + ("-refill" if self.refill else "") + ("" if self.prefix_grad else "-noprefixgrad")
        return f"tppo-W{self.window}{extra}"


# ---------------------------------------------------------------------- one engine


@dataclasses.dataclass
class Row:
    target: int  # the response's whole length
    have: int  # tokens generated so far
    prompt: int
    start_have: int = 0  # tokens it had when the step began

    @property
    def context(self) -> int:
        return self.prompt + self.have


@dataclasses.dataclass
class EngineResult:
    time_s: float
    decode_steps: int
    prefill_s: float
    preemptions: int


def run_engine(rows: list[Row], eng: Engine, *, budget: int | None = None, max_steps: int | None = None,
               new_rows: list[Row] | None = None, chunk: int = 64) -> EngineResult:
    """Generate on one engine until every row has finished or used ``budget`` tokens this
    window, or ``max_steps`` decode steps have passed. ``rows`` are updated in place.

    Scheduling (vLLM V1, recompute preemption): the waiting queue is served first come,
    first served while the head's context fits in the free KV; admission prefills the
    row's whole context. When the running rows' next tokens do not fit, the newest
    running row is preempted to the front of the queue. ``new_rows`` (in-window refill)
    join the queue's end as rows finish, one per finished row. Time advances ``chunk``
    decode steps at a time, or to the next event if sooner (a finish, a full cache,
    the window's end); a chunk charges the context at its middle.
    """
    new_rows = new_rows if new_rows is not None else []
    want = (lambda r: r.target - r.have) if budget is None else (lambda r: min(r.target - r.have, budget - (r.have - r.start_have)))
    waiting = [r for r in rows if want(r) > 0]
    running: list[Row] = []
    t = prefill = used = 0.0
    steps = preempt = 0
    cap = eng.kv_capacity_tokens
    blocked = False  # after a preemption nothing is admitted until a row finishes (vLLM V1)
    while waiting or running:
        while waiting and (not blocked or not running) and used + waiting[0].context + 1 <= cap:
            r = waiting.pop(0)
            p = eng.prefill_s(0.0, r.context)
            t, prefill, used = t + p, prefill + p, used + r.context
            running.append(r)
        if not running:
            raise ValueError(f"a row of context {waiting[0].context} does not fit a KV cache of {cap:.0f} tokens")
        n = len(running)
        if cap - used < n:  # the running rows' next tokens do not fit: preempt the newest
            r = running.pop()
            used -= r.context
            waiting.insert(0, r)
            preempt += 1
            blocked = True
            continue
        left = [want(r) for r in running]
        k = min(chunk, min(left), int((cap - used) // n) if math.isfinite(cap) else chunk)
        if max_steps is not None:
            k = min(k, max_steps - steps)
        t += k * eng.decode_step_s(n, used + n * k / 2)
        for r in running:
            r.have += k
        used += n * k
        steps += k
        if k == min(left):
            done = [r for r, lft in zip(running, left) if lft == k]
            running = [r for r, lft in zip(running, left) if lft != k]
            used -= sum(r.context for r in done)
            blocked = False
            waiting.extend(new_rows[:len(done)])
            del new_rows[:len(done)]
        if max_steps is not None and steps >= max_steps:
            break
    return EngineResult(t, steps, prefill, preempt)


# ---------------------------------------------------------------------- training


def train_s(contexts: np.ndarray, passes: float, eng: Engine, gpus: int) -> float:
    """``passes`` forward-equivalents over rows of these contexts on ``gpus`` GPUs, with
    attention's quadratic term (each token attends to the context before it)."""
    c = np.asarray(contexts, dtype=np.float64)
    return float(passes * (c.sum() * eng.train_token_s + (c * (c + 1) / 2).sum() * eng.train_attn_s) / gpus)


def window_train_s(prefix: np.ndarray, window: np.ndarray, eng: Engine, gpus: int, prefix_grad: bool) -> float:
    """T-PPO's old log-probs (1), values (1) and policy update (3) over rows of the window.

    Exact update: all 5 passes over prefix + window. Without prefix gradient, the policy
    update's backward (2 of its 3) covers only the window's tokens; their attention still
    reaches back over the prefix.
    """
    full = prefix + window
    if prefix_grad:
        return train_s(full, 5.0, eng, gpus)
    fwd = train_s(full, 3.0, eng, gpus)
    p, w = np.asarray(prefix, dtype=np.float64), np.asarray(window, dtype=np.float64)
    bwd = 2.0 * float((w.sum() * eng.train_token_s + (w * p + w * (w + 1) / 2).sum() * eng.train_attn_s) / gpus)
    return fwd + bwd


# ---------------------------------------------------------------------- whole steps


def deal(rows: list[Row], engines: int) -> list[list[Row]]:
    """Rows across engines, longest context first in a snake order (balanced KV and work)."""
    out: list[list[Row]] = [[] for _ in range(engines)]
    for i, r in enumerate(sorted(rows, key=lambda r: -r.context)):
        lap, pos = divmod(i, engines)
        out[pos if lap % 2 == 0 else engines - 1 - pos].append(r)
    return out


def simulate(lengths: np.ndarray, s: Setting, eng: Engine, v: Variant, steps: int) -> dict:
    """``steps`` training steps of PPO (``v.window`` None) or T-PPO; steady-state figures."""
    G, slots = s.samples_per_prompt, s.prompts_per_step * s.samples_per_prompt
    gpus = s.engines * eng.gpus
    lengths = iter(lengths.tolist())
    fresh = lambda: Row(target=int(next(lengths)), have=0, prompt=s.prompt_tokens)  # noqa: E731
    placed: list[list[Row]] = [[] for _ in range(s.engines)]
    warm = 0 if v.window is None else math.ceil(s.max_response_tokens / v.window)
    acc = {"time_s": 0.0, "generate_s": 0.0, "train_s": 0.0, "sync_s": 0.0, "decode_steps": 0, "prefill_s": 0.0,
           "preemptions": 0, "finished_rows": 0, "steps": 0}
    for k in range(steps):
        in_flight = [r for e in placed for r in e]
        new = [fresh() for _ in range((slots - len(in_flight)) // G * G)]
        if v.redeal or v.window is None:
            placed = deal(in_flight + new, s.engines)
        else:  # carried rows stay; new rows go to the emptiest engines
            for r in new:
                min(placed, key=len).append(r)
        for r in in_flight + new:
            r.start_have = r.have
        # in-window refill: each engine's queue of new rows (one per slot at most), taken as rows finish
        shares = [[fresh() for _ in range(len(e))] if v.refill else [] for e in placed]
        queues = [list(q) for q in shares]
        results = [run_engine(rows, eng, budget=v.window, max_steps=v.window, new_rows=q) for rows, q in zip(placed, queues)]
        for e, share, q in zip(placed, shares, queues):
            e.extend(share[:len(share) - len(q)])
        rows_now = [r for e in placed for r in e]
        generate = max(res.time_s for res in results)
        prefix = np.array([r.prompt + r.start_have for r in rows_now], dtype=np.float64)
        window = np.array([r.have - r.start_have for r in rows_now], dtype=np.float64)
        finished = [r for r in rows_now if r.have >= r.target]
        fin_ctx = np.array([r.context for r in finished], dtype=np.float64)
        if v.window is None:
            train = train_s(prefix + window, 8.0, eng, gpus)
        else:
            got = window > 0  # a row queued or preempted all window long has nothing to train on
            train = window_train_s(prefix[got], window[got], eng, gpus, v.prefix_grad) + train_s(fin_ctx, 3.0, eng, gpus)
        placed = [[r for r in e if r.have < r.target] for e in placed]
        if k >= warm:
            acc["time_s"] += generate + train + eng.weight_sync_s
            acc["generate_s"] += generate
            acc["train_s"] += train
            acc["sync_s"] += eng.weight_sync_s
            acc["decode_steps"] += max(res.decode_steps for res in results)
            acc["prefill_s"] += max(res.prefill_s for res in results)
            acc["preemptions"] += sum(res.preemptions for res in results)
            acc["finished_rows"] += len(finished)
            acc["steps"] += 1
    prompts = acc["finished_rows"] / G
    acc.update(prompts=prompts, prompts_per_hour=3600 * prompts / acc["time_s"],
               s_per_prompt=acc["time_s"] / prompts, generate_s_per_prompt=acc["generate_s"] / prompts,
               train_s_per_prompt=acc["train_s"] / prompts, decode_steps_per_1000_prompts=1000 * acc["decode_steps"] / prompts)
    return acc


# ---------------------------------------------------------------------- length distributions


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


# ---------------------------------------------------------------------- reports


def compare(lengths: np.ndarray, s: Setting, eng: Engine, variants: list[Variant], steps_after_warmup: int = 4) -> dict:
    """PPO and each variant; ratios to PPO: prompts per hour (end to end) and the rollout's
    seconds per prompt (``generation_ratio``; > 1: T-PPO generates a prompt faster)."""
    out = {}
    for v in [Variant()] + variants:
        warm = 0 if v.window is None else math.ceil(s.max_response_tokens / v.window)
        out[v.name] = simulate(lengths, s, eng, v, warm + steps_after_warmup)
    ppo = out["ppo"]
    for name, r in out.items():
        r["throughput_ratio"] = r["prompts_per_hour"] / ppo["prompts_per_hour"]
        r["generation_ratio"] = ppo["generate_s_per_prompt"] / r["generate_s_per_prompt"]
    return out


def measured_cpu(data: dict) -> dict:
    """From results/ppo_vs_tppo.json's contents: training seconds per prompt (PPO / T-PPO,
    median over seeds) and prompts to the target (PPO / T-PPO, medians over the seeds that
    reach it), per run label; {} when empty. Prompts to the target are interpolated between
    evaluations from the initial accuracy (tppo.metrics.time_to_target), as the benchmark's
    own summary times it."""
    from tppo.metrics import time_to_target

    if not data:
        return {}
    target = data.get("target_accuracy")
    init = data.get("summary", {}).get("longtail", {}).get("initial_accuracy")
    runs: dict[str, dict[str, list]] = {}
    for key, r in data["results"].items():
        task, name, _seed = key.split("/")
        if task != "longtail" or "curve" not in r:
            continue
        prompts = r["curve"][-1]["prompts"]
        pts = ([(0, init)] if init is not None else []) + [(p["prompts"], p["accuracy"]) for p in r["curve"]]
        hit = time_to_target([x for x, _ in pts], [a for _, a in pts], target) if target is not None else None
        runs.setdefault(name, {"s_per_prompt": [], "prompts_to_target": []})
        runs[name]["s_per_prompt"].append(r["train_s"] / prompts)
        if hit is not None:
            runs[name]["prompts_to_target"].append(hit)
    if "ppo" not in runs:
        return {}
    med = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    ppo_s, ppo_p = med(runs["ppo"]["s_per_prompt"]), med(runs["ppo"]["prompts_to_target"])
    out = {"commit": data.get("commit"), "target_accuracy": target}
    for name, r in runs.items():
        if name == "ppo":
            continue
        p = med(r["prompts_to_target"])
        out[name] = {"throughput_ratio": ppo_s / med(r["s_per_prompt"]),
                     "prompts_to_target_ratio": (ppo_p / p) if (ppo_p and p) else None, "seeds": len(r["s_per_prompt"])}
    return out


def fitted_engines(path: Path) -> list[Engine]:
    """Engines with the constants benchmarks/gpu_check.py fitted on a real GPU (additive form).

    gpu_check does not time prefills: a prefilled token is assumed to cost an eighth of a
    decode row's token (matmuls batched over the prompt), an assumption the JSON's engine
    name carries with the fit's origin."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = []
    for model, f in data.get("fit", {}).items():
        train = data.get("train_token_s", {}).get(model, 0.0)
        out.append(Engine(f"{model}, fitted on {data.get('machine', 'a GPU')}", step_overhead_s=f["decode_step_s"], weight_read_s=0.0,
                          kv_read_s=f["kv_token_s"], compute_row_s=f["decode_row_s"], attn_s=0.0, prefill_token_s=f["decode_row_s"] / 8,
                          attn_prefill_s=0.0, train_token_s=train, train_attn_s=0.0, combine="sum"))
    return out


def _short(r: dict) -> dict:
    keys = ("throughput_ratio", "generation_ratio", "s_per_prompt", "generate_s_per_prompt", "train_s_per_prompt",
            "decode_steps_per_1000_prompts", "preemptions", "prompts")
    return {k: float(r[k]) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="measured steps after each run's warm-up")
    ap.add_argument("--engines", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--quick", action="store_true", help="a small cluster and L (a test runs it)")
    ap.add_argument("--out", help="output JSON (default: results/gpu_projection.json)")
    args = ap.parse_args(argv)
    eng = Engine.derive(QWEN_32B, H100, tp=4)
    s = PAPER if not args.quick else Setting(prompts_per_step=8, samples_per_prompt=4, max_response_tokens=512,
                                             prompt_tokens=16, engines=2)
    L = s.max_response_tokens
    W = L // 3  # the paper's 8K of 24K
    n = s.prompts_per_step * s.samples_per_prompt * 40
    dists = {"lognormal(median L/6, sigma 0.8)": lognormal_lengths(n, L / 6, 0.8, L),
             "chain task, scaled to L": chain_lengths(n, L)}
    variants = [Variant(L // 2), Variant(W), Variant(L // 6), Variant(W, redeal=False), Variant(W, refill=True),
                Variant(W, prefix_grad=False), Variant(W, refill=True, prefix_grad=False)]
    report: dict = {"commit": commit(), "model": __doc__.split("\n\n")[1], "engine": dataclasses.asdict(eng),
                    "setting": dataclasses.asdict(s), "paper_scale": {}, "engines": {}}
    for name, lengths in dists.items():
        stats = {"mean": float(lengths.mean()), "p50": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)),
                 "truncated_at_L": float((lengths >= L).mean())}
        res = compare(lengths, s, eng, variants, args.steps)
        report["paper_scale"][name] = {"lengths": stats, "results": {k: _short(v) for k, v in res.items()}}
        print(f"{name}: " + ", ".join(f"{k} {v['throughput_ratio']:.2f} ({v['generation_ratio']:.2f})" for k, v in res.items()), flush=True)
    lengths = dists["lognormal(median L/6, sigma 0.8)"]
    for e in args.engines if not args.quick else [2, 4]:
        res = compare(lengths, dataclasses.replace(s, engines=e), eng,
                      [Variant(W), Variant(W, refill=True)], args.steps)
        report["engines"][str(e)] = {k: _short(v) for k, v in res.items()}
        print(f"{e} engines: " + ", ".join(f"{k} {v['throughput_ratio']:.2f} ({v['generation_ratio']:.2f})" for k, v in res.items()), flush=True)
    # Validation: the model with this CPU's constants next to what the CPU measured.
    cpu_path = RESULTS_DIR / "ppo_vs_tppo.json"
    cpu_runs = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}
    emb = chain_lengths(EMBEDDED.prompts_per_step * EMBEDDED.samples_per_prompt * 60, 256)
    cpu = compare(emb, EMBEDDED, CPU_TINY, [Variant(128), Variant(64), Variant(32), Variant(64, refill=True)], 30)
    report["cpu_validation"] = {"model": {k: _short(v) for k, v in cpu.items()},
                                "measured": measured_cpu(cpu_runs)}
    for fitted in fitted_engines(RESULTS_DIR / "gpu_check.json"):
        res = compare(lengths, s, fitted, [Variant(W), Variant(W, refill=True)], args.steps)
        report.setdefault("fitted", {})[fitted.name] = {k: _short(v) for k, v in res.items()}
    # Time to a score = time per prompt x prompts to the score; the second factor from the CPU.
    meas = report["cpu_validation"]["measured"]
    best = cpu_runs.get("best_window") if meas else None
    learn = (meas.get(best) or {}).get("prompts_to_target_ratio") if best else None
    report["time_to_score"] = {
        "note": "projected time-to-target ratio PPO / T-PPO = (T-PPO's prompts per hour / PPO's, this model) x "
                "(PPO's prompts to target / T-PPO's, measured on the CPU at its best window); assumes learning per "
                "prompt transfers across scales. The paper's 2.5x is time to a score (T-PPO vs VAPO, AIME), not throughput.",
        "cpu_window": best, "prompts_to_target_ratio": learn,
        "by_variant": {name: r["throughput_ratio"] * learn
                       for name, r in report["paper_scale"]["lognormal(median L/6, sigma 0.8)"]["results"].items()
                       if learn and name != "ppo"}}
    path = Path(args.out) if args.out else write_json("gpu_projection.json", report)
    if args.out:
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
