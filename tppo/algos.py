"""All of tppo's core math, as pure tensor functions.

This module imports only torch and takes tensors and floats, never a config. Every
function documents the shapes it takes and what ``mask == 1`` means. Conventions:

* ``B`` rows, ``T`` token positions. Position ``t`` of a response holds token
  ``y_t``; its *state* is ``s_t = prompt + y_{<t}``, so ``values[:, t] = V(s_t)`` and
  ``logprobs[:, t] = log pi(y_t | s_t)``.
* ``mask[:, t] == 1`` means "this token takes part in the computation" (a response
  token, or for T-PPO a token of the current window); 0 means padding, prompt, or a
  token of an earlier window. Values of *any* tensor at mask == 0 never change a
  result (pinned by tests), so padding may hold garbage, even NaN.
* The reward of a finished response sits on its last valid token (spec, step 3).

Equations and their sources are given next to each function; docs/algorithms.md maps
the T-PPO spec (Fan et al., arXiv 2506.15050) onto these names.
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "adaptive_lambda",
    "agg_loss",
    "behavior_weights",
    "discounted_returns",
    "egae",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_filter",
    "grpo_advantages",
    "kl",
    "logprob_mismatch",
    "lm_loss",
    "logprobs_from_logits",
    "tempered_logprobs",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
Bootstrap = Literal["prev_value", "next_value", "zero"]

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: finite in fp16/bf16/fp32; beyond it the ratio is meaningless anyway.


# --------------------------------------------------------------------------- masked stats


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where mask is set, exact zeros elsewhere (so NaN padding cannot leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask == 1``.

    x, mask: same shape (mask bool or 0/1). ``dim=None`` sums everything (0-dim result).
    """
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask == 1``; 0 where the mask is empty.

    x, mask: same shape. ``dim=None`` averages over all positions (0-dim result),
    else over ``dim`` (that dim is removed).
    """
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask == 1`` (0-dim).

    ``unbiased`` applies Bessel's correction n / (n - 1) (n >= 2; else no correction).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over mask == 1.

    x, mask: same shape; statistics are global over every masked-in position (the
    spec whitens advantages over the step's policy tokens). Positions where mask == 0
    are returned as 0. With ``shift_mean=False`` the mean is kept:
    ``(x - mu) / sigma + mu``. ``all_reduce`` (a sum over processes, e.g. of
    torch.distributed) makes the statistics those of every process's tokens together:
    two passes (mean, then squared deviations), as in the single-process formula.
    """
    if all_reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        total = all_reduce(torch.stack([(x * m).sum(), m.sum()]))
        n = total[1]
        mean = total[0] / n.clamp_min(1.0)
        sq = all_reduce(((x - mean) ** 2 * m).sum())
        var = sq / (n - 1.0 if n >= 2 else n.clamp_min(1.0))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked(whitened, mask)


# --------------------------------------------------------------------------- advantages


