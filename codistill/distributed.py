"""Process-group set-up for the three ways a run starts.

- ``deepspeed``/``torchrun`` launchers: RANK, WORLD_SIZE, MASTER_* are in the environment.
- ``mpirun``: ranks are discovered through mpi4py (DeepSpeed's ``auto_mpi_discovery``).
- ``python launch/train.py``: a single process; we set the rendezvous variables
  ourselves, because DeepSpeed would otherwise try MPI discovery and take a
  non-loopback address from ``hostname -I``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from . import accelerator  # noqa: F401  (first: sets DS_ACCELERATOR before anything imports deepspeed)

RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    how: str  # "launcher", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def how_started() -> str:
    if all(v in os.environ for v in RENDEZVOUS):
        return "launcher"
    if any(v in os.environ for v in _MPI_MARKERS):
        return "mpi"
    return "single"


def env_rank() -> int:
    """This process's rank before the process group exists (for deciding who prints)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def env_world_size() -> int:
    """The world size the launcher announced, before the process group exists."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


DISK_TIMEOUT_S = 6 * 3600  # how long a rank waits for another's disk work (hashing, fsync, conversion)
_disk_group = None  # the world again, with DISK_TIMEOUT_S: made by init()


def disk_barrier() -> None:
    """A barrier for waits on another rank's disk work (a big checkpoint takes minutes to hash or
    convert), which must not trip the short collective timeout that detects dead ranks."""
    torch.distributed.barrier(group=_disk_group)


def disk_group():
    """The process group of :func:`disk_barrier` (None: the default group, if init() did not run)."""
    return _disk_group


def shutdown() -> None:
    """Destroy the process groups :func:`init` made, so that a later init() in this process (a second
    run from Python, a test) makes fresh ones instead of reusing a destroyed disk group."""
    global _disk_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm.comm as ds_comm

        if ds_comm.cdb is not None:  # DeepSpeed's teardown also drops the groups it cached (its world clone...)
            ds_comm.destroy_process_group()
        else:
            torch.distributed.destroy_process_group()  # every group, the disk group included
    _disk_group = None


def local_ranks() -> int:
    """How many ranks this machine runs (as the launcher announced it; 1 if it did not)."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def share_cores() -> None:
    """On CPU, give each of this machine's ranks its share of the cores: torch's default of one thread
    per core in every rank oversubscribes them (``deepspeed`` on CPU, unlike ``torchrun``, sets no
    OMP_NUM_THREADS), and threads that thrash cost more than they compute. A user's OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // local_ranks()))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Every rank's ``values`` averaged (the same keys in the same order on every rank: what runs is decided
    collectively)."""
    keys = list(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / torch.distributed.get_world_size() for k, v in zip(keys, t.tolist())}


def init(timeout_s: int = 600) -> World:
    """Create the world process group (gloo on CPU, NCCL on GPU) and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    how = how_started()
    if how == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # The shm all-reduce op costs a ~30 s JIT compile per fresh venv; gloo is fine here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            auto_mpi_discovery=(how == "mpi"),
            distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
    global _disk_group
    if _disk_group is None:
        _disk_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s,
                                                                                              DISK_TIMEOUT_S)))
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
        share_cores()
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return World(rank=rank, size=size, local_rank=local_rank, device=device, how=how)
