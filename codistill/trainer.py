"""The co-distillation trainer: set-up, the loop, evaluation and checkpoints, wired from components.

One DeepSpeed engine per model, all on the world group; per micro-batch every model sees the
identical batch. What a micro-step computes is codistill/step.py's (from every model's logits, or
with ``distill.fused_linear`` from their final hidden states); what each student carries between
steps (its α and T, the teacher's lead, its benefit gate) is codistill/student.py's; what the run
shows is codistill/report.py's.
"""
from __future__ import annotations

import logging
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint, distributed, ema, identity, onpolicy, report, selection
from .cache import TeacherCache
from .config import ConfigError, RunConfig, dump_config
from .crosstok import own_by_side, side_maps
from .data import BatchStream, ProbeBatches, build_splits, eval_batches, on_device, save_tokenizers, side_tokenizers
from .engines import Member, build_engine, init_seed, is_trainable, quiet_library_noise
from .errors import NonFinite
from .evaluate import Shown, Validator
from .files import write_atomically
from .metrics import Metrics, Settings, Tags, batch_ce, format_values, summary_lines
from .preflight import Inputs, check_inputs
from .step import Models, Probes, make_step, use_fused
from .student import StudentPlan, Students, StudentState, rank_averaged_terms

log = logging.getLogger("codistill")


