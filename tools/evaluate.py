#!/usr/bin/env python
"""Evaluate a trained model: perplexity on text, replies to prompts.

    python tools/evaluate.py --help        (the console command: codistill-eval --help)

A thin shell over codistill/commands/evaluate.py, where the code and its usage live.
"""
from codistill.commands.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
