"""Run a frozen teacher over the training data once and cache its top-k predictions,
so soft-label students can train without loading the teacher.

    python tools/cache_logits.py --config configs/soft.yaml [--out DIR] [--top-k 64]
    deepspeed --num_gpus 2 tools/cache_logits.py --config configs/soft.yaml
    codistill-cache-logits ...   (the same, as a console command)

The run's config gives the data, tokenizer, seq_len, seed and the teacher (its
``pretrained`` folder and DeepSpeed section, e.g. ZeRO-3 across ranks); the output
folder defaults to ``teacher.cache``; k and T default to the first student's
``distill.top_k`` and ``distill.temperature``. Work is split over ranks in parts
of ``--shard-blocks`` blocks, each written atomically; a killed run continues where it
stopped, and a run over a finished cache checks every part against the sizes and sha256
its metadata lists and rewrites any that is damaged. Prints the storage cost in bytes
per token at the end.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import cli
from ..config import ConfigError, RunConfig


def body(args: argparse.Namespace) -> None:
    from .. import distributed
    from ..engines import build_engine, quiet_library_noise

    quiet_library_noise()
    cfg = cli.run_config(args)
    out, k, temperature = _target(args, cfg)
    tokenizer, own, hf, ds_config = _checked_teacher(cfg)
    world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    train, params, listed = _start(args, cfg, tokenizer, own, out, k, temperature, world)
    engine = build_engine(cfg.teacher, hf, ds_config, seed=cfg.train.seed, trainable=False).engine
    chunks = _cache_parts(args, cfg, engine, train, out, listed, k, temperature, len(own or tokenizer), world,
                          cross=own is not None)
    _finish(out, params, len(train), cfg.data.seq_len, chunks, world)


def _target(args: argparse.Namespace, cfg: RunConfig) -> tuple[Path, int, float]:
    """The cache folder, k and T (--out or teacher.cache; --top-k or the first student's top_k and temperature)."""
    if cfg.teacher is None or not cfg.teacher.pretrained:
        raise ConfigError("teacher.pretrained: caching needs a trained teacher folder")
    out = Path(args.out or cfg.teacher.cache or "").expanduser()
    if not str(args.out or cfg.teacher.cache or ""):
        raise ConfigError("give --out or teacher.cache: the folder to write the cache to")
    settings = cfg.distill_for(0)
    return out, args.top_k or settings.top_k, settings.temperature


def _checked_teacher(cfg: RunConfig):
    """The run's tokenizer, the teacher's own where it differs (its predictions are then cached over its own
    tokenization of paired blocks, for chunk likelihoods), its Hugging Face config (checked against the one it
    reads) and its DeepSpeed config, all before any process group exists."""
    import torch

    from .. import distributed
    from ..data import check_data_source, run_tokenizer, teacher_tokenizer, tokenizer_fingerprint
    from ..engines import resolve_deepspeed_config
    from ..models import check_model, model_config

    check_data_source(cfg.data)
    tokenizer = run_tokenizer(cfg)
    own = teacher_tokenizer(cfg, tokenizer)  # (data.teacher_seq_len=auto resolved with it)
    reads = own or tokenizer
    hf = model_config(cfg.teacher, reads)
    check_model(cfg.teacher, hf, reads, tokenizer_fingerprint(reads), cfg.data.teacher_block if own else cfg.data.seq_len,
                "data.teacher_seq_len" if own is not None and cfg.data.teacher_seq_len else None)
    ds_config = resolve_deepspeed_config(cfg.teacher, cfg.train, distributed.env_world_size(),
                                         not torch.cuda.is_available(), trainable=False)
    return tokenizer, own, hf, ds_config


def _start(args: argparse.Namespace, cfg: RunConfig, tokenizer, own, out: Path, k: int, temperature: float, world):
    """The run's training split, the cache's parameters (its metadata) and the parts the metadata lists
    (those of a finished cache made again, to check), after rank 0 checked that a partial cache in ``out``
    was started with the same parameters and marked the cache incomplete."""
    import torch

    from .. import cache
    from ..data import build_splits, tokenizer_fingerprint

    splits = build_splits(cfg.data, tokenizer, cfg.train.seed, cfg.probe_fraction(), own)  # the run's training split
    train, fingerprint = splits.train, splits.fingerprint
    params = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": fingerprint, "seq_len": cfg.data.seq_len,
              "teacher": str(Path(cfg.teacher.pretrained).expanduser().resolve()), "k": min(k, len(own or tokenizer)),
              "temperature": temperature, "shard_blocks": args.shard_blocks, "blocks": len(train),
              **({"teacher_tokenizer": tokenizer_fingerprint(own)} if own is not None else {})}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cache.check_started(out, params)
        listed = (cache.read_meta(out) or {}).get("parts")  # a finished cache made again: check its parts
        listed = listed if isinstance(listed, dict) else {}
        cache.write_meta(out, {**params, "complete": False, "parts": listed})
    torch.distributed.barrier()
    return train, params, cache.read_meta(out)["parts"]


