"""The co-distillation trainer: one DeepSpeed engine per model, all on the world group.

Per micro-batch every model sees the identical batch. The teacher's forward runs
once: its cross-entropy on the ground truth trains it, and its detached logits are
the soft targets of every student.
"""
from __future__ import annotations

import logging
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .cache import TeacherCache
from .config import ConfigError, DistillConfig, ModelSpec, RunConfig, TrainConfig, dump_config, load_deepspeed_config
from .data import BatchStream, build_splits, check_data_source, eval_batches, resolve_tokenizer, tokenizer_fingerprint
from .losses import SoftSpec, Targets, distill_loss, next_token_targets, panel_stats, top1_agreement, topk_targets
from .memory import peak_bytes
from .metrics import Metrics, format_values
from .models import build_model, check_model, count_parameters, local_parameters, model_config, pretrained_tokenizer_dir
from .schedules import adaptive_alpha, alpha_at, ema, temperature_at

log = logging.getLogger("codistill")

_ADAM = {"adam", "adamw"}


def quiet_library_noise() -> None:
    """torch 2.13 warns ~70 times per ZeRO step about deprecated collectives; DeepSpeed
    prints its whole config per engine. Neither helps a user reading the run's log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._(all_gather_base|reduce_scatter_base).*")
    from deepspeed.utils import logger as ds_logger
    from transformers.utils import logging as hf_logging

    ds_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()


def resolve_deepspeed_config(spec: ModelSpec, train: TrainConfig, world_size: int, on_cpu: bool,
                             trainable: bool = True, steps: Optional[int] = None) -> dict[str, Any]:
    """The model's DeepSpeed JSON with the shared batch geometry filled in and checked.
    A frozen model's optimizer and scheduler sections are dropped (it never steps).
    ``steps``: the optimizer steps this model takes (default train.max_steps; a student
    with a head start takes fewer), which a scheduler's ``total_num_steps: auto`` becomes."""
    ds = load_deepspeed_config(spec)
    if not trainable:
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        zero = ds.get("zero_optimization") or {}
        if zero.get("stage", 0) in (1, 2):  # they shard optimizer states and gradients: it has none
            ds["zero_optimization"] = {**zero, "stage": 0}
    shared = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", train.micro_batch_size),
        "gradient_accumulation_steps": ("train.gradient_accumulation_steps", train.gradient_accumulation_steps),
        "train_batch_size": ("micro_batch_size x accumulation x world size",
                             train.micro_batch_size * train.gradient_accumulation_steps * world_size),
    }
    for key, (ours_name, ours) in shared.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != ours:
            raise ConfigError(
                f"{spec.name}.deepspeed.{key}={given} disagrees with {ours_name}={ours}; the batch "
                "geometry is shared by all models and set in the train section"
            )
        ds[key] = ours
    optimizer = ds.get("optimizer")
    if not trainable:
        ds.setdefault("steps_per_print", 10**9)
        return ds
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        raise ConfigError(f"{spec.name}.deepspeed.optimizer: a trainable model needs an optimizer section with a type")
    if on_cpu and optimizer["type"].lower() in _ADAM:
        # DeepSpeed's FusedAdam is a ~65 s JIT compile and CPU-only anyway slower than torch's.
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    scheduler_params = (ds.get("scheduler") or {}).get("params", {})
    if scheduler_params.get("total_num_steps") == "auto":
        scheduler_params["total_num_steps"] = max(1, steps if steps is not None else train.max_steps)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def optimizer_steps(cfg: RunConfig) -> dict[str, int]:
    """How many optimizer steps each model takes: train.max_steps, less a student's head start."""
    steps = {cfg.teacher.name: cfg.train.max_steps}
    for i, s in enumerate(cfg.students):
        head_start = cfg.distill_for(i).head_start_steps
        if head_start >= cfg.train.max_steps:
            raise ConfigError(f"{s.name}: distill.head_start_steps={head_start} leaves no steps of "
                              f"train.max_steps={cfg.train.max_steps} for the student")
        steps[s.name] = cfg.train.max_steps - head_start
    return steps


class NonFinite(RuntimeError):
    """A NaN/inf loss or gradient with ``train.nonfinite=stop`` (or a gradient, which cannot be skipped)."""

    def __init__(self, message: str, save: bool = True):
        super().__init__(message)
        self.save = save  # whether the in-memory state is still good enough to checkpoint


