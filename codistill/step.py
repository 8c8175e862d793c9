"""One micro-step over every model: forwards once, targets shared, each model's loss and backward.

The models and their edges: every loaded model trains on its CE, and a learner (a student, a peer of
mode mutual, a listening teacher) also on ``α·T²·D(sources ‖ itself)``, where its sources' predictions
are averaged in probability space (codistill/mixture.py). One-way co-distillation is the case where
every student's one source is the teacher.

Two strategies behind one interface, :class:`MicroStep`: :class:`LogitsStep` computes every loss
from each model's logits (a source's detached logits, full or top-k, are its readers' targets);
:class:`FusedStep` (``distill.fused_linear``) stops every forward at the final hidden states and
takes every loss from one chunked pass over the LM heads (codistill/fused.py), so no model's
[N × V] logits exist. Either way every backward runs as soon as it can (freeing its activations)
and the optimizer steps wait until the micro-step's end, when every model's loss is known to be
finite, so a stop leaves all models at the same step and every target comes from a model's
prediction before its step.

What a micro-step adds to the step's metrics goes into ``sums`` (tag -> value summed over
micro-steps); with ``panels``, the distillation diagnostics of the micro-batch; with ``probes``
(unseen micro-batches by ``distill.benefit_probe``), learners whose plan says so measure their
benefit gate (codistill/gate.py) before their step.
"""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .cache import TeacherCache
from .config import ConfigError, RunConfig
from .crosstok import READS_LOGITS, CrossTeacher, SpreadMap, cross_parts
from .ema import SmoothedTeacher
from .engines import (CROSS, Member, forward_hidden, forward_logits, fused_head_problem, heads_gathered, lm_head,
                      module_hidden, module_logits, view, whole_for_generation)
from .errors import NonFinite
from .fused import FUSED_AUTO_VOCAB, Head, HeadLogits, Term, auto_problem, fused_losses, static_problem
from .gate import hypergradient_terms, trainable_parameters
from .losses import LossParts, SoftSpec, Targets, chunk_rows, distill_loss, panel_stats
from .memory import fused_lowers_peak
from .metrics import CROSS_CE, FROZEN_CE, Tags, cross_tag
from .mixture import Mixture, source_targets
from .onpolicy import Sampling, left_padded, on_policy_loss, prompt_lengths, sample, sample_seed, sampled_batch
from .student import StudentPlan, StudentState

log = logging.getLogger("codistill")

Batch = dict[str, torch.Tensor]
Probes = dict[str, Batch]  # the benefit gates' unseen micro-batches by distill.benefit_probe


def add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


@dataclass
class Models:
    """What a micro-step runs: every loaded model (the teacher first, when it is loaded), the learners (the
    models with a distill state: students, peers, a listening teacher) and the models each learns from."""

    members: list[Member]
    teacher: Optional[Member]  # None when not loaded (cached, hard mode) or in mode mutual
    learners: list[int]  # each learner's position in ``members``, in the order of ``states``
    states: list[StudentState]
    sources: list[list[int]]  # per learner: the positions in ``members`` of the models it learns from
    vocab: int
    tags: Tags
    teacher_name: Optional[str] = None  # the teacher's name, loaded or not
    maps: dict[str, tuple[Optional[torch.Tensor], Optional[SpreadMap]]] = field(default_factory=dict)  # a teacher of
    # another tokenizer, per students' side (crosstok.side_maps): its ids onto theirs, the groups of spread_map

    def learner(self, index: int) -> Member:
        return self.members[self.learners[index]]

    @property
    def cross(self) -> bool:
        """Whether a model reads its own tokenization of the text (a teacher with another tokenizer)."""
        return any(m.vocab is not None for m in self.members)

    @property
    def logit_readers(self) -> bool:
        """Whether a learner reads its source's logits across tokenizers (sorted or projected distributions)."""
        return self.cross and any(s.distill.cross_tokenizer in READS_LOGITS for s in self.states)

    def learner_at(self, position: int) -> Optional[int]:
        """The learner index of the member at ``position`` (None: it learns from nobody, e.g. a deaf teacher)."""
        return self.learners.index(position) if position in self.learners else None


