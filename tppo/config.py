"""Typed configuration: nested dataclasses, the only schema.

Each field is documented once, in its dataclass docstring. Derived sizes are computed
and validated in ``__post_init__``. (YAML loading, dotted CLI overrides and the full
training schema arrive with the trainer; see the trainer issue.)
"""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or inconsistent; the message names the key."""


@dataclasses.dataclass
class RolloutConfig:
    """Generation batch and sampling (T-PPO spec, steps 1-2).

    Attributes:
        prompts_per_step: new prompts admitted per step when every slot is free.
        samples_per_prompt: G, responses per prompt (a group of G slots).
        window_tokens: W, new tokens a row may generate per step. ``W == L`` is
            synchronous PPO: every row finishes inside its one window.
        max_response_tokens: L, a response's total cap; reaching it finishes the row.
        temperature: sampling temperature; log-probs are those of the
            temperature-scaled distribution (the policy the trainer optimises).
            0 means greedy.
        top_p: nucleus sampling mass (1.0 = off). Truncation changes the sampling
            distribution but not the recorded log-probs (as in verl and vLLM).
        top_k: keep the k most likely tokens (0 = off).
        remove_finished: drop rows that finish mid-window from the decode batch so no
            compute is spent on them. False decodes them as padding until the whole
            batch is done, like ``model.generate`` (the naive baseline).
        ignore_eos: never stop on EOS (benchmarks force lengths with per-prompt caps).
        seed: seed of the engine's sampling generator.
    """

    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    window_tokens: int = 64
    max_response_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    remove_finished: bool = True
    ignore_eos: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("prompts_per_step", "samples_per_prompt", "window_tokens", "max_response_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1 (got {getattr(self, key)})")
        if self.window_tokens > self.max_response_tokens:
            raise ConfigError(
                f"rollout.window_tokens ({self.window_tokens}) exceeds rollout.max_response_tokens "
                f"({self.max_response_tokens}); use window_tokens == max_response_tokens for synchronous PPO"
            )
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ConfigError(f"rollout.top_k must be >= 0 (got {self.top_k})")

    @property
    def num_slots(self) -> int:
        """Size of the generation batch: prompts_per_step x samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def max_windows(self) -> int:
        """The most windows a response can span: ceil(L / W)."""
        return -(-self.max_response_tokens // self.window_tokens)
