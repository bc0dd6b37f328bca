"""Fused linear path: from hidden states to log-probs / policy loss and gradients without ever
holding the [N, V] logits (README, "Fused linear path").

Shapes: hidden [..., H] (N tokens once flattened), weight [V, H] (the output layer, possibly tied
to the input embedding), bias [V] or None, logits x = hidden @ weightᵀ + bias.

The algorithm is the same on every device, in plain PyTorch GEMMs plus the row core
`ops.impl("policy_rows", device)` (the Triton kernel on CUDA; on the torch backend an in-place
version of `ref.policy_rows`, `_TorchRows`). Tokens are processed in chunks of `rows`; per chunk

    x   = h @ Wᵀ + b                        [rows, V], the only vocabulary-sized buffers
    ℓ, H, KL, dz = row core(x)              dz = ∂(Σ_t w_t·loss_t)/∂x, known in forward
    grad_h[chunk] = dz @ W                  [rows, H]
    grad_W       += dzᵀ @ h                 [V, H]
    grad_b       += Σ_rows dz               [V]

= 3 GEMMs, 6·N·H·V FLOPs. The policy-loss backward only scales these by the upstream scalar.
`fused_linear_logprobs` cannot know its upstream gradient in forward, so its backward recomputes
each chunk's logits (4 GEMMs in all when trained); under `torch.no_grad()` it is one GEMM pass.

Batch entropy couples the rows at one position t ([B, T, V] semantics): a first pass accumulates
p̄ [T, V] in float32, then the main pass adds its gradient term (README, "Batch entropy") to dz. Given a
mini-batch's statistics (`batch_probs=`, from `fused_linear_batch_probs` over its micro-batches) there is
no first pass: the main pass uses that p̄.

Chunk size (`chunk_size=None`): rows such that one float32 [rows, V] buffer fits a budget, 16 MiB
on CPU, min(free/16, 128 MiB) on CUDA (`choose_chunk_size`); the caller can override it.
grad_W is accumulated in float32 when asked (`accum_fp32=True`), by default when V ≥ 250k.

Mixed dtypes (`matmul_dtype`): hidden states in an autocast dtype (bf16) with a float32 output layer are
accepted; the GEMMs run in torch.promote_types(hidden, weight) (None, the default: float32 there),
in a given dtype, or in the autocast dtype when autocast is on ("autocast": bit-parity with a trainer
whose head runs under autocast). The inputs are cast once before the chunk loop (autograd casts their
gradients back), and autocast is off inside: each GEMM runs in exactly that dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops, ref
from .ops import _check_first, _check_float, _check_labels, _check_mask, _check_same

# One float32 [rows, V] buffer of the row core fits in this budget (the torch row core holds 2 such
# buffers plus short-lived [rows] vectors, so a CPU chunk costs ~32 MiB whatever N is; measured peak
# extra memory at N=4096, H=256, V=65536: ~180 MiB including the 64 MiB grad_W).
CPU_CHUNK_BYTES = 16 * 2**20
CUDA_CHUNK_BYTES = 128 * 2**20
# grad_W is accumulated in float32 by default from this vocabulary size on (precision
# above 250k vocabularies); below, in the weight's dtype.
FP32_ACCUM_VOCAB = 250_000
# fp32 accumulation of a low-precision dzᵀ @ h is done in vocabulary slices of this many rows so the
# temporary stays small.
ACCUM_SLICE = 16384


def choose_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: one float32 [rows, V] buffer ≤ budget, budget = 16 MiB on CPU and
    min(free / 16, 128 MiB) on CUDA (torch.cuda.mem_get_info); rounded down to a multiple of 64
    rows (GEMM tiles) when ≥ 64; at least 1 and at most n_tokens."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 16, CUDA_CHUNK_BYTES)
    else:
        budget = CPU_CHUNK_BYTES
    rows = budget // (4 * max(vocab, 1))
    if rows >= 64:
        rows -= rows % 64
    return int(max(1, min(n_tokens, rows)))


def _check_linear(hidden, weight, bias, chunk_size):
    """Shapes, dtypes and devices only (no value is read)."""
    _check_first("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H], got a 0-dim tensor")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected a tensor on {hidden.device} (like hidden), got {weight.device}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (H = hidden.shape[-1]) with a vocabulary "
                         f"of V >= 1 tokens, got {tuple(weight.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        _check_same("bias", bias, weight.shape[:1], hidden.device)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")


MATMUL_DTYPES = (None, "autocast", torch.float32, torch.bfloat16, torch.float16, torch.float64)


def matmul_dtype_for(matmul_dtype, hidden, weight, bias=None):
    """The dtype the GEMMs run in: None -> the promotion of the inputs' dtypes; "autocast" -> the autocast
    dtype of hidden's device when autocast is on there, else as None; a torch floating dtype -> itself."""
    if not any(matmul_dtype is d or matmul_dtype == d for d in MATMUL_DTYPES):
        raise ValueError(f"matmul_dtype: expected one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    if matmul_dtype == "autocast" and torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    if isinstance(matmul_dtype, torch.dtype):
        return matmul_dtype
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _cast(dtype, *tensors):
    """Each tensor in `dtype` (autograd casts its gradient back); None stays None."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _logits(h, weight, bias):
    """h [n, H] -> x = h @ Wᵀ + b [n, V] in h's dtype."""
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def _needs(*tensors):
    grad = torch.is_grad_enabled()
    return tuple(bool(grad and t is not None and t.requires_grad) for t in tensors)


class _Grads:
    """Gradient buffers filled chunk by chunk: grad_h [N, H], grad_W [V, H], grad_b [V] (fp32)."""

    def __init__(self, hidden2d, weight, bias, needs, accum_fp32):
        need_h, need_w, need_b = needs
        self.h = torch.empty_like(hidden2d) if need_h else None
        wide = (torch.float32, torch.float64)
        fp32 = accum_fp32 if accum_fp32 is not None else weight.shape[0] >= FP32_ACCUM_VOCAB
        w_dtype = weight.dtype if weight.dtype in wide or not fp32 else torch.float32
        self.w = torch.zeros(weight.shape, dtype=w_dtype, device=weight.device) if need_w else None
        b_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.b = torch.zeros(weight.shape[0], dtype=b_dtype, device=weight.device) if need_b else None

    def add(self, s, e, dz, h, weight):
        """dz [n, V] (compute dtype) of rows s:e with inputs h [n, H]."""
        if self.h is not None:
            torch.mm(dz, weight, out=self.h[s:e])
        if self.w is not None:
            if self.w.dtype == dz.dtype:
                self.w.addmm_(dz.t(), h)
            else:  # fp32 accumulator of a low-precision product, in vocabulary slices
                for v0 in range(0, dz.shape[1], ACCUM_SLICE):
                    v1 = min(dz.shape[1], v0 + ACCUM_SLICE)
                    self.w[v0:v1] += (dz[:, v0:v1].t() @ h).float()
        if self.b is not None:
            self.b += dz.sum(0, dtype=self.b.dtype)


# ----------------------------------------------------------------------------
# The torch row core: the math of ref.logprobs_and_entropy / ref.policy_rows in reused buffers
# ----------------------------------------------------------------------------
# On the torch backend the fused path runs this in-place version of the reference row core: two
# float32 [rows, V] buffers reused by every chunk (the reference allocates ~6 fresh ones per chunk;
# on the CPU every fresh buffer costs page faults, which made the fused path 2.5× slower than
# materialized logits at the CPU target shape N=4096, H=256, V=65536). Only the softmax statistics are
# written here (into the buffers); the per-token loss and its derivatives are `ref.token_loss_grads` and
# dz is `ref.row_grad_`, the reference's own functions. Logits come out of a GEMM, so no −inf logit
# needs the reference's 0·log 0 handling; a masked row of NaN (NaN hidden states) gets a gradient of 0,
# selected by row_grad_, and its hidden states are selected out of grad_W (`_policy_pass`).

class _TorchRows:
    def __init__(self, rows, vocab, device):
        self.z = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        self.p = torch.empty_like(self.z)

    def logits(self, h, weight, bias, temperature):
        """h [n, H] -> z = (h Wᵀ + b)/τ, float32 [n, V], a view of the z buffer."""
        z = self.z[:h.shape[0]]
        if h.dtype == torch.float32:
            torch.mm(h, weight.t(), out=z) if bias is None else torch.addmm(bias, h, weight.t(), out=z)
        else:
            z.copy_(_logits(h, weight, bias))
        return z.div_(temperature) if temperature != 1.0 else z

    def softmax(self, h, weight, bias, temperature):
        """h [n, H] -> (z − max_v z, p = softmax(z), log Σ_v e^{z_v − max}, max_v z), z = x/τ."""
        z = self.logits(h, weight, bias, temperature)
        p = self.p[:h.shape[0]]
        zmax = z.amax(-1, keepdim=True)
        z.sub_(zmax)
        torch.exp(z, out=p)
        s = p.sum(-1)
        p.div_(s[:, None])
        return z, p, torch.log(s), zmax.view(-1)

    @staticmethod
    def _labels(labels, vocab, ignore_index):
        valid = (labels >= 0) & (labels < vocab) & (labels != ignore_index)
        return valid, torch.where(valid, labels, torch.zeros_like(labels))

    def stats(self, h, weight, bias, labels, temperature, ignore_index):
        """-> (ℓ [n], H [n], lse [n], state for `grad`); ℓ = 0 where the label is ignored / out of range."""
        z, p, lse, zmax = self.softmax(h, weight, bias, temperature)
        pz = torch.bmm(p[:, None, :], z[:, :, None]).view(-1)              # Σ_v p_v z_v, no temporary
        valid, safe = self._labels(labels, z.shape[1], ignore_index)
        lp = torch.where(valid, z.gather(-1, safe[:, None]).squeeze(-1) - lse, torch.zeros_like(lse))
        return lp, lse - pz, lse + zmax, (z, p, pz, valid, safe)

    def recompute(self, h, weight, bias, labels, lse, entropy, temperature, ignore_index):
        """`stats`' state from the saved lse and H: p = e^{z − lse}, Σ p z = lse − H (one exp pass)."""
        z = self.logits(h, weight, bias, temperature)
        p = torch.sub(z, lse[:, None], out=self.p[:h.shape[0]]).exp_()
        valid, safe = self._labels(labels, z.shape[1], ignore_index)
        return z, p, lse - entropy, valid, safe

    @staticmethod
    def grad(state, g_lp, g_ent, temperature):
        """dz [n, V] float32 written over the z buffer: `ref.row_grad_`, the reference's formula, on this
        core's buffers (z − Σ p z is formed in place over z − max z)."""
        z, p, pz, valid, safe = state
        return ref.row_grad_(z.sub_(pz[:, None]), p, g_lp, g_ent, valid, safe, temperature)


# ----------------------------------------------------------------------------
# Log-probs (and entropy) of the labels: forward one GEMM pass, backward recomputes chunk logits
# (the torch row core saves lse and H per token, so its backward needs one exp pass per chunk)
# ----------------------------------------------------------------------------

def _logprobs_pass(hidden2d, weight, bias, labels, temperature, ignore_index, rows):
    n = hidden2d.shape[0]
    fn = ops.impl("logprobs_and_entropy", hidden2d.device)
    torch_rows = _TorchRows(rows, weight.shape[0], hidden2d.device) if fn is ref.logprobs_and_entropy else None
    lp = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
    ent = torch.empty_like(lp)
    lse = torch.empty_like(lp) if torch_rows is not None else None
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            if torch_rows is not None:
                lp[s:e], ent[s:e], lse[s:e], _ = torch_rows.stats(hidden2d[s:e], weight, bias, labels[s:e],
                                                                  temperature, ignore_index)
            else:
                lp[s:e], ent[s:e] = fn(_logits(hidden2d[s:e], weight, bias), labels[s:e],
                                       temperature=temperature, ignore_index=ignore_index)
    return lp, ent, lse


class _FusedLinearLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, temperature, ignore_index, rows, accum_fp32):
        lp, ent, lse = _logprobs_pass(hidden2d, weight, bias, labels, temperature, ignore_index, rows)
        ctx.save_for_backward(hidden2d, weight, bias, labels, ent, lse)
        ctx.args = (temperature, ignore_index, rows, accum_fp32)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden2d, weight, bias, labels, entropy, lse = ctx.saved_tensors
        temperature, ignore_index, rows, accum_fp32 = ctx.args
        n = hidden2d.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden2d.device)
        g_lp = zeros if g_lp is None else g_lp.float()
        g_ent = zeros if g_ent is None else g_ent.float()
        grads = _Grads(hidden2d, weight, bias, ctx.needs_input_grad[:3], accum_fp32)
        fn = ops.impl("logprobs_and_entropy", hidden2d.device)
        torch_rows = _TorchRows(rows, weight.shape[0], hidden2d.device) if lse is not None else None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h = hidden2d[s:e]
            if torch_rows is not None:
                state = torch_rows.recompute(h, weight, bias, labels[s:e], lse[s:e], entropy[s:e], temperature,
                                             ignore_index)
                dz = torch_rows.grad(state, g_lp[s:e], g_ent[s:e], temperature)
            else:  # the dispatched op's own backward
                with torch.enable_grad():
                    x = _logits(h, weight, bias).requires_grad_()
                    lp, ent = fn(x, labels[s:e], temperature=temperature, ignore_index=ignore_index)
                    (dz,) = torch.autograd.grad((lp, ent), (x,), (g_lp[s:e], g_ent[s:e]))
            grads.add(s, e, dz.to(h.dtype), h, weight)
        return (grads.h, None if grads.w is None else grads.w.to(weight.dtype),
                None if grads.b is None else grads.b.to(bias.dtype), None, None, None, None, None)


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, accum_fp32=None, matmul_dtype=None):
    """log p(label) of x = hidden @ weightᵀ + bias under softmax(x/τ), without holding [N, V].

    hidden [..., H], weight [V, H], labels [...] (ignore_index allowed), bias [V] or None.
    Returns float32 log-probs [...] (0 at ignore_index), and the entropy [...] if return_entropy.
    Differentiable w.r.t. hidden, weight and bias; under torch.no_grad() (or when none of them
    requires grad) it costs one GEMM pass and no gradient buffers. chunk_size: tokens per chunk
    (None: `choose_chunk_size`). accum_fp32: accumulate grad_W in float32 (None: when V ≥ 250k).
    matmul_dtype: the GEMMs' dtype (module docstring; None: the inputs' promoted dtype).
    """
    _check_linear(hidden, weight, bias, chunk_size)
    ops._check_temperature(temperature)
    dtype = matmul_dtype_for(matmul_dtype, hidden, weight, bias)
    vocab, width = weight.shape
    _check_same("labels", labels, hidden.shape[:-1], hidden.device)
    _check_labels("labels", labels, (*hidden.shape[:-1], vocab), ignore_index)
    hidden2d, weight, bias = _cast(dtype, hidden.reshape(-1, width), weight, bias)
    labels1d = labels.reshape(-1).long()
    rows = chunk_size or choose_chunk_size(hidden2d.shape[0], vocab, hidden.device)
    args = (float(temperature), int(ignore_index), rows)
    with torch.autocast(hidden.device.type, enabled=False):
        if any(_needs(hidden2d, weight, bias)):
            lp, ent = _FusedLinearLogprobs.apply(hidden2d, weight, bias, labels1d, *args, accum_fp32)
        else:
            lp, ent, _ = _logprobs_pass(hidden2d, weight, bias, labels1d, *args)
    lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    return (lp, ent) if return_entropy else lp


