"""Data-parallel training on several processes through torch.distributed (README, "More than one GPU").

`torchrun --nproc_per_node N -m fastrlhf train ...` starts N processes; each reads RANK, WORLD_SIZE and
LOCAL_RANK from the environment (`session`). Without a launcher (or with WORLD_SIZE=1) nothing here
communicates and every function below is the single-process computation itself.

Each rank draws its own rollout (`per_device_batch_size` rows per micro-batch, as in Hugging Face: per
rank) from its own random streams (`stream_seed`) and its own shard of a prompt list (`shard_task`). The
weights are replicated and their gradients averaged by `DistributedDataParallel` (`wrap`). Everything
that is a statistic of the batch is taken over every rank's rows (`Dist`):

    reward-scaling moments    GlobalMoments: N = Σ_r n_r, μ = Σ x / N, σ² = Σ (x − μ)² / N
    advantage whitening       Dist.whiten: the masked mean and variance of README "Advantages and
                              rewards" 4. with the sums taken over every rank's tokens
    loss token normalizer     Dist.sum of the mini-batch's response tokens (the loss is their mean)
    batch entropy p̄           Dist.batch_probs: the mini-batch pre-pass's sums Σ m·p, Σ m over every rank
    adaptive KL input         the mean over every rank's sequences (Dist.cat)
    logged metrics            Dist.cat / Dist.average / Dist.maximum / Dist.objects

`--fsdp` shards instead of replicating (`shard`): FSDP2's `fully_shard` on every transformer block of the
policy, the frozen reference and the critic, then on one root over all of them, so each rank holds 1/N of
the weights, gradients and optimizer state between uses. Every pass then runs inside the root's forward
(`call`, `gathered`), which gathers what the blocks' own forwards do not; checkpoints go through
torch.distributed.checkpoint's full state dicts (`full_state`, `load_full_state`), the same layout a
one-process checkpoint has.

One collective timeout (`--dist_timeout_s`) bounds every wait; an exception on one rank is printed with
its rank and tears the process group down (`session`), so the other ranks fail at their next collective
and the launcher ends the job with a non-zero status instead of hanging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from .algos import RunningMoments
from .ref import masked_mean
from .tasks import PromptListTask

# Rank r's random streams start at seed + STREAM_OFFSET * r (rank 0: the single-process seed). The offset
# keeps a rank's three streams (seed, seed + 1, seed + 2: train.RandomStreams) and the warm start's
# (seed + 3) apart from every other rank's.
STREAM_OFFSET = 1000


@dataclass
class Dist:
    """This process's place in the job: rank in [0, world_size). world_size 1: one process, no
    process group; every method then returns its input's single-process value."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files (metrics.jsonl, samples.jsonl, the PNG, the summary, checkpoints)."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of t (any shape, the same on every rank)."""
        if not self.active:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t [B, ...] (the same shape on every rank) concatenated along dim 0, rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def objects(self, items: list) -> list:
        """Every rank's list (picklable items) concatenated, rank order."""
        if not self.active:
            return items
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, items)
        return [x for p in parts for x in p]

    def _reduce_values(self, values: dict, op) -> dict:
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return dict(zip(values, t.tolist()))

    def average(self, values: dict) -> dict:
        """{name: the mean over ranks of the float value}."""
        if not self.active:
            return values
        return {k: v / self.world_size for k, v in self._reduce_values(values, torch.distributed.ReduceOp.SUM).items()}

    def maximum(self, values: dict) -> dict:
        """{name: the max over ranks of the float value}."""
        if not self.active:
            return values
        return self._reduce_values(values, torch.distributed.ReduceOp.MAX)

    @property
    def device(self) -> torch.device:
        """Where the statistics' collectives run: the rank's GPU under NCCL, else the CPU (gloo)."""
        backend = torch.distributed.get_backend() if self.active else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ_{m=1} x / max(Σ m, 1) over every rank's positions (ref.masked_mean on one process)."""
        if not self.active:
            return masked_mean(x, mask)
        keep = mask.bool()
        s = self.sum(torch.stack([torch.where(keep, x.double(), 0.0).sum(), keep.sum().double()]))
        return (s[0] / s[1].clamp_min(1)).to(x.dtype)

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
        """Masked whitening (README "Advantages and rewards" 4.: ref.whiten) with N, μ and σ² over every
        rank's valid tokens: N = Σ_r Σ m, μ = Σ_r Σ m·x / max(N, 1), σ² = Σ_r Σ m·(x − μ)² / max(N − 1, 1)
        (1 when N ≤ 1). The sums travel in float64; x [B, T], mask [B, T] 0/1; masked positions come out 0."""
        if not self.active:
            return ops.whiten(x, mask)
        keep = mask.bool()
        xf = torch.where(keep, x.float(), 0.0)
        s = self.sum(torch.stack([xf.double().sum(), keep.sum().double()]))
        n = s[1]
        mean = (s[0] / n.clamp_min(1)).float()
        ss = self.sum(torch.where(keep, xf - mean, 0.0).double().pow(2).sum())
        var = torch.where(n > 1, ss / (n - 1).clamp_min(1), torch.ones_like(ss)).float()
        return torch.where(keep, (xf - mean) * torch.rsqrt(var + eps), 0.0).to(x.dtype)

    def loss_tokens(self, count: torch.Tensor) -> torch.Tensor:
        """The token count a rank divides its share of a mini-batch's loss by, so that DDP's gradient
        average (1/world_size · Σ_r) is the gradient of the mean over every rank's tokens:
        Σ_r (count_r / W) · mean_r / world_size = Σ_r count_r · mean_r / Σ_r count_r with W = Σ_r count_r /
        world_size. One process: count itself."""
        if not self.active:
            return count
        return (self.sum(count.double()) / self.world_size).float()

    def batch_probs(self, probs):
        """Batch-entropy statistics (ref.BatchProbs: sums over rows) summed over every rank's rows, so p̄ is
        the global mini-batch's (README, "Batch entropy"); a rank with fewer positions G has zeros past them."""
        if not self.active:
            return probs
        G = int(self.maximum({"G": probs.count.shape[0]})["G"])
        pad = G - probs.count.shape[0]
        p = torch.nn.functional.pad(probs.probs, (0, 0, 0, pad))
        c = torch.nn.functional.pad(probs.count, (0, pad))
        return dataclasses.replace(probs, probs=self.sum(p), count=self.sum(c))

    def barrier(self):
        if self.active:
            torch.distributed.barrier()


