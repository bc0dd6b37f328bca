"""policy_loss_from_logits and the row core policy_rows: the reference (torch) and the fused Triton kernel
(kernels/policy_loss.py, under TRITON_INTERPRET=1 on CPU) against float64 formulas written here."""
import math

import numpy as np
import pytest
import torch

import fastrlhf as F
from fastrlhf import ops, ref
from fastrlhf.kernels import policy_loss as P
from fastrlhf.kernels import token_logprobs as K

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _loss_f64(x, labels, mask, adv, old, ref_lp, kw):
    """The combined loss in float64 from README "Losses", straight from the formulas."""
    tau = kw.get("temperature", 1.0)
    z = x.double() / tau
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    lp = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    m = mask.double()
    adv, old, ref_lp = adv.double(), old.double(), ref_lp.double()
    if kw.get("algo", "ppo") == "ppo":
        rho = torch.exp(lp - old)
        L = torch.maximum(-adv * rho, -adv * rho.clamp(1 - kw.get("clip_low", 0.2), 1 + kw.get("clip_high", 0.2)))
        if kw.get("dual_clip") is not None:
            L = torch.where(adv < 0, torch.minimum(L, -kw["dual_clip"] * adv), L)
    else:
        L = (lp - ref_lp - kw.get("adv_coeff", 10.0) * adv) ** 2
    d = ref_lp - lp
    kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - 1 - d}[kw.get("kl_estimator", "k3")]
    per_tok = L + kw.get("kl_coef", 0.0) * kl - kw.get("entropy_coef", 0.0) * ent
    loss = (per_tok * m).sum() / m.sum().clamp_min(1.0)
    if kw.get("batch_entropy_coef", 0.0):
        cnt = m.sum(0)
        pbar = (m[:, :, None] * p).sum(0) / cnt.clamp_min(1.0)[:, None]
        h_t = -(pbar * torch.log(torch.where(pbar > 0, pbar, torch.ones_like(pbar)))).sum(-1)
        h_batch = torch.where(cnt > 0, h_t, torch.zeros_like(h_t)).sum() / (cnt > 0).sum().clamp_min(1)
        loss = loss - kw["batch_entropy_coef"] * h_batch
    return loss, lp, ent, kl


