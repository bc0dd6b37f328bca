"""fastrlhf.algos against float64 formulas written here (README, "Advantages and rewards")."""
import math

import numpy as np
import pytest
import torch

from fastrlhf.algos import (AdaptiveKL, RunningMoments, advantages_and_returns, last_token_index, scale_scores,
                            token_rewards)


def test_running_moments_match_numpy_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 5, 17, 2)]
    rm = RunningMoments()
    for b in batches:
        rm.update(torch.tensor(b, dtype=torch.float32))
    allx = np.concatenate(batches).astype(np.float32).astype(np.float64)
    assert rm.count == len(allx)
    assert rm.mean == pytest.approx(allx.mean(), rel=1e-6)
    assert rm.var == pytest.approx(allx.var(), rel=1e-6)   # population variance of everything seen


def test_running_moments_state_round_trip():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 4.0]))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other == rm


@pytest.mark.parametrize("mode", ["none", "std", "mean_std"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_scale_scores(mode, clip):
    rm = RunningMoments()
    first = torch.tensor([0.0, 1.0, 2.0, 3.0])
    scale_scores(first, rm, mode=mode)
    x = torch.tensor([4.0, -1.0, 0.5])
    out = scale_scores(x, rm, mode=mode, clip=clip)
    seen = np.array([0, 1, 2, 3, 4, -1, 0.5], dtype=np.float64)   # moments include this batch
    want = x.double().numpy()
    if mode == "mean_std":
        want = want - seen.mean()
    if mode != "none":
        want = want / (seen.std() + 1e-8)
    if clip is not None:
        want = np.clip(want, -clip, clip)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


def test_scale_scores_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        scale_scores(torch.zeros(2), RunningMoments(), mode="minmax")


@pytest.mark.parametrize("kl", [0.0, 0.05, 0.1, 0.5, 10.0])
def test_adaptive_kl_formula(kl):
    ctl = AdaptiveKL(0.2, target=0.1, horizon=1000.0)
    ctl.update(kl, 64)
    e = max(-0.2, min(0.2, kl / 0.1 - 1))
    assert ctl.value == pytest.approx(0.2 * (1 + e * 64 / 1000.0), rel=1e-12)


def test_fixed_kl_without_target():
    ctl = AdaptiveKL(0.3)
    ctl.update(5.0, 100)
    assert ctl.value == 0.3


def _token_rewards_f64(scores, lp, ref, mask, beta, est):
    B, T = mask.shape
    out = np.zeros((B, T))
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                d = ref[b, t] - lp[b, t]
                k = {"k1": -d, "k2": 0.5 * d * d, "k3": math.expm1(d) - d}[est]
                out[b, t] = -beta * k
                last = t
        if last is not None:
            out[b, last] += scores[b]
    return out


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_token_rewards_score_on_last_valid_token_never_a_pad(est):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    lp, ref = -torch.rand(4, 5) * 3, -torch.rand(4, 5) * 3
    scores = torch.tensor([1.5, -2.0, 0.7, 9.0])
    rewards, kl = token_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator=est)
    want = _token_rewards_f64(scores.double().numpy(), lp.double().numpy(), ref.double().numpy(),
                              mask.numpy(), 0.1, est)
    np.testing.assert_allclose(rewards.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (rewards[mask == 0] == 0).all() and (kl[mask == 0] == 0).all()
    assert rewards[3].abs().sum() == 0            # the empty row's score goes nowhere
    assert last_token_index(mask).tolist() == [2, 4, 0, 0]


def _gae_f64(r, v, m, gamma, lam):
    B, T = r.shape
    adv = np.zeros((B, T))
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            if not m[b, t]:
                continue
            v_next = v[b, t + 1] if t + 1 < T and m[b, t + 1] else 0.0
            delta = r[b, t] + gamma * v_next - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + v) * m


@pytest.mark.parametrize("whiten,clip", [(False, None), (True, None), (True, 0.5)])
def test_advantages_and_returns(whiten, clip):
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    r, v = torch.randn(3, 4), torch.randn(3, 4)
    adv, ret = advantages_and_returns(r, v, mask, gamma=0.9, lam=0.8, whiten=whiten, clip=clip)
    m = mask.numpy().astype(bool)
    want_adv, want_ret = _gae_f64(r.double().numpy(), v.double().numpy(), m, 0.9, 0.8)
    np.testing.assert_allclose(ret.numpy(), want_ret, rtol=1e-5, atol=1e-5)  # returns are never whitened
    if whiten:
        vals = want_adv[m]
        want_adv = np.where(m, (want_adv - vals.mean()) / vals.std(ddof=1), 0.0)
    if clip is not None:
        want_adv = np.clip(want_adv, -clip, clip)
    np.testing.assert_allclose(adv.numpy(), want_adv, rtol=1e-4, atol=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_whitening_with_one_valid_token_is_finite():
    mask = torch.tensor([[1, 0, 0]])
    adv, _ = advantages_and_returns(torch.tensor([[2.0, 0, 0]]), torch.zeros(1, 3), mask, gamma=1.0, lam=0.95)
    assert torch.isfinite(adv).all()