class GlobalMoments(RunningMoments):
    """RunningMoments (Chan et al.'s parallel update) fed with every rank's scores: each update merges the
    batch of all ranks, N = Σ_r n_r, μ = Σ x / N, σ² = Σ (x − μ)² / N (population), so every rank holds
    the same moments."""

    def __init__(self, dist: Dist):
        super().__init__()
        self.dist = dist

    def update(self, x: torch.Tensor):
        x = x.detach().double().flatten()
        s = self.dist.sum(torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                             device=x.device)]))
        n = int(s[1].item())
        if n == 0:
            return
        mean = s[0] / n
        var = self.dist.sum((x - mean).pow(2).sum()) / n
        self.merge(n, mean.item(), var.item())


def stream_seed(dist: Dist, seed: int) -> int:
    """The seed of rank `dist.rank`'s random streams (STREAM_OFFSET)."""
    return seed + STREAM_OFFSET * dist.rank


def shard_task(task, dist: Dist):
    """A prompt list's disjoint shard for this rank (prompts[rank::world_size]); a task that generates its
    prompts is returned as it is (each rank draws from its own stream, `stream_seed`)."""
    if not dist.active or not isinstance(task, PromptListTask):
        return task
    shard = list(task.prompts[dist.rank::dist.world_size])
    if not shard:
        raise ValueError(f"prompts: {len(task.prompts)} prompt(s) for {dist.world_size} processes; expected at "
                         f"least one per process")
    return dataclasses.replace(task, prompts=shard)


class Trainable(nn.Module):
    """The trained modules under one root (policy; value head; the separate critic when there is one; under
    --fsdp the frozen reference copy too), so that DDP averages all their gradients and FSDP shards them all.
    forward(fn, *args, **kwargs) runs fn(*args, **kwargs): the trainer's own passes, which read the modules
    directly (hidden states, the output layer's weight on the fused linear path, the value head), run
    inside the wrapper's forward."""

    def __init__(self, policy: nn.Module, value_head: nn.Module, critic: Optional[nn.Module],
                 reference: Optional[nn.Module] = None):
        super().__init__()
        self.policy, self.value_head, self.critic, self.reference = policy, value_head, critic, reference

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def _blocks(model: nn.Module) -> list:
    """The transformer blocks of a Hugging Face model (peft-wrapped or not): the modules whose class the
    model lists in `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"fsdp: {type(base).__name__} names no transformer block class in _no_split_modules "
                         f"({sorted(names)}); fully_shard needs one per block")
    return blocks


def shard(dist: Dist, bundle) -> nn.Module:
    """--fsdp: FSDP2 fully_shard on every transformer block of the policy, the frozen reference (without
    LoRA) and the critic, then on a Trainable root holding them (embeddings, output layer, value head and
    what else is left). The bundle's modules are sharded in place: build the optimizer afterwards, from the
    sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    if not dist.active:
        raise ValueError("fsdp: expected several processes (torchrun --nproc_per_node N -m fastrlhf train "
                         "--fsdp ...), got one")
    reference = None
    if not bundle.config.use_peft:
        with bundle.reference() as reference:
            pass
    root = Trainable(bundle.policy, bundle.value_head, bundle.critic, reference)
    for model in (bundle.policy, reference, bundle.critic):
        if model is not None:
            for block in _blocks(model):
                fully_shard(block)
    return fully_shard(root)


