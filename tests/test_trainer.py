"""The trainer: smoke runs, T-PPO token routing, T-PPO == PPO when W covers responses,
micro-batch invariance of the update, exact resume, config errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tppo import algos
from tppo.config import Config, ConfigError, load_config
from tppo.metrics import STEP_KEYS, read_metrics
from trainer_helpers import capped_prompts, deterministic_metrics, make_cfg, params
from tppo.rollout import PromptItem, Row, RolloutStats, WindowBatch
from tppo.advantages import compute_advantages as _compute_advantages
from tppo.advantages import policy_lambda
from tppo.trainer import Trainer, resume_config
from tppo.updates import StepBatch, token_logprobs, update_critic, update_policy, used_columns

def compute_advantages(*args, **kwargs):
    """tppo.advantages.compute_advantages's targets as a tuple (advantages, policy mask,
    returns, critic mask, LM mask)."""
    tg = _compute_advantages(*args, **kwargs)
    return tg.advantages, tg.policy_mask, tg.returns, tg.critic_mask, tg.lm_mask


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


@pytest.mark.parametrize("refill", [False, True])
def test_critic_is_trained_on_finished_rows_only(model_dir, tmp_path, refill):
    """Per row: the critic's tokens are all its response tokens when it finished, none
    otherwise; the policy's are exactly this window's. With in-window refill, rows join
    mid-window (their whole response is this window's) and a group's G samples still
    start together (same window count while in flight)."""
    cfg = make_cfg(model_dir, tmp_path, f"rollout.refill_within_window={str(refill).lower()}")
    trainer = Trainer(cfg, tmp_path)
    capped_prompts(trainer, lambda pid: [2, 18, 5, 18][pid % 4])  # rows finish mid-window: slots to refill
    seen_finished = seen_cut = seen_joined = False
    for _ in range(4):
        wb = trainer.engine.generate_window(trainer.policy, 0)
        groups: dict[int, set[int]] = {}
        for r in wb.rows:
            groups.setdefault(r.prompt_id, set()).add(r.windows)
        assert all(len(w) == 1 for w in groups.values()), groups
        seen_joined |= len(wb.rows) > cfg.rollout.num_slots
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
    assert seen_finished and seen_cut and seen_joined == refill


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
    # the positive-example LM loss's tokens: none while its weight is 0 (with prefix_grad
    # false they would widen the span: the approximation would depend on the reward)
    assert not lm.any()
    cfg.algo.lm_loss_coef = 0.1
    assert compute_advantages(cfg, packed, values, [1.0, None])[4].tolist() == [[False, True, True, True], [False, False, False, False]]


@pytest.mark.parametrize("tppo_window", [18, 6])
def test_tppo_step_equals_ppo_step_when_every_response_fits_in_the_first_window(model_dir, tmp_path, tppo_window):
    """With every response finishing inside its first window, EGAE is GAE and T-PPO's step
    is PPO's, also at W < L (W = 6, L = 18, responses of 1-6 tokens). lam_alpha = 1 makes
    the adaptive lambda 1 - 1/l depend on each length, so a length estimate that differs
    between the two (W / 2 added to a finished row) changes the update."""
    results = {}
    for algorithm, window in (("tppo", tppo_window), ("ppo", 18)):
        cfg = make_cfg(model_dir, tmp_path / algorithm, f"algo.algorithm={algorithm}", f"rollout.window_tokens={window}",
                       "train.total_steps=1", "algo.lam_policy=adaptive", "algo.lam_alpha=1.0", "algo.lam_min=0.0")
        trainer = Trainer(cfg, tmp_path / algorithm)
        capped_prompts(trainer, lambda pid: 1 + pid % 6)
        m = trainer.step()
        assert m["rollout/carried_rows"] == 0 and m["rollout/finished_rows"] == cfg.rollout.num_slots
        assert m["rollout/response_length_max"] > 1
        results[algorithm] = (params(trainer.policy), params(trainer.critic))
    for a, b in zip(results["tppo"], results["ppo"]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def one_window_batch(trainer, cfg) -> StepBatch:
    wb = trainer.engine.generate_window(trainer.policy, 0)
    packed = wb.pack(trainer.tokenizer.pad_token_id)
    values = trainer._values(packed)
    adv, pmask, ret, cmask, lm = compute_advantages(cfg, packed, values, trainer._score(wb))
    return StepBatch(packed.input_ids, packed.attention_mask, pmask, cmask, lm, packed.old_logprobs[:, 1:], values[:, :-1], adv, ret,
                     packed.response_mask[:, 1:], packed.old_logprobs[:, 1:], torch.zeros_like(pmask))


def sgd_update(model, update, batch, cfg, *, ref=None, **overrides):
    """A copy of ``model`` after ``update`` (update_policy / update_critic) with SGD at lr 1,
    no gradient clipping; ``overrides`` set config fields, ``section__name=value``."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    c = copy.deepcopy(cfg)
    c.train.grad_clip = 0.0
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    extra = {"ref": ref} if ref is not None else {}
    update(model, opt, sched, batch, c, torch.Generator().manual_seed(0), torch.device("cpu"), **extra)
    return model


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batching_does_not_change_the_update(model_dir, tmp_path, loss_agg):
    """Policy and critic updates are the same for 1, 3 or all rows per micro-batch, and for
    micro-batches packed by a token budget, in every aggregation mode (the seq modes divide
    by the mini-batch's row count)."""
    cfg = make_cfg(model_dir, tmp_path, f"algo.loss_agg={loss_agg}", "train.total_steps=3")
    trainer = Trainer(cfg, tmp_path)
    trainer.step()  # a second window: carried rows, and rows finishing at the cap
    batch = one_window_batch(trainer, cfg)
    assert batch.critic_mask.any() and (batch.critic_mask.any(1) != batch.policy_mask.any(1)).any()
    for model, update in ((trainer.policy, update_policy), (trainer.critic, update_critic)):
        before = params(model)
        splits = [{"train__micro_batch_rows": rows} for rows in (1, 3, 64)] + [{"train__micro_batch_tokens": 40}]
        out = [params(sgd_update(model, update, batch, cfg, **split)) for split in splits]
        assert any(not torch.equal(out[0][k], before[k]) for k in before)
        for other in out[1:]:
            for k in out[0]:
                torch.testing.assert_close(other[k], out[0][k], atol=1e-5, rtol=1e-4)


def test_prefix_grad_false_drops_only_earlier_windows_gradient(model_dir, tmp_path):
    """``algo.prefix_grad: false`` (tppo/prefix.py): on the first window (no carried rows)
    the update is the exact one; on a window with carried rows it differs, and it still
    does not depend on the micro-batch split (each row's span is its own)."""
    cfg = make_cfg(model_dir, tmp_path, "train.total_steps=3")
    trainer = Trainer(cfg, tmp_path)
    first = one_window_batch(trainer, cfg)
    assert not (first.response_mask & ~first.policy_mask).any()  # every response is this window's
    exact, truncated = (params(sgd_update(trainer.policy, update_policy, first, cfg, algo__prefix_grad=flag)) for flag in (True, False))
    for k in exact:
        torch.testing.assert_close(truncated[k], exact[k], atol=1e-6, rtol=1e-5)
    trainer.step()
    batch = one_window_batch(trainer, cfg)
    assert (batch.response_mask & ~batch.policy_mask).any(), "no carried row in the second window"
    exact = params(sgd_update(trainer.policy, update_policy, batch, cfg))
    splits = [params(sgd_update(trainer.policy, update_policy, batch, cfg, algo__prefix_grad=False, train__micro_batch_rows=n))
              for n in (1, 64)]
    assert any(not torch.allclose(splits[0][k], exact[k], atol=1e-6, rtol=1e-5) for k in exact)
    for k in exact:
        torch.testing.assert_close(splits[1][k], splits[0][k], atol=1e-5, rtol=1e-4)


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
        (["train.mini_batches=3"], "train.mini_batches \\(3\\) must divide"),
        (["rollout.samples_per_prompt"], "not of the form"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_synchronous_algorithms_take_whole_responses_and_say_so(algorithm):
    cfg = load_config(None, [f"algo.algorithm={algorithm}", "rollout.window_tokens=64", "rollout.max_response_tokens=256"])
    assert cfg.rollout.window_tokens == 256 and cfg.notes == [f"algo.algorithm {algorithm} generates whole responses: "
                                                               "rollout.window_tokens 64 -> 256 (rollout.max_response_tokens)"]
    assert load_config(None, ["rollout.window_tokens=64"]).notes == []


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
    cfg.algo.window_ignore_tokens = 2
    cfg.algo.critic_on = "all"
    wb = window_batch([
        ([5, 6], [7, 8, 9], 1, "eos", "x"),  # finished: its window keeps every advantage
        ([5], [7, 7, 7, 7, 7], 2, None, "x"),  # cut: the last 2 of its 3 window tokens are zeroed
    ])
    packed = wb.pack(0)
    values = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.6, 0.7, 0.8, 0.9, 1.3]])
    adv, pmask, ret, cmask, _ = compute_advantages(cfg, packed, values, [1.0, None])
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0.0, 0.8, 0.7, 0.0]))
    # prev_value: A_t = V(s_{l-1}) - V(s_t) = 0.9 - (0.7, 0.8, 0.9) = (0.2, 0.1, 0); the ignore zeroes 0.1 and 0.
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0]))
    cfg.algo.bootstrap = "next_value"  # V(s_l) = 1.3 (critic at the last token): 1.3 - V
    adv, _, ret, cmask, _ = compute_advantages(cfg, packed, values, [1.0, None])
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, 1.3 - 0.7, 0.0, 0.0]))
    # critic_on=all: the cut row's window tokens join the critic with bootstrapped targets.
    assert cmask[1].tolist() == [False, False, True, True, True]
    torch.testing.assert_close(ret[1][2:], torch.tensor([1.3, 1.3, 1.3]))


