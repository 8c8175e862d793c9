#!/usr/bin/env python
"""Export models of a training checkpoint as Hugging Face folders.

    python tools/export.py --help        (the console command: codistill-export --help)

A thin shell over codistill/commands/export.py, where the code and its usage live.
"""
from codistill.commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