def _inputs(B, T, V, dtype, scale=2.0):
    x = (torch.randn(B, T, V) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.25).float()
    mask[1] = 0                                                      # an all-masked row
    mask[0, 0] = 1
    with torch.no_grad():
        lp = torch.log_softmax(x.double() / 1.0, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()   # ratios on both sides of the clip
    ref_lp = (lp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()
    adv = torch.randn(B, T)
    return x, labels, mask, adv, old, ref_lp


def _run(backend, x, labels, mask, adv, old, ref_lp, kw, upstream):
    xx = x.clone().requires_grad_()
    with F.use_backend(backend):
        loss, out = F.policy_loss_from_logits(xx, labels, mask, adv, old, ref_lp, **kw)
    (loss * upstream).backward()
    return loss, out, xx.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


CONFIGS = [
    dict(),
    dict(dual_clip=3.0, clip_low=0.1, clip_high=0.28, entropy_coef=0.01, kl_coef=0.1, kl_estimator="k1"),
    dict(algo="apa", adv_coeff=2.0, kl_coef=0.05, kl_estimator="k2", temperature=0.7),
    dict(kl_coef=0.2, kl_estimator="k3", entropy_coef=0.05, batch_entropy_coef=0.1, temperature=1.3),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=["ppo", "ppo-dual-ent-k1", "apa-k2-tau", "ppo-k3-ent-bent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_and_grad_against_float64(monkeypatch, kw, dtype):
    monkeypatch.setattr(K, "MAX_BLOCK_V", 64)
    V = 37 if dtype == torch.float16 else 150                        # 150: three blocks, the last partial
    x, labels, mask, adv, old, ref_lp = _inputs(3, 5, V, dtype)
    upstream = float(torch.rand(()) * 3 + 0.5)                        # non-unit upstream gradient
    x64 = x.double().requires_grad_()
    loss64, lp64, ent64, kl64 = _loss_f64(x64, labels, mask, adv, old, ref_lp, kw)
    (loss64 * upstream).backward()
    loss_r, out_r, grad_r = _run("torch", x, labels, mask, adv, old, ref_lp, kw, upstream)
    loss_t, out_t, grad_t = _run("triton", x, labels, mask, adv, old, ref_lp, kw, upstream)
    assert grad_t.dtype == dtype and loss_t.dtype == torch.float32
    m = mask.bool()
    # float32 noise only (the 2× rule), but one more bf16 step where the interpreter's fp32 -> bf16 cast
    # truncates (triton/runtime/interpreter.py `_convert_float` without a rounding mode; compiled kernels
    # and torch round to nearest)
    interpreted_bf16 = dtype == torch.bfloat16 and ops._interpreting()
    floor_g = (EPS[dtype] if interpreted_bf16 else 1e-7) * max(1.0, x64.grad.abs().max().item())
    g_max = x64.grad.abs().max().item()
    pairs = [(loss_t, loss_r, loss64, 1e-5, 1e-3), (grad_t, grad_r, x64.grad, floor_g, 1e-3 + EPS[dtype] * g_max),
             (out_t["logprobs"][m], out_r["logprobs"][m], lp64[m], 1e-5, 1e-3),
             (out_t["entropy"][m], out_r["entropy"][m], ent64[m], 1e-5, 1e-3),
             (out_t["kl"][m], out_r["kl"][m], kl64[m], 1e-5, 1e-3)]
    for fast, slow, exact, floor, sane in pairs:
        e_ref, e_fast = _max_err(slow, exact), _max_err(fast, exact)
        assert e_ref <= sane + floor, "reference too far from float64"
        assert e_fast <= 2 * e_ref + floor, (e_fast, e_ref)
    assert (out_t["entropy"][~m] == 0).all() and (out_r["entropy"][~m] == 0).all()   # entropy 0 where masked
    for key in ("clip_frac", "approx_kl", "entropy_mean", "kl_mean", "num_tokens", "nonfinite_tokens"):
        torch.testing.assert_close(out_t[key].double(), out_r[key].double(), atol=1e-4, rtol=1e-4)
    if kw.get("batch_entropy_coef"):
        torch.testing.assert_close(out_t["batch_entropy"], out_r["batch_entropy"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", CONFIGS[:3], ids=["ppo", "ppo-dual-ent-k1", "apa-k2-tau"])
def test_policy_rows_matches_reference_and_writes_in_place(kw):
    """The row core on its own (as the fused linear path calls it), including dz written over the logits."""
    x, labels, mask, adv, old, ref_lp = _inputs(4, 6, 40, torch.float32)
    cfg = ref.LossConfig(**kw)
    n = mask.numel()
    m = mask.reshape(-1)
    weight = m / m.sum()
    lab = torch.where(m > 0, labels.reshape(-1), torch.full_like(labels.reshape(-1), -100))
    args = (lab, weight, adv.reshape(-1), old.reshape(-1), ref_lp.reshape(-1), cfg)
    x2d = x.reshape(n, 40)
    expected = ref.policy_rows(x2d, *args)
    got = P.policy_rows(x2d, *args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    buf = x2d.clone()
    in_place = P.policy_rows(buf, *args, out=buf)
    assert in_place[4].data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, expected[4], atol=2e-6, rtol=1e-5)
    no_grad = P.policy_rows(x2d, *args, write_grad=False)
    assert no_grad[4] is None
    torch.testing.assert_close(no_grad[3], expected[3], atol=2e-6, rtol=1e-5)


def test_inplace_gradient_equals_out_of_place():
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 30, torch.bfloat16)
    cfg = ref.LossConfig(entropy_coef=0.1, kl_coef=0.1)
    xa = x.clone().requires_grad_()
    loss_a, _ = P.policy_loss_from_logits(xa, labels, mask, adv, old, ref_lp, cfg)
    (loss_a * 2.5).backward()
    xb = x.clone().requires_grad_()
    loss_b, _ = P.policy_loss_from_logits(xb, labels, mask, adv, old, ref_lp, cfg, inplace=True)
    (loss_b * 2.5).backward()
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(xb.grad, xa.grad)
    assert torch.equal(xb.detach(), xb.grad)                          # the logits buffer now holds dz
    with pytest.raises(ValueError, match="inplace"):
        P.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, ref.LossConfig(batch_entropy_coef=0.1),
                                  inplace=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_zero_mask_gives_zero_loss(backend):
    x, labels, _, adv, old, ref_lp = _inputs(2, 3, 20, torch.float32)
    mask = torch.zeros(2, 3)
    kw = dict(entropy_coef=0.1, kl_coef=0.1, batch_entropy_coef=0.1)
    loss, out, grad = _run(backend, x, labels, mask, adv, old, ref_lp, kw, 1.0)
    assert loss.item() == 0 and (grad == 0).all()
    assert out["num_tokens"].item() == 0 and out["nonfinite_tokens"].item() == 0
    assert all(torch.isfinite(out[k]) for k in ("clip_frac", "approx_kl", "entropy_mean", "kl_mean"))


def test_nonfinite_row_is_nan_for_that_row_only_and_counted():
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 25, torch.float32)
    mask[:] = 1
    x[0, 2, 7] = float("nan")
    loss, out, grad = _run("triton", x, labels, mask, adv, old, ref_lp, dict(entropy_coef=0.1), 1.0)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 2] = True
    assert out["nonfinite_tokens"].item() == 1
    assert torch.isnan(out["logprobs"][bad]).all() and torch.isfinite(out["logprobs"][~bad]).all()
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_logits_give_finite_loss_and_grad(backend):
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 30, torch.float32)
    x[..., ::4] = float("-inf")
    labels = labels // 4 * 4 + 1                                       # never a −inf column
    kw = dict(entropy_coef=0.1, kl_coef=0.1, batch_entropy_coef=0.1)
    loss, out, grad = _run(backend, x, labels, mask, adv, old, ref_lp, kw, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[..., ::4] == 0).all()
    assert torch.isfinite(out["entropy"]).all()


def test_ppo_tie_at_ratio_one_matches_reference():
    """old == ℓ exactly: ρ = 1 sits inside the clip range, where torch.maximum sees a tie (u == c)."""
    x, labels, mask, adv, _, ref_lp = _inputs(2, 4, 30, torch.float32)
    mask[:] = 1
    with F.use_backend("triton"):
        old = F.token_logprobs(x, labels)
    kw = dict(dual_clip=1.5)
    _, _, grad_r = _run("torch", x, labels, mask, adv, old, ref_lp, kw, 1.0)
    _, _, grad_t = _run("triton", x, labels, mask, adv, old, ref_lp, kw, 1.0)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("V", [32000, 151936])
def test_cuda_large_vocab_against_float64(V):
    """Real kernels (compiled, default blocks and persistent grid) on the target vocabularies (32k-262k), bf16."""
    x, labels, mask, adv, old, ref_lp = (t.cuda() for t in _inputs(4, 24, V, torch.bfloat16))
    kw = CONFIGS[1]
    x64 = x.double().requires_grad_()
    loss64, *_ = _loss_f64(x64, labels, mask, adv, old, ref_lp, kw)
    (loss64 * 1.7).backward()
    loss_r, _, grad_r = _run("torch", x, labels, mask, adv, old, ref_lp, kw, 1.7)
    loss_t, _, grad_t = _run("triton", x, labels, mask, adv, old, ref_lp, kw, 1.7)
    assert _max_err(loss_t, loss64) <= 2 * _max_err(loss_r, loss64) + 1e-5
    floor_g = 1e-7 + EPS[torch.bfloat16] * x64.grad.abs().max().item()
    assert _max_err(grad_t, x64.grad) <= 2 * _max_err(grad_r, x64.grad) + floor_g


@pytest.mark.parametrize("g", [1.0, 0.25])
def test_backward_scale(g):
    """The backward is dz·g in place; with g == 1 the kernel leaves dz untouched."""
    dz = torch.randn(5, 37).to(torch.bfloat16)
    expected = (dz.float() * g).to(torch.bfloat16)
    got = P.scale_(dz, torch.tensor(g))
    assert got.data_ptr() == dz.data_ptr()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_inplace_option_matches_out_of_place(backend):
    """F.policy_loss_from_logits(..., inplace=True): same loss and logits gradient, on both paths."""
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 30, torch.float32)
    kw = dict(entropy_coef=0.1, kl_coef=0.1, temperature=0.9)
    with F.use_backend(backend):
        xa = x.clone().requires_grad_()
        loss_a, _ = F.policy_loss_from_logits(xa, labels, mask, adv, old, ref_lp, **kw)
        (loss_a * 1.5).backward()
        xb = x.clone().requires_grad_()
        loss_b, _ = F.policy_loss_from_logits(xb, labels, mask, adv, old, ref_lp, inplace=True, **kw)
        (loss_b * 1.5).backward()
        assert not torch.equal(xb.detach(), x)                        # the buffer was overwritten
        with pytest.raises(ValueError, match="inplace: expected False with batch_entropy_coef"):
            F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, inplace=True,
                                             batch_entropy_coef=0.1)
        with pytest.raises(ValueError, match="inplace: expected contiguous logits"):
            F.policy_loss_from_logits(x.transpose(0, 1), labels.T, mask.T, adv.T, old.T, ref_lp.T,
                                             inplace=True)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(xb.grad, xa.grad)


