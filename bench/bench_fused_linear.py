"""Fused linear path (README, "Fused linear path"): hidden states -> PPO / GRPO loss or log-probs, forward +
backward w.r.t. hidden and weight (grads returned by torch.autograd.grad, so every impl allocates its own
gradient outputs inside the measurement).

    pytest bench/bench_fused_linear.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_fused_linear.py [--size smoke|cpu|gpu]

Sizes: smoke N=128, H=32, V=512 fp32; cpu N=4096, H=256, V=65536 fp32 (the README's CPU figures); gpu
N=8192, H ∈ {896, 4096}, V ∈ {128256, 151936}, bf16. torch.compile baselines run on CUDA (on the CPU with
--bench-compile; compiling takes minutes there).

Ops:
    policy_loss   PPO (clip 0.2) + 0.01·entropy + 0.05·k3 KL, per-token advantages, masked token mean:
                  fastrlhf (fused_linear_policy_loss), torch (eager on materialized fp32 logits),
                  torch.compile (compiled per-chunk loss under activation checkpointing)
    grpo_loss     GRPO as TRL's GRPOTrainer and Liger compute it (GRPO_KNOBS): clip 0.2 both sides, β·k3 KL
                  to the reference log-probs, no entropy term, one advantage per sequence, loss = Σ mask·loss_t /
                  Σ mask (TRL's and Liger's loss_type="dapo" on one process = a masked token mean):
                  fastrlhf (fused_linear_policy_loss, the sequence advantage broadcast over its tokens),
                  trl (TRL's GRPOTrainer loss on materialized logits: selective_log_softmax's row loop),
                  torch (eager fp32 log_softmax on the whole [N, V]),
                  liger (liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss: Liger's own chunking; its
                  loss math under torch.compile on CUDA, eager on the CPU). See `grpo_impls` for the argument
                  mapping; tests/test_bench.py checks that the four give one loss and one gradient.
    neg_logprob   Σ −log p(label): fastrlhf (fused_linear_logprobs), torch eager,
                  liger (LigerFusedLinearCrossEntropyLoss, reduction="none", CUDA only),
                  cce (cut_cross_entropy.linear_cross_entropy, reduction="none", CUDA, if installed)
    three_gemms   the floor: x = h Wᵀ, dx W, dxᵀ h (6·N·H·V FLOPs), measured in the same session.
Every op records `vs_floor` = its time / the three GEMMs' time at that shape (extra_info, when the
three_gemms case of the shape ran first, as collection orders it) and `tflops` counting 6·N·H·V.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf.fused_linear import choose_chunk_size, fused_linear_logprobs, fused_linear_policy_loss  # noqa: E402

KNOBS = dict(clip_low=0.2, clip_high=0.2, entropy_coef=0.01, kl_coef=0.05, kl_estimator="k3")
GRPO_KNOBS = dict(clip=0.2, beta=0.04)
SHAPES = {
    "smoke": [dict(B=2, T=64, H=32, V=512, dtype="float32")],
    "cpu": [dict(B=4, T=1024, H=256, V=65536, dtype="float32")],
    "gpu": [dict(B=8, T=1024, H=h, V=v, dtype="bfloat16") for h in (896, 4096) for v in (128256, 151936)],
}
_FLOOR_MS: dict = {}


def make_inputs(B, T, H, V, device, dtype):
    """hidden [B, T, H], weight [V, H] (both requiring grad), labels, mask (last T/8 padded), per-token
    advantages, per-sequence advantages, old and reference log-probs near log(1/V)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    mask[:, -T // 8:] = 0                                           # some padding
    adv = torch.randn(B, T, generator=g).to(device)
    adv_seq = torch.randn(B, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 2 - torch.log(torch.tensor(float(V)))).to(device)
    rf = (old.cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device)
    return dict(hidden=hidden, weight=weight, labels=labels, mask=mask, adv=adv, adv_seq=adv_seq, old=old, ref=rf)


def eager_terms(logits, labels, old, rf, adv):
    """Per-token PPO + entropy + k3 KL on [n, V] logits, float32, as a user writes it."""
    logp = torch.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - KNOBS["clip_low"], 1 + KNOBS["clip_high"]))
    d = rf - lp
    return pg + KNOBS["kl_coef"] * (torch.exp(d) - 1 - d) - KNOBS["entropy_coef"] * ent