# ----------------------------------------------------------------------------
# Policy loss: gradients computed in forward, chunk by chunk; backward is a scale
# ----------------------------------------------------------------------------

def _probs_sums(hidden2d, weight, bias, wrow, pos, G, temperature, rows):
    """Σ_i wrow_i·softmax(x_i/τ) into group pos_i -> [G, V] float32, over hidden2d [N, H] chunk by chunk;
    rows with wrow = 0 (masked) are selected out (NaN hidden states there reach nothing)."""
    n, vocab = hidden2d.shape[0], weight.shape[0]
    sums = torch.zeros(G, vocab, dtype=torch.float32, device=hidden2d.device)
    torch_rows = _TorchRows(min(rows, max(n, 1)), vocab, hidden2d.device)
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            _, p, _, _ = torch_rows.softmax(hidden2d[s:e], weight, bias, temperature)
            w = wrow[s:e, None]
            sums.index_add_(0, pos[s:e], p.mul_(w).masked_fill_(w == 0, 0.0))
    return sums


def _bent_layout(mask, positions):
    """mask [B, T] -> (m' [N] float32, group of each row [N] int64, G): "all": m' = mask, group t, G = T;
    "last": m' = 1 at each row's last valid token, group 0, G = 1 (README, "Batch entropy")."""
    B, T = mask.shape
    if positions == "all":
        return mask.float().reshape(-1), torch.arange(T, device=mask.device).repeat(B), T
    return ref.last_token_mask(mask).float().reshape(-1), torch.zeros(B * T, dtype=torch.long, device=mask.device), 1


