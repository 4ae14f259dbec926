"""Rollout engines: one Protocol (:class:`RolloutEngine`), one output per window
(:class:`WindowBatch`), the embedded engine (:class:`EmbeddedEngine`)."""

from tppo.rollout.base import PackedWindow, PromptItem, RolloutEngine, RolloutStats, Row, WindowBatch, pack_window
from tppo.rollout.embedded import EmbeddedEngine
from tppo.rollout.sampling import sample_tokens

__all__ = [
    "EmbeddedEngine",
    "PackedWindow",
    "PromptItem",
    "RolloutEngine",
    "RolloutStats",
    "Row",
    "WindowBatch",
    "pack_window",
    "sample_tokens",
]
