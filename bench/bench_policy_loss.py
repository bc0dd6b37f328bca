"""policy_loss_from_logits forward + backward: clipped PPO + k3 KL (GRPO-style), masked mean over tokens.

    pytest bench/bench_policy_loss.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_policy_loss.py [--size smoke|cpu|gpu]

Impls: fastrlhf (gradient written in forward into a new buffer; variant "inplace" writes it over the logits,
its `ms` includes restoring the logits, whose own time is `restore_copy_ms`; CUDA only),
torch eager the way trainers do it (fp32 log_softmax + gather, then the loss), torch.compile of the same,
Liger's Triton GRPO loss on logits (`liger_kernel.transformers.grpo_loss.triton_grpo_loss`, loss_type "bnpo" =
masked mean over tokens, its default inplace=True; it takes logits [B, T+1, V] and per-sequence advantages;
CUDA only). Shapes: N = B·T tokens with T = min(N, 1024), bf16. Bytes that must move: logits read once and
the gradient written once, 2·N·V·itemsize (README, "Kernels"); `gbs` = those bytes / time, `frac_copy_bw`
against the copy bandwidth measured in the same session. On CPU, fastrlhf dispatches to its PyTorch
reference (fastrlhf.ops): CPU figures only check that the benchmark works.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf  # noqa: E402
from fastrlhf import ref  # noqa: E402

T = 1024
DTYPE = torch.bfloat16
SHAPES = {
    "smoke": [dict(N=64, V=512)],
    "cpu": [dict(N=256, V=1000)],
    "gpu": [dict(N=n, V=v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)],
}
CLIP, KL_COEF = 0.2, 0.04


def eager_policy_loss(logits, labels, mask, adv, old, ref_lp):
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = ref_lp - logp
    per_token = pg + KL_COEF * (torch.expm1(d) - d)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _loss_fn(impl, variant, bench):
    """f(logits, batch) -> loss; skips the case where the impl is unavailable here."""
    cuda = bench.device.type == "cuda"
    if impl == "fastrlhf" and variant == "new-buffer":
        return lambda x, b: fastrlhf.policy_loss_from_logits(
            x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"], clip_low=CLIP, clip_high=CLIP,
            kl_coef=KL_COEF, kl_estimator="k3")[0]
    if impl == "fastrlhf":
        if not cuda:
            pytest.skip("the in-place variant is the Triton kernel: CUDA only")
        from fastrlhf.kernels import policy_loss as kernel
        cfg = ref.LossConfig(clip_low=CLIP, clip_high=CLIP, kl_coef=KL_COEF, kl_estimator="k3")
        return lambda x, b: kernel.policy_loss_from_logits(x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"],
                                                           cfg, inplace=True)[0]
    if impl == "torch":
        return lambda x, b: eager_policy_loss(x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"])
    if impl == "torch.compile":
        if not bench.compile_ok:
            pytest.skip("torch.compile on the CPU: pass --bench-compile")
        compiled = torch.compile(eager_policy_loss)
        return lambda x, b: compiled(x, b["labels"], b["mask"], b["adv"], b["old"], b["ref"])
    if not cuda:
        pytest.skip("Liger's triton_grpo_loss is a Triton kernel: CUDA only")
    grpo = pytest.importorskip("liger_kernel.transformers.grpo_loss").triton_grpo_loss
    return lambda x, b: grpo(x, b["old"], b["ref"], b["labels"], b["adv_seq"], b["mask"], temperature=1.0,
                             beta=KL_COEF, eps_low=CLIP, eps_high=CLIP, inplace=True, loss_type="bnpo",
                             reduce=True)[0]


def _batch(B, t, v, device):
    g = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    lp = -torch.rand(B, t, device=device) * 5 - 8      # log-probs of random tokens under random logits
    return {"labels": torch.randint(0, v, (B, t), device=device), "mask": (torch.rand(B, t, device=device) > 0.1).float(),
            "adv": g(B, t), "adv_seq": g(B), "old": lp + 0.1 * g(B, t), "ref": lp + 0.1 * g(B, t)}


@pytest.mark.parametrize("impl,variant", [("fastrlhf", "new-buffer"), ("fastrlhf", "inplace"), ("torch", "fp32-upcast"),
                                          ("torch.compile", "fp32-upcast"), ("liger", "triton_grpo_loss")])
def test_policy_loss(bench, shape, impl, variant):
    f = _loss_fn(impl, variant, bench)
    n, v, device = shape["N"], shape["V"], bench.device
    B, t = max(1, n // T), min(n, T)
    batch = _batch(B, t, v, device)
    # Liger's kernel reads logits [B, T+1, V] (the last position is dropped inside)
    x = torch.randn(B, t + (impl == "liger"), v, device=device, dtype=DTYPE).requires_grad_()
    extra = {}
    pristine = None
    if variant == "inplace":
        # The gradient overwrites the logits: restore them before each step, and report the
        # restoring copy's own time so it can be subtracted.
        pristine = x.detach().clone()
        extra["restore_copy_ms"] = harness.aux_ms(lambda: x.data.copy_(pristine))

    def step():
        if pristine is not None:
            x.data.copy_(pristine)
        x.grad = None
        f(x, batch).backward()

    harness.measure(bench, step, op="policy_loss_from_logits", impl=impl,
                    shape={**shape, "T": t, "dtype": harness.dtype_name(DTYPE)}, baseline="torch",
                    bytes_moved=2 * n * v * DTYPE.itemsize, variant=variant, **extra)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
