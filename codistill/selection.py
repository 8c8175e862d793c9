"""Selection between a student and its twin (``distill.selection_interval = N``): every N optimizer steps, and at
the last, both are scored on the same held-out *training* documents (``data.probe_fraction`` of them, set aside
before packing and never trained on; the validation split that reports the run is never read) and the worse one
takes the better one's state. The distilling student and its CE-only twin (``students.N.twin: true``) are a
population of two: where distilling helps the twin is pulled along, where it hurts the student starts again from
the twin's weights and keeps distilling; the student handed back (its checkpoint and export, under its own name)
is the better of the two on the last probe. Never worse than training alone, up to the probe's noise, at the cost
of the twin's steps (which a run with ``twin: true`` pays anyway) and 2 x ``selection_batches`` forwards per
decision.

The state taken is everything the next step reads, on every rank: the module's weights (this rank's ZeRO-3
partition, and whatever it holds whole), the optimizer's fp32 master weights and moments, the learning-rate
schedule's position, fp16's loss scale. A twin is built from its student's spec and DeepSpeed config, so the two are partitioned
alike on every rank and each rank copies what it holds: no communication, no transient copy of a model. What
each learner carries between steps (α's schedule, the teacher's lead, the benefit gate) stays its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ConfigError, RunConfig
from .data import ProbeBatches
from .engines import Member

Batch = dict[str, torch.Tensor]


@dataclass
class Pair:
    """A distilling student, its twin, and the decisions so far."""

    student: Member
    twin: Member
    decisions: int = 0
    distilled_won: int = 0  # decisions where the student was no worse than its twin
    ties: int = 0  # of them, where the two scored the same (the same weights: before the student distils)
    last_winner: Optional[str] = None


class Selection:
    """Every ``interval`` steps, and at ``last``, each pair's worse member takes the better's state.
    ``score(member, batch)``: a model's mean CE on a batch and anything (the validator's); ``prepare``: a raw
    micro-batch to the device with its labels."""

    def __init__(self, pairs: list[Pair], heldout: ProbeBatches, prepare: Callable[[Batch], Batch],
                 score: Callable, interval: int, batches: int, last: int, seed: int):
        self.pairs, self.heldout, self.prepare, self.score = pairs, heldout, prepare, score
        self.interval, self.batches, self.last, self.seed = interval, batches, last, seed

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last

    def after_step(self, step: int) -> dict[str, float]:
        """After optimizer step ``step`` (1-based): decide where due; returns the decision's tags. Collective."""
        if not self.due(step):
            return {}
        batches = [self.prepare(self.heldout.at(self.draw(step, j))) for j in range(self.batches)]
        out: dict[str, float] = {}
        for pair in self.pairs:
            student_ce, twin_ce = (self.probe_ce(m, batches) for m in (pair.student, pair.twin))
            won = student_ce <= twin_ce  # a tie keeps the distilling student's weights in both
            winner, loser = (pair.student, pair.twin) if won else (pair.twin, pair.student)
            adopt(loser, winner)
            pair.decisions += 1
            pair.distilled_won += int(won)
            pair.ties += int(student_ce == twin_ce)
            pair.last_winner = winner.name
            out.update({f"{pair.student.name}/selection/probe_ce": student_ce,
                        f"{pair.twin.name}/selection/probe_ce": twin_ce,
                        f"selection/{pair.student.name}/distilled_won": float(won)})
        return out

    def draw(self, step: int, j: int) -> int:
        """Which probe micro-batch the ``j``-th of step ``step``'s decision is: a function of the step alone (a
        resumed run draws what an uninterrupted one did), apart from the benefit gate's draws."""
        digest = hashlib.sha256(f"selection {self.seed} {step} {j}".encode()).digest()[:7]
        return int.from_bytes(digest, "little")

    @torch.no_grad()
    def probe_ce(self, member: Member, batches: list[Batch]) -> float:
        """``member``'s CE per token on ``batches``, over every rank's (each rank draws its own blocks)."""
        member.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            n = int(batch["mask"].sum())
            sums += torch.tensor([self.score(member, batch)[0] * n, n], dtype=torch.float64)
        member.engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    def describe(self) -> list[str]:
        """The run's opening lines about the selection."""
        return [f"{p.student.name}: selected against {p.twin.name} every {self.interval} steps and at the last, on "
                f"{self.batches} micro-batch(es) per rank of the held-out probe ({len(self.heldout.dataset):,} blocks "
                "of training documents set aside); the worse takes the better's state" for p in self.pairs]

    def summary(self) -> list[str]:
        """The run's last lines about the decisions."""
        return [f"selection: {p.student.name} no worse than {p.twin.name} on the held-out probe at "
                f"{p.distilled_won} of {p.decisions} decisions{f' ({p.ties} ties)' if p.ties else ''}; both end with "
                "the weights of the last winner, "
                f"{'the distilled student' if p.last_winner == p.student.name else 'the twin trained alone'}"
                for p in self.pairs if p.decisions]

    def state_dict(self) -> dict:
        return {p.student.name: {"decisions": p.decisions, "distilled_won": p.distilled_won, "ties": p.ties,
                                 "last_winner": p.last_winner} for p in self.pairs}

    def load_state_dict(self, state: dict) -> None:
        for p in self.pairs:
            saved = state.get(p.student.name, {})
            p.decisions, p.distilled_won = int(saved.get("decisions", 0)), int(saved.get("distilled_won", 0))
            p.ties = int(saved.get("ties", 0))
            p.last_winner = saved.get("last_winner")


