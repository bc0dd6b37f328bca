"""Batch entropy H_batch over logits [B, T, V] (README, "Batch entropy"), forward + backward.

    python bench/bench_batch_entropy.py [--gpu-sizes]

Impls: fastrlhf (Triton: row statistics, a [T, V] fp32 accumulator p̄, a two-pass backward), torch eager
(fp32 softmax over the whole batch, the way the formula reads) and torch.compile of it. No Liger/TRL
counterpart exists. Shapes: N = B·T tokens with T = 1024, V in GPU_SHAPES, bf16. Bytes that must move:
logits read by the forward, read by the backward, gradient written: 3·N·V·itemsize; `gbs` = those bytes /
time, `frac_copy_bw` against the copy bandwidth measured in the same run. On CPU, fastrlhf dispatches to its
PyTorch reference (fastrlhf.ops): CPU figures only check that the script works.
"""
from __future__ import annotations


import torch

import fastrlhf
import harness

T = 1024
GPU_SHAPES = [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)]
CPU_SHAPES = [(256, 1000)]


def eager_batch_entropy(logits, mask):
    p = torch.softmax(logits.float(), -1)
    m = mask.float()
    count = m.sum(0)
    pbar = (m[:, :, None] * p).sum(0) / count.clamp_min(1.0)[:, None]
    h_t = -(pbar * torch.log(pbar.clamp_min(1e-30))).sum(-1)
    return torch.where(count > 0, h_t, torch.zeros_like(h_t)).sum() / (count > 0).sum().clamp_min(1)


def main(argv=None):
    _, device, gpu = harness.start(__doc__, argv)
    dtype = torch.bfloat16
    copy_bw = harness.copy_bandwidth_gbs(device)
    impls = {"fastrlhf": fastrlhf.batch_entropy, "torch": eager_batch_entropy,
             "torch.compile": torch.compile(eager_batch_entropy)}
    results = []
    for n, v in GPU_SHAPES if gpu else CPU_SHAPES:
        B, t = max(1, n // T), min(n, T)
        shape = {"N": n, "V": v, "B": B, "T": t, "dtype": str(dtype).replace("torch.", "")}
        for impl, f in impls.items():
            try:
                x = torch.randn(B, t, v, device=device, dtype=dtype).requires_grad_()
                mask = (torch.rand(B, t, device=device) > 0.1).float()
                up = torch.rand((), device=device) + 0.5

                def step():
                    x.grad = None
                    (f(x, mask) * up).backward()
                ms = harness.time_ms(step, device=device)
                mem = harness.peak_extra_mib(step, device=device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                print(f"{impl} {shape}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
                results.append(harness.result("batch_entropy", impl, shape, None, None, error=type(exc).__name__))
                continue
            finally:
                x = mask = step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            gbs = 3 * n * v * dtype.itemsize / (ms * 1e-3) / 1e9
            results.append(harness.result("batch_entropy", impl, shape, ms, mem, gbs=gbs, frac_copy_bw=gbs / copy_bw))
    harness.print_table(results, keys=("impl", "shape", "ms", "peak_mem_mib", "frac_copy_bw"))
    print(harness.write_results("batch_entropy", results, extra={"copy_bandwidth_gbs": copy_bw}))


if __name__ == "__main__":
    main()
