"""The dispatch point (fastrlhf.ops): backend choice, fallback warnings and input checks."""
import warnings

import pytest
import torch

import fastrlhf as F
from fastrlhf import ops, ref


def _batch(B=2, T=3, V=11):
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    z = torch.zeros(B, T)
    return logits, labels, mask, z


def test_use_backend_forces_reference(monkeypatch):
    with ops.use_backend("torch"):
        assert ops.impl("logprobs_and_entropy", torch.device("cpu")) is ref.logprobs_and_entropy
        assert ops.impl("gae", torch.device("cpu")) is ref.gae
    with pytest.raises(ValueError, match="use_backend"):
        with ops.use_backend("cuda"):
            pass


def test_env_variable_is_checked(monkeypatch):
    monkeypatch.setenv("FASTRLHF_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND.*'fast'"):
        ops.requested_backend()
    monkeypatch.setenv("FASTRLHF_BACKEND", "torch")
    assert ops.impl("policy_loss_from_logits", torch.device("cpu")) is ref.policy_loss_from_logits


def test_auto_sends_cpu_tensors_to_reference(monkeypatch):
    monkeypatch.delenv("FASTRLHF_BACKEND", raising=False)
    assert ops.impl("batch_entropy", torch.device("cpu")) is ref.batch_entropy


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.impl("logprobs_and_entropy", torch.device("cpu"))


def test_missing_fast_path_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(ops._IMPLS, "gae", {"torch": "fastrlhf.ref:gae", "ext": "fastrlhf._no_such_module:gae"})
    monkeypatch.setattr(ops, "_warned", set())
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    with pytest.warns(RuntimeWarning, match="gae: ext backend unavailable"):
        a1, _ = F.gae(r, v, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a2, _ = F.gae(r, v, m)
    torch.testing.assert_close(a1, ref.gae(r, v, m)[0])
    torch.testing.assert_close(a1, a2)


def test_forced_backend_does_not_hide_import_errors(monkeypatch):
    monkeypatch.setitem(ops._IMPLS, "batch_entropy",
                        {"torch": "fastrlhf.ref:batch_entropy", "triton": "fastrlhf._no_such_module:f"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"), pytest.raises(ImportError):
        F.batch_entropy(torch.randn(2, 3, 5), torch.ones(2, 3))


def test_label_errors_name_argument_expected_and_actual():
    logits, labels, mask, z = _batch()
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 3\).*got \(2, 4\)"):
        F.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels: expected an integer dtype, got torch.float32"):
        F.token_logprobs(logits, labels.float())
    bad = labels.clone()
    bad[1, 2] = 11
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 11\) or -100, got 11"):
        F.token_logprobs(logits, bad)
    bad[1, 2] = -100  # ignore_index is allowed
    F.token_logprobs(logits, bad)
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        F.token_logprobs(logits.long(), labels)
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0, got 0"):
        F.token_logprobs(logits, labels, temperature=0)


def test_policy_loss_argument_errors():
    logits, labels, mask, z = _batch()
    with pytest.raises(ValueError, match="algo: expected one of .*'grpo'"):
        F.policy_loss_from_logits(logits, labels, mask, z, z, z, algo="grpo")
    with pytest.raises(ValueError, match="kl_estimator: expected one of .*'k4'"):
        F.policy_loss_from_logits(logits, labels, mask, z, z, z, kl_estimator="k4")
    with pytest.raises(ValueError, match="estimator: expected one of"):
        F.kl_penalty(z, z, "kl")
    with pytest.raises(ValueError, match=r"advantages: expected shape \(2, 3\), got \(3, 2\)"):
        F.policy_loss_from_logits(logits, labels, mask, z.T, z, z)
    with pytest.raises(ValueError, match="dual_clip: expected None or a number > 1, got 0.5"):
        F.policy_loss_from_logits(logits, labels, mask, z, z, z, dual_clip=0.5)
    with pytest.raises(ValueError, match="batch_entropy_coef needs 3 dims"):
        F.policy_loss_from_logits(logits[0], labels[0], mask[0], z[0], z[0], z[0], batch_entropy_coef=0.1)
    # labels outside the vocabulary are fine where the mask is 0, an error where it is 1
    lab = labels.clone()
    lab[0, 0] = -1
    m = mask.clone()
    m[0, 0] = 0
    F.policy_loss_from_logits(logits, lab, m, z, z, z)
    with pytest.raises(ValueError, match="labels: expected values in"):
        F.policy_loss_from_logits(logits, lab, mask, z, z, z)


def test_tensors_on_different_devices_are_refused():
    logits, labels, mask, z = _batch()
    with pytest.raises(ValueError, match="old_logprobs: expected a tensor on cpu.*got meta"):
        F.policy_loss_from_logits(logits, labels, mask, z, z.to("meta"), z)
    with pytest.raises(ValueError, match="ref_logprobs: expected a tensor on cpu.*got meta"):
        F.kl_penalty(z, z.to("meta"))


def test_gae_rejects_non_prefix_masks():
    r = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="mask: expected a prefix of ones"):
        F.gae(r, r, mask)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p: expected a number in \(0, 1\], got 1.5"),
    ({"temperature": -1.0}, "temperature: expected a number >= 0, got -1.0"),
    ({"top_k": -2}, "top_k: expected an int >= 0, got -2"),
])
def test_sample_tokens_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.sample_tokens(torch.randn(2, 7), **kwargs)
