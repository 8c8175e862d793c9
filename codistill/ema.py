"""A smoothed teacher (``distill.teacher_ema = d``): in mode codistill the students learn from an exponential
moving average of the teacher's weights instead of from the teacher itself.

The average is a frozen model of the run, ``<teacher>_ema``, built as a frozen teacher is (an inference engine of
the teacher's own DeepSpeed config, partitioned alike under ZeRO-3), so the micro-step runs it, logs its CE and
validates it as it does any frozen model, and the students' sources name it. After each of the teacher's
optimizer steps every rank moves what it stores of it towards the teacher: its partition of each parameter under
ZeRO-3 (the two models are partitioned alike, so no communication), else the whole parameter (the same on every
rank). Where the teacher trains in bf16/fp16 the average is kept in fp32 beside the model (one step of
(1−d)·(θ − ema) at d = 0.99 is below bf16's resolution and would be lost) and the model's weights are its
rounding. The fp32 average is saved with each checkpoint in the ranks' own state files and read back on any
number of ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, RunConfig
from .engines import Member, build_engine, init_seed, resolve_deepspeed_config

KEY = "teacher_ema"  # its tensors in a rank's checkpoint state


def shadow_name(teacher: str) -> str:
    return f"{teacher}_ema"


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """What this rank stores of a parameter: its ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class SmoothedTeacher:
    """The moving average of ``teacher``'s weights held by ``shadow`` (a frozen member), with decay ``decay``."""

    def __init__(self, teacher: Member, shadow: Member, decay: float):
        self.teacher, self.shadow, self.decay = teacher, shadow, decay
        live = dict(teacher.engine.module.named_parameters())
        self.names = [name for name, _ in shadow.engine.module.named_parameters()]
        self.pairs = [(_local(live[name]), p) for name, p in shadow.engine.module.named_parameters()]
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in self.pairs)
        with torch.no_grad():  # fp32 where the model is not; else the model's own weights are the average
            self.average = [t.detach().float().clone() if _local(p).dtype != torch.float32 else _local(p)
                            for t, p in self.pairs]
        self.reset()

    def reset(self) -> None:
        """The average starts at the teacher's weights."""
        with torch.no_grad():
            for (live, p), avg in zip(self.pairs, self.average):
                avg.copy_(live)
            self._publish()

    def update(self) -> None:
        """After a teacher optimizer step: ema = d·ema + (1−d)·θ, then the frozen model's weights."""
        with torch.no_grad():
            for (live, _), avg in zip(self.pairs, self.average):
                avg.lerp_(live.float(), 1.0 - self.decay)
            self._publish()

    def _publish(self) -> None:
        for (_, p), avg in zip(self.pairs, self.average):
            if _local(p).data_ptr() != avg.data_ptr():
                _local(p).copy_(avg)

    def rank_state(self, rank: int) -> dict:
        """What this rank saves of the average (nothing beyond rank 0 where every rank holds it whole)."""
        if not self.partitioned and rank > 0:
            return {}
        return {KEY: {"partitioned": self.partitioned,
                      "tensors": {n: a.detach().clone() for n, a in zip(self.names, self.average)}}}

    def load(self, files: list[Path], read) -> None:
        """The average saved by a run on ``len(files)`` ranks (``read(file)``: its rank state), onto this rank's
        partitions or whole parameters: each parameter's saved pieces joined, then this rank's piece taken."""
        saved = [read(f).get(KEY) for f in files]
        if not saved or saved[0] is None:
            raise ConfigError(f"distill.teacher_ema={self.decay}: {files[0].parent} holds no moving average of the "
                              "teacher (saved with distill.teacher_ema=0); resume with 0 or start a new run")
        pieces = saved if saved[0]["partitioned"] else saved[:1]
        rank, world = _rank_world()
        with torch.no_grad():
            for name, (_, p), avg in zip(self.names, self.pairs, self.average):
                whole = torch.cat([s["tensors"][name].reshape(-1) for s in pieces])[:_numel(p)]
                if self.partitioned:
                    part = _local(p).numel()
                    whole = torch.nn.functional.pad(whole, (0, part * world - whole.numel()))[rank * part:][:part]
                avg.copy_(whole.view_as(avg))
            self._publish()


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def join(cfg: RunConfig, members: list[Member], teacher: Optional[Member], inputs, world) -> Optional[SmoothedTeacher]:
    """The run's smoothed teacher, its frozen model put in ``members`` after the teacher; None where
    ``distill.teacher_ema`` is 0. ``inputs``: the pre-flight's (preflight.Inputs), ``world``: distributed.World."""
    decay = cfg.distill.teacher_ema
    if not decay or teacher is None:
        return None
    spec = teacher.spec.model_copy(update={"name": shadow_name(teacher.name), "gradient_checkpointing": False})
    ds = shadow_config(resolve_deepspeed_config(teacher.spec, cfg.train, world.size, world.device.type == "cpu",
                                                trainable=False))
    shadow = build_engine(spec, inputs.hf_configs[teacher.name], ds, init_seed(cfg, teacher.spec), trainable=False,
                          vocab=inputs.own_vocab(teacher.spec), side=inputs.side(teacher.spec))
    shadow.about = f"the moving average of {teacher.name}'s weights, decay {decay}: ~{1 / (1 - decay):.0f} steps"
    members.insert(members.index(teacher) + 1, shadow)
    return SmoothedTeacher(teacher, shadow, decay)


def shadow_config(ds: dict) -> dict:
    """The frozen model's DeepSpeed config: under ZeRO-3 no parameter stays gathered between forwards (the default
    keeps small ones whole, and a whole copy would not see the update of its partition)."""
    if (ds.get("zero_optimization") or {}).get("stage") == 3:
        ds["zero_optimization"] = {**ds["zero_optimization"], "stage3_param_persistence_threshold": 0}
    return ds


def students_sources(learners: list[tuple], teacher: Optional[str], smoothed: Optional[SmoothedTeacher]) -> list:
    """Each learner's sources by name, the students reading the smoothed teacher where there is one."""
    if smoothed is None:
        return [sources for _, _, sources in learners]
    swap = {teacher: smoothed.shadow.name}
    return [sources if spec.name == teacher else [swap.get(n, n) for n in sources] for spec, _, sources in learners]
