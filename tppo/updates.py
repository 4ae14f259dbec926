"""Steps 6 and 7: the policy and critic updates, and the forwards they share.

Tensors are in the trainer's shifted frame (B, S - 1): column j is about token j + 1, its
log-prob from the logits at j, its state value V(s) from the critic's output at j
(tppo/trainer.py). :class:`StepBatch` is what the loop hands to the updates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from tppo import algos, distributed, sharding
from tppo.batching import row_micro_batches, token_micro_batches
from tppo.config import Config
from tppo.models import accepts_logits_to_keep
from tppo.prefix import prefix_width, span_logprobs, span_starts, split_widths

OldLogprobSource = Literal["one_pass", "recompute", "engine"]
WORK_KEYS = ("work/value_positions", "work/old_logprob_positions", "work/policy_positions", "work/policy_prefix_positions",
             "work/critic_positions", "work/padding_positions")


class WorkCounter:
    """Token positions each pass of a step runs (docs/metrics.md, ``work/*``): the
    hardware-neutral cost the speed study's cost model is fitted on. A forward over a
    micro-batch of b rows padded to S runs b x S positions; the split of
    ``prefix_grad: false`` runs b x P prefix positions without gradient and b x T span
    positions with it. The positions that hold no token are also counted as padding."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(WORK_KEYS, 0)

    def forward(self, key: str, attention_mask: torch.Tensor, starts: torch.Tensor | None = None, min_prefix: int = 0,
                prefix_key: str | None = None) -> None:
        """Count one micro-batch's forward: whole (``starts`` None), or split at ``starts``
        (the prefix to ``prefix_key``, default ``key``)."""
        b = attention_mask.shape[0]
        if starts is None:
            run = {key: b * attention_mask.shape[1]}
        else:
            P, T = split_widths(attention_mask, starts, min_prefix)
            run = {key: b * T}
            run[prefix_key or key] = run.get(prefix_key or key, 0) + b * P
        for k, n in run.items():
            self.counts[k] += n
        self.counts["work/padding_positions"] += sum(run.values()) - int(attention_mask.sum())


@dataclasses.dataclass
class StepBatch:
    """One step's training tensors, all (B, S - 1) in the shifted frame unless noted."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    policy_mask: torch.Tensor  # bool: this window's tokens
    critic_mask: torch.Tensor  # bool: the critic's tokens
    lm_mask: torch.Tensor  # bool: tokens of finished correct responses (positive-example LM loss)
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    response_mask: torch.Tensor  # bool: response tokens (where a carried row's earlier windows are: tppo/prefix.py)
    behavior_logprobs: torch.Tensor  # mu: the engine's sampling log-probs of the response tokens
    stale: torch.Tensor  # bool: tokens sampled by an older policy version than the one being updated

    def to(self, device: torch.device) -> "StepBatch":
        return StepBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})



def mixed_precision(cfg: Config, device: torch.device) -> bool:
    """Whether the trainer's forwards run under bf16 autocast (``train.bf16`` on CUDA)."""
    return device.type == "cuda" and cfg.train.bf16


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mixed_precision(cfg, device))


def old_logprob_source(cfg: Config, device: torch.device) -> OldLogprobSource:
    """Where the update's pi_old comes from (``algo.old_logprobs``).

    * ``one_pass``: one update per step (ppo_epochs x mini_batches == 1): pi_old is the
      update's own forward, detached. The parameters do not move before the step's only
      optimizer step, so it equals a recompute exactly (ratio 1, the same gradient) and
      costs no extra forward, on every path (bf16, vLLM, partial rollouts).
    * ``recompute``: a forward before the update (several updates per step): PPO's ratio
      must compare the same numerics; under bf16 autocast, in bf16 weights or with another
      engine the sampling log-probs differ from the update's by ~1e-3 and clip tokens of
      a policy that has not moved; partial rollouts and behaviour corrections need pi_old
      of the current policy. ``auto`` recomputes then (verl's default).
    * ``engine``: the sampling log-probs mu (the fp32 embedded path under ``auto``, where
      the two agree to ~1e-6, pinned by tests).
    """
    a, t = cfg.algo, cfg.train
    if a.old_logprobs == "engine":
        return "engine"
    if t.ppo_epochs * t.mini_batches == 1:
        return "one_pass"
    exact_needed = (mixed_precision(cfg, device) or cfg.model.dtype != "float32" or cfg.rollout.engine != "embedded"
                    or a.train_on == "finished" or a.behavior_correction != "none")
    return "recompute" if a.old_logprobs == "recompute" or exact_needed else "engine"


def micro_batches(batch, rows: list[int], t) -> list[list[int]]:
    """Micro-batches of ``rows`` (tppo/batching.py): by token budget when
    ``train.micro_batch_tokens`` is set, else ``train.micro_batch_rows`` rows each.
    ``batch``: anything with a (B, S) ``attention_mask`` (a StepBatch, a PackedWindow: the
    value and old-log-prob passes are packed as the updates are)."""
    if t.micro_batch_tokens:
        lengths = batch.attention_mask[rows].sum(1).tolist()
        return token_micro_batches(rows, lengths, t.micro_batch_tokens, t.micro_batch_rows)
    return row_micro_batches(rows, t.micro_batch_rows)


def trimmed(batch: StepBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids / attention_mask of ``rows``, cut to their longest sequence; that length."""
    S = int(batch.attention_mask[rows].sum(1).max())
    return batch.input_ids[rows, :S], batch.attention_mask[rows, :S], S


def token_logprobs(model, input_ids, attention_mask, temperature: float, entropy: str = "none", columns: torch.Tensor | None = None):
    """(B, S-1) log-probs of tokens 1..S-1 under the temperature-scaled policy, and their
    entropies: ``entropy`` is "none", "metric" (no grad: cheap on large vocabularies) or "grad".

    ``columns`` (1-D, ascending, in the shifted frame) limits the vocabulary projection to
    the positions whose log-probs are used (this window's tokens), through the model's
    ``logits_to_keep``: exact, and it skips the (B, S, V) logits of the prompt and earlier
    windows, most of a T-PPO row. The other columns are 0.
    """
    if columns is not None and not accepts_logits_to_keep(model):
        columns = None  # a model without logits_to_keep: project every position
    keep = {} if columns is None else {"logits_to_keep": columns}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **keep).logits
    labels = input_ids[:, 1:] if columns is None else input_ids[:, columns + 1]
    lp, ent = algos.tempered_logprobs(logits[:, :-1] if columns is None else logits, labels, temperature, entropy)
    width = input_ids.shape[1] - 1
    return _full_frame(lp, columns, width), (None if ent is None else _full_frame(ent, columns, width))


def _full_frame(x: torch.Tensor, columns: torch.Tensor | None, width: int) -> torch.Tensor:
    """(B, K) values at ``columns`` as (B, width), zeros elsewhere (differentiable)."""
    if columns is None:
        return x
    return x.new_zeros(x.shape[0], width).index_copy(1, columns, x)


def used_columns(*masks: torch.Tensor) -> torch.Tensor:
    """The shifted-frame columns where any row of any (b, S-1) mask is set (at least one,
    so that a micro-batch without tokens still runs its forward)."""
    cols = torch.stack([m.any(0) for m in masks]).any(0).nonzero().squeeze(1)
    return cols if cols.numel() else torch.zeros(1, dtype=torch.long, device=cols.device)


def critic_values(critic, input_ids, attention_mask) -> torch.Tensor:
    """(B, S) value of the state ending at each position."""
    return critic(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0].float()



def loss_denominators(mask: torch.Tensor, mode: str, n_tok: int) -> dict[str, int]:
    """The whole mini-batch's denominator of ``algos.agg_loss`` for ``mode``: its token
    count ``n_tok`` (token-mean) or its count of rows with a token in ``mask``
    (seq-mean-*), summed over ranks, so that micro-batching and data parallelism leave
    the gradient unchanged (spec, "Losses")."""
    if mode == "token-mean":
        return {"num_tokens": n_tok}
    return {"num_seqs": distributed.sum_int(int(mask.any(1).sum()))}


def policy_logprobs(policy, ids, attn, pm, lmm, response_mask, cfg: Config, width: int = 0, work: WorkCounter | None = None):
    """The update's log-probs and entropies of a micro-batch: one forward with gradient
    through every token (the exact update), or with ``algo.prefix_grad: false`` the
    earlier windows of carried rows without gradient (tppo/prefix.py), their prefixes
    padded to the step's ``width`` (prefix.prefix_width); counted in ``work``."""
    entropy = "grad" if cfg.algo.entropy_coef else "metric"
    work = work or WorkCounter()
    if cfg.algo.prefix_grad:
        work.forward("work/policy_positions", attn)
        return token_logprobs(policy, ids, attn, cfg.rollout.temperature, entropy, used_columns(pm, lmm))
    starts, split = span_starts(response_mask, pm, lmm), sharding.is_sharded(policy)
    work.forward("work/policy_positions", attn, starts, max(width, int(split)), prefix_key="work/policy_prefix_positions")
    return span_logprobs(policy, ids, attn, starts, cfg.rollout.temperature, entropy,
                         columns=pm | lmm, always_split=split, prefix_width=width)


class BehaviorStats:
    """The step's behaviour-policy statistics over its trained tokens (first epoch):
    ``rollout/logprob_diff_mean``, ``_max``, ``rollout/mismatch_kl`` (pi_old against the
    engine's mu) and ``policy/is_weight_mean``, ``is_clipped_frac``, ``is_masked_frac``
    (docs/metrics.md). NaN where pi_old is mu itself (``algo.old_logprobs: engine``)."""

    KEYS = ("abs_diff_sum", "kl_sum", "tokens", "weight_sum", "clipped_sum", "masked_sum")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.diff_max = 0.0

    def add(self, mismatch: dict[str, torch.Tensor], weight_stats: dict[str, torch.Tensor]) -> None:
        n = float(mismatch["tokens"])
        for k in ("abs_diff_sum", "kl_sum", "tokens"):
            self.sums[k] += float(mismatch[k])
        for k, key in (("weight_sum", "is_weight_mean"), ("clipped_sum", "is_clipped_frac"), ("masked_sum", "is_masked_frac")):
            self.sums[k] += float(weight_stats[key]) * n
        self.diff_max = max(self.diff_max, float(mismatch["abs_diff_max"]))

    def metrics(self) -> dict[str, float]:
        n = self.sums["tokens"]
        mean = (lambda k: self.sums[k] / n) if n else (lambda k: float("nan"))  # noqa: E731
        return {"rollout/logprob_diff_mean": mean("abs_diff_sum"), "rollout/logprob_diff_max": self.diff_max if n else float("nan"),
                "rollout/mismatch_kl": mean("kl_sum"), "policy/is_weight_mean": mean("weight_sum"),
                "policy/is_clipped_frac": mean("clipped_sum"), "policy/is_masked_frac": mean("masked_sum")}


def pi_old_and_weights(lp: torch.Tensor, batch: StepBatch, micro: list[int], pm: torch.Tensor, cfg: Config,
                       source: OldLogprobSource) -> tuple[torch.Tensor, torch.Tensor | None, dict, dict]:
    """A micro-batch's pi_old (the update's forward detached in one-pass mode, else the
    batch's), the behaviour-correction weights (None without a correction), and the
    mismatch and weight statistics of pi_old against mu (algos.logprob_mismatch,
    algos.behavior_weights)."""
    a, S1 = cfg.algo, pm.shape[1]
    old = lp.detach() if source == "one_pass" else batch.old_logprobs[micro, :S1]
    mu = batch.behavior_logprobs[micro, :S1]
    weights, wstats = algos.behavior_weights(old, mu, pm, a.behavior_correction, a.behavior_clip, *a.icepop_range)
    return old, (weights if a.behavior_correction != "none" else None), algos.logprob_mismatch(old, mu, pm), wstats


def update_policy(policy, opt, sched, batch: StepBatch, cfg: Config, gen: torch.Generator, device, ref=None,
                  work: WorkCounter | None = None) -> dict[str, float]:
    """Step 6: PPO epochs of clipped-surrogate updates on the policy tokens, each token's
    loss weighted by ``algo.behavior_correction``; the positions run counted in ``work``."""
    a, t = cfg.algo, cfg.train
    source = old_logprob_source(cfg, device)
    rows = batch.policy_mask.any(1).nonzero().flatten().tolist()
    sums = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "lm_loss": 0.0, "kl": 0.0}
    grad_norms, skipped, tokens_seen, ratio_range = [], 0, 0, [math.inf, -math.inf]
    behavior, work = BehaviorStats(), work or WorkCounter()
    width = 0 if a.prefix_grad else prefix_width(batch.response_mask, batch.policy_mask, batch.lm_mask)
    policy.train()
    for epoch in range(t.ppo_epochs):
        for mb in _mini_batches(rows, t.mini_batches, gen):
            # global-token denominators: summed over data-parallel ranks
            n_tok = distributed.sum_int(int(batch.policy_mask[mb].sum()))
            denom = loss_denominators(batch.policy_mask[mb], a.loss_agg, n_tok)
            n_lm = distributed.sum_int(int(batch.lm_mask[mb].sum()))
            opt.zero_grad(set_to_none=True)
            for micro, real in sharding.padded_micro_batches(micro_batches(batch, mb, t), policy):
                ids, attn, S = trimmed(batch, micro)
                pm, lmm = batch.policy_mask[micro, : S - 1], batch.lm_mask[micro, : S - 1]
                with autocast(cfg, device):
                    lp, ent = policy_logprobs(policy, ids, attn, pm, lmm, batch.response_mask[micro, : S - 1], cfg, width,
                                              work if real else None)
                old, weights, mismatch, wstats = pi_old_and_weights(lp, batch, micro, pm, cfg, source)
                if epoch == 0 and real and source != "engine":
                    behavior.add(mismatch, wstats)
                loss, stats = algos.policy_loss(lp, old, batch.advantages[micro, : S - 1], pm,
                                                a.clip_low, a.clip_high, a.dual_clip, a.loss_agg, **denom, weights=weights)
                entropy = algos.agg_loss(ent, pm, "token-mean", n_tok)
                if a.entropy_coef:
                    loss = loss - a.entropy_coef * entropy
                if a.kl_coef and ref is not None:
                    with torch.no_grad(), autocast(cfg, device):
                        ref_lp, _ = token_logprobs(ref, ids, attn, cfg.rollout.temperature, columns=used_columns(pm, lmm))
                    kl_term = algos.agg_loss(algos.kl(lp, ref_lp, a.kl_kind), pm, "token-mean", n_tok)
                    loss = loss + a.kl_coef * kl_term
                    sums["kl"] += float(kl_term.detach()) * real
                if a.lm_loss_coef and n_lm:
                    lm = algos.lm_loss(lp, batch.lm_mask[micro, : S - 1], "token-mean", n_lm)
                    loss = loss + a.lm_loss_coef * lm
                    sums["lm_loss"] += float(lm.detach()) * real
                if not real:  # FSDP padding: same collectives, no contribution
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                share = int(pm.sum())  # stats are per-micro means: weight them by tokens
                sums["loss"] += float(loss.detach())
                for k in ("clipfrac", "approx_kl"):
                    sums[k] += float(stats[k]) * share
                sums["entropy"] += float(entropy.detach())
                tokens_seen += share
                ratio_range = [min(ratio_range[0], float(stats["ratio_min"])), max(ratio_range[1], float(stats["ratio_max"]))]
            sharding.sync_gradients(policy)
            norm, ok = _clip_and_step(policy, opt, sched, t.grad_clip)
            grad_norms.append(norm)
            skipped += not ok
    n_updates = max(1, t.ppo_epochs * t.mini_batches)
    return {
        "policy/loss": sums["loss"] / n_updates,
        "policy/clipfrac": sums["clipfrac"] / max(1, tokens_seen),
        "policy/approx_kl": sums["approx_kl"] / max(1, tokens_seen),
        "policy/entropy": sums["entropy"] / n_updates,
        "policy/lm_loss": sums["lm_loss"] / n_updates,
        "policy/kl": sums["kl"] / n_updates,
        "policy/grad_norm": max(grad_norms) if grad_norms else 0.0,
        "policy/skipped_steps": skipped,
        "policy/ratio_min": ratio_range[0] if tokens_seen else 1.0,
        "policy/ratio_max": ratio_range[1] if tokens_seen else 1.0,
        **behavior.metrics(),
    }


def update_critic(critic, opt, sched, batch: StepBatch, cfg: Config, gen: torch.Generator, device,
                  work: WorkCounter | None = None) -> dict[str, float]:
    """Step 7: clipped value regression on the critic tokens (finished rows for T-PPO);
    the positions run counted in ``work``."""
    a, t = cfg.algo, cfg.train
    rows = batch.critic_mask.any(1).nonzero().flatten().tolist()
    loss_sum, clip_sum, tokens_seen, grad_norms, skipped = 0.0, 0.0, 0, [], 0
    critic.train()
    for _ in range(t.ppo_epochs):
        for mb in _mini_batches(rows, t.mini_batches, gen):
            denom = loss_denominators(batch.critic_mask[mb], a.loss_agg, distributed.sum_int(int(batch.critic_mask[mb].sum())))
            opt.zero_grad(set_to_none=True)
            for micro, real in sharding.padded_micro_batches(micro_batches(batch, mb, t), critic):
                ids, attn, S = trimmed(batch, micro)
                if real and work is not None:
                    work.forward("work/critic_positions", attn)
                with autocast(cfg, device):
                    v = critic_values(critic, ids, attn)[:, :-1]
                if not real:  # FSDP padding: same collectives, no contribution
                    (v.sum() * 0.0).backward()
                    continue
                cm = batch.critic_mask[micro, : S - 1]
                loss, stats = algos.value_loss(v, batch.old_values[micro, : S - 1], batch.returns[micro, : S - 1], cm,
                                               a.value_clip_low, a.value_clip_high, a.loss_agg, **denom)
                loss.backward()
                share = int(cm.sum())
                loss_sum += float(loss.detach())
                clip_sum += float(stats["clipfrac"]) * share
                tokens_seen += share
            sharding.sync_gradients(critic)
            norm, ok = _clip_and_step(critic, opt, sched, t.grad_clip)
            grad_norms.append(norm)
            skipped += not ok
    n_updates = max(1, t.ppo_epochs * t.mini_batches)
    return {"value/loss": loss_sum / n_updates if rows else float("nan"),
            "value/clipfrac": clip_sum / max(1, tokens_seen) if rows else float("nan"),
            "value/grad_norm": max(grad_norms) if grad_norms else 0.0, "value/skipped_steps": skipped}


def _mini_batches(rows: list[int], n: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle ``rows`` with the trainer's generator and split into n near-equal groups.

    Alone, a step without rows makes no group (no optimizer step). Data-parallel, every
    rank makes exactly n groups, empty ones included, so all ranks take the same
    optimizer steps and meet in the same gradient all-reduces.
    """
    if not rows and not distributed.active():
        return []
    order = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    size = max(1, math.ceil(len(order) / n))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    return groups + [[] for _ in range(n - len(groups))] if distributed.active() else groups


def _clip_and_step(model, opt, sched, max_norm: float) -> tuple[float, bool]:
    """Clip the gradient and step; a non-finite gradient skips the step (weights unchanged)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of the global norm
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return float("nan"), False
    opt.step()
    sched.step()
    return float(norm), True

