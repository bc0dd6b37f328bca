"""Atomic, verified checkpoints: `<output_dir>/checkpoint-<step>/` holding `state.pt`, `config.json` and
`manifest.json` (each file's size and sha256, written last), and a training run's checkpoint I/O on top of
them (`save_run`, `load_weights`, `resume`).

A checkpoint is written to a temporary sibling directory and moved into place with `os.replace`, so a
kill during a save leaves the previous checkpoints intact (and at worst a `.tmp-checkpoint-*` or
`.old-checkpoint-*` directory, which `clean_partial` removes at the next save). A checkpoint counts only
if its files match its manifest (`verify`); `state.pt` is read with `torch.load(weights_only=True)`,
which rebuilds tensors and plain data and refuses anything else, so a checkpoint cannot run code."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .config import resume_changes
from .models import load_reference

if TYPE_CHECKING:
    from .train import Run

_NAME = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.(tmp|old)-checkpoint-(\d+)(-|$)")  # .tmp-checkpoint-<step>-<random>, .old-checkpoint-<step>
MANIFEST = "manifest.json"
FILES = ("state.pt", "config.json")

# What `torch.load(weights_only=True)` rebuilds (torch/_weights_only_unpickler.py): exact types, since a
# subclass such as numpy.float64 (a float) pickles as its own class and is refused.
_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Tensor,
           torch.nn.Parameter)
_SEQUENCES = (list, tuple, torch.Size, set)


def rng_state(generators: dict) -> dict:
    """Python, numpy, torch (CPU + CUDA) and the named torch.Generator / random.Random states, in forms
    `torch.load(weights_only=True)` rebuilds: Python's `getstate()` tuple of ints as it is, numpy's
    (str, uint32[624], int, int, float) with the key array as an int64 tensor, torch's ByteTensors."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached_gaussian)),
             "torch": torch.get_rng_state(), "generators": {}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in generators.items():
        state["generators"][name] = g.getstate() if isinstance(g, random.Random) else g.get_state()
    return state


def set_rng_state(state: dict, generators: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
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


def _check_plain(x, where: str):
    """Raise if `x` holds anything `torch.load(weights_only=True)` would refuse, so a save that could
    never be loaded fails now, not at the resume."""
    if type(x) in (dict, collections.OrderedDict):
        for k, v in x.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(x) in _SEQUENCES:
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]")
    elif type(x) not in _LEAVES:
        raise ValueError(f"checkpoint: {where}: expected tensors, dicts, lists, tuples, numbers, strings or "
                         f"None (what torch.load(weights_only=True) reads), got {type(x).__module__}."
                         f"{type(x).__qualname__}")


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_partial(output_dir):
    """Remove what a killed `save` left in `output_dir`: `.tmp-checkpoint-*` (a save that never
    became visible) and `.old-checkpoint-<step>` (the previous copy of a re-saved step). A kill
    between the two renames of a re-save leaves `.old-checkpoint-<step>` as the only copy of that step:
    it is moved back to `checkpoint-<step>` instead."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for p in sorted(out.iterdir()):
        m = _PARTIAL.match(p.name)
        if not m or not p.is_dir():
            continue
        final = out / f"checkpoint-{m.group(2)}"
        if m.group(1) == "old" and not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def save(output_dir, step: int, state: dict, config: dict, *, keep: Optional[int] = None) -> Path:
    """Write `state` (tensors and plain data) and `config` (JSON) as checkpoint-<step>, atomically, with
    a manifest of both. `keep`: how many of the newest intact checkpoints to keep (None = all); older
    checkpoint directories, intact or not, are removed."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep: expected None or an int >= 1, got {keep!r}")
    _check_plain(state, "state")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_partial(out)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=out))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    files = {}
    for name in FILES:  # the data is on disk before the manifest vouches for it
        _fsync(tmp / name)
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _fsync(tmp / MANIFEST)
    if final.exists():  # re-saving the same step (e.g. the final save): move the old one aside first
        old = out / f".old-checkpoint-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(out)  # the rename itself is on disk
    if keep is not None:
        _prune(out, keep, final)
    return final


