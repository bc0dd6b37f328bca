"""The training loop of `fastrlhf train`: PPO, PPO-max and APA.

One iteration (`train`, read top to bottom):
    prompts ─ generate (KV-cached; sampling log-probs kept) ─ score ─ no-grad pass: old log-probs,
    entropy, values; reference log-probs ─ per-token rewards (KL shaping) ─ GAE ─ whitening ─
    epochs × micro-batches of policy loss + value loss (grad accumulation, grad-norm clip) ─
    metrics ─ checkpoint.

Sequences are laid out [B, P + n] (README, "Sequence layout"): left-padded prompt (P) then
right-padded response (n). The hidden state at position P − 1 + t predicts response token t, so every
per-token tensor of a rollout is [B, n], taken from hidden[:, P−1 : P−1+n].

Around the loop: the model passes (fastrlhf.passes), the supervised warm-start (fastrlhf.warm_start),
a run's checkpoints (fastrlhf.checkpoint) and held-out evaluation (fastrlhf.evaluate).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from . import checkpoint, distributed, metrics, ops
from .algos import (AdaptiveKL, RunningMoments, advantages_and_returns, normalize_advantages, scale_scores,
                    token_rewards)
from .config import TrainConfig, parse_args
from .distributed import Dist
from .fused_linear import fused_linear_batch_probs, fused_linear_policy_loss
from .generation import draw_lengths, generate, strip_stop
from .hf import output_layer
from .memory import PhaseMemory, out_of_memory_message, plan_memory
from .models import Bundle, copy_critic, freeze_bottom_blocks, load
from .optim import make_optimizer
from .passes import nll, response_logprobs_and_entropy, sequence_hidden_states, value_forward
from .ref import BatchProbs
from .rewards import make_reward, scores_tensor
from .sequences import encode_prompts, pad_rows
from .tasks import load_prompts, make_task
from .warm_start import warm_start


# ----------------------------------------------------------------------------------------------------
# State of a run
# ----------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What the run trains on."""
    task: object                        # .sample(n, rng) -> n prompts
    reward_fn: object                   # (prompts, responses) -> n scores
    ptx_texts: Optional[list] = None    # --ptx_file texts for the pretraining mix-in (None: no ptx loss)


@dataclass
class Optimization:
    """The optimizer (group 0: the policy; group 1: value head / critic) and its learning-rate schedule."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass
class Shaping:
    """The running state of reward shaping (README, "Advantages and rewards")."""
    moments: RunningMoments             # running moments of the raw scores (score scaling)
    kl_ctl: AdaptiveKL                  # the KL coefficient β (adaptive KL)


@dataclass
class RandomStreams:
    """The run's random streams, one per consumer, so that drawing from one never shifts another."""
    data: random.Random                 # prompts, ptx texts
    sample: torch.Generator             # token sampling (on the run's device)
    shuffle: torch.Generator            # micro-batch order (CPU)

    @classmethod
    def seeded(cls, seed: int, device) -> "RandomStreams":
        return cls(data=random.Random(seed), sample=torch.Generator(device).manual_seed(seed + 1),
                   shuffle=torch.Generator().manual_seed(seed + 2))

    def _named(self) -> dict:
        return {"data": self.data, "sample": self.sample, "shuffle": self.shuffle}

    def state(self) -> dict:
        """These streams and the global Python / numpy / torch RNGs, for a checkpoint."""
        return checkpoint.rng_state(self._named())

    def set_state(self, state: dict):
        checkpoint.set_rng_state(state, self._named())


@dataclass
class MemorySizes:
    """How a step's work is cut to fit in memory (picked by `models.plan_memory` under a memory cap)."""
    micro_batch: int                    # sequences per forward/backward (update, scoring)
    generation_batch: int               # sequences generated at once
    loss_chunk: Optional[int] = None    # tokens per chunk of the fused linear loss (None: auto)


@dataclass
class Run:
    cfg: TrainConfig
    bundle: Bundle                      # policy, reference, value head / critic, tokenizer
    job: Job
    optim: Optimization
    shaping: Shaping
    streams: RandomStreams
    sizes: MemorySizes
    memory: PhaseMemory                 # peak memory per phase of the current step
    reference_state: Optional[dict] = None   # the reference's weights when the warm-start changed them
    step: int = 0
    eval_before: Optional[float] = None      # held-out score before the first step
    dist: Dist = dataclasses.field(default_factory=Dist)   # this process's rank (fastrlhf.distributed)
    parallel: Optional[torch.nn.Module] = None             # the DDP wrapper / FSDP root of the models, or None

    @property
    def device(self):
        return self.bundle.device

    def numbers(self) -> dict:
        """The settings an out-of-memory message reports."""
        return {"rollout_batch": rollout_batch(self.cfg), **dataclasses.asdict(self.sizes),
                "max_prompt_length": self.cfg.max_prompt_length, "max_new_tokens": self.cfg.max_new_tokens}

    def autocast(self):
        on = self.cfg.bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def rollout_batch(cfg: TrainConfig) -> int:
    """Sequences per rollout."""
    return cfg.per_device_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches


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


