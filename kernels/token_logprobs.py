"""Token log-probs and entropy over logits [..., V]: one pass forward, one recomputing pass backward.

Per row (README, "Losses"): z = x/τ, m = max z, s = Σ e^{z−m}, u = Σ (z−m)·e^{z−m} (fp32), then
    lse = m + log s,   ℓ = z_y − lse,   Σ p z = m + u/s,   H = lse − Σ p z = log s − u/s.
Accumulating u around the running max (instead of Σ z e^{z−m}) keeps H free of the cancellation
of `lse − Σpz` when |z| is large. Backward writes, per row,
    dz = (gℓ·(onehot(y) − p) + gH·(−p ⊙ (z − Σpz))) / τ     in the logits dtype,
from the saved [N] fp32 `lse` and `Σpz`: logits are read once forward and once backward.

A tile is BLOCK_N rows (1 for large V, more when V is small); a program walks the vocabulary in
blocks of BLOCK_V. The grid is persistent and 1-D (axis 0): min(tiles, SMs × PROGRAMS_PER_SM)
programs loop over tiles, so any row count works and the rows in flight are bounded (which keeps a
two-pass kernel's second read of a row in L2). Offsets are int64 (N·V may exceed 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocabulary block: 4096 elements = 8 KiB bf16 / 16 KiB fp32 per row per step, 16 elements per
# thread at 8 warps (the usual sweet spot for a bandwidth-bound row reduction on A100/H100).
MAX_BLOCK_V = 4096
# Rows × block elements held by one program when V is small (several short rows per program).
MAX_TILE = 4096
# Persistent grid size per SM: one-pass kernels / kernels that read each row twice (fewer rows in flight,
# so the second read hits L2: 132 SMs × 2 × 300 KB rows (V = 151936 bf16) ≈ 80 MB vs 50 MB of H100 L2).
# Starting points, to be tuned on the GPU.
PROGRAMS_PER_SM = {1: 4, 2: 2}
# Under the interpreter (CPU tensors): a small grid, so tests also exercise the loop over tiles.
MAX_PROGRAMS_CPU = 8


@triton.jit
def _online_row_stats(x_ptr, row_off, row_ok, V, inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows x[row_off + 0..V) -> (m, s, u) [BLOCK_N] fp32: max of z, Σ e^{z−m}, Σ (z−m)e^{z−m}.

    −inf logits contribute 0 (never 0·∞); +inf or NaN logits make s (hence every result) NaN."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        ok = row_ok[:, None] & (c < V)[None, :]
        z = tl.load(x_ptr + row_off[:, None] + c[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        z = z * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # all −inf so far: keep 0·
        alpha = tl.exp(m - m_safe)
        # Σ (z − m')e^{z−m'} over earlier blocks = α·(u + (m − m')·s)
        u = alpha * (u + tl.where(s > 0, (m - m_safe) * s, 0.0))
        zc = z - m_safe[:, None]
        e = tl.exp(zc)
        u += tl.sum(tl.where(e > 0, zc * e, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    return m, s, u


@triton.jit
def _write_row_grad(x_ptr, dz_ptr, row_off, dz_off, row_ok, labels, valid, lse, pz, g_lp, g_ent, V, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """dz = (gℓ·(onehot(y) − p) − gH·p ⊙ (z − Σpz))/τ for BLOCK_N rows, stored in dz's dtype.

    Rows with gℓ = gH = 0 (masked tokens) are written as zeros without reading the logits.
    dz may alias x: each block is read before it is written, by the same program."""
    cols = tl.arange(0, BLOCK_V)
    need = row_ok & ((g_lp != 0) | (g_ent != 0))
    for start in range(0, V, BLOCK_V):
        c = start + cols
        in_v = (c < V)[None, :]
        z = tl.load(x_ptr + row_off[:, None] + c[None, :], mask=need[:, None] & in_v,
                    other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.exp(z - lse[:, None])
        zc = tl.where(p > 0, z - pz[:, None], 0.0)                       # p = 0 (z = −inf): no 0·∞
        g = -p * (g_lp[:, None] + g_ent[:, None] * zc)
        g = tl.where((c[None, :] == labels[:, None]) & valid[:, None], g + g_lp[:, None], g)
        g = tl.where(need[:, None], g * inv_temp, 0.0)
        tl.store(dz_ptr + dz_off[:, None] + c[None, :], g.to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & in_v)


@triton.jit
def _row_ids(tile, n_rows, stride, BLOCK_N: tl.constexpr):
    """The rows of a tile, whether each exists, and their int64 element offsets."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)     # int64: rows·stride may pass 2^31
    row_ok = rows < n_rows
    return rows, row_ok, rows * stride


