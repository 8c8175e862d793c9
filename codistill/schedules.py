"""Schedules for the soft-loss weight α and the temperature T. Pure functions of the
step and of the signals the trainer measures; the trainer keeps their state."""
from __future__ import annotations

import math
from typing import Optional


def alpha_at(step: int, alpha_max: float, burn_in_steps: int, warmup_steps: int, warmup: str) -> float:
    """Step schedule: α for optimizer step ``step`` (0-based).

    ``burn_in_steps`` steps at α = 0 (the teacher is still noise), then a ``linear`` or
    ``cosine`` ramp over ``warmup_steps`` steps up to ``alpha_max``, then constant.
    The first ramp step is 0, so α is continuous at the end of the burn-in.
    """
    if step < burn_in_steps:
        return 0.0
    if warmup_steps == 0:
        return alpha_max
    frac = min(1.0, (step - burn_in_steps) / warmup_steps)
    if warmup == "linear":
        return alpha_max * frac
    if warmup == "cosine":
        return alpha_max * 0.5 * (1.0 - math.cos(math.pi * frac))
    raise ValueError(f"unknown warm-up shape {warmup!r}; expected 'linear' or 'cosine'")


def adaptive_alpha(step: int, alpha_max: float, burn_in_steps: int, gap: Optional[float], full_gap: float) -> float:
    """Adaptive schedule: α grows only while the teacher is ahead of the student.

    ``gap`` is the running (student CE − teacher CE) on the training batches, in nats;
    α = alpha_max · clip(gap / full_gap, 0, 1) after the burn-in. A teacher that is
    behind (gap ≤ 0) gets α = 0, however many steps have passed.
    """
    if step < burn_in_steps or gap is None:
        return 0.0
    return alpha_max * min(1.0, max(0.0, gap / full_gap))


def lr_fraction(lr: float, lr_peak: float) -> float:
    """The learning rate over its peak so far, in [0, 1] (1 before any peak is known)."""
    if lr_peak <= 0:
        return 1.0
    return min(1.0, max(0.0, lr / lr_peak))


def ema(previous: Optional[float], value: float, decay: float) -> float:
    """Exponential moving average; the first value starts it (no bias towards 0)."""
    return value if previous is None else decay * previous + (1.0 - decay) * value


def temperature_at(step: int, max_steps: int, start: float, final: Optional[float]) -> float:
    """T annealed linearly from ``start`` at step 0 to ``final`` at the last step (constant if None)."""
    if final is None or max_steps <= 1:
        return start
    return start + (final - start) * min(1.0, step / (max_steps - 1))
