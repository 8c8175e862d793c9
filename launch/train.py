#!/usr/bin/env python
"""Train a teacher and its students together.

    python launch/train.py --help          (the console command: codistill-train --help)

A thin shell over codistill/commands/train.py, where the code and its usage live.
"""
from codistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
