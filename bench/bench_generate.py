"""Rollout decode throughput: fastrlhf.generate (static KV cache, CUDA-graph decode, one sampling
operator per step) vs Hugging Face `generate` (impl "hf"), same model, prompts and sampling settings
(temperature 1, no top-k / top-p, no EOS so every row decodes max_new_tokens).

    pytest bench/bench_generate.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_generate.py [--size smoke|cpu|gpu]

gpu: a Qwen2.5-0.5B-shaped model with random weights, bf16, batch {8, 64}, 128 prompt + 256 new tokens.
Floor per decode step = (weight bytes + KV-cache bytes read at the mean context length) / the copy
bandwidth measured in the same session; tokens/s floor = B / that time. smoke and cpu: a tiny Qwen2
model, fp32 (peak memory is not measured on the CPU: a forked child would run a whole generate call).
Whole calls take seconds on the GPU: as many rounds as fit in the case budget, at least one.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf.generation import generate  # noqa: E402

SHAPES = {
    "smoke": [dict(model="tiny", B=2, prompt=8, new=8)],
    "cpu": [dict(model="tiny", B=4, prompt=16, new=32)],
    "gpu": [dict(model="qwen2.5-0.5b", B=b, prompt=128, new=256) for b in (8, 64)],
}


def qwen_config(model: str):
    from transformers import Qwen2Config
    if model == "qwen2.5-0.5b":  # config.json of Qwen/Qwen2.5-0.5B
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


_MODELS: dict = {}


def _model(name: str, device: torch.device, dtype: torch.dtype):
    """One random-weight model per (name, device) for the session: both impls decode the same weights."""
    if (name, device) not in _MODELS:
        from transformers import Qwen2ForCausalLM
        _MODELS.clear()
        torch.manual_seed(0)
        _MODELS[(name, device)] = Qwen2ForCausalLM(qwen_config(name)).to(device=device, dtype=dtype).eval()
    return _MODELS[(name, device)]


@pytest.mark.parametrize("impl", ["fastrlhf", "hf"])
def test_generate(bench, shape, impl):
    device = bench.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(shape["model"], device, dtype)
    cfg = model.config
    B, prompt_len, new = shape["B"], shape["prompt"], shape["new"]
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[: B // 2, : prompt_len // 4] = 0  # half the rows left-padded
    kw = dict(temperature=1.0, top_k=0, top_p=1.0)
    if impl == "fastrlhf":
        def fn():
            with torch.no_grad():
                return generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, **kw)
    else:
        def fn():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0, eos_token_id=None, **kw)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize
    step_bytes = weight_bytes + B * kv_bytes_per_token * (prompt_len + new / 2)
    harness.measure(bench, fn, op="generate", impl=impl, shape={**shape, "dtype": harness.dtype_name(dtype)},
                    baseline="hf", memory=device.type == "cuda", min_rounds=1)
    stats = bench.benchmark.stats
    if stats is not None:
        tps = B * new / stats.stats.median
        floor_tps = B / (step_bytes / (bench.ceilings()["copy_bandwidth_gbs"] * 1e9))
        bench.benchmark.extra_info.update(tokens_per_s=tps, floor_tokens_per_s=floor_tps,
                                          fraction_of_floor=tps / floor_tps)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
