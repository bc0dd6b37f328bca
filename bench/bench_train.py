"""End-to-end RL step: time, samples/s, tokens/s and peak memory per algorithm (`fastrlhf train`).

GPU sizes (default when CUDA is present, or --gpu-sizes): a Qwen2.5-0.5B-shaped random-weight model
(hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936; Qwen2Config), bf16, batch 64,
128 prompt + 128 response tokens, 1 PPO epoch. CPU smoke (default without CUDA): a 2-layer, 64-wide
model, batch 4, 16 + 16 tokens. The tokenizer is a CharTokenizer whose alphabet is sized to the
model's vocabulary, so any sampled id decodes; the reward is the response length (no reward-model
cost in the figure). Each algorithm runs `steps` RL steps; step 1 (warm-up, CUDA-graph capture) is
excluded from the median step time.

TRL's PPOTrainer is the baseline to compare with; it is measured only when `trl` imports (it is
not installed in this environment: the result records the skip).

    python bench/bench_train.py [--gpu-sizes] [--steps N] [--algos ppo,ppo-max,apa] [--results-dir DIR]
(results: train_gpu.json or train_smoke.json)

Data parallel (README, "More than one GPU"): `--nproc N` runs each algorithm twice as subprocesses, one
process (`python -m fastrlhf train`) and `torchrun --nproc_per_node N -m fastrlhf train`, with the same
per-process batch, and records samples/s of the whole job (N × batch per step) and the peak memory per
rank (the largest rank's) of each, and the scaling N-process samples/s ÷ one-process samples/s
(results: train_<size>_nproc<N>.json; `--fsdp`: the N-process run shards, train_<size>_nproc<N>_fsdp.json).
On the CPU, every process runs on one thread: the figure is a smoke
test of the launch path, not a scaling measurement (the processes share the machine's cores).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastrlhf import metrics, train  # noqa: E402
from fastrlhf.config import parse_args  # noqa: E402
from fastrlhf.tokenizer import SPECIAL_TOKENS, CharTokenizer  # noqa: E402

GPU = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
           intermediate_size=4864, vocab_size=151936, batch=64, prompt=128, response=128)
CPU = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=1000, batch=4, prompt=16, response=16)


def response_length(prompts, responses):
    """Reward for the benchmark: the response length in characters / 100."""
    return [len(r) / 100 for r in responses]


def _alphabet(n: int) -> str:
    """n distinct printable-ish characters (no surrogates), for a CharTokenizer of vocab n + 4."""
    chars, code = [], 0x21
    while len(chars) < n:
        if not 0xD800 <= code <= 0xDFFF:
            chars.append(chr(code))
        code += 1
    return "".join(chars)


def make_model(directory: Path, s: dict, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = CharTokenizer(chars=_alphabet(s["vocab_size"] - len(SPECIAL_TOKENS)))
    cfg = Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                      num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_key_value_heads"], intermediate_size=s["intermediate_size"],
                      max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(directory)
    tok.save_pretrained(directory)
    rng = random.Random(0)
    lines = ["".join(rng.choice(tok.chars[:90]) for _ in range(s["prompt"] - 1)) for _ in range(256)]
    (directory / "prompts.txt").write_text("\n".join(lines) + "\n")   # P - 1 chars + BOS = P tokens


def train_argv(algo: str, directory: Path, out: Path, s: dict, steps: int) -> list:
    return ["--algo", algo, "--model_name_or_path", str(directory), "--prompts", str(directory / "prompts.txt"),
            "--reward", f"{Path(__file__).resolve()}:response_length", "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_batch_size", str(s["batch"]), "--ppo_epochs", "1",
            "--max_new_tokens", str(s["response"]), "--max_prompt_length", str(s["prompt"]),
            "--eval_samples", "1", "--save_steps", str(steps + 1), "--top_k", "0", "--kl_coef", "0.05"]


def run_algo(algo: str, directory: Path, out: Path, s: dict, steps: int, device: torch.device) -> dict:
    argv = train_argv(algo, directory, out, s, steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train.train(parse_args(argv))
    recs = metrics.read_metrics(out / "metrics.jsonl")
    timed = recs[1:] if len(recs) > 1 else recs
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tokens = statistics.mean(r["response_len"] for r in timed) * s["batch"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        max(r["peak_mem_mib"] for r in recs)
    shape = {k: s[k] for k in ("batch", "prompt", "response", "hidden_size", "num_hidden_layers", "vocab_size")}
    # tokens/s counts prompt + generated tokens per step; response_tokens_per_s only the generated ones
    return harness.result(f"train_step[{algo}]", "fastrlhf", shape, step_s * 1e3, peak,
                          samples_per_s=s["batch"] / step_s, tokens_per_s=(s["batch"] * s["prompt"] + tokens) / step_s,
                          response_tokens_per_s=tokens / step_s, steps_timed=len(timed))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_procs(algo: str, directory: Path, out: Path, s: dict, steps: int, device: torch.device, nproc: int,
              fsdp: bool = False) -> dict:
    """`fastrlhf train` as a subprocess on `nproc` processes (1: no launcher) -> its result: samples/s of the
    job and the peak memory of its largest rank (metrics.jsonl's peak_mem_mib is the max over ranks)."""
    launch = [sys.executable, "-m", "fastrlhf"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(_free_port()), "-m", "fastrlhf"]
    argv = train_argv(algo, directory, out, s, steps) + (["--num_threads", "1"] if device.type == "cpu" else []) \
        + (["--fsdp"] if fsdp else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device.type == "cpu" else dict(os.environ)
    subprocess.run(launch + ["train", *argv], env=env, check=True, stdout=subprocess.DEVNULL)
    recs = metrics.read_metrics(out / "metrics.jsonl")
    timed = recs[1:] if len(recs) > 1 else recs
    step_s = statistics.median(r["step_time_s"] for r in timed)
    shape = {k: s[k] for k in ("batch", "prompt", "response", "hidden_size", "num_hidden_layers", "vocab_size")}
    return harness.result(f"train_step[{algo}]", "fastrlhf", shape, step_s * 1e3,
                          max(r["peak_mem_mib"] for r in recs), nproc=nproc, fsdp=fsdp,
                          samples_per_s=nproc * s["batch"] / step_s, steps_timed=len(timed))


def main_nproc(args, device, big: bool, s: dict, steps: int) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="fastrlhf-bench-train-") as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", s, torch.bfloat16 if device.type == "cuda" else torch.float32)
        for algo in args.algos.split(","):
            one = run_procs(algo, tmp / "model", tmp / f"run-{algo}-1", s, steps, device, 1)
            many = run_procs(algo, tmp / "model", tmp / f"run-{algo}-{args.nproc}", s, steps, device, args.nproc,
                             args.fsdp)
            many["scaling_vs_1"] = many["samples_per_s"] / one["samples_per_s"]
            results += [one, many]
    size = "gpu" if big else "smoke"
    note = (f"{args.nproc} processes on one CUDA machine" if device.type == "cuda" else
            f"CPU smoke figure: {args.nproc} one-thread processes sharing {os.cpu_count()} cores; it checks "
            f"the launch path and says little about scaling")
    path = harness.write_results(f"train_{size}_nproc{args.nproc}{'_fsdp' if args.fsdp else ''}", results, results_dir=args.results_dir,
                                 extra={"size": size, "note": note})
    harness.print_table(results, keys=("op", "nproc", "ms", "peak_mem_mib", "samples_per_s", "scaling_vs_1"))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = harness.arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="RL steps per algorithm [default: 4 GPU, 2 CPU]")
    p.add_argument("--algos", default="ppo,ppo-max,apa", help="comma-separated algorithms [default: all three]")
    p.add_argument("--nproc", type=int, default=None,
                   help="also run on N processes under torchrun, against one process (module docstring)")
    p.add_argument("--fsdp", action="store_true", help="with --nproc: the N-process run shards (--fsdp)")
    args, device, big = harness.start(__doc__, argv, p)
    s = GPU if big else CPU
    steps = args.steps or (4 if big else 2)
    if args.nproc is not None:
        if args.nproc < 2:
            raise SystemExit(f"--nproc: expected an int >= 2, got {args.nproc}")
        return main_nproc(args, device, big, s, steps)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    with tempfile.TemporaryDirectory(prefix="fastrlhf-bench-train-") as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", s, dtype)
        for algo in args.algos.split(","):
            results.append(run_algo(algo, tmp / "model", tmp / f"run-{algo}", s, steps, device))
            gc.collect()
    note = ("trl is not installed: TRL's PPOTrainer was not measured" if importlib.util.find_spec("trl") is None
            else "trl is installed, but this script does not drive TRL's PPOTrainer yet: not measured")
    results.append({"op": "train_step[ppo]", "impl": "trl", "shape": results[0]["shape"], "ms": None,
                    "peak_mem_mib": None, "skipped": note})
    path = harness.write_results("train_" + ("gpu" if big else "smoke"), results, results_dir=args.results_dir,
                                 extra={"size": "gpu" if big else "smoke", "note": note})
    harness.print_table(results, keys=("op", "impl", "ms", "peak_mem_mib", "samples_per_s", "tokens_per_s"))
    print(f"wrote {path}")
    print(json.dumps({"note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
