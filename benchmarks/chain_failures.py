"""How chain-task policies fail: sampled completions sorted by failure mode, and greedy accuracy.

For each model directory: the first ``--problems`` held-out problems of the demo's
evaluation set (``ChainTask.distinct("heldout", 1234, ...)``), ``--samples`` completions
each at temperature 1, each put in one bin:

    correct        the answer after the last '=' is n - d*k
    arith          some value is not the previous one minus d (with or without a wrong count)
    count          every step right, but not k of them
    copy           k right steps, then a wrong answer after '='
    unfinished     no '=' before the length cap
    malformed      a value that is not a number

and greedy (temperature ~0) avg@1 over ``--greedy-problems`` problems.

    python benchmarks/chain_failures.py runs/sft-chain runs/demo/checkpoints/step-000150/policy
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, write_json  # noqa: E402

from tppo.evaluation import engine_generate_fn, evaluate  # noqa: E402
from tppo.models import load_pretrained  # noqa: E402
from tppo.rewards import RewardScorer  # noqa: E402
from tppo.tasks import ChainTask  # noqa: E402
from tppo.tasks.chain import Chain  # noqa: E402

MODES = ("correct", "arith", "count", "copy", "unfinished", "malformed")


def failure_mode(problem: Chain, completion: str) -> str:
    """The bin of one completion (see the module docstring)."""
    if "=" not in completion:
        return "unfinished"
    body, answer = completion.rsplit("=", 1)
    if answer == str(problem.answer):
        return "correct"
    try:
        values = [int(v) for v in body.split()]
    except ValueError:
        return "malformed"
    if any(b != a - problem.d for a, b in zip([problem.n, *values], values)):
        return "arith"
    return "count" if len(values) != problem.k else "copy"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (save_pretrained)")
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--greedy-problems", type=int, default=256)
    args = ap.parse_args()
    examples = ChainTask().distinct("heldout", 1234, max(args.problems, args.greedy_problems))
    results = {}
    for path in args.models:
        model, tok = load_pretrained(path)
        sampled = engine_generate_fn(model, tok, max_response_tokens=256, temperature=1.0)
        completions = sampled([e.prompt for e in examples[: args.problems]], args.samples)
        modes = collections.Counter(failure_mode(Chain(**e.meta), c) for e, cs in zip(examples, completions) for c in cs)
        total = sum(modes.values())
        greedy = evaluate(examples[: args.greedy_problems], engine_generate_fn(model, tok, max_response_tokens=256, temperature=1e-4),
                          RewardScorer("exact"), samples=1)
        results[path] = {"modes": {m: modes[m] / total for m in MODES}, "greedy_accuracy": greedy.avg_at_k}
        print(path, json.dumps(results[path]))
    out = write_json("chain_failures.json", {"commit": commit(), "machine": machine(), "args": vars(args), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
