"""The images of a run and the seeded batch stream that resumes exactly.

* data order: a permutation per epoch from a generator seeded by ``(seed, epoch)``; the position
  ``(epoch, index)`` is all the state there is, saved in each checkpoint;
* timesteps and flips: a generator seeded by ``(seed, step)``, no carried state; the flips are
  ``data.random_flip``'s (``draw_flips`` then ``apply_flips``);
* class labels (a class-conditional run): the images' labels, each replaced by the null class with
  probability ``cond_drop`` by uniforms drawn from the same step generator after the flips (so the
  timesteps and flips are those of an unconditional run).

Under several ranks every rank draws the global step as one process draws it and keeps its rows: its
contiguous share ``r * b/W ... (r+1) * b/W - 1`` of each micro-batch; only those images are loaded.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ..data import apply_flips, draw_flips, split_validation
from .streams import STREAM_EPOCH, STREAM_STEP, mix

__all__ = ["DATA_CACHE_BYTES", "Batch", "TrainBatches", "check_dataset", "model_image_shape"]

DATA_CACHE_BYTES = 2**30  # datasets up to this size are held as one tensor on the training device


def model_image_shape(model) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` a model takes, where its ``config`` says (``in_channels``, ``image_size``); else None."""
    mc = getattr(model, "config", None)
    if mc is None or not hasattr(mc, "in_channels") or not hasattr(mc, "image_size"):
        return None
    return (mc.in_channels, mc.image_size, mc.image_size)


def check_dataset(dataset, want: tuple[int, int, int] | None = None) -> tuple[int, ...]:
    """The image shape ``(C, H, W)`` of a sized dataset of float ``[C, H, W]`` tensors.

    :param want: the shape the model takes, if it says (then a dataset of another shape is refused).
    """
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(f"dataset must be a sized dataset (len and []), got {type(dataset).__name__}") from None
    if n < 1:
        raise ValueError("dataset is empty")
    first = dataset[0]
    if not isinstance(first, torch.Tensor) or first.ndim != 3 or not first.is_floating_point():
        what = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise TypeError(f"dataset items must be float tensors [C, H, W] in [-1, 1], got {what}")
    if want is not None and tuple(first.shape) != want:
        raise ValueError(f"dataset images have shape {tuple(first.shape)} but the model takes {want} (load "
                         f"the dataset with image_size={want[1]}, channels={want[0]})")
    return tuple(first.shape)


class Batch(NamedTuple):
    """One optimizer step's rows on this rank: images, timesteps, labels (None when unconditional)."""

    x0: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor | None


