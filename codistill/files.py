"""Files on disk: hashes, atomic writes, fsync, whether a folder can be written."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import ConfigError


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """What a manifest records of a file: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def entry_problem(path: Path, size: object, sha256: object, source: str) -> Optional[str]:
    """What differs between ``path`` and the size and sha256 that ``source`` lists for it
    (None: nothing): missing, truncated or changed, corrupted."""
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path} is truncated or changed ({actual} bytes, expected {size})"
    if sha256_file(path) != sha256:
        return f"{path} is corrupted (sha256 differs from {source})"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # what an ordinary open() would leave off a new file's permissions


def temp_beside(path: Path, folder: bool = False) -> Path:
    """A new, empty file (or ``folder``) with a fresh random name beside ``path``, created exclusively: a link
    or file planted under any name cannot be written through (``O_EXCL``; ``mkdtemp`` likewise). Its
    permissions are an ordinary new file's (or folder's), not the private ones ``tempfile`` gives."""
    if folder:
        made = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        made.chmod(0o777 & ~UMASK)
        return made
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    return Path(name)


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` so that it is either the old file or the whole new one, never a part, and
    is on disk when this returns (the file, then its folder's entry). The new file is made exclusively
    under a random name and renamed over ``path``: a link at ``path`` is replaced, never followed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folders(folder: Path) -> None:
    """Every folder below ``folder`` (deepest first), then ``folder`` itself."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            fsync(path)
    fsync(folder)


def check_writable(folder: Path, key: str) -> None:
    """``folder`` exists (made if needed) and a file can be created in it; a one-line ConfigError if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise ConfigError(f"{key}: {folder} is a file; expected a folder") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write in {folder} ({exc.strerror or exc})") from None


RUN_FOLDERS = ("checkpoints", "tensorboard")  # what a run writes below its output_dir, file by file


def check_run_folder(output_dir: Path) -> None:
    """The folders a run writes into file by file are its own: a symbolic link planted in their place
    would have the run write wherever it points (the files a run replaces whole are renamed over,
    never written through)."""
    for name in RUN_FOLDERS:
        path = output_dir / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a symbolic link" if path.is_symlink() else "not a folder"
            raise ConfigError(f"output_dir: {path} is {kind}; a run writes only into folders of its own there "
                              "(move it away, or choose another output_dir)")


def remove_tree(path: Path) -> None:
    """Remove a folder, or a link or file planted in its place (never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