def test_advantages_are_whitened_over_this_windows_tokens_only():
    """Whitening statistics come from the policy tokens (this window), not from every
    response token: earlier-window tokens of a carried row have no advantage at all."""
    cfg = Config()
    cfg.algo.lam_policy = 1.0
    wb = window_batch([
        ([5, 6], [7, 8, 9], 1, "eos", "x"),
        ([5], [7, 7, 7, 7, 7], 2, None, "x"),  # tokens 0-1 of the response are an earlier window's
    ])
    packed = wb.pack(0)
    values = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.6, 0.7, 0.8, 0.9, 1.3]])
    cfg.algo.whiten_advantages = False
    raw, pmask, *_ = compute_advantages(cfg, packed, values, [1.0, None])
    cfg.algo.whiten_advantages = True
    adv, *_ = compute_advantages(cfg, packed, values, [1.0, None])
    x = raw[pmask]  # 0.8, 0.7 | 0.2, 0.1, 0.0
    expected = (x - x.mean()) / x.std(unbiased=True)
    torch.testing.assert_close(adv[pmask], expected, atol=1e-6, rtol=1e-5)
    assert torch.all(adv[~pmask] == 0)


def test_adaptive_lambda_estimates_only_unfinished_lengths_by_hand():
    """VAPO's lambda = max(lam_min, 1 - 1/(alpha l)); a cut row's l is its length so far
    + W/2, a finished row's its true length."""
    cfg = Config()
    cfg.algo.lam_policy, cfg.algo.lam_alpha, cfg.algo.lam_min = "adaptive", 0.1, 0.1
    cfg.rollout.window_tokens = 8
    wb = window_batch([([5], [7] * 25, 20, "eos", "x"), ([5], [7] * 16, 8, None, "x"), ([5], [7] * 4, 0, "length", "x")])
    lam = policy_lambda(cfg, wb.pack(0))
    torch.testing.assert_close(lam, torch.tensor([1 - 1 / (0.1 * 25), 1 - 1 / (0.1 * (16 + 4)), 0.1]))


