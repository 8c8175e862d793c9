#!/usr/bin/env python
"""Expected memory per rank of a run, before launching it (no weights, no GPU needed).

For every model: parameters, gradients and optimizer states under its ZeRO stage and
offload settings, activations of one micro-batch (traced on the 'meta' device), its
logits; the distillation loss's working set (chunked vs full logits); the runtime; the
expected peak; and the largest micro-batch that fits --device-memory.

    python tools/estimate_memory.py [--config configs/tiny.yaml] --world-size 8 --device cuda --device-memory 80GB
    python tools/estimate_memory.py --world-size 2            # this machine (CPU: RSS per rank)

The same report: `python launch/train.py --config X.yaml dry_run=true` (world size from the launcher).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codistill.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the run (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="estimate for this device (default: this machine's)")
    parser.add_argument("--device-memory", help="memory per rank to fit, e.g. 80GB (default: this machine's)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    try:
        from codistill.memory import parse_size, report

        cfg = load_config(args.config, args.overrides)
        size = parse_size(args.device_memory) if args.device_memory else None
        print("\n".join(report(cfg, args.world_size, args.device, size)))
    except ConfigError as exc:
        print(f"estimate_memory: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
