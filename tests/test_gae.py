"""GAE: the extension (fastrlhf.extension.gae, CPU and CUDA) and the reference against a float64 loop."""
import pytest
import torch

import fastrlhf
from fastrlhf import ref

import fastrlhf.extension as ext  # noqa: E402  (CI builds the CPU extension: a failed build fails here)

PARAMS = [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)]


def gae64(rewards, values, mask, gamma, lam):
    """Per-row loop in float64: delta_t = r_t + γ V_{t+1} − V_t (V past the last valid token = 0),
    A_t = delta_t + γλ A_{t+1}; R = A + V; padded positions 0."""
    r, v, m = rewards.double(), values.double(), mask.double()
    B, T = r.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(m[b].sum())
        last = 0.0
        for t in range(n - 1, -1, -1):
            v_next = float(v[b, t + 1]) if t + 1 < n else 0.0
            last = float(r[b, t]) + gamma * v_next - float(v[b, t]) + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(v[b, t])
    return adv, ret


def _batch(T, lengths, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(T)
    B = len(lengths)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


def _max_err(out, want):
    return max((o.double().cpu() - w).abs().max().item() for o, w in zip(out, want))


@pytest.mark.parametrize("gamma,lam", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ext_and_ref_match_float64_loop(gamma, lam, dtype):
    T = 37
    r, v, m = _batch(T, [T, 1, 0, 20, T - 1, 2])
    r, v = r.to(dtype), v.to(dtype)
    want = gae64(r, v, m, gamma, lam)
    got_ref = ref.gae(r, v, m, gamma=gamma, lam=lam)
    got_ext = ext.gae(r, v, m, gamma=gamma, lam=lam)
    err_ref, err_ext = _max_err(got_ref, want), _max_err(got_ext, want)
    assert err_ext <= 2 * err_ref + 1e-5, (err_ext, err_ref)
    for out in got_ext:
        assert out.dtype == torch.float32
        assert (out[m == 0] == 0).all()


def test_public_op_uses_extension_and_masks_of_any_dtype():
    r, v, m = _batch(16, [16, 5, 0, 1])
    want = ext.gae(r, v, m, gamma=0.9, lam=0.8)
    for mask in (m, m.bool(), m.long()):
        got = fastrlhf.gae(r, v, mask, gamma=0.9, lam=0.8)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_long_rows():
    r, v, m = _batch(2049, [2049, 1000, 1])
    want = gae64(r, v, m, 1.0, 0.95)
    err_ref = _max_err(ref.gae(r, v, m, gamma=1.0, lam=0.95), want)
    err_ext = _max_err(ext.gae(r, v, m, gamma=1.0, lam=0.95), want)
    assert err_ext <= 2 * err_ref + 1e-5, (err_ext, err_ref)


def test_bad_inputs():
    r, v, m = _batch(8, [8, 4])
    holes = m.clone()
    holes[1, 6] = 1  # a 1 after a 0: not a prefix
    with pytest.raises(ValueError, match="mask: expected a prefix"):
        fastrlhf.gae(r, v, holes)
    with pytest.raises(ValueError, match="values: expected shape"):
        fastrlhf.gae(r, v[:, :-1], m)
    with pytest.raises(ValueError, match="mask: expected shape"):
        fastrlhf.gae(r, v, m[:1])
    with pytest.raises(ValueError, match="rewards: expected 2 dims"):
        fastrlhf.gae(r[0], v[0], m[0])
    with pytest.raises(RuntimeError, match="gae: values: expected shape"):  # the operator checks too
        torch.ops.fastrlhf.gae(r, v[:, :-1].contiguous(), m, 1.0, 0.95)
    with pytest.raises(RuntimeError, match=r"gae: gamma: expected a number in \[0, 1\], got nan"):
        torch.ops.fastrlhf.gae(r, v, m, float("nan"), 0.95)
    with pytest.raises(RuntimeError, match=r"gae: lam: expected a number in \[0, 1\], got 2"):
        torch.ops.fastrlhf.gae(r, v, m, 1.0, 2.0)


GARBAGE = (float("nan"), float("inf"), float("-inf"), 3e38)


def with_garbage(t, mask, seed=0):
    """t with NaN / ±inf / 3e38 written at every masked position (padding may hold anything)."""
    fill = torch.tensor(GARBAGE)[torch.randint(len(GARBAGE), t.shape, generator=torch.Generator().manual_seed(seed))]
    return torch.where(mask.bool(), t, fill.to(t.dtype))


IMPLS = {"ref": ref.gae, "ext": ext.gae, "public": fastrlhf.gae}


@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_at_masked_positions_gives_exactly_the_clean_result(impl):
    """0·NaN = NaN: a product with the mask at padded positions would spread NaN to every valid token
    of the row through the reverse scan; a select keeps the clean values bit for bit."""
    r, v, m = _batch(40, [40, 17, 1, 0, 39])
    want = IMPLS[impl](r, v, m, gamma=0.99, lam=0.9)
    for mask in (m, m.bool()):
        got = IMPLS[impl](with_garbage(r, m, 1), with_garbage(v, m, 2), mask, gamma=0.99, lam=0.9)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.isfinite(out).all() for out in got)


def test_reference_gradient_is_zero_at_masked_positions():
    r, v, m = _batch(12, [12, 5, 0])
    r, v = with_garbage(r, m, 3).requires_grad_(), with_garbage(v, m, 4).requires_grad_()
    adv, ret = ref.gae(r, v, m, gamma=0.9, lam=0.8)
    (adv.sum() + ret.sum()).backward()
    for g in (r.grad, v.grad):
        assert torch.isfinite(g).all() and (g[m == 0] == 0).all()


@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, float("nan")])
def test_mask_values_other_than_0_and_1_are_refused(bad):
    r, v, m = _batch(6, [6, 3])
    m[0, 2] = bad
    with pytest.raises(ValueError, match=r"mask: expected only 0s and 1s .*got "):
        fastrlhf.gae(r, v, m)
    with pytest.raises(ValueError, match=r"mask: expected only 0s and 1s .*got 2$"):
        fastrlhf.gae(r, v, m.long().clamp(0, 1) * 2)


