"""Selection among a student, its twin and its population (``distill.selection_interval = N``): every N optimizer
steps, and at the last, the members are scored on the same held-out *training* documents (``data.probe_fraction``
of them, set aside before packing and never trained on; the validation split that reports the run is never read).
The distilling student, its CE-only twin (``students.N.twin: true``) and its copies at other α_max
(``students.N.population``) are one population. At each decision the worst *distilling* member takes the best's
state, and its α_max becomes the winner's (its own where the twin won) times 1 ± ``distill.selection_perturb``
(population-based training's exploit and explore): where distilling hurts, the student starts again from the twin's
weights and keeps distilling. The twin never takes another's state: it stays the student trained alone, so the
run's last line still compares the two on validation, and a harm of distilling that shows only later cannot reach
it through an early decision. At the last decision the student (handed back under its own name: its checkpoint and
export) takes the best's state: never worse than training alone, up to the probe's noise, where the twin is a
member. The cost is the members' steps (K - 1 students more) and K x ``selection_batches`` forwards per decision.

The state taken is everything the next step reads, on every rank: the module's weights (this rank's ZeRO-3
partition, and whatever it holds whole), the optimizer's fp32 master weights and moments, the learning-rate
schedule's position, fp16's loss scale. The copies are built from their student's spec and DeepSpeed config, so
they are partitioned alike on every rank and each rank copies what it holds: no communication, no transient copy
of a model. What each learner carries between steps (α's schedule, the teacher's lead, the benefit gate) stays its
own; α_max is the selection's (saved with it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .config import ConfigError, RunConfig
from .data import ProbeBatches
from .engines import Member, view
from .student import StudentState

Batch = dict[str, torch.Tensor]


@dataclass
class Group:
    """A distilling student, its copies (its twin first, if it has one), their learners' states and the decisions
    so far."""

    members: list[Member]
    states: list[StudentState]
    twin: Optional[str]  # the member trained alone: never perturbed, its α stays 0
    decisions: int = 0
    wins: dict[str, int] = field(default_factory=dict)  # decisions each member won
    ties: int = 0  # decisions where the best and the worst scored the same (before any distils: the same weights)
    last_winner: Optional[str] = None

    @property
    def student(self) -> Member:
        return self.members[0]

    @property
    def pair(self) -> bool:
        """A student and its twin alone (described and summed up as a pair)."""
        return len(self.members) == 2 and self.twin is not None

    def distilled_won(self) -> int:
        """Decisions a distilling member won (a tie goes to the student)."""
        return self.decisions - self.wins.get(self.twin, 0)


class Selection:
    """Every ``interval`` steps, and at ``last``, each group's worst distilling member takes the best's state.
    ``score(member, batch)``: a model's mean CE on a batch and anything (the validator's); ``prepare``: a raw
    micro-batch to the device with its labels."""

    def __init__(self, groups: list[Group], heldout: ProbeBatches, prepare: Callable[[Batch], Batch],
                 score: Callable, interval: int, batches: int, last: int, seed: int, perturb: float):
        self.groups, self.heldout, self.prepare, self.score = groups, heldout, prepare, score
        self.interval, self.batches, self.last, self.seed, self.perturb = interval, batches, last, seed, perturb

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last

    def after_step(self, step: int) -> dict[str, float]:
        """After optimizer step ``step`` (1-based): decide where due; returns the decision's tags. Collective."""
        if not self.due(step):
            return {}
        batches = [self.prepare(self.heldout.at(self.draw(f"{step} {j}"))) for j in range(self.batches)]
        out: dict[str, float] = {}
        for group in self.groups:
            scores = [self.probe_ce(m, batches) for m in group.members]
            out.update(self.decide(group, scores, step))
            out.update({f"{m.name}/selection/probe_ce": ce for m, ce in zip(group.members, scores)})
        return out

    def decide(self, group: Group, scores: list[float], step: int) -> dict[str, float]:
        """The worst distilling member of ``group`` (the student at the last step) takes the best's state, and a
        loser before the last its α_max perturbed. A tie goes to the student, then to the members' order; a member
        that scores as the best takes nothing."""
        order = range(len(scores))
        best = min(order, key=lambda i: (scores[i], i))
        last = step == self.last
        loser = 0 if last else max((i for i in order if group.members[i].name != group.twin),
                                   key=lambda i: (scores[i], i))
        winner = group.members[best]
        if scores[loser] > scores[best]:
            adopt(group.members[loser], winner)
            if not last:
                source = group.states[loser if winner.name == group.twin else best]
                up = self.draw(f"perturb {step} {group.members[loser].name}") % 2 == 1
                factor = 1 + (self.perturb if up else -self.perturb)
                set_alpha(group.states[loser], min(1.0, source.distill.alpha_max * factor))
        group.decisions += 1
        group.wins[winner.name] = group.wins.get(winner.name, 0) + 1
        group.ties += int(max(scores) == min(scores))
        group.last_winner = winner.name
        return {f"selection/{group.student.name}/distilled_won": float(winner.name != group.twin),
                **{f"{s.name}/selection/alpha_max": s.distill.alpha_max for s in group.states if s.name != group.twin}}

    def draw(self, what: str) -> int:
        """A number drawn by what it is for (``"<step> <j>"``: the j-th probe micro-batch of a decision): a function
        of the step alone (a resumed run draws what an uninterrupted one did), apart from the benefit gate's draws."""
        digest = hashlib.sha256(f"selection {self.seed} {what}".encode()).digest()[:7]
        return int.from_bytes(digest, "little")

    @torch.no_grad()
    def probe_ce(self, member: Member, batches: list[Batch]) -> float:
        """``member``'s CE per token on ``batches``, over every rank's (each rank draws its own blocks)."""
        member.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            n = int(view(member, batch)["mask"].sum())  # its own tokens (a student with its own tokenizer)
            sums += torch.tensor([self.score(member, batch)[0] * n, n], dtype=torch.float64)
        member.engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    def describe(self) -> list[str]:
        """The run's opening lines about the selection."""
        probe = (f"every {self.interval} steps and at the last, on {self.batches} micro-batch(es) per rank of the "
                 f"held-out probe ({len(self.heldout.dataset):,} blocks of training documents set aside)")
        lines = []
        for g in self.groups:
            if g.pair:
                lines.append(f"{g.student.name}: selected against {g.twin} {probe}; the student takes the twin's "
                             "state where it is the worse")
            else:
                alphas = ", ".join(f"{s.name} {s.distill.alpha_max:g}" for s in g.states)
                lines.append(f"{g.student.name}: selected among {len(g.members)} (alpha_max {alphas}) {probe}; the "
                             "worst distilling member takes the best's state and its alpha_max x "
                             f"(1 ± {self.perturb:g})")
        return lines

    def summary(self) -> list[str]:
        """The run's last lines about the decisions."""
        lines = []
        for g in (g for g in self.groups if g.decisions):
            ties = f" ({g.ties} ties)" if g.ties else ""
            ends = f"{g.student.name} ends with the weights of the last winner"
            if g.pair:
                last = "the twin trained alone" if g.last_winner == g.twin else "itself"
                lines.append(f"selection: {g.student.name} no worse than {g.twin} on the held-out probe at "
                             f"{g.distilled_won()} of {g.decisions} decisions{ties}; {ends}, {last}")
                continue
            wins = ", ".join(f"{m.name} {g.wins.get(m.name, 0)}" for m in g.members)
            alphas = ", ".join(f"{s.name} {s.distill.alpha_max:.3g}" for s in g.states if s.name != g.twin)
            lines.append(f"selection among {g.student.name}'s {len(g.members)}: {g.decisions} decisions{ties}, won by "
                         f"{wins}; {ends}, {g.last_winner} (alpha_max at the end: {alphas})")
        return lines

    def state_dict(self) -> dict:
        return {g.student.name: {"decisions": g.decisions, "wins": dict(g.wins), "ties": g.ties,
                                 "last_winner": g.last_winner,
                                 "alpha_max": {s.name: s.distill.alpha_max for s in g.states}} for g in self.groups}

    def load_state_dict(self, state: dict) -> None:
        for g in self.groups:
            saved = state.get(g.student.name, {})
            g.decisions, g.ties = int(saved.get("decisions", 0)), int(saved.get("ties", 0))
            g.wins = {str(k): int(v) for k, v in saved.get("wins", {}).items()}
            g.last_winner = saved.get("last_winner")
            for s in g.states:
                if s.name in saved.get("alpha_max", {}):
                    set_alpha(s, float(saved["alpha_max"][s.name]))


