"""One micro-step over every model: forwards once, targets shared, each model's loss and backward.

Two strategies behind one interface, :class:`MicroStep`: :class:`LogitsStep` computes every loss
from each model's logits (the teacher's detached logits, full or top-k, are the students'
targets); :class:`FusedStep` (``distill.fused_linear``) stops every forward at the final hidden
states and takes every loss from one chunked pass over the LM heads (codistill/fused.py), so no
model's [N × V] logits exist. Either way every backward runs at once (freeing its activations)
and the optimizer steps wait until the micro-step's end, when every model's loss is known to be
finite, so a stop leaves all models at the same step; the students' targets come from the
teacher before its step.

What a micro-step adds to the step's metrics goes into ``sums`` (tag -> value summed over
micro-steps); with ``panels``, the distillation diagnostics of the micro-batch; with ``probes``
(unseen micro-batches by ``distill.benefit_probe``), students whose plan says so measure their
benefit gate (codistill/gate.py) before their step.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .cache import TeacherCache
from .config import ConfigError, RunConfig
from .engines import (Member, forward_hidden, forward_logits, fused_head_problem, heads_gathered, lm_head,
                      module_hidden, module_logits)
from .errors import NonFinite
from .fused import (FUSED_AUTO_VOCAB, Head, HeadLogits, StudentTerm, auto_problem, fused_linear_losses,
                    static_problem)
from .gate import hypergradient_terms, trainable_parameters
from .losses import LossParts, SoftSpec, Targets, distill_loss, panel_stats, shared_targets, topk_targets
from .memory import fused_lowers_peak
from .metrics import Tags
from .student import StudentPlan, StudentState

log = logging.getLogger("codistill")

Batch = dict[str, torch.Tensor]
Probes = dict[str, Batch]  # the benefit gates' unseen micro-batches by distill.benefit_probe


def add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


@dataclass
class Models:
    """What a micro-step runs: the teacher (None when it is not loaded) and the students with their state."""

    teacher: Optional[Member]
    teacher_name: str
    students: list[Member]
    states: list[StudentState]
    vocab: int
    tags: Tags


class MicroStep:
    """The interface of both strategies: call it on a micro-batch; ``skipped`` counts updates skipped for a
    non-finite loss by model (``nonfinite: skip``). ``phase(name)`` is entered around each named part of the
    step (the losses, the fused pass, the panels, a benefit gate's measurement): a no-op unless a benchmark
    sets it (codistill-bench-memory records each part's memory)."""

    def __init__(self, models: Models, nonfinite: str, chunk_tokens: Optional[int], world_size: int):
        self.m, self.nonfinite, self.chunk_tokens, self.world_size = models, nonfinite, chunk_tokens, world_size
        self.skipped = {m.name: 0 for m in [models.teacher, *models.students] if m is not None}
        self._deferred: Optional[list[Member]] = None  # optimizer steps waiting for the micro-step's end
        self.phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()

    def __call__(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
                 panels: Optional[dict[str, float]] = None, probes: Optional[Probes] = None) -> None:
        self._deferred = []
        try:
            self.losses(batch, plans, sums, panels, probes)
            for member in self._deferred:  # none when the teacher's update was skipped
                member.engine.step()
        finally:
            self._deferred = None

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        """Every loss and backward of the micro-step, optimizer steps through :meth:`step`."""
        raise NotImplementedError

    def step(self, member: Member) -> None:
        """The optimizer step of ``member``: at the end of the micro-step when called inside one, at once when a
        benchmark calls a model's part of it by itself."""
        if self._deferred is None:
            member.engine.step()
        else:
            self._deferred.append(member)

    def finite(self, member: Member, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank; if not, apply ``train.nonfinite``: ``stop`` raises,
        ``skip`` counts the skipped update and returns False."""
        flag = torch.tensor([0 if bool(torch.isfinite(loss)) else 1], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return True
        if self.nonfinite == "stop":
            raise NonFinite(f"non-finite loss of {member.name}")
        self.skipped[member.name] += 1
        return False

    def add_teacher_sums(self, sums: dict[str, float], ce: float) -> None:
        add(sums, f"{self.m.teacher_name}/train/loss", ce)
        add(sums, f"{self.m.teacher_name}/train/loss_ce", ce)

    def add_student_sums(self, sums: dict[str, float], index: int, parts: LossParts, soft: bool) -> None:
        name = self.m.students[index].name
        add(sums, f"{name}/train/loss", parts.loss.item())
        add(sums, f"{name}/train/loss_ce", parts.ce.item())
        if soft:
            add(sums, f"{name}/train/loss_kd", parts.kd.item())
            if self.m.states[index].distill.token_filter:
                add(sums, f"{name}/train/token_filter_fraction", parts.filtered.item())

    def targets_for(self, readers: list[int], plans: list[StudentPlan], logits, token_ce: torch.Tensor,
                    lse: torch.Tensor) -> dict[int, Targets]:
        """Each reading student's targets from the teacher's detached ``logits`` (a [.., V] tensor or
        :class:`HeadLogits`), its CE per position and its logsumexp, made once per (top-k, T) the students
        share (top-k in chunks of the first such student's ``chunk_tokens``)."""
        wanted = {i: (self.m.states[i].top_k, plans[i].temperature) for i in readers}

        def make(top_k: Optional[int], temperature: float) -> Targets:
            if top_k is None:
                return Targets(temperature=temperature, logits=logits, lse=lse, token_ce=token_ce)
            chunk = next(self.m.states[i].distill.chunk_tokens for i in readers if wanted[i] == (top_k, temperature))
            return replace(topk_targets(logits, top_k, temperature, chunk), token_ce=token_ce)

        return shared_targets(wanted, make)

    def add_panels(self, panels: dict[str, float], index: int, logits, batch: Batch, targets: Targets,
                   plan: StudentPlan, teacher_logits) -> None:
        """The distillation diagnostics of one student on this micro-batch, into ``panels``."""
        d = self.m.states[index].distill
        with self.phase("panels"):
            stats = panel_stats(logits, batch["labels"], batch["mask"], targets, plan.spec, d.top_k, teacher_logits,
                                d.chunk_tokens)
        for key, value in stats.items():
            panels["distill/teacher_entropy" if key == "teacher_entropy" else self.m.tags.student("distill", key, index)] = value

    def measure_benefit(self, index: int, batch: Batch, targets: Targets, plan: StudentPlan, probe: Batch,
                        sums: dict[str, float], teacher: Optional[Head] = None) -> None:
        """The benefit gate's measurement, on this rank, at the student's weights before its step: the inner
        products of ∇CE and ∇(T²·D − CE) on the batch, the update at this step's α, and ∇CE on the unseen
        ``probe`` (see :func:`codistill.gate.hypergradient_terms`). Forwards of the bare module: gradients of
        them do not go through DeepSpeed's reduction. ``teacher``: the fused path's (unchanged) teacher head."""
        student = self.m.students[index]
        losses = self._gate_losses(index, batch, targets, plan, teacher)
        if teacher is not None:
            def probe_ce() -> torch.Tensor:
                hidden = module_hidden(student, probe)
                with heads_gathered(student), self.phase("fused loss pass"):
                    return fused_linear_losses(Head(hidden, *lm_head(student)), [], probe["labels"], probe["mask"],
                                               self.m.vocab, self.chunk_tokens)[0].loss
        else:
            def probe_ce() -> torch.Tensor:
                logits = module_logits(student, probe, self.m.vocab)
                with self.phase("loss"):
                    return distill_loss(logits, probe["labels"], probe["mask"],
                                        chunk_tokens=self.m.states[index].distill.chunk_tokens).loss
        summed = (lambda t: torch.distributed.all_reduce(t)) if self.world_size > 1 else None
        with self.phase(f"{student.name} benefit gate"):
            terms = hypergradient_terms(trainable_parameters(student.engine.module), plan.spec.alpha, losses,
                                        probe_ce, summed, separate=student.engine.zero_optimization_stage() == 3)
        for key, value in terms.items():
            add(sums, f"{student.name}/benefit/{key}", value)

    def _gate_losses(self, index: int, batch: Batch, targets: Targets, plan: StudentPlan,
                     teacher: Optional[Head]) -> Callable[[bool, bool], tuple]:
        """``losses(want_ce, want_soft)`` for the gate: from one forward of the student, its CE and/or its T²·D
        (the blended loss at α = 1) on ``batch``; ZeRO-3 asks for one per forward."""
        student, state = self.m.students[index], self.m.states[index]
        labels, mask, vocab = batch["labels"], batch["mask"], self.m.vocab
        soft_spec = replace(plan.spec, alpha=1.0)

        def fused(want_ce: bool, want_soft: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            hidden = module_hidden(student, batch)  # against the teacher's unchanged head
            with heads_gathered(student), self.phase("fused loss pass"):
                head = Head(hidden, *lm_head(student))
                hard = fused_linear_losses(head, [], labels, mask, vocab, self.chunk_tokens)[0].loss if want_ce else None
                term = StudentTerm(head, soft_spec, plan.temperature, state.top_k)
                soft = fused_linear_losses(teacher, [term], labels, mask, vocab, self.chunk_tokens)[1][0].loss \
                    if want_soft else None
            return hard, soft

        def logits(want_ce: bool, want_soft: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            out = module_logits(student, batch, vocab)
            chunk = state.distill.chunk_tokens
            with self.phase("loss"):
                hard = distill_loss(out, labels, mask, chunk_tokens=chunk).loss if want_ce else None
                soft = distill_loss(out, labels, mask, targets, soft_spec, chunk).loss if want_soft else None
            return hard, soft

        return fused if teacher is not None else logits


class LogitsStep(MicroStep):
    """Every loss from every model's logits: the teacher's forward runs once (or the cache answers), its CE
    trains it and its detached logits are every student's targets (shared by (top-k, T))."""

    def __init__(self, models: Models, nonfinite: str, chunk_tokens: Optional[int], world_size: int,
                 mode: str, cache: Optional[TeacherCache], device: torch.device):
        super().__init__(models, nonfinite, chunk_tokens, world_size)
        self.mode, self.cache, self.device = mode, cache, device

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        out = self.teacher_targets(batch, plans, sums)
        if out is None:  # the teacher's update was skipped: no trustworthy targets
            return
        targets, teacher_logits = out
        del out
        if panels is None:  # with top-k targets this frees the full logits before the students run
            teacher_logits = None
        for i, plan in enumerate(plans):
            if plan.active:
                probe = probes[self.m.states[i].distill.benefit_probe] if probes is not None and plan.measure else None
                self.student(i, batch, targets.get(i), plan, sums, panels, teacher_logits, probe)

    def teacher_targets(self, batch: Batch, plans: list[StudentPlan],
                        sums: dict[str, float]) -> Optional[tuple[dict[int, Targets], Optional[torch.Tensor]]]:
        """The one place that decides what the teacher does in a micro-step, and each active student's targets:
        none in hard mode (the teacher is in the data), the cached top-k, or the live teacher's (it steps first
        in co-distillation; a frozen one runs only while a student learns from it). Also returns the live
        teacher's full logits (None otherwise), or None altogether when the teacher's update was skipped."""
        active = [i for i, plan in enumerate(plans) if plan.active]
        if self.mode == "hard":
            return {}, None
        if self.cache is not None:
            cached = self.cache.targets(batch["index"], self.device)
            mask = batch["mask"].reshape(-1)
            self.add_teacher_sums(sums, float((cached.token_ce * mask).sum() / mask.sum().clamp(min=1)))
            return {i: cached for i in active}, None
        if not active and not self.m.teacher.trainable:  # a frozen teacher with nobody to teach
            return {}, None
        teacher_out = self.teacher(batch, sums)
        if teacher_out is None:
            return None
        logits, token_ce, lse = teacher_out
        # with only top-k targets, the caller drops the logits
        return self.targets_for(active, plans, logits, token_ce, lse), logits

    def teacher(self, batch: Batch, sums: dict[str, float]) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Teacher: CE on the ground truth, backward, step. Returns its detached logits [B, S, V], its CE per
        position [N] (for the token filter) and the logsumexp of its logits [N] (the students' loss reuses it);
        None if skipped."""
        teacher = self.m.teacher
        with torch.set_grad_enabled(teacher.trainable):
            out = forward_logits(teacher, batch, self.m.vocab)
            with self.phase("loss"):
                parts = distill_loss(out, batch["labels"], batch["mask"])
        if not self.finite(teacher, parts.loss):
            return None
        if teacher.trainable:
            teacher.engine.backward(parts.loss)
            self.step(teacher)
        self.add_teacher_sums(sums, parts.ce.item())
        return out.detach(), parts.token_ce, parts.lse

    def student(self, index: int, batch: Batch, targets: Optional[Targets], plan: StudentPlan,
                sums: dict[str, float], panels: Optional[dict[str, float]] = None,
                teacher_logits: Optional[torch.Tensor] = None, probe: Optional[Batch] = None) -> None:
        """Student: (1-α)·CE + α·T²·D(teacher ‖ student); with ``targets=None``, CE alone. With ``panels``, also
        the distillation diagnostics of this micro-batch; with ``probe``, the benefit gate's measurement."""
        student, state = self.m.students[index], self.m.states[index]
        out = forward_logits(student, batch, self.m.vocab)
        spec = plan.spec if targets is not None else SoftSpec()
        with self.phase("loss"):
            parts = distill_loss(out, batch["labels"], batch["mask"], targets, spec, state.distill.chunk_tokens)
        if panels is not None and targets is not None:
            self.add_panels(panels, index, out, batch, targets, plan, teacher_logits)
        if not self.finite(student, parts.loss):
            return
        student.engine.backward(parts.loss)
        del out
        if probe is not None and targets is not None:  # before the student's step
            self.measure_benefit(index, batch, targets, plan, probe, sums)
        self.step(student)
        self.add_student_sums(sums, index, parts, soft=targets is not None)


@dataclass
class _Pass:
    """What the fused pass leaves for the rest of the micro-step."""

    students: list[tuple[int, LossParts]]  # (student index, its parts) of the students that back-propagated
    frozen_teacher: Optional[Head]  # the teacher's head as the students saw it (for panels and the gate)
    targets: dict[int, Targets]  # the targets of the students whose panels or gate read them


class FusedStep(MicroStep):
    """Every loss from the final hidden states: the forwards stop before the LM heads, one chunked pass over
    every head (codistill/fused.py) gives the teacher's CE and every student's blended loss with their
    gradients, then each model back-propagates its own loss (the students first). No model's [N x V]
    logits exist; the teacher's head does not change before every student has used it."""

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        teacher = self.m.teacher
        active = [i for i, plan in enumerate(plans) if plan.active]
        if not active and not teacher.trainable:  # a frozen teacher with nobody to teach
            return
        measuring = [i for i in active if plans[i].measure and probes is not None]
        with torch.set_grad_enabled(teacher.trainable):
            teacher_hidden = forward_hidden(teacher, batch)
        hidden = {i: forward_hidden(self.m.students[i], batch) for i in active}
        done = self._pass(batch, plans, sums, panels, teacher_hidden, hidden, measuring)
        if done is None:
            return
        for i, parts in done.students:
            if i in measuring:  # before the student's step, outside the pass: the gate runs the student's forward
                probe = probes[self.m.states[i].distill.benefit_probe]
                self.measure_benefit(i, batch, done.targets[i], plans[i], probe, sums, done.frozen_teacher)
            self.step(self.m.students[i])
            self.add_student_sums(sums, i, parts, soft=True)

    def _pass(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
              panels: Optional[dict[str, float]], teacher_hidden: torch.Tensor, hidden: dict[int, torch.Tensor],
              measuring: list[int]) -> Optional[_Pass]:
        """The fused pass and every backward. ZeRO-3: every head whole from the pass to its model's backward
        (the forwards ran before). The students back-propagate first: the teacher's backward, the step's
        largest, then runs without their activations, handed-over gradients or gathered heads (the order
        changes no number: each model's gradients were computed in the pass, and the optimizer steps wait for
        the micro-step's end). None when the teacher's loss was not finite (skipped)."""
        teacher, students = self.m.teacher, self.m.students
        active = list(hidden)
        with heads_gathered(teacher):
            with heads_gathered(*(students[i] for i in active)):
                head = Head(teacher_hidden, *lm_head(teacher))
                heads = {i: Head(hidden.pop(i), *lm_head(students[i])) for i in active}
                terms = [StudentTerm(heads[i], plans[i].spec, plans[i].temperature, self.m.states[i].top_k)
                         for i in active]
                with torch.set_grad_enabled(True), self.phase("fused loss pass"):
                    teacher_parts, student_parts = fused_linear_losses(head, terms, batch["labels"], batch["mask"],
                                                                       self.m.vocab, self.chunk_tokens)
                del terms
                frozen = self._frozen(head) if panels is not None or measuring else None
                if not self.finite(teacher, teacher_parts.loss):
                    return None
                readers = active if panels is not None else measuring
                targets = self.targets_for(readers, plans, None if frozen is None else HeadLogits(frozen, self.m.vocab),
                                           teacher_parts.token_ce, teacher_parts.lse)
                stepped = []
                for i, parts in zip(active, student_parts):
                    if panels is not None:
                        self.add_panels(panels, i, HeadLogits(heads[i], self.m.vocab), batch, targets[i], plans[i],
                                    HeadLogits(frozen, self.m.vocab))
                    if not self.finite(students[i], parts.loss):
                        continue
                    students[i].engine.backward(parts.loss)
                    heads[i] = None  # its activations go with its graph
                    stepped.append((i, parts))
                del heads
            if teacher.trainable:
                teacher.engine.backward(teacher_parts.loss)
                self.step(teacher)
            self.add_teacher_sums(sums, teacher_parts.ce.item())
            del head
        return _Pass(stepped, frozen, targets)

    def _frozen(self, head: Head) -> Head:
        """What the panels and the gate read of the teacher: its head as it is now (it steps last); a copy under
        ZeRO-3, taken before its backward (a tied head is partitioned again by the embedding's backward hook,
        gathered or not) and kept after the pass."""
        zero3 = self.m.teacher.engine.zero_optimization_stage() == 3
        copy = (lambda t: t.detach().clone()) if zero3 else (lambda t: t.detach())
        return Head(head.hidden.detach(), copy(head.weight), None if head.bias is None else copy(head.bias))



def fused_problems(static_refusal: Optional[str], members: list[Member], vocab: int) -> list[str]:
    """Why the fused path would not serve these models exactly (empty: it would)."""
    if static_refusal:
        return [static_refusal]
    return [f"{m.name}: {why}" for m in members if (why := fused_head_problem(m, vocab))]


def use_fused(cfg: RunConfig, members: list[Member], vocab: int, world_size: int, device: str) -> bool:
    """``distill.fused_linear``: false; true (refused where it would not be exact); auto: on where it is exact,
    the vocabulary is large enough for the logits to matter (FUSED_AUTO_VOCAB), no model is at ZeRO-3
    (fused.auto_problem) and the memory estimate's step peak is lower with it."""
    setting, refusal = cfg.distill.fused_linear, static_problem(cfg.mode, bool(cfg.teacher.cache))
    if setting is False or (setting == "auto" and (refusal or vocab < FUSED_AUTO_VOCAB)):
        return False
    at_zero3 = auto_problem([m.engine.zero_optimization_stage() for m in members])
    if setting == "auto" and at_zero3:  # before the heads' exactness probe: nothing to run for it
        log.info("fused-linear losses off: %s", at_zero3)
        return False
    problems = fused_problems(refusal, members, vocab)
    if problems and setting is True:
        raise ConfigError(f"distill.fused_linear=true: {'; '.join(problems)}; set it to auto or false")
    if problems:
        log.info("fused-linear losses off: %s", "; ".join(problems))
        return False
    if setting == "auto" and not fused_lowers_peak(cfg, world_size, device):
        log.info("fused-linear losses off: the memory estimate's step peak is not lower with them at this "
                 "micro-batch (their fp32 head gradients outweigh the logits they drop)")
        return False
    return True


def make_step(fused: bool, models: Models, cfg: RunConfig, world_size: int, cache: Optional[TeacherCache],
              device: torch.device) -> MicroStep:
    """The run's micro-step: the fused strategy or the logits one."""
    if fused:
        return FusedStep(models, cfg.train.nonfinite, cfg.distill.chunk_tokens, world_size)
    return LogitsStep(models, cfg.train.nonfinite, cfg.distill.chunk_tokens, world_size, cfg.mode, cache, device)
