"""Numpy arrays as a dataset: an array, a tensor, or a ``.npy`` / ``.npz`` file of images.

Layouts ``[N, H, W]``, ``[N, H, W, C]`` and ``[N, C, H, W]``; values uint8 in [0, 255] or float in
[0, 1] or [-1, 1].  uint8 images stay uint8 in memory and become float32 in ``[-1, 1]`` per item;
resized or converted ones are held as float32.  Pickles and object arrays are never loaded.
Class labels: given with an array, or an ``.npz``'s ``y`` or ``labels`` array (and its optional
``class_names``, strings).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset_labels import check_class_names, check_labels
from .image_tensors import check_channels, check_image_size, convert_channels, resize_center_crop, to_float_images

__all__ = ["ARRAY_EXTENSIONS", "ArrayDataset"]

ARRAY_EXTENSIONS = (".npy", ".npz")
# float arrays may overshoot their range by this much (rounding in whatever
# produced them); values are clamped back into it
FLOAT_RANGE_SLACK = 1e-4
RESIZE_CHUNK = 256


LABEL_KEYS = ("y", "labels")  # an .npz's class labels, by either name


def _load_array(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """``(images, labels or None, class names or None)`` of a ``.npy`` / ``.npz`` file."""
    if not path.exists():
        raise FileNotFoundError(f"array file {str(path)!r} does not exist")
    if not path.is_file():  # a folder, or a FIFO that would block the read forever
        raise ValueError(f"array file {str(path)!r} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"array file must end in .npy or .npz, got {str(path)!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # numpy calls any unknown bytes "pickled data"
        raise ValueError(f"{str(path)!r} is not a readable {suffix} array file (numpy: {e}; object arrays and "
                         f"pickles are never loaded)") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None, None
    with loaded as z:  # an .npz archive
        keys = list(z.keys())
        found = [k for k in LABEL_KEYS if k in keys]
        if len(found) > 1:
            raise ValueError(f"{str(path)!r} holds both 'y' and 'labels': keep one array of class labels")
        labels = z[found[0]] if found else None
        names = z["class_names"].tolist() if "class_names" in keys else None
        rest = [k for k in keys if k not in (*LABEL_KEYS, "class_names")]
        if "images" in keys:
            return z["images"], labels, names
        if "arr_0" in keys:
            return z["arr_0"], labels, names
        if len(rest) == 1:
            return z[rest[0]], labels, names
        raise ValueError(f"{str(path)!r} holds arrays {keys}; name the images 'images' (or store a single array, "
                         f"with its class labels as 'y' or 'labels')")


def _to_nchw(arr: np.ndarray, name: str) -> np.ndarray:
    """``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C in {1, 3}) to ``[N, C, H, W]``.
    A 4-D array whose last axis is 1 or 3 is taken as NHWC."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):
            return arr
        raise ValueError(
            f"{name} has shape {arr.shape}: expected [N, H, W, C] or [N, C, H, W] with C = 1 or 3"
        )
    raise ValueError(f"{name} has shape {arr.shape}: expected [N, H, W], [N, H, W, C] or [N, C, H, W]")


def _normalise(arr: np.ndarray, name: str) -> torch.Tensor:
    """uint8 (or integer) in [0, 255] -> uint8 tensor; float in [0, 1] or
    [-1, 1] -> float32 tensor in [-1, 1]."""
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} has dtype {arr.dtype}: expected uint8 or a float type")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name} is an integer array with values in [{lo}, {hi}]: expected [0, 255]")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf)")
    lo, hi = float(arr.min()), float(arr.max())
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if lo < 0:
        if lo < -1 - FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
            raise ValueError(f"{name} is a float array with values in [{lo:.4g}, {hi:.4g}]: expected [0, 1] or [-1, 1]")
        return x.clamp_(-1.0, 1.0)
    if hi > 1 + FLOAT_RANGE_SLACK:
        hint = " (it looks like [0, 255]: cast to uint8 or divide by 255)" if hi <= 255 else ""
        raise ValueError(
            f"{name} is a float array with values in [{lo:.4g}, {hi:.4g}]: expected [0, 1] or [-1, 1]{hint}"
        )
    return (x.clamp_(0.0, 1.0) * 2.0 - 1.0)