def set_alpha(state: StudentState, alpha_max: float) -> None:
    """A learner's α_max from now on (its schedule's ceiling)."""
    state.distill = state.distill.model_copy(update={"alpha_max": alpha_max})


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


def join(cfg: RunConfig, members: list[Member], learners: list[StudentState], heldout: Optional[ProbeBatches],
         prepare: Callable, score: Callable) -> Optional[Selection]:
    """The run's selection among each student with a twin or a population and its copies; None where
    ``distill.selection_interval`` is 0."""
    d = cfg.distill
    if not d.selection_interval:
        return None
    by_name, states = {m.name: m for m in members}, {s.name: s for s in learners}
    groups = [Group([by_name[n] for n in (s, *copies)], [states[n] for n in (s, *copies)],
                    cfg.twins().get(s)) for s, copies in cfg.selection_groups().items()]
    return Selection(groups, heldout, prepare, score, d.selection_interval, d.selection_batches, cfg.train.max_steps,
                     cfg.train.seed, d.selection_perturb)


def check_in_memory(cfg: RunConfig, ds_configs: dict[str, dict]) -> None:
    """Selection copies a model's state in memory: a selected student swapped to NVMe is refused, from the
    DeepSpeed configs, before any engine is built."""
    n = cfg.distill.selection_interval
    for student in (name for s, copies in cfg.selection_groups().items() for name in (s, *copies)) if n else ():
        zero = ds_configs[student].get("zero_optimization") or {}
        for part in ("offload_optimizer", "offload_param"):
            section = zero.get(part) or {}
            if isinstance(section, dict) and section.get("device") == "nvme":
                raise ConfigError(f"distill.selection_interval={n}: {student}'s zero_optimization.{part} swaps to "
                                  "NVMe, and selection copies a model's state in memory; offload to device cpu, or "
                                  "set distill.selection_interval=0")
