"""Train with checkpoints every 2 steps and SIGKILL this process in the middle of
writing the second one (after the engines wrote, before the manifest), as a node
failure would. Run as a single process:

    crash_during_save.py output_dir=OUT [key.path=value ...]
"""
import os
import signal
import sys
from pathlib import Path

import torch

from codistill import checkpoint
from codistill.config import load_config
from codistill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    cfg = load_config(ROOT / "tests" / "configs" / "micro.yaml", ["checkpoint.interval=2", *sys.argv[1:]])
    real_save, saves = torch.save, []

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if Path(path).name.startswith("rank_") and ".staging_" in str(path):
            saves.append(path)
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.torch.save = dying_save
    Trainer(cfg).fit()


if __name__ == "__main__":
    main()
