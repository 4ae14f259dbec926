"""Tests of tppo.algos: hand-computed cases, a naive reference loop, invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tppo import algos
from tppo.algos import (
    ADVANTAGE_ESTIMATORS,
    adaptive_lambda,
    agg_loss,
    discounted_returns,
    egae,
    entropy_from_logits,
    explained_variance,
    gae,
    kl,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- a naive reference


def naive_gae(rewards, values, mask, gamma, lams, last_values=None):
    """Per-row Python loop over the row's valid positions only (gaps removed)."""
    B, L = len(rewards), len(rewards[0])
    adv = [[0.0] * L for _ in range(B)]
    ret = [[0.0] * L for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(L) if mask[b][t]]
        next_v = 0.0 if last_values is None else float(last_values[b])
        running = 0.0
        for t in reversed(idx):
            delta = float(rewards[b][t]) + gamma * next_v - float(values[b][t])
            running = delta + gamma * float(lams[b]) * running
            adv[b][t] = running
            ret[b][t] = running + float(values[b][t])
            next_v = float(values[b][t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 5))
    L = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, L, generator=g, dtype=torch.float64)
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < draw(st.floats(0.2, 1.0))
    lams = torch.rand(B, generator=g, dtype=torch.float64)
    finished = torch.rand(B, generator=g) < 0.5
    next_values = torch.randn(B, generator=g, dtype=torch.float64)
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5]))
    return rewards, values, mask, lams, finished, next_values, gamma


# ----------------------------------------------------------------------------- masked stats


def test_masked_mean_hand_and_nan_padding():
    x = T([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = T([[1, 1, 0], [1, 0, 1]])
    close(masked_mean(x, m), (1 + 2 + 4 + 6) / 4)
    close(masked_mean(x, m, dim=1), [1.5, 5.0])
    close(masked_mean(x, torch.zeros_like(m)), 0.0)


def test_masked_whiten_hand():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    m = T([[1, 1, 1, 0]])
    # mean 2, unbiased var 1 -> (x - 2) / 1 on the first three, 0 on the padding.
    close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-6)
    close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-6)


# ----------------------------------------------------------------------------- GAE / EGAE, hand cases


def test_gae_hand_computed_lambda_one():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    # deltas: 0.1, 0.1, 0.3 (last is terminal: 1 - 0.7)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_hand_computed_discounted():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]])
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.5)
    # delta2 = 0.3, delta1 = 0.9*0.7 - 0.6 = 0.03, delta0 = 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3, A1 = 0.03 + 0.45*0.3 = 0.165, A0 = 0.04 + 0.45*0.165 = 0.11425
    close(adv, [[0.11425, 0.165, 0.3]])


def test_gae_interior_gap_is_skipped():
    r, v, m = T([[0.0, 5.0, 1.0]]), T([[0.5, 999.0, 0.7]]), T([[1, 0, 1]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    # Position 1 is invisible: A2 = 1 - 0.7 = 0.3; A0 = (0.7 - 0.5) + 0.3 = 0.5.
    close(adv, [[0.5, 0.0, 0.3]])
    close(ret, [[1.0, 0.0, 1.0]])


def test_gae_trailing_padding_is_ignored():
    r, v, m = T([[0.0, 1.0, 7.0, 7.0]]), T([[0.2, 0.4, 3.0, 3.0]]), T([[1, 1, 0, 0]])
    adv, _ = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.8, 0.6, 0.0, 0.0]])


def test_egae_unfinished_bootstraps_hand_computed():
    # A window of 3 tokens at positions 2..4 of a response (positions 0, 1: earlier window).
    r = T([[0.0, 0.0, 0.0, 0.0, 0.0]])
    v = T([[9.0, 9.0, 0.2, 0.5, 0.9]])
    m = T([[0, 0, 1, 1, 1]])
    unfinished = T([False])
    adv, ret = egae(r, v, m, unfinished, gamma=1.0, lam=1.0, bootstrap="prev_value")
    # V(s_l) := V(s_{l-1}) = 0.9: last delta 0, then 0.4, 0.3.
    close(adv, [[0.0, 0.0, 0.7, 0.4, 0.0]])
    close(ret, [[0.0, 0.0, 0.9, 0.9, 0.9]])
    adv, _ = egae(r, v, m, unfinished, 1.0, 1.0, bootstrap="next_value", next_values=T([2.0]))
    close(adv, [[0.0, 0.0, 1.8, 1.5, 1.1]])
    adv, _ = egae(r, v, m, unfinished, 1.0, 1.0, bootstrap="zero")
    close(adv, [[0.0, 0.0, -0.2, -0.5, -0.9]])


