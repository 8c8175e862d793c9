"""A cache of a frozen teacher's top-k predictions for every training block.

Layout of a cache folder::

    codistill_cache.json    what it was made from: tokenizer, data, teacher, k, T, seq_len
    part-000000.parquet     blocks [0, shard_blocks), one row per block:
    part-000001.parquet     index, topk_ids [S·k], topk_logp [S·k] fp16, tail_logp [S] fp16, ce [S] fp16
    ...

Per token that is ``k`` ids (uint16 when the vocabulary fits, else int32), ``k``
fp16 log-probabilities at temperature T, the fp16 log of the remaining (tail) mass
and the teacher's fp16 CE on the ground truth: at most ``6k + 4`` bytes before
Parquet's compression. Parts are written atomically, so a killed run resumes by
skipping the parts that exist; the metadata says ``complete`` only at the end.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch

from .config import ConfigError
from .losses import Targets

META = "codistill_cache.json"
MATCHED = ("tokenizer", "seq_len", "data")  # must equal the training run's (the data fingerprint covers seq_len too)
PARAMS = ("tokenizer", "data", "seq_len", "teacher", "k", "temperature", "shard_blocks", "blocks")


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
    except json.JSONDecodeError:
        raise ConfigError(f"teacher cache metadata {path} is corrupted") from None


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META)


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
    tmp = target.with_name(f".{target.name}.tmp")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
    os.replace(tmp, target)
    return target.stat().st_size


@dataclass
class TeacherCache:
    """Read side: the cached targets of the training blocks a micro-batch holds."""

    folder: Path
    meta: dict[str, Any]
    rows: datasets.Dataset

    @classmethod
    def open(cls, folder: Path, expected: dict[str, Any], temperature: float) -> "TeacherCache":
        meta = read_meta(folder)
        if meta is None:
            raise ConfigError(f"teacher.cache: {folder} is not a teacher cache (no {META}); make one with "
                              "tools/cache_teacher_logits.py")
        if not meta.get("complete"):
            raise ConfigError(f"teacher.cache: {folder} is incomplete; run tools/cache_teacher_logits.py again "
                              "to finish it")
        for key in MATCHED:
            if meta[key] != expected[key]:
                raise ConfigError(f"teacher.cache: {folder} was made for {key}={meta[key]!r} but this run has "
                                  f"{key}={expected[key]!r}; make a cache for this run's data and tokenizer")
        if meta["temperature"] != temperature:
            raise ConfigError(f"teacher.cache: {folder} holds probabilities at temperature {meta['temperature']}, "
                              f"but distill.temperature={temperature}; they must match")
        chunks = -(-meta["blocks"] // meta["shard_blocks"])
        parts = [str(part_path(folder, c)) for c in range(chunks)]
        missing = [p for p in parts if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"teacher.cache: {missing[0]} is missing")
        rows = datasets.load_dataset("parquet", data_files=parts, split="train")
        if len(rows) != meta["blocks"]:
            raise ConfigError(f"teacher.cache: {folder} holds {len(rows)} blocks, its metadata says {meta['blocks']}")
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