def _ties_inputs():
    """Rows of V = 2 logits whose ratio ρ = e^{ℓ−ℓ_old} sits a few float32 steps above 1 + ε_high = 1.25
    (ε = 0.25: both clip bounds exact in float32), with advantages |A| in [0.8, 1): there −A·ρ and
    −A·1.25 often round to the same float32 although ρ is outside the clip interval."""
    cfg = ref.LossConfig(clip_low=0.25, clip_high=0.25)
    n_x, n_a = 12, 24
    x2d = torch.tensor([[0.5, -0.5]]).repeat(n_x * n_a * 2, 1)
    labels = torch.zeros(x2d.shape[0], dtype=torch.long)
    zeros = torch.zeros(x2d.shape[0])
    lp = P.policy_rows(x2d, labels, zeros, zeros, zeros, zeros, cfg, write_grad=False)[0]   # the kernel's ℓ
    x = torch.tensor(math.log(1.25), dtype=torch.float32)
    steps = [x]
    for _ in range(n_x - 1):
        steps.append(torch.nextafter(steps[-1], torch.tensor(1.0)))
    log_ratio = torch.stack(steps).repeat_interleave(n_a * 2)
    old = lp - log_ratio
    a = torch.linspace(0.8, 0.99, n_a)
    adv = torch.cat([a, -a]).repeat(n_x)
    ratio = torch.exp(lp - old)
    # the interpreter's exp is numpy's: keep the rows where it agrees with torch's bit for bit
    same_exp = torch.from_numpy(np.exp((lp - old).numpy())) == ratio
    return cfg, x2d, labels, adv, old, ratio, same_exp


