"""The loop's bookkeeping on the device: sums over a logging window, non-finite steps, the smoothed loss.

Every step adds to device tensors without a host synchronisation; the host reads them only at a
logging, validation, sampling or checkpoint step (``check``, ``take_window``).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["LOSS_EMA_BETA", "MAX_CONSECUTIVE_SKIPS", "StepMeter"]

LOSS_EMA_BETA = 0.98  # smoothing of the train loss that picks "best" when there is no validation
MAX_CONSECUTIVE_SKIPS = 50  # nonfinite='skip': this many non-finite steps in a row end training


class StepMeter:
    """The loss and gradient-norm sums of the steps since the last read, the first non-finite step
    (``nonfinite='error'``), the longest run of skipped steps (``'skip'``), and the bias-corrected
    exponential moving average of the loss (saved in checkpoints: ``loss_ema``, ``loss_ema_count``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_ema = torch.zeros((), device=device)
        self.loss_ema_count = 0
        self.reset()

    def restore(self, loss_ema: float, loss_ema_count: int) -> None:
        """The smoothed loss of a checkpoint."""
        self.loss_ema = torch.tensor(float(loss_ema), device=self.device)
        self.loss_ema_count = int(loss_ema_count)

    def reset(self) -> None:
        """A new run of steps (``Trainer.train``): no bad step, no run of skipped steps, an empty window."""
        device = self.device
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        # nonfinite='skip': steps taken in this window, current and longest run of skipped steps
        self.taken = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)
        self.window = 0

    def add(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor | None) -> None:
        """Step ``done`` (1-based) with ``train_step``'s ``(loss, grad_norm, ok)``; no host synchronisation."""
        if ok is None:
            finite = torch.isfinite(loss)
            self.bad_step = torch.where(finite | (self.bad_step >= 0), self.bad_step,
                                        torch.full_like(self.bad_step, done))
            self.loss_sum += loss
            self.norm_sum += grad_norm.float()
            self.loss_ema.lerp_(loss, 1.0 - LOSS_EMA_BETA)
        else:  # a skipped step counts nowhere
            self.loss_sum += torch.where(ok, loss, 0.0)
            self.norm_sum += torch.where(ok, grad_norm.float(), 0.0)
            self.taken += ok
            self.run.copy_(torch.where(ok, 0, self.run + 1))
            torch.maximum(self.longest, self.run, out=self.longest)
            self.loss_ema.lerp_(torch.where(ok, loss, self.loss_ema), 1.0 - LOSS_EMA_BETA)
        self.loss_ema_count += 1
        self.window += 1

    def check(self, step: int, last_checkpoint: Callable[[], object]) -> None:
        """Raise if a step was not finite (``nonfinite='error'``) or if too many in a row were skipped
        (``nonfinite='skip'``); ``step`` is the current step, ``last_checkpoint()`` named in the message
        (called only to raise)."""
        s = int(self.bad_step)
        if s >= 0:
            raise FloatingPointError(
                f"non-finite training loss at step {s}; training stopped and no checkpoint was written for it "
                f"(last checkpoint: {_name(last_checkpoint())}). Try a lower lr, grad_clip, or "
                f"mixed_precision='no', or nonfinite='skip' to leave such steps out.")
        longest = int(self.longest)
        if longest >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"{longest} training steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient and were skipped: the run has diverged (last checkpoint: {_name(last_checkpoint())}). "
                f"Try a lower lr, grad_clip, or mixed_precision='no'.")

    def take_window(self, skipping: bool) -> tuple[float | None, float | None, int, int]:
        """``(mean loss, mean grad norm, steps, steps taken)`` of the window, which starts anew (the means
        None when no step was taken); ``skipping``: ``nonfinite='skip'``, so steps may have been left out."""
        window = self.window
        kept = int(self.taken) if skipping else window
        loss = float(self.loss_sum) / kept if kept else None
        grad_norm = float(self.norm_sum) / kept if kept else None
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.taken.zero_()
        self.window = 0
        return loss, grad_norm, window, kept

    def smoothed_loss(self) -> float | None:
        """Bias-corrected exponential moving average of the train loss (None before any step)."""
        if self.loss_ema_count == 0:
            return None
        return float(self.loss_ema) / (1.0 - LOSS_EMA_BETA ** self.loss_ema_count)


def _name(last: object) -> str:
    """A last checkpoint as the error messages name it ("none" without one)."""
    return str(last) if last else "none"
