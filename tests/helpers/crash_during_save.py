"""Train with checkpoints every 2 steps and SIGKILL this process in the middle of
writing the second one (after the engines wrote, before the manifest), as a node
failure would. Run as a single process:

    crash_during_save.py output_dir=OUT [key.path=value ...]
"""
import os
import signal
from pathlib import Path

import torch
from micro import micro_trainer

from codistill import checkpoint


def main() -> None:
    _, trainer = micro_trainer("checkpoint.interval=2")
    real_save, saves = torch.save, []

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if Path(path).name.startswith("rank_") and ".staging_" in str(path):
            saves.append(path)
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.torch.save = dying_save
    trainer.fit()


if __name__ == "__main__":
    main()
