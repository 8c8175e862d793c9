"""Building causal LMs from a transformers config or a local pretrained folder, and
the checks that make a teacher and its students comparable token by token.

All checks run on configs, before any weights exist, so bad input fails fast.
"""
from __future__ import annotations

import difflib
import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from . import accelerator  # noqa: F401  (first: sets DS_ACCELERATOR before anything imports deepspeed)
from .config import ConfigError, ModelSpec
from .data import load_tokenizer, pretrained_tokenizer_dir, tokenizer_fingerprint

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def _pretrained_dir(spec: ModelSpec) -> Path:
    path = Path(spec.pretrained).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{spec.name}.pretrained: {path} is not a model folder (no config.json)")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
        raise ConfigError(f"{spec.name}.pretrained: {path} holds no weights (*.safetensors or pytorch_model*.bin)")
    for weights in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise ConfigError(f"{spec.name}.pretrained: {weights} {problem}")
    return path


def _safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file's framing (header, tensor extents), read without
    loading a tensor; None if nothing. Catches truncated and garbage files before any process group."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            if length > size - 8:
                return f"is truncated or not a safetensors file ({size:,} bytes, header of {length:,} announced)"
            header = json.loads(fh.read(length))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is not a safetensors file (its header cannot be read)"
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"is truncated ({size:,} bytes of the {needed:,} its header describes)"
    return None


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "max_position_embeddings", "vocab_size", "head_dim")  # a transformers config's sizes: each must be > 0


def model_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config the model will be built from (no weights are touched).

    A random-init model gets the tokenizer's vocabulary size (unless ``config.vocab_size``
    pads it larger) and its bos/eos/pad ids.
    """
    if spec.pretrained:
        path = _pretrained_dir(spec)
        try:
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a truncated or edited config.json
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{spec.name}.pretrained: {path / 'config.json'} cannot be read as a transformers "
                              f"config ({first[:200]})") from None
        _check_language_model(spec, cfg, f"{spec.name}.pretrained: {path} holds")
        return cfg
    kwargs = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **spec.config,
    }
    from transformers import CONFIG_MAPPING

    if spec.arch not in CONFIG_MAPPING:
        close = difflib.get_close_matches(spec.arch, list(CONFIG_MAPPING.keys()), n=3)
        raise ConfigError(f"{spec.name}.arch: '{spec.arch}' is not a transformers model type"
                          + (f" (close: {', '.join(close)})" if close else " (e.g. llama, gpt2, qwen2, mistral)"))
    try:
        cfg = AutoConfig.for_model(spec.arch, **kwargs)
    except Exception as exc:  # transformers' own checks of the values (a strict dataclass, or the config's __init__)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(f"{spec.name}.config: transformers refuses it for arch '{spec.arch}': "
                          f"{(lines[-1] if lines else type(exc).__name__)[:200]}") from None
    for attr in _SIZES:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{spec.name}.config.{attr}: expected a positive integer, got {value}")
    _check_language_model(spec, cfg, f"{spec.name}.arch:")
    return cfg


def _check_language_model(spec: ModelSpec, cfg: PretrainedConfig, where: str) -> None:
    """A model every run can train: a causal language model of transformers (or one a trusted folder
    defines) with an activation transformers knows."""
    from transformers.activations import ACT2FN
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    own = spec.trust_remote_code and "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {})
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not own:
        raise ConfigError(f"{where} '{cfg.model_type}' is not a causal language model transformers can build "
                          "(e.g. llama, gpt2, qwen2, mistral)")
    for attr in ("hidden_act", "activation_function"):
        value = getattr(cfg, attr, None)
        if isinstance(value, str) and value not in ACT2FN:
            raise ConfigError(f"{spec.name}.config.{attr}: '{value[:200]}' is not an activation transformers knows "
                              "(e.g. silu, gelu, gelu_new, relu)")


def check_model(spec: ModelSpec, cfg: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                tokenizer_fp: str, seq_len: int, length_key: Optional[str] = None) -> None:
    """Refuse a model that cannot read this run's token ids or sequence length."""
    own = pretrained_tokenizer_dir(spec)
    if own is not None and tokenizer_fingerprint(load_tokenizer(own)) != tokenizer_fp:
        raise ConfigError(
            f"{spec.name}.pretrained: the tokenizer in {own} differs from the one it would read; a model reads "
            "the tokenizer its weights learned (a student its own beside a teacher with its own, in modes "
            "codistill and soft; else data.tokenizer, shared)"
        )
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None or vocab < len(tokenizer):
        raise ConfigError(
            f"{spec.name}: embedding rows ({vocab}) are fewer than the tokenizer's {len(tokenizer)} tokens; "
            "teacher and students must share the tokenizer's vocabulary"
        )
    positions = getattr(cfg, "max_position_embeddings", None)
    key = length_key or "data.seq_len"
    if positions is not None and seq_len > positions:
        raise ConfigError(f"{key}={seq_len} exceeds {spec.name}'s max_position_embeddings={positions}; lower {key} "
                          "or raise the model's positions")


