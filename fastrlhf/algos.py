"""The RL pieces on [B, T] tensors that sit between a rollout and the policy loss: score scaling with
running statistics, the adaptive KL controller, per-token KL-shaped rewards, and GAE + masked
whitening (through `fastrlhf.ops`) (README, "Advantages and rewards")."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from . import ops


@dataclass
class RunningMoments:
    """Running mean / variance of every score seen so far (Chan et al.'s parallel update)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, x: torch.Tensor):
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        self.merge(n, x.mean().item(), x.var(unbiased=False).item())

    def merge(self, n: int, b_mean: float, b_var: float):
        """Fold in a batch of n scores with mean b_mean and population variance b_var."""
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def scale_scores(scores: torch.Tensor, moments: RunningMoments, *, mode: str = "none",
                 clip: Optional[float] = None, eps: float = 1e-8) -> torch.Tensor:
    """scores [B] -> scaled scores [B]. The moments are updated with this batch first.

    mode "none": unchanged; "std": s / σ_running (PPO-max, APA); "mean_std": (s − μ_running) / σ_running.
    Then clipped to ±clip when clip is given."""
    if mode not in ("none", "std", "mean_std"):
        raise ValueError(f"mode: expected one of ('none', 'std', 'mean_std'), got {mode!r}")
    moments.update(scores)
    out = scores.float()
    if mode == "mean_std":
        out = out - moments.mean
    if mode != "none":
        out = out / (moments.std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s proportional controller: e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon).
    With target None the coefficient stays fixed."""

    value: float
    target: Optional[float] = None
    horizon: float = 10000.0

    def update(self, kl: float, n_steps: int):
        if self.target is None:
            return
        e = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + e * n_steps / self.horizon

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state):
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] (right padded) -> index [B] of the last valid token (0 for an empty row)."""
    return (mask.long().sum(1) - 1).clamp_min(0)


def token_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef: float, estimator: str = "k1"):
    """r_t = −β·k(ℓ_t, ℓ_ref,t) on every valid response token, plus the sequence score on the last
    valid token (never on a pad; an empty row gets nothing).

    scores [B]; logprobs, ref_logprobs, mask [B, T] -> (rewards [B, T] float32, kl [B, T] float32),
    both 0 on pads."""
    m = mask.float()
    kl = ops.kl_penalty(logprobs, ref_logprobs, estimator) * m
    rewards = -kl_coef * kl
    has_token = m.sum(1) > 0
    idx = last_token_index(mask)
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, idx] += torch.where(has_token, scores.float(), torch.zeros_like(scores.float()))
    return rewards, kl


def advantages_and_returns(rewards, values, mask, *, gamma: float, lam: float, whiten: bool = True,
                           clip: Optional[float] = None, whiten_fn: Callable = ops.whiten):
    """GAE (returns are R = A + V, unwhitened), then masked advantage whitening and optional ±clip
    (`normalize_advantages`). All [B, T] float32; 0 on pads."""
    adv, returns = ops.gae(rewards.float(), values.float(), mask.float(), gamma=gamma, lam=lam)
    return normalize_advantages(adv, mask, whiten=whiten, clip=clip, whiten_fn=whiten_fn), returns


def normalize_advantages(adv, mask, *, whiten: bool = True, clip: Optional[float] = None,
                         whiten_fn: Callable = ops.whiten):
    """adv, mask [B, T] -> adv whitened over all valid tokens together (when `whiten`), then clipped to ±clip
    (when given); 0 on pads. The trainer calls it on the whole rollout or, with --whiten_scope minibatch, on
    each optimizer step's rows. `whiten_fn(x, mask)`: the whitening (on several processes, over every
    process's tokens: fastrlhf.distributed.Dist.whiten)."""
    if whiten:
        adv = whiten_fn(adv, mask.float())
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv * mask.float()