@triton.jit
def _logprobs_entropy_fwd_kernel(x_ptr, labels_ptr, lp_ptr, ent_ptr, lse_ptr, pz_ptr, n_rows, V, stride_x,
                                 inv_temp, ignore_index, n_tiles, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, row_ok, row_off = _row_ids(tile, n_rows, stride_x, BLOCK_N)
        m, s, u = _online_row_stats(x_ptr, row_off, row_ok, V, inv_temp, BLOCK_N, BLOCK_V)
        log_s = tl.log(s)
        lse = m + log_s
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < V) & row_ok
        z_y = tl.load(x_ptr + row_off + labels, mask=valid, other=0.0).to(tl.float32) * inv_temp
        tl.store(lp_ptr + rows, tl.where(valid, z_y - lse, 0.0), mask=row_ok)
        tl.store(ent_ptr + rows, log_s - u / s, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(pz_ptr + rows, m + u / s, mask=row_ok)


@triton.jit
def _logprobs_entropy_bwd_kernel(x_ptr, dz_ptr, labels_ptr, lse_ptr, pz_ptr, glp_ptr, gent_ptr, n_rows, V,
                                 stride_x, stride_dz, inv_temp, ignore_index, n_tiles,
                                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, row_ok, row_off = _row_ids(tile, n_rows, stride_x, BLOCK_N)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < V) & row_ok
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        pz = tl.load(pz_ptr + rows, mask=row_ok, other=0.0)
        g_lp = tl.where(valid, tl.load(glp_ptr + rows, mask=row_ok, other=0.0), 0.0)   # ℓ ≡ 0 when ignored
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        _write_row_grad(x_ptr, dz_ptr, row_off, rows * stride_dz, row_ok, labels, valid, lse, pz, g_lp, g_ent,
                        V, inv_temp, BLOCK_N, BLOCK_V)


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------

def launch_config(n_rows: int, vocab: int, device: torch.device, reads_per_row: int = 1):
    """(BLOCK_N rows per tile, BLOCK_V vocab block, num_warps, n_tiles, grid) for a row kernel over
    [n_rows, vocab] whose programs read each row `reads_per_row` (1 or 2) times."""
    block_v = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)
    block_n = max(1, min(triton.next_power_of_2(max(n_rows, 1)), MAX_TILE // block_v))
    num_warps = 8 if block_n * block_v >= 2048 else 4
    n_tiles = triton.cdiv(n_rows, block_n)
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM[reads_per_row]
    else:
        cap = MAX_PROGRAMS_CPU
    return block_n, block_v, num_warps, n_tiles, (max(1, min(n_tiles, cap)),)


def check_rows(logits2d: torch.Tensor, **per_row: torch.Tensor):
    """logits2d [n, V] with unit stride over V (else a contiguous copy); every per_row tensor [n] on the
    same device. Returns logits2d."""
    if logits2d.dim() != 2:
        raise ValueError(f"logits2d: expected 2 dims [n, V], got shape {tuple(logits2d.shape)}")
    if logits2d.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits2d: expected float32/bfloat16/float16/float64, got {logits2d.dtype}")
    n = logits2d.shape[0]
    for name, t in per_row.items():
        if t.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) (one value per row of logits2d), "
                             f"got {tuple(t.shape)}")
        if t.device != logits2d.device:
            raise ValueError(f"{name}: expected a tensor on {logits2d.device}, got {t.device}")
    return logits2d if logits2d.stride(1) == 1 else logits2d.contiguous()


def row_stats(logits2d, labels, temperature: float, ignore_index: int = -100):
    """logits2d [n, V], labels [n] int64 -> (ℓ, H, lse, Σpz), each [n] fp32; ℓ = 0 at ignored labels."""
    logits2d = check_rows(logits2d, labels=labels)
    n, v = logits2d.shape
    lp, ent, lse, pz = (torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(4))
    if n == 0:
        return lp, ent, lse, pz
    block_n, block_v, num_warps, n_tiles, grid = launch_config(n, v, logits2d.device)
    _logprobs_entropy_fwd_kernel[grid](
        logits2d, labels, lp, ent, lse, pz, n, v, logits2d.stride(0), 1.0 / temperature, ignore_index, n_tiles,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)
    return lp, ent, lse, pz


def row_grad(logits2d, labels, lse, pz, g_logprob, g_entropy, temperature: float, ignore_index: int = -100):
    """dz [n, V] in logits2d's dtype from the row statistics and the per-row upstream gradients gℓ, gH [n] fp32."""
    logits2d = check_rows(logits2d, labels=labels, lse=lse, pz=pz, g_logprob=g_logprob, g_entropy=g_entropy)
    n, v = logits2d.shape
    dz = torch.empty_like(logits2d)
    if n == 0:
        return dz
    block_n, block_v, num_warps, n_tiles, grid = launch_config(n, v, logits2d.device)
    _logprobs_entropy_bwd_kernel[grid](
        logits2d, dz, labels, lse, pz, g_logprob, g_entropy, n, v, logits2d.stride(0), dz.stride(0),
        1.0 / temperature, ignore_index, n_tiles, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)
    return dz


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------

class _LogprobsEntropy(torch.autograd.Function):
    """(ℓ, H) [N] fp32 of logits2d [N, V]; saves [N] lse and Σpz, backward recomputes p per block."""

    @staticmethod
    def forward(ctx, logits2d, labels, temperature, ignore_index):
        lp, ent, lse, pz = row_stats(logits2d, labels, temperature, ignore_index)
        ctx.save_for_backward(logits2d, labels, lse, pz)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return lp, ent

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        logits2d, labels, lse, pz = ctx.saved_tensors
        zeros = torch.zeros_like(lse)
        g_logprob = zeros if g_logprob is None else g_logprob.float().contiguous()
        g_entropy = zeros if g_entropy is None else g_entropy.float().contiguous()
        dz = row_grad(logits2d, labels, lse, pz, g_logprob, g_entropy, ctx.temperature, ctx.ignore_index)
        return dz, None, None, None


def logprobs_and_entropy(logits, labels, *, temperature=1.0, ignore_index=-100):
    """logits [..., V] (fp32/bf16/fp16), labels [...] -> (log p(label), entropy), float32 [...].

    The log-prob is 0 (and its upstream gradient ignored) where labels == ignore_index."""
    v = logits.shape[-1]
    lp, ent = _LogprobsEntropy.apply(logits.reshape(-1, v), labels.reshape(-1).long().contiguous(),
                                     float(temperature), int(ignore_index))
    return lp.view(labels.shape), ent.view(labels.shape)
