"""Checkpoints on disk: one directory per step holding every engine and the trainer state.

Layout of ``<output_dir>/checkpoints``::

    step_00000100/
        <model>/                DeepSpeed save_checkpoint of each engine (tag "ds")
        rank_00000.pt ...       per-rank state: RNGs, data cursor
        trainer_state.json      step, schedules, config
        manifest.json           every file with its size and sha256, written last
    latest                      name of the newest complete checkpoint, and its run's id

A checkpoint is written under ``.staging_step_<N>`` and renamed into place by rank 0
only after every rank has finished writing and the manifest is complete, so a crash
mid-save leaves the previous checkpoints untouched and nothing half-written visible.
Older checkpoints are pruned only after a newer one is complete.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from . import accelerator  # noqa: F401  (first: sets DS_ACCELERATOR before anything imports deepspeed)
from .config import ConfigError, check_name
from .distributed import disk_barrier, disk_group
from .errors import StorageFailed
from .files import (check_run_folder, check_writable, entry_problem, file_entry, fsync, fsync_folders, remove_tree,
                    temp_beside, write_atomically)
from .identity import RUN_RECORD, read_run

log = logging.getLogger("codistill")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
TAG = "ds"  # the DeepSpeed tag inside each engine's folder
UNIVERSAL_TAG = "ds_universal"
LEGACY_RUN = "legacy"  # the run of checkpoints written before runs had an id
REQUIRED = (STATE, "rank_00000.pt")  # besides the manifest, every checkpoint holds these
ALMOST_FULL = 16 * 2**20  # free bytes below which a failed write is put down to a full disk


def _allowed_globals() -> list:
    """The classes and functions, beyond plain tensors and containers, that checkpoint files of
    DeepSpeed (ZeRO 0-3, fp32/bf16/fp16, its LR schedulers) and of codistill (numpy RNG state)
    hold. Nothing else may be unpickled from a checkpoint."""
    import numpy
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(numpy, "_core", None) or numpy.core
    dtypes = [type(numpy.dtype(t)) for t in ("uint32", "int64", "float64", "float32")]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, numpy.ndarray, numpy.dtype,
            multiarray.multiarray._reconstruct, *dtypes]


@contextmanager
def data_only_loads() -> Iterator[None]:
    """While open, every ``torch.load`` of this process (ours, DeepSpeed's engine and universal
    conversion, ``zero_to_fp32``) is ``weights_only`` with :func:`_allowed_globals`: loading a
    checkpoint never runs code from it. A file that needs anything else is refused with a
    ConfigError naming it and what it asked for."""
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            wanted = re.search(r"GLOBAL (\S+)", str(exc))
            raise ConfigError(f"checkpoint file {f} asks to load {wanted.group(1) if wanted else 'an object'}, "
                              "which is not data DeepSpeed or codistill writes; refusing it (loading it could run "
                              "code)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


LOCK = ".codistill.lock"


def claim(output_dir: Path) -> Callable[[], None]:
    """Make this process the one run writing ``output_dir`` (call on rank 0): a lock file
    holding host, pid and start time, created exclusively. A lock whose process no longer runs
    on this host is taken over with a warning; a live one, or one from another host (which
    cannot be checked from here), is refused with one line. Returns the release function
    (also called at exit), which also removes the folders the claim made if they are still empty."""
    made = [f for f in (output_dir, *output_dir.parents) if not f.exists()]  # deepest first
    check_writable(output_dir, "output_dir")
    check_run_folder(output_dir)
    lock = output_dir / LOCK
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with _signals_held():  # a stop that lands while the lock is written is raised once its release is registered
        return _claimed(output_dir, lock, mine, made)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM noted, not acted on, inside the block; the first one noted is then raised again, to the
    handler that was in place (handlers run on the main thread, whichever thread the signal reached: elsewhere
    nothing is held)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if noted:
            signal.raise_signal(noted[0])


def _claimed(output_dir: Path, lock: Path, mine: dict, made: list[Path]) -> Callable[[], None]:
    """:func:`claim`'s lock, written, and its release registered at exit."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
                host, pid = str(other["host"]), int(other["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                other, host, pid = {}, "?", -1
            if host == mine["host"] and pid > 0 and not _alive(pid):
                log.warning("output_dir: taking over %s, left by pid %d which no longer runs", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise ConfigError(f"output_dir: {output_dir} is in use by another run (pid {pid} on {host} since "
                              f"{other.get('since', '?')}); wait for it, or remove {lock} if no run is using it")
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(mine) + "\n")
        break

    def release() -> None:
        try:
            if json.loads(lock.read_text()).get("pid") == mine["pid"]:
                lock.unlink()
        except (OSError, ValueError, AttributeError):
            pass
        for folder in made:  # a run refused before it wrote anything leaves no trace
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote), or gone
                break

    atexit.register(release)
    return release


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step_{step:08d}"


def rank_file(root: Path, rank: int) -> Path:
    return root / f"rank_{rank:05d}.pt"


def refuse_foreign_checkpoints(output_dir: Path, overwrite: bool, resume: Optional[str]) -> None:
    """Never write over another run's checkpoints unless the user said so."""
    root = output_dir / CHECKPOINTS
    if root.is_dir() and any(root.glob("step_*")) and not overwrite and resume is None:
        raise ConfigError(
            f"output_dir {output_dir} already holds checkpoints of another run; pass resume=auto to "
            "continue it, choose a new output_dir, or pass overwrite=true"
        )


def save(output_dir: Path, step: int, engines: Iterable[tuple[str, object]], state: dict, rank_state: dict,
         rank: int, keep_last: int, write_extra: Callable[[Path], None]) -> Path:
    """Write a complete checkpoint of every engine and the trainer; collective (all ranks).
    ``write_extra(folder)`` runs on rank 0 before the manifest (model configs, tokenizer).

    A write the disk refuses (full, quota, read-only) on any rank ends the save on every rank
    together with :class:`StorageFailed`: the unfinished checkpoint is removed, ``latest`` and
    every earlier checkpoint are left as they were."""
    root = output_dir / CHECKPOINTS
    final = step_dir(output_dir, step)
    staging = root / f".staging_{final.name}"
    writes, run = _Writes(), state.get("run_id", LEGACY_RUN)
    if rank == 0:
        writes.attempt(lambda: _fresh_folder(staging), staging)
    disk_barrier()
    for name, engine in engines:
        with _guarded(engine, writes):  # DeepSpeed's own barriers are still met on a rank whose write failed
            engine.save_checkpoint(str(staging / name), tag=TAG, save_latest=False)
        if rank == 0:  # what DeepSpeed's own tools (zero_to_fp32.py) look for
            writes.attempt(lambda: (staging / name / LATEST).write_text(TAG), staging / name / LATEST)
    writes.attempt(lambda: _torch_save(torch.save, rank_state, rank_file(staging, rank)), rank_file(staging, rank),
                   _tensor_bytes(rank_state))
    if rank == 0:
        writes.attempt(lambda: write_extra(staging), staging)
        writes.attempt(lambda: write_atomically(staging / STATE, json.dumps({"step": step, **state}, indent=2) + "\n"),
                       staging / STATE)
    _settle(writes, step, staging, final, rank)
    # Every rank hashes and fsyncs its share of the files, so no rank waits long on another.
    world = torch.distributed.get_world_size()
    everything = [p for p in sorted(staging.rglob("*")) if p.is_file()]
    share = {}
    for p in everything[rank::world]:
        share[str(p.relative_to(staging))] = file_entry(p)
        writes.attempt(lambda: fsync(p), p)
    shares = [None] * world
    torch.distributed.all_gather_object(shares, share, group=disk_group())
    if rank == 0:
        files = {rel: entry for part in shares for rel, entry in part.items()}
        writes.attempt(lambda: _publish(staging, final, step, files, run), final)
    _settle(writes, step, staging, final, rank)
    if rank == 0:
        _prune(root, keep_last, keep=final, run=run)
    disk_barrier()
    return final


def _fresh_folder(path: Path) -> None:
    remove_tree(path)  # left by a save that was killed
    path.mkdir(parents=True)


def _publish(staging: Path, final: Path, step: int, files: dict, run: str) -> None:
    """Rank 0: the manifest, then the rename that makes the checkpoint visible, then ``latest``
    (the checkpoint's name and its run's id, so that ``resume=auto`` knows the run even when that
    checkpoint is damaged)."""
    root = final.parent
    write_atomically(staging / MANIFEST, json.dumps({"step": step, "files": dict(sorted(files.items()))},
                                                    indent=1) + "\n")
    fsync_folders(staging)  # with every file fsynced: on disk before it becomes visible
    remove_tree(final)  # overwrite=true on an output_dir with this step already saved
    os.replace(staging, final)
    fsync(root)
    write_atomically(root / LATEST, f"{final.name}\n{run}\n")


class _Writes:
    """One rank's writes during a save: the bytes it meant to write and the first write the disk
    refused (after which it tries no more, but still takes part in every collective)."""

    def __init__(self) -> None:
        self.error: Optional[OSError] = None
        self.bytes = 0

    def attempt(self, write: Callable[[], object], path: Path, nbytes: int = 0) -> None:
        self.bytes += nbytes
        if self.error is not None:
            return
        try:
            write()
        except OSError as exc:
            self.error = exc if exc.filename else OSError(exc.errno, exc.strerror, str(path))


@contextmanager
def _guarded(engine, writes: _Writes) -> Iterator[None]:
    """Every write of ``engine.save_checkpoint`` goes through ``writes``: its checkpoint engine's
    and the copy of DeepSpeed's recovery scripts (rank 0)."""
    inner, copy = engine.checkpoint_engine, engine._copy_recovery_script
    engine.checkpoint_engine = _Guarded(inner, writes)
    engine._copy_recovery_script = lambda path: writes.attempt(lambda: copy(path), Path(path))
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the class's own again


class _Guarded:
    """An engine's DeepSpeed checkpoint engine during a save, its writes going through :class:`_Writes`."""

    def __init__(self, inner, writes: _Writes) -> None:
        self._inner, self._writes = inner, writes

    def save(self, state_dict, path) -> None:
        self._writes.attempt(lambda: _torch_save(self._inner.save, state_dict, path), Path(path),
                             _tensor_bytes(state_dict))

    def makedirs(self, path, exist_ok: bool = False) -> None:
        self._writes.attempt(lambda: self._inner.makedirs(path, exist_ok=exist_ok), Path(path))

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _torch_save(save: Callable, obj, path) -> None:
    """``save(obj, path)``: torch.save reports a write the disk refused as a RuntimeError of its
    zip writer ("unexpected pos ...", "file write failed"), which becomes the OSError it is. The
    RuntimeError is not kept: its traceback holds the writer, whose file (removed with the unfinished
    checkpoint) would stay open, and its space taken, for as long as the error is remembered."""
    try:
        save(obj, path)
        return
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[0]
    raise OSError(None, message, str(path))


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, give or take the metadata."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _settle(writes: _Writes, step: int, staging: Path, final: Path, rank: int) -> None:
    """Collective: if a write failed on any rank, remove the unfinished checkpoint (rank 0) and
    raise :class:`StorageFailed` on every rank, naming the failure and the space it needed."""
    import errno

    world, root = torch.distributed.get_world_size(), final.parent
    error = None
    if writes.error is not None:  # a disk with (next to) nothing left is full, whatever the error said
        full = writes.error.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(root).free < ALMOST_FULL
        error = (full, writes.error.strerror, writes.error.filename)
    reports = [None] * world
    torch.distributed.all_gather_object(reports, (error, writes.bytes), group=disk_group())
    failed = [(r, e) for r, (e, _) in enumerate(reports) if e is not None]
    if not failed:
        return
    who, (full, why, filename) = next(((r, e) for r, e in failed if e[0]), failed[0])
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        if final.is_dir() and read_latest(root)[0] != final.name:  # renamed, but ``latest`` could not be updated
            shutil.rmtree(final, ignore_errors=True)
    disk_barrier()
    needed = sum(nbytes for _, nbytes in reports)
    what = "the disk is full" if full else "a write failed"
    why = os.strerror(errno.ENOSPC) if full else why  # not torch's zip-writer wording for the same thing
    kept = sorted(p.name for p in root.glob("step_*") if (p / MANIFEST).is_file())
    raise StorageFailed(
        f"checkpoint {final.name}: {what} (rank {who}: {why}: {filename}); it needs about {_gb(needed)} and "
        f"{_gb(shutil.disk_usage(root).free)} is free in {root}; removed the unfinished checkpoint, "
        + (f"the earlier ones are kept (newest: {kept[-1]})" if kept else "no earlier checkpoint exists")
        + "; free some space and continue with resume=auto")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def due(step: int, stop: Optional[str], saved_at: Optional[int], max_steps: int, interval: int) -> bool:
    """When to checkpoint: every ``interval`` steps (0: only at the end), at the last step and when asked to
    stop; never twice at one step."""
    return saved_at != step and (stop is not None or step >= max_steps or bool(interval and step % interval == 0))


def remove_partial(output_dir: Path) -> list[Path]:
    """Delete what killed saves left behind (never visible as checkpoints); rank 0 only."""
    partial = sorted((output_dir / CHECKPOINTS).glob(".staging_*"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def run_id(path: Path) -> Optional[str]:
    """The run a checkpoint belongs to (``LEGACY_RUN`` for one written before runs had an id;
    None if its state cannot be read)."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state.get("run_id", LEGACY_RUN) if isinstance(state, dict) else None


def _prune(root: Path, keep_last: int, keep: Path, run: str) -> None:
    """Keep ``keep`` (the checkpoint just written) and this run's newest others up to ``keep_last`` in all,
    counting only those whose files are all there at their listed sizes; remove the older intact ones.
    A damaged checkpoint is neither counted nor removed (it would leave fewer usable ones than asked),
    and another run's are never touched."""
    if keep_last <= 0:
        return
    ours = [p for p in sorted(root.glob("step_*"), reverse=True)
            if p != keep and (p / MANIFEST).exists() and run_id(p) == run]
    kept = 1
    for old in ours:
        if not _sizes_intact(old):
            log.warning("%s is damaged: not counted toward checkpoint.keep_last, left in place", old)
        elif kept < keep_last:
            kept += 1
        else:
            for folder in (old, old.parent / f".universal_{old.name}"):  # (the second only after a rescale)
                if folder.exists():
                    shutil.rmtree(folder, onerror=lambda _f, path, exc: log.warning(
                        "could not remove %s while pruning old checkpoints: %s", path, exc[1]))


def _sizes_intact(path: Path) -> bool:
    """Whether every file ``path``'s manifest lists is there at its listed size (the cheap part of
    :func:`verify`: no hashing, so pruning at every save stays cheap at any model size)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return all((path / rel).is_file() and (path / rel).stat().st_size == int(meta["size"])
                   for rel, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify(path: Path) -> Optional[str]:
    """None if ``path`` is a complete, intact checkpoint; otherwise what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{path} is not a complete checkpoint (no {MANIFEST})"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(rel, int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is corrupted (expected a files table with each file's size and sha256)"
    listed = {rel for rel, _, _ in entries}
    for rel in REQUIRED:
        if rel not in listed:
            return f"{manifest} does not list {rel}, which every checkpoint holds"
    for rel, size, sha256 in entries:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{manifest} lists {rel}, outside the checkpoint"
        problem = entry_problem(path / rel, size, sha256, "the manifest")
        if problem:
            return f"checkpoint file {problem}"
        if rel.endswith(".pt") and not zipfile.is_zipfile(path / rel):  # its manifest rewritten to match
            return f"checkpoint file {path / rel} is not a whole torch file (no zip directory at its end: cut short?)"
    return None


def read_latest(root: Path) -> tuple[Optional[str], Optional[str]]:
    """What ``<root>/latest`` says: the newest checkpoint's folder name and the id of its run
    (None for what it does not say)."""
    try:
        lines = (root / LATEST).read_text().split()
    except (OSError, ValueError):
        return None, None
    return (lines[0] if lines else None), (lines[1] if len(lines) > 1 else None)


def last_good(output_dir: Path, run: str) -> str:
    """Where a run that cannot save its current state left its last good one (for its last line)."""
    name, owner = read_latest(output_dir / CHECKPOINTS)
    if name is not None and owner == run and (output_dir / CHECKPOINTS / name).is_dir():
        return f"the newest checkpoint, {output_dir / CHECKPOINTS / name}, holds the last good state (resume=auto)"
    return ("no checkpoint of this run was saved before it, so no good state is kept; start again (a lower "
            "learning rate, gradient clipping or checkpoint.interval help)")


def find_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from. ``resume=auto``: this run's newest intact checkpoint in
    ``output_dir`` (the run ``run.json`` names, else the one ``checkpoints/latest`` names),
    falling back past damaged ones (with a warning) to older checkpoints of the same run, never to
    another run's (one that ``overwrite=true`` wrote beside); none means a fresh start. A ``latest``
    or a newest checkpoint that names another run than the folder's is refused: the checkpoints
    were swapped in. ``resume=<path>``: an intact checkpoint, or a run's output_dir (its
    ``resume=auto`` choice)."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if (path / CHECKPOINTS).is_dir():
            found = find_resume(path, "auto")
            if found is None:
                raise ConfigError(f"resume: {path} holds no complete checkpoint")
            return found
        if not path.is_dir():
            raise ConfigError(f"resume: {path} does not exist")
        problem = verify(path)
        if problem:
            raise ConfigError(f"resume: {problem}")
        return path
    root = output_dir / CHECKPOINTS
    candidates = sorted(root.glob("step_*"), reverse=True)
    name, latest_run = read_latest(root)
    run = read_run(output_dir)
    other = run is not None and latest_run not in (None, run)
    # ``latest`` is another run's: a run that started after it (overwrite=true, run.json newer) and has saved
    # nothing yet has no checkpoint to continue; a ``latest`` newer than the folder's run was put there
    started_after = other and (output_dir / RUN_RECORD).stat().st_mtime_ns > (root / LATEST).stat().st_mtime_ns
    if other and not started_after:
        raise ConfigError(_foreign(root / LATEST, latest_run, run, output_dir))
    named = None
    if name is not None and not started_after:  # this run's newest checkpoint; older ones of the same run are the fallback
        named = root / name
        if named.parent == root and named.name.startswith("step_") and named.is_dir():
            candidates = [named, *(c for c in candidates if c.name < named.name)]
    run = run or latest_run or (run_id(named) if named in candidates else None)  # ``latest`` of earlier releases
    others = []
    for candidate in candidates:
        owner = run_id(candidate)
        if run is not None and owner not in (None, run):
            if candidate == named:
                raise ConfigError(_foreign(candidate, owner, run, output_dir))
            others.append(candidate.name)  # another run's checkpoint (written before overwrite=true started this one)
            continue
        problem = verify(candidate)
        if problem is None:
            return candidate
        log.warning("resume=auto: skipping %s: %s", candidate.name, problem)
    if others:
        log.warning("resume=auto: no intact checkpoint of run %s in %s, starting afresh; another run's are left "
                    "alone: %s", run, root, ", ".join(sorted(others)))
    return None


def _foreign(path: Path, owner: str, run: str, output_dir: Path) -> str:
    return (f"resume=auto: {path} names run {owner}, but {output_dir / RUN_RECORD} says this folder holds run {run}; "
            f"to continue run {owner} here on purpose pass resume=<its checkpoint> adopt=true, else choose another "
            "output_dir")


def universal(path: Path, model: str, is_main: bool) -> Path:
    """A DeepSpeed universal checkpoint of ``model`` from checkpoint ``path``, made once by
    rank 0 beside the checkpoints (``.universal_<step>/<model>``); collective."""
    folder = path.parent / f".universal_{path.name}" / model
    if is_main and not (folder / UNIVERSAL_TAG).is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(folder, folder=True)
        cmd = [sys.executable, "-m", "codistill.checkpoint", "--input_folder", str(path / model / TAG),
               "--output_folder", str(tmp / UNIVERSAL_TAG), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"resume: converting {path / model} to a universal checkpoint failed: {why}")
        (tmp / "latest_universal").write_text(UNIVERSAL_TAG)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    disk_barrier()  # the conversion of a big checkpoint takes minutes on rank 0
    return folder


def rank_state(data_cursor: dict[str, int]) -> dict:
    """What one rank saves besides its engines: the data cursor and every RNG it draws from."""
    return {"data": data_cursor, "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def read_rank(file: Path) -> dict:
    """One rank's saved state (tensors mapped from the file, not read whole: a moving average can be large)."""
    with data_only_loads():
        return torch.load(file, weights_only=True, mmap=True)


def restore_rank_state(path: Path, rank: int) -> dict[str, int]:
    """Restore this rank's RNGs from checkpoint ``path`` (rank ``rank``'s file); returns its data cursor."""
    with data_only_loads():
        state = torch.load(rank_file(path, rank), weights_only=True)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return dict(state["data"])


def rescale_cursor(cursor: dict[str, int], micro_batch_size: int, saved_world: int, world: int,
                   warn: bool = True) -> dict[str, int]:
    """A data cursor saved on ``saved_world`` ranks, for ``world`` ranks. DistributedSampler deals
    one global permutation round-robin, so after p micro-batches of b on W ranks exactly the
    first p·b·W samples of the epoch are used; continue there, or at the micro-batch boundary
    just before it (those few samples are seen twice)."""
    used = cursor["position"] * micro_batch_size * saved_world
    per_step = micro_batch_size * world
    if used % per_step and warn:
        log.warning("resume: %d samples of the epoch were used, not a multiple of %d; continuing from the "
                    "micro-batch boundary before it", used, per_step)
    return {**cursor, "position": used // per_step}


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state (its step, world size, config and every part's state), checked for
    the keys every checkpoint holds."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"resume: {path / STATE} cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"resume: {path / STATE} holds a {type(state).__name__}, not a trainer state")
    for key, kind in (("step", int), ("world_size", int), ("config", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ConfigError(f"resume: {path / STATE} has no valid '{key}' (expected a {kind.__name__}); "
                              "the checkpoint was not written by this program or was edited")
    return state


def intact(path: Path) -> Path:
    """The checkpoint ``path`` names, its files verified once: a checkpoint folder, or a run's output_dir (its
    newest intact checkpoint, which ``resume=auto`` verified on the way)."""
    if (path / CHECKPOINTS).is_dir():
        found = find_resume(path, "auto")
        if found is None:
            raise ConfigError(f"{path} holds no complete checkpoint")
        return found
    problem = verify(path)
    if problem:
        raise ConfigError(problem)
    return path


def export_hf(path: Path, out: Path, names: Optional[list[str]] = None, overwrite: bool = False) -> list[Path]:
    """Write models of a checkpoint as Hugging Face folders (safetensors, config, tokenizer).

    ``path`` is a checkpoint folder or a run's output_dir (its newest intact checkpoint).
    ZeRO-1/2/3 shards are consolidated to fp32 with DeepSpeed's zero_to_fp32.
    """
    return export_checkpoint(intact(path), out, names, overwrite)


def export_checkpoint(found: Path, out: Path, names: Optional[list[str]] = None, overwrite: bool = False) -> list[Path]:
    """:func:`export_hf` of a checkpoint :func:`intact` has verified (not hashed again)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    models = read_state(found)["models"]
    for name in models:  # names read from disk become paths: the same rule as in a config
        try:
            check_name(name, "model name")
        except ValueError as exc:
            raise ConfigError(f"{found / STATE}: {exc}") from None
    for name in names or []:
        if name not in models:
            raise ConfigError(f"model '{name}' is not in {found} (it holds {models})")
    for name in names or models:  # every target checked before any is written
        target = out / name
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise ConfigError(f"{target} is {'a link' if target.is_symlink() else 'a file'}; expected a folder to "
                              "export into (choose another folder)")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ConfigError(f"{target} is not empty; choose another folder or pass --overwrite")
    exported = []
    for name in names or models:
        target = out / name
        config = AutoConfig.from_pretrained(str(found / "hf" / name), local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with data_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(found / name), tag=TAG)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
        if set(missing) - tied or unexpected:
            raise ConfigError(f"{found / name} does not match its config: missing {sorted(set(missing) - tied)}, "
                              f"unexpected {sorted(unexpected)}")
        model.tie_weights()
        model.save_pretrained(str(target), safe_serialization=True)
        own = found / "tokenizer" / name  # a model with its own tokenizer (codistill/crosstok.py)
        tokenizer = own if (own / "tokenizer_config.json").is_file() else found / "tokenizer"
        AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(str(target))
        exported.append(target)
    return exported


def load_engine(path: Path, member, is_main: bool) -> None:
    """Load one model's engine from the checkpoint ``path`` (through DeepSpeed's universal format when the
    engine was configured to, i.e. on another number of ranks); a checkpoint is data: nothing in it may run
    code."""
    folder, tag = path / member.name, TAG
    if member.engine.load_universal_checkpoint():
        folder, tag = universal(path, member.name, is_main), UNIVERSAL_TAG
    with data_only_loads():
        loaded, _ = member.engine.load_checkpoint(str(folder), tag=tag)
    if loaded is None:
        raise ConfigError(f"resume: {folder} holds no checkpoint of model '{member.name}'")


if __name__ == "__main__":
    # DeepSpeed's universal-checkpoint conversion (checkpoint.universal runs it as a subprocess),
    # with every load of the checkpoint's files data-only.
    from deepspeed.checkpoint import ds_to_universal

    try:
        with data_only_loads():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except ConfigError as exc:
        print(f"codistill: error: {exc}", file=sys.stderr)
        sys.exit(2)

