"""The benefit gate: does the soft term make *this* student better on data it has not seen?

A student's update is Δθ = −lr·∇[(1−α)·CE + α·T²·D] on its training batch. To first order,
its CE on an unseen batch then changes with α as

    dL_probe/dα = −lr · ⟨∇L_probe, ∇(T²·D − CE)⟩        (one-step hypergradient, Baydin et al. 2018)

so a positive ⟨g_probe, g_soft − g_hard⟩ says "more α lowers the held-out CE", a negative one
"less". The probe batch is the next micro-batch of the training stream, taken before the
student has seen it (so it is held out at that moment and no data is set aside). Each rank
measures its own batches; the ranks' inner products and squared norms are averaged, and the
signal is their cosine: scale-free, so neither the learning rate nor the loss's size tunes it.

The gate keeps an openness o ∈ [0, 1] per student; the schedule's α (the teacher-lead gate,
warm-up or constant) is multiplied by it. Each measurement moves o by ``rate · z``, where
z = EMA(cosine) / EMA(|cosine|) ∈ [−1, 1] is how consistently the signal points one way
(the numerator's EMA starts from 0, so z builds up over the first measurements): a consistent
"helps" soon opens the gate by ``rate`` per measurement, a consistent "hurts" closes it as
fast, and noise around zero leaves it where it is.

The optimizer is taken as plain gradient descent (Adam's preconditioning is not applied to
the inner product): the sign is what the gate follows, and it is the sign that matters.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .schedules import ema


@dataclass
class BenefitState:
    """One student's gate, saved in every checkpoint."""

    openness: float
    signal_ema: Optional[float] = None  # EMA of the cosine
    magnitude_ema: Optional[float] = None  # EMA of |cosine|
    measurements: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "BenefitState":
        return cls(openness=float(state["openness"]), signal_ema=state.get("signal_ema"),
                   magnitude_ema=state.get("magnitude_ema"), measurements=int(state.get("measurements", 0)))


def consistency(state: BenefitState) -> float:
    """z = EMA(cosine) / EMA(|cosine|) in [−1, 1]; 0 before any measurement."""
    if not state.magnitude_ema:
        return 0.0
    return max(-1.0, min(1.0, state.signal_ema / state.magnitude_ema))


def update(state: BenefitState, cosine: float, rate: float, decay: float) -> BenefitState:
    """The gate after one measurement whose (rank-averaged) cosine is ``cosine``. The signal's EMA
    starts at 0 (a prior of "no evidence"), its magnitude's at the first value, so the first
    measurements move the gate by a fraction of ``rate``: one noisy reading cannot shut it."""
    signal = decay * (state.signal_ema or 0.0) + (1.0 - decay) * cosine
    magnitude = ema(state.magnitude_ema, abs(cosine), decay)
    new = BenefitState(state.openness, signal, magnitude, state.measurements + 1)
    new.openness = min(1.0, max(0.0, state.openness + rate * consistency(new)))
    return new


def cosine(dot: float, probe_sq: float, diff_sq: float) -> float:
    """The cosine of the (rank-averaged) inner product; 0 when either gradient vanishes."""
    denominator = math.sqrt(max(probe_sq, 0.0) * max(diff_sq, 0.0))
    return dot / denominator if denominator > 0 else 0.0


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every trainable parameter once (a tied embedding and head is one parameter)."""
    return [p for p in module.parameters() if p.requires_grad]


def hypergradient_terms(params: list[torch.nn.Parameter], soft_minus_hard: Callable[[], torch.Tensor],
                        probe_ce: Callable[[], torch.Tensor]) -> tuple[float, float, float]:
    """⟨∇probe_ce, ∇soft_minus_hard⟩, ‖∇probe_ce‖² and ‖∇soft_minus_hard‖² over ``params``, in fp64.

    ``soft_minus_hard()`` builds the training batch's T²·D − CE (the blended loss's derivative in α),
    ``probe_ce()`` the unseen batch's CE; each graph is built, differentiated and freed in turn. The
    gradients come from ``torch.autograd.grad``: nothing is accumulated into ``.grad``.
    """
    diff = torch.autograd.grad(soft_minus_hard(), params, allow_unused=True)
    probe = torch.autograd.grad(probe_ce(), params, allow_unused=True)
    dot = probe_sq = diff_sq = 0.0
    for a, b in zip(probe, diff):
        a64 = None if a is None else a.detach().double()
        b64 = None if b is None else b.detach().double()
        if a64 is not None:
            probe_sq += float((a64 * a64).sum())
        if b64 is not None:
            diff_sq += float((b64 * b64).sum())
            if a64 is not None:
                dot += float((a64 * b64).sum())
    return dot, probe_sq, diff_sq
