"""What an evaluation's batch size costs: ``log.eval_batch_rows`` on the speed study's evaluation.

An evaluation is synchronous (tppo/evaluation.py: the embedded engine with W = L, finished
rows leaving the batch), so each batch of rows waits for its longest response. The
speed study evaluates 1024 held-out chain problems x 1 sample eight times a run; with
the old fixed 16 problems per batch, evaluations took about half of its wall clock.
This times one evaluation of the study's SFT warm-start at {16, 64, 256, 1024} rows, the
cases interleaved over rounds (one torch thread, the median per case), and records each
case's accuracy with its standard error: the batch changes which samples the engine's one
generator draws, not their distribution (greedy decoding is batch-invariant:
tests/test_tasks.py).

    python benchmarks/eval_batch.py           # results/eval_batch.json, about 5 min
    python benchmarks/eval_batch.py --quick   # tiny SFT, 16 problems (a test runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_trainer, commit, machine, write_json  # noqa: E402
from stats import eval_standard_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def time_evaluation(tr, rows: int) -> tuple[float, float, list[float]]:
    """(seconds, accuracy, per-problem correctness) of one evaluation of ``tr``'s held-out
    set at ``rows`` rows per batch."""
    from tppo.evaluation import evaluate, run_generate_fn

    cfg = dataclasses.replace(tr.cfg, log=dataclasses.replace(tr.cfg.log, eval_batch_rows=rows))
    t0 = time.perf_counter()
    res = evaluate(tr.eval_set, run_generate_fn(cfg, tr.policy, tr.tokenizer, tr.eos_ids, tr.device), tr.scorer, samples=cfg.log.eval_samples)
    return time.perf_counter() - t0, res.avg_at_k, res.correct


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="output JSON (default: results/eval_batch.json; --quick: results/eval_batch_quick.json)")
    args = ap.parse_args(argv)
    from speed_study import ensure_sft

    problems, cases, rounds = (16, (4, 16), 1) if args.quick else (1024, (16, 64, 256, 1024), 2)
    commit_ = commit()  # the code that runs (the tree may be edited while it does)
    sft = ensure_sft(args.quick)
    times: dict[int, list[float]] = {r: [] for r in cases}
    acc: dict[int, list[tuple[float, float]]] = {r: [] for r in cases}
    with benchmark_trainer(DEMO, str(sft), 0, problems, 1, []) as tr:
        for _ in range(rounds):  # interleaved, so drift hits every case
            for rows in cases:
                s, a, correct = time_evaluation(tr, rows)
                times[rows].append(s)
                acc[rows].append((a, eval_standard_error(correct)))
                print(f"{rows:5d} rows: {s:6.1f} s, accuracy {a:.3f}", flush=True)
    med = {r: statistics.median(t) for r, t in times.items()}
    payload = {"commit": commit_, "machine": machine(), "sft": str(sft), "problems": problems, "samples": 1, "rounds": rounds,
               "seconds": {str(r): med[r] for r in cases},
               "speedup_over_fewest_rows": {str(r): med[cases[0]] / med[r] for r in cases},
               "accuracy": {str(r): [{"accuracy": a, "se": se} for a, se in acc[r]] for r in cases}}
    for r in cases:
        print(f"{r:5d} rows: {med[r]:6.1f} s (median), {payload['speedup_over_fewest_rows'][str(r)]:.2f}x the {cases[0]}-row evaluation")
    path = write_json(args.out or ("eval_batch_quick.json" if args.quick else "eval_batch.json"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
