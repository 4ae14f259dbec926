"""The generation batch's bookkeeping, shared by every engine (T-PPO spec, steps 1 and 8).

A :class:`SlotFiller` owns the rows in flight: the carried-over rows, the groups admitted
from the prompt stream but not yet placed, and the stream itself. Engines subclass it
and only generate; filling, carrying over and checkpointing stay in one place, so a
row is never lost or duplicated whichever engine runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

from tppo.config import RolloutConfig
from tppo.rollout.base import PromptItem, RolloutStats, Row, WindowBatch


class SlotFiller:
    def __init__(self, cfg: RolloutConfig, prompts: Iterable[PromptItem]) -> None:
        self.cfg = cfg
        self.prompts: Iterator[PromptItem] = iter(prompts)
        self._carried: list[Row] = []
        self._pending: list[Row] = []  # admitted from the stream, waiting for room in a window
        self._next_uid = 0
        self.exhausted = False

    @property
    def carried(self) -> list[Row]:
        return list(self._carried)

    def state_dict(self) -> dict[str, Any]:
        # Snapshots: the live rows keep growing in the next window.
        return {
            "carried": [dataclasses.asdict(r) for r in self._carried],
            "pending": [dataclasses.asdict(r) for r in self._pending],
            "next_uid": self._next_uid,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._carried = [Row(**d).copy() for d in state["carried"]]
        self._pending = [Row(**d).copy() for d in state.get("pending", [])]
        self._next_uid = state["next_uid"]
        self.exhausted = state["exhausted"]

    def window_of(self, window_tokens: int | None) -> int:
        """This window's W: the one asked for, else the config's (``auto`` needs one)."""
        W = self.cfg.window_tokens if window_tokens is None else window_tokens
        if not isinstance(W, int) or not 1 <= W <= self.cfg.max_response_tokens:
            raise ValueError(f"window of {W!r} tokens: give generate_window an int in [1, {self.cfg.max_response_tokens}] "
                             f"(rollout.window_tokens is {self.cfg.window_tokens!r})")
        return W

    # ------------------------------------------------------------------ step 1: fill

    def _take_rows(self, slots: int, rows: list[Row]) -> list[Row]:
        """Append whole groups of G rows (pending first, then the stream) while they fit in ``slots``."""
        G = self.cfg.samples_per_prompt
        while slots - len(rows) >= G:
            group = self._next_group()
            if group is None:
                break
            rows.extend(group)
        return rows

    def _next_group(self) -> list[Row] | None:
        if self._pending:
            group, self._pending = self._pending[: self.cfg.samples_per_prompt], self._pending[self.cfg.samples_per_prompt :]
            return group
        if self.exhausted:
            return None
        try:
            item = next(self.prompts)
        except StopIteration:
            self.exhausted = True
            return None
        return self._new_rows(item)

    def _new_rows(self, item: PromptItem) -> list[Row]:
        if not item.prompt_ids:
            raise ValueError(f"prompt {item.prompt_id} is empty: every prompt needs at least one token")
        cap = min(item.max_response_tokens or self.cfg.max_response_tokens, self.cfg.max_response_tokens)
        if cap < 1:
            raise ValueError(f"prompt {item.prompt_id}: max_response_tokens must be >= 1 (got {cap})")
        rows = []
        for k in range(self.cfg.samples_per_prompt):
            rows.append(Row(self._next_uid, item.prompt_id, k, list(item.prompt_ids), dict(item.meta), cap))
            self._next_uid += 1
        return rows

    # ------------------------------------------------------------------ step 8: carry over

    def _close_window(self, rows: list[Row], starts: list[int], stats: RolloutStats) -> WindowBatch:
        """Count the window in every row and keep the unfinished ones for the next."""
        for row in rows:
            row.windows += 1
        # Later windows extend copies, so the returned batch stays as it is.
        self._carried = [r.copy() for r in rows if not r.finished]
        return WindowBatch(rows=rows, window_start=starts, stats=stats)

    def _empty_window(self) -> WindowBatch:
        return WindowBatch(rows=[], window_start=[], stats=RolloutStats(self.cfg.num_slots, 0, 0, 0, 0.0, 0.0))
