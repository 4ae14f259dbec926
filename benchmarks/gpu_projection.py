"""GPU projection (#20 D-E): when is T-PPO faster than PPO and GRPO at cluster scale?

Wall-clock on 2 CPU cores cannot show T-PPO's main gain: on a CPU a decode step costs in
proportion to the rows in it, so idle slots cost little; on a GPU a decode step reads
every weight once whatever the batch, so the slots PPO leaves idle while it waits for its
longest response are lost. This script replays response lengths through every inference
engine of a cluster, step by step, counting the work the library's code does (its
counters, docs/metrics.md) and charging it with the hardware's costs:

window            the library's (``window_mode: tokens``): every row may generate up to W
                  new tokens and the window ends when the last has (the embedded engine
                  without refill, the vLLM engine: ``max_tokens`` = W per request), so a row
                  admitted late (queued, preempted) still gets its W. ``steps``: the window
                  ends after W decode steps of an engine and late rows get fewer.
decode step       overhead + max(weight read + KV read of every active row's context,
                  per-row matmul compute + attention compute over the context, + the
                  prefill compute scheduled beside it): memory- or compute-bound, not both.
prefill           chunked, as vLLM V1 runs it: new prompts, preempted rows and T-PPO's
                  carried rows (the weights changed since their KV was computed) are
                  prefilled beside the running rows' decode steps, in their compute.
KV capacity       HBM in bytes (nvidia-smi's total) x ``gpu_memory_utilization``, less the
                  weights and an activation reserve; rows are admitted first come, first
                  served while they fit; when the running rows outgrow it the newest is
                  preempted and re-enters with a prefill of its whole context (vLLM V1).
training          forward-equivalent passes over each row's context on all GPUs, sequence
                  packed: forward 1, backward 2, activation recompute 1 (the long-context
                  practice of verl / OpenRLHF: gradient checkpointing re-runs the forward).
                  Values 1 (not GRPO), old log-probs 1 (0 with the engine's log-probs),
                  policy update 4, critic update 4 (T-PPO: finished rows only). T-PPO's
                  window rows run over their whole context (prefix + window); with
                  ``prefix_grad: false`` the prefix is forward only.
step              every engine gets its share of the rows; the step waits for the slowest
                  engine, trains on all GPUs, then sends the weights to the engines.

The conditions (section ``conditions``): engines {16, 32, 64, 128} x typical response
length {L/12, L/6, L/3} (log-normal, sigma 0.8, capped at L = 24K) x update {exact:
pi_old recomputed, exact with the engine's log-probs}, T-PPO (W = L/4, as the speed
study's arm) against PPO and GRPO: prompts per hour end to end and the rollout alone, and
the time to target where the CPU's learning factors decide it. Learning factors (section
``learning``) come from the speed study (``results/speed_study.json``, or
``--learning-study``'s), per arm, with bootstrap CIs over seeds: never one arm's factor
for another, and none from a study that fails its power rule.

The check (section ``cpu_check``): the same simulation of the speed study's CPU setting
(one embedded engine counted as it runs, ``lockstep``; the library's micro-batch packing)
replays each study run's own rows (their prompt and response lengths, logged by the
study) and gives its work; this machine's unit costs (benchmarks/cost_model.py, fitted on
the study's first seed of every arm) turn it into seconds per phase, compared with what
the run measured, for every run the costs were not fitted on. Left out: per-prompt
correlation of lengths in the GPU conditions (their lengths are drawn independently; the
CPU check's replay keeps each prompt's rows together), communication other than the
weight sync, a reference model (the paper's runs use no KL).

    python benchmarks/gpu_projection.py          # writes results/gpu_projection.json
    python benchmarks/gpu_projection.py --quick  # small, seconds (a test runs it)
    python benchmarks/gpu_projection.py --learning-study speed_study_powered.json   # learning factors from results/ of that study
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, commit, machine, results_path, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
# H100 SXM: nvidia-smi's total of the "80 GB" card is 81559 MiB of HBM3; data sheet 3.35 TB/s, 989 TFLOP/s dense bf16.
H100 = Gpu("H100 SXM", hbm_bytes=81559 * 2**20, bandwidth=3.35e12, flops=989e12)


@dataclasses.dataclass(frozen=True)
class Engine:
    """Costs (seconds) of one inference engine and of training per GPU; see the module doc.

    ``combine``: ``max`` (a decode step bound by memory or by compute) or ``sum`` (the
    additive form fitted by gpu_check.py: overhead + compute_row_s * B + kv_read_s * context).
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

    def decode_s(self, steps: int, rows: int, context: float, prefill: float = 0.0) -> float:
        """``steps`` decode steps of ``rows`` active rows holding ``context`` tokens of KV in
        all (the chunk's middle), with ``prefill`` seconds of prefill compute scheduled
        beside them (chunked prefill)."""
        memory = steps * (self.weight_read_s + context * self.kv_read_s)
        compute = steps * (rows * self.compute_row_s + context * self.attn_s) + prefill
        return steps * self.step_overhead_s + (memory + compute if self.combine == "sum" else max(memory, compute))

    def prefill_s(self, old: np.ndarray | float, new: np.ndarray | float) -> float:
        """Compute of prefilling ``new`` tokens after ``old`` tokens of context (attention over both)."""
        old, new = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
        return float((new * self.prefill_token_s + (new * old + new * (new + 1) / 2) * self.attn_prefill_s).sum())


@dataclasses.dataclass(frozen=True)
class Setting:
    prompts_per_step: int  # global, all engines
    samples_per_prompt: int
    max_response_tokens: int  # L
    prompt_tokens: int
    engines: int = 1
    critic_warmup_steps: int = 0  # first steps without a policy update
    compact_fraction: float = 0.0  # the embedded engine's compaction lag (vLLM: 0, continuous batching)
    lockstep: bool = False  # the embedded engine's shared static KV cache (kv_positions padded to its width)
    micro_batch_tokens: int = 0  # > 0: the library's token-budget micro-batches (padded positions); 0: packed sequences
    micro_batch_rows: int = 64


