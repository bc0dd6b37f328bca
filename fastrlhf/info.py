"""`fastrlhf info`: which backends are active here and, for each missing one, why."""
from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import List, Optional

import torch


def _entry(available: bool, version: Optional[str] = None, detail: str = "") -> dict:
    return {"available": available, "version": version, "detail": detail}


def _import(name: str):
    """(module, None) or (None, why it failed)."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # not installed, or installed but broken (e.g. built for another torch)
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def _gpu() -> dict:
    if torch.cuda.is_available():
        return _entry(True, torch.version.cuda, torch.cuda.get_device_name())
    if torch.version.cuda is None:
        return _entry(False, None, "torch is a CPU-only build (install a CUDA wheel of torch)")
    return _entry(False, torch.version.cuda, "torch is a CUDA build but sees no GPU (driver / CUDA_VISIBLE_DEVICES)")


def _triton() -> dict:
    triton, why = _import("triton")
    if triton is None:
        return _entry(False, None, f"not importable ({why}); pip install triton (Linux)")
    version = getattr(triton, "__version__", None)
    if torch.cuda.is_available():
        return _entry(True, version, "CUDA")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _entry(True, version, "CPU interpreter (TRITON_INTERPRET=1; slow, for tests)")
    return _entry(False, version, "importable, but no CUDA GPU and TRITON_INTERPRET is not 1")


def _extension() -> tuple:
    ext, why = _import("fastrlhf.extension")
    if ext is None:
        return (_entry(False, None, why), _entry(False, None, "the CPU build is needed first: " + why))
    st = ext.status()
    cpu = _entry(True, torch.__version__, st["library"])
    cuda = _entry(st["cuda"], torch.version.cuda if st["cuda"] else None,
                  st["library"] if st["cuda"] else st["cuda_reason"])
    return cpu, cuda


def _package(module: str, install: str) -> dict:
    mod, why = _import(module)
    if mod is None:
        return _entry(False, None, f"not importable ({why}); {install}")
    return _entry(True, getattr(mod, "__version__", None), "")


def info() -> dict:
    """{"fastrlhf", "torch": versions; "gpu", "triton", "cpu_extension", "cuda_extension", "flash_attn",
    "bitsandbytes": {"available": bool, "version": str | None, "detail": what is used, or why not}}.
    Builds the C++ extension on first call (see fastrlhf.extension)."""
    from . import __version__
    cpu_ext, cuda_ext = _extension()
    return {
        "fastrlhf": __version__,
        "torch": torch.__version__,
        "gpu": _gpu(),
        "triton": _triton(),
        "cpu_extension": cpu_ext,
        "cuda_extension": cuda_ext,
        "flash_attn": _package("flash_attn", "pip install fastrlhf[flash-attn] (needs a CUDA GPU)"),
        "bitsandbytes": _package("bitsandbytes", "pip install fastrlhf[quant]"),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrlhf info", description="Report which fastrlhf backends are active.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"fastrlhf {report['fastrlhf']}  torch {report['torch']}")
    for key, label in (("gpu", "GPU"), ("triton", "Triton"), ("cuda_extension", "CUDA extension"),
                       ("cpu_extension", "CPU extension"), ("flash_attn", "flash-attn"),
                       ("bitsandbytes", "bitsandbytes")):
        e = report[key]
        state = "yes" if e["available"] else "no "
        version = f" {e['version']}" if e["version"] else ""
        print(f"  {label:<15} {state}{version}  {e['detail']}".rstrip())
    return 0


__all__ = ["info", "main"]
