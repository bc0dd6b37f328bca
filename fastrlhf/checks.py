"""Checks of plain Python knobs (numbers and choices), shared by `fastrlhf.ref.LossConfig` and the public
ops in `fastrlhf.ops`: one checker per knob, so every entry point refuses a bad value with the same
message, naming the knob, what was expected and the actual value. No tensors are read here."""
from __future__ import annotations

import math
import numbers

import torch

# The smallest normal float32, 2^-126 ≈ 1.18e-38. The kernels divide by the temperature in float32, where
# a smaller τ is subnormal (1e-45 is stored as 1.4e-45, anything under 7.1e-46 as 0) and 1/τ overflows
# from 2^-128 down.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def number(name, value, expected, ok=lambda v: True, *, none_ok=False):
    """`value` as a float: a real number (not a bool or a string), finite, with ok(value); None passes
    when none_ok. Else ValueError naming the knob, what was expected and the actual value."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected {'None or ' if none_ok else ''}a finite number, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def flag(name, value):
    """`value` if it is a bool, else TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def choice(name, value, choices):
    """`value` if it is one of the strings `choices`, else ValueError."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def temperature(value, *, greedy_ok=False):
    """τ of softmax(x/τ): a finite number >= MIN_TEMPERATURE; where greedy_ok (sampling), 0 too (the
    untempered greedy draw). Returns it as a float."""
    t = number("temperature", value, "a number >= 0" if greedy_ok else "a finite number > 0",
               (lambda v: v >= 0) if greedy_ok else (lambda v: v > 0))
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"temperature: expected {'0 or ' if greedy_ok else ''}a number >= {MIN_TEMPERATURE} "
                         f"(the smallest normal float32: the kernels divide by τ in float32, where a smaller "
                         f"τ is rounded or 0 and 1/τ overflows), got {value!r}")
    return t


# The policy-loss knobs (README, "Losses"): PPO clips the ratio to [1 − clip_low, 1 + clip_high], so
# clip_low < 1 keeps the lower bound positive; the dual clip bound −c·A only caps the loss for c > 1.

def clip_low(value):
    return number("clip_low", value, "a number in [0, 1)", lambda v: 0 <= v < 1)


def clip_high(value):
    return number("clip_high", value, "a number >= 0", lambda v: v >= 0)


def dual_clip(value):
    return number("dual_clip", value, "None or a number > 1", lambda v: v > 1, none_ok=True)


def coefficient(name, value):
    """adv_coeff, entropy_coef, kl_coef, batch_entropy_coef: any finite real number."""
    return number(name, value, "a finite number")
