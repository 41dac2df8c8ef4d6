"""A run's output folder made ready: created, writable, and with room for the checkpoints it keeps."""
from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["prepare_out_dir"]


def prepare_out_dir(out_dir: Path, keep_last: int, keep_best: bool, checkpoint_bytes: int) -> None:
    """Create ``out_dir/checkpoints`` and check that ``out_dir`` is writable and has room for ``keep_last``
    step checkpoints, ``best.safetensors`` (``keep_best``) and one being written, each ``checkpoint_bytes``.

    :raises OSError: naming the folder, when it cannot be written or the disk is too full.
    """
    where = repr(str(out_dir))
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".fastddpm_write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"out_dir {where} cannot be created or written to: {e.strerror or e}") from e
    free = shutil.disk_usage(out_dir).free
    # the kept step checkpoints, best.safetensors and the one being written
    count = keep_last + int(keep_best) + 1
    one = checkpoint_bytes
    if free < count * one:
        raise OSError(f"out_dir {where} has {free / 2**20:.1f} MiB free; checkpoints need about "
                      f"{count * one / 2**20:.1f} MiB ({count} checkpoints of {one / 2**20:.1f} MiB: keep_last="
                      f"{keep_last}, best, one being written)")
