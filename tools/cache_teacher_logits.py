#!/usr/bin/env python
"""Run a frozen teacher over the training data once and cache its top-k predictions,
so soft-label students can train without loading the teacher.

    python tools/cache_teacher_logits.py --config configs/soft.yaml [--out DIR] [--top-k 64]
    deepspeed --num_gpus 2 tools/cache_teacher_logits.py --config configs/soft.yaml

The run's config gives the data, tokenizer, seq_len, seed and the teacher (its
``pretrained`` folder and DeepSpeed section, e.g. ZeRO-3 across ranks); the output
folder defaults to ``teacher.cache``; k and T default to the first student's
``distill.top_k`` and ``distill.temperature``. Work is split over ranks in parts
of ``--shard-blocks`` blocks; a killed run continues where it stopped. Prints the
storage cost in bytes per token at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from codistill import cache, distributed  # noqa: E402
from codistill.config import ConfigError, load_config  # noqa: E402
from codistill.data import build_splits, check_data_source, resolve_tokenizer, tokenizer_fingerprint  # noqa: E402
from codistill.losses import distill_loss, next_token_targets, topk_targets  # noqa: E402
from codistill.models import build_model, check_model, model_config, pretrained_tokenizer_dir  # noqa: E402


def run(args: argparse.Namespace) -> None:
    import deepspeed

    from codistill.trainer import quiet_library_noise, resolve_deepspeed_config

    quiet_library_noise()
    cfg = load_config(args.config, args.overrides)
    if not cfg.teacher.pretrained:
        raise ConfigError("teacher.pretrained: caching needs a trained teacher folder")
    out = Path(args.out or cfg.teacher.cache or "").expanduser()
    if not str(args.out or cfg.teacher.cache or ""):
        raise ConfigError("give --out or teacher.cache: the folder to write the cache to")
    settings = cfg.distill_for(0)
    k, temperature = args.top_k or settings.top_k, settings.temperature
    check_data_source(cfg.data)
    own = pretrained_tokenizer_dir(cfg.teacher)
    tokenizer = resolve_tokenizer(cfg.data, str(own) if own else None)
    hf = model_config(cfg.teacher, tokenizer)
    check_model(cfg.teacher, hf, tokenizer, tokenizer_fingerprint(tokenizer), cfg.data.seq_len)
    ds_config = resolve_deepspeed_config(cfg.teacher, cfg.train, distributed.env_world_size(),
                                         not torch.cuda.is_available(), trainable=False)
    world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed)
    train, fingerprint = splits.train, splits.fingerprint
    params = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": fingerprint, "seq_len": cfg.data.seq_len,
              "teacher": str(Path(cfg.teacher.pretrained).expanduser().resolve()), "k": min(k, len(tokenizer)),
              "temperature": temperature, "shard_blocks": args.shard_blocks, "blocks": len(train)}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cache.check_started(out, params)
        cache.write_meta(out, {**params, "complete": False})
    torch.distributed.barrier()

    model = build_model(cfg.teacher, hf, seed=cfg.train.seed).requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    vocab, seq_len, mbs = len(tokenizer), cfg.data.seq_len, cfg.train.micro_batch_size
    chunks = -(-len(train) // args.shard_blocks)
    todo = [c for c in range(chunks) if c % world.size == world.rank and not cache.part_path(out, c).exists()]
    rounds = torch.tensor([len(todo)])
    torch.distributed.all_reduce(rounds, op=torch.distributed.ReduceOp.MAX)
    bar = tqdm(total=chunks, initial=chunks - len(todo) * world.size if world.is_main else 0,
               disable=not world.is_main, unit="part", desc="caching teacher")
    for r in range(int(rounds)):
        chunk = todo[r] if r < len(todo) else None
        blocks = list(range(chunk * args.shard_blocks, min(len(train), (chunk + 1) * args.shard_blocks))) \
            if chunk is not None else []
        # ZeRO-3 gathers parameters in every forward: every rank runs the same number of them.
        steps = torch.tensor([-(-len(blocks) // mbs)])
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        rows: dict[str, list] = {}
        for b in range(int(steps)):
            index = blocks[b * mbs:(b + 1) * mbs]
            batch = {key: v.to(world.device) for key, v in train[index or [0]].items()}
            with torch.no_grad():
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
                labels, mask = next_token_targets(batch["input_ids"], batch["attention_mask"], batch.get("loss_mask"))
                ce = distill_loss(logits, labels, mask).token_ce
                top = topk_targets(logits, k, temperature)
            if index:
                for key, value in cache.block_rows(index, top, ce, seq_len, vocab).items():
                    rows.setdefault(key, []).extend(value)
        if chunk is not None:
            cache.write_part(out, chunk, rows)
        bar.update(world.size if world.is_main else 0)
    bar.close()
    torch.distributed.barrier()
    if world.is_main:
        size = sum(cache.part_path(out, c).stat().st_size for c in range(chunks))
        per_token = size / (len(train) * seq_len)
        cache.write_meta(out, {**params, "complete": True, "bytes_per_token": per_token})
        print(f"cached top-{params['k']} teacher predictions of {len(train):,} blocks to {out}: "
              f"{size / 2**20:.1f} MB, {per_token:.1f} bytes/token (bound {8 * params['k']})")
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the soft-mode run config (default: configs/tiny.yaml)")
    parser.add_argument("--out", help="cache folder (default: teacher.cache)")
    parser.add_argument("--top-k", type=int, help="k (default: the first student's distill.top_k)")
    parser.add_argument("--shard-blocks", type=int, default=256, help="blocks per part file (default 256)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    if (args.top_k is not None and args.top_k < 1) or args.shard_blocks < 1:
        parser.error("--top-k and --shard-blocks must be positive")
    try:
        run(args)
    except ConfigError as exc:
        if distributed.env_rank() == 0:
            print(f"cache_teacher_logits: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