def fused_linear_batch_probs(hidden, weight, mask, *, bias=None, temperature=1.0, positions="all", chunk_size=None,
                             matmul_dtype=None):
    """`fastrlhf.batch_probs(hidden @ weightᵀ + bias, mask, ...)` without the logits: the `BatchProbs`
    (sums Σ_b m'·softmax(x/τ) and Σ_b m') of hidden [B, T, H], mask [B, T], no gradient. One GEMM pass over
    the rows that count (the last tokens' only for positions "last"), in the dtype `matmul_dtype` chooses as
    for `fused_linear_policy_loss` (mixed inputs such as bf16 hidden states with an fp32 weight work)."""
    _check_linear(hidden, weight, bias, chunk_size)
    dtype = matmul_dtype_for(matmul_dtype, hidden, weight, bias)
    ops._check_temperature(temperature)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected 3 dims [B, T, H], got shape {tuple(hidden.shape)}")
    _check_mask("mask", mask, hidden.shape[:2], hidden.device)
    ops._check_choice("positions", positions, ref.BATCH_ENTROPY_POSITIONS)
    h, m = ref.batch_entropy_rows(hidden.detach(), mask, positions)
    m1, pos, G = _bent_layout(m, "all")
    h2d, w, b = _cast(dtype, h.reshape(-1, h.shape[-1]), weight.detach(), None if bias is None else bias.detach())
    rows = chunk_size or choose_chunk_size(h2d.shape[0], weight.shape[0], hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):   # the GEMMs run in `dtype`, as the loss's do
        probs = _probs_sums(h2d, w, b, m1, pos, G, float(temperature), rows)
    return ref.BatchProbs(probs, m.float().sum(0), positions, temperature)


