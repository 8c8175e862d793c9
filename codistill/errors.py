"""The project's own exceptions and the exit codes every entry point ends with."""
from __future__ import annotations

EXIT_FAILED = 1  # a run that a command started as a subprocess failed (its log says why)
EXIT_INPUT = 2  # bad input: a config key, a file, an argument
EXIT_NONFINITE = 3  # a NaN/inf loss or gradient stopped the run (train.nonfinite=stop)
EXIT_LOST_RANK = 4  # another rank died or went silent (train.collective_timeout_s)
EXIT_STORAGE = 5  # the disk refused a write (full, over quota, read-only): nothing the user had is lost


QUOTE_LIMIT = 200  # characters of a bad value an error quotes


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error line: escaped (never a line break) and at most ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ConfigError(ValueError):
    """Bad user input. The message is one line: what is wrong, where, what was expected."""


class NonFinite(RuntimeError):
    """A NaN/inf loss or gradient with ``train.nonfinite=stop`` (or a gradient, which cannot be skipped)."""

    def __init__(self, message: str, save: bool = True):
        super().__init__(message)
        self.save = save  # whether the in-memory state is still good enough to checkpoint


class RunFailed(RuntimeError):
    """A run that a command started as a subprocess failed; the message names it and its log."""


class StorageFailed(RuntimeError):
    """A write the disk refused (full, quota, read-only) ended the run; what was being written is removed."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) outside the training loop, which handles its own: start-up ends with one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
