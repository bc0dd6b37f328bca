"""Per-token losses on [B, T] tensors (fastrlhf.ops -> fastrlhf.ref) against float64 formulas."""
import pytest
import torch

import fastrlhf as F


def _inputs(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 0  # an all-masked row
    return lp, old, ref, adv, mask


def _mmean(x, m):
    return (x * m).sum() / m.sum()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_estimators(estimator):
    lp, _, ref, _, _ = _inputs()
    d = ref - lp
    expected = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - 1 - d}[estimator]
    got = F.kl_penalty(lp.float(), ref.float(), estimator)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_kl_k3_nonnegative_and_zero_at_equality():
    lp, _, ref, _, _ = _inputs()
    assert (F.kl_penalty(lp, ref, "k3") >= 0).all()
    assert F.kl_penalty(lp, lp, "k3").abs().max() == 0
    assert F.kl_penalty(lp, lp, "k1").abs().max() == 0


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.1, 0.28)])
def test_ppo_policy_loss_value_and_grad(dual_clip, clips):
    lp, old, _, adv, mask = _inputs()
    old[:, ::3] -= 1.5          # ratios e^1.5 = 4.5 > the dual clip's 3 on some negative-advantage tokens
    lo, hi = clips
    x = lp.float().requires_grad_()
    loss, stats = F.ppo_policy_loss(x, old.float(), adv.float(), mask, clip_low=lo, clip_high=hi,
                                    dual_clip=dual_clip)
    x64 = lp.clone().requires_grad_()
    rho = torch.exp(x64 - old)
    L = torch.maximum(-adv * rho, -adv * rho.clamp(1 - lo, 1 + hi))
    if dual_clip is not None:
        binds = (adv < 0) & (-dual_clip * adv < L) & (mask > 0)
        assert binds.any()                                      # the dual clip changes this loss
        L = torch.where(adv < 0, torch.minimum(L, -dual_clip * adv), L)
    expected = _mmean(L, mask)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    up = 1.7
    (g,) = torch.autograd.grad(loss * up, x)
    (g64,) = torch.autograd.grad(expected * up, x64)
    torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)
    rho_ = torch.exp(lp - old)
    clipped = -adv * rho_.clamp(1 - lo, 1 + hi) > -adv * rho_       # the clipped term is the larger one
    assert 0 < stats["clip_frac"].item() < 1
    torch.testing.assert_close(stats["clip_frac"].double(), _mmean(clipped.double(), mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["ratio_mean"].double(), _mmean(rho_, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["approx_kl"].double(), _mmean(rho_ - 1 - torch.log(rho_), mask),
                               atol=1e-5, rtol=1e-4)


def test_apa_policy_loss_value_and_grad():
    lp, _, ref, adv, mask = _inputs()
    x = lp.float().requires_grad_()
    loss, stats = F.apa_policy_loss(x, ref.float(), adv.float(), mask, adv_coeff=10.0)
    x64 = lp.clone().requires_grad_()
    expected = _mmean((x64 - ref - 10.0 * adv) ** 2, mask)
    torch.testing.assert_close(stats["apa_residual"].double(), _mmean((lp - ref - 10.0 * adv).abs(), mask),
                               rtol=1e-5, atol=1e-5)                   # the mean |residual|
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(loss * 0.3, x)
    (g64,) = torch.autograd.grad(expected * 0.3, x64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss(clip):
    g = torch.Generator().manual_seed(1)
    v, old, ret = (torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(3, 6, generator=g) > 0.4).double()
    x = v.float().requires_grad_()
    loss, _ = F.value_loss(x, old.float(), ret.float(), mask, clip=clip)
    x64 = v.clone().requires_grad_()
    err = (x64 - ret) ** 2
    if clip is not None:
        err = torch.maximum(err, (old + (x64 - old).clamp(-clip, clip) - ret) ** 2)
    expected = 0.5 * _mmean(err, mask)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (gr,) = torch.autograd.grad(loss, x)
    (g64,) = torch.autograd.grad(expected, x64)
    torch.testing.assert_close(gr.double(), g64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("where", ["values", "old_values", "returns"])
def test_value_loss_ignores_garbage_at_masked_positions(clip, where):
    """NaN / inf padding: the loss, its stats and the gradient equal the clean ones, the masked rows'
    gradient is exactly 0 (not 0·NaN = NaN)."""
    g = torch.Generator().manual_seed(4)
    v, old, ret = (torch.randn(3, 6, generator=g) for _ in range(3))
    mask = (torch.rand(3, 6, generator=g) > 0.4).float()
    mask[2] = 0  # an all-masked row
    clean = {"values": v, "old_values": old, "returns": ret}
    dirty = dict(clean)
    fill = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(6)[:18].view(3, 6)
    dirty[where] = torch.where(mask.bool(), clean[where], fill)
    results = []
    for inputs in (clean, dirty):
        x = inputs["values"].clone().requires_grad_()
        loss, stats = F.value_loss(x, inputs["old_values"], inputs["returns"], mask, clip=clip)
        loss.backward()
        results.append((loss, stats, x.grad))
    (loss0, stats0, grad0), (loss1, stats1, grad1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    torch.testing.assert_close(stats1, stats0, rtol=0, atol=0)
    torch.testing.assert_close(grad1, grad0, rtol=0, atol=0)
    assert torch.isfinite(grad1).all() and (grad1[mask == 0] == 0).all()


@pytest.mark.parametrize("clip,match", [
    (-0.2, "clip: expected None or a number > 0, got -0.2"), (0, "clip: expected None or a number > 0, got 0"),
    (float("nan"), "clip: expected None or a finite number, got nan"),
    (float("inf"), "clip: expected None or a finite number, got inf"),
    ("0.2", "clip: expected None or a finite number, got '0.2'"), (True, "clip: expected None or a finite number"),
])
def test_value_loss_bad_clip_is_refused(clip, match):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        F.value_loss(x, x, x, torch.ones(2, 3), clip=clip)


@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, float("nan")])
def test_value_loss_mask_values_other_than_0_and_1_are_refused(bad):
    x = torch.randn(2, 3)
    mask = torch.ones(2, 3)
    mask[1, 1] = bad
    with pytest.raises(ValueError, match="mask: expected only 0s and 1s"):
        F.value_loss(x, x, x, mask)


def test_value_loss_tensors_are_named():
    x = torch.randn(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="returns: expected a tensor on cpu .*got meta"):
        F.value_loss(x, x, x.to("meta"), m)
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .*got meta"):
        F.value_loss(x, x, x, m.to("meta"))
    with pytest.raises(TypeError, match="old_values: expected a floating dtype"):
        F.value_loss(x, x.long(), x, m)
    with pytest.raises(ValueError, match=r"old_values: expected shape \(2, 3\), got \(3, 2\)"):
        F.value_loss(x, x.T, x, m)


@pytest.mark.parametrize("fn", ["ppo", "apa", "value"])
def test_all_zero_mask_gives_zero_loss_not_nan(fn):
    lp, old, ref, adv, _ = _inputs()
    mask = torch.zeros_like(lp)
    x = lp.float().requires_grad_()
    if fn == "ppo":
        loss, _ = F.ppo_policy_loss(x, old.float(), adv.float(), mask)
    elif fn == "apa":
        loss, _ = F.apa_policy_loss(x, ref.float(), adv.float(), mask)
    else:
        loss, _ = F.value_loss(x, old.float(), ref.float(), mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


def test_whiten_masked_matches_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 5 + 3
    mask = (torch.rand(4, 9, generator=g) > 0.3).double()
    vals = x[mask.bool()]
    expected = (x - vals.mean()) / vals.std(unbiased=True) * mask
    torch.testing.assert_close(F.whiten(x.float(), mask).double(), expected, atol=1e-5, rtol=1e-5)
    # padded values must not influence the statistics
    x2 = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(F.whiten(x2.float(), mask).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_valid", [0, 1])
def test_whiten_with_zero_or_one_valid_token_is_finite(n_valid):
    x = torch.randn(2, 5)
    mask = torch.zeros(2, 5)
    mask.view(-1)[:n_valid] = 1
    out = F.whiten(x, mask)
    assert torch.isfinite(out).all()
    assert out[~mask.bool()].abs().max() == 0
    if n_valid == 1:
        assert out.view(-1)[0].abs() < 1e-6


def test_gae_reference_matches_float64_loop():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 8
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [T, 1, 5, 0]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    gamma, lam = 0.99, 0.9
    exp_a = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            nv = v[b, t + 1].item() if t + 1 < n else 0.0
            delta = r[b, t].item() + gamma * nv - v[b, t].item()
            last = delta + gamma * lam * last
            exp_a[b, t] = last
    with F.use_backend("torch"):
        adv, ret = F.gae(r.float(), v.float(), mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv.double(), exp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), (exp_a + v) * mask, atol=1e-5, rtol=1e-5)


def test_loss_weights_every_mode_and_normalizer_against_the_formulas():
    """ref.loss_weights, the one aggregation every loss path uses, against its documented table, with and
    without a normalizer; a mask of other than 2 dims works for token-mean and is refused for the others."""
    from fastrlhf import ref
    m = torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.], [0., 0., 0., 0.]])
    B, T, N, L = 3, 4, 6.0, m.sum(-1).clamp_min(1)[:, None]
    want = {"token-mean": (m / N, m / 10.0), "seq-mean-token-mean": (m / (L * B), m / (L * 10.0)),
            "seq-mean-token-sum": (m / B, m / 10.0), "seq-mean-token-sum-norm": (m / T, m / 10.0)}
    for mode, (plain, normed) in want.items():
        torch.testing.assert_close(ref.loss_weights(m, mode), plain)
        torch.testing.assert_close(ref.loss_weights(m, mode, 10.0), normed)
        if mode == "token-mean":
            torch.testing.assert_close(ref.loss_weights(m.reshape(-1), mode), (m / N).reshape(-1))
        else:
            with pytest.raises(ValueError, match="loss_agg_mode=.* needs 2 dims"):
                ref.loss_weights(m.reshape(-1), mode)
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        ref.loss_weights(m, "token-sum")


def test_whiten_two_valid_tokens_uses_the_unbiased_variance():
    """Two valid values a, b: (x − mean)/std with the unbiased variance (b − a)²/2 gives ±1/√2."""
    x = torch.tensor([[3.0, 7.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(F.whiten(x, mask), torch.tensor([[-0.5 ** 0.5, 0.5 ** 0.5, 0.0]]))
