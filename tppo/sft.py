"""Supervised warm-start of the embedded tiny model on the chain task's traces.

RL needs a policy that is right sometimes. The tiny model is trained on worked chains
(``tppo.tasks.chain``) in which each step is off by one with probability
``sft.mistake_rate``: it learns the format and the arithmetic, and makes step errors at
about that rate, which RL then drives down. Loss: next-token NLL on the response and
its EOS (the prompt is context only). Saved with ``save_pretrained``.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from tppo import algos
from tppo.config import Config
from tppo.models import build_tiny, save_pretrained
from tppo.tasks import ChainTask


def sft_batch(task: ChainTask, tokenizer, rng: random.Random, size: int, mistake_rate: float, chunks: int = 4):
    """``size`` traces as ``chunks`` length-sorted pieces, each right padded to its own
    longest trace (the long tail would otherwise pad every row to the longest).

    Each piece is (input_ids, attention_mask, loss_mask); the loss mask (shifted frame,
    (b, S - 1)) is 1 on response tokens and the EOS.
    """
    traces = []
    for _ in range(size):
        prompt, response = task.sft_example(rng, mistake_rate)
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        traces.append((p + r, len(p)))
    traces.sort(key=lambda t: len(t[0]))
    step = -(-size // chunks)
    return [_pad(traces[i : i + step], tokenizer.pad_token_id) for i in range(0, size, step)]


def _pad(traces, pad_id: int):
    S = max(len(seq) for seq, _ in traces)
    ids = torch.full((len(traces), S), pad_id, dtype=torch.long)
    attn = torch.zeros(len(traces), S, dtype=torch.long)
    loss_mask = torch.zeros(len(traces), S - 1, dtype=torch.bool)
    for i, (seq, p) in enumerate(traces):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        loss_mask[i, p - 1 : len(seq) - 1] = True  # column j predicts token j + 1
    return ids, attn, loss_mask


def run_sft(cfg: Config, log_every: int = 50) -> Path:
    """Train the embedded model on chain traces and save it to ``cfg.sft.output_dir``."""
    s = cfg.sft
    model, tokenizer = build_tiny(cfg.model.tiny, seed=s.seed)
    task = ChainTask(cfg.task.chain)
    rng = random.Random(f"sft:{s.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, s.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / s.steps))))
    model.train()
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        pieces = sft_batch(task, tokenizer, rng, s.batch_size, s.mistake_rate)
        n_tokens = sum(int(mask.sum()) for _, _, mask in pieces)  # one denominator for the whole batch
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for ids, attn, mask in pieces:
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            piece_loss = algos.lm_loss(algos.logprobs_from_logits(logits, ids[:, 1:]), mask, num_tokens=n_tokens)
            piece_loss.backward()
            loss += float(piece_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == s.steps:
            print(f"sft step {step:>5}/{s.steps} | loss {loss:.4f} | {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(s.output_dir)
    save_pretrained(model.eval(), tokenizer, out)
    return out