@dataclass
class Roles:
    """Who does what in one micro-step (decided from the plans, so the same on every rank)."""

    trains: dict[int, bool]  # member position -> whether it trains (a frozen teacher runs only when read)
    reads: dict[int, list[int]]  # learner index -> the sources it learns from now (active learners only)
    on_policy: list[int] = field(default_factory=list)  # learners that also learn on their own samples now


class SourceTargets:
    """The targets one micro-step makes from the models that others learn from: their detached logits (or
    row-sliceable stand-ins) by member position, their CE per position and logsumexp once their own loss is
    known, and each target made once per (sources, top-k, T, token filter)."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.logits: dict[int, object] = {}
        self.known: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (token_ce, lse)
        self.made: dict[tuple, Targets] = {}

    def make(self, sources: list[int], state: StudentState, temperature: float) -> Targets:
        d = state.distill
        key = (tuple(sources), state.top_k, temperature, d.token_filter)
        if key in self.made:
            return self.made[key]
        rows = chunk_rows(self.logits[sources[0]].shape[-1], d.chunk_tokens)
        made = source_targets([self.logits[j] for j in sources], [self.known.get(j) for j in sources], self.labels,
                              state.top_k, temperature, d.token_filter, rows, Mixture, d.chunk_tokens)
        self.made[key] = made
        return made

    def keep_for(self, readers: list[tuple[list[int], StudentState, float]]) -> None:
        """Forget the detached logits that none of ``readers`` (sources, state, T) still needs: a reader whose
        sources' losses are all known gets its targets made now (they hold the logits only if full)."""
        needed = set()
        for sources, state, temperature in readers:
            if sources and all(j in self.known for j in sources):
                self.make(sources, state, temperature)
            else:
                needed.update(sources)
        for j in list(self.logits):
            if j not in needed and j in self.known:
                del self.logits[j]

    def panel_logits(self, sources: list[int]):
        """What the panels read as the sources' prediction: one source's logits, or their average."""
        if len(sources) == 1:
            return self.logits[sources[0]]
        return Mixture([self.logits[j] for j in sources], 1.0)