def _inner(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (its state: the moments of the fp32 master weights)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


# Where DeepSpeed's optimizers keep this rank's fp32 master weights: ZeRO-3 (which hands them to the torch optimizer
# only for the length of a step), ZeRO-1/2, and bf16 without ZeRO.
_MASTERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def masters(optimizer) -> list[torch.Tensor]:
    """This rank's fp32 master weights, the keys of the torch optimizer's state."""
    for attr in _MASTERS:
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return [p for group in _inner(optimizer).param_groups for p in group["params"]]


@torch.no_grad()
def adopt(dst: Member, src: Member) -> None:
    """``dst`` takes ``src``'s training state, in place, on this rank (see the module's docstring)."""
    for a, b in zip(dst.engine.module.parameters(), src.engine.module.parameters()):
        if hasattr(a, "ds_tensor"):  # ZeRO-3: this rank's partition (views of the flat groups the step writes)
            a.ds_tensor.copy_(b.ds_tensor)
        if a.data.numel() and a.data.shape == b.data.shape:  # held whole: below ZeRO-3, or kept gathered
            a.data.copy_(b.data)
    inner_a, inner_b = _inner(dst.engine.optimizer), _inner(src.engine.optimizer)
    for group_a, group_b in zip(inner_a.param_groups, inner_b.param_groups):
        group_a.update({k: v for k, v in group_b.items() if k != "params"})
    for a, b in zip(masters(dst.engine.optimizer), masters(src.engine.optimizer), strict=True):
        if a.data_ptr() != b.data_ptr():
            a.copy_(b)
        theirs, ours = inner_b.state.get(b, {}), inner_a.state.setdefault(a, {})
        for key, value in theirs.items():
            if torch.is_tensor(value) and torch.is_tensor(ours.get(key)) and ours[key].shape == value.shape:
                ours[key].copy_(value)
            else:
                ours[key] = value.clone() if torch.is_tensor(value) else value
    if src.engine.lr_scheduler is not None:
        dst.engine.lr_scheduler.load_state_dict(src.engine.lr_scheduler.state_dict())
    scaler_a, scaler_b = (getattr(m.engine.optimizer, "loss_scaler", None) for m in (dst, src))
    for key in _SCALE:  # fp16's dynamic loss scale (a static one, bf16's or fp32's, has only its fixed scale)
        if hasattr(scaler_a, key) and hasattr(scaler_b, key):
            value = getattr(scaler_b, key)
            setattr(scaler_a, key, value.clone() if torch.is_tensor(value) else value)


_SCALE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # DeepSpeed's loss scalers' state


def join(cfg: RunConfig, members: list[Member], heldout: Optional[ProbeBatches], prepare: Callable, score: Callable
         ) -> Optional[Selection]:
    """The run's selection between each student with a twin and the twin; None where
    ``distill.selection_interval`` is 0."""
    d = cfg.distill
    if not d.selection_interval:
        return None
    by_name = {m.name: m for m in members}
    pairs = [Pair(by_name[s], by_name[t]) for s, t in cfg.twins().items()]
    return Selection(pairs, heldout, prepare, score, d.selection_interval, d.selection_batches, cfg.train.max_steps,
                     cfg.train.seed)


def check_in_memory(cfg: RunConfig, ds_configs: dict[str, dict]) -> None:
    """Selection copies a model's state in memory: a selected student swapped to NVMe is refused, from the
    DeepSpeed configs, before any engine is built."""
    n = cfg.distill.selection_interval
    for student in cfg.twins() if n else ():
        zero = ds_configs[student].get("zero_optimization") or {}
        for part in ("offload_optimizer", "offload_param"):
            section = zero.get(part) or {}
            if isinstance(section, dict) and section.get("device") == "nvme":
                raise ConfigError(f"distill.selection_interval={n}: {student}'s zero_optimization.{part} swaps to "
                                  "NVMe, and selection copies a model's state in memory; offload to device cpu, or "
                                  "set distill.selection_interval=0")
