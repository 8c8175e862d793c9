#!/usr/bin/env python
"""Export models of a training checkpoint as Hugging Face folders.

    python tools/export_hf.py CHECKPOINT OUT [--model NAME ...] [--overwrite]

CHECKPOINT is a checkpoint folder (runs/x/checkpoints/step_00000300) or a run's
output_dir (its newest intact checkpoint). Each model goes to OUT/<name> with
safetensors weights (fp32, consolidated from any ZeRO stage), its config and the
run's tokenizer, ready for AutoModelForCausalLM.from_pretrained(OUT/<name>) offline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codistill.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", action="append", dest="models", help="export only this model (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="write into non-empty OUT/<name> folders")
    args = parser.parse_args(argv)
    try:
        from codistill.checkpoint import export_hf

        for folder in export_hf(args.checkpoint, args.out, args.models, args.overwrite):
            print(f"exported {folder}")
    except ConfigError as exc:
        print(f"export_hf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
