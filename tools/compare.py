#!/usr/bin/env python
"""Does co-distillation make the student better than training it alone? Four arms, N seeds.

    python tools/compare.py --help        (the console command: codistill-compare --help)

A thin shell over codistill/commands/compare.py, where the code and its usage live.
"""
from codistill.commands.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
