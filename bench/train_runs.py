"""Grids of `fastrlhf train` runs for the reproduction scripts (replicate_padula.py, compare_algos.py):
one run in a subprocess, a grid of them on a few threads, and the statistics and plot pieces both share."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from fastrlhf.metrics import read_metrics


def train_run(flags: list, out: Path, who: str) -> tuple:
    """`fastrlhf train FLAGS` into `out` (one thread, no periodic saves, unless FLAGS say otherwise) ->
    (command from `fastrlhf.cli` on, metrics records, summary, wall seconds); a failed run stops the script with
    its stderr, `who` naming the script."""
    cmd = [sys.executable, "-m", "fastrlhf.cli", "train", "--output_dir", str(out), "--overwrite_output_dir",
           "--num_threads", "1", "--save_minutes", "0", *flags]   # FLAGS last: they win
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{who}: run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return cmd[2:], read_metrics(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text()), wall


def run_grid(fn: Callable, grid: list, jobs: int, work_dir: Optional[str], prefix: str) -> tuple:
    """fn(*point, work) for every point of the grid, `jobs` at once, in `work_dir` (None: a temporary
    directory) -> (results in grid order, wall seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(work_dir or tmp)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            runs = list(pool.map(lambda g: fn(*g, work), grid))
    return runs, time.perf_counter() - t0


def mean_sd(vals: list) -> dict:
    """Mean and population sd over seeds, None values (e.g. no held-out reward) left out."""
    vals = [v for v in vals if v is not None] or [float("nan")]
    return {"mean": statistics.fmean(vals), "sd": statistics.pstdev(vals), "per_seed": vals}


def smooth(xs: list, w: int) -> list:
    """Trailing mean over the last `w` values (fewer at the start)."""
    return [statistics.fmean(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def band(ax, steps: list, per_seed: list, label: str, w: int) -> None:
    """The mean over seeds of the smoothed curves, with a band from their min to their max."""
    curves = [smooth(c, w) for c in per_seed]
    line, = ax.plot(steps, [statistics.fmean(v) for v in zip(*curves)], label=label)
    ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                    color=line.get_color(), alpha=0.15)
