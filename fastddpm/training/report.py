"""What the training loop reports: a row of the run log per logging window, and what ``train()`` returns."""
from __future__ import annotations

__all__ = ["train_result", "window_row"]


def window_row(step: int, *, loss: float | None, lr: float, grad_norm: float | None, steps: int, kept: int,
               images_per_step: int, seconds: float, elapsed: float) -> dict:
    """The log row of the window of ``steps`` steps that ends at ``step`` (1-based), ``kept`` of them taken
    (the others left out as non-finite), run in ``seconds`` of training time; the validation losses are
    None until the caller fills them in.

    :param loss: the mean loss of the taken steps (``meter.StepMeter.take_window``).
    :param images_per_step: images of one optimizer step (``TrainConfig.effective_batch_size``).
    :param elapsed: the run's training time so far, over all its sessions.
    """
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "val_loss": None, "val_loss_ema": None,
            "images_per_s": steps * images_per_step / max(seconds, 1e-9), "elapsed": elapsed,
            "skipped": steps - kept}


def train_result(*, step: int, last_row: dict, smoothed_loss: float | None, last_val: dict | None,
                 best_metric: float | None, best_step: int | None, skipped_steps: int, elapsed: float,
                 checkpoint: str, stopped_by: str | None) -> dict:
    """The metrics ``Trainer.train()`` returns: the last logged row's, the last validation's, the best
    metric and where the run stands (``checkpoint``: the last one written, "" if none)."""
    last_val = last_val or {}
    return {
        "step": step,
        "loss": last_row.get("loss"),
        "smoothed_loss": smoothed_loss,
        "val_loss": last_val.get("val_loss"),
        "val_loss_ema": last_val.get("val_loss_ema"),
        "best_metric": best_metric,
        "best_step": best_step,
        "lr": last_row.get("lr"),
        "grad_norm": last_row.get("grad_norm"),
        "images_per_s": last_row.get("images_per_s"),
        "skipped_steps": skipped_steps,
        "elapsed": elapsed,
        "checkpoint": checkpoint,
        "stopped_by": stopped_by,
    }