def _steps(out: Path) -> list:
    """checkpoint-<step> directories in `out`, oldest first, intact or not."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(out: Path, keep: int, written: Path):
    """Keep the `keep` newest intact checkpoints (`written` is intact: it was just saved) and whatever is
    newer than them; remove every checkpoint directory older than the oldest kept."""
    kept = 0
    dirs = _steps(out)
    for i in range(len(dirs) - 1, -1, -1):
        if dirs[i] == written or verify(dirs[i]) is None:
            kept += 1
            if kept >= keep:
                for p in dirs[:i]:
                    shutil.rmtree(p, ignore_errors=True)
                return


def verify(path) -> Optional[str]:
    """None if the checkpoint at `path` is intact (its manifest.json lists state.pt and config.json with
    the sizes and sha256 they have), else why not. A checkpoint without manifest.json is not intact:
    its save did not finish, or it was written before checkpoints carried a manifest (such a state.pt
    also holds numpy arrays, which the weights-only loader refuses)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_bytes())["files"]
        want = {name: (int(files[name]["size"]), str(files[name]["sha256"])) for name in FILES}
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({type(exc).__name__}: {exc})"
    for name, (size, sha) in want.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {MANIFEST} says {size} (truncated or cut)"
        if _sha256(f) != sha:
            return f"{f} does not match the sha256 in {MANIFEST} (corrupted)"
    return None


def list_checkpoints(output_dir) -> list:
    """Intact checkpoints in `output_dir` (`verify`), oldest first; each one that is not intact is
    skipped with a warning naming it and why."""
    found = []
    for p in _steps(Path(output_dir)):
        reason = verify(p)
        if reason is None:
            found.append(p)
        else:
            warnings.warn(f"checkpoint: skipping {p}: {reason}", stacklevel=2)
    return found


def latest(output_dir) -> Optional[Path]:
    """The newest intact checkpoint in `output_dir` (None if there is none); each newer one that is
    not intact is skipped with a warning naming it and why."""
    for p in reversed(_steps(Path(output_dir))):
        reason = verify(p)
        if reason is None:
            return p
        warnings.warn(f"checkpoint: skipping {p}: {reason}", stacklevel=2)
    return None


def load(path) -> tuple:
    """checkpoint dir -> (state, config dict). Raises ValueError naming the file if the checkpoint is
    not intact (`verify`) or state.pt holds anything but tensors and plain data (nothing in it runs)."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ValueError(f"checkpoint: expected a directory with state.pt, got {str(path)!r}")
    reason = verify(path)
    if reason is not None:
        raise ValueError(f"checkpoint: {path} is not intact: {reason}")
    f = path / "state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it references {m.group(1)})" if m else ""
        raise ValueError(f"checkpoint: {f} holds objects other than tensors and plain data{what}; refused "
                         f"to load it, since unpickling them could run code") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"checkpoint: {f} is not a readable torch file ({type(exc).__name__}: {exc})") from None
    try:
        config = json.loads((path / "config.json").read_bytes())
    except ValueError as exc:
        raise ValueError(f"checkpoint: {path / 'config.json'} is not JSON ({exc})") from None
    return state, config


def remove_run(output_dir):
    """Delete a previous run's files from `output_dir` (`--overwrite_output_dir`): its checkpoints, partial
    saves, metrics.jsonl, samples.jsonl, summary.json, curves.png and TensorBoard logs; anything else is left
    alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_dir() and (_NAME.match(p.name) or p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-"))
                           or p.name == "tensorboard"):
            shutil.rmtree(p)
        elif p.name in ("metrics.jsonl", "samples.jsonl", "summary.json", "curves.png"):
            p.unlink()


# ----------------------------------------------------------------------------------------------------
# A training run's checkpoints (fastrlhf.train.Run)
# ----------------------------------------------------------------------------------------------------

