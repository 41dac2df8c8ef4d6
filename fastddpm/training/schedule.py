"""What the loop does after a step besides stepping: log, validate, sample, checkpoint."""
from __future__ import annotations

from typing import NamedTuple

from ..train_config import TrainConfig

__all__ = ["Due", "due_after"]


class Due(NamedTuple):
    """What is due after a step; each one reads the device's metrics back to the host."""

    checkpoint: bool
    log: bool
    validate: bool
    sample: bool

    def __bool__(self) -> bool:
        return any(self)


def due_after(config: TrainConfig, done: int, *, has_val: bool, stop: bool = False, overdue: bool = False) -> Due:
    """What is due after step ``done`` (1-based) of a run to ``config.steps``.

    :param has_val: images are held out for validation.
    :param stop: a signal asked the run to stop: checkpoint now.
    :param overdue: ``config.checkpoint_minutes`` have passed since the last checkpoint.
    A checkpoint is logged too; the last step validates (if it can), samples (if sampling at all) and
    checkpoints.
    """
    c = config
    last = done == c.steps
    checkpoint = bool((c.checkpoint_every and done % c.checkpoint_every == 0) or last or stop or overdue)
    log = done % c.log_every == 0 or checkpoint
    validate = has_val and bool((c.val_every and done % c.val_every == 0) or last)
    sample = bool(c.sample_every and (done % c.sample_every == 0 or last))
    return Due(checkpoint, log, validate, sample)
