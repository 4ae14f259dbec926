"""The baselines on the same loop (#21): GRPO (critic-free), partial-rollout PPO
(``algo.train_on: finished``), the behaviour log-probs, their mismatch metrics and
corrections, and the one-pass pi_old."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from trainer_helpers import deterministic_metrics, make_cfg, params

import tppo.updates as updates_mod
from tppo.advantages import compute_advantages
from tppo.checkpoint import latest_checkpoint
from tppo.config import ConfigError
from tppo.trainer import Trainer, resume_config
from tppo.updates import StepBatch, update_policy

GRPO = ("algo.algorithm=grpo", "rollout.window_tokens=18")
PARTIAL = ("algo.train_on=finished", "algo.behavior_correction=tis")


def parity_rewards(trainer) -> None:
    """Reward 1 for a completion of odd length, else 0: groups with and without contrast,
    the same in every run (a random tiny model never solves the task)."""
    trainer.scorer.score = lambda prompts, texts, answers, columns=None: [float(len(t) % 2) for t in texts]


def run(model_dir, run_dir, *overrides, resume_from=None):
    cfg = make_cfg(model_dir, run_dir, *overrides)
    if resume_from is not None:
        cfg = resume_config(run_dir, cfg)
    trainer = Trainer(cfg, run_dir, resume=resume_from is not None)
    parity_rewards(trainer)
    return trainer, trainer.train()


def window_targets(trainer):
    """One window of the trainer's engine, scored, packed and through step 5."""
    wb = trainer.engine.generate_window(trainer.policy, trainer.version)
    rewards = trainer.scorer.score(None, [trainer.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in wb.rows], None)
    rewards = [x if r.finished else None for x, r in zip(rewards, wb.rows)]
    packed = wb.pack(trainer.tokenizer.pad_token_id)
    return wb, packed, rewards, compute_advantages(trainer.cfg, packed, trainer._values(packed), rewards)


# ---------------------------------------------------------------------- GRPO


def test_grpo_builds_no_critic_trains_checkpoints_and_resumes_exactly(model_dir, tmp_path):
    common = (*GRPO, "train.total_steps=4", "log.checkpoint_every=2", "log.eval_every=2")
    full, history = run(model_dir, tmp_path / "full", *common)
    assert full.critic is None and full.critic_opt is None
    assert not (latest_checkpoint(tmp_path / "full") / "critic").exists()
    assert all(m["value/tokens"] == 0 and math.isnan(m["value/loss"]) and m["time/values_s"] < 0.05 for m in history)
    assert all(m["policy/tokens"] == m["rollout/generated_tokens"] > 0 and m["rollout/carried_rows"] == 0 for m in history)
    assert any(m["policy/grad_norm"] > 0 for m in history), "parity rewards give groups with contrast: a gradient"
    run(model_dir, tmp_path / "cut", *common[:-3], "train.total_steps=2", *common[-2:])
    resumed, _ = run(model_dir, tmp_path / "cut", *common, resume_from=True)
    assert deterministic_metrics(tmp_path / "cut") == deterministic_metrics(tmp_path / "full")
    for k, v in params(full.policy).items():
        assert torch.equal(v, params(resumed.policy)[k])


@pytest.mark.parametrize("std", [True, False])
def test_grpo_advantages_in_the_loop_are_each_groups_by_hand(model_dir, tmp_path, std):
    trainer = Trainer(make_cfg(model_dir, tmp_path, *GRPO, f"algo.grpo_std={str(std).lower()}"), tmp_path)
    parity_rewards(trainer)
    wb, packed, rewards, tg = window_targets(trainer)
    assert all(r.finished for r in wb.rows)
    for b, row in enumerate(wb.rows):
        group = [rewards[j] for j, other in enumerate(wb.rows) if other.prompt_id == row.prompt_id]
        mean = sum(group) / len(group)
        sd = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        expected = (rewards[b] - mean) / ((sd + 1e-6) if std else 1.0)
        got = tg.advantages[b][tg.policy_mask[b]]
        assert got.numel() == len(row.response_ids)  # every response token, not whitened
        torch.testing.assert_close(got, torch.full_like(got, expected), atol=1e-5, rtol=1e-5)
    assert not tg.critic_mask.any()


