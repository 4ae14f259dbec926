"""What a decode step costs in the embedded engine's static KV cache: its width, or the context?
And what a prefill costs: its tokens, or its rows left padded to the widest?

The embedded engine (tppo/rollout/embedded.py) decodes a window in one transformers
``StaticCache`` of width P + horizon (the widest prompt + response so far, plus the
window's planned steps). Its work counters (docs/metrics.md) count both what a decode
forward reads up to its position (``work/kv_positions``, P + s + 1 per entry) and the
cache's whole width (``work/cache_positions``). This benchmark times one decode forward
of the demo's tiny model over 64 rows at cache widths {128, 512, 2048}, each with a short
and a long filled context, side by side in one process (one torch thread, the
median of interleaved repeats), so the cost model knows which of the two it pays for.
Likewise one prefill of 32 rows padded to P = 192 with all 192 or only 48 tokens real,
and into a cache of width P + 64 or P + 576 (``work/prefill_tokens`` against
``work/prefill_positions``: a T-PPO window prefills short new prompts beside long carried rows).

    python benchmarks/static_cache.py           # results/static_cache.json, about 30 s
    python benchmarks/static_cache.py --quick   # tiny, results/static_cache_quick.json (a test runs it)
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

ROOT = Path(__file__).resolve().parent.parent


def decode_forward_s(model, width: int, filled: int, rows: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` single-token decode forwards of ``rows`` rows into a static
    cache of ``width`` positions whose first ``filled`` hold a prefilled context."""
    from tppo.rollout.embedded import cache_kwarg

    cache = {cache_kwarg(model): StaticCache(config=model.config, max_cache_len=width)}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, filled))
    attn = torch.zeros(rows, width, dtype=torch.long)
    attn[:, :filled] = 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn[:, :filled], **cache, use_cache=True,
              position_ids=torch.arange(filled).expand(rows, filled))
        out = []
        for s in range(repeats):  # as the engine's _feed: one token per row at the shared position filled + s
            attn[:, filled + s] = 1
            t0 = time.perf_counter()
            model(input_ids=ids[:, :1], attention_mask=attn[:, : filled + s + 1], **cache, use_cache=True,
                  position_ids=torch.full((rows, 1), filled + s), logits_to_keep=1)
            out.append(time.perf_counter() - t0)
    return out


def prefill_s(model, rows: int, padded: int, real: int, width: int) -> float:
    """Seconds of one prefill of ``rows`` rows left padded to ``padded`` positions, the last
    ``real`` of each a token, into a fresh static cache of ``width`` (the engine's _prefill)."""
    from tppo.rollout.embedded import cache_kwarg

    cache = {cache_kwarg(model): StaticCache(config=model.config, max_cache_len=width)}
    ids = torch.randint(0, model.config.vocab_size, (rows, padded))
    attn = torch.zeros(rows, padded, dtype=torch.long)
    attn[:, padded - real :] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="output JSON (default: results/static_cache.json; --quick: results/static_cache_quick.json)")
    args = ap.parse_args(argv)
    from tppo.config import load_config
    from tppo.models import build_tiny

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    model = build_tiny(cfg.model.tiny)[0].eval()
    widths, rows, repeats, rounds = ((64, 256), 8, 4, 2) if args.quick else ((128, 512, 2048), 64, 16, 5)
    cases = [(w, f) for w in widths for f in (16, w - repeats - 16)]
    times: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    for _ in range(rounds):  # interleaved, so drift hits every case
        for w, f in cases:
            times[(w, f)] += decode_forward_s(model, w, f, rows, repeats)
    P, pre_rows = (48, 8) if args.quick else (192, 32)
    pre_cases = {"all real": (P, P + 64), "a quarter real": (P // 4, P + 64), "all real, wide cache": (P, 4 * P)}
    pre: dict[str, list[float]] = {k: [] for k in pre_cases}
    for _ in range(rounds):
        for k, (real, width) in pre_cases.items():
            pre[k].append(prefill_s(model, pre_rows, P, real, width))
    pre_ms = {k: 1e3 * statistics.median(t) for k, t in pre.items()}
    med = {c: 1e3 * statistics.median(t) for c, t in times.items()}
    ms = {f"width {w}, context {f}": med[(w, f)] for w, f in cases}
    narrow, wide = widths[0], widths[-1]
    payload = {"commit": commit(), "machine": machine(), "rows": rows, "decode_forward_ms": ms,
               "width_ratio_at_short_context": med[(wide, 16)] / med[(narrow, 16)],
               "context_ratio_at_widest": med[(wide, wide - repeats - 16)] / med[(wide, 16)],
               "prefill": {"rows": pre_rows, "padded_to": P, "ms": pre_ms,
                           "quarter_real_over_all_real": pre_ms["a quarter real"] / pre_ms["all real"],
                           "wide_cache_over_narrow": pre_ms["all real, wide cache"] / pre_ms["all real"]}}
    for k, v in ms.items():
        print(f"{k:<28} {v:7.2f} ms")
    print(f"widest / narrowest cache, short context: {payload['width_ratio_at_short_context']:.2f}x; "
          f"full / short context in the widest: {payload['context_ratio_at_widest']:.2f}x")
    pf = payload["prefill"]
    print(f"prefill of {pre_rows} rows padded to {P}: a quarter of the tokens real / all {pf['quarter_real_over_all_real']:.2f}x; "
          f"cache width {4 * P} / {P + 64}: {pf['wide_cache_over_narrow']:.2f}x")
    path = write_json(args.out or ("static_cache_quick.json" if args.quick else "static_cache.json"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