def memory_sizes(cfg: TrainConfig, bundle: Bundle) -> MemorySizes:
    """The micro-batch is per_device_batch_size and the whole rollout is generated at once, unless a
    memory cap on CUDA lets the planner pick the micro-batch, generation batch and loss chunk."""
    if cfg.model.max_memory_gb is None or bundle.device.type != "cuda":
        return MemorySizes(micro_batch=cfg.per_device_batch_size, generation_batch=rollout_batch(cfg))
    hf_config = getattr(bundle.policy, "get_base_model", lambda: bundle.policy)().config  # peft or not
    plan = plan_memory(hf_config, batch_size=rollout_batch(cfg), prompt_len=cfg.max_prompt_length,
                       new_tokens=cfg.max_new_tokens, dtype=bundle.dtype, device=bundle.device,
                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                       lora_dropout=cfg.model.use_peft and cfg.model.lora_dropout > 0)
    print(plan.message, file=sys.stderr)
    return MemorySizes(micro_batch=min(plan.micro_batch, cfg.per_device_batch_size),
                       generation_batch=plan.generation_batch, loss_chunk=plan.loss_chunk_size)


def setup(cfg: TrainConfig, dist: Optional[Dist] = None) -> Run:
    """The run's models, task, reward, optimizer and state; on several processes (`dist`) each rank gets
    its own prompt shard and random streams (fastrlhf.distributed)."""
    dist = dist or Dist()
    device = resolve_device(cfg.device)
    threads = cfg.num_threads or (1 if cfg.model.model_name_or_path is None else None)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    bundle = load(cfg.model, device)
    if cfg.critic == "copy":
        copy_critic(bundle)
    freeze_bottom_blocks(bundle.policy, cfg.num_layers_unfrozen)
    parallel = distributed.shard(dist, bundle) if cfg.fsdp else None     # before the optimizer takes the params
    task = distributed.shard_task(make_task(cfg.task, digits=cfg.digits, operators=cfg.operators,
                                            prompts_file=cfg.prompts), dist)
    reward_fn = make_reward(cfg.reward, reward_model=cfg.reward_model, reward_label=cfg.reward_label,
                            partial_credit=cfg.partial_credit, device=device, tokenizer=bundle.tokenizer,
                            reward_input=cfg.reward_input)
    optimizer = make_optimizer(bundle.policy_parameters(), cfg.optim, lr=cfg.learning_rate,
                               weight_decay=cfg.weight_decay)
    critic_params = bundle.critic_parameters()
    if critic_params:  # second group: value head / critic at its own learning rate
        optimizer.add_param_group({"params": critic_params, "lr": cfg.critic_learning_rate})
    total = cfg.max_steps * cfg.ppo_epochs * cfg.num_mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    return Run(cfg=cfg, bundle=bundle,
               job=Job(task=task, reward_fn=reward_fn, ptx_texts=load_prompts(cfg.ptx_file) if cfg.ptx_file else None),
               optim=Optimization(optimizer=optimizer, scheduler=scheduler),
               shaping=Shaping(moments=distributed.GlobalMoments(dist) if dist.active else RunningMoments(),
                               kl_ctl=AdaptiveKL(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None,
                                                 cfg.kl_horizon)),
               streams=RandomStreams.seeded(distributed.stream_seed(dist, cfg.seed), device),
               sizes=memory_sizes(cfg, bundle), memory=PhaseMemory(device), dist=dist, parallel=parallel)


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