def _cache_parts(args: argparse.Namespace, cfg: RunConfig, engine, train, out: Path, listed: dict, k: int, temperature: float,
                 vocab: int, world, cross: bool = False) -> int:
    """Write this rank's parts that are missing or not what ``listed`` says (part c is rank c mod world's);
    returns the number of parts."""
    import torch
    from tqdm.auto import tqdm

    from .. import cache

    chunks = -(-len(train) // args.shard_blocks)
    todo = [c for c in range(chunks) if c % world.size == world.rank  # missing, or not what the metadata lists
            and cache.part_problem(cache.part_path(out, c), listed.get(cache.part_path(out, c).name), False)]
    rounds = torch.tensor([len(todo)])
    torch.distributed.all_reduce(rounds, op=torch.distributed.ReduceOp.MAX)
    bar = tqdm(total=chunks, initial=chunks - len(todo) * world.size if world.is_main else 0,
               disable=not world.is_main, unit="part", desc="caching teacher")
    for r in range(int(rounds)):
        chunk = todo[r] if r < len(todo) else None
        blocks = list(range(chunk * args.shard_blocks, min(len(train), (chunk + 1) * args.shard_blocks))) \
            if chunk is not None else []
        rows = _part_rows(engine, train, blocks, cfg.train.micro_batch_size, k, temperature,
                          cfg.data.teacher_block if cross else cfg.data.seq_len, vocab, world.device, cross)
        if chunk is not None:
            cache.write_part(out, chunk, rows)
        bar.update(world.size if world.is_main else 0)
    bar.close()
    return chunks


def _part_rows(engine, train, blocks: list[int], mbs: int, k: int, temperature: float, seq_len: int, vocab: int,
               device, cross: bool = False) -> dict[str, list]:
    """The cache rows of ``blocks`` (none: this rank has no part this round but runs its forwards anyway),
    from the teacher's forwards over micro-batches of ``mbs`` blocks (``cross``: over its own columns of
    paired blocks)."""
    import torch

    from .. import cache
    from ..crosstok import CROSS
    from ..losses import distill_loss, next_token_targets, topk_targets

    # ZeRO-3 gathers parameters in every forward: every rank runs the same number of them.
    steps = torch.tensor([-(-len(blocks) // mbs)])
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
    rows: dict[str, list] = {}
    for b in range(int(steps)):
        index = blocks[b * mbs:(b + 1) * mbs]
        batch = {key: v.to(device) for key, v in train[index or [0]].items()}
        if cross:  # the teacher's own tokenization of the same text
            batch = {key: batch[CROSS + key] for key in ("input_ids", "attention_mask")}
        with torch.no_grad():
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
            labels, mask = next_token_targets(batch["input_ids"], batch["attention_mask"], batch.get("loss_mask"))
            ce = distill_loss(logits, labels, mask).token_ce
            top = topk_targets(logits, k, temperature)
        if index:
            for key, value in cache.block_rows(index, top, ce, seq_len, vocab).items():
                rows.setdefault(key, []).extend(value)
    return rows


def _finish(out: Path, params: dict, blocks: int, seq_len: int, chunks: int, world) -> None:
    """Each rank hashes the parts it owns (written now or by an interrupted run); rank 0 writes them into
    the metadata, marks the cache complete and prints its size."""
    import torch

    from .. import cache, distributed
    from ..files import file_entry

    owned = [cache.part_path(out, c) for c in range(world.rank, chunks, world.size)]
    mine = {path.name: file_entry(path) for path in owned}
    every = [None] * world.size
    torch.distributed.all_gather_object(every, mine, group=distributed.disk_group())
    if world.is_main:
        parts = dict(sorted((name, entry) for part in every for name, entry in part.items()))
        size = sum(entry["size"] for entry in parts.values())
        per_token = size / (blocks * seq_len)
        cache.write_meta(out, {**params, "complete": True, "bytes_per_token": per_token, "parts": parts})
        print(f"cached top-{params['k']} teacher predictions of {blocks:,} blocks to {out}: "
              f"{size / 2**20:.1f} MB, {per_token:.1f} bytes/token (bound {cache.stored_bytes_per_token(params['k'])})")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-cache-logits", __doc__)
    parser.add_argument("--out", help="cache folder (default: teacher.cache)")
    parser.add_argument("--top-k", type=cli.positive_int, help="k (default: the first student's distill.top_k)")
    parser.add_argument("--shard-blocks", type=cli.positive_int, default=256, help="blocks per part file (default 256)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-cache-logits", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