def test_egae_finished_row_is_terminal_whatever_the_bootstrap():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]])
    for bootstrap in ("prev_value", "next_value", "zero"):
        adv, _ = egae(r, v, m, T([True]), 1.0, 1.0, bootstrap=bootstrap, next_values=T([100.0]))
        close(adv, [[0.5, 0.4, 0.3]])


def test_egae_errors():
    r = v = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="next_values"):
        egae(r, v, m, T([False]), 1.0, 1.0, bootstrap="next_value")
    with pytest.raises(ValueError, match="bootstrap"):
        egae(r, v, m, T([False]), 1.0, 1.0, bootstrap="bogus")


def test_adaptive_lambda_hand():
    lam = adaptive_lambda(T([1, 100, 1000, 10000]))
    # 1 - 1/(0.05 l): -19, 0.8 -> clamped to 0.95; 0.98; 0.998.
    close(lam, [0.95, 0.95, 0.98, 0.998], tol=1e-6)
    close(adaptive_lambda(T([0])), [0.95])
    close(adaptive_lambda(T([400]), alpha=0.1, lam_min=0.5), [0.975], tol=1e-6)


def test_discounted_returns():
    r, m = T([[0.0, 0.0, 2.0, 5.0]]), T([[1, 1, 1, 0]])
    close(discounted_returns(r, m, gamma=0.5), [[0.5, 1.0, 2.0, 0.0]])


# ----------------------------------------------------------------------------- GAE / EGAE vs naive loop


@settings(max_examples=60, deadline=None)
@given(batches())
def test_gae_matches_naive_loop(batch):
    rewards, values, mask, lams, _, _, gamma = batch
    adv, ret = gae(rewards, values, mask, gamma, lams)
    ref_adv, ref_ret = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lams.tolist())
    close(adv, ref_adv, tol=1e-9)
    close(ret, ref_ret, tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(["prev_value", "next_value", "zero"]))
def test_egae_matches_naive_loop(batch, bootstrap):
    rewards, values, mask, lams, finished, next_values, gamma = batch
    boot = []
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        if finished[b] or bootstrap == "zero":
            boot.append(0.0)
        elif bootstrap == "next_value":
            boot.append(float(next_values[b]))
        else:
            boot.append(float(values[b, idx[-1]]) if idx else 0.0)
    adv, ret = egae(rewards, values, mask, finished, gamma, lams, bootstrap=bootstrap, next_values=next_values)
    ref_adv, ref_ret = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lams.tolist(), boot)
    close(adv, ref_adv, tol=1e-9)
    close(ret, ref_ret, tol=1e-9)


# ----------------------------------------------------------------------------- invariances


@settings(max_examples=40, deadline=None)
@given(batches())
def test_masked_positions_do_not_matter(batch):
    rewards, values, mask, lams, finished, next_values, gamma = batch
    garbage_v = torch.where(mask, values, torch.full_like(values, float("nan")))
    garbage_r = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    for fn in (
        lambda r, v: gae(r, v, mask, gamma, lams),
        lambda r, v: egae(r, v, mask, finished, gamma, lams, bootstrap="prev_value"),
        lambda r, v: egae(r, v, mask, finished, gamma, lams, bootstrap="next_value", next_values=next_values),
    ):
        a1, r1 = fn(rewards, values)
        a2, r2 = fn(garbage_r, garbage_v)
        close(a1, a2, tol=0)
        close(r1, r2, tol=0)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_egae_all_finished_equals_gae(batch):
    rewards, values, mask, lams, _, next_values, gamma = batch
    done = torch.ones(rewards.shape[0], dtype=torch.bool)
    for bootstrap in ("prev_value", "next_value", "zero"):
        a1, r1 = egae(rewards, values, mask, done, gamma, lams, bootstrap=bootstrap, next_values=next_values)
        a2, r2 = gae(rewards, values, mask, gamma, lams)
        close(a1, a2, tol=0)
        close(r1, r2, tol=0)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_egae_next_value_equals_gae_with_bootstrap_folded_into_last_reward(batch):
    rewards, values, mask, lams, _, next_values, gamma = batch
    cut = torch.zeros(rewards.shape[0], dtype=torch.bool)
    a1, _ = egae(rewards, values, mask, cut, gamma, lams, bootstrap="next_value", next_values=next_values)
    folded = rewards.clone()
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten()
        if len(idx):
            folded[b, idx[-1]] += gamma * next_values[b]
    a2, _ = gae(folded, values, mask, gamma, lams)
    close(a1, a2, tol=1e-9)


