"""Truncated backpropagation through the context (``algo.prefix_grad: false``, tppo/prefix.py):
the span forward gives the full forward's log-probs, and its gradient is a naive
row-by-row reference's (the prefix under no_grad into a KV cache, the span with grad)."""

from __future__ import annotations

import pytest
import torch

from tppo.models import build_tiny, cache_argument
from tppo.prefix import prefix_width, _span_positions, _split, span_logprobs, span_starts
from tppo.updates import token_logprobs

B, S = 5, 30
LENGTHS = [30, 22, 17, 25, 12]
# per row: (first response column, first window column, end of window) in the shifted frame
LAYOUT = [(10, 20, 29), (5, 5, 21), (4, 10, 16), (3, 3, 24), (6, 8, 11)]


def batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    attn = (torch.arange(S) < lengths[:, None]).long()
    ids = torch.randint(3, 20, (B, S), generator=g) * attn
    window = torch.zeros(B, S - 1, dtype=torch.bool)
    response = torch.zeros(B, S - 1, dtype=torch.bool)
    for r, (resp, win, end) in enumerate(LAYOUT):
        window[r, win:end] = True
        response[r, resp:end] = True
    return ids, attn, window, response


def test_span_starts_by_hand():
    _, _, window, response = batch()
    # rows 1 and 3 are in their first window (no response token before it): the whole row
    assert span_starts(response, window).tolist() == [20, 0, 10, 0, 8]
    lm = torch.zeros_like(window)
    lm[0, 10:29] = True  # row 0 finished correct: its LM loss covers the whole response
    assert span_starts(response, window, lm).tolist() == [0, 0, 10, 0, 8]
    none = torch.zeros_like(window)
    # no loss token: the row's own last response column (end - 1), not the batch's last
    assert span_starts(response, none).tolist() == [end - 1 for _, _, end in LAYOUT]


def test_a_row_without_loss_tokens_shorter_than_its_micro_batch_runs():
    """A partial rollout's unfinished row has no loss token; shorter than the longest row it
    crashed the split (RuntimeError: expanded size). The other rows' log-probs are the
    full forward's, and so with every prefix padded to a wider common width."""
    model, _ = build_tiny(seed=0)
    ids, attn, window, response = batch()
    window[4] = False  # row 4 (12 tokens of 30) trains on nothing
    full_lp, _ = token_logprobs(model, ids, attn, 0.7)
    for width in (0, prefix_width(response, window), 25):
        lp, _ = span_logprobs(model, ids, attn, span_starts(response, window), 0.7, prefix_width=width)
        torch.testing.assert_close(lp[window], full_lp[window], atol=2e-6, rtol=1e-5)
    assert prefix_width(response, window) == 20 and prefix_width(response, torch.zeros_like(window)) == 0


