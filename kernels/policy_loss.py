"""The combined per-micro-batch policy loss over logits [N, V], gradient written in the forward pass.

Each token's loss depends on its own row only, through ℓ (log-prob of the label) and H (entropy):
    loss_t = pg(ℓ) [+ kl_coef·k(ℓ, ℓ_ref)] [− entropy_coef·H],   total = Σ_t w_t·loss_t,
with w_t = m_t / Σ m over the micro-batch. So one program per row tile does
    pass 1: online softmax over the vocabulary -> ℓ, H (fp32, kernels/token_logprobs.py),
            then loss_t and the closed-form gℓ = w·∂loss/∂ℓ, gH = w·∂loss/∂H in registers;
    pass 2: dz = (gℓ·(onehot(y) − p) − gH·p ⊙ (z − Σpz))/τ, in the logits dtype (optionally in place).
Bytes moved: logits read twice (the second read from L2 when the rows in flight fit), dz written once;
backward scales dz in place by the upstream gradient, skipping all memory traffic when that is 1.

Closed forms of ∂loss/∂ℓ (derived from fastrlhf.ref.token_loss, with torch's tie rules:
maximum/minimum split the gradient in half on a tie, clamp passes it on the closed interval):
    PPO   ρ = e^{ℓ−ℓ_old}, u = −Aρ, c = −A·clip(ρ, 1−ε_lo, 1+ε_hi), pg = max(u, c)
          ∂u = −Aρ, ∂c = −Aρ·[1−ε_lo ≤ ρ ≤ 1+ε_hi]; ∂pg = ∂u (u > c), ∂c (u < c), (∂u + ∂c)/2 (tie)
          dual clip C (A < 0): pg' = min(pg, −CA), ∂pg' = ∂pg (pg < −CA), ∂pg/2 (tie), 0 (pg > −CA)
          The tie rules matter only at float32 ties: with ρ inside the closed clip interval (its ends
          included) ∂c = ∂u, so (∂u + ∂c)/2 = ∂u; but −A·ρ and −A·(1+ε_hi) can round to the same float
          for ρ a few ulps outside, where ∂c = 0 and torch gives ∂u/2; and ρ == C makes −Aρ == −CA exactly.
          tests/test_policy_loss.py builds both cases.
    APA   r = ℓ − ℓ_ref − adv_coeff·A, pg = r², ∂pg = 2r
    KL    d = ℓ_ref − ℓ: k1 = −d (∂ = 1), k2 = d²/2 (∂ = −d), k3 = e^d − 1 − d (∂ = −(e^d − 1))
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf import ops, ref
from fastrlhf.kernels import token_logprobs
from fastrlhf.kernels.token_logprobs import _online_row_stats, _row_ids, _write_row_grad

_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}


@triton.jit
def _expm1_minus_x(d):
    """e^d − 1 − d without cancellation: Taylor Σ_{n=2..8} dⁿ/n! for |d| < 0.5 (truncation < 1e-7
    relative: 0.5⁹/9! / (0.5²/2) ≈ 1.1e-7), the direct formula beyond."""
    t = 1.0 / 40320.0
    t = t * d + 1.0 / 5040.0
    t = t * d + 1.0 / 720.0
    t = t * d + 1.0 / 120.0
    t = t * d + 1.0 / 24.0
    t = t * d + 1.0 / 6.0
    t = t * d + 0.5
    return tl.where(tl.abs(d) < 0.5, t * d * d, tl.exp(d) - 1.0 - d)


@triton.jit
def _policy_rows_kernel(
        x_ptr, dz_ptr, labels_ptr, w_ptr, adv_ptr, old_ptr, ref_ptr,
        lp_ptr, ent_ptr, kl_ptr, wloss_ptr,
        n_rows, V, stride_x, stride_dz, inv_temp,
        clip_low, clip_high, dual_clip, adv_coeff, kl_coef, entropy_coef, n_tiles,
        IS_PPO: tl.constexpr, HAS_DUAL: tl.constexpr, KL_EST: tl.constexpr, HAS_KL: tl.constexpr,
        HAS_ENT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, row_ok, row_off = _row_ids(tile, n_rows, stride_x, BLOCK_N)
        # pass 1: row statistics -> ℓ, H
        m, s, u = _online_row_stats(x_ptr, row_off, row_ok, V, inv_temp, BLOCK_N, BLOCK_V)
        log_s = tl.log(s)
        lse = m + log_s
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-100)
        valid = (labels >= 0) & (labels < V) & row_ok
        z_y = tl.load(x_ptr + row_off + labels, mask=valid, other=0.0).to(tl.float32) * inv_temp
        lp = tl.where(valid, z_y - lse, 0.0)
        ent = log_s - u / s
        # per-token loss and its derivative w.r.t. ℓ (closed forms in the module docstring)
        # masked tokens (w = 0): the rollout tensors are not read (0 is selected), so NaN / inf / −100
        # there reach neither the loss nor the gradient, as in fastrlhf.ref.token_loss
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        live = row_ok & (w > 0)
        adv = tl.load(adv_ptr + rows, mask=live, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + rows, mask=live, other=0.0).to(tl.float32)
        ref_lp = tl.load(ref_ptr + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(lp_ptr + rows, lp, mask=row_ok)
        tl.store(ent_ptr + rows, ent, mask=row_ok)
        lp = tl.where(live, lp, 0.0)
        if IS_PPO:
            ratio = tl.exp(lp - old)
            lo = 1.0 - clip_low
            hi = 1.0 + clip_high
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
            pg = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
            d_unclipped = -adv * ratio
            d_clipped = tl.where((ratio >= lo) & (ratio <= hi), d_unclipped, 0.0)
            d_pg = tl.where(unclipped > clipped, d_unclipped,
                            tl.where(unclipped < clipped, d_clipped, 0.5 * (d_unclipped + d_clipped)))
            if HAS_DUAL:
                cap = -dual_clip * adv
                d_pg = tl.where(adv < 0, tl.where(pg < cap, d_pg, tl.where(pg == cap, 0.5 * d_pg, 0.0)), d_pg)
                pg = tl.where(adv < 0, tl.minimum(pg, cap, propagate_nan=tl.PropagateNan.ALL), pg)
        else:
            r = lp - ref_lp - adv_coeff * adv
            pg = r * r
            d_pg = 2.0 * r
        d = ref_lp - lp
        if KL_EST == 0:
            kl = -d
            d_kl = tl.full([BLOCK_N], 1.0, tl.float32)
        elif KL_EST == 1:
            kl = 0.5 * d * d
            d_kl = -d
        else:
            kl = _expm1_minus_x(d)
            d_kl = -(kl + d)
        loss = pg
        d_lp = d_pg
        if HAS_KL:
            loss += kl_coef * kl
            d_lp += kl_coef * d_kl
        g_ent = tl.zeros([BLOCK_N], tl.float32)
        if HAS_ENT:
            loss -= entropy_coef * ent
            g_ent = -entropy_coef * w
        g_lp = tl.where(valid, w * d_lp, 0.0)                              # ℓ ≡ 0 at an ignored label
        tl.store(kl_ptr + rows, kl, mask=row_ok)
        tl.store(wloss_ptr + rows, tl.where(live, w * loss, 0.0), mask=row_ok)   # H may be NaN where masked
        # pass 2: dz
        if WRITE_GRAD:
            _write_row_grad(x_ptr, dz_ptr, row_off, rows * stride_dz, row_ok, labels, valid, lse, m + u / s,
                            g_lp, g_ent, V, inv_temp, BLOCK_N, BLOCK_V)


@triton.jit
def _scale_kernel(dz_ptr, g_ptr, numel, BLOCK: tl.constexpr):
    """dz *= g in place (the backward of the loss). Every program returns at once when g == 1, so the
    backward of an unscaled loss moves no [N, V] bytes and needs no host sync to find that out."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        dz = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dz_ptr + offs, (dz * g).to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------