def test_per_row_lambda_equals_rowwise_float_lambda():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    m = torch.ones(3, 7)
    lams = T([0.9, 0.95, 1.0])
    adv, _ = gae(r, v, m, 1.0, lams)
    for b in range(3):
        row, _ = gae(r[b : b + 1], v[b : b + 1], m[b : b + 1], 1.0, float(lams[b]))
        close(adv[b], row[0])


def test_egae_window_composition_with_exact_bootstrap_equals_gae_at_lambda_one():
    """With lambda = 1 and gamma = 1, a window's EGAE advantage with the exact next
    value is the full-response GAE advantage minus the later windows' contributions:
    A_t = R - V(s_t) for a finished response, and sum of value differences + V(s_l)
    - V(s_t) for a cut one; chained windows therefore reproduce full GAE."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 8, generator=g, dtype=torch.float64)
    r = torch.zeros(1, 8, dtype=torch.float64)
    r[0, -1] = 1.0
    full, _ = gae(r, v, torch.ones(1, 8), 1.0, 1.0)
    first = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    second = 1 - first
    a1, _ = egae(r, v, first, T([False]), 1.0, 1.0, bootstrap="next_value", next_values=v[:, 4])
    a2, _ = egae(r, v, second, T([True]), 1.0, 1.0)
    # A_t(full) = sum_{k>=t} delta_k. The first window misses the second window's deltas
    # (sum = A_4(full)), all of which propagate with weight 1 to t < 4.
    close(a1[:, :4] + full[:, 4:5], full[:, :4], tol=1e-12)
    close(a2[:, 4:], full[:, 4:], tol=1e-12)


def test_registry_dispatch():
    r, v, m = T([[0.0, 1.0]]), T([[0.2, 0.4]]), T([[1, 1]])
    kwargs = dict(gamma=1.0, lam=1.0, bootstrap="prev_value", next_values=None)
    a_gae, _ = ADVANTAGE_ESTIMATORS["gae"](r, v, m, T([True]), **kwargs)
    a_egae, _ = ADVANTAGE_ESTIMATORS["egae"](r, v, m, T([True]), **kwargs)
    close(a_gae, a_egae)
    with pytest.raises(ValueError, match="finished"):
        ADVANTAGE_ESTIMATORS["gae"](r, v, m, T([False]), **kwargs)


# ----------------------------------------------------------------------------- losses, hand cases


def test_policy_loss_hand_computed():
    adv = T([[1.0, -1.0, -1.0, 1.0]])
    ratio = T([[1.5, 1.5, 0.5, 0.5]])
    logp, old = ratio.log(), torch.zeros(1, 4)
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4))
    # per token: max(-1.5, -1.28) = -1.28 | max(1.5, 1.28) = 1.5 | max(0.5, 0.8) = 0.8 | max(-0.5, -0.8) = -0.5
    close(loss, (-1.28 + 1.5 + 0.8 - 0.5) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_max"], 1.5)
    close(stats["ratio_mean"], 1.0)


def test_policy_loss_dual_clip_bounds_negative_advantages_and_kills_gradient():
    logp = torch.tensor([[math.log(20.0), math.log(20.0)]], requires_grad=True)
    adv = T([[-1.0, 1.0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), agg="token-mean")
    # A < 0, ratio 20: unclipped 20 -> bounded by dual clip 10. A > 0, ratio 20: clipped -1.28.
    close(loss, (10.0 - 1.28) / 2, tol=1e-5)
    close(stats["dual_clipfrac"], 0.5)
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])
    loss_nodual, _ = policy_loss(logp.detach(), torch.zeros(1, 2), adv, torch.ones(1, 2), dual_clip=None)
    close(loss_nodual, (20.0 - 1.28) / 2, tol=1e-4)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), dual_clip=0.5)


def test_policy_loss_gradient_sign_and_masked_tokens():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = T([[2.0, -3.0, 100.0]])
    loss, _ = policy_loss(logp, torch.zeros(1, 3), adv, T([[1, 1, 0]]))
    loss.backward()
    # d/dlogp of -A * ratio at ratio 1 is -A / N_tok: raising logp of a good token lowers the loss.
    close(logp.grad, [[-1.0, 1.5, 0.0]])


def test_policy_loss_log_ratio_is_clamped():
    loss, stats = policy_loss(T([[100.0]]), T([[0.0]]), T([[1.0]]), T([[1]]), clip_high=1e9)
    assert torch.isfinite(loss)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)


def test_value_loss_hand_computed():
    v, old, R = T([[1.0, -1.0, 0.1]]), T([[0.0, 0.0, 0.0]]), T([[2.0, -2.0, 0.0]])
    loss, stats = value_loss(v, old, R, T([[1, 1, 1]]))
    # tok0: clip 0.6, max(1, 1.96) = 1.96 | tok1: clip -0.5, max(1, 2.25) | tok2: inside, 0.01
    close(loss, 0.5 * (1.96 + 2.25 + 0.01) / 3)
    close(stats["clipfrac"], 2 / 3)
    loss_plain, _ = value_loss(v, old, R, T([[1, 1, 1]]), clip_low=None)
    close(loss_plain, 0.5 * (1 + 1 + 0.01) / 3)


def test_agg_loss_modes_hand():
    loss = T([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = T([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(agg_loss(loss, m, "token-mean"), (1 + 3 + 4) / 3)
    close(agg_loss(loss, m, "token-mean", num_tokens=8), 1.0)
    close(agg_loss(loss, m, "seq-mean-token-mean"), (2 + 4) / 2)
    close(agg_loss(loss, m, "seq-mean-token-sum"), (4 + 4) / 2)
    close(agg_loss(loss, m, "seq-mean-token-sum", num_seqs=4), 2.0)
    with pytest.raises(ValueError, match="num_seqs"):
        agg_loss(loss, m, "seq-mean-token-mean", num_tokens=3)
    with pytest.raises(ValueError, match="mode"):
        agg_loss(loss, m, "bogus")


def _grads_whole_vs_micro(loss_fn, n_rows=6, n_tok=5, splits=((0, 2), (2, 3), (3, 6))):
    g = torch.Generator().manual_seed(3)
    params = torch.randn(n_rows, n_tok, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(n_rows, n_tok, generator=g) < 0.6
    mask[0, 0] = True
    other = [torch.randn(n_rows, n_tok, generator=g, dtype=torch.float64) for _ in range(2)]
    num_tokens = mask.sum()
    loss_fn(params, *other, mask, num_tokens).backward()
    whole = params.grad.clone()
    params.grad = None
    for a, b in splits:
        loss_fn(params[a:b], *(o[a:b] for o in other), mask[a:b], num_tokens).backward()
    return whole, params.grad


def test_policy_loss_microbatch_gradient_equals_whole_batch():
    def fn(logp, old, adv, mask, n):
        return policy_loss(logp, old * 0.3, adv, mask, num_tokens=n)[0]

    whole, micro = _grads_whole_vs_micro(fn)
    assert whole.abs().sum() > 0
    close(whole, micro, tol=1e-6)


def test_value_loss_microbatch_gradient_equals_whole_batch():
    def fn(v, old, ret, mask, n):
        return value_loss(v, old, ret, mask, num_tokens=n)[0]

    whole, micro = _grads_whole_vs_micro(fn)
    assert whole.abs().sum() > 0
    close(whole, micro, tol=1e-6)


def test_microbatch_without_global_denominator_differs():
    """Guards the test above: a per-micro-batch denominator must change the gradient."""

    def fn(logp, old, adv, mask, n):
        return policy_loss(logp, old * 0.3, adv, mask, num_tokens=None)[0]

    whole, micro = _grads_whole_vs_micro(fn)
    assert not torch.allclose(whole, micro, atol=1e-6)


# ----------------------------------------------------------------------------- KL, EV, logits


def test_kl_estimators_hand():
    x = math.log(2.0)
    lp, ref = T([x]), T([0.0])
    close(kl(lp, ref, "k1"), [x])
    close(kl(lp, ref, "k2"), [0.5 * x * x])
    close(kl(lp, ref, "k3"), [0.5 - 1 + x])
    with pytest.raises(ValueError, match="kind"):
        kl(lp, ref, "k4")


def test_kl_k3_finite_and_nonnegative_at_extreme_gaps():
    lp = T([50.0, -50.0, 0.0])
    out = kl(lp, torch.zeros(3), "k3")
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    lp16 = lp.to(torch.bfloat16)
    assert torch.isfinite(kl(lp16, torch.zeros(3, dtype=torch.bfloat16), "k3")).all()


def test_k3_is_unbiased_for_kl_on_a_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    expected_k3 = (p * kl(p.log(), q.log(), "k3")).sum()  # E_{y~p}[k3]
    close(expected_k3, exact, tol=1e-12)


def test_explained_variance():
    R = T([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    close(explained_variance(R, R, m), 1.0)
    close(explained_variance(torch.full_like(R, 2.5), R, m), 0.0)
    assert torch.isnan(explained_variance(R, torch.ones_like(R), m))


def test_logprobs_and_entropy_from_logits():
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), ref, tol=1e-6)
    uniform = torch.zeros(4)
    close(entropy_from_logits(uniform), math.log(4), tol=1e-6)


def test_algos_imports_only_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(algos))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__", "typing"}, roots


def test_lm_loss_hand():
    from tppo.algos import lm_loss

    lp = torch.tensor([[math.log(0.5), math.log(0.25), 123.0]])
    close(lm_loss(lp, T([[1, 1, 0]])), (math.log(2) + math.log(4)) / 2)
    close(lm_loss(lp, T([[1, 1, 0]]), num_tokens=4), (math.log(2) + math.log(4)) / 4)


# ----------------------------------------------------------------------------- GRPO (#21)


def test_grpo_advantages_hand_computed():
    scores, groups = T([1.0, 0.0, 1.0, 1.0, 0.0, 0.5]), T([7, 7, 3, 3, 9, 9])
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 2] = False  # a masked token gets 0
    adv = algos.grpo_advantages(scores, groups, mask)
    # group 7: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.7071; group 3: all equal -> 0;
    # group 9: mean 0.25, std sqrt(0.125) -> -+0.25 / 0.35355
    s2, s8 = math.sqrt(0.5), math.sqrt(0.125)
    close(adv[:, 0], T([0.5 / (s2 + 1e-6), -0.5 / (s2 + 1e-6), 0.0, 0.0, -0.25 / (s8 + 1e-6), 0.25 / (s8 + 1e-6)]))
    assert adv[0, 2] == 0 and torch.equal(adv[1], adv[1, :1].expand(3))
    dr = algos.grpo_advantages(scores, groups, mask, scale_by_std=False)  # Dr. GRPO: centred only
    close(dr[:, 0], T([0.5, -0.5, 0.0, 0.0, -0.25, 0.25]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-2, 2)), min_size=1, max_size=12), st.booleans())
def test_grpo_advantages_match_a_naive_loop(rows, scale):
    groups, scores = T([g for g, _ in rows]), T([s for _, s in rows], dtype=torch.float32)
    adv = algos.grpo_advantages(scores, groups, torch.ones(len(rows), 1, dtype=torch.bool), scale_by_std=scale)[:, 0]
    values = scores.double().tolist()  # the float32 scores the function sees
    for i, (g, _) in enumerate(rows):
        same = [x for (h, _), x in zip(rows, values) if h == g]
        mean = sum(same) / len(same)
        std = math.sqrt(sum((x - mean) ** 2 for x in same) / max(1, len(same) - 1))
        expected = (values[i] - mean) / ((std + 1e-6) if scale else 1.0)
        assert adv[i].item() == pytest.approx(expected, abs=1e-4, rel=1e-4)


def test_group_filter_keeps_groups_with_different_rewards():
    keep = algos.group_filter(T([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5]), T([0, 0, 1, 1, 2, 2, 3]))
    assert keep.tolist() == [True, True, False, False, False, False, False]  # a group of one has no contrast


def test_grpo_estimator_needs_finished_rows_and_returns_scores():
    kw = dict(gamma=1.0, lam=1.0, bootstrap="prev_value", next_values=None, scores=T([1.0, 0.0]), groups=T([0, 0]), scale_by_std=False)
    m = T([[1, 1], [1, 0]]).bool()
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"](torch.zeros(2, 2), torch.zeros(2, 2), m, T([True, True]), **kw)
    close(adv, T([[0.5, 0.5], [-0.5, 0.0]]))
    close(ret, T([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="finished"):
        ADVANTAGE_ESTIMATORS["grpo"](torch.zeros(2, 2), torch.zeros(2, 2), m, T([True, False]), **kw)


# ----------------------------------------------------------------------------- behaviour policy (#21)


def test_behavior_weights_equal_policies_leave_the_loss_unchanged():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = torch.randn(3, 5, generator=g) * 0.1 - 1, -torch.rand(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) < 0.7
    plain, _ = policy_loss(lp, old, adv, mask)
    for mode in ("none", "tis", "icepop"):
        w, stats = algos.behavior_weights(old, old.clone(), mask, mode)
        assert torch.equal(w, torch.ones_like(w)) and stats["is_clipped_frac"] == 0 and stats["is_masked_frac"] == 0
        weighted, _ = policy_loss(lp, old, adv, mask, weights=w)
        assert torch.equal(weighted, plain)


def test_behavior_weights_hand_computed():
    # pi_old / mu per token: 5, 1, 0.25, 1.5 (the last one masked out)
    old = torch.log(T([[0.5, 0.2, 0.1, 0.3]]))
    mu = torch.log(T([[0.1, 0.2, 0.4, 0.2]]))
    mask = T([[1, 1, 1, 0]]).bool()
    w, s = algos.behavior_weights(old, mu, mask, "tis", clip=2.0)
    close(w, T([[2.0, 1.0, 0.25, 1.0]]))
    assert s["is_clipped_frac"].item() == pytest.approx(1 / 3) and s["is_weight_mean"].item() == pytest.approx(3.25 / 3)
    w, s = algos.behavior_weights(old, mu, mask, "icepop", low=0.5, high=2.0)
    close(w, T([[0.0, 1.0, 0.0, 1.0]]))
    assert s["is_masked_frac"].item() == pytest.approx(2 / 3) and s["is_weight_mean"].item() == pytest.approx(1 / 3)
    # the weighted loss is the per-token loss times the weights, then the token mean
    lp, adv = old + 0.01, T([[1.0, -1.0, 2.0, 5.0]])
    loss, _ = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=None, weights=w)
    per_token = -adv * torch.exp(lp - old)
    assert loss.item() == pytest.approx(float((per_token * w)[mask].sum() / 3))


def test_logprob_mismatch_hand_computed():
    old, mu = T([[-1.0, -2.0, -0.5]]), T([[-1.5, -2.0, -0.1]])
    out = algos.logprob_mismatch(old, mu, T([[1, 1, 0]]).bool())
    assert out["abs_diff_sum"].item() == pytest.approx(0.5) and out["abs_diff_max"].item() == pytest.approx(0.5)
    x = -1.5 - -1.0  # k3(mu, pi_old) with x = log mu - log pi_old: exp(-x) - 1 + x
    assert out["kl_sum"].item() == pytest.approx(math.exp(-x) - 1 + x) and out["tokens"].item() == 2