# The paper: 512 prompts x 16 samples per step, L = 24K; 64 GPUs as 16 engines of TP 4.
PAPER = Setting(prompts_per_step=512, samples_per_prompt=16, max_response_tokens=24_576, prompt_tokens=256, engines=16)


@dataclasses.dataclass(frozen=True)
class Arm:
    """What a run does (the speed study's arms: benchmarks/speed_study.py)."""

    algorithm: Literal["ppo", "grpo", "tppo"] = "ppo"
    window: int | None = None  # T-PPO's W (None: whole responses)
    window_mode: Literal["tokens", "steps"] = "tokens"
    refill: bool = False  # a finished row's slot takes a new row at once, within the window
    prefix_grad: bool = True  # False: a carried row's prefix is forward only in the update
    train_on: Literal["window", "finished"] = "window"  # finished: partial-rollout PPO
    engine_logprobs: bool = False  # pi_old = the engine's log-probs: no old-log-prob pass
    # share of the rows finishing in a step whose loss covers their whole response: finished correct rows under
    # algo.lm_loss_coef > 0 (the positive-example LM loss); with prefix_grad false they run unsplit (prefix.span_starts)
    whole_share: float = 0.0
    redeal: bool = True  # carried rows dealt across engines again each step

    @property
    def synchronous(self) -> bool:
        return self.window is None

    @property
    def name(self) -> str:
        if self.synchronous:
            base = self.algorithm
        else:
            base = ("partial-ppo" if self.train_on == "finished" else "tppo") + f"-W{self.window}"
            base += ("-steps" if self.window_mode == "steps" else "") + ("" if self.redeal else "-stay")
            base += ("-refill" if self.refill else "") + ("" if self.prefix_grad else "-noprefixgrad")
        return base + ("-enginelp" if self.engine_logprobs else "")


# ---------------------------------------------------------------------- one engine


@dataclasses.dataclass
class Row:
    target: int  # the response's whole length
    have: int  # tokens generated so far
    prompt: int
    start_have: int = 0  # tokens it had when the step began
    correct: bool | None = None  # a replayed row: finished with reward >= 1 (None: not known)

    @property
    def context(self) -> int:
        return self.prompt + self.have


GEN_WORK = ("decode_steps", "row_steps", "prefill_tokens", "prefill_positions", "kv_positions", "cache_positions", "prefill_calls",
            "copy_positions")


@dataclasses.dataclass
class EngineResult:
    time_s: float
    prefill_s: float  # compute of the prefills (inside time_s, beside the decode steps)
    preemptions: int
    work: dict[str, float]  # GEN_WORK

    @property
    def decode_steps(self) -> int:
        return int(self.work["decode_steps"])


class RowQueue:
    """In-window refill's new rows, drawn from the prompt stream as slots free up (``take``;
    ``draw`` returns None when the stream has run dry); ``taken``: those that joined, in
    order. ``defer``: rows drawn that cannot join yet go back to the front of ``pending``
    (the stream's head: embedded.py's ``_pending``). A plain list is :meth:`of_list`."""

    def __init__(self, draw, pending: list[Row] | None = None) -> None:
        self.draw, self.pending, self.taken = draw, pending if pending is not None else [], []

    @classmethod
    def of_list(cls, rows: list[Row]) -> "RowQueue":
        """The rows of ``rows``, taken from its front; deferred ones go back there."""
        return cls(lambda: rows.pop(0) if rows else None, pending=rows)

    def take(self, n: int) -> list[Row]:
        out = []
        for _ in range(n):
            r = self.draw()
            if r is None:
                break
            out.append(r)
        self.taken += out
        return out

    def defer(self, rows: list[Row]) -> None:
        self.taken = [r for r in self.taken if not any(r is x for x in rows)]
        self.pending[:0] = rows


