"""Supervised warm-start before RL (`--sft_steps`), per task; the reference is then reset to the
warm-started policy, with or without LoRA (`fastrlhf.models.reset_reference`), so the KL starts at 0, and
a `--critic copy` critic to the warm-started trunk.

    arithmetic          next-token cross-entropy on the answers of fresh problems, some of them near misses,
                        so that RL starts from a policy that is right part of the time (fastrlhf's own job)
    padula-arithmetic   Padula & Soemers' SFT (their gpt_math.py; numbers in fastrlhf.padula): the loss on
                        every token of fresh solved chains `[BOS] 3 + 10 + 7 = 13 + 7 = 20 [EOS]`, AdamW with
                        weight decay 0.1 and a cosine schedule over the steps
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from . import distributed, padula
from .models import reset_reference, sync_critic_copy
from .passes import nll
from .sequences import encode_prompts, pad_rows
from .tasks import solve

if TYPE_CHECKING:
    from .train import Run


def sft_example(prompt: str, rng: random.Random, noise: float) -> str:
    """The exact answer, or with probability `noise` a near miss (answer ± 1..3) — "partially
    correct" targets so the warm-started policy is right only part of the time."""
    answer = solve(prompt)
    if rng.random() < noise:
        answer += rng.choice((-3, -2, -1, 1, 2, 3))
    return str(answer)


def _answer_batch(run: Run, rng: random.Random):
    """fastrlhf's arithmetic warm start: (seq, attn [B, P + n], P, target mask [B, n]) of prompts and answers."""
    cfg, tok = run.cfg, run.bundle.tokenizer
    prompts = run.job.task.sample(cfg.sft_batch_size, rng)
    p_ids, p_attn = encode_prompts(tok, prompts, cfg.max_prompt_length, run.device)            # [B, P]
    answers = [list(tok.encode(sft_example(p, rng, cfg.sft_noise), add_special_tokens=False)) + [tok.eos_token_id]
               for p in prompts]
    a_ids, a_mask = pad_rows(answers, tok.pad_token_id, side="right", device=run.device)      # [B, n]
    return torch.cat([p_ids, a_ids], 1), torch.cat([p_attn, a_mask], 1), p_ids.shape[1], a_mask


def _chain_batch(run: Run, rng: random.Random):
    """Padula & Soemers' SFT rows (fastrlhf.padula.sft_batch: left-padded to their 64-token context): the
    target is every token after the first, pads excluded (their DataCollatorForLanguageModeling labels)."""
    rows = padula.sft_batch(run.bundle.tokenizer, padula.sft_examples(rng, run.cfg.sft_batch_size))
    ids, attn = rows["input_ids"].to(run.device), rows["attention_mask"].to(run.device)
    return ids, attn, 1, attn[:, 1:]


def warm_start(run: Run):
    """`sft_steps` optimizer steps of next-token cross-entropy on fresh batches of the task's supervised
    examples (module docstring); the reference policy is then the warm-started policy."""
    cfg, bundle = run.cfg, run.bundle
    rng = random.Random(cfg.seed + 3)
    chains = cfg.task == "padula-arithmetic"
    # weight decay: theirs (0.1) for the chains; torch's AdamW default (0.01) for fastrlhf's own warm start
    opt = torch.optim.AdamW(bundle.policy_parameters(), lr=cfg.sft_learning_rate,
                            weight_decay=padula.SFT_WEIGHT_DECAY if chains else 0.01)
    # their Trainer's cosine schedule (no warmup) over the run's optimizer steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.sft_steps, eta_min=0.0) if chains else None
    bundle.policy.train()
    for _ in range(cfg.sft_steps):
        seq, attn, start, target = (_chain_batch if chains else _answer_batch)(run, rng)
        with run.autocast():   # under --fsdp inside the sharded root's forward (run.parallel)
            loss = distributed.call(run.parallel, nll, bundle.policy, seq, attn, start, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    if cfg.critic == "copy":
        sync_critic_copy(bundle)
    # under --fsdp the shards stay where they are ({}: changed; a checkpoint gathers them whole)
    run.reference_state = distributed.reset_sharded_reference(bundle) if distributed.is_sharded(run.parallel) \
        else reset_reference(bundle)


__all__ = ["sft_example", "warm_start"]