@dataclass
class Rollout:
    """One rollout of B sequences, laid out [B, P + n] (README, "Sequence layout").

    input_ids [B, P+n] int64   left-padded prompt, then the right-padded response
    attn [B, P+n] int64        1 on prompt and response tokens, 0 on padding
    P int                      the prompt width
    mask [B, n] int64          1 on response tokens (right padded: ones then zeros)
    labels [B, n] int64        the response tokens, input_ids[:, P:]
    old_logprobs [B, n] f32    the policy's log-probs of the labels before the update (no-grad pass)
    ref_logprobs [B, n] f32    the reference's
    old_values [B, n] f32      the values before the update
    advantages [B, n] f32      GAE advantages, whitened (and clipped) (README, "Advantages and rewards");
                               with --whiten_scope minibatch not yet: `update` does it per mini-batch
    returns [B, n] f32         value targets R = A + V (A before whitening)
    entropy [B, n] f32         the policy's per-token entropy at the sampling temperature
    raw_scores [B] f32         the reward of each response
    scores [B] f32             the scaled (and clipped) scores the rewards are shaped from
    kl_seq [B] f32             per-sequence KL to the reference: the sum over response tokens
    response_len [B] f32       response tokens per sequence
    logprob_gap [B] f32        max over a sequence's tokens of |old_logprobs − the sampler's log-probs|:
                               ~0 unless temperature or masks disagree
    texts list[str] (B)        the decoded responses
    """
    SEQUENCE_FIELDS: ClassVar[tuple] = ("input_ids", "attn")
    TOKEN_FIELDS: ClassVar[tuple] = ("mask", "labels", "old_logprobs", "ref_logprobs", "old_values", "advantages",
                                     "returns", "entropy")
    ROW_FIELDS: ClassVar[tuple] = ("raw_scores", "scores", "kl_seq", "response_len", "logprob_gap")

    input_ids: torch.Tensor
    attn: torch.Tensor
    P: int
    mask: torch.Tensor
    labels: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl_seq: torch.Tensor
    response_len: torch.Tensor
    logprob_gap: torch.Tensor
    texts: list

    def rows(self, idx: torch.Tensor) -> "Rollout":
        """The rows idx [b] of this rollout, with the columns after their longest response dropped:
        responses are right padded and the forward is causal, so the kept positions are unchanged."""
        n = max(1, int(self.mask[idx].sum(1).max()))
        cut = {**{k: getattr(self, k)[idx, :self.P + n] for k in self.SEQUENCE_FIELDS},
               **{k: getattr(self, k)[idx, :n] for k in self.TOKEN_FIELDS},
               **{k: getattr(self, k)[idx] for k in self.ROW_FIELDS}}
        return Rollout(P=self.P, texts=[self.texts[i] for i in idx.tolist()], **cut)


def response_lengths(cfg: TrainConfig, n: int, rng: random.Random):
    """Per-prompt response-length limits drawn from `rng` with --min_new_tokens (uniform in [min_new_tokens,
    max_new_tokens]), else None (every row may take max_new_tokens; nothing is drawn)."""
    return None if cfg.min_new_tokens is None else draw_lengths(n, cfg.min_new_tokens, cfg.max_new_tokens, rng)


def sample(run: Run, prompts, *, temperature=None, generator=None, lengths=None):
    """Generate responses -> (input_ids [B, P+n], attn [B, P+n], P, response_mask [B, n], texts,
    sampling log-probs [B, n]). `lengths`: B per-row length limits (`response_lengths`) or None. With
    --stop, a response's tokens end at its stop string's last token and its text is cut before it
    (fastrlhf.generation.strip_stop)."""
    cfg, tok = run.cfg, run.bundle.tokenizer
    ids, attn = encode_prompts(tok, prompts, cfg.max_prompt_length, run.device)
    run.bundle.policy.eval()
    P, chunk, gens = ids.shape[1], run.sizes.generation_batch, []
    for s in range(0, len(prompts), chunk):   # all at once unless a memory plan says otherwise
        with run.autocast():
            gens.append(generate(run.bundle.policy, ids[s:s + chunk], attn[s:s + chunk],
                                 max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature if temperature is None else temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id,
                                 generator=run.streams.sample if generator is None else generator,
                                 response_lengths=None if lengths is None else lengths[s:s + chunk],
                                 stop=cfg.stop, tokenizer=tok))
    # every chunk's responses (their valid tokens), right padded to the longest response of all
    responses = [row[:k] for g in gens
                 for row, k in zip(g.sequences[:, P:].tolist(), g.response_mask.sum(1).tolist())]
    resp, rmask = pad_rows(responses, tok.pad_token_id, side="right", device=run.device)
    sample_lp = torch.zeros(rmask.shape, dtype=torch.float32, device=run.device).masked_scatter_(
        rmask.bool(), torch.cat([g.logprobs[g.response_mask.bool()] for g in gens]))   # 0 on padding
    texts = tok.batch_decode(resp.tolist(), skip_special_tokens=True)
    if cfg.stop:
        texts = [strip_stop(t, cfg.stop) for t in texts]
    return torch.cat([ids, resp], dim=1), torch.cat([attn, rmask], dim=1), P, rmask, texts, sample_lp


