"""Evaluation on held-out prompts: `evaluate` (the training run's score before and after) and
`fastrlhf eval` (`eval_main`: a checkpoint's score)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import TrainConfig, validate
from .rewards import BUILTIN_REWARDS, scores_tensor
from .tasks import load_prompts
from .train import Run, quiet_transformers, response_lengths, reward_source, sample, setup


@torch.no_grad()
def evaluate(run: Run, n: int, *, seed: int, prompts=None) -> float:
    """Mean score (unscaled) of greedy responses to `n` held-out prompts. Uses its own generators,
    so evaluating never changes the training run's random streams."""
    prompts = prompts or run.job.task.sample(n, random.Random(10**6 + seed))  # a stream training never draws
    lengths = response_lengths(run.cfg, len(prompts), random.Random(2 * 10**6 + seed))   # --min_new_tokens
    scores = []
    for s in range(0, len(prompts), 64):
        chunk = prompts[s:s + 64]
        *_, texts, _ = sample(run, chunk, temperature=0.0, generator=torch.Generator(run.device).manual_seed(seed),
                              lengths=None if lengths is None else lengths[s:s + 64])
        scores += scores_tensor(run.job.reward_fn(chunk, texts), len(chunk), "cpu", source=reward_source(run.cfg)).tolist()
    return sum(scores) / len(scores)


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastrlhf eval", description="Score a checkpoint on held-out prompts "
                                "(greedy decoding, the run's reward).")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run's --output_dir (its latest checkpoint)")
    p.add_argument("--eval_samples", type=int, default=None, help="prompts to score [default: the run's]")
    p.add_argument("--prompts", default=None, help="held-out prompt file (text or .jsonl) [default: fresh "
                                                   "prompts from the run's task]")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out draw [default: 1234]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[default: auto]")
    p.add_argument("--reward", default=None, help="reward to score with, as `fastrlhf train --reward` "
                   "[default: the run's, except that a run's reward file or module (code) is imported only "
                   "when named here]")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = Path(args.checkpoint)
        if not (path / "state.pt").is_file():
            path = checkpoint.latest(path)
            if path is None:
                raise ValueError(f"checkpoint: no checkpoint in {args.checkpoint!r}")
        state, cfg_dict = checkpoint.load(path)
        cfg = TrainConfig.from_dict(cfg_dict)
        cfg = dataclasses.replace(cfg, device=args.device, resume=None, sft_steps=0, fsdp=False)   # one process
        if args.reward is not None:
            cfg = dataclasses.replace(cfg, reward=args.reward)
            validate(cfg)
        elif cfg.reward is not None and cfg.reward not in BUILTIN_REWARDS:
            # a checkpoint is data: the code it names runs only when the user asks for it
            raise ValueError(f"reward: the run scored with {cfg.reward!r}, which is code (it would be "
                             f"imported and run); pass --reward {cfg.reward} to run it, or another reward")
        if args.eval_samples is not None and args.eval_samples < 1:
            raise ValueError(f"eval_samples: expected an int >= 1, got {args.eval_samples}")
        prompts = load_prompts(args.prompts) if args.prompts else None
    except ValueError as exc:
        print(f"fastrlhf eval: error: {exc}", file=sys.stderr)
        return 2
    quiet_transformers()
    run = setup(cfg)
    checkpoint.load_weights(run, state)
    n = args.eval_samples or cfg.eval_samples
    score = evaluate(run, n, seed=args.seed, prompts=prompts[:n] if prompts else None)
    result = {"checkpoint": str(path), "step": state["step"], "eval_samples": len(prompts[:n]) if prompts else n,
              "reward_mean": score}
    print(json.dumps(result))
    return 0


__all__ = ["eval_main", "evaluate"]
