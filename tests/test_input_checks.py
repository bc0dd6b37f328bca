"""Masked positions and knob checks shared by the ops (fastrlhf.ops): whitening and the masked mean never
read what padding holds, every mask is 0/1, every knob is checked by name, and generate's prompt tensors
(fastrlhf.generation.check_inputs). GAE, value loss and sampling have their own tests in test_gae.py,
test_losses.py and test_sample_tokens.py."""
import pytest
import torch

import fastrlhf as F
from fastrlhf import ops, ref
from test_gae import with_garbage
from fastrlhf.generation import check_inputs


def _x_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 9, generator=g) * 5 + 3
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    mask[3] = 0
    return x, mask


@pytest.mark.parametrize("whiten", [ref.whiten, F.whiten], ids=["ref", "public"])
def test_whiten_garbage_at_masked_positions_gives_exactly_the_clean_result_and_zero_gradient(whiten):
    """(x·m) with NaN at a masked position is NaN in the mean, and so in every output; a select is not."""
    x, mask = _x_mask()
    weight = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    outs = []
    for xi in (x, with_garbage(x, mask, 2)):
        xi = xi.clone().requires_grad_()
        out = whiten(xi, mask)
        (out * weight).sum().backward()
        outs.append((out, xi.grad))
    (out0, g0), (out1, g1) = outs
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert torch.isfinite(g1).all() and (g1[mask == 0] == 0).all() and (out1[mask == 0] == 0).all()


def test_whiten_all_masked_with_nan_padding_gives_zeros():
    x = torch.full((2, 3), float("nan"))
    assert torch.equal(F.whiten(x, torch.zeros(2, 3)), torch.zeros(2, 3))


def test_masked_mean_never_reads_masked_values():
    x, mask = _x_mask()
    dirty = with_garbage(x, mask, 3).requires_grad_()
    mean = ref.masked_mean(dirty, mask)
    mean.backward()
    torch.testing.assert_close(mean, x[mask.bool()].mean(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[mask == 0] == 0).all()
    assert ref.masked_mean(dirty, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, float("nan")])
def test_whiten_mask_values_other_than_0_and_1_are_refused(bad):
    x, mask = _x_mask()
    mask[0, 0] = bad
    with pytest.raises(ValueError, match="mask: expected only 0s and 1s"):
        F.whiten(x, mask)


def test_masks_of_any_0_1_dtype_are_accepted_and_agree():
    x, mask = _x_mask()
    want = F.whiten(x, mask)
    for m in (mask.bool(), mask.long(), mask.to(torch.uint8), mask.double()):
        torch.testing.assert_close(F.whiten(x, m), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="mask: expected a bool, integer or float tensor"):
        F.whiten(x, mask.to(torch.complex64))


def test_check_mask_names_the_argument_and_reads_nothing_of_a_tensor_elsewhere():
    x, mask = _x_mask()
    ops._check_mask("response_mask", mask, x.shape, x.device)
    minus = mask.long()
    minus[2, 5] = -1
    with pytest.raises(ValueError, match=r"response_mask: expected only 0s and 1s .*got -1$"):
        ops._check_mask("response_mask", minus, x.shape, x.device)
    with pytest.raises(ValueError, match=r"response_mask: expected shape \(4, 9\), got \(9, 4\)"):
        ops._check_mask("response_mask", mask.T, x.shape, x.device)
    with pytest.raises(ValueError, match="response_mask: expected a tensor on cpu .*got meta"):
        ops._check_mask("response_mask", mask.to("meta"), x.shape, x.device)
    with pytest.raises(TypeError, match="response_mask: expected a torch.Tensor, got list"):
        ops._check_mask("response_mask", mask.tolist(), x.shape, x.device)
    ops._check_mask("empty", torch.empty(0, 3), (0, 3), x.device)


def test_whiten_tensors_are_named():
    x, mask = _x_mask()
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .*got meta"):
        F.whiten(x, mask.to("meta"))
    with pytest.raises(ValueError, match="x: expected a tensor with data, got a meta tensor"):
        F.whiten(x.to("meta"), mask.to("meta"))
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        F.whiten(x.long(), mask)


