"""The rollout contract: what an engine takes, what one window gives the trainer.

A *slot* of the generation batch holds one :class:`Row` (a response in flight). Each
call of :meth:`RolloutEngine.generate_window` fills the free slots with new prompts
(each repeated ``samples_per_prompt`` times, after the carried-over rows), generates
at most ``window_tokens`` new tokens per row, and returns a :class:`WindowBatch`: every
row with its response so far and which of its tokens are this window's. Unfinished
rows stay in the engine and continue next window (T-PPO spec, steps 1, 2 and 8).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Literal, Protocol

import torch

FinishReason = Literal["eos", "length"]


@dataclasses.dataclass
class PromptItem:
    """One prompt from the data stream.

    Attributes:
        prompt_id: stable index of the prompt in the stream (also the group id of its
            ``samples_per_prompt`` rows).
        prompt_ids: token ids of the prompt (chat template already applied).
        meta: task data carried with every row of the prompt (e.g. ``answer``).
        max_response_tokens: optional per-prompt cap below the engine's ``L``
            (benchmarks force long-tailed lengths with it).
    """

    prompt_id: int
    prompt_ids: list[int]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_response_tokens: int | None = None


@dataclasses.dataclass
class Row:
    """A response in flight or just finished; plain lists so it pickles into checkpoints.

    ``response_ids``, ``logprobs`` and ``versions`` always have the same length: token
    ``response_ids[i]`` was sampled with log-probability ``logprobs[i]`` by the policy
    of update count ``versions[i]``.
    """

    uid: int
    prompt_id: int
    sample_idx: int
    prompt_ids: list[int]
    meta: dict[str, Any]
    max_response_tokens: int
    response_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    windows: int = 0
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def copy(self) -> "Row":
        """A copy whose lists can grow without touching this row's."""
        return dataclasses.replace(
            self,
            prompt_ids=list(self.prompt_ids),
            meta=dict(self.meta),
            response_ids=list(self.response_ids),
            logprobs=list(self.logprobs),
            versions=list(self.versions),
        )


@dataclasses.dataclass
class RolloutStats:
    """What one window cost. ``slot_utilization`` = generated tokens / (slots x decode steps);
    ``row_steps`` = decode-batch rows summed over the decode steps, padding included (a
    finished row not yet compacted away still costs its step); ``kv_positions`` = the KV
    cache positions the decode steps' attention reads, summed over rows and steps (what
    makes a decode step over long contexts cost more); ``cache_positions`` = the KV positions
    the decode forwards' attention spans, padding included (the embedded engine's static
    cache is attended over its whole length, whatever the step: benchmarks/static_cache.py);
    ``prefill_calls`` = the prefills (one per window, plus one per in-window join, which
    allocates and copies a cache even for one-token prompts that run no forward);
    ``copy_positions`` = KV-cache positions copied (the embedded engine's compactions and
    joins copy whole rows of its static cache); ``prefill_positions`` = the positions the
    prefill forwards compute, padding included (the embedded engine left-pads a window's
    rows to the widest context: a short new prompt beside a long carried row costs the
    long row's width; an engine without padding counts its prefill tokens)."""

    slots: int
    decode_steps: int
    generated_tokens: int
    prefill_tokens: int
    prefill_s: float
    decode_s: float
    row_steps: int = 0
    kv_positions: int = 0
    cache_positions: int = 0
    prefill_calls: int = 0
    copy_positions: int = 0
    prefill_positions: int = 0

    @property
    def slot_utilization(self) -> float:
        return self.generated_tokens / max(1, self.slots * self.decode_steps)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(1e-9, self.prefill_s + self.decode_s)


