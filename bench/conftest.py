"""pytest set-up for the microbenchmarks: `pytest bench/ --benchmark-only [--bench-size smoke|cpu|gpu]`.

bench_<op>.py files are collected as test modules (pytest's default pattern is test_*.py); each one's
`SHAPES = {"smoke": [...], "cpu": [...], "gpu": [...]}` parametrizes its `shape` argument at the size
chosen here. The `bench` fixture gives the plugin's `benchmark` with the CUDA-synchronizing timer and
the size's time budget (harness.measure). pyproject's testpaths=["tests"] keeps plain `pytest` off bench/.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# end-to-end scripts (run by bench/all.py) and helpers: not pytest-benchmark modules
collect_ignore = ["harness.py", "all.py", "bench_train.py", "bench_memory.py"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one (op, shape, impl) case may take: rounds of `iterations` calls, each round at least
    min_round_s (so the timer's CUDA synchronization is a small share), as many rounds as fit in
    case_budget_s, clamped to [min_rounds, max_rounds]."""
    case_budget_s: float
    min_rounds: int
    max_rounds: int
    min_round_s: float


BUDGETS = {
    "smoke": Budget(case_budget_s=0.05, min_rounds=1, max_rounds=3, min_round_s=0.0),   # checks the code runs
    "cpu": Budget(case_budget_s=10.0, min_rounds=3, max_rounds=20, min_round_s=0.01),
    "gpu": Budget(case_budget_s=0.5, min_rounds=3, max_rounds=100, min_round_s=0.002),
}


def pytest_addoption(parser):
    group = parser.getgroup("fastrlhf bench")
    group.addoption("--bench-size", choices=harness.SIZES, default=None,
                    help="shapes to run: smoke (tiny, CI), cpu (the README's CPU figures), gpu "
                         "[default: gpu with CUDA, else smoke]")
    group.addoption("--bench-budget-s", type=float, default=None,
                    help="wall-clock budget of the whole session: cases that would start later are skipped")
    group.addoption("--bench-compile", action="store_true",
                    help="also the torch.compile baselines on the CPU (always on CUDA; minutes to compile on CPU)")


def bench_size(config) -> str:
    return config.getoption("--bench-size") or ("gpu" if torch.cuda.is_available() else "smoke")


def pytest_configure(config):
    config.stash[_START] = time.monotonic()
    config.stash[_LOAD] = os.getloadavg()[0]


_START = pytest.StashKey[float]()
_LOAD = pytest.StashKey[float]()
_CEILINGS: dict = {}


def pytest_collect_file(file_path: Path, parent):
    # a file named on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = metafunc.module.SHAPES[bench_size(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[shape_id(s) for s in shapes])


@dataclasses.dataclass
class Bench:
    benchmark: object
    device: torch.device
    size: str
    case_budget_s: float
    min_rounds: int
    max_rounds: int
    min_round_s: float
    compile_ok: bool
    ceilings: Callable[[], dict]


def _ceilings(device: torch.device) -> dict:
    """Copy bandwidth and matmul rate, measured once per session when a benchmark first needs them."""
    if not _CEILINGS:
        _CEILINGS.update(copy_bandwidth_gbs=harness.copy_bandwidth_gbs(device),
                         matmul_tflops=harness.matmul_tflops(device))
    return _CEILINGS


@pytest.fixture
def device() -> torch.device:
    return harness.default_device()


@pytest.fixture
def bench(benchmark, request, device):
    config = request.config
    budget = config.getoption("--bench-budget-s")
    if budget is not None and time.monotonic() - config.stash[_START] > budget:
        pytest.skip(f"over the session budget (--bench-budget-s {budget:g})")
    benchmark._timer = harness.timer          # the plugin's clock, synchronized on CUDA
    size = bench_size(config)
    b = BUDGETS[size]
    yield Bench(benchmark, device, size, b.case_budget_s, b.min_rounds, b.max_rounds, b.min_round_s,
                compile_ok=device.type == "cuda" or config.getoption("--bench-compile"),
                ceilings=lambda: _ceilings(device))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """An out-of-memory error is a result of the case (the shape does not fit this impl), not a failure."""
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(torch.cuda.OutOfMemoryError):
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"out of memory: {str(call.excinfo.value)[:200]}")
        gc.collect()
        torch.cuda.empty_cache()


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _REPORTS.append({"test": report.nodeid, "skipped": reason})


_REPORTS: list = []


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The results file's header (bench/all.py): size, device and versions, the CPU load average at the
    session's start and end, ceilings, skipped cases."""
    output_json["fastrlhf"] = {"size": bench_size(config), **harness.device_info(), **_CEILINGS,
                               "load_average_1m_start": config.stash[_LOAD],
                               "skipped": list(_REPORTS)}
