"""What resuming a run checks of its checkpoint, and how the optimizer state is taken over."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..checkpoint import Checkpoint, check_model_config
from ..diffusion import DDPM
from ..train_config import TrainConfig

__all__ = ["RESUME_FREE", "check_resumable", "load_optimizer_state"]

# train-config fields that may change on resume without changing the training trajectory (the layout and
# compilation change rounding only; nonfinite matters only where a step is not finite, and resuming a run
# stopped by a NaN with nonfinite='skip' is what it is for)
RESUME_FREE = {"steps", "val_every", "sample_every", "sample_n", "sample_steps", "checkpoint_every",
               "checkpoint_minutes", "keep_last", "keep_best", "log_every", "channels_last", "compile", "nonfinite"}


def check_resumable(ckpt: Checkpoint, model: nn.Module, process: DDPM, config: TrainConfig, train_size: int) -> None:
    """Refuse a checkpoint that is no training checkpoint or is of another model or process; warn (naming
    the caller of ``Trainer.resume``) where the train config or the training set's size changed."""
    where = repr(str(ckpt.path))
    meta = ckpt.metadata
    if meta.get("kind") != "train" or "optimizer" not in meta:
        raise ValueError(f"{where} is not a training checkpoint (no optimizer state); it cannot be resumed")
    check_model_config(ckpt, model)
    if meta.get("diffusion") != process.to_dict():
        raise ValueError(f"{where} was trained with another diffusion process: {meta.get('diffusion')} "
                         f"vs {process.to_dict()}")
    saved_cfg = meta.get("train_config", {})
    mine = config.to_dict()
    changed = sorted(k for k in set(saved_cfg) | set(mine)
                     if saved_cfg.get(k) != mine.get(k) and k not in RESUME_FREE)
    if changed:
        warnings.warn(f"resuming {where} with a changed train config ({', '.join(changed)}): the run will not "
                      f"be the one the checkpoint started", RuntimeWarning, stacklevel=4)
    if meta.get("train_size") != train_size:
        warnings.warn(f"{where} was trained on {meta.get('train_size')} images, this dataset has "
                      f"{train_size} for training", RuntimeWarning, stacklevel=4)


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict, where: str) -> None:
    """Load a checkpoint's optimizer state ``sd`` into ``optimizer``: this run's implementation flags
    (fused, foreach, ...) and the config's hyper-parameters win over the saved ones."""
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{where} has {len(sd['param_groups'])} optimizer param groups, expected "
                         f"{len(optimizer.param_groups)}")
    for saved, current in zip(sd["param_groups"], optimizer.param_groups):
        # this run's implementation flags and the config's hyper-parameters win
        for key in ("fused", "foreach", "capturable", "differentiable", "betas", "weight_decay", "lr"):
            if key in current:
                saved[key] = current[key]
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{where}: optimizer state does not fit this model: {e}") from None
