"""Pure-PyTorch reference of every fastrlhf op.

This file is the spec (README, "Losses" and "Batch entropy"), the CPU path and the test oracle. Every fast
path (Triton kernels, the CUDA extension, the fused linear path) computes the
same functions as the code below.

Notation, per token: logits ``x ∈ R^V``, temperature ``τ``, ``z = x/τ``, label
``y``, ``lse = log Σ_v e^{z_v}``, ``p = softmax(z)``, mask ``m ∈ {0, 1}``.

    log-prob  ℓ = z_y − lse                 dℓ/dz = onehot(y) − p
    entropy   H = lse − Σ_v p_v z_v          dH/dz = −p ⊙ (z − Σ_u p_u z_u)

Gradients w.r.t. the raw logits carry an extra factor ``1/τ``. Statistics are
accumulated in float32 whatever the input dtype. Work over the vocabulary axis is
chunked over rows (``_row_chunks``) so that no float32 copy of the whole
``[N, V]`` logits is ever alive: peak extra memory is one chunk.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from . import checks

# Rows per chunk are picked so one float32 chunk of [rows, V] is at most this many bytes.
CHUNK_BYTES = 64 * 2**20


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, n_rows, rows):
        yield start, min(n_rows, start + rows)


# ----------------------------------------------------------------------------
# Per-row statistics: log-prob of the label and entropy, with a recomputing backward
# ----------------------------------------------------------------------------

def _row_stats_chunk(x: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """x [n, V] any float dtype, labels [n] int64 -> (ℓ [n], H [n], p [n, V], z − Σ p z [n, V], valid [n]),
    float32.

    log p = log_softmax(x/τ), H = −Σ p log p (equal to lse − Σ p z), z − Σ p z = log p + H. log p is
    taken as 0 where p = 0 before the product, so that 0·log 0 = 0 at −inf logits (a masked vocabulary)
    and z − Σ p z stays finite there, while a NaN row stays NaN. ℓ is 0 where labels == ignore_index (or
    is out of [0, V), which callers have already restricted to masked positions).
    """
    logp = torch.log_softmax(x.float() / temperature, dim=-1)
    valid = (labels >= 0) & (labels < x.shape[-1]) & (labels != ignore_index)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logprob = torch.where(valid, logp.gather(-1, safe[:, None]).squeeze(-1), torch.zeros((), device=x.device))
    p = logp.exp()
    logp.masked_fill_(p == 0, 0.0)
    entropy = -(p * logp).sum(-1)
    return logprob, entropy, p, logp.add_(entropy[:, None]), valid      # in place: log p is not needed again


def row_grad_(zc, p, g_logprob, g_entropy, valid, labels, temperature):
    """dz = ∂(Σ gℓ·ℓ + gH·H)/∂x for one chunk of rows, float32 [n, V], written over zc:

        dz·τ = gℓ·(onehot(y) − p) − gH·p ⊙ (z − Σ_u p_u z_u)      (README, "Losses")

    zc [n, V] = z − Σ p z (finite where p = 0), p [n, V] = softmax(z); g_logprob, g_entropy, valid,
    labels [n]. Rows whose label is ignored (valid = 0) have ℓ ≡ 0, so their gℓ is dropped; rows with
    gℓ = gH = 0 (masked tokens) get exactly 0, selected, so that NaN logits there stay out of the
    gradient. The one formula of the torch row cores (this file and fastrlhf/fused_linear.py's `_TorchRows`,
    which hands in its own reused buffers)."""
    g_logprob = torch.where(valid, g_logprob, torch.zeros_like(g_logprob))
    dz = zc.mul_(g_entropy[:, None]).add_(g_logprob[:, None]).mul_(p).neg_()
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    dz.scatter_add_(-1, safe[:, None], g_logprob[:, None])
    dz.masked_fill_(((g_logprob == 0) & (g_entropy == 0))[:, None], 0.0)
    return dz.div_(temperature) if temperature != 1.0 else dz


class _RowStats(torch.autograd.Function):
    """(ℓ, H) of each row of logits2d [N, V]; backward recomputes p chunk by chunk."""

    @staticmethod
    def forward(ctx, logits2d, labels, temperature, ignore_index):
        n, v = logits2d.shape
        logprob = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        entropy = torch.empty_like(logprob)
        for s, e in _row_chunks(n, v):
            lp, ent, _, _, _ = _row_stats_chunk(logits2d[s:e], labels[s:e], temperature, ignore_index)
            logprob[s:e], entropy[s:e] = lp, ent
        ctx.save_for_backward(logits2d, labels)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        logits2d, labels = ctx.saved_tensors
        n, v = logits2d.shape
        zeros = torch.zeros(n, dtype=torch.float32, device=logits2d.device)
        g_logprob = zeros if g_logprob is None else g_logprob.float()
        g_entropy = zeros if g_entropy is None else g_entropy.float()
        grad = torch.empty_like(logits2d)
        for s, e in _row_chunks(n, v):
            _, _, p, zc, valid = _row_stats_chunk(logits2d[s:e], labels[s:e], ctx.temperature, ctx.ignore_index)
            grad[s:e] = row_grad_(zc, p, g_logprob[s:e], g_entropy[s:e], valid, labels[s:e],
                                  ctx.temperature).to(grad.dtype)
        return grad, None, None, None


def logprobs_and_entropy(logits, labels, *, temperature=1.0, ignore_index=-100):
    """logits [..., V], labels [...] -> (log p(label) [...], entropy [...]), float32.

    The log-prob is 0 where labels == ignore_index.
    """
    v = logits.shape[-1]
    lp, ent = _RowStats.apply(logits.reshape(-1, v), labels.reshape(-1).long(), float(temperature),
                              int(ignore_index))
    return lp.view(labels.shape), ent.view(labels.shape)


# ----------------------------------------------------------------------------
# Per-token losses on [B, T] tensors
# ----------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")
# How the per-token terms of one micro-batch become one scalar (verl's `loss_agg_mode` names; README,
# "Loss aggregation"): `loss_weights` turns each into per-token weights w with loss = Σ_t w_t·loss_t.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# The per-token policy-loss kinds of `token_loss` (the trainer's --algo ppo-max uses "ppo").
POLICY_LOSSES = ("ppo", "apa")


def loss_weights(mask, mode="token-mean", normalizer=None):
    """Per-token weights w [...] float32 of a loss aggregation, loss = Σ w·loss_t (every term: policy,
    KL, entropy). m = the 0/1 mask, L_b = max(Σ_t m_bt, 1), B rows, T columns:

        token-mean               w = m / N,          N = Σ m (at least 1)
        seq-mean-token-mean      w = m / (L_b · S),  S = B
        seq-mean-token-sum       w = m / S,          S = B
        seq-mean-token-sum-norm  w = m / C,          C = T (a constant length: Dr. GRPO, arXiv:2503.20783)

    `normalizer` (a number or 0-d tensor > 0) replaces N, S or C: the token or sequence count of the whole
    batch under gradient accumulation (TRL's num_items_in_batch), or Dr. GRPO's B·max_length. The
    seq-mean modes need a mask of 2 dims [B, T]."""
    m = mask.float()
    if mode != "token-mean" and m.dim() != 2:
        raise ValueError(f"mask: loss_agg_mode={mode!r} needs 2 dims [B, T], got shape {tuple(m.shape)}")
    if mode == "token-mean":
        denom = m.sum().clamp_min(1.0) if normalizer is None else normalizer
        return m / denom
    if mode == "seq-mean-token-mean":
        rows = m.shape[0] if normalizer is None else normalizer
        return m / (m.sum(-1, keepdim=True).clamp_min(1.0) * rows)
    if mode == "seq-mean-token-sum":
        return m / (m.shape[0] if normalizer is None else normalizer)
    if mode == "seq-mean-token-sum-norm":
        return m / (m.shape[-1] if normalizer is None else normalizer)
    raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {mode!r}")


def masked_mean(x, mask):
    """Σ_{m=1} x / max(Σ m, 1) over a 0/1 mask: an all-zero mask gives 0, never NaN. Masked values are
    selected out, never multiplied by 0, so a NaN or inf there reaches neither the mean nor its gradient."""
    keep = mask.bool()
    return torch.where(keep, x, 0.0).sum() / keep.sum().clamp_min(1).to(x.dtype)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Schulman's per-token estimators of KL(π || π_ref) with d = ref_ℓ − ℓ:
    k1 = −d, k2 = d²/2, k3 = e^d − 1 − d."""
    d = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")


def _select(mask, *tensors):
    """Each tensor as float32 where the 0/1 mask is 1 and 0 elsewhere: masked positions may hold anything
    (NaN, inf, −100 as an "ignored" log-prob) and reach neither a value nor a gradient (a product with
    0 would give NaN, and its gradient 0·∞ too)."""
    keep = mask.bool()
    return tuple(torch.where(keep, t.float(), 0.0) for t in tensors)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Clipped surrogate: ρ = e^{ℓ−ℓ_old}, L = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high));
    dual clip c > 1: for A < 0, L = min(L, −cA). Masked mean over all tokens."""
    lp, old, adv = _select(mask, logprobs, old_logprobs, advantages)
    per_token, stats = _ppo_terms(lp, old, adv, mask, clip_low, clip_high, dual_clip)
    return masked_mean(per_token, mask), stats


def _ppo_terms(lp, old, adv, mask, clip_low, clip_high, dual_clip):
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(π_old || π): (ρ − 1) − log ρ
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def apa_policy_loss(logprobs, ref_logprobs, advantages, mask, *, adv_coeff=10.0):
    """APA: per token (ℓ − ℓ_ref − adv_coeff·A)², masked mean (adv_coeff is 1/λ of the paper)."""
    per_token = _apa_terms(*_select(mask, logprobs, ref_logprobs, advantages), adv_coeff)
    with torch.no_grad():
        stats = {"apa_residual": masked_mean(per_token.sqrt(), mask)}
    return masked_mean(per_token, mask), stats


def _apa_terms(lp, ref, adv, adv_coeff):
    r = lp - ref - adv_coeff * adv
    return r * r


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²), masked mean; clip=None: ½(V − R)².

    The inputs are read only where the mask is 1 (0 is selected elsewhere): padding holding NaN gives
    the clean loss and a zero gradient there (a product with 0 would give NaN)."""
    keep = mask.bool()
    v, r = torch.where(keep, values.float(), 0.0), torch.where(keep, returns.float(), 0.0)
    err = (v - r) ** 2
    if clip is None:
        loss, frac = err, torch.zeros((), device=v.device)
    else:
        old = torch.where(keep, old_values.float(), 0.0)
        v_clip = old + (v - old).clamp(-clip, clip)
        err_clip = (v_clip - r) ** 2
        loss = torch.maximum(err, err_clip)
        frac = masked_mean((err_clip > err).float(), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": frac.detach(), "value_mean": masked_mean(v.detach(), mask)}
    return 0.5 * masked_mean(loss, mask), stats


# ----------------------------------------------------------------------------
# Batch entropy: entropy of the batch-mean distribution at each response position
# ----------------------------------------------------------------------------

def _position_chunks(T: int, B: int, V: int):
    cols = max(1, CHUNK_BYTES // (4 * max(B * V, 1)))
    for start in range(0, T, cols):
        yield start, min(T, start + cols)


def _softmax_and_batch_mean(x, mask, temperature, weight=None):
    """x [B, t, V], mask [B, t] -> (p [B, t, V], Σ_b w_b·p_b [t, V], Σ_b m [t]) float32, p = softmax(x/τ),
    w = m / Σ_b m (so the sum is p̄), or w = m / `weight` [t] when given; masked rows are selected out
    (NaN logits there never reach the sum)."""
    p = torch.softmax(x.float() / temperature, dim=-1)
    keep = mask.bool()
    count = keep.sum(0).float()                                   # [t]
    norm = count if weight is None else weight
    pbar = torch.where(keep[:, :, None], p, 0.0).sum(0) / norm.clamp_min(1.0)[:, None]
    return p, pbar, count


def _xlogx_sum(pbar):
    return torch.where(pbar > 0, pbar * torch.log(pbar), torch.zeros_like(pbar)).sum(-1)


def _safe_log(pbar):
    """log p̄, taken as 0 where p̄ = 0 (0·log 0 = 0; there every row's p is 0 too)."""
    return torch.where(pbar > 0, torch.log(pbar), torch.zeros_like(pbar))


class _BatchEntropy(torch.autograd.Function):
    """H_batch = mean over positions t with any valid token of H(p̄_t),
    p̄_t = Σ_b m_bt p_bt / Σ_b m_bt.

    Gradient (README, "Batch entropy"): g_v = −(log p̄_{t,v} + 1)/n_pos,
    ∂/∂z_{bt,v} = (m_bt/Σ_b m_bt)·p_{bt,v}·(g_v − Σ_u p_{bt,u} g_u), times 1/τ for raw logits.

    stats = (p̄ [G ≥ T, V], Σ_b m [G], n_pos) of a larger batch these rows belong to (a mini-batch's, from
    `batch_probs`), or None (these rows are the batch). With stats the value is these rows' part of that
    batch's H_batch, (1/n_pos)·Σ_{b,t} w_bt·CE(p_bt, p̄_t), w_bt = m_bt/Σ_b m_bt, CE(p, q) = −Σ_v p_v log q_v:
    since Σ_b w_bt·p_bt = p̄_t, the parts of all the rows add up to H_batch, and the gradient of a part
    w.r.t. row (b, t) is the formula above (it depends on p̄_t and p_bt only), so it is exact.
    """

    @staticmethod
    def forward(ctx, logits, mask, temperature, stats):
        B, T, V = logits.shape
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        n_pos = (mask.bool().sum(0) > 0).sum().float() if stats is None else stats[2]
        for s, e in _position_chunks(T, B, V):
            if stats is None:
                _, pbar, count = _softmax_and_batch_mean(logits[:, s:e], mask[:, s:e], temperature)
                total += torch.where(count > 0, -_xlogx_sum(pbar), torch.zeros_like(count)).sum()
            else:   # Σ_b w_bt·CE(p_bt, p̄_t) = −Σ_v (Σ_b w_bt p_bt,v)·log p̄_t,v
                _, part, _ = _softmax_and_batch_mean(logits[:, s:e], mask[:, s:e], temperature, stats[1][s:e])
                total -= (part * _safe_log(stats[0][s:e])).sum()
        ctx.save_for_backward(logits, mask, n_pos, *(() if stats is None else stats[:2]))
        ctx.temperature = temperature
        return total / n_pos.clamp_min(1.0)

    @staticmethod
    def backward(ctx, grad_out):
        logits, mask, n_pos, *stats = ctx.saved_tensors
        B, T, V = logits.shape
        grad = torch.empty_like(logits)
        for s, e in _position_chunks(T, B, V):
            p, pbar, count = _softmax_and_batch_mean(logits[:, s:e], mask[:, s:e], ctx.temperature)
            if stats:
                pbar, count = stats[0][s:e], stats[1][s:e]
            g = -(_safe_log(pbar) + 1.0) / n_pos.clamp_min(1.0) * grad_out.float()       # [t, V]
            keep = mask[:, s:e].bool()
            w = keep.float() / count.clamp_min(1.0)                              # [B, t]
            pg = (p * g[None]).sum(-1, keepdim=True)                              # [B, t, 1]
            dz = w[:, :, None] * p * (g[None] - pg) / ctx.temperature
            grad[:, s:e] = torch.where(keep[:, :, None], dz, 0.0).to(grad.dtype)
        return grad, None, None, None


def batch_entropy(logits, mask, *, temperature=1.0, stats=None):
    """logits [B, T, V], mask [B, T] -> scalar float32 H_batch (0 when the mask is empty); with
    stats = (p̄, count, n_pos) of a larger batch, these rows' part of its H_batch (`_BatchEntropy`)."""
    return _BatchEntropy.apply(logits, mask, float(temperature), stats)


# ----------------------------------------------------------------------------
# Batch-entropy statistics of a mini-batch, accumulated micro-batch by micro-batch
# ----------------------------------------------------------------------------

# Which response positions batch entropy averages (README, "Batch entropy"): "all" = every position t,
# one p̄_t each; "last" = each row's last valid token, one p̄ over the rows (Padula & Soemers' definition).
BATCH_ENTROPY_POSITIONS = ("all", "last")


@dataclass(frozen=True)
class BatchProbs:
    """Batch-entropy statistics of a set of rows, as sums, so that they add up over micro-batches (`+`)
    and could be all-reduced over processes (README, "Batch entropy"):

        probs [G, V] float32   Σ_b m'_bg·softmax(x_bg/τ)
        count [G] float32      Σ_b m'_bg

    positions "all": G = T response positions, m' = the mask; "last": G = 1, m'_b = 1 at row b's last
    valid token (rows without one count for nothing). temperature: the τ of the softmax."""

    probs: torch.Tensor
    count: torch.Tensor
    positions: str = "all"
    temperature: float = 1.0

    def __post_init__(self):
        checks.choice("positions", self.positions, BATCH_ENTROPY_POSITIONS)
        object.__setattr__(self, "temperature", checks.temperature(self.temperature))

    def __add__(self, other: "BatchProbs") -> "BatchProbs":
        """The statistics of both sets of rows; G is the larger one's (a micro-batch cut to its own longest
        response has fewer positions: the missing ones hold zeros)."""
        if not isinstance(other, BatchProbs):
            return NotImplemented
        if (other.positions, other.temperature, other.probs.shape[1:]) != (
                self.positions, self.temperature, self.probs.shape[1:]):
            raise ValueError(f"other: expected BatchProbs with positions={self.positions!r}, temperature="
                             f"{self.temperature}, V={self.probs.shape[1]}, got positions={other.positions!r}, "
                             f"temperature={other.temperature}, V={other.probs.shape[1]}")
        big, small = (self, other) if self.count.shape[0] >= other.count.shape[0] else (other, self)
        g = small.count.shape[0]
        probs, count = big.probs.clone(), big.count.clone()
        probs[:g] += small.probs
        count[:g] += small.count
        return BatchProbs(probs, count, self.positions, self.temperature)

    def mean(self) -> torch.Tensor:
        """p̄ [G, V] = probs / count (zeros where count = 0)."""
        return self.probs / self.count.clamp_min(1.0)[:, None]

    def n_groups(self) -> torch.Tensor:
        """n_pos: the number of positions (groups) with a valid token, float32 0-d."""
        return (self.count > 0).sum().float()

    def entropy(self) -> torch.Tensor:
        """H_batch = (1/n_pos)·Σ_{g: count_g > 0} H(p̄_g), float32 0-d (0 when no row counts)."""
        h = -_xlogx_sum(self.mean())
        return torch.where(self.count > 0, h, torch.zeros_like(h)).sum() / self.n_groups().clamp_min(1.0)


def last_token_mask(mask):
    """mask [B, T] -> [B, T] bool, True at each row's last valid position (none for an empty row)."""
    keep = mask.bool()
    T = keep.shape[1]
    last = T - 1 - keep.flip(1).int().argmax(1)                          # index of the last 1 (T−1 if none)
    return (torch.arange(T, device=keep.device)[None, :] == last[:, None]) & keep.any(1, keepdim=True)


def batch_entropy_rows(x, mask, positions):
    """The rows batch entropy reads: "all": x [B, T, ...], mask [B, T]; "last": each row's last valid
    position, x [B, 1, ...], mask [B, 1] (0 for a row without one). Differentiable (an index)."""
    if positions == "all":
        return x, mask
    last = last_token_mask(mask)
    return x[torch.arange(x.shape[0], device=x.device), last.int().argmax(1)][:, None], last.any(1, keepdim=True)


def batch_probs(logits, mask, *, temperature=1.0, positions="all"):
    """logits [B, T, V], mask [B, T] -> their `BatchProbs` (no gradient)."""
    x, m = batch_entropy_rows(logits, mask, positions)
    keep = m.bool()
    probs = torch.zeros(x.shape[1], x.shape[2], dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for s, e in _position_chunks(x.shape[1], x.shape[0], x.shape[2]):
            p = torch.softmax(x[:, s:e].float() / temperature, dim=-1)
            probs[s:e] = torch.where(keep[:, s:e, None], p, 0.0).sum(0)
    return BatchProbs(probs, keep.sum(0).float(), positions, temperature)


def batch_entropy_term(batch_entropy_fn, logits, mask, temperature, stats):
    """The batch-entropy term of a policy loss over logits [B, T, V] -> (term, H_batch to report), with
    `batch_entropy_fn` one backend's `batch_entropy`. stats None: H_batch of these rows (positions "all"),
    reported as is; a `BatchProbs`: these rows' part of the H_batch of `stats`' rows (a mini-batch
    holding them; `_BatchEntropy`), whose H_batch is reported."""
    if stats is None:
        h = batch_entropy_fn(logits, mask, temperature=temperature)
        return h, h.detach()
    x, m = batch_entropy_rows(logits, mask, stats.positions)
    t = x.shape[1]
    part = batch_entropy_fn(x, m, temperature=temperature,
                            stats=(stats.mean()[:t].contiguous(), stats.count[:t].contiguous(), stats.n_groups()))
    return part, stats.entropy()


# ----------------------------------------------------------------------------
# The combined per-micro-batch policy loss over logits
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LossConfig:
    """Knobs of `policy_loss_from_logits` (and of the fused linear path), checked once on construction
    (`fastrlhf.checks`; numbers are stored as floats): the one carrier of these options from the CLI to
    the kernel launchers, which do not check them again."""

    algo: str = "ppo"                 # "ppo" (clipped ratio) or "apa" (squared advantage residual)
    temperature: float = 1.0          # logits are divided by this before the softmax
    clip_low: float = 0.2             # PPO ratio clip 1 − ε_low, ε_low in [0, 1)
    clip_high: float = 0.2            # PPO ratio clip 1 + ε_high, ε_high >= 0
    dual_clip: Optional[float] = None  # PPO dual clip c > 1 for A < 0
    adv_coeff: float = 10.0           # APA 1/λ
    entropy_coef: float = 0.0         # loss −= entropy_coef · mean H
    kl_coef: float = 0.0              # loss += kl_coef · mean k(ℓ, ℓ_ref)
    kl_estimator: str = "k3"
    batch_entropy_coef: float = 0.0   # loss −= batch_entropy_coef · H_batch
    loss_agg_mode: str = "token-mean"  # per-token terms -> scalar, one of LOSS_AGG_MODES (`loss_weights`)
    kl_importance_weighted: bool = False  # KL term ρ·k(ℓ, ℓ_ref), ρ = π/π_old (TRL's use_bias_correction_kl)

    def __post_init__(self):
        checked = {
            "algo": checks.choice("algo", self.algo, POLICY_LOSSES),
            "temperature": checks.temperature(self.temperature),
            "clip_low": checks.clip_low(self.clip_low),
            "clip_high": checks.clip_high(self.clip_high),
            "dual_clip": checks.dual_clip(self.dual_clip),
            "kl_estimator": checks.choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            "loss_agg_mode": checks.choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES),
            "kl_importance_weighted": checks.flag("kl_importance_weighted", self.kl_importance_weighted),
        }
        for name in ("adv_coeff", "entropy_coef", "kl_coef", "batch_entropy_coef"):
            checked[name] = checks.coefficient(name, getattr(self, name))
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def loss_config(config, knobs: dict) -> LossConfig:
    """The `LossConfig` of a policy-loss call: `config` itself when given (then every keyword knob must be
    left at its default), else LossConfig(**knobs)."""
    if config is None:
        return LossConfig(**knobs)
    if not isinstance(config, LossConfig):
        raise TypeError(f"config: expected None or a fastrlhf.LossConfig, got {type(config).__name__}")
    for f in dataclasses.fields(LossConfig):
        value = knobs[f.name]
        if not (value is f.default or (not isinstance(value, bool) and value == f.default)):
            raise ValueError(f"{f.name}: expected the default {f.default!r} when config= is given (set it in "
                             f"the LossConfig instead), got {value!r}")
    return config


def token_loss(logprobs, entropy, old_logprobs, ref_logprobs, advantages, mask, cfg: LossConfig):
    """Per-token loss terms (before the aggregation), differentiable w.r.t. every tensor input.

    All [n] float32; masked positions may hold anything (selected out: they come out 0 with a 0
    gradient). old_logprobs None: on-policy, ℓ_old = sg(ℓ) (ρ = e^{ℓ − sg(ℓ)} = 1, ∂ρ/∂ℓ = 1, as TRL and
    verl compute it without a second pass); ref_logprobs None: ℓ_ref = sg(ℓ), KL ≡ 0 (only with kl_coef
    = 0, checked by `fastrlhf.ops`). kl_importance_weighted: the KL term is ρ·k, differentiated through ρ
    too (the importance-sampled gradient of E_π[k] from samples of π_old; TRL's use_bias_correction_kl).
    Returns (per_token [n], kl [n] = the KL term as it enters the loss, stats dict)."""
    lp, ent, adv = _select(mask, logprobs, entropy, advantages)
    old = lp.detach() if old_logprobs is None else _select(mask, old_logprobs)[0]
    ref_lp = lp.detach() if ref_logprobs is None else _select(mask, ref_logprobs)[0]
    if cfg.algo == "ppo":
        pg, stats = _ppo_terms(lp, old, adv, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    else:
        pg = _apa_terms(lp, ref_lp, adv, cfg.adv_coeff)
        with torch.no_grad():
            lr = lp - old
            stats = {"clip_frac": torch.zeros((), device=lr.device),
                     "approx_kl": masked_mean(torch.expm1(lr) - lr, mask)}
    kl = kl_penalty(lp, ref_lp, cfg.kl_estimator)
    if cfg.kl_importance_weighted:
        kl = kl * torch.exp(lp - old)
    per_token = pg
    if cfg.kl_coef:
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef:
        per_token = per_token - cfg.entropy_coef * ent
    return per_token, kl, stats


def token_loss_grads(lp, ent, weight, advantages, old_logprobs, ref_logprobs, cfg: LossConfig):
    """The per-token part of every torch row core, [n] float32 in and out (old/ref log-probs may be None,
    as in `token_loss`): weight_t = the aggregation weight of `loss_weights` ->
    (total = Σ_t weight_t·loss_t (0-d), kl [n], gℓ = ∂total/∂ℓ [n], gH = ∂total/∂H [n]), by autograd
    through `token_loss` (torch's tie rules: maximum/minimum split the gradient in half on a tie)."""
    with torch.enable_grad():
        lp_, ent_ = lp.detach().requires_grad_(), ent.detach().requires_grad_()
        per_token, kl, _ = token_loss(lp_, ent_, old_logprobs, ref_logprobs, advantages, weight > 0, cfg)
        total = (weight * per_token).sum()
        g_lp, g_ent = torch.autograd.grad(total, (lp_, ent_), allow_unused=True)
    zeros = torch.zeros_like(lp)
    return (total.detach(), kl.detach(), zeros if g_lp is None else g_lp,
            zeros if g_ent is None else g_ent)


def policy_rows(logits2d, labels, weight, advantages, old_logprobs, ref_logprobs, cfg: LossConfig):
    """The row core shared by the logits path and the fused linear path, for one chunk of rows.

    logits2d [n, V]; labels, advantages, old/ref log-probs [n] (None: as in `token_loss`); weight [n] =
    the aggregation weights of the whole micro-batch (`loss_weights`). Returns (ℓ [n], H [n], kl [n],
    Σ_t weight·loss_t (scalar), dz [n, V] float32) where dz = ∂(Σ_t weight_t·loss_t)/∂logits: the
    gradient is known in the forward pass because each token's loss depends on its own row only (batch
    entropy is added separately).
    """
    lp, ent, p, zc, valid = _row_stats_chunk(logits2d, labels, cfg.temperature, -100)
    total, kl, g_lp, g_ent = token_loss_grads(lp, ent, weight, advantages.float(), _float(old_logprobs),
                                              _float(ref_logprobs), cfg)
    dz = row_grad_(zc, p, g_lp, g_ent, valid, labels, cfg.temperature)
    return lp, ent, kl, total, dz


class _PolicyLossFromLogits(torch.autograd.Function):
    """Σ_t w_t·loss_t over logits2d [N, V] with dz computed in forward; backward is a scale."""

    @staticmethod
    def forward(ctx, logits2d, labels, weight, advantages, old_logprobs, ref_logprobs, cfg, inplace):
        n, v = logits2d.shape
        lp = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        ent, kl = torch.empty_like(lp), torch.empty_like(lp)
        total = torch.zeros((), dtype=torch.float32, device=logits2d.device)
        # inplace: each chunk's gradient overwrites that chunk of the logits once it has been read
        grad = (logits2d if inplace else torch.empty_like(logits2d)) if logits2d.requires_grad else None
        for s, e in _row_chunks(n, v):
            lp[s:e], ent[s:e], kl[s:e], t, dz = policy_rows(
                logits2d[s:e], labels[s:e], weight[s:e], advantages[s:e], _rows(old_logprobs, s, e),
                _rows(ref_logprobs, s, e), cfg)
            total += t
            if grad is not None:
                grad[s:e] = dz.to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lp, ent, kl)
        return total, lp, ent, kl

    @staticmethod
    def backward(ctx, g_total, *_):
        (grad,) = ctx.saved_tensors
        return grad * g_total.to(grad.dtype), None, None, None, None, None, None, None


def _float(t):
    return None if t is None else t.float()


def _rows(t, s, e):
    return None if t is None else t[s:e]


def policy_loss_from_logits(logits, labels, mask, advantages, old_logprobs, ref_logprobs, cfg: LossConfig, *,
                            inplace=False, normalizer=None, batch_probs=None):
    """loss = Σ_t w_t·(policy loss + kl_coef·KL − entropy_coef·H) − batch_entropy_coef·H_batch with w the
    weights of cfg.loss_agg_mode and `normalizer` (`loss_weights`; token-mean: the masked mean).

    logits [..., V] (batch entropy needs [B, T, V]); the other tensors [...]; old/ref log-probs may be
    None (on-policy / no reference, as in `token_loss`). Returns (loss, out)
    with out holding detached per-token `logprobs`, `entropy`, `kl` and scalar stats. inplace=True
    writes the logits gradient over `logits` (checked by `fastrlhf.ops`: contiguous logits, no batch entropy).
    Masked positions may hold anything: selected out of every value and gradient.
    batch_probs: None (H_batch of these rows) or the `BatchProbs` of a mini-batch holding them (checked by
    `fastrlhf.ops`): H_batch is then replaced by these rows' part of the mini-batch's (`batch_entropy_term`).

    Gradients: w.r.t. the logits, computed in forward (`_PolicyLossFromLogits`). When advantages or
    old/ref log-probs require grad too, the loss is instead plain autograd through `logprobs_and_entropy`
    and `token_loss`, which gives their gradients as well (inplace is then not used).
    """
    v = logits.shape[-1]
    m = mask.reshape(-1).float()
    weight = loss_weights(mask, cfg.loss_agg_mode, normalizer).reshape(-1)
    labels2d = torch.where(m > 0, labels.reshape(-1).long(), torch.full_like(labels.reshape(-1).long(), -100))
    rollout = [None if t is None else t.reshape(-1).float() for t in (advantages, old_logprobs, ref_logprobs)]
    given = [t for t in (advantages, old_logprobs, ref_logprobs) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        lp, ent = _RowStats.apply(logits.reshape(-1, v), labels2d, cfg.temperature, -100)
        per_token, kl, _ = token_loss(lp, ent, rollout[1], rollout[2], rollout[0], m, cfg)
        loss = (weight * per_token).sum()
        lp, ent, kl = lp.detach(), ent.detach(), kl.detach()
    else:
        loss, lp, ent, kl = _PolicyLossFromLogits.apply(logits.reshape(-1, v), labels2d, weight, *rollout, cfg,
                                                        inplace)
    out = _loss_outputs(lp.view(mask.shape), ent.view(mask.shape), kl.view(mask.shape), mask,
                        old_logprobs, ref_logprobs, advantages, cfg)
    if cfg.batch_entropy_coef:
        h_term, out["batch_entropy"] = batch_entropy_term(batch_entropy, logits, mask, cfg.temperature, batch_probs)
        loss = loss - cfg.batch_entropy_coef * h_term
    return loss, out


def _loss_outputs(lp, ent, kl, mask, old_logprobs, ref_logprobs, advantages, cfg):
    """Detached per-token tensors and summary stats shared by every policy-loss path (entropy is 0 where
    the mask is 0; the statistics are masked means over tokens whatever the loss aggregation)."""
    m = mask.float()
    with torch.no_grad():
        _, _, stats = token_loss(lp, ent, _float(old_logprobs), _float(ref_logprobs), advantages.float(), m, cfg)
    finite = torch.isfinite(lp) & torch.isfinite(ent)
    ent = torch.where(m > 0, ent, 0.0)
    out = {"logprobs": lp, "entropy": ent, "kl": kl}
    out.update(stats)
    out.update({
        "entropy_mean": masked_mean(ent, m),
        "kl_mean": masked_mean(kl, m),
        "num_tokens": m.sum(),
        "nonfinite_tokens": ((~finite) & (m > 0)).sum(),
    })
    return out


# ----------------------------------------------------------------------------
# Advantages (GAE) and whitening on [B, T]
# ----------------------------------------------------------------------------

def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """δ_t = r_t + γ V_{t+1} − V_t (V past the last valid token is 0), A_t = δ_t + γλ A_{t+1},
    R = A + V. rewards, values, mask [B, T] with right padding; padded positions come out 0.
    Rewards and values are read only where the mask is 1 (0 is selected elsewhere, never multiplied
    in): padding may hold NaN or inf."""
    keep = mask.bool()
    r, v = torch.where(keep, rewards.float(), 0.0), torch.where(keep, values.float(), 0.0)
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in range(T - 1, -1, -1):
        v_next = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = torch.where(keep[:, t], delta + gamma * lam * last, 0.0)
        adv[:, t] = last
    return adv, torch.where(keep, adv + v, 0.0)


def whiten(x, mask, *, eps=1e-8):
    """(x − mean)/std over valid tokens only; 0 valid tokens: zeros; 1 valid token: centred
    (variance taken as 1). x is read only where the mask is 1 (padding may hold NaN or inf: it
    reaches neither the statistics nor the gradient); masked positions come out 0."""
    keep = mask.bool()
    xf = torch.where(keep, x.float(), 0.0)
    n = keep.sum()
    mean = xf.sum() / n.clamp_min(1)
    var = torch.where(keep, xf - mean, 0.0).pow(2).sum() / (n - 1).clamp_min(1)
    var = torch.where(n > 1, var, torch.ones_like(var))
    out = (xf - mean) * torch.rsqrt(var + eps)
    return torch.where(keep, out, 0.0).to(x.dtype)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------

def sample_tokens(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32).

    Temperature, then top-k, then top-p (keep the smallest set of highest-probability tokens whose
    mass reaches p, computed on the top-k-renormalized distribution), then a draw. The returned
    log-prob is that of the drawn token under the tempered *full* softmax. temperature == 0 or
    top_k == 1 is greedy (the first index of the max logit); only temperature == 0 leaves the
    log-prob untempered (τ = 1).

    z = (x − max x)/τ: the softmax of x/τ, shifted so that z <= 0 and no finite logit overflows at any
    τ >= 2^-126 (x/τ itself would reach inf from |x| > 3.4e38·τ).
    """
    x = logits.float()
    greedy = temperature == 0 or top_k == 1
    z = (x - x.amax(-1, keepdim=True)) / (temperature if temperature > 0 else 1.0)
    full_logp = torch.log_softmax(z, dim=-1)
    if greedy:
        tokens = x.argmax(-1)
    else:
        masked = z
        if top_k and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
            masked = masked.masked_fill(masked < kth, float("-inf"))
        if top_p < 1.0:
            sorted_z, idx = torch.sort(masked, dim=-1, descending=True)
            probs = torch.softmax(sorted_z, dim=-1)
            before = probs.cumsum(-1) - probs          # mass strictly before each token
            drop = before >= top_p
            sorted_z = sorted_z.masked_fill(drop, float("-inf"))
            masked = torch.full_like(masked, float("-inf")).scatter(-1, idx, sorted_z)
        probs = torch.softmax(masked, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, full_logp.gather(-1, tokens[:, None]).squeeze(-1)


__all__ = [
    "LossConfig", "POLICY_LOSSES", "loss_config", "KL_ESTIMATORS", "LOSS_AGG_MODES", "loss_weights", "masked_mean", "logprobs_and_entropy",
    "kl_penalty", "ppo_policy_loss", "apa_policy_loss", "value_loss", "batch_entropy",
    "token_loss", "policy_rows", "policy_loss_from_logits", "gae", "whiten", "sample_tokens", "BatchProbs",
    "BATCH_ENTROPY_POSITIONS", "batch_probs",
]
