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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from train_runs import band, mean_sd, run_grid, train_run  # noqa: E402

from fastrlhf.metrics import fifth_means  # noqa: E402

CURVES = ("reward_mean", "kl", "entropy", "response_len")


def run_one(algo: str, seed: int, work: Path, args, extra) -> dict:
    cmd, records, summary, wall = train_run(["--algo", algo, "--seed", str(seed), "--max_steps", str(args.max_steps),
                                             *extra], work / f"{algo}_s{seed}", "compare_algos")
    kl = [r["kl"] for r in records]
    half = kl[len(kl) // 2:]
    print(f"{algo} seed {seed}: {wall:.0f} s, reward {summary['reward_first_fifth']:.3f} -> "
          f"{summary['reward_last_fifth']:.3f}, kl last fifth {fifth_means(records, 'kl')[1]:.4f}",
          file=sys.stderr, flush=True)
    return {"algo": algo, "seed": seed, "command": cmd, "wall_s": wall,
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            "first_last_fifth": {k: fifth_means(records, k) for k in CURVES},
            "kl_max": max(kl), "kl_sd_last_half": statistics.pstdev(half) if len(half) > 1 else 0.0,
            "curves": {k: [r.get(k) for r in records] for k in ("step",) + CURVES}}


def algo_summary(runs: list) -> dict:
    """Mean and (population) sd over seeds of each figure of `run_one`."""
    out = {"seeds": [r["seed"] for r in runs]}
    for k in CURVES:
        out[f"{k}_first_fifth"] = mean_sd([r["first_last_fifth"][k][0] for r in runs])
        out[f"{k}_last_fifth"] = mean_sd([r["first_last_fifth"][k][1] for r in runs])
    for k in ("eval_before", "eval_after", "kl_max", "kl_sd_last_half"):
        out[k] = mean_sd([r[k] for r in runs])
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
            band(ax, steps, [r["curves"][k] for r in runs], algo, w)
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
    runs, wall = run_grid(lambda *g: run_one(*g, args, extra), grid, args.jobs, args.work_dir, "compare_algos_")
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
