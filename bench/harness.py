"""Shared benchmark pieces: the synchronizing timer, peak memory, device ceilings and the results files.

The microbenchmarks (bench_<op>.py with `test_*` functions) run under pytest-benchmark
(README, "Benchmarks"): `measure` below sizes the rounds to a time budget and hands the timing loop and
the statistics to the plugin's `benchmark.pedantic`; it adds, in `extra_info`, the op, impl and shape,
the peak memory (`peak_extra_mib`) and the achieved bandwidth / FLOP rate where the op has a byte or
FLOP count. `results_from_pytest_benchmark` turns the plugin's `--benchmark-json` file into
`bench/results/<name>.json` = {"device", "torch", "triton", "commit", ..., "results": [...]}, each result
at least {"op", "impl", "shape", "ms", "peak_mem_mib"}; `impl` is one of IMPLS. The end-to-end scripts
(bench_train.py, bench_memory.py) write their results files with `write_results` directly.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
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
SIZES = ("smoke", "cpu", "gpu")


def device_info() -> dict:
    """Device name, library versions, the git commit of the measured code, and the CPU load when it is
    called (the development machine's 2 cores are shared: a load average above the core count means
    contention)."""
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
    versions = {}
    for dist in ("liger-kernel", "transformers", "pytest-benchmark"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"device": device, "torch": torch.__version__, "triton": triton_version, **versions, "commit": commit,
            "cpu_threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0]}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of the end-to-end scripts (bench_train.py, bench_memory.py); scripts add their own."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--gpu-sizes", action="store_true",
                        help="the GPU shapes (the default when CUDA is present)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where <name>_<size>.json goes [default: bench/results]")
    return parser


def start(doc: str, argv=None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse the flags (`parser`: arg_parser(doc) with a script's own flags added) -> (args, device, gpu):
    gpu = run the GPU shapes (CUDA present, or --gpu-sizes)."""
    args = (parser or arg_parser(doc)).parse_args(argv)
    device = default_device()
    return args, device, device.type == "cuda" or args.gpu_sizes


def timer() -> float:
    """pytest-benchmark's clock: `time.perf_counter` after draining the CUDA queue, so a round (one or
    more calls between two readings) counts the device work it launched, not only the launches."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


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


def aux_ms(fn: Callable[[], object], rep: int = 10) -> float:
    """Median of `rep` synchronized calls after one warm-up, for side figures that go into a benchmark's
    extra_info (the device ceilings below, the restoring copy of an in-place variant), not benchmarks."""
    fn()
    times = []
    for _ in range(rep):
        t0 = timer()
        fn()
        times.append((timer() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: Optional[torch.device] = None, mib: int = 1024) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read + bytes written, GB/s."""
    device = device or default_device()
    if device.type != "cuda":
        mib = min(mib, 64)
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = aux_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: Optional[torch.device] = None, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate (2·n³ FLOPs per product), TFLOP/s."""
    device = device or default_device()
    if device.type != "cuda":
        n, dtype = min(n, 512), torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = aux_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def result(op: str, impl: str, shape: dict, ms: Optional[float], peak_mem_mib: Optional[float], **extra) -> dict:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return {"op": op, "impl": impl, "shape": shape, "ms": ms, "peak_mem_mib": peak_mem_mib, **extra}


def measure(bench, fn: Callable[[], object], *, op: str, impl: str, shape: dict, baseline: Optional[str] = None,
            bytes_moved: Optional[float] = None, flops: Optional[float] = None, memory: bool = True,
            min_rounds: Optional[int] = None, **extra) -> None:
    """Time fn() with pytest-benchmark and record the figures in its extra_info.

    `bench` is the `bench` fixture of bench/conftest.py (the plugin's `benchmark` plus the size's time
    budget). A warm-up call (compilation, autotuning, caches) and, unless it alone overran the case's budget,
