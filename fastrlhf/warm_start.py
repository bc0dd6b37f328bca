"""Supervised warm-start of the built-in arithmetic job (`--sft_steps`): next-token cross-entropy on
the answers of fresh problems, some of them near misses, so that RL starts from a policy that is right
part of the time; the reference is then reset to the warm-started policy (KL starts at 0)."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

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


def warm_start(run: Run):
    """`sft_steps` steps of next-token cross-entropy on the answers of fresh arithmetic problems;
    the reference policy is then set to the warm-started weights (KL starts at 0)."""
    cfg, bundle, tok = run.cfg, run.bundle, run.bundle.tokenizer
    rng = random.Random(cfg.seed + 3)
    opt = torch.optim.AdamW(bundle.policy_parameters(), lr=cfg.sft_learning_rate)
    bundle.policy.train()
    for _ in range(cfg.sft_steps):
        prompts = run.job.task.sample(cfg.sft_batch_size, rng)
        p_ids, p_attn = encode_prompts(tok, prompts, cfg.max_prompt_length, run.device)        # [B, P]
        answers = [list(tok.encode(sft_example(p, rng, cfg.sft_noise), add_special_tokens=False)) + [tok.eos_token_id]
                   for p in prompts]
        a_ids, a_mask = pad_rows(answers, tok.pad_token_id, side="right", device=run.device)  # [B, n]
        seq, attn = torch.cat([p_ids, a_ids], 1), torch.cat([p_attn, a_mask], 1)
        with run.autocast():
            loss = nll(bundle.policy, seq, attn, p_ids.shape[1], a_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not bundle.config.use_peft:
        with bundle.reference() as ref_model:
            ref_model.load_state_dict(bundle.policy.state_dict())
            run.reference_state = {k: v.detach().cpu().clone() for k, v in ref_model.state_dict().items()}


__all__ = ["sft_example", "warm_start"]