class TrainBatches:
    """The training and validation images of ``dataset`` and the batch of each optimizer step.

    :param dataset: a sized dataset of float32 ``[C, H, W]`` tensors (``check_dataset``).
    :param train_indices, val_indices: the split (``data.split_validation``), int64 tensors.
    :param seed: the run's seed (data order, timesteps, flips).
    :param num_steps: the process's ``T``: timesteps are drawn from ``U{0..T-1}``.
    :param batch_size: the global micro-batch; ``grad_accum`` micro-batches make a step.
    :param random_flip: flip each image horizontally with probability 1/2.
    :param device: where batches go; a split that fits ``DATA_CACHE_BYTES`` is held there as one tensor.
    :param rank, world_size: this process's rows of each global micro-batch.
    :param labels: the class of every image of ``dataset`` (int64 ``[N]``, checked), for a
        class-conditional run; None: unconditional.
    :param cond_drop: the probability that a training label becomes ``null_class``.
    :param null_class: the model's null class (required with ``cond_drop > 0``).
    """

    def __init__(self, dataset, train_indices: torch.Tensor, val_indices: torch.Tensor, *, seed: int,
                 num_steps: int, batch_size: int, grad_accum: int = 1, random_flip: bool = False,
                 device: torch.device = torch.device("cpu"), rank: int = 0, world_size: int = 1,
                 labels: torch.Tensor | None = None, cond_drop: float = 0.0, null_class: int | None = None):
        self.dataset = dataset
        self.image_shape = tuple(dataset[0].shape)
        self.train_indices, self.val_indices = train_indices, val_indices
        self.seed, self.num_steps = seed, num_steps
        self.batch_size, self.grad_accum, self.random_flip = batch_size, grad_accum, random_flip
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.local_batch_size = batch_size // world_size
        if labels is not None and cond_drop > 0 and null_class is None:
            raise ValueError("cond_drop > 0 needs the model's null_class")
        self.labels = labels.to(torch.int64).cpu() if labels is not None else None  # host: gathered per step
        self.cond_drop, self.null_class = float(cond_drop), null_class
        self.train_cache = self._cache(train_indices)
        self.val_cache = self._cache(val_indices) if val_indices.numel() else None
        self.seek(0, 0)

    @classmethod
    def split(cls, dataset, val_fraction: float, seed: int, **kw) -> "TrainBatches":
        """Split ``dataset`` by ``data.split_validation(val_fraction, seed)`` (nothing held out at 0); the
        warning that a positive fraction held out nothing names the caller's caller (``Trainer(...)``)."""
        n = len(dataset)
        if val_fraction > 0:
            train_idx, val_idx = split_validation(n, val_fraction, seed)
            if not val_idx:
                warnings.warn(f"val_fraction={val_fraction} holds out nothing of {n} images; no validation",
                              RuntimeWarning, stacklevel=3)
        else:
            train_idx, val_idx = list(range(n)), []
        return cls(dataset, torch.tensor(train_idx, dtype=torch.int64), torch.tensor(val_idx, dtype=torch.int64),
                   seed=seed, **kw)

    # -- the position: the whole state of the stream --------------------------------------
    def seek(self, epoch: int, index: int) -> None:
        """Continue from position ``index`` of epoch ``epoch`` (what a checkpoint saved)."""
        self.epoch, self.index = epoch, index
        self._perm_epoch, self._perm = None, None

    def epoch_perm(self, epoch: int) -> torch.Tensor:
        """The training set's order in epoch ``epoch`` (positions into ``train_indices``)."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(mix(self.seed, STREAM_EPOCH, epoch))
            self._perm = torch.randperm(self.train_indices.numel(), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def next_positions(self, n: int) -> torch.Tensor:
        """The next ``n`` positions in the training set, crossing epochs as needed."""
        parts, need = [], n
        while need:
            perm = self.epoch_perm(self.epoch)
            take = perm[self.index:self.index + need]
            parts.append(take)
            need -= take.numel()
            self.index += take.numel()
            if self.index >= perm.numel():
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def rank_rows(self) -> torch.Tensor | None:
        """This rank's rows of the global step batch: its share of each micro-batch (None: all rows)."""
        if self.world_size == 1:
            return None
        b, lb = self.batch_size, self.local_batch_size
        return torch.cat([torch.arange(m * b + self.rank * lb, m * b + (self.rank + 1) * lb)
                          for m in range(self.grad_accum)])

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, t)`` of optimizer step ``step``: :meth:`next_batch` without the labels."""
        return tuple(self.next_batch(step)[:2])

    def next_batch(self, step: int) -> Batch:
        """``(x0, t, labels)`` of optimizer step ``step`` on this rank: its ``grad_accum * batch_size /
        world_size`` rows of the global ``batch_size * grad_accum`` images, timesteps and labels (None in
        an unconditional run, else each dropped to ``null_class`` with probability ``cond_drop``);
        advances the position.

        The global step is drawn as one process draws it (data positions; then from the step's generator
        the timesteps, the flips as ``data.random_flip`` draws them, then the label drops), so every rank
        agrees on it.
        """
        n = self.batch_size * self.grad_accum
        positions = self.next_positions(n)  # every rank advances the global data position
        g = torch.Generator().manual_seed(mix(self.seed, STREAM_STEP, step))
        t = torch.randint(0, self.num_steps, (n,), generator=g)
        flip = draw_flips(n, g) if self.random_flip else None
        labels = None
        if self.labels is not None:
            labels = self.labels[self.train_indices[positions]]
            if self.cond_drop > 0:
                labels = torch.where(torch.rand(n, generator=g) < self.cond_drop, self.null_class, labels)
        rows = self.rank_rows()
        if rows is not None:
            positions, t = positions[rows], t[rows]
            flip = flip[rows] if flip is not None else None
            labels = labels[rows] if labels is not None else None
        # one host-to-device copy for the timesteps, the flips and the labels
        parts = [t] + ([flip.long()] if flip is not None else []) + ([labels] if labels is not None else [])
        on_device = self.to_device(torch.stack(parts))
        x0 = self.gather(self.train_cache, self.train_indices, positions)
        if flip is not None:
            x0 = apply_flips(x0, on_device[1].bool())
        return Batch(x0, on_device[0], on_device[-1] if labels is not None else None)

    # -- loading -----------------------------------------------------------------------------
    def _cache(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The images as one device tensor, when they fit (no per-step Python gather then)."""
        numel = int(torch.Size(self.image_shape).numel())
        if indices.numel() * numel * 4 > DATA_CACHE_BYTES:
            return None
        return torch.stack([self.dataset[int(i)] for i in indices]).to(self.device, torch.float32)

    def gather(self, cache: torch.Tensor | None, indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The images at ``positions`` (on the device when ``cache`` is) of the split ``indices``."""
        if cache is not None:
            return cache.index_select(0, self.to_device(positions))
        batch = torch.stack([self.dataset[int(indices[p])] for p in positions])
        return self.to_device(batch).float()

    def val_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """The validation images at ``positions`` (into ``val_indices``)."""
        return self.gather(self.val_cache, self.val_indices, positions)

    def val_labels(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The validation images' labels at ``positions`` (never dropped), on the device; None unconditional."""
        if self.labels is None:
            return None
        return self.to_device(self.labels[self.val_indices[positions]])

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device without waiting for the GPU: a copy from pageable
        memory blocks the host until the stream has drained, one from pinned memory does not."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)
