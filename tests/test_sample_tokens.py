"""sample_tokens: the extension (CPU, CUDA) and the reference against the sampling distribution written
here in float64 (temperature, then top-k, then top-p on the top-k-renormalized distribution)."""
import math

import pytest
import torch

import fastrlhf
import fastrlhf.extension as ext  # CI builds the CPU extension: a failed build fails here
from fastrlhf import ops, ref

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
    """temperature 0: the argmax, log-prob untempered; top_k 1: the argmax, log-prob under the tempered
    softmax (float64 formula)."""
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = logits.float().argmax(-1)
    for kw, tau in ((dict(temperature=0.0), 1.0), (dict(temperature=0.5, top_k=1), 0.5),
                    (dict(temperature=2.0, top_k=1, top_p=0.3), 2.0), (dict(temperature=1.0, top_k=1), 1.0)):
        tokens, lp = IMPLS[impl](logits, **kw)
        assert torch.equal(tokens, want)
        want_lp = torch.log_softmax(logits.double() / tau, -1).gather(-1, want[:, None]).squeeze(-1)
        torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["ext", "ref", "public"])
def test_top_k_1_logprob_is_tempered(impl):
    """The reported case: logits [1, 0], top_k 1, τ 0.5 -> token 0 with log-prob −log(1 + e^−2) = −0.127
    under softmax(x/τ), not the untempered −log(1 + e^−1) = −0.313."""
    fn = fastrlhf.sample_tokens if impl == "public" else IMPLS[impl]
    tokens, lp = fn(torch.tensor([[1.0, 0.0]]), top_k=1, temperature=0.5)
    assert tokens.tolist() == [0]
    assert abs(lp.item() - (-math.log1p(math.exp(-2.0)))) < 1e-6, lp.item()


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_tiny_temperature_does_not_overflow(impl):
    """z = (x − max x)/τ <= 0: at the smallest accepted τ, and at τ = 1e-30 with logits of 1e9 (x/τ
    would be inf and the row NaN), the draw is the argmax with log-prob 0, finite."""
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(6)) * 3
    for tau, scale in ((ops.MIN_TEMPERATURE, 1.0), (1e-30, 1e9)):
        for kw in (dict(), dict(top_k=5), dict(top_p=0.5), dict(top_k=1)):
            tokens, lp = IMPLS[impl](logits * scale, temperature=tau, generator=torch.Generator().manual_seed(0),
                                     **kw)
            assert torch.equal(tokens, logits.argmax(-1)), (tau, kw)
            assert (lp == 0).all(), (tau, kw, lp)


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
    with pytest.raises(RuntimeError, match="temperature: expected 0 or a finite number >= 1.17549e-38, got 1e-45"):
        torch.ops.fastrlhf.sample_tokens(logits, torch.rand(2, dtype=torch.float64), 1e-45, 0, 1.0)
    with pytest.raises(RuntimeError, match="temperature: expected 0 or a finite number"):
        torch.ops.fastrlhf.sample_tokens(logits, torch.rand(2, dtype=torch.float64), float("inf"), 0, 1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=1e-45), ValueError, r"temperature: expected 0 or a number >= 1.17549\d*e-38 \(the smallest "
                                          r"normal float32.*got 1e-45"),
    (dict(temperature=float("nan")), ValueError, "temperature: expected a finite number, got nan"),
    (dict(temperature=float("inf")), ValueError, "temperature: expected a finite number, got inf"),
    (dict(temperature="0.7"), ValueError, "temperature: expected a finite number, got '0.7'"),
    (dict(temperature=True), ValueError, "temperature: expected a finite number, got True"),
    (dict(top_k=2.5), ValueError, "top_k: expected an int >= 0, got 2.5"),
    (dict(top_k=True), ValueError, "top_k: expected an int >= 0, got True"),
    (dict(top_k="5"), ValueError, "top_k: expected an int >= 0, got '5'"),
    (dict(top_p=float("nan")), ValueError, "top_p: expected a finite number, got nan"),
    (dict(top_p="0.9"), ValueError, "top_p: expected a finite number, got '0.9'"),
    (dict(generator=5), TypeError, r"generator: expected None or a torch.Generator on cpu \(the logits' device\), "
                                   r"got int"),
])
def test_bad_knobs_are_refused_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastrlhf.sample_tokens(torch.randn(2, 10), **kwargs)


def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match=r"logits: expected a vocabulary of V >= 1 tokens .*got shape \(2, 0\)"):
        fastrlhf.sample_tokens(torch.randn(2, 0))
    with pytest.raises(ValueError, match=r"logits: expected 2 dims \[B, V\], got shape \(\)"):
        fastrlhf.sample_tokens(torch.tensor(1.0))
    with pytest.raises(ValueError, match="logits: expected a tensor with data, got a meta tensor"):
        fastrlhf.sample_tokens(torch.randn(2, 5, device="meta"))
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        fastrlhf.sample_tokens(torch.ones(2, 5, dtype=torch.long))
    tokens, lp = fastrlhf.sample_tokens(torch.randn(0, 5), temperature=0.8)  # an empty batch is fine
    assert tokens.shape == lp.shape == (0,)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
def test_cuda_chi_square(case):
    test_chi_square("ext", case, device="cuda")


@pytest.mark.cuda
def test_cuda_top_k_1_tiny_temperature_and_generator_device():
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(2)) * 3
    x = logits.cuda()
    for tau in (0.5, 2.0):
        tokens, lp = ext.sample_tokens(x, top_k=1, temperature=tau)
        assert torch.equal(tokens.cpu(), logits.argmax(-1))
        want = torch.log_softmax(logits.double() / tau, -1).gather(-1, tokens.cpu()[:, None]).squeeze(-1)
        torch.testing.assert_close(lp.cpu().double(), want, atol=1e-5, rtol=1e-5)
    tokens, lp = ext.sample_tokens(x * 1e9, temperature=1e-30, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(tokens.cpu(), logits.argmax(-1)) and (lp == 0).all()
    with pytest.raises(ValueError, match="generator: expected None or a torch.Generator on cuda:0 .*got one on cpu"):
        fastrlhf.sample_tokens(x, generator=torch.Generator())


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
