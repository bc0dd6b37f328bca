"""Batch entropy H_batch over logits [B, T, V] (README, "Batch entropy"), forward + backward.

    pytest bench/bench_batch_entropy.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_batch_entropy.py [--size smoke|cpu|gpu]

Impls: fastrlhf (Triton: row statistics, a [T, V] fp32 accumulator p̄, a two-pass backward), torch eager
(fp32 softmax over the whole batch, the way the formula reads) and torch.compile of it. No Liger/TRL
counterpart exists. Shapes: N = B·T tokens with T = min(N, 1024), bf16. Bytes that must move: logits read
by the forward, read by the backward, gradient written: 3·N·V·itemsize; `gbs` = those bytes / time,
`frac_copy_bw` against the copy bandwidth measured in the same session. On CPU, fastrlhf dispatches to its
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

T = 1024
DTYPE = torch.bfloat16
SHAPES = {
    "smoke": [dict(N=64, V=512)],
    "cpu": [dict(N=256, V=1000)],
    "gpu": [dict(N=n, V=v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)],
}


def eager_batch_entropy(logits, mask):
    p = torch.softmax(logits.float(), -1)
    m = mask.float()
    count = m.sum(0)
    pbar = (m[:, :, None] * p).sum(0) / count.clamp_min(1.0)[:, None]
    h_t = -(pbar * torch.log(pbar.clamp_min(1e-30))).sum(-1)
    return torch.where(count > 0, h_t, torch.zeros_like(h_t)).sum() / (count > 0).sum().clamp_min(1)


@pytest.mark.parametrize("impl", ["fastrlhf", "torch", "torch.compile"])
def test_batch_entropy(bench, shape, impl):
    if impl == "torch.compile" and not bench.compile_ok:
        pytest.skip("torch.compile on the CPU: pass --bench-compile")
    f = {"fastrlhf": fastrlhf.batch_entropy, "torch": eager_batch_entropy}.get(impl) or torch.compile(eager_batch_entropy)
    n, v, device = shape["N"], shape["V"], bench.device
    B, t = max(1, n // T), min(n, T)
    x = torch.randn(B, t, v, device=device, dtype=DTYPE).requires_grad_()
    mask = (torch.rand(B, t, device=device) > 0.1).float()
    up = torch.rand((), device=device) + 0.5

    def step():
        x.grad = None
        (f(x, mask) * up).backward()

    harness.measure(bench, step, op="batch_entropy", impl=impl,
                    shape={**shape, "B": B, "T": t, "dtype": harness.dtype_name(DTYPE)},
                    baseline="torch", bytes_moved=3 * n * v * DTYPE.itemsize)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