class MicroStep:
    """The interface of both strategies: call it on a micro-batch; ``skipped`` counts updates skipped for a
    non-finite loss by model (``nonfinite: skip``). ``phase(name)`` is entered around each named part of the
    step (the losses, the fused pass, the panels, a benefit gate's measurement): a no-op unless a benchmark
    sets it (codistill-bench-memory records each part's memory).

    Every model's targets come from the other models' forwards of this micro-batch, before any step."""

    def __init__(self, models: Models, nonfinite: str, chunk_tokens: Optional[int], world_size: int):
        self.m, self.nonfinite, self.chunk_tokens, self.world_size = models, nonfinite, chunk_tokens, world_size
        self.skipped = {m.name: 0 for m in models.members}
        self._deferred: Optional[list[Member]] = None  # optimizer steps waiting for the micro-step's end
        self.phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()
        self.sampling: Optional[Sampling] = None  # what on-policy learners sample with (the run's tokenizer, seed)
        self._own: dict[int, tuple[torch.Tensor, dict[str, float]]] = {}  # position -> on-policy loss, its sums
        self.teacher_rests: Callable[[int], bool] = lambda step: False  # whether the teacher is frozen (its tail)
        self.smoothed: Optional[SmoothedTeacher] = None  # the teacher's moving average (distill.teacher_ema)
        self.at = 0  # the optimizer step of the micro-step that runs (or ran last)

    def __call__(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
                 panels: Optional[dict[str, float]] = None, probes: Optional[Probes] = None,
                 where: tuple[int, int] = (0, 0)) -> None:
        """``where``: (optimizer step, micro-batch), which seeds an on-policy learner's sampling."""
        add(sums, "perf/tokens", float(batch["attention_mask"].sum()))  # the batch's tokens, padding not counted
        self._deferred, self.at = [], where[0]
        try:
            for index in self.roles(plans).on_policy:
                self._own[self.m.learners[index]] = self.on_own_samples(index, batch, plans[index], where)
            self.losses(batch, plans, sums, panels, probes)
            stepped = [self.optimizer_step(member) for member in self._deferred]
            if any(stepped) and self.smoothed is not None and self.teacher_rests(self.at):
                self.smoothed.update()  # in the teacher's tail its average goes on towards its final weights
        finally:
            self._deferred = None
            self._own.clear()

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        """Every loss and backward of the micro-step, optimizer steps through :meth:`step`."""
        raise NotImplementedError

    def roles(self, plans: list[StudentPlan]) -> Roles:
        """Who trains and who reads whom at this step: a learner in its head start neither trains nor teaches
        (the teacher trains but in its tail: its head start delays only its listening); a frozen model runs only
        when a training learner reads it."""
        m = self.m
        present = [m.learner_at(k) is None or member is m.teacher or plans[m.learner_at(k)].active
                   for k, member in enumerate(m.members)]
        resting = m.teacher is not None and self.teacher_rests(self.at)
        trains = {k: True for k, member in enumerate(m.members)
                  if member.trainable and present[k] and not (resting and member is m.teacher)}
        reads = {i: [j for j in m.sources[i] if present[j]] for i, plan in enumerate(plans) if plan.active}
        for i, sources in reads.items():
            if m.learners[i] in trains:
                for j in sources:
                    trains.setdefault(j, False)
        return Roles(dict(sorted(trains.items())), reads,
                     [i for i, plan in enumerate(plans) if plan.active and plan.on_policy])

    def on_own_samples(self, index: int, batch: Batch, plan: StudentPlan,
                       where: tuple[int, int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Learner ``index``'s on-policy term on this micro-batch (codistill/onpolicy.py): its continuations of the
        micro-batch's prompts, scored by the teacher before any step; ``weight·T²·D(P_teacher ‖ P_self)`` on the
        sampled tokens, with its graph, for :meth:`own_loss` to add to the learner's loss on the text; and what to
        log of it."""
        member, state, s = self.m.learner(index), self.m.states[index], self.sampling
        cfg, chunk = state.distill.on_policy, state.distill.chunk_tokens
        lengths = prompt_lengths(batch, None if s.prompted and cfg.prompts != "prefix" else cfg.prefix_tokens)
        ids, attention = left_padded(batch["input_ids"], lengths, s.pad_id)
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(sample_seed(s.seed, s.rank, *where, member.name))
        start = time.perf_counter()
        with self.phase("generate"), whole_for_generation(member) as module:
            tokens, made = sample(module, ids, attention, cfg.max_new_tokens, cfg.temperature, cfg.top_p, s.stops,
                                  s.pad_id, self.m.vocab, generator)
        seconds = time.perf_counter() - start
        sampled = sampled_batch(batch["input_ids"], lengths, tokens, made, s.pad_id)
        with torch.no_grad():
            teacher = forward_logits(self.m.teacher, sampled, self.m.vocab)
        spec = replace(plan.spec, divergence=cfg.divergence)
        with self.phase("loss"):
            parts, scored = on_policy_loss(forward_logits(member, sampled, self.m.vocab), teacher, sampled["labels"],
                                           sampled["mask"], spec, plan.temperature, state.top_k, chunk)
        return cfg.weight * parts.loss, {"loss": parts.loss.item(), "teacher_logp": -scored.ce.item(),
                                         "length": made.float().mean().item(), "tokens": made.sum().item(),
                                         "seconds": seconds}

    def own_loss(self, position: int, loss: torch.Tensor, sums: dict[str, float]) -> torch.Tensor:
        """The loss the member at ``position`` back-propagates: its loss on the text, plus its on-policy term at an
        on-policy step (one backward for both: the engine sees one per micro-batch), logged here."""
        own = self._own.pop(position, None)
        if own is None:
            return loss
        for key, value in own[1].items():
            add(sums, f"{self.m.members[position].name}/on_policy/{key}", value)
        return loss + own[0]

    def step(self, member: Member) -> None:
        """The optimizer step of ``member``: at the end of the micro-step when called inside one, at once when a
        benchmark calls a model's part of it by itself."""
        if self._deferred is None:
            self.optimizer_step(member)
        else:
            self._deferred.append(member)

    def optimizer_step(self, member: Member) -> bool:
        """``member``'s engine step; after an optimizer step of the teacher, its moving average follows. Returns
        whether it was an optimizer step (the last micro-batch of an accumulation)."""
        boundary = member.engine.is_gradient_accumulation_boundary()
        member.engine.step()
        if boundary and self.smoothed is not None and member is self.m.teacher:
            self.smoothed.update()
        return boundary

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

    def add_sums(self, sums: dict[str, float], position: int, parts: LossParts, soft: bool) -> None:
        """A model's losses of the micro-step: its loss and CE, and a learner's soft term (and token filter)."""
        name, index = self.m.members[position].name, self.m.learner_at(position)
        add(sums, f"{name}/train/loss", parts.loss.item())
        add(sums, f"{name}/train/loss_ce", parts.ce.item())
        if soft:
            add(sums, f"{name}/train/loss_kd", parts.kd.item())
            if self.m.states[index].distill.token_filter:
                add(sums, f"{name}/train/token_filter_fraction", parts.filtered.item())

    def frozen_sums(self, sums: dict[str, float], member: Member, batch: Batch, ce: torch.Tensor) -> None:
        """A frozen model's CE on the micro-batch: it scores, it does not train (not a training loss)."""
        add(sums, f"{member.name}/{FROZEN_CE}", ce.item())
        self.cross_ce(sums, member, batch, ce)

    def cross_ce(self, sums: dict[str, float], member: Member, batch: Batch, ce: torch.Tensor) -> None:
        """A model with its own tokenizer: its CE on the text in nats per token of the run's tokenization (the
        same text: comparable with the students' CE, e.g. for the teacher-lead schedule); a teacher's also per
        token of each further students' side (crosstok.side_prefix), which their schedules compare with."""
        if member.vocab is None:
            return
        for side in ["", *(side for side in self.m.maps if side and member.side == CROSS)]:
            if side + "mask" in batch:
                per = batch[member.side + "mask"].sum() / batch[side + "mask"].sum().clamp(min=1)
                add(sums, f"{member.name}/{cross_tag(side)}", float(ce * per))

    def add_panels(self, panels: dict[str, float], index: int, logits, batch: Batch, targets: Targets,
                   plan: StudentPlan, source_logits) -> None:
        """The distillation diagnostics of one learner on this micro-batch, into ``panels``: the sources'
        entropy is one chart when every learner reads the teacher alone, else one per learner."""
        d = self.m.states[index].distill
        with self.phase("panels"):
            stats = panel_stats(logits, batch["labels"], batch["mask"], targets, plan.spec, d.top_k, source_logits,
                                d.chunk_tokens)
        one_teacher = self.m.teacher is not None and all(s == [0] for s in self.m.sources)
        for key, value in stats.items():
            panels["distill/teacher_entropy" if key == "teacher_entropy" and one_teacher
                   else self.m.tags.student("distill", key, index)] = value

    def measure_benefit(self, index: int, batch: Batch, targets: Targets | CrossTeacher, plan: StudentPlan,
                        probe: Batch, sums: dict[str, float], sources: Optional[list[Head]] = None) -> None:
        """The benefit gate's measurement, on this rank, at the learner's weights before its step: the inner
        products of ∇CE and ∇(T²·D − CE) on the batch, the update at this step's α, and ∇CE on the unseen
        ``probe`` (see :func:`codistill.gate.hypergradient_terms`). Forwards of the bare module: gradients of
        them do not go through DeepSpeed's reduction. ``sources``: the fused path's (unchanged) source heads."""
        learner = self.m.learner(index)
        losses = self._gate_losses(index, batch, targets, plan, sources)
        if sources is not None:
            def probe_ce() -> torch.Tensor:
                hidden = module_hidden(learner, probe)
                with heads_gathered(learner), self.phase("fused loss pass"):
                    return fused_losses([Head(hidden, *lm_head(learner))], [None], probe["labels"], probe["mask"],
                                        self.m.vocab, self.chunk_tokens)[0].loss
        else:
            def probe_ce() -> torch.Tensor:
                logits = module_logits(learner, probe, self.m.vocab)
                with self.phase("loss"):
                    return distill_loss(logits, probe["labels"], probe["mask"],
                                        chunk_tokens=self.m.states[index].distill.chunk_tokens).loss
        summed = (lambda t: torch.distributed.all_reduce(t)) if self.world_size > 1 else None
        with self.phase(f"{learner.name} benefit gate"):
            terms = hypergradient_terms(trainable_parameters(learner.engine.module), plan.spec.alpha, losses,
                                        probe_ce, summed, separate=learner.engine.zero_optimization_stage() == 3)
        for key, value in terms.items():
            add(sums, f"{learner.name}/benefit/{key}", value)

    def _gate_losses(self, index: int, batch: Batch, targets: Targets | CrossTeacher, plan: StudentPlan,
                     sources: Optional[list[Head]]) -> Callable[[bool, bool], tuple]:
        """``losses(want_ce, want_soft)`` for the gate: from one forward of the learner, its CE and/or its T²·D
        (the blended loss at α = 1; with a teacher of another tokenizer, its D) on ``batch``; ZeRO-3 asks for one
        per forward."""
        learner, state = self.m.learner(index), self.m.states[index]
        labels, mask, vocab = batch["labels"], batch["mask"], self.m.vocab
        soft_spec = replace(plan.spec, alpha=1.0)

        def fused(want_ce: bool, want_soft: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            hidden = module_hidden(learner, batch)  # against the sources' unchanged heads
            with heads_gathered(learner), self.phase("fused loss pass"):
                head = Head(hidden, *lm_head(learner))
                hard = fused_losses([head], [None], labels, mask, vocab, self.chunk_tokens)[0].loss if want_ce else None
                term = Term(list(range(len(sources))), soft_spec, plan.temperature, state.top_k)
                soft = fused_losses([*sources, head], [None] * len(sources) + [term], labels, mask, vocab,
                                    self.chunk_tokens)[-1].loss if want_soft else None
            return hard, soft

        def logits(want_ce: bool, want_soft: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            out = module_logits(learner, batch, vocab)
            chunk = state.distill.chunk_tokens
            with self.phase("loss"):
                hard = distill_loss(out, labels, mask, chunk_tokens=chunk).loss if want_ce else None
                if want_soft and isinstance(targets, CrossTeacher):
                    soft = cross_parts(out, batch, targets, state.distill, 1.0, plan.temperature).loss
                else:
                    soft = distill_loss(out, labels, mask, targets, soft_spec, chunk).loss if want_soft else None
            return hard, soft

        return fused if sources is not None else logits


class LogitsStep(MicroStep):
    """Every loss from every model's logits. Each model's forward runs once (or the cache answers for a cached
    teacher); its detached logits are the targets of the models that learn from it. A model trains as soon as
    every model it learns from has run (the deaf teacher at once, then each student in turn, holding one
    student's activations at a time); models that learn from each other hold their forwards together."""

    def __init__(self, models: Models, nonfinite: str, chunk_tokens: Optional[int], world_size: int,
                 cache: Optional[TeacherCache], device: torch.device):
        super().__init__(models, nonfinite, chunk_tokens, world_size)
        self.cache, self.device = cache, device

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        roles = self.roles(plans)
        got = SourceTargets(batch["labels"])
        preset = self.cached_targets(batch, roles, sums)
        pending: list[tuple[int, torch.Tensor]] = []  # trained models waiting for their sources' forwards
        ran, bad = set(), set()
        for k, trains in roles.trains.items():
            member = self.m.members[k]
            with torch.set_grad_enabled(trains):
                logits = forward_logits(member, view(member, batch), self.m.vocab)
            if member.vocab is None or self.m.logit_readers:  # chunk likelihoods need only its CE per position
                got.logits[k] = logits.detach()
            ran.add(k)
            if trains:
                pending.append((k, logits))
            elif not self.frozen(k, logits, batch, sums, got):
                bad.add(k)
            del logits
            still = []
            for position, own in pending:
                index = self.m.learner_at(position)
                sources = roles.reads.get(index, []) if index is not None else []
                if all(j in ran for j in sources):
                    self.train(position, own, sources, batch, plans, sums, panels, probes, got, bad, preset)
                else:
                    still.append((position, own))
            pending = still
            if panels is None and not self.m.cross:  # what no waiting model reads any more (top-k: the full logits)
                waiting = {p for p, _ in pending} | (set(roles.trains) - ran)
                got.keep_for([(sources, self.m.states[i], plans[i].temperature) for i, sources in roles.reads.items()
                              if self.m.learners[i] in waiting])

    def cached_targets(self, batch: Batch, roles: Roles, sums: dict[str, float]) -> dict[int, Targets]:
        """A cached teacher's top-k for every active learner (and its CE, for the log); none otherwise."""
        if self.cache is None:
            return {}
        cached = self.cache.targets(batch["index"], self.device)
        cross = CROSS + "mask" in batch  # made over the teacher's own columns of paired blocks
        mask = batch[CROSS + "mask" if cross else "mask"].reshape(-1)
        ce = (cached.token_ce * mask).sum() / mask.sum().clamp(min=1)
        add(sums, f"{self.m.teacher_name}/{FROZEN_CE}", float(ce))
        if cross:
            per = batch[CROSS + "mask"].sum() / batch["mask"].sum().clamp(min=1)
            add(sums, f"{self.m.teacher_name}/{CROSS_CE}", float(ce * per))
            return {i: CrossTeacher(None, cached.token_ce) for i in roles.reads}
        return {i: cached for i in roles.reads}

    def frozen(self, position: int, logits: torch.Tensor, batch: Batch, sums: dict[str, float],
               got: SourceTargets) -> bool:
        """A frozen model's CE (logged; its per-position CE and logsumexp serve its readers); False if it is
        not finite (then nobody learns from it at this step)."""
        member, seen = self.m.members[position], view(self.m.members[position], batch)
        with self.phase("loss"):
            parts = distill_loss(logits, seen["labels"], seen["mask"])
        if not self.finite(member, parts.loss):
            return False
        got.known[position] = (parts.token_ce, parts.lse)
        self.frozen_sums(sums, member, batch, parts.ce)
        return True

    def train(self, position: int, logits: torch.Tensor, sources: list[int], batch: Batch,
              plans: list[StudentPlan], sums: dict[str, float], panels: Optional[dict[str, float]],
              probes: Optional[Probes], got: SourceTargets, bad: set, preset: dict[int, Targets]) -> None:
        """One model's loss, backward and (deferred) step: ``(1-α)·CE + α·T²·D(sources ‖ model)`` for a
        learner with sources now, CE alone otherwise. A model whose source's loss was not finite skips."""
        member, index = self.m.members[position], self.m.learner_at(position)
        if any(j in bad for j in sources):
            return
        plan, seen = plans[index] if index is not None else None, view(member, batch)
        cross = isinstance(preset.get(index), CrossTeacher) or (  # its one source: another tokenizer
            bool(sources) and self.m.members[sources[0]].vocab is not None)
        teacher = None if not cross else preset.get(index) if not sources else \
            CrossTeacher(got.logits.get(sources[0]), got.known[sources[0]][0],  # cached, or live
                         *self.m.maps.get(member.side, (None, None)))
        targets = None if cross else preset.get(index) if not sources else got.make(sources, self.m.states[index],
                                                                                     plan.temperature)
        spec = plan.spec if targets is not None else SoftSpec()
        d = self.m.states[index].distill if index is not None else None
        with self.phase("loss"):
            parts = cross_parts(logits, seen, teacher, d, plan.spec.alpha, plan.temperature) if cross else \
                distill_loss(logits, seen["labels"], seen["mask"], targets, spec, d and d.chunk_tokens)
        if panels is not None and targets is not None:
            self.add_panels(panels, index, logits, batch, targets, plan,
                            got.panel_logits(sources) if sources else None)
        loss = self.own_loss(position, parts.loss, sums)
        if not self.finite(member, loss):
            bad.add(position)
            return
        member.engine.backward(loss)
        del logits
        got.known[position] = (parts.token_ce, parts.lse)
        probe = None if index is None or not probes or not plan.measure else \
            probes.get(self.m.states[index].distill.benefit_probe)
        if probe is not None and (targets is not None or cross):  # before the learner's step
            self.measure_benefit(index, seen, teacher if cross else targets, plan, view(member, probe), sums)
        self.step(member)
        self.add_sums(sums, position, parts, soft=targets is not None or cross)
        self.cross_ce(sums, member, batch, parts.ce)
        if cross:
            add(sums, f"{member.name}/train/aligned_share", parts.filtered.item())


class FusedStep(MicroStep):
    """Every loss from the final hidden states: the forwards stop before the LM heads, one chunked pass over
    every head (codistill/fused.py) gives every model's loss with its gradients (each source's chunk of logits
    computed once, for its own loss and as its readers' targets), then each model back-propagates its own
    loss, the last in the models' order first (the teacher's, the step's largest, runs last, without the
    students' activations). No model's [N x V] logits exist; no head changes before every reader has used it."""

    def losses(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
               panels: Optional[dict[str, float]], probes: Optional[Probes]) -> None:
        roles = self.roles(plans)
        if not any(roles.trains.values()):
            return
        hidden = {}
        for k, trains in roles.trains.items():
            with torch.set_grad_enabled(trains):
                hidden[k] = forward_hidden(self.m.members[k], batch)
        measuring = [i for i, sources in roles.reads.items() if sources and plans[i].measure and probes is not None
                     and self.m.learners[i] in roles.trains]
        done = self._pass(batch, plans, sums, panels, roles, hidden, measuring)
        for position, parts, soft in done.trained:
            index = self.m.learner_at(position)
            if index in measuring:  # before the learner's step, outside the pass: the gate runs its forward
                probe = probes[self.m.states[index].distill.benefit_probe]
                heads = [done.frozen[j] for j in roles.reads[index]]
                self.measure_benefit(index, batch, done.targets[index], plans[index], probe, sums, heads)
            if roles.trains[position]:
                self.step(self.m.members[position])
                self.add_sums(sums, position, parts, soft=soft)
            else:
                self.frozen_sums(sums, self.m.members[position], batch, parts.ce)

    def _pass(self, batch: Batch, plans: list[StudentPlan], sums: dict[str, float],
              panels: Optional[dict[str, float]], roles: Roles, hidden: dict[int, torch.Tensor],
              measuring: list[int]) -> _Pass:
        """The fused pass and every backward. ZeRO-3: every head whole from the pass to its model's backward
        (the forwards ran before), entered in the models' order and left in the reverse one, each right after
        its model's backward (the order changes no number: each model's gradients were computed in the pass,
        and the optimizer steps wait for the micro-step's end)."""
        members, running = self.m.members, list(roles.trains)
        at = {k: n for n, k in enumerate(running)}
        gathered = [heads_gathered(members[k]) for k in running]
        entered = []
        try:
            for context in gathered:
                context.__enter__()
                entered.append(context)
            heads = [Head(hidden.pop(k), *lm_head(members[k])) for k in running]
            terms = []
            for k in running:
                index = self.m.learner_at(k)
                sources = roles.reads.get(index, []) if index is not None else []
                terms.append(None if not sources else Term([at[j] for j in sources], plans[index].spec,
                                                           plans[index].temperature, self.m.states[index].top_k))
            with torch.set_grad_enabled(True), self.phase("fused loss pass"):
                parts = fused_losses(heads, terms, batch["labels"], batch["mask"], self.m.vocab, self.chunk_tokens)
            readers = [i for i in roles.reads if roles.reads[i] and self.m.learners[i] in at
                       and (panels is not None or i in measuring)]
            read = sorted({j for i in readers for j in roles.reads[i]})
            frozen = {j: self._frozen(heads[at[j]], members[j]) for j in read}
            got = SourceTargets(batch["labels"])
            for j in read:
                got.logits[j] = HeadLogits(frozen[j], self.m.vocab)
                got.known[j] = (parts[at[j]].token_ce, parts[at[j]].lse)
            targets = {i: got.make(roles.reads[i], self.m.states[i], plans[i].temperature) for i in readers}
            bad, trained, losses = set(), [], {}
            for n, k in enumerate(running):
                index = self.m.learner_at(k)
                sources = roles.reads.get(index, []) if index is not None else []
                if panels is not None and index in targets:
                    self.add_panels(panels, index, HeadLogits(heads[n], self.m.vocab), batch, targets[index],
                                    plans[index], got.panel_logits(sources))
                loss = self.own_loss(k, parts[n].loss, sums) if roles.trains[k] else parts[n].loss
                if any(j in bad for j in sources) or not self.finite(members[k], loss):
                    bad.add(k)
                    continue
                losses[k] = loss
                trained.append((k, parts[n], terms[n] is not None))
            for n in reversed(range(len(running))):
                k = running[n]
                if roles.trains[k] and k not in bad:
                    members[k].engine.backward(losses[k])
                heads[n] = None  # its activations go with its graph
                entered.pop().__exit__(None, None, None)
        finally:
            while entered:
                entered.pop().__exit__(None, None, None)
        return _Pass(trained, frozen, targets)

    def _frozen(self, head: Head, member: Member) -> Head:
        """What the panels and the gate read of a source: its head as it is now (no model steps before the
        micro-step's end); a copy under ZeRO-3, taken before its backward (a tied head is partitioned again
        by the embedding's backward hook, gathered or not) and kept after the pass."""
        zero3 = member.engine.zero_optimization_stage() == 3
        copy = (lambda t: t.detach().clone()) if zero3 else (lambda t: t.detach())
        return Head(head.hidden.detach(), copy(head.weight), None if head.bias is None else copy(head.bias))


@dataclass
class _Pass:
    """What the fused pass leaves for the rest of the micro-step."""

    trained: list[tuple[int, LossParts, bool]]  # (member position, its parts, whether soft) of finite losses
    frozen: dict[int, Head]  # the sources' heads as their readers saw them (for panels and the gate)
    targets: dict[int, Targets]  # the targets of the learners whose panels or gate read them


def fused_problems(static_refusal: Optional[str], members: list[Member], vocab: int) -> list[str]:
    """Why the fused path would not serve these models exactly (empty: it would)."""
    if static_refusal:
        return [static_refusal]
    return [f"{m.name}: {why}" for m in members if (why := fused_head_problem(m, vocab))]


def use_fused(cfg: RunConfig, members: list[Member], vocab: int, world_size: int, device: str) -> bool:
    """``distill.fused_linear``: false; true (refused where it would not be exact); auto: on where it is exact,
    the vocabulary is large enough for the logits to matter (FUSED_AUTO_VOCAB), no model is at ZeRO-3
    (fused.auto_problem) and the memory estimate's step peak is lower with it."""
    setting, refusal = cfg.distill.fused_linear, static_problem(cfg.mode, cfg.teacher is not None and bool(cfg.teacher.cache))
    if setting is False or (setting == "auto" and (refusal or vocab < FUSED_AUTO_VOCAB)):
        return False
    if any(m.vocab is not None for m in members):  # another tokenizer: the logits path (true was refused before)
        log.info("fused-linear losses off: a model reads another tokenizer's text")
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
        out: MicroStep = FusedStep(models, cfg.train.nonfinite, cfg.distill.chunk_tokens, world_size)
    else:
        out = LogitsStep(models, cfg.train.nonfinite, cfg.distill.chunk_tokens, world_size, cache, device)
    out.teacher_rests = cfg.train.teacher_rests
    return out
