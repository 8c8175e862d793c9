#!/usr/bin/env python
"""Expected memory per rank of a run, before launching it (no weights, no GPU needed).

    python tools/estimate.py --help        (the console command: codistill-estimate --help)

A thin shell over codistill/commands/estimate.py, where the code and its usage live.
"""
from codistill.commands.estimate import main

if __name__ == "__main__":
    raise SystemExit(main())
