"""How a mini-batch's rows are split into micro-batches (one forward/backward each).

The loss of every micro-batch is divided by the whole mini-batch's token (or row) count
(``trainer.loss_denominators``), so any split gives the same gradient; the split only
decides the cost. A micro-batch is cut to its longest row (``trainer.trimmed``), so:

* :func:`row_micro_batches` (``train.micro_batch_rows``): consecutive groups of rows; a
  short row sharing a micro-batch with a long one is padded to its length.
* :func:`token_micro_batches` (``train.micro_batch_tokens``): rows sorted by length and
  packed while rows x longest stays within the token budget, so rows of similar length
  share a micro-batch and padding stays small (T-PPO's rows range from a prompt plus one
  window to a prompt plus L tokens).
"""

from __future__ import annotations


def row_micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` rows."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def token_micro_batches(rows: list[int], lengths: list[int], budget: int, max_rows: int) -> list[list[int]]:
    """Rows (``lengths[i]`` tokens for ``rows[i]``) sorted by length, longest first, packed
    greedily: a micro-batch takes the next row while (rows + 1) x its longest row stays
    <= ``budget`` and it has fewer than ``max_rows`` rows. A row longer than the budget
    gets a micro-batch of its own. Deterministic: ties keep the given order."""
    out: list[list[int]] = []
    longest: list[int] = []  # each micro-batch's first row: the longest, as rows come longest first
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * longest[-1] <= budget:
            out[-1].append(rows[i])
        else:
            out.append([rows[i]])
            longest.append(lengths[i])
    return out