def check_attention(spec: ModelSpec, cfg: PretrainedConfig, half: bool) -> None:
    """Refuse an ``attn_implementation`` this model, this machine or this precision cannot run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import is_flash_attn_2_available

    choice, key = spec.attn_implementation, f"{spec.name}.attn_implementation"
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)  # None for remote code: transformers checks it then
    if choice == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", False):
        raise ConfigError(f"{key}: {cls.__name__} has no sdpa attention in this transformers; use eager")
    if choice != "flash_attention_2":
        return
    if cls is not None and not getattr(cls, "_supports_flash_attn", False):
        raise ConfigError(f"{key}: {cls.__name__} has no flash_attention_2 in this transformers; use sdpa")
    if not is_flash_attn_2_available():
        raise ConfigError(f"{key}: flash_attention_2 needs the flash_attn package and a CUDA GPU, which this "
                          "machine lacks; use sdpa")
    if not half:
        raise ConfigError(f"{key}: flash_attention_2 runs in bf16 or fp16 only; enable bf16 in "
                          f"{spec.name}.deepspeed or use sdpa")


def build_model(spec: ModelSpec, cfg: PretrainedConfig, seed: int,
                zero3: Optional[dict] = None) -> torch.nn.Module:
    """Weights for ``spec``: random init under ``seed`` (identical on every rank) or loaded offline,
    with its attention kernel. With ``zero3`` (the model's DeepSpeed config, ZeRO stage 3) the
    model is built partitioned from the start and no rank ever holds all of it: construction
    under ``deepspeed.zero.Init``, random init by rank 0 one module at a time (the same weights
    as a whole build under the same seed), a pretrained folder loaded module by module."""
    with _partitioned(zero3):
        if spec.pretrained:
            return AutoModelForCausalLM.from_pretrained(
                str(_pretrained_dir(spec)), config=cfg, local_files_only=True,
                trust_remote_code=spec.trust_remote_code, dtype=torch.float32,
                attn_implementation=spec.attn_implementation)
        torch.manual_seed(seed)
        if zero3 is not None:  # transformers builds it empty and has rank 0 initialise it module by module
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=spec.trust_remote_code, dtype=torch.float32,
                                                    attn_implementation=spec.attn_implementation)
        # The same order of random draws, whole: built without init (no draws), then initialised
        # module by module. A plain from_config would first draw every Linear's default init and
        # throw it away, which no partitioned build can reproduce.
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=spec.trust_remote_code,
                                                     dtype=torch.float32, attn_implementation=spec.attn_implementation)
        for module in model.modules():
            module._is_hf_initialized = False
        model.initialize_weights()
        model.tie_weights()
        return model


@contextmanager
def _partitioned(ds_config: Optional[dict]) -> Iterator[None]:
    """transformers' DeepSpeed integration switched on for one build: while an HfDeepSpeedConfig
    of a ZeRO-3 config lives, from_config/from_pretrained construct under zero.Init. Off again
    afterwards, so the next model (perhaps ZeRO-2) is built whole."""
    if ds_config is None:
        yield
        return
    import torch._dynamo  # noqa: F401  (first imported inside zero.Init it breaks tensor construction:
    import transformers.masking_utils  # noqa: F401   ../shared/NOTES-stack.md; so import both before)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        with _returned_to_the_system():
            yield
    finally:
        unset_hf_deepspeed_config()
        del alive


@contextmanager
def _returned_to_the_system() -> Iterator[None]:
    """On a CPU rank (glibc), a partitioned build frees one whole module after another between
    the long-lived shards it keeps; glibc keeps those holes in its heap, and the build's peak
    resident memory ends above a whole build's (measured: 1.6 GB against 1.3 GB for 336M
    parameters on 2 ranks). Tensors of 1 MiB and more are mapped on their own while building, so
    each freed module goes back to the system; afterwards large allocations come from the heap
    again (32 MiB, glibc's own ceiling for its adaptive threshold). On a GPU the build happens
    in device memory and this changes nothing that matters."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # glibc's mallopt parameter number
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer during backward (non-reentrant: works with ZeRO-3's
    parameter hooks and inputs that need no gradient)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: torch.nn.Module) -> int:
    """Total parameters, also under ZeRO-3 where each rank holds a shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def local_parameters(model: torch.nn.Module) -> int:
    """Parameters stored on this rank (a ZeRO-3 shard, or everything)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
