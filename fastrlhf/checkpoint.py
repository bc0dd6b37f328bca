"""Atomic checkpoints: `<output_dir>/checkpoint-<step>/state.pt` + `config.json`, and a training run's
checkpoint I/O on top of them (`save_run`, `load_weights`, `resume`).

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
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from .train import Run

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


# ----------------------------------------------------------------------------------------------------
# A training run's checkpoints (fastrlhf.train.Run)
# ----------------------------------------------------------------------------------------------------

def save_run(run: Run) -> Path:
    """Checkpoint the run at its current step: the trainable weights, the reference when the warm-start
    changed it, the optimizer, schedule, reward-shaping state, random streams and the held-out score."""
    b = run.bundle
    state = {"step": run.step, "policy": trainable_state(b.policy),
             "value_head": b.value_head.state_dict() if b.value_head is not None else None,
             "critic": trainable_state(b.critic) if b.critic is not None else None,
             "reference": run.reference_state, "optimizer": run.optim.optimizer.state_dict(),
             "scheduler": run.optim.scheduler.state_dict(), "moments": run.shaping.moments.state_dict(),
             "kl_ctl": run.shaping.kl_ctl.state_dict(), "rng": run.streams.state(),
             "eval_before": run.eval_before}
    return save(run.cfg.output_dir, run.step, state, run.cfg.to_dict(), keep=run.cfg.save_total_limit)


def load_weights(run: Run, state: dict):
    """The weights of a `save_run` state into the run's models (policy, value head, critic, reference)."""
    b = run.bundle
    load_trainable_state(b.policy, state["policy"])
    if b.value_head is not None and state["value_head"] is not None:
        b.value_head.load_state_dict(state["value_head"])
    if b.critic is not None:
        load_trainable_state(b.critic, state["critic"])
    if state["reference"] is not None:
        with b.reference() as ref_model:
            ref_model.load_state_dict(state["reference"])
        run.reference_state = state["reference"]


def resume(run: Run, where: str) -> Path:
    """Restore the run from the checkpoint `where` (a directory, or "latest" in the run's output_dir),
    so that it continues step for step as if uninterrupted; returns the checkpoint's path."""
    path = latest(run.cfg.output_dir) if where == "latest" else Path(where)
    if path is None:
        raise ValueError(f"resume: no checkpoint in {run.cfg.output_dir!r}")
    state, _ = load(path)
    load_weights(run, state)
    run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.scheduler.load_state_dict(state["scheduler"])
    run.shaping.moments.load_state_dict(state["moments"])
    run.shaping.kl_ctl.load_state_dict(state["kl_ctl"])
    run.streams.set_state(state["rng"])
    run.step, run.eval_before = state["step"], state["eval_before"]
    return path
