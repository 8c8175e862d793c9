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

from codistill.config import ConfigError, load_config  # noqa: E402
from codistill import memory  # noqa: E402
from codistill.distributed import env_rank, env_world_size  # noqa: E402
from codistill.trainer import NonFinite, Trainer  # noqa: E402

# --debug shrinks the run so a problem shows up in seconds; user overrides still win.
DEBUG_OVERRIDES = [
    "train.max_steps=8", "train.log_interval=1", "train.eval_interval=4",
    "train.eval_batches=2", "train.detect_anomaly=true", "distill.head_start_steps=1",
    "distill.burn_in_steps=1",
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


def fail(args: argparse.Namespace, error: object, code: int, every_rank: bool = False) -> int:
    """One line on stderr (rank 0, or every rank when the ranks disagree), or the traceback with --debug."""
    if args.debug and isinstance(error, BaseException):
        raise error
    if every_rank or env_rank() == 0:
        prefix = f"codistill: error: rank {env_rank()}: " if every_rank else "codistill: error: "
        print(f"{prefix}{error}", file=sys.stderr, flush=True)
    return code


def lost_contact(exc: RuntimeError) -> bool:
    """A collective failed because a peer died or went silent (gloo/NCCL wording)."""
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "nccl"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = (DEBUG_OVERRIDES if args.debug else []) + list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.dry_run:  # the memory estimate, then stop: nothing is built or written
            lines = memory.report(cfg, env_world_size())
            if env_rank() == 0:
                print("\n".join(["dry run (dry_run=true): nothing trained or written", *lines]), flush=True)
            return 0
        Trainer(cfg, debug=args.debug).fit()
    except ConfigError as exc:
        return fail(args, exc, 2)
    except NonFinite as exc:
        return fail(args, exc, 3)
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        return fail(args, f"lost contact with another rank, ending the job ({' '.join(str(exc).split())[:200]})", 4,
                    every_rank=True)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
