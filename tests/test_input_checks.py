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