def save_run(run: Run) -> Path:
    """Checkpoint the run at its current step: the trainable weights, the reference when the warm-start
    changed it, the optimizer, schedule, reward-shaping state, random streams and the held-out score.
    On several processes every rank calls it: the weights, optimizer and shaping state are the same on
    every rank and rank 0 writes them, with every rank's random streams ("rank_rng", rank order) and
    the world size; the others wait until the checkpoint is in place. Under --fsdp the weights and the
    optimizer state are first gathered whole to rank 0 (distributed.full_state; the optimizer's keyed by
    parameter name), so the checkpoint reads like a one-process one."""
    from .distributed import full_state, is_sharded

    dist = run.dist
    rank_rng = dist.objects([run.streams.state()]) if dist.active else None
    sharded = full_state(run) if is_sharded(run.parallel) else None    # --fsdp: gathered to rank 0
    if not dist.is_main:
        dist.barrier()
        return Path(run.cfg.output_dir) / f"checkpoint-{run.step}"
    b = run.bundle
    weights = sharded if sharded is not None else {
        "policy": trainable_state(b.policy), "value_head": b.value_head.state_dict(),
        "critic": trainable_state(b.critic) if b.critic is not None else None,
        "reference": run.reference_state, "optimizer": run.optim.optimizer.state_dict()}
    state = {"step": run.step, **weights, "scheduler": run.optim.scheduler.state_dict(),
             "moments": run.shaping.moments.state_dict(), "kl_ctl": run.shaping.kl_ctl.state_dict(),
             "rng": run.streams.state(), "eval_before": run.eval_before}
    if dist.active:
        state.update(world_size=dist.world_size, rank_rng=rank_rng)
    path = save(run.cfg.output_dir, run.step, state, run.cfg.to_dict(), keep=run.cfg.save_total_limit)
    dist.barrier()
    return path


def load_weights(run: Run, state: dict):
    """The weights of a `save_run` state into the run's models (policy, value head, critic, reference)."""
    b = run.bundle
    load_trainable_state(b.policy, state["policy"])
    b.value_head.load_state_dict(state["value_head"])
    if b.critic is not None:
        load_trainable_state(b.critic, state["critic"])
    if state["reference"] is not None:
        load_reference(b, state["reference"])
        run.reference_state = state["reference"]


def resume(run: Run, where: str) -> Path:
    """Restore the run from the checkpoint `where` (a directory, or "latest" in the run's output_dir),
    so that it continues step for step as if uninterrupted; returns the checkpoint's path."""
    path = latest(run.cfg.output_dir) if where == "latest" else Path(where)
    if path is None:
        raise ValueError(f"resume: no checkpoint in {run.cfg.output_dir!r}")
    state, saved_cfg = load(path)
    saved_world, world = state.get("world_size", 1), run.dist.world_size
    if saved_world != world:
        raise ValueError(f"resume: {path} was written by {saved_world} process(es), this run has {world}; each "
                         f"process continues its own random streams, so resume with --nproc_per_node x --nnodes "
                         f"= {saved_world}, or start a new run from its weights")
    changes = resume_changes(saved_cfg, run.cfg)
    from .distributed import is_sharded, load_full_state

    if is_sharded(run.parallel):     # --fsdp: every rank takes its shards of the whole tensors
        load_full_state(run, state)
        run.reference_state = {} if state["reference"] is not None else None
    else:
        load_weights(run, state)
        run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.scheduler.load_state_dict(state["scheduler"])
    if changes and run.dist.is_main:
        print("resume: applying flags changed since the checkpoint: "
              + ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)
    # the optimizer state carries the checkpoint's learning rates: the run's own (maybe changed) ones win
    sched = run.optim.scheduler
    sched.base_lrs = [run.cfg.learning_rate, run.cfg.critic_learning_rate][:len(sched.base_lrs)]
    for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    run.shaping.moments.load_state_dict(state["moments"])
    run.shaping.kl_ctl.load_state_dict(state["kl_ctl"])
    run.streams.set_state(state["rank_rng"][run.dist.rank] if world > 1 else state["rng"])
    run.step, run.eval_before = state["step"], state["eval_before"]
    return path
