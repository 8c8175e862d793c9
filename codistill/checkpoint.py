"""Checkpoints on disk: one directory per step holding every engine and the trainer state."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .config import ConfigError

CHECKPOINTS = "checkpoints"


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step_{step:08d}"


def refuse_foreign_checkpoints(output_dir: Path, overwrite: bool) -> None:
    """Never write over another run's checkpoints unless the user said so."""
    root = output_dir / CHECKPOINTS
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds checkpoints of another run; choose a new "
            "output_dir or pass overwrite=true"
        )


def save(output_dir: Path, step: int, engines: Iterable[tuple[str, object]], state: dict, is_main: bool) -> Path:
    """Every engine's DeepSpeed checkpoint under ``step_<N>/<model>`` plus ``trainer_state.json``."""
    root = step_dir(output_dir, step)
    for name, engine in engines:
        engine.save_checkpoint(str(root / name), tag=f"global_step{step}")
    if is_main:
        (root / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    torch.distributed.barrier()
    return root
