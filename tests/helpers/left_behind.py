"""A command that makes a one-rank process group, writes its result and leaves something behind
that would stop the interpreter's teardown (a thread that never ends, standing in for the C++
threads of a ZeRO-3 model, which abort it). Run as its own command line, it must still end at
once with its exit code, its exit handlers run; also when a SIGTERM arrives after its work, while its
process group is torn down (LATE_SIGNAL=1):

    left_behind.py OUT_FILE
"""
import atexit
import os
import signal
import sys
import threading
from pathlib import Path

from codistill import cli
from codistill.distributed import free_port


def body(args) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    out = Path(args.overrides[0])
    atexit.register(lambda: out.write_text("handlers ran\n"))
    threading.Thread(target=threading.Event().wait, daemon=False).start()  # never ends
    print("work done", flush=True)
    return 7


if __name__ == "__main__":
    if os.environ.get("LATE_SIGNAL"):
        import codistill.distributed as distributed

        real = distributed.shutdown
        distributed.shutdown = lambda: (os.kill(os.getpid(), signal.SIGTERM), real())
    sys.exit(cli.run("left_behind", cli.parser_for("left_behind", __doc__), body))
