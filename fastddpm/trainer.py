"""``fastddpm.Trainer``: the DDPM training loop (Ho et al. Algorithm 1), resumable bit for bit.

Each step draws ``x0`` from the data, ``t ~ U{0..T-1}`` and ``eps`` from the
noise contract, and descends ``|| target - model(x_t, t) ||^2`` (or the
process's loss).  What makes a run reproducible and resumable exactly:

* data order: a permutation per epoch from a generator seeded by ``(seed, epoch)``;
  the position ``(epoch, index)`` is saved in each checkpoint;
* timesteps and flips: a generator seeded by ``(seed, step)``, no carried state;
* noise: the contract's ``normal(seed, offset)`` through ``ops.q_sample`` and
  ``ops.diffusion_loss`` with ``sample_offset`` the global example index
  (never torch's global RNG), so it is regenerated, not stored;
* dropout: torch's global RNG, whose state is saved in each checkpoint;
* the learning rate: a function of the step.

So 40 steps in one go and 20 steps + resume + 20 give the same tensors, bit
for bit, on the same device.  Metrics stay on the device and are read back
every ``log_every`` steps (and at validation, sampling and checkpoint steps).

The step itself is the fast one wherever the device has it: the noising and
the loss are the fused ops of ``fastddpm.ops`` (Triton or C++ on a GPU, C++
on a CPU; the noise is regenerated in the backward, never stored), bf16
autocast with the model in channels_last on a GPU (``mixed_precision``,
``channels_last``), ``torch.compile`` of the model if asked for
(``compile``), Adam(W) with ``fused=True`` on CUDA, the EMA as one
``_foreach_lerp_``, and fastddpm's U-Net attention through the fused kernel.
A non-finite step stops training (``nonfinite='error'``) or is left out on
the device (``'skip'``).

Several processes (``torchrun``, ``torch.distributed`` initialised with more
than one rank; under ``torchrun`` the trainer initialises it itself, NCCL on
CUDA and gloo on the CPU): ``batch_size`` stays the *global* micro-batch and
must be divisible by the world size.  Every rank computes the same global
step (data positions, timesteps, flips) and takes its contiguous share of
each micro-batch, rows ``r * b/W ... (r+1) * b/W - 1``, with noise offsets
the examples' global indices; DistributedDataParallel averages the
gradients, which are then those of the global mean loss.  So W ranks follow
one process's trajectory up to floating-point rounding (sums split in other
places), dropout excepted: ranks > 0 draw their own dropout masks.  A
checkpoint holds global state only and resumes on any number of ranks.
Rank 0 alone writes files (checkpoints, logs, plots, samples); validation
is split over the ranks and the losses are summed with ``all_reduce``.

Output directory::

    config.json                          model config, diffusion, train config
    checkpoints/step_0001000.safetensors (+ .json)   the last ``keep_last``
    checkpoints/best.safetensors         lowest val loss (or smoothed train loss)
    metrics.jsonl, metrics.csv           step, loss, lr, grad_norm, val_loss, ...
    loss.png                             the loss curve
    samples/step_0001000.png             EMA samples every ``sample_every`` steps
    .fastddpm.lock                       held by the process writing the run (``run_dir.RunDirLock``)

A folder that holds anything else and no fastddpm ``config.json`` is refused, not written into.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import check_model_config, load_checkpoint, load_weights, save_checkpoint
from .files import remove_stale_temp_files, write_text_atomic
from .diffusion import DDPM
from .distributed import dist_info, join_torchrun_group, process_device
from .noise import MAX_SEED
from .run_dir import RunDirLock, check_is_run_dir
from .run_log import RunLog
from .stop_signals import StopOnSignal
from .train_config import TrainConfig

__all__ = ["TrainConfig", "Trainer"]

MASK64 = 2**64 - 1
# generator streams derived from the seed
_STREAM_EPOCH, _STREAM_STEP, _STREAM_VAL, _STREAM_DROPOUT = 1, 2, 3, 4
DATA_CACHE_BYTES = 2**30  # datasets up to this size are held as one tensor on the training device
LOSS_EMA_BETA = 0.98  # smoothing of the train loss that picks "best" when there is no validation
# train-config fields that may change on resume without changing the training trajectory (the layout and
# compilation change rounding only; nonfinite matters only where a step is not finite, and resuming a run
# stopped by a NaN with nonfinite='skip' is what it is for)
_RESUME_FREE = {"steps", "val_every", "sample_every", "sample_n", "sample_steps", "checkpoint_every",
                "checkpoint_minutes", "keep_last",
                "keep_best", "log_every", "channels_last", "compile", "nonfinite"}
MAX_CONSECUTIVE_SKIPS = 50  # nonfinite='skip': this many non-finite steps in a row end training


def _mix(seed: int, stream: int, i: int) -> int:
    """A 63-bit seed for item ``i`` of ``stream`` (splitmix64 finaliser), so streams never collide."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + i * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & MAX_SEED