@torch.no_grad()
def scoring_passes(run: Run, seq, attn, P: int, labels):
    """No-grad passes over the rollout, `run.sizes.micro_batch` rows at a time -> old log-probs,
    entropy, values (policy / critic) and reference log-probs, each [B, n] float32."""
    bundle, n, mb, chunk = run.bundle, labels.shape[1], run.sizes.micro_batch, run.sizes.loss_chunk
    weight, bias = output_layer(bundle.policy)
    parts = []
    for s in range(0, seq.shape[0], mb):
        ids, am, lab = seq[s:s + mb], attn[s:s + mb], labels[s:s + mb]
        with run.autocast():
            h = sequence_hidden_states(bundle.policy, ids, am)[:, P - 1:P - 1 + n]
            lp, ent = response_logprobs_and_entropy(h, weight, bias, lab, run.cfg.temperature, chunk)
            v = value_forward(bundle, ids, am, h, P, n).float()
            with bundle.reference() as ref_model:
                ref_w, ref_b = output_layer(ref_model)
                ref_h = sequence_hidden_states(ref_model, ids, am)[:, P - 1:P - 1 + n]
                ref_lp, _ = response_logprobs_and_entropy(ref_h, ref_w, ref_b, lab, run.cfg.temperature, chunk)
        parts.append((lp, ent, v, ref_lp))
    return tuple(torch.cat(t) for t in zip(*parts))


@torch.no_grad()
def rollout(run: Run, prompts) -> Rollout:
    """Steps 2-6 of an iteration: generate, score, no-grad passes, KL-shaped rewards, GAE + whitening."""
    cfg, shaping = run.cfg, run.shaping
    with phase(run, "generation"):
        seq, attn, P, mask, texts, sample_lp = sample(run, prompts,
                                                      lengths=response_lengths(cfg, len(prompts), run.streams.data))
    labels = seq[:, P:]
    with phase(run, "scoring"):
        raw = scores_tensor(run.job.reward_fn(prompts, texts), len(prompts), run.device,
                            source=reward_source(cfg))
        scores = scale_scores(raw, shaping.moments, mode=cfg.score_scaling, clip=cfg.score_clip)
        old_lp, entropy, old_values, ref_lp = scoring_passes(run, seq, attn, P, labels)
    beta = shaping.kl_ctl.value if cfg.kl_in == "reward" else 0.0
    rewards, kl = token_rewards(scores, old_lp, ref_lp, mask, kl_coef=beta, estimator=cfg.kl_estimator)
    later = per_minibatch_whitening(cfg)   # then `update` whitens and clips each mini-batch's advantages
    adv, returns = advantages_and_returns(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                          whiten=cfg.whiten_advantages and not later,
                                          clip=None if later else cfg.adv_clip, whiten_fn=run.dist.whiten)
    m = mask.float()
    return Rollout(input_ids=seq, attn=attn, P=P, mask=mask, labels=labels, old_logprobs=old_lp, ref_logprobs=ref_lp,
                   old_values=old_values, advantages=adv, returns=returns, entropy=entropy, raw_scores=raw,
                   scores=scores, kl_seq=(kl * m).sum(1), response_len=m.sum(1),
                   logprob_gap=((old_lp - sample_lp).abs() * m).amax(1), texts=texts)


# ----------------------------------------------------------------------------------------------------
# Update: epochs of micro-batches
# ----------------------------------------------------------------------------------------------------

def per_minibatch_whitening(cfg: TrainConfig) -> bool:
    """Whether advantages are whitened (and clipped) per optimizer step's mini-batch, not per rollout. With
    one mini-batch per epoch the two scopes hold the same rows: the rollout is whitened once."""
    return bool(cfg.whiten_advantages) and cfg.whiten_scope == "minibatch" and cfg.num_mini_batches > 1


def minibatch_advantages(cfg: TrainConfig, roll: Rollout, mini: torch.Tensor, whiten_fn=ops.whiten) -> Rollout:
    """`roll` with the advantages of its rows `mini` whitened over those rows' valid tokens together (and
    clipped to ±adv_clip), for --whiten_scope minibatch (README, "Advantages and rewards"); `whiten_fn`: on
    several processes `Dist.whiten`, over every rank's mini-batch."""
    adv = roll.advantages.clone()
    adv[mini] = normalize_advantages(roll.advantages[mini], roll.mask[mini], whiten=True, clip=cfg.adv_clip,
                                     whiten_fn=whiten_fn)
    return dataclasses.replace(roll, advantages=adv)


def loss_config(run: Run) -> ops.LossConfig:
    cfg = run.cfg
    return ops.LossConfig(
        algo="apa" if cfg.algo == "apa" else "ppo", temperature=cfg.temperature, clip_low=cfg.cliprange,
        clip_high=cfg.cliprange_high, dual_clip=cfg.dual_clip, adv_coeff=cfg.adv_coeff,
        entropy_coef=cfg.entropy_coef, kl_coef=run.shaping.kl_ctl.value if cfg.kl_in == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator, batch_entropy_coef=cfg.batch_entropy_coef)


