"""The co-distillation trainer: one DeepSpeed engine per model, all on the world group.

Per micro-batch every model sees the identical batch. The teacher's forward runs
once: its cross-entropy on the ground truth trains it, and its detached logits are
the soft targets of every student; or, with ``distill.fused_linear``, every model's
forward stops at its final hidden states and one chunked pass over their LM heads
gives every loss (codistill/fused.py).
"""
from __future__ import annotations

import logging
import math
import re
import random
import signal
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .cache import TeacherCache
from .config import ConfigError, DistillConfig, RunConfig, dump_config, is_resolved_config
from .data import (BatchStream, ProbeBatches, build_splits, check_data_source, eval_batches, run_tokenizer,
                   tokenizer_fingerprint)
from .engines import (Member, build_engine, deepspeed_configs, forward_hidden, forward_logits, fused_head_problem,
                      half_precision, heads_gathered, init_seed, is_trainable, lm_head, loaded_models, module_hidden, module_logits,
                      quiet_library_noise, zero_stage)
from .errors import NonFinite
from .files import write_atomically
from .fused import (FUSED_AUTO_VOCAB, Head, HeadLogits, StudentTerm, auto_problem, fused_linear_losses, fused_rows,
                    static_problem)
from .gate import (SUMMED, TERMS, BenefitState, hypergradient_terms, length_weight, signal_parts,
                   trainable_parameters)
from .gate import update as update_benefit
from .losses import (SoftSpec, Targets, distill_loss, next_token_targets, panel_stats, top1_agreement,
                     topk_bytes_per_position, topk_targets)
from .memory import fused_lowers_peak
from .metrics import Metrics, format_values, peak_bytes, summary_lines
from .models import check_attention, check_model, count_parameters, local_parameters, model_config
from .schedules import adaptive_alpha, alpha_at, ema, lr_fraction, temperature_at

log = logging.getLogger("codistill")


Probes = dict[str, dict[str, torch.Tensor]]  # the benefit gates' unseen micro-batches by distill.benefit_probe


@dataclass(frozen=True)
class StudentPlan:
    """What one student does in one optimizer step."""

    active: bool  # false during the teacher's head start
    temperature: float
    spec: SoftSpec  # divergence, β, α (the schedule's × the benefit gate's openness × any lr decay), gating
    openness: Optional[float] = None  # the benefit gate's factor on α at this step (None: gate off)
    measure: bool = False  # the benefit gate measures at this step (first micro-batch)
    lr: float = 0.0  # the student's learning rate at this step


def _add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


