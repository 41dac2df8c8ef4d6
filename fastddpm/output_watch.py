"""Watch a model's outputs while it samples, without synchronising: a diverged model
(an output of inf at one step, or 1e30 at every step) still gives finite images,
because the predicted x0 is clipped to [-1, 1], so its samples would look like a
result.  :class:`OutputWatch` wraps the model, folds "was any output non-finite or
beyond ``limit``" into one device flag per call (no ``.item()``, so CUDA graphs
and the engine's loop are untouched), and :meth:`OutputWatch.check` reads it once
at the end.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["OutputWatch", "OUTPUT_LIMIT"]

# a trained model predicts noise, x0 or v: values of a few units; 1e4 is far beyond any of them
OUTPUT_LIMIT = 1e4


class OutputWatch(nn.Module):
    """``model`` as it is, plus a flag raised by any output that is not finite or exceeds ``limit``.

    The wrapper shows the model's ``config``, ``image_size``, ``in_channels`` and ``out_channels``
    so that samplers read the image shape from it as from the model.
    """

    def __init__(self, model: nn.Module, limit: float = OUTPUT_LIMIT):
        super().__init__()
        self.model = model
        self.limit = float(limit)
        for name in ("config", "image_size", "in_channels", "out_channels"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.register_buffer("bad", torch.zeros((), dtype=torch.bool, device=_device_of(model)), persistent=False)

    def forward(self, x, t):
        out = self.model(x, t)
        value = getattr(out, "sample", out)
        if isinstance(value, torch.Tensor):
            self.bad |= ~(value.abs() <= self.limit).all()  # NaN compares False: caught too
        return out

    def check(self, what: str = "the model") -> None:
        """Raise ``FloatingPointError`` if any output so far was not finite or beyond the limit."""
        if bool(self.bad):
            raise FloatingPointError(f"{what} gave outputs that are not finite or beyond ±{self.limit:g} while "
                                     f"sampling: the images would look finite but be wrong, so none were written "
                                     f"(a diverged checkpoint? try an earlier one, or --no-ema / the EMA weights)")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
