"""bench_memory: full APA and PPO steps of fastrlhf's trainer on a model that barely fits its memory cap.

Per case: a random checkpoint built from an architecture config (no download) is saved to a temporary
directory with a CharTokenizer wide enough for its vocabulary, loaded through `fastrlhf.models.load`
(4-bit base + LoRA, memory cap), and one RL step of `fastrlhf.train` runs on prompts of `prompt_len`
tokens with `new_tokens` sampled tokens (random weights almost never sample EOS, so every response is
full length). Recorded per (case, algo):

    load_peak_mib        peak while loading (weights)
    generation_peak_mib  peak of `train.sample` (generation alone), generation_ms its time
    rollout_peak_mib     peak of `train.rollout` = generation + scoring (old/ref log-probs, values,
                         rewards, advantages; generation runs again inside it), rollout_ms its time
    update_peak_mib      peak of `train.update` (one epoch, micro-batches picked by memory.plan_memory),
                         update_ms its time
    ms                   step time = rollout_ms + update_ms;  peak_mem_mib = max of the phases
    plan                 what memory.plan_memory picked (micro-batch, generation batch, loss chunk)

Peaks: CUDA max_memory_allocated (weights included); CPU: peak RSS of the process (VmHWM, reset per
phase; Python heap and libraries included). An out-of-memory error is recorded as the case's result
(`oom`: memory.out_of_memory_message), not raised.

    (results: bench/results/memory_{smoke,gpu}.json, or --results-dir)
    python bench/bench_memory.py               CPU smoke (built-in tiny Llama, 4-bit + LoRA); GPU sizes with CUDA
    python bench/bench_memory.py --gpu-sizes   Llama-3-8B shape under 16 GiB, Qwen2.5-0.5B shape under 4 GiB:
                                               8 x (256 + 256) tokens, 4-bit nf4 base + LoRA r=16, bf16,
                                               gradient checkpointing (--models/--algos pick a subset; the
                                               8B case writes a 16 GB random checkpoint to a temp dir first)

TRL's PPOTrainer is not run here (not installed on the machines this was written on); compare in a
run where it is.
"""
from __future__ import annotations

import dataclasses
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf import train as T  # noqa: E402
from fastrlhf.config import TrainConfig  # noqa: E402
from fastrlhf.memory import PhaseMemory, out_of_memory_message, plan_memory  # noqa: E402
from fastrlhf.models import ModelConfig  # noqa: E402
from fastrlhf.tokenizer import DEFAULT_CHARS, SPECIAL_TOKENS, CharTokenizer  # noqa: E402


