"""Image tensors as every dataset hands them out: float32 ``[C, H, W]`` in ``[-1, 1]``.

The conversions the datasets (``image_folder``, ``array_data``, ``data``) and the metrics
share: uint8 to float, gray to RGB and back, resize and centre-crop, the checks of the
``channels`` and ``image_size`` arguments, and the check of the images a user hands the editing
functions (``inpaint``, ``img2img``, ``invert``) against the model's shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import is_int

__all__ = ["PIL_MODES", "LUMA", "check_channels", "check_image_size", "check_model_images", "convert_channels",
           "resize_center_crop", "to_float_images"]

PIL_MODES = {1: "L", 3: "RGB"}
# ITU-R 601-2 luma, the weights of PIL's convert("L")
LUMA = (0.299, 0.587, 0.114)


def check_channels(channels, allow_none: bool = False) -> None:
    """Raise unless ``channels`` is 1 (gray) or 3 (RGB), or None where ``allow_none``."""
    if channels is None and allow_none:
        return
    if channels not in PIL_MODES:
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")


def check_image_size(image_size) -> int:
    """``image_size`` if it is a positive int (not a bool); else raise."""
    if not is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def check_model_images(name: str, image, shape, *, slack: float = 0.0) -> torch.Tensor:
    """``image`` as float32 ``[n, C, H, W]``: a float tensor ``[n, C, H, W]`` (or one image ``[C, H, W]``),
    ``n >= 1``, of the model's ``shape`` ``(C, H, W)``, finite, in ``[-1 - slack, 1 + slack]``; else a
    TypeError/ValueError naming ``name``, before any model call."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        got = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        hint = " (uint8 images: fastddpm.image_tensors.to_float_images maps [0, 255] to [-1, 1])" \
            if got == torch.uint8 else ""
        raise TypeError(f"{name} must be a float tensor in [-1, 1], [n, C, H, W] or [C, H, W], got {got}{hint}")
    dims = ", ".join(map(str, shape))
    if image.ndim == len(shape):
        image = image.unsqueeze(0)
    if image.ndim != len(shape) + 1 or image.shape[0] < 1:
        raise ValueError(f"{name} must be [n, {dims}] (or one image [{dims}]) with n >= 1 for this model, "
                         f"got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != tuple(shape):
        what = (f"{name} has {image.shape[1]} channels, the model takes {shape[0]}" if image.shape[1] != shape[0] else
                f"{name} is {'x'.join(map(str, image.shape[2:]))}, the model's images are {'x'.join(map(str, shape[1:]))}")
        raise ValueError(f"{name} has shape {tuple(image.shape)}; the model takes [n, {dims}] ({what}: convert the "
                         "channels and resize first, fastddpm.image_tensors)")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} has values that are not finite")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.0 - slack or hi > 1.0 + slack:
        raise ValueError(f"{name} must be in the model's data range [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
                         + (" (images in [0, 1]: pass 2 * x - 1)" if lo >= 0.0 else ""))
    return image.float()


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float ``[n, C, H, W]`` so the shorter side is ``size`` (bilinear,
    antialiased), then crop the centre ``size x size``."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        new_h, new_w = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.clamp(-1.0, 1.0)


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] as float32 in [-1, 1]; float images pass through as they are."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``[n, c, H, W]`` with c in {1, 3} to ``channels`` channels (gray is
    repeated; RGB becomes luma)."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    weights = torch.tensor(LUMA, dtype=torch.float32).reshape(1, 3, 1, 1)
    return (x.float() * weights).sum(dim=1, keepdim=True)
