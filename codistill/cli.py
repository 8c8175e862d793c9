"""The command-line shell every entry point shares: ``--config`` plus ``dotted.key=value``
overrides, one-line errors on rank 0 and the exit codes of :mod:`codistill.errors`.

A command is a parser and a body::

    def main(argv=None) -> int:
        return cli.run("codistill-x", build_parser(), body, argv)

``body(args)`` returns an exit code (or None for 0). Bad input (:class:`ConfigError`)
ends with ``<prog>: error: <one line>`` on rank 0 and exit 2; a non-finite loss with exit
3; a lost rank with ``<prog>: error: rank R: lost contact ...`` on every rank and exit 4;
a write the disk refused (:class:`StorageFailed` from a checkpoint save, or a full or
read-only disk anywhere else) with exit 5; a run the command started that failed
(:class:`RunFailed`) with exit 1.
``--debug`` (where a command has it) shows the traceback instead. A process group the
body made is torn down on the way out (one that existed before is left alone); a command run
as the process's own command line (``argv`` None) that made one then ends the process itself
(:func:`leave`), as the C++ threads a ZeRO-3 model leaves behind can abort the interpreter's
shutdown after the work is done.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from .config import RunConfig, load_config
from .errors import (EXIT_FAILED, EXIT_INPUT, EXIT_LOST_RANK, EXIT_NONFINITE, EXIT_STORAGE, ConfigError, Interrupted,
                     NonFinite, RunFailed, StorageFailed)


def parser_for(prog: str, doc: Optional[str], config: bool = True, debug: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the shared options: ``--config`` and overrides (when ``config``),
    ``--debug`` (when ``debug``) and the hidden ``--local_rank`` the deepspeed launcher passes."""
    parser = _OneLine(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        parser.add_argument("--config", help="YAML run config (default: the embedded configs/tiny.yaml)")
    if debug:
        parser.add_argument("--debug", action="store_true",
                            help="a short run with anomaly detection, a log line per step and full tracebacks")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if config:
        parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                            help="override any config key, e.g. output_dir=runs/x train.max_steps=50 train.seed=1")
    return parser


class _OneLine(argparse.ArgumentParser):
    """A bad argument is one line, like every other error (argparse adds the usage above it)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message[:200]} (see --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def run_config(args: argparse.Namespace, before: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """The validated config of ``--config`` with ``before`` and then the user's overrides applied."""
    return load_config(args.config, [*before, *args.overrides])


def run(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], Optional[int]],
        argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: the command line), run ``body`` and map failures to exit codes."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import torch.distributed as dist  # after parsing: `--help` and bad arguments need no torch

    from .distributed import shutdown

    ours = not (dist.is_available() and dist.is_initialized())  # a caller's process group is left alone
    previous = _interruptible()
    try:
        code = _outcome(prog, args, body)
    finally:
        _settled()  # the outcome is decided (a finished run is saved): a late signal must not change it
        made = ours and dist.is_available() and dist.is_initialized()
        if made:
            shutdown()
        if argv is not None:  # a caller's process goes on with its own handlers
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if argv is None and made:
        leave(code)
    return code


def _outcome(prog: str, args: argparse.Namespace, body: Callable[[argparse.Namespace], Optional[int]]) -> int:
    """``body``'s exit code, or the code of the failure it raised."""
    debug = bool(getattr(args, "debug", False))
    try:
        return body(args) or 0
    except ConfigError as exc:
        return _fail(prog, exc, EXIT_INPUT, debug)
    except (Interrupted, KeyboardInterrupt) as exc:  # the training loop handles its own: this is start-up
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        return _fail(prog, f"stopped by {signal.Signals(signum).name} before training began; no checkpoint was "
                           "written", 128 + signum, debug, error=exc)
    except NonFinite as exc:
        return _fail(prog, exc, EXIT_NONFINITE, debug)
    except RunFailed as exc:
        return _fail(prog, exc, EXIT_FAILED, debug)
    except StorageFailed as exc:
        return _fail(prog, exc, EXIT_STORAGE, debug)
    except OSError as exc:
        if exc.errno not in _DISK_REFUSED:
            raise
        return _fail(prog, f"could not write {exc.filename or 'a file'}: {exc.strerror}", EXIT_STORAGE, debug,
                     every_rank=True, error=exc)
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        why = " ".join(str(exc).split())[:200]
        return _fail(prog, f"lost contact with another rank, ending the job ({why})", EXIT_LOST_RANK, debug,
                     every_rank=True, error=exc)


