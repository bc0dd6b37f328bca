"""The CUDA kernels of csrc/ (gae.cuh, sample_tokens.cuh) run on the CPU by tests/emu/cuda_emu.h: one
std::thread per CUDA thread, __syncthreads a barrier, the cub block primitives replaced by plain ones with
cub's contract. This checks the kernels' math, tiling, indexing and block synchronization without a GPU
(race_check also runs them under ThreadSanitizer, which reports a missing __syncthreads as a data race);
the launchers in ops_cuda.cu, warp-level behaviour and speed still need the GPU tests (marker `cuda`)."""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastrlhf import ops, ref
from test_gae import PARAMS, gae64, with_garbage
from test_sample_tokens import expected_probs

EMU = Path(__file__).resolve().parent / "emu"
GAE_TILE = 256 * 4            # GAE_BLOCK * GAE_ITEMS in csrc/gae.cuh
DRAW_TILE = 1024 * 4          # SAMPLE_BLOCK * SAMPLE_ITEMS in csrc/sample_tokens.cuh


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx):
        pytest.skip("no C++ compiler (g++ or clang++) to build the emulated kernels")
    return cxx


def _compile(out, *flags, source="kernels.cpp"):
    cmd = [_compiler(), "-std=c++20", "-pthread", *flags, str(EMU / source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = tmp_path_factory.mktemp("emu") / "emu_kernels.so"
    done = _compile(path, "-O2", "-shared", "-fPIC")
    assert done.returncode == 0, done.stderr[-3000:]
    lib = ctypes.CDLL(str(path))
    P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.emu_gae.argtypes = [P, P, P, P, P, I64, I64, F32, F32]
    lib.emu_sample_tokens.argtypes = [P, P, I64, I64, F32, ctypes.c_int, I64, F32, P, P]
    return lib


def emu_gae(lib, rewards, values, mask, gamma, lam):
    r, v, m = (t.float().contiguous() for t in (rewards, values, mask))
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    B, T = r.shape
    lib.emu_gae(r.data_ptr(), v.data_ptr(), m.data_ptr(), adv.data_ptr(), ret.data_ptr(), B, T, gamma, gamma * lam)
    return adv, ret


def emu_sample(lib, logits, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    """The launcher's arguments as ops_cuda.cu passes them (ops.h: greedy when temperature == 0 or
    top_k == 1; tau = temperature, 1 when it is 0)."""
    x = logits.float().contiguous()
    B, V = x.shape
    u = uniforms.double().contiguous()
    tokens, logprobs = torch.empty(B, dtype=torch.long), torch.empty(B)
    greedy = temperature == 0 or top_k == 1
    tau = temperature if temperature > 0 else 1.0
    lib.emu_sample_tokens(x.data_ptr(), u.data_ptr(), B, V, tau, int(greedy), top_k, top_p,
                          tokens.data_ptr(), logprobs.data_ptr())
    return tokens, logprobs


def _err(out, want):
    return max((o.double() - w).abs().max().item() for o, w in zip(out, want))


@pytest.mark.parametrize("gamma,lam", PARAMS)
def test_gae_kernel_matches_float64_loop(lib, gamma, lam):
    # T around one and two tiles, lengths 0, 1, partial (ending inside and at a tile edge) and full
    for T in (1, 37, GAE_TILE - 1, GAE_TILE, GAE_TILE + 1, 2 * GAE_TILE + 1):
        lengths = sorted({0, 1, T // 2, min(GAE_TILE, T), T - 1, T})
        g = torch.Generator().manual_seed(T)
        r, v = torch.randn(len(lengths), T, generator=g), torch.randn(len(lengths), T, generator=g)
        m = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
        want = gae64(r, v, m, gamma, lam)
        got = emu_gae(lib, r, v, m, gamma, lam)
        err, err_ref = _err(got, want), _err(ref.gae(r, v, m, gamma=gamma, lam=lam), want)
        assert err <= 2 * err_ref + 1e-5, (T, err, err_ref)
        assert all((out[m == 0] == 0).all() for out in got), T


def test_gae_kernel_garbage_at_masked_positions_gives_exactly_the_clean_result(lib):
    # lengths ending inside a thread's chunk, at a chunk edge and inside the second tile; padding NaN / ±inf
    T = GAE_TILE + 37
    lengths = [T, GAE_TILE + 1, GAE_TILE, 4 * 3 + 1, 4, 1, 0]
    g = torch.Generator().manual_seed(7)
    r, v = torch.randn(len(lengths), T, generator=g), torch.randn(len(lengths), T, generator=g)
    m = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    want = emu_gae(lib, r, v, m, 0.99, 0.95)
    got = emu_gae(lib, with_garbage(r, m, 1), with_garbage(v, m, 2), m, 0.99, 0.95)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.isfinite(out).all() for out in got)


def _inverse_cdf(probs, u):
    """float64: the first index whose cumulative probability exceeds u, and the distance of u to the
    nearest cumulative boundary (where float32 sums may legitimately pick the neighbour)."""
    cum = torch.cumsum(probs, 0)
    idx = torch.searchsorted(cum, u, right=True).clamp_max(len(probs) - 1)
    # a draw can only land on a kept token: step back over trailing zero-probability ones
    kept = (probs > 0).nonzero().flatten()
    idx = torch.where(probs[idx] > 0, idx, kept[-1])
    dist = (cum[None] - u[:, None]).abs().min(1).values
    return idx, dist


CASES = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=50, top_p=1.0),
         dict(temperature=1.0, top_k=0, top_p=0.9), dict(temperature=0.8, top_k=300, top_p=0.6),
         dict(temperature=1.3, top_k=5000, top_p=0.95)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
@pytest.mark.parametrize("V", [3, 1000, DRAW_TILE + 901])
def test_sample_kernel_draws_the_inverse_cdf(lib, case, V):
    """Rows = one logit vector with uniforms on a grid (and 0, 1 - 2^-53): every draw must be the float64
    inverse CDF of the kept, renormalized distribution (so the kept set, its mass and the scan are all
    right), and the log-prob that of the tempered full softmax."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(V)) * 3
    n = 24
    u = torch.cat([torch.tensor([0.0, 1 - 2.0 ** -53], dtype=torch.float64),
                   (torch.arange(n, dtype=torch.float64) + 0.5) / n])
    tokens, lp = emu_sample(lib, logits[None].expand(len(u), V), u, **case)
    want, dist = _inverse_cdf(expected_probs(logits, **case), u)
    safe = dist > 1e-5
    assert safe.sum() >= len(u) - 2
    assert torch.equal(tokens[safe], want[safe]), (tokens, want)
    full = torch.log_softmax(logits.double() / case["temperature"], -1)[tokens]
    full32 = torch.log_softmax(logits / case["temperature"], -1)[tokens]
    err, err_ref = (lp.double() - full).abs().max().item(), (full32.double() - full).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


def test_sample_kernel_at_a_large_vocab_matches_the_cpu_operator(lib):
    import fastrlhf.extension  # noqa: F401  (registers torch.ops.fastrlhf; CI builds it)
    B, V = 6, 151936
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
    u = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (0.8, 0, 1.0), (0.8, 50, 1.0), (1.0, 0, 0.9), (0.7, 100, 0.5)):
        got = emu_sample(lib, logits, u, temperature, top_k, top_p)
        want = torch.ops.fastrlhf.sample_tokens(logits, u, temperature, top_k, top_p)
        assert torch.equal(got[0], want[0]), (temperature, top_k, top_p)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_sample_kernel_top_k_1_is_greedy_under_the_tempered_softmax(lib):
    import fastrlhf.extension  # noqa: F401
    V = DRAW_TILE + 901
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3)) * 3
    u = torch.full((5,), 0.5, dtype=torch.float64)
    for tau in (0.5, 1.0, 2.0):
        tokens, lp = emu_sample(lib, logits, u, temperature=tau, top_k=1)
        assert torch.equal(tokens, logits.argmax(-1))
        want = torch.log_softmax(logits.double() / tau, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
        cpu = torch.ops.fastrlhf.sample_tokens(logits, u, tau, 1, 1.0)
        assert torch.equal(cpu[0], tokens)
        torch.testing.assert_close(cpu[1], lp, atol=1e-5, rtol=1e-5)


def test_sample_kernel_tiny_temperature_does_not_overflow(lib):
    # z = (x − max x)/τ <= 0: x/τ would be inf here (3e9 / 1e-30), making the row NaN
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(4)) * 3
    u = torch.tensor([0.0, 0.3, 0.7, 1 - 2.0 ** -53], dtype=torch.float64)
    for tau, scale in ((ops.MIN_TEMPERATURE, 1.0), (1e-30, 1e9)):
        for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.5), (1, 1.0)):
            tokens, lp = emu_sample(lib, logits * scale, u, tau, top_k, top_p)
            assert torch.equal(tokens, logits.argmax(-1)) and (lp == 0).all(), (tau, top_k, top_p, lp)


def test_sample_kernel_ties_greedy_and_masked_tokens(lib):
    # greedy: the first index of the max; tied k-th values are all kept (ops.cpp semantics); -inf never drawn
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, -1.0],
                      [float("-inf"), 1.0, 1.0, 1.0, 0.5],
                      [3.0, float("-inf"), 3.0, float("-inf"), float("-inf")]])
    tokens, lp = emu_sample(lib, x, torch.zeros(3, dtype=torch.float64), temperature=0.0)
    assert tokens.tolist() == [1, 1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(x, -1)[torch.arange(3), tokens])
    u = (torch.arange(30, dtype=torch.float64) + 0.5) / 30  # each kept token holds >= 1/4 of the mass
    rows = x[1:2].expand(30, 5)
    drawn = set(emu_sample(lib, rows, u, temperature=1.0, top_k=2)[0].tolist())
    assert drawn == {1, 2, 3}  # three tied at the 2nd largest value: all kept, the 0.5 and -inf ones not
    import fastrlhf.extension  # noqa: F401
    assert drawn == set(torch.ops.fastrlhf.sample_tokens(rows.contiguous(), u, 1.0, 2, 1.0)[0].tolist())
    drawn = set(emu_sample(lib, x[2:3].expand(30, 5), u, temperature=1.0, top_p=0.3)[0].tolist())
    assert drawn == {0, 2}  # equal logits: the threshold keeps both, whatever top_p


def test_sample_kernel_non_finite_rows_give_in_range_tokens_and_nan_logprobs(lib):
    import fastrlhf.extension  # noqa: F401
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf] * 6, [0.0, nan, 1.0, 2.0, 0.0, 0.0], [0.0, inf, 1.0, inf, 0.0, 0.0], [nan] * 6])
    u = torch.full((4,), 0.5, dtype=torch.float64)
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.5)):
        tokens, lp = emu_sample(lib, x, u, temperature, top_k, top_p)
        assert ((tokens >= 0) & (tokens < 6)).all() and lp.isnan().all(), (temperature, top_k, top_p, tokens, lp)
        cpu_tokens, cpu_lp = torch.ops.fastrlhf.sample_tokens(x, u, temperature, top_k, top_p)
        assert ((cpu_tokens >= 0) & (cpu_tokens < 6)).all() and cpu_lp.isnan().all()
        if top_p == 1.0:
            assert torch.equal(tokens, cpu_tokens)


@pytest.mark.slow
def test_no_data_races_under_thread_sanitizer(tmp_path):
    exe = tmp_path / "race_check"
    done = _compile(exe, "-O1", "-g", "-fsanitize=thread", source="race_check.cpp")
    if done.returncode != 0 and "tsan" in done.stderr.lower():
        pytest.skip("the compiler has no ThreadSanitizer runtime: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0 and "race_check: ok" in run.stdout, (run.returncode, run.stderr[-2000:])