def test_kl_coef_adds_exactly_its_gradient(model_dir, tmp_path):
    """update(kl_coef = c) - update(kl_coef = 0) = -c * grad of the token-mean k3 KL to the
    reference (SGD at lr 1, one mini-batch), computed here independently."""
    cfg = make_cfg(model_dir, tmp_path, "algo.kl_coef=0.5", "rollout.temperature=0.8")
    trainer = Trainer(cfg, tmp_path)
    batch = one_window_batch(trainer, cfg)
    ref = copy.deepcopy(trainer.policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    with_kl = params(sgd_update(trainer.policy, update_policy, batch, cfg, ref=ref, algo__kl_coef=0.5))
    without = params(sgd_update(trainer.policy, update_policy, batch, cfg, ref=ref, algo__kl_coef=0.0))
    policy = copy.deepcopy(trainer.policy).train()
    S = batch.input_ids.shape[1]
    lp, _ = token_logprobs(policy, batch.input_ids, batch.attention_mask, 0.8)
    with torch.no_grad():
        ref_lp, _ = token_logprobs(ref, batch.input_ids, batch.attention_mask, 0.8)
    kl_mean = algos.masked_mean(algos.kl(lp, ref_lp, "k3"), batch.policy_mask[:, : S - 1])
    assert kl_mean > 0
    kl_mean.backward()
    grads = {k: p.grad for k, p in policy.named_parameters() if p.grad is not None}
    assert grads
    for k, g in grads.items():
        torch.testing.assert_close(with_kl[k] - without[k], -0.5 * g, atol=1e-6, rtol=1e-4)


def test_optional_loss_terms_run_and_are_logged(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path, "algo.kl_coef=0.05", "algo.entropy_coef=0.01", "algo.lm_loss_coef=0.1",
                   "train.total_steps=3", "rollout.window_tokens=18", "algo.algorithm=ppo", "train.mini_batches=2")
    trainer = Trainer(cfg, tmp_path)
    history = trainer.train()
    assert trainer.ref is not None
    assert all(m["policy/kl"] >= 0 and m["policy/kl"] == m["policy/kl"] for m in history)
    assert history[-1]["policy/kl"] > 0  # the policy moved away from the reference


# ---------------------------------------------------------------------- tests that each listed mutation fails
# (tests/mutations.py applies the mutations one at a time and checks that these catch them)


def capture_windows(trainer) -> list:
    """Record every WindowBatch the trainer's engine returns."""
    seen, generate = [], trainer.engine.generate_window
    trainer.engine.generate_window = lambda *args, **kw: seen.append(generate(*args, **kw)) or seen[-1]
    return seen


def critic_loss_by_hand(trainer, wb) -> float:
    """0.5 * mean over finished rows' response tokens of (V(s_t) - R)^2, V(s_t) read off
    the critic at the token before t (a naive loop over rows and tokens)."""
    values = trainer._values(wb.pack(trainer.tokenizer.pad_token_id))
    rewards = trainer._score(wb)
    errs = []
    for b, (row, r) in enumerate(zip(wb.rows, rewards)):
        if r is not None:
            P = len(row.prompt_ids)
            errs += [(float(values[b, P - 1 + t]) - r) ** 2 for t in range(len(row.response_ids))]
    return 0.5 * sum(errs) / len(errs)


@pytest.mark.parametrize("precision,source,prefix_grad,batching", [
    ("fp32", "auto", True, "rows"), ("bf16", "auto", True, "rows"), ("bf16", "engine", True, "rows"), ("fp32", "auto", False, "rows"),
    ("bf16", "auto", False, "rows"), ("bf16", "auto", False, "tokens"), ("bf16", "auto", True, "tokens"),
    ("bf16", "recompute", False, "minibatches"), ("bf16", "recompute", False, "tokens-minibatches"),
    ("bf16", "auto", False, "one-pass"), ("bf16", "auto", True, "one-pass")])
def test_frozen_models_give_ratio_one_and_the_hand_value_loss(model_dir, tmp_path, monkeypatch, precision, source, prefix_grad, batching):
    """lr 0, T != 1, W < L with carried rows: the policy has not moved, so every PPO ratio
    is 1 and nothing is clipped; the value loss is the hand-computed one with the
    pre-update values as v_old. bf16 forces the GPU's autocast path on the CPU: the
    engine's fp32 log-probs then differ from the update's, unless they are recomputed
    (with ``prefix_grad: false``, with the update's own prefix / span split), whatever the
    update's micro-batching (rows, a token budget, shuffled mini-batches) or with one
    update per step, where pi_old is the update's own forward. The mismatch against the
    engine's mu is measured: ~0 in fp32, positive under bf16."""
    import tppo.updates as updates_mod

    if precision == "bf16":
        monkeypatch.setattr(updates_mod, "mixed_precision", lambda cfg, device: True)
    updates = {"rows": ["train.ppo_epochs=2"], "tokens": ["train.ppo_epochs=2", "train.micro_batch_tokens=40"],
               "minibatches": ["train.mini_batches=2"], "tokens-minibatches": ["train.mini_batches=2", "train.micro_batch_tokens=60", "train.micro_batch_rows=3"],
               "one-pass": []}[batching]
    cfg = make_cfg(model_dir, tmp_path, "train.policy_lr=0", "train.critic_lr=0", "rollout.temperature=0.7",
                   "train.total_steps=4", *updates, "algo.value_clip_low=0.001", "algo.value_clip_high=0.001",
                   f"algo.old_logprobs={source}", f"algo.prefix_grad={str(prefix_grad).lower()}")
    pi_old = updates_mod.old_logprob_source(cfg, torch.device("cpu"))
    assert pi_old == ("engine" if source == "engine" or (precision, batching) == ("fp32", "rows") else
                      "one_pass" if batching == "one-pass" else "recompute")
    trainer = Trainer(cfg, tmp_path)
    windows = capture_windows(trainer)
    history = trainer.train()
    assert any(m["rollout/carried_rows"] for m in history) and any(m["rollout/finished_rows"] for m in history)
    assert any(wb.window_start[i] > 0 for wb in windows for i in range(len(wb.rows))), "no carried row reached the update"
    ratio_err = max(max(abs(m["policy/ratio_max"] - 1), abs(m["policy/ratio_min"] - 1)) for m in history)
    if source == "engine":  # the guard: this path must show the mismatch the recomputation removes
        assert ratio_err > 1e-4
        return
    assert ratio_err < (1e-5 if precision == "fp32" else 1e-6)
    assert all(m["policy/clipfrac"] == 0 and m["policy/approx_kl"] < 1e-10 for m in history if m["policy/updated"])
    kls = [m["rollout/mismatch_kl"] for m in history if m["policy/updated"]]
    if pi_old == "engine":  # pi_old is mu itself: nothing measured
        assert all(math.isnan(k) for k in kls)
    elif precision == "bf16":  # the engine sampled in fp32, the update runs in bf16: a measured gap
        assert all(k > 1e-9 for k in kls) and all(m["rollout/logprob_diff_max"] > 1e-3 for m in history)
    else:  # fp32: the engine's and the trainer's numerics agree
        assert all(0 <= k < 1e-10 for k in kls) and all(m["rollout/logprob_diff_max"] < 1e-4 for m in history)
    for m, wb in zip(history, windows):
        if m["rollout/finished_rows"] and precision == "fp32":
            assert m["value/loss"] == pytest.approx(critic_loss_by_hand(trainer, wb), rel=1e-5)


def test_logprobs_on_used_columns_equal_the_full_projection_with_the_same_gradient(model_dir, tmp_path):
    """Projecting only the window's columns onto the vocabulary (logits_to_keep) gives the
    same log-probs and entropies there, zeros elsewhere, and the same gradient."""
    cfg = make_cfg(model_dir, tmp_path, "train.total_steps=2")
    trainer = Trainer(cfg, tmp_path)
    trainer.step()
    batch = one_window_batch(trainer, cfg)
    cols = used_columns(batch.policy_mask)
    assert 0 < cols.numel() < batch.policy_mask.shape[1]
    out = []
    for columns in (None, cols):
        policy = copy.deepcopy(trainer.policy)
        lp, ent = token_logprobs(policy, batch.input_ids, batch.attention_mask, 0.7, "grad", columns)
        algos.masked_mean(lp * 1.3 + ent, batch.policy_mask).backward()
        out.append((lp.detach(), ent.detach(), {k: p.grad for k, p in policy.named_parameters()}))
    (lp_full, ent_full, g_full), (lp_cols, ent_cols, g_cols) = out
    pm = batch.policy_mask
    torch.testing.assert_close(lp_cols[pm], lp_full[pm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_cols[pm], ent_full[pm], atol=1e-5, rtol=1e-5)
    assert torch.all(lp_cols[:, [c for c in range(pm.shape[1]) if c not in cols.tolist()]] == 0)
    for k in g_full:
        torch.testing.assert_close(g_cols[k], g_full[k], atol=1e-6, rtol=1e-4)


def test_token_micro_batches_pack_rows_of_similar_length_by_hand():
    from tppo.batching import row_micro_batches, token_micro_batches

    rows, lengths = [0, 1, 2, 3, 4], [10, 30, 12, 28, 5]
    # longest first: 1 (30), 3 (28) -> 2 x 30 = 60 fits; 2 (12) opens a batch; 0 and 4 join it (3 x 12 = 36)
    assert token_micro_batches(rows, lengths, budget=60, max_rows=4) == [[1, 3], [2, 0, 4]]
    assert token_micro_batches(rows, lengths, budget=60, max_rows=2) == [[1, 3], [2, 0], [4]]
    assert token_micro_batches(rows, lengths, budget=20, max_rows=8) == [[1], [3], [2], [0, 4]]  # longer than the budget: alone
    assert row_micro_batches(rows, 2) == [[0, 1], [2, 3], [4]]


def test_work_counter_by_hand():
    from tppo.updates import WorkCounter

    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    w = WorkCounter()
    w.forward("work/value_positions", attn)  # 2 rows x 5 positions, 2 of them padding
    assert w.counts["work/value_positions"] == 10 and w.counts["work/padding_positions"] == 2
    # the prefix/span split at starts (2, 0): prefix width 2, spans of 3 and 3 -> 4 + 6 positions for 8 tokens
    w.forward("work/policy_positions", attn, torch.tensor([2, 0]), prefix_key="work/policy_prefix_positions")
    assert w.counts["work/policy_positions"] == 6 and w.counts["work/policy_prefix_positions"] == 4
    assert w.counts["work/padding_positions"] == 2 + 2
    w.forward("work/old_logprob_positions", attn, torch.tensor([2, 0]), min_prefix=4)  # padded to the step's width 4: 8 + 6
    assert w.counts["work/old_logprob_positions"] == 14 and w.counts["work/padding_positions"] == 4 + 6


@pytest.mark.parametrize("prefix_grad", [True, False])
def test_every_step_logs_the_work_of_each_pass_by_hand(model_dir, tmp_path, prefix_grad):
    """One micro-batch of all B rows (8 slots; fewer when a lone free slot waits for a
    group): the value pass and the update run B x the longest row; the critic update the finished rows x their longest; no recompute (one pass);
    the decode and prefill counts are the engine's."""
    cfg = make_cfg(model_dir, tmp_path, "train.micro_batch_rows=8", "train.total_steps=3", f"algo.prefix_grad={str(prefix_grad).lower()}")
    trainer = Trainer(cfg, tmp_path)
    windows = capture_windows(trainer)
    history = trainer.train()
    assert any(wb.window_start[i] > 0 for wb in windows for i in range(len(wb.rows)))
    for m, wb in zip(history, windows):
        n, B = [len(r.prompt_ids) + len(r.response_ids) for r in wb.rows], len(wb.rows)
        fin = [x for x, r in zip(n, wb.rows) if r.finished]
        crit = len(fin) * max(fin, default=0)
        assert m["work/value_positions"] == B * max(n) and m["work/old_logprob_positions"] == 0
        assert m["work/critic_positions"] == crit
        assert m["work/prefill_tokens"] == sum(len(r.prompt_ids) + s for r, s in zip(wb.rows, wb.window_start))
        assert m["work/prefill_positions"] == B * max(len(r.prompt_ids) + s for r, s in zip(wb.rows, wb.window_start))  # left padded
        assert m["work/decode_steps"] == m["rollout/decode_steps"] and m["rollout/generated_tokens"] <= m["work/row_steps"] <= B * m["work/decode_steps"]
        if prefix_grad:
            assert m["work/policy_positions"] == B * max(n) and m["work/policy_prefix_positions"] == 0
            assert m["work/padding_positions"] == 2 * (B * max(n) - sum(n)) + crit - sum(fin)
        else:  # spans from each carried row's window start; prefixes left-padded to the widest
            starts = [len(r.prompt_ids) - 1 + s if s else 0 for r, s in zip(wb.rows, wb.window_start)]
            P, T = max(starts), max(x - g for x, g in zip(n, starts))
            assert m["work/policy_positions"] == B * T and m["work/policy_prefix_positions"] == B * P
            assert m["work/padding_positions"] == (B * max(n) - sum(n)) + (B * (P + T) - sum(n)) + crit - sum(fin)


def test_the_value_pass_is_packed_by_the_token_budget_too(model_dir, tmp_path):
    """train.micro_batch_tokens packs the no-gradient value pass as it packs the updates:
    fewer padded positions, the same values (up to float rounding of other batch-mates)."""
    runs = {}
    for name, extra in (("rows", []), ("tokens", ["train.micro_batch_tokens=60"])):
        cfg = make_cfg(model_dir, tmp_path / name, "train.micro_batch_rows=8", "train.total_steps=3", *extra)
        trainer = Trainer(cfg, tmp_path / name)
        runs[name] = (trainer.train(), params(trainer.critic))
    (rows, c_rows), (tokens, c_tokens) = runs["rows"], runs["tokens"]
    assert sum(m["work/value_positions"] for m in tokens) < sum(m["work/value_positions"] for m in rows)
    for k in c_rows:
        torch.testing.assert_close(c_tokens[k], c_rows[k], atol=1e-5, rtol=1e-4)
