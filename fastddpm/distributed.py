"""Sampling over several processes (``torchrun``): each rank draws a shard, all ranks get every image.

The noise contract (``noise.py``) makes sample ``i`` of a seed depend only on
``(seed, i)``, so a rank that samples the contiguous shard ``[start, start +
count)`` with ``sample_offset=start`` draws exactly the images one device
would draw there.  The shards are then gathered to every rank in sample order.

Collectives: one small ``all_gather`` of a status vector (did sampling fail on
a rank, and the image shape), then one ``all_gather`` of the images padded to
the largest shard (shards differ by at most one; ranks beyond ``n`` send
padding only).  A rank that fails still joins the status collective, so the
other ranks raise instead of waiting for it until the timeout.  Images travel
on the sampling device with NCCL and on the CPU with every other backend
(gloo).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .adapters import ModelAdapter
from .checks import is_int
from .local import sample_local
from .request import SamplingRequest

__all__ = ["dist_info", "shard_range", "sample_distributed"]


def dist_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` when ``torch.distributed`` is not initialised.

    :param group: a process group (default: the world).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_device(device) -> torch.device:
    """This process's device; under several processes a bare ``cuda`` means its ``LOCAL_RANK`` GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and (dist_info()[1] > 1 or launched_world_size() > 1):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join_torchrun_group(device: torch.device) -> None:
    """Join the process group ``torchrun`` set up (env://), if there is one and nobody joined it yet."""
    if launched_world_size() > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous shard of ``n`` samples that ``rank`` draws: ``(start, count)``.

    The first ``n % world_size`` ranks get ``ceil(n / world_size)`` samples, the
    others ``floor(n / world_size)`` (0 when ``n < world_size``); the shards
    cover ``[0, n)`` in rank order without overlap.
    """
    for name, value in (("n", n), ("rank", rank), ("world_size", world_size)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def _comm_device(backend: str, device: torch.device) -> torch.device:
    """Where the collectives' tensors live: NCCL needs CUDA, gloo (and the rest) the CPU."""
    if "nccl" in str(backend):
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, world_size: int, group) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


@torch.no_grad()
def sample_distributed(model, n: int, *, group=None, **sample_kwargs) -> torch.Tensor:
    """``fastddpm.sample(model, n, ...)`` sharded over the ranks of ``group``, gathered to every rank.

    Every rank of the group must call it with the same arguments (and the same
    model weights).  The result equals one process's ``sample(model, n, ...)``:
    bit for bit for a model whose output for a sample does not depend on the
    rest of the batch, and up to floating-point rounding otherwise (batched
    kernels may round differently for other batch sizes).  Without an
    initialised process group (or with one rank) it is ``sample`` itself.

    :param model: anything ``fastddpm.sample`` accepts, on this rank's device; each rank samples its
        shard with ``fastddpm.local.sample_local`` (the engine or the eager loop).
    :param n: total number of images over all ranks.
    :param group: a process group (default: the world).
    :param sample_kwargs: ``sample``'s keyword arguments; ``sample_offset`` is
        the global index of the first of the ``n`` samples, and ``progress``
        defaults to rank 0 only.
    :return: float32 ``[n, C, H, W]`` in sample order on this rank's sampling device.
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rank, world_size = dist_info(group)
    if world_size == 1:
        return sample_local(model, n, **sample_kwargs)
    sample_kwargs.setdefault("progress", rank == 0)
    start, count = shard_range(n, rank, world_size)

    images, error, device = None, None, None
    try:
        # the whole request (checked the same on every rank), then this rank's shard of it
        request = SamplingRequest.from_options(
            n, sample_kwargs, seed=sample_kwargs.pop("seed", 0), sample_offset=sample_kwargs.pop("sample_offset", 0),
            callback=sample_kwargs.pop("callback", None), request=sample_kwargs.pop("request", None))
        if count:
            images = sample_local(model, count, request=request.slice(start, start + count), **sample_kwargs)
            device = images.device
            if images.ndim != 4:  # sample's contract: [n, C, H, W]
                raise AssertionError(f"sample returned {images.ndim}-d images, expected [n, C, H, W]")
        else:  # nothing to draw: where the images would have been, for the result
            requested = sample_kwargs.get("device")
            device = torch.device(requested) if requested is not None else ModelAdapter(model).device
    except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other ranks)
        error = e
        if device is None:
            device = torch.device("cpu")
    comm = _comm_device(dist.get_backend(group), device)

    # 1. status: [failed, C, H, W] of every rank, so that no rank waits for a failed one.
    shape = tuple(images.shape[1:]) if images is not None and error is None else (0, 0, 0)
    status = torch.tensor([int(error is not None), *shape], dtype=torch.int64, device=comm)
    statuses = [tuple(int(v) for v in s.tolist()) for s in _all_gather(status, world_size, group)]
    failed = [r for r, s in enumerate(statuses) if s[0]]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"sample_distributed: sampling failed on rank(s) {failed}; see their errors")
    shapes = {s[1:] for r, s in enumerate(statuses) if shard_range(n, r, world_size)[1]}
    if len(shapes) != 1:
        raise RuntimeError(f"sample_distributed: ranks sampled different image shapes {sorted(shapes)}; "
                           "call it with the same model and arguments on every rank")
    (shape,) = shapes

    # 2. images, padded to the largest shard (rank 0's).
    most = shard_range(n, 0, world_size)[1]
    padded = torch.zeros((most, *shape), dtype=torch.float32, device=comm)
    if images is not None:
        padded[:count] = images
    shards = _all_gather(padded, world_size, group)
    full = torch.cat([shards[r][:shard_range(n, r, world_size)[1]] for r in range(world_size)])
    return full.to(device)
