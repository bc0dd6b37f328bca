"""GAE: fastrlhf extension vs TRL's per-step Python loop ("trl") and a vectorized torch version ("torch").

CPU smoke sizes by default (B=64, T=1024: the CPU target is >= 50x the loop); the GPU
sizes (B=256, T in {512, 2048, 8192}; target >= 1000x the loop at T=2048 and within 3x of the
bandwidth floor) when CUDA is present or with --gpu-sizes. Floor = bytes of r, V, mask read once and
A, R written once (5 * B * T * 4) over the measured copy bandwidth.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf.extension as ext  # noqa: E402

GAMMA, LAM = 1.0, 0.95


def trl_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """TRL PPOTrainer's GAE: one step of torch ops per time step, reversed."""
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    lastgaelam, reversed_adv = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def discount_matrix(T, c, device):
    """W [T, T], W[s, t] = c^(s - t) for s >= t, so (delta @ W)[:, t] = sum_{s >= t} c^(s-t) delta_s."""
    i = torch.arange(T, device=device, dtype=torch.float64)
    expo = i[:, None] - i[None, :]
    return torch.where(expo >= 0, c ** expo.clamp_min(0), 0.0).float()


def torch_vectorized(rewards, values, mask, W, gamma=GAMMA):
    """No time loop: deltas, then the discounted reverse sum as one matmul (O(T^2) FLOPs)."""
    v, r = values * mask, rewards * mask
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    adv = ((r + gamma * v_next - v) @ W) * mask
    return adv, (adv + v) * mask


def main(argv=None):
    _, device, gpu = harness.start(__doc__, argv)
    shapes = [(256, 512), (256, 2048), (256, 8192)] if gpu else [(64, 256), (64, 1024)]
    bandwidth = harness.copy_bandwidth_gbs(device)
    results = []
    for B, T in shapes:
        g = torch.Generator().manual_seed(0)
        rewards = torch.randn(B, T, generator=g).to(device)
        values = torch.randn(B, T, generator=g).to(device)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
        mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
        W = discount_matrix(T, GAMMA * LAM, device)
        impls = {
            "fastrlhf": lambda: ext.gae(rewards, values, mask, gamma=GAMMA, lam=LAM),
            "torch": lambda: torch_vectorized(rewards, values, mask, W),
            "trl": lambda: trl_loop(rewards, values, mask),
        }
        floor_ms = 5 * B * T * 4 / (bandwidth * 1e9) * 1e3
        times = {}
        for impl, fn in impls.items():
            rep = 3 if impl == "trl" else 10
            times[impl] = harness.time_ms(fn, warmup=1, rep=rep, device=device)
            mem = harness.peak_extra_mib(fn, device=device)
            results.append(harness.result("gae", impl, {"B": B, "T": T}, times[impl], mem,
                                          floor_ms=floor_ms, x_floor=times[impl] / floor_ms))
        for r in results[-3:]:
            r["speedup_vs_trl"] = times["trl"] / r["ms"]
    harness.print_table(results, keys=("op", "impl", "shape", "ms", "speedup_vs_trl", "x_floor", "peak_mem_mib"))
    path = harness.write_results("gae", results, {"copy_bandwidth_gbs": bandwidth, "gamma": GAMMA, "lam": LAM})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
