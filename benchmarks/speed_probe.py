"""The machine's speed, measured beside a run (#20 D): a fixed reference workload timed
after every training step, so the cost model can tell the counts' error from the machine's.

On a shared 2-core VM the same work ran up to 8 % slower or 18 % faster from one run to the next
(the study at 200348b: each run's common factor over its phases had an SD of 7.8 %; with it
removed every phase's share was predicted within 7.5 %). Counts cannot predict that factor;
a clock can measure it. The probe is the same computation in every run of every arm: a
frozen copy of the policy at the start of the job (the warm-start's weights, the same for
every arm: its cost does not depend on training), on token ids drawn once from a generator
of its own (the training's random streams are untouched), timed in two parts:

    probe/decode_s  ``decode_calls`` no-grad forwards of a (rows, 1) batch: small matmuls
                    and per-call overhead, what a decode step is made of
    probe/dense_s   one forward and backward over a (rows, tokens) batch: what the value,
                    log-prob and update passes are made of

It costs about 75 ms a step (the study at 94e5e2e: 4 % beside its training time, whose
timers it is outside of). benchmarks/cost_model.py divides each step's seconds by its probe before
fitting and multiplies them back when predicting (``SPEED``).
"""

from __future__ import annotations

import copy
import time

import torch


class SpeedProbe:
    """``probe()`` -> {"probe/decode_s": s, "probe/dense_s": s}, timed now."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, seed: int = 0, decode_rows: int = 64, decode_calls: int = 8,
                 dense_rows: int = 4, dense_tokens: int = 128):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)  # a LoRA policy freezes its base: the probe's backward still runs every matmul's
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        self.decode_ids = torch.randint(vocab_size, (decode_rows, 1), generator=g).to(device)
        self.dense_ids = torch.randint(vocab_size, (dense_rows, dense_tokens), generator=g).to(device)
        self.decode_calls = decode_calls

    def __call__(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(self.decode_calls):
                self.model(input_ids=self.decode_ids)
        t1 = time.perf_counter()
        self.model(input_ids=self.dense_ids).logits.float().mean().backward()
        self.model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return {"probe/decode_s": t1 - t0, "probe/dense_s": t2 - t1}
