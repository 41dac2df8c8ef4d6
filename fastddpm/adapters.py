"""Call any supported model as ``model(x, t) -> predicted tensor``.

Accepted as they are: fastddpm's ``UNet``; diffusers' ``UNet2DModel`` (output
``.sample``; image size and channels read from its config);
denoising-diffusion-pytorch's ``Unet`` (channels read from it); and any
callable ``model(x, t)`` with ``t`` an int64 tensor ``[n]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .checks import is_int

__all__ = ["ModelAdapter"]


def _as_hw(size, name="image_size"):
    if size is None:
        return None
    if is_int(size):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        hw = tuple(size)
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return hw


class ModelAdapter:
    """Uniform view of a denoising model.

    :param model: the model.
    :param image_size: int or (H, W); overrides what the model says.
    :param channels: input channels; overrides what the model says.
    """

    def __init__(self, model, image_size=None, channels=None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        self.model = model
        module = type(model).__module__
        config = getattr(model, "config", None)
        if type(model).__name__ == "UNet2DModel" or (module.startswith("diffusers") and hasattr(config, "sample_size")):
            self.kind = "diffusers"
            found_size, found_channels = config.sample_size, config.in_channels
            self.out_channels = config.out_channels
        elif module.startswith("denoising_diffusion_pytorch"):
            self.kind = "denoising_diffusion_pytorch"
            found_size, found_channels = getattr(model, "image_size", None), getattr(model, "channels", None)
            self.out_channels = getattr(model, "out_dim", found_channels)
        else:
            self.kind = "fastddpm" if module.startswith("fastddpm") else "callable"
            found_size = getattr(model, "image_size", None)
            found_channels = getattr(model, "in_channels", None)
            self.out_channels = getattr(model, "out_channels", found_channels)
        self.image_size = _as_hw(image_size if image_size is not None else found_size)
        self.channels = channels if channels is not None else found_channels
        if self.channels is not None and (not is_int(self.channels)
                                          or self.channels < 1):
            raise ValueError(f"channels must be a positive int, got {self.channels!r}")

    # -- where and how the model runs -----------------------------------------------
    def _first_param(self):
        if isinstance(self.model, nn.Module):
            for p in self.model.parameters():
                return p
        return None

    @property
    def device(self) -> torch.device:
        p = self._first_param()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_param()
        return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32

    def shape(self, n: int) -> tuple[int, ...]:
        """The ``[n, C, H, W]`` shape of a batch, or a clear error if unknown."""
        if self.channels is None or self.image_size is None:
            missing = " and ".join(x for x, v in (("channels", self.channels), ("image_size", self.image_size)) if v is None)
            raise ValueError(f"cannot tell the model's {missing}: pass {missing}= to sample()")
        return (n, self.channels, *self.image_size)

    # -- the call ------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t)
        if hasattr(out, "sample"):  # diffusers' UNet2DOutput
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def check_output(self, out, x: torch.Tensor) -> torch.Tensor:
        """Raise if the model's output is not a float tensor shaped like ``x``."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a tensor (or an object with .sample), got {type(out).__name__}")
        if tuple(out.shape) != tuple(x.shape):
            hint = ""
            if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
                hint = " (a model with learned variance outputs 2x channels; fastddpm samples with fixed variance)"
            raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                             f"expected the same shape{hint}")
        if not out.dtype.is_floating_point:
            raise TypeError(f"model must return a floating-point tensor, got {out.dtype}")
        return out
