"""Padula & Soemers' (arXiv 2410.17126) entropy / batch-entropy ablation on their arithmetic task.

A grid of `fastrlhf train --recipe padula-arithmetic` runs (their task, reward, GPT-2 at fastrlhf's CPU size,
their SFT and PPO settings; fastrlhf/recipes/padula-arithmetic.yaml): seeds x entropy_coef x
batch_entropy_coef (default 3 seeds x {0, 0.3} x {0, 0.3}: their released run is entropy 0.3 with batch
entropy off, `simple_arithmatic/trl_math.py:85-86`; batch entropy is the fork's `cross_batch_entropy`,
PadLex/trl `trl/core.py`). Each run logs per step (fastrlhf.tasks.ChainArithmeticTask.answer_metrics):
mean reward, exact-answer rate, the entropy of the distribution of answers given over the rollout's 128
prompts, the number of distinct answers and the share of the most common one.

Writes `bench/results/replicate_padula.json` (every run's curves and summary, the per-setting means over
seeds, the exact commands, wall times) and `bench/results/replicate_padula.png` (mean over seeds per
setting, the band = min..max over seeds, curves smoothed over `--smooth` steps).

    python bench/replicate_padula.py [--seeds 0 1 2] [--entropy_coefs 0 0.3] [--batch_entropy_coefs 0 0.3]
        [--max_steps 150] [--jobs 2] [--name replicate_padula] [any `fastrlhf train` flag ...]

Flags the script does not know go to every `fastrlhf train` run unchanged (after the grid's own flags, so
they win), e.g. `--learning_rate 1e-4` or `--batch_entropy_positions last`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from train_runs import band, mean_sd, run_grid, train_run  # noqa: E402

from fastrlhf.metrics import fifth_means  # noqa: E402

CURVES = ("reward_mean", "exact_rate", "answer_entropy", "distinct_answers", "answer_mode_frac", "entropy")
TITLES = {"reward_mean": "mean reward", "exact_rate": "exact-answer rate",
          "answer_entropy": "answer entropy (nats, over the batch)", "distinct_answers": "distinct answers (of 128)",
          "answer_mode_frac": "share of the most common answer", "entropy": "token entropy (nats)"}


def run_one(seed: int, ent: float, bent: float, work: Path, args, extra) -> dict:
    out = work / f"s{seed}_ent{ent}_bent{bent}"
    cmd, records, summary, wall = train_run(
        ["--recipe", "padula-arithmetic", "--seed", str(seed), "--entropy_coef", str(ent), "--batch_entropy_coef",
         str(bent), "--max_steps", str(args.max_steps), *extra], out, "replicate_padula")
    samples_file = out / "samples.jsonl"   # written by trainers with --log_samples
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()] \
        if samples_file.is_file() else []
    last_step = records[-1]["step"]
    print(f"seed {seed} entropy_coef {ent} batch_entropy_coef {bent}: {wall:.0f} s, reward "
          f"{summary['reward_first_fifth']:.3f} -> {summary['reward_last_fifth']:.3f}", file=sys.stderr, flush=True)
    return {"seed": seed, "entropy_coef": ent, "batch_entropy_coef": bent, "command": cmd, "wall_s": wall,
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            "first_last_fifth": {k: fifth_means(records, k) for k in CURVES},
            "curves": {k: [r.get(k) for r in records] for k in ("step",) + CURVES},
            "last_samples": [s for s in samples if s["step"] == last_step]}


def cell_summary(runs: list) -> dict:
    """Mean and (population) sd over seeds of each first/last-fifth mean and of the held-out greedy reward."""
    out = {"seeds": [r["seed"] for r in runs]}
    for k in CURVES:
        out[f"{k}_first_fifth"] = mean_sd([r["first_last_fifth"][k][0] for r in runs])
        out[f"{k}_last_fifth"] = mean_sd([r["first_last_fifth"][k][1] for r in runs])
    out["eval_before"] = mean_sd([r["eval_before"] for r in runs])
    out["eval_after"] = mean_sd([r["eval_after"] for r in runs])
    return out


def plot(cells: dict, path: Path, w: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward_mean", "exact_rate", "answer_entropy", "distinct_answers")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for (ent, bent), runs in cells.items():
        steps = runs[0]["curves"]["step"]
        for ax, k in zip(axes, keys):
            band(ax, steps, [r["curves"][k] for r in runs], f"β_ENT={ent}, β_BENT={bent}", w)
    for ax, k in zip(axes, keys):
        ax.set_title(TITLES[k], fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"padula-arithmetic, {len(next(iter(cells.values())))} seeds (mean, band = min..max; "
                 f"trailing mean over {w} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--entropy_coefs", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--batch_entropy_coefs", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--name", default="replicate_padula", help="bench/results/NAME.json and NAME.png")
    p.add_argument("--work_dir", default=None, help="where the runs go [default: a temporary directory]")
    args, extra = p.parse_known_args(argv)
    grid = [(s, e, b) for e in args.entropy_coefs for b in args.batch_entropy_coefs for s in args.seeds]
    runs, wall = run_grid(lambda *g: run_one(*g, args, extra), grid, args.jobs, args.work_dir, "replicate_padula_")
    cells = {}
    for r in runs:
        cells.setdefault((r["entropy_coef"], r["batch_entropy_coef"]), []).append(r)
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    png = harness.RESULTS_DIR / f"{args.name}.png"
    plot(cells, png, args.smooth)
    result = {"script": "bench/replicate_padula.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "extra_train_flags": extra, "grid": {"seeds": args.seeds, "entropy_coef": args.entropy_coefs,
                                                   "batch_entropy_coef": args.batch_entropy_coefs},
              "max_steps": args.max_steps, "jobs": args.jobs, "wall_s": wall, **harness.device_info(),
              "cells": [{"entropy_coef": e, "batch_entropy_coef": b, **cell_summary(rs)} for (e, b), rs in cells.items()],
              "runs": runs}
    path = harness.RESULTS_DIR / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} and {png} ({wall:.0f} s)", file=sys.stderr)
    for c in result["cells"]:
        print(f"β_ENT={c['entropy_coef']} β_BENT={c['batch_entropy_coef']}: "
              + ", ".join(f"{k} {c[k + '_first_fifth']['mean']:.3f} -> {c[k + '_last_fifth']['mean']:.3f}"
                          for k in ("reward_mean", "exact_rate", "answer_entropy", "distinct_answers")))


if __name__ == "__main__":
    main()
