"""The optimizer behind `--optim`: `OPTIMIZERS` (the accepted names) and `make_optimizer`."""
from __future__ import annotations

import torch

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")


def make_optimizer(params, name: str = "adamw_torch", lr: float = 1e-5, weight_decay: float = 0.0,
                   betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """`--optim`: adamw_torch (torch.optim.AdamW; fused kernel on CUDA), adamw_8bit (bitsandbytes 8-bit
    states: 2 bytes/param of state instead of 8), paged_adamw_8bit (same, states in paged unified memory
    that spill to the host under pressure). bitsandbytes >= 0.45 also runs both on the CPU (paged
    falls back to non-paged there)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params: expected at least one trainable parameter, got none")
    if name == "adamw_torch":
        fused = all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError(f"optim: {name!r} needs the bitsandbytes package (pip install 'fastrlhf[quant]'); "
                             f"use 'adamw_torch' without it") from exc
        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ValueError(f"optim: expected one of {OPTIMIZERS}, got {name!r}")

