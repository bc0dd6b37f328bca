"""Batch entropy over logits [B, T, V] (README, "Batch entropy"): the entropy of the batch-mean distribution per position.

    p̄_t = Σ_b w_bt·p_bt,  w_bt = m_bt / Σ_b m_bt,   H_batch = Σ_{t: Σ_b m_bt > 0} H(p̄_t) / n_pos
    ∂H_batch/∂z_bt = w_bt · p_bt ⊙ (g_t − Σ_u p_bt,u g_t,u),   g_t = −(log p̄_t + 1)/n_pos   (× 1/τ)

Forward, three launches: row statistics (lse per row, kernels/token_logprobs.py); one program per
(position t, vocabulary block) sums w_bt·p_bt over b into the [T, V] fp32 accumulator p̄ and writes
its block's share of −Σ p̄ log p̄; the host adds the shares (no atomics: deterministic).
Backward, persistent programs over row tiles: pass 1 gives Σ_u p_u g_u, pass 2 writes dz in the logits dtype.
Masked rows (w = 0) are never read. p̄ [T, V] fp32 is kept from forward to backward.
Given a larger batch's p̄ (a mini-batch's, `fastrlhf.ref.BatchProbs`), the forward writes these rows' part of
its H_batch instead, −Σ_v (Σ_b w_bt p_bt,v)·log p̄_t,v, and the backward reads that p̄ (README, "Batch entropy").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf import ref
from fastrlhf.kernels import token_logprobs


@triton.jit
def _batch_mean_kernel(x_ptr, lse_ptr, w_ptr, pbar_ptr, target_ptr, hpart_ptr, B, T, V, stride_b, stride_t,
                       n_blocks, inv_temp, HAS_TARGET: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // n_blocks
    blk = pid % n_blocks
    c = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = c < V
    acc = tl.zeros([BLOCK_V], tl.float32)
    row_ptr = x_ptr + t.to(tl.int64) * stride_t                       # 64-bit pointer steps over b
    for b in range(0, B):
        row = b * T + t
        w = tl.load(w_ptr + row)
        live_v = tl.where(w > 0, V, 0)                                  # masked rows are not read
        z = tl.load(row_ptr + c, mask=c < live_v, other=float("-inf")).to(tl.float32) * inv_temp
        lse = tl.load(lse_ptr + row)
        acc += tl.where(w > 0, w * tl.exp(z - lse), 0.0)
        row_ptr += stride_b
    if HAS_TARGET:   # these rows' part of a larger batch's H: −Σ_v acc_v·log p̄_v with that batch's p̄
        tgt = tl.load(target_ptr + t.to(tl.int64) * V + c, mask=in_v, other=0.0)
        tl.store(hpart_ptr + pid, -tl.sum(tl.where(tgt > 0, acc * tl.log(tgt), 0.0), axis=0))
    else:
        tl.store(pbar_ptr + t.to(tl.int64) * V + c, acc, mask=in_v)
        tl.store(hpart_ptr + pid, -tl.sum(tl.where(acc > 0, acc * tl.log(acc), 0.0), axis=0))


@triton.jit
def _probs_and_g(x_ptr, pbar_ptr, x_off, t, c, ld, lse, scale, V, inv_temp):
    """One vocabulary block of rows: p = softmax(z) from the saved lse, and g = −(log p̄ + 1)·scale
    (log p̄ taken as 0 where p̄ = 0); masked-out entries give p = 0."""
    z = tl.load(x_ptr + x_off[:, None] + c[None, :], mask=ld, other=float("-inf")).to(tl.float32) * inv_temp
    pbar = tl.load(pbar_ptr + t[:, None] * V + c[None, :], mask=ld, other=0.0)
    g = -(tl.where(pbar > 0, tl.log(pbar), 0.0) + 1.0) * scale
    p = tl.where(ld, tl.exp(z - lse[:, None]), 0.0)
    return p, g


@triton.jit
def _batch_entropy_bwd_kernel(x_ptr, dz_ptr, lse_ptr, w_ptr, pbar_ptr, scale_ptr, n_rows, T, V, stride_b, stride_t,
                              inv_temp, n_tiles, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)     # int64: rows·stride may pass 2^31
        row_ok = rows < n_rows
        t = rows % T
        x_off = (rows // T) * stride_b + t * stride_t
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
        need = row_ok & (w > 0)
        lse = tl.load(lse_ptr + rows, mask=need, other=0.0)
        scale = tl.load(scale_ptr)                                       # grad_out / n_pos
        cols = tl.arange(0, BLOCK_V)
        # pass 1: Σ_u p_u g_u
        pg = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            ld = need[:, None] & (c < V)[None, :]
            p, g = _probs_and_g(x_ptr, pbar_ptr, x_off, t, c, ld, lse, scale, V, inv_temp)
            pg += tl.sum(p * g, axis=1)
        # pass 2: dz = w·p·(g − Σ p g)/τ
        for start in range(0, V, BLOCK_V):
            c = start + cols
            ld = need[:, None] & (c < V)[None, :]
            p, g = _probs_and_g(x_ptr, pbar_ptr, x_off, t, c, ld, lse, scale, V, inv_temp)
            dz = (w * inv_temp)[:, None] * p * (g - pg[:, None])
            tl.store(dz_ptr + rows[:, None] * V + c[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (c < V)[None, :])


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------

def _check(logits, mask):
    if logits.dim() != 3:
        raise ValueError(f"logits: expected 3 dims [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits: expected float32/bfloat16/float16/float64, got {logits.dtype}")
    if tuple(mask.shape) != tuple(logits.shape[:2]) or mask.device != logits.device:
        raise ValueError(f"mask: expected shape {tuple(logits.shape[:2])} on {logits.device}, "
                         f"got {tuple(mask.shape)} on {mask.device}")
    return logits if logits.stride(2) == 1 else logits.contiguous()


def _weighted_sums(logits, w, temperature, target=None):
    """logits [B, T, V], w [B·T] -> (Σ_b w_bt·p_bt [T, V] fp32 (None with target), per-(t, block) shares of
    −Σ_v (Σ_b w p)·log q with q that sum, or `target` [T, V] when given, lse [B·T])."""
    B, T, V = logits.shape
    no_labels = torch.full((B * T,), -100, dtype=torch.long, device=logits.device)
    _, _, lse, _ = token_logprobs.row_stats(logits.reshape(B * T, V), no_labels, temperature)
    block_v = min(triton.next_power_of_2(V), token_logprobs.MAX_BLOCK_V)
    n_blocks = triton.cdiv(V, block_v)
    pbar = torch.zeros(T, V, dtype=torch.float32, device=logits.device) if target is None else None
    hpart = torch.empty(T * n_blocks, dtype=torch.float32, device=logits.device)
    _batch_mean_kernel[(T * n_blocks,)](
        logits, lse, w, target if pbar is None else pbar, target if target is not None else pbar, hpart, B, T, V,
        logits.stride(0), logits.stride(1), n_blocks, 1.0 / temperature, HAS_TARGET=target is not None,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return pbar, hpart.view(T, n_blocks).sum(1), lse


def batch_entropy_forward(logits, mask, temperature: float, stats=None):
    """logits [B, T, V], mask [B, T] -> (H_batch 0-d fp32, lse [B·T], w [B·T], p̄ [T, V] fp32, n_pos 0-d).
    stats = (p̄ [T, V], count [T], n_pos) of a larger batch holding these rows: then the value is these
    rows' part of its H_batch, −(1/n_pos)·Σ_t Σ_v (Σ_b w_bt p_bt,v)·log p̄_t,v with w = m/count
    (`fastrlhf.ref._BatchEntropy`), and p̄, n_pos are that batch's."""
    logits = _check(logits, mask)
    B, T, V = logits.shape
    m = mask.float()
    count = m.sum(0) if stats is None else stats[1]                   # [T]
    w = (m / count.clamp_min(1.0)).reshape(-1).contiguous()           # [B·T]
    n_pos = (count > 0).sum().float() if stats is None else stats[2]
    if B * T == 0 or V == 0:
        pbar = torch.zeros(T, V, dtype=torch.float32, device=logits.device) if stats is None else stats[0]
        return torch.zeros((), device=logits.device), w, w, pbar, n_pos
    pbar, h_t, lse = _weighted_sums(logits, w, temperature, None if stats is None else stats[0])
    if stats is not None:
        pbar = stats[0]
    h_batch = torch.where(count > 0, h_t, torch.zeros_like(h_t)).sum() / n_pos.clamp_min(1.0)
    return h_batch, lse, w, pbar, n_pos


