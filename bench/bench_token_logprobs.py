"""Token log-probs (and entropy) from logits [N, V], forward + backward.

    python bench/bench_token_logprobs.py [--gpu-sizes]

Ops: "token_logprobs" (ℓ only: fastrlhf, torch eager fp32-upcast log_softmax + gather, torch.compile of it,
Liger's LigerCrossEntropyLoss(reduction="none") as −ℓ, TRL's selective_log_softmax when installed) and
"logprobs_and_entropy" (ℓ and H: fastrlhf, eager with the entropy from the softmax, torch.compile).
Upstream gradients are random for both outputs. Bytes that must move: the logits read by the forward, read
again by the backward, and the gradient written: 3·N·V·itemsize; `gbs` = those bytes / time,
`frac_copy_bw` = gbs / copy bandwidth measured in the same run. On CPU, fastrlhf dispatches to its
PyTorch reference (fastrlhf.ops): CPU figures only check that the script works.
"""
from __future__ import annotations


import torch

import fastrlhf
import harness

GPU_SHAPES = [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)]
CPU_SHAPES = [(256, 1000)]


def eager_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)


def eager_logprobs_entropy(logits, labels):
    logp = torch.log_softmax(logits.float(), -1)
    ent = -(torch.softmax(logits.float(), -1) * logp).sum(-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), ent


def _impls(op, device):
    """impl name -> f(logits, labels) returning a tuple of outputs; None where the impl is unavailable."""
    if op == "token_logprobs":
        impls = {"fastrlhf": lambda x, y: (fastrlhf.token_logprobs(x, y),), "torch": lambda x, y: (eager_logprobs(x, y),)}
        impls["torch.compile"] = lambda x, y, _f=torch.compile(eager_logprobs): (_f(x, y),)
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
            ce = LigerCrossEntropyLoss(reduction="none")
            impls["liger"] = lambda x, y: (-ce(x, y),)
        except ImportError as exc:
            print(f"liger: skipped ({exc})")
        try:
            from trl.trainer.utils import selective_log_softmax
            impls["trl"] = lambda x, y: (selective_log_softmax(x, y),)
        except ImportError as exc:
            print(f"trl: skipped ({exc})")
    else:
        impls = {"fastrlhf": lambda x, y: fastrlhf.logprobs_and_entropy(x, y),
                 "torch": eager_logprobs_entropy,
                 "torch.compile": torch.compile(eager_logprobs_entropy)}
    return impls


def _step(f, logits, labels, grads):
    """One forward + backward with fixed random upstream gradients."""
    logits.grad = None
    outs = f(logits, labels)
    torch.autograd.backward([o.float() for o in outs], list(grads[:len(outs)]))


def main(argv=None):
    _, device, gpu = harness.start(__doc__, argv)
    dtype = torch.bfloat16
    copy_bw = harness.copy_bandwidth_gbs(device)
    results = []
    for op in ("token_logprobs", "logprobs_and_entropy"):
        for n, v in GPU_SHAPES if gpu else CPU_SHAPES:
            shape = {"N": n, "V": v, "dtype": str(dtype).replace("torch.", "")}
            for impl, f in _impls(op, device).items():
                if device.type == "cpu" and impl == "liger":
                    continue                                   # Liger's kernels need a GPU
                try:
                    logits = torch.randn(n, v, device=device, dtype=dtype).requires_grad_()
                    labels = torch.randint(0, v, (n,), device=device)
                    grads = (torch.randn(n, device=device), torch.randn(n, device=device))
                    ms = harness.time_ms(lambda: _step(f, logits, labels, grads), device=device)
                    mem = harness.peak_extra_mib(lambda: _step(f, logits, labels, grads), device=device)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                    print(f"{op} {impl} {shape}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
                    results.append(harness.result(op, impl, shape, None, None, error=type(exc).__name__))
                    continue
                finally:
                    logits = labels = grads = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                gbs = 3 * n * v * dtype.itemsize / (ms * 1e-3) / 1e9
                results.append(harness.result(op, impl, shape, ms, mem, gbs=gbs, frac_copy_bw=gbs / copy_bw))
    harness.print_table(results, keys=("op", "impl", "shape", "ms", "peak_mem_mib", "frac_copy_bw"))
    print(harness.write_results("token_logprobs", results, extra={"copy_bandwidth_gbs": copy_bw}))


if __name__ == "__main__":
    main()
