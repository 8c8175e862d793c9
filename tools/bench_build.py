#!/usr/bin/env python
"""Host memory a rank adds while building a model, whole against ZeRO-3 construction.

    python tools/bench_build.py --help        (the console command: codistill-bench-build --help)

A thin shell over codistill/commands/bench_build.py, where the code and its usage live.
"""
from codistill.commands.bench_build import main

if __name__ == "__main__":
    raise SystemExit(main())
