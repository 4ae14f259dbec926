"""Step 5: what each algorithm trains on, and its advantages and critic targets.

The algorithms differ here and nowhere else in the loop (design.md, principle 11):

=================  ====================  ===========================  ======
algorithm          policy tokens         advantage estimator          critic
=================  ====================  ===========================  ======
tppo (window)      this window's         EGAE (bootstrap at the cut)  yes
tppo (finished)    a finished response,  GAE over the whole response  yes
                   all of it, once       (partial-rollout PPO)
ppo                the whole response    GAE                          yes
grpo               the whole response    group-relative score         no
=================  ====================  ===========================  ======

The estimators are the registry ``algos.ADVANTAGE_ESTIMATORS`` (one signature), chosen
once by :func:`estimator_name`. Tensors are in the trainer's shifted frame (B, S - 1):
column j is about token j + 1 (tppo/trainer.py).
"""

from __future__ import annotations

import dataclasses

import torch

from tppo import algos
from tppo.config import Config

# Estimators whose advantages are whitened over the step's policy tokens (spec, "Losses");
# GRPO's are already normalised within each prompt group.
WHITENED = ("gae", "egae")


@dataclasses.dataclass
class StepTargets:
    """Step 5's output, each (B, S - 1) in the shifted frame."""

    advantages: torch.Tensor
    policy_mask: torch.Tensor  # bool: the policy loss's tokens
    returns: torch.Tensor
    critic_mask: torch.Tensor  # bool: the value loss's tokens
    lm_mask: torch.Tensor  # bool: positive-example LM loss tokens (none when lm_loss_coef = 0)
    filtered_groups: int = 0  # prompt groups left out by algo.filter_groups


def has_critic(cfg: Config) -> bool:
    """Whether the algorithm learns a value function (GRPO does not)."""
    return cfg.algo.algorithm != "grpo"


def estimator_name(cfg: Config) -> str:
    """The key of ``algos.ADVANTAGE_ESTIMATORS`` for this run."""
    a = cfg.algo
    if a.algorithm == "grpo":
        return "grpo"
    return "gae" if a.algorithm == "ppo" or a.train_on == "finished" else "egae"


def policy_tokens(cfg: Config, packed) -> torch.Tensor:
    """(B, S - 1) bool: the tokens the policy trains on this step. T-PPO: this window's;
    ``train_on: finished``: every token of the rows that finished now (each response is
    trained on once, whole). For synchronous PPO and GRPO the two are the same."""
    if cfg.algo.train_on == "finished":
        return packed.response_mask[:, 1:] & packed.finished.unsqueeze(1)
    return packed.window_mask[:, 1:]


def rows_with_values(cfg: Config, packed) -> list[int]:
    """The rows whose critic values step 5 reads: those with a policy or critic token (a
    partial rollout's unfinished rows need none)."""
    if cfg.algo.train_on == "window":
        return list(range(packed.input_ids.shape[0]))
    return packed.finished.nonzero().flatten().tolist()


def compute_advantages(cfg: Config, packed, values_full: torch.Tensor, rewards: list[float | None], all_reduce=None,
                       window_tokens: int | None = None) -> StepTargets:
    """Step 5: per-token advantages (policy) and returns (critic), shifted frame.

    values_full: (B, S) critic outputs (zeros without a critic); rewards: per row, None if
    unfinished; all_reduce: a sum over data-parallel ranks, for whitening with global
    statistics; window_tokens: this step's W (default: the config's).
    """
    a = cfg.algo
    B, S = packed.input_ids.shape
    finished = packed.finished
    policy_mask = policy_tokens(cfg, packed)
    response_mask = packed.response_mask[:, 1:]
    values = values_full[:, :-1]
    last = packed.attention_mask.sum(1) - 1  # index of each row's last token (unshifted)
    next_values = values_full.gather(1, last.unsqueeze(1)).squeeze(1)  # V(s_l): after the cut
    scores = torch.tensor([0.0 if r is None else float(r) for r in rewards])
    reward_t = torch.zeros(B, S - 1)
    for b, r in enumerate(rewards):
        if r is not None:
            reward_t[b, last[b] - 1] = r  # the reward sits on the last response token
    filtered = 0
    if a.filter_groups:  # DAPO's dynamic sampling: groups with equal rewards leave the loss
        keep = algos.group_filter(scores, packed.group_ids)
        filtered = int(packed.group_ids[~keep].unique().numel())
        policy_mask = policy_mask & keep.unsqueeze(1)
    name = estimator_name(cfg)
    adv, _ = algos.ADVANTAGE_ESTIMATORS[name](
        reward_t, values, policy_mask, finished, gamma=a.gamma, lam=policy_lambda(cfg, packed, window_tokens), bootstrap=a.bootstrap,
        next_values=next_values, scores=scores, groups=packed.group_ids, scale_by_std=a.grpo_std)
    if a.whiten_advantages and name in WHITENED:
        adv = algos.masked_whiten(adv, policy_mask, all_reduce=all_reduce)
    if a.window_ignore_tokens:
        adv = _ignore_window_tail(adv, policy_mask, finished, a.window_ignore_tokens)
    critic_mask = response_mask & finished.unsqueeze(1) & has_critic(cfg)
    returns = algos.discounted_returns(reward_t, critic_mask, a.gamma)  # lambda = 1: Monte-Carlo targets
    if a.critic_on == "all":  # ablation: unfinished rows' window tokens with bootstrapped targets
        extra = packed.window_mask[:, 1:] & ~finished.unsqueeze(1)
        _, boot_ret = algos.egae(reward_t, values, extra, finished, a.gamma, 1.0, bootstrap=a.bootstrap, next_values=next_values)
        returns = torch.where(extra, boot_ret, returns)
        critic_mask = critic_mask | extra
    lm_mask = positive_examples(packed, rewards) if a.lm_loss_coef else torch.zeros_like(response_mask)
    return StepTargets(adv, policy_mask, returns, critic_mask, lm_mask, filtered)


def positive_examples(packed, rewards: list[float | None]) -> torch.Tensor:
    """(B, S - 1) bool: the response tokens of finished correct rows (reward >= 1), those of
    VAPO's positive-example LM loss."""
    correct = torch.tensor([r is not None and r >= 1.0 for r in rewards])
    return packed.response_mask[:, 1:] & correct.unsqueeze(1)


def policy_lambda(cfg: Config, packed, window_tokens: int | None = None) -> float | torch.Tensor:
    """VAPO's length-adaptive lambda; an unfinished row's length is estimated as the
    length so far + W / 2 (the authors' port; W this step's window, default the config's)."""
    a = cfg.algo
    if a.lam_policy != "adaptive":
        return float(a.lam_policy)
    W = cfg.rollout.window_tokens if window_tokens is None else window_tokens
    lengths = packed.response_lengths.float()
    lengths = torch.where(packed.finished, lengths, lengths + W / 2)
    return algos.adaptive_lambda(lengths, a.lam_alpha, a.lam_min)


def _ignore_window_tail(adv, policy_mask, finished, k: int) -> torch.Tensor:
    """Zero the advantage on the last k window tokens of unfinished rows (authors' port)."""
    rank_from_end = policy_mask.flip(1).cumsum(1).flip(1)  # 1 on the last window token, 2 before it...
    tail = policy_mask & (rank_from_end <= k) & ~finished.unsqueeze(1)
    return torch.where(tail, torch.zeros_like(adv), adv)
