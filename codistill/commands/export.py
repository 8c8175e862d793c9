"""Export models of a training checkpoint as Hugging Face folders.

    python tools/export.py CHECKPOINT OUT [--model NAME ...] [--overwrite]
    codistill-export CHECKPOINT OUT [--model NAME ...] [--overwrite]

CHECKPOINT is a checkpoint folder (runs/x/checkpoints/step_00000300) or a run's
output_dir (its newest intact checkpoint). Each model goes to OUT/<name> with
safetensors weights (fp32, consolidated from any ZeRO stage), its config and the
run's tokenizer, ready for AutoModelForCausalLM.from_pretrained(OUT/<name>) offline.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-export", __doc__, config=False)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", action="append", dest="models", help="export only this model (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="write into non-empty OUT/<name> folders")
    return parser


def body(args: argparse.Namespace) -> None:
    from ..checkpoint import export_hf

    for folder in export_hf(args.checkpoint, args.out, args.models, args.overwrite):
        print(f"exported {folder}")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-export", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