def _kernel_and_autograd_glp(cfg, x2d, labels, adv, old, keep):
    x2d, labels, adv, old = x2d[keep], labels[keep], adv[keep], old[keep]
    n = x2d.shape[0]
    weight = torch.full((n,), 1.0 / n)
    lp, ent, _, _, dz = P.policy_rows(x2d, labels, weight, adv, old, torch.zeros(n), cfg)
    _, _, g_lp, _ = ref.token_loss_grads(lp, ent, weight, adv, old, torch.zeros(n), cfg)
    p_label = torch.softmax(x2d, -1)[:, 0]
    return dz[:, 0] / (1 - p_label), g_lp               # dz_y = gℓ·(1 − p_y) for V = 2, no entropy term


def test_ppo_tie_branch_matters_at_float_ties_outside_the_clip_interval():
    """At a tie u == c with ρ inside the closed clip interval ∂c = ∂u, so the tie rule changes nothing
    there; it matters where −A·ρ and −A·(1 + ε_high) round to the same float although ρ > 1 + ε_high
    (∂c = 0): torch.maximum then gives half of ∂u, and so must the kernel (dropping its 0.5 branch
    gives ∂u or 0 on these rows)."""
    cfg, x2d, labels, adv, old, ratio, same_exp = _ties_inputs()
    u, c = -adv * ratio, -adv * ratio.clamp(0.75, 1.25)
    tie = (u == c) & (ratio > 1.25) & same_exp
    assert tie.sum() >= 5 and ((u != c) & same_exp).sum() >= 5
    got, want = _kernel_and_autograd_glp(cfg, x2d, labels, adv, old, same_exp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    at_tie = tie[same_exp]
    d_u = (-adv * ratio)[same_exp] / same_exp.sum()
    torch.testing.assert_close(want[at_tie], 0.5 * d_u[at_tie], rtol=1e-6, atol=0)   # neither ∂u nor 0


def test_dual_clip_tie_branch_matters_when_the_ratio_equals_the_dual_clip():
    """Dual clip c: for A < 0, pg' = min(pg, −c·A); when ρ == c exactly (and ρ > 1 + ε_high, so pg = −Aρ)
    the two sides are the same float product and torch.minimum gives half of ∂pg."""
    cfg, x2d, labels, adv, old, ratio, same_exp = _ties_inputs()
    above = ratio[same_exp & (ratio > 1.25)]
    c = float(above[len(above) // 2])
    cfg = ref.LossConfig(clip_low=0.25, clip_high=0.25, dual_clip=c)
    u, clipped = -adv * ratio, -adv * ratio.clamp(0.75, 1.25)
    tie = (ratio == c) & (adv < 0) & (u > clipped) & same_exp
    assert tie.sum() >= 3
    got, want = _kernel_and_autograd_glp(cfg, x2d, labels, adv, old, same_exp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    at_tie = tie[same_exp]
    d_u = (-adv * ratio)[same_exp] / same_exp.sum()
    torch.testing.assert_close(want[at_tie], 0.5 * d_u[at_tie], rtol=1e-6, atol=0)
