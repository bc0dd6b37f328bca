"""Fused linear path (README, "Fused linear path"): hidden states -> PPO loss / log-probs, forward + backward.

    python bench/bench_fused_linear.py               CPU smoke sizes (or the GPU sizes on CUDA)
    python bench/bench_fused_linear.py --cpu-target  the CPU target, N=4096 H=256 V=65536 fp32
    python bench/bench_fused_linear.py --gpu-sizes   N=8192, H ∈ {896, 4096}, V ∈ {128256, 151936}, bf16
    add --compile to time the torch.compile baseline on CPU too (compiling takes minutes there)

Ops, each forward + backward w.r.t. hidden and weight (grads returned by torch.autograd.grad, so every
impl allocates its own gradient outputs inside the measurement):
    policy_loss   PPO (clip 0.2) + 0.01·entropy + 0.05·k3 KL, masked token mean:
                  fastrlhf (fused_linear_policy_loss), torch (eager on materialized logits),
                  torch.compile (compiled per-chunk loss under activation checkpointing),
                  liger (LigerFusedLinearGRPOLoss, loss_type="dapo", β=0.05 k3 KL, no entropy term: CUDA only)
    neg_logprob   Σ −log p(label): fastrlhf (fused_linear_logprobs), torch eager,
                  liger (LigerFusedLinearCrossEntropyLoss, reduction="none", CUDA only),
                  cce (cut_cross_entropy.linear_cross_entropy, reduction="none", if installed)
    three_gemms   the floor: x = h Wᵀ, dx W, dxᵀ h (6·N·H·V FLOPs), measured in the same run.
Peak memory is the extra memory over the inputs (harness.peak_extra_mib).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf.fused_linear import choose_chunk_size, fused_linear_logprobs, fused_linear_policy_loss  # noqa: E402

KNOBS = dict(clip_low=0.2, clip_high=0.2, entropy_coef=0.01, kl_coef=0.05, kl_estimator="k3")
CPU_SMOKE = [dict(B=2, T=512, H=128, V=8192)]
CPU_TARGET = [dict(B=4, T=1024, H=256, V=65536)]
GPU_SIZES = [dict(B=8, T=1024, H=h, V=v) for h in (896, 4096) for v in (128256, 151936)]


def make_inputs(B, T, H, V, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    mask[:, -T // 8:] = 0                                           # some padding
    adv = torch.randn(B, T, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 2 - torch.log(torch.tensor(float(V)))).to(device)
    rf = (old.cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device)
    return hidden, weight, labels, mask, adv, old, rf


def eager_terms(logits, labels, old, rf, adv):
    """Per-token PPO + entropy + k3 KL on [n, V] logits, float32, as a user writes it."""
    logp = torch.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - KNOBS["clip_low"], 1 + KNOBS["clip_high"]))
    d = rf - lp
    return pg + KNOBS["kl_coef"] * (torch.exp(d) - 1 - d) - KNOBS["entropy_coef"] * ent


def policy_loss_impls(inputs, device, compile_ok):
    hidden, weight, labels, mask, adv, old, rf = inputs
    B, T, H = hidden.shape
    V = weight.shape[0]
    h2, l1, m1, a1, o1, r1 = (t.reshape(-1, H) if t is hidden else t.reshape(-1)
                              for t in (hidden, labels, mask, adv, old, rf))
    params = (hidden, weight)

    def fastrlhf():
        loss, _ = fused_linear_policy_loss(hidden, weight, labels, mask, adv, old, rf, **KNOBS)
        return torch.autograd.grad(loss, params)

    def eager():
        per = eager_terms(h2 @ weight.T, l1, o1, r1, a1)
        return torch.autograd.grad((per * m1).sum() / m1.sum(), params)

    impls = {"fastrlhf": fastrlhf, "torch": eager}
    if compile_ok:
        rows = choose_chunk_size(B * T, V, device)
        chunk_fn = torch.compile(lambda h, w, lab, m, o, r, a: (eager_terms(h @ w.T, lab, o, r, a) * m).sum())

        def compiled():
            total = 0
            for s in range(0, B * T, rows):
                sl = slice(s, s + rows)
                total = total + torch.utils.checkpoint.checkpoint(
                    chunk_fn, h2[sl], weight, l1[sl], m1[sl], o1[sl], r1[sl], a1[sl], use_reentrant=False)
            return torch.autograd.grad(total / m1.sum(), params)

        impls["torch.compile"] = compiled
    if device.type == "cuda":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            LigerFusedLinearGRPOLoss = None
        if LigerFusedLinearGRPOLoss is not None:
            grpo = LigerFusedLinearGRPOLoss(beta=KNOBS["kl_coef"], loss_type="dapo", epsilon_low=0.2,
                                            epsilon_high=0.2, chunk_size=1)

            def liger():
                out = grpo(hidden, weight, labels, mask, adv[:, 0], ref_per_token_logps=rf,
                           old_per_token_logps=old)
                loss = out[0] if isinstance(out, tuple) else out
                return torch.autograd.grad(loss, params)

            impls["liger"] = liger
    return impls


def neg_logprob_impls(inputs, device):
    hidden, weight, labels = inputs[:3]
    H = hidden.shape[-1]
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    params = (hidden, weight)

    def fastrlhf():
        return torch.autograd.grad(-fused_linear_logprobs(hidden, weight, labels).sum(), params)

    def eager():
        logp = torch.log_softmax((h2 @ weight.T).float(), -1)
        return torch.autograd.grad(-logp.gather(-1, l1[:, None]).sum(), params)

    impls = {"fastrlhf": fastrlhf, "torch": eager}
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


def three_gemms(inputs):
    hidden, weight = inputs[:2]
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()

    def run():
        x = h2 @ w.T
        return x @ w, x.T @ h2

    return run


def bench_shape(shape, device, dtype, compile_ok):
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    inputs = make_inputs(B, T, H, V, device, dtype)
    desc = {"N": B * T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
    rep = 3 if device.type == "cpu" else 10
    results = []
    floor_ms = harness.time_ms(three_gemms(inputs), warmup=1, rep=rep, device=device)
    floor_mem = harness.peak_extra_mib(three_gemms(inputs), device=device)
    results.append(harness.result("three_gemms", "torch", desc, floor_ms, floor_mem,
                                  flops=6 * B * T * H * V))
    for op, impls in (("policy_loss", policy_loss_impls(inputs, device, compile_ok)),
                      ("neg_logprob", neg_logprob_impls(inputs, device))):
        for name, fn in impls.items():
            try:
                ms = harness.time_ms(fn, warmup=1, rep=rep, device=device)
                # Inductor's CPU kernels fix their OpenMP team size at compile time: no fork-safe way
                skip_mem = name == "torch.compile" and device.type == "cpu"
                mem = None if skip_mem else harness.peak_extra_mib(fn, device=device)
            except Exception as exc:  # a baseline that does not support this shape/device: record why
                results.append(harness.result(op, name, desc, float("nan"), None,
                                              error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            results.append(harness.result(op, name, desc, ms, mem, vs_floor=ms / floor_ms))
    by = {(r["op"], r["impl"]): r for r in results}
    for op in ("policy_loss", "neg_logprob"):
        base, ours = by.get((op, "torch")), by.get((op, "fastrlhf"))
        if base and ours and ours["peak_mem_mib"]:
            ours["time_vs_torch"] = ours["ms"] / base["ms"]
            ours["mem_saving_vs_torch"] = base["peak_mem_mib"] / ours["peak_mem_mib"]
    return results


def main(argv=None):
    parser = harness.arg_parser(__doc__)
    parser.add_argument("--cpu-target", action="store_true", help="the CPU target shape (N=4096, H=256, V=65536, fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="also the torch.compile baseline on CPU (always on CUDA; slow to compile on CPU)")
    args, device, gpu = harness.start(__doc__, argv, parser)
    if gpu:
        if device.type != "cuda":
            parser.error("--gpu-sizes needs a CUDA device")
        shapes, dtype, name = GPU_SIZES, torch.bfloat16, "fused_linear"
    elif args.cpu_target:
        shapes, dtype, name = CPU_TARGET, torch.float32, "fused_linear_cpu_target"
    else:
        shapes, dtype, name = CPU_SMOKE, torch.float32, "fused_linear_cpu_smoke"
    results = []
    for shape in shapes:
        results += bench_shape(shape, device, dtype, compile_ok=device.type == "cuda" or args.compile)
    path = harness.write_results(name, results, extra={"matmul_tflops": harness.matmul_tflops(device)})
    harness.print_table(results, keys=("op", "impl", "shape", "ms", "peak_mem_mib", "vs_floor"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
