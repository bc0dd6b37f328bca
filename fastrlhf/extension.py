"""The C++/CUDA extension: torch operators `torch.ops.fastrlhf.gae` and `torch.ops.fastrlhf.sample_tokens`.

Built on first import with `torch.utils.cpp_extension.load` (ninja), from the sources shipped in the
`fastrlhf.csrc` package, into a cache directory: $TORCH_EXTENSIONS_DIR if set, else
~/.cache/fastrlhf/extensions/<torch version>-<cpu|cuda>-<hash of the source directory>. Later imports reuse the built library.
The CUDA sources are compiled when torch sees a GPU and a CUDA toolkit (nvcc, CUDA_HOME) is there;
a failed CUDA build leaves the CPU operators (CUDA tensors then run the PyTorch reference, with one
warning). Importing this module raises ImportError, saying why and how to fix it, when not even the
CPU part can be built; `fastrlhf.ops` then runs the PyTorch reference with one warning.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import ref

_FIX = ("install a C++ compiler (g++ or clang++) and ninja (`pip install ninja`), and for the CUDA part "
        "a CUDA toolkit matching torch.version.cuda with CUDA_HOME set; or set FASTRLHF_BACKEND=torch "
        "to use the PyTorch reference without this warning")


def _sources_dir() -> Path:
    import fastrlhf.csrc
    return Path(fastrlhf.csrc.__file__).resolve().parent


def _build_dir(flavor: str) -> Path:
    """One directory per torch version, flavor and source location (two checkouts sharing one cache
    would otherwise rebuild each other's library on every import)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fastrlhf" / "extensions"
    where = hashlib.sha1(str(_sources_dir()).encode()).hexdigest()[:10]
    path = base / f"torch{torch.__version__.replace('+', '_')}-{flavor}-{where}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cuda_unavailable_reason() -> Optional[str]:
    from torch.utils import cpp_extension
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU" if torch.version.cuda else "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc / CUDA_HOME)"
    return None


def _ninja_on_path() -> None:
    """pip's ninja (the `ninja` package of the train extra) installs its binary beside the interpreter,
    which is not on PATH when a virtualenv's python runs without the venv activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
        candidates = [ninja.BIN_DIR, os.path.dirname(sys.executable)]
    except (ImportError, AttributeError):
        candidates = [os.path.dirname(sys.executable)]
    for folder in candidates:
        if folder and shutil.which("ninja", path=folder):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def _load(flavor: str, sources) -> str:
    from torch.utils import cpp_extension
    _ninja_on_path()
    cpp_extension.verify_ninja_availability()
    return cpp_extension.load(
        name=f"fastrlhf_C_{flavor}", sources=[str(s) for s in sources], build_directory=str(_build_dir(flavor)),
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], is_python_module=False, verbose=False)


def _build():
    """Build (or reuse) and load the library; returns (path, cuda ok, cuda reason, seconds)."""
    src = _sources_dir()
    start = time.perf_counter()
    reason = _cuda_unavailable_reason()
    if reason is None:
        try:
            path = _load("cuda", [src / "ops.cpp", src / "ops_cuda.cu"])
            return path, True, None, time.perf_counter() - start
        except Exception as exc:  # keep the CPU operators; CUDA tensors fall back below
            reason = f"CUDA build failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]})"
    try:
        path = _load("cpu", [src / "ops.cpp"])
    except Exception as exc:
        detail = str(exc).strip().splitlines()
        raise ImportError(f"fastrlhf extension: the CPU build failed ({type(exc).__name__}: "
                          f"{detail[-1][:300] if detail else ''}); to fix: {_FIX}") from exc
    return path, False, reason, time.perf_counter() - start


_LIBRARY, _HAS_CUDA, _CUDA_REASON, _LOAD_SECONDS = _build()


@torch.library.register_fake("fastrlhf::gae")
def _gae_fake(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.register_fake("fastrlhf::sample_tokens")
def _sample_tokens_fake(logits, uniforms, temperature, top_k, top_p):
    B = logits.shape[0]
    return (logits.new_empty(B, dtype=torch.long), logits.new_empty(B, dtype=torch.float32))


_warned_cuda = False


def _use_reference(device: torch.device) -> bool:
    global _warned_cuda
    if device.type == "cuda" and not _HAS_CUDA:
        if not _warned_cuda:
            _warned_cuda = True
            warnings.warn(f"fastrlhf extension: no CUDA operators ({_CUDA_REASON}); running the PyTorch "
                          f"reference for CUDA tensors; to fix: {_FIX}", RuntimeWarning, stacklevel=3)
        return True
    return False


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """`fastrlhf.ops.gae` on the extension (inputs already checked there): float32 (advantages, returns)."""
    if _use_reference(rewards.device):
        return ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    r, v, m = (t.to(torch.float32).contiguous() for t in (rewards, values, mask))
    return torch.ops.fastrlhf.gae(r, v, m, float(gamma), float(lam))


def sample_tokens(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """`fastrlhf.ops.sample_tokens` on the extension (inputs already checked there; `generator` is on the
    logits' device): one uniform per row is drawn with torch (from `generator` when given, so results
    are reproducible) and the operator does the inverse-CDF draw."""
    if _use_reference(logits.device):
        return ref.sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    B = logits.shape[0]
    if temperature == 0 or top_k == 1:
        uniforms = logits.new_empty(0, dtype=torch.float64)
    else:
        uniforms = torch.rand(B, dtype=torch.float64, device=logits.device, generator=generator)
    return torch.ops.fastrlhf.sample_tokens(logits.contiguous(), uniforms, float(temperature), int(top_k),
                                            float(top_p))


def status() -> dict:
    """What was built: {"cpu": True, "cuda": bool, "cuda_reason": why not (or None), "library": path,
    "load_seconds": build-or-load time of this process}."""
    return {"cpu": True, "cuda": _HAS_CUDA, "cuda_reason": _CUDA_REASON, "library": str(_LIBRARY),
            "load_seconds": round(_LOAD_SECONDS, 2)}


__all__ = ["gae", "sample_tokens", "status"]
