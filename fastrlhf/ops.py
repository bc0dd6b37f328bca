"""The one dispatch point: every public op checks its inputs here, then runs on one backend.

Backends:
    "torch"   fastrlhf.ref (plain PyTorch; any device)
    "triton"  fastrlhf.kernels.* (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
    "ext"     the C++/CUDA extension fastrlhf._C (GAE and sampling; CPU and CUDA)

Choice, per call: `use_backend(name)` (a context manager, for tests) beats the environment
variable FASTRLHF_BACKEND=torch|triton|auto, which beats "auto". "auto" sends CUDA tensors to
Triton, the sequential ops (gae, sample_tokens) to the extension, and everything else to torch.
When the chosen fast path cannot be loaded, the reference runs and one warning per op says why.
"""
from __future__ import annotations

import contextlib
import importlib
import numbers
import os
import warnings
from typing import Callable, Optional

import torch

from . import checks, ref
from .checks import MIN_TEMPERATURE
from .checks import choice as _check_choice
from .checks import number as _number
from .checks import temperature as _check_temperature
from .ref import BATCH_ENTROPY_POSITIONS, KL_ESTIMATORS, BatchProbs, LossConfig

BACKENDS = ("auto", "torch", "triton")

# op name -> {backend: "module:function"}; modules are imported on first use.
_IMPLS = {
    "logprobs_and_entropy": {"torch": "fastrlhf.ref:logprobs_and_entropy",
                             "triton": "fastrlhf.kernels.token_logprobs:logprobs_and_entropy"},
    "policy_loss_from_logits": {"torch": "fastrlhf.ref:policy_loss_from_logits",
                                "triton": "fastrlhf.kernels.policy_loss:policy_loss_from_logits"},
    "policy_rows": {"torch": "fastrlhf.ref:policy_rows",
                    "triton": "fastrlhf.kernels.policy_loss:policy_rows"},
    "batch_entropy": {"torch": "fastrlhf.ref:batch_entropy",
                      "triton": "fastrlhf.kernels.batch_entropy:batch_entropy"},
    "batch_probs": {"torch": "fastrlhf.ref:batch_probs",
                    "triton": "fastrlhf.kernels.batch_entropy:batch_probs"},
    "gae": {"torch": "fastrlhf.ref:gae", "ext": "fastrlhf.extension:gae"},
    "sample_tokens": {"torch": "fastrlhf.ref:sample_tokens", "ext": "fastrlhf.extension:sample_tokens"},
}

_override: Optional[str] = None
_loaded: dict = {}
_warned: set = set()


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend ("torch", "triton" or "auto") inside a `with` block."""
    global _override
    _check_backend_name(name, "use_backend(name)")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def _check_backend_name(name, where):
    if name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {BACKENDS}, got {name!r}")


def requested_backend() -> str:
    name = _override or os.environ.get("FASTRLHF_BACKEND", "auto").strip().lower() or "auto"
    _check_backend_name(name, "FASTRLHF_BACKEND")
    return name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(spec: str) -> Callable:
    if spec not in _loaded:
        module, fn = spec.split(":")
        _loaded[spec] = getattr(importlib.import_module(module), fn)
    return _loaded[spec]


def _warn_once(op: str, message: str):
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"fastrlhf: {op}: {message}; running the PyTorch reference", RuntimeWarning,
                      stacklevel=3)


def impl(op: str, device: torch.device) -> Callable:
    """The function that runs `op` for tensors on `device` under the current backend choice."""
    impls = _IMPLS[op]
    want = requested_backend()
    if want == "torch":
        return _load(impls["torch"])
    if "ext" in impls:
        backend = "ext"
    elif want == "triton" or device.type == "cuda":
        backend = "triton"
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"FASTRLHF_BACKEND=triton: CPU tensors need TRITON_INTERPRET=1 (set before "
                             f"triton is imported); got tensors on {device}")
    else:
        return _load(impls["torch"])
    try:
        fn = _load(impls[backend])
    except Exception as exc:  # missing triton, a failed extension build, ...
        if want == "triton":
            raise
        _warn_once(op, f"{backend} backend unavailable ({type(exc).__name__}: {exc})")
        return _load(impls["torch"])
    return fn


# ----------------------------------------------------------------------------
# Input checks: errors name the argument, the expected and the actual value
# ----------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(name, t):
    """A tensor with data (not on the meta device, whose values cannot be read or computed)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor of shape {tuple(t.shape)}")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype {_FLOATS}, got {t.dtype}")