def _batch_entropy_setup(hidden2d, weight, bias, mask, stats, temperature, rows):
    """Batch entropy's constants for the main pass -> (g [G, V] = −(log p̄ + 1)/n_pos, w [N] = m'/count of
    the row's group, group [N], 1/n_pos). stats None: p̄ of these rows (positions "all"), from a first pass;
    else the mini-batch's `BatchProbs` (README, "Batch entropy")."""
    m1, pos, G = _bent_layout(mask, "all" if stats is None else stats.positions)
    if stats is None:
        count = torch.zeros(G, device=mask.device).index_add_(0, pos, m1)           # Σ_b m_bt [T]
        wpos = m1 / count.clamp_min(1.0)[pos]
        pbar, n_pos = _probs_sums(hidden2d, weight, bias, wpos, pos, G, temperature, rows), (count > 0).sum().float()
    else:
        pbar, n_pos = stats.mean(), stats.n_groups()
        wpos = m1 / stats.count.clamp_min(1.0)[pos]
    inv = 1.0 / n_pos.clamp_min(1.0)
    g = torch.where(pbar > 0, torch.log(pbar), torch.zeros_like(pbar)).add_(1.0).mul_(-inv)   # one [G, V] buffer
    return g, wpos, pos, inv


def _batch_entropy_dz(p, g_rows, w_rows, temperature):
    """∂H_batch/∂x for one chunk -> (w·p·(g − Σ_u p_u g_u)/τ [n, V], Σ_u p_u g_u [n, 1]) with
    p = softmax(x/τ) [n, V] float32, g_rows [n, V] (a fresh gather, overwritten), w_rows [n]; exactly 0
    (selected) on masked rows (w = 0). With g = −(log p̄ + 1)/n_pos this is the gradient of H_batch w.r.t.
    row i for the p̄ of any batch holding it: ∂H(p̄)/∂p̄ = −(log p̄ + 1),
    ∂p̄/∂z_i = w_i·(diag(p_i) − p_i p_iᵀ)."""
    pg = torch.bmm(p[:, None, :], g_rows[:, :, None]).view(-1, 1)
    w = w_rows[:, None]
    return g_rows.sub_(pg).mul_(p).mul_(w / temperature).masked_fill_(w == 0, 0.0), pg


