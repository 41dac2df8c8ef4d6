"""A training run's directory: only a fastddpm run (or an empty folder) is written into,
and only by one process at a time.

* :func:`check_is_run_dir`: a folder that holds anything but a fastddpm run (the
  user's own ``config.json``, ``metrics.csv``, ``loss.png`` ...) is refused before
  anything is written, so nothing of the user's is overwritten.
* :class:`RunDirLock`: an exclusive ``flock`` on ``out_dir/.fastddpm.lock`` holding the
  owner's pid; a second trainer on the same folder (a second ``train``, a ``--resume``
  while another trains) is refused with "in use by pid N".  The kernel drops the lock
  when its process ends, however it ends, so a killed run leaves no stale lock.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

__all__ = ["RunDirLock", "RunDirInUseError", "check_is_run_dir", "LOCK_NAME"]

LOCK_NAME = ".fastddpm.lock"
# what a run's folder holds before its config.json is written (the trainer creates checkpoints/ first)
_EARLY_ENTRIES = {"checkpoints", LOCK_NAME}
_CHECKPOINT_NAME = re.compile(r"(step_\d+|best)\.(safetensors|json)|\..*\.tmp")


def _is_fastddpm_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and "fastddpm_version" in d and "train_config" in d


def check_is_run_dir(out_dir) -> None:
    """Raise ``ValueError`` if ``out_dir`` exists, is not empty and is not a fastddpm run.

    A run is a folder whose ``config.json`` fastddpm wrote, or one that holds only an empty (or
    checkpoints-only) ``checkpoints/`` and the lock file (a run stopped before its first step).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries or _is_fastddpm_config(out_dir / "config.json"):
        return
    ckpts = out_dir / "checkpoints"
    if set(entries) <= _EARLY_ENTRIES and (not ckpts.exists() or (
            ckpts.is_dir() and all(_CHECKPOINT_NAME.fullmatch(p.name) for p in ckpts.iterdir()))):
        return
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    raise ValueError(f"out_dir {str(out_dir)!r} is not empty and is not a fastddpm run (no config.json written by "
                     f"fastddpm; it holds {shown}): choose a new or empty folder, so nothing in it is overwritten")


class RunDirInUseError(OSError):
    """Another process (or another trainer in this one) holds the run directory's lock."""


class RunDirLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`.

    :param out_dir: the run directory (must exist).
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it).

        :raises RunDirInUseError: another process (or another trainer in this one) holds it.
        """
        if self._file is not None or fcntl is None:
            return
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RunDirInUseError(f"run directory {str(self.path.parent)!r} is in use by pid {owner} (another "
                                   f"fastddpm train or resume); wait for it to end, stop it, or choose another "
                                   f"--out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
