"""Training data: scikit-learn's digits, the dataset a user names, flips and splits.

Image folders are read by ``image_folder``, numpy arrays by ``array_data``, and the tensor
conversions they share are in ``image_tensors``; all of it is importable from here too.

Every dataset returns un-augmented float32 tensors ``[C, H, W]`` in
``[-1, 1]`` (Ho et al. §4 scale the data linearly to ``[-1, 1]``) and exposes
``.image_size`` and ``.channels``, and ``.labels`` / ``.class_names`` (None where
the data has no classes; see ``dataset_labels``) for class-conditional training:
digits have their digit, an image folder of class subfolders the subfolder, an
``.npz`` its ``y`` or ``labels`` array, an array or tensor the labels given with it.  Augmentation is not done here: the trainer
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

# The datasets of files and the tensor helpers live in their own modules; fastddpm.data
# re-exports them, so every name it has offered stays importable from here.
from .array_data import ARRAY_EXTENSIONS, FLOAT_RANGE_SLACK, RESIZE_CHUNK, ArrayDataset
from .dataset_labels import check_labels, dataset_labels
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
    "dataset_labels",
    "apply_flips",
    "draw_flips",
    "random_flip",
    "resize_center_crop",
    "split_validation",
]


# -- digits -----------------------------------------------------------------------------
class DigitsDataset(Dataset):
    """Images held in memory with class labels.

    :param images: float32 ``[N, C, H, W]`` in [-1, 1].
    :param labels: int64 ``[N]``.
    :param class_names: one name per class (default ``"0".."9"``, the digits).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names=None):
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be [N, C, S, S], got shape {tuple(images.shape)}")
        self.images = images
        self.labels = check_labels(labels, int(images.shape[0]))
        self.class_names = list(class_names) if class_names is not None else [str(d) for d in range(10)]
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
ACCEPTED_FORMS = (f"'digits', a folder of images ({' '.join(IMAGE_EXTENSIONS)}), "
                  f"or a {'/'.join(ARRAY_EXTENSIONS)} file")


def load_dataset(spec, image_size: int | None = None, channels: int | None = None) -> Dataset:
    """The dataset a user names.

    :param spec: ``"digits"``; a folder of images (``image_size`` required,
        channels default 3); a ``.npy`` / ``.npz`` file (or a numpy array or tensor); a pair
        ``(images, labels)`` of an array (or tensor) and its class labels.
    :param image_size: output side (digits: default 16; arrays: default as stored).
    :param channels: 1 or 3 (folders: default 3; digits: default 1; arrays: as stored).
    :raises FileNotFoundError: the path does not exist.
    :raises ValueError: anything else that is not one of the accepted forms.
    """
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        return ArrayDataset(spec, channels=channels, image_size=image_size)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (np.ndarray, torch.Tensor)):
        return ArrayDataset(spec[0], channels=channels, image_size=image_size, labels=spec[1])
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