def architectures() -> dict:
    """Public configs of the two target models (config.json of meta-llama/Meta-Llama-3-8B and
    Qwen/Qwen2.5-0.5B), written out so nothing is downloaded."""
    from transformers import LlamaConfig, Qwen2Config

    return {
        "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    }


def wide_tokenizer(vocab_size: int) -> CharTokenizer:
    """A CharTokenizer with exactly `vocab_size` ids (ASCII first, then code points from U+0100 skipping
    surrogates), so every id a random model samples decodes."""
    need = vocab_size - len(SPECIAL_TOKENS) - len(DEFAULT_CHARS)
    extra = (chr(c) for c in range(0x100, 0x110000) if not 0xD800 <= c < 0xE000)
    return CharTokenizer(DEFAULT_CHARS + "".join(next(extra) for _ in range(need)))


def save_random_checkpoint(name: str, directory: Path, device: torch.device) -> None:
    """Random bf16 weights from the architecture config (initialized on `device`: fast on a GPU)."""
    from transformers import AutoModelForCausalLM

    hf_cfg = architectures()[name]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        model.save_pretrained(directory)
    finally:
        torch.set_default_dtype(default)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    wide_tokenizer(hf_cfg.vocab_size).save_pretrained(directory)


def score(prompts, responses):
    """Reward of the benchmark (any cheap deterministic function): share of lowercase ASCII letters."""
    return [sum(c in string.ascii_lowercase for c in r) / max(len(r), 1) for r in responses]


def run_case(name, model_path, algo, *, batch, prompt_len, new_tokens, max_memory_gb, device, workdir) -> dict:
    rng = random.Random(0)
    prompts_file = workdir / "prompts.txt"
    # prompt_len - 1 characters + BOS = prompt_len tokens
    prompts_file.write_text("\n".join("".join(rng.choice(string.ascii_letters) for _ in range(prompt_len - 1))
                                      for _ in range(batch)) + "\n")
    model = ModelConfig(model_name_or_path=model_path, use_peft=True, lora_r=16, lora_alpha=32,
                        load_in_4bit=True, bnb_4bit_quant_type="nf4", gradient_checkpointing=device.type == "cuda",
                        max_memory_gb=max_memory_gb)
    cfg = TrainConfig(algo=algo, model=model, prompts=str(prompts_file), reward=f"{Path(__file__).resolve()}:score",
                      device=device.type, max_steps=1, ppo_epochs=1, num_mini_batches=1, per_device_batch_size=batch,
                      gradient_accumulation_steps=1, max_prompt_length=prompt_len, max_new_tokens=new_tokens,
                      sft_steps=0, eval_samples=0, output_dir=str(workdir / "run")).resolved()
    shape = {"model": name, "algo": algo, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
             "max_memory_gb": max_memory_gb, "quant": "nf4+lora16"}
    mem = PhaseMemory(device)
    phase, out = "loading", {}
    try:
        with mem("load"):
            run = T.setup(cfg)
        bundle = run.bundle
        base_cfg = bundle.policy.get_base_model().config
        plan = plan_memory(base_cfg, batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                           dtype=bundle.dtype, device=device, gradient_checkpointing=model.gradient_checkpointing,
                           lora_dropout=model.lora_dropout > 0)
        print(f"{name}/{algo}: {plan.message}", file=sys.stderr)
        run.cfg = dataclasses.replace(run.cfg, per_device_batch_size=plan.micro_batch,
                                      gradient_accumulation_steps=batch // plan.micro_batch)
        prompts = run.job.task.sample(batch, run.streams.data)
        for phase, fn in (("generation", lambda: T.sample(run, prompts)), ("rollout", lambda: T.rollout(run, prompts))):
            t0 = time.perf_counter()
            with mem(phase):
                out[phase] = fn()
            harness_sync(device)
            out[phase + "_ms"] = (time.perf_counter() - t0) * 1e3
        phase = "update"
        t0 = time.perf_counter()
        with mem("update"):
            T.update(run, out["rollout"])
        harness_sync(device)
        update_ms = (time.perf_counter() - t0) * 1e3
    except torch.cuda.OutOfMemoryError as exc:
        msg = out_of_memory_message(exc, {"load": "loading", "rollout": "scoring"}.get(phase, phase), shape)
        print(msg, file=sys.stderr)
        return harness.result("rlhf_step", "fastrlhf", shape, float("nan"), max(mem.peaks.values(), default=None),
                              oom=msg, **{f"{k}_peak_mib": v for k, v in mem.peaks.items()})
    gen_tokens = int(out["rollout"].response_len.sum().item())
    return harness.result(
        "rlhf_step", "fastrlhf", shape, out["rollout_ms"] + update_ms, max(mem.peaks.values()),
        load_peak_mib=mem.peaks["load"], generation_peak_mib=mem.peaks["generation"],
        rollout_peak_mib=mem.peaks["rollout"], update_peak_mib=mem.peaks["update"],
        generation_ms=out["generation_ms"], rollout_ms=out["rollout_ms"], update_ms=update_ms,
        generated_tokens=gen_tokens,
        plan={"micro_batch": plan.micro_batch, "generation_batch": plan.generation_batch,
              "loss_chunk_size": plan.loss_chunk_size, "free_mib": plan.free_bytes / 2**20})


def harness_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = harness.arg_parser(__doc__)
    p.add_argument("--algos", default="apa,ppo")
    p.add_argument("--models", default="llama-3-8b,qwen2.5-0.5b", help="GPU cases to run (comma-separated)")
    args, device, gpu = harness.start(__doc__, argv, p)
    if gpu and device.type != "cuda":
        p.error("--gpu-sizes needs a CUDA device")
    # (name, max_memory_gb, batch, prompt_len, new_tokens); name None = the built-in tiny Llama
    gpu_cases = {"llama-3-8b": ("llama-3-8b", 16.0, 8, 256, 256), "qwen2.5-0.5b": ("qwen2.5-0.5b", 4.0, 8, 256, 256)}
    if gpu and not set(args.models.split(",")) <= set(gpu_cases):
        p.error(f"--models: expected names from {sorted(gpu_cases)}, got {args.models!r}")
    cases = [gpu_cases[m] for m in args.models.split(",")] if gpu else [(None, None, 4, 16, 8)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        for name, cap, batch, prompt_len, new_tokens in cases:
            path = None
            if name is not None:
                path = tmp / name
                save_random_checkpoint(name, path, device)
                path = str(path)
            for algo in args.algos.split(","):
                results.append(run_case(name or "tiny-llama", path, algo, batch=batch, prompt_len=prompt_len,
                                        new_tokens=new_tokens, max_memory_gb=cap, device=device, workdir=tmp))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    harness.print_table(results, keys=("op", "shape", "ms", "peak_mem_mib", "generation_peak_mib",
                                       "rollout_peak_mib", "update_peak_mib"))
    print(harness.write_results("memory_" + ("gpu" if gpu else "smoke"), results, results_dir=args.results_dir,
                                extra={"size": "gpu" if gpu else "smoke"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
