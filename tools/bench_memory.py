#!/usr/bin/env python
"""Where a training step's memory goes: peak RSS by phase, for each arm of a comparison.

    python tools/bench_memory.py --help        (the console command: codistill-bench-memory --help)

A thin shell over codistill/commands/bench_memory.py, where the code and its usage live.
"""
from codistill.commands.bench_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
