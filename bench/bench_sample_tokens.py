"""Sampling one token per row from [B, V=151936] logits: fastrlhf (one operator; on GPU one kernel)
vs the torch sort-based top-p sampler (fastrlhf.ref.sample_tokens: softmax, sort, cumsum, scatter,
multinomial), impl "torch".

    pytest bench/bench_sample_tokens.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_sample_tokens.py [--size smoke|cpu|gpu]

Logits ~ N(0, 1) * 4 (a peaked distribution, the nucleus at p=0.9 is a few thousand tokens).
Batch {8, 64, 256} at the gpu size, {8} at the cpu size; smoke: B=2, V=4096.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf.extension as ext  # noqa: E402
from fastrlhf import ref  # noqa: E402

V = 151936
SETTINGS = [dict(temperature=0.8, top_k=0, top_p=0.9), dict(temperature=0.8, top_k=50, top_p=0.9),
            dict(temperature=1.0, top_k=0, top_p=1.0)]
SHAPES = {
    "smoke": [dict(B=2, V=4096, **s) for s in SETTINGS[:1]],
    "cpu": [dict(B=8, V=V, **s) for s in SETTINGS],
    "gpu": [dict(B=b, V=V, **s) for b in (8, 64, 256) for s in SETTINGS],
}


@pytest.mark.parametrize("impl", ["fastrlhf", "torch"])
def test_sample_tokens(bench, shape, impl):
    device = bench.device
    logits = (torch.randn(shape["B"], shape["V"], generator=torch.Generator().manual_seed(0)) * 4).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    knobs = {k: shape[k] for k in ("temperature", "top_k", "top_p")}
    sampler = ext.sample_tokens if impl == "fastrlhf" else ref.sample_tokens
    harness.measure(bench, lambda: sampler(logits, generator=gen, **knobs), op="sample_tokens", impl=impl,
                    shape=shape, baseline="torch")


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
