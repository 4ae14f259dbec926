"""Token sampling with temperature, top-k and top-p, returning the policy's log-probs."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row.

    Args:
        logits: (N, V) next-token logits.
        temperature: > 0 scales the logits; 0 is greedy (argmax).
        top_k: keep the k largest logits (0: off). top_p: keep the smallest set of
            tokens whose probability reaches top_p (1.0: off); the top token is kept.
        generator: the engine's generator, for determinism.

    Returns:
        tokens (N,) long, and logprobs (N,) float32: log-probability of each token
        under the temperature-scaled, *untruncated* distribution, i.e. the policy
        the trainer recomputes and optimises (temperature 0: the unscaled one).
    """
    logits = logits.float()
    scaled = logits if temperature == 0 else logits / temperature
    logp_full = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(_truncate(scaled, top_k, top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _truncate(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / top-p set to -inf (the argmax always survives)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
