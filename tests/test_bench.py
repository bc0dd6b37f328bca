"""The benchmarks compare equal work, and the one-command run works (README, "Benchmarks").

bench/ is not a package: its modules import as top-level names with bench/ on sys.path, as pytest and
the scripts import them.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_fused_linear as bfl  # noqa: E402
import harness  # noqa: E402

MICRO = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")
               if p.stem not in ("bench_train", "bench_memory"))


def grpo_float64(x, clip, beta):
    """GRPO (TRL GRPOTrainer, loss_type="dapo") in float64 from hidden and weight: ρ = e^{ℓ−ℓ_old},
    loss_t = max(−Aρ, −A·clip(ρ, 1−ε, 1+ε)) + β(e^{ℓ_ref−ℓ} − (ℓ_ref−ℓ) − 1), loss = Σ m·loss_t / Σ m."""
    h = x["hidden"].detach().double().requires_grad_()
    w = x["weight"].detach().double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, x["labels"][..., None]).squeeze(-1)
    a = x["adv_seq"].double()[:, None]
    ratio = torch.exp(logp - x["old"].double())
    per = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
    d = x["ref"].double() - logp
    per = per + beta * (torch.exp(d) - d - 1)
    m = x["mask"].double()
    loss = (per * m).sum() / m.sum()
    return (loss.detach(), *torch.autograd.grad(loss, (h, w))), ratio.detach()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_impls_compute_one_loss(beta):
    pytest.importorskip("liger_kernel.chunked_loss")
    x = bfl.make_inputs(3, 12, 16, 96, torch.device("cpu"), torch.float32)
    x["mask"][1, 5:] = 0                      # ragged lengths: a per-sequence mean ("grpo") would differ
    x["mask"][2, 9:] = 0
    with torch.no_grad():                     # old log-probs around the current ones: both sides of the clip
        lp = torch.log_softmax(x["hidden"] @ x["weight"].T, -1).gather(-1, x["labels"][..., None]).squeeze(-1)
        x["old"] = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
        x["ref"] = lp + 0.2 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    want, ratio = grpo_float64(x, clip=0.2, beta=beta)
    clipped = (ratio - 1).abs() > 0.2
    assert 0 < clipped.sum() < clipped.numel()   # the case exercises the clip
    impls = bfl.grpo_impls(x, clip=0.2, beta=beta, liger_compiled=False)
    assert set(impls) == {"fastrlhf", "trl", "torch", "liger"}
    for name, fn in impls.items():
        got = fn()
        for g, w, what in zip(got, want, ("loss", "grad hidden", "grad weight")):
            torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=1e-7, msg=lambda m: f"{name} {what}: {m}")


def test_results_ratios_follow_their_formula():
    """speedup_vs_<baseline> = baseline median / median, mem_saving = baseline peak / peak, per (op, shape)."""
    def bench(impl, shape, median, peak):
        return {"fullname": "bench/bench_x.py::test_x", "stats": {"median": median, "iqr": 0.0, "rounds": 3,
                                                                   "iterations": 1},
                "extra_info": {"op": "x", "impl": impl, "shape": shape, "baseline": "torch", "peak_mem_mib": peak}}
    data = {"benchmarks": [bench("fastrlhf", {"N": 1}, 0.002, 10.0), bench("torch", {"N": 1}, 0.006, 40.0),
                           bench("fastrlhf", {"N": 2}, 0.004, 5.0), bench("torch", {"N": 2}, 0.005, 20.0),
                           bench("liger", {"N": 3}, 0.001, 1.0)]}
    out = harness.results_from_pytest_benchmark(data)["x"]
    by = {(r["impl"], r["shape"]["N"]): r for r in out}
    assert by["fastrlhf", 1]["ms"] == pytest.approx(2.0)
    assert by["fastrlhf", 1]["speedup_vs_torch"] == pytest.approx(3.0)
    assert by["fastrlhf", 1]["mem_saving_vs_torch"] == pytest.approx(4.0)
    assert by["fastrlhf", 2]["speedup_vs_torch"] == pytest.approx(1.25)
    assert "speedup_vs_torch" not in by["torch", 1]          # the baseline is not compared with itself
    assert "speedup_vs_torch" not in by["liger", 3]          # no baseline in its group


def test_bench_size_and_budget_options():
    """--bench-size picks the module's SHAPES entry; --bench-budget-s 0 skips every case."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_gae.py", "--benchmark-only", "--bench-size=cpu",
                           "--bench-budget-s=0", "-p", "no:cacheprovider", "-v", "-rs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = re.findall(r"test_gae\[(\S+)\] SKIPPED", proc.stdout)
    assert sorted(skipped) == sorted(f"B64-T{t}-{i}" for t in (256, 1024) for i in ("fastrlhf", "torch", "trl"))
    assert re.search(r"SKIPPED \[6\] .*over the session budget", proc.stdout), proc.stdout


