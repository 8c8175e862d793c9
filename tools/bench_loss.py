#!/usr/bin/env python
"""The chunked distillation loss against a plain PyTorch reference, side by side.

    python tools/bench_loss.py --help        (the console command: codistill-bench-loss --help)

A thin shell over codistill/commands/bench_loss.py, where the code and its usage live.
"""
from codistill.commands.bench_loss import main

if __name__ == "__main__":
    raise SystemExit(main())