def is_sharded(model: Optional[nn.Module]) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered(model: Optional[nn.Module], fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) where it may read every weight: inside the FSDP root's forward under --fsdp (the
    rollout's no-grad passes, generation, evaluation), else directly (DDP's replicas are whole)."""
    return model(fn, *args, **kwargs) if is_sharded(model) else fn(*args, **kwargs)


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def reset_sharded_reference(bundle) -> dict:
    """--fsdp: the frozen reference copy takes the (warm-started) policy's weights, shard for shard (the same
    blocks on the same mesh), as models.reset_reference does whole; returns {} (the reference changed: a
    checkpoint gathers it, `full_state`). Not with LoRA, whose reference would be a second adapter added to
    the sharded model (config.validate refuses --fsdp --use_peft with a warm start)."""
    with bundle.reference() as ref_model:
        ref_model.load_state_dict(bundle.policy.state_dict())
    return {}


def full_state(run) -> dict:
    """--fsdp: the whole trainable weights, the reference (when the warm start changed it) and the optimizer
    state as `checkpoint.save_run` stores them on one process, gathered to rank 0's host
    (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload); the other ranks get {}.
    Every rank must call it. The optimizer state is keyed by parameter name (get_optimizer_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root, b = run.parallel, run.bundle
    model = get_model_state_dict(root, options=_full_options(cpu_offload=True))
    optim = get_optimizer_state_dict(root, run.optim.optimizer, options=_full_options(cpu_offload=True))
    if not run.dist.is_main:
        return {}

    def part(prefix: str, module: Optional[nn.Module], trainable_only: bool = True):
        if module is None:
            return None
        names = [n for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        return {n: model[f"{prefix}.{n}"] for n in names}

    return {"policy": part("policy", b.policy), "value_head": part("value_head", b.value_head),
            "critic": part("critic", b.critic),
            "reference": part("reference", root.reference, False) if run.reference_state is not None else None,
            "optimizer": optim}


def load_full_state(run, state: dict):
    """--fsdp: load a `full_state` (or one-process `save_run`) state's weights, and its optimizer state when
    it is keyed by name, into the sharded modules; every rank loads its own shards from the whole tensors."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = {f"{prefix}.{k}": v for prefix in ("policy", "value_head", "critic", "reference")
             for k, v in (state.get(prefix) or {}).items()}
    set_model_state_dict(run.parallel, model, options=_full_options(strict=False))
    if "optimizer" in state:
        set_optimizer_state_dict(run.parallel, run.optim.optimizer, state["optimizer"], options=_full_options())


def wrap(dist: Dist, bundle, find_unused_parameters: bool = False) -> Optional[nn.Module]:
    """DistributedDataParallel over the bundle's trained modules (Trainable), or None on one process.
    Construction broadcasts rank 0's parameters, so every rank starts the update from the same weights.
    Only parameters with requires_grad are synchronized (the LoRA adapters, the value head, or all weights);
    buffers (rotary tables) never change in training and are not re-broadcast. `find_unused_parameters`:
    some step's backward leaves trainable parameters without a gradient (--critic_warmup_steps)."""
    if not dist.active:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(Trainable(bundle.policy, bundle.value_head, bundle.critic),
                                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


def call(model: Optional[nn.Module], fn: Callable, *args):
    """fn(*args) through the DDP wrapper `model` (so its backward averages the gradients), or directly."""
    return fn(*args) if model is None else model(fn, *args)


def no_sync(model: Optional[nn.Module], last: bool):
    """Gradient accumulation: no gradient communication for every micro-batch of an optimizer step but the
    last, whose backward averages (DDP) or reduce-scatters (FSDP) the accumulated gradients once."""
    if model is None or last:
        return contextlib.nullcontext()
    return _fsdp_no_sync(model) if is_sharded(model) else model.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)   # FSDP2: unsharded gradients accumulate locally
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def session(timeout_s: float, device: str = "auto"):
    """Yield this process's Dist: join the process group when launched with WORLD_SIZE > 1 (gloo for CPU
    tensors, NCCL for CUDA ones, `timeout_s` on every collective), else a one-process Dist. An exception
    on a rank is printed with the rank before it propagates (non-zero exit); the group is destroyed on
    the way out either way, so a peer waiting on this rank fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist()
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s))
    dist = Dist(rank=rank, world_size=world, local_rank=local)
    try:
        yield dist
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            what = exc.code if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            print(f"fastrlhf train: rank {rank} of {world} failed: {what}", file=sys.stderr, flush=True)
        raise
    finally:
        torch.distributed.destroy_process_group()


__all__ = ["Dist", "GlobalMoments", "Trainable", "call", "full_state", "gathered", "is_sharded", "load_full_state",
           "no_sync", "reset_sharded_reference", "session", "shard", "shard_task", "stream_seed", "wrap"]