_received: list[int] = []  # signals taken by the start-up handler, in case Python dropped their exception


def _interruptible() -> dict:
    """SIGTERM raises :class:`Interrupted` (the default would end the process silently, its output folder
    still locked); returns the handlers it replaced. Only the main thread can set handlers."""
    def interrupt(signum: int, _frame) -> None:
        _received.append(signum)
        raise Interrupted(signum)

    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}


def _settled() -> None:
    """From here on SIGTERM is noted and ignored: the command's work is done or has failed with its own code,
    and only the teardown (process groups, exit handlers) is left, which a signal would cut short."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: _received.append(signum))


def check_interrupted() -> None:
    """Raise :class:`Interrupted` for a start-up signal whose exception never arrived: one that lands
    while a finalizer (``__del__``) runs is printed and dropped by Python, and start-up would go on."""
    if _received:
        raise Interrupted(_received[-1])


def leave(code: int) -> None:
    """End the process now with ``code``, its work done: output flushed and the exit handlers run
    (a run's output-folder lock is released), but no interpreter teardown. Threads that DeepSpeed's
    ZeRO-3 leaves in C++ may otherwise abort it ("terminate called without an active exception",
    signal 6), turning a finished run into a failed one for its launcher."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


MESSAGE_LIMIT = 2000  # an error line's characters at most (paths and a quoted value fit well within it)
_DISK_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # outside a checkpoint save (caches, logs)


def _fail(prog: str, message: object, code: int, debug: bool, every_rank: bool = False,
          error: Optional[BaseException] = None) -> int:
    """One line on stderr (rank 0, or every rank when the ranks disagree), or the traceback with --debug."""
    from .distributed import env_rank

    error = error if error is not None else message
    if debug and isinstance(error, BaseException):
        raise error
    if every_rank or env_rank() == 0:
        where = f"rank {env_rank()}: " if every_rank else ""
        line = " ".join(str(message).split())  # one line whatever a quoted value held
        if len(line) > MESSAGE_LIMIT:
            line = f"{line[:MESSAGE_LIMIT]}... ({len(line):,} characters)"
        print(f"{prog}: error: {where}{line}", file=sys.stderr, flush=True)
    return code


def lost_contact(exc: RuntimeError) -> bool:
    """A collective failed because a peer died or went silent (gloo/NCCL wording)."""
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "nccl"))


def module_command(module: str, nproc: int = 1) -> list[str]:
    """The command line that runs ``python -m module`` on ``nproc`` local ranks (torchrun with
    a free port for more than one), for tools that start training runs of their own."""
    from .distributed import free_port

    if nproc == 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", module]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a command this one starts (a run of codistill-compare, an arm of a benchmark): ours
    without this process's rendezvous variables (RANK, MASTER_PORT, ...: a run made in this process sets them,
    and a child that read them would join that finished run's address), plus ``extra``."""
    from .distributed import RENDEZVOUS

    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, **extra}


def run_module(module: str, args: list[str], nproc: int = 1, log_file: Optional[Path] = None) -> None:
    """Run a codistill command as a subprocess (appending its output to ``log_file``, else
    inheriting ours); a failure raises :class:`RunFailed` naming the command and where to look."""
    cmd = module_command(module, nproc) + args
    if log_file is None:
        proc = subprocess.run(cmd, env=child_env())
    else:
        with open(log_file, "a") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
    if proc.returncode != 0:
        where = f"; see {log_file}" if log_file else " (its output is above)"
        raise RunFailed(f"'python -m {module} {' '.join(args[:3])} ...' failed with exit code {proc.returncode}{where}")
