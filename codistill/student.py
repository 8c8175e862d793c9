"""What one learner carries between steps, and what it does at a step.

A learner is a model that distils: a student, a peer of mode mutual, a listening teacher. A
:class:`StudentState` holds its distill config, its sources' running lead over it (the
teacher-lead schedule's signal: the teacher's, for a student), its peak learning rate so far
and its benefit gate;
:meth:`StudentState.plan` turns them into the step's α and T (composed in
:func:`codistill.schedules.compose_alpha`), :meth:`StudentState.observe` folds in what the
step measured, and ``state_dict``/``load_state_dict`` carry all of it through a checkpoint.
Pure bookkeeping: no tensors, no process group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .config import DistillConfig
from .gate import SUMMED, TERMS, BenefitState, length_weight, signal_parts
from .gate import update as update_benefit
from .losses import SoftSpec
from .onpolicy import drawn
from .schedules import compose_alpha, ema, lr_fraction, temperature_at


@dataclass(frozen=True)
class StudentPlan:
    """What one student does in one optimizer step."""

    active: bool  # false during the teacher's head start
    temperature: float
    spec: SoftSpec  # divergence, β, α (the schedule's × the benefit gate's openness × any lr decay), token filter
    openness: Optional[float] = None  # the benefit gate's factor on α at this step (None: gate off)
    measure: bool = False  # the benefit gate measures at this step (first micro-batch)
    lr: float = 0.0  # the student's learning rate at this step
    on_policy: bool = False  # it trains on its own samples at this step (distill.on_policy), not the batch's text
    progress: Optional[float] = None  # the teacher's progress α was multiplied by (distill.teacher_progress)


class StudentState:
    """One learner's state between optimizer steps (saved with every checkpoint)."""

    def __init__(self, name: str, distill: DistillConfig, gated: bool):
        """``gated``: whether the learner has a benefit gate (``distill.benefit_gate`` outside hard mode)."""
        self.name, self.distill = name, distill
        self.lead: Optional[float] = None  # running own CE − sources' mean CE: by how much the sources are ahead
        self.lr_peak = 0.0  # the highest learning rate seen so far (before or after a step)
        self.teacher_lr_peak = 0.0  # the training teacher's highest learning rate so far (its progress)
        self.benefit: Optional[BenefitState] = BenefitState(distill.benefit_init) if gated else None

    @property
    def top_k(self) -> Optional[int]:
        """k of top-k targets, None for the teacher's full distribution."""
        return self.distill.top_k if self.distill.targets == "topk" else None

    def plan(self, step: int, max_steps: int, lr: float, seed: int = 0, progress: float = 1.0) -> StudentPlan:
        """α, T and what runs at optimizer step ``step`` (0-based), at learning rate ``lr`` before the step
        (``seed``: the run's, which draws the on-policy steps; ``progress``: the teacher's, see
        :meth:`progress`)."""
        d = self.distill
        own = step - d.head_start_steps  # α's schedule counts the student's own steps
        openness, measure = None, False
        if self.benefit is not None and own >= d.burn_in_steps:
            openness = self.benefit.openness
            measure = (own - d.burn_in_steps) % d.benefit_interval == 0
        alpha = compose_alpha(d, own, self.lead, openness, lr, self.lr_peak, progress)
        spec = SoftSpec(divergence=d.divergence, beta=d.beta, alpha=alpha, token_filter=d.token_filter)
        on_policy = d.on_policy is not None and drawn(seed, step, self.name, d.on_policy.fraction)
        return StudentPlan(active=step >= d.head_start_steps, temperature=temperature_at(
            step, max_steps, d.temperature, d.temperature_final), spec=spec, openness=openness, measure=measure, lr=lr,
            on_policy=on_policy, progress=progress if d.teacher_progress != "none" else None)

    def progress(self, teacher_lr: Optional[float], resting: bool) -> float:
        """The teacher's progress in [0, 1]: 1 − its learning rate ``teacher_lr`` (before this step) over its
        peak so far (0 while it warms up to its peak, 1 − its schedule's floor at its last step); 1 once it
        rests in its tail, or without a teacher that trains (a finished one)."""
        if resting or teacher_lr is None:
            return 1.0
        self.teacher_lr_peak = max(self.teacher_lr_peak, teacher_lr)
        return 1.0 - lr_fraction(teacher_lr, self.teacher_lr_peak) if self.teacher_lr_peak > 0 else 0.0

    def observe(self, plan: StudentPlan, source_ce: Optional[float], own_ce: Optional[float],
                lr_after: float) -> Optional[float]:
        """After a step: the peak learning rate (``plan.lr`` before the step, ``lr_after`` after it) and the
        sources' running lead (their mean CE below this learner's), from the rank-averaged CEs of the step;
        returns this step's lead (None when the learner did not train against a source)."""
        if not plan.active:
            return None
        self.lr_peak = max(self.lr_peak, plan.lr, lr_after)
        if source_ce is None or own_ce is None:
            return None
        self.lead = ema(self.lead, own_ce - source_ce, self.distill.lead_ema)
        return own_ce - source_ce

    def measured(self, raw: dict[str, float], lr_after: float, world: int, batches: int) -> dict[str, float]:
        """Fold the benefit gate's rank-averaged inner products (``raw``, by :data:`codistill.gate.TERMS`) of a
        step over ``batches`` micro-batches per rank into its evidence; returns what to log of it (empty when
        the step did not measure or a product is not finite)."""
        if self.benefit is None or not set(TERMS) <= set(raw) or not all(math.isfinite(v) for v in raw.values()):
            return {}
        d = self.distill
        pull, length = signal_parts(raw, world, world * batches)
        length *= length_weight(d.benefit_length, lr_after, self.lr_peak)
        self.benefit = update_benefit(self.benefit, pull + length, d.benefit_init, d.benefit_gain, d.benefit_decay)
        # its two terms too, for reading what moved it
        return {"signal": pull + length, "signal_pull": pull, "signal_length": length,
                "evidence": self.benefit.evidence}

    def state_dict(self) -> dict[str, Any]:
        return {"lead": self.lead, "lr_peak": self.lr_peak, "teacher_lr_peak": self.teacher_lr_peak,
                "benefit": None if self.benefit is None else self.benefit.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lead = state["lead"]
        self.lr_peak = float(state["lr_peak"])
        self.teacher_lr_peak = float(state.get("teacher_lr_peak", 0.0))  # (none in an earlier release's checkpoint)
        if self.benefit is not None and state.get("benefit") is not None:
            self.benefit = BenefitState.from_dict(state["benefit"])


class Students:
    """Every learner's state, in the models' order, saved and loaded as one part of the trainer's state."""

    def __init__(self, states: list[StudentState]):
        self.states = states

    def __iter__(self) -> Iterator[StudentState]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> StudentState:
        return self.states[index]

    def plans(self, step: int, train, models) -> list[StudentPlan]:
        """Every learner's plan at optimizer step ``step`` of a run of ``train`` (its TrainConfig), from the
        learning rates of ``models`` (a :class:`codistill.step.Models`) before the step."""
        lrs = [float(models.learner(i).engine.get_lr()[0]) for i in range(len(self.states))]
        teacher = models.teacher if models.teacher is not None and models.teacher.trainable else None
        resting = train.teacher_rests(step)
        teacher_lr = None if teacher is None else float(teacher.engine.get_lr()[0])
        return [s.plan(step, train.max_steps, lr, train.seed, s.progress(teacher_lr, resting))
                for s, lr in zip(self.states, lrs)]

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s in self.states:
            if s.name in state:
                s.load_state_dict(state[s.name])

    @staticmethod
    def from_legacy(schedule: dict[str, Any]) -> dict[str, Any]:
        """The ``schedule`` section of an earlier release's checkpoint as :meth:`state_dict` writes it today:
        its two peak learning rates (before and after each step) are one peak now, their maximum."""
        gates, peaks = schedule.get("benefit", {}), schedule.get("lr_peak", {})
        out = {}
        for name, lead in schedule.get("gap_ema", {}).items():
            gate = gates.get(name)
            peak = max(float(peaks.get(name, 0.0)), float(gate.get("lr_peak", 0.0)) if gate else 0.0)
            out[name] = {"lead": lead, "lr_peak": peak, "benefit": gate}
        return out


def rank_averaged_terms(values: dict[str, float], name: str) -> dict[str, float]:
    """Take a student's raw benefit-gate products out of a step's rank-averaged values (they are not logged;
    the signal they give is)."""
    raw = {key: values.pop(f"{name}/benefit/{key}", None) for key in TERMS + SUMMED}
    return {key: value for key, value in raw.items() if value is not None}
