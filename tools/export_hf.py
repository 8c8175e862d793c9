#!/usr/bin/env python
"""Export models of a training checkpoint as Hugging Face folders.

    python tools/export_hf.py --help        (the console command: codistill-export --help)

A thin shell over codistill/commands/export_hf.py, where the code and its usage live.
"""
from codistill.commands.export_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