def batch_probs(logits, mask, *, temperature=1.0, positions="all"):
    """The `fastrlhf.ref.BatchProbs` of logits [B, T, V], mask [B, T] (no gradient): the sums Σ_b m'·p from
    the same kernel, with weights m' in place of m/count."""
    x, m = ref.batch_entropy_rows(logits, mask, positions)
    with torch.no_grad():
        x = _check(x, m)
        keep = m.bool()
        B, T, V = x.shape
        if B * T == 0:
            probs = torch.zeros(T, V, dtype=torch.float32, device=x.device)
        else:
            probs, _, _ = _weighted_sums(x, keep.float().reshape(-1).contiguous(), float(temperature))
    return ref.BatchProbs(probs, keep.sum(0).float(), positions, temperature)


def batch_entropy_backward(logits, lse, w, pbar, n_pos, grad_out, temperature: float):
    """dH_batch/dlogits · grad_out, [B, T, V] contiguous in the logits dtype."""
    logits = logits if logits.stride(2) == 1 else logits.contiguous()
    B, T, V = logits.shape
    dz = torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    if B * T == 0 or V == 0:
        return dz.zero_()
    scale = (grad_out.float() / n_pos.clamp_min(1.0)).reshape(1)
    block_n, block_v, num_warps, n_tiles, grid = token_logprobs.launch_config(B * T, V, logits.device, 2)
    _batch_entropy_bwd_kernel[grid](
        logits, dz, lse, w, pbar, scale, B * T, T, V, logits.stride(0), logits.stride(1), 1.0 / temperature,
        n_tiles, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)
    return dz


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------

class _BatchEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, mask, temperature, stats):
        h_batch, lse, w, pbar, n_pos = batch_entropy_forward(logits, mask, temperature, stats)
        ctx.save_for_backward(logits, lse, w, pbar, n_pos)
        ctx.temperature = temperature
        return h_batch

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, w, pbar, n_pos = ctx.saved_tensors
        return batch_entropy_backward(logits, lse, w, pbar, n_pos, grad_out, ctx.temperature), None, None, None


def batch_entropy(logits, mask, *, temperature=1.0, stats=None):
    """logits [B, T, V], mask [B, T] -> scalar fp32 H_batch (0 when the mask is empty), differentiable;
    with stats = (p̄, count, n_pos) of a larger batch, these rows' part of its H_batch. The same function as
    `fastrlhf.ref.batch_entropy`."""
    return _BatchEntropy.apply(logits, mask, float(temperature), stats)