def policy_loss_impls(x, compile_ok):
    """impl -> fn() returning (grad hidden, grad weight) of the PPO + entropy + KL loss."""
    hidden, weight = x["hidden"], x["weight"]
    B, T, H = hidden.shape
    V = weight.shape[0]
    h2 = hidden.reshape(-1, H)
    l1, m1, a1, o1, r1 = (x[k].reshape(-1) for k in ("labels", "mask", "adv", "old", "ref"))
    params = (hidden, weight)

    def fastrlhf():
        loss, _ = fused_linear_policy_loss(hidden, weight, x["labels"], x["mask"], x["adv"], x["old"], x["ref"],
                                           **KNOBS)
        return torch.autograd.grad(loss, params)

    def eager():
        per = eager_terms(h2 @ weight.T, l1, o1, r1, a1)
        return torch.autograd.grad((per * m1).sum() / m1.sum(), params)

    impls = {"fastrlhf": fastrlhf, "torch": eager}
    if compile_ok:
        rows = choose_chunk_size(B * T, V, hidden.device)
        chunk_fn = torch.compile(lambda h, w, lab, m, o, r, a: (eager_terms(h @ w.T, lab, o, r, a) * m).sum())

        def compiled():
            total = 0
            for s in range(0, B * T, rows):
                sl = slice(s, s + rows)
                total = total + torch.utils.checkpoint.checkpoint(
                    chunk_fn, h2[sl], weight, l1[sl], m1[sl], o1[sl], r1[sl], a1[sl], use_reentrant=False)
            return torch.autograd.grad(total / m1.sum(), params)

        impls["torch.compile"] = compiled
    return impls


