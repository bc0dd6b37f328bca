"""PPO, PPO-max and APA side by side: reward and KL to the initial policy over training, over seeds.

The APA paper (Zhu et al., arXiv 2306.02231, §5) claims that APA reaches a higher reward than PPO with a
steadier KL to the initial policy. This runs `fastrlhf train --algo A --seed S` for every algorithm and seed
on one built-in task (default: the quickstart's arithmetic task, its defaults otherwise: each algorithm with
its preset, README "Train: PPO, PPO-max, APA") and compares, per algorithm (mean and sd over seeds):
- reward: the rollout's mean reward, first and last fifth of the steps; the held-out greedy reward after;
- KL to the initial policy: metrics.jsonl's `kl` (the mean over response tokens of the k1 estimate
  ℓ − ℓ_ref against the reference = the policy at the start of RL), its last-fifth mean, its largest value,
  and its step-to-step steadiness: the sd over the last half of the steps.

Writes `bench/results/NAME.json` (every run's curves, the per-algorithm summaries, the exact commands, wall
times, device) and `bench/results/NAME.png` (reward and KL over steps, mean over seeds, band = min..max).

    python bench/compare_algos.py [--algos ppo ppo-max apa] [--seeds 0 1 2] [--max_steps 150] [--jobs 2]
        [--name compare_algos] [any `fastrlhf train` flag, e.g. --task padula-arithmetic ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from replicate_padula import smooth  # noqa: E402

from fastrlhf.metrics import fifth_means, read_metrics  # noqa: E402

CURVES = ("reward_mean", "kl", "entropy", "response_len")


def run_one(algo: str, seed: int, args, extra, work: Path) -> dict:
    out = work / f"{algo}_s{seed}"
    cmd = [sys.executable, "-m", "fastrlhf.cli", "train", "--algo", algo, "--seed", str(seed),
           "--max_steps", str(args.max_steps), "--output_dir", str(out), "--overwrite_output_dir",
           "--num_threads", "1", "--save_minutes", "0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compare_algos: run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    records = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    kl = [r["kl"] for r in records]
    half = kl[len(kl) // 2:]
    print(f"{algo} seed {seed}: {wall:.0f} s, reward {summary['reward_first_fifth']:.3f} -> "
          f"{summary['reward_last_fifth']:.3f}, kl last fifth {fifth_means(records, 'kl')[1]:.4f}",
          file=sys.stderr, flush=True)
    return {"algo": algo, "seed": seed, "command": cmd[2:], "wall_s": wall,
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            "first_last_fifth": {k: fifth_means(records, k) for k in CURVES},
            "kl_max": max(kl), "kl_sd_last_half": statistics.pstdev(half) if len(half) > 1 else 0.0,
            "curves": {k: [r.get(k) for r in records] for k in ("step",) + CURVES}}


def algo_summary(runs: list) -> dict:
    """Mean and (population) sd over seeds of each figure of `run_one`."""
    def ms(vals):
        vals = [v for v in vals if v is not None] or [float("nan")]
        return {"mean": statistics.fmean(vals), "sd": statistics.pstdev(vals), "per_seed": vals}
    out = {"seeds": [r["seed"] for r in runs]}
    for k in CURVES:
        out[f"{k}_first_fifth"] = ms([r["first_last_fifth"][k][0] for r in runs])
        out[f"{k}_last_fifth"] = ms([r["first_last_fifth"][k][1] for r in runs])
    for k in ("eval_before", "eval_after", "kl_max", "kl_sd_last_half"):
        out[k] = ms([r[k] for r in runs])
    return out


def plot(by_algo: dict, path: Path, w: int, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("reward_mean", "mean reward"), ("kl", "KL to the initial policy (k1, nats/token)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 3.6))
    for algo, runs in by_algo.items():
        steps = runs[0]["curves"]["step"]
        for ax, (k, _) in zip(axes, keys):
            per_seed = [smooth(r["curves"][k], w) for r in runs]
            line, = ax.plot(steps, [statistics.fmean(v) for v in zip(*per_seed)], label=algo)
            ax.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                            color=line.get_color(), alpha=0.15)
    for ax, (_, t) in zip(axes, keys):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", nargs="+", default=["ppo", "ppo-max", "apa"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--name", default="compare_algos", help="bench/results/NAME.json and NAME.png")
    p.add_argument("--work_dir", default=None, help="where the runs go [default: a temporary directory]")
    args, extra = p.parse_known_args(argv)
    grid = [(a, s) for a in args.algos for s in args.seeds]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare_algos_") as tmp:
        work = Path(args.work_dir or tmp)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(lambda g: run_one(*g, args, extra, work), grid))
    wall = time.perf_counter() - t0
    by_algo = {}
    for r in runs:
        by_algo.setdefault(r["algo"], []).append(r)
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    png = harness.RESULTS_DIR / f"{args.name}.png"
    plot(by_algo, png, args.smooth, f"{' '.join(extra) or 'fastrlhf train defaults'}: {len(args.seeds)} seeds "
         f"(mean, band = min..max; trailing mean over {args.smooth} steps)")
    result = {"script": "bench/compare_algos.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "extra_train_flags": extra, "algos": args.algos, "seeds": args.seeds, "max_steps": args.max_steps,
              "jobs": args.jobs, "wall_s": wall, **harness.device_info(),
              "summary": {a: algo_summary(rs) for a, rs in by_algo.items()}, "runs": runs}
    path = harness.RESULTS_DIR / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} and {png} ({wall:.0f} s)", file=sys.stderr)
    print("| algo | reward first → last fifth | held-out greedy after | KL last fifth | KL max | KL sd (last half) |")
    print("|---|---|---|---|---|---|")
    for a, s in result["summary"].items():
        f = lambda d, n=3: f"{d['mean']:.{n}f} ± {d['sd']:.{n}f}"  # noqa: E731
        print(f"| {a} | {s['reward_mean_first_fifth']['mean']:.3f} → {f(s['reward_mean_last_fifth'])} | "
              f"{f(s['eval_after'])} | {f(s['kl_last_fifth'], 4)} | {f(s['kl_max'], 4)} | {f(s['kl_sd_last_half'], 4)} |")


if __name__ == "__main__":
    main()
