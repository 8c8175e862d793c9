"""A cache of a frozen teacher's top-k predictions for every training block.

Layout of a cache folder::

    codistill_cache.json    what it was made from: tokenizer, data, teacher, k, T, seq_len
    part-000000.parquet     blocks [0, shard_blocks), one row per block:
    part-000001.parquet     index, topk_ids [S·k], topk_logp [S·k] fp16, tail_logp [S] fp16, ce [S] fp16
    ...

Per token that is ``k`` ids (uint16 when the vocabulary fits, else int32), ``k``
fp16 log-probabilities at temperature T, the fp16 log of the remaining (tail) mass
and the teacher's fp16 CE on the ground truth: at most ``6k + 4`` bytes before
Parquet's compression. Parts are written atomically (and fsynced), so a killed run
resumes by skipping the parts that exist; the metadata says ``complete`` only at the end,
when it also lists every part's size and sha256, which opening the cache checks.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch

from .config import ConfigError
from .distributed import disk_group
from .errors import quoted
from .files import entry_problem, fsync, temp_beside, write_atomically
from .losses import Targets

log = logging.getLogger("codistill")

META = "codistill_cache.json"
MATCHED = ("tokenizer", "seq_len", "data")  # must equal the training run's (the data fingerprint covers seq_len too)
PARAMS = ("tokenizer", "data", "seq_len", "teacher", "k", "temperature", "shard_blocks", "blocks")
# what a finished cache's metadata holds: (key, type, least value, as the error says it)
SCHEMA = (("tokenizer", str, None, "a fingerprint"), ("data", str, None, "a fingerprint"),
          ("seq_len", int, 1, "an integer >= 1"), ("k", int, 1, "an integer >= 1"),
          ("temperature", (int, float), 1e-6, "a number > 0"), ("shard_blocks", int, 1, "an integer >= 1"),
          ("blocks", int, 1, "an integer >= 1"))


def stored_bytes_per_token(k: int) -> int:
    """The most a cache stores per token before Parquet's compression: k int32 ids (uint16
    when the vocabulary fits), k fp16 log-probabilities, the fp16 tail and the fp16 CE."""
    return 6 * k + 4


def part_path(folder: Path, chunk: int) -> Path:
    return folder / f"part-{chunk:06d}.parquet"


def read_meta(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError):
        raise ConfigError(f"teacher cache metadata {path} is corrupted (expected JSON)") from None


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_atomically(folder / META, json.dumps(meta, indent=2) + "\n")


def check_started(folder: Path, params: dict[str, Any]) -> None:
    """A partial cache may only be continued with the same settings."""
    meta = read_meta(folder)
    if meta is None:
        return
    differ = [k for k in PARAMS if meta.get(k) != params.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {meta.get(k)!r} here, {params.get(k)!r} asked" for k in differ)
        raise ConfigError(f"{folder} holds a teacher cache made with other settings ({shown}); use another folder")


def block_rows(indices: list[int], topk: Targets, ce: torch.Tensor, seq_len: int, vocab: int) -> dict[str, list]:
    """One cache row per block from the teacher's top-k over [len(indices)·seq_len] positions."""
    id_type = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.int32
    k = topk.topk_ids.shape[1]
    ids = topk.topk_ids.cpu().numpy().astype(id_type).reshape(len(indices), seq_len * k)
    logp = topk.topk_logp.cpu().numpy().astype(np.float16).reshape(len(indices), seq_len * k)
    tail = topk.tail_logp.cpu().numpy().astype(np.float16).reshape(len(indices), seq_len)
    tok_ce = ce.cpu().numpy().astype(np.float16).reshape(len(indices), seq_len)
    return {"index": list(indices), "topk_ids": list(ids), "topk_logp": list(logp),
            "tail_logp": list(tail), "ce": list(tok_ce)}


def write_part(folder: Path, chunk: int, rows: dict[str, list], features: Optional[datasets.Features] = None) -> int:
    """Write one part atomically; returns its size in bytes. ``features`` fixes the schema (a part
    with no rows must still read back with the others)."""
    target = part_path(folder, chunk)
    tmp = temp_beside(target)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
    fsync(tmp)
    os.replace(tmp, target)
    fsync(folder)
    return target.stat().st_size


def _check_parts(folder: Path, meta: dict[str, Any], parts: list[Path]) -> Optional[str]:
    """What is wrong with a complete cache's parts (None: every one is there, with the size and
    sha256 its metadata lists). Ranks share the hashing when a process group exists."""
    listed = meta.get("parts")
    if listed is None:  # made by an earlier release: only whether the parts exist can be checked
        log.warning("teacher cache %s lists no part hashes (an earlier release made it); remake it to have "
                    "its parts checked", folder)
        listed = {}
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problem = None
    for path in parts[rank::world]:
        entry = listed.get(path.name) if isinstance(listed, dict) else {}
        try:
            problem = part_problem(path, entry, bool(listed))
        except OSError as exc:  # every rank still reaches the gather below
            problem = f"{path} cannot be read ({exc.strerror or exc})"
        if problem:
            break
    if world > 1:
        problems = [None] * world
        torch.distributed.all_gather_object(problems, problem, group=disk_group())
        problem = next((p for p in problems if p), None)
    return problem