@dataclass(frozen=True)
class StudentPlan:
    """What one student does in one optimizer step."""

    active: bool  # false during the teacher's head start
    temperature: float
    spec: SoftSpec  # divergence, β, α, gating


@dataclass
class Member:
    """One model of the run and its engine."""

    spec: ModelSpec
    engine: Any  # deepspeed.DeepSpeedEngine
    trainable: bool = True  # False for the frozen teacher of soft mode

    @property
    def name(self) -> str:
        return self.spec.name


class Trainer:
    """Builds every component from a validated config; :meth:`fit` runs the loop."""

    def __init__(self, cfg: RunConfig, debug: bool = False):
        if not debug:
            quiet_library_noise()
        import deepspeed

        self.cfg = cfg
        self.debug = debug
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()

        # Everything that can be wrong with the input is checked before any process group
        # or engine exists, so a typo costs seconds and leaves nothing behind.
        check_data_source(cfg.data)
        fallback = pretrained_tokenizer_dir(cfg.teacher)
        self.tokenizer = resolve_tokenizer(cfg.data, str(fallback) if fallback else None)
        self.vocab = len(self.tokenizer)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        # With a cached teacher (soft mode) the teacher model is never loaded.
        built = [s for s in cfg.models if not (s is cfg.teacher and (s.cache or cfg.mode == "hard"))]
        hf_configs = {s.name: model_config(s, self.tokenizer) for s in built}
        for spec in built:
            check_model(spec, hf_configs[spec.name], self.tokenizer, fingerprint, cfg.data.seq_len)
        on_cpu = not torch.cuda.is_available()
        world_size = distributed.env_world_size()
        steps = optimizer_steps(cfg)
        ds_configs = {s.name: resolve_deepspeed_config(s, cfg.train, world_size, on_cpu,
                                                       trainable=not (s is cfg.teacher and cfg.mode == "soft"),
                                                       steps=steps[s.name])
                      for s in built}
        checkpoint.refuse_foreign_checkpoints(self.output_dir, cfg.overwrite, cfg.resume)
        self.resume_from = checkpoint.find_resume(self.output_dir, cfg.resume)
        # A checkpoint from another number of ranks is loaded through DeepSpeed's universal
        # format (ZeRO-partitioned optimizer states re-sliced for the new world).
        self.saved_world = checkpoint.read_state(self.resume_from)["world_size"] if self.resume_from else world_size
        if self.saved_world != world_size:
            for ds in ds_configs.values():
                if ds.get("zero_optimization", {}).get("stage", 0) > 0:
                    ds.setdefault("checkpoint", {})["load_universal"] = True

        self.world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
        splits = build_splits(cfg.data, self.tokenizer, cfg.train.seed)
        self.stream = BatchStream(splits.train, cfg.train.micro_batch_size, self.world.rank, self.world.size, cfg.train.seed)
        self.val_batches = eval_batches(splits.validation, cfg.train.micro_batch_size, self.world.rank,
                                        self.world.size, cfg.train.eval_batches)
        if not self.val_batches:
            raise ConfigError(
                f"data: the validation split has fewer than {self.world.size} blocks; one per rank is needed"
            )
        self.cache: Optional[TeacherCache] = None
        if cfg.teacher.cache:
            temperatures = {cfg.distill_for(i).temperature for i in range(len(cfg.students))}
            if len(temperatures) != 1 or any(cfg.distill_for(i).temperature_final for i in range(len(cfg.students))):
                raise ConfigError("teacher.cache holds probabilities at one temperature: every student needs the "
                                  "same constant distill.temperature")
            self.cache = TeacherCache.open(
                Path(cfg.teacher.cache).expanduser(),
                {"tokenizer": fingerprint, "data": splits.fingerprint, "seq_len": cfg.data.seq_len},
                temperatures.pop())

        self.members: list[Member] = []
        for i, spec in enumerate(built):
            seed = spec.init_seed if spec.init_seed is not None else cfg.train.seed + cfg.models.index(spec)
            model = build_model(spec, hf_configs[spec.name], seed=seed)
            if spec is cfg.teacher and cfg.mode == "soft":  # frozen: an inference-only engine
                engine, *_ = deepspeed.initialize(model=model.requires_grad_(False).eval(), config=ds_configs[spec.name])
                self.members.append(Member(spec, engine, trainable=False))
                continue
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=ds_configs[spec.name],
            )
            self.members.append(Member(spec, engine))
        self.teacher_name = cfg.teacher.name
        loaded = cfg.teacher in built
        self.teacher: Optional[Member] = self.members[0] if loaded else None
        self.students = self.members[1 if loaded else 0:]
        self.trainable = [m for m in self.members if m.trainable]
        self.distill = [cfg.distill_for(i) for i in range(len(self.students))]
        self.gap: list[Optional[float]] = [None] * len(self.students)  # running student CE − teacher CE
        self.skipped = {m.name: 0 for m in self.members}  # updates skipped for a non-finite loss
        self._seed_rngs(cfg.train.seed + 1000 * self.world.rank)
        self.tokens_per_step = (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
                                * self.world.size * cfg.data.seq_len)
        self.metrics: Optional[Metrics] = None
        self.step = 0  # optimizer steps completed
        self._signal: Optional[int] = None
        if self.resume_from is not None:
            self._load(self.resume_from)

    @staticmethod
    def _seed_rngs(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ the step

    def _logits(self, member: Member, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S, V] logits over the tokenizer's real vocabulary (embedding padding sliced away)."""
        out = member.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[..., : self.vocab]

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

    def teacher_micro_step(self, batch: dict[str, torch.Tensor],
                           sums: dict[str, float]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Teacher: CE on the ground truth, backward, step. Returns its detached logits
        [B, S, V], its CE per position [N] (for per-token gating) and the logsumexp of its
        logits [N] (the students' loss reuses it); None if skipped."""
        with torch.set_grad_enabled(self.teacher.trainable):
            logits = self._logits(self.teacher, batch)
            parts = distill_loss(logits, batch["labels"], batch["mask"])
        if not self._finite(self.teacher, parts.loss):
            return None
        if self.teacher.trainable:
            self.teacher.engine.backward(parts.loss)
            self.teacher.engine.step()
        sums[f"{self.teacher.name}/train/loss"] += parts.ce.item()
        sums[f"{self.teacher.name}/train/loss_ce"] += parts.ce.item()
        return logits.detach(), parts.token_ce, parts.lse

    def student_micro_step(self, index: int, batch: dict[str, torch.Tensor], targets: Optional[Targets],
                           plan: StudentPlan, sums: dict[str, float], panels: Optional[dict[str, float]] = None,
                           teacher_logits: Optional[torch.Tensor] = None) -> None:
        """Student: (1-α)·CE + α·T²·D(teacher ‖ student); with ``targets=None``, CE alone.
        With ``panels``, also the distillation diagnostics of this micro-batch (see panel_stats)."""
        student, d = self.students[index], self.distill[index]
        logits = self._logits(student, batch)
        spec = plan.spec if targets is not None else SoftSpec()
        parts = distill_loss(logits, batch["labels"], batch["mask"], targets, spec, d.chunk_tokens)
        if panels is not None and targets is not None:
            stats = panel_stats(logits, batch["labels"], batch["mask"], targets, spec, d.top_k, teacher_logits,
                                d.chunk_tokens)
            for key, value in stats.items():
                if key == "teacher_entropy":
                    panels["distill/teacher_entropy"] = value
                else:
                    panels[self._tag("distill", key, index)] = value
        if not self._finite(student, parts.loss):
            return
        student.engine.backward(parts.loss)
        student.engine.step()
        sums[f"{student.name}/train/loss"] += parts.loss.item()
        sums[f"{student.name}/train/loss_ce"] += parts.ce.item()
        if targets is not None:
            sums[f"{student.name}/train/loss_kd"] += parts.kd.item()
            if d.token_gate:
                sums[f"{student.name}/train/gate_fraction"] += parts.gated.item()

    def _targets(self, d: DistillConfig, logits: torch.Tensor, token_ce: torch.Tensor, temperature: float,
                 lse: Optional[torch.Tensor] = None) -> Targets:
        if d.targets == "topk":
            out = topk_targets(logits, d.top_k, temperature, d.chunk_tokens)
        else:
            out = Targets(temperature=temperature, logits=logits, lse=lse)
        out.token_ce = token_ce
        return out

    def micro_step(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan], sums: dict[str, float],
                   panels: Optional[dict[str, float]] = None) -> None:
        """One micro-batch: the teacher's targets (one forward, or the cache) feed every active student.
        With ``panels``, the distillation diagnostics of this micro-batch are written into it."""
        out = self._teacher_targets(batch, plans, sums)
        if out is None:  # the teacher's update was skipped: no trustworthy targets
            return
        targets, teacher_logits = out
        del out
        if panels is None:  # with top-k targets this frees the full logits before the students run
            teacher_logits = None
        for i, plan in enumerate(plans):
            if plan.active:
                self.student_micro_step(i, batch, targets.get(i), plan, sums, panels, teacher_logits)

    def _teacher_targets(self, batch: dict[str, torch.Tensor], plans: list[StudentPlan],
                         sums: dict[str, float]) -> Optional[tuple[dict[int, Targets], Optional[torch.Tensor]]]:
        """Each active student's targets: none in hard mode (the teacher is in the data), the
        cached top-k, or the live teacher's (it steps first in co-distillation); and the live
        teacher's full logits (None from a cache)."""
        active = [i for i, plan in enumerate(plans) if plan.active]
        if self.cfg.mode == "hard":
            return {}, None
        if self.cache is not None:
            cached = self.cache.targets(batch["index"], self.world.device)
            mask = batch["mask"].reshape(-1)
            teacher_ce = float((cached.token_ce * mask).sum() / mask.sum().clamp(min=1))
            sums[f"{self.teacher_name}/train/loss"] += teacher_ce
            sums[f"{self.teacher_name}/train/loss_ce"] += teacher_ce
            return {i: cached for i in active}, None
        if not active and not self.teacher.trainable:  # a frozen teacher with nobody to teach
            return {}, None
        teacher_out = self.teacher_micro_step(batch, sums)
        if teacher_out is None:
            return None
        logits, token_ce, lse = teacher_out
        targets, shared = {}, {}
        for i in active:
            d, temperature = self.distill[i], plans[i].temperature
            key = (d.targets, d.top_k if d.targets == "topk" else 0, temperature)
            if key not in shared:
                shared[key] = self._targets(d, logits, token_ce, temperature, lse)
            targets[i] = shared[key]
        return targets, logits  # with only top-k targets, the caller drops the full logits after use

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
            temperature = temperature_at(step, self.cfg.train.max_steps, d.temperature, d.temperature_final)
            spec = SoftSpec(divergence=d.divergence, beta=d.beta, alpha=alpha, token_gate=d.token_gate)
            plans.append(StudentPlan(active=step >= d.head_start_steps, temperature=temperature, spec=spec))
        return plans

    def _tag(self, group: str, key: str, index: int) -> str:
        """``<group>/<key>`` with one student, ``<group>/<key>/<student>`` with several."""
        return f"{group}/{key}" if len(self.students) == 1 else f"{group}/{key}/{self.students[index].name}"

    def _schedule_tag(self, key: str, index: int) -> str:
        return self._tag("schedule", key, index)

    def prepare_batch(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a micro-batch to this rank's device and add next-token labels and mask."""
        batch = {k: v.to(self.world.device, non_blocking=True) for k, v in raw.items()}
        batch["labels"], batch["mask"] = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                                            batch.get("loss_mask"))
        return batch

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of every model (``step`` is 0-based); returns rank-averaged metrics."""
        plans = self.plan(step)
        gas = self.cfg.train.gradient_accumulation_steps
        sums: dict[str, float] = {}
        # A frozen teacher runs only while a student learns from it (not during a head start).
        teacher_runs = self.cfg.mode != "hard" and (self.teacher is None or self.teacher.trainable
                                                     or any(p.active for p in plans))
        logged = ([self.teacher_name] if teacher_runs else []) + [s.name for s in self.students]
        for name in logged:
            sums[f"{name}/train/loss"] = sums[f"{name}/train/loss_ce"] = 0.0
        for student, plan, d in zip(self.students, plans, self.distill):
            if self.cfg.mode != "hard":
                sums[f"{student.name}/train/loss_kd"] = 0.0
            if d.token_gate:
                sums[f"{student.name}/train/gate_fraction"] = 0.0
            if not plan.active:  # head start: the teacher trains alone
                for part in ("loss", "loss_ce", "loss_kd", "gate_fraction"):
                    sums.pop(f"{student.name}/train/{part}", None)
        skipped_before = dict(self.skipped)
        interval = self.cfg.train.panel_interval
        panels: Optional[dict[str, float]] = {} if interval and (step + 1) % interval == 0 else None
        start = time.perf_counter()
        for micro in range(gas):  # the diagnostics look at the first micro-batch of the step
            self.micro_step(self.prepare_batch(next(self.stream)), plans, sums, panels if micro == 0 else None)
        elapsed = time.perf_counter() - start
        for name, count in self.skipped.items():
            if count != skipped_before[name]:  # this model did not update: log no loss for it
                for part in ("loss", "loss_ce", "loss_kd", "gate_fraction"):
                    sums.pop(f"{name}/train/{part}", None)
        values = self._mean_over_ranks({**{k: v / gas for k, v in sums.items()}, **(panels or {})})
        teacher_ce = values.get(f"{self.teacher_name}/train/loss_ce")
        for i, (student, plan, d) in enumerate(zip(self.students, plans, self.distill)):
            # Identical on every rank: the CEs were averaged over ranks.
            if plan.active and teacher_ce is not None and f"{student.name}/train/loss_ce" in values:
                diff = teacher_ce - values[f"{student.name}/train/loss_ce"]
                values[self._tag("distill", "teacher_minus_student_ce", i)] = diff
                self.gap[i] = ema(self.gap[i], -diff, d.adaptive_ema)
        for member, plan in zip([self.teacher, *self.students], [None, *plans]):
            if member is None or not member.trainable or (plan is not None and not plan.active):
                continue
            values[f"{member.name}/train/lr"] = float(member.engine.get_lr()[0])
            norm = member.engine.get_global_grad_norm()
            values[f"{member.name}/train/grad_norm"] = float(norm) if norm is not None else float("nan")
            if norm is not None and not math.isfinite(float(norm)):
                raise NonFinite(f"non-finite gradient norm of {member.name} at step {step + 1}; its update "
                                "is already applied, so the newest checkpoint holds the last good state", save=False)
            if self.cfg.train.nonfinite == "skip":
                values[f"{member.name}/train/skipped_steps"] = float(self.skipped[member.name])
        for i, plan in enumerate(plans if self.cfg.mode != "hard" else []):
            values[self._schedule_tag("alpha", i)] = plan.spec.alpha
            values[self._schedule_tag("temperature", i)] = plan.temperature
            if self.gap[i] is not None:
                values[self._schedule_tag("gap", i)] = self.gap[i]
        slowest, peak = self._max_over_ranks(elapsed, float(peak_bytes()))
        values["perf/tokens_per_sec"] = self.tokens_per_step / slowest
        values["perf/peak_memory_gb"] = peak / 2**30  # the largest rank's, so far (GPU: allocated; CPU: RSS)
        return values

    def schedule_state(self) -> dict[str, Any]:
        """What the schedules remember, for the trainer state saved with a checkpoint."""
        return {"gap_ema": {s.name: g for s, g in zip(self.students, self.gap)}}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)
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
            logits = {m.name: self._logits(m, batch) for m in self.members}
            for i, m in enumerate(self.members):
                sums[i] += distill_loss(logits[m.name], batch["labels"], batch["mask"]).ce.item() * n
            if self.teacher is not None:
                for j, student in enumerate(self.students):
                    sums[len(self.members) + j] += top1_agreement(
                        logits[student.name], logits[self.teacher.name], batch["mask"])
        for m in self.trainable:
            m.engine.train()
        torch.distributed.all_reduce(sums)
        return {key: float(sums[i] / sums[-1]) for i, key in enumerate(keys)}

    # ------------------------------------------------------------------ the loop

    def describe(self) -> list[str]:
        """One line per model: size, ZeRO stage, precision and what each rank stores."""
        lines = []
        for m in self.members:
            module = m.engine.module
            local = torch.tensor([local_parameters(module)], dtype=torch.int64)
            gathered = [torch.zeros_like(local) for _ in range(self.world.size)]
            torch.distributed.all_gather(gathered, local)
            stored = " ".join(f"{int(t):,}" for t in gathered)
            lines.append(
                f"{m.name}: {count_parameters(module):,} parameters, ZeRO stage {m.engine.zero_optimization_stage()}, "
                f"bf16={m.engine.bfloat16_enabled()}{'' if m.trainable else ', frozen'}; stored per rank: {stored}"
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
        positions = self.cfg.train.micro_batch_size * self.cfg.data.seq_len
        logit_bytes = 2 if (self.teacher.engine.bfloat16_enabled() or self.teacher.engine.fp16_enabled()) else 4
        for student, d in zip(self.students, self.distill):
            if d.targets == "topk":
                k = min(d.top_k, self.vocab)
                kept, full = positions * (8 * k + 4), positions * self.vocab * logit_bytes
                lines.append(f"{student.name}: top-{k} targets hold {kept / 2**20:.2f} MB per micro-batch instead of "
                             f"{full / 2**20:.2f} MB of full teacher logits ({full / kept:.1f}x less)")
        return lines

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """A complete checkpoint of every engine, the schedules, the data cursor and RNGs."""
        state = {"world_size": self.world.size, "models": [m.name for m in self.trainable],
                 "schedule": self.schedule_state(), "config": self.cfg.model_dump(mode="json")}
        rank_state = {"data": self.stream.state_dict(), "python": random.getstate(),
                      "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return checkpoint.save(self.output_dir, self.step, [(m.name, m.engine) for m in self.trainable], state,
                               rank_state, self.world.rank, self.cfg.checkpoint.keep_last, self._write_extra)

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
            loaded, _ = m.engine.load_checkpoint(str(folder), tag=tag)
            if loaded is None:
                raise ConfigError(f"resume: {folder} holds no checkpoint of model '{m.name}'")
        self.step = int(state["step"])
        gaps = state["schedule"]["gap_ema"]
        self.gap = [gaps.get(s.name) for s in self.students]
        rank_state = torch.load(checkpoint.rank_file(path, min(self.world.rank, self.saved_world - 1)),
                                weights_only=False)
        cursor = dict(rank_state["data"])
        if rescaled:
            # DistributedSampler deals one global permutation round-robin, so after p micro-batches
            # of b on W ranks exactly the first p·b·W samples of the epoch are used; continue there.
            used = cursor["position"] * self.cfg.train.micro_batch_size * self.saved_world
            per_step = self.cfg.train.micro_batch_size * self.world.size
            cursor["position"] = used // per_step
            if used % per_step and self.world.is_main:
                log.warning("resume: %d samples of the epoch were used, not a multiple of %d; skipping to the next "
                            "micro-batch boundary", used, per_step)
        self.stream.load_state_dict(cursor)
        random.setstate(rank_state["python"])
        np.random.set_state(rank_state["numpy"])
        torch.set_rng_state(rank_state["torch"])
        if rank_state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["cuda"])
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
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(cfg))
            for partial in checkpoint.remove_partial(self.output_dir):
                log.warning("removed %s, left by a save that did not finish", partial)
        torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)
        metrics = self.metrics = Metrics(self.output_dir, world.is_main, cfg.train.max_steps, start_step=self.step)
        lines = [f"world: {world.size} rank(s) on {world.device.type} ({world.how}); "
                 f"{self.tokens_per_step:,} tokens per step", *self.describe()]
        if self.resume_from is not None:
            lines.append(f"resumed from {self.resume_from} at step {self.step}")
        for line in lines:
            metrics.message(line)
        final: dict[str, float] = {}
        if self.step == 0:
            final = self.evaluate()
            metrics.scalars(0, final)
            metrics.message("step 0: " + format_values(final))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        first, saved_at = self.step, None
        try:
            while self.step < cfg.train.max_steps:
                values = self.train_step(self.step)
                self.step += 1
                last = self.step == cfg.train.max_steps
                metrics.advance(self.step, values, line=self.step % cfg.train.log_interval == 0 or last)
                if self.step % cfg.train.eval_interval == 0 or last:
                    final = self.evaluate()
                    metrics.scalars(self.step, final)
                    metrics.message(f"eval at step {self.step}: " + format_values(final))
                stop = self._stop_requested() or self.step - first == cfg.train.steps_this_run
                interval = cfg.checkpoint.interval
                if last or stop or (interval and self.step % interval == 0):
                    metrics.message(f"saved checkpoint {self.save()}")
                    saved_at = self.step
                if stop and not last:
                    why = f"signal {signal.Signals(self._signal).name}" if self._signal else "train.steps_this_run"
                    metrics.message(f"stopping at step {self.step} ({why}); continue with resume=auto")
                    break
            if saved_at != self.step:  # resumed at or past max_steps: nothing ran
                metrics.message(f"saved checkpoint {self.save()}")
        except NonFinite as exc:
            if exc.save:
                exc.args = (f"{exc}; saved the last good state to {self.save()} (train.nonfinite=stop)",)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            metrics.close()
        return final


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
