"""Batch entropy: the reference (torch) and the Triton kernels (kernels/batch_entropy.py, under
TRITON_INTERPRET=1 on CPU) against the float64 formula of README "Batch entropy", written here."""
import pytest
import torch

import fastrlhf as F
from fastrlhf.kernels import token_logprobs as K

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _h_batch_f64(x, mask, tau):
    """p̄_t = Σ_b m_bt p_bt / Σ_b m_bt; H_batch = mean over positions with a valid token of −Σ p̄ log p̄."""
    p = torch.softmax(x.double() / tau, -1)
    m = mask.double()
    cnt = m.sum(0)
    pbar = (m[:, :, None] * p).sum(0) / cnt.clamp_min(1.0)[:, None]
    h_t = -(pbar * torch.log(torch.where(pbar > 0, pbar, torch.ones_like(pbar)))).sum(-1)
    return torch.where(cnt > 0, h_t, torch.zeros_like(h_t)).sum() / (cnt > 0).sum().clamp_min(1)


def _run(backend, x, mask, tau, upstream):
    xx = x.clone().requires_grad_()
    with F.use_backend(backend):
        h = F.batch_entropy(xx, mask, temperature=tau)
    (h * upstream).backward()
    return h, xx.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _mask(B, T):
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 1] = 0                                                    # a position with no valid token
    mask[0] = 0                                                       # an all-masked sequence
    mask[1, 0] = 1
    return mask


@pytest.mark.parametrize("V,block,dtype,tau", [
    (37, 4096, torch.float32, 1.0),
    (300, 128, torch.float32, 0.7),        # three vocabulary blocks, the last partial
    (300, 128, torch.bfloat16, 1.0),
    (37, 16, torch.float16, 1.3),
])
def test_value_and_grad_against_float64(monkeypatch, V, block, dtype, tau):
    monkeypatch.setattr(K, "MAX_BLOCK_V", block)
    B, T = 4, 5
    x = (torch.randn(B, T, V) * 2).to(dtype)
    mask = _mask(B, T)
    upstream = float(torch.rand(()) * 3 + 0.5)
    x64 = x.double().requires_grad_()
    (_h_batch_f64(x64, mask, tau) * upstream).backward()
    h64 = _h_batch_f64(x, mask, tau)
    h_r, grad_r = _run("torch", x, mask, tau, upstream)
    h_t, grad_t = _run("triton", x, mask, tau, upstream)
    assert h_t.dtype == torch.float32 and h_t.dim() == 0 and grad_t.dtype == dtype
    floor_g = 1e-7 + EPS[dtype] * x64.grad.abs().max().item()
    for fast, slow, exact, floor in ((h_t, h_r, h64, 1e-5), (grad_t, grad_r, x64.grad, floor_g)):
        e_ref, e_fast = _max_err(slow, exact), _max_err(fast, exact)
        assert e_ref <= 1e-4 + floor, "reference too far from float64"
        assert e_fast <= 2 * e_ref + floor, (e_fast, e_ref)
    assert (grad_t[0] == 0).all() and (grad_t[:, 1] == 0).all()       # masked tokens get no gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_zero_mask_is_zero_not_nan(backend):
    x = torch.randn(2, 3, 11)
    h, grad = _run(backend, x, torch.zeros(2, 3), 1.0, 1.0)
    assert h.item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_logits_stay_finite(backend):
    x = torch.randn(3, 4, 20)
    x[..., ::3] = float("-inf")
    mask = torch.ones(3, 4)
    h, grad = _run(backend, x, mask, 1.0, 1.0)
    x64 = x[..., torch.arange(20) % 3 != 0].double().requires_grad_()
    _h_batch_f64(x64, mask, 1.0).backward()
    assert torch.isfinite(h) and torch.isfinite(grad).all() and (grad[..., ::3] == 0).all()
    torch.testing.assert_close(h.double(), _h_batch_f64(x64.detach(), mask, 1.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[..., torch.arange(20) % 3 != 0].double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_non_contiguous_logits():
    """A [B, T, V] view with strides from slicing a bigger buffer (as after logits[:, :-1])."""
    full = torch.randn(3, 6, 25)
    x = full[:, :-1]
    mask = torch.ones(3, 5)
    h_r, grad_r = _run("torch", x, mask, 1.0, 2.0)
    h_t, grad_t = _run("triton", x, mask, 1.0, 2.0)
    torch.testing.assert_close(h_t, h_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_large_vocab_against_float64():
    """Real kernels (compiled, default blocks) on a 151936 vocabulary, bf16."""
    x = (torch.randn(4, 16, 151936) * 2).to(torch.bfloat16).cuda()
    mask = _mask(4, 16).cuda()
    x64 = x.double().requires_grad_()
    (_h_batch_f64(x64, mask, 1.0) * 1.7).backward()
    h64 = _h_batch_f64(x, mask, 1.0)
    h_r, grad_r = _run("torch", x, mask, 1.0, 1.7)
    h_t, grad_t = _run("triton", x, mask, 1.0, 1.7)
    assert _max_err(h_t, h64) <= 2 * _max_err(h_r, h64) + 1e-5
    floor_g = 1e-9 + EPS[torch.bfloat16] * x64.grad.abs().max().item()
    assert _max_err(grad_t, x64.grad) <= 2 * _max_err(grad_r, x64.grad) + floor_g
