"""The loss options other trainers need (README, "Loss aggregation"): loss_agg_mode and its normalizer,
on-policy (old_logprobs=None), no reference (ref_logprobs=None), per-sequence advantages [B], the
importance-weighted KL, masked entropy, mixed dtypes on the fused linear path and wrapped models in
fastrlhf.hf. Every path (torch reference, Triton kernel under the interpreter, fused linear with either
row core) against float64 formulas written here."""
import pytest
import torch

import fastrlhf as F
from fastrlhf import ops, ref
from fastrlhf.fused_linear import fused_linear_logprobs, fused_linear_policy_loss

B, T, V, H = 3, 5, 13, 6
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
PATHS = ("torch", "triton", "fused-torch", "fused-triton")


def _agg64(per_tok, m, mode, normalizer=None):
    """verl's agg_loss (verl/trainer/ppo/core_algos.py) in float64, with the normalizer replacing its count."""
    if mode == "token-mean":
        return (per_tok * m).sum() / (m.sum().clamp_min(1.0) if normalizer is None else normalizer)
    seq_sum = (per_tok * m).sum(-1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / m.sum(-1).clamp_min(1.0)).sum() / (m.shape[0] if normalizer is None else normalizer)
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / (m.shape[0] if normalizer is None else normalizer)
    return seq_sum.sum() / (m.shape[-1] if normalizer is None else normalizer)


def _loss64(x, labels, mask, adv, old, ref_lp, kw, normalizer=None):
    """The loss in float64 from the formulas: ρ = e^{ℓ − ℓ_old} (ℓ_old = sg(ℓ) on-policy), PPO clip with
    dual clip, k3 KL to ℓ_ref (times ρ, not detached, when importance-weighted), entropy bonus."""
    z = x.double() / kw.get("temperature", 1.0)
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    ent = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1)
    m = mask.double()
    adv = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(B, T)
    old = lp.detach() if old is None else old.double()
    rho = torch.exp(lp - old)
    L = torch.maximum(-adv * rho, -adv * rho.clamp(1 - kw.get("clip_low", 0.2), 1 + kw.get("clip_high", 0.2)))
    if kw.get("dual_clip") is not None:
        L = torch.where(adv < 0, torch.minimum(L, -kw["dual_clip"] * adv), L)
    per_tok = L - kw.get("entropy_coef", 0.0) * ent
    if ref_lp is not None:
        d = ref_lp.double() - lp
        kl = torch.exp(d) - 1 - d
        if kw.get("kl_importance_weighted"):
            kl = kl * rho
        per_tok = per_tok + kw.get("kl_coef", 0.0) * kl
    return _agg64(per_tok, m, kw.get("loss_agg_mode", "token-mean"), normalizer)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, :] = 1
    mask[2, 3:] = 0
    with torch.no_grad():
        lp = torch.log_softmax(h @ w.t(), -1).gather(-1, labels[..., None]).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref_lp = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)
    return h, w, labels, mask, adv, old, ref_lp


def _run(path, h, w, labels, mask, adv, old, ref_lp, kw, normalizer=None):
    """(loss, out, dlogits or (dh, dw)) of one path, float32."""
    backend = "triton" if path.endswith("triton") else "torch"
    with ops.use_backend(backend):
        if path.startswith("fused"):
            hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
            loss, out = fused_linear_policy_loss(hh, ww, labels, mask, adv, old, ref_lp, chunk_size=4,
                                                 normalizer=normalizer, **kw)
            loss.backward()
            return loss, out, (hh.grad, ww.grad)
        x = (h @ w.t()).float().requires_grad_()
        loss, out = F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, normalizer=normalizer, **kw)
        loss.backward()
        return loss, out, x.grad


def _check(path, kw, old=True, ref_given=True, per_seq=True, normalizer=None, seed=0):
    h, w, labels, mask, adv, old_lp, ref_lp = _inputs(seed)
    adv = adv if per_seq else adv[:, None].expand(B, T).contiguous()
    old_lp = old_lp if old else None
    ref_lp = ref_lp if ref_given else None
    loss, out, grads = _run(path, h, w, labels, mask, adv, old_lp, ref_lp, kw, normalizer)
    if path.startswith("fused"):
        h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
        l64 = _loss64(h64 @ w64.t(), labels, mask, adv, old_lp, ref_lp, kw, normalizer)
        l64.backward()
        expect = (h64.grad, w64.grad)
    else:
        x64 = (h @ w.t()).float().double().requires_grad_()
        l64 = _loss64(x64, labels, mask, adv, old_lp, ref_lp, kw, normalizer)
        l64.backward()
        expect, grads = (x64.grad,), (grads,)
    assert abs(loss.item() - l64.item()) <= 1e-5 * max(1.0, abs(l64.item())), (loss.item(), l64.item())
    for g, e in zip(grads, expect):
        assert torch.allclose(g.double(), e, atol=1e-5, rtol=1e-4), (g - e).abs().max()
    return loss, out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_loss_agg_modes_match_float64(path, mode):
    kw = dict(loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.05, dual_clip=3.0)
    _check(path, kw)


