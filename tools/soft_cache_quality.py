#!/usr/bin/env python
"""Does a student trained from cached top-k teacher predictions match one trained
from the live teacher? Runs, with the same config, steps and seed:
  (1) soft-label training from the live frozen teacher,
  (2) tools/cache_teacher_logits.py at --top-k,
  (3) soft-label training from that cache,
and prints both final validation losses and their relative difference.

    python tools/soft_cache_quality.py --config configs/soft.yaml --out runs/cache-quality [--gpus 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_eval(output_dir: Path, student: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir / "tensorboard"))
    acc.Reload()
    return acc.Scalars(f"{student}/eval/loss")[-1].value


def launch(gpus: int, script: str, args: list[str]) -> None:
    from codistill.distributed import free_port

    cmd = ([sys.executable, script] if gpus == 1 else
           [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(gpus), "--master_port", str(free_port()),
            script])
    subprocess.run(cmd + args, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/soft.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two runs and the cache")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=2, help="ranks per run (1: plain python)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from codistill.config import load_config

    cfg = load_config(args.config, args.overrides)
    student = cfg.students[0].name
    common = ["--config", args.config, *args.overrides, f"distill.top_k={args.top_k}"]
    cache_dir = args.out / f"cache-k{args.top_k}"
    launch(args.gpus, "launch/train.py", common + [f"output_dir={args.out / 'live'}", "overwrite=true"])
    launch(args.gpus, "tools/cache_teacher_logits.py", common + [f"teacher.cache={cache_dir}"])
    launch(args.gpus, "launch/train.py", common + [f"output_dir={args.out / 'cached'}", f"teacher.cache={cache_dir}",
                                                   "overwrite=true"])
    live, cached = last_eval(args.out / "live", student), last_eval(args.out / "cached", student)
    meta = json.loads((cache_dir / "codistill_cache.json").read_text())
    result = {"live_val_loss": live, "cached_val_loss": cached, "relative_difference": (cached - live) / live,
              "top_k": args.top_k, "bytes_per_token": meta["bytes_per_token"], "steps": cfg.train.max_steps}
    print(f"student validation loss: live teacher {live:.4f}, cached top-{args.top_k} {cached:.4f} "
          f"({100 * result['relative_difference']:+.2f}%); cache {meta['bytes_per_token']:.1f} bytes/token")
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