class Trainer:
    """Builds every component from a validated config; :meth:`fit` runs the loop."""

    def __init__(self, cfg: RunConfig, debug: bool = False):
        if not debug:
            quiet_library_noise()
        self.cfg, self.debug = cfg, debug
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        # Everything that can be wrong with the input is checked before any process group
        # or engine exists, so a typo costs seconds and leaves nothing behind.
        specs, hf_configs, ds_configs = self._check_inputs()
        try:
            self.world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
            fingerprint = self._load_data()
            self.cache = self._open_cache(fingerprint)
            self._build_engines(specs, hf_configs, ds_configs)
            self._init_state()
            if self.resume_from is not None:
                self._load(self.resume_from)
        except BaseException:
            self._release()  # the output_dir is free again for a corrected run
            raise

    # ------------------------------------------------------------------ set-up phases

    def _check_inputs(self) -> tuple[list, dict, dict]:
        """Data source, tokenizer, every model against it, DeepSpeed configs, the checkpoint to
        resume from: all before any process group exists."""
        cfg = self.cfg
        check_data_source(cfg.data)
        self.tokenizer = run_tokenizer(cfg)
        self.vocab = len(self.tokenizer)
        self.tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
        for i, student in enumerate(cfg.students):
            d = cfg.distill_for(i)
            if cfg.mode != "hard" and d.targets == "topk" and d.top_k >= self.vocab:
                raise ConfigError(f"{student.name}: distill.top_k={d.top_k} is not below the vocabulary's "
                                  f"{self.vocab:,} tokens; top-k targets keep k < V (targets: full keeps them all)")
        specs = loaded_models(cfg)
        hf_configs = {s.name: model_config(s, self.tokenizer) for s in specs}
        for spec in specs:
            check_model(spec, hf_configs[spec.name], self.tokenizer, self.tokenizer_fp, cfg.data.seq_len)
        if cfg.teacher.cache:
            TeacherCache.check_ready(Path(cfg.teacher.cache).expanduser())
        world_size = distributed.env_world_size()
        ds_configs = deepspeed_configs(cfg, specs, world_size, on_cpu=not torch.cuda.is_available())
        for spec in specs:
            check_attention(spec, hf_configs[spec.name], half_precision(ds_configs[spec.name]))
        self._fused_refusal = static_problem(cfg.mode, bool(cfg.teacher.cache))
        if cfg.distill.fused_linear is True and self._fused_refusal:
            raise ConfigError(f"distill.fused_linear=true: {self._fused_refusal}; set it to auto or false")
        written = self.output_dir / "config.yaml"
        if written.exists() and not is_resolved_config(written):
            raise ConfigError(f"output_dir: {written} is not a config this program wrote, and the run would replace "
                              "it with its resolved config; move it or choose another output_dir")
        checkpoint.refuse_foreign_checkpoints(self.output_dir, cfg.overwrite, cfg.resume)
        self.resume_from = checkpoint.find_resume(self.output_dir, cfg.resume)
        # A checkpoint from another number of ranks is loaded through DeepSpeed's universal
        # format (ZeRO-partitioned optimizer states re-sliced for the new world).
        self.saved_world = checkpoint.read_state(self.resume_from)["world_size"] if self.resume_from else world_size
        if self.saved_world != world_size:
            for ds in ds_configs.values():
                if zero_stage(ds) > 0:
                    ds.setdefault("checkpoint", {})["load_universal"] = True
        # One run per output_dir: another would remove this one's staging folders, or it theirs.
        self._release = checkpoint.claim(self.output_dir) if distributed.env_rank() == 0 else (lambda: None)
        return specs, hf_configs, ds_configs

    def _load_data(self) -> str:
        """This rank's training stream and validation batches; returns the data's fingerprint."""
        cfg, world = self.cfg, self.world
        splits = build_splits(cfg.data, self.tokenizer, cfg.train.seed, cfg.probe_fraction())
        self.stream = BatchStream(splits.train, cfg.train.micro_batch_size, world.rank, world.size, cfg.train.seed)
        self.heldout = None if splits.probe is None else ProbeBatches(  # benefit_probe: heldout's documents
            splits.probe, cfg.train.micro_batch_size, world.rank, cfg.train.seed)
        self.val_batches = eval_batches(splits.validation, cfg.train.micro_batch_size, world.rank, world.size,
                                        cfg.train.eval_batches)
        if not self.val_batches:
            raise ConfigError(f"data: the validation split has fewer than {world.size} blocks; one per rank is needed")
        return splits.fingerprint

    def _open_cache(self, data_fingerprint: str) -> Optional[TeacherCache]:
        """The cached teacher of soft mode (its one temperature was checked with the config)."""
        cfg = self.cfg
        if not cfg.teacher.cache:
            return None
        return TeacherCache.open(Path(cfg.teacher.cache).expanduser(),
                                 {"tokenizer": self.tokenizer_fp, "data": data_fingerprint,
                                  "seq_len": cfg.data.seq_len},
                                 cfg.distill_for(0).temperature)

    def _build_engines(self, specs: list, hf_configs: dict, ds_configs: dict) -> None:
        cfg = self.cfg
        self.members: list[Member] = [
            build_engine(s, hf_configs[s.name], ds_configs[s.name], init_seed(cfg, s), is_trainable(cfg, s))
            for s in specs]
        self.teacher_name = cfg.teacher.name
        self.teacher: Optional[Member] = self.members[0] if cfg.teacher in specs else None
        self.students = self.members[1 if self.teacher is not None else 0:]
        self.trainable = [m for m in self.members if m.trainable]
        self.distill: list[DistillConfig] = [cfg.distill_for(i) for i in range(len(self.students))]
        self.fused = self._resolve_fused()

    def fused_problems(self) -> list[str]:
        """Why the fused-linear path would not serve this run exactly (empty: it would)."""
        if self._fused_refusal:
            return [self._fused_refusal]
        return [f"{m.name}: {why}" for m in self.members if (why := fused_head_problem(m, self.vocab))]

    def _resolve_fused(self) -> bool:
        """distill.fused_linear: false; true (refused where it would not be exact); auto: on where it is
        exact, the vocabulary is large enough for the logits to matter (FUSED_AUTO_VOCAB), no model is at
        ZeRO-3 (fused.auto_problem) and the memory estimate's step peak is lower with it."""
        setting = self.cfg.distill.fused_linear
        if setting is False or (setting == "auto" and (self._fused_refusal or self.vocab < FUSED_AUTO_VOCAB)):
            return False
        refusal = auto_problem([m.engine.zero_optimization_stage() for m in self.members])
        if setting == "auto" and refusal:  # before the heads' exactness probe: nothing to run for it
            log.info("fused-linear losses off: %s", refusal)
            return False
        problems = self.fused_problems()
        if problems and setting is True:
            raise ConfigError(f"distill.fused_linear=true: {'; '.join(problems)}; set it to auto or false")
        if problems:
            log.info("fused-linear losses off: %s", "; ".join(problems))
            return False
        if setting == "auto" and not fused_lowers_peak(self.cfg, self.world.size, self.world.device.type):
            log.info("fused-linear losses off: the memory estimate's step peak is not lower with them at this "
                     "micro-batch (their fp32 head gradients outweigh the logits they drop)")
            return False
        return True

    def _init_state(self) -> None:
        """What the loop keeps between steps (saved with a checkpoint) and this rank's RNGs."""
        cfg = self.cfg
        self.step = 0  # optimizer steps completed
        self.gap: list[Optional[float]] = [None] * len(self.students)  # running student CE − teacher CE
        self.benefit: list[Optional[BenefitState]] = [  # each student's benefit gate (None: off)
            BenefitState(d.benefit_init) if d.benefit_gate and cfg.mode != "hard" else None for d in self.distill]
        self.lr_peak: list[float] = [0.0] * len(self.students)  # each student's highest learning rate so far
        self.skipped = {m.name: 0 for m in self.members}  # updates skipped for a non-finite loss
        self.start_eval: dict[str, float] = {}  # validation losses at step 0, for the run's summary
        # Which run a checkpoint belongs to: resume=auto and pruning never touch another run's.
        self.run_id = self._shared_run_id()
        self._seed_rngs(cfg.train.seed + 1000 * self.world.rank)
        self.tokens_per_step = (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
                                * self.world.size * cfg.data.seq_len)
        self.metrics: Optional[Metrics] = None
        self._signal: Optional[int] = None
        self._deferred: Optional[list[Member]] = None  # optimizer steps waiting for the micro-step's end
        self._step_start: Optional[dict] = None  # this rank's cursor and RNGs when the current step began

    def _shared_run_id(self) -> str:
        """A fresh run's id, the same on every rank (rank 0 draws it)."""
        drawn = torch.tensor(list(uuid.uuid4().bytes[:8]), dtype=torch.uint8)
        torch.distributed.broadcast(drawn, src=0)
        return bytes(drawn.tolist()).hex()

    @staticmethod
    def _seed_rngs(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ the step

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of every model (``step`` is 0-based); returns rank-averaged metrics."""
        plans = self.plan(step)
        gas = self.cfg.train.gradient_accumulation_steps
        self._step_start = checkpoint.rank_state(self.stream.state_dict())  # what a stop saves of this rank
        sums: dict[str, float] = {}  # what ran, summed over micro-steps
        panels = {} if self._panels_due(step) else None  # diagnostics of the first micro-batch
        start = time.perf_counter()
        for micro in range(gas):
            batch = self.prepare_batch(next(self.stream))
            probes = self.probes(step, plans) if micro == 0 else None
            self.micro_step(batch, plans, sums, panels if micro == 0 else None, probes)
        elapsed = time.perf_counter() - start
        values = self._mean_over_ranks({**{k: v / gas for k, v in sums.items()}, **(panels or {})})
        values.update(self._update_gates(plans, values))
        values.update(self._engine_values(plans, step))
        values.update(self._schedule_values(plans))
        values.update(self._perf_values(elapsed))
        return values

    def probes(self, step: int, plans: list[StudentPlan]) -> Optional[Probes]:
        """The benefit gates' unseen batches at ``step``, by ``distill.benefit_probe`` (those that a measuring
        student reads): stream, the training stream's next micro-batch, which no model has seen yet
        (taken before the first micro-batch is trained on); heldout, one from the documents set aside."""
        sources = {self.distill[i].benefit_probe for i, p in enumerate(plans) if p.measure}
        if not sources:
            return None
        out = {}
        if "stream" in sources:
            out["stream"] = self.prepare_batch(self.stream.peek())
        if "heldout" in sources:
            out["heldout"] = self.prepare_batch(self.heldout.at(step))
        return out

    def plan(self, step: int) -> list[StudentPlan]:
        """What every student does at optimizer step ``step``: α, T and whether it trains."""
        plans = []
        for i, d in enumerate(self.distill):
            own = step - d.head_start_steps  # α's schedule counts the student's own steps
            if d.schedule == "adaptive":
                alpha = adaptive_alpha(own, d.alpha_max, d.burn_in_steps, self.gap[i], d.adaptive_gap)
            elif d.schedule == "warmup":
                alpha = alpha_at(own, d.alpha_max, d.burn_in_steps, d.warmup_steps, d.warmup)
            else:
                alpha = d.alpha_max if own >= d.burn_in_steps else 0.0
            openness, measure = None, False
            if self.benefit[i] is not None and own >= d.burn_in_steps:
                openness = self.benefit[i].openness
                alpha *= openness
                measure = (own - d.burn_in_steps) % d.benefit_interval == 0
            lr = float(self.students[i].engine.get_lr()[0])
            if d.alpha_decay == "lr":
                alpha *= lr_fraction(lr, max(self.lr_peak[i], lr))
            temperature = temperature_at(step, self.cfg.train.max_steps, d.temperature, d.temperature_final)
            spec = SoftSpec(divergence=d.divergence, beta=d.beta, alpha=alpha, token_gate=d.token_gate)
            plans.append(StudentPlan(active=step >= d.head_start_steps, temperature=temperature, spec=spec,
                                     openness=openness, measure=measure, lr=lr))
        return plans

    def micro_step(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan], sums: dict[str, float],
                   panels: Optional[dict[str, float]] = None, probes: Optional[Probes] = None) -> None:
        """One micro-batch: the teacher's targets (one forward, or the cache) feed every active student.
        With ``panels``, the distillation diagnostics of this micro-batch are written into it; with
        ``probes`` (unseen micro-batches by source, see :meth:`probes`), students whose plan says so measure their
        benefit gate."""
        # Every backward runs at once (freeing its activations); the optimizer steps wait until every
        # model's loss is known to be finite, so a stop leaves all models at the same step. The
        # students' targets were computed before the teacher's step either way: same numbers.
        self._deferred = []
        try:
            (self.fused_micro_step if self.fused else self.logits_micro_step)(batch, plans, sums, panels, probes)
            for member in self._deferred:  # none when the teacher's update was skipped
                member.engine.step()
        finally:
            self._deferred = None

    def logits_micro_step(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan], sums: dict[str, float],
                          panels: Optional[dict[str, float]] = None,
                          probes: Optional[Probes] = None) -> None:
        """:meth:`micro_step`'s losses from every model's logits; optimizer steps deferred."""
        out = self.teacher_targets(batch, plans, sums)
        if out is None:  # the teacher's update was skipped: no trustworthy targets
            return
        targets, teacher_logits = out
        del out
        if panels is None:  # with top-k targets this frees the full logits before the students run
            teacher_logits = None
        for i, plan in enumerate(plans):
            if plan.active:
                self.student_micro_step(i, batch, targets.get(i), plan, sums, panels, teacher_logits, probes)

    def fused_micro_step(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan], sums: dict[str, float],
                         panels: Optional[dict[str, float]] = None,
                         probes: Optional[Probes] = None) -> None:
        """:meth:`micro_step` from final hidden states (``distill.fused_linear``): every model's forward stops
        before its LM head, one chunked pass (codistill/fused.py) gives the teacher's CE and every student's
        blended loss with their gradients, then each model back-propagates its own loss (the students first).
        No model's [N x V] logits exist; the teacher's head does not change before every student has used it
        (the steps wait for the micro-step's end)."""
        active = [i for i, plan in enumerate(plans) if plan.active]
        if not active and not self.teacher.trainable:  # a frozen teacher with nobody to teach
            return
        labels, mask = batch["labels"], batch["mask"]
        with torch.set_grad_enabled(self.teacher.trainable):
            teacher_hidden = forward_hidden(self.teacher, batch)
        hidden = {i: forward_hidden(self.students[i], batch) for i in active}
        measuring = [i for i in active if plans[i].measure and probes is not None]
        stepped = []
        # ZeRO-3: every head whole from the pass to its model's backward (the forwards ran before). The students
        # back-propagate first: the teacher's backward, the step's largest, then runs without their activations,
        # handed-over gradients or gathered heads (the order of the backwards changes no number: each model's
        # gradients were computed in the pass, and the optimizer steps wait for the micro-step's end).
        with heads_gathered(self.teacher):
            with heads_gathered(*(self.students[i] for i in active)):
                teacher = Head(teacher_hidden, *lm_head(self.teacher))
                heads = {i: Head(hidden.pop(i), *lm_head(self.students[i])) for i in active}
                terms = [StudentTerm(heads[i], plans[i].spec, plans[i].temperature, self._top_k(i)) for i in active]
                with torch.set_grad_enabled(True):
                    teacher_parts, student_parts = fused_linear_losses(teacher, terms, labels, mask, self.vocab,
                                                                       self.cfg.distill.chunk_tokens)
                del terms
                # What the panels and the gate read of the teacher: its head as it is now (it steps last); a copy
                # under ZeRO-3, taken before its backward (a tied head is partitioned again by the embedding's
                # backward hook, gathered or not) and kept after this block.
                copy = (lambda t: t.detach().clone()) if self.teacher.engine.zero_optimization_stage() == 3 else \
                    (lambda t: t.detach())
                frozen_teacher = Head(teacher.hidden.detach(), copy(teacher.weight),
                                      None if teacher.bias is None else copy(teacher.bias)) \
                    if panels is not None or measuring else None
                if not self._finite(self.teacher, teacher_parts.loss):
                    return
                targets: dict[int, Targets] = {}
                shared: dict[tuple, Targets] = {}
                for i in (active if panels is not None else measuring):
                    key = (self._top_k(i), plans[i].temperature)
                    if key not in shared:
                        shared[key] = self._targets(self.distill[i], HeadLogits(frozen_teacher, self.vocab),
                                                    teacher_parts.token_ce, plans[i].temperature, teacher_parts.lse)
                    targets[i] = shared[key]
                for i, parts in zip(active, student_parts):
                    student = self.students[i]
                    if panels is not None:
                        self._panels(panels, i, HeadLogits(heads[i], self.vocab), batch, targets[i], plans[i],
                                     HeadLogits(frozen_teacher, self.vocab))
                    if not self._finite(student, parts.loss):
                        continue
                    student.engine.backward(parts.loss)
                    heads[i] = None  # its activations go with its graph
                    stepped.append((i, parts))
                del heads
            if self.teacher.trainable:
                self.teacher.engine.backward(teacher_parts.loss)
                self._step(self.teacher)
            ce = teacher_parts.ce.item()
            _add(sums, f"{self.teacher.name}/train/loss", ce)
            _add(sums, f"{self.teacher.name}/train/loss_ce", ce)
            del teacher
        for i, parts in stepped:
            if i in measuring:  # before the student's step, outside the block: the gate runs the student's forward
                self._measure_benefit(i, batch, targets[i], plans[i], probes, sums, frozen_teacher)
            self._step(self.students[i])
            self._add_student_sums(sums, i, parts, soft=True)

    def _top_k(self, index: int) -> Optional[int]:
        d = self.distill[index]
        return d.top_k if d.targets == "topk" else None

    def _panels(self, panels: dict[str, float], index: int, logits, batch: dict[str, torch.Tensor], targets: Targets,
                plan: StudentPlan, teacher_logits) -> None:
        """The distillation diagnostics of one student on this micro-batch, into ``panels``."""
        d = self.distill[index]
        stats = panel_stats(logits, batch["labels"], batch["mask"], targets, plan.spec, d.top_k, teacher_logits,
                            d.chunk_tokens)
        for key, value in stats.items():
            panels["distill/teacher_entropy" if key == "teacher_entropy" else self._tag("distill", key, index)] = value

    def _add_student_sums(self, sums: dict[str, float], index: int, parts, soft: bool) -> None:
        name = self.students[index].name
        _add(sums, f"{name}/train/loss", parts.loss.item())
        _add(sums, f"{name}/train/loss_ce", parts.ce.item())
        if soft:
            _add(sums, f"{name}/train/loss_kd", parts.kd.item())
            if self.distill[index].token_gate:
                _add(sums, f"{name}/train/gate_fraction", parts.gated.item())

    def teacher_targets(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan],
                        sums: dict[str, float]) -> Optional[tuple[dict[int, Targets], Optional[torch.Tensor]]]:
        """The one place that decides what the teacher does in a micro-step, and each active
        student's targets: none in hard mode (the teacher is in the data), the cached top-k, or
        the live teacher's (it steps first in co-distillation; a frozen one runs only while a
        student learns from it). Also returns the live teacher's full logits (None otherwise),
        or None altogether when the teacher's update was skipped."""
        active = [i for i, plan in enumerate(plans) if plan.active]
        if self.cfg.mode == "hard":
            return {}, None
        if self.cache is not None:
            cached = self.cache.targets(batch["index"], self.world.device)
            mask = batch["mask"].reshape(-1)
            teacher_ce = float((cached.token_ce * mask).sum() / mask.sum().clamp(min=1))
            _add(sums, f"{self.teacher_name}/train/loss", teacher_ce)
            _add(sums, f"{self.teacher_name}/train/loss_ce", teacher_ce)
            return {i: cached for i in active}, None
        if not active and not self.teacher.trainable:  # a frozen teacher with nobody to teach
            return {}, None
        teacher_out = self.teacher_micro_step(batch, sums)
        if teacher_out is None:
            return None
        teacher_logits, token_ce, lse = teacher_out
        targets, shared = {}, {}
        for i in active:
            d, temperature = self.distill[i], plans[i].temperature
            key = (d.targets, d.top_k if d.targets == "topk" else 0, temperature)
            if key not in shared:
                shared[key] = self._targets(d, teacher_logits, token_ce, temperature, lse)
            targets[i] = shared[key]
        return targets, teacher_logits  # with only top-k targets, the caller drops the full logits after use

    def teacher_micro_step(self, batch: dict[str, torch.Tensor],
                           sums: dict[str, float]) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Teacher: CE on the ground truth, backward, step. Returns its detached logits
        [B, S, V], its CE per position [N] (for per-token gating) and the logsumexp of its
        logits [N] (the students' loss reuses it); None if skipped."""
        with torch.set_grad_enabled(self.teacher.trainable):
            out = self._logits(self.teacher, batch)
            parts = distill_loss(out, batch["labels"], batch["mask"])
        if not self._finite(self.teacher, parts.loss):
            return None
        if self.teacher.trainable:
            self.teacher.engine.backward(parts.loss)
            self._step(self.teacher)
        _add(sums, f"{self.teacher.name}/train/loss", parts.ce.item())
        _add(sums, f"{self.teacher.name}/train/loss_ce", parts.ce.item())
        return out.detach(), parts.token_ce, parts.lse

    def student_micro_step(self, index: int, batch: dict[str, torch.Tensor], targets: Optional[Targets],
                           plan: StudentPlan, sums: dict[str, float], panels: Optional[dict[str, float]] = None,
                           teacher_logits: Optional[torch.Tensor] = None,
                           probes: Optional[Probes] = None) -> None:
        """Student: (1-α)·CE + α·T²·D(teacher ‖ student); with ``targets=None``, CE alone.
        With ``panels``, also the distillation diagnostics of this micro-batch (see panel_stats)."""
        student, d = self.students[index], self.distill[index]
        out = self._logits(student, batch)
        spec = plan.spec if targets is not None else SoftSpec()
        parts = distill_loss(out, batch["labels"], batch["mask"], targets, spec, d.chunk_tokens)
        if panels is not None and targets is not None:
            self._panels(panels, index, out, batch, targets, plan, teacher_logits)
        if not self._finite(student, parts.loss):
            return
        student.engine.backward(parts.loss)
        del out
        if plan.measure and probes is not None and targets is not None:  # before the student's step
            self._measure_benefit(index, batch, targets, plan, probes, sums)
        self._step(student)
        self._add_student_sums(sums, index, parts, soft=targets is not None)

    def _measure_benefit(self, index: int, batch: dict[str, torch.Tensor], targets: Targets, plan: StudentPlan,
                         probes: Probes, sums: dict[str, float],
                         teacher: Optional[Head] = None) -> None:
        """The benefit gate's measurement (see codistill/gate.py): the inner products of ∇CE and ∇(T²·D − CE)
        on the batch, the update at this step's α, and ∇CE on the unseen probe batch, on this rank, at the
        student's weights before its step. Forwards of the bare module: gradients of them do not go
        through DeepSpeed's reduction."""
        student, d = self.students[index], self.distill[index]
        labels, mask, probe = batch["labels"], batch["mask"], probes[d.benefit_probe]

        soft_spec = replace(plan.spec, alpha=1.0)  # the blended loss at α = 1: T²·D

        def losses(want_ce: bool, want_soft: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            """From one forward, the CE and/or T²·D asked for (ZeRO-3 asks for one per forward)."""
            chunk = self.cfg.distill.chunk_tokens
            if teacher is not None:  # fused: from the hidden states, against the teacher's unchanged head
                hidden = module_hidden(student, batch)
                with heads_gathered(student):
                    head = Head(hidden, *lm_head(student))
                    hard = fused_linear_losses(head, [], labels, mask, self.vocab, chunk)[0].loss if want_ce else None
                    term = StudentTerm(head, soft_spec, plan.temperature, self._top_k(index))
                    soft = fused_linear_losses(teacher, [term], labels, mask, self.vocab, chunk)[1][0].loss \
                        if want_soft else None
                return hard, soft
            out = module_logits(student, batch, self.vocab)
            hard = distill_loss(out, labels, mask, chunk_tokens=d.chunk_tokens).loss if want_ce else None
            soft = distill_loss(out, labels, mask, targets, soft_spec, d.chunk_tokens).loss if want_soft else None
            return hard, soft

        def probe_ce() -> torch.Tensor:
            if teacher is not None:
                hidden = module_hidden(student, probe)
                with heads_gathered(student):
                    return fused_linear_losses(Head(hidden, *lm_head(student)), [], probe["labels"], probe["mask"],
                                               self.vocab, self.cfg.distill.chunk_tokens)[0].loss
            return distill_loss(module_logits(student, probe, self.vocab), probe["labels"], probe["mask"],
                                chunk_tokens=d.chunk_tokens).loss

        summed = (lambda t: torch.distributed.all_reduce(t)) if self.world.size > 1 else None
        terms = hypergradient_terms(trainable_parameters(student.engine.module), plan.spec.alpha, losses, probe_ce,
                                    summed, separate=student.engine.zero_optimization_stage() == 3)
        for key, value in terms.items():
            _add(sums, f"{student.name}/benefit/{key}", value)

    def _targets(self, d: DistillConfig, teacher_logits: torch.Tensor, token_ce: torch.Tensor, temperature: float,
                 lse: Optional[torch.Tensor] = None) -> Targets:
        if d.targets == "topk":
            out = topk_targets(teacher_logits, d.top_k, temperature, d.chunk_tokens)
        else:
            out = Targets(temperature=temperature, logits=teacher_logits, lse=lse)
        out.token_ce = token_ce
        return out

    def _logits(self, member: Member, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_logits(member, batch, self.vocab)

    def _step(self, member: Member) -> None:
        """The optimizer step of ``member``: at the end of the micro-step inside :meth:`micro_step`,
        at once when a benchmark calls a model's micro-step by itself."""
        if self._deferred is None:
            member.engine.step()
        else:
            self._deferred.append(member)

    def _finite(self, member: Member, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank; if not, apply ``train.nonfinite``:
        ``stop`` raises, ``skip`` counts the skipped update and returns False."""
        flag = torch.tensor([0 if bool(torch.isfinite(loss)) else 1], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return True
        if self.cfg.train.nonfinite == "stop":
            raise NonFinite(f"non-finite loss of {member.name} at step {self.step + 1}")
        self.skipped[member.name] += 1
        return False

    def _panels_due(self, step: int) -> bool:
        interval = self.cfg.train.panel_interval
        return bool(interval) and (step + 1) % interval == 0

    def _update_gates(self, plans: list[StudentPlan], values: dict[str, float]) -> dict[str, float]:
        """Each training student's running gap to the teacher (the adaptive gate's signal), from
        the rank-averaged CEs (so identical on every rank), its peak learning rate and its benefit
        gate's evidence; returns what to log of them."""
        out = {}
        teacher_ce = values.get(f"{self.teacher_name}/train/loss_ce")
        for i, (student, plan, d) in enumerate(zip(self.students, plans, self.distill)):
            student_ce = values.get(f"{student.name}/train/loss_ce")
            if plan.active:
                self.lr_peak[i] = max(self.lr_peak[i], plan.lr)
            if plan.active and teacher_ce is not None and student_ce is not None:
                out[self._tag("distill", "teacher_minus_student_ce", i)] = teacher_ce - student_ce
                self.gap[i] = ema(self.gap[i], student_ce - teacher_ce, d.adaptive_ema)
            # The benefit gate's raw inner products are not logged; the signal they give is (the same on
            # every rank: they were averaged over ranks).
            raw = {key: values.pop(f"{student.name}/benefit/{key}", None) for key in TERMS + SUMMED}
            raw = {key: value for key, value in raw.items() if value is not None}
            if self.benefit[i] is not None and plan.active:
                lr = float(student.engine.get_lr()[0])
                self.benefit[i].lr_peak = max(self.benefit[i].lr_peak, lr)
            if set(TERMS) <= set(raw) and all(math.isfinite(v) for v in raw.values()):
                pull, length = signal_parts(raw, self.world.size,
                                            self.world.size * self.cfg.train.gradient_accumulation_steps)
                length *= length_weight(d.benefit_length, lr, self.benefit[i].lr_peak)
                signal = pull + length
                self.benefit[i] = update_benefit(self.benefit[i], signal, d.benefit_init, d.benefit_gain,
                                                 d.benefit_decay)
                out[self._tag("gate", "signal", i)] = signal
                out[self._tag("gate", "signal_pull", i)] = pull  # its two terms, for reading what moved it
                out[self._tag("gate", "signal_length", i)] = length
                out[self._tag("gate", "evidence", i)] = self.benefit[i].evidence
        return out

    def _engine_values(self, plans: list[StudentPlan], step: int) -> dict[str, float]:
        """Learning rate, gradient norm (a non-finite one stops the run) and skipped updates of
        every model that stepped."""
        out = {}
        for member, plan in zip([self.teacher, *self.students], [None, *plans]):
            if member is None or not member.trainable or (plan is not None and not plan.active):
                continue
            out[f"{member.name}/train/lr"] = float(member.engine.get_lr()[0])
            norm = member.engine.get_global_grad_norm()
            out[f"{member.name}/train/grad_norm"] = float(norm) if norm is not None else float("nan")
            if norm is not None and not math.isfinite(float(norm)):
                raise NonFinite(f"non-finite gradient norm of {member.name} at step {step + 1}; its update "
                                "is already applied, so the newest checkpoint holds the last good state", save=False)
            if self.cfg.train.nonfinite == "skip":
                out[f"{member.name}/train/skipped_steps"] = float(self.skipped[member.name])
        return out

    def _schedule_values(self, plans: list[StudentPlan]) -> dict[str, float]:
        out = {}
        for i, plan in enumerate(plans if self.cfg.mode != "hard" else []):
            out[self._tag("schedule", "alpha", i)] = plan.spec.alpha
            out[self._tag("schedule", "temperature", i)] = plan.temperature
            if self.gap[i] is not None:
                out[self._tag("schedule", "gap", i)] = self.gap[i]
            if plan.openness is not None and plan.active:  # the factor this step's α was given
                out[self._tag("gate", "openness", i)] = plan.openness
        return out

    def _perf_values(self, elapsed: float) -> dict[str, float]:
        slowest, peak = self._max_over_ranks(elapsed, float(peak_bytes()))
        # The largest rank's peak so far (GPU: allocated; CPU: RSS).
        return {"perf/tokens_per_sec": self.tokens_per_step / slowest, "perf/peak_memory_gb": peak / 2**30}

    def _tag(self, group: str, key: str, index: int) -> str:
        """``<group>/<key>`` with one student, ``<group>/<key>/<student>`` with several."""
        return f"{group}/{key}" if len(self.students) == 1 else f"{group}/{key}/{self.students[index].name}"

    def prepare_batch(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a micro-batch to this rank's device and add next-token labels and mask."""
        batch = {k: v.to(self.world.device, non_blocking=True) for k, v in raw.items()}
        batch["labels"], batch["mask"] = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                                            batch.get("loss_mask"))
        return batch

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)  # the same keys in the same order on every rank: what runs is decided collectively
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world.size for k, v in zip(keys, t.tolist())}

    def _max_over_ranks(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation CE of every model and each student's top-1 agreement with the teacher
        (a cached teacher has neither: it is not loaded)."""
        for m in self.members:
            m.engine.eval()
        keys = [f"{m.name}/eval/loss" for m in self.members]
        if self.teacher is not None:
            keys += [f"{s.name}/eval/agreement" for s in self.students]
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)  # the last entry counts tokens
        for raw in self.val_batches:
            batch = self.prepare_batch(raw)
            n = int(batch["mask"].sum())
            sums[-1] += n
            top1 = {}
            for i, m in enumerate(self.members):  # one model's logits (or none, fused) at a time
                ce, top1[m.name] = self._eval_model(m, batch)
                sums[i] += ce * n
            if self.teacher is not None:
                for j, student in enumerate(self.students):
                    sums[len(self.members) + j] += top1_agreement(top1[student.name], top1[self.teacher.name],
                                                                  batch["mask"])
        for m in self.trainable:
            m.engine.train()
        torch.distributed.all_reduce(sums)
        return {key: float(sums[i] / sums[-1]) for i, key in enumerate(keys)}

    def _eval_model(self, member: Member, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        """One model's CE on a validation batch and its most likely token per position [B, S]."""
        if not self.fused:
            logits = self._logits(member, batch)
            return distill_loss(logits, batch["labels"], batch["mask"]).ce.item(), logits.argmax(dim=-1)
        hidden = forward_hidden(member, batch)
        with heads_gathered(member):
            head = Head(hidden, *lm_head(member))
            ce = fused_linear_losses(head, [], batch["labels"], batch["mask"], self.vocab,
                                     self.cfg.distill.chunk_tokens)[0].ce.item()
            logits = HeadLogits(head, self.vocab).reshape(-1, self.vocab)
            rows = fused_rows(self.vocab, self.cfg.distill.chunk_tokens)
            top = torch.cat([logits[i:i + rows].argmax(dim=-1) for i in range(0, logits.shape[0], rows)])
        return ce, top.view(batch["mask"].shape)

    # ------------------------------------------------------------------ what the run shows

    def describe(self) -> list[str]:
        """One line per model: size, ZeRO stage, precision and what each rank stores; per student, when and how
        it distils."""
        lines = []
        for m in self.members:
            module = m.engine.module
            local = torch.tensor([local_parameters(module)], dtype=torch.int64)
            gathered = [torch.zeros_like(local) for _ in range(self.world.size)]
            torch.distributed.all_gather(gathered, local)
            stored = " ".join(f"{int(t):,}" for t in gathered)
            recomputed = m.trainable and m.spec.gradient_checkpointing
            lines.append(
                f"{m.name}: {count_parameters(module):,} parameters, ZeRO stage {m.engine.zero_optimization_stage()}, "
                f"bf16={m.engine.bfloat16_enabled()}{'' if m.trainable else ', frozen'}, "
                f"{m.spec.attn_implementation} attention{', checkpointed' if recomputed else ''}; stored per rank: {stored}"
            )
        if self.cfg.mode == "hard":
            lines.append(f"{self.teacher_name}: not loaded; hard mode trains on the text it generated (CE on "
                         "response tokens)")
            return lines
        if self.cache is not None:
            meta = self.cache.meta
            lines.append(f"{self.teacher_name}: not loaded; top-{meta['k']} predictions at T={meta['temperature']} "
                         f"from the cache {self.cache.folder} ({meta.get('bytes_per_token', 0):.1f} bytes/token)")
            return lines
        for student, d in zip(self.students, self.distill):
            start, steps = d.head_start_steps + d.burn_in_steps, self.cfg.train.max_steps
            if start >= steps or d.alpha_max == 0:
                lines.append(f"{student.name}: never distils (alpha_max {d.alpha_max}, head start "
                             f"{d.head_start_steps} + burn-in {d.burn_in_steps} of {steps} steps): CE alone")
                continue
            gate = "no benefit gate"
            if d.benefit_gate:  # (only then are held-out documents set aside)
                noise = "x lr / peak lr" if d.benefit_length == "lr" else "unweighted"
                source = (f"held-out probe: {len(self.heldout.dataset)} blocks of training documents set aside"
                          if d.benefit_probe == "heldout" else "probe: the stream's next micro-batch")
                gate = f"benefit gate every {d.benefit_interval} steps ({source}; noise term {noise})"
            lines.append(f"{student.name}: distils from step {start} of {steps} (head start {d.head_start_steps}, "
                         f"burn-in {d.burn_in_steps}); {d.schedule} alpha up to {d.alpha_max}, T={d.temperature}, "
                         f"{d.divergence}, {gate}")
        positions = self.cfg.train.micro_batch_size * self.cfg.data.seq_len
        if self.fused:
            rows = min(positions, fused_rows(self.vocab, self.cfg.distill.chunk_tokens))
            lines.append(f"fused-linear losses: no model's logits; {rows:,} of the {positions:,} positions of a "
                         f"micro-batch per chunk of the pass over every head")
            return lines
        logit_bytes = 2 if (self.teacher.engine.bfloat16_enabled() or self.teacher.engine.fp16_enabled()) else 4
        for student, d in zip(self.students, self.distill):
            if d.targets == "topk":
                k = min(d.top_k, self.vocab)
                kept, full = positions * topk_bytes_per_position(k), positions * self.vocab * logit_bytes
                lines.append(f"{student.name}: top-{k} targets hold {kept / 2**20:.2f} MB per micro-batch instead of "
                             f"{full / 2**20:.2f} MB of full teacher logits ({full / kept:.1f}x less)")
        return lines

    def scalars_layout(self) -> dict[str, dict[str, list]]:
        """TensorBoard's custom-scalars layout: what a user compares, on one chart each."""
        exact = lambda tags: [f"^{re.escape(t)}$" for t in tags]  # noqa: E731  (the plugin takes regexes)
        charts = {"validation loss, every model": ["Multiline", exact(f"{m.name}/eval/loss" for m in self.members)],
                  "training loss, every model": ["Multiline", exact(
                      f"{n}/train/loss" for n in [self.teacher_name, *(s.name for s in self.students)])]}
        if self.cfg.mode != "hard":
            for i, student in enumerate(self.students):
                charts[f"{student.name}: alpha, its gate signal (gap) and teacher - student CE"] = ["Multiline", exact([
                    self._tag("schedule", "alpha", i), self._tag("schedule", "gap", i),
                    self._tag("distill", "teacher_minus_student_ce", i)])]
                if self.benefit[i] is not None:
                    charts[f"{student.name}: benefit gate (openness, signal, evidence) and alpha"] = [
                        "Multiline", exact([self._tag("gate", key, i) for key in ("openness", "signal", "evidence")]
                                           + [self._tag("schedule", "alpha", i)])]
        return {"codistill": charts}

    # ------------------------------------------------------------------ checkpoints

    def save(self, rank_state: Optional[dict] = None) -> Path:
        """A complete checkpoint of every engine, the schedules, the data cursor and RNGs
        (``rank_state``: this rank's cursor and RNGs to save instead of the current ones)."""
        state = {"world_size": self.world.size, "models": [m.name for m in self.trainable],
                 "schedule": {"gap_ema": {s.name: g for s, g in zip(self.students, self.gap)},
                              "benefit": {s.name: b.to_dict() for s, b in zip(self.students, self.benefit)
                                          if b is not None},
                              "lr_peak": {s.name: p for s, p in zip(self.students, self.lr_peak)}},
                 "start_eval": self.start_eval, "run_id": self.run_id,
                 "config": self.cfg.model_dump(mode="json")}
        return checkpoint.save(self.output_dir, self.step, [(m.name, m.engine) for m in self.trainable], state,
                               rank_state or checkpoint.rank_state(self.stream.state_dict()), self.world.rank,
                               self.cfg.checkpoint.keep_last, self._write_extra)

    def _write_extra(self, folder: Path) -> None:
        """What an export needs beside the weights: each model's config and the tokenizer."""
        for m in self.trainable:
            m.engine.module.config.save_pretrained(str(folder / "hf" / m.name))
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))

    def _load(self, path: Path) -> None:
        state = checkpoint.read_state(path)
        rescaled = self.saved_world != self.world.size
        if rescaled and self.world.is_main:
            log.warning("resuming a %d-rank checkpoint on %d rank(s) through DeepSpeed's universal checkpoint",
                        self.saved_world, self.world.size)
        for m in self.trainable:
            folder, tag = path / m.name, checkpoint.TAG
            if m.engine.load_universal_checkpoint():
                folder, tag = checkpoint.universal(path, m.name, self.world.is_main), checkpoint.UNIVERSAL_TAG
            with checkpoint.data_only_loads():  # a checkpoint is data: nothing in it may run code
                loaded, _ = m.engine.load_checkpoint(str(folder), tag=tag)
            if loaded is None:
                raise ConfigError(f"resume: {folder} holds no checkpoint of model '{m.name}'")
        self.step = int(state["step"])
        gaps = state["schedule"]["gap_ema"]
        self.gap = [gaps.get(s.name) for s in self.students]
        peaks = state["schedule"].get("lr_peak", {})  # absent in checkpoints of earlier releases
        self.lr_peak = [float(peaks.get(s.name, 0.0)) for s in self.students]
        gates = state["schedule"].get("benefit", {})  # absent in checkpoints of earlier releases
        self.benefit = [BenefitState.from_dict(gates[s.name]) if b is not None and s.name in gates else b
                        for s, b in zip(self.students, self.benefit)]
        self.start_eval = state.get("start_eval", {})  # absent in checkpoints of earlier releases
        self.run_id = state.get("run_id", checkpoint.LEGACY_RUN)  # a resumed run continues the same run
        cursor = checkpoint.restore_rank_state(path, min(self.world.rank, self.saved_world - 1))
        if rescaled:
            cursor = checkpoint.rescale_cursor(cursor, self.cfg.train.micro_batch_size, self.saved_world,
                                               self.world.size, warn=self.world.is_main)
        self.stream.load_state_dict(cursor)
        changed = _changed_keys(state["config"], self.cfg.model_dump(mode="json"))
        if changed and self.world.is_main:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank once any rank was asked to stop (SIGTERM/SIGINT)."""
        flag = torch.tensor([0 if self._signal is None else 1], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train up to ``train.max_steps`` optimizer steps (from a resumed step, if any);
        returns the last evaluation. SIGTERM/SIGINT finish the step, save and return."""
        cfg, metrics = self.cfg, self._start_run()
        first, saved_at, stop = self.step, None, None
        final: dict[str, float] = {}
        if self.step == 0:
            final = self.start_eval = self._evaluate_and_log()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        started = time.perf_counter()
        try:
            while self.step < cfg.train.max_steps and stop is None:
                values = self.train_step(self.step)
                self.step += 1
                last = self.step == cfg.train.max_steps
                metrics.advance(self.step, values, line=self.step % cfg.train.log_interval == 0 or last)
                if self.step % cfg.train.eval_interval == 0 or last:
                    final = self._evaluate_and_log()
                stop = self._stop_reason(first)
                if self._save_due(stop, saved_at):
                    metrics.message(f"saved checkpoint {self.save()}")
                    saved_at = self.step
            if self._save_due(stop, saved_at):  # resumed at max_steps: nothing ran, still leave a checkpoint
                metrics.message(f"saved checkpoint {self.save()}")
                saved_at = self.step
            if stop is not None and self.step < cfg.train.max_steps:
                metrics.message(f"stopping at step {self.step} ({stop}); continue with resume=auto")
            else:
                for line in summary_lines(final, self.start_eval, self.teacher_name, [s.name for s in self.students],
                                          time.perf_counter() - started, (self.step - first) * self.tokens_per_step,
                                          checkpoint.step_dir(self.output_dir, saved_at), self.output_dir):
                    metrics.message(line)
        except NonFinite as exc:
            if exc.save:  # no model stepped in the failed step: save them with the data cursor before it
                saved = self.save(rank_state=self._step_start)
                exc.args = (f"{exc}; saved the last good state to {saved} (train.nonfinite=stop)",)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            metrics.close()
            self._release()
        return final

    def _start_run(self) -> Metrics:
        """The output folder (rank 0), TensorBoard and the run's opening lines."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.output_dir / "config.yaml", dump_config(cfg))
            for partial in checkpoint.remove_partial(self.output_dir):
                log.warning("removed %s, left by a save that did not finish", partial)
        torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)
        metrics = self.metrics = Metrics(self.output_dir, world.is_main, cfg.train.max_steps, start_step=self.step,
                                         layout=self.scalars_layout())
        lines = [f"world: {world.size} rank(s) on {world.device.type} ({world.how}); "
                 f"{self.tokens_per_step:,} tokens per step", *self.describe()]
        if self.resume_from is not None:
            lines.append(f"resumed from {self.resume_from} at step {self.step}")
        for line in lines:
            metrics.message(line)
        return metrics

    def _evaluate_and_log(self) -> dict[str, float]:
        values = self.evaluate()
        self.metrics.scalars(self.step, values)
        self.metrics.message(("step 0: " if self.step == 0 else f"eval at step {self.step}: ") + format_values(values))
        return values

    def _stop_reason(self, first: int) -> Optional[str]:
        """Why to stop before max_steps (collective: every rank agrees), or None."""
        if self._stop_requested():
            return f"signal {signal.Signals(self._signal).name}" if self._signal else "signal on another rank"
        if self.step - first == self.cfg.train.steps_this_run:
            return "train.steps_this_run"
        return None

    def _save_due(self, stop: Optional[str], saved_at: Optional[int]) -> bool:
        """When to checkpoint: every checkpoint.interval steps, at the last step and when asked to
        stop; never twice at one step."""
        interval = self.cfg.checkpoint.interval
        return saved_at != self.step and (stop is not None or self.step >= self.cfg.train.max_steps
                                          or bool(interval and self.step % interval == 0))


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (ignoring where the run writes and how it resumes)."""
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted in ("output_dir", "resume", "overwrite", "train.steps_this_run"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, dotted + ".")
        elif a != b:
            out.append(dotted)
    return out
