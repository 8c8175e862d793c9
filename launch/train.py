#!/usr/bin/env python
"""Train a teacher and its students together.

    deepspeed [--num_gpus N] [--master_port P] launch/train.py --config configs/X.yaml [key.path=value ...]
    python launch/train.py [--config configs/X.yaml] [--debug] [key.path=value ...]
    mpirun -np N python launch/train.py --config configs/X.yaml [key.path=value ...]

Without --config the embedded default configs/tiny.yaml runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codistill.config import ConfigError  # noqa: E402
from codistill.distributed import env_rank  # noqa: E402

# --debug shrinks the run so a problem shows up in seconds; user overrides still win.
DEBUG_OVERRIDES = [
    "train.max_steps=8", "train.log_interval=1", "train.eval_interval=4",
    "train.eval_batches=2", "train.detect_anomaly=true",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    parser.add_argument("--debug", action="store_true",
                        help="a short run with anomaly detection, a log line per step and full tracebacks")
    # Set by the deepspeed launcher; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override any config key, e.g. output_dir=runs/x train.max_steps=50 train.seed=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = (DEBUG_OVERRIDES if args.debug else []) + list(args.overrides)
    try:
        from codistill.config import load_config
        from codistill.trainer import Trainer

        cfg = load_config(args.config, overrides)
        Trainer(cfg, debug=args.debug).fit()
    except ConfigError as exc:
        if args.debug:
            raise
        if env_rank() == 0:
            print(f"codistill: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