@dataclasses.dataclass
class WindowBatch:
    """One window's output, the only contract between an engine and the trainer.

    A returned batch is never modified by later windows (carried rows continue as
    copies), so the trainer may keep it while the next window is generated.

    Per row ``i`` (B rows, the order of the generation batch: carried rows first):

    * ``rows[i].prompt_ids`` (P_i,), ``rows[i].response_ids`` (R_i,): the response *so
      far*, all windows; ``rows[i].logprobs`` / ``rows[i].versions`` (R_i,) align with it.
    * ``window_start[i]``: index into the response where this window's tokens begin, so
      this window's tokens are ``response_ids[window_start[i]:]`` (possibly empty only
      if the row was admitted with no room left, which the engine never does).
    * ``rows[i].finish_reason``: ``"eos"`` (emitted EOS, which is the last response
      token), ``"length"`` (reached its cap) or None (cut by the window: carried over).
    """

    rows: list[Row]
    window_start: list[int]
    stats: RolloutStats

    @property
    def finished(self) -> list[bool]:
        return [r.finished for r in self.rows]

    def window_tokens(self, i: int) -> list[int]:
        return self.rows[i].response_ids[self.window_start[i] :]

    def pack(self, pad_id: int) -> "PackedWindow":
        return pack_window(self, pad_id)


@dataclasses.dataclass
class PackedWindow:
    """A :class:`WindowBatch` as right-padded tensors, each (B, S) with S = max(P_i + R_i).

    Row i holds ``prompt + response so far`` at positions 0 .. P_i + R_i - 1. A token
    at position p is predicted by the logits at p - 1. Masks are 1 where:
    ``attention_mask`` any real token; ``response_mask`` a response token (all windows);
    ``window_mask`` a token of this window (the policy loss's tokens). ``old_logprobs``
    and ``versions`` hold the sampling log-prob / policy version at response positions
    (0 elsewhere). ``finished`` is (B,) bool, ``response_lengths`` (B,) long,
    ``group_ids`` (B,) long the prompt group of each row (its ``prompt_id``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    window_mask: torch.Tensor
    old_logprobs: torch.Tensor
    versions: torch.Tensor
    finished: torch.Tensor
    response_lengths: torch.Tensor
    group_ids: torch.Tensor


def pack_window(batch: WindowBatch, pad_id: int) -> PackedWindow:
    """Right-pad every row's ``prompt + response`` into the tensors of :class:`PackedWindow`."""
    B = len(batch.rows)
    S = max((len(r.prompt_ids) + len(r.response_ids) for r in batch.rows), default=0)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    masks = {k: torch.zeros(B, S, dtype=torch.bool) for k in ("attention", "response", "window")}
    old_logprobs = torch.zeros(B, S, dtype=torch.float32)
    versions = torch.zeros(B, S, dtype=torch.long)
    for i, (row, start) in enumerate(zip(batch.rows, batch.window_start)):
        P, R = len(row.prompt_ids), len(row.response_ids)
        input_ids[i, : P + R] = torch.tensor(row.prompt_ids + row.response_ids, dtype=torch.long)
        masks["attention"][i, : P + R] = True
        masks["response"][i, P : P + R] = True
        masks["window"][i, P + start : P + R] = True
        old_logprobs[i, P : P + R] = torch.tensor(row.logprobs, dtype=torch.float32)
        versions[i, P : P + R] = torch.tensor(row.versions, dtype=torch.long)
    return PackedWindow(
        input_ids=input_ids,
        attention_mask=masks["attention"],
        response_mask=masks["response"],
        window_mask=masks["window"],
        old_logprobs=old_logprobs,
        versions=versions,
        finished=torch.tensor([r.finished for r in batch.rows], dtype=torch.bool),
        response_lengths=torch.tensor([len(r.response_ids) for r in batch.rows], dtype=torch.long),
        group_ids=torch.tensor([r.prompt_id for r in batch.rows], dtype=torch.long),
    )


class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine (embedded, later vLLM)."""

    def generate_window(self, model: torch.nn.Module, version: int, window_tokens: int | None = None) -> WindowBatch:
        """Fill free slots from the prompt stream, generate one window of at most
        ``window_tokens`` tokens per row (default: the config's W) with ``model`` (whose
        update count is ``version``), keep unfinished rows for the next call."""
        ...

    @property
    def carried(self) -> list[Row]:
        """Unfinished rows waiting for the next window (in slot order)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: carried rows, RNG, counters."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


PromptStream = Iterator[PromptItem]