def test_elementwise_ops_take_0_dim_tensors_as_one_token():
    one = torch.tensor(1.0)
    assert F.whiten(torch.tensor(2.5), one).item() == 0.0
    assert F.value_loss(torch.tensor(2.0), torch.tensor(1.9), torch.tensor(1.0), one, clip=None)[0].item() == 0.5
    assert F.kl_penalty(torch.tensor(-1.0), torch.tensor(-1.5), "k1").item() == 0.5
    with pytest.raises(ValueError, match=r"rewards: expected 2 dims \[B, T\], got shape \(\)"):
        F.gae(one, one, one)


@pytest.mark.parametrize("estimator", ["k4", "K1", None, 3, ["k1"]])
def test_kl_penalty_bad_estimator_is_refused(estimator):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"estimator: expected one of \('k1', 'k2', 'k3'\), got "):
        F.kl_penalty(z, z, estimator)


@pytest.mark.parametrize("temperature,match", [
    (0, "temperature: expected a finite number > 0, got 0"),
    (1e-40, r"temperature: expected a number >= 1.17549\d*e-38 \(the smallest normal float32"),
    (True, "temperature: expected a finite number, got True"),
    (float("inf"), "temperature: expected a finite number, got inf"),
])
def test_loss_side_temperature_check(temperature, match):
    with pytest.raises(ValueError, match=match):
        ops._check_temperature(temperature)
    assert ops._check_temperature(ops.MIN_TEMPERATURE) == ops.MIN_TEMPERATURE


class _Model(torch.nn.Module):
    """What generation.check_inputs reads of a model: its input embedding (else config.vocab_size)."""

    def __init__(self, vocab=97):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4)

    def get_input_embeddings(self):
        return self.embed


def test_check_inputs_accepts_prompts_in_the_vocabulary():
    ids = torch.randint(0, 97, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    check_inputs(_Model(), ids, mask, 4, None, None)
    check_inputs(_Model(), ids, None, 4, None, None)
    check_inputs(_Model(), ids.int(), mask.bool(), 4, None, None)


@pytest.mark.parametrize("case,error,match", [
    ("id = vocab", ValueError, r"input_ids: expected token ids in \[0, 97\) \(the model's vocabulary\), got 97"),
    ("id = -1", ValueError, r"input_ids: expected token ids in \[0, 97\) .*got -1"),
    ("float ids", TypeError, "input_ids: expected an integer dtype \\(token ids\\), got torch.float32"),
    ("bool ids", TypeError, "input_ids: expected an integer dtype"),
    ("empty batch", ValueError, r"input_ids: expected B >= 1 prompts of P >= 1 tokens, got shape \(0, 7\)"),
    ("empty prompts", ValueError, r"input_ids: expected B >= 1 prompts of P >= 1 tokens, got shape \(3, 0\)"),
    ("1 dim", ValueError, r"input_ids: expected 2 dims \[B, P\], got shape \(7,\)"),
    ("list", TypeError, "input_ids: expected a torch.Tensor, got list"),
    ("meta ids", ValueError, "input_ids: expected a tensor with data, got a meta tensor"),
    ("mask of 2", ValueError, "attention_mask: expected only 0s and 1s .*got 2"),
    ("mask shape", ValueError, r"attention_mask: expected shape \(3, 7\), got \(3, 6\)"),
    ("mask device", ValueError, "attention_mask: expected a tensor on cpu .*got meta"),
])
def test_check_inputs_refuses(case, error, match):
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    if case == "id = vocab":
        ids[1, 3] = 97
    elif case == "id = -1":
        ids[2, 0] = -1
    elif case == "float ids":
        ids = ids.float()
    elif case == "bool ids":
        ids = ids > 50
    elif case == "empty batch":
        ids, mask = ids[:0], mask[:0]
    elif case == "empty prompts":
        ids, mask = ids[:, :0], mask[:, :0]
    elif case == "1 dim":
        ids, mask = ids[0], None
    elif case == "list":
        ids = ids.tolist()
    elif case == "meta ids":
        ids = ids.to("meta")
    elif case == "mask of 2":
        mask[1, 1] = 2
    elif case == "mask shape":
        mask = mask[:, 1:]
    elif case == "mask device":
        mask = mask.to("meta")
    with pytest.raises(error, match=match):
        check_inputs(_Model(), ids, mask, 4, None, None)


def test_check_inputs_vocabulary_from_the_config_or_refused():
    class Config:
        vocab_size = 10

    class ConfigOnly:
        config = Config()

    ids = torch.tensor([[3, 9]])
    check_inputs(ConfigOnly(), ids, None, 4, None, None)
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 10\)"):
        check_inputs(ConfigOnly(), ids + 1, None, 4, None, None)
    with pytest.raises(ValueError, match="model: expected a model with get_input_embeddings"):
        check_inputs(object(), ids, None, 4, None, None)