a second one are timed to size the run: `iterations`
    calls per round so a round lasts at least `bench.min_round_s`, and as many rounds as fit in
    `bench.case_budget_s`, between `bench.min_rounds` and `bench.max_rounds`: the slowest impls get the
    fewest rounds. `baseline`: the impl the results file compares this group with (speedup = its
    median / this median). `bytes_moved` / `flops`: what the op must move / compute, giving `gbs`,
    `frac_copy_bw` and `tflops`, `frac_matmul` against the ceilings measured in the same session.
    `memory=False` skips the peak-memory call (recorded as None, with the reason in `extra`).
    `min_rounds` overrides the size's minimum (whole generate calls: one round is a median of one).
    """
    t0 = timer()
    fn()
    first_s = call_s = timer() - t0
    if first_s < bench.case_budget_s:   # time a second call: the first one may have compiled or autotuned
        t0 = timer()
        fn()
        call_s = timer() - t0
    call_s = max(call_s, 1e-9)
    iterations = max(1, math.ceil(bench.min_round_s / call_s))
    least = bench.min_rounds if min_rounds is None else min(min_rounds, bench.min_rounds)
    rounds = int(min(bench.max_rounds, max(least, bench.case_budget_s // (call_s * iterations))))
    bench.benchmark.group = f"{op} " + ",".join(f"{k}={v}" for k, v in shape.items())
    bench.benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    info = bench.benchmark.extra_info
    info.update(op=op, impl=impl, shape=shape, baseline=baseline, first_call_ms=first_s * 1e3, **extra)
    info["peak_mem_mib"] = peak_extra_mib(fn, bench.device) if memory else None
    stats = bench.benchmark.stats
    if stats is None:          # --benchmark-disable: fn ran once, nothing timed
        return
    median_s = stats.stats.median
    if bytes_moved is not None:
        info["bytes_moved"] = bytes_moved
        info["gbs"] = bytes_moved / median_s / 1e9
        info["frac_copy_bw"] = info["gbs"] / bench.ceilings()["copy_bandwidth_gbs"]
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / median_s / 1e12
        info["frac_matmul"] = info["tflops"] / bench.ceilings()["matmul_tflops"]


def results_from_pytest_benchmark(data: dict) -> dict:
    """The plugin's --benchmark-json payload -> {bench module name: [result, ...]}.

    Each result: extra_info's op, impl, shape and figures, `ms` = the median round time per call,
    `iqr_ms`, `rounds`, `iterations`; per (op, shape) group, `speedup_vs_<baseline>` = baseline ms / ms
    and `mem_saving_vs_<baseline>` = baseline peak / peak where the group has its baseline's result.
    """
    out: dict = {}
    for b in data.get("benchmarks", []):
        info = dict(b["extra_info"])
        if "op" not in info:
            continue
        name = Path(b["fullname"].split("::")[0]).stem.removeprefix("bench_")
        s = b["stats"]
        r = result(info.pop("op"), info.pop("impl"), info.pop("shape"), s["median"] * 1e3, info.pop("peak_mem_mib"),
                   iqr_ms=s["iqr"] * 1e3, rounds=s["rounds"], iterations=s["iterations"], **info)
        out.setdefault(name, []).append(r)
    for results in out.values():
        groups: dict = {}
        for r in results:
            groups.setdefault((r["op"], json.dumps(r["shape"], sort_keys=True)), []).append(r)
        for rs in groups.values():
            for r in rs:
                base = next((x for x in rs if x["impl"] == r.get("baseline") and x is not r), None)
                if base is None:
                    continue
                r[f"speedup_vs_{base['impl']}"] = base["ms"] / r["ms"]
                if base["peak_mem_mib"] and r["peak_mem_mib"]:
                    r[f"mem_saving_vs_{base['impl']}"] = base["peak_mem_mib"] / r["peak_mem_mib"]
    return out


def write_results(name: str, results: list, extra: Optional[dict] = None, results_dir: Optional[Path] = None,
                  header: Optional[dict] = None) -> Path:
    """Write <results_dir>/<name>.json (default bench/results/) with the device header and every result."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {**(header or device_info()), **(extra or {}), "results": results}
    path = results_dir / f"{name}.json"
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
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={val}" for k, val in v.items())
    return "-" if v is None else str(v)


def write_module_results(raw: Path, size: str, results_dir: Optional[Path] = None) -> dict:
    """The plugin's --benchmark-json file `raw` -> <results_dir>/<name>_<size>.json per bench module, each
    with the session's header (device, versions, commit, ceilings) and that module's skipped cases.
    Returns {name: (path, results)}."""
    data = json.loads(Path(raw).read_text())
    header = data.get("fastrlhf", {})
    out = {}
    for name, results in results_from_pytest_benchmark(data).items():
        skipped = [s for s in header.get("skipped", []) if f"bench_{name}.py" in s["test"]]
        path = write_results(f"{name}_{size}", results, results_dir=results_dir,
                             header={k: v for k, v in header.items() if k != "skipped"},
                             extra={"skipped": skipped, "pytest_benchmark_json": Path(raw).name})
        out[name] = (path, results)
    return out


SUMMARY_KEYS = ("op", "impl", "shape", "ms", "peak_mem_mib", "speedup", "gbs", "tflops")


def summary_rows(results: list) -> list:
    """Rows for the summary table: `speedup` is the speedup over the group's baseline, whichever it is."""
    rows = []
    for r in results:
        speed = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
        rows.append({**r, "speedup": speed})
    return rows


def script_main(file: str, argv=None) -> int:
    """`python bench/bench_<op>.py [--size smoke|cpu|gpu] [pytest args]`: that module's benchmarks, its
    results file, and a table."""
    p = argparse.ArgumentParser(description=f"pytest-benchmark run of {Path(file).name}")
    p.add_argument("--size", choices=SIZES, default="gpu" if torch.cuda.is_available() else "smoke")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args, rest = p.parse_known_args(argv)
    import pytest

    args.results_dir.mkdir(parents=True, exist_ok=True)
    raw = args.results_dir / f"pytest_benchmark_{Path(file).stem}_{args.size}.json"
    rc = pytest.main([file, "--benchmark-only", f"--bench-size={args.size}", f"--benchmark-json={raw}",
                      "-p", "no:cacheprovider", "-q", *rest])
    if raw.exists():
        for path, results in write_module_results(raw, args.size, args.results_dir).values():
            print_table(summary_rows(results), SUMMARY_KEYS)
            print(f"wrote {path}")
    return int(rc)
