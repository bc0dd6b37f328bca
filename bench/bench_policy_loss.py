"""policy_loss_from_logits forward + backward: clipped PPO + k3 KL (GRPO-style), masked mean over tokens.

    python bench/bench_policy_loss.py [--gpu-sizes]

Impls: fastrlhf (gradient written in forward into a new buffer; variant "inplace" writes it over the logits,
its `ms` includes restoring the logits, whose own time is `restore_copy_ms`),
torch eager the way trainers do it (fp32 log_softmax + gather, then the loss), torch.compile of the same,
Liger's Triton GRPO loss on logits (`liger_kernel.transformers.grpo_loss.triton_grpo_loss`, loss_type "bnpo" =
masked mean over tokens, its default inplace=True; it takes logits [B, T+1, V] and per-sequence advantages).
Shapes: N = B·T tokens with T = 1024, V in GPU_SHAPES, bf16. Bytes that must move: logits read once and
the gradient written once, 2·N·V·itemsize (README, "Kernels"); `gbs` = those bytes / time, `frac_copy_bw` against
the copy bandwidth measured in the same run. On CPU, fastrlhf dispatches to its
PyTorch reference (fastrlhf.ops): CPU figures only check that the script works.
"""
from __future__ import annotations


import torch

import fastrlhf
import harness
from fastrlhf import ref
from fastrlhf.kernels import policy_loss as kernel

T = 1024
GPU_SHAPES = [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)]
CPU_SHAPES = [(256, 1000)]
CLIP, KL_COEF = 0.2, 0.04


def eager_policy_loss(logits, labels, mask, adv, old, ref_lp):
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = ref_lp - logp
    per_token = pg + KL_COEF * (torch.expm1(d) - d)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _impls():
    """(impl, variant) -> f(logits [B, T, V], logits_liger [B, T+1, V], batch) returning the loss."""
    cfg = ref.LossConfig(clip_low=CLIP, clip_high=CLIP, kl_coef=KL_COEF, kl_estimator="k3")
    compiled = torch.compile(eager_policy_loss)
    impls = {
        ("fastrlhf", "new-buffer"): lambda x, xl, b: fastrlhf.policy_loss_from_logits(
            x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"], clip_low=CLIP, clip_high=CLIP,
            kl_coef=KL_COEF, kl_estimator="k3")[0],
        ("fastrlhf", "inplace"): lambda x, xl, b: kernel.policy_loss_from_logits(
            x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"], cfg, inplace=True)[0],
        ("torch", "fp32-upcast"): lambda x, xl, b: eager_policy_loss(x, b["labels"], b["mask"], b["adv"], b["old"],
                                                                     b["ref"]),
        ("torch.compile", "fp32-upcast"): lambda x, xl, b: compiled(x, b["labels"], b["mask"], b["adv"], b["old"],
                                                                    b["ref"]),
    }
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        impls[("liger", "triton_grpo_loss")] = lambda x, xl, b: triton_grpo_loss(
            xl, b["old"], b["ref"], b["labels"], b["adv_seq"], b["mask"], temperature=1.0, beta=KL_COEF,
            eps_low=CLIP, eps_high=CLIP, inplace=True, loss_type="bnpo", reduce=True)[0]
    except ImportError as exc:
        print(f"liger: skipped ({exc})")
    return impls


def _batch(n, v, device, dtype):
    B, t = max(1, n // T), min(n, T)
    g = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    lp = -torch.rand(B, t, device=device) * 5 - 8      # log-probs of random tokens under random logits
    return {"labels": torch.randint(0, v, (B, t), device=device), "mask": (torch.rand(B, t, device=device) > 0.1).float(),
            "adv": g(B, t), "adv_seq": g(B), "old": lp + 0.1 * g(B, t), "ref": lp + 0.1 * g(B, t)}, (B, t)


def main(argv=None):
    _, device, gpu = harness.start(__doc__, argv)
    dtype = torch.bfloat16
    copy_bw = harness.copy_bandwidth_gbs(device)
    results = []
    for n, v in GPU_SHAPES if gpu else CPU_SHAPES:
        shape = {"N": n, "V": v, "T": T, "dtype": str(dtype).replace("torch.", "")}
        for (impl, variant), f in _impls().items():
            if device.type == "cpu" and (impl == "liger" or variant == "inplace"):
                continue                                       # Triton kernels (theirs and ours) need a GPU
            try:
                batch, (B, t) = _batch(n, v, device, dtype)
                if impl == "liger":
                    x = torch.randn(B, t + 1, v, device=device, dtype=dtype).requires_grad_()
                else:
                    x = torch.randn(B, t, v, device=device, dtype=dtype).requires_grad_()

                extra = {}
                if variant == "inplace":
                    # The gradient overwrites the logits: restore them before each step, and report the
                    # restoring copy's own time so it can be subtracted.
                    pristine = x.detach().clone()
                    extra["restore_copy_ms"] = harness.time_ms(lambda: x.data.copy_(pristine), device=device)

                def step():
                    if variant == "inplace":
                        x.data.copy_(pristine)
                    x.grad = None
                    f(x, x, batch).backward()
                ms = harness.time_ms(step, device=device)
                mem = harness.peak_extra_mib(step, device=device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                print(f"{impl}/{variant} {shape}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
                results.append(harness.result("policy_loss_from_logits", impl, shape, None, None, variant=variant,
                                              error=type(exc).__name__))
                continue
            finally:
                x = batch = step = pristine = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            gbs = 2 * n * v * dtype.itemsize / (ms * 1e-3) / 1e9
            results.append(harness.result("policy_loss_from_logits", impl, shape, ms, mem, variant=variant, gbs=gbs,
                                          frac_copy_bw=gbs / copy_bw, **extra))
    harness.print_table(results, keys=("impl", "variant", "shape", "ms", "peak_mem_mib", "frac_copy_bw"))
    print(harness.write_results("policy_loss", results, extra={"copy_bandwidth_gbs": copy_bw}))


if __name__ == "__main__":
    main()
