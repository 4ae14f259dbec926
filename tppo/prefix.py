"""Truncated backpropagation through the context: ``algo.prefix_grad: false``.

A T-PPO row carried over k windows holds the prompt, k - 1 earlier windows and this
window. The exact policy update back-propagates through all of it, because this
window's log-probs depend on the parameters through the prefix's keys and values. With
``prefix_grad: false`` the prefix runs forward once without gradient (no activations
kept: about a third of a forward-backward's cost and none of its memory), its KV cache
is detached, and only the row's own span, from its first token that carries a loss
term to its end, runs with gradient. The log-probs are the same as the exact forward's
(same numerics up to float rounding); the gradient drops the terms that flow through
the prefix's keys and values. That is an approximation, off by default: measured in
benchmarks/RESULTS.md ("PPO vs T-PPO").

Layout: every row's span starts at its own column ``g_r``, so the prefixes are
left-padded to a common width P and the spans right-padded to a common width T, as
``generate`` lays out a left-padded batch: positions stay the row's own (``g_r + t``)
and the attention mask is the prefix's mask followed by the span's.
"""

from __future__ import annotations

import torch

from tppo import algos
from tppo.models import accepts_logits_to_keep, cache_argument


def span_starts(response_mask: torch.Tensor, *loss_masks: torch.Tensor) -> torch.Tensor:
    """(B,) where each row's differentiable span begins, in the shifted frame.

    That is the row's first column set in any of the (B, S - 1) ``loss_masks``: the
    position whose logits predict its first token with a loss term. When no response
    token comes before it (a row in its first window, or a finished correct row whose
    LM loss covers its whole response), the span is the whole row (0): only tokens of
    earlier windows make a prefix, so such rows get the exact gradient, prompt included.
    A row with no loss token starts at its own last response column (a row shorter than
    its micro-batch included).
    """
    used = torch.stack(loss_masks).any(0)
    cols = torch.arange(used.shape[1], device=used.device)
    last = torch.where(response_mask, cols, 0).max(1).values
    first = torch.where(used.any(1), used.int().argmax(1), last)
    earlier = (response_mask & (torch.arange(used.shape[1], device=used.device) < first.unsqueeze(1))).any(1)
    return torch.where(earlier, first, torch.zeros_like(first))


def prefix_width(response_mask: torch.Tensor, *loss_masks: torch.Tensor) -> int:
    """The widest prefix of a step's rows (the largest :func:`span_starts`), over the whole
    (B, S - 1) step: the ``prefix_width`` every micro-batch of the step is padded to."""
    rows = torch.stack(loss_masks).any(0).any(1)
    return int(span_starts(response_mask[rows], *(m[rows] for m in loss_masks)).max()) if rows.any() else 0


def split_widths(attention_mask: torch.Tensor, starts: torch.Tensor, min_prefix: int = 0) -> tuple[int, int]:
    """(P, T): the widths of a micro-batch's left-padded prefixes and right-padded spans."""
    return max(int(starts.max()), min_prefix), int((attention_mask.sum(1) - starts).max())


def _split(input_ids, attention_mask, starts, min_prefix: int = 0):
    """The left-padded prefixes (ids, mask, positions) of tokens [0, g_r) and the
    right-padded spans (ids, mask, positions) of tokens [g_r, n_r), per row; the prefix
    at least ``min_prefix`` columns wide (padding). Padding gets position 0, so no
    position exceeds the row's own length (dynamic RoPE scaling reads the largest)."""
    B = input_ids.shape[0]
    lengths = attention_mask.sum(1)
    P, T = split_widths(attention_mask, starts, min_prefix)
    dev = input_ids.device
    pre_ids = input_ids.new_zeros(B, P)
    pre_mask = attention_mask.new_zeros(B, P)
    span_ids = input_ids.new_zeros(B, T)
    span_mask = attention_mask.new_zeros(B, T)
    for r in range(B):
        g, n = int(starts[r]), int(lengths[r])
        pre_ids[r, P - g :] = input_ids[r, :g]
        pre_mask[r, P - g :] = 1
        span_ids[r, : n - g] = input_ids[r, g:n]
        span_mask[r, : n - g] = 1
    pre_pos = (torch.arange(P, device=dev) - (P - starts).unsqueeze(1)).clamp(min=0)
    span_pos = torch.where(span_mask.bool(), starts.unsqueeze(1) + torch.arange(T, device=dev), 0)
    return (pre_ids, pre_mask, pre_pos), (span_ids, span_mask, span_pos)


