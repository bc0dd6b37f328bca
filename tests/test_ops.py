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
    with pytest.raises(ValueError, match=r"advantages: expected shape \(2, 3\) or \(2,\), got \(3, 2\)"):
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


# ----------------------------------------------------------------------------
# LossConfig: the one checked carrier of the policy-loss knobs
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("algo", "ppo-max", r"algo: expected one of \('ppo', 'apa'\), got 'ppo-max'"),
    ("kl_estimator", "k4", r"kl_estimator: expected one of \('k1', 'k2', 'k3'\), got 'k4'"),
    ("temperature", 0.0, "temperature: expected a finite number > 0, got 0.0"),
    ("temperature", 1e-40, r"temperature: expected a number >= 1.17549\d*e-38"),
    ("clip_low", 1.0, r"clip_low: expected a number in \[0, 1\), got 1.0"),
    ("clip_low", -0.5, r"clip_low: expected a number in \[0, 1\), got -0.5"),
    ("clip_high", -0.1, "clip_high: expected a number >= 0, got -0.1"),
    ("dual_clip", 1.0, "dual_clip: expected None or a number > 1, got 1.0"),
    ("dual_clip", float("nan"), "dual_clip: expected None or a finite number, got nan"),
    ("adv_coeff", "10", "adv_coeff: expected a finite number, got '10'"),
    ("adv_coeff", float("nan"), "adv_coeff: expected a finite number, got nan"),
    ("entropy_coef", True, "entropy_coef: expected a finite number, got True"),
    ("kl_coef", float("inf"), "kl_coef: expected a finite number, got inf"),
    ("batch_entropy_coef", None, "batch_entropy_coef: expected a finite number, got None"),
])
def test_loss_config_checks_each_field_once(field, value, match):
    """The same message from LossConfig and from every entry point that builds one from keywords."""
    logits, labels, mask, z = _batch()
    with pytest.raises(ValueError, match=match):
        F.LossConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        F.policy_loss_from_logits(logits, labels, mask, z, z, z, **{field: value})
    with pytest.raises(ValueError, match=match):
        F.fused_linear_policy_loss(torch.randn(2, 3, 4), torch.randn(5, 4), labels, mask, z, z, z,
                                   **{field: value})


def test_loss_config_stores_floats_and_is_frozen():
    cfg = F.LossConfig(dual_clip=3, adv_coeff=2, clip_high=0)
    assert (cfg.dual_clip, cfg.adv_coeff, cfg.clip_high) == (3.0, 2.0, 0.0)
    assert all(type(v) is float for v in (cfg.dual_clip, cfg.adv_coeff, cfg.clip_high, cfg.temperature))
    with pytest.raises(Exception, match="cannot assign"):
        cfg.kl_coef = 1.0


def test_config_argument_equals_the_keywords_and_refuses_a_second_knob():
    logits, labels, mask, _ = _batch()
    g = torch.Generator().manual_seed(1)
    adv, old, rf = (torch.randn(2, 3, generator=g) for _ in range(3))
    kw = dict(dual_clip=2.0, kl_coef=0.1, entropy_coef=0.05, temperature=0.8, batch_entropy_coef=0.1)
    cfg = F.LossConfig(**kw)
    want, _ = F.policy_loss_from_logits(logits, labels, mask, adv, old, rf, **kw)
    got, _ = F.policy_loss_from_logits(logits, labels, mask, adv, old, rf, config=cfg)
    assert torch.equal(got, want)
    h, w = torch.randn(2, 3, 4, generator=g), torch.randn(logits.shape[-1], 4, generator=g)
    want, _ = F.fused_linear_policy_loss(h, w, labels, mask, adv, old, rf, **kw)
    got, _ = F.fused_linear_policy_loss(h, w, labels, mask, adv, old, rf, config=cfg)
    assert torch.equal(got, want)
    for fn, args in ((F.policy_loss_from_logits, (logits,)), (F.fused_linear_policy_loss, (h, w))):
        with pytest.raises(ValueError, match=r"kl_coef: expected the default 0.0 when config= is given.*got 0.3"):
            fn(*args, labels, mask, adv, old, rf, config=cfg, kl_coef=0.3)
        with pytest.raises(ValueError, match="dual_clip: expected the default None when config= is given"):
            fn(*args, labels, mask, adv, old, rf, config=cfg, dual_clip=2.0)
        with pytest.raises(TypeError, match="config: expected None or a fastrlhf.LossConfig, got dict"):
            fn(*args, labels, mask, adv, old, rf, config=kw)