@pytest.mark.parametrize("path", PATHS)
def test_normalizer_replaces_the_count(path):
    """A global count (gradient accumulation) or Dr. GRPO's constant: the loss scales by count/normalizer."""
    for mode, normalizer in (("token-mean", 37.0), ("seq-mean-token-mean", torch.tensor(7.0)),
                             ("seq-mean-token-sum-norm", 11.0)):
        _check(path, dict(loss_agg_mode=mode, kl_coef=0.1), normalizer=normalizer)


def test_agg_modes_and_normalizer_change_the_loss():
    h, w, labels, mask, adv, old, ref_lp = _inputs()
    x = h.float() @ w.float().t()
    losses = {m: F.policy_loss_from_logits(x, labels, mask, adv, old, loss_agg_mode=m)[0].item() for m in MODES}
    assert len(set(losses.values())) == len(MODES)
    default = F.policy_loss_from_logits(x, labels, mask, adv, old)[0]
    assert default.item() == losses["token-mean"]
    n = mask.sum()
    halved = F.policy_loss_from_logits(x, labels, mask, adv, old, normalizer=2 * n)[0]
    assert torch.allclose(halved, default / 2)


@pytest.mark.parametrize("path", PATHS)
def test_on_policy_without_reference(path):
    """old_logprobs=None: ρ = e^{ℓ − sg(ℓ)}; the gradient is −A∇ℓ (no clipping at ρ = 1); equal to passing
    old = ℓ computed in a no-grad pass."""
    loss, out = _check(path, dict(loss_agg_mode="seq-mean-token-mean"), old=False, ref_given=False)
    assert out["clip_frac"].item() == 0.0 and abs(out["ratio_mean"].item() - 1.0) < 1e-6
    assert out["kl_mean"].item() == 0.0


@pytest.mark.parametrize("path", PATHS)
def test_kl_importance_weighted(path):
    kw = dict(kl_coef=0.5, kl_importance_weighted=True)
    _check(path, kw)
    _check(path, kw, old=False)                    # on-policy: ρ = 1 in value, its gradient still counts


def test_kl_importance_weighting_changes_the_loss_and_the_kl_output():
    h, w, labels, mask, adv, old, ref_lp = _inputs()
    x = h.float() @ w.float().t()
    plain = F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, kl_coef=0.5)
    iw = F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, kl_coef=0.5, kl_importance_weighted=True)
    assert plain[0].item() != iw[0].item()
    rho = torch.exp(plain[1]["logprobs"] - old)
    keep = mask.bool()
    assert torch.allclose(iw[1]["kl"][keep], (plain[1]["kl"] * rho)[keep], rtol=1e-6)


@pytest.mark.parametrize("path", ("torch", "triton"))
def test_per_sequence_advantages_equal_broadcast(path):
    _check(path, dict(kl_coef=0.1), per_seq=False)
    _check(path, dict(kl_coef=0.1), per_seq=True)


def test_reference_required_with_kl_or_apa():
    h, w, labels, mask, adv, old, _ = _inputs()
    x = h.float() @ w.float().t()
    with pytest.raises(ValueError, match="ref_logprobs: expected a tensor of shape \\(3, 5\\) with kl_coef=0.1"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs: .* with algo='apa'"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, algo="apa")
    with pytest.raises(ValueError, match=r"advantages: expected shape \(3, 5\) or \(3,\), got \(5,\)"):
        F.policy_loss_from_logits(x, labels, mask, adv.new_zeros(5), old)
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, loss_agg_mode="sum")
    with pytest.raises(TypeError, match="kl_importance_weighted: expected a bool, got 1"):
        F.LossConfig(kl_importance_weighted=1)
    with pytest.raises(ValueError, match="normalizer: expected None or a number > 0, got 0"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, normalizer=0)
    with pytest.raises(ValueError, match="needs 3 dims"):
        F.policy_loss_from_logits(x.reshape(-1, V), labels.reshape(-1), mask.reshape(-1), adv.repeat(T), None,
                                  loss_agg_mode="seq-mean-token-sum")