def _check_first(name, t):
    """An op's first tensor argument: floating, with data; the others must be on its device."""
    _check_tensor(name, t)
    _check_float(name, t)


def _capturing(t) -> bool:
    """True while `t`'s CUDA stream is being captured into a graph: no host reads then."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_labels(name, labels, logits_shape, ignore_index=None, mask=None):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name}: expected an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits_shape[:-1]):
        raise ValueError(f"{name}: expected shape {tuple(logits_shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    if labels.numel() == 0 or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    vocab = logits_shape[-1]
    bad = (labels < 0) | (labels >= vocab)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if mask is not None:
        bad &= mask.bool()
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{name}: expected values in [0, {vocab})"
                         + (f" or {ignore_index}" if ignore_index is not None else "")
                         + f", got {first}")


def _check_same(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the first argument), got {t.device}")


def _check_mask(name, mask, shape, device):
    """A 0/1 mask of `shape` on `device` (the first argument's): bool, or an integer or float tensor
    holding only 0s and 1s. Type, shape and device are checked before any value is read, and the values
    are not read while a CUDA graph is being captured."""
    _check_same(name, mask, shape, device)
    _check_tensor(name, mask)
    if mask.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or float tensor of 0s and 1s, got {mask.dtype}")
    if mask.dtype == torch.bool or mask.numel() == 0 or _capturing(mask):
        return
    bad = (mask != 0) & (mask != 1)              # NaN is != both
    if bool(bad.any()):
        raise ValueError(f"{name}: expected only 0s and 1s (a bool, integer or float tensor), "
                         f"got {mask[bad][0].item()!r}")


def _check_logits(logits, dims="[..., V]"):
    """Logits of a loss op: floating, with data, at least [V], V >= 1 (an empty vocabulary has no softmax).
    Shapes only: no value is read."""
    _check_first("logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"logits: expected shape {dims}, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a vocabulary of V >= 1 tokens {dims}, got shape {tuple(logits.shape)}")


def _check_unit_interval(name, value):
    """gamma, lam of GAE: a finite number in [0, 1]."""
    return _number(name, value, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def _check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
    return int(top_k)


def _check_generator(generator, device):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected None or a torch.Generator on {device} (the logits' device), "
                        f"got {type(generator).__name__}")
    if generator.device != device:
        raise ValueError(f"generator: expected None or a torch.Generator on {device} (the logits' device), "
                         f"got one on {generator.device}")


# ----------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------

def logprobs_and_entropy(logits, labels, *, temperature=1.0, ignore_index=-100):
    """logits [..., V], labels [...] -> (log p(label), entropy), both float32 [...], in one pass.

    The log-prob is 0 where labels == ignore_index. Differentiable w.r.t. logits."""
    _check_logits(logits)
    _check_temperature(temperature)
    _check_same("labels", labels, logits.shape[:-1], logits.device)
    _check_labels("labels", labels, logits.shape, ignore_index)
    fn = impl("logprobs_and_entropy", logits.device)
    return fn(logits, labels, temperature=temperature, ignore_index=ignore_index)


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100):
    """logits [..., V], labels [...] -> log p(label) float32 [...]; 0 at ignore_index."""
    return logprobs_and_entropy(logits, labels, temperature=temperature, ignore_index=ignore_index)[0]


def token_entropy(logits, *, temperature=1.0):
    """logits [..., V] -> entropy of softmax(logits/τ), float32 [...]."""
    _check_logits(logits)
    labels = torch.full(logits.shape[:-1], -100, dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, labels, temperature=temperature)[1]


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL estimate (k1 | k2 | k3) of π against π_ref from the sampled token's log-probs."""
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_first("logprobs", logprobs)
    _check_same("ref_logprobs", ref_logprobs, logprobs.shape, logprobs.device)
    _check_float("ref_logprobs", ref_logprobs)
    return ref.kl_penalty(logprobs, ref_logprobs, estimator)


def _check_token_tensors(first_name, first, mask, **others):
    """Per-token tensors of one shape on one device: `first` and `others` floating with data, `mask` 0/1."""
    _check_first(first_name, first)
    for name, t in others.items():
        _check_same(name, t, first.shape, first.device)
        _check_first(name, t)
    _check_mask("mask", mask, first.shape, first.device)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Clipped PPO surrogate, masked mean over all tokens -> (loss, stats). Masked positions may hold
    anything (NaN, inf): they reach neither the loss, the statistics nor the gradient."""
    _check_token_tensors("logprobs", logprobs, mask, old_logprobs=old_logprobs, advantages=advantages)
    return ref.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=checks.clip_low(clip_low),
                               clip_high=checks.clip_high(clip_high), dual_clip=checks.dual_clip(dual_clip))


def apa_policy_loss(logprobs, ref_logprobs, advantages, mask, *, adv_coeff=10.0):
    """APA loss (ℓ − ℓ_ref − adv_coeff·A)², masked mean -> (loss, stats). Masked positions may hold
    anything (NaN, inf): they reach neither the loss, the statistics nor the gradient."""
    _check_token_tensors("logprobs", logprobs, mask, ref_logprobs=ref_logprobs, advantages=advantages)
    return ref.apa_policy_loss(logprobs, ref_logprobs, advantages, mask,
                               adv_coeff=checks.coefficient("adv_coeff", adv_coeff))


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """Clipped value loss ½·max((V−R)², (V_clip−R)²), masked mean -> (loss, stats).

    clip: None (½(V−R)², old_values unused) or ε_v > 0. Masked positions may hold anything (NaN too):
    they reach neither the loss nor the gradient."""
    _check_first("values", values)
    for name, t in (("old_values", old_values), ("returns", returns)):
        _check_same(name, t, values.shape, values.device)
        _check_float(name, t)
    _check_mask("mask", mask, values.shape, values.device)
    clip = _number("clip", clip, "None or a number > 0", lambda v: v > 0, none_ok=True)
    return ref.value_loss(values, old_values, returns, mask, clip=clip)


def batch_entropy(logits, mask, *, temperature=1.0):
    """logits [B, T, V], mask [B, T] -> H_batch, the mean over positions of the entropy of the
    batch-mean distribution (README, "Batch entropy"). Scalar float32, differentiable. Masked rows may
    hold anything (NaN too): they reach neither H_batch nor the gradient (0 there)."""
    _check_logits(logits, "[B, T, V]")
    temperature = _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected 3 dims [B, T, V], got shape {tuple(logits.shape)}")
    _check_mask("mask", mask, logits.shape[:2], logits.device)
    return impl("batch_entropy", logits.device)(logits, mask, temperature=temperature)


def batch_probs(logits, mask, *, temperature=1.0, positions="all"):
    """logits [B, T, V], mask [B, T] -> `BatchProbs`: the batch-entropy statistics of these rows as sums
    (Σ_b m'·softmax(logits/τ) [G, V] and Σ_b m' [G]; G = T for positions "all", 1 for "last": each row's last
    valid token), no gradient. Add the micro-batches' (`+`) and pass the sum as `batch_probs=` to each
    micro-batch's policy loss: H_batch is then the mini-batch's, exactly (README, "Batch entropy")."""
    _check_logits(logits, "[B, T, V]")
    temperature = _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected 3 dims [B, T, V], got shape {tuple(logits.shape)}")
    _check_mask("mask", mask, logits.shape[:2], logits.device)
    _check_choice("positions", positions, BATCH_ENTROPY_POSITIONS)
    return impl("batch_probs", logits.device)(logits, mask, temperature=temperature, positions=positions)


def check_batch_probs(stats, cfg: LossConfig, T: int, V: int, device):
    """`batch_probs=` of a policy loss over T response positions and V tokens: None, or a `BatchProbs` at
    the loss's temperature on its device, [G, V] with G >= T ("all") or G = 1 ("last"); only with batch
    entropy on. Shapes and Python values only."""
    if stats is None:
        return
    if not isinstance(stats, BatchProbs):
        raise TypeError(f"batch_probs: expected None or a fastrlhf.BatchProbs, got {type(stats).__name__}")
    if not cfg.batch_entropy_coef:
        raise ValueError("batch_probs: expected None with batch_entropy_coef=0 (nothing reads it), got BatchProbs")
    if stats.temperature != cfg.temperature:
        raise ValueError(f"batch_probs: expected statistics at the loss's temperature {cfg.temperature}, got "
                         f"{stats.temperature}")
    G = stats.count.shape[0] if stats.count.dim() == 1 else -1
    need = f"[G >= {T}, {V}]" if stats.positions == "all" else f"[1, {V}]"
    ok = G >= T if stats.positions == "all" else G == 1
    if not (ok and tuple(stats.probs.shape) == (G, V) and stats.probs.dtype == torch.float32
            and stats.count.dtype == torch.float32):
        raise ValueError(f"batch_probs: expected float32 probs {need} and count [G] (positions="
                         f"{stats.positions!r}), got probs {tuple(stats.probs.shape)} {stats.probs.dtype}, count "
                         f"{tuple(stats.count.shape)} {stats.count.dtype}")
    if stats.probs.device != device or stats.count.device != device:
        raise ValueError(f"batch_probs: expected tensors on {device}, got {stats.probs.device}")


def policy_loss_from_logits(logits, labels, mask, advantages, old_logprobs, ref_logprobs, *, config=None,
                            algo="ppo", temperature=1.0, clip_low=0.2, clip_high=0.2, dual_clip=None,
                            adv_coeff=10.0, entropy_coef=0.0, kl_coef=0.0, kl_estimator="k3",
                            batch_entropy_coef=0.0, inplace=False, batch_probs=None):
    """The one call a trainer needs per micro-batch.

    logits [..., V] (batch entropy needs [B, T, V]); labels, mask, advantages, old/ref log-probs [...].
    loss = masked mean over tokens of (policy loss ("ppo" or "apa") + kl_coef·KL − entropy_coef·H)
           − batch_entropy_coef·H_batch.
    The knobs are those of `LossConfig`: pass them as keywords, or a ready `config=LossConfig(...)` (then
    the keywords must stay at their defaults). Returns (loss, out): out has detached per-token `logprobs`,
    `entropy`, `kl` and scalar stats (`clip_frac`, `approx_kl`, `entropy_mean`, `kl_mean`, `num_tokens`,
    `nonfinite_tokens`, ...). Masked positions may hold anything (NaN logits, advantages, old/ref
    log-probs): they reach neither the loss, the stats nor the gradient (0 there).
    The logits gradient is computed in the forward pass; inplace=True writes it over `logits` (saves one
    [N, V] buffer; `logits` must be contiguous and is garbage afterwards; not with batch_entropy_coef).
    Differentiable w.r.t. logits only: advantages and old/ref log-probs are constants (rollout data) on
    the Triton path; the torch reference gives their autograd gradients.
    batch_probs: None (H_batch over these rows, every position) or the `BatchProbs` of a mini-batch that
    holds these rows (`fastrlhf.batch_probs`, summed over its micro-batches; its positions "all" or "last"
    apply): H_batch in the loss is then this call's part of the mini-batch's, whose values add up to it
    over the micro-batches and whose gradient is exact, so sum the micro-batches' batch-entropy terms with
    weight 1 (README, "Batch entropy"); out["batch_entropy"] is the mini-batch's H_batch.
    """
    cfg = ref.loss_config(config, dict(
        algo=algo, temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        adv_coeff=adv_coeff, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_estimator=kl_estimator,
        batch_entropy_coef=batch_entropy_coef))
    _check_logits(logits)
    shape = logits.shape[:-1]
    _check_mask("mask", mask, shape, logits.device)
    _check_same("labels", labels, shape, logits.device)
    _check_labels("labels", labels, logits.shape, mask=mask)
    for name, t in (("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        _check_same(name, t, shape, logits.device)
        _check_first(name, t)
    if cfg.batch_entropy_coef and logits.dim() != 3:
        raise ValueError(f"logits: batch_entropy_coef needs 3 dims [B, T, V], got shape {tuple(logits.shape)}")
    if inplace and cfg.batch_entropy_coef:
        raise ValueError(f"inplace: expected False with batch_entropy_coef={cfg.batch_entropy_coef} (batch "
                         f"entropy re-reads the logits in backward), got True")
    if inplace and not logits.is_contiguous():
        raise ValueError(f"inplace: expected contiguous logits, got strides {logits.stride()}")
    check_batch_probs(batch_probs, cfg, logits.shape[1] if logits.dim() == 3 else 0, logits.shape[-1], logits.device)
    fn = impl("policy_loss_from_logits", logits.device)
    return fn(logits, labels, mask, advantages, old_logprobs, ref_logprobs, cfg, inplace=inplace,
              batch_probs=batch_probs)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """rewards, values, mask [B, T] (right-padded: mask is a 0/1 prefix of ones per row) ->
    (advantages, returns) [B, T] float32; values past the last valid token count as 0. gamma, lam in
    [0, 1]. Masked positions may hold anything (NaN too) and come out 0 (README, "Advantages and rewards")."""
    _check_first("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected 2 dims [B, T], got shape {tuple(rewards.shape)}")
    _check_same("values", values, rewards.shape, rewards.device)
    _check_float("values", values)
    _check_mask("mask", mask, rewards.shape, rewards.device)
    gamma, lam = _check_unit_interval("gamma", gamma), _check_unit_interval("lam", lam)
    m = mask.bool()
    if m.shape[1] > 1 and not _capturing(m) and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("mask: expected a prefix of ones per row (right padding), got a 0 followed by a 1")
    return impl("gae", rewards.device)(rewards, values, mask, gamma=gamma, lam=lam)


def whiten(x, mask):
    """Masked whitening over valid tokens; safe with 0 or 1 valid token. Masked positions may hold
    anything (NaN too): they reach neither the statistics nor the gradient, and come out 0."""
    _check_first("x", x)
    _check_mask("mask", mask, x.shape, x.device)
    return ref.whiten(x, mask)


def sample_tokens(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> (tokens [B] int64, log-prob of each token under the tempered full softmax).

    temperature, then top-k, then top-p, then the draw. temperature == 0 is the untempered greedy draw;
    top_k == 1 is greedy too, its log-prob still under the tempered softmax. temperature: 0 or a number
    >= MIN_TEMPERATURE; generator: None or a torch.Generator on the logits' device. No host reads (the
    checks look at Python values, shapes and devices only)."""
    _check_first("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected 2 dims [B, V], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits: expected a vocabulary of V >= 1 tokens [B, V], got shape {tuple(logits.shape)}")
    temperature = _check_temperature(temperature, greedy_ok=True)
    top_k = _check_top_k(top_k)
    top_p = _number("top_p", top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
    _check_generator(generator, logits.device)
    return impl("sample_tokens", logits.device)(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                generator=generator)

