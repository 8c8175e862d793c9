"""Everything that can be wrong with a run's input, checked before any process group or engine exists, so
a typo costs seconds and leaves nothing behind: the data source, the tokenizer, every model against it,
the DeepSpeed configs and the checkpoint to resume from. Ends by claiming the output folder."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import checkpoint, distributed, identity, selection
from .cache import TeacherCache
from .config import ConfigError, ModelSpec, RunConfig, is_resolved_config
from .crosstok import CROSS
from .data import check_data_source, run_tokenizer, student_sides, teacher_tokenizer, tokenizer_fingerprint
from .engines import deepspeed_configs, half_precision, loaded_models, zero_stage
from .fused import static_problem
from .models import check_attention, check_model, model_config

log = logging.getLogger("codistill")


def check_sample_lengths(cfg: RunConfig, hf_configs: dict) -> None:
    """An on-policy student's samples (its prompt, at most the prefix or a whole row, plus max_new_tokens) must
    fit its positions and the teacher's, which scores them."""
    prompted = bool(cfg.data.prompt_field or cfg.data.messages_field)
    for spec, d, _ in cfg.learners():
        p = d.on_policy
        if p is None:
            continue
        prompt = cfg.data.seq_len if prompted and p.prompts != "prefix" else min(p.prefix_tokens, cfg.data.seq_len)
        for name in (spec.name, cfg.teacher.name):
            positions = getattr(hf_configs.get(name), "max_position_embeddings", None)
            if positions is not None and prompt + p.max_new_tokens > positions:
                raise ConfigError(f"{spec.name}.distill.on_policy: a prompt of up to {prompt} tokens plus "
                                  f"max_new_tokens={p.max_new_tokens} exceeds {name}'s max_position_embeddings="
                                  f"{positions}; lower max_new_tokens (or prefix_tokens, data.seq_len)")


@dataclass
class Inputs:
    """What the checks found, for the set-up that follows."""

    tokenizer: Any
    tokenizer_fp: str
    specs: list[ModelSpec]  # the models to load (the teacher first, when it is loaded)
    hf_configs: dict[str, Any]  # by model name
    ds_configs: dict[str, dict]  # by model name
    resume_from: Optional[Path]
    saved_world: int  # the number of ranks the checkpoint to resume from was written by (else this run's)
    release: Callable[[], None]  # frees the output folder for another run
    teacher_tokenizer: Any = None  # the teacher's own, where it differs from the run's (codistill/crosstok.py)
    teacher_name: Optional[str] = None
    sides: dict[str, tuple[str, Any]] = field(default_factory=dict)  # students with their own (data.student_sides)

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)

    def own_vocab(self, spec: ModelSpec) -> Optional[int]:
        """The vocabulary of a model that reads its own tokenization (the teacher with another tokenizer, a
        student with its own)."""
        if spec.name in self.sides:
            return len(self.sides[spec.name][1])
        cross = self.teacher_tokenizer is not None and spec.name == self.teacher_name
        return len(self.teacher_tokenizer) if cross else None

    def side(self, spec: ModelSpec) -> str:
        """The prefix of the columns a model reads (codistill/engines.py ``view``)."""
        if spec.name in self.sides:
            return self.sides[spec.name][0]
        return CROSS if self.teacher_tokenizer is not None and spec.name == self.teacher_name else ""


def check_cross(cfg: RunConfig) -> None:
    """What distillation across tokenizers does not do yet, each refused in one line naming the key."""
    t = cfg.teacher.name
    source = f"{t}.tokenizer" if cfg.teacher.tokenizer else f"the one in {t}.pretrained"
    where = f"a teacher with another tokenizer ({source})"
    if cfg.data.prompt_field or cfg.data.messages_field or not cfg.data.pack:
        raise ConfigError(f"data: {where} reads packed plain text only (data.pack=true, no data.prompt_field or "
                          "data.messages_field)")
    if cfg.distill.fused_linear is True:
        raise ConfigError(f"distill.fused_linear=true: {where} takes the logits path; set it to auto or false")
    if cfg.listening:
        raise ConfigError(f"{cfg.teacher.name}.distill: {where} does not listen to its students")
    if cfg.teacher.cache and any(d.cross_tokenizer != "likelihood" for _, d, _ in cfg.learners()):
        raise ConfigError(f"distill.cross_tokenizer: a cached teacher ({t}.cache) with another tokenizer holds its "
                          "CE per position, what cross_tokenizer=likelihood reads; set it to likelihood")
    for spec, d, _ in cfg.learners():
        for key, on in (("token_filter", d.token_filter), ("on_policy", d.on_policy is not None)):
            if on:
                raise ConfigError(f"{spec.name}.distill.{key}: not available with {where}; set it to "
                                  f"{'null' if key == 'on_policy' else 'false'}")


