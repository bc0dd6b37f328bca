"""The training loop: PPO, PPO-max and APA (`fastrlhf train`), and `fastrlhf eval`.

One iteration (`train`, read top to bottom):
    prompts ─ generate (KV-cached; sampling log-probs kept) ─ score ─ no-grad pass: old log-probs,
    entropy, values; reference log-probs ─ per-token rewards (KL shaping) ─ GAE ─ whitening ─
    epochs × micro-batches of policy loss + value loss (grad accumulation, grad-norm clip) ─
    metrics ─ checkpoint.

Sequences are laid out [B, P + n]: left-padded prompt (P) then right-padded response (n). The
hidden state at position P − 1 + t predicts response token t, so every per-token tensor of a
rollout is [B, n], taken from hidden[:, P−1 : P−1+n].
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, hf, metrics, ops
from .algos import AdaptiveKL, RunningMoments, advantages_and_returns, scale_scores, token_rewards
from .config import TrainConfig, parse_args
from .fused_linear import fused_linear_logprobs, fused_linear_policy_loss
from .generation import generate
from .hf import output_layer
from .memory import PhaseMemory, out_of_memory_message, plan_memory
from .models import Bundle, critic_hidden_states, load, values
from .optim import make_optimizer
from .ref import masked_mean
from .rewards import make_reward, scores_tensor
from .tasks import load_prompts, make_task, solve


# ----------------------------------------------------------------------------------------------------
# Model passes. The vocabulary-sized work is in `policy_forward` and `token_logprobs` only (fused
# linear path: hidden states and the output layer's weight, never [B, n, V] logits).
# ----------------------------------------------------------------------------------------------------

def _positions(attn):
    """Position ids as generation counts them: 0.. over the valid tokens (left padding gets 1)."""
    return (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)


def hidden_states(model, input_ids, attn) -> torch.Tensor:
    """Final hidden states [B, T, H] of a causal LM (peft-wrapped or not); no logits computed."""
    return hf.hidden_states(model, input_ids, attn, position_ids=_positions(attn))


def token_logprobs(hidden, weight, bias, labels, temperature, chunk_size=None):
    """hidden [B, n, H], labels [B, n] -> (log-prob [B, n], entropy [B, n]) float32, without [B, n, V]."""
    return fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                 chunk_size=chunk_size)


def policy_forward(hidden, weight, bias, labels, mask, advantages, old_logprobs, ref_logprobs,
                   loss_cfg: ops.LossConfig, chunk_size=None):
    """The policy loss of one micro-batch from hidden states [B, n, H] -> (loss, out dict), on the
    fused linear path (the [B, n, V] logits are never materialized)."""
    return fused_linear_policy_loss(hidden, weight, labels, mask, advantages, old_logprobs, ref_logprobs,
                                    bias=bias, chunk_size=chunk_size, **dataclasses.asdict(loss_cfg))


def nll(model, input_ids, attn, start: int, target_mask) -> torch.Tensor:
    """Mean next-token negative log-likelihood of input_ids[:, start:start+n] where target_mask [B, n]
    is 1 (supervised warm-start, ptx loss)."""
    n = target_mask.shape[1]
    weight, bias = output_layer(model)
    labels = input_ids[:, start:start + n].masked_fill(target_mask == 0, -100)
    lp = fused_linear_logprobs(hidden_states(model, input_ids, attn)[:, start - 1:start - 1 + n], weight, labels,
                               bias=bias)
    return -masked_mean(lp, target_mask)


def value_forward(bundle: Bundle, input_ids, attn, policy_hidden, P: int, n: int) -> torch.Tensor:
    """Values [B, n] for the response positions: the head on the policy trunk, or on the critic."""
    if bundle.critic is not None:
        return values(bundle, critic_hidden_states(bundle, input_ids, attn)[:, P - 1:P - 1 + n])
    return values(bundle, policy_hidden)


# ----------------------------------------------------------------------------------------------------
# State of a run
# ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    bundle: Bundle
    task: object
    reward_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    moments: RunningMoments
    kl_ctl: AdaptiveKL
    data_rng: random.Random           # prompts
    sample_gen: torch.Generator       # token sampling
    shuffle_gen: torch.Generator      # micro-batch order
    ptx_texts: Optional[list] = None
    reference_state: Optional[dict] = None   # the reference's weights when the warm-start changed them
    step: int = 0
    eval_before: Optional[float] = None
    memory: Optional[PhaseMemory] = None     # peak memory per phase of the current step
    micro_batch: int = 1                     # sequences per forward/backward (update, scoring)
    generation_batch: int = 1                # sequences generated at once
    loss_chunk: Optional[int] = None         # tokens per chunk of the fused linear loss (None: auto)

    @property
    def device(self):
        return self.bundle.device

    @property
    def rollout_batch(self) -> int:
        c = self.cfg
        return c.per_device_batch_size * c.gradient_accumulation_steps * c.num_mini_batches

    def numbers(self) -> dict:
        """The settings an out-of-memory message reports."""
        return {"rollout_batch": self.rollout_batch, "micro_batch": self.micro_batch,
                "generation_batch": self.generation_batch, "loss_chunk": self.loss_chunk,
                "max_prompt_length": self.cfg.max_prompt_length, "max_new_tokens": self.cfg.max_new_tokens}

    def generators(self):
        return {"data": self.data_rng, "sample": self.sample_gen, "shuffle": self.shuffle_gen}

    def autocast(self):
        on = self.cfg.bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _schedule(cfg: TrainConfig, total: int):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - frac)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0
    return factor


def setup(cfg: TrainConfig) -> Run:
    device = resolve_device(cfg.device)
    threads = cfg.num_threads or (1 if cfg.model.model_name_or_path is None else None)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    bundle = load(cfg.model, device)
    tok = bundle.tokenizer
    task = make_task(cfg.task, digits=cfg.digits, operators=cfg.operators, prompts_file=cfg.prompts)
    reward_fn = make_reward(cfg.reward, reward_model=cfg.reward_model, reward_label=cfg.reward_label,
                            partial_credit=cfg.partial_credit, device=device, tokenizer=tok)
    policy_params = [p for p in bundle.policy.parameters() if p.requires_grad]
    critic_params = list(bundle.value_head.parameters()) if bundle.value_head is not None else []
    if bundle.critic is not None:
        critic_params += [p for p in bundle.critic.parameters() if p.requires_grad]
    optimizer = make_optimizer(policy_params, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if critic_params:  # second group: value head / critic at its own learning rate
        optimizer.add_param_group({"params": critic_params, "lr": cfg.critic_learning_rate})
    total = cfg.max_steps * cfg.ppo_epochs * cfg.num_mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    run = Run(cfg=cfg, bundle=bundle, task=task, reward_fn=reward_fn, optimizer=optimizer, scheduler=scheduler,
              moments=RunningMoments(), kl_ctl=AdaptiveKL(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None,
                                                          cfg.kl_horizon),
              data_rng=random.Random(cfg.seed), sample_gen=torch.Generator(device).manual_seed(cfg.seed + 1),
              shuffle_gen=torch.Generator().manual_seed(cfg.seed + 2),
              ptx_texts=load_prompts(cfg.ptx_file) if cfg.ptx_file else None, memory=PhaseMemory(device))
    run.micro_batch, run.generation_batch = cfg.per_device_batch_size, run.rollout_batch
    if cfg.model.max_memory_gb is not None and device.type == "cuda":
        # under a memory cap, the planner picks the micro-batch, generation batch and loss chunk
        hf_config = getattr(bundle.policy, "get_base_model", lambda: bundle.policy)().config  # peft or not
        plan = plan_memory(hf_config, batch_size=run.rollout_batch, prompt_len=cfg.max_prompt_length,
                           new_tokens=cfg.max_new_tokens, dtype=bundle.dtype, device=device,
                           gradient_checkpointing=cfg.model.gradient_checkpointing,
                           lora_dropout=cfg.model.use_peft and cfg.model.lora_dropout > 0)
        run.micro_batch = min(plan.micro_batch, cfg.per_device_batch_size)
        run.generation_batch, run.loss_chunk = plan.generation_batch, plan.loss_chunk_size
        print(plan.message, file=sys.stderr)
    return run


@contextlib.contextmanager
def phase(run: Run, name: str):
    """Track the peak memory of a phase; an out-of-memory error in it becomes a clear message
    (the numbers and what to lower) instead of a CUDA traceback."""
    try:
        with run.memory(name):
            yield
    except torch.OutOfMemoryError as exc:
        raise SystemExit("fastrlhf train: " + out_of_memory_message(exc, name, run.numbers())) from None


# ----------------------------------------------------------------------------------------------------
# Rollout: generate, score, no-grad passes, rewards, advantages
# ----------------------------------------------------------------------------------------------------

def encode_prompts(tok, prompts, max_len, device):
    """Left-padded, left-truncated prompt ids and mask [B, P]."""
    rows = [list(tok.encode(p))[-max_len:] for p in prompts]
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, P - len(r):] = 1
    return ids.to(device), attn.to(device)


def sample(run: Run, prompts, *, temperature=None, generator=None):
    """Generate responses -> (input_ids [B, P+n], attn [B, P+n], P, response_mask [B, n], texts,
    sampling log-probs [B, n])."""
    cfg, tok = run.cfg, run.bundle.tokenizer
    ids, attn = encode_prompts(tok, prompts, cfg.max_prompt_length, run.device)
    run.bundle.policy.eval()
    P, gens = ids.shape[1], []
    for s in range(0, len(prompts), run.generation_batch):   # all at once unless a memory plan says otherwise
        with run.autocast():
            gens.append(generate(run.bundle.policy, ids[s:s + run.generation_batch], attn[s:s + run.generation_batch],
                                 max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature if temperature is None else temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id,
                                 generator=run.sample_gen if generator is None else generator))
    n = max(g.response_mask.shape[1] for g in gens)           # right-pad every chunk to the longest response
    seq = torch.cat([F.pad(g.sequences, (0, n - g.response_mask.shape[1]), value=tok.pad_token_id) for g in gens])
    rmask = torch.cat([F.pad(g.response_mask, (0, n - g.response_mask.shape[1])) for g in gens])
    sample_lp = torch.cat([F.pad(g.logprobs, (0, n - g.response_mask.shape[1])) for g in gens])
    full_attn = torch.cat([attn, rmask], dim=1)
    resp = seq[:, P:].masked_fill(rmask == 0, tok.pad_token_id)
    texts = tok.batch_decode(resp.tolist(), skip_special_tokens=True)
    return seq, full_attn, P, rmask, texts, sample_lp


@torch.no_grad()
def scoring_passes(run: Run, seq, attn, P: int, labels):
    """No-grad passes over the rollout, `run.micro_batch` rows at a time -> old log-probs,
    entropy, values (policy / critic) and reference log-probs, each [B, n] float32."""
    bundle, n, mb = run.bundle, labels.shape[1], run.micro_batch
    weight, bias = output_layer(bundle.policy)
    parts = []
    for s in range(0, seq.shape[0], mb):
        ids, am, lab = seq[s:s + mb], attn[s:s + mb], labels[s:s + mb]
        with run.autocast():
            h = hidden_states(bundle.policy, ids, am)[:, P - 1:P - 1 + n]
            lp, ent = token_logprobs(h, weight, bias, lab, run.cfg.temperature, run.loss_chunk)
            v = value_forward(bundle, ids, am, h, P, n).float()
            with bundle.reference() as ref_model:
                ref_w, ref_b = output_layer(ref_model)
                ref_lp, _ = token_logprobs(hidden_states(ref_model, ids, am)[:, P - 1:P - 1 + n], ref_w, ref_b,
                                           lab, run.cfg.temperature, run.loss_chunk)
        parts.append((lp, ent, v, ref_lp))
    return tuple(torch.cat(t) for t in zip(*parts))


@torch.no_grad()
def rollout(run: Run, prompts) -> dict:
    """Steps 2-6 of an iteration: generate, score, no-grad passes, KL-shaped rewards, GAE + whitening.
    Returns the rollout's [B, n] tensors (and [B] scores) keyed by name."""
    cfg = run.cfg
    with phase(run, "generation"):
        seq, attn, P, mask, texts, sample_lp = sample(run, prompts)
    labels = seq[:, P:]
    with phase(run, "scoring"):
        raw = scores_tensor(run.reward_fn(prompts, texts), len(prompts), run.device)
        scores = scale_scores(raw, run.moments, mode=cfg.score_scaling, clip=cfg.score_clip)
        old_lp, entropy, old_values, ref_lp = scoring_passes(run, seq, attn, P, labels)
    beta = run.kl_ctl.value if cfg.kl_in == "reward" else 0.0
    rewards, kl = token_rewards(scores, old_lp, ref_lp, mask, kl_coef=beta, estimator=cfg.kl_estimator)
    adv, returns = advantages_and_returns(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                          whiten=cfg.whiten_advantages, clip=cfg.adv_clip)
    m = mask.float()
    return dict(input_ids=seq, attn=attn, P=P, mask=mask, labels=labels, old_logprobs=old_lp, ref_logprobs=ref_lp,
                old_values=old_values, advantages=adv, returns=returns, raw_scores=raw, scores=scores, texts=texts,
                kl_seq=(kl * m).sum(1), entropy=masked_mean(entropy, m), response_len=m.sum(1),
                # the sampler's log-probs vs the recomputed ones: ~0 unless temperature or masks disagree
                logprob_gap=((old_lp - sample_lp).abs() * m).max())