def _policy_pass(hidden2d, weight, bias, labels, wts, adv, old, ref_lp, cfg, rows, bent, grads):
    """One pass over the token chunks -> (Σ_t w_t·loss_t, ℓ, H, KL, H_part); fills `grads` when not None.
    bent = `_batch_entropy_setup`'s (g, w, group, 1/n_pos) when batch entropy is on; then H_part =
    Σ_i w_i·CE(p_i, p̄)/n_pos = Σ_i w_i·(Σ_v p_i,v g_v + 1/n_pos), these rows' part of H_batch (README,
    "Batch entropy"; all of it when p̄ is theirs), else 0."""
    n = hidden2d.shape[0]
    row_core = ops.impl("policy_rows", hidden2d.device)
    torch_rows = _TorchRows(rows, weight.shape[0], hidden2d.device) if row_core is ref.policy_rows else None
    lp = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
    ent, kl = torch.empty_like(lp), torch.empty_like(lp)
    total = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
    h_part = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h = hidden2d[s:e]
            if torch_rows is not None:
                lp[s:e], ent[s:e], _, state = torch_rows.stats(h, weight, bias, labels[s:e], cfg.temperature, -100)
                t, kl[s:e], g_lp, g_ent = ref.token_loss_grads(lp[s:e], ent[s:e], wts[s:e], adv[s:e],
                                                               ref._rows(old, s, e), ref._rows(ref_lp, s, e), cfg)
                dz = None if grads is None else torch_rows.grad(state, g_lp, g_ent, cfg.temperature)
                p = state[1]
            else:
                x = _logits(h, weight, bias)
                lp[s:e], ent[s:e], kl[s:e], t, dz = row_core(x, labels[s:e], wts[s:e], adv[s:e],
                                                              ref._rows(old, s, e), ref._rows(ref_lp, s, e), cfg)
                p = torch.softmax(x.float() / cfg.temperature, dim=-1) if bent is not None else None
            total += t
            bent_dz = None
            if bent is not None:
                g, wpos, pos, inv = bent
                bent_dz, pg = _batch_entropy_dz(p, g[pos[s:e]], wpos[s:e], cfg.temperature)
                w = wpos[s:e]
                h_part += torch.where(w > 0, w * (pg.view(-1) + inv), 0.0).sum()
            if grads is None:
                continue
            if bent_dz is not None:
                dz = dz.float().sub_(bent_dz, alpha=cfg.batch_entropy_coef)
            # masked rows have dz = 0; their hidden states are selected out of grad_W too (NaN there: 0·NaN)
            grads.add(s, e, dz.to(h.dtype), torch.where((wts[s:e] > 0)[:, None], h, 0.0), weight)
    return total, lp, ent, kl, h_part


