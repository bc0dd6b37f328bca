"""GAE: fastrlhf extension vs TRL's per-step Python loop ("trl") and a vectorized torch version ("torch").

    pytest bench/bench_gae.py --benchmark-only [--bench-size smoke|cpu|gpu]
    python bench/bench_gae.py [--size smoke|cpu|gpu]

Sizes: smoke B=8, T=64; cpu B=64, T ∈ {256, 1024} (the CPU target is >= 50x the loop at T=1024); gpu
B=256, T ∈ {512, 2048, 8192} (target >= 1000x the loop at T=2048 and within 3x of the bandwidth floor).
Floor = bytes of r, V, mask read once and A, R written once (5·B·T·4) over the copy bandwidth measured in
the same session (`x_floor` = time / floor).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastrlhf.extension as ext  # noqa: E402

GAMMA, LAM = 1.0, 0.95
SHAPES = {
    "smoke": [dict(B=8, T=64)],
    "cpu": [dict(B=64, T=256), dict(B=64, T=1024)],
    "gpu": [dict(B=256, T=t) for t in (512, 2048, 8192)],
}


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


@pytest.mark.parametrize("impl", ["fastrlhf", "torch", "trl"])
def test_gae(bench, shape, impl):
    B, T, device = shape["B"], shape["T"], bench.device
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=g).to(device)
    values = torch.randn(B, T, generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    if impl == "fastrlhf":
        fn = lambda: ext.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)  # noqa: E731
    elif impl == "torch":
        W = discount_matrix(T, GAMMA * LAM, device)
        fn = lambda: torch_vectorized(rewards, values, mask, W)  # noqa: E731
    else:
        fn = lambda: trl_loop(rewards, values, mask)  # noqa: E731
    bytes_moved = 5 * B * T * 4
    harness.measure(bench, fn, op="gae", impl=impl, shape=shape, baseline="trl", bytes_moved=bytes_moved,
                    gamma=GAMMA, lam=LAM)
    info = bench.benchmark.extra_info
    if bench.benchmark.stats is not None:
        floor_ms = bytes_moved / (bench.ceilings()["copy_bandwidth_gbs"] * 1e9) * 1e3
        info.update(floor_ms=floor_ms, x_floor=bench.benchmark.stats.stats.median * 1e3 / floor_ms)


if __name__ == "__main__":
    sys.exit(harness.script_main(__file__))
