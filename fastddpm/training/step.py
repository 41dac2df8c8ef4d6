"""One optimizer step of DDPM training (Ho et al. Algorithm 1, lines 2-5), on the device, no host sync.

``train_step`` sets the learning rate, runs ``grad_accum`` micro-batches of the process's loss (noise
from the contract, offsets the examples' global indices), averages the loss over the ranks, clips or
measures the gradient norm and steps the optimizer, leaving a non-finite step out when asked to.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..diffusion import DDPM
from ..train_config import TrainConfig

__all__ = ["autocast_for", "learning_rate", "make_optimizer", "prepare_model", "train_step"]


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool, world_size: int,
                  compile_mode: str = "no") -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None, nn.Module]:
    """``model`` made ready to train: on ``device`` in training mode (its 4-D weights channels_last if
    asked), wrapped in DistributedDataParallel over ``world_size > 1`` ranks, compiled unless ``compile_mode``
    is ``"no"`` (``"default"``: torch.compile's default mode, else the mode of that name).

    :return: ``(model, ddp, train_model)``: the plain module (the EMA, checkpoints and validation use it),
        DDP's wrapper (None on one rank) and what the training steps call (the wrapper or the module,
        compiled if asked).
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).train()  # layout: 4-D weights only
    # DDP broadcasts rank 0's weights when it wraps, so an EMA copy made after starts equal on every rank
    ddp = None
    if world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = ddp if ddp is not None else model
    if compile_mode != "no":
        train_model = torch.compile(train_model, mode=None if compile_mode == "default" else compile_mode)
    return model, ddp, train_model


def make_optimizer(params: list[torch.Tensor], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW of ``config`` over ``params``; fused (one kernel for all parameters) on CUDA."""
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kw = dict(lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    if device.type == "cuda" and all(p.dtype.is_floating_point for p in params):
        kw["fused"] = True  # one kernel for all parameters
    return cls(params, **kw)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps`` to ``lr``."""
    c = config
    return c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a precision (``"no"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, process: DDPM, x0: torch.Tensor,
               t: torch.Tensor, *, step: int, lr: float, seed: int, batch_size: int, grad_accum: int = 1,
               params: list[torch.Tensor], grad_clip: float | None = None, nonfinite: str = "error",
               precision: str = "no", scaler: torch.amp.GradScaler | None = None,
               ddp: nn.parallel.DistributedDataParallel | None = None, rank: int = 0, world_size: int = 1,
               labels: torch.Tensor | None = None, label_kwargs=None):
    """One optimizer step on this rank's ``grad_accum * batch_size / world_size`` rows ``(x0, t)``.

    :param model: what runs the micro-batches: ``ddp``, the module, or either compiled.
    :param optimizer: steps ``params``; with ``nonfinite='skip'`` a fused one skips a non-finite step on
        the device (``found_inf``, as under ``GradScaler``), an unfused one is skipped from the host.
    :param step: the 0-based optimizer step: with ``batch_size``, ``grad_accum`` and ``rank`` it gives the
        noise offset of each example, its global index ``step * batch_size * grad_accum + m * batch_size
        + rank * batch_size / world_size + i``.
    :param lr: this step's learning rate, set on every param group.
    :param seed: the noise contract's seed.
    :param batch_size: the *global* micro-batch (over all ranks).
    :param params: the trainable parameters (their gradients are clipped or measured).
    :param grad_clip: clip the gradients' total norm to this (None: measure it only).
    :param nonfinite: ``'error'`` (the caller checks the loss) or ``'skip'`` (a non-finite loss or
        gradient leaves the step out: no update, no optimizer step count).
    :param precision: autocast: ``'no'``, ``'bf16'`` or ``'fp16'`` (then with ``scaler``).
    :param ddp: the DDP wrapper when ``world_size > 1``: gradients are averaged once, after the last
        micro-batch.
    :param labels: the rows' class labels (int64, the null class where dropped), or None.
    :param label_kwargs: ``labels -> {keyword: labels}``, how the model takes them
        (``ModelAdapter(model).label_kwargs``); required with ``labels``.
    :return: ``(loss, grad_norm, ok)``: the device loss, the mean over all ranks' rows; the gradient
        norm; with ``nonfinite='skip'`` a device bool, was the step taken (None otherwise).
    """
    lb = batch_size // world_size
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = None
    for m in range(grad_accum):
        part = slice(m * lb, (m + 1) * lb)
        # noise offset: the global index of this rank's first example of micro-batch m
        offset = step * batch_size * grad_accum + m * batch_size + rank * lb
        # DDP averages the gradients over the ranks once, after the last micro-batch
        sync = ddp is None or m == grad_accum - 1
        with nullcontext() if sync else ddp.no_sync():
            kwargs = label_kwargs(labels[part]) if labels is not None else None
            loss = process.training_loss(model, x0[part], t[part], seed=seed, sample_offset=offset,
                                         autocast=autocast_for(precision, x0.device), model_kwargs=kwargs)
            scaled = loss / grad_accum if grad_accum > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = loss.detach() if total is None else total + loss.detach()
    loss = total / grad_accum if grad_accum > 1 else total
    if world_size > 1:
        # equal shards: the mean of the ranks' means is the global mean (stays on the device)
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world_size
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    ok = None
    if nonfinite == "skip":  # the same on every rank: loss and gradients are all-reduced
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if scaler is not None:  # skips steps with non-finite gradients itself
        scaler.step(optimizer)
        scaler.update()
    elif ok is None:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        # the fused kernels skip the update and the step count on the device, as under GradScaler
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):  # unfused optimizers read no found_inf: decide on the host (free on a CPU)
        optimizer.step()
    return loss, grad_norm, ok
