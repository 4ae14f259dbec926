"""The embedded synthetic task: chain subtraction, a reasoning chain with a long tail.

A problem ``n-d*k:`` asks for ``n - d*k``; its solution writes the ``k`` subtractions
of ``d`` out one at a time, then the answer::

    prompt:    "174-9*6:"
    response:  "165 156 147 138 129 120=120"        (then EOS)

Why it has the properties T-PPO needs:

* **Verifiable**: the answer is ``n - d*k``; the reward is an exact match of the text
  after the last ``=``.
* **A chain whose length is the problem's size**: ``k`` steps of 4 tokens (three digits
  and a space; every value stays in ``[min_end, max_start]``, so three digits by
  default), each a small local computation (subtract a digit from the previous number,
  count the steps), and one wrong step spoils the answer: long problems are hard, short
  ones easy, as for chain-of-thought reasoning.
* **A controllable long tail**: ``k`` is drawn from a discretised log-normal with median
  ``median_steps`` and shape ``sigma``, clipped to ``[min_steps, max_steps]``; then
  ``d`` uniformly in ``[min_divisor, max_divisor]`` and the start ``n`` uniformly in
  ``[d*k + min_end, max_start]``. ``sigma = 0`` gives every problem ``median_steps`` steps, ``sigma >= 1`` a
  tail with max/median >= 8.
* **A large problem space at every length**: the start is independent of the length,
  so every length has thousands of problems (~7,000 at ``k = 1``, ~4,500 at
  ``k = 60``); the held-out split (by hash) has the training distribution, and
  evaluation sets are distinct problems. (The first version, ``n-d:`` answered ``n mod d``, had ~44
  problems per length, so RL learnt frequent training problems and a 256-problem
  evaluation held ~80 distinct ones; see benchmarks/RESULTS.md.)
* **A visible difficulty**: ``k`` is in the prompt, so the critic can learn the value
  of a problem (about ``p**k`` for a per-step success rate ``p``) from its prompt.
* **Room for RL to improve**: SFT traces may carry injected mistakes (a step off by
  +-1, after which the chain continues consistently from the wrong value), so the SFT
  model makes step errors at a known rate that RL then drives down.

Measured statistics of the default spec (``median_steps=6, sigma=0.9, max_steps=60``;
``python -m tppo.tasks.chain`` prints them; 20,000 training samples, seed 0): response
length in tokens (EOS included) mean 39.8, median 28, p90 80, p99 204, max 244;
max/median 8.7.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Iterator

from tppo.config import ChainConfig
from tppo.tasks.base import Example, first_distinct, problem_stream


@dataclasses.dataclass(frozen=True)
class Chain:
    """One problem: start ``n``, step ``d``, ``k`` steps; the answer is ``n - d*k``."""

    n: int
    d: int
    k: int

    @property
    def answer(self) -> int:
        return self.n - self.d * self.k


def is_heldout(problem: Chain, fraction: float) -> bool:
    """Deterministic split of the problem space (independent of seeds and samplers)."""
    key = f"{problem.n}-{problem.d}*{problem.k}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64 < fraction


def prompt_text(problem: Chain) -> str:
    return f"{problem.n}-{problem.d}*{problem.k}:"


def solution_text(problem: Chain, rng: random.Random | None = None, mistake_rate: float = 0.0) -> str:
    """The worked chain ``v1 v2 ... vk=vk``; with ``mistake_rate`` each step is off by
    +-1 with that probability (the chain continues from the wrong value)."""
    values, v = [], problem.n
    for _ in range(problem.k):
        v -= problem.d
        if mistake_rate and rng is not None and rng.random() < mistake_rate:
            v += rng.choice((-1, 1))
        values.append(v)
    return " ".join(map(str, values)) + f"={values[-1]}"


class ChainTask:
    """Sampler of chain-subtraction problems (see module docstring)."""

    name = "chain"

    def __init__(self, spec: ChainConfig | None = None) -> None:
        self.spec = spec or ChainConfig()

    def sample_steps(self, rng: random.Random) -> int:
        s = self.spec
        k = round(s.median_steps * math.exp(rng.gauss(0.0, s.sigma))) if s.sigma > 0 else round(s.median_steps)
        return min(max(k, s.min_steps), s.max_steps)

    def sample_problem(self, rng: random.Random, split: str) -> Chain:
        """One problem of the split ('train' or 'heldout'), by rejection on the hash split."""
        if split not in ("train", "heldout"):
            raise ValueError(f"chain task: unknown split {split!r}; expected 'train' or 'heldout'")
        s, want_heldout = self.spec, split == "heldout"
        while True:
            k = self.sample_steps(rng)
            d = rng.randint(s.min_divisor, s.max_divisor)
            problem = Chain(rng.randint(d * k + s.min_end, s.max_start), d, k)
            if is_heldout(problem, s.heldout_fraction) == want_heldout:
                return problem

    def example(self, problem: Chain) -> Example:
        return Example(prompt=prompt_text(problem), answer=str(problem.answer), meta=dataclasses.asdict(problem))

    def stream(self, split: str, seed: int) -> Iterator[Example]:
        """An endless, seeded stream of examples of one split."""
        return problem_stream(self, split, seed)

    def distinct(self, split: str, seed: int, count: int) -> list[Example]:
        """The first ``count`` distinct problems of a split's stream (an evaluation set)."""
        return first_distinct(self.stream(split, seed), count)

    def sft_example(self, rng: random.Random, mistake_rate: float = 0.0) -> tuple[str, str]:
        """(prompt, response) of a training problem, for supervised warm-start."""
        problem = self.sample_problem(rng, "train")
        return prompt_text(problem), solution_text(problem, rng, mistake_rate)


def _print_stats(samples: int = 20000, seed: int = 0) -> None:
    task, rng = ChainTask(), random.Random(seed)
    lengths = sorted(len(solution_text(task.sample_problem(rng, "train"))) + 1 for _ in range(samples))  # +1: EOS
    q = lambda p: lengths[min(len(lengths) - 1, int(p * len(lengths)))]  # noqa: E731
    med = q(0.5)
    print(f"response length in tokens over {samples} samples (seed {seed}): mean {sum(lengths) / len(lengths):.1f}, "
          f"median {med}, p90 {q(0.9)}, p99 {q(0.99)}, max {lengths[-1]}; max/median {lengths[-1] / med:.1f}")


if __name__ == "__main__":
    _print_stats()