@pytest.mark.cuda
def test_mask_checks_read_nothing_while_a_cuda_graph_is_captured():
    """A host read (bool(mask.any())) inside a capture raises; _check_mask skips the value check there."""
    x, mask = (t.cuda() for t in _x_mask())
    want_x, want_v = F.whiten(x, mask), F.value_loss(x, 0.5 * x, x, mask)[0]   # also the warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_x = F.whiten(x, mask)
        got_v = F.value_loss(x, 0.5 * x, x, mask)[0]
    graph.replay()
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Policy losses: masked garbage is selected out on every path; knobs and tensors checked by name
# ----------------------------------------------------------------------------

from test_fused_linear import loss64 as fused_loss64  # noqa: E402
from test_fused_linear import make_inputs  # noqa: E402
from test_policy_loss import _inputs, _loss_f64  # noqa: E402


def _old_garbage(t, mask):
    """old log-probs at masked positions: −100 (an "ignored" value), −inf, NaN, +inf."""
    fill = torch.tensor([-100.0, float("-inf"), float("nan"), float("inf")]).repeat(t.numel())[:t.numel()]
    return torch.where(mask.bool(), t, fill.view(t.shape))


def _token_f64(lp, old, adv, mask, kw):
    """PPO (or APA with kw["adv_coeff"]) masked mean in float64 from README "Losses"."""
    m = mask.double()
    lp, old, adv = lp.double(), old.double(), adv.double()
    if "adv_coeff" in kw:
        per = (lp - old - kw["adv_coeff"] * adv) ** 2
    else:
        rho = torch.exp(lp - old)
        per = torch.maximum(-adv * rho, -adv * rho.clamp(1 - kw["clip_low"], 1 + kw["clip_high"]))
        per = torch.where(adv < 0, torch.minimum(per, -kw["dual_clip"] * adv), per)
    return (torch.where(m > 0, per, 0.0)).sum() / m.sum()


@pytest.mark.parametrize("op,kw", [(F.ppo_policy_loss, dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0)),
                                   (F.apa_policy_loss, dict(adv_coeff=2.0))], ids=["ppo", "apa"])