@pytest.mark.parametrize("knob,value,match", [
    ("gamma", 1.5, "gamma: expected a number in \\[0, 1\\], got 1.5"),
    ("gamma", -0.1, "gamma: expected a number in \\[0, 1\\], got -0.1"),
    ("gamma", float("nan"), "gamma: expected a finite number, got nan"),
    ("gamma", "0.9", "gamma: expected a finite number, got '0.9'"),
    ("gamma", True, "gamma: expected a finite number, got True"),
    ("lam", 2, "lam: expected a number in \\[0, 1\\], got 2"),
    ("lam", float("inf"), "lam: expected a finite number, got inf"),
    ("lam", None, "lam: expected a finite number, got None"),
])
def test_bad_gamma_and_lam_are_refused(knob, value, match):
    r, v, m = _batch(6, [6, 3])
    with pytest.raises(ValueError, match=match):
        fastrlhf.gae(r, v, m, **{knob: value})


def test_knobs_as_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    r, v, m = _batch(6, [6, 3])
    torch.testing.assert_close(fastrlhf.gae(r, v, m, gamma=np.float32(0.5), lam=np.float64(0.25)),
                               fastrlhf.gae(r, v, m, gamma=0.5, lam=0.25), rtol=0, atol=0)


def test_tensors_on_another_device_are_named_before_any_host_read():
    r, v, m = _batch(6, [6, 3])
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .*got meta"):
        fastrlhf.gae(r, v, m.to("meta"))
    with pytest.raises(ValueError, match="values: expected a tensor on cpu .*got meta"):
        fastrlhf.gae(r, v.to("meta"), m)
    with pytest.raises(ValueError, match="rewards: expected a tensor with data, got a meta tensor"):
        fastrlhf.gae(r.to("meta"), v.to("meta"), m.to("meta"))
    with pytest.raises(TypeError, match="values: expected a floating dtype"):
        fastrlhf.gae(r, v.long(), m)


@pytest.mark.cuda
def test_cuda_garbage_at_masked_positions_and_graph_capture():
    r, v, m = (t.cuda() for t in _batch(3001, [3001, 1000, 1, 0]))
    want = ext.gae(r, v, m, gamma=0.99, lam=0.95)
    got = ext.gae(with_garbage(r, m, 1), with_garbage(v, m, 2), m, gamma=0.99, lam=0.95)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the public op's checks read no value while a CUDA graph is being captured
    fastrlhf.gae(r, v, m)                                      # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adv, _ = fastrlhf.gae(r, v, m, gamma=0.99, lam=0.95)
    graph.replay()
    torch.testing.assert_close(adv, want[0], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 5, 1023, 1024, 3001])
@pytest.mark.parametrize("gamma,lam", PARAMS[:2])
def test_cuda_matches_float64_loop(T, gamma, lam):
    lengths = [T, 1, 0, max(1, T // 2), max(1, T - 3)]
    r, v, m = _batch(T, lengths)
    want = gae64(r, v, m, gamma, lam)
    err_ref = _max_err(ref.gae(r, v, m, gamma=gamma, lam=lam), want)
    got = ext.gae(r.cuda(), v.cuda(), m.cuda(), gamma=gamma, lam=lam)
    assert got[0].is_cuda and _max_err(got, want) <= 2 * err_ref + 1e-5
    assert (got[0].cpu()[m == 0] == 0).all() and (got[1].cpu()[m == 0] == 0).all()