def policy_forward(hidden, weight, bias, labels, mask, advantages, old_logprobs, ref_logprobs,
                   loss_cfg: ops.LossConfig, chunk_size=None, batch_probs=None):
    """The policy loss of one micro-batch from hidden states [B, n, H] -> (loss, out dict), on the
    fused linear path (the [B, n, V] logits are never materialized); batch_probs: the mini-batch's
    batch-entropy statistics (`fused_linear_policy_loss`)."""
    return fused_linear_policy_loss(hidden, weight, labels, mask, advantages, old_logprobs, ref_logprobs,
                                    bias=bias, chunk_size=chunk_size, config=loss_cfg, batch_probs=batch_probs)


def ptx_loss(run: Run, n: int) -> torch.Tensor:
    """Next-token cross-entropy on `n` texts drawn from --ptx_file (pretraining mix-in)."""
    tok, texts = run.bundle.tokenizer, run.job.ptx_texts
    drawn = [texts[run.streams.data.randrange(len(texts))] for _ in range(n)]
    rows = [list(tok.encode(t))[:run.cfg.max_prompt_length + run.cfg.max_new_tokens] + [tok.eos_token_id]
            for t in drawn]
    ids, attn = pad_rows(rows, tok.pad_token_id, side="right", device=run.device)
    return nll(run.bundle.policy, ids, attn, 1, attn[:, 1:])


def micro_batch_loss(run: Run, mb: Rollout, loss_cfg, batch_probs: Optional[BatchProbs] = None):
    """Policy + value (+ ptx) loss of the micro-batch `mb` (rows of the rollout, `Rollout.rows`).

    With batch entropy on, its statistics are `batch_probs` (the mini-batch's, `mini_batch_probs`), else this
    micro-batch's own, from its forward (one GEMM pass): the policy loss then carries this micro-batch's part
    of the mini-batch's H_batch (README, "Batch entropy"). During the first --critic_warmup_steps RL steps
    only the value loss trains: the policy loss is computed without gradient (for its statistics) and the
    shared trunk's hidden states reach the value head detached."""
    cfg, bundle, P, n = run.cfg, run.bundle, mb.P, mb.mask.shape[1]
    critic_only = run.step < cfg.critic_warmup_steps      # run.step: the RL steps completed before this one
    weight, bias = output_layer(bundle.policy)
    with run.autocast():
        with torch.set_grad_enabled(torch.is_grad_enabled() and not critic_only):
            h = sequence_hidden_states(bundle.policy, mb.input_ids, mb.attn)[:, P - 1:P - 1 + n]
            if loss_cfg.batch_entropy_coef and batch_probs is None:
                batch_probs = fused_linear_batch_probs(h, weight, mb.mask, bias=bias, temperature=cfg.temperature,
                                                       positions=cfg.batch_entropy_positions,
                                                       chunk_size=run.sizes.loss_chunk)
            pg_loss, out = policy_forward(h, weight, bias, mb.labels, mb.mask, mb.advantages, mb.old_logprobs,
                                          mb.ref_logprobs, loss_cfg, run.sizes.loss_chunk, batch_probs)
        v = value_forward(bundle, mb.input_ids, mb.attn, h, P, n)
        v_loss, v_stats = ops.value_loss(v.float(), mb.old_values, mb.returns, mb.mask.float(),
                                         clip=cfg.cliprange_value)
        loss = cfg.vf_coef * v_loss if critic_only else pg_loss + cfg.vf_coef * v_loss
        if cfg.ptx_coef > 0 and not critic_only:
            loss = loss + cfg.ptx_coef * ptx_loss(run, mb.input_ids.shape[0])
    stats = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "clip_frac": out["clip_frac"],
             "approx_kl": out["approx_kl"], "value_clip_frac": v_stats["value_clip_frac"]}
    if loss_cfg.batch_entropy_coef:
        stats["batch_entropy"] = out["batch_entropy"]          # the mini-batch's H_batch
    return loss, stats


@torch.no_grad()
def mini_batch_probs(run: Run, roll: Rollout, mini: torch.Tensor) -> Optional[BatchProbs]:
    """The batch-entropy statistics of the mini-batch `mini` (rows of the rollout): a no-grad forward of
    each of its micro-batches at the current weights, summed (README, "Batch entropy"). None when batch
    entropy is off, or when the mini-batch is one micro-batch on one process (its loss forward gives them: no
    extra pass). On several processes the sums are every rank's (`Dist.batch_probs`). The forward runs in
    the update's mode, as the loss's does (dropout, where a model has it, draws anew)."""
    cfg = run.cfg
    if not cfg.batch_entropy_coef or (len(mini) <= run.sizes.micro_batch and not run.dist.active):
        return None
    return run.dist.batch_probs(distributed.gathered(run.parallel, _batch_probs, run, roll, mini))