def _as_row_tensor(v: float | Tensor, like: Tensor) -> Tensor:
    """A per-row (B,) tensor from a float or a (B,) tensor, on ``like``'s device/dtype."""
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(like.shape[0])


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float | Tensor,
    *,
    last_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), per token.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V(s_t)            (the value target; lam = 1: Monte-Carlo return)

    Args:
        rewards, values, mask: (B, T) over response positions. ``mask == 1`` marks the
            tokens to estimate; the recursion runs over them only, carrying its state
            across interior gaps (mask 0 inside a row), so a token's successor is the
            next masked-in token of the same row.
        gamma: discount.
        lam: GAE lambda, a float or a (B,) tensor (one lambda per row, e.g. from
            :func:`adaptive_lambda`).
        last_values: (B,) value of the state *after* each row's last valid token,
            V(s_l). Default 0: the last valid token is terminal (a finished response).
            :func:`egae` sets it for rows cut by a window.

    Returns:
        (advantages, returns), both (B, T), 0 where mask == 0. Not whitened.
    """
    m = mask.bool()
    lam_b = _as_row_tensor(lam, values)
    zero = torch.zeros_like(values[:, 0])
    next_value = zero if last_values is None else last_values.to(values.dtype)
    next_adv = zero
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam_b * next_adv
        # Masked-out positions leave the recursion state untouched (gap carry-over).
        next_adv = torch.where(mt, adv_t, next_adv)
        next_value = torch.where(mt, values[:, t], next_value)
        advantages[:, t] = torch.where(mt, adv_t, zero)
    returns = _masked(advantages + values, m)
    return advantages, returns


def _last_valid_value(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) value at each row's last position with mask == 1 (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, -1).max(dim=1).values
    picked = values.gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(last >= 0, picked, torch.zeros_like(picked))


def egae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    finished: Tensor,
    gamma: float,
    lam: float | Tensor,
    bootstrap: Bootstrap = "prev_value",
    next_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extended GAE: GAE over one T-PPO window, for finished and unfinished rows.

    T-PPO spec, "EGAE" (Fan et al. 2025, sec. 3): the GAE recursion of :func:`gae`
    over the current window's tokens t = a .. l-1 of each row. A finished row ends in
    a terminal state (V(s_l) = 0), which is exactly :func:`gae`. An unfinished row was
    cut by the window, carries no reward, and its state after the cut is bootstrapped:

    * ``"prev_value"``: V(s_l) := V(s_{l-1}), the paper's approximation; with gamma = 1
      the last delta is 0 and advantages come from value differences inside the window.
    * ``"next_value"``: V(s_l) := ``next_values``, the critic's value after the cut
      (its output at the last generated token, from the same forward pass).
    * ``"zero"``: the cut is treated as terminal with reward 0.

    Args:
        rewards, values, mask: (B, T); mask == 1 marks this window's tokens (prompt and
            earlier-window positions must be 0). Unfinished rows' rewards should be 0.
        finished: (B,) bool, True where the row ended in this window (EOS or length cap).
        gamma, lam: as in :func:`gae` (lam float or (B,)).
        bootstrap: how V(s_l) is set for unfinished rows (above).
        next_values: (B,) required when ``bootstrap == "next_value"``.

    Returns:
        (advantages, returns), (B, T), 0 where mask == 0. Not whitened.
    """
    if bootstrap == "prev_value":
        boot = _last_valid_value(values, mask)
    elif bootstrap == "next_value":
        if next_values is None:
            raise ValueError("egae(bootstrap='next_value') needs next_values, the (B,) critic value after the cut")
        boot = next_values.to(values.dtype)
    elif bootstrap == "zero":
        boot = torch.zeros_like(values[:, 0])
    else:
        raise ValueError(f"egae: unknown bootstrap {bootstrap!r}; expected prev_value, next_value or zero")
    last_values = torch.where(finished.bool(), torch.zeros_like(boot), boot)
    return gae(rewards, values, mask, gamma, lam, last_values=last_values)


def adaptive_lambda(lengths: Tensor, alpha: float = 0.05, lam_min: float = 0.95) -> Tensor:
    """Length-adaptive GAE lambda (VAPO, Yue et al. 2025, arXiv 2504.05118, eq. 7).

        lambda = max(lam_min, 1 - 1 / (alpha * l))

    so that sum_t lambda^t ~ alpha * l scales with the response length l: long
    responses get a lambda closer to 1 (less bias from the critic).

    Args:
        lengths: (B,) response lengths in tokens (int or float). For an unfinished
            T-PPO row pass an estimate (the authors' port: length so far + W / 2).
    Returns:
        (B,) float32 lambdas in [lam_min, 1).
    """
    l = lengths.to(torch.float32).clamp_min(1.0)
    return (1.0 - 1.0 / (alpha * l)).clamp_min(lam_min)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Monte-Carlo returns R_t = sum_k gamma^k r_{t+k} over mask == 1 positions; (B, T).

    The critic's target on finished rows (spec, step 7). Equals :func:`gae`'s returns
    with lam = 1, whatever the values.
    """
    zeros = torch.zeros_like(rewards)
    advantages, _ = gae(rewards, zeros, mask, gamma, 1.0)
    return advantages


def grpo_advantages(scores: Tensor, groups: Tensor, mask: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's critic-free advantage (Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2):
    each response's score against its prompt group's, on every token of the response.

        A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)     (scale_by_std)
        A_i =  r_i - mean_{j in g(i)} r_j                                    (Dr. GRPO, arXiv 2503.20783)

    std is the unbiased sample std of the group (as TRL and verl compute it); a group of
    one response has std 0 and advantage 0.

    Args:
        scores: (B,) reward of each finished response.
        groups: (B,) long, the prompt group of each row (rows of one prompt share it).
        mask: (B, T), 1 on the tokens that receive the row's advantage.
        scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).

    Returns:
        (B, T) advantages, A_i on row i's masked tokens, 0 elsewhere.
    """
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    scores = scores.to(torch.float64)
    n = counts.to(torch.float64)
    mean = torch.zeros_like(n).index_add_(0, inverse, scores) / n
    centred = scores - mean[inverse]
    adv = centred
    if scale_by_std:
        var = torch.zeros_like(n).index_add_(0, inverse, centred**2) / (n - 1).clamp_min(1)
        adv = centred / (var.sqrt()[inverse] + eps)
    return _masked(adv.float().unsqueeze(1).expand(mask.shape), mask.bool())