def selective_log_softmax(logits, index):
    """log_softmax(logits)[index] the way TRL's trl.trainer.utils.selective_log_softmax computes it: for
    fp32/fp64 logits the gathered logit minus a logsumexp taken one row of the batch at a time, for
    bf16/fp16 a log_softmax per row of the batch (logits [B, T, V], index [B, T])."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index[..., None]).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, -1) for row in logits])
    return torch.stack([torch.log_softmax(row, -1).gather(-1, idx[:, None]).squeeze(-1)
                        for row, idx in zip(logits, index)])


def grpo_token_loss(lp, old, ref_lp, adv_seq, mask, clip, beta):
    """TRL GRPOTrainer's per-token loss and its loss_type="dapo" reduction on one process:
    ρ = e^{ℓ−ℓ_old}, loss_t = −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β·(e^{ℓ_ref−ℓ} − (ℓ_ref−ℓ) − 1),
    loss = Σ mask·loss_t / Σ mask."""
    ratio = torch.exp(lp - old)
    a = adv_seq[:, None]
    per = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if beta:
        d = ref_lp - lp
        per = per + beta * (torch.exp(d) - d - 1)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def grpo_impls(x, *, clip, beta, liger_compiled):
    """impl -> fn() returning (loss, grad hidden, grad weight) of the same GRPO loss (GRPO_KNOBS).

    Argument mapping (README, "Benchmarks"): fastrlhf.fused_linear_policy_loss(algo="ppo", clip_low=clip_high=ε,
    kl_coef=β, kl_estimator="k3", entropy_coef=0, advantages = the sequence advantage on each of its tokens)
    = LigerFusedLinearGRPOLoss(epsilon_low=epsilon_high=ε, beta=β, loss_type="dapo", use_ref_model=β>0,
    temperature=1) called with (hidden [B, T, H], weight, labels, mask, advantages [B], ref_per_token_logps,
    old_per_token_logps) = TRL's GRPOTrainer loss (epsilon=ε, beta=β, loss_type="dapo", one process).
    All three compute k3 as e^{ℓ_ref−ℓ} − (ℓ_ref−ℓ) − 1 and the ratio against old_per_token_logps.
    Liger is "unavailable" (None) when liger_kernel does not import.
    """
    hidden, weight, labels, mask, adv_seq, old, rf = (x[k] for k in ("hidden", "weight", "labels", "mask",
                                                                      "adv_seq", "old", "ref"))
    params = (hidden, weight)
    B, T, _ = hidden.shape
    adv_tok = adv_seq[:, None].expand(B, T).contiguous()

    def with_grads(loss):
        return (loss.detach(), *torch.autograd.grad(loss, params))

    def fastrlhf():
        loss, _ = fused_linear_policy_loss(hidden, weight, labels, mask, adv_tok, old, rf, clip_low=clip,
                                           clip_high=clip, kl_coef=beta, kl_estimator="k3", entropy_coef=0.0)
        return with_grads(loss)

    def trl():
        lp = selective_log_softmax(hidden @ weight.T, labels)
        return with_grads(grpo_token_loss(lp.float(), old, rf, adv_seq, mask, clip, beta))

    def eager():
        lp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        return with_grads(grpo_token_loss(lp, old, rf, adv_seq, mask, clip, beta))

    impls = {"fastrlhf": fastrlhf, "trl": trl, "torch": eager, "liger": None}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return impls
    grpo = LigerFusedLinearGRPOLoss(beta=beta, compiled=liger_compiled, use_ref_model=beta > 0, epsilon_low=clip,
                                    epsilon_high=clip, loss_type="dapo", temperature=1.0)

    def liger():
        loss, _metrics = grpo(hidden, weight, labels, mask, adv_seq, ref_per_token_logps=rf if beta > 0 else None,
                              old_per_token_logps=old)
        return with_grads(loss)

    impls["liger"] = liger
    return impls


def neg_logprob_impls(x, device):
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    H = hidden.shape[-1]
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    params = (hidden, weight)

    def fastrlhf():
        return torch.autograd.grad(-fused_linear_logprobs(hidden, weight, labels).sum(), params)

    def eager():
        logp = torch.log_softmax((h2 @ weight.T).float(), -1)
        return torch.autograd.grad(-logp.gather(-1, l1[:, None]).sum(), params)

    impls = {"fastrlhf": fastrlhf, "torch": eager, "liger": None, "cce": None}
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
            impls["liger"] = lambda: torch.autograd.grad(ce(weight, h2, l1).sum(), params)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy
            impls["cce"] = lambda: torch.autograd.grad(
                linear_cross_entropy(h2, weight, l1, reduction="none").sum(), params)
        except ImportError:
            pass
    return impls


def three_gemms(x):
    h2 = x["hidden"].detach().reshape(-1, x["hidden"].shape[-1])
    w = x["weight"].detach()

    def run():
        z = h2 @ w.T
        return z @ w, z.T @ h2

    return run


CASES = ([("three_gemms", "torch")] + [("policy_loss", i) for i in ("fastrlhf", "torch", "torch.compile")]
         + [("grpo_loss", i) for i in ("fastrlhf", "trl", "torch", "liger")]
         + [("neg_logprob", i) for i in ("fastrlhf", "torch", "liger", "cce")])


@pytest.mark.parametrize("op,impl", CASES)
def test_fused_linear(bench, shape, op, impl):
    device = bench.device
    if impl == "torch.compile" and not bench.compile_ok:
        pytest.skip("torch.compile on the CPU: pass --bench-compile")
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    x = make_inputs(B, T, H, V, device, getattr(torch, shape["dtype"]))
    extra = {}
    if op == "three_gemms":
        fn = three_gemms(x)
    elif op == "policy_loss":
        fn = policy_loss_impls(x, bench.compile_ok)[impl]
        extra = KNOBS
    elif op == "grpo_loss":
        fn = grpo_impls(x, **GRPO_KNOBS, liger_compiled=device.type == "cuda")[impl]
        extra = {**GRPO_KNOBS, "loss_type": "dapo", "liger_compiled": device.type == "cuda"}
    else:
        fn = neg_logprob_impls(x, device)[impl]
    if fn is None:
        pytest.skip(f"{impl}: not available here ({'CUDA only' if device.type != 'cuda' else 'not installed'})")
    key = harness.dtype_name(x["hidden"].dtype), B * T, H, V
    # Inductor's CPU kernels fix their OpenMP team size at compile time: no fork-safe peak-memory call
    mem_ok = not (impl == "torch.compile" and device.type == "cpu")
    harness.measure(bench, fn, op=op, impl=impl, shape={"N": B * T, "H": H, "V": V, "dtype": shape["dtype"]},
                    baseline=None if op == "three_gemms" else "torch", flops=6 * B * T * H * V, memory=mem_ok,
                    **extra)
    if bench.benchmark.stats is None:
        return
    ms = bench.benchmark.stats.stats.median * 1e3
    if op == "three_gemms":
        _FLOOR_MS[key] = ms
    elif key in _FLOOR_MS:
        bench.benchmark.extra_info["vs_floor"] = ms / _FLOOR_MS[key]


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