def _batch_probs(run: Run, roll: Rollout, mini: torch.Tensor) -> BatchProbs:
    cfg = run.cfg
    weight, bias = output_layer(run.bundle.policy)
    total = None
    for idx in mini.split(run.sizes.micro_batch):
        mb = roll.rows(idx)
        n = mb.mask.shape[1]
        with run.autocast():
            h = sequence_hidden_states(run.bundle.policy, mb.input_ids, mb.attn)[:, mb.P - 1:mb.P - 1 + n]
            part = fused_linear_batch_probs(h, weight, mb.mask, bias=bias, temperature=cfg.temperature,
                                            positions=cfg.batch_entropy_positions, chunk_size=run.sizes.loss_chunk)
        total = part if total is None else total + part
    return total


def accumulate_gradients(run: Run, roll: Rollout, mini: torch.Tensor, loss_cfg) -> list:
    """Backward of one mini-batch (rows `mini` of the rollout), micro-batch by micro-batch.

    The loss is the masked mean over all response tokens of the mini-batch (on several processes, of every
    rank's mini-batch: `Dist.loss_tokens`): each micro-batch's masked mean is weighted by its share of
    those tokens, so the gradient does not depend on the micro-batch size or the number of processes.
    Batch entropy is the mini-batch's H_batch, whatever the micro-batch size (on several processes, the
    mini-batch of every rank: `mini_batch_probs` sums the statistics over the ranks): with several
    micro-batches, `mini_batch_probs` gives the mini-batch's p̄ first, and each micro-batch's loss carries its
    part of H_batch (the parts add up to it and their gradients are exact), which enters with weight 1: its
    coefficient is divided by the token share that the whole micro-batch loss is multiplied by (and
    multiplied by the number of processes, whose gradients DDP averages).
    """
    stats = []
    dist = run.dist
    tokens = dist.loss_tokens(roll.mask[mini].sum()).clamp_min(1)
    batch_probs = mini_batch_probs(run, roll, mini)
    micro = mini.split(run.sizes.micro_batch)
    for i, idx in enumerate(micro):
        share = roll.mask[idx].sum() / tokens
        cfg_mb = loss_cfg
        if batch_probs is not None and bool(share > 0):   # a share of 0: no valid row, no part of H_batch
            coef = loss_cfg.batch_entropy_coef * dist.world_size if dist.active else loss_cfg.batch_entropy_coef
            cfg_mb = dataclasses.replace(loss_cfg, batch_entropy_coef=coef / share.item())
        with distributed.no_sync(run.parallel, last=i == len(micro) - 1):   # DDP averages at the last one
            loss, s = distributed.call(run.parallel, micro_batch_loss, run, roll.rows(idx), cfg_mb, batch_probs)
            (loss * share).backward()
        stats.append({"loss": loss.detach(), **s})
    return stats


