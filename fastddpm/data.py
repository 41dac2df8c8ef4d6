"""Training data: image folders, numpy arrays, scikit-learn's digits.

Every dataset returns un-augmented float32 tensors ``[C, H, W]`` in
``[-1, 1]`` (Ho et al. §4 scale the data linearly to ``[-1, 1]``) and exposes
``.image_size`` and ``.channels``.  Augmentation is not done here: the trainer
flips whole batches as ``random_flip`` does (its halves ``draw_flips`` and
``apply_flips``) with its own seeded generator, so a resumed run draws the
same flips as an uninterrupted one (a DataLoader worker's RNG state is not
part of a checkpoint).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from .image_tensors import (LUMA, PIL_MODES, check_channels, check_image_size, convert_channels,
                            resize_center_crop, to_float_images)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ArrayDataset",
    "convert_channels",
    "DigitsDataset",
    "digits_dataset",
    "load_dataset",
    "apply_flips",
    "draw_flips",
    "random_flip",
    "resize_center_crop",
    "split_validation",
]

ARRAY_EXTENSIONS = (".npy", ".npz")
# float arrays may overshoot their range by this much (rounding in whatever
# produced them); values are clamped back into it
FLOAT_RANGE_SLACK = 1e-4
RESIZE_CHUNK = 256


# -- arrays ---------------------------------------------------------------------------
def _load_array(path: Path) -> np.ndarray:
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
        return loaded
    with loaded as z:  # an .npz archive
        keys = list(z.keys())
        if "images" in keys:
            return z["images"]
        if "arr_0" in keys:
            return z["arr_0"]
        if len(keys) == 1:
            return z[keys[0]]
        raise ValueError(f"{str(path)!r} holds arrays {keys}; name the images 'images' (or store a single array)")


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
    """

    def __init__(self, path_or_array, channels: int | None = None, image_size: int | None = None):
        if isinstance(path_or_array, (str, os.PathLike)):
            self.path = Path(path_or_array)
            name = repr(str(self.path))
            arr = _load_array(self.path)
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


# -- digits -----------------------------------------------------------------------------
class DigitsDataset(Dataset):
    """Images held in memory with class labels.

    :param images: float32 ``[N, C, H, W]`` in [-1, 1].
    :param labels: int64 ``[N]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be [N, C, S, S], got shape {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].clone()

    def __repr__(self) -> str:
        return f"DigitsDataset(n={len(self)}, image_size={self.image_size}, channels={self.channels})"


def digits_dataset(image_size: int = 16, channels: int = 1) -> DigitsDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no
    download), upsampled to ``image_size`` (bilinear), background -1, ink +1.

    :param image_size: output side.
    :param channels: 1, or 3 to repeat the gray channel.
    """
    check_image_size(image_size)
    check_channels(channels)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or pip install fastddpm[digits])"
        ) from e
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # values 0..16
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return DigitsDataset(x.contiguous(), labels)


# -- routing ------------------------------------------------------------------------------
ACCEPTED_FORMS = "'digits', a folder of images (.png .jpg .jpeg .bmp .webp), or a .npy/.npz file"


def load_dataset(spec, image_size: int | None = None, channels: int | None = None) -> Dataset:
    """The dataset a user names.

    :param spec: ``"digits"``; a folder of images (``image_size`` required,
        channels default 3); a ``.npy`` / ``.npz`` file (or a numpy array).
    :param image_size: output side (digits: default 16; arrays: default as stored).
    :param channels: 1 or 3 (folders: default 3; digits: default 1; arrays: as stored).
    :raises FileNotFoundError: the path does not exist.
    :raises ValueError: anything else that is not one of the accepted forms.
    """
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        return ArrayDataset(spec, channels=channels, image_size=image_size)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"dataset must be {ACCEPTED_FORMS}; got {type(spec).__name__}")
    if isinstance(spec, str) and spec == "digits":
        return digits_dataset(16 if image_size is None else image_size, channels or 1)
    path = Path(spec)
    if path.is_dir():
        if image_size is None:
            raise ValueError(f"image_size is required for the image folder {str(path)!r}")
        return ImageFolderDataset(path, image_size, channels or 3)
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        return ArrayDataset(path, channels=channels, image_size=image_size)
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(spec)!r} not found; expected {ACCEPTED_FORMS}")
    raise ValueError(f"cannot load dataset {str(spec)!r}: expected {ACCEPTED_FORMS}")


# -- augmentation and splits ----------------------------------------------------------------
def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``[n, C, H, W]`` horizontally with probability 1/2.

    Exactly ``n`` uniforms are drawn from ``generator`` (on its own device),
    sample ``i`` flipped when the ``i``-th is below 1/2, so the same generator
    state gives the same flips; no host synchronisation.  The two halves,
    ``draw_flips`` and ``apply_flips``, serve a caller that draws the flips of
    more images than it flips (the trainer: a global batch, one rank's rows).
    """
    if batch.ndim < 2:
        raise ValueError(f"batch must be [n, ..., W], got shape {tuple(batch.shape)}")
    return apply_flips(batch, draw_flips(batch.shape[0], generator))


def draw_flips(n: int, generator: torch.Generator) -> torch.Tensor:
    """``random_flip``'s draw: a bool ``[n]`` on the generator's device, True for a sample to flip."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def apply_flips(batch: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip horizontally the samples of ``[n, ..., W]`` where the bool ``flips`` ``[n]`` is True."""
    flips = flips.to(batch.device).reshape(batch.shape[0], *([1] * (batch.ndim - 1)))
    return torch.where(flips, batch.flip(-1), batch)


def split_validation(dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic random split into training and validation indices.

    :param dataset: a sized dataset, or its length.
    :param fraction: share held out for validation, in [0, 1); a positive
        fraction holds out at least one item (and keeps at least one for training).
    :param seed: the permutation's seed.
    :return: ``(train_indices, val_indices)``, each sorted.
    """
    n = dataset if isinstance(dataset, int) else len(dataset)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])
