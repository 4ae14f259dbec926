"""Mutation check: each mutation below is a plausible bug that the test suite must catch.

    .venv/bin/python tests/mutations.py            # all mutations (about 5 minutes on 2 cores)
    .venv/bin/python tests/mutations.py --list     # what they are
    .venv/bin/python tests/mutations.py whiten-set # one by name

Each mutation is applied to a copy of ``tppo/`` (and ``tests/``) in a temporary
directory, and the algorithm, rollout and trainer tests run there against that copy. A mutation the tests do not fail on is "survived": the script prints it
and exits 1. Not part of ``make test`` (it reruns the suite once per mutation); run it
after changing the trainer or its tests (``make mutants``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_trainer.py", "tests/test_algos.py", "tests/test_rollout.py", "tests/test_prefix.py"]


@dataclasses.dataclass
class Mutation:
    name: str
    file: str
    old: str
    new: str
    why: str


MUTATIONS = [
    Mutation("no-temperature", "tppo/algos.py", "logits = logits / temperature", "logits = logits",
             "the update's log-probs ignore the sampling temperature"),
    Mutation("whiten-set", "tppo/trainer.py", "adv = algos.masked_whiten(adv, policy_mask,", "adv = algos.masked_whiten(adv, response_mask,",
             "advantages whitened over every response token instead of this window's"),
    Mutation("lambda-estimate", "tppo/trainer.py",
             "lengths = torch.where(packed.finished, lengths, lengths + W / 2)",
             "lengths = lengths + W / 2",
             "the adaptive lambda's W/2 length estimate applied to finished rows too"),
    Mutation("old-values-shift", "tppo/trainer.py", "old_logprobs, values_full[:, :-1], adv, returns,",
             "old_logprobs, values_full[:, 1:], adv, returns,", "v_old of the value clip shifted by one token"),
    Mutation("no-window-ignore", "tppo/trainer.py", "return torch.where(tail, torch.zeros_like(adv), adv)", "return adv",
             "window_ignore_tokens has no effect"),
    Mutation("no-kl-term", "tppo/trainer.py", "loss = loss + a.kl_coef * kl_term", "loss = loss",
             "kl_coef logs the KL but does not change the gradient"),
    Mutation("seq-mean-local-rows", "tppo/trainer.py", 'return {"num_seqs": distributed.sum_int(int(mask.any(1).sum()))}',
             'return {"num_seqs": None}', "seq-mean losses divide by each micro-batch's rows"),
    Mutation("prefix-with-grad", "tppo/prefix.py", "with torch.no_grad():  # only the cache", "if True:  # only the cache",
             "prefix_grad=false still back-propagates through the earlier windows"),
    Mutation("span-positions-from-0", "tppo/prefix.py", "starts.unsqueeze(1) + torch.arange(T, device=dev), 0)",
             "torch.arange(T, device=dev).expand(len(starts), T), 0)", "the span's tokens get positions from 0, not their own"),
]


def run(mutation: Mutation | None, keep_output: bool) -> bool:
    """True when the tests fail on the mutated code (the mutation is caught); ``None``
    runs the unmutated copy (the baseline, which must pass)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name if mutation else 'baseline'}-") as tmp:
        for part in ("tppo", "tests"):
            shutil.copytree(ROOT / part, Path(tmp) / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp)  # pytest's settings and markers
        if mutation is not None:
            target = Path(tmp) / mutation.file
            text = target.read_text()
            if text.count(mutation.old) != 1:
                raise SystemExit(f"{mutation.name}: '{mutation.old}' occurs {text.count(mutation.old)} times in {mutation.file}; "
                                 f"update the mutation to the current code")
            target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
        where = subprocess.run([sys.executable, "-c", "import tppo; print(tppo.__file__)"], env=env, cwd=tmp,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(tmp):
            raise SystemExit(f"the mutated copy is not the one imported ({where}); is tppo installed non-editable?")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS], env=env, cwd=tmp,
                              capture_output=True, text=True)
        if keep_output:
            print(proc.stdout[-3000:])
        return proc.returncode != 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show the tail of each pytest run")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:22} {m.why}")
        return 0 if args.list else 2
    if run(None, args.verbose):  # a failing baseline would make every mutation look caught
        print("the unmutated tests fail: fix them first (pytest -x -q " + " ".join(TESTS) + ")")
        return 2
    print("baseline: the unmutated tests pass", flush=True)
    survived = []
    for m in chosen:
        caught = run(m, args.verbose)
        print(f"{'caught  ' if caught else 'SURVIVED'} {m.name:22} {m.why}", flush=True)
        survived += [] if caught else [m.name]
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
