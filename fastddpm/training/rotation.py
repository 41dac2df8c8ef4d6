"""Step checkpoints of a run: their names, finding them, and keeping the last ``keep_last``.

``out_dir/checkpoints/step_0001000.safetensors`` (+ ``.json``) is the checkpoint after step 1000.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["checkpoints_in", "latest_checkpoint", "remove_old_checkpoints", "step_name", "step_of"]


def step_name(step: int) -> str:
    """``step_XXXXXXX``: the stem of the checkpoint (and sample grid) of step ``step``."""
    return f"step_{step:07d}"


def step_of(path: Path) -> int:
    """The step of a ``step_XXXXXXX.safetensors`` file (-1 for other names)."""
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints_in(out_dir) -> list[Path]:
    """The ``step_*.safetensors`` checkpoints of a run, oldest first."""
    d = Path(out_dir) / "checkpoints"
    found = [(step_of(p), p) for p in (d.glob("step_*.safetensors") if d.is_dir() else ())]
    return [p for s, p in sorted(found) if s >= 0]


def latest_checkpoint(out_dir) -> Path | None:
    """The newest step checkpoint of a run (None if it has none)."""
    found = checkpoints_in(out_dir)
    return found[-1] if found else None


def remove_old_checkpoints(out_dir, step: int, keep_last: int) -> list[Path]:
    """Remove the step checkpoints (and their ``.json``) at or before ``step`` beyond the newest
    ``keep_last`` of them; returns the removed ones.  Only older ones: after resuming from an earlier
    checkpoint, later files are left alone (training overwrites them as it reaches them)."""
    older = [p for p in checkpoints_in(out_dir) if step_of(p) <= step]
    removed = older[:-keep_last]
    for old in removed:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return removed
