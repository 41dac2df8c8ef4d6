"""Images out: uint8 conversion, grids, PNG/NPZ/GIF files, and the forward
process as a strip of noised images.  The plots (loss curves, noise schedules)
are ``fastddpm.plots``'; ``plot_lines`` and ``plot_schedule`` are re-exported here.

Every file is written atomically: to a temporary file in the destination's
folder, then ``os.replace``d over it, so a reader never sees half a file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .files import save_pil_atomic, write_binary_atomic
from .ops.reference import batch_noise, q_sample
from .plots import load_font, plot_lines, plot_schedule
from .schedule import NoiseSchedule

__all__ = [
    "to_uint8",
    "make_grid",
    "save_image_grid",
    "save_images_npz",
    "forward_process_strip",
    "save_gif",
    "plot_lines",
    "plot_schedule",
]

STRIP_MIN_COLUMN_PX = 48  # forward_process_strip upscales tiny images to at least this width


# -- conversion and grids -------------------------------------------------------------------
def to_uint8(x) -> np.ndarray:
    """``[n, C, H, W]`` float in [-1, 1] to uint8 ``[n, H, W, C]``:
    ``round((clamp(x, -1, 1) + 1) * 127.5)``, so -1 -> 0, 0 -> 128, 1 -> 255.
    NaN becomes 0 (mid-grey).  A uint8 tensor ``[n, C, H, W]`` is only transposed.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [n, C, H, W], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [n, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise TypeError(f"images must be a float tensor in [-1, 1] (or uint8), got {x.dtype}")
        x = torch.nan_to_num(x.float(), nan=0.0).clamp(-1.0, 1.0)
        x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _as_nhwc_uint8(x) -> np.ndarray:
    """A tensor as ``to_uint8`` takes it, or a uint8 numpy array ``[n, H, W, C]``."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"images given as a numpy array must be uint8 [n, H, W, C] with C = 1 or 3, "
                f"got {x.dtype} {x.shape}"
            )
        return x
    return to_uint8(x)


def make_grid(x, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile images into one uint8 ``[H, W, C]`` array (C = 1 stays 1).

    :param x: float tensor ``[n, C, H, W]`` in [-1, 1], or uint8 numpy ``[n, H, W, C]``.
    :param nrow: images per row (default ``ceil(sqrt(n))``).
    :param padding: pixels between images and around the border.
    :param pad_value: uint8 value of the padding.
    """
    arr = _as_nhwc_uint8(x)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("images is empty: nothing to put in a grid")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def _grid_image(grid: np.ndarray, scale: int = 1):
    from PIL import Image

    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, mode="L" if grid.shape[-1] == 1 else "RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_image_grid(x, path, nrow: int | None = None, scale: int = 1, padding: int = 2) -> Path:
    """Write a grid of images as a PNG.

    :param x: float tensor ``[n, C, H, W]`` in [-1, 1] (or uint8 numpy NHWC).
    :param scale: nearest-neighbour upscaling factor, so tiny images are visible.
    """
    return save_pil_atomic(_grid_image(make_grid(x, nrow=nrow, padding=padding), scale), path, "PNG")


def save_labelled_rows(x, row_labels: Sequence[str], path, scale: int = 1, padding: int = 2) -> Path:
    """Write ``x`` as a PNG grid of ``len(row_labels)`` rows, each row's label written at its left
    (e.g. one row per class of a class-conditional model).

    :param x: float tensor ``[rows * k, C, H, W]`` in [-1, 1], row by row.
    :param row_labels: one text per row.
    """
    from PIL import Image, ImageDraw

    rows = len(row_labels)
    if rows < 1 or x.shape[0] % rows:
        raise ValueError(f"x must hold the same number of images in each of the {rows} rows, got {x.shape[0]}")
    h = x.shape[-2]
    body = _grid_image(make_grid(x, nrow=x.shape[0] // rows, padding=padding), scale)
    font = load_font(11)
    label_w = 12 + 7 * max(len(str(label)) for label in row_labels)
    img = Image.new(body.mode, (body.width + label_w, body.height), 0)
    img.paste(body, (label_w, 0))
    draw = ImageDraw.Draw(img)
    white = 255 if img.mode == "L" else (255, 255, 255)
    row_h = (h + padding) * scale
    for i, label in enumerate(row_labels):
        draw.text((label_w / 2, padding * scale + i * row_h + h * scale / 2), str(label), fill=white, font=font,
                  anchor="mm")
    return save_pil_atomic(img, path, "PNG")


def save_images_npz(x, path) -> Path:
    """Write images as uint8 ``[n, H, W, C]``: ``.npz`` (array ``images``) or ``.npy``."""
    arr = _as_nhwc_uint8(x)
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return write_binary_atomic(path, lambda f: np.savez(f, images=arr), make_parents=True)
    if suffix == ".npy":
        return write_binary_atomic(path, lambda f: np.save(f, arr), make_parents=True)
    raise ValueError(f"path must end in .npz or .npy, got {str(path)!r}")


# -- the diffusion processes ------------------------------------------------------------------
def forward_process_strip(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], path,
                          seed: int = 0, scale: int | None = None) -> Path:
    """Show the forward process: rows are the images of ``x0``, columns are
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. Eq. 4) at each
    requested step, with one noise ``eps`` per image (the contract's training
    noise of ``seed``) shared by all columns.  Writes a PNG with ``t`` labels.

    :param x0: ``[k, C, H, W]`` in [-1, 1].
    :param schedule: the noise schedule; ``timesteps`` index its steps.
    :param timesteps: steps in ``[0, T-1]``, one per column.
    :param scale: nearest-neighbour upscaling (default: enough for columns of
        at least 48 pixels).
    """
    from PIL import Image, ImageDraw

    if not isinstance(x0, torch.Tensor) or x0.ndim != 4 or x0.shape[1] not in (1, 3):
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a tensor [k, C, H, W] with C = 1 or 3, got {shape}")
    ts = [int(t) for t in timesteps]
    T = schedule.num_timesteps
    if not ts or any(not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps must be a non-empty list of steps in [0, {T - 1}], got {ts}")
    k, c, h, w = x0.shape
    device = x0.device
    sqrt_alphas_cumprod = schedule.table("sqrt_alphas_cumprod", device)
    sqrt_one_minus_alphas_cumprod = schedule.table("sqrt_one_minus_alphas_cumprod", device)
    noise = batch_noise(seed, 0, 0, tuple(x0.shape), device)
    columns = [
        q_sample(x0, torch.full((k,), t, dtype=torch.int64, device=device), sqrt_alphas_cumprod,
                 sqrt_one_minus_alphas_cumprod, noise)
        for t in ts
    ]
    xs = torch.stack(columns, dim=1).reshape(k * len(ts), c, h, w)  # row i = image i
    if scale is None:
        scale = max(1, math.ceil(STRIP_MIN_COLUMN_PX / w))
    padding = 2
    body = _grid_image(make_grid(xs, nrow=len(ts), padding=padding), scale)
    font = load_font(11)
    header_h = 16
    img = Image.new(body.mode, (body.width, body.height + header_h), 0)
    img.paste(body, (0, header_h))
    draw = ImageDraw.Draw(img)
    white = 255 if img.mode == "L" else (255, 255, 255)
    col_w = (w + padding) * scale
    for j, t in enumerate(ts):
        cx = padding * scale + j * col_w + w * scale / 2
        draw.text((cx, header_h / 2 + 1), f"t={t}", fill=white, font=font, anchor="mm")
    return save_pil_atomic(img, path, "PNG")


def save_gif(frames, path, duration_ms: int = 60, scale: int = 1, nrow: int | None = None) -> Path:
    """Write an animated GIF (looping forever), one grid per frame.

    Note that PIL merges consecutive identical frames into one longer frame.

    :param frames: a list of ``[n, C, H, W]`` tensors in [-1, 1] (e.g. the
        reverse process every k steps), all of one shape.
    :param duration_ms: display time of each frame.
    :param scale: nearest-neighbour upscaling factor.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("frames is empty: nothing to animate")
    shape = tuple(frames[0].shape)
    for i, f in enumerate(frames):
        if tuple(f.shape) != shape:
            raise ValueError(f"frames must share one shape: frame 0 is {shape}, frame {i} is {tuple(f.shape)}")
    images = [_grid_image(make_grid(f, nrow=nrow), scale) for f in frames]
    return save_pil_atomic(images[0], path, "GIF", save_all=True, append_images=images[1:], loop=0,
                     duration=int(duration_ms))

