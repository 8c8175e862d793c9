#!/usr/bin/env python
"""Hard-label (sequence-level) distillation data: the teacher writes the responses.

    python tools/generate.py --help        (the console command: codistill-generate --help)

A thin shell over codistill/commands/generate.py, where the code and its usage live.
"""
from codistill.commands.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
