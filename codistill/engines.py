"""DeepSpeed engines: one per model, every engine on the same ranks (the world group).

Each model keeps its own DeepSpeed section (ZeRO stage, offload, precision, optimizer,
scheduler); the batch geometry is shared and filled in from the ``train`` section.
This is where a model becomes an engine, trainable or frozen, and the one place that
knows how DeepSpeed wants its config.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import accelerator  # noqa: F401  (first: sets DS_ACCELERATOR before anything imports deepspeed)
from .config import ConfigError, ModelSpec, RunConfig, TrainConfig, load_deepspeed_config
from .crosstok import CROSS
from .errors import quoted
from .models import build_model, enable_checkpointing

_ADAM = {"adam", "adamw"}


def quiet_library_noise() -> None:
    """torch 2.13 warns ~70 times per ZeRO step about deprecated collectives; DeepSpeed
    prints its whole config per engine; transformers draws a progress bar (carriage returns)
    per pretrained model it loads. None helps a user reading the run's log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._(all_gather_base|reduce_scatter_base).*")
    from deepspeed.utils import logger as ds_logger
    from transformers.utils import logging as hf_logging

    ds_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _known_deepspeed_keys() -> set[str]:
    """Every top-level key DeepSpeed's config reader looks up (the string constants it names them by)."""
    import deepspeed.runtime.constants as constants

    keys = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    return keys | {"zero_optimization", "bf16", "fp16", "amp", "activation_checkpointing", "flops_profiler",
                   "tensorboard", "wandb", "csv_monitor", "comet", "checkpoint", "data_types", "compile",
                   "aio", "nebula", "autotuning", "elasticity", "pipeline", "compression_training",
                   "data_efficiency", "curriculum_learning", "sparse_attention", "weight_quantization",
                   "hybrid_engine", "torch_autocast", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"}


def check_deepspeed_sections(name: str, ds: dict[str, Any]) -> None:
    """What can be checked of a DeepSpeed config before any process group: the ZeRO section
    against DeepSpeed's own schema, and top-level keys that look like a misspelling of one
    DeepSpeed reads (DeepSpeed itself ignores unknown keys silently)."""
    import difflib

    from pydantic import ValidationError

    for section in ("bf16", "fp16", "optimizer", "scheduler", "checkpoint"):
        if ds.get(section) is not None and not isinstance(ds[section], dict):
            raise ConfigError(f"{name}.deepspeed.{section}: expected a mapping, got {quoted(ds[section])}")
    clip = ds.get("gradient_clipping")
    if clip is not None and not _nonnegative(clip):  # DeepSpeed clips only above 0: a negative value would not clip
        raise ConfigError(f"{name}.deepspeed.gradient_clipping: expected a finite number >= 0 (0: no clipping), "
                          f"got {quoted(clip)}")
    zero = ds.get("zero_optimization")
    if zero is not None:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        if not isinstance(zero, dict):
            raise ConfigError(f"{name}.deepspeed.zero_optimization: expected a mapping, got {type(zero).__name__}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                DeepSpeedZeroConfig(**zero)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            what = "unknown key" if err["type"] == "extra_forbidden" else _choices_once(err["msg"].lower())
            raise ConfigError(f"{name}.deepspeed.zero_optimization.{key}: {what} (got {quoted(err.get('input'))})") from None
    known = _known_deepspeed_keys()
    for key in ds:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if key not in known and close:
            raise ConfigError(f"{name}.deepspeed.{key}: not a DeepSpeed key; did you mean '{close[0]}'?")


def _choices_once(message: str) -> str:
    """'input should be 0, 1, 2, 3 or 3' (an enum with an alias) as 'input should be 0, 1, 2 or 3'."""
    match = re.fullmatch(r"(.*should be )(.+) or (.+)", message)
    if not match:
        return message
    choices = list(dict.fromkeys([*match.group(2).split(", "), match.group(3)]))
    return match.group(1) + (", ".join(choices[:-1]) + " or " if len(choices) > 1 else "") + choices[-1]


def check_optimizer(name: str, kind: str) -> None:
    """DeepSpeed builds its own optimizers by name and any of torch.optim's; anything else would fail
    only once the process group exists."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    builtin = set(DEEPSPEED_OPTIMIZERS) | {"onebitadam", "zerooneadam", "onebitlamb"}
    torch_names = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)}
    if str(kind).lower() not in builtin and kind not in torch_names:
        raise ConfigError(f"{name}.deepspeed.optimizer.type: '{kind}' is not an optimizer DeepSpeed knows (its own: "
                          f"{', '.join(sorted(builtin))}; or a torch.optim class such as SGD)")


_NONNEGATIVE = ("lr", "eps", "weight_decay", "momentum")  # what every torch/DeepSpeed optimizer refuses below 0


def _nonnegative(value: Any) -> bool:
    """Whether ``value`` is a finite number >= 0 (a boolean is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def check_optimizer_params(name: str, params: Any) -> None:
    """The optimizer's common hyper-parameters as numbers in range, named by key (the optimizers
    themselves refuse them only once the process group exists, with a bare traceback); a number
    YAML read as text (``3e-4``) becomes the number."""
    if params is None:
        return
    key = f"{name}.deepspeed.optimizer.params"
    if not isinstance(params, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(params).__name__}")
    for k in _NONNEGATIVE:
        v = params.get(k)
        if v is None:
            continue
        if isinstance(v, str):  # YAML 1.1 reads 3e-4 (no dot) as text: take it as the number it spells
            try:
                v = params[k] = float(v)
            except ValueError:
                pass
        if not _nonnegative(v):
            raise ConfigError(f"{key}.{k}: expected a finite number >= 0, got {quoted(v)}")
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), got {quoted(betas)}")


# DeepSpeed's own Adam takes these besides torch's (FusedAdam's and DeepSpeedCPUAdam's switches)
_DEEPSPEED_ADAM_KEYS = {"torch_adam", "adam_w_mode", "bias_correction", "set_grad_none"}


def _takes(cls: type, skip: int) -> Optional[set[str]]:
    """The keyword arguments ``cls`` accepts after its first ``skip`` (None: it takes any)."""
    params = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_section_keys(where: str, given: dict, accepted: Optional[set[str]], what: str) -> None:
    """Keys a constructor would refuse with a bare TypeError once the process group exists."""
    unknown = sorted(set(given) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not a parameter of {what} (it takes {', '.join(sorted(accepted))})")


def check_optimizer_keys(name: str, kind: str, params: dict) -> None:
    """An optimizer's parameters against what it accepts: DeepSpeed's Adam/AdamW (torch's, plus its own switches) and
    torch.optim's classes; DeepSpeed's other optimizers are left to DeepSpeed."""
    if str(kind).lower() in _ADAM:
        accepted = (_takes(torch.optim.AdamW, 1) or set()) | (_takes(torch.optim.Adam, 1) or set()) | _DEEPSPEED_ADAM_KEYS
    elif isinstance(getattr(torch.optim, str(kind), None), type):
        accepted = _takes(getattr(torch.optim, kind), 1)
    else:
        return
    check_section_keys(f"{name}.deepspeed.optimizer.params", params, accepted, f"optimizer {kind}")


def check_scheduler(name: str, scheduler: Any) -> None:
    """A scheduler DeepSpeed can build (one of its own or torch's, by class name) with parameters it takes."""
    if scheduler is None:
        return
    from deepspeed.runtime import lr_schedules

    key = f"{name}.deepspeed.scheduler"
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("type"), str):
        raise ConfigError(f"{key}: expected a mapping with a type (e.g. WarmupLR)")
    kind = scheduler["type"]
    cls = getattr(lr_schedules, kind, None) or getattr(torch.optim.lr_scheduler, kind, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{key}.type: '{kind}' is not a scheduler DeepSpeed knows (its own: "
                          f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)}; or a torch.optim.lr_scheduler class)")
    params = scheduler.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{key}.params: expected a mapping, got {type(params).__name__}")
    check_section_keys(f"{key}.params", params, _takes(cls, 1), f"scheduler {kind}")


def check_offload_and_precision(name: str, ds: dict[str, Any], on_cpu: bool) -> None:
    """Offloading to NVMe needs its path (DeepSpeed would quietly not offload); fp16 needs a GPU."""
    zero = ds.get("zero_optimization") or {}
    for part in ("offload_optimizer", "offload_param"):
        section = zero.get(part) or {}
        if isinstance(section, dict) and section.get("device") == "nvme" and not section.get("nvme_path"):
            raise ConfigError(f"{name}.deepspeed.zero_optimization.{part}: device nvme needs nvme_path (a folder on "
                              "the NVMe drive to swap to)")
    if on_cpu and bool((ds.get("fp16") or {}).get("enabled")):
        raise ConfigError(f"{name}.deepspeed.fp16.enabled: fp16 needs a GPU (on CPU DeepSpeed trains in fp32 or "
                          "bf16); use bf16.enabled instead")


def optimizer_steps(cfg: RunConfig) -> dict[str, int]:
    """How many optimizer steps each model takes: train.max_steps, less a student's head start or the
    teacher's tail (the config's validator guarantees at least one)."""
    steps = {} if cfg.teacher is None else {cfg.teacher.name: cfg.train.teacher_steps}
    for i, s in enumerate(cfg.students):
        steps[s.name] = cfg.train.max_steps - cfg.distill_for(i).head_start_steps
    return steps


def resolve_deepspeed_config(spec: ModelSpec, train: TrainConfig, world_size: int, on_cpu: bool,
                             trainable: bool = True, steps: Optional[int] = None) -> dict[str, Any]:
    """The model's DeepSpeed JSON with the shared batch geometry filled in and checked.
    A frozen model's optimizer and scheduler sections are dropped (it never steps).
    ``steps``: the optimizer steps this model takes (default train.max_steps; a student
    with a head start takes fewer), which a scheduler's ``total_num_steps: auto`` becomes."""
    ds = load_deepspeed_config(spec)
    check_deepspeed_sections(spec.name, ds)
    check_offload_and_precision(spec.name, ds, on_cpu)
    if not trainable:
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        if zero_stage(ds) in (1, 2):  # they shard optimizer states and gradients: it has none
            ds["zero_optimization"] = {**ds["zero_optimization"], "stage": 0}
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
    ds.setdefault("steps_per_print", 10**9)
    if not trainable:
        return ds
    optimizer = ds.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
        raise ConfigError(f"{spec.name}.deepspeed.optimizer: a trainable model needs an optimizer section with a type "
                          "(a name, e.g. AdamW)")
    check_optimizer(spec.name, optimizer["type"])
    check_optimizer_params(spec.name, optimizer.get("params"))
    check_optimizer_keys(spec.name, optimizer["type"], optimizer.get("params") or {})
    check_scheduler(spec.name, ds.get("scheduler"))
    if on_cpu and optimizer["type"].lower() in _ADAM:
        # DeepSpeed's FusedAdam is a ~65 s JIT compile and CPU-only anyway slower than torch's.
        optimizer["params"] = {"torch_adam": True, **(optimizer.get("params") or {})}
    scheduler_params = (ds.get("scheduler") or {}).get("params", {})
    if scheduler_params.get("total_num_steps") == "auto":
        scheduler_params["total_num_steps"] = max(1, steps if steps is not None else train.max_steps)
    return ds


def deepspeed_configs(cfg: RunConfig, specs: list[ModelSpec], world_size: int,
                      on_cpu: bool) -> dict[str, dict[str, Any]]:
    """Every listed model's resolved DeepSpeed config, by name (checked before any process group)."""
    steps = optimizer_steps(cfg)
    return {s.name: resolve_deepspeed_config(s, cfg.train, world_size, on_cpu, trainable=is_trainable(cfg, s),
                                             steps=steps[s.name])
            for s in specs}


def is_trainable(cfg: RunConfig, spec: ModelSpec) -> bool:
    """Every model trains except the frozen teacher of soft mode."""
    return not (spec is cfg.teacher and cfg.mode == "soft")


def loaded_models(cfg: RunConfig) -> list[ModelSpec]:
    """The models a run builds: all of them, except a teacher that is cached (soft mode) or
    whose text is the data (hard mode)."""
    return [s for s in cfg.models if not (s is cfg.teacher and (s.cache or cfg.mode == "hard"))]


def init_seed(cfg: RunConfig, spec: ModelSpec) -> int:
    """A random init's seed: the model's own ``init_seed``, else train.seed + its position."""
    return spec.init_seed if spec.init_seed is not None else cfg.train.seed + cfg.models.index(spec)


@dataclass
class Member:
    """One model of the run and its engine."""

    spec: ModelSpec
    engine: Any  # deepspeed.DeepSpeedEngine
    trainable: bool = True  # False for the frozen teacher of soft mode
    vocab: Optional[int] = None  # its own vocabulary: a teacher with another tokenizer, reading its own columns
    about: Optional[str] = None  # where its weights come from, when neither a random init nor a folder
    side: str = ""  # the prefix of the columns it reads: CROSS for such a teacher, crosstok.side_prefix(k) for a
    # student with a tokenizer of its own; "" for the run's

    @property
    def name(self) -> str:
        return self.spec.name


def view(member: Member, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The micro-batch as ``member`` reads it: its own tokenization of the same text for a teacher with another
    tokenizer (ids, attention, labels and mask); for a student with a tokenizer of its own, its side's columns
    under the plain names (its chunks against the teacher's tokens too) beside the teacher's; the batch itself for
    every other model."""
    if not member.side:
        return batch
    own = ("input_ids", "attention_mask", "labels", "mask")
    if member.side == CROSS:
        return {key: batch[CROSS + key] for key in own}
    seen = {key: value for key, value in batch.items() if key.startswith(CROSS)}
    return seen | {key: batch[member.side + key] for key in (*own, "student_chunk", "teacher_chunk")}


def half_precision(ds_config: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config trains in bf16 or fp16."""
    return any(bool((ds_config.get(key) or {}).get("enabled")) for key in ("bf16", "fp16"))


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a zero_optimization section)."""
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def build_engine(spec: ModelSpec, hf_config, ds_config: dict[str, Any], seed: int, trainable: bool,
                 vocab: Optional[int] = None, side: str = "") -> Member:
    """The model's weights (random init under ``seed``, or loaded) wrapped in its DeepSpeed
    engine; a frozen model gets an inference-only engine (no optimizer, eval mode, no grads)."""
    import deepspeed

    stage3 = zero_stage(ds_config) == 3
    model = build_model(spec, hf_config, seed=seed, zero3=ds_config if stage3 else None)  # ZeRO-3: never whole
    if spec.gradient_checkpointing and trainable:  # a frozen model keeps no activations to recompute
        enable_checkpointing(model)
    with _muon_uncompiled(ds_config):
        if not trainable:
            engine, *_ = deepspeed.initialize(model=model.requires_grad_(False).eval(), config=ds_config)
            return Member(spec, engine, trainable=False, vocab=vocab, side=side)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
    return Member(spec, engine, vocab=vocab, side=side)


@contextlib.contextmanager
def _muon_uncompiled(ds_config: dict[str, Any]):
    """deepspeed.initialize under ZeRO imports DeepSpeed's Muon optimizer to check the run's optimizer against it, and
    Muon's ``torch.compile`` decorators load TorchInductor: about 2 s of a core per rank at every start, for an
    optimizer the run does not use. Unless the config asks for Muon or for DeepSpeed's compile section, TorchDynamo
    is off while the engine is built (TORCHDYNAMO_DISABLE, read when a function is decorated): Muon's functions stay
    plain Python, and nothing else DeepSpeed builds there is compiled. A user's own TORCHDYNAMO_DISABLE is left as
    it is."""
    kind = str((ds_config.get("optimizer") or {}).get("type", ""))
    if "muon" in kind.lower() or ds_config.get("compile") or "TORCHDYNAMO_DISABLE" in os.environ:
        yield
        return
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)


def forward_logits(member: Member, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """[B, S, V] logits over the tokenizer's real vocabulary (embedding padding sliced away); ``batch`` is as the
    member reads it (:func:`view`), ``vocab`` the run's unless the member has its own."""
    out = member.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[..., :member.vocab or vocab]


def module_logits(member: Member, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """As :func:`forward_logits`, through the bare module: DeepSpeed's backward hooks are not attached
    to the output, so a gradient of it (``torch.autograd.grad``) leaves the engine's state alone."""
    out = member.engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False)
    return out.logits[..., :member.vocab or vocab]


_NO_POSITIONS = None  # an empty index: the model's own head projects no position (logits_to_keep)


def _hidden_of(module: torch.nn.Module, call, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states [B, S, H] the model's LM head would read, from ``call`` (the engine or
    the bare module) with the head projecting no position: the body's output, caught by a hook."""
    global _NO_POSITIONS
    if _NO_POSITIONS is None or _NO_POSITIONS.device != batch["input_ids"].device:
        _NO_POSITIONS = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    caught = []
    handle = module.base_model.register_forward_hook(lambda _m, _i, out: caught.append(out[0]))
    try:
        call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
             logits_to_keep=_NO_POSITIONS)
    finally:
        handle.remove()
    return caught[-1]


def forward_hidden(member: Member, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """As :func:`forward_logits`, the hidden states before the LM head instead of its [B, S, V] logits."""
    return _hidden_of(member.engine.module, member.engine, batch)


def module_hidden(member: Member, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """As :func:`module_logits`, the hidden states before the LM head."""
    return _hidden_of(member.engine.module, member.engine.module, batch)


def lm_head(member: Member) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LM head's weight [V_emb, H] and bias (None if it has none)."""
    head = member.engine.module.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def heads_gathered(*members: Member):
    """A context in which the LM heads of ``members`` are whole on every rank: ZeRO-3 partitions a weight
    outside its module's forward, and the fused pass reads heads (and hands their gradients over, which
    must find them whole when they accumulate) outside it. Enter it after the forwards (a module must
    not run while its weight is gathered by hand) and leave it after the backwards; every rank enters it
    in the same order. A no-op below ZeRO-3."""
    params = [p for m in members if m.engine.zero_optimization_stage() == 3
              for p in lm_head(m) if p is not None]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fused_head_problem(member: Member, vocab: int) -> Optional[str]:
    """Why this model's logits are not exactly ``hidden·Wᵀ + b`` of its final hidden states (a head that
    is not a linear map, logit scaling or soft-capping), checked on a short input; None when they are."""
    module = member.engine.module
    head = module.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or not hasattr(module, "base_model") or module.base_model is module:
        return f"its LM head is {type(head).__name__}, not a linear layer after a base model"
    device = next(module.parameters()).device
    ids = torch.arange(8, device=device).remainder(vocab).unsqueeze(0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = module_logits(member, batch, vocab).float()
            hidden = module_hidden(member, batch)
            with heads_gathered(member):
                weight, bias = lm_head(member)
                again = torch.nn.functional.linear(hidden, weight, bias)[..., :vocab].float()
    except (TypeError, ValueError, RuntimeError) as err:  # no logits_to_keep, another output layout
        return f"its forward does not give its hidden states apart from its logits ({err})"
    finally:
        module.train(was_training)
    scale = logits.abs().max().clamp(min=1.0)
    if again.shape != logits.shape or not torch.allclose(again, logits, atol=1e-4 * float(scale), rtol=1e-3):
        return "its logits are not its head's linear map of its final hidden states (scaled or capped)"
    return None


@contextlib.contextmanager
def whole_for_generation(member: Member):
    """The model's module ready for a generation's many small forwards, in eval mode (no dropout, a KV cache
    even with gradient checkpointing on). At ZeRO-3 every parameter is gathered once for the whole generation
    (the model whole on this rank meanwhile) and DeepSpeed's per-module hooks, which would gather and release
    each layer at every token and make every rank run as many forwards, are set aside until it ends. Every
    rank enters it together; inside, each rank may run any number of forwards."""
    module = member.engine.module
    training = module.training
    module.eval()
    try:
        if member.engine.zero_optimization_stage() != 3:
            yield module
            return
        import deepspeed

        offload = getattr(member.engine.optimizer, "parameter_offload", None)
        if offload is None or not hasattr(offload, "_register_deepspeed_module"):
            raise RuntimeError(f"{member.name}: this DeepSpeed ({deepspeed.__version__}) does not expose the "
                               "ZeRO-3 module hooks that on-policy sampling sets aside")
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            offload._remove_module_hooks()
            try:
                yield module
            finally:
                for param in module.parameters():
                    param.ds_active_sub_modules.clear()
                offload.forward_hooks, offload.backward_hooks = [], []
                offload.fwd_pre_hook = module.register_forward_pre_hook(
                    lambda *_: offload.get_param_coordinator().reset_step())
                offload._register_deepspeed_module(module)
    finally:
        module.train(training)