def update(run: Run, roll: Rollout) -> dict:
    cfg, opt = run.cfg, run.optim
    B = roll.input_ids.shape[0]
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps   # sequences per optimizer step
    loss_cfg = loss_config(run)
    params = [p for g in opt.optimizer.param_groups for p in g["params"]]
    stats, grad_norms = [], []
    run.bundle.policy.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=run.streams.shuffle).to(run.device)
        for mini in order.split(per_step):
            opt.optimizer.zero_grad(set_to_none=True)
            batch = minibatch_advantages(cfg, roll, mini, run.dist.whiten) if per_minibatch_whitening(cfg) else roll
            step_stats = accumulate_gradients(run, batch, mini, loss_cfg)
            stats += step_stats
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            if not bool(torch.isfinite(norm)):   # one host read per optimizer step; the weights are not updated
                losses = torch.stack([s["loss"].float() for s in step_stats])
                what = "gradient norm" if bool(torch.isfinite(losses).all()) else "loss"
                raise FloatingPointError(f"non-finite {what} (micro-batch losses {losses.tolist()}, gradient norm "
                                         f"{norm.item()}); stopped before the optimizer step")
            grad_norms.append(norm)
            opt.optimizer.step()
            opt.scheduler.step()
    out = {k: torch.stack([s[k].float() for s in stats]).mean().item() for k in stats[0]}
    out["grad_norm"] = torch.stack(grad_norms).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, dist: Optional[Dist] = None) -> dict:
    """The run; on several processes (`dist`, fastrlhf.distributed.session) rank 0 writes its files and
    every rank returns the summary."""
    from tqdm.auto import tqdm

    from .evaluate import evaluate  # here, not at the top: fastrlhf.evaluate builds on this module

    t_start = time.perf_counter()
    run = setup(cfg, dist)
    dist, main = run.dist, run.dist.is_main
    out_dir = Path(cfg.output_dir)
    if main:
        if cfg.overwrite_output_dir:
            checkpoint.remove_run(out_dir)                             # the previous run's files
        checkpoint.clean_partial(out_dir)                              # what a killed save left behind
    dist.barrier()
    if cfg.resume:
        path = checkpoint.resume(run, cfg.resume)
        if main:
            print(f"resumed from {path} (step {run.step})", file=sys.stderr)
    else:
        if cfg.sft_steps:
            warm_start(run)       # identical on every rank (its stream is seeded by --seed alone)
        if cfg.eval_samples:
            run.eval_before = distributed.gathered(run.parallel, evaluate, run, cfg.eval_samples, seed=cfg.seed)
    if run.parallel is None:                                           # --fsdp: sharded in setup
        run.parallel = distributed.wrap(dist, run.bundle,              # None on one process
                                        find_unused_parameters=cfg.critic_warmup_steps > 0)
    log = metrics.MetricsLogger(out_dir, report_to=cfg.report_to, start_step=run.step) if main else None
    samples = metrics.SampleLogger(out_dir, cfg.log_samples, start_step=run.step) if main else None
    batch = rollout_batch(cfg)
    bar = tqdm(range(run.step + 1, cfg.max_steps + 1), initial=run.step, total=cfg.max_steps, desc=cfg.algo,
               dynamic_ncols=True, disable=None if main else True)
    saved_step, saved_at = run.step, time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        try:
            before = rollout_state(run)
            prompts = run.job.task.sample(batch, run.streams.data)         # 1. prompts
            roll = distributed.gathered(run.parallel, rollout, run, prompts)   # 2-6. generate … advantages
            snapshot = None if run.step in (0, saved_step) or dist.active else update_snapshot(run)
        except BaseException:   # a reward function that raises, Ctrl-C, ...: keep the last completed step
            save_last_step(run, before, saved_step)
            raise
        with phase(run, "update"):
            try:
                stats = update(run, roll)                                  # 7. policy + value updates
            except BaseException as exc:   # non-finite loss, Ctrl-C, out of memory, ...: the same
                save_last_step(run, before, saved_step, snapshot)
                if isinstance(exc, FloatingPointError):
                    raise SystemExit(f"fastrlhf train: step {step}: {exc}") from None
                raise
        # every rank's rows (one process: this one's), for the statistics below
        raw, scaled, kl_seq, response_len, gap = (dist.cat(t) for t in (roll.raw_scores, roll.scores, roll.kl_seq,
                                                                          roll.response_len, roll.logprob_gap))
        kl = kl_seq.mean().item()
        n_seq = raw.shape[0]
        run.shaping.kl_ctl.update(kl, n_seq)                               # 8. adaptive KL
        run.step = step
        dt = time.perf_counter() - t0
        all_prompts, all_texts = dist.objects(prompts), dist.objects(roll.texts)
        memory = dist.maximum({"peak_mem_mib": max(run.memory.peaks.values()) or metrics.peak_mem_mib(run.device),
                               **run.memory.metrics()})
        record = {"step": step, "reward_mean": raw.mean().item(),
                  "reward_std": raw.std().item() if n_seq > 1 else 0.0,
                  "score_scaled_mean": scaled.mean().item(), "kl": kl, "kl_coef": run.shaping.kl_ctl.value,
                  "entropy": dist.masked_mean(roll.entropy, roll.mask.float()).item(),
                  "logprob_gap": gap.max().item(), **dist.average(stats),
                  "response_len": response_len.mean().item(),
                  "tokens_per_s": response_len.sum().item() / dt, "step_time_s": dt,
                  "lr": run.optim.scheduler.get_last_lr()[0],
                  "peak_mem_mib": memory.pop("peak_mem_mib"), **memory,
                  **task_metrics(run, all_prompts, all_texts)}
        if dist.active:
            record["world_size"] = dist.world_size
        if main:
            log.log(record)                                                # 9. metrics
            samples.log(step, all_prompts, all_texts, raw.tolist())
        if step % cfg.logging_steps == 0:
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{kl:.3f}",
                            ent=f"{record['entropy']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
        due = (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps or (
            cfg.save_minutes and dist.maximum({"t": time.perf_counter() - saved_at})["t"] >= 60 * cfg.save_minutes)
        if due:
            checkpoint.save_run(run)                                       # 10. checkpoint
            saved_step, saved_at = step, time.perf_counter()
    bar.close()
    if main:
        log.close()
        metrics.plot(log.records, out_dir / "curves.png")
        summary = metrics.summary(log.records, wall_s=time.perf_counter() - t_start,
                                  peak_mib=max([r["peak_mem_mib"] for r in log.records]
                                               or [metrics.peak_mem_mib(run.device)]))
    eval_after = distributed.gathered(run.parallel, evaluate, run, cfg.eval_samples, seed=cfg.seed) \
        if cfg.eval_samples else None                                  # every rank
    if not main:
        return {}
    summary["eval_before"] = run.eval_before
    summary["eval_after"] = eval_after
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    line = metrics.format_summary(summary)
    if summary["eval_after"] is not None and summary["eval_before"] is not None:
        line += f" | held-out reward {summary['eval_before']:.3f} -> {summary['eval_after']:.3f}"
    print(line, file=sys.stderr)
    return summary


def task_metrics(run: Run, prompts, texts) -> dict:
    """The task's own statistics of a rollout's responses (`answer_metrics`, e.g. ChainArithmeticTask's exact
    rate and answer diversity), or none."""
    fn = getattr(run.job.task, "answer_metrics", None)
    return fn(prompts, texts) if fn is not None else {}


def reward_source(cfg: TrainConfig) -> str:
    """How error messages name the run's reward."""
    return f"reward {cfg.reward}" if cfg.reward else f"reward_model {cfg.reward_model}"


def rollout_state(run: Run) -> tuple:
    """What a rollout changes before the update: the random streams and the reward-scaling moments."""
    return run.streams.state(), run.shaping.moments.state_dict()


def update_snapshot(run: Run) -> dict:
    """A host copy of what an update changes: the trainable weights (policy, value head, critic), the
    optimizer state and the schedule, as `save_run` stores them. An update is several optimizer steps
    (epochs × mini-batches), so an error inside it leaves the model between two RL steps; this copy puts
    the last completed step back (`save_last_step`). Cost: one host copy of the trainable parameters and
    their optimizer moments per RL step (3 × the trainable bytes under AdamW; small under LoRA), taken only
    while that step has no checkpoint."""
    b = run.bundle
    return {"policy": checkpoint.trainable_state(b.policy), "value_head": _host_copy(b.value_head.state_dict()),
            "critic": checkpoint.trainable_state(b.critic) if b.critic is not None else None,
            "reference": None,   # an update never changes the reference
            "optimizer": _host_copy(run.optim.optimizer.state_dict()),
            "scheduler": copy.deepcopy(run.optim.scheduler.state_dict())}


def _host_copy(x):
    """A copy of nested dicts / lists / tuples with every tensor cloned to the host."""
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host_copy(v) for v in x)
    return x.detach().cpu().clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x)