def group_filter(scores: Tensor, groups: Tensor) -> Tensor:
    """(B,) bool: rows whose group's scores are not all equal. DAPO's dynamic sampling
    (Yu et al. 2025, arXiv 2503.14476, eq. 11): a group where every response got the
    same reward has no learning signal in a group baseline and is left out of the loss
    (and of its token count)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    lo = torch.full((k,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, scores.double(), "amin")
    hi = torch.full((k,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, scores.double(), "amax")
    return (hi > lo)[inverse]


class AdvantageEstimator(Protocol):
    """The one signature of :data:`ADVANTAGE_ESTIMATORS` (dispatched once by
    tppo/advantages.py). ``scores`` (B,) is each finished row's reward (0 for the others)
    and ``groups`` (B,) its prompt group: GRPO's inputs; the GAE family uses the per-token
    ``rewards`` and ``values`` instead."""

    def __call__(
        self,
        rewards: Tensor,
        values: Tensor,
        mask: Tensor,
        finished: Tensor,
        *,
        gamma: float,
        lam: float | Tensor,
        bootstrap: Bootstrap,
        next_values: Tensor | None,
        scores: Tensor,
        groups: Tensor,
        scale_by_std: bool,
    ) -> tuple[Tensor, Tensor]: ...


def _gae_estimator(rewards, values, mask, finished, *, gamma, lam, bootstrap, next_values, **_):
    """GAE over whole responses (synchronous PPO, partial-rollout PPO): every row with a
    token in ``mask`` must be finished (nothing to bootstrap)."""
    if bool((mask.bool().any(1) & ~finished.bool()).any()):
        raise ValueError("advantage estimator 'gae' needs finished rows only; use 'egae' for windowed rollouts")
    return gae(rewards, values, mask, gamma, lam)


def _egae_estimator(rewards, values, mask, finished, *, gamma, lam, bootstrap, next_values, **_):
    return egae(rewards, values, mask, finished, gamma, lam, bootstrap=bootstrap, next_values=next_values)


def _grpo_estimator(rewards, values, mask, finished, *, scores, groups, scale_by_std, **_):
    """GRPO: group-relative scores, no critic; the returns are the scores on each token."""
    if bool((mask.bool().any(1) & ~finished.bool()).any()):
        raise ValueError("advantage estimator 'grpo' needs finished rows only (a whole group's rewards)")
    adv = grpo_advantages(scores, groups, mask, scale_by_std)
    return adv, _masked(scores.to(adv.dtype).unsqueeze(1).expand(mask.shape), mask.bool())


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": _gae_estimator,
    "egae": _egae_estimator,
    "grpo": _grpo_estimator,
}


# --------------------------------------------------------------------------- behaviour policy


def behavior_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, mode: Literal["none", "tis", "icepop"],
                     clip: float = 2.0, low: float = 0.5, high: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token weights that correct for tokens sampled by a behaviour policy mu other
    than pi_old (another engine's numerics, or an older policy version), with the
    behaviour ratio w = pi_old(y) / mu(y), detached:

    * ``"tis"``: truncated importance sampling (Yao et al. 2025, "Your efficient RL
      framework secretly brings you off-policy RL training"): weight min(w, clip).
    * ``"icepop"``: IcePop (MiniMax / Ring-1T, 2025): weight 1 where low <= w <= high,
      0 elsewhere (the token is masked out of the loss; the denominator stays).
    * ``"none"``: weight 1.

    Args:
        old_logprobs, behavior_logprobs: (B, T) log pi_old and log mu of the sampled tokens.
        mask: (B, T), 1 on the policy loss's tokens (the stats are over them).

    Returns:
        (weights (B, T), stats): weights are 1 where mask == 0; 0-dim stats over mask,
        whatever the mode (what TIS would cap and IcePop would drop): ``is_weight_mean``
        (mean weight applied), ``is_clipped_frac`` (w > clip) and ``is_masked_frac``
        (w outside [low, high]).
    """
    with torch.no_grad():
        m = mask.bool()
        w = torch.exp((old_logprobs - behavior_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).float()
        outside = (w < low) | (w > high)
        if mode == "tis":
            weights = w.clamp(max=clip)
        elif mode == "icepop":
            weights = (~outside).to(w.dtype)
        elif mode == "none":
            weights = torch.ones_like(w)
        else:
            raise ValueError(f"behavior_weights: unknown mode {mode!r}; expected none, tis or icepop")
        weights = torch.where(m, weights, torch.ones_like(weights))
        stats = {"is_weight_mean": masked_mean(weights, m), "is_clipped_frac": masked_mean((w > clip).to(w.dtype), m),
                 "is_masked_frac": masked_mean(outside.to(w.dtype), m)}
    return weights, stats


def logprob_mismatch(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the sampling engine's log-probs mu are from the trainer's pi_old on the
    tokens where mask == 1 (the gap verl's rollout correction, TRL's vLLM importance
    sampling and OpenRLHF's TIS measure). Sums, so that micro-batches and ranks add up:

        ``abs_diff_sum``  sum |log pi_old - log mu|
        ``abs_diff_max``  max |log pi_old - log mu|
        ``kl_sum``        sum k3(mu, pi_old): KL(mu || pi_old) estimated from mu's samples
        ``tokens``        the number of tokens
    """
    with torch.no_grad():
        m = mask.bool()
        diff = (old_logprobs.float() - behavior_logprobs.float())[m]
        return {"abs_diff_sum": diff.abs().sum(), "abs_diff_max": diff.abs().max() if diff.numel() else diff.new_zeros(()),
                "kl_sum": kl(behavior_logprobs.float()[m], old_logprobs.float()[m], "k3").sum(),
                "tokens": torch.tensor(float(diff.numel()))}


# --------------------------------------------------------------------------- losses


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: AggMode = "token-mean",
    num_tokens: float | Tensor | None = None,
    *,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over mask == 1.

    * ``token-mean``: sum(loss * mask) / N_tok, N_tok = ``num_tokens`` or mask.sum().
      Pass the *global* token count of the step's batch as ``num_tokens`` so that the
      sum of micro-batch losses (and the all-reduced sum across data-parallel ranks)
      has exactly the gradient of the whole batch (spec, "Losses").
    * ``seq-mean-token-mean``: mean over non-empty rows of each row's token mean;
      the global row count may be given as ``num_seqs``.
    * ``seq-mean-token-sum``: mean over non-empty rows of each row's token sum.
    """
    if mode == "token-mean":
        denom = mask.to(loss_mat.dtype).sum() if num_tokens is None else num_tokens
        return masked_sum(loss_mat, mask) / torch.as_tensor(denom, dtype=loss_mat.dtype).clamp_min(1.0)
    if num_tokens is not None:
        raise ValueError(f"agg_loss: num_tokens is for mode 'token-mean'; mode {mode!r} takes num_seqs")
    if mode == "seq-mean-token-mean":
        per_row = masked_mean(loss_mat, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_row = masked_sum(loss_mat, mask, dim=-1)
    else:
        raise ValueError(f"agg_loss: unknown mode {mode!r}")
    nonempty = mask.bool().any(dim=-1)
    denom = nonempty.sum() if num_seqs is None else num_seqs
    return per_row[nonempty].sum() / torch.as_tensor(denom, dtype=loss_mat.dtype).clamp_min(1.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 10.0,
    agg: AggMode = "token-mean",
    num_tokens: float | Tensor | None = None,
    *,
    num_seqs: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with clip-higher and dual clip.

        rho    = exp(clamp(logp - logp_old, -20, 20))
        L_clip = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        L      = min(L_clip, -A * dual_clip)   where A < 0   (dual clip, Ye et al. 2020)
        L      = L_clip                        where A >= 0

    Clip-higher (clip_high > clip_low) is DAPO's (arXiv 2503.14476); the T-PPO spec's
    defaults are 0.2 / 0.28 / dual 10.

    Args:
        logprobs: (B, T) log pi_theta(y_t | s_t), with grad.
        old_logprobs: (B, T) log-probs under the sampling policy (no grad).
        advantages: (B, T), typically whitened over the step's policy tokens.
        mask: (B, T), 1 on policy tokens (T-PPO: this window's tokens only).
        dual_clip: the constant c > 1, or None to disable.
        agg, num_tokens, num_seqs: see :func:`agg_loss`.
        weights: (B, T) detached per-token factors of the loss (:func:`behavior_weights`),
            None for 1.

    Returns:
        (loss, stats) with detached 0-dim stats over this call's mask: ``clipfrac``
        (fraction of tokens where the clipped branch is active), ``dual_clipfrac``,
        ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta)), ``ratio_mean``,
        ``ratio_max``, ``ratio_min`` (1 for an empty mask).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (got {dual_clip})")
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss_mat > dual_bound)
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, dual_bound), loss_mat)
    if weights is not None:
        loss_mat = loss_mat * weights.detach()
    loss = agg_loss(loss_mat, mask, agg, num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        m, ratio = mask.bool(), ratio.detach()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl(old_logprobs, logprobs.detach(), "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": ratio[m].max() if m.any() else ratio.new_ones(()),
            "ratio_min": ratio[m].min() if m.any() else ratio.new_ones(()),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_low: float | None = 0.5,
    clip_high: float | None = 0.6,
    agg: AggMode = "token-mean",
    num_tokens: float | Tensor | None = None,
    *,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (T-PPO spec, "Losses"; the authors' port uses 0.5 / 0.6):

        v_clip = clip(v, v_old - clip_low, v_old + clip_high)
        L      = 0.5 * max((v - R)^2, (v_clip - R)^2)

    Args:
        values: (B, T) critic outputs V(s_t), with grad.
        old_values: (B, T) the critic's outputs this step before its update (no grad).
        returns: (B, T) targets R_t (T-PPO: Monte-Carlo return of finished rows).
        mask: (B, T), 1 on critic tokens (T-PPO: response tokens of finished rows).
        clip_low: lower clip width, or None for the plain 0.5 * (v - R)^2.
        clip_high: upper clip width (None: same as clip_low).

    Returns:
        (loss, stats) with detached ``clipfrac`` (clipped branch strictly larger) and
        ``vpred_mean``.
    """
    err = (values - returns) ** 2
    if clip_low is None:
        loss_mat = 0.5 * err
        clip_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        high = clip_low if clip_high is None else clip_high
        v_clip = old_values + (values - old_values).clamp(-clip_low, high)
        err_clip = (v_clip - returns) ** 2
        loss_mat = 0.5 * torch.maximum(err, err_clip)
        clip_active = err_clip > err
    loss = agg_loss(loss_mat, mask, agg, num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clip_active.to(values.dtype), mask),
            "vpred_mean": masked_mean(values, mask),
        }
    return loss, stats


def lm_loss(
    logprobs: Tensor,
    mask: Tensor,
    agg: AggMode = "token-mean",
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Negative log-likelihood of the tokens where mask == 1: agg(-logprobs).

    Used for SFT and for VAPO's positive-example LM loss (arXiv 2504.05118, sec. 4.3)
    on finished correct responses. logprobs, mask: (B, T).
    """
    return agg_loss(-logprobs, mask, agg, num_tokens)


def kl(logprobs: Tensor, ref_logprobs: Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020,
    "Approximating KL divergence"), with x = log pi(y) - log pi_ref(y):

    * k1 = x                        (unbiased, high variance, can be negative)
    * k2 = x^2 / 2                  (biased, low variance)
    * k3 = exp(-x) - 1 + x          (unbiased, >= 0)

    x is clamped to [-20, 20] for k3 so that the exp stays finite at extreme gaps.
    logprobs, ref_logprobs: same shape; returns the same shape.
    """
    x = logprobs - ref_logprobs
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x**2
    if kind == "k3":
        x = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.expm1(-x) + x
    raise ValueError(f"kl: unknown kind {kind!r}; expected k1, k2 or k3")


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over mask == 1 (0-dim). 1 is a perfect critic, 0 a
    constant one, negative worse than constant; NaN when Var[R] == 0."""
    var_r = masked_var(returns, mask)
    var_resid = masked_var(returns - values, mask)
    return torch.where(var_r > 0, 1.0 - var_resid / var_r, torch.full_like(var_r, float("nan")))


# --------------------------------------------------------------------------- logits helpers


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per position. logits (..., V) float, labels (...) long.

    Computed as logit - logsumexp (no (..., V) log-softmax tensor is kept) in float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum softmax(z) * z; (...)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def tempered_logprobs(logits: Tensor, labels: Tensor, temperature: float, entropy: str = "none") -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` under the sampling policy softmax(logits / T) (T = 0, greedy:
    the unscaled logits), and its entropies: ``entropy`` is "none" (None), "metric" (no
    grad: cheap on large vocabularies) or "grad". logits (..., V), labels (...)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    lp = logprobs_from_logits(logits, labels)
    if entropy == "none":
        return lp, None
    return lp, entropy_from_logits(logits if entropy == "grad" else logits.detach())
