"""Train a teacher and its students together.

    deepspeed [--num_gpus N] [--master_port P] launch/train.py --config configs/X.yaml [key.path=value ...]
    python launch/train.py [--config configs/X.yaml] [--debug] [key.path=value ...]
    mpirun -np N python launch/train.py --config configs/X.yaml [key.path=value ...]
    codistill-train ...   (the same, as a console command)

Without --config the embedded default configs/tiny.yaml runs; with resume (auto or a run's
folder or checkpoint) and no --config, the run continues with its own resolved config.yaml.
"""
from __future__ import annotations

import argparse
from typing import Optional

from .. import cli

# --debug shrinks the run so a problem shows up in seconds; user overrides still win.
DEBUG_OVERRIDES = [
    "train.max_steps=8", "train.log_interval=1", "train.eval_interval=4",
    "train.eval_batches=2", "train.detect_anomaly=true", "distill.head_start_steps=1",
    "distill.burn_in_steps=1",
]


def body(args: argparse.Namespace) -> int:
    from .. import memory
    from ..distributed import env_rank, env_world_size

    from ..identity import own_config

    if args.config is None:  # a run continued with resume: its own config, not the embedded default
        args.config = own_config(args.overrides)
        if args.config is not None and env_rank() == 0:
            print(f"config: {args.config} (the run's own; resume without --config)", flush=True)
    cfg = cli.run_config(args, DEBUG_OVERRIDES if args.debug else [])
    if cfg.dry_run:  # the memory estimate, then stop: nothing is built or written
        lines = memory.report(cfg, env_world_size())
        if env_rank() == 0:
            print("\n".join(["dry run (dry_run=true): nothing trained or written", *lines]), flush=True)
        return 0
    from ..trainer import Trainer

    trainer = Trainer(cfg, debug=args.debug)
    cli.check_interrupted()  # a SIGTERM during the build whose exception a finalizer swallowed
    trainer.fit()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-train", cli.parser_for("codistill-train", __doc__, debug=True), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
