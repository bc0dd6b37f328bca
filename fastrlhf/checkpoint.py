"""Atomic checkpoints: `<output_dir>/checkpoint-<step>/state.pt` + `config.json`.

A checkpoint is written to a temporary sibling directory and moved into place with `os.replace`,
so a kill during a save leaves the previous checkpoints intact (and at worst a `.tmp-*` directory,
which `latest` ignores)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state(generators: dict) -> dict:
    """Python, numpy, torch (CPU + CUDA) and the named torch.Generator / random.Random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in generators.items():
        state["generators"][name] = g.getstate() if isinstance(g, random.Random) else g.get_state()
    return state


def set_rng_state(state: dict, generators: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        s = state["generators"][name]
        if isinstance(g, random.Random):
            g.setstate(s)
        else:
            g.set_state(s)


def trainable_state(module: torch.nn.Module) -> dict:
    """Only the parameters that train (the LoRA adapter, the value head, or all weights)."""
    return {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict):
    params = dict(module.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in state]
    unknown = [k for k in state if k not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint: trainable parameters do not match the model: missing {missing[:3]}, "
                         f"unexpected {unknown[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save(output_dir, step: int, state: dict, config: dict, *, keep: Optional[int] = None) -> Path:
    """Write `state` (torch-serializable) and `config` (JSON) as checkpoint-<step>, atomically.
    `keep`: how many of the newest checkpoints to keep (None = all)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=out))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    for f in tmp.iterdir():  # the data is on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. the final save): move the old one aside first
        old = out / f".old-checkpoint-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and
             (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load(path) -> tuple:
    """checkpoint dir -> (state, config dict)."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ValueError(f"checkpoint: expected a directory with state.pt, got {str(path)!r}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return state, json.loads((path / "config.json").read_text())