def save_last_step(run: Run, before: tuple, saved_step: int, snapshot: Optional[dict] = None):
    """Checkpoint the last completed RL step after an error in the next one, so that `--resume` loses
    nothing: put back the random streams and reward-scaling moments the failed rollout advanced (`before`,
    `rollout_state`) and, for an error in the update, the weights, optimizer and schedule from the
    `update_snapshot` taken before it (the KL controller moves only after a completed update). Nothing is
    written when no RL step has completed or the last one is saved already, nor on several processes (a
    checkpoint gathers every rank's random streams, and the rank that failed cannot join: the last
    checkpoint is the one to resume from)."""
    if run.step == 0 or run.step == saved_step or run.dist.active:
        return
    run.optim.optimizer.zero_grad(set_to_none=True)   # frees the gradients (after an out-of-memory error)
    if snapshot is not None:
        checkpoint.load_weights(run, snapshot)
        run.optim.optimizer.load_state_dict(snapshot["optimizer"])
        run.optim.scheduler.load_state_dict(snapshot["scheduler"])
    run.streams.set_state(before[0])
    run.shaping.moments.load_state_dict(before[1])
    path = checkpoint.save_run(run)
    print(f"fastrlhf train: error during step {run.step + 1}; saved {path} (step {run.step}) to resume from",
          file=sys.stderr)


def quiet_transformers():
    """The CLI shows one progress bar (ours), not transformers' per-load shard bars."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"fastrlhf train: error: {exc}", file=sys.stderr)
        return 2
    quiet_transformers()
    with distributed.session(cfg.dist_timeout_s, cfg.device) as dist:   # one process: nothing to join
        train(cfg, dist)
    return 0
