"""The metrics' entry points: ``fid(a, b)`` and ``evaluate(images, reference)``, with the
checks of the images they are given (errors name the argument)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..checks import is_int
from ..image_tensors import to_float_images
from .features import feature_extractor
from .statistics import feature_statistics, frechet_distance, precision_recall

__all__ = ["evaluate", "fid"]

# float images may overshoot [-1, 1] by this much (rounding); larger is an error
RANGE_SLACK = 1e-3


# -- images in, validated ------------------------------------------------------------------------
def _as_float_images(images, name: str) -> torch.Tensor:
    """Float ``[n, C, H, W]`` in [-1, 1] (C = 1 or 3) from a float tensor of that
    form or a uint8 numpy array ``[n, H, W, C]``; errors name the argument."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"{name}: a numpy array must be uint8 [n, H, W, C] (as `fastddpm sample --out x.npz` "
                            f"writes), got dtype {images.dtype}; pass floats as a torch tensor [n, C, H, W] in [-1, 1]")
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: a uint8 array must be [n, H, W, C] with C = 1 or 3, got shape {images.shape}")
        return to_float_images(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [n, C, H, W] in [-1, 1] or a uint8 numpy array "
                        f"[n, H, W, C], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: a tensor must be [n, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name}: a tensor must be floating point in [-1, 1], got {images.dtype} "
                        f"(uint8 images go in as a numpy array [n, H, W, C])")
    x = images.detach().float().cpu()  # features are computed a batch at a time, moved to the device then
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise ValueError(f"{name} has {int((~finite).sum())} non-finite values (NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"{name} has values in [{lo:.4g}, {hi:.4g}]: expected images in [-1, 1]")
    return x.clamp(-1.0, 1.0)


def _check_count(n: int, name: str, at_least: int = 2) -> None:
    if n < at_least:
        raise ValueError(f"{name} holds {n} images: at least {at_least} are needed for a covariance")


def _statistics_of(features: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    n, dim = features.shape
    if n <= dim:
        warnings.warn(f"{name} holds {n} images for {dim}-d features: the covariance is rank-deficient and the "
                      f"Fréchet distance strongly biased; use more than {dim} (ideally thousands)", stacklevel=3)
    return feature_statistics(features)


# -- the entry points ----------------------------------------------------------------------------
def fid(images_a, images_b, *, feature: str = "digits", batch_size: int = 256, device=None,
        inception_weights=None) -> float:
    """Fréchet distance between two sets of images in a feature space.

    :param images_a, images_b: float tensors ``[n, C, H, W]`` in [-1, 1] or uint8 numpy ``[n, H, W, C]``
        (C = 1 or 3), at least 2 images each (and for a full-rank covariance, more than the feature dim).
    :param feature: ``"digits"`` (the shipped classifier, 64-d) or ``"inception"`` (standard FID).
    :param inception_weights: local ``pt_inception-2015-12-05-*.pth``; default: torch hub's cache.
    """
    a, b = _as_float_images(images_a, "images_a"), _as_float_images(images_b, "images_b")
    _check_count(a.shape[0], "images_a")
    _check_count(b.shape[0], "images_b")
    net = feature_extractor(feature, inception_weights=inception_weights, device=device, batch_size=batch_size)
    return frechet_distance(*_statistics_of(net(a), "images_a"), *_statistics_of(net(b), "images_b"))


def _reference_images(reference, n_reference, seed: int) -> torch.Tensor:
    if isinstance(reference, str) and reference == "digits":
        from ..data import digits_dataset

        x = digits_dataset(16).images
    elif isinstance(reference, (str, os.PathLike)):
        from ..data import ArrayDataset

        x = ArrayDataset(reference).float_images()
    else:
        x = _as_float_images(reference, "reference")
    if n_reference is not None:
        if not is_int(n_reference) or n_reference < 2:
            raise ValueError(f"n_reference must be an int >= 2, got {n_reference!r}")
        if n_reference < x.shape[0]:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:n_reference].sort().values]
    return x


def evaluate(images, reference="digits", n_reference: int | None = None, *, feature: str = "digits",
             k: int = 3, batch_size: int = 256, device=None, inception_weights=None, seed: int = 0) -> dict:
    """Score generated images against a reference set.

    :param images: generated images (float tensor ``[n, C, H, W]`` in [-1, 1] or uint8 numpy ``[n, H, W, C]``).
    :param reference: ``"digits"`` (all 1797 of ``digits_dataset(16)``), a ``.npy``/``.npz`` file, or images.
    :param n_reference: use a random subset (``seed``) of this many reference images.
    :return: ``{"fd", "precision", "recall", "n", "n_reference", "feature", "k"}``.
    """
    x = _as_float_images(images, "images")
    _check_count(x.shape[0], "images", at_least=max(2, k + 1))
    ref = _reference_images(reference, n_reference, seed)
    _check_count(ref.shape[0], "reference", at_least=max(2, k + 1))
    net = feature_extractor(feature, inception_weights=inception_weights, device=device, batch_size=batch_size)
    fake, real = net(x), net(ref)
    pr = precision_recall(real, fake, k=k)
    return {"fd": frechet_distance(*_statistics_of(real, "reference"), *_statistics_of(fake, "images")),
            "precision": pr["precision"], "recall": pr["recall"], "n": int(x.shape[0]),
            "n_reference": int(ref.shape[0]), "feature": feature, "k": k}