def test_filter_groups_drops_the_groups_with_equal_rewards_and_counts_them(model_dir, tmp_path):
    trainer = Trainer(make_cfg(model_dir, tmp_path, *GRPO, "algo.filter_groups=true"), tmp_path)
    parity_rewards(trainer)
    wb, packed, rewards, tg = window_targets(trainer)
    equal = {pid for pid in {r.prompt_id for r in wb.rows}
             if len({rewards[j] for j, r in enumerate(wb.rows) if r.prompt_id == pid}) == 1}
    assert tg.filtered_groups == len(equal)
    for b, row in enumerate(wb.rows):
        assert bool(tg.policy_mask[b].any()) == (row.prompt_id not in equal)


def test_grpo_refuses_what_it_cannot_do(model_dir, tmp_path):
    for bad, match in (((*GRPO, "rollout.samples_per_prompt=1", "rollout.prompts_per_step=8"), "samples_per_prompt >= 2"),
                       (("algo.filter_groups=true",), "needs algo.algorithm=grpo"),
                       ((*PARTIAL, "algo.old_logprobs=engine"), "not engine")):
        with pytest.raises(ConfigError, match=match):
            make_cfg(model_dir, tmp_path, *bad)


# ---------------------------------------------------------------------- partial-rollout PPO


def test_partial_rollout_trains_each_response_once_whole_with_stale_tokens(model_dir, tmp_path):
    common = (*PARTIAL, "train.total_steps=6", "log.checkpoint_every=1")
    trainer = Trainer(make_cfg(model_dir, tmp_path / "full", *common), tmp_path / "full")
    parity_rewards(trainer)
    seen, generate = [], trainer.engine.generate_window
    trainer.engine.generate_window = lambda *a, **k: seen.append(generate(*a, **k)) or seen[-1]
    history = trainer.train()
    for m, wb in zip(history, seen):  # the policy's tokens: every token of the rows that finished now
        assert m["policy/tokens"] == sum(len(r.response_ids) for r in wb.rows if r.finished) == m["value/tokens"]
    assert any(m["rollout/carried_rows"] for m in history) and any(m["rollout/stale_token_frac"] > 0 for m in history)
    assert any(m["rollout/mismatch_kl"] > 0 for m in history), "older versions' tokens differ from pi_old"
    # resume after a step with rows in flight: they keep their sampling log-probs and versions
    at = next(m["step"] for m in history if m["rollout/carried_rows"])
    cut = Trainer(make_cfg(model_dir, tmp_path / "cut", *PARTIAL, f"train.total_steps={at}", "log.checkpoint_every=1"), tmp_path / "cut")
    parity_rewards(cut)
    cut.train()
    resumed = Trainer(resume_config(tmp_path / "cut", make_cfg(model_dir, tmp_path / "cut", *common)), tmp_path / "cut", resume=True)
    parity_rewards(resumed)
    carried = resumed.engine.carried
    assert carried and all(len(r.logprobs) == len(r.versions) == len(r.response_ids) > 0 for r in carried)
    resumed.train()
    no_eval = ("eval/",)  # the cut run evaluates at its last step
    assert deterministic_metrics(tmp_path / "cut", no_eval) == deterministic_metrics(tmp_path / "full", no_eval)
    for k, v in params(trainer.policy).items():
        assert torch.equal(v, params(resumed.policy)[k])


def test_partial_rollout_values_only_the_finished_rows(model_dir, tmp_path):
    trainer = Trainer(make_cfg(model_dir, tmp_path, *PARTIAL), tmp_path)
    parity_rewards(trainer)
    trainer.step()
    wb = trainer.engine.generate_window(trainer.policy, trainer.version)
    packed = wb.pack(trainer.tokenizer.pad_token_id)
    from tppo.advantages import rows_with_values

    rows = rows_with_values(trainer.cfg, packed)
    assert rows == [i for i, r in enumerate(wb.rows) if r.finished] and len(rows) < len(wb.rows)
    values = trainer._values(packed, rows)
    unfinished = [i for i in range(len(wb.rows)) if i not in rows]
    real = packed.attention_mask[rows]  # past a row's end: padding, whatever the micro-batch
    assert torch.all(values[unfinished] == 0)
    torch.testing.assert_close(values[rows][real], trainer._values(packed)[rows][real], atol=1e-6, rtol=1e-5)  # other batch-mates