def run_engine(rows: list[Row], eng: Engine, *, budget: int | None = None, max_steps: int | None = None,
               new_rows: list[Row] | RowQueue | None = None, chunk: int = 64, compact_fraction: float = 0.0, lockstep: bool = False,
               group: int = 1, max_tokens: int | None = None) -> EngineResult:
    """Generate on one engine until every row has finished or used ``budget`` tokens this
    window, or ``max_steps`` decode steps have passed (``window_mode: steps``). ``rows``
    are updated in place.

    Scheduling (vLLM V1, recompute preemption): the waiting queue is served first come,
    first served while the head's context fits in the free KV; admission prefills the
    row's whole context, in the compute of the decode steps that follow (chunked
    prefill). When the running rows' next tokens do not fit, the newest running row is
    preempted to the front of the queue. ``new_rows`` (in-window refill; None: no refill)
    join the queue's end as rows finish. Time advances ``chunk`` decode steps at a time,
    or to the next event if sooner (a finish, a full cache, the window's end); a chunk
    charges the context at its middle.

    ``lockstep`` counts as the embedded engine runs (tppo/rollout/embedded.py): one
    static KV cache of width P + horizon (P the widest context at the window's start,
    horizon the window's planned decode steps from the cap ``max_tokens``, W more with
    refill under ``window_mode: tokens``), attended over whole at each decode forward
    (``cache_positions``; ``kv_positions`` up to P + s); finished rows stay in the decode
    batch (``row_steps``) until ``compact_fraction`` of it is finished, and a compaction
    copies the survivors' cache rows (``copy_positions``); refill joins whole groups of
    ``group`` rows into finished rows' entries before step n_steps - 1 (n_steps: the
    planned steps of the rows the window starts with), one prefill call each, a row whose
    prompt does not fit before the shared write position yet deferred (``RowQueue.defer``);
    the first token comes from the prefill, so the decode forwards are one fewer than the
    decode steps; the window ends at its horizon. Else (vLLM) each row's own context.
    """
    refill = new_rows is not None
    queue = new_rows if isinstance(new_rows, RowQueue) or not refill else RowQueue.of_list(new_rows)
    want = (lambda r: r.target - r.have) if budget is None else (lambda r: min(r.target - r.have, budget - (r.have - r.start_have)))
    waiting = [r for r in rows if want(r) > 0]
    running: list[Row] = []
    t = prefill = used = pending = 0.0
    work = dict.fromkeys(GEN_WORK, 0.0)
    work["prefill_calls"] = float(bool(waiting))  # an engine without rows runs no window
    steps = preempt = dead = 0
    cap = eng.kv_capacity_tokens
    width = max((r.context for r in waiting), default=0)  # the embedded engine's static cache: P, the widest context
    if max_tokens is not None:  # embedded.py: n_steps from the cap, not the (unknown) lengths
        plan = lambda r: min(max_tokens - r.have, budget if budget is not None else max_tokens)  # noqa: E731
    else:
        plan = want
    first_end = max((plan(r) for r in waiting), default=0)  # the window's steps for the rows it starts with
    # the window's prefill in lockstep (embedded.py): its rows left padded to P (else, vLLM: each admission's context, below)
    work["prefill_positions"] = len(waiting) * width if lockstep else 0.0
    horizon = first_end + (budget if refill and max_steps is None and budget is not None else 0)
    blocked = False  # after a preemption nothing is admitted until a row finishes (vLLM V1)
    while waiting or running:
        # admitted only if its context and every running row's next token fit: else it would be preempted at once
        while waiting and (not blocked or not running) and used + waiting[0].context + len(running) + 1 <= cap:
            r = waiting.pop(0)
            pending += eng.prefill_s(0.0, r.context)
            work["prefill_tokens"] += r.context
            work["prefill_positions"] += 0 if lockstep else r.context
            used += r.context
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
        if lockstep:  # embedded.py decodes at most its horizon (steps mode: n_steps, which may be below W near the cap)
            k = min(k, horizon - steps)
        context = used + n * k / 2
        t += eng.decode_s(k, n, context, pending)
        prefill, pending = prefill + pending, 0.0
        work["decode_steps"] += k
        work["row_steps"] += k * (n + dead)
        if lockstep:  # decode forwards at steps 1..: the first token is sampled from the prefill's logits
            fed = k - (steps == 0)
            work["kv_positions"] += fed * (n + dead) * (width + steps + (k - 1 + (steps == 0)) / 2)  # forward s reads P + s + 1
            work["cache_positions"] += fed * (n + dead) * (width + horizon)
        else:
            work["kv_positions"] += k * context
            work["cache_positions"] += k * context
        for r in running:
            r.have += k
        used += n * k
        steps += k
        if k == min(left):
            done = [r for r, lft in zip(running, left) if lft == k]
            running = [r for r, lft in zip(running, left) if lft != k]
            used -= sum(r.context for r in done)
            blocked = False
            dead += len(done)
            last = (max_steps is not None and steps >= max_steps) or (lockstep and steps >= horizon)
            # refill (embedded._admit, before its compaction): whole groups into finished rows' entries, before step n_steps - 1
            if refill and steps < first_end and not last:
                free = dead - dead % group if lockstep else sum(r.have >= r.target for r in done)
                joining = queue.take(free)
                if lockstep:  # a prompt joins where it fits before the shared write position P + s (s = steps - 1)
                    late = [r for r in joining if r.prompt - 1 > width + steps - 1]
                    if late:
                        queue.defer(late)
                        joining = [r for r in joining if not any(r is x for x in late)]
                if joining:
                    waiting.extend(joining)
                    dead = max(0, dead - len(joining))  # they take the finished rows' entries in place (embedded._join)
                    if lockstep:
                        work["prefill_calls"] += 1
                        work["prefill_tokens"] -= len(joining)  # a joining prompt's last token is fed with the decode step
                        work["prefill_positions"] += len(joining) * (max(r.prompt for r in joining) - 1)  # padded to the widest
                        work["copy_positions"] += len(joining) * (width + horizon)
            if not last and dead and dead >= compact_fraction * (len(running) + len(waiting) + dead):
                if lockstep:
                    work["copy_positions"] += (len(running) + len(waiting)) * (width + horizon)  # the survivors' cache rows
                dead = 0
        if (max_steps is not None and steps >= max_steps) or (lockstep and steps >= horizon):
            break
    return EngineResult(t, prefill, preempt, work)


# ---------------------------------------------------------------------- training


PASSES = {"forward": 1.0, "backward": 2.0, "recompute": 1.0}  # forward-equivalents; recompute: activation checkpointing
TRAIN_WORK = ("value_positions", "old_logprob_positions", "policy_positions", "policy_prefix_positions", "critic_positions")


def micro_batches(lengths: np.ndarray, s: Setting) -> list[list[int]]:
    """The library's token-budget micro-batches over rows of these lengths (tppo/batching.py,
    the function the trainer calls): lists of row indices."""
    from tppo.batching import token_micro_batches

    return token_micro_batches(list(range(len(lengths))), [int(x) for x in np.asarray(lengths).tolist()], s.micro_batch_tokens,
                               s.micro_batch_rows)


def positions(lengths: np.ndarray, s: Setting) -> float:
    """Token positions a pass over rows of these lengths computes: the tokens (packed
    sequences), or the library's token-budget micro-batches padded to their longest row."""
    lengths = np.asarray(lengths)
    if not s.micro_batch_tokens:
        return float(lengths.sum())
    return float(sum(len(m) * int(max(lengths[i] for i in m)) for m in micro_batches(lengths, s)))


def split_positions(lengths: np.ndarray, starts: np.ndarray, s: Setting) -> tuple[float, float]:
    """(prefix, span) positions of ``algo.prefix_grad: false``'s update: with
    ``micro_batch_tokens`` as the library runs it (tppo/prefix.py, WorkCounter.forward):
    the same token-budget micro-batches as the exact update, every micro-batch's prefixes
    left-padded to the step's widest prefix and its spans right-padded to its longest;
    without, packed sequences (the tokens, what a GPU implementation would run; the
    library's fixed-row micro-batches would pad to the step's widest prefix too)."""
    lengths, starts = np.asarray(lengths, dtype=np.int64), np.asarray(starts, dtype=np.int64)
    if not s.micro_batch_tokens:
        return float(starts.sum()), float((lengths - starts).sum())
    width = int(starts.max()) if len(starts) else 0
    micro = micro_batches(lengths, s)
    return (float(sum(len(m) * width for m in micro)),
            float(sum(len(m) * max(int(lengths[i] - starts[i]) for i in m) for m in micro)))


