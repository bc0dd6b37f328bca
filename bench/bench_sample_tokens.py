"""Sampling one token per row from [B, V=151936] logits: fastrlhf (one operator; on GPU one kernel)
vs the torch sort-based top-p sampler (fastrlhf.ref.sample_tokens: softmax, sort, cumsum, scatter,
multinomial), impl "torch".

Logits ~ N(0, 1) * 4 (a peaked distribution, the nucleus at p=0.9 is a few thousand tokens).
Batch {8, 64, 256} on GPU (or --gpu-sizes), {8} on CPU.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf.extension as ext  # noqa: E402
from fastrlhf import ref  # noqa: E402

V = 151936
SETTINGS = [dict(temperature=0.8, top_k=0, top_p=0.9), dict(temperature=0.8, top_k=50, top_p=0.9),
            dict(temperature=1.0, top_k=0, top_p=1.0)]


def main(argv=None):
    _, device, gpu = harness.start(__doc__, argv)
    batches = [8, 64, 256] if gpu else [8]
    results = []
    for B in batches:
        logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 4).to(device)
        for s in SETTINGS:
            gen = torch.Generator(device=device).manual_seed(0)
            impls = {"fastrlhf": lambda: ext.sample_tokens(logits, generator=gen, **s),
                     "torch": lambda: ref.sample_tokens(logits, generator=gen, **s)}
            times = {}
            for impl, fn in impls.items():
                times[impl] = harness.time_ms(fn, warmup=1, rep=5, device=device)
                mem = harness.peak_extra_mib(fn, device=device)
                results.append(harness.result("sample_tokens", impl, {"B": B, "V": V, **s}, times[impl], mem))
            for r in results[-2:]:
                r["speedup_vs_torch"] = times["torch"] / r["ms"]
    harness.print_table(results, keys=("op", "impl", "shape", "ms", "speedup_vs_torch", "peak_mem_mib"))
    print(f"wrote {harness.write_results('sample_tokens', results)}")


if __name__ == "__main__":
    main()
