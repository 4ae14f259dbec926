"""The embedded synthetic task: chain subtraction, a reasoning chain with a long tail.

A problem is ``n-d:`` (``n`` up to a few hundred, ``d`` a digit); its solution is the
chain of repeated subtractions written out, ending in the remainder::

    prompt:    "47-9:"
    response:  "38 29 20 11 2=2"        (then EOS)

Why it has the properties T-PPO needs:

* **Verifiable**: the answer is ``n mod d``; the reward is an exact match of the text
  after the last ``=``.
* **A chain whose length is the problem's size**: ``k = n // d`` steps, each a small
  local computation (subtract a digit from the previous number), so a response's length
  in tokens is ~ ``k * (digits + 1)`` and one wrong step spoils the answer: long
  problems are hard, short ones easy, as for chain-of-thought reasoning.
* **A controllable long tail**: ``k`` is drawn from a discretised log-normal with
  median ``median_steps`` and shape ``sigma``, clipped to ``[min_steps, max_steps]``;
  then ``d`` uniformly and ``n = k * d + r`` with ``r < d``. ``sigma = 0`` gives (near)
  uniform short lengths, ``sigma >= 1`` a tail with max/median >= 8.
* **Learnable by a 1M-parameter model in minutes**: each step only needs the previous
  number and ``d`` (no pointer into a long prompt).
* **A room for RL to improve**: SFT traces may carry injected mistakes (a step off by
  +-1, after which the chain continues consistently from the wrong value), so the SFT
  model makes step errors at a known rate that RL then drives down.

Splits: a problem ``(n, d)`` is held out iff a hash of it falls below
``heldout_fraction``; training streams skip held-out problems and evaluation draws only
from them, so the two never overlap.

Measured statistics of the default spec (``median_steps=6, sigma=0.9, max_steps=60``;
``python -m tppo.tasks.chain`` prints them; 20,000 training samples, seed 0): response
length in tokens (EOS included) mean 27.6, median 18, p90 59, p99 172, max 230;
max/median 12.8.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterator

from tppo.config import ChainConfig
from tppo.tasks.base import Example


def is_heldout(n: int, d: int, fraction: float) -> bool:
    """Deterministic split of the problem space (independent of seeds and samplers)."""
    h = int.from_bytes(hashlib.blake2b(f"{n}-{d}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def prompt_text(n: int, d: int) -> str:
    return f"{n}-{d}:"


def solution_text(n: int, d: int, rng: random.Random | None = None, mistake_rate: float = 0.0) -> str:
    """The worked chain ``v1 v2 ... vk=r``; with ``mistake_rate`` each step is off by
    +-1 with that probability (the chain continues from the wrong value)."""
    values, v = [], n
    while v >= d:
        v -= d
        if mistake_rate and rng is not None and rng.random() < mistake_rate:
            v = max(0, v + rng.choice((-1, 1)))
        values.append(v)
    if not values:  # n < d cannot happen for k >= 1; kept for completeness
        return f"={n}"
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

    def sample_problem(self, rng: random.Random, split: str) -> tuple[int, int]:
        """One (n, d) of the split ('train' or 'heldout'), by rejection on the hash split."""
        if split not in ("train", "heldout"):
            raise ValueError(f"chain task: unknown split {split!r}; expected 'train' or 'heldout'")
        want_heldout = split == "heldout"
        while True:
            k = self.sample_steps(rng)
            d = rng.randint(self.spec.min_divisor, self.spec.max_divisor)
            n = k * d + rng.randrange(d)
            if is_heldout(n, d, self.spec.heldout_fraction) == want_heldout:
                return n, d

    def example(self, n: int, d: int) -> Example:
        return Example(prompt=prompt_text(n, d), answer=str(n % d), meta={"n": n, "d": d, "steps": n // d})

    def stream(self, split: str, seed: int) -> Iterator[Example]:
        """An endless, seeded stream of examples of one split."""
        rng = random.Random(f"{self.name}:{split}:{seed}")
        while True:
            yield self.example(*self.sample_problem(rng, split))

    def sft_example(self, rng: random.Random, mistake_rate: float = 0.0) -> tuple[str, str]:
        """(prompt, response) of a training problem, for supervised warm-start."""
        n, d = self.sample_problem(rng, "train")
        return prompt_text(n, d), solution_text(n, d, rng, mistake_rate)


def _print_stats(samples: int = 20000, seed: int = 0) -> None:
    task, rng = ChainTask(), random.Random(seed)
    lengths = sorted(len(solution_text(*task.sample_problem(rng, "train"))) + 1 for _ in range(samples))  # +1: EOS
    q = lambda p: lengths[min(len(lengths) - 1, int(p * len(lengths)))]  # noqa: E731
    med = q(0.5)
    print(f"response length in tokens over {samples} samples (seed {seed}): mean {sum(lengths) / len(lengths):.1f}, "
          f"median {med}, p90 {q(0.9)}, p99 {q(0.99)}, max {lengths[-1]}; max/median {lengths[-1] / med:.1f}")


if __name__ == "__main__":
    _print_stats()
