"""Train while the disk of rank FULL_DISK_RANK fills up in the middle of the save of step
FULL_DISK_STEP: the write of its student's ZeRO optimizer shard stops after a few bytes with
ENOSPC, as a full disk would. Runs the real entry point (under any launcher):

    FULL_DISK_RANK=1 FULL_DISK_STEP=4 full_disk.py --config ... [key.path=value ...]
"""
import errno
import os
import sys
from pathlib import Path

import torch

from codistill.commands import train


def main() -> int:
    victim, real_save = int(os.environ["FULL_DISK_RANK"]), torch.save
    staging = f".staging_step_{int(os.environ['FULL_DISK_STEP']):08d}"

    def filling_save(obj, f, *args, **kwargs):
        path = Path(str(f))
        if torch.distributed.get_rank() == victim and staging in path.parts and path.parent.parent.name == "student" \
                and "optim_states" in path.name:  # the disk fills part-way through the file
            path.write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, f, *args, **kwargs)

    torch.save = filling_save
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
