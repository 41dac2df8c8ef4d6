"""The validation loss: the same held-out images, timesteps and noise at every call."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..diffusion import DDPM
from .batches import TrainBatches
from .step import autocast_for
from .streams import STREAM_VAL, mix

__all__ = ["validation_losses"]


@torch.no_grad()
def validation_losses(models: dict[str, nn.Module], process: DDPM, batches: TrainBatches, seed: int,
                      precision: str = "no", label_kwargs=None) -> dict[str, float]:
    """The mean loss of each of ``models`` (by name) on ``batches``' held-out images, with timesteps spread
    evenly over ``[0, T)`` and noise from the validation stream of ``seed``: the same every call.

    Each rank takes a contiguous share of the images (batches of ``local_batch_size``); the sums of the
    losses are added over the ranks.  The models' train/eval mode is the caller's to set.
    :return: ``{name: loss}``, empty when nothing is held out.
    """
    n = batches.val_indices.numel()
    if n == 0:
        return {}
    device, rank, world_size, lb = batches.device, batches.rank, batches.world_size, batches.local_batch_size
    T = process.num_steps
    noise_seed = mix(seed, STREAM_VAL, 0)
    t_all = ((2 * torch.arange(n, dtype=torch.int64) + 1) * T) // (2 * n)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    sums = {key: torch.zeros((), device=device) for key in models}
    for first in range(lo, hi, lb):
        pos = torch.arange(first, min(first + lb, hi))
        x0 = batches.val_batch(pos)
        t = t_all[pos].to(device)
        labels = batches.val_labels(pos)
        kwargs = label_kwargs(labels) if labels is not None and label_kwargs is not None else None
        for key, model in models.items():
            loss = process.training_loss(model, x0, t, seed=noise_seed, sample_offset=first,
                                         autocast=autocast_for(precision, device), model_kwargs=kwargs)
            sums[key] += loss * pos.numel()
    if world_size > 1:
        both = torch.stack(list(sums.values()))
        dist.all_reduce(both)
        sums = dict(zip(sums, both))
    return {k: float(v) / n for k, v in sums.items()}
