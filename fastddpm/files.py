"""Atomic file writes: a reader (or a crash) never sees half a file.

The content goes to a temporary file in the target's folder, is flushed and
fsynced, and is moved over the target with ``os.replace`` (atomic on POSIX);
on any failure the temporary file is removed and the target keeps its old
content.  Checkpoints, logs, images and arrays are all written this way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_text_atomic"]

_UMASK = os.umask(0o022)  # read the process umask: mkstemp files are 0600, ours honour the umask
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None], *, make_parents: bool = False) -> Path:
    """Call ``write(temp_path)``, fsync the temp file and ``os.replace`` it onto ``path``.

    :param path: the final file.
    :param write: writes the whole content to the temporary path it is given
        (a sibling of ``path`` ending in ``.tmp``).
    :param make_parents: create missing parent folders first.
    :return: ``path``.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path, text: str, *, make_parents: bool = False) -> Path:
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, make_parents=make_parents)
