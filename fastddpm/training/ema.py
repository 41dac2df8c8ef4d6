"""The EMA model: a frozen copy of the trained model moved towards it after every step."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``ema <- lerp(ema, params, 1 - decay_at(step))`` over the trainable parameters, buffers copied.

    :param model: the trained module (not a DDP or compiled wrapper); the EMA model is its deep copy,
        in eval mode with no gradients.
    :param decay_at: the decay of step ``step`` (``TrainConfig.ema_decay_at``).  It is a function of the
        step and the update keeps no other state, so a resumed run continues the EMA exactly.
    """

    def __init__(self, model: nn.Module, decay_at: Callable[[int], float]):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay_at = decay_at
        self.source_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [p for p, q in zip(self.model.parameters(), model.parameters()) if q.requires_grad]
        self.source_buffers = list(model.buffers())
        self.buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, step: int, ok: torch.Tensor | None = None) -> None:
        """The update after step ``step`` (weight 1 before ``ema_start`` and at the first warm-up step: an
        exact copy) as one ``_foreach_lerp_``; with ``ok`` (a device bool) the weight is 0 for a skipped
        step, decided on the device."""
        weight = 1.0 - self.decay_at(step)
        if ok is None:
            torch._foreach_lerp_(self.params, self.source_params, weight)
            for e, b in zip(self.buffers, self.source_buffers):
                e.copy_(b)
        else:
            w = ok.float() * weight
            torch._foreach_lerp_(self.params, self.source_params, [w] * len(self.source_params))
            for e, b in zip(self.buffers, self.source_buffers):
                e.copy_(torch.where(ok, b, e))