def _dropout_seed(seed: int, rank: int, step: int) -> int:
    """The global RNG's seed of rank ``rank`` > 0 from step ``step`` on (rank 0 uses ``seed`` and the
    checkpointed state): its own dropout masks, not a copy of rank 0's."""
    return _mix(_mix(seed, _STREAM_DROPOUT, rank), _STREAM_DROPOUT, step)


def _resolve_precision(mode: str, device: torch.device) -> str:
    if mode != "auto":
        return mode
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


# Measured on a 2-core AVX-512 BF16 CPU (issue 15): bf16 autocast with channels_last weights trains at
# 0.58-0.95x the fp32 step, so a CPU never gets it automatically.
CPU_BF16_TRAIN_SPEED = "0.58-0.95x"


def training_reasons(config, device: torch.device, precision: str, channels_last: bool) -> tuple[str, ...]:
    """One line per training choice and why (``Trainer.explain()``), as ``Plan.explain()`` for sampling."""
    on_cuda = device.type == "cuda"
    lines = [f"device={device}"]
    if config.mixed_precision == "auto":
        why = ("this GPU runs bfloat16 natively" if precision == "bf16" else
               f"a CPU trains fastest in float32 (bf16 autocast measured {CPU_BF16_TRAIN_SPEED} the fp32 step)"
               if not on_cuda else "no native bfloat16 on this GPU")
        lines.append(f"mixed_precision={precision!r}: automatic; {why}")
    else:
        note = (f"; note: on a CPU bf16 training measured {CPU_BF16_TRAIN_SPEED} the fp32 step (slower)"
                if not on_cuda and precision in ("bf16", "fp16") else "")
        lines.append(f"mixed_precision={precision!r}: requested{note}")
    if config.channels_last is None:
        lines.append(f"channels_last={channels_last}: automatic; " + (
            "low-precision convolutions on a GPU are fastest in NHWC" if channels_last else
            "only with mixed precision on a CUDA GPU (on a CPU it does not pay)"))
    else:
        lines.append(f"channels_last={channels_last}: requested")
    if config.compile == "no":
        lines.append("compile='no': the default (compiling takes tens of seconds on a CPU, minutes for "
                     "ddpm_cifar10; pass --compile default for long runs)")
    else:
        lines.append(f"compile={config.compile!r}: requested")
    lines.append(f"threads={torch.get_num_threads()}: torch's setting (fastddpm train --threads N to change it)"
                 if not on_cuda else f"threads={torch.get_num_threads()}: torch's CPU threads (data, host work)")
    return tuple(lines)


def _step_name(step: int) -> str:
    return f"step_{step:07d}"


def _step_of(path: Path) -> int:
    """The step of a ``step_XXXXXXX.safetensors`` file (-1 for other names)."""
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