def test_reference_defaults_are_the_public_ops_defaults():
    """fastrlhf.ref is the documented spec: each of its public functions that fastrlhf.ops wraps under the
    same name takes the same keyword defaults (a reference default drifting from the op's would give a
    direct caller of the reference another loss), and LossConfig's defaults are the loss keywords'."""
    import inspect
    shared = [n for n in dir(ref) if not n.startswith("_") and callable(getattr(ref, n)) and hasattr(ops, n)
              and inspect.isfunction(getattr(ref, n)) and inspect.isfunction(getattr(ops, n))]
    assert {"logprobs_and_entropy", "ppo_policy_loss", "apa_policy_loss", "value_loss", "batch_probs", "gae",
            "whiten", "sample_tokens", "kl_penalty", "batch_entropy"} <= set(shared)
    checked = 0
    for name in shared:
        ref_kw = {k: p.default for k, p in inspect.signature(getattr(ref, name)).parameters.items()
                  if p.default is not inspect.Parameter.empty}
        ops_kw = {k: p.default for k, p in inspect.signature(getattr(ops, name)).parameters.items()
                  if p.default is not inspect.Parameter.empty}
        for k in ref_kw.keys() & ops_kw.keys():
            assert ref_kw[k] == ops_kw[k], (name, k, ref_kw[k], ops_kw[k])
            checked += 1
    assert checked >= 20
    loss_kw = inspect.signature(ops.policy_loss_from_logits).parameters
    for f in __import__("dataclasses").fields(ref.LossConfig):
        assert loss_kw[f.name].default == f.default, f.name


def test_reference_chunking_leaves_values_and_gradients_unchanged(monkeypatch):
    """The reference works in chunks of rows / positions (ref.CHUNK_BYTES): with chunks of one or two rows
    or positions, every value and logits gradient equals the one-chunk result (a chunk's result written
    over, not added to, the total, or chunks over the wrong axis, would change it)."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 7, 5        # fewer tokens than positions: chunks over the wrong axis miss some
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    adv, old, rl = (torch.randn(B, T, generator=g) * 0.5 for _ in range(3))

    def everything():
        x = logits.clone().requires_grad_()
        lp, ent = ref.logprobs_and_entropy(x, labels, temperature=0.8)
        h = ref.batch_entropy(x, mask, temperature=0.8)
        stats = ref.batch_probs(x.detach(), mask, temperature=0.8)
        cfg = ref.LossConfig(temperature=0.8, entropy_coef=0.1, kl_coef=0.2, batch_entropy_coef=0.3)
        loss, _ = ref.policy_loss_from_logits(x, labels, mask, adv, old, rl, cfg)
        (lp.sum() + 0.5 * ent.sum() + 1.3 * h + 0.7 * loss).backward()
        return [lp, ent, h, stats.probs, stats.count, loss, x.grad]

    one = everything()
    p64 = torch.softmax(logits.double() / 0.8, -1)                  # the one-chunk result against formulas
    torch.testing.assert_close(one[0].double(), p64.log().gather(-1, labels[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[3].double(), (mask.double()[..., None] * p64).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one[4].double(), mask.double().sum(0))
    for chunk_bytes in (4 * V, 4 * 2 * B * V):     # one row / one position per chunk, then two positions
        monkeypatch.setattr(ref, "CHUNK_BYTES", chunk_bytes)
        for a, b in zip(everything(), one):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_loss_per_token_outputs_are_detached(backend):
    """out["logprobs"], out["entropy"], out["kl"] are documented as detached: a trainer that sums them into
    its loss must not get a second, silent gradient path into the logits."""
    logits, labels, mask, z = _batch()
    x = logits.clone().requires_grad_()
    with ops.use_backend(backend):
        loss, out = F.policy_loss_from_logits(x, labels, mask, z, z, z, kl_coef=0.1, entropy_coef=0.1)
    assert loss.requires_grad
    for k in ("logprobs", "entropy", "kl"):
        assert not out[k].requires_grad, k