def span_logprobs(model, input_ids, attention_mask, starts: torch.Tensor, temperature: float, entropy: str = "none",
                  columns: torch.Tensor | None = None, always_split: bool = False, prefix_width: int = 0):
    """Like ``trainer.token_logprobs``: (B, S - 1) log-probs of tokens 1..S-1 and their
    entropies, but differentiable only through each row's span (columns >= ``starts``);
    the other columns are 0. The prefix [0, g_r) runs under ``no_grad`` into a KV cache.

    ``starts``: (B,) first column of each row's span (:func:`span_starts`); 0 makes the
    whole row differentiable (an empty prefix).
    ``columns``: (B, S - 1) bool, the columns whose log-probs are used: the vocabulary
    projection is limited to the span positions where some row has one (``logits_to_keep``,
    as ``token_logprobs`` does); other columns hold log-probs of no use or 0.
    ``always_split``: run the prefix pass even when no row has a prefix (a sharded model:
    every rank must issue the same forwards, so the same collectives).
    ``prefix_width``: left-pad the prefixes to at least this many columns. Give every
    micro-batch of a step the step's widest start (:func:`prefix_width`): a row's keys
    then sit in the same columns whatever rows share its micro-batch, so the old-log-prob
    pass and the update (which packs rows differently) compute the same numbers in bf16.
    """
    S = input_ids.shape[1]
    (pre_ids, pre_mask, pre_pos), (span_ids, span_mask, span_pos) = _split(input_ids, attention_mask, starts,
                                                                           max(prefix_width, int(always_split)))
    trim = accepts_logits_to_keep(model)
    keep = _span_positions(columns, starts, span_ids.shape[1]) if trim else None
    extra = {} if keep is None else {"logits_to_keep": keep}
    if pre_ids.shape[1] == 0:  # no row has a prefix: the ordinary forward
        logits = model(input_ids=span_ids, attention_mask=span_mask, position_ids=span_pos, **extra).logits
    else:
        name = cache_argument(model)
        with torch.no_grad():  # only the cache is wanted: one position's logits where the model allows
            out = model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True,
                        **({"logits_to_keep": 1} if trim else {}))
        logits = model(input_ids=span_ids, attention_mask=torch.cat([pre_mask, span_mask], 1), position_ids=span_pos,
                       use_cache=True, **{name: getattr(out, name)}, **extra).logits
    if keep is None:
        keep = torch.arange(span_ids.shape[1] - 1, device=span_ids.device)
        logits = logits[:, :-1]
    lp, ent = algos.tempered_logprobs(logits, span_ids[:, keep + 1], temperature, entropy)
    return _to_frame(lp, starts, keep, S - 1), (None if ent is None else _to_frame(ent, starts, keep, S - 1))


def _span_positions(columns: torch.Tensor | None, starts: torch.Tensor, T: int) -> torch.Tensor | None:
    """The span positions t (1-D, ascending, < T - 1) where some row r uses column g_r + t;
    None without ``columns`` (every position)."""
    if columns is None:
        return None
    t = torch.arange(T - 1, device=columns.device)
    cols = (starts.unsqueeze(1) + t).clamp(max=columns.shape[1] - 1)
    used = columns.gather(1, cols) & (starts.unsqueeze(1) + t < columns.shape[1])
    keep = used.any(0).nonzero().squeeze(1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=columns.device)


def _to_frame(x: torch.Tensor, starts: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """(B, K) values of span positions ``positions`` (K,) as (B, width) at columns g_r + t
    (differentiable); positions past the frame land beyond ``width`` and are cut off (a
    shorter row's columns past its end hold values of padding: the loss masks drop them)."""
    cols = starts.unsqueeze(1) + positions.unsqueeze(0)
    return x.new_zeros(x.shape[0], width + int(positions.max()) + 1).scatter(1, cols, x)[:, :width]
