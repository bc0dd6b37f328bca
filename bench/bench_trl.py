"""One GRPO step of TRL's GRPOTrainer, native vs fastrlhf.integrations.trl (README, "Use from TRL"): the
loss forward + backward of one micro-batch (`trainer.compute_loss` then `backward`), generation excluded
(identical in both: TRL's own), on a random Llama built from a config.

    pytest bench/bench_trl.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_trl.py [--size smoke|cpu|gpu]

The micro-batch is built here, as TRL's `_generate_and_score_completions` hands it to the loss: left-padded
prompts [B, P], right-padded completions [B, T] (the last T/8 positions of odd rows padded), one advantage
per sequence, num_items_in_batch = Σ completion mask. TRL's defaults otherwise: loss_type "dapo", β = 0,
one iteration (on-policy: no old log-probs, no reference model), fp32 on the CPU, bf16 weights on CUDA.
Sizes: smoke a 1-layer H=16 model, V=64, B=2, P=4, T=8; cpu the tiny model (H=64, 2 layers, V=1024,
B=8, P=16, T=64) and a larger one (H=512, 4 layers, V=32000, B=4, P=32, T=256); gpu H=896, 4 layers,
V=151936, B=8, P=128, T=1024 (Qwen2.5-0.5B's width and vocabulary, fewer layers).
Impls: trl (trl.GRPOTrainer, TRL's own chunked log-prob head) and fastrlhf (the integration).
Peak memory: the step's gradients (the same in both) plus what it allocates on top; on the CPU buffers
under glibc's mmap threshold (≤ 32 MiB) reuse pages resident from the previous call and do not count.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {
    "smoke": [dict(H=16, L=1, V=64, B=2, P=4, T=8, dtype="float32")],
    "cpu": [dict(H=64, L=2, V=1024, B=8, P=16, T=64, dtype="float32"),
            dict(H=512, L=4, V=32000, B=4, P=32, T=256, dtype="float32")],
    "gpu": [dict(H=896, L=4, V=151936, B=8, P=128, T=1024, dtype="bfloat16")],
}


def make_trainer(impl, H, L, V, B, P, T, dtype, device, out_dir):
    """A GRPOTrainer of `impl` around a random Llama (seeded, so both impls get the same weights)."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    heads = max(2, H // 64)
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=V,
                                   max_position_embeddings=P + T + 8, pad_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).to(device, getattr(torch, dtype))
    args = trl.GRPOConfig(output_dir=out_dir, per_device_train_batch_size=B, num_generations=B,
                          max_completion_length=T, report_to="none", use_cpu=device.type != "cuda",
                          bf16=False, save_strategy="no", logging_steps=1)
    cls = trl.GRPOTrainer
    if impl == "fastrlhf":
        from fastrlhf.integrations.trl import GRPOTrainer as cls
    prompts = datasets.Dataset.from_dict({"prompt": ["a"] * B})
    tok = _tokenizer(transformers, V)
    return cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
               train_dataset=prompts, processing_class=tok)


def _tokenizer(transformers, V):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, V)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def make_inputs(H, L, V, B, P, T, dtype, device):
    """The micro-batch TRL's loss reads (module docstring)."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1::2, : P // 4] = 0                                   # left padding
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1::2, T - T // 8:] = 0                            # right padding
    advantages = torch.randn(B, generator=g)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  num_items_in_batch=completion_mask.sum().float())
    return {k: v.to(device) for k, v in inputs.items()}


def grpo_step(trainer, inputs, keep_grads=False):
    """compute_loss + backward of one micro-batch. The gradients are freed after each call (unless
    keep_grads), so that every call allocates them and the peak-memory figure (a forked child's peak RSS
    over its RSS at the start) counts them: the figure is one step's gradients plus its transient buffers."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1       # set by Trainer's loop, which is not run here

    def step():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        if not keep_grads:
            model.zero_grad(set_to_none=True)
        return loss
    return step


@pytest.mark.parametrize("impl", ["trl", "fastrlhf"])
def test_grpo_step(bench, shape, impl):
    device = bench.device
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(impl, **shape, device=device, out_dir=out)
        fn = grpo_step(trainer, make_inputs(**shape, device=device))
        B, T, H, V = (shape[k] for k in ("B", "T", "H", "V"))
        harness.measure(bench, fn, op="grpo_step", impl=impl, shape=shape, baseline="trl",
                        head_flops=6 * B * T * H * V, loss_type="dapo", beta=0.0)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
