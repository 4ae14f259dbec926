"""The trainer: smoke runs, T-PPO token routing, T-PPO == PPO when W covers responses,
micro-batch invariance of the update, exact resume, config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from tppo.config import Config, ConfigError, load_config
from tppo.metrics import STEP_KEYS, read_metrics
from trainer_helpers import deterministic_metrics, make_cfg, params
from tppo.rollout import PromptItem, Row, RolloutStats, WindowBatch
from tppo.trainer import StepBatch, Trainer, compute_advantages, resume_config, update_policy

@pytest.mark.parametrize("algorithm", ["tppo", "ppo"])
def test_two_step_smoke_run(model_dir, tmp_path, algorithm):
    extra = ["rollout.window_tokens=18"] if algorithm == "ppo" else []
    cfg = make_cfg(model_dir, tmp_path, f"algo.algorithm={algorithm}", *extra)
    trainer = Trainer(cfg, tmp_path)
    p0, c0 = params(trainer.policy), params(trainer.critic)
    history = trainer.train()
    assert any(not torch.equal(p0[k], v) for k, v in params(trainer.policy).items())
    assert any(not torch.equal(c0[k], v) for k, v in params(trainer.critic).items())
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        missing = [k for k in STEP_KEYS if k not in m]
        assert not missing, missing
        # Every token generated in this window enters the policy loss, and only those.
        assert m["policy/tokens"] == m["rollout/generated_tokens"] > 0
    assert "eval/accuracy" in lines[-1]
    if algorithm == "ppo":
        assert all(m["rollout/carried_rows"] == 0 for m in lines)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints").is_dir()


def test_critic_is_trained_on_finished_rows_only(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path)
    trainer = Trainer(cfg, tmp_path)
    seen_finished = seen_cut = False
    for _ in range(4):
        wb = trainer.engine.generate_window(trainer.policy, 0)
        rewards = trainer._score(wb)
        packed = wb.pack(trainer.tokenizer.pad_token_id)
        values = trainer._values(packed)
        adv, pmask, ret, cmask, _ = compute_advantages(cfg, packed, values, rewards)
        fin = [r.finished for r in wb.rows]
        for b, row in enumerate(wb.rows):
            assert int(cmask[b].sum()) == (len(row.response_ids) if fin[b] else 0)
            assert int(pmask[b].sum()) == len(row.response_ids) - wb.window_start[b]
            if fin[b]:  # Monte-Carlo target: the final reward on every token (gamma = 1)
                assert torch.all(ret[b][cmask[b]] == rewards[b])
        seen_finished |= any(fin)
        seen_cut |= not all(fin)
    assert seen_finished and seen_cut


def window_batch(rows_spec):
    """A hand-made WindowBatch: (prompt, response, window_start, finish_reason, answer)."""
    rows = []
    for i, (prompt, response, start, reason, answer) in enumerate(rows_spec):
        rows.append(Row(i, i, 0, prompt, {"answer": answer}, 100, list(response), [-1.0] * len(response),
                        [0] * len(response), windows=1, finish_reason=reason))
    return WindowBatch(rows, [s for _, _, s, _, _ in rows_spec], RolloutStats(len(rows), 1, 1, 1, 0.0, 0.0))


def test_token_routing_by_hand():
    """Prompt and earlier-window tokens are context only; the reward sits on the last token."""
    cfg = Config()
    cfg.algo.whiten_advantages = False
    cfg.algo.lam_policy = 1.0
    wb = window_batch([
        ([5, 6], [7, 8, 9], 1, "eos", "x"),  # finished: window = tokens 8, 9
        ([5], [7, 7, 7, 7], 2, None, "x"),  # cut: window = tokens 3, 4 of the response
    ])
    packed = wb.pack(0)
    values = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9]])
    adv, pmask, ret, cmask, lm = compute_advantages(cfg, packed, values, [1.0, None])
    # Shifted frame: column j is token j + 1.
    assert pmask.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert cmask.tolist() == [[False, True, True, True], [False, False, False, False]]
    assert ret[0].tolist() == [0.0, 1.0, 1.0, 1.0]
    # Finished row, lambda = gamma = 1: A = R - V(s_t); V(s) of token j+1's state is values[j].
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0.0, 1.0 - 0.2, 1.0 - 0.3]))
    # Cut row, prev_value bootstrap: A_t = V(s_{l-1}) - V(s_t) = 0.8 - V.
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, 0.8 - 0.7, 0.0]))
    assert lm.tolist() == [[False, True, True, True], [False, False, False, False]]


def test_tppo_step_equals_ppo_step_when_the_window_covers_every_response(model_dir, tmp_path):
    results = {}
    for algorithm in ("tppo", "ppo"):
        cfg = make_cfg(model_dir, tmp_path / algorithm, f"algo.algorithm={algorithm}", "rollout.window_tokens=18", "train.total_steps=1")
        trainer = Trainer(cfg, tmp_path / algorithm)
        trainer.step()
        results[algorithm] = (params(trainer.policy), params(trainer.critic))
    for a, b in zip(results["tppo"], results["ppo"]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_micro_batching_does_not_change_the_update(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path)
    trainer = Trainer(cfg, tmp_path)
    wb = trainer.engine.generate_window(trainer.policy, 0)
    packed = wb.pack(trainer.tokenizer.pad_token_id)
    values = trainer._values(packed)
    adv, pmask, ret, cmask, lm = compute_advantages(cfg, packed, values, trainer._score(wb))
    batch = StepBatch(packed.input_ids, packed.attention_mask, pmask, cmask, lm, packed.old_logprobs[:, 1:], values[:, :-1], adv, ret)
    out = []
    for rows in (1, 3, 64):
        policy = copy.deepcopy(trainer.policy)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        c = copy.deepcopy(cfg)
        c.train.micro_batch_rows = rows
        c.train.grad_clip = 0.0
        update_policy(policy, opt, sched, batch, c, torch.Generator().manual_seed(0), torch.device("cpu"))
        out.append(params(policy))
    for other in out[1:]:
        for k in out[0]:
            torch.testing.assert_close(other[k], out[0][k], atol=1e-5, rtol=1e-4)


def test_resume_is_exact(model_dir, tmp_path):
    common = ("train.total_steps=4", "log.checkpoint_every=2", "log.eval_every=2")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Trainer(make_cfg(model_dir, full_dir, *common), full_dir)
    full.train()
    cut = Trainer(make_cfg(model_dir, cut_dir, *common[1:], "train.total_steps=2"), cut_dir)
    cut.train()
    cfg = resume_config(cut_dir, make_cfg(model_dir, cut_dir, *common))
    resumed = Trainer(cfg, cut_dir, resume=True)
    assert resumed.step_idx == 2 and resumed.engine.carried, "rows in flight must survive the checkpoint"
    resumed.train()
    assert deterministic_metrics(cut_dir) == deterministic_metrics(full_dir)
    for k, v in params(full.policy).items():
        assert torch.equal(v, params(resumed.policy)[k])


def test_resume_refuses_a_different_config_naming_fields(model_dir, tmp_path):
    Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=1"), tmp_path).train()
    with pytest.raises(ConfigError, match=r"differing fields: .*rollout.window_tokens"):
        resume_config(tmp_path, make_cfg(model_dir, tmp_path, "rollout.window_tokens=4"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(make_cfg(model_dir, tmp_path / "empty"), tmp_path / "empty", resume=True)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["rollout.windw_tokens=3"], "unknown config key 'rollout.windw_tokens'"),
        (["bogus.key=1"], "unknown config key 'bogus'"),
        (["train.total_steps=ten"], "config key 'train.total_steps': expected int"),
        (["train.policy_lr=true"], "config key 'train.policy_lr': expected float"),
        (["algo.bootstrap=maybe"], "config key 'algo.bootstrap': 'maybe' is not one of"),
        (["rollout.window_tokens=300"], "rollout.window_tokens \\(300\\) exceeds rollout.max_response_tokens"),
        (["algo.algorithm=ppo"], "algo.algorithm 'ppo' generates whole responses"),
        (["train.mini_batches=3"], "train.mini_batches \\(3\\) must divide"),
        (["rollout.samples_per_prompt"], "not of the form"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_yaml_roundtrip_and_types(tmp_path):
    from tppo.config import save_config

    cfg = load_config(None, ["train.policy_lr=1", "algo.lam_policy=0.97", "algo.dual_clip=null", "train.betas=[0.9, 0.95]"])
    assert cfg.train.policy_lr == 1.0 and isinstance(cfg.train.policy_lr, float)
    assert cfg.algo.lam_policy == 0.97 and cfg.algo.dual_clip is None and cfg.train.betas == (0.9, 0.95)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    (tmp_path / "dup.yaml").write_text("algo:\n  gamma: 1.0\ntrain:\n  seed: 1\nalgo:\n  lam_min: 0.9\n")
    with pytest.raises(ConfigError, match="duplicate key 'algo' at line 5"):
        load_config(tmp_path / "dup.yaml")
    (tmp_path / "bad.yaml").write_text("rollout: [1, 2]\n")
    with pytest.raises(ConfigError, match="rollout: expected a mapping"):
        load_config(tmp_path / "bad.yaml")


def test_window_ignore_tokens_and_critic_on_all_by_hand():
    cfg = Config()
    cfg.algo.whiten_advantages = False
    cfg.algo.lam_policy = 1.0
    cfg.algo.window_ignore_tokens = 1
    cfg.algo.critic_on = "all"
    wb = window_batch([
        ([5, 6], [7, 8, 9], 1, "eos", "x"),  # finished: its window keeps every advantage
        ([5], [7, 7, 7, 7], 2, None, "x"),  # cut: the last window token's advantage is zeroed
    ])
    packed = wb.pack(0)
    values = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9]])
    adv, pmask, ret, cmask, _ = compute_advantages(cfg, packed, values, [1.0, None])
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0.0, 0.8, 0.7]))
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, 0.1, 0.0]))  # was 0.1, 0.0 anyway at the cut
    cfg.algo.bootstrap = "next_value"  # V(s_l) = 0.9 (critic at the last token)
    adv, _, ret, cmask, _ = compute_advantages(cfg, packed, values, [1.0, None])
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, 0.9 - 0.7, 0.0]))  # 0.9 - 0.8 zeroed by the ignore
    # critic_on=all: the cut row's window tokens join the critic with bootstrapped targets.
    assert cmask[1].tolist() == [False, False, True, True]
    torch.testing.assert_close(ret[1][2:], torch.tensor([0.9, 0.9]))


def test_optional_loss_terms_run_and_are_logged(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path, "algo.kl_coef=0.05", "algo.entropy_coef=0.01", "algo.lm_loss_coef=0.1",
                   "train.total_steps=3", "rollout.window_tokens=18", "algo.algorithm=ppo", "train.mini_batches=2")
    trainer = Trainer(cfg, tmp_path)
    history = trainer.train()
    assert trainer.ref is not None
    assert all(m["policy/kl"] >= 0 and m["policy/kl"] == m["policy/kl"] for m in history)
    assert history[-1]["policy/kl"] > 0  # the policy moved away from the reference