def pairs(lengths: np.ndarray, prefix: np.ndarray | None = None) -> float:
    """(token, context token) pairs of attention over rows of these lengths (each token
    attends to those before it); with ``prefix``, only the tokens after it are counted."""
    c = np.asarray(lengths, dtype=np.float64)
    if prefix is None:
        return float((c * (c + 1) / 2).sum())
    p = np.asarray(prefix, dtype=np.float64)
    return float((c * (c + 1) / 2 - p * (p + 1) / 2).sum())


def span_starts(prefix: np.ndarray, carried: np.ndarray | None = None, whole: np.ndarray | None = None) -> np.ndarray:
    """Where each row's span with gradient begins under ``prefix_grad: false``, as
    tppo/prefix.py's ``span_starts`` puts it in the shifted frame: a carried row's last
    token before the window (its logits predict the window's first token); 0, the whole
    row, for a row in its first window and for a ``whole`` one (its loss covers its whole
    response: a finished correct row under the positive-example LM loss)."""
    split = np.ones(len(prefix), dtype=bool) if carried is None else np.asarray(carried, dtype=bool).copy()
    if whole is not None:
        split &= ~np.asarray(whole, dtype=bool)
    return np.where(split, prefix - 1, 0.0)


def whole_rows(finished: np.ndarray, share: float) -> np.ndarray:
    """``share`` of the ``finished`` rows (a mask over the step's rows), spread evenly in
    their order (deterministic): the ones :func:`span_starts` runs whole."""
    rank = np.cumsum(finished) * float(share)
    return finished & (np.floor(rank) > np.floor(rank - share))


def train_work(arm: Arm, prefix: np.ndarray, window: np.ndarray, finished: np.ndarray, s: Setting, update: bool,
               carried: np.ndarray | None = None, whole: np.ndarray | None = None) -> dict:
    """One step's training work: positions per pass (the library's counters) and the
    forward-equivalent passes and attention pairs a GPU is charged for.

    ``prefix``/``window``: per row that generated this step, its context before the window
    and the tokens it generated in it; ``carried``: whether it generated in an earlier
    window (default: all do); ``whole``: the rows :func:`span_starts` runs unsplit;
    ``finished``: the whole contexts of the rows that finished. ``update``: the policy is
    updated (not a critic warm-up step)."""
    full = prefix + window
    if arm.synchronous or arm.train_on == "finished":
        policy_rows = finished
        pol_prefix = np.zeros_like(finished)
    else:
        policy_rows, pol_prefix = full, span_starts(prefix, carried, whole)
    critic = arm.algorithm != "grpo"
    w = {k: 0.0 for k in TRAIN_WORK}
    cost = {"values": 0.0, "old_logprobs": 0.0, "policy_update": 0.0, "value_update": 0.0}  # (passes x positions) + pairs
    attn = dict.fromkeys(cost, 0.0)
    if critic:
        rows_v = finished if (arm.synchronous or arm.train_on == "finished") else full
        w["value_positions"] = positions(rows_v, s)
        cost["values"], attn["values"] = float(rows_v.sum()), pairs(rows_v)
        w["critic_positions"] = positions(finished, s)
        n = PASSES["forward"] + PASSES["backward"] + PASSES["recompute"]
        cost["value_update"], attn["value_update"] = n * float(finished.sum()), n * pairs(finished)
    if update and len(policy_rows):
        if not arm.engine_logprobs:
            w["old_logprob_positions"] = positions(policy_rows, s)
            cost["old_logprobs"], attn["old_logprobs"] = float(policy_rows.sum()), pairs(policy_rows)
        grad = PASSES["backward"] + PASSES["recompute"]
        if arm.prefix_grad:
            w["policy_positions"] = positions(policy_rows, s)
            cost["policy_update"] = (1 + grad) * float(policy_rows.sum())
            attn["policy_update"] = (1 + grad) * pairs(policy_rows)
        else:  # the prefix forward only; the spans (window tokens) forward and backward, attending over the prefix
            span = policy_rows - pol_prefix
            w["policy_prefix_positions"], w["policy_positions"] = split_positions(policy_rows, pol_prefix, s)
            cost["policy_update"] = float(pol_prefix.sum()) + (1 + grad) * float(span.sum())
            attn["policy_update"] = pairs(pol_prefix) + (1 + grad) * pairs(policy_rows, pol_prefix)
    return {"work": w, "tokens": cost, "pairs": attn}


# ---------------------------------------------------------------------- whole steps


def deal(rows: list[Row], engines: int) -> list[list[Row]]:
    """Rows across engines, longest context first in a snake order (balanced KV and work)."""
    out: list[list[Row]] = [[] for _ in range(engines)]
    for i, r in enumerate(sorted(rows, key=lambda r: -r.context)):
        lap, pos = divmod(i, engines)
        out[pos if lap % 2 == 0 else engines - 1 - pos].append(r)
    return out