# -- the trainer ---------------------------------------------------------------------------
class Trainer:
    """Train ``model`` on ``dataset`` with the loss of ``process``.

    ::

        trainer = Trainer(create_model("small"), DDPM(), load_dataset("digits"),
                          TrainConfig(steps=5000, batch_size=64), "runs/digits")
        metrics = trainer.train()

    :param model: an ``nn.Module`` ``model(x_t, t) -> prediction`` (fastddpm's ``UNet``
        for ``load_model`` to rebuild it from a checkpoint).
    :param process: the ``DDPM`` (not respaced) whose loss is trained.
    :param dataset: a sized dataset of float32 ``[C, H, W]`` tensors in [-1, 1].
    :param config: a ``TrainConfig`` (or its dict).
    :param out_dir: where checkpoints, logs and samples go (created).  A folder that holds other
        files and is not a fastddpm run is refused; while the trainer writes there (construction,
        ``resume``, ``train``) it holds the folder's lock, and a second trainer is refused.
    :param device: default: CUDA if available (under several processes, GPU ``LOCAL_RANK``), else CPU.
    :param resume: True: continue from the newest checkpoint in ``out_dir/checkpoints``
        if there is one (start fresh otherwise); a path: continue from that checkpoint.
        Every rank loads it; it may come from a run on another number of ranks.
    :param progress: show a tqdm bar (on rank 0).

    Under ``torchrun`` (or with ``torch.distributed`` initialised by the caller) every rank
    constructs the Trainer with the same arguments; see the module docstring.
    """

    def __init__(self, model: nn.Module, process: DDPM, dataset, config: TrainConfig | dict | None = None,
                 out_dir="runs/fastddpm", device=None, *, resume=False, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(process, DDPM):
            raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
        if process.schedule.is_respaced:
            raise ValueError("process is respaced (a sampler); train with the full process and respace to sample")
        config = TrainConfig() if config is None else config
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.process = process
        self.device = process_device(device)
        join_torchrun_group(self.device)
        self.rank, self.world_size = dist_info()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size={config.batch_size} is the global micro-batch and must be divisible by "
                             f"the world size {self.world_size} (each rank computes batch_size / world_size)")
        self.local_batch_size = config.batch_size // self.world_size
        if self.device.type == "cuda" and self.world_size > 1:
            torch.cuda.set_device(self.device)
        self.precision = _resolve_precision(config.mixed_precision, self.device)
        self.channels_last = (config.channels_last if config.channels_last is not None
                              else self.device.type == "cuda" and self.precision != "no")
        self.reasons = training_reasons(config, self.device, self.precision, self.channels_last)
        self.progress = progress
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"

        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=layout).train()  # layout: 4-D weights only
        # DDP broadcasts rank 0's weights when it wraps, so the EMA copy below starts equal on every rank;
        # self.model stays the plain module (EMA, checkpoints, validation), self._ddp runs the training steps
        self._ddp: nn.Module | None = None
        if self.world_size > 1:
            self._ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # what the training steps call: DDP's wrapper or the module, compiled if asked for
        self._train_model: nn.Module = self._ddp if self._ddp is not None else self.model
        if config.compile != "no":
            self._train_model = torch.compile(self._train_model,
                                              mode=None if config.compile == "default" else config.compile)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("model has no trainable parameters")
        self._ema_params = [p for p, q in zip(self.ema_model.parameters(), self.model.parameters()) if q.requires_grad]
        self._buffers = list(self.model.buffers())
        self._ema_buffers = list(self.ema_model.buffers())
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        self._setup_data(dataset)
        # rank 0 holds the run directory's lock while it writes there: here and in train()
        self._lock = RunDirLock(self.out_dir)
        if self.is_main:
            check_is_run_dir(self.out_dir)
            self._prepare_out_dir()
            self._lock.acquire()
            for folder in (self.out_dir, self.checkpoint_dir, self.out_dir / "samples"):
                remove_stale_temp_files(folder)  # left by writes a kill cut short; we hold the lock
        try:
            self._init_state(resume)
        finally:
            self._lock.release()

    def explain(self) -> str:
        """What this trainer runs with and why, one choice a line."""
        return "\n".join(self.reasons)

    def _init_state(self, resume) -> None:
        """The training state (all of it goes into each checkpoint): step 0, or the checkpoint's."""
        self.step = 0
        self.epoch = 0
        self.index = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.last_val: dict | None = None
        self.elapsed_before = 0.0
        self._loss_ema = torch.zeros((), device=self.device)
        self._loss_ema_count = 0
        self.skipped_steps = 0  # nonfinite='skip': steps left out so far
        self.log = RunLog(self.out_dir, writes=self.is_main)
        self._resumed_from: Path | None = None
        self._perm_epoch, self._perm = None, None
        if resume:
            self.resume(None if resume is True else resume, missing_ok=resume is True)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files."""
        return self.rank == 0

    # -- setup -------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        kw = dict(lr=c.lr, betas=c.adam_betas, weight_decay=c.weight_decay)
        if self.device.type == "cuda" and all(p.dtype.is_floating_point for p in self._params):
            kw["fused"] = True  # one kernel for all parameters
        return cls(self._params, **kw)

    def _setup_data(self, dataset) -> None:
        from .data import split_validation

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
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "in_channels") and hasattr(config, "image_size"):
            want = (config.in_channels, config.image_size, config.image_size)
            if tuple(first.shape) != want:
                raise ValueError(f"dataset images have shape {tuple(first.shape)} but the model takes {want} (load "
                                 f"the dataset with image_size={config.image_size}, channels={config.in_channels})")
        self.dataset = dataset
        self.image_shape = tuple(first.shape)
        if self.config.val_fraction > 0:
            train_idx, val_idx = split_validation(n, self.config.val_fraction, self.config.seed)
            if not val_idx:
                warnings.warn(f"val_fraction={self.config.val_fraction} holds out nothing of {n} images; "
                              f"no validation", RuntimeWarning, stacklevel=3)
        else:
            train_idx, val_idx = list(range(n)), []
        self.train_indices = torch.tensor(train_idx, dtype=torch.int64)
        self.val_indices = torch.tensor(val_idx, dtype=torch.int64)
        self._train_cache = self._cache(self.train_indices)
        self._val_cache = self._cache(self.val_indices) if val_idx else None

    def _cache(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The images as one device tensor, when they fit (no per-step Python gather then)."""
        numel = int(torch.Size(self.image_shape).numel())
        if indices.numel() * numel * 4 > DATA_CACHE_BYTES:
            return None
        return torch.stack([self.dataset[int(i)] for i in indices]).to(self.device, torch.float32)

    def _gather(self, cache, indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The images at ``positions`` (on the device when ``cache`` is) of the split ``indices``."""
        if cache is not None:
            return cache.index_select(0, self._to_device(positions))
        batch = torch.stack([self.dataset[int(indices[p])] for p in positions])
        return self._to_device(batch).float()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device without waiting for the GPU: a copy from pageable
        memory blocks the host until the stream has drained, one from pinned memory does not."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _prepare_out_dir(self) -> None:
        where = repr(str(self.out_dir))
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".fastddpm_write_test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"out_dir {where} cannot be created or written to: {e.strerror or e}") from e
        free = shutil.disk_usage(self.out_dir).free
        # the kept step checkpoints, best.safetensors and the one being written
        count = self.config.keep_last + int(self.config.keep_best) + 1
        one = self.estimated_checkpoint_bytes()
        if free < count * one:
            raise OSError(f"out_dir {where} has {free / 2**20:.1f} MiB free; checkpoints need about "
                          f"{count * one / 2**20:.1f} MiB ({count} checkpoints of {one / 2**20:.1f} MiB: keep_last="
                          f"{self.config.keep_last}, best, one being written)")

    def estimated_checkpoint_bytes(self) -> int:
        """Model + EMA + Adam's two moments, plus a little."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        return 4 * params + 2 * buffers + 2**16

    # -- step pieces ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warmup to ``lr``."""
        c = self.config
        return c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(_mix(self.config.seed, _STREAM_EPOCH, epoch))
            self._perm = torch.randperm(self.train_indices.numel(), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def _next_positions(self, n: int) -> torch.Tensor:
        """The next ``n`` positions in the training set, crossing epochs as needed."""
        parts, need = [], n
        while need:
            perm = self._epoch_perm(self.epoch)
            take = perm[self.index:self.index + need]
            parts.append(take)
            need -= take.numel()
            self.index += take.numel()
            if self.index >= perm.numel():
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _rank_rows(self) -> torch.Tensor | None:
        """This rank's rows of the global step batch: its share of each micro-batch (None: all rows)."""
        if self.world_size == 1:
            return None
        b, lb = self.config.batch_size, self.local_batch_size
        return torch.cat([torch.arange(m * b + self.rank * lb, m * b + (self.rank + 1) * lb)
                          for m in range(self.config.grad_accum)])

    def _batch(self, step: int):
        """``(x0, t)`` of an optimizer step on this rank: its ``grad_accum * batch_size / world_size`` rows of
        the global ``batch_size * grad_accum`` images and timesteps.

        The global step is drawn as one process draws it (data positions; then from the step's generator
        the timesteps, then the flips as ``data.random_flip`` draws them: one uniform per image, flipped
        below 1/2), so every rank agrees on it and keeps its rows; only those images are loaded.
        """
        c = self.config
        n = c.effective_batch_size
        positions = self._next_positions(n)  # every rank advances the global data position
        g = torch.Generator().manual_seed(_mix(c.seed, _STREAM_STEP, step))
        t = torch.randint(0, self.process.num_steps, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5 if c.random_flip else None
        rows = self._rank_rows()
        if rows is not None:
            positions, t = positions[rows], t[rows]
            flip = flip[rows] if flip is not None else None
        # one host-to-device copy for the timesteps and the flips
        t_flip = self._to_device(torch.stack([t] if flip is None else [t, flip.long()]))
        x0 = self._gather(self._train_cache, self.train_indices, positions)
        if flip is not None:
            x0 = torch.where(t_flip[1].bool().reshape(-1, *([1] * (x0.ndim - 1))), x0.flip(-1), x0)
        return x0, t_flip[0]

    def _autocast(self):
        if self.precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loss(self, model, x0, t, seed: int, sample_offset: int):
        """The process's loss of ``model`` on ``x0`` at ``t``, noise from the contract."""
        return self.process.training_loss(model, x0, t, seed=seed, sample_offset=sample_offset,
                                          autocast=self._autocast())

    def _train_step(self, step: int):
        """One optimizer step; returns the (device) loss, the mean over all ranks, the gradient norm
        and, with ``nonfinite='skip'``, a device bool: was the step taken (None otherwise)."""
        c = self.config
        b, lb, accum = c.batch_size, self.local_batch_size, c.grad_accum
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, t = self._batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        model = self._train_model
        total = None
        for m in range(accum):
            part = slice(m * lb, (m + 1) * lb)
            # noise offset: the global index of this rank's first example of micro-batch m
            offset = step * b * accum + m * b + self.rank * lb
            # DDP averages the gradients over the ranks once, after the last micro-batch
            sync = self._ddp is None or m == accum - 1
            with nullcontext() if sync else self._ddp.no_sync():
                loss = self._loss(model, x0[part], t[part], c.seed, offset)
                scaled = loss / accum if accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = loss.detach() if total is None else total + loss.detach()
        loss = total / accum if accum > 1 else total
        if self.world_size > 1:
            # equal shards: the mean of the ranks' means is the global mean (stays on the device)
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if c.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, c.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        ok = None
        if c.nonfinite == "skip":  # the same on every rank: loss and gradients are all-reduced
            ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.scaler is not None:  # skips steps with non-finite gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif ok is None:
            self.optimizer.step()
        elif self.optimizer.defaults.get("fused"):
            # the fused kernels skip the update and the step count on the device, as under GradScaler
            self.optimizer.found_inf = (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(ok):  # unfused optimizers read no found_inf: decide on the host (free on a CPU)
            self.optimizer.step()
        self._update_ema(step, ok)
        return loss, grad_norm, ok

    @torch.no_grad()
    def _update_ema(self, step: int, ok: torch.Tensor | None = None) -> None:
        """``ema <- lerp(ema, params, 1 - decay)`` with the decay of ``config.ema_decay_at(step)`` (weight 1
        before ``ema_start`` and at the first warm-up step: an exact copy); with ``ok`` (a device bool)
        the weight is 0 for a skipped step.  The weight is a function of the step: resumes exactly."""
        weight = 1.0 - self.config.ema_decay_at(step)
        if ok is None:
            torch._foreach_lerp_(self._ema_params, self._params, weight)
            for e, b in zip(self._ema_buffers, self._buffers):
                e.copy_(b)
        else:
            w = ok.float() * weight
            torch._foreach_lerp_(self._ema_params, self._params, [w] * len(self._params))
            for e, b in zip(self._ema_buffers, self._buffers):
                e.copy_(torch.where(ok, b, e))

    # -- validation and samples ------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the model and of the EMA model on the held-out images, with fixed
        timesteps (spread evenly over [0, T)) and fixed noise: the same every call."""
        n = self.val_indices.numel()
        if n == 0:
            return {}
        T = self.process.num_steps
        seed = _mix(self.config.seed, _STREAM_VAL, 0)
        t_all = ((2 * torch.arange(n, dtype=torch.int64) + 1) * T) // (2 * n)
        # each rank takes a contiguous share of the images; the sums of the losses are added over the ranks
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        was_training = self.model.training
        self.model.eval()
        sums = {"val_loss": torch.zeros((), device=self.device), "val_loss_ema": torch.zeros((), device=self.device)}
        try:
            for first in range(lo, hi, self.local_batch_size):
                pos = torch.arange(first, min(first + self.local_batch_size, hi))
                x0 = self._gather(self._val_cache, self.val_indices, pos)
                t = t_all[pos].to(self.device)
                for key, model in (("val_loss", self.model), ("val_loss_ema", self.ema_model)):
                    sums[key] += self._loss(model, x0, t, seed, first) * pos.numel()
        finally:
            self.model.train(was_training)
        if self.world_size > 1:
            both = torch.stack([sums["val_loss"], sums["val_loss_ema"]])
            dist.all_reduce(both)
            sums = {"val_loss": both[0], "val_loss_ema": both[1]}
        return {k: float(v) / n for k, v in sums.items()}

    def save_samples(self, step: int) -> Path:
        """An EMA sample grid at ``out_dir/samples/step_XXXXXXX.png`` (seed 0: comparable across steps)."""
        from .images import save_image_grid
        from .sampling import sample

        images = sample(self.ema_model, self.config.sample_n, steps=self.config.sample_steps, seed=0,
                        progress=False, process=self.process, device=self.device)
        path = self.out_dir / "samples" / f"{_step_name(step)}.png"
        # upscale small images so a grid is at least ~256 px wide to look at
        side = max(images.shape[-1], 1) * math.ceil(math.sqrt(images.shape[0]))
        return save_image_grid(images, path, scale=max(1, 256 // side))

    # -- checkpoints -----------------------------------------------------------------------
    @staticmethod
    def checkpoints_in(out_dir) -> list[Path]:
        """The ``step_*.safetensors`` checkpoints of a run, oldest first."""
        d = Path(out_dir) / "checkpoints"
        found = [(_step_of(p), p) for p in (d.glob("step_*.safetensors") if d.is_dir() else ())]
        return [p for s, p in sorted(found) if s >= 0]

    @classmethod
    def latest_checkpoint(cls, out_dir) -> Path | None:
        found = cls.checkpoints_in(out_dir)
        return found[-1] if found else None

    def _state(self) -> dict:
        return {
            "kind": "train",
            "diffusion": self.process.to_dict(),
            "train_config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "index": self.index,
            "train_size": int(self.train_indices.numel()),
            "val_size": int(self.val_indices.numel()),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "metric": "val_loss" if self.val_indices.numel() else "train_loss_smoothed",
            "last_val": self.last_val,
            "loss_ema": float(self._loss_ema),
            "loss_ema_count": self._loss_ema_count,
            "skipped_steps": self.skipped_steps,
            "elapsed": self._elapsed(),
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.world_size,  # for information: the state above is global, any number resumes it
        }

    def save(self, path) -> Path:
        """Write a resumable checkpoint of the current state at ``path`` (on rank 0; other ranks write
        nothing and return ``path``)."""
        if not self.is_main:
            return Path(path)
        return save_checkpoint(path, model=self.model, ema=self.ema_model, optimizer=self.optimizer,
                               state=self._state())

    def _checkpoint(self) -> Path:
        """A step checkpoint, and older ones beyond ``keep_last`` removed (rank 0 only)."""
        path = self.save(self.checkpoint_dir / f"{_step_name(self.step)}.safetensors")
        if not self.is_main:
            return path
        # only older ones: after resuming from an earlier checkpoint, later files are left alone
        older = [p for p in self.checkpoints_in(self.out_dir) if _step_of(p) <= self.step]
        for old in older[:-self.config.keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        return path

    def _improves(self, metric: float | None) -> bool:
        """Record ``metric`` as the best if it is; True when ``best.safetensors`` should be rewritten."""
        if not self.config.keep_best or metric is None or not math.isfinite(metric):
            return False
        if self.best_metric is None or metric < self.best_metric:
            self.best_metric, self.best_step = metric, self.step
            return True
        return False

    def resume(self, path=None, *, missing_ok: bool = False) -> int:
        """Continue from a checkpoint (default: the newest in ``out_dir/checkpoints``).

        Restores model, EMA, optimizer, grad scaler, data position, RNG state and
        log files (rows after the checkpoint's step are dropped).  Every rank calls it;
        the checkpoint's state is global, so it may come from another number of ranks.
        :return: the step resumed at (0 if ``missing_ok`` and there is none).
        :raises RunDirInUseError: another trainer is writing in ``out_dir``.
        """
        locked_here = self.is_main and not self._lock.held
        if locked_here:
            self._lock.acquire()
        try:
            return self._resume(path, missing_ok)
        finally:
            if locked_here:
                self._lock.release()

    def _resume(self, path, missing_ok: bool) -> int:
        if path is None:
            path = self.latest_checkpoint(self.out_dir)
            if path is None:
                if missing_ok:
                    return 0
                raise FileNotFoundError(f"no checkpoint to resume from in {str(self.checkpoint_dir)!r}")
        ckpt = load_checkpoint(path)
        where = repr(str(ckpt.path))
        meta = ckpt.metadata
        later = [p.name for p in self.checkpoints_in(self.out_dir) if _step_of(p) > ckpt.step]
        if later and self.is_main:
            warnings.warn(f"resuming from step {ckpt.step} of {where} while {str(self.checkpoint_dir)!r} holds later "
                          f"checkpoints ({', '.join(later)}); they will be overwritten as training reaches them",
                          RuntimeWarning, stacklevel=3)
        if meta.get("kind") != "train" or "optimizer" not in meta:
            raise ValueError(f"{where} is not a training checkpoint (no optimizer state); it cannot be resumed")
        check_model_config(ckpt, self.model)
        if meta.get("diffusion") != self.process.to_dict():
            raise ValueError(f"{where} was trained with another diffusion process: {meta.get('diffusion')} "
                             f"vs {self.process.to_dict()}")
        saved_cfg = meta.get("train_config", {})
        mine = self.config.to_dict()
        changed = sorted(k for k in set(saved_cfg) | set(mine)
                         if saved_cfg.get(k) != mine.get(k) and k not in _RESUME_FREE)
        if changed:
            warnings.warn(f"resuming {where} with a changed train config ({', '.join(changed)}): the run will not "
                          f"be the one the checkpoint started", RuntimeWarning, stacklevel=3)
        if meta.get("train_size") != self.train_indices.numel():
            warnings.warn(f"{where} was trained on {meta.get('train_size')} images, this dataset has "
                          f"{self.train_indices.numel()} for training", RuntimeWarning, stacklevel=3)

        load_weights(self.model, ckpt.section("model"), path=ckpt.path, what="model")
        if ckpt.has("ema"):
            load_weights(self.ema_model, ckpt.section("ema"), path=ckpt.path, what="ema")
        else:
            self.ema_model.load_state_dict(self.model.state_dict())
        sd = ckpt.optimizer_state_dict()
        if len(sd["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"{where} has {len(sd['param_groups'])} optimizer param groups, expected "
                             f"{len(self.optimizer.param_groups)}")
        for saved, current in zip(sd["param_groups"], self.optimizer.param_groups):
            # this run's implementation flags and the config's hyper-parameters win
            for key in ("fused", "foreach", "capturable", "differentiable", "betas", "weight_decay", "lr"):
                if key in current:
                    saved[key] = current[key]
        try:
            self.optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{where}: optimizer state does not fit this model: {e}") from None
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])

        self.step = int(meta["step"])
        self.epoch, self.index = int(meta["epoch"]), int(meta["index"])
        self.best_metric, self.best_step = meta.get("best_metric"), meta.get("best_step")
        self.last_val = meta.get("last_val")
        self._loss_ema = torch.tensor(float(meta.get("loss_ema", 0.0)), device=self.device)
        self._loss_ema_count = int(meta.get("loss_ema_count", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.elapsed_before = float(meta.get("elapsed", 0.0))
        self._perm_epoch = None
        ckpt.restore_rng()  # rank 0's dropout stream: the checkpoint holds no other
        if self.is_main:
            self.log.truncate(self.step)
        else:  # a stream of its own, from the step (so dropout on ranks > 0 is not resumed bit for bit)
            torch.manual_seed(_dropout_seed(self.config.seed, self.rank, self.step))
        self._resumed_from = ckpt.path
        return self.step

    def plot_loss(self) -> Path | None:
        """``out_dir/loss.png`` from the logged rows (rank 0 only; None elsewhere)."""
        return self.log.plot()

    def _write_config(self) -> None:
        from .version import __version__

        mc = getattr(self.model, "config", None)
        d = {"model_config": mc.to_dict() if hasattr(mc, "to_dict") else None,
             "diffusion": self.process.to_dict(), "train_config": self.config.to_dict(),
             "precision": self.precision, "device": str(self.device), "world_size": self.world_size,
             "fastddpm_version": __version__,
             "torch_version": torch.__version__}
        write_text_atomic(self.out_dir / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")

    def _elapsed(self) -> float:
        start = getattr(self, "_t_start", None)
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    # -- the loop --------------------------------------------------------------------------
    def _check_finite(self, bad_step: torch.Tensor, run: torch.Tensor) -> None:
        """Raise if a step was not finite (``nonfinite='error'``: ``bad_step`` >= 0) or if too many in a
        row were skipped (``nonfinite='skip'``: ``run``, the longest run of skipped steps)."""
        s = int(bad_step)
        last = self.latest_checkpoint(self.out_dir)
        last = str(last) if last else "none"
        if s >= 0:
            raise FloatingPointError(
                f"non-finite training loss at step {s}; training stopped and no checkpoint was written for it "
                f"(last checkpoint: {last}). Try a lower lr, grad_clip, or mixed_precision='no', or "
                f"nonfinite='skip' to leave such steps out.")
        if int(run) >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"{int(run)} training steps in a row (up to step {self.step}) had a non-finite loss or gradient "
                f"and were skipped: the run has diverged (last checkpoint: {last}). Try a lower lr, grad_clip, "
                f"or mixed_precision='no'.")

    def train(self) -> dict:
        """Train up to ``config.steps``; returns the final metrics.

        SIGINT (Ctrl-C) or SIGTERM in a single process: the step under way is finished, a checkpoint
        written and the metrics returned early, with ``stopped_by`` the signal's name (None after a
        full run); a second signal raises ``SystemExit(128 + signum)`` at once.

        :raises FloatingPointError: a non-finite loss (named by step), before any checkpoint holds it.
        :raises RunDirInUseError: another trainer (in any process) is writing in ``out_dir``.
        """
        if self.is_main:
            self._lock.acquire()
        try:
            return self._train()
        finally:
            self._lock.release()

    def _train(self) -> dict:
        c = self.config
        if self.step == 0 and self._resumed_from is None:
            if self.checkpoints_in(self.out_dir):
                raise ValueError(f"out_dir {str(self.out_dir)!r} already holds checkpoints of a run: pass "
                                 f"resume=True (--resume on the command line) to continue it, or choose another "
                                 f"out_dir")
            # dropout draws from the global RNG; rank 0's state is checkpointed
            torch.manual_seed(c.seed if self.is_main else _dropout_seed(c.seed, self.rank, 0))
            self.log.start()
        if self.is_main:
            self._write_config()

        device = self.device
        self._t_start = time.perf_counter()
        bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), device=device)
        norm_sum = torch.zeros((), device=device)
        # nonfinite='skip': steps taken in this window, current and longest run of skipped steps
        taken = torch.zeros((), dtype=torch.int64, device=device)
        run = torch.zeros((), dtype=torch.int64, device=device)
        longest = torch.zeros((), dtype=torch.int64, device=device)
        window, t_window = 0, time.perf_counter()
        t_saved = t_window  # when the last checkpoint was written (checkpoint_minutes)
        last_row: dict = {}
        last_ckpt: Path | None = None
        has_val = self.val_indices.numel() > 0
        bar = tqdm(total=c.steps, initial=self.step, disable=not (self.progress and self.is_main), desc="training",
                   unit="step",
                   dynamic_ncols=True)
        # SIGINT/SIGTERM: finish the step, checkpoint, return (one process only: ranks would stop at other steps)
        stopper = StopOnSignal(enabled=self.world_size == 1)
        try:
            with stopper:
                while self.step < c.steps:
                    step = self.step
                    stopper.doing = f"step {step + 1}"
                    loss, grad_norm, ok = self._train_step(step)
                    self.step = done = step + 1
                    # device-side bookkeeping: no host synchronisation
                    if ok is None:
                        finite = torch.isfinite(loss)
                        bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, done))
                        loss_sum += loss
                        norm_sum += grad_norm.float()
                        self._loss_ema.lerp_(loss, 1.0 - LOSS_EMA_BETA)
                    else:  # a skipped step counts nowhere
                        loss_sum += torch.where(ok, loss, 0.0)
                        norm_sum += torch.where(ok, grad_norm.float(), 0.0)
                        taken += ok
                        run.copy_(torch.where(ok, 0, run + 1))
                        torch.maximum(longest, run, out=longest)
                        self._loss_ema.lerp_(torch.where(ok, loss, self._loss_ema), 1.0 - LOSS_EMA_BETA)
                    self._loss_ema_count += 1
                    window += 1
                    bar.update(1)

                    last = done == c.steps
                    stop = stopper.received is not None
                    # time-based checkpoints: rank 0's clock decides (other ranks write nothing, and nothing
                    # below is collective but validation, which keeps to its step schedule)
                    overdue = bool(c.checkpoint_minutes) and time.perf_counter() - t_saved >= 60 * c.checkpoint_minutes
                    do_ckpt = (c.checkpoint_every and done % c.checkpoint_every == 0) or last or stop or overdue
                    do_log = done % c.log_every == 0 or do_ckpt
                    do_val = has_val and ((c.val_every and done % c.val_every == 0) or last)
                    do_sample = c.sample_every and (done % c.sample_every == 0 or last)
                    if not (do_log or do_val or do_ckpt or do_sample):
                        continue

                    self._check_finite(bad_step, longest)  # never validate, sample or save a poisoned model
                    now = time.perf_counter()
                    kept = window if ok is None else int(taken)
                    self.skipped_steps += window - kept
                    row = {"step": done, "loss": float(loss_sum) / kept if kept else None, "lr": self.lr_at(step),
                           "grad_norm": float(norm_sum) / kept if kept else None, "val_loss": None,
                           "val_loss_ema": None,
                           "images_per_s": window * c.effective_batch_size / max(now - t_window, 1e-9),
                           "elapsed": self._elapsed(), "skipped": window - kept}
                    loss_sum.zero_()
                    norm_sum.zero_()
                    taken.zero_()
                    window, t_window = 0, now
                    if do_val:
                        self.last_val = self.validate()
                        row.update(self.last_val)
                    self.log.append(row)
                    last_row = row
                    bar.set_postfix(loss=f"{row['loss']:.4f}" if kept else "skipped",
                                    **({"val": f"{row['val_loss']:.4f}"} if do_val else {}))
                    if do_sample and self.is_main:
                        self.save_samples(done)
                    # best: by validation loss where validated, else by smoothed train loss at checkpoints
                    metric = row["val_loss"] if do_val else (self.smoothed_loss() if not has_val and do_ckpt else None)
                    improved = self._improves(metric)  # decided first, so the step checkpoint records it
                    if do_ckpt:
                        last_ckpt = self._checkpoint()
                        self.plot_loss()
                        t_saved = time.perf_counter()
                    if improved:
                        self.save(self.checkpoint_dir / "best.safetensors")
                    t_window = time.perf_counter()  # do not count validation, samples and saving as training time
                    if stop:
                        break
        finally:
            bar.close()
            self.elapsed_before = self._elapsed()
            self._t_start = None
        if self.world_size > 1:
            dist.barrier()  # every rank returns once rank 0's last checkpoint is on disk
        return {
            "step": self.step,
            "loss": last_row.get("loss"),
            "smoothed_loss": self.smoothed_loss(),
            "val_loss": (self.last_val or {}).get("val_loss"),
            "val_loss_ema": (self.last_val or {}).get("val_loss_ema"),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "lr": last_row.get("lr"),
            "grad_norm": last_row.get("grad_norm"),
            "images_per_s": last_row.get("images_per_s"),
            "skipped_steps": self.skipped_steps,
            "elapsed": self.elapsed_before,
            "checkpoint": str(last_ckpt or self.latest_checkpoint(self.out_dir) or ""),
            "stopped_by": stopper.received,
        }

    def smoothed_loss(self) -> float | None:
        """Bias-corrected exponential moving average of the train loss (None before any step)."""
        if self._loss_ema_count == 0:
            return None
        return float(self._loss_ema) / (1.0 - LOSS_EMA_BETA ** self._loss_ema_count)