class Trainer:
    """Builds every component from a validated config; :meth:`fit` runs the loop."""

    def __init__(self, cfg: RunConfig, debug: bool = False):
        if not debug:
            quiet_library_noise()
        self.cfg, self.debug = cfg, debug
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        inputs = check_inputs(cfg, self.output_dir)
        self.tokenizer, self.vocab, self.tokenizer_fp = inputs.tokenizer, inputs.vocab, inputs.tokenizer_fp
        self.teacher_tokenizer, self.sides = inputs.teacher_tokenizer, inputs.sides  # own ones (codistill/crosstok.py)
        self.resume_from, self.saved_world, self._release = inputs.resume_from, inputs.saved_world, inputs.release
        try:
            self.world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
            fingerprint = self._load_data()
            self.cache = self._open_cache(fingerprint)
            self._build_engines(inputs)
            self._init_state()
            if self.resume_from is not None:
                self._load(self.resume_from)
        except BaseException:
            self._release()  # the output_dir is free again for a corrected run
            raise

    # ------------------------------------------------------------------ set-up phases

    def _load_data(self) -> str:
        """This rank's training stream and validation batches; returns the data's fingerprint."""
        cfg, world = self.cfg, self.world
        splits = build_splits(cfg.data, self.tokenizer, cfg.train.seed, cfg.probe_fraction(), self.teacher_tokenizer,
                              side_tokenizers(self.sides))
        self.stream = BatchStream(splits.train, cfg.train.micro_batch_size, world.rank, world.size, cfg.train.seed)
        self.heldout = None if splits.probe is None else ProbeBatches(  # benefit_probe: heldout's documents
            splits.probe, cfg.train.micro_batch_size, world.rank, cfg.train.seed)
        self.val_batches = eval_batches(splits.validation, cfg.train.micro_batch_size, world.rank, world.size,
                                        cfg.train.eval_batches)
        self.val_total = len(splits.validation)
        if not self.val_batches:
            raise ConfigError(f"data: the validation split has fewer than {world.size} blocks; one per rank is needed")
        return splits.fingerprint

    def _open_cache(self, data_fingerprint: str) -> Optional[TeacherCache]:
        """The cached teacher of soft mode (its one temperature was checked with the config)."""
        cfg = self.cfg
        if cfg.teacher is None or not cfg.teacher.cache:
            return None
        return TeacherCache.open(Path(cfg.teacher.cache).expanduser(),
                                 {"tokenizer": self.tokenizer_fp, "data": data_fingerprint,
                                  "seq_len": cfg.data.seq_len},
                                 cfg.distill_for(0).temperature, len(self.teacher_tokenizer or self.tokenizer))

    def _build_engines(self, inputs: Inputs) -> None:
        """One engine per model, every learner's state and sources, and the micro-step and validation that
        use them."""
        cfg, specs = self.cfg, inputs.specs
        self.members: list[Member] = [build_engine(s, inputs.hf_configs[s.name], inputs.ds_configs[s.name],
                                                   init_seed(cfg, s), is_trainable(cfg, s), inputs.own_vocab(s),
                                                   inputs.side(s))
                                      for s in specs]
        self.teacher_name = None if cfg.teacher is None else cfg.teacher.name
        self.teacher: Optional[Member] = self.members[0] if cfg.teacher in specs else None
        self.students = self.members[1 if self.teacher is not None else 0:]
        self.trainable = [m for m in self.members if m.trainable]
        self.smoothed = ema.join(cfg, self.members, self.teacher, inputs, self.world)  # a frozen model, after it
        at = {m.name: k for k, m in enumerate(self.members)}
        learners = cfg.learners()
        self.learners = Students([StudentState(s.name, d, d.benefit_gate and cfg.mode != "hard")
                                  for s, d, _ in learners])
        self.tags = Tags([s.name for s, _, _ in learners])
        self.fused = use_fused(cfg, self.members, self.vocab, self.world.size, self.world.device.type)
        self.models = Models(self.members, self.teacher, [at[s.name] for s, _, _ in learners], list(self.learners),
                             [[at[n] for n in sources if n in at]
                              for sources in ema.students_sources(learners, self.teacher_name, self.smoothed)],
                             self.vocab, self.tags,
                             self.teacher_name, side_maps(self.teacher_tokenizer, self.tokenizer, self.sides,
                                                          learners, self.world.device))
        self.micro_step = make_step(self.fused, self.models, cfg, self.world.size, self.cache, self.world.device)
        self.micro_step.smoothed = self.smoothed
        self.micro_step.sampling = onpolicy.Sampling.of(cfg, self.tokenizer, self.world.rank)
        self.evaluate_models = Validator(self.val_batches, self.prepare_batch, self.vocab, self.fused,
                                         cfg.distill.chunk_tokens, self.micro_step.sampling.scoring(learners),
                                         Shown.of(cfg, self.tokenizer, self.val_batches, self.micro_step.sampling,
                                                  own_by_side(self.teacher_tokenizer, self.sides)))
        self.selection = selection.join(cfg, self.members, list(self.learners), self.heldout, self.prepare_batch,
                                        self.evaluate_models.model)

    def _init_state(self) -> None:
        """What the loop keeps between steps (saved with a checkpoint) and this rank's RNGs."""
        cfg = self.cfg
        self.step = 0  # optimizer steps completed
        self.start_eval: dict[str, float] = {}  # validation losses at step 0, for the run's summary
        # Which run a checkpoint belongs to: resume=auto and pruning never touch another run's.
        self.run_id = self._shared_run_id()
        seed = cfg.train.seed + 1000 * self.world.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.tokens_per_step = (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
                                * self.world.size * cfg.data.seq_len)
        self.metrics: Optional[Metrics] = None
        self._signal: Optional[int] = None
        self._step_start: Optional[dict] = None  # this rank's cursor and RNGs when the current step began

    def _shared_run_id(self) -> str:
        """A fresh run's id, the same on every rank (rank 0 draws it)."""
        drawn = torch.tensor(list(uuid.uuid4().bytes[:8]), dtype=torch.uint8)
        torch.distributed.broadcast(drawn, src=0)
        return bytes(drawn.tolist()).hex()

    # ------------------------------------------------------------------ the step

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of every model (``step`` is 0-based); returns rank-averaged metrics."""
        plans = self.plan(step)
        gas = self.cfg.train.gradient_accumulation_steps
        self._step_start = checkpoint.rank_state(self.stream.state_dict())  # what a stop saves of this rank
        sums: dict[str, float] = {}  # what ran, summed over micro-steps
        interval = self.cfg.train.panel_interval
        panels = {} if interval and (step + 1) % interval == 0 else None  # diagnostics of the first micro-batch
        start = time.perf_counter()
        try:
            for micro in range(gas):
                batch = self.prepare_batch(next(self.stream))
                probes = self.probes(step, plans) if micro == 0 else None
                self.micro_step(batch, plans, sums, panels if micro == 0 else None, probes, (step, micro))
        except NonFinite as exc:
            exc.args = (f"{exc} at step {step + 1}",)
            raise
        elapsed = time.perf_counter() - start
        values = distributed.mean_over_ranks({**{k: v / gas for k, v in sums.items()}, **(panels or {})})
        values.update(self._observe(plans, values))
        stepped = [self.members[k] for k, trains in self.micro_step.roles(plans).trains.items() if trains]
        values.update(report.engine_values(stepped, self.micro_step.skipped if self.cfg.train.nonfinite == "skip"
                                           else None, step))
        if self.cfg.mode != "hard":
            values.update(report.schedule_values(plans, list(self.learners), self.tags))
        values.update(report.perf_values(elapsed, values.pop("perf/tokens") * gas * self.world.size))
        values.update(onpolicy.rates(values, [s.name for s in self.learners], elapsed, gas))
        return {**values, **(self.selection.after_step(step + 1) if self.selection else {})}

    def plan(self, step: int) -> list[StudentPlan]:
        """What every learner does at optimizer step ``step``: α, T and whether it trains."""
        return self.learners.plans(step, self.cfg.train, self.models)

    def probes(self, step: int, plans: list[StudentPlan]) -> Optional[Probes]:
        """The benefit gates' unseen batches at ``step``, by ``distill.benefit_probe`` (those that a measuring
        student reads): stream, the training stream's next micro-batch, which no model has seen yet
        (taken before the first micro-batch is trained on); heldout, one from the documents set aside."""
        sources = {s.distill.benefit_probe for s, p in zip(self.learners, plans) if p.measure}
        out = {}
        if "stream" in sources:
            out["stream"] = self.prepare_batch(self.stream.peek())
        if "heldout" in sources:
            out["heldout"] = self.prepare_batch(self.heldout.at(step))
        return out or None

    def _observe(self, plans: list[StudentPlan], values: dict[str, float]) -> dict[str, float]:
        """Each learner's state after the step, from the rank-averaged values (so identical on every rank): its
        sources' lead (their mean CE below its own), the peak learning rate and the benefit gate's evidence;
        returns what to log of them."""
        out = {}
        for i, (state, plan) in enumerate(zip(self.learners, plans)):
            member = self.models.learner(i)
            lr_after = float(member.engine.get_lr()[0])
            ces = [batch_ce(values, self.members[j].name, member.side) for j in self.models.sources[i]]
            if self.cache is not None:
                ces = [batch_ce(values, self.teacher_name)]
            ces = [ce for ce in ces if ce is not None]
            source_ce = sum(ces) / len(ces) if ces else None
            lead = state.observe(plan, source_ce, values.get(f"{state.name}/train/loss_ce"), lr_after)
            if lead is not None:
                out[self.tags.student("distill", "teacher_lead", i)] = lead
            measured = state.measured(rank_averaged_terms(values, state.name), lr_after, self.world.size,
                                      self.cfg.train.gradient_accumulation_steps)
            out.update({self.tags.student("benefit", key, i): value for key, value in measured.items()})
        return out

    def prepare_batch(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a micro-batch to this rank's device and add next-token labels and mask."""
        return on_device(raw, self.world.device)

    def evaluate(self) -> dict[str, float]:
        """Validation CE of every model and each student's top-1 agreement with the teacher."""
        return self.evaluate_models(self.members, self.teacher, self.students)

    def describe(self) -> list[str]:
        """The run's opening lines: every model, and per student when and how it distils."""
        lines = [*report.describe_data(self.cfg, self.tokenizer, len(self.stream.dataset), self.val_total,
                                       self.tokens_per_step), *report.describe_models(self.members, self.world.size)]
        source = report.describe_teacher_source(self.cfg, self.cache)
        if source is not None:
            return [*lines, source]
        heldout = None if self.heldout is None else len(self.heldout.dataset)
        lines += [report.describe_student(s, self.cfg.train.max_steps, heldout, [self.members[j].name for j in
                                                                             self.models.sources[i]], self.models.cross)
                  for i, s in enumerate(self.learners)] + (self.selection.describe() if self.selection else [])
        engine = self.members[0].engine
        return lines + report.describe_targets(self.cfg, [] if self.models.cross else list(self.learners), self.vocab,
                                               self.fused,
                                               engine.bfloat16_enabled() or engine.fp16_enabled())

    # ------------------------------------------------------------------ checkpoints

    def parts(self) -> dict[str, Any]:
        """The components whose state a checkpoint carries beside the engines, data cursor and RNGs, by key:
        each has ``state_dict``/``load_state_dict`` (a new one is added here, not to save or load)."""
        return {"students": self.learners, **({"selection": self.selection} if self.selection else {})}

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state: the run's identity, its step-0 evaluation and every part's state."""
        return {"run_id": self.run_id, "start_eval": self.start_eval,
                **{key: part.state_dict() for key, part in self.parts().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if "students" not in state and "schedule" in state:  # a checkpoint of an earlier release
            state = {**state, "students": Students.from_legacy(state["schedule"])}
        for key, part in self.parts().items():
            part.load_state_dict(state.get(key, {}))
        self.start_eval = state.get("start_eval", {})  # absent in checkpoints of earlier releases
        self.run_id = state.get("run_id", checkpoint.LEGACY_RUN)  # a resumed run continues the same run

    def save(self, rank_state: Optional[dict] = None) -> Path:
        """A complete checkpoint of every engine, the trainer's state, the data cursor and RNGs
        (``rank_state``: this rank's cursor and RNGs to save instead of the current ones)."""
        state = {"world_size": self.world.size, "models": [m.name for m in self.trainable],
                 "config": self.cfg.model_dump(mode="json"), **self.state_dict()}
        rank_state = {**(rank_state or checkpoint.rank_state(self.stream.state_dict())),
                      **(self.smoothed.rank_state(self.world.rank) if self.smoothed else {})}
        return checkpoint.save(self.output_dir, self.step, [(m.name, m.engine) for m in self.trainable], state,
                               rank_state, self.world.rank,
                               self.cfg.checkpoint.keep_last, self._write_extra)

    def _write_extra(self, folder: Path) -> None:
        """What an export needs beside the weights: each model's config and tokenizer (a model's own, if any)."""
        for m in self.trainable:
            m.engine.module.config.save_pretrained(str(folder / "hf" / m.name))
        save_tokenizers(folder / "tokenizer", self.tokenizer, self.teacher_name, self.teacher_tokenizer, self.sides)

    def _load(self, path: Path) -> None:
        state = checkpoint.read_state(path)
        rescaled = self.saved_world != self.world.size
        if rescaled and self.world.is_main:
            log.warning("resuming a %d-rank checkpoint on %d rank(s) through DeepSpeed's universal checkpoint",
                        self.saved_world, self.world.size)
        for m in self.trainable:
            checkpoint.load_engine(path, m, self.world.is_main)
        if self.smoothed is not None:
            self.smoothed.load([checkpoint.rank_file(path, r) for r in range(self.saved_world)], checkpoint.read_rank)
        self.load_state_dict(state)
        cursor = checkpoint.restore_rank_state(path, min(self.world.rank, self.saved_world - 1))
        if rescaled:
            cursor = checkpoint.rescale_cursor(cursor, self.cfg.train.micro_batch_size, self.saved_world,
                                               self.world.size, warn=self.world.is_main)
        self.stream.load_state_dict(cursor)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train up to ``train.max_steps`` optimizer steps (from a resumed step, if any);
        returns the last evaluation. SIGTERM/SIGINT finish the step, save and return."""
        cfg, metrics = self.cfg, self._start_run()
        first, saved_at, stop = self.step, None, None
        final: dict[str, float] = {}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.step == 0:  # a signal during it stops the run after its first step
                final = self.start_eval = self._evaluate_and_log()
            started = time.perf_counter()
            while self.step < cfg.train.max_steps and stop is None:
                values = self.train_step(self.step)
                self.step += 1
                last = self.step == cfg.train.max_steps
                metrics.advance(self.step, values, line=self.step % cfg.train.log_interval == 0 or last)
                if self.step % cfg.train.eval_interval == 0 or last:
                    final = self._evaluate_and_log()
                stop = self._stop_reason(first)
                if checkpoint.due(self.step, stop, saved_at, cfg.train.max_steps, cfg.checkpoint.interval):
                    metrics.message(f"saved checkpoint {self.save()}")
                    saved_at = self.step
            # resumed at max_steps: nothing ran, still leave a checkpoint
            if checkpoint.due(self.step, stop, saved_at, cfg.train.max_steps, cfg.checkpoint.interval):
                metrics.message(f"saved checkpoint {self.save()}")
                saved_at = self.step
            self._finish(stop, final, time.perf_counter() - started, saved_at)
        except NonFinite as exc:
            if exc.save:  # no model stepped in the failed step: save them with the data cursor before it
                saved = self.save(rank_state=self._step_start)
                exc.args = (f"{exc}; saved the last good state to {saved} (train.nonfinite=stop)",)
            else:
                exc.args = (f"{exc}; {checkpoint.last_good(self.output_dir, self.run_id)}",)
            raise
        finally:  # the folder's lock is released before a signal can raise again
            metrics.close()
            self._release()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return final

    def _start_run(self) -> Metrics:
        """The output folder (rank 0), TensorBoard and the run's opening lines."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.output_dir / "config.yaml", dump_config(cfg))
            identity.write_run(self.output_dir, self.run_id)  # a resumed run's is the checkpoint's
            for partial in checkpoint.remove_partial(self.output_dir):
                log.warning("removed %s, left by a save that did not finish", partial)
        torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)
        layout = report.scalars_layout(self.members, self.teacher_name, list(self.learners), cfg.mode, self.tags)
        metrics = self.metrics = Metrics(self.output_dir, world.is_main, cfg.train.max_steps, start_step=self.step,
                                         layout=layout, settings=Settings.of(cfg))
        lines = [f"world: {world.size} rank(s) on {world.device.type} ({world.how}); "
                 f"{self.tokens_per_step:,} tokens per step", *self.describe()]
        if self.resume_from is not None:
            lines.append(f"resumed from {self.resume_from} at step {self.step}")
        for line in lines:
            metrics.message(line)
        return metrics

    def _finish(self, stop: Optional[str], final: dict[str, float], wall_s: float, saved_at: Optional[int]) -> None:
        """The run's last lines: where to continue after a stop, else the summary."""
        if stop is not None and self.step < self.cfg.train.max_steps:
            self.metrics.message(f"stopping at step {self.step} ({stop}); continue with resume=auto")
            return
        for line in summary_lines(final, self.start_eval, self.teacher_name, [s.name for s in self.students],
                                  wall_s, self.metrics.tokens,
                                  checkpoint.step_dir(self.output_dir, saved_at), self.output_dir, self.cfg.twins(),
                                  self.selection and self.selection.summary()):
            self.metrics.message(line)

    def _evaluate_and_log(self) -> dict[str, float]:
        values = self.evaluate()
        self.metrics.scalars(self.step, values)
        self.metrics.message(("step 0: " if self.step == 0 else f"eval at step {self.step}: ") + format_values(values))
        self.metrics.samples(self.step, self.evaluate_models.continuations(self.members))
        return values

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _stop_reason(self, first: int) -> Optional[str]:
        """Why to stop before max_steps (collective: every rank agrees, also on a signal only one rank got)."""
        flag = torch.tensor([0 if self._signal is None else 1], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            return f"signal {signal.Signals(self._signal).name}" if self._signal else "signal on another rank"
        if self.step - first == self.cfg.train.steps_this_run:
            return "train.steps_this_run"
        return None
