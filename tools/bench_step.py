#!/usr/bin/env python
"""Cost of a co-distillation step against training the models separately.

    python tools/bench_step.py --help        (the console command: codistill-bench-step --help)

A thin shell over codistill/commands/bench_step.py, where the code and its usage live.
"""
from codistill.commands.bench_step import main

if __name__ == "__main__":
    raise SystemExit(main())
