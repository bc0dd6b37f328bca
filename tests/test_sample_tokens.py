"""sample_tokens: the extension (CPU, CUDA) and the reference against the sampling distribution written
here in float64 (temperature, then top-k, then top-p on the top-k-renormalized distribution)."""
import pytest
import torch

import fastrlhf
import fastrlhf.extension as ext  # CI builds the CPU extension: a failed build fails here
from fastrlhf import ref

IMPLS = {"ext": ext.sample_tokens, "ref": ref.sample_tokens}

# Upper 0.999 quantiles of the chi-square distribution by degrees of freedom, from standard tables
# (NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.4 "Critical values of the chi-square
# distribution"). With a fixed seed the test is deterministic; a correct sampler passes a fresh seed
# with probability 0.999.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
            9: 27.877, 10: 29.588, 11: 31.264}


def expected_probs(logits, temperature, top_k, top_p):
    """logits [V] -> float64 [V]: the distribution sample_tokens draws from."""
    z = logits.double() / temperature
    p = torch.softmax(z, -1)
    order = torch.argsort(z, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    n = top_k if 0 < top_k < len(z) else len(z)
    keep[order[:n]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    if top_p < 1:
        before = torch.cumsum(q[order], 0) - q[order]
        drop = order[before >= top_p]
        q[drop] = 0
        q = q / q.sum()
    return q


def _logits(V, seed, scale=1.5):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


CASES = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=0, top_p=1.0),
         dict(temperature=1.3, top_k=5, top_p=1.0), dict(temperature=1.0, top_k=0, top_p=0.8),
         dict(temperature=0.8, top_k=7, top_p=0.6)]


def _chi_square(tokens, probs):
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the support"
    exp = probs[support] * n
    stat = ((counts[support] - exp) ** 2 / exp).sum().item()
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
def test_chi_square(impl, case, device="cpu"):
    logits = _logits(10, seed=case["top_k"] * 10 + int(case["top_p"] * 10))
    probs = expected_probs(logits, **case)
    n = 40000
    g = torch.Generator(device=device).manual_seed(1234)
    tokens, _ = IMPLS[impl](logits[None].expand(n, -1).contiguous().to(device), generator=g, **case)
    stat, df = _chi_square(tokens, probs)
    assert df >= 1 and stat < CHI2_999[df], (stat, df)


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_under_tempered_full_softmax(impl, dtype):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5)).mul(3).to(dtype)
    g = torch.Generator().manual_seed(0)
    tokens, lp = IMPLS[impl](logits, temperature=0.6, top_k=40, top_p=0.9, generator=g)
    assert tokens.dtype == torch.int64 and lp.dtype == torch.float32
    want = torch.log_softmax(logits.double() / 0.6, -1).gather(-1, tokens[:, None]).squeeze(-1)
    ref_lp = torch.log_softmax(logits.float() / 0.6, -1).gather(-1, tokens[:, None]).squeeze(-1)
    err, err_ref = (lp.double() - want).abs().max().item(), (ref_lp.double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_support_under_top_k_and_top_p(impl):
    V, B = 2000, 4
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(9)) * 4
    g = torch.Generator().manual_seed(3)
    for top_k, top_p in ((10, 1.0), (0, 0.5), (50, 0.7)):
        drawn = IMPLS[impl](logits.repeat(500, 1), temperature=0.9, top_k=top_k, top_p=top_p, generator=g)[0]
        drawn = drawn.view(500, B)
        for b in range(B):
            probs = expected_probs(logits[b], 0.9, top_k, top_p)
            assert (probs[drawn[:, b]] > 0).all()
            # every kept token of probability >= 0.02 shows up (missed with chance <= 0.98^500 = 4e-5)
            frequent = (probs >= 0.02).nonzero().flatten().tolist()
            assert set(frequent) <= set(drawn[:, b].tolist())


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy(impl, dtype):
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = logits.float().argmax(-1)
    want_lp = torch.log_softmax(logits.double(), -1).gather(-1, want[:, None]).squeeze(-1)
    for kw in (dict(temperature=0.0), dict(temperature=0.5, top_k=1)):
        tokens, lp = IMPLS[impl](logits, **kw)
        assert torch.equal(tokens, want)
        torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_reproducible_with_generator(impl):
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(4))
    a = IMPLS[impl](logits, top_p=0.9, generator=torch.Generator().manual_seed(7))[0]
    b = IMPLS[impl](logits, top_p=0.9, generator=torch.Generator().manual_seed(7))[0]
    c = IMPLS[impl](logits, top_p=0.9, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_public_op_dispatches_to_extension():
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    got = fastrlhf.sample_tokens(logits, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(2))
    want = ext.sample_tokens(logits, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs():
    logits = torch.randn(2, 10)
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p: expected a number in"):
            fastrlhf.sample_tokens(logits, top_p=top_p)
    with pytest.raises(ValueError, match="temperature: expected a number >= 0"):
        fastrlhf.sample_tokens(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k: expected an int >= 0"):
        fastrlhf.sample_tokens(logits, top_k=-2)
    with pytest.raises(ValueError, match="logits: expected 2 dims"):
        fastrlhf.sample_tokens(logits[0])
    with pytest.raises(RuntimeError, match="top_p: expected a number in"):  # the operator checks too
        torch.ops.fastrlhf.sample_tokens(logits, torch.rand(2, dtype=torch.float64), 1.0, 0, 1.5)
    with pytest.raises(RuntimeError, match="uniforms: expected contiguous float64"):
        torch.ops.fastrlhf.sample_tokens(logits, torch.rand(3, dtype=torch.float64), 1.0, 0, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
def test_cuda_chi_square(case):
    test_chi_square("ext", case, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_vocab(dtype):
    V, B = 151936, 8
    logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x = logits.cuda()
    tokens, lp = ext.sample_tokens(x, temperature=0.0)
    assert torch.equal(tokens.cpu(), logits.float().argmax(-1))
    g = torch.Generator(device="cuda").manual_seed(0)
    for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.9), (100, 0.5)):
        tokens, lp = ext.sample_tokens(x.repeat(64, 1), temperature=0.8, top_k=top_k, top_p=top_p, generator=g)
        tokens = tokens.cpu().view(64, B)
        for b in range(B):
            support = expected_probs(logits[b].float(), 0.8, top_k, top_p) > 0
            assert support[tokens[:, b]].all()
        want = torch.log_softmax(logits.double().repeat(64, 1) / 0.8, -1).gather(-1, tokens.view(-1, 1).cpu())
        torch.testing.assert_close(lp.cpu().double(), want.squeeze(-1), atol=2e-3, rtol=1e-4)
