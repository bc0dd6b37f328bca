"""Run metrics: `<output_dir>/metrics.jsonl` (one JSON object per step), `<output_dir>/samples.jsonl` (a
few samples per step), optional TensorBoard, a PNG of the reward / KL / entropy curves, and the final summary."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import List, Optional

import torch

REQUIRED = ("step", "reward_mean", "reward_std", "kl", "entropy", "loss", "value_loss", "clip_frac",
            "response_len", "tokens_per_s", "peak_mem_mib")


class MetricsLogger:
    """Appends one record per step to metrics.jsonl (truncated to `start_step` on resume, so a
    resumed run's file equals an uninterrupted run's) and mirrors scalars to TensorBoard.

    Each record is one `write` of its whole line to the file opened for appending, so a kill leaves at
    worst a torn last line, which `read_metrics` skips; the truncation at start goes through a
    temporary file and `os.replace`, so a kill during it leaves the old file whole."""

    def __init__(self, output_dir, *, report_to: str = "none", start_step: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.records: List[dict] = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        _replace_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict):
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ValueError(f"record: missing metrics {missing}")
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        _append_line(self.path, json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


class SampleLogger:
    """Appends, per step, the first `n` samples of the rollout to samples.jsonl, one JSON object per sample:
    {"step", "prompt", "response", "reward"} (the response text as the reward saw it, the raw reward).

    As MetricsLogger: a step's lines go in one `write` (a kill tears at most the last line, which
    `read_metrics` skips), and at start the file is cut to the records of steps <= `start_step` through a
    temporary file and `os.replace`, so a resumed run's file equals an uninterrupted run's. `n` = 0 writes
    nothing and leaves the file alone."""

    def __init__(self, output_dir, n: int, *, start_step: int = 0):
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"log_samples: expected an int >= 0, got {n!r}")
        self.n, self.path = n, Path(output_dir) / "samples.jsonl"
        if n:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            _replace_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, prompts, responses, rewards):
        rows = list(zip(prompts, responses, rewards))[:self.n]
        if rows:
            _append_line(self.path, "".join(json.dumps({"step": step, "prompt": p, "response": r,
                                                        "reward": float(x)}) + "\n" for p, r, x in rows))


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _append_line(path: Path, line: str):
    """One write(2) of the whole line at the end of the file (O_APPEND), so lines never interleave
    and a kill cuts at most this one."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a regular file takes it in one write unless the disk is full
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _replace_text(path: Path, text: str):
    """Replace `path`'s contents with `text` atomically: a temporary file in the same directory, on
    disk, then `os.replace`. A kill before the rename leaves the old file; the next call overwrites
    the temporary one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metrics(path) -> List[dict]:
    """The records of a metrics.jsonl, in order. A torn last line (one without its newline, or the last
    one that is not a JSON object: a kill during its append) is skipped; any other line that is not a
    JSON object is an error naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail: b"" after the last newline, or a torn line
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except ValueError as exc:  # json.JSONDecodeError, or UnicodeDecodeError on scrambled bytes
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(record, dict):
                records.append(record)
                continue
            reason = f"got a JSON {type(record).__name__}"
        if k == len(numbered) - 1 and not tail.strip():
            break  # the last line, torn
        raise ValueError(f"metrics: {path}:{i}: expected one JSON object per line, {reason}")
    return records


def peak_mem_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fifth_means(records: List[dict], key: str = "reward_mean") -> tuple:
    """(mean of `key` over the first fifth of steps, over the last fifth)."""
    vals = [r[key] for r in records if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan")
    k = max(1, len(vals) // 5)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def plot(records: List[dict], path) -> Optional[Path]:
    """PNG with reward, KL and entropy against step (matplotlib Agg)."""
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("reward_mean", "kl", "entropy"), ("reward", "KL", "entropy")):
        ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in records])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def summary(records: List[dict], *, wall_s: float, peak_mib: float) -> dict:
    first, last = fifth_means(records)
    return {"steps": len(records), "reward_first_fifth": first, "reward_last_fifth": last,
            "wall_s": wall_s, "peak_mem_mib": peak_mib}


def format_summary(s: dict) -> str:
    return (f"reward {s['reward_first_fifth']:.3f} -> {s['reward_last_fifth']:.3f} (first -> last fifth of "
            f"{s['steps']} steps) | {s['wall_s']:.1f} s | peak memory {s['peak_mem_mib']:.0f} MiB")