# ----------------------------------------------------------------------------------------------------
# Update: epochs of micro-batches
# ----------------------------------------------------------------------------------------------------

def loss_config(run: Run) -> ops.LossConfig:
    cfg = run.cfg
    return ops.make_loss_config(
        algo="apa" if cfg.algo == "apa" else "ppo", temperature=cfg.temperature, clip_low=cfg.cliprange,
        clip_high=cfg.cliprange_high, dual_clip=cfg.dual_clip, adv_coeff=cfg.adv_coeff,
        entropy_coef=cfg.entropy_coef, kl_coef=run.kl_ctl.value if cfg.kl_in == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator, batch_entropy_coef=cfg.batch_entropy_coef)


def ptx_loss(run: Run, n: int) -> torch.Tensor:
    """Next-token cross-entropy on `n` texts drawn from --ptx_file (pretraining mix-in)."""
    tok = run.bundle.tokenizer
    texts = [run.ptx_texts[run.data_rng.randrange(len(run.ptx_texts))] for _ in range(n)]
    rows = [list(tok.encode(t))[:run.cfg.max_prompt_length + run.cfg.max_new_tokens] + [tok.eos_token_id]
            for t in texts]
    T = max(map(len, rows))
    ids = torch.full((n, T), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    ids, attn = ids.to(run.device), attn.to(run.device)
    return nll(run.bundle.policy, ids, attn, 1, attn[:, 1:])


def micro_batch_loss(run: Run, roll: dict, idx: torch.Tensor, loss_cfg):
    cfg, bundle, P = run.cfg, run.bundle, roll["P"]
    # Responses are right padded: drop the columns after this micro-batch's longest response (the
    # forward is causal, so the kept positions are unchanged).
    n = max(1, int(roll["mask"][idx].sum(1).max()))
    seq, attn = roll["input_ids"][idx, :P + n], roll["attn"][idx, :P + n]
    mask, labels, adv, old_lp, ref_lp, old_v, returns = (
        roll[k][idx, :n] for k in ("mask", "labels", "advantages", "old_logprobs", "ref_logprobs", "old_values",
                                   "returns"))
    weight, bias = output_layer(bundle.policy)
    with run.autocast():
        h = hidden_states(bundle.policy, seq, attn)[:, P - 1:P - 1 + n]
        pg_loss, out = policy_forward(h, weight, bias, labels, mask, adv, old_lp, ref_lp, loss_cfg, run.loss_chunk)
        v = value_forward(bundle, seq, attn, h, P, n)
        v_loss, v_stats = ops.value_loss(v.float(), old_v, returns, mask.float(), clip=cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * v_loss
        if cfg.ptx_coef > 0:
            loss = loss + cfg.ptx_coef * ptx_loss(run, len(idx))
    return loss, {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "clip_frac": out["clip_frac"],
                  "approx_kl": out["approx_kl"], "value_clip_frac": v_stats["value_clip_frac"]}


def accumulate_gradients(run: Run, roll: dict, mini: torch.Tensor, loss_cfg) -> list:
    """Backward of one mini-batch (rows `mini` of the rollout), micro-batch by micro-batch.

    The loss is the masked mean over all response tokens of the mini-batch: each micro-batch's masked
    mean is weighted by its share of those tokens, so the gradient does not depend on the micro-batch size.
    """
    stats = []
    tokens = roll["mask"][mini].sum().clamp_min(1)
    for idx in mini.split(run.micro_batch):
        loss, s = micro_batch_loss(run, roll, idx, loss_cfg)
        (loss * (roll["mask"][idx].sum() / tokens)).backward()
        stats.append({"loss": loss.detach(), **s})
    return stats


def update(run: Run, roll: dict) -> dict:
    cfg = run.cfg
    B = roll["input_ids"].shape[0]
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps   # sequences per optimizer step
    loss_cfg = loss_config(run)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    stats, grad_norms = [], []
    run.bundle.policy.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=run.shuffle_gen).to(run.device)
        for mini in order.split(per_step):
            run.optimizer.zero_grad(set_to_none=True)
            stats += accumulate_gradients(run, roll, mini, loss_cfg)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            grad_norms.append(norm)
            run.optimizer.step()
            run.scheduler.step()
    out = {k: torch.stack([s[k].float() for s in stats]).mean().item() for k in stats[0]}
    out["grad_norm"] = torch.stack(grad_norms).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------------
# Supervised warm-start (built-in arithmetic job)
# ----------------------------------------------------------------------------------------------------

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
    params = [p for p in bundle.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_learning_rate)
    bundle.policy.train()
    for _ in range(cfg.sft_steps):
        prompts = run.task.sample(cfg.sft_batch_size, rng)
        p_ids, p_attn = encode_prompts(tok, prompts, cfg.max_prompt_length, run.device)
        answers = [list(tok.encode(sft_example(p, rng, cfg.sft_noise), add_special_tokens=False)) + [tok.eos_token_id]
                   for p in prompts]
        n = max(map(len, answers))
        a_ids = torch.full((len(prompts), n), tok.pad_token_id, dtype=torch.long)
        a_mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, a in enumerate(answers):
            a_ids[i, :len(a)], a_mask[i, :len(a)] = torch.tensor(a), 1
        a_ids, a_mask = a_ids.to(run.device), a_mask.to(run.device)
        seq, attn = torch.cat([p_ids, a_ids], 1), torch.cat([p_attn, a_mask], 1)
        P = p_ids.shape[1]
        with run.autocast():
            loss = nll(bundle.policy, seq, attn, P, a_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not bundle.config.use_peft:
        with bundle.reference() as ref_model:
            ref_model.load_state_dict(bundle.policy.state_dict())
            run.reference_state = {k: v.detach().cpu().clone() for k, v in ref_model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(run: Run):
    b = run.bundle
    state = {"step": run.step, "policy": checkpoint.trainable_state(b.policy),
             "value_head": b.value_head.state_dict() if b.value_head is not None else None,
             "critic": checkpoint.trainable_state(b.critic) if b.critic is not None else None,
             "reference": run.reference_state, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "moments": run.moments.state_dict(),
             "kl_ctl": run.kl_ctl.state_dict(), "rng": checkpoint.rng_state(run.generators()),
             "eval_before": run.eval_before}
    return checkpoint.save(run.cfg.output_dir, run.step, state, run.cfg.to_dict(), keep=run.cfg.save_total_limit)


def load_weights(run: Run, state: dict):
    b = run.bundle
    checkpoint.load_trainable_state(b.policy, state["policy"])
    if b.value_head is not None and state["value_head"] is not None:
        b.value_head.load_state_dict(state["value_head"])
    if b.critic is not None:
        checkpoint.load_trainable_state(b.critic, state["critic"])
    if state["reference"] is not None:
        with b.reference() as ref_model:
            ref_model.load_state_dict(state["reference"])
        run.reference_state = state["reference"]


def resume(run: Run, where: str):
    path = checkpoint.latest(run.cfg.output_dir) if where == "latest" else Path(where)
    if path is None:
        raise ValueError(f"resume: no checkpoint in {run.cfg.output_dir!r}")
    state, _ = checkpoint.load(path)
    load_weights(run, state)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.moments.load_state_dict(state["moments"])
    run.kl_ctl.load_state_dict(state["kl_ctl"])
    checkpoint.set_rng_state(state["rng"], run.generators())
    run.step, run.eval_before = state["step"], state["eval_before"]
    return path


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(run: Run, n: int, *, seed: int, prompts=None) -> float:
    """Mean score (unscaled) of greedy responses to `n` held-out prompts. Uses its own generators,
    so evaluating never changes the training run's random streams."""
    prompts = prompts or run.task.sample(n, random.Random(10**6 + seed))  # a stream training never draws
    scores = []
    for s in range(0, len(prompts), 64):
        chunk = prompts[s:s + 64]
        *_, texts, _ = sample(run, chunk, temperature=0.0, generator=torch.Generator(run.device).manual_seed(seed))
        scores += scores_tensor(run.reward_fn(chunk, texts), len(chunk), "cpu").tolist()
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    run = setup(cfg)
    out_dir = Path(cfg.output_dir)
    if cfg.resume:
        path = resume(run, cfg.resume)
        print(f"resumed from {path} (step {run.step})", file=sys.stderr)
    else:
        if cfg.sft_steps:
            warm_start(run)
        if cfg.eval_samples:
            run.eval_before = evaluate(run, cfg.eval_samples, seed=cfg.seed)
    log = metrics.MetricsLogger(out_dir, report_to=cfg.report_to, start_step=run.step)
    batch = run.rollout_batch
    bar = tqdm(range(run.step + 1, cfg.max_steps + 1), initial=run.step, total=cfg.max_steps, desc=cfg.algo,
               dynamic_ncols=True, disable=None)
    for step in bar:
        t0 = time.perf_counter()
        prompts = run.task.sample(batch, run.data_rng)                     # 1. prompts
        roll = rollout(run, prompts)                                       # 2-6. generate … advantages
        with phase(run, "update"):
            stats = update(run, roll)                                      # 7. policy + value updates
        kl = roll["kl_seq"].mean().item()
        run.kl_ctl.update(kl, batch)                                       # 8. adaptive KL
        run.step = step
        dt = time.perf_counter() - t0
        record = {"step": step, "reward_mean": roll["raw_scores"].mean().item(),
                  "reward_std": roll["raw_scores"].std().item() if batch > 1 else 0.0,
                  "score_scaled_mean": roll["scores"].mean().item(), "kl": kl, "kl_coef": run.kl_ctl.value,
                  "entropy": roll["entropy"].item(), "logprob_gap": roll["logprob_gap"].item(), **stats,
                  "response_len": roll["response_len"].mean().item(),
                  "tokens_per_s": roll["response_len"].sum().item() / dt, "step_time_s": dt,
                  "lr": run.scheduler.get_last_lr()[0], "peak_mem_mib": max(run.memory.peaks.values()) or metrics.peak_mem_mib(run.device),
                  **run.memory.metrics()}
        log.log(record)                                                    # 9. metrics
        if step % cfg.logging_steps == 0:
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{kl:.3f}",
                            ent=f"{record['entropy']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
            save_checkpoint(run)                                           # 10. checkpoint
    bar.close()
    log.close()
    metrics.plot(log.records, out_dir / "curves.png")
    summary = metrics.summary(log.records, wall_s=time.perf_counter() - t_start,
                              peak_mib=max([r["peak_mem_mib"] for r in log.records] or [metrics.peak_mem_mib(run.device)]))
    summary["eval_before"] = run.eval_before
    summary["eval_after"] = evaluate(run, cfg.eval_samples, seed=cfg.seed) if cfg.eval_samples else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    line = metrics.format_summary(summary)
    if summary["eval_after"] is not None and summary["eval_before"] is not None:
        line += f" | held-out reward {summary['eval_before']:.3f} -> {summary['eval_after']:.3f}"
    print(line, file=sys.stderr)
    return summary


def _quiet_transformers():
    """The CLI shows one progress bar (ours), not transformers' per-load shard bars."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"fastrlhf train: error: {exc}", file=sys.stderr)
        return 2
    _quiet_transformers()
    train(cfg)
    return 0


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastrlhf eval", description="Score a checkpoint on held-out prompts "
                                "(greedy decoding, the run's reward).")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run's --output_dir (its latest checkpoint)")
    p.add_argument("--eval_samples", type=int, default=None, help="prompts to score [default: the run's]")
    p.add_argument("--prompts", default=None, help="held-out prompt file (text or .jsonl) [default: fresh "
                                                   "prompts from the run's task]")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out draw [default: 1234]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[default: auto]")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = Path(args.checkpoint)
        if not (path / "state.pt").is_file():
            path = checkpoint.latest(path)
            if path is None:
                raise ValueError(f"checkpoint: no checkpoint in {args.checkpoint!r}")
        state, cfg_dict = checkpoint.load(path)
        cfg = TrainConfig.from_dict(cfg_dict)
        cfg = dataclasses.replace(cfg, device=args.device, resume=None, sft_steps=0)
        if args.eval_samples is not None and args.eval_samples < 1:
            raise ValueError(f"eval_samples: expected an int >= 1, got {args.eval_samples}")
        prompts = load_prompts(args.prompts) if args.prompts else None
    except ValueError as exc:
        print(f"fastrlhf eval: error: {exc}", file=sys.stderr)
        return 2
    _quiet_transformers()
    run = setup(cfg)
    load_weights(run, state)
    n = args.eval_samples or cfg.eval_samples
    score = evaluate(run, n, seed=args.seed, prompts=prompts[:n] if prompts else None)
    result = {"checkpoint": str(path), "step": state["step"], "eval_samples": len(prompts[:n]) if prompts else n,
              "reward_mean": score}
    print(json.dumps(result))
    return 0
