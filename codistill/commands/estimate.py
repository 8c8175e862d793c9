"""Expected memory per rank of a run, before launching it (no weights, no GPU needed).

For every model: parameters, gradients and optimizer states under its ZeRO stage and
offload settings, activations of one micro-batch (traced on the 'meta' device), its
logits; the distillation loss's working set (chunked vs full logits); the runtime; the
expected peak; the largest micro-batch that fits --device-memory, and the one to choose: the
largest that leaves --headroom of it free, with the global batch it makes.

    python tools/estimate.py [--config configs/tiny.yaml] --world-size 8 --device cuda --device-memory 80GB
    codistill-estimate --world-size 2            # this machine (CPU: RSS per rank)

The same report: `python launch/train.py --config X.yaml dry_run=true` (world size from the launcher).
"""
from __future__ import annotations

import argparse
from typing import Optional

from .. import cli
from ..errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-estimate", __doc__)
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the run (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="estimate for this device (default: this machine's)")
    parser.add_argument("--device-memory", help="memory per rank to fit, e.g. 80GB (default: this machine's)")
    parser.add_argument("--headroom", type=float, default=0.15,
                        help="share of that memory the recommended micro-batch leaves free (default 0.15)")
    return parser


def body(args: argparse.Namespace) -> None:
    from ..memory import parse_size, report

    if not 0 <= args.headroom < 1:
        raise ConfigError(f"--headroom: expected a share in [0, 1), got {args.headroom}")
    cfg = cli.run_config(args)
    size = parse_size(args.device_memory) if args.device_memory else None
    print("\n".join(report(cfg, args.world_size, args.device, size, args.headroom)))


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-estimate", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
