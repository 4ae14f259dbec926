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
TESTS = ["tests/test_trainer.py", "tests/test_algos.py", "tests/test_algorithms.py", "tests/test_rollout.py", "tests/test_prefix.py",
         "tests/test_egae_bias.py"]


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
    Mutation("whiten-set", "tppo/advantages.py", "adv = algos.masked_whiten(adv, policy_mask,", "adv = algos.masked_whiten(adv, response_mask,",
             "advantages whitened over every response token instead of this window's"),
    Mutation("lambda-estimate", "tppo/advantages.py",
             "lengths = torch.where(packed.finished, lengths, lengths + W / 2)",
             "lengths = lengths + W / 2",
             "the adaptive lambda's W/2 length estimate applied to finished rows too"),
    Mutation("old-values-shift", "tppo/trainer.py", "old_logprobs,\n                          values_full[:, :-1], tg.advantages,",
             "old_logprobs,\n                          values_full[:, 1:], tg.advantages,", "v_old of the value clip shifted by one token"),
    Mutation("no-window-ignore", "tppo/advantages.py", "return torch.where(tail, torch.zeros_like(adv), adv)", "return adv",
             "window_ignore_tokens has no effect"),
    Mutation("no-kl-term", "tppo/updates.py", "loss = loss + a.kl_coef * kl_term", "loss = loss",
             "kl_coef logs the KL but does not change the gradient"),
    Mutation("seq-mean-local-rows", "tppo/updates.py", 'return {"num_seqs": distributed.sum_int(int(mask.any(1).sum()))}',
             'return {"num_seqs": None}', "seq-mean losses divide by each micro-batch's rows"),
    Mutation("prefix-with-grad", "tppo/prefix.py", "with torch.no_grad():  # only the cache", "if True:  # only the cache",
             "prefix_grad=false still back-propagates through the earlier windows"),
    Mutation("span-positions-from-0", "tppo/prefix.py", "starts.unsqueeze(1) + torch.arange(T, device=dev), 0)",
             "torch.arange(T, device=dev).expand(len(starts), T), 0)", "the span's tokens get positions from 0, not their own"),
    Mutation("lm-mask-always", "tppo/advantages.py", "positive_examples(packed, rewards) if a.lm_loss_coef else torch.zeros_like(response_mask)",
             "positive_examples(packed, rewards)", "the LM loss's tokens widen prefix_grad=false's spans when its weight is 0"),
    Mutation("prefix-width-per-micro", "tppo/prefix.py", "max(prefix_width, int(always_split))", "int(always_split)",
             "each micro-batch pads its own prefixes: the old-log-prob pass and the update disagree under bf16"),
    Mutation("auto-trusts-unmeasured-error", "tppo/window.py", "if (not h.cut_token_error or h.steps_since_error >= STALE_STEPS)",
             "if (not h.cut_token_error)", "window auto never refreshes an old truncation-error estimate while held at W = L"),
    # GRPO, partial rollouts, the behaviour policy (#21)
    Mutation("grpo-biased-std", "tppo/algos.py", "/ (n - 1).clamp_min(1)", "/ n", "GRPO's std is the biased one"),
    Mutation("grpo-no-centring", "tppo/algos.py", "centred = scores - mean[inverse]", "centred = scores",
             "GRPO's advantage is the raw score, no group baseline"),
    Mutation("grpo-whitened", "tppo/advantages.py", 'WHITENED = ("gae", "egae")', 'WHITENED = ("gae", "egae", "grpo")',
             "GRPO's group-normalised advantages whitened again over the batch"),
    Mutation("filter-keeps-all", "tppo/algos.py", "return (hi > lo)[inverse]", "return (hi >= lo)[inverse]",
             "filter_groups drops no group"),
    Mutation("partial-trains-window", "tppo/advantages.py", "    if cfg.algo.train_on == \"finished\":\n        return packed.response_mask",
             "    if False:\n        return packed.response_mask", "train_on=finished trains on every window like T-PPO"),
    Mutation("tis-uncapped", "tppo/algos.py", "weights = w.clamp(max=clip)", "weights = w", "TIS's weight is not truncated"),
    Mutation("icepop-keeps-all", "tppo/algos.py", "weights = (~outside).to(w.dtype)", "weights = torch.ones_like(w)",
             "IcePop drops no token"),
    Mutation("weights-ignored", "tppo/algos.py", "loss_mat = loss_mat * weights.detach()", "loss_mat = loss_mat",
             "the behaviour correction's weights never reach the loss"),
    Mutation("one-pass-not-detached", "tppo/updates.py", 'old = lp.detach() if source == "one_pass"', 'old = lp if source == "one_pass"',
             "one-pass pi_old keeps its graph: the ratio is 1 with no gradient"),
    Mutation("mismatch-kl-reversed", "tppo/algos.py", 'kl(behavior_logprobs.float()[m], old_logprobs.float()[m], "k3")',
             'kl(old_logprobs.float()[m], behavior_logprobs.float()[m], "k3")', "mismatch_kl estimates KL(pi_old || mu) from mu's samples"),
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