@pytest.mark.slow
def test_one_command_at_smoke_size(tmp_path):
    """bench/all.py at the smoke size: every stage passes, every benchmark writes its results file with the
    header and figures, the statistics follow their formulas, and the summary table is printed."""
    proc = subprocess.run([sys.executable, "bench/all.py", "--size=smoke", f"--results-dir={tmp_path}",
                           "--tests", "tests/test_gae.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary_smoke.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["tests", "micro", "train", "memory"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["stages"])
    assert "=== summary" in proc.stdout
    for name in MICRO + ["train", "memory"]:
        data = json.loads((tmp_path / f"{name}_smoke.json").read_text())
        for key in ("device", "torch", "triton", "commit", "size"):
            assert key in data, (name, key)
        assert data["size"] == "smoke"
        assert data["results"], name
        ms = {(r["op"], json.dumps(r["shape"], sort_keys=True), r["impl"]): r["ms"] for r in data["results"]}
        for r in data["results"]:
            assert {"op", "impl", "shape", "ms", "peak_mem_mib"} <= set(r), (name, r)
            if "gbs" in r:
                assert r["gbs"] == pytest.approx(r["bytes_moved"] / (r["ms"] * 1e-3) / 1e9), (name, r)
            if "tflops" in r:
                assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12), (name, r)
            for k in [k for k in r if k.startswith("speedup_vs_")]:
                base = ms[r["op"], json.dumps(r["shape"], sort_keys=True), k.removeprefix("speedup_vs_")]
                assert r[k] == pytest.approx(base / r["ms"]), (name, r)


def test_compare_algos_summaries_follow_the_runs(tmp_path, monkeypatch):
    """bench/compare_algos.py on two algorithms, one seed, a few steps: each run is the algorithm asked for,
    and every summary figure recomputed here from the run's own metrics.jsonl curve."""
    import compare_algos
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    compare_algos.main(["--algos", "ppo", "apa", "--seeds", "0", "--max_steps", "5", "--jobs", "1",
                        "--name", "cmp", "--work_dir", str(tmp_path / "runs"), "--sft_steps", "20",
                        "--per_device_batch_size", "8", "--eval_samples", "4", "--max_new_tokens", "3"])
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert [r["algo"] for r in data["runs"]] == ["ppo", "apa"]
    for run in data["runs"]:
        cfg = json.loads((tmp_path / "runs" / f"{run['algo']}_s0" / "summary.json").read_text())
        records = [json.loads(line) for line in
                   (tmp_path / "runs" / f"{run['algo']}_s0" / "metrics.jsonl").read_text().splitlines()]
        assert run["curves"]["kl"] == [r["kl"] for r in records]
        kl = [r["kl"] for r in records]
        assert run["kl_max"] == max(kl)
        half = kl[len(kl) // 2:]
        mean = sum(half) / len(half)
        assert run["kl_sd_last_half"] == pytest.approx((sum((x - mean) ** 2 for x in half) / len(half)) ** 0.5)
        rw = [r["reward_mean"] for r in records]
        assert run["first_last_fifth"]["reward_mean"] == pytest.approx([rw[0], rw[-1]])   # 5 steps: fifths of 1
        assert run["eval_after"] == cfg["eval_after"]
        s = data["summary"][run["algo"]]
        assert s["kl_max"]["mean"] == run["kl_max"] and s["kl_max"]["sd"] == 0.0
    assert any(k != 0 for k in data["runs"][0]["curves"]["kl"][1:])   # the KL moved: a real comparison
