"""Shared benchmark harness: timing, peak memory, device ceilings and the results file.

Every bench script measures side by side in one run and writes
`bench/results/<name>.json` = {"device", "torch", "triton", "commit", "results": [...]},
each result at least {"op", "impl", "shape", "ms", "peak_mem_mib"}; `impl` is one of
fastrlhf, torch, torch.compile, liger, cce, trl, hf.

Scripts run as `python bench/bench_<op>.py [--gpu-sizes]` and `import harness` from their own folder.

CPU timings are noisy: report medians and ratios (README, "Benchmarks"). On CUDA, times come from
`triton.testing.do_bench` (CUDA events, median) and memory from the caching allocator's peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLS = ("fastrlhf", "torch", "torch.compile", "liger", "cce", "trl", "hf")


def device_info() -> dict:
    """Device name, library versions and the git commit of the measured code."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "commit": commit}


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every bench script takes; scripts add their own."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--gpu-sizes", action="store_true",
                        help="the GPU shapes (the default when CUDA is present)")
    return parser


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def start(doc: str, argv=None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse the flags (`parser`: arg_parser(doc) with a script's own flags added) -> (args, device, gpu):
    gpu = run the GPU shapes (CUDA present, or --gpu-sizes)."""
    args = (parser or arg_parser(doc)).parse_args(argv)
    device = default_device()
    return args, device, device.type == "cuda" or args.gpu_sizes


def time_ms(fn: Callable[[], object], *, warmup: int = 3, rep: int = 10, device: Optional[torch.device] = None) -> float:
    """Median wall time of fn() in milliseconds (warm-up runs excluded)."""
    device = device or default_device()
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mib(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Peak memory fn() needs beyond what is allocated before it, in MiB.

    CUDA: the caching allocator's max_memory_allocated over the baseline. CPU: fn runs once in a
    forked child, and the result is the child's peak RSS (VmHWM, reset at start) minus its RSS at
    the start, so earlier allocations of this process do not count.
    """
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            # The parent's OpenMP pool does not survive fork(): a parallel op in the child would hang.
            torch.set_num_threads(1)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _rss_kib("VmRSS")
            fn()
            peak = _rss_kib("VmHWM")
            os.write(write_fd, str((peak - base) / 1024).encode())
        except BaseException:  # report failure to the parent through the exit code
            code = 1
        finally:
            os.close(write_fd)
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not out:
        raise RuntimeError("peak_extra_mib: the measured function failed in the child process")
    return float(out)


def copy_bandwidth_gbs(device: Optional[torch.device] = None, mib: int = 1024) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read + bytes written, GB/s."""
    device = device or default_device()
    if device.type != "cuda":
        mib = min(mib, 256)
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: Optional[torch.device] = None, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate (2·n³ FLOPs per product), TFLOP/s."""
    device = device or default_device()
    if device.type != "cuda":
        n, dtype = min(n, 1024), torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device=device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def result(op: str, impl: str, shape: dict, ms: float, peak_mem_mib: Optional[float], **extra) -> dict:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return {"op": op, "impl": impl, "shape": shape, "ms": ms, "peak_mem_mib": peak_mem_mib, **extra}


def write_results(name: str, results: list, extra: Optional[dict] = None) -> Path:
    """Write bench/results/<name>.json with the device header and every result."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {**device_info(), **(extra or {}), "results": results}
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(results: list, keys=("op", "impl", "shape", "ms", "peak_mem_mib")) -> None:
    """A short fixed-width table of results, for the terminal."""
    rows = [[_fmt(r.get(k)) for k in keys] for r in results]
    widths = [max(len(k), *(len(row[i]) for row in rows)) if rows else len(k) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={val}" for k, val in v.items())
    return str(v)
