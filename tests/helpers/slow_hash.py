"""Train with rank 0's checkpoint hashing slowed far past train.collective_timeout_s, as a
checkpoint of tens of GB would be, to show a save waits for it instead of ending the job.
Runs the real entry point (under any launcher):

    SLOW_HASH_S=8 slow_hash.py --config ... [key.path=value ...]
"""
import os
import sys
import time

from codistill import checkpoint, files
from codistill.commands import train


def main() -> int:
    delay, real, slept = float(os.environ["SLOW_HASH_S"]), files.sha256_file, []

    def slow(path):
        if checkpoint.torch.distributed.get_rank() == 0 and not slept:  # once: one long file
            slept.append(path)
            time.sleep(delay)
        return real(path)

    files.sha256_file = slow  # what the checkpoint's manifest entries are hashed with
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
