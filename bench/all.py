"""Every CUDA test and every benchmark in one command, within a time budget (README, "Benchmarks").

    python bench/all.py [--size smoke|cpu|gpu] [--results-dir DIR] [--tests PATH ...]

Stages, each a subprocess with its own time limit (STAGES, scaled by --budget-s / the sum of the limits):
    tests      pytest -m cuda over --tests (default tests/): the CUDA tests (skipped without CUDA; the
               first CUDA stage also builds the extension and Triton's caches for the rest)
    micro      pytest bench/ --benchmark-only --bench-size SIZE --benchmark-json (every bench_<op>.py
               microbenchmark: op × shape × impl, bench_trl.py's GRPO step of TRL native vs TRL + fastrlhf
               included; --bench-budget-s makes it stop starting cases in time)
    train      bench_train.py (end-to-end RL steps; --gpu-sizes at the gpu size; smoke: one PPO step)
    memory     bench_memory.py (smoke: APA only; --gpu-sizes --models qwen2.5-0.5b at the gpu size; the Llama-3-8B case
               writes a 16 GB checkpoint first and runs on its own: `python bench/bench_memory.py --gpu-sizes
               --models llama-3-8b`)
Writes <results-dir>/<name>_<size>.json per benchmark (device, versions, commit, shapes, every figure),
pytest_benchmark_<size>.json (the plugin's own file) and summary_<size>.json (the stages: exit code,
wall time, whether the limit cut it short), then prints one summary table. Default size: gpu with CUDA,
smoke without (what CI runs: tests/test_bench.py).

The gpu stage limits are estimates for an H100/H200 that no GPU run has checked yet: summary_<size>.json
records each stage's wall time, to set them from.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# seconds per stage at the gpu size (480 s = 8 min in all, less the interpreter start-ups); other sizes
# are not limited by default (smoke takes under a minute on 2 CPU cores, cpu several minutes)
STAGES = {"tests": 120, "micro": 200, "train": 90, "memory": 60}
# the micro stage stops starting cases this many seconds before its limit (the JSON is written at the end)
MICRO_MARGIN_S = 30


def _run(name: str, cmd: list, limit_s, log) -> dict:
    """Run one stage; its output goes to the terminal and to the log file."""
    print(f"\n=== {name}: {' '.join(map(str, cmd))}" + (f"  (limit {limit_s:.0f} s)" if limit_s else ""), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = threading.Event()

    def kill():
        killed.set()
        os.killpg(proc.pid, signal.SIGKILL)     # the stage's own process group (start_new_session above)

    watchdog = threading.Timer(limit_s, kill) if limit_s else None
    if watchdog:
        watchdog.start()
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    proc.wait()
    if watchdog:
        watchdog.cancel()
    timed_out = killed.is_set()
    wall = time.monotonic() - t0
    print(f"=== {name}: exit {proc.returncode}, {wall:.1f} s" + (" (time limit: killed)" if timed_out else ""), flush=True)
    return {"stage": name, "rc": proc.returncode, "wall_s": wall, "limit_s": limit_s, "timed_out": timed_out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--size", choices=harness.SIZES, default="gpu" if torch.cuda.is_available() else "smoke")
    p.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--tests", nargs="+", default=["tests"], help="paths the CUDA-test stage runs [default: tests]")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds for the stages [default at the gpu size: sum of STAGES = 470; else none]")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        p.error(f"--stages: expected names from {list(STAGES)}, got {args.stages!r}")
    if importlib.util.find_spec("pytest_benchmark") is None:
        p.error("pytest-benchmark is not installed (pip install 'fastrlhf[bench]'; on the GPU machine stage its "
                "wheel and py-cpuinfo2's, README \"Benchmarks\")")
    budget = args.budget_s if args.budget_s is not None else (sum(STAGES.values()) if args.size == "gpu" else None)
    scale = budget / sum(STAGES[s] for s in stages) if budget else None
    limits = {s: STAGES[s] * scale if scale else None for s in stages}
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    gpu_flag = ["--gpu-sizes"] if args.size == "gpu" else []
    records, tables = [], []
    with open(out / f"all_{args.size}.log", "w") as log:
        for stage in stages:
            if stage == "tests":
                cmd = [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *args.tests]
            elif stage == "micro":
                raw = out / f"pytest_benchmark_{args.size}.json"
                raw.unlink(missing_ok=True)
                cmd = [py, "-m", "pytest", str(BENCH), "--benchmark-only", f"--bench-size={args.size}",
                       f"--benchmark-json={raw}", "-p", "no:cacheprovider", "-q"]
                if limits[stage]:
                    cmd.append(f"--bench-budget-s={max(limits[stage] - MICRO_MARGIN_S, 1):.0f}")
            elif stage == "train":
                cmd = [py, BENCH / "bench_train.py", *gpu_flag, "--results-dir", out]
                if args.size == "smoke":
                    cmd += ["--steps", "1", "--algos", "ppo"]
            else:
                cmd = [py, BENCH / "bench_memory.py", *gpu_flag, "--results-dir", out]
                if args.size == "smoke":
                    cmd += ["--algos", "apa"]
                if args.size == "gpu":
                    cmd += ["--models", "qwen2.5-0.5b"]
            rec = _run(stage, cmd, limits[stage], log)
            if stage == "micro" and raw.exists():
                for name, (path, results) in harness.write_module_results(raw, args.size, out).items():
                    rec.setdefault("files", []).append(path.name)
                    tables += harness.summary_rows(results)
            elif stage in ("train", "memory"):
                path = out / f"{stage}_{'gpu' if args.size == 'gpu' else 'smoke'}.json"
                if path.exists() and path.stat().st_mtime >= time.time() - rec["wall_s"] - 1:
                    rec["files"] = [path.name]
                    tables += json.loads(path.read_text())["results"]
            records.append(rec)
    summary = harness.write_results(f"summary_{args.size}", tables, results_dir=out,
                                    extra={"size": args.size, "budget_s": budget, "stages": records})
    print("\n=== summary (ms = median per call; speedup over the group's baseline impl)")
    harness.print_table([r for r in tables if r.get("ms") is not None], harness.SUMMARY_KEYS)
    for r in records:
        print(f"{r['stage']:8s} exit {r['rc']}  {r['wall_s']:.1f} s" + ("  TIME LIMIT" if r["timed_out"] else ""))
    print(f"wrote {summary}")
    return 0 if all(r["rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
