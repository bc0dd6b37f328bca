"""Token log-probs and entropy: the reference (torch) and the Triton kernel (kernels/token_logprobs.py,
under TRITON_INTERPRET=1 on CPU) against float64 formulas written here."""
import pytest
import torch

import fastrlhf as F
from fastrlhf.kernels import token_logprobs as K

# Machine epsilon of each input dtype: the absolute floor of the tolerance rule scales with it.
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _f64(x, labels, tau, ignore_index):
    """ℓ and H in float64 from the formulas: z = x/τ, ℓ = z_y − logsumexp z, H = −Σ p log p."""
    z = x.double() / tau
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    ent = -(logp.exp() * logp).sum(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = torch.where(valid, logp.gather(-1, safe[..., None]).squeeze(-1), torch.zeros_like(ent))
    return lp, ent


def _run(backend, x, labels, tau, ignore_index, g_lp, g_ent):
    xx = x.clone().requires_grad_()
    with F.use_backend(backend):
        lp, ent = F.logprobs_and_entropy(xx, labels, temperature=tau, ignore_index=ignore_index)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp, ent, xx.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _inputs(shape, V, dtype, ignore_index=-100, scale=3.0):
    x = (torch.randn(*shape, V) * scale).to(dtype)
    labels = torch.randint(0, V, shape)
    labels.view(-1)[::5] = ignore_index
    return x, labels


@pytest.mark.parametrize("V,block,dtype,tau", [
    (37, 4096, torch.float32, 1.0),
    (1000, 256, torch.float32, 0.7),       # 4 vocabulary blocks, the last one partial
    (1000, 256, torch.bfloat16, 1.0),
    (37, 16, torch.float16, 1.3),
    (300, 128, torch.bfloat16, 0.7),
])
def test_values_and_grads_against_float64(monkeypatch, V, block, dtype, tau):
    monkeypatch.setattr(K, "MAX_BLOCK_V", block)
    x, labels = _inputs((3, 7), V, dtype)
    g_lp, g_ent = torch.randn(3, 7), torch.randn(3, 7)          # non-unit upstream gradients
    x64 = x.double().requires_grad_()
    lp64, ent64 = _f64(x64, labels, tau, -100)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    lp_r, ent_r, grad_r = _run("torch", x, labels, tau, -100, g_lp, g_ent)
    lp_t, ent_t, grad_t = _run("triton", x, labels, tau, -100, g_lp, g_ent)
    assert lp_t.dtype == ent_t.dtype == torch.float32 and grad_t.dtype == dtype
    assert (lp_t[labels == -100] == 0).all()
    # dz holds p ⊙ (z − Σ p z): the subtraction costs up to |z| ulps of float32, so the gradient floor is
    # one rounding of the largest gradient times max(1, max |z|).
    z_max = max(1.0, (x64.detach() / tau).abs().max().item())
    floor_v, floor_g = 1e-5, EPS[dtype] * x64.grad.abs().max().item() * z_max
    for fast, slow, exact, floor in ((lp_t, lp_r, lp64, floor_v), (ent_t, ent_r, ent64, floor_v),
                                     (grad_t, grad_r, x64.grad, floor_g)):
        e_ref, e_fast = _max_err(slow, exact), _max_err(fast, exact)
        assert e_ref <= 1e-4 + floor, "reference too far from float64"
        assert e_fast <= 2 * e_ref + floor, (e_fast, e_ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_label_gradient_is_zero(backend):
    """ℓ is the constant 0 at an ignored label, so its upstream gradient must not reach the logits."""
    x, labels = _inputs((4, 5), 37, torch.float32, ignore_index=-1)
    g_lp = torch.randn(4, 5)
    _, _, grad = _run(backend, x, labels, 1.0, -1, g_lp, torch.zeros(4, 5))
    assert (grad[labels == -1] == 0).all()
    x64 = x.double().requires_grad_()
    lp64, _ = _f64(x64, labels, 1.0, -1)
    (lp64 * g_lp).sum().backward()
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_logits_stay_finite(monkeypatch, backend):
    """Masked vocabulary (−inf logits): finite ℓ, H and gradients, equal to the function on the
    finite columns alone, with zero gradient on the masked columns."""
    monkeypatch.setattr(K, "MAX_BLOCK_V", 32)
    V = 70
    x, labels = _inputs((6,), V, torch.float32)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[::3] = True
    banned[64:] = True                                         # a whole vocabulary block is −inf
    x[:, banned] = float("-inf")
    allowed = (~banned).nonzero().squeeze(1)
    labels = torch.where(labels >= 0, allowed[labels.clamp_min(0) % allowed.numel()], labels)
    g_lp, g_ent = torch.randn(6), torch.randn(6)
    lp, ent, grad = _run(backend, x, labels, 1.0, -100, g_lp, g_ent)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    keep = (~banned).nonzero().squeeze(1)
    remap = torch.full((V,), -100, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    labels_k = torch.where(labels >= 0, remap[labels.clamp_min(0)], labels)
    x64 = x[:, keep].double().requires_grad_()
    lp64, ent64 = _f64(x64, labels_k, 1.0, -100)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    torch.testing.assert_close(lp.double(), lp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[:, keep].double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert (grad[:, banned] == 0).all()


def test_nonfinite_row_gives_nan_for_that_row_only():
    x, labels = _inputs((5,), 37, torch.float32)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    lp, ent, grad = _run("triton", x, labels, 1.0, -100, torch.randn(5), torch.randn(5))
    bad = torch.tensor([False, True, False, True, False])
    assert torch.isnan(ent[bad]).all() and torch.isfinite(ent[~bad]).all()
    assert torch.isfinite(lp[~bad]).all() and torch.isfinite(grad[~bad]).all()
    assert torch.isnan(grad[bad]).any(dim=1).all()


def test_half_precision_log_softmax_trap():
    """A known trap: log-softmax computed in bf16 is off by ~0.1 nats at logit scale 20; the kernel
    accumulates in fp32 and stays at fp32 accuracy for the same bf16 inputs."""
    x, labels = _inputs((8,), 1000, torch.bfloat16, scale=20.0)
    labels[:] = torch.randint(0, 1000, (8,))                   # typical tokens: ℓ of −10..−80 nats
    lp64, _ = _f64(x, labels, 1.0, -100)
    with F.use_backend("triton"):
        lp = F.token_logprobs(x, labels)
    naive = torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1)
    assert _max_err(naive, lp64) > 1e-2                        # the trap is real at this scale
    assert _max_err(lp, lp64) < 1e-4


def test_rows_past_65535():
    """More rows than a CUDA grid's y/z limit: the persistent 1-D grid loops over all row tiles."""
    n, V = 70_000, 5
    x, labels = _inputs((n,), V, torch.float32, scale=1.0)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    x64 = x.double().requires_grad_()
    lp64, ent64 = _f64(x64, labels, 1.0, -100)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    lp, ent, grad = _run("triton", x, labels, 1.0, -100, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), lp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


def test_large_vocab_config_is_one_row_per_tile():
    """V up to 262144: a vocabulary loop over 4096-wide blocks, one row per tile."""
    block_n, block_v, _, n_tiles, grid = K.launch_config(16384, 262144, torch.device("cpu"))
    assert (block_n, block_v, n_tiles) == (1, K.MAX_BLOCK_V, 16384) and grid == (K.MAX_PROGRAMS_CPU,)
    assert K.launch_config(100, 37, torch.device("cpu"))[:2] == (64, 64)


def test_launcher_errors_name_the_argument():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels"):
        K.row_stats(x, torch.zeros(3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="logits2d"):
        K.row_stats(x[None], torch.zeros(4, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="logits2d"):
        K.row_stats(x.long(), torch.zeros(4, dtype=torch.long), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("V", [32000, 151936, 262144])
def test_cuda_large_vocab_against_float64(V):
    """Real kernels (compiled, default blocks and persistent grid) on the target vocabularies (32k-262k), bf16."""
    x, labels = _inputs((96,), V, torch.bfloat16)
    x, labels = x.cuda(), labels.cuda()
    g_lp, g_ent = torch.randn(96, device="cuda"), torch.randn(96, device="cuda")
    x64 = x.double().requires_grad_()
    lp64, ent64 = _f64(x64, labels, 0.9, -100)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    lp_r, ent_r, grad_r = _run("torch", x, labels, 0.9, -100, g_lp, g_ent)
    lp_t, ent_t, grad_t = _run("triton", x, labels, 0.9, -100, g_lp, g_ent)
    floor_g = EPS[torch.bfloat16] * x64.grad.abs().max().item()
    for fast, slow, exact, floor in ((lp_t, lp_r, lp64, 1e-5), (ent_t, ent_r, ent64, 1e-5),
                                     (grad_t, grad_r, x64.grad, floor_g)):
        assert _max_err(fast, exact) <= 2 * _max_err(slow, exact) + floor