def policy_rows(logits2d, labels, weight, advantages, old_logprobs, ref_logprobs, cfg: ref.LossConfig, *,
                write_grad=True, out=None):
    """Row core of the policy loss, the fused counterpart of `fastrlhf.ref.policy_rows`.

    logits2d [n, V] (fp32/bf16/fp16); labels [n] (−100 where masked); weight [n] = m_t / Σ m over the
    whole micro-batch; advantages, old/ref log-probs [n]. Returns (ℓ [n], H [n], kl [n] fp32,
    total = Σ_t weight_t·loss_t (0-d fp32), dz [n, V]) with dz = ∂total/∂logits2d in logits2d's dtype
    (fp32 accumulation, one rounding at the store; ref returns fp32) or None when write_grad=False.
    `out`: a [n, V] buffer for dz, e.g. logits2d itself to overwrite the logits in place.
    cfg was checked when it was built (`LossConfig.__post_init__`) and is not checked again here.
    """
    labels = labels.long().contiguous()
    weight, advantages, old_logprobs, ref_logprobs = (
        t.float().contiguous() for t in (weight, advantages, old_logprobs, ref_logprobs))
    logits2d = token_logprobs.check_rows(logits2d, labels=labels, weight=weight, advantages=advantages,
                                         old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    n, v = logits2d.shape
    dz = None
    if write_grad:
        dz = torch.empty_like(logits2d) if out is None else out
        if dz.shape != logits2d.shape or dz.stride(1) != 1 or dz.device != logits2d.device:
            raise ValueError(f"out: expected shape {tuple(logits2d.shape)} on {logits2d.device} with unit "
                             f"stride over V, got shape {tuple(dz.shape)} strides {dz.stride()} on {dz.device}")
    lp, ent, kl, wloss = (torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(4))
    if n:
        block_n, block_v, num_warps, n_tiles, grid = token_logprobs.launch_config(n, v, logits2d.device,
                                                                                  2 if write_grad else 1)
        _policy_rows_kernel[grid](
            logits2d, logits2d if dz is None else dz, labels, weight, advantages, old_logprobs, ref_logprobs,
            lp, ent, kl, wloss, n, v, logits2d.stride(0), 0 if dz is None else dz.stride(0),
            1.0 / cfg.temperature, cfg.clip_low, cfg.clip_high,
            0.0 if cfg.dual_clip is None else cfg.dual_clip, cfg.adv_coeff, cfg.kl_coef, cfg.entropy_coef, n_tiles,
            IS_PPO=cfg.algo == "ppo", HAS_DUAL=cfg.dual_clip is not None, KL_EST=_KL_CODES[cfg.kl_estimator],
            HAS_KL=bool(cfg.kl_coef), HAS_ENT=bool(cfg.entropy_coef), WRITE_GRAD=write_grad,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)
    return lp, ent, kl, wloss.sum(), dz


def scale_(dz, g):
    """dz *= g (g a 0-d tensor on dz's device), free when g == 1; returns dz."""
    if not dz.is_contiguous():
        return dz.mul_(g.to(dz.dtype))
    block = 8192                       # 16 KiB of bf16 per program: a plain streaming kernel
    if dz.numel():
        _scale_kernel[(triton.cdiv(dz.numel(), block),)](dz, g.float().reshape(1), dz.numel(), BLOCK=block,
                                                           num_warps=8)
    return dz


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------

class _PolicyLossFromLogits(torch.autograd.Function):
    """total = Σ_t w_t·loss_t over logits2d [N, V]; dz is computed in forward, backward scales it in place
    (so the graph can be back-propagated once: retain_graph=True raises on the second backward)."""

    @staticmethod
    def forward(ctx, logits2d, labels, weight, advantages, old_logprobs, ref_logprobs, cfg, inplace):
        need_grad = logits2d.requires_grad
        lp, ent, kl, total, dz = policy_rows(logits2d, labels, weight, advantages, old_logprobs, ref_logprobs,
                                             cfg, write_grad=need_grad, out=logits2d if inplace else None)
        ctx.save_for_backward(dz)
        ctx.used = False
        ctx.mark_non_differentiable(lp, ent, kl)
        return total, lp, ent, kl

    @staticmethod
    def backward(ctx, g_total, *_):
        if ctx.used:
            raise RuntimeError("policy_loss_from_logits: the logits gradient was already consumed by an earlier "
                               "backward (it is scaled in place); retain_graph=True is not supported")
        ctx.used = True
        (dz,) = ctx.saved_tensors
        return scale_(dz, g_total), None, None, None, None, None, None, None


def policy_loss_from_logits(logits, labels, mask, advantages, old_logprobs, ref_logprobs, cfg: ref.LossConfig,
                            *, inplace=False, batch_probs=None):
    """loss = masked mean of (policy loss + kl_coef·KL − entropy_coef·H) − batch_entropy_coef·H_batch,
    the same function as `fastrlhf.ref.policy_loss_from_logits` -> (loss, out).

    logits [..., V] (batch entropy needs [B, T, V]); labels, mask, advantages, old/ref log-probs [...].
    inplace=True writes the logits gradient over the logits buffer (saves one [N, V] buffer; the logits
    are garbage afterwards, so nothing else may need them: not allowed with batch_entropy_coef).
    Differentiable w.r.t. the logits only: advantages and old/ref log-probs are treated as constants.
    batch_probs: None or a mini-batch's `BatchProbs`, as in `fastrlhf.ref.policy_loss_from_logits`.
    """
    if inplace and cfg.batch_entropy_coef:
        raise ValueError(f"inplace: expected False when cfg.batch_entropy_coef != 0 (batch entropy re-reads the "
                         f"logits in backward), got inplace=True with batch_entropy_coef={cfg.batch_entropy_coef}")
    v = logits.shape[-1]
    logits2d = logits.reshape(-1, v)
    if inplace and (logits2d.data_ptr() != logits.data_ptr() or logits2d.stride(1) != 1):
        raise ValueError("inplace: expected logits whose [N, V] view shares storage with unit stride over V, "
                         f"got strides {logits.stride()}")
    m = mask.reshape(-1).float()
    weight = m / m.sum().clamp_min(1.0)
    flat_labels = labels.reshape(-1).long()
    labels2d = torch.where(m > 0, flat_labels, torch.full_like(flat_labels, -100))
    # advantages and old/ref log-probs are constants here (rollout data): detached, no gradient reaches them
    loss, lp, ent, kl = _PolicyLossFromLogits.apply(
        logits2d, labels2d, weight, advantages.reshape(-1).detach(), old_logprobs.reshape(-1).detach(),
        ref_logprobs.reshape(-1).detach(), cfg, inplace)
    out = ref._loss_outputs(lp.view(mask.shape), ent.view(mask.shape), kl.view(mask.shape), mask, old_logprobs,
                            ref_logprobs, advantages, cfg)
    if cfg.batch_entropy_coef:
        h_term, out["batch_entropy"] = ref.batch_entropy_term(ops.impl("batch_entropy", logits.device), logits, mask,
                                                              cfg.temperature, batch_probs)
        loss = loss - cfg.batch_entropy_coef * h_term
    return loss, out
