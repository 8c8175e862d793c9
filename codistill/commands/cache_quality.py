"""Does a student trained from cached top-k teacher predictions match one trained
from the live teacher? Runs, with the same config, steps and seed:
  (1) soft-label training from the live frozen teacher,
  (2) codistill-cache-logits at --top-k,
  (3) soft-label training from that cache,
and prints both final validation losses and their relative difference.

    python tools/cache_quality.py --config configs/soft.yaml --out runs/cache-quality [--gpus 2]
    codistill-cache-quality ...   (the same, as a console command)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .. import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-cache-quality", __doc__)
    parser.set_defaults(config="configs/soft.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two runs and the cache")
    parser.add_argument("--top-k", type=cli.positive_int, default=64)
    parser.add_argument("--gpus", type=cli.positive_int, default=2, help="ranks per run (1: one process)")
    return parser


def body(args: argparse.Namespace) -> None:
    from ..metrics import read_scalars

    cfg = cli.run_config(args)
    student = cfg.students[0].name
    common = ["--config", args.config, *args.overrides, f"distill.top_k={args.top_k}"]
    cache_dir = args.out / f"cache-k{args.top_k}"
    train, cache = "codistill.commands.train", "codistill.commands.cache_logits"
    cli.run_module(train, common + [f"output_dir={args.out / 'live'}", "overwrite=true"], args.gpus)
    cli.run_module(cache, common + [f"teacher.cache={cache_dir}"], args.gpus)
    cli.run_module(train, common + [f"output_dir={args.out / 'cached'}", f"teacher.cache={cache_dir}",
                                    "overwrite=true"], args.gpus)
    tag = f"{student}/eval/loss"
    live, cached = (max(read_scalars(args.out / run)[tag].items())[1] for run in ("live", "cached"))
    meta = json.loads((cache_dir / "codistill_cache.json").read_text())
    result = {"live_val_loss": live, "cached_val_loss": cached, "relative_difference": (cached - live) / live,
              "top_k": args.top_k, "bytes_per_token": meta["bytes_per_token"], "steps": cfg.train.max_steps}
    print(f"student validation loss: live teacher {live:.4f}, cached top-{args.top_k} {cached:.4f} "
          f"({100 * result['relative_difference']:+.2f}%); cache {meta['bytes_per_token']:.1f} bytes/token")
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-cache-quality", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