@pytest.mark.parametrize("entropy", ["metric", "grad"])
def test_span_logprobs_equal_the_full_forward(entropy):
    model, _ = build_tiny(seed=0)
    ids, attn, window, response = batch()
    full_lp, full_ent = token_logprobs(model, ids, attn, 0.7, entropy)
    lm = torch.zeros_like(window)
    lm[2, 4:16] = True  # row 2 finished correct: LM-loss columns before its window
    used = window | lm
    cases = [(span_starts(response, window), {}, window), (torch.zeros(B, dtype=torch.long), {}, used),
             (span_starts(response, window, lm), {"columns": used}, used),  # the projection limited to the used columns
             (torch.zeros(B, dtype=torch.long), {"always_split": True}, used)]  # a one-column all-padding prefix
    for starts, kw, check in cases:
        lp, ent = span_logprobs(model, ids, attn, starts, 0.7, entropy, **kw)
        torch.testing.assert_close(lp[check], full_lp[check], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(ent[check], full_ent[check], atol=2e-6, rtol=1e-5)
        assert (lp == 0)[torch.arange(S - 1)[None] < starts[:, None]].all()  # nothing before the span


def test_split_layout_by_hand():
    """Row 0 (length 30) splits at 20, row 1 (length 22) at 0: the prefix is left-padded
    to 20 columns, the span right-padded to 22; padding sits at position 0, so no position
    exceeds a row's own last one."""
    ids, attn, _, _ = batch()
    (pre_ids, pre_mask, pre_pos), (span_ids, span_mask, span_pos) = _split(ids[:2], attn[:2], torch.tensor([20, 0]))
    assert pre_ids.shape == (2, 20) and span_ids.shape == (2, 22)
    assert torch.equal(pre_ids[0], ids[0, :20]) and pre_mask[1].sum() == 0 and (pre_pos[1] == 0).all()
    assert pre_pos[0].tolist() == list(range(20))
    assert torch.equal(span_ids[0, :10], ids[0, 20:30]) and span_mask[0].sum() == 10 and span_mask[1].sum() == 22
    assert span_pos[0].tolist() == list(range(20, 30)) + [0] * 12 and span_pos[1].tolist() == list(range(22))
    wide = _split(ids[1:2], attn[1:2], torch.tensor([0]), min_prefix=1)[0]
    assert wide[0].shape == (1, 1) and wide[1].sum() == 0


def test_projected_span_positions_by_hand():
    """Row 0's span starts at column 3 and uses columns 4-5, row 1's at 0 and uses 1: span
    positions 1 and 2 (of 0..4) are projected, nothing else."""
    used = torch.zeros(2, 8, dtype=torch.bool)
    used[0, 4:6] = True
    used[1, 1] = True
    assert _span_positions(used, torch.tensor([3, 0]), T=6).tolist() == [1, 2]
    assert _span_positions(torch.zeros(2, 8, dtype=torch.bool), torch.tensor([3, 0]), T=6).tolist() == [0]  # none: one
    assert _span_positions(None, torch.tensor([3, 0]), T=6) is None


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _reference_row_logprobs(model, ids_row, n: int, g: int) -> torch.Tensor:
    """One row, no padding: tokens [0, g) under no_grad into a cache, [g, n) with grad;
    the (n - 1 - g) log-probs of tokens g + 1 .. n - 1."""
    name = cache_argument(model)
    if g == 0:
        logits = model(input_ids=ids_row[None, :n]).logits
    else:
        with torch.no_grad():
            cache = getattr(model(input_ids=ids_row[None, :g], use_cache=True), name)
        logits = model(input_ids=ids_row[None, g:n], use_cache=True, **{name: cache}).logits
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, ids_row[g + 1 : n, None]).squeeze(1)


def test_span_gradient_is_the_row_by_row_reference_and_differs_from_the_exact_one():
    model, _ = build_tiny(seed=0)
    ids, attn, window, response = batch()
    weights = torch.randn(B, S - 1, generator=torch.Generator().manual_seed(1))
    starts = span_starts(response, window)
    lp, _ = span_logprobs(model, ids, attn, starts, 1.0)
    batched = _grads(model, (lp * weights * window).sum())
    reference = 0.0
    for r in range(B):
        g, n = int(starts[r]), LENGTHS[r]
        row_lp = _reference_row_logprobs(model, ids[r], n, g)
        cols = torch.arange(g, n - 1)
        reference = reference + (row_lp * weights[r, cols] * window[r, cols]).sum()
    expected = _grads(model, reference)
    assert batched.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(batched[k], expected[k], atol=1e-5, rtol=1e-4)
    exact_lp, _ = token_logprobs(model, ids, attn, 1.0)
    exact = _grads(model, (exact_lp * weights * window).sum())
    assert any(not torch.allclose(exact[k], batched[k], atol=1e-5, rtol=1e-4) for k in exact), "the prefix's gradient was dropped"
    whole, _ = span_logprobs(model, ids, attn, torch.zeros(B, dtype=torch.long), 1.0)
    for k, v in _grads(model, (whole * weights * window).sum()).items():  # no prefix anywhere: the exact gradient
        torch.testing.assert_close(v, exact[k], atol=1e-5, rtol=1e-4)