def part_problem(path: Path, entry: Any, listed: bool) -> Optional[str]:
    """What is wrong with one part against its metadata ``entry`` (``listed``: the metadata lists
    parts, so one it does not list is wrong too); None if nothing."""
    if isinstance(entry, dict) and entry:
        return entry_problem(path, entry.get("size"), entry.get("sha256"), META)
    if not path.is_file():
        return f"{path} is missing"
    return f"{META} does not list {path.name}" if listed else None


def _largest_id(rows: datasets.Dataset) -> int:
    """The largest token id a cache holds (read column-wise: the parts were just read whole for their hashes)."""
    import pyarrow.compute as pc

    column = rows.data.column("topk_ids").combine_chunks()
    while hasattr(column, "flatten") and hasattr(column.type, "value_type"):
        column = column.flatten()
    largest = pc.max(column).as_py()
    return -1 if largest is None else int(largest)


@dataclass
class TeacherCache:
    """Read side: the cached targets of the training blocks a micro-batch holds."""

    folder: Path
    meta: dict[str, Any]
    rows: datasets.Dataset

    @staticmethod
    def check_ready(folder: Path) -> dict[str, Any]:
        """The metadata of a finished cache in ``folder``; a one-line ConfigError if it is not one."""
        if not folder.is_dir():
            raise ConfigError(f"teacher.cache: {folder} does not exist; make it with tools/cache_logits.py")
        meta = read_meta(folder)
        if not isinstance(meta, dict):
            raise ConfigError(f"teacher.cache: {folder} is not a teacher cache (no {META}); make one with "
                              "tools/cache_logits.py")
        if not meta.get("complete"):
            raise ConfigError(f"teacher.cache: {folder} is incomplete; run tools/cache_logits.py again "
                              "to finish it")
        for key, kind, least, what in SCHEMA:
            value = meta.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (least is not None and value < least):
                raise ConfigError(f"teacher.cache: {folder / META} has no valid '{key}' (expected {what}, got "
                                  f"{quoted(value)}); remake it with tools/cache_logits.py")
        return meta

    @classmethod
    def open(cls, folder: Path, expected: dict[str, Any], temperature: float,
             vocab: Optional[int] = None) -> "TeacherCache":
        """The cache for this run (its data, tokenizer and temperature), its parts whole and, given ``vocab``,
        every token id in it within the vocabulary; a one-line ConfigError if not."""
        meta = cls.check_ready(folder)
        for key in MATCHED:
            if meta[key] != expected[key]:
                raise ConfigError(f"teacher.cache: {folder} was made for {key}={meta[key]!r} but this run has "
                                  f"{key}={expected[key]!r}; make a cache for this run's data and tokenizer")
        if meta["temperature"] != temperature:
            raise ConfigError(f"teacher.cache: {folder} holds probabilities at temperature {meta['temperature']}, "
                              f"but distill.temperature={temperature}; they must match")
        chunks = -(-meta["blocks"] // meta["shard_blocks"])
        parts = [str(part_path(folder, c)) for c in range(chunks)]
        problem = _check_parts(folder, meta, [Path(p) for p in parts])
        if problem:
            raise ConfigError(f"teacher.cache: {problem}; remake it with tools/cache_logits.py")
        rows = datasets.load_dataset("parquet", data_files=parts, split="train")
        if len(rows) != meta["blocks"]:
            raise ConfigError(f"teacher.cache: {folder} holds {len(rows)} blocks, its metadata says {meta['blocks']}")
        if vocab is not None:
            largest = _largest_id(rows)
            if largest >= vocab:
                raise ConfigError(f"teacher.cache: {folder} holds token id {largest}, beyond this run's vocabulary of "
                                  f"{vocab:,}; remake it with tools/cache_logits.py")
        return cls(folder, meta, rows.with_format("torch"))

    def targets(self, index: torch.Tensor, device: torch.device) -> Targets:
        """Top-k targets (and the teacher's CE) for the blocks ``index`` [B], flattened to [B·S]."""
        got = self.rows[index.tolist()]
        if not torch.equal(got["index"], index.cpu()):
            raise ConfigError(f"teacher.cache: {self.folder} rows are out of order; remake the cache")
        k = self.meta["k"]
        return Targets(
            temperature=self.meta["temperature"],
            topk_ids=got["topk_ids"].reshape(-1, k).to(device=device, dtype=torch.int32),
            topk_logp=got["topk_logp"].reshape(-1, k).to(device=device, dtype=torch.float32),
            tail_logp=got["tail_logp"].reshape(-1).to(device=device, dtype=torch.float32),
            token_ce=got["ce"].reshape(-1).to(device=device, dtype=torch.float32),
        )
