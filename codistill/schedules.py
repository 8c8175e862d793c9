"""Schedules for the soft-loss weight α. Pure functions of the step."""
from __future__ import annotations

import math


def alpha_at(step: int, alpha_max: float, burn_in_steps: int, warmup_steps: int, warmup: str) -> float:
    """α for optimizer step ``step`` (0-based).

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
