"""The EMA sample grid a run saves every ``sample_every`` steps (``samples/step_XXXXXXX.png``); a
class-conditional run's has one row per class."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..diffusion import DDPM

__all__ = ["class_rows", "save_sample_grid"]


def class_rows(num_classes: int, n: int) -> torch.Tensor:
    """The labels of a grid of one row per class: ``ceil(n / num_classes)`` (at least 1) of each class, in order."""
    per_class = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(per_class)


def save_sample_grid(model: nn.Module, process: DDPM, path, *, n: int, steps: int | None,
                     device: torch.device, num_classes: int | None = None) -> Path:
    """Sample ``n`` images from ``model`` with ``steps`` sampling steps and seed 0 (the same noise at every
    step of a run, so grids compare) and save them as a grid at ``path``, upscaled so that a grid is at
    least ~256 px wide to look at.

    :param num_classes: a class-conditional model's K: the grid has a row per class instead,
        ``ceil(n / K)`` images each (``class_rows``), sampled with ``class_labels=``.
    :return: the grid's path.
    """
    # imported on first use, as the trainer always has: a run that never samples does not load the engine
    from ..images import save_image_grid
    from ..sampling import sample

    if num_classes is None:
        images = sample(model, n, steps=steps, seed=0, progress=False, process=process, device=device)
        side = max(images.shape[-1], 1) * math.ceil(math.sqrt(images.shape[0]))
        return save_image_grid(images, path, scale=max(1, 256 // side))
    labels = class_rows(num_classes, n)
    per_class = labels.numel() // num_classes
    images = sample(model, labels.numel(), steps=steps, seed=0, progress=False, process=process, device=device,
                    class_labels=labels)
    side = max(images.shape[-1], 1) * per_class
    return save_image_grid(images, path, nrow=per_class, scale=max(1, 256 // side))
