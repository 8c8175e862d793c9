#!/usr/bin/env python
"""Does a student trained from a cached top-k teacher match one trained from the live teacher?

    python tools/cache_quality.py --help        (the console command: codistill-cache-quality --help)

A thin shell over codistill/commands/cache_quality.py, where the code and its usage live.
"""
from codistill.commands.cache_quality import main

if __name__ == "__main__":
    raise SystemExit(main())
