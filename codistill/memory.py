"""Memory per rank, estimated before launch and measured during a run.

The estimate needs no weights and no process group: every model is built on the
``meta`` device, its parameters are counted, and one forward pass of a single
sequence is traced on ``meta`` to sum what autograd saves for backward. From that,
per rank and per model:

- **parameters**, **gradients**, **optimizer states** (an fp32 master copy under bf16/fp16 or
  any ZeRO stage, plus Adam's two moments) under the model's ZeRO stage: stage ≥ 1 shards the optimizer
  states, ≥ 2 the gradients, 3 the parameters, across the world; an ``offload_*`` section
  moves them to host memory (shown apart);
- **activations** of one micro-batch (the traced bytes × micro_batch_size) and its
  logits ([B·S, V]) with their gradient;
- the **KD working set**: the distillation loss runs chunk by chunk over positions
  (:func:`codistill.losses.chunk_rows`), against a plain PyTorch
  loss that would hold every [B·S, V] fp32 temporary at once;
- the **runtime**: what the framework itself occupies (on CPU, measured in this
  process after importing what a rank imports, plus :data:`RANK_OVERHEAD_BYTES`; on a
  GPU, a typical CUDA context).

The peak is runtime + every model's states + the larger of the two phases of a
co-distillation step: the teacher's (its activations and logits) and the students'
(the teacher's kept logits, one student's activations, logits and loss working set).
The largest micro-batch that fits a given memory follows, since only activations,
logits and the working set grow with it.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from . import accelerator  # noqa: F401  (first: sets DS_ACCELERATOR before anything imports deepspeed)
from .config import ConfigError, ModelSpec, RunConfig
from .data import run_tokenizer, student_sides, teacher_tokenizer
from .engines import (deepspeed_configs, half_precision, is_trainable, loaded_models, resolve_deepspeed_config,
                      zero_stage)
from .fused import FUSED_AUTO_VOCAB, auto_problem, fused_rows, static_problem
from .crosstok import READS_LOGITS
from .losses import chunk_rows, topk_bytes_per_position
from .metrics import peak_bytes
from .models import model_config

CUDA_CONTEXT_BYTES = 600 * 2**20  # a CUDA context + torch's kernels, typically 0.5-0.8 GB
# A CPU rank beyond its imports: the process group, DeepSpeed's engines and buffers, the data
# and its loader (measured with the tiny config on the 2-core CI machine: 130-170 MB).
RANK_OVERHEAD_BYTES = 150 * 2**20
LOSS_TEMPORARIES = 6  # fp32 [rows, V] buffers alive at once in one chunk of the distillation loss
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "lamb": 2, "onebitadam": 2, "zerooneadam": 2, "onebitlamb": 2,
                     "adagrad": 1, "sgd": 1, "lion": 1, "muadam": 2, "muadamw": 2, "musgd": 1}


@dataclass
class ModelMemory:
    """One model's bytes on one rank."""

    name: str
    parameters: int
    trainable: bool
    stage: int
    dtype_bytes: int  # 2 under bf16/fp16, else 4
    params: int = 0
    grads: int = 0
    optimizer: int = 0  # master weights + optimizer moments
    host: int = 0  # offloaded to CPU memory
    activations: int = 0  # saved for backward, per micro-batch
    checkpointing: bool = False  # gradient checkpointing: activations are layer inputs + one layer
    logits: int = 0  # [B·S, V] output, per micro-batch
    build: int = 0  # host memory while building: a whole fp32 copy, or under ZeRO-3 a share + one module
    width: int = 0  # the LM head's rows (the tokenizer's vocabulary, or more when the embedding is padded)
    buckets: int = 0  # DeepSpeed's gradient bucket (contiguous_gradients), kept from the first step on
    gathered: int = 0  # ZeRO-3: parameters gathered whole while the model runs (stage3_max_live_parameters)
    reducing: int = 0  # ZeRO-3: the bucket's copies while its gradients are averaged and scattered (backward)
    step_temp: int = 0  # the optimizer step's temporaries (torch's multi-tensor Adam: two per state)
    gate: int = 0  # the benefit gate's measuring step: two whole gradients of the student and one parameter's
    largest: int = 0  # elements of the largest parameter (the embedding or the LM head)
    head: int = 0  # elements of the LM head's weight (rows x hidden size)
    linear_head: bool = True  # the head is a linear layer (the fused-linear path can serve it)
    kv_per_token: int = 0  # bytes of KV cache per sequence position (keys and values of every layer)
    sample_tokens: int = 0  # on-policy: positions of a sampled sequence at most (prompt + max_new_tokens)

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class Estimate:
    """A run's memory per rank, composed of its phases: the build (:func:`build_peak`), then in every step
    the forwards and backwards (:func:`logits_path_phases` or :func:`fused_path_phases`) and the optimizer
    steps (:func:`optimizer_phase`), on top of what stays resident; each phase's bytes are named terms."""

    world_size: int
    micro_batch_size: int
    seq_len: int
    vocab: int
    device: str
    runtime: int
    teacher: Optional[str]  # the teacher's name (it may not be loaded: a cache, or hard mode; none in mode mutual)
    distills: bool  # whether any loss over the vocabulary compares to a teacher
    chunk_rows: int  # positions per chunk of the distillation loss
    models: list[ModelMemory] = field(default_factory=list)
    kept_per_position: int = 0  # bytes the students' phase holds of the teacher per position
    fused: bool = False  # distill.fused_linear in effect: no model's logits, one pass over every model's heads
    fused_rows: int = 0  # positions per chunk of the fused pass
    together: list[str] = field(default_factory=list)  # models that learn from each other: forwards held at once
    sources: int = 1  # models whose chunk of logits the fused pass keeps for their readers
    cross: bool = False  # a teacher with another tokenizer (its own vocabulary; the logits path only)

    def with_fused(self) -> "Estimate":
        """The same run with ``distill.fused_linear`` on: no model's logits, no kept teacher targets."""
        import copy

        out = copy.deepcopy(self)
        out.fused, out.kept_per_position = True, 0
        for m in out.models:
            m.logits = 0
        return out

    def fused_lowers_peak(self) -> bool:
        """Whether the fused-linear path lowers this (logits-path) estimate's step peak: it drops every
        model's logits (and their gradients) but adds an fp32 gradient of each trainable head and holds
        every model's activations at once, so it pays off when a micro-batch holds many tokens per head row
        (roughly more than 1.5 x the hidden size in bf16), and less with top-k targets."""
        return self.with_fused().step_peak() < self.step_peak()

    def kd_bytes(self, batch: int, chunked: bool = True) -> int:
        """The distillation loss's fp32 temporaries: one chunk, or all [B·S, V] at once; fused, one chunk of
        the fused pass (its loss temporaries, the teacher's chunk of logits and the student's)."""
        positions = batch * self.seq_len
        if self.fused and chunked:  # each source's chunk of logits, another model's and a gradient + the kernel's
            return ((self.sources + 2) * min(positions, self.fused_rows) + LOSS_TEMPORARIES * min(positions, self.chunk_rows)) \
                * self.vocab * 4
        rows = min(positions, self.chunk_rows) if chunked else positions
        return LOSS_TEMPORARIES * rows * self.vocab * 4

    @staticmethod
    def head_gradient(m: ModelMemory) -> int:
        """The fused pass's gradient of one model's head: fp32 accumulator (+ a buffer in a half-precision dtype)."""
        return m.head * (4 + (m.dtype_bytes if m.dtype_bytes < 4 else 0)) if m.trainable else 0

    def _phase_terms(self, batch: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """What each part of a step holds on top of the resident bytes, as named terms: the
        teacher's side (its forward and backward; the optimizer steps, which come after every
        backward) and the students' side (the teacher's kept targets and one student's pass)."""
        teacher_pass, student_side = (fused_path_phases if self.fused else logits_path_phases)(self, batch)
        return teacher_pass + [optimizer_phase(self.models)], student_side

    def _phases(self, batch: int) -> tuple[int, int]:
        """The larger phase of the teacher's side and of the students' side, in bytes."""
        return tuple(max(int(sum(phase.values())) for phase in side) for side in self._phase_terms(batch))

    @property
    def resident(self) -> int:
        """What a rank holds throughout the steps: runtime, every model's states and buckets."""
        return self.runtime + sum(m.states + m.buckets for m in self.models)

    def build_peak(self, host: bool = False) -> int:
        """Bytes per rank while the models are built (see :func:`build_peak`)."""
        return build_peak(self.models, self.device, self.runtime, host)

    def peak(self, batch: Optional[int] = None) -> int:
        """Expected peak bytes per rank at micro-batch ``batch`` (default: the config's); on CPU
        the build counts too, since it happens in the same memory."""
        return max(self.step_peak(batch), self.build_peak())

    def step_peak(self, batch: Optional[int] = None) -> int:
        """Expected peak bytes per rank of a training step (the build aside)."""
        return self.resident + max(self._phases(batch or self.micro_batch_size))

    def terms(self, batch: int) -> dict[str, int]:
        """The peak's terms at micro-batch ``batch``, in the largest phase (what does not fit is one of these)."""
        largest = max((phase for side in self._phase_terms(batch) for phase in side), key=lambda t: sum(t.values()))
        return {"runtime": self.runtime, "model states": sum(m.states + m.buckets for m in self.models),
                **{name: int(size) for name, size in largest.items()}}

    def why_not(self, memory: int) -> str:
        """Why not even micro-batch 1 fits ``memory`` bytes: the term to cut, by name."""
        gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
        if self.build_peak() > memory:
            return f"building the models alone needs {gb(self.build_peak())}"
        states = self.resident
        if states > memory:
            return f"the model states alone need {gb(states)} (more ranks, ZeRO-3, offload)"
        name, size = max(((k, v) for k, v in self.terms(1).items() if k not in ("runtime", "model states")),
                         key=lambda kv: kv[1])
        hint = {"activations": "gradient_checkpointing: true", "logits": "a shorter seq_len, or top-k targets",
                "working set": "a smaller distill.chunk_tokens", "kept": "distill.targets: topk",
                "benefit gate": "distill.benefit_gate: false for that student"}
        advice = next((v for k, v in hint.items() if k in name), "")
        return (f"the model states take {gb(states)}, and at micro-batch 1 {name} ({gb(size)}) is the largest of "
                f"the rest" + (f" (try {advice})" if advice else ""))

    def largest_micro_batch(self, memory: int) -> int:
        """The largest micro-batch whose peak fits ``memory`` bytes (0 if not even one)."""
        if self.peak(1) > memory:
            return 0
        lo, hi = 1, 1
        while self.peak(hi * 2) <= memory and hi < 2**20:
            hi *= 2
        lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= memory else (lo, mid)
        return lo

    def lines(self, device_memory: Optional[int] = None) -> list[str]:
        """The estimate as lines of text (see :func:`report_lines`)."""
        return report_lines(self, device_memory)


# The build: the models are constructed one after another, before any step.

def build_peak(models: list[ModelMemory], device: str, runtime: int, host: bool = False) -> int:
    """Bytes per rank while ``models`` are built, one after another (the earlier ones already
    hold their states). A ZeRO-3 model is built partitioned where it will train; any other is
    built whole in fp32 in host memory first. ``host``: the host's share on a GPU machine."""
    if host and device == "cpu":
        return 0  # everything is in the one memory
    held, worst = 0, 0
    for m in models:
        in_host = m.stage != 3 and device != "cpu"
        if in_host == host:
            worst = max(worst, held + m.build)
        held += 0 if host else m.states
    return worst + (0 if host else runtime)


# The optimizer steps: after every backward, one model's step at a time.

def optimizer_phase(models: list[ModelMemory]) -> dict[str, float]:
    """The optimizer steps' terms: the temporaries of the largest model's step."""
    return {"optimizer-step temporaries": max((m.step_temp for m in models), default=0)}


# A step's forwards and backwards, at micro-batch ``batch``: the logits path or the fused-linear one.

def _running(m: ModelMemory, scale: float, logit_copies: int, kd: int) -> dict[str, float]:
    """One model's forward and backward on the logits path: its activations and logits (``logit_copies``:
    2 with their gradient), the loss's working set and, at ZeRO-3, its gathered parameters and reduction."""
    return {f"{m.name} activations": m.activations * scale, f"{m.name} logits": m.logits * logit_copies * scale,
            "KD loss working set": kd, f"{m.name} gathered parameters (ZeRO-3)": m.gathered,
            f"{m.name} gradient reduction (ZeRO-3)": m.reducing}


def logits_path_phases(est: Estimate, batch: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The teacher's pass (none without a loaded teacher, or when it listens) and the learners' phases on the
    logits path: each student's pass beside the teacher's kept targets; the models that learn from each other
    (mode mutual, a listening teacher and its students) with their forwards, logits and gradients held at
    once; and a measuring step of the benefit gate per gated learner (its gradients held whole at once, no
    reduction)."""
    scale = batch / est.micro_batch_size
    teacher = next((m for m in est.models if m.name == est.teacher and m.name not in est.together), None)
    students = [m for m in est.models if m.name != est.teacher and m.name not in est.together]
    kd = est.kd_bytes(batch) if est.distills else 0
    teacher_pass = [_running(teacher, scale, 2 if teacher.trainable else 1, kd)] if teacher is not None else []
    kept = {"teacher targets kept for the students": est.kept_per_position * batch * est.seq_len}
    together: dict[str, float] = {}
    for m in est.models:
        if m.name in est.together:
            together.update(_running(m, scale, 2, kd))
    side = [{**kept, **together}] if together else []
    student_side = side + [{**kept, **_running(m, scale, 2 if m.trainable else 1, kd)} for m in students] or [kept]
    for m in est.models:  # a measuring step: no reduction, but its gradients held whole at once
        if m.gate:
            measuring = {**kept, **(together if m.name in est.together else {}), **_running(m, scale, 2, kd),
                         f"{m.name} benefit gate's gradients": m.gate}
            measuring.pop(f"{m.name} gradient reduction (ZeRO-3)")
            student_side.append(measuring)
    own = {m.name: {**kept, **(together if m.name in est.together else {}), **_running(m, scale, 2, kd)}
           for m in est.models if m.sample_tokens}
    return teacher_pass, student_side + on_policy_phases(est, batch, own)


def on_policy_phases(est: Estimate, batch: int, own: Optional[dict[str, dict[str, float]]] = None
                     ) -> list[dict[str, float]]:
    """Per on-policy learner: its sampling, before the step's other passes (the KV cache of the sampled
    sequences and, at ZeRO-3, the whole model gathered for the generation), then its pass on the samples
    (always on the logits path: the teacher's logits of them kept as targets, its own forward and logits at the
    samples' length), held until its one backward, so on top of ``own[name]``, the phase of its pass on the
    text (none given: the samples' pass alone)."""
    teacher = next((m for m in est.models if m.name == est.teacher), None)
    out = []
    for m in est.models:
        if not m.sample_tokens or teacher is None:
            continue
        scale = batch / est.micro_batch_size * m.sample_tokens / est.seq_len
        logits = batch * m.sample_tokens * m.width * m.dtype_bytes
        out.append({f"{m.name} KV cache (sampling)": m.kv_per_token * batch * m.sample_tokens,
                    f"{m.name} gathered whole to sample (ZeRO-3)":
                        m.dtype_bytes * m.parameters - m.params if m.stage == 3 else 0})
        out.append({**(own or {}).get(m.name, {}),
                    "teacher logits of the samples": batch * m.sample_tokens * teacher.width * teacher.dtype_bytes,
                    f"{m.name} activations (samples)": m.activations * scale, f"{m.name} logits (samples)": 2 * logits,
                    "KD loss working set": est.kd_bytes(batch, chunked=True) if not est.fused else
                    LOSS_TEMPORARIES * min(batch * m.sample_tokens, est.chunk_rows) * est.vocab * 4,
                    f"{m.name} gathered parameters (ZeRO-3)": m.gathered,
                    f"{m.name} gradient reduction (ZeRO-3)": m.reducing})
    return out


def fused_path_phases(est: Estimate, batch: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """No teacher's pass of its own, and the fused pass: every model's forward, then one pass over their heads,
    then each backward in turn; and a measuring step of the benefit gate per gated student, after every
    backward (the student's own forward, the gate's gradients, its pass with two terms, and the teacher's
    head, copied at ZeRO-3)."""
    scale = batch / est.micro_batch_size
    teacher = next((m for m in est.models if m.name == est.teacher), None)
    learners = [m for m in est.models if m.gate]
    kd = est.kd_bytes(batch) if est.distills else 0
    hidden = {f"{m.name} final hidden states": batch * est.seq_len * m.head // max(m.width, 1) * m.dtype_bytes
              for m in est.models}
    fused = {**{f"{m.name} activations": m.activations * scale for m in est.models}, **hidden,
             **{f"{m.name} head gradient (fused pass)": est.head_gradient(m) for m in est.models},
             "fused pass working set": kd,
             # ZeRO-3: every head whole from the pass to its model's backward (engines.heads_gathered),
             # beside its partition; the teacher's through its own backward, the step's largest
             "heads gathered for the pass (ZeRO-3)": sum(m.head * m.dtype_bytes for m in est.models if m.stage == 3),
             "gathered parameters (ZeRO-3)": max((m.gathered for m in est.models), default=0),
             "gradient reduction (ZeRO-3)": max((m.reducing for m in est.models), default=0)}
    student_side = [fused]
    copies = sum(m.head * m.dtype_bytes for m in est.models if m.stage == 3 and m is not teacher) \
        if est.together else (teacher.head * teacher.dtype_bytes if teacher is not None and teacher.stage == 3 else 0)
    for m in learners:
        if m.gate:
            student_side.append({f"{m.name} activations": m.activations * scale,
                                 f"{m.name} benefit gate's gradients": m.gate,
                                 f"{m.name} head gradients (the gate's fused pass)": 2 * est.head_gradient(m),
                                 "source head copies (ZeRO-3)": copies, "fused pass working set": kd,
                                 "gathered parameters (ZeRO-3)": m.gathered, **hidden})
    return [], student_side + on_policy_phases(est, batch, {m.name: fused for m in est.models if m.sample_tokens})


# The report.

def on_policy_lines(est: Estimate, gb: Callable[[float], str]) -> list[str]:
    """Each on-policy learner's two phases (counted in the second side), one line."""
    phases = on_policy_phases(est, est.micro_batch_size)
    terms = lambda phase: ", ".join(f"{k} {gb(v).strip()}" for k, v in phase.items() if v)  # noqa: E731
    return [f"  on-policy, before the step's other passes: sampling {gb(sum(a.values())).strip()} ({terms(a)}); "
            f"the pass on the samples {gb(sum(b.values())).strip()} ({terms(b)}), held with its pass on the text "
            "until their one backward"
            for a, b in zip(phases[::2], phases[1::2])]


def phase_names(est: Estimate) -> tuple[str, str]:
    """What the two sides of :meth:`Estimate._phases` are, in this run: a deaf teacher's pass (with the
    optimizer steps) and its students' passes; without one (mode mutual, a listening teacher), the optimizer
    steps and the passes of the models that learn from each other; with fused-linear losses, the fused pass."""
    if est.fused:
        return "optimizer steps", "the fused pass"
    deaf = any(m.name == est.teacher and m.name not in est.together for m in est.models)
    return ("the teacher's phase", "the students' phase") if deaf else ("optimizer steps", "the models' passes")


def report_lines(est: Estimate, device_memory: Optional[int] = None) -> list[str]:
    """The estimate as lines of text: per model, then the step's shared terms, the phases and the peak, the
    build, and with ``device_memory`` (bytes) the largest micro-batch that fits it."""
    gb = lambda b: f"{b / 2**30:8.3f} GB"  # noqa: E731
    roles = [f"{m.name}{'' if m.trainable else ' (frozen)'}" for m in est.models]
    w = max([14, *(len(r) + 1 for r in roles)])
    out = [f"memory per rank (GB: 2^30 bytes, GiB), {est.world_size} rank(s) on {est.device}, micro-batch "
           f"{est.micro_batch_size} x {est.seq_len} tokens, vocabulary {est.vocab:,}:",
           f"  {'model':<{w}}{'params':>12}{'grads':>12}{'optimizer':>12}{'activations':>13}{'logits':>12}{'host':>12}"]
    for m, role in zip(est.models, roles):
        out.append(f"  {role:<{w}}{gb(m.params):>12}{gb(m.grads):>12}{gb(m.optimizer):>12}{gb(m.activations):>13}"
                   f"{gb(m.logits):>12}{gb(m.host):>12}   ZeRO-{m.stage}, {m.parameters:,} parameters")
    t_phase, s_phase = est._phases(est.micro_batch_size)
    first, second = phase_names(est)
    out += [f"  DeepSpeed: gradient buckets {gb(sum(m.buckets for m in est.models)).strip()}, ZeRO-3 parameters "
            f"gathered while a model runs {gb(max((m.gathered for m in est.models), default=0)).strip()}, "
            f"ZeRO-3 gradient reduction {gb(max((m.reducing for m in est.models), default=0)).strip()}, "
            f"optimizer-step temporaries {gb(max((m.step_temp for m in est.models), default=0)).strip()}",
            (f"  fused-linear losses (distill.fused_linear): no model's logits; one chunk of the fused pass "
             f"{gb(est.kd_bytes(est.micro_batch_size)).strip()}, head gradients "
             + ", ".join(f"{m.name} {gb(est.head_gradient(m)).strip()}" for m in est.models if m.trainable)
             + f" (plain PyTorch over full logits: {gb(est.kd_bytes(est.micro_batch_size, chunked=False)).strip()}"
             " of loss temporaries alone)" if est.fused else
             f"  KD loss working set: {gb(est.kd_bytes(est.micro_batch_size)).strip()} chunked (plain PyTorch "
             f"over full logits: {gb(est.kd_bytes(est.micro_batch_size, chunked=False)).strip()})"),
            *(["  benefit gate: a measuring step holds two whole gradients of the learner and one of its "
               "largest parameter (" + ", ".join(f"{m.name} {gb(m.gate).strip()}" for m in est.models if m.gate)
               + f") instead of its gradient reduction; counted in {second}"]
              if any(m.gate for m in est.models) else []),
            *on_policy_lines(est, gb),
            f"  runtime ({'measured in this process' if est.device == 'cpu' else 'CUDA context'}): "
            f"{gb(est.runtime).strip()}",
            f"  {first} {gb(t_phase).strip()}, {second} {gb(s_phase).strip()} (the larger counts)",
            f"  expected peak per rank: {gb(est.peak()).strip()}"
            + (f" (+ {gb(sum(m.host for m in est.models)).strip()} offloaded to host)"
               if any(m.host for m in est.models) else "")]
    built = ", ".join(f"{m.name} {gb(m.build).strip()} " + ("partitioned (ZeRO-3: a share + one module)"
                                                             if m.stage == 3 else "whole, fp32") for m in est.models)
    where = "" if est.device == "cpu" else (f" on the device, {gb(est.build_peak(host=True)).strip()} "
                                             "in host memory")
    out.insert(-1, f"  while building: {gb(est.build_peak()).strip()} per rank{where} ({built})")
    if device_memory:
        fit = est.largest_micro_batch(device_memory)
        out.append(f"  largest micro-batch in {device_memory / 2**30:.1f} GB: "
                   + (f"{fit}" if fit else f"none: {est.why_not(device_memory)}"))
    return out


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '512MB', '1e9' -> bytes (GB and GiB both mean 2**30 here)."""
    units = {"": 1, "B": 1, "KB": 2**10, "KIB": 2**10, "MB": 2**20, "MIB": 2**20, "GB": 2**30, "GIB": 2**30,
             "TB": 2**40, "TIB": 2**40}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    try:
        value = float(number) * units[raw[len(number):]]
    except (ValueError, KeyError):
        raise ConfigError(f"memory size '{text}': expected a number with a unit, e.g. 80GB or 512MB") from None
    if value <= 0:
        raise ConfigError(f"memory size '{text}' must be positive")
    return int(value)


def runtime_bytes(device: str) -> int:
    """What a rank holds besides the models and their step: on CPU the peak RSS of this process
    once it has imported what a rank imports (torch, DeepSpeed, transformers and the model's
    code, which building the models on meta did) plus RANK_OVERHEAD; on a GPU a CUDA context."""
    if device == "cpu":
        import deepspeed  # noqa: F401  (the rest of what a rank imports)
        import torch.utils.tensorboard  # noqa: F401

        return peak_bytes() + RANK_OVERHEAD_BYTES
    return CUDA_CONTEXT_BYTES


@contextmanager
def _fused_attention() -> Iterator[None]:
    """On ``meta``, F.scaled_dot_product_attention falls back to its math path and saves the
    [S, S] attention matrix, which the fused kernels a real run uses (CPU flash, CUDA flash or
    memory-efficient) never hold: they save q, k, v, the output and a logsumexp per row. The
    trace runs the fused CPU op instead, whose meta kernel saves exactly that."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


@dataclass
class Activations:
    """What autograd saves in one forward of one sequence: outside the decoder layers, each
    layer's input and each layer's own saved tensors."""

    outside: int
    inputs: list[int]
    layers: list[int]

    def held(self, checkpointing: bool) -> int:
        """Saved between the forward and the backward pass."""
        return self.outside + (sum(self.inputs) if checkpointing else sum(self.layers))

    def peak(self, checkpointing: bool) -> int:
        """At most during the backward pass: with checkpointing, one layer is recomputed at a time."""
        return self.held(checkpointing) + (max(self.layers, default=0) if checkpointing else 0)


def trace_activations(model: torch.nn.Module, seq_len: int) -> Activations:
    """Trace one forward of one sequence on ``meta`` (no compute), with the fused attention a
    real run uses. Views share their storage and count once; weights (and their transposes)
    are parameters, counted elsewhere."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved: list[dict[int, int]] = [{} for _ in range(len(layers) + 1)]  # per layer, then outside them
    inputs, where = [0] * len(layers), [len(layers)]

    def enter(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs[index] = hidden.untyped_storage().nbytes() if isinstance(hidden, torch.Tensor) else 0
            where[0] = index
        return hook

    def leave(_module, _args, _out):
        where[0] = len(layers)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[where[0]][storage._cdata] = storage.nbytes()
        return t

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(enter(i), with_kwargs=True), layer.register_forward_hook(leave))]
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    fused = model.config._attn_implementation != "eager"
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention() if fused else nullcontext():
            out = model(input_ids=ids)  # no attention mask: meta cannot be inspected for padding
            del out  # the logits are returned, not saved: counted apart
    finally:
        for h in handles:
            h.remove()
    inside = {k for layer in saved[:-1] for k in layer}
    return Activations(sum(v for k, v in saved[-1].items() if k not in inside), inputs,
                       [sum(layer.values()) for layer in saved[:-1]])


def _traceable(attn: str) -> str:
    """The attention to trace on ``meta``: flash attention's kernel needs a GPU; it saves what
    sdpa's fused kernels save (no [S, S] matrix)."""
    return "sdpa" if attn == "flash_attention_2" else attn


def _model_memory(spec: ModelSpec, hf_config, ds: dict, trainable: bool, world: int, batch: int,
                  seq_len: int, vocab: int) -> ModelMemory:
    from transformers import AutoModelForCausalLM

    half = half_precision(ds)
    dtype = torch.bfloat16 if half else torch.float32
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=spec.trust_remote_code, dtype=dtype,
                                                     attn_implementation=_traceable(spec.attn_implementation))
    except Exception as exc:  # transformers raises many types for a bad config
        raise ConfigError(f"{spec.name}: could not build the model on 'meta' ({' '.join(str(exc).split())[:160]})") from None
    n = sum(p.numel() for p in model.parameters())
    zero = ds.get("zero_optimization") or {}
    stage = zero_stage(ds)
    m = ModelMemory(spec.name, n, trainable, stage, 2 if half else 4)
    m.params = m.dtype_bytes * n // (world if stage == 3 else 1)
    # Built in fp32 (then cast by DeepSpeed): whole on every rank, or under ZeRO-3 this rank's
    # share plus the largest module gathered whole (twice: DeepSpeed's gather buffer and the tensor).
    largest = max((sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules()), default=0)
    m.build = 4 * n if stage != 3 else 4 * n // world + 2 * 4 * largest
    offload_params = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    if offload_params and stage == 3:
        m.host, m.params = m.params, 0
    m.width = getattr(hf_config, "vocab_size", None) or vocab  # the head computes every row, padding included
    m.largest = m.width * int(getattr(hf_config, "hidden_size", 0) or 0)
    head = model.get_output_embeddings()
    m.linear_head = isinstance(head, torch.nn.Linear)
    m.head = head.weight.numel() if head is not None else m.largest
    m.logits = batch * seq_len * m.width * m.dtype_bytes
    heads = int(getattr(hf_config, "num_attention_heads", 0) or 0)
    head_dim = getattr(hf_config, "head_dim", None) or (int(getattr(hf_config, "hidden_size", 0) or 0) // max(heads, 1))
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    m.kv_per_token = 2 * int(getattr(hf_config, "num_hidden_layers", 0) or 0) * kv_heads * head_dim * m.dtype_bytes
    if stage == 3:  # gathered whole module by module, up to stage3_max_live_parameters at once
        m.gathered = m.dtype_bytes * min(n, int(zero.get("stage3_max_live_parameters", 10**9)))
    if not trainable:
        return m
    m.grads = m.dtype_bytes * n // (world if stage >= 2 else 1)
    if stage >= 1 and zero.get("contiguous_gradients", True):  # a bucket of reduce_bucket_size, filled up to n
        m.buckets = m.dtype_bytes * min(n, int(zero.get("reduce_bucket_size", 5 * 10**8)))
    if stage == 3:  # measured on 2 CPU ranks: a ZeRO-3 backward peaks two bucket copies above the bucket
        m.reducing = 2 * m.buckets
    kind = str((ds.get("optimizer") or {}).get("type", "adamw")).lower()
    # fp32 moments + an fp32 master copy of the weights: under bf16/fp16, and under every ZeRO stage even for an
    # fp32 model (DeepSpeed's ZeRO optimizers copy the flat partition; checked: no storage shared at stages 1-3).
    per_param = 4 * _OPTIMIZER_STATES.get(kind, 2) + (4 if half or stage >= 1 else 0)
    m.optimizer = per_param * n // (world if stage >= 1 else 1)
    m.step_temp = 4 * _OPTIMIZER_STATES.get(kind, 2) * n // (world if stage >= 1 else 1)  # one fp32 per state
    if (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"):
        m.host += m.optimizer
        m.optimizer = m.step_temp = 0
    m.checkpointing = spec.gradient_checkpointing
    m.activations = trace_activations(model.train(), seq_len).peak(spec.gradient_checkpointing) * batch
    return m


def _plain_estimate(cfg: RunConfig, world_size: int, device: Optional[str] = None) -> Estimate:
    """The estimate with every model's logits (the fused-linear path off)."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: expected at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = run_tokenizer(cfg)
    vocab = len(tokenizer)
    batch, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    rows = chunk_rows(vocab, None, torch.device(device))
    chunks = {d.chunk_tokens for _, d, _ in cfg.learners()}
    if None not in chunks:
        rows = max(chunks)
    teacher_name = None if cfg.teacher is None else cfg.teacher.name
    est = Estimate(world_size, batch, seq, vocab, device, 0, teacher=teacher_name,
                   distills=cfg.mode != "hard", chunk_rows=rows)
    loaded = loaded_models(cfg)
    ds_configs = deepspeed_configs(cfg, loaded, world_size, on_cpu=device == "cpu")
    own = teacher_tokenizer(cfg, tokenizer) if cfg.teacher in loaded else None
    est.cross = own is not None
    sides = student_sides(cfg, tokenizer) if est.cross else {}  # students with tokenizers of their own
    for spec in loaded:
        side = est.cross and spec is cfg.teacher  # the teacher's vocabulary (and its side of a block) may be its own
        tok = own if side else sides[spec.name][1] if spec.name in sides else tokenizer
        est.models.append(_model_memory(spec, model_config(spec, tok), ds_configs[spec.name], is_trainable(cfg, spec),
                                        world_size, batch, cfg.data.teacher_block if side else seq, len(tok)))
    teacher = next((m for m in est.models if m.name == teacher_name), None)
    if cfg.distill.teacher_ema and teacher is not None:
        est.models.insert(1, smoothed_teacher(cfg, own or tokenizer, cfg.data.teacher_block if est.cross else seq,
                                              world_size, device))
    learners = cfg.learners()
    settings = [d for s, d, _ in learners if s is not cfg.teacher]
    for spec, d, _ in learners:
        m = next((m for m in est.models if m.name == spec.name), None)
        if m is not None and d.benefit_gate and cfg.mode != "hard":
            # ∇CE(probe) and ∇CE whole; ∇(T²·D) one parameter at a time (at most the largest one)
            m.gate = m.dtype_bytes * (2 * m.parameters + m.largest)
    for spec, d, _ in learners:  # on-policy: the longest sequence a student samples (prompt + new tokens)
        m = next((m for m in est.models if m.name == spec.name), None)
        if m is not None and d.on_policy is not None:
            prefix = d.on_policy.prompts == "prefix" or not (cfg.data.prompt_field or cfg.data.messages_field)
            m.sample_tokens = (min(seq, d.on_policy.prefix_tokens) if prefix else seq) + d.on_policy.max_new_tokens
    # models that learn from each other hold their forwards at once: every peer; a listening teacher and the
    # students it listens to (and, through the teacher, every student)
    if cfg.mode == "mutual" or cfg.listening:
        est.together = [s.name for s, _, sources in learners if sources]
        if cfg.listening:
            est.together = list(dict.fromkeys([teacher_name, *est.together]))
    est.sources = max(1, len({n for _, _, sources in learners for n in sources}))
    if cfg.mode == "mutual":
        pass  # every peer's logits are held with its forward (counted in its phase)
    elif est.cross and teacher is not None:  # chunk likelihoods read only the teacher's CE per position
        est.kept_per_position = boundary_bytes(settings, teacher, [m for m in est.models if m.name != teacher_name])
    elif cfg.teacher.cache or (teacher is not None and all(d.targets == "topk" for d in settings)):
        k = max(d.top_k for d in settings)
        est.kept_per_position = topk_bytes_per_position(min(k, vocab))
    elif teacher is not None and not cfg.listening:
        est.kept_per_position = teacher.width * teacher.dtype_bytes  # the detached logits, for every student
    est.fused_rows = fused_rows(vocab, cfg.distill.chunk_tokens)
    est.runtime = runtime_bytes(device)  # after the models' code was imported above
    return est


def smoothed_teacher(cfg: RunConfig, tokenizer, seq_len: int, world_size: int, device: str) -> ModelMemory:
    """The teacher's moving average (distill.teacher_ema, codistill/ema.py): a frozen copy of the teacher
    (partitioned alike under ZeRO-3), and where it trains in bf16/fp16 the average in fp32 beside it."""
    from .ema import shadow_name

    spec = cfg.teacher.model_copy(update={"name": shadow_name(cfg.teacher.name), "gradient_checkpointing": False})
    ds = resolve_deepspeed_config(cfg.teacher, cfg.train, world_size, on_cpu=device == "cpu", trainable=False)
    m = _model_memory(spec, model_config(cfg.teacher, tokenizer), ds, False, world_size, cfg.train.micro_batch_size,
                      seq_len, len(tokenizer))
    if m.dtype_bytes < 4:
        m.params += 4 * m.parameters // (world_size if m.stage == 3 else 1)
    return m


def boundary_bytes(settings: list, teacher: ModelMemory, students: list[ModelMemory]) -> int:
    """Bytes per position the students' phase holds of a teacher with another tokenizer whose logits it reads
    (sorted or projected distributions; 0 for chunk likelihoods): its logits, and the rows at common boundaries
    (at most one per position): the student's copy and its gradient with the projected targets (fp32 rows, or
    top-k), or the sorted method's fp32 copies of both sides' rows and their softmax."""
    def rows(d) -> int:
        if d.cross_tokenizer == "sorted":
            return 8 * (width + teacher.width)
        return width * 2 * dtype + (topk_bytes_per_position(d.top_k) if d.targets == "topk" else 4 * width)

    readers = [d for d in settings if d.cross_tokenizer in READS_LOGITS]
    if not readers:
        return 0
    width, dtype = max(m.width for m in students), max(m.dtype_bytes for m in students)
    return 2 * teacher.width * teacher.dtype_bytes + max(map(rows, readers))  # its logits, their boundary rows


def estimate(cfg: RunConfig, world_size: int, device: Optional[str] = None) -> Estimate:
    """Expected memory per rank of the run ``cfg`` on ``world_size`` ranks (see the module doc), with the
    fused-linear path where ``distill.fused_linear`` puts it (auto: below ZeRO-3, where it lowers the step's peak)."""
    est = _plain_estimate(cfg, world_size, device)
    setting = cfg.distill.fused_linear
    cached = cfg.teacher is not None and bool(cfg.teacher.cache)
    live = cfg.mode == "mutual" or any(m.name == est.teacher for m in est.models)
    if not live or not all(m.linear_head for m in est.models) or setting is False or est.cross:
        return est
    if setting is True:
        return est.with_fused()
    if static_problem(cfg.mode, cached) is None and est.vocab >= FUSED_AUTO_VOCAB \
            and auto_problem([m.stage for m in est.models]) is None and est.fused_lowers_peak():
        return est.with_fused()
    return est


def fused_lowers_peak(cfg: RunConfig, world_size: int, device: str) -> bool:
    """Whether ``distill.fused_linear`` lowers this run's expected step peak per rank (see
    :meth:`Estimate.fused_lowers_peak`), whatever the config sets it to."""
    return _plain_estimate(cfg, world_size, device).fused_lowers_peak()


def recommendation(cfg: RunConfig, est: Estimate, device_memory: int, headroom: float) -> list[str]:
    """The micro-batch to choose: the largest that leaves ``headroom`` of ``device_memory`` free (allocator
    fragmentation, what the estimate leaves out), the global batch it makes, and the memory switches it assumes."""
    fit = est.largest_micro_batch(int(device_memory * (1 - headroom)))
    steps = cfg.train.gradient_accumulation_steps
    switches = (f"fused-linear losses {'on' if est.fused else 'off'}; activation checkpointing "
                + ", ".join(f"{s.name} {'on' if s.gradient_checkpointing else 'off'}" for s in cfg.models))
    if not fit:
        return [f"  recommended: nothing fits with {headroom:.0%} headroom ({switches})"]
    return [f"  recommended micro-batch with {headroom:.0%} headroom: train.micro_batch_size={fit} (global batch "
            f"{fit} x {steps} accumulation x {est.world_size} rank(s) = {fit * steps * est.world_size} sequences of "
            f"{est.seq_len} tokens; configured: {cfg.train.micro_batch_size})",
            f"  assumes: {switches}"]


def report(cfg: RunConfig, world_size: int, device: Optional[str] = None,
           device_memory: Optional[int] = None, headroom: float = 0.15) -> list[str]:
    """The estimate as lines of text; ``device_memory`` defaults to this machine's (a GPU's
    total memory, or on CPU the RAM shared by the ranks of one node), and the recommendation leaves
    ``headroom`` of it free."""
    est = estimate(cfg, world_size, device)
    if device_memory is None and est.device == "cuda" and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(0).total_memory
    elif device_memory is None and est.device == "cpu":
        import os

        local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, os.cpu_count() or 1)))
        device_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)
    return est.lines(device_memory) + (recommendation(cfg, est, device_memory, headroom) if device_memory else [])