def simulate(lengths: np.ndarray, s: Setting, eng: Engine, arm: Arm, steps: int | None = None, *,
             prompts: int | None = None, measure_from: int = 0, trained: list[Arm] | None = None,
             windows: list[int] | None = None) -> dict:
    """Steps of ``arm`` (``steps`` of them, or until ``prompts`` prompts were admitted as the
    speed study's loop does); totals over the steps from ``measure_from`` on: seconds per
    phase (``generate``, ``train``, ``sync`` and the training passes), work counters, prompts
    finished and admitted. ``trained``: arms that generate as ``arm`` does and train
    differently (GRPO beside PPO, the engine's log-probs beside the exact update): the
    same rollout costed for each, {name: totals}. ``windows``: each step's W, where a run
    chose it as it went (``rollout.window_tokens: auto``, its logged ``rollout/window_tokens``);
    ``arm.window`` after them.

    ``lengths``: the response lengths, in the order rows are admitted; or (n, 2) rows of
    (prompt tokens, response length), or (n, 3) with a third column, correct, a run's own
    rows replayed (:func:`replayed_rows`): then the finishing correct rows are the ones
    whose loss covers their whole response (where ``Arm.whole_share`` says the LM loss is
    on), else ``whole_share`` of them. Cycled if the simulation admits more rows."""
    G, slots = s.samples_per_prompt, s.prompts_per_step * s.samples_per_prompt
    gpus = s.engines * eng.gpus
    lengths = np.asarray(lengths)
    rows_ = lengths.tolist() if lengths.ndim == 2 else [(s.prompt_tokens, n) for n in lengths.tolist()]
    stream = itertools.cycle(rows_)
    pending: list[Row] = []  # rows drawn for an in-window refill that could not join yet: the next drawn

    def fresh() -> Row:
        if pending:
            return pending.pop(0)
        prompt, target, *correct = next(stream)
        return Row(target=int(target), have=0, prompt=int(prompt), correct=bool(correct[0]) if correct else None)

    placed: list[list[Row]] = [[] for _ in range(s.engines)]
    arms = trained or [arm]
    accs = {a.name: {"time_s": 0.0, "generate_s": 0.0, "train_s": 0.0, "sync_s": 0.0, "prefill_s": 0.0, "preemptions": 0,
                     "finished_rows": 0, "admitted_prompts": 0, "steps": 0, "work": dict.fromkeys(GEN_WORK + TRAIN_WORK, 0.0),
                     "train_phase_s": {}} for a in arms}
    k = admitted = 0
    while (steps is None or k < steps) and (prompts is None or admitted < prompts):
        in_flight = [r for e in placed for r in e]
        new = [fresh() for _ in range((slots - len(in_flight)) // G * G)]
        if arm.redeal or arm.synchronous:
            placed = deal(in_flight + new, s.engines)
        else:  # carried rows stay; new rows go to the emptiest engines
            for r in new:
                min(placed, key=len).append(r)
        for r in in_flight + new:
            r.start_have = r.have
        # in-window refill: new rows drawn from the stream as each engine's rows finish
        queues = [RowQueue(fresh, pending) if arm.refill else None for _ in placed]
        W = None if arm.synchronous else windows[k] if windows is not None and k < len(windows) else arm.window
        results = [run_engine(rows, eng, budget=W, max_steps=W if arm.window_mode == "steps" else None, new_rows=q,
                              compact_fraction=s.compact_fraction, lockstep=s.lockstep, group=G,
                              max_tokens=s.max_response_tokens if s.lockstep else None) for rows, q in zip(placed, queues)]
        step_admitted = len(new) / G
        for e, q in zip(placed, queues):
            if q is not None:
                e.extend(q.taken)
                step_admitted += len(q.taken) / G
        admitted += step_admitted
        rows_now = [r for e in placed for r in e]
        got = [r for r in rows_now if r.have > r.start_have]  # a row queued all window long has nothing to train on
        prefix = np.array([r.prompt + r.start_have for r in got], dtype=np.float64)
        window = np.array([r.have - r.start_have for r in got], dtype=np.float64)
        carried = np.array([r.start_have > 0 for r in got], dtype=bool)
        ending = np.array([r.have >= r.target for r in got], dtype=bool)
        known = np.array([bool(r.correct) for r in got], dtype=bool) if got and got[0].correct is not None else None
        finished = [r for r in rows_now if r.have >= r.target]
        fin = np.array([r.context for r in finished], dtype=np.float64)
        placed = [[r for r in e if r.have < r.target] for e in placed]
        if k >= measure_from:
            for a in arms:
                tw = train_work(a, prefix, window, fin, s, update=k >= s.critic_warmup_steps, carried=carried,
                                whole=ending & known if known is not None and a.whole_share else whole_rows(ending, a.whole_share))
                account(accs[a.name], results, tw, eng, gpus, len(finished), step_admitted)
        k += 1
    for acc in accs.values():
        done = acc["finished_rows"] / G
        acc.update(prompts=done, prompts_per_hour=3600 * done / acc["time_s"] if acc["time_s"] else 0.0,
                   s_per_prompt=acc["time_s"] / done if done else math.inf,
                   generate_s_per_prompt=acc["generate_s"] / done if done else math.inf,
                   train_s_per_prompt=acc["train_s"] / done if done else math.inf,
                   decode_steps_per_1000_prompts=1000 * acc["work"]["decode_steps"] / done if done else math.inf)
    return accs if trained else accs[arm.name]


def account(acc: dict, results: list[EngineResult], tw: dict, eng: Engine, gpus: int, finished: int, admitted: float) -> None:
    """Add one step to ``acc``: the slowest engine's generation, training on all GPUs, the weight sync."""
    phase_s = {p: (tw["tokens"][p] * eng.train_token_s + tw["pairs"][p] * eng.train_attn_s) / gpus for p in tw["tokens"]}
    generate, train = max(res.time_s for res in results), sum(phase_s.values())
    acc["time_s"] += generate + train + eng.weight_sync_s
    acc["generate_s"] += generate
    acc["train_s"] += train
    acc["sync_s"] += eng.weight_sync_s
    acc["prefill_s"] += max(res.prefill_s for res in results)
    acc["preemptions"] += sum(res.preemptions for res in results)
    acc["finished_rows"] += finished
    acc["admitted_prompts"] += admitted
    acc["steps"] += 1
    for key in GEN_WORK:  # the slowest engine's decode steps; the others summed over engines
        acc["work"][key] += max(r.work[key] for r in results) if key == "decode_steps" else sum(r.work[key] for r in results)
    for key, v in tw["work"].items():
        acc["work"][key] += v
    for p, v in phase_s.items():
        acc["train_phase_s"][p] = acc["train_phase_s"].get(p, 0.0) + v


def steady(lengths: np.ndarray, s: Setting, eng: Engine, arm: Arm, steps_after_warmup: int = 4,
           trained: list[Arm] | None = None) -> dict:
    """Steady-state figures: ``steps_after_warmup`` steps after the first ceil(L / W) (T-PPO's
    carry-over fills up), prompts whose rows finished per hour."""
    warm = 0 if arm.synchronous else math.ceil(s.max_response_tokens / arm.window)
    return simulate(lengths, s, eng, arm, warm + steps_after_warmup, measure_from=warm, trained=trained)


# ---------------------------------------------------------------------- length distributions


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 1, cap).astype(np.int64)


# ---------------------------------------------------------------------- the CPU check


def cpu_setting(correct_share: float = 0.0, extra: list[str] | None = None) -> dict[str, tuple[Setting, Arm]]:
    """The speed study's arms (configs/demo.yaml + its COMMON + the arm's overrides + the
    study's ``extra`` ones) as the model sees them: (setting, arm) per arm. An arm whose W is
    chosen while it runs (``auto``: ``tppo-auto``) gets ``rollout.max_window`` here; the CPU
    check replays each step's logged W (:func:`simulate`'s ``windows``). ``correct_share``: the share of finished rows
    that are correct (under the positive-example LM loss, their whole response carries a
    loss: Arm.whole_share)."""
    from speed_study import ARMS, COMMON

    from tppo.config import load_config
    from tppo.rollout.embedded import COMPACT_FRACTION

    out = {}
    prompt = chain_prompt_tokens()
    for name, overrides in ARMS.items():
        cfg = load_config(ROOT / "configs" / "demo.yaml", [*COMMON, *overrides, *(extra or [])])
        a, r, t = cfg.algo, cfg.rollout, cfg.train
        window = r.window_tokens if isinstance(r.window_tokens, int) else r.max_window
        one_pass = t.ppo_epochs * t.mini_batches == 1  # pi_old is the update's own forward: no pass of its own
        arm = Arm(algorithm=a.algorithm, window=None if a.algorithm in ("ppo", "grpo") else window,
                  window_mode=r.window_mode, refill=r.refill_within_window, prefix_grad=a.prefix_grad, train_on=a.train_on,
                  engine_logprobs=one_pass, whole_share=correct_share if a.lm_loss_coef else 0.0)
        s = Setting(prompts_per_step=r.prompts_per_step, samples_per_prompt=r.samples_per_prompt, max_response_tokens=r.max_response_tokens,
                    prompt_tokens=prompt, critic_warmup_steps=t.critic_warmup_steps,
                    compact_fraction=COMPACT_FRACTION if r.remove_finished else math.inf, lockstep=True,
                    micro_batch_tokens=t.micro_batch_tokens, micro_batch_rows=t.micro_batch_rows)
        out[name] = (s, arm)
    return out


def chain_prompt_tokens() -> int:
    """The chain task's mean prompt length in the tiny model's tokens (one character each)."""
    from tppo.config import ChainConfig
    from tppo.tasks.chain import ChainTask

    stream = ChainTask(ChainConfig()).stream("train", 0)
    return round(statistics.mean(len(next(stream).prompt) for _ in range(2000)))


def replayed_rows(run: dict, cap: int) -> np.ndarray:
    """A speed-study run's own rows (its ``rows``: prompt tokens, response tokens, finished,
    correct), in admission order, as :func:`simulate` replays them: (prompt, length,
    correct); a row still in flight when the run ended is given the cap (it stays in
    flight as it did)."""
    return np.array([(p, n if done else cap, ok) for p, n, done, ok in run["rows"]], dtype=np.int64)


def run_windows(run: dict) -> list[int] | None:
    """A speed-study run's W per step, where it logged them (``rollout/window_tokens``)."""
    ws = [st.get("rollout/window_tokens") for st in run.get("per_step", [])]
    return [int(w) for w in ws] if ws and all(w is not None for w in ws) else None


def cpu_check(study: dict) -> dict | None:
    """Each speed-study run the unit costs were not fitted on, simulated on the CPU's
    setting with its own rows replayed (:func:`replayed_rows`), its simulated work costed
    with the study's unit costs (benchmarks/cost_model.py), against the seconds and work
    it measured: per arm the median over its runs of model / measured - 1, per phase.
    What it checks is the model's accounting (the library's windows, batches and passes
    replayed from lengths alone) and the unit costs together; the lengths are an input."""
    from cost_model import predict

    cm = study.get("cost_model") or {}
    if not cm.get("unit_costs"):
        return None
    # the share of correct responses while training: about midway between the start and the arms' ends (held-out accuracy)
    finals = [x for a in study["arms"].values() for x in a["final_accuracy"]]
    correct = (study["initial_accuracy"] + statistics.median(finals)) / 2 if finals else study["initial_accuracy"]
    arms = cpu_setting(correct, study.get("args", {}).get("extra"))
    cpu = Engine("CPU (work only)", 0, 0, 0, 0, 0, 0, 0, 0, 0, combine="sum")
    out = {"lengths": "each run's own rows, replayed", "correct_share": correct, "arms": {}}
    seen = set(cm["calibration"] if isinstance(cm["calibration"], list) else [cm["calibration"]])
    for name, a in study["arms"].items():
        runs = [(key, study["results"][key]) for seed in a["seeds"] if (key := f"{name}/s{seed}") not in seen]
        chosen = "rollout.window_tokens=auto" in a.get("overrides", [])  # W chosen as it ran: replayable where it was logged
        runs = [(key, r, ws) for key, r in runs if r.get("rows") and ((ws := run_windows(r)) or not chosen)]
        if name not in arms or not runs:
            continue
        setting, arm = arms[name]
        errs: dict[str, list[float]] = {}
        work_errs: dict[str, list[float]] = {}
        admitted = []  # the simulation's prompts over the run's: 1 where it replays the run's steps
        for key, r, ws in runs:
            sim = simulate(replayed_rows(r, setting.max_response_tokens), setting, cpu, arm, prompts=r["prompts"], windows=ws)
            admitted.append(sim["admitted_prompts"] / r["prompts"])
            work = {f"work/{k}": v for k, v in sim["work"].items()}
            speed = (cm.get("run_speed") or {}).get(key)  # costs in probe-seconds: the run's own probe (cost_model.run_speed)
            pred = predict(cm["unit_costs"], work, speed)
            for p, v in pred.items():
                if v and r["phase_s"].get(p):
                    errs.setdefault(p, []).append(v / r["phase_s"][p] - 1)
            errs.setdefault("total", []).append(sum(pred.values()) / sum(r["phase_s"][p] for p in pred) - 1)
            for k, v in work.items():
                if r["work"].get(k):
                    work_errs.setdefault(k, []).append(v / r["work"][k] - 1)
        err = {p: statistics.median(e) for p, e in errs.items()}
        out["arms"][name] = {"runs": len(runs), "relative_error": err, "admitted_over_run": statistics.median(admitted),
                             "work_relative_error": {k: statistics.median(e) for k, e in work_errs.items()},
                             "within_10pct": all(abs(e) <= 0.10 for e in err.values())}
    out["all_within_10pct"] = all(v["within_10pct"] for v in out["arms"].values())
    return out


# ---------------------------------------------------------------------- learning factors


def learning_factors(study: dict, baseline: str = "ppo") -> dict:
    """Per arm, the baseline's prompts to the target over the arm's, per seed (paired),
    median and bootstrap CI over seeds (benchmarks/stats.py); a seed where the arm missed
    the target counts 0, never dropped. ``decided``: both ends of the CI on one side of 1.
    ``power_holds``: the study's power rule (speed_study.power: the median main arm gained
    at least twice the target's margin); where it fails, a time to target is the
    evaluation's noise and :func:`condition_row` uses no factor."""
    from speed_study import to_target
    from stats import seed_ratios, time_ratio_ci

    start, target = study["initial_accuracy"], study["target_accuracy"]
    powered = bool((study.get("power") or {}).get("holds"))

    def prompts_to_target(arm: str, seed: int) -> float | None:
        return to_target(study["results"], start, target, f"{arm}/s{seed}", "prompts")

    out = {}
    for arm, a in study["arms"].items():
        if arm == baseline or baseline not in study["arms"]:
            continue
        seeds = [s for s in a["seeds"] if f"{baseline}/s{s}" in study["results"]]
        base, mine = [prompts_to_target(baseline, s) for s in seeds], [prompts_to_target(arm, s) for s in seeds]
        ci = time_ratio_ci(seed_ratios(base, mine))
        decided = ci["n"] > 0 and (ci["ci_low"] > 1 or ci["ci_high"] < 1)
        # JSON has no infinity: a ratio where only the baseline missed the target is written as a string
        ci = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in ci.items()}
        out[arm] = {**ci, "prompts_to_target": mine, "baseline_prompts_to_target": base, "decided": decided, "power_holds": powered}
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