def own_tokenizers(cfg: RunConfig, specs: list[ModelSpec], hf_configs: dict[str, Any], run: Any, own: Any,
                   sides: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """The tokenizer each model reads (the run's, a teacher's ``own``, a student's of ``sides``), its vocabulary put
    in ``hf_configs``, after the checks of what reading another tokenizer does not do yet."""
    if own is not None:
        check_cross(cfg)
    check_sides(cfg, sides, own)
    readers = {s.name: own if own is not None and s is cfg.teacher else sides[s.name][1] if s.name in sides else run
               for s in specs}
    hf_configs.update({s.name: model_config(s, readers[s.name]) for s in specs if readers[s.name] is not run})
    return readers


def check_sides(cfg: RunConfig, sides: dict[str, tuple[str, Any]], own: Any) -> None:
    """What students with tokenizers of their own need, each refused in one line naming the key."""
    if not sides:
        return
    spec = next(s for s in cfg.students if s.name in sides)
    key = f"{spec.name}.tokenizer" if spec.tokenizer else f"{spec.name}.pretrained"
    if own is None:
        raise ConfigError(f"{key}: a student with a tokenizer of its own (differing from data.tokenizer) learns from a "
                          "teacher with its own too (teacher.tokenizer, or the one in teacher.pretrained); set "
                          "data.tokenizer to one student's and teacher.tokenizer to the teacher's")
    if cfg.teacher.cache:
        raise ConfigError(f"{cfg.teacher.name}.cache: a cache is made over the blocks of one students' tokenizer; "
                          f"{spec.name} has its own ({key}): distil from the live teacher (teacher.pretrained)")


def check_inputs(cfg: RunConfig, output_dir: Path) -> Inputs:
    """Check the run's input (see the module docstring); a problem raises :class:`ConfigError`."""
    check_data_source(cfg.data)
    tokenizer = run_tokenizer(cfg)
    vocab, tokenizer_fp = len(tokenizer), tokenizer_fingerprint(tokenizer)
    for spec, d, _ in cfg.learners():
        if cfg.mode != "hard" and d.targets == "topk" and d.top_k >= vocab:
            raise ConfigError(f"{spec.name}: distill.top_k={d.top_k} is not below the vocabulary's "
                              f"{vocab:,} tokens; top-k targets keep k < V (targets: full keeps them all)")
    specs = loaded_models(cfg)
    hf_configs = {s.name: model_config(s, tokenizer) for s in specs}
    own, sides = teacher_tokenizer(cfg, tokenizer), student_sides(cfg, tokenizer)
    readers = own_tokenizers(cfg, specs, hf_configs, tokenizer, own, sides)
    for spec in specs:
        tok = readers[spec.name]
        fingerprint = tokenizer_fp if tok is tokenizer else tokenizer_fingerprint(tok)  # (once per tokenizer)
        teacher_side = tok is own and bool(cfg.data.teacher_seq_len)
        check_model(spec, hf_configs[spec.name], tok, fingerprint, cfg.data.teacher_block if tok is own else
                    cfg.data.seq_len, "data.teacher_seq_len" if teacher_side else None)
    if own is None and cfg.data.teacher_seq_len:
        raise ConfigError(f"data.teacher_seq_len={cfg.data.teacher_seq_len}: a teacher's own side of the blocks exists "
                          "only with a tokenizer of its own (teacher.tokenizer, or one in teacher.pretrained); remove it")
    check_sample_lengths(cfg, hf_configs)
    cached = cfg.teacher is not None and bool(cfg.teacher.cache)
    if cached:
        TeacherCache.check_ready(Path(cfg.teacher.cache).expanduser())
    world_size = distributed.env_world_size()
    ds_configs = deepspeed_configs(cfg, specs, world_size, on_cpu=not torch.cuda.is_available())
    selection.check_in_memory(cfg, ds_configs)
    for spec in specs:
        check_attention(spec, hf_configs[spec.name], half_precision(ds_configs[spec.name]))
    refusal = static_problem(cfg.mode, cached)
    if cfg.distill.fused_linear is True and refusal:
        raise ConfigError(f"distill.fused_linear=true: {refusal}; set it to auto or false")
    written = output_dir / "config.yaml"
    if written.exists() and not is_resolved_config(written):
        raise ConfigError(f"output_dir: {written} is not a config this program wrote, and the run would replace "
                          "it with its resolved config; move it or choose another output_dir")
    checkpoint.refuse_foreign_checkpoints(output_dir, cfg.overwrite, cfg.resume)
    resume_from = checkpoint.find_resume(output_dir, cfg.resume)
    state = checkpoint.read_state(resume_from) if resume_from else {}
    if resume_from:
        changed = identity.check_resume(cfg, output_dir, resume_from, state)
        if changed and distributed.env_rank() == 0:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
    # A checkpoint from another number of ranks is loaded through DeepSpeed's universal
    # format (ZeRO-partitioned optimizer states re-sliced for the new world).
    saved_world = state.get("world_size", world_size)
    if saved_world != world_size:
        for ds in ds_configs.values():
            if zero_stage(ds) > 0:
                ds.setdefault("checkpoint", {})["load_universal"] = True
    # One run per output_dir: another would remove this one's staging folders, or it theirs.
    release = checkpoint.claim(output_dir) if distributed.env_rank() == 0 else (lambda: None)
    return Inputs(tokenizer, tokenizer_fp, specs, hf_configs, ds_configs, resume_from, saved_world, release, own,
                  None if cfg.teacher is None else cfg.teacher.name, sides)
