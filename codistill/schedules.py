"""Schedules for the soft-loss weight α and the temperature T. Pure functions of the
step and of the signals the trainer measures; each student's state (codistill/student.py)
keeps what they need between steps.

α at a step is composed in one place, :func:`compose_alpha`: the schedule (teacher-lead,
warm-up or constant) at the student's own step, times the benefit gate's openness, times the
learning-rate decay."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import DistillConfig


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


def lead_alpha(step: int, alpha_max: float, burn_in_steps: int, lead: Optional[float], scale: float) -> float:
    """Teacher-lead schedule: α grows only while the teacher is ahead of the student.

    ``lead`` is the running (student CE − teacher CE) on the training batches, in nats:
    by how much the teacher is ahead. α = alpha_max · clip(lead / scale, 0, 1) after the
    burn-in. A teacher that is behind (lead ≤ 0) gets α = 0, however many steps have passed.
    """
    if step < burn_in_steps or lead is None:
        return 0.0
    return alpha_max * min(1.0, max(0.0, lead / scale))


def constant_alpha(step: int, alpha_max: float, burn_in_steps: int) -> float:
    """Constant schedule: 0 during the burn-in, then ``alpha_max``."""
    return alpha_max if step >= burn_in_steps else 0.0


def compose_alpha(d: "DistillConfig", own_step: int, lead: Optional[float], openness: Optional[float], lr: float,
                  lr_peak: float, progress: float = 1.0) -> float:
    """A student's α at its own step ``own_step`` (counted from the end of its head start): the schedule's
    (``d.schedule``), times the benefit gate's ``openness`` (None: the gate is off or not yet measuring),
    times lr / peak lr with ``d.alpha_decay: lr``, times the teacher's ``progress`` with
    ``d.teacher_progress: lr``."""
    if d.schedule == "lead":
        alpha = lead_alpha(own_step, d.alpha_max, d.burn_in_steps, lead, d.lead_scale)
    elif d.schedule == "warmup":
        alpha = alpha_at(own_step, d.alpha_max, d.burn_in_steps, d.warmup_steps, d.warmup)
    else:
        alpha = constant_alpha(own_step, d.alpha_max, d.burn_in_steps)
    if openness is not None:
        alpha *= openness
    if d.alpha_decay == "lr":
        alpha *= lr_fraction(lr, max(lr_peak, lr))
    if d.teacher_progress == "lr":
        alpha *= progress
    return alpha


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