# ---------------------------------------------------------------------- pi_old and the behaviour correction


def frozen_batch(trainer, cfg) -> StepBatch:
    """A carried-row window of the trainer (one step in), with the recomputed pi_old."""
    _, packed, rewards, tg = window_targets(trainer)
    old = trainer._old_logprobs(packed, tg.policy_mask, tg.lm_mask)
    return StepBatch(packed.input_ids, packed.attention_mask, tg.policy_mask, tg.critic_mask, tg.lm_mask, old,
                     trainer._values(packed)[:, :-1], tg.advantages, tg.returns, packed.response_mask[:, 1:],
                     packed.old_logprobs[:, 1:] + 0.3 * torch.randn(packed.old_logprobs[:, 1:].shape, generator=torch.Generator().manual_seed(0)),
                     torch.zeros_like(tg.policy_mask))


def sgd_policy(trainer, batch, cfg, source, monkeypatch):
    monkeypatch.setattr(updates_mod, "old_logprob_source", lambda cfg, device: source)
    policy = copy.deepcopy(trainer.policy)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    metrics = update_policy(policy, opt, sched, batch, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    return params(policy), metrics


@pytest.mark.parametrize("correction", ["none", "tis", "icepop"])
def test_one_pass_pi_old_gives_the_recomputes_update(model_dir, tmp_path, monkeypatch, correction):
    """One update per step: pi_old as the update's own forward, detached, gives the update a
    separate recompute gives (ratio 1, the same gradient, the same behaviour weights)."""
    cfg = make_cfg(model_dir, tmp_path, f"algo.behavior_correction={correction}", "train.grad_clip=0")
    trainer = Trainer(cfg, tmp_path)
    parity_rewards(trainer)
    trainer.step()
    batch = frozen_batch(trainer, cfg)
    assert batch.policy_mask.any() and (batch.response_mask & ~batch.policy_mask).any(), "a carried row's earlier window"
    one, m_one = sgd_policy(trainer, batch, cfg, "one_pass", monkeypatch)
    rec, m_rec = sgd_policy(trainer, batch, cfg, "recompute", monkeypatch)
    moved = [k for k in one if not torch.equal(one[k], params(trainer.policy)[k])]
    assert moved, "the update moved the policy"
    for k in one:
        torch.testing.assert_close(one[k], rec[k], atol=1e-6, rtol=1e-5)
    for k in ("policy/is_weight_mean", "policy/is_clipped_frac", "rollout/mismatch_kl"):
        assert m_one[k] == pytest.approx(m_rec[k], rel=1e-4, abs=1e-7)
    if correction != "none":  # mu was perturbed: the correction is active
        assert m_one["policy/is_weight_mean"] != pytest.approx(1.0, abs=1e-3)


def test_tis_weights_in_the_loop_match_the_formula(model_dir, tmp_path, monkeypatch):
    """Several updates per step (pi_old recomputed): the logged TIS weight mean and capped
    fraction are min(pi_old / mu, 2) over the step's policy tokens, with mu perturbed."""
    cfg = make_cfg(model_dir, tmp_path, "algo.behavior_correction=tis", "train.ppo_epochs=2", "algo.old_logprobs=recompute")
    trainer = Trainer(cfg, tmp_path)
    parity_rewards(trainer)
    trainer.step()
    batch = frozen_batch(trainer, cfg)
    _, m = sgd_policy(trainer, batch, cfg, "recompute", monkeypatch)
    w = torch.exp(batch.old_logprobs - batch.behavior_logprobs)[batch.policy_mask]
    assert m["policy/is_weight_mean"] == pytest.approx(float(w.clamp(max=2.0).mean()), rel=1e-5)
    assert m["policy/is_clipped_frac"] == pytest.approx(float((w > 2.0).float().mean()), abs=1e-6)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(float((batch.old_logprobs - batch.behavior_logprobs)[batch.policy_mask].abs().mean()), rel=1e-5)