@pytest.mark.parametrize("path", PATHS)
def test_entropy_is_zero_where_masked(path):
    h, w, labels, mask, adv, old, ref_lp = _inputs()
    _, out, _ = _run(path, h, w, labels, mask, adv, old, ref_lp, {})
    assert (out["entropy"][mask == 0] == 0).all() and (out["entropy"][mask == 1] > 0).all()


def test_token_entropy_mask():
    h, w, labels, mask, *_ = _inputs()
    x = (h @ w.t()).float()
    x[mask == 0] = float("nan")
    x.requires_grad_()
    ent = F.token_entropy(x, mask=mask)
    z = x.detach().double()[mask == 1]
    p = torch.softmax(z, -1)
    assert torch.allclose(ent[mask == 1].double(), -(p * p.log()).sum(-1), atol=1e-6)
    assert (ent[mask == 0] == 0).all()
    ent.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="mask: expected shape"):
        F.token_entropy(x, mask=mask[:, :2])


@pytest.mark.parametrize("row_core", ("torch", "triton"))
def test_fused_linear_mixed_dtypes(row_core):
    """bf16 hidden states with an fp32 output layer: the default GEMM is fp32 (= the fp32 computation on the
    bf16-rounded hidden states); matmul_dtype=bfloat16 or "autocast" under bf16 autocast runs it in bf16
    (equal to the all-bf16 call), which changes the result. Gradients come back in each input's dtype."""
    h, w, labels, mask, adv, old, ref_lp = _inputs()
    hb = h.to(torch.bfloat16)
    with ops.use_backend(row_core):
        def run(hh, ww, **kw):
            hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
            loss, _ = fused_linear_policy_loss(hh, ww, labels, mask, adv, old, ref_lp, kl_coef=0.1, chunk_size=4, **kw)
            loss.backward()
            return loss, hh.grad, ww.grad
        mixed = run(hb, w.float())
        fp32 = run(hb.float(), w.float())
        assert mixed[1].dtype == torch.bfloat16 and mixed[2].dtype == torch.float32
        assert torch.equal(mixed[0], fp32[0]) and torch.equal(mixed[2], fp32[2])
        assert torch.equal(mixed[1], fp32[1].to(torch.bfloat16))
        in_bf16 = run(hb, w.float(), matmul_dtype=torch.bfloat16)
        all_bf16 = run(hb, w.to(torch.bfloat16))
        assert torch.equal(in_bf16[0], all_bf16[0]) and in_bf16[0].item() != mixed[0].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = run(hb, w.float(), matmul_dtype="autocast")
            default_under_autocast = run(hb, w.float())
        assert torch.equal(auto[0], in_bf16[0])
        assert torch.equal(default_under_autocast[0], mixed[0])         # autocast is off inside by default
        lp = fused_linear_logprobs(hb, w.float(), labels)
        assert torch.equal(lp, fused_linear_logprobs(hb.float(), w.float(), labels))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=V, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def test_hidden_states_through_ddp(tmp_path):
    """A DDP-wrapped model: its forward runs (DDP's hooks see the backward) and the hidden states equal the
    unwrapped model's; the fused loss reaches the same gradients."""
    import torch.distributed as dist

    from fastrlhf import hf
    model = _tiny_llama()
    ids = torch.randint(0, V, (2, 7))
    plain = hf.hidden_states(model, ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        ddp.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
        wrapped = hf.hidden_states(ddp, ids)
        weight, bias = hf.output_layer(ddp)
        assert calls and weight is model.lm_head.weight and bias is None
        assert torch.allclose(wrapped, plain, atol=1e-6)
        mask = torch.ones(2, 6)
        loss, _ = fused_linear_policy_loss(wrapped[:, :-1], weight, ids[:, 1:], mask, torch.randn(2))
        loss.backward()
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_hidden_states_through_fsdp2(tmp_path):
    """An FSDP2 (fully_shard) model on one gloo rank: the wrapper's forward runs (its all-gather hooks), the
    output weight fetched before the forward is a sharded DTensor that output_layer gathers, and the fused
    loss reaches the same gradients as on the unwrapped model."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fastrlhf import hf
    model = _tiny_llama()
    plain = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 7))
    adv = torch.randn(2)

    def step(m):
        weight, bias = hf.output_layer(m)
        loss, _ = fused_linear_policy_loss(hf.hidden_states(m, ids)[:, :-1], weight, ids[:, 1:], torch.ones(2, 6),
                                           adv, bias=bias)
        loss.backward()
        return loss
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert hf._wrapped(model) and hasattr(model.lm_head.weight, "full_tensor")     # sharded before forward
        loss = step(model)
        expect = step(plain)
        assert torch.allclose(loss, expect, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.allclose(p.grad.full_tensor(), q.grad, atol=1e-6), name
    finally:
        dist.destroy_process_group()
