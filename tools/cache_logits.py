#!/usr/bin/env python
"""Cache a frozen teacher's top-k predictions over the training data, for soft-label students.

    python tools/cache_logits.py --help        (the console command: codistill-cache-logits --help)

A thin shell over codistill/commands/cache_logits.py, where the code and its usage live.
"""
from codistill.commands.cache_logits import main

if __name__ == "__main__":
    raise SystemExit(main())
