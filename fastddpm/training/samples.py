"""The EMA sample grid a run saves every ``sample_every`` steps (``samples/step_XXXXXXX.png``)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..diffusion import DDPM

__all__ = ["save_sample_grid"]


def save_sample_grid(model: nn.Module, process: DDPM, path, *, n: int, steps: int | None,
                     device: torch.device) -> Path:
    """Sample ``n`` images from ``model`` with ``steps`` sampling steps and seed 0 (the same noise at every
    step of a run, so grids compare) and save them as a grid at ``path``, upscaled so that a grid is at
    least ~256 px wide to look at.

    :return: the grid's path.
    """
    # imported on first use, as the trainer always has: a run that never samples does not load the engine
    from ..images import save_image_grid
    from ..sampling import sample

    images = sample(model, n, steps=steps, seed=0, progress=False, process=process, device=device)
    side = max(images.shape[-1], 1) * math.ceil(math.sqrt(images.shape[0]))
    return save_image_grid(images, path, scale=max(1, 256 // side))