class _FusedLinearPolicyLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, wts, adv, old, ref_lp, cfg, rows, bent, accum_fp32):
        grads = _Grads(hidden2d, weight, bias, ctx.needs_input_grad[:3], accum_fp32)
        total, lp, ent, kl, h_part = _policy_pass(hidden2d, weight, bias, labels, wts, adv, old, ref_lp, cfg,
                                                  rows, bent, grads)
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lp, ent, kl, h_part)
        return total, lp, ent, kl, h_part

    @staticmethod
    def backward(ctx, g_total, *_):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: backward ran twice through the same loss; its "
                               "gradients are computed in forward and handed over once")
        g = g_total.float()
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grads.h is None else grads.h.mul_(g.to(grads.h.dtype))
        grad_w = None if grads.w is None else grads.w.mul_(g.to(grads.w.dtype)).to(w_dtype)
        grad_b = None if grads.b is None else grads.b.mul_(g).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def fused_linear_policy_loss(hidden, weight, labels, mask, advantages, old_logprobs=None, ref_logprobs=None, *,
                             bias=None, chunk_size=None, config=None, algo="ppo", temperature=1.0, clip_low=0.2,
                             clip_high=0.2, dual_clip=None, adv_coeff=10.0, entropy_coef=0.0, kl_coef=0.0,
                             kl_estimator="k3", batch_entropy_coef=0.0, loss_agg_mode="token-mean",
                             kl_importance_weighted=False, normalizer=None, accum_fp32=None, matmul_dtype=None,
                             batch_probs=None):
    """`policy_loss_from_logits(hidden @ weightᵀ + bias, ...)` without holding the [N, V] logits.

    hidden [..., H] (batch entropy needs [B, T, H]), weight [V, H], bias [V] or None; labels, mask,
    advantages ([B] too, broadcast over T), old/ref log-probs [...] (None: on-policy / no reference),
    normalizer as in `fastrlhf.policy_loss_from_logits`. Same knobs (keywords, or a ready `config=LossConfig(...)` with
    the keywords left at their defaults), value and gradients (w.r.t. hidden, weight, bias) as
    `fastrlhf.policy_loss_from_logits`; returns (loss, out) with the same `out`. Advantages and old/ref
    log-probs are constants (rollout data): no gradient flows to them.
    Gradients are computed during the forward pass (3 GEMMs per chunk) and only scaled in backward,
    so backward can run once per call. chunk_size: tokens per chunk (None: `choose_chunk_size`).
    accum_fp32: accumulate grad_W in float32 (None: when V ≥ 250k; always when weight is float32).
    matmul_dtype: the GEMMs' dtype (module docstring; None: the inputs' promoted dtype).
    batch_probs: None or the `BatchProbs` of a mini-batch holding these rows (`fused_linear_batch_probs`,
    summed over its micro-batches), as in `fastrlhf.policy_loss_from_logits`: the loss then carries this
    call's part of the mini-batch's H_batch (exact gradient; weight 1 when summing micro-batches).
    """
    cfg = ref.loss_config(config, dict(
        algo=algo, temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        adv_coeff=adv_coeff, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_estimator=kl_estimator,
        batch_entropy_coef=batch_entropy_coef, loss_agg_mode=loss_agg_mode,
        kl_importance_weighted=kl_importance_weighted))
    _check_linear(hidden, weight, bias, chunk_size)
    dtype = matmul_dtype_for(matmul_dtype, hidden, weight, bias)
    vocab, width = weight.shape
    shape = hidden.shape[:-1]
    _check_mask("mask", mask, shape, hidden.device)
    _check_same("labels", labels, shape, hidden.device)
    _check_labels("labels", labels, (*shape, vocab), mask=mask)
    advantages = ops._check_rollout(shape, hidden.device, advantages, old_logprobs, ref_logprobs, cfg)
    normalizer = ops._check_normalizer(normalizer, hidden.device)
    if (cfg.batch_entropy_coef or cfg.loss_agg_mode != "token-mean") and hidden.dim() != 3:
        why = "batch_entropy_coef" if cfg.batch_entropy_coef else f"loss_agg_mode={cfg.loss_agg_mode!r}"
        raise ValueError(f"hidden: {why} needs 3 dims [B, T, H], got shape {tuple(hidden.shape)}")
    ops.check_batch_probs(batch_probs, cfg, hidden.shape[1] if hidden.dim() == 3 else 0, vocab, hidden.device)

    hidden2d, weight, bias = _cast(dtype, hidden.reshape(-1, width), weight, bias)
    n = hidden2d.shape[0]
    m = mask.reshape(-1).float()
    wts = ref.loss_weights(mask, cfg.loss_agg_mode, normalizer).reshape(-1)   # loss = Σ_t w_t·loss_t
    labels1d = labels.reshape(-1).long()
    labels1d = torch.where(m > 0, labels1d, torch.full_like(labels1d, -100))
    per_token = [None if t is None else t.reshape(-1).float().detach()            # constants
                 for t in (advantages, old_logprobs, ref_logprobs)]
    rows = chunk_size or choose_chunk_size(n, vocab, hidden.device)
    needs = _needs(hidden2d, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):   # the GEMMs run in `dtype` (matmul_dtype)
        bent = None
        if cfg.batch_entropy_coef:
            bent = _batch_entropy_setup(hidden2d, weight, bias, mask, batch_probs, cfg.temperature, rows)
        if any(needs):
            total, lp, ent, kl, h_part = _FusedLinearPolicyLoss.apply(hidden2d, weight, bias, labels1d, wts,
                                                                      *per_token, cfg, rows, bent, accum_fp32)
        else:
            total, lp, ent, kl, h_part = _policy_pass(hidden2d, weight, bias, labels1d, wts, *per_token, cfg, rows,
                                                      bent, None)
    loss = total
    out = ref._loss_outputs(lp.view(shape), ent.view(shape), kl.view(shape), mask, old_logprobs,
                            ref_logprobs, advantages, cfg)
    if bent is not None:
        loss = loss - cfg.batch_entropy_coef * h_part
        out["batch_entropy"] = h_part if batch_probs is None else batch_probs.entropy()
    return loss, out


__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "fused_linear_batch_probs", "choose_chunk_size"]
