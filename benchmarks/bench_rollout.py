"""Rollout engine benchmark: naive padded vs compacted synchronous vs windowed generation.

The same prompts, with the same long-tailed (log-normal) response lengths forced by
per-prompt caps and ``ignore_eos``, are generated three ways on the embedded tiny model:

  (a) naive:    synchronous (W = L), finished rows decode padding until the batch is
                done, like ``model.generate``;
  (b) compact:  synchronous (W = L), finished rows leave the decode batch;
  (c) windowed: T-PPO rollout, W < L, carry-over and refill between windows, and
                optionally refill of freed slots within the window (continuous batching).

Configurations alternate within each repeat so machine drift hits all of them; the
medians are reported. Also measured: the engine's decode tokens/s at full batch against
a plain batched forward loop of the same model (the engine's overhead).

    python benchmarks/bench_rollout.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_rollout.py --quick    # reduced (the test's run), ~20 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, write_json  # noqa: E402

from tppo.config import RolloutConfig  # noqa: E402
from tppo.models import build_tiny  # noqa: E402
from tppo.rollout import EmbeddedEngine, PromptItem  # noqa: E402
from tppo.rollout.embedded import cache_kwarg  # noqa: E402


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma) * median
    return x.round().clamp(1, cap).long().tolist()


def prompts_for(lengths: list[int], prompt_ids: list[int]) -> list[PromptItem]:
    return [PromptItem(i, prompt_ids, max_response_tokens=n) for i, n in enumerate(lengths)]


def run_engine(model, tok, cfg: RolloutConfig, prompts: list[PromptItem]) -> dict:
    """Generate every prompt's response; utilization overall and in steady state (the
    windows before the finite prompt set runs dry: in training the stream never does)."""
    engine = EmbeddedEngine(cfg, prompts, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    totals = {"all": [0, 0], "steady": [0, 0]}  # [generated tokens, slots x decode steps]
    t0 = time.perf_counter()
    windows = 0
    while True:
        wb = engine.generate_window(model, windows)
        if not wb.rows:
            break
        windows += 1
        for key in ("all", "steady") if not engine.exhausted else ("all",):
            totals[key][0] += wb.stats.generated_tokens
            totals[key][1] += wb.stats.slots * wb.stats.decode_steps
    elapsed = time.perf_counter() - t0
    generated = totals["all"][0]
    return {"tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed, "windows": windows,
            "slot_utilization": generated / totals["all"][1],
            "steady_slot_utilization": totals["steady"][0] / max(1, totals["steady"][1])}


@torch.inference_mode()
def plain_decode_tokens_per_s(model, batch: int, steps: int, prompt_len: int) -> float:
    """A bare batched decode loop (static cache, argmax): the floor the engine is held to."""
    ids = torch.full((batch, prompt_len), 5, dtype=torch.long)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps)
    kw = cache_kwarg(model)
    logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1]
    t0 = time.perf_counter()
    for s in range(steps - 1):
        tok = logits.argmax(-1, keepdim=True)
        pos = torch.full((batch, 1), prompt_len + s)
        logits = model(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1]
    return batch * (steps - 1) / (time.perf_counter() - t0)


def engine_decode_tokens_per_s(model, tok, batch: int, steps: int, prompt_ids: list[int]) -> float:
    cfg = RolloutConfig(prompts_per_step=batch, samples_per_prompt=1, window_tokens=steps, max_response_tokens=steps, ignore_eos=True)
    engine = EmbeddedEngine(cfg, prompts_for([steps] * batch, prompt_ids), eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    wb = engine.generate_window(model, 0)
    return wb.stats.generated_tokens / wb.stats.decode_s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (a test runs it: ~20 s)")
    ap.add_argument("--prompts", type=int, default=768)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-response", type=int, default=512, help="L")
    ap.add_argument("--median", type=float, default=40.0, help="median response length")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of response lengths")
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8], help="L / W values for the windowed engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="output JSON: a name in benchmarks/results/ or a path (default: rollout.json, --quick: rollout_quick.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.slots, args.repeats, args.max_response, args.windows = 96, 32, 1, 128, [4]
    torch.manual_seed(0)
    model, tok = build_tiny()
    model.eval()
    prompt_ids = tok("Q: 12+34+56=?\n", add_special_tokens=False).input_ids
    lengths = lognormal_lengths(args.prompts, args.median, args.sigma, args.max_response, seed=0)
    L = args.max_response
    base = dict(prompts_per_step=args.slots, samples_per_prompt=1, max_response_tokens=L, ignore_eos=True)
    configs = {
        "naive": RolloutConfig(window_tokens=L, remove_finished=False, **base),
        "compact": RolloutConfig(window_tokens=L, remove_finished=True, **base),
    }
    for k in args.windows:
        configs[f"windowed_W=L/{k}"] = RolloutConfig(window_tokens=L // k, **base)
        configs[f"windowed+refill_W=L/{k}"] = RolloutConfig(window_tokens=L // k, refill_within_window=True, **base)

    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))  # alternate against drift
        for name in order:
            runs[name].append(run_engine(model, tok, configs[name], prompts_for(lengths, prompt_ids)))
            r = runs[name][-1]
            print(f"rep {rep} {name:>24}: {r['tokens_per_s']:8.0f} tok/s  util {r['slot_utilization']:.3f} "
                  f"(steady {r['steady_slot_utilization']:.3f})  {r['seconds']:.1f} s", flush=True)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "slot_utilization", "steady_slot_utilization", "seconds")} for name, rs in runs.items()}
    windowed = [n for n in med if n.startswith("windowed")]
    best = max(windowed, key=lambda n: med[n]["tokens_per_s"])
    steps = 32 if args.quick else 128
    plain = plain_decode_tokens_per_s(model, args.slots, steps, len(prompt_ids))
    eng = engine_decode_tokens_per_s(model, tok, args.slots, steps, prompt_ids)
    sorted_len = sorted(lengths)
    result = {
        "commit": commit(),
        "machine": machine(),
        "command": "python benchmarks/bench_rollout.py" + (" --quick" if args.quick else ""),
        "setup": {
            "prompts": args.prompts, "slots": args.slots, "max_response_tokens": L, "repeats": args.repeats,
            "length_median": statistics.median(lengths), "length_mean": statistics.fmean(lengths),
            "length_p99": sorted_len[int(0.99 * (len(sorted_len) - 1))], "length_max": max(lengths),
            "tokens_per_config": sum(lengths), "model_parameters": sum(p.numel() for p in model.parameters()),
        },
        "per_config": med,
        "best_window": best,
        "slot_utilization": {"naive": med["naive"]["slot_utilization"], "compact": med["compact"]["slot_utilization"], "windowed": med[best]["slot_utilization"]},
        "steady_slot_utilization": {"windowed": med[best]["steady_slot_utilization"]},
        "tokens_per_s": {"naive": med["naive"]["tokens_per_s"], "compact": med["compact"]["tokens_per_s"], "windowed": med[best]["tokens_per_s"]},
        "ratio_windowed_over_naive": med[best]["tokens_per_s"] / med["naive"]["tokens_per_s"],
        "ratio_windowed_over_compact": med[best]["tokens_per_s"] / med["compact"]["tokens_per_s"],
        # A GPU decode step costs about the same for 1 row as for a full batch, so there
        # time ~ decode steps and the tokens/s ratio ~ the slot-utilization ratio.
        "projected_gpu_ratio_windowed_over_sync": med[best]["slot_utilization"] / med["naive"]["slot_utilization"],
        "engine_overhead": {"engine_decode_tokens_per_s": eng, "plain_forward_tokens_per_s": plain, "engine_over_plain": eng / plain},
    }
    path = write_json(args.out or ("rollout_quick.json" if args.quick else "rollout.json"), result)
    print(f"\nbest windowed config: {best}")
    for k in ("slot_utilization", "tokens_per_s"):
        print(f"{k}: " + ", ".join(f"{n} {v:.3f}" if k == "slot_utilization" else f"{n} {v:.0f}" for n, v in result[k].items()))
    print(f"ratio windowed/naive {result['ratio_windowed_over_naive']:.2f}x, windowed/compact {result['ratio_windowed_over_compact']:.2f}x, "
          f"projected on a GPU (utilization ratio) {result['projected_gpu_ratio_windowed_over_sync']:.2f}x")
    print(f"engine decode at full batch: {eng:.0f} tok/s vs plain forward loop {plain:.0f} tok/s ({eng / plain:.2f})")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
