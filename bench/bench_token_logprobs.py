"""Token log-probs (and entropy) from logits [N, V], forward + backward.

    pytest bench/bench_token_logprobs.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_token_logprobs.py [--size smoke|cpu|gpu]

Ops: "token_logprobs" (ℓ only: fastrlhf, torch eager fp32-upcast log_softmax + gather, torch.compile of it,
Liger's LigerCrossEntropyLoss(reduction="none") as −ℓ (CUDA), TRL's selective_log_softmax when installed)
and "logprobs_and_entropy" (ℓ and H: fastrlhf, eager with the entropy from the softmax, torch.compile).
Upstream gradients are random for both outputs. Bytes that must move: the logits read by the forward, read
again by the backward, and the gradient written: 3·N·V·itemsize; `gbs` = those bytes / time,
`frac_copy_bw` = gbs / copy bandwidth measured in the same session. On CPU, fastrlhf dispatches to its
PyTorch reference (fastrlhf.ops): CPU figures only check that the benchmark works.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = {
    "smoke": [dict(N=64, V=512)],
    "cpu": [dict(N=256, V=1000)],
    "gpu": [dict(N=n, V=v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)],
}


def eager_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)


def eager_logprobs_entropy(logits, labels):
    logp = torch.log_softmax(logits.float(), -1)
    ent = -(torch.softmax(logits.float(), -1) * logp).sum(-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), ent


def _impl(op, impl, bench):
    """f(logits, labels) -> tuple of outputs; skips the case where the impl is unavailable here."""
    if impl == "torch.compile" and not bench.compile_ok:
        pytest.skip("torch.compile on the CPU: pass --bench-compile")
    if op == "token_logprobs":
        if impl == "fastrlhf":
            return lambda x, y: (fastrlhf.token_logprobs(x, y),)
        if impl == "torch":
            return lambda x, y: (eager_logprobs(x, y),)
        if impl == "torch.compile":
            f = torch.compile(eager_logprobs)
            return lambda x, y: (f(x, y),)
        if impl == "liger":
            if bench.device.type != "cuda":
                pytest.skip("Liger's cross-entropy is a Triton kernel: CUDA only")
            ce = pytest.importorskip("liger_kernel.transformers").LigerCrossEntropyLoss(reduction="none")
            return lambda x, y: (-ce(x, y),)
        if impl == "trl":
            sel = pytest.importorskip("trl.trainer.utils").selective_log_softmax
            return lambda x, y: (sel(x, y),)
    if impl == "fastrlhf":
        return fastrlhf.logprobs_and_entropy
    if impl == "torch":
        return eager_logprobs_entropy
    return torch.compile(eager_logprobs_entropy)


@pytest.mark.parametrize("op,impl", [("token_logprobs", i) for i in ("fastrlhf", "torch", "torch.compile", "liger", "trl")]
                         + [("logprobs_and_entropy", i) for i in ("fastrlhf", "torch", "torch.compile")])
def test_token_logprobs(bench, shape, op, impl):
    f = _impl(op, impl, bench)
    n, v, device = shape["N"], shape["V"], bench.device
    logits = torch.randn(n, v, device=device, dtype=DTYPE).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    grads = (torch.randn(n, device=device), torch.randn(n, device=device))

    def step():
        logits.grad = None
        outs = f(logits, labels)
        torch.autograd.backward([o.float() for o in outs], list(grads[:len(outs)]))

    harness.measure(bench, step, op=op, impl=impl, shape={**shape, "dtype": harness.dtype_name(DTYPE)},
                    baseline="torch", bytes_moved=3 * n * v * DTYPE.itemsize)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
