"""Schedules: the λ warmup from full precision to ternary, and the learning rate.

λ schedule (seed note 004): λ rises from 0 at step 0 to 1 at `warmup_frac · total_steps`, then
stays at 1; `none` is the abrupt baseline (λ = 1 from step 0).
"""

from __future__ import annotations

import math
from typing import Literal

LambdaSchedule = Literal["linear", "cosine", "sigmoid", "exponential", "none"]
LAMBDA_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "sigmoid", "exponential", "none")
_SIGMOID_K = 10.0      # steepness of the sigmoid ramp (over progress p ∈ [0, 1])
_EXPONENTIAL_K = 5.0   # curvature of the exponential ramp


def lambda_at(step: int, total_steps: int, warmup_frac: float = 0.4, kind: LambdaSchedule = "linear") -> float:
    """λ ∈ [0, 1] at optimizer step `step` (0-based) of `total_steps`.

    With p = min(step / (warmup_frac · total_steps), 1):
    linear p; cosine (1 − cos πp)/2; sigmoid σ(k(p − ½)) rescaled to hit 0 and 1 exactly;
    exponential (e^{kp} − 1)/(e^k − 1); none 1.
    """
    if kind == "none":
        return 1.0
    if kind not in LAMBDA_SCHEDULES:
        raise ValueError(f"unknown lambda schedule {kind!r} (one of: {', '.join(LAMBDA_SCHEDULES)})")
    warmup = warmup_frac * total_steps
    if warmup <= 0:
        return 1.0
    p = min(max(step / warmup, 0.0), 1.0)
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    if kind == "sigmoid":
        s = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
        lo, hi = s(-_SIGMOID_K / 2), s(_SIGMOID_K / 2)
        return (s(_SIGMOID_K * (p - 0.5)) - lo) / (hi - lo)
    return math.expm1(_EXPONENTIAL_K * p) / math.expm1(_EXPONENTIAL_K)


def lr_at(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup_steps`, then cosine decay to
    `min_ratio` at `total_steps` (Loshchilov & Hutter 2017, without restarts)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    p = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
