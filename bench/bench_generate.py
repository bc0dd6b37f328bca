"""Rollout decode throughput: fastrlhf.generate (static KV cache, CUDA-graph decode, one sampling
operator per step) vs Hugging Face `generate` (impl "hf"), same model, prompts and sampling settings
(temperature 1, no top-k / top-p, no EOS so every row decodes max_new_tokens).

GPU (or --gpu-sizes): a Qwen2.5-0.5B-shaped model with random weights, bf16, batch {8, 64},
128 prompt + 256 new tokens. Floor per decode step = (weight bytes + KV-cache bytes read at the mean
context length) / measured copy bandwidth; tokens/s floor = B / that time.
CPU: a tiny Qwen2 model (smoke run).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf.generation import generate  # noqa: E402


def qwen_config(gpu: bool):
    from transformers import Qwen2Config
    if gpu:  # Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B)
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def wall_ms(fn, device, warmup=1, rep=3):
    """Median wall time of whole generate calls (each a few seconds on GPU), synchronized."""
    def run():
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(rep))


def main(argv=None):
    from transformers import Qwen2ForCausalLM
    _, device, gpu = harness.start(__doc__, argv)
    cfg = qwen_config(gpu)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    prompt_len, new = (128, 256) if gpu else (16, 32)
    batches = [8, 64] if gpu else [4]
    bandwidth = harness.copy_bandwidth_gbs(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    results = []
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)
        mask = torch.ones_like(ids)
        mask[: B // 2, : prompt_len // 4] = 0  # half the rows left-padded
        kw = dict(temperature=1.0, top_k=0, top_p=1.0)
        impls = {
            "fastrlhf": lambda: generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, **kw),
            "hf": lambda: model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=0, eos_token_id=None, **kw),
        }
        step_bytes = weight_bytes + B * kv_bytes_per_token * (prompt_len + new / 2)
        floor_tps = B / (step_bytes / (bandwidth * 1e9))
        times = {}
        for impl, fn in impls.items():
            with torch.no_grad():
                times[impl] = wall_ms(fn, device)
                mem = harness.peak_extra_mib(fn, device=device) if device.type == "cuda" else None
            tps = B * new / (times[impl] / 1e3)
            results.append(harness.result("generate", impl, {"B": B, "prompt": prompt_len, "new": new,
                                                             "dtype": str(dtype).replace("torch.", "")},
                                          times[impl], mem, tokens_per_s=tps, floor_tokens_per_s=floor_tps,
                                          fraction_of_floor=tps / floor_tps))
        for r in results[-2:]:
            r["speedup_vs_hf"] = times["hf"] / r["ms"]
    harness.print_table(results, keys=("op", "impl", "shape", "ms", "tokens_per_s", "speedup_vs_hf",
                                       "fraction_of_floor", "peak_mem_mib"))
    print(f"wrote {harness.write_results('generate', results, {'copy_bandwidth_gbs': bandwidth})}")


if __name__ == "__main__":
    main()
