"""Class labels of a dataset: how a dataset says them, and the checks they pass once, on the host.

A labelled dataset (``DigitsDataset``, ``ImageFolderDataset`` of class subfolders, ``ArrayDataset``
with labels) has ``.labels``, int64 ``[N]`` in ``[0, K)``, and ``.class_names``, K strings (or None
when only the labels are known; then K is ``max + 1``).  A dataset without labels has
``labels = None``.  The trainer reads them through :func:`dataset_labels`; every value is checked
here, before training, so the model call never checks values (no device synchronisation).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_labels", "check_class_names", "dataset_labels"]


def check_labels(labels, n: int, *, name: str = "labels", num_classes: int | None = None) -> torch.Tensor:
    """``labels`` (a tensor, numpy array or sequence of ints) as a CPU int64 tensor ``[n]``, checked.

    :param n: the number of images they label.
    :param num_classes: labels must be below it (None: only >= 0).
    :raises TypeError: not integers (floats and bools are refused, not rounded).
    :raises ValueError: not 1-D of length ``n``, or out of ``[0, num_classes)``.
    """
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    elif isinstance(labels, np.ndarray):
        arr = labels
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        arr = np.asarray(labels)
    else:
        raise TypeError(f"{name} must be a tensor, a numpy array or a list of ints, got {type(labels).__name__}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        hint = " (cast them to int64 if they are whole numbers)" if np.issubdtype(arr.dtype, np.floating) else ""
        raise TypeError(f"{name} must be integers (class indices), got dtype {arr.dtype}{hint}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one class per image, got {tuple(arr.shape)}")
    if n:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes - 1}]" if num_classes is not None else "[0, ...)"
            raise ValueError(f"{name} must lie in {bound}, got values in [{lo}, {hi}]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))


def check_class_names(class_names, labels: torch.Tensor | None = None, *, name: str = "class_names") -> list[str]:
    """``class_names`` as a list of distinct strings, at least as many as ``labels`` need."""
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(class_names).__name__}")
    names = list(class_names)
    if not names or not all(isinstance(c, str) for c in names):
        raise TypeError(f"{name} must be a non-empty list of strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must be distinct, got {names!r}")
    if labels is not None and labels.numel() and int(labels.max()) >= len(names):
        raise ValueError(f"labels go up to {int(labels.max())} but there are only {len(names)} {name}")
    return names


def dataset_labels(dataset) -> tuple[torch.Tensor, list[str]] | None:
    """``(labels, class_names)`` of a labelled dataset, checked (names ``"0".."K-1"`` where it gives
    none); None for a dataset without labels."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    where = f"{type(dataset).__name__}.labels"
    labels = check_labels(labels, len(dataset), name=where)
    names = getattr(dataset, "class_names", None)
    if names is None:
        names = [str(c) for c in range(int(labels.max()) + 1 if labels.numel() else 0)]
    return labels, check_class_names(names, labels, name=f"{type(dataset).__name__}.class_names")
