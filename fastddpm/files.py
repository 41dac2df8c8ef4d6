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
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "write_text_atomic", "write_binary_atomic", "save_pil_atomic",
           "remove_stale_temp_files"]

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
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, path) from e
        raise
    _fsync_dir(path.parent)
    return path


def temp_prefix(path) -> str:
    """The name prefix of ``path``'s temporary files (``.<name>.``); they end in ``.tmp``."""
    return f".{Path(path).name}."


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the temporary files that writes killed mid-way left in ``directory`` (``.*.tmp``).

    Call it only while no other process writes there (a run directory under its lock).
    :return: the files removed.
    """
    directory = Path(directory)
    removed = []
    for p in directory.glob(".*.tmp") if directory.is_dir() else ():
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` re-raised with the user's path in its message, not the temporary file's."""
    reason = error.strerror or str(error)
    return type(error)(error.errno, f"cannot write {str(path)!r}: {reason}") if error.errno else \
        OSError(f"cannot write {str(path)!r}: {reason}")


def write_text_atomic(path, text: str, *, make_parents: bool = False) -> Path:
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, make_parents=make_parents)


def write_binary_atomic(path, write: Callable[[BinaryIO], None], *, make_parents: bool = False) -> Path:
    """Write a binary file atomically: ``write(file_object)`` writes the whole content."""
    def to_temp(tmp):
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write(path, to_temp, make_parents=make_parents)


def save_pil_atomic(image, path, fmt: str, **kw) -> Path:
    """Save a PIL image atomically in format ``fmt`` (``kw`` go to ``image.save``), parent folders created."""
    return write_binary_atomic(path, lambda f: image.save(f, format=fmt, **kw), make_parents=True)
