"""A project-generated task for real pretrained models: one-step arithmetic word problems.

    prompt:  "Maria has 7 marbles and gets 3 more. How many marbles does Maria have now?"
    answer:  "10"                (scored with math-verify: "\\boxed{10}", "#### 10", "10 marbles")

Why it exists: a small pretrained chat model (SmolLM2-135M-Instruct) answers 0 of 8 GSM8K
problems, so RL on GSM8K cannot be shown on a CPU; on these problems it starts between
10 % and 60 % (sampled at temperature 0.7: ~25 % on additions of one-digit numbers, more at
lower temperatures), which leaves RL room to raise it within an hour on 2 cores
(benchmarks/real_model.py). Like the chain task, the problem space is split by a hash
of the question into training and held-out problems, and evaluation uses distinct
held-out questions. The split is by question, not by arithmetic fact: with one-digit
operands there are only 64 additions, so a held-out question's sum also appears in
training under other names and items. What RL teaches here is mostly the answer's form
(short, boxed, no rambling), which the held-out questions measure; benchmarks/RESULTS.md
also reports operands outside the training range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Iterator

from tppo.config import ArithConfig
from tppo.tasks.base import Example, first_distinct, problem_stream

NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Chen", "Ava", "Noah")
ITEMS = ("apples", "pencils", "cards", "marbles", "books", "stickers", "shells", "coins")
# (operation, question template, answer): {n} name, {a}, {b} operands, {it} items.
TEMPLATES = {
    "add": ("{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?", lambda a, b: a + b),
    "sub": ("{n} has {a} {it} and gives away {b}. How many {it} does {n} have left?", lambda a, b: a - b),
    "mul": ("{n} has {a} boxes with {b} {it} in each box. How many {it} does {n} have?", lambda a, b: a * b),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    op: str
    name: str
    item: str
    a: int
    b: int

    @property
    def text(self) -> str:
        return TEMPLATES[self.op][0].format(n=self.name, it=self.item, a=self.a, b=self.b)

    @property
    def answer(self) -> int:
        return TEMPLATES[self.op][1](self.a, self.b)


def is_heldout(problem: Problem, fraction: float) -> bool:
    """Deterministic split of the problem space by a hash of the question."""
    return int.from_bytes(hashlib.blake2b(problem.text.encode(), digest_size=8).digest(), "big") / 2**64 < fraction


class ArithTask:
    """Sampler of arithmetic word problems (see module docstring)."""

    name = "arith"

    def __init__(self, spec: ArithConfig | None = None) -> None:
        self.spec = spec or ArithConfig()

    def sample_problem(self, rng: random.Random, split: str) -> Problem:
        """One problem of the split ('train' or 'heldout'), by rejection on the hash split.
        Subtractions never go below zero."""
        if split not in ("train", "heldout"):
            raise ValueError(f"arith task: unknown split {split!r}; expected 'train' or 'heldout'")
        s = self.spec
        while True:
            a, b = rng.randint(s.min_operand, s.max_operand), rng.randint(s.min_operand, s.max_operand)
            op = rng.choice(s.ops)
            if op == "sub" and b > a:
                a, b = b, a
            problem = Problem(op, rng.choice(NAMES), rng.choice(ITEMS), a, b)
            if is_heldout(problem, s.heldout_fraction) == (split == "heldout"):
                return problem

    def stream(self, split: str, seed: int) -> Iterator[Example]:
        """An endless, seeded stream of examples of one split."""
        return problem_stream(self, split, seed)

    def distinct(self, split: str, seed: int, count: int) -> list[Example]:
        """The first ``count`` distinct problems of a split's stream (an evaluation set)."""
        return first_distinct(self.stream(split, seed), count)

    @staticmethod
    def example(problem: Problem) -> Example:
        return Example(prompt=problem.text, answer=str(problem.answer), meta={"op": problem.op, "a": problem.a, "b": problem.b})