def test_token_losses_select_masked_garbage_out_of_value_stats_and_gradient(op, kw):
    x, mask = _x_mask()
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 9, generator=g) * 3
    old = lp + 0.4 * torch.randn(4, 9, generator=g)
    adv = torch.randn(4, 9, generator=g)
    want = _token_f64(lp, old, adv, mask, kw)
    clean_lp = lp.clone().requires_grad_()
    clean, clean_stats = op(clean_lp, old, adv, mask, **kw)
    clean.backward()
    dirty_lp = with_garbage(lp, mask).requires_grad_()
    dirty, dirty_stats = op(dirty_lp, _old_garbage(old, mask), with_garbage(adv, mask, seed=1), mask, **kw)
    dirty.backward()
    assert abs(dirty.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert torch.equal(dirty, clean) and torch.equal(dirty_lp.grad, clean_lp.grad)
    assert (dirty_lp.grad[mask == 0] == 0).all()
    for key, value in dirty_stats.items():
        assert torch.equal(value, clean_stats[key]), key


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_loss_from_logits_selects_masked_garbage_out(backend):
    """NaN logits in a masked row, NaN/inf advantages, old log-probs of −100/−inf/NaN and NaN reference
    log-probs at masked positions: the clean loss (float64 oracle), the clean stats, and a logits gradient
    of exactly 0 on the masked rows."""
    x, labels, mask, adv, old, ref_lp = _inputs(3, 5, 23, torch.float32)
    kw = dict(dual_clip=3.0, entropy_coef=0.05, kl_coef=0.1, batch_entropy_coef=0.1)
    want = _loss_f64(x, labels, mask, adv, old, ref_lp, kw)[0]
    x_bad = x.clone()
    x_bad[mask == 0] = float("nan")
    bad = (_old_garbage(old, mask), with_garbage(adv, mask), with_garbage(ref_lp, mask, seed=2))
    results = []
    for xx, (o, a, r) in ((x, (old, adv, ref_lp)), (x_bad, bad)):
        xx = xx.clone().requires_grad_()
        with F.use_backend(backend):
            loss, out = F.policy_loss_from_logits(xx, labels, mask, a, o, r, **kw)
        (loss * 1.5).backward()
        results.append((loss, out, xx.grad))
    (loss_c, out_c, grad_c), (loss_d, out_d, grad_d) = results
    assert abs(loss_d.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    torch.testing.assert_close(loss_d, loss_c, rtol=1e-6, atol=1e-7)
    assert (grad_d[mask == 0] == 0).all() and torch.isfinite(grad_d).all()
    torch.testing.assert_close(grad_d, grad_c, rtol=1e-5, atol=1e-7)
    for key in ("clip_frac", "approx_kl", "entropy_mean", "kl_mean", "num_tokens", "nonfinite_tokens",
                "batch_entropy"):
        torch.testing.assert_close(out_d[key], out_c[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_policy_loss_selects_masked_garbage_out(backend):
    (h, w, b), labels, mask, adv, old, rf = make_inputs(torch.float32, b=2, t=5, h=8, v=19)
    mask[0, 0] = 1
    mask[1, 1] = 0
    kw = dict(dual_clip=3.0, entropy_coef=0.05, kl_coef=0.1, batch_entropy_coef=0.1)
    want = fused_loss64((h.double() @ w.double().T + b.double()), labels, mask, adv, old, rf, **kw)[0]
    h_bad = h.clone()
    h_bad[mask == 0] = float("nan")                                   # NaN hidden -> NaN logits rows
    results = []
    for hh, (o, a, r) in ((h, (old, adv, rf)), (h_bad, (_old_garbage(old, mask), with_garbage(adv, mask),
                                                          with_garbage(rf, mask, seed=2)))):
        hh, ww = hh.clone().requires_grad_(), w.clone().requires_grad_()
        with F.use_backend(backend):
            loss, out = F.fused_linear_policy_loss(hh, ww, labels, mask, a, o, r, bias=b, chunk_size=3, **kw)
        loss.backward()
        results.append((loss, out, hh.grad, ww.grad))
    (loss_c, out_c, gh_c, gw_c), (loss_d, out_d, gh_d, gw_d) = results
    assert abs(loss_d.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    torch.testing.assert_close(loss_d, loss_c, rtol=1e-6, atol=1e-7)
    assert (gh_d[mask == 0] == 0).all()
    torch.testing.assert_close(gh_d, gh_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw_d, gw_c, rtol=1e-5, atol=1e-7)
    for key in ("clip_frac", "approx_kl", "entropy_mean", "kl_mean", "nonfinite_tokens", "batch_entropy"):
        torch.testing.assert_close(out_d[key], out_c[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_entropy_ignores_nan_logits_in_masked_rows(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 11, generator=g) * 2
    mask = torch.tensor([[1.0, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1]])
    m = mask.double()
    p = torch.softmax(x.double(), -1)
    pbar = (torch.where(m[..., None] > 0, p, 0.0)).sum(0) / m.sum(0)[:, None]
    want = -(pbar * pbar.log()).sum() / 4
    x_bad = x.clone()
    x_bad[mask == 0] = float("nan")
    got = []
    for xx in (x, x_bad):
        xx = xx.clone().requires_grad_()
        with F.use_backend(backend):
            h = F.batch_entropy(xx, mask)
        h.backward()
        got.append((h, xx.grad))
    assert abs(got[1][0].item() - want.item()) <= 1e-6
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-6, atol=0)
    assert (got[1][1][mask == 0] == 0).all()
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-6, atol=1e-8)


def _loss_calls(mask=None, **kw):
    """Each public loss op on small valid inputs, with `mask` (default: a valid one) and extra keywords."""
    x, labels, m, adv, old, ref_lp = _inputs(2, 3, 7, torch.float32)
    mask = m if mask is None else mask
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    return {
        "ppo_policy_loss": lambda: F.ppo_policy_loss(old, old, adv, mask, **kw),
        "apa_policy_loss": lambda: F.apa_policy_loss(old, ref_lp, adv, mask, **kw),
        "policy_loss_from_logits": lambda: F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, **kw),
        "fused_linear_policy_loss": lambda: F.fused_linear_policy_loss(h, w, labels, mask, adv, old, ref_lp, **kw),
        "batch_entropy": lambda: F.batch_entropy(x, mask, **kw),
    }


@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, float("nan")])
@pytest.mark.parametrize("op", list(_loss_calls()))
def test_loss_ops_refuse_masks_other_than_0_and_1(op, bad):
    mask = torch.ones(2, 3)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=r"mask: expected only 0s and 1s"):
        _loss_calls(mask)[op]()
    _loss_calls(mask.clamp(0, 1).nan_to_num(1.0).round().long())[op]()       # an integer 0/1 mask is fine


@pytest.mark.parametrize("op,kw,match", [
    ("ppo_policy_loss", dict(clip_low=-0.5), r"clip_low: expected a number in \[0, 1\), got -0.5"),
    ("ppo_policy_loss", dict(clip_high=float("nan")), "clip_high: expected a finite number, got nan"),
    ("ppo_policy_loss", dict(dual_clip=0.5), "dual_clip: expected None or a number > 1, got 0.5"),
    ("ppo_policy_loss", dict(clip_low="0.2"), "clip_low: expected a finite number, got '0.2'"),
    ("apa_policy_loss", dict(adv_coeff=float("nan")), "adv_coeff: expected a finite number, got nan"),
    ("apa_policy_loss", dict(adv_coeff="10"), "adv_coeff: expected a finite number, got '10'"),
    ("batch_entropy", dict(temperature=0.0), "temperature: expected a finite number > 0, got 0.0"),
])
def test_standalone_loss_knobs_are_checked_by_name(op, kw, match):
    with pytest.raises(ValueError, match=match):
        _loss_calls(**kw)[op]()


def test_logits_shape_and_device_errors_come_before_any_value_is_read():
    x, labels, mask, adv, old, ref_lp = _inputs(2, 3, 7, torch.float32)
    with pytest.raises(ValueError, match="logits: expected shape \\[..., V\\], got a 0-dim tensor"):
        F.policy_loss_from_logits(torch.tensor(1.0), labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match=r"logits: expected a vocabulary of V >= 1 tokens .*got shape \(2, 3, 0\)"):
        F.policy_loss_from_logits(x[..., :0], labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match=r"logits: expected a vocabulary of V >= 1 tokens \[B, T, V\]"):
        F.batch_entropy(x[..., :0], mask)
    with pytest.raises(ValueError, match="logits: expected a vocabulary of V >= 1"):
        F.logprobs_and_entropy(x[..., :0], labels)
    with pytest.raises(ValueError, match="logits: expected a tensor with data, got a meta tensor"):
        F.policy_loss_from_logits(x.to("meta"), labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match="logits: expected a tensor with data, got a meta tensor"):
        F.batch_entropy(x.to("meta"), mask)
    for name, args in (("labels", (x, labels.to("meta"), mask, adv, old, ref_lp)),
                       ("mask", (x, labels, mask.to("meta"), adv, old, ref_lp)),
                       ("advantages", (x, labels, mask, adv.to("meta"), old, ref_lp))):
        with pytest.raises(ValueError, match=f"{name}: expected a tensor on cpu .*got meta"):
            F.policy_loss_from_logits(*args)
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .*got meta"):
        F.batch_entropy(x, mask.to("meta"))
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .*got meta"):
        F.ppo_policy_loss(old, old, adv, mask.to("meta"))
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="hidden: expected a tensor with data, got a meta tensor"):
        F.fused_linear_policy_loss(h.to("meta"), w.to("meta"), labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, 4\] .*V >= 1 tokens, got \(0, 4\)"):
        F.fused_linear_policy_loss(h, w[:0], labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        F.fused_linear_policy_loss(h, w.to("meta"), labels, mask, adv, old, ref_lp)
    with pytest.raises(ValueError, match="old_logprobs: expected a tensor on cpu .*got meta"):
        F.fused_linear_policy_loss(h, w, labels, mask, adv, old.to("meta"), ref_lp)


def test_reference_gives_the_gradient_of_the_rollout_tensors():
    """Only old_logprobs (or advantages, ref_logprobs) requiring grad used to crash in backward; the
    reference now gives their autograd gradients (float64 oracle), and the same logits gradient."""
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 9, torch.float32)
    kw = dict(kl_coef=0.1, entropy_coef=0.05, dual_clip=2.0)
    leaves64 = [t.double().requires_grad_() for t in (x, adv, old, ref_lp)]
    loss64 = _loss_f64(leaves64[0], labels, mask, *leaves64[1:], kw)[0]
    g64 = torch.autograd.grad(loss64 * 0.7, leaves64)
    o = old.clone().requires_grad_()
    with F.use_backend("torch"):
        loss, _ = F.policy_loss_from_logits(x, labels, mask, adv, o, ref_lp, **kw)
        (loss * 0.7).backward()
        torch.testing.assert_close(o.grad.double(), g64[2], rtol=1e-5, atol=1e-7)
        leaves = [t.clone().requires_grad_() for t in (x, adv, old, ref_lp)]
        loss, _ = F.policy_loss_from_logits(leaves[0], labels, mask, *leaves[1:], **kw)
        (loss * 0.7).backward()
    for a, e in zip(leaves, g64):
        torch.testing.assert_close(a.grad.double(), e, rtol=1e-5, atol=1e-7)
        assert (a.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("path", ["triton", "fused"])
def test_fast_paths_treat_rollout_tensors_as_constants(path):
    x, labels, mask, adv, old, ref_lp = _inputs(2, 4, 9, torch.float32)
    o = old.clone().requires_grad_()
    h, w = torch.randn(2, 4, 5), torch.randn(9, 5)
    with F.use_backend("triton" if path == "triton" else "torch"):
        if path == "triton":
            loss, _ = F.policy_loss_from_logits(x, labels, mask, adv, o, ref_lp)
        else:
            loss, _ = F.fused_linear_policy_loss(h, w, labels, mask, adv, o, ref_lp)
    assert not loss.requires_grad                                     # constants: no graph to them
    xx = (x if path == "triton" else h).clone().requires_grad_()
    with F.use_backend("triton" if path == "triton" else "torch"):
        if path == "triton":
            loss, _ = F.policy_loss_from_logits(xx, labels, mask, adv, o, ref_lp)
        else:
            loss, _ = F.fused_linear_policy_loss(xx, w, labels, mask, adv, o, ref_lp)
    loss.backward()
    assert xx.grad is not None and o.grad is None