# ---------------------------------------------------------------------- the conditions


UPDATES = {"exact": False, "engine_logprobs": True}  # the policy update's pi_old: recomputed, or the engine's


def conditions(eng: Engine, s: Setting, engines: list[int], medians: dict[str, float], learning: dict, steps: int,
               rows_per_condition: int) -> dict:
    """T-PPO (W = L/4) against PPO and GRPO for every engines x length x update."""
    L = s.max_response_tokens
    out = {}
    for e in engines:
        for label, median in medians.items():
            lengths = lognormal_lengths(rows_per_condition, median, 0.8, L)
            se = dataclasses.replace(s, engines=e)
            sync = [Arm(algo, engine_logprobs=lp) for lp in UPDATES.values() for algo in ("ppo", "grpo")]
            tppo = [Arm("tppo", window=L // 4, engine_logprobs=lp) for lp in UPDATES.values()]
            res = {**steady(lengths, se, eng, sync[0], steps, trained=sync), **steady(lengths, se, eng, tppo[0], steps, trained=tppo)}
            for upd, lp in UPDATES.items():
                name = lambda a: Arm(a, window=L // 4 if a == "tppo" else None, engine_logprobs=lp).name  # noqa: E731
                key = f"{e} engines, median {label}, {upd}"
                out[key] = condition_row({a: res[name(a)] for a in ("ppo", "grpo", "tppo")}, learning, e, label, upd)
    return out


def condition_row(res: dict, learning: dict, engines: int, label: str, upd: str) -> dict:
    t = res["tppo"]
    row = {"engines": engines, "median_length": label, "update": upd,
           "s_per_prompt": {k: r["s_per_prompt"] for k, r in res.items()},
           "generate_s_per_prompt": {k: r["generate_s_per_prompt"] for k, r in res.items()},
           "preemptions": {k: r["preemptions"] for k, r in res.items()}}
    for base in ("ppo", "grpo"):
        b = res[base]
        end, roll = b["s_per_prompt"] / t["s_per_prompt"], b["generate_s_per_prompt"] / t["generate_s_per_prompt"]
        lf = learning.get(base, {}).get("tppo")  # T-PPO's factor against this baseline, measured paired by seed
        ttt, why = None, f"no seed where both T-PPO and {base} reached the CPU study's target: no learning factor"
        if lf and not lf.get("power_holds"):
            why = "the CPU study's power rule fails (its median gain is under twice the target's margin)"
        elif lf and all(isinstance(lf.get(k), (int, float)) and math.isfinite(lf[k]) for k in ("median", "ci_low", "ci_high")):
            lo, hi = end * lf["ci_low"], end * lf["ci_high"]
            why = "the CPU's learning factor's CI spans 1"
            if lo > 1 or hi < 1:  # decided on what is reported: throughput x learning, its CI on one side of 1
                ttt, why = {"median": end * lf["median"], "ci_low": lo, "ci_high": hi,
                            "learning_factor_from": "the CPU's one-pass T-PPO (W = L/4) against " + base}, None
        row[f"tppo_over_{base}"] = {"end_to_end": end, "rollout": roll, "time_to_target": ttt, "undecided_because": why}
    row["sentence"] = sentence(row)
    return row


def sentence(row: dict) -> str:
    """The condition's answer in one sentence."""
    p, g = row["tppo_over_ppo"], row["tppo_over_grpo"]

    def verdict(x: float) -> str:
        return "faster" if x > 1.05 else "slower" if x < 0.95 else "no faster (within 5 %)"

    ttt = p["time_to_target"]
    tail = (f"; to the target {ttt['median']:.2f}x [{ttt['ci_low']:.2f}, {ttt['ci_high']:.2f}] with the CPU's learning factor"
            if ttt else f"; its time to target is undecided ({p['undecided_because']})")
    return (f"{row['engines']} engines, median response {row['median_length']}, {row['update'].replace('_', ' ')} update: "
            f"T-PPO is {verdict(p['end_to_end'])} than PPO per prompt ({p['end_to_end']:.2f}x end to end, "
            f"{p['rollout']:.2f}x the rollout alone) and {verdict(g['end_to_end'])} than GRPO ({g['end_to_end']:.2f}x){tail}.")


def markdown(report: dict) -> str:
    """The conditions table and the CPU check for RESULTS.md, from the JSON (no number
    copied by hand): per engines x median length, T-PPO's speed-up per prompt over PPO
    and over GRPO (above 1: T-PPO faster), end to end and the rollout alone, for both updates."""
    def x(v) -> str:
        return f"{v:.2f}x"

    lines = ["| engines | median response | update | T-PPO over PPO: end to end / rollout | T-PPO over GRPO: end to end / rollout "
             "| to the target (PPO, with the CPU's learning factor) |", "|" + "---|" * 6]
    order = {"L/12": 0, "L/6": 1, "L/3": 2}
    rows = sorted(report["conditions"].values(),  # the JSON's keys are sorted as text
                  key=lambda r: (r["engines"], order.get(r["median_length"], 3), list(UPDATES).index(r["update"])))
    for row in rows:
        p, g = row["tppo_over_ppo"], row["tppo_over_grpo"]
        ttt = p["time_to_target"]
        lines.append(f"| {row['engines']} | {row['median_length']} | {row['update'].replace('_', ' ')} | "
                     f"{x(p['end_to_end'])} / {x(p['rollout'])} | {x(g['end_to_end'])} / {x(g['rollout'])} | "
                     + (f"{x(ttt['median'])} [{ttt['ci_low']:.2f}, {ttt['ci_high']:.2f}]" if ttt else "undecided") + " |")
    check = report.get("cpu_check")
    if check:
        phases = sorted({p for c in check["arms"].values() for p in c["relative_error"]}, key=lambda p: (p == "total", p))
        lines += ["", "| arm (CPU check: model / measured - 1, per prompt) | " + " | ".join(phases) + " |", "|" + "---|" * (len(phases) + 1)]
        for arm, c in check["arms"].items():
            e = c["relative_error"]
            lines.append(f"| {arm} | " + " | ".join(f"{e[p]:+.1%}" if p in e else "-" for p in phases) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="measured steps after each run's warm-up")
    ap.add_argument("--engines", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--study", default=str(RESULTS_DIR / "speed_study.json"), help="the speed study's JSON (learning factors, CPU check)")
    ap.add_argument("--learning-study", help="another speed study's JSON for the learning factors alone (default: --study), e.g. "
                                             "a longer study of the main arms that meets the power rule")
    ap.add_argument("--quick", action="store_true", help="a small cluster and L (a test runs it)")
    ap.add_argument("--out", help="output JSON (default: results/gpu_projection.json)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of an existing --out JSON and stop")
    ap.add_argument("--cpu-check-only", action="store_true", help="recompute the CPU check of an existing --out JSON from --study")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(results_path(args.out or "gpu_projection.json").read_text())))
        return 0
    if args.cpu_check_only:
        report = json.loads(results_path(args.out or "gpu_projection.json").read_text())
        report["cpu_check"] = cpu_check(json.loads(Path(args.study).read_text()))
        report["cpu_check_commit"], report["cpu_check_study"] = commit(), Path(args.study).name  # the study it replayed
        print(markdown(report))
        print(f"wrote {write_json(args.out or 'gpu_projection.json', report)}")
        return 0
    eng = Engine.derive(QWEN_32B, H100, tp=4)
    s = PAPER
    engines = args.engines
    if args.quick:
        s = Setting(prompts_per_step=8, samples_per_prompt=4, max_response_tokens=512, prompt_tokens=16, engines=2)
        engines = [2, 4]
    L = s.max_response_tokens
    study_path = Path(args.study)
    study = json.loads(study_path.read_text()) if study_path.exists() else None
    learning_path, learning_study = study_path, study  # the factors' study: --study's, unless another is named
    if args.learning_study:
        learning_path = results_path(args.learning_study)
        if not learning_path.exists():
            ap.error(f"--learning-study: {learning_path} does not exist")
        learning_study = json.loads(learning_path.read_text())
    learning = {base: learning_factors(learning_study, base) for base in ("ppo", "grpo")} if learning_study else {}
    medians = {"L/12": L / 12, "L/6": L / 6, "L/3": L / 3}
    rows = s.prompts_per_step * s.samples_per_prompt * (12 if args.quick else 8)
    report: dict = {"commit": commit(), "machine": machine(), "model": __doc__.split("\n\n")[1], "engine": dataclasses.asdict(eng),
                    "setting": dataclasses.asdict(s), "study": str(study_path.name) if study else None,
                    "study_commit": study.get("commit") if study else None, "learning": learning,
                    "learning_study": learning_path.name if learning_study else None,
                    "learning_study_commit": learning_study.get("commit") if learning_study else None}
    report["conditions"] = conditions(eng, s, engines, medians, learning, args.steps, rows)
    for row in report["conditions"].values():
        print(row["sentence"], flush=True)
    for fitted in fitted_engines(RESULTS_DIR / "gpu_check.json"):  # a real GPU's constants, when gpu_check.py has run
        report.setdefault("fitted", {})[fitted.name] = conditions(fitted, s, engines[:1], {"L/6": L / 6}, learning, args.steps, rows)
    report["cpu_check"] = cpu_check(study) if study and not args.quick else None
    if report["cpu_check"]:
        for arm, c in report["cpu_check"]["arms"].items():
            print(f"cpu check {arm}: " + ", ".join(f"{p} {e:+.1%}" for p, e in c["relative_error"].items()), flush=True)
    path = write_json(args.out or "gpu_projection.json", report)
    print(markdown(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
