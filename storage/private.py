"""Store directories and files nobody but their owner can read, whatever the umask: a store,
a restored RAM image or an export holds guest memory (keys, passwords)."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path, *, narrow: bool = True) -> bool:
    """Makes path a directory only its owner can enter (its parents as mkdir -p makes them);
    returns whether it was created. An existing one is narrowed too unless not narrow (a
    directory the user named, such as the current one, keeps its mode)."""
    created = not path.exists()
    path.mkdir(DIR_MODE, parents=True, exist_ok=True)
    if created or narrow:
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask
    return created


def private_files(path: Path) -> None:
    """Every regular file directly in path: owner read/write only. RocksDB creates its files
    with the umask's mode; inside a 0700 directory they are out of reach anyway, this keeps
    them private when the directory is copied or its mode is opened up."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) and entry.stat().st_mode & 0o077:
            os.chmod(entry.path, FILE_MODE)


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """Opens path for writing (created if absent) as a file only its owner can read: an
    existing file's mode is narrowed too, before anything is written into it."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    fd = open_private(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
