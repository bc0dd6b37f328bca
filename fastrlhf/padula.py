"""Padula & Soemers (2024) arithmetic: their policy architecture and their supervised warm-start data.

"Reinforcement Learning from Explicitly Programmed Reward Signals" (arXiv 2410.17126); numbers from
`simple_arithmatic/gpt_math.py` of PadLex/Reinforcement-Learning-from-Explicitly-Programmed-Reward-Signals
@ 62d1b28 (the prompts are `fastrlhf.tasks.ChainArithmeticTask`, the tokenizer
`fastrlhf.tokenizer.WordTokenizer`, the reward `fastrlhf.rewards.chain_arithmetic_reward`).

Their warm start (gpt_math.py `__main__`, Hugging Face Trainer), as these constants record:
- SFT_EXAMPLES = 256 solved chains (`DATASET_SIZE = 2**8`, :24); the RL script loads the checkpoint
  trained this way, `Padlex/gpt2-math_64_256_complete` (trl_math.py:71; the 2^17-example name on :69
  is overwritten).
- 1 epoch (`num_train_epochs=1`), batch 8 (the Trainer's default `per_device_train_batch_size`;
  `auto_find_batch_size=True` only lowers it after an out-of-memory error) x `gradient_accumulation_steps=8`
  on one GPU (`CUDA_VISIBLE_DEVICES="1"`): SFT_BATCH_SIZE = 64, so 256 / 64 = 4 optimizer steps.
- AdamW (the Trainer's default: betas (0.9, 0.999), eps 1e-8) at SFT_LEARNING_RATE = 1e-4 with
  `lr_scheduler_type="cosine"` (no warmup: to 0 over the 4 steps), SFT_WEIGHT_DECAY = 0.1, gradient
  norm clipped at 1.0 (the Trainer's default `max_grad_norm`), dropout 0.1 (GPT-2's, train mode).
- Target (`dataset_generator` + `DataCollatorForLanguageModeling(mlm=False)`): the whole solved chain,
  every step, the answer and [EOS] (see `sft_batch`), not only the answer.
"""
from __future__ import annotations

import random
from typing import List, Sequence

import torch

from .tasks import ChainArithmeticTask

# gpt_math.py:23 CONTEXT_SIZE = 64: the SFT rows are left-padded to 64 tokens, the RL queries to 63.
CONTEXT_SIZE = 64
# gpt_math.py:169 vocab_size=len(tokenizer) + 3: 3 output rows with no token (109 for the 106-token vocabulary).
EXTRA_VOCAB_ROWS = 3

GPT2_SIZES = {
    # gpt_math.py:167-178: AutoConfig.from_pretrained("gpt2", vocab_size=len(tokenizer) + 3, n_ctx=64, ...)
    # then GPT2LMHeadModel(config): GPT-2 small, random init. The "gpt2" hub config equals GPT2Config's
    # defaults (gelu_new, dropout 0.1, layer-norm eps 1e-5, init std 0.02, tied embeddings); n_ctx is an
    # attribute GPT-2 no longer reads, so 1024 positions. 85,926,144 parameters at vocab 109.
    "paper": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    # CPU size (fastrlhf's, not the authors'): 418,944 parameters at vocab 109. With the recipe
    # (128 prompts, 4 epochs) `fastrlhf train` took 1.6 s per step on 2 CPU cores (one 20-step run), so
    # 150 steps in about 4 minutes.
    # 64 positions = their CONTEXT_SIZE (the longest SFT row is 31 tokens: [BOS], 28, answer, [EOS]).
    "cpu": dict(n_embd=128, n_layer=2, n_head=4, n_positions=64),
}

SFT_EXAMPLES = 256
SFT_BATCH_SIZE = 64
SFT_EPOCHS = 1
SFT_LEARNING_RATE = 1e-4
SFT_WEIGHT_DECAY = 0.1


def gpt2_config(tokenizer, size: str = "paper", dropout: float = 0.1):
    """The authors' GPT-2 policy as a transformers GPT2Config (random init: `GPT2LMHeadModel(config)`,
    nothing downloaded), vocab_size = len(tokenizer) + 3 and the tokenizer's BOS/EOS/PAD ids.

    `size`: "paper" (theirs) or "cpu" (GPT2_SIZES). `dropout` sets resid/embd/attn dropout: 0.1 is
    GPT-2's and their SFT's; their PPO runs every forward under `model.eval()` (TRL fork
    `trl/trainer/ppo_trainer.py`, batched_forward_pass), which is dropout 0.0 in a train-mode trainer.
    """
    from transformers import GPT2Config

    if size not in GPT2_SIZES:
        raise ValueError(f"size: expected one of {tuple(GPT2_SIZES)}, got {size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
    return GPT2Config(vocab_size=len(tokenizer) + EXTRA_VOCAB_ROWS, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **GPT2_SIZES[size])


def sft_examples(rng: random.Random, n: int = SFT_EXAMPLES) -> List[str]:
    """`n` solved chains (`3 + 10 + 7 = 13 + 7 = 20`), gpt_math.py's dataset_generator texts. Their
    script draws one chain to print first (:156), so `random.Random(0)` with one `solved(1, rng)`
    discarded reproduces their 256 examples in order."""
    return ChainArithmeticTask().solved(n, rng)


def sft_batch(tokenizer, texts: Sequence[str], length: int = CONTEXT_SIZE) -> dict:
    """Tensors [len(texts), length] of their SFT rows: input_ids = [PAD] * k + [BOS] + chain + [EOS]
    (k = length - 2 - chain tokens; gpt_math.py:134-136), attention_mask 0 on the pads, and labels =
    input_ids with -100 on the pads (DataCollatorForLanguageModeling(mlm=False)): the loss is on every
    token of the chain, its [EOS], and its [BOS] (predicted from the last pad position)."""
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    longest = max(map(len, rows), default=0)
    if longest + 2 > length:
        raise ValueError(f"length: expected at least {longest + 2} (the longest chain + [BOS] + [EOS]), got {length}")
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) - 2:] = torch.tensor([tokenizer.bos_token_id] + r + [tokenizer.eos_token_id])
        attn[i, length - len(r) - 2:] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}
