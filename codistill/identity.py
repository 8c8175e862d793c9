"""Which run a folder, a checkpoint and a config belong to.

A run folder records its run's id in ``run.json`` (written at every start); every checkpoint
records it in its trainer state, and ``checkpoints/latest`` beside the newest one's name.
Continuing a run needs nothing but its folder: ``resume`` without ``--config`` takes the run's
own resolved ``config.yaml``; a config that differs from the checkpoint's in what shapes the
models or the data is refused, and a checkpoint of another run is resumed only on purpose
(``resume=<path> adopt=true``).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

from .config import DEFAULT_CONFIG, ConfigError, RunConfig, apply_override, is_resolved_config, load_yaml, today_names
from .files import write_atomically

log = logging.getLogger("codistill")

RUN_RECORD = "run.json"
CONFIG = "config.yaml"
# What a resumed run may not change: the models' shapes and identities, and the data (its source,
# tokenizer, blocks, splits and order). Everything else (learning rates, distillation settings,
# ZeRO stages, precision, batch layout, logging) may change between a stop and its continuation.
SHAPING = re.compile(r"mode|teacher|students|train\.seed|data\.(?!cache_dir$|num_proc$).+"
                     r"|(teacher|students\.\d+)\.(name|arch|pretrained|tokenizer|config(\..+)?)")
IGNORED = ("output_dir", "resume", "overwrite", "adopt", "dry_run", "train.steps_this_run")


def read_run(output_dir: Path) -> Optional[str]:
    """The id of the run ``output_dir`` holds (None: no record, as in folders of earlier releases)."""
    path = output_dir / RUN_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        return str(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"output_dir: {path} is damaged ({type(exc).__name__}); it names the folder's run: "
                          "restore it, or remove it to let the checkpoints' own records decide") from None


def write_run(output_dir: Path, run_id: str) -> None:
    write_atomically(output_dir / RUN_RECORD, json.dumps({"run_id": run_id}) + "\n")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (lists of equal length compared item by
    item; where the run writes and how it starts are not compared)."""
    if prefix.rstrip(".") in IGNORED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new)) for k in changed_keys(old.get(key), new.get(key),
                                                                                 f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def shaping(keys: list[str]) -> list[str]:
    """The keys among ``keys`` that a resumed run may not change."""
    return [k for k in keys if SHAPING.fullmatch(k)]


def check_resume(cfg: RunConfig, output_dir: Path, found: Path, state: dict) -> list[str]:
    """Refuse to resume checkpoint ``found`` (trainer state ``state``) into ``output_dir`` when it is
    another run's and ``adopt`` is off, or when ``cfg`` changes what shapes the models or the data;
    returns the other keys that differ (to be warned about)."""
    owner, folder = state.get("run_id"), read_run(output_dir)
    if folder is not None and owner is not None and owner != folder and not cfg.adopt:
        raise ConfigError(f"resume: {found} belongs to run {owner}, but output_dir {output_dir} holds run {folder}; "
                          f"pass adopt=true to continue run {owner} there, or choose another output_dir")
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []
    changed = changed_keys(today_names(saved), cfg.model_dump(mode="json"))
    refused = shaping(changed)
    if refused:
        shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
        raise ConfigError(f"resume: the config differs from {found}'s in {shown}, which shape the models or the data; "
                          f"continue with the run's own config (codistill-train output_dir={output_dir} resume=auto, "
                          "without --config) or start a new run in another output_dir")
    return changed


def own_config(overrides: list[str]) -> Optional[Path]:
    """The config a run continues with when no ``--config`` is given: with ``resume`` among the
    overrides, the resolved ``config.yaml`` of the run folder it resumes (None: there is none, a
    first start, or no resume: the embedded default)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if item.split("=", 1)[0].strip() in ("output_dir", "resume"):
            apply_override(tree, item)
    resume = tree.get("resume")
    if resume is None:
        return None
    if resume == "auto":
        folder = Path(str(tree.get("output_dir") or _default_output_dir())).expanduser()
    else:
        folder = Path(str(resume)).expanduser()
        if not (folder / CONFIG).exists() and folder.parent.name == "checkpoints":
            folder = folder.parent.parent  # a checkpoint: its run folder
    path = folder / CONFIG
    return path if path.is_file() and is_resolved_config(path) else None


def _default_output_dir() -> str:
    return str(load_yaml(DEFAULT_CONFIG.read_text()).get("output_dir", "runs/tiny"))