class ArrayDataset(Dataset):
    """Images from a numpy array or a ``.npy`` / ``.npz`` file.

    Layouts: ``[N, H, W]`` (gray), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C
    in {1, 3} (NHWC when the last axis is 1 or 3).  Values: uint8 in [0, 255],
    or float in [0, 1] or in [-1, 1] (told apart by the sign of the minimum).
    ``.npz`` files: the array ``images``, else ``arr_0``, else the only one.

    :param path_or_array: a path, a numpy array or a CPU tensor.
    :param channels: convert to 1 or 3 channels (gray is repeated; RGB becomes
        luma); default: as stored.
    :param image_size: resize the shorter side to this (bilinear, antialiased)
        and centre-crop; default: as stored, which must then be square.
    :param labels: class labels, integers ``[N]`` (an ``.npz``'s ``y`` or ``labels`` by default).
    :param class_names: the classes' names (an ``.npz``'s ``class_names`` by default; else
        ``"0".."K-1"`` when there are labels).
    """

    def __init__(self, path_or_array, channels: int | None = None, image_size: int | None = None,
                 labels=None, class_names=None):
        file_labels = file_names = None
        if isinstance(path_or_array, (str, os.PathLike)):
            self.path = Path(path_or_array)
            name = repr(str(self.path))
            arr, file_labels, file_names = _load_array(self.path)
        else:
            self.path = None
            name = "array"
            arr = path_or_array
            if isinstance(arr, torch.Tensor):
                arr = arr.detach().cpu().numpy()
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"ArrayDataset takes a path, a numpy array or a tensor, got {type(arr).__name__}")
        check_channels(channels, allow_none=True)
        x = _normalise(_to_nchw(arr, name), name)
        n, c, h, w = x.shape
        if image_size is not None:
            check_image_size(image_size)
        elif h != w:
            raise ValueError(f"{name} holds {h}x{w} images, which are not square: pass image_size to resize and crop")
        channels = channels or c
        if image_size is not None and (h, w) != (image_size, image_size):
            # resize in float, a chunk at a time; the result is kept as float32
            chunks = []
            for i in range(0, n, RESIZE_CHUNK):
                part = x[i:i + RESIZE_CHUNK]
                part = to_float_images(part)
                chunks.append(resize_center_crop(convert_channels(part, channels).contiguous(), image_size))
            x = torch.cat(chunks)
        elif channels != c:
            x = convert_channels(to_float_images(x), channels).contiguous().clamp_(-1.0, 1.0)
        self.data = x  # uint8 [N, C, H, W] (converted per item) or float32 in [-1, 1]
        self.channels = channels
        self.image_size = int(x.shape[-1])
        if labels is None:
            labels, class_names = file_labels, class_names if class_names is not None else file_names
        self.labels = self.class_names = None
        if labels is not None:
            self.labels = check_labels(labels, n, name=f"the labels of {name}")
            if class_names is None:
                class_names = [str(c) for c in range(int(self.labels.max()) + 1)]
            self.class_names = check_class_names(class_names, self.labels, name=f"the class names of {name}")
        elif class_names is not None:
            raise ValueError(f"class_names given for {name} without labels")

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.data[index]
        return to_float_images(x) if x.dtype == torch.uint8 else x.clone()

    def float_images(self) -> torch.Tensor:
        """All images as float32 ``[N, C, H, W]`` in [-1, 1]."""
        return to_float_images(self.data)

    def __repr__(self) -> str:
        src = repr(str(self.path)) if self.path is not None else "array"
        return f"ArrayDataset({src}, n={len(self)}, image_size={self.image_size}, channels={self.channels})"
