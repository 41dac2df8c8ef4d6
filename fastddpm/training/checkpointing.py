"""What a training checkpoint holds besides the tensors, and how a resumed run takes it back.

A checkpoint (``checkpoint.save_checkpoint``) holds the model, the EMA model, the optimizer, torch's RNG
state and the metadata ``checkpoint_state`` builds: the step, the data position, the best metric so far,
the smoothed loss, the grad scaler and the configs.  All of it is global state, so a run on any number
of ranks resumes it.  ``restore_checkpoint`` loads it back in the same objects; the RNG is the caller's
(rank 0's dropout stream, restored last).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import nn

from ..checkpoint import Checkpoint, load_weights
from ..diffusion import DDPM
from ..train_config import TrainConfig
from .batches import TrainBatches
from .meter import StepMeter
from .resume import load_optimizer_state

__all__ = ["ResumedProgress", "checkpoint_state", "estimated_checkpoint_bytes", "is_new_best", "restore_checkpoint"]


def estimated_checkpoint_bytes(model: nn.Module) -> int:
    """The size of a training checkpoint of ``model``: model + EMA + Adam's two moments, plus a little."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 4 * params + 2 * buffers + 2**16


def checkpoint_state(*, process: DDPM, config: TrainConfig, step: int, batches: TrainBatches,
                     best_metric: float | None, best_step: int | None, last_val: dict | None, meter: StepMeter,
                     skipped_steps: int, elapsed: float, precision: str, scaler: torch.amp.GradScaler | None,
                     world_size: int) -> dict:
    """The metadata of a training checkpoint at ``step`` (JSON): what ``restore_checkpoint`` and
    ``resume.check_resumable`` read back."""
    return {
        "kind": "train",
        "diffusion": process.to_dict(),
        "train_config": config.to_dict(),
        "step": step,
        "epoch": batches.epoch,
        "index": batches.index,
        "train_size": int(batches.train_indices.numel()),
        "val_size": int(batches.val_indices.numel()),
        "best_metric": best_metric,
        "best_step": best_step,
        "metric": "val_loss" if batches.val_indices.numel() else "train_loss_smoothed",
        "last_val": last_val,
        "loss_ema": float(meter.loss_ema),
        "loss_ema_count": meter.loss_ema_count,
        "skipped_steps": skipped_steps,
        "elapsed": elapsed,
        "precision": precision,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "world_size": world_size,  # for information: the state above is global, any number resumes it
    }


def is_new_best(metric: float | None, best_metric: float | None) -> bool:
    """Whether ``metric`` beats ``best_metric`` (lower is better; None or non-finite never does, and any
    finite metric beats no best yet): when ``best.safetensors`` is rewritten."""
    if metric is None or not math.isfinite(metric):
        return False
    return best_metric is None or metric < best_metric


@dataclass(frozen=True)
class ResumedProgress:
    """The loop's counters as a checkpoint left them."""

    step: int
    best_metric: float | None
    best_step: int | None
    last_val: dict | None
    skipped_steps: int
    elapsed: float


def restore_checkpoint(ckpt: Checkpoint, *, model: nn.Module, ema_model: nn.Module,
                       optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                       batches: TrainBatches, meter: StepMeter) -> ResumedProgress:
    """Load a resumable checkpoint (``resume.check_resumable``) into the run's objects: the weights (the
    EMA copies the model where the checkpoint has none), the optimizer state, the grad scaler, the data
    position and the smoothed loss.  torch's RNG state is left to the caller.

    :return: the loop's counters at the checkpoint's step.
    """
    where = repr(str(ckpt.path))
    meta = ckpt.metadata
    load_weights(model, ckpt.section("model"), path=ckpt.path, what="model")
    if ckpt.has("ema"):
        load_weights(ema_model, ckpt.section("ema"), path=ckpt.path, what="ema")
    else:
        ema_model.load_state_dict(model.state_dict())
    load_optimizer_state(optimizer, ckpt.optimizer_state_dict(), where)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    batches.seek(int(meta["epoch"]), int(meta["index"]))
    meter.restore(meta.get("loss_ema", 0.0), meta.get("loss_ema_count", 0))
    return ResumedProgress(step=int(meta["step"]), best_metric=meta.get("best_metric"),
                           best_step=meta.get("best_step"), last_val=meta.get("last_val"),
                           skipped_steps=int(meta.get("skipped_steps", 0)),
                           elapsed=float(meta.get("elapsed", 0.0)))
