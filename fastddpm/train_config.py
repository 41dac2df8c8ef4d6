"""How to train: ``TrainConfig``, a frozen, JSON-serialisable dataclass
stored beside every checkpoint."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .checks import is_int
from .config import JsonConfig
from .modes import TRAIN_COMPILE_MODES, TrainCompileMode
from .noise import MAX_SEED

__all__ = ["TrainConfig", "COMPILE_MODES"]

# ``torch.compile`` modes of the training model ("no": eager)
COMPILE_MODES = TRAIN_COMPILE_MODES  # "no" and torch.compile's modes (fastddpm.modes)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """How to train.  Defaults follow Ho et al. (Adam, lr 2e-4, grad clip 1, EMA 0.9999), the
    EMA with a warm-up (``ema_warmup_power``) so that short runs sample well too.

    :param steps: optimizer steps in total (a resumed run continues up to this).
    :param batch_size: examples per micro-batch over all processes (the global micro-batch: with W
        ranks each computes ``batch_size / W`` of them, so it must be divisible by W); an optimizer
        step sees ``batch_size * grad_accum``.
    :param lr: peak learning rate (after ``warmup_steps`` of linear warmup).
    :param optimizer: ``adam`` or ``adamw`` (decoupled ``weight_decay``).
    :param grad_clip: max global gradient norm; None disables clipping.
    :param grad_accum: micro-batches per optimizer step.
    :param ema_decay: ``ema = decay * ema + (1 - decay) * param`` after every step; the decay once
        warmed up (the cap of the warm-up schedule).
    :param ema_start: for the first ``ema_start`` steps the EMA copies the model.
    :param ema_warmup_power: the EMA warm-up: step ``k`` counted from ``ema_start`` uses the decay
        ``min(ema_decay, 1 - (1 + k) ** -ema_warmup_power)`` (the inverse-gamma schedule of ema-pytorch
        and diffusers' ``EMAModel``, ``inv_gamma=1``): 0 at the first step, 0.986 at step 300, 0.999 at
        10k with 3/4, so a short run's EMA is an average of its recent weights, not the random start.
        None: ``ema_decay`` from the first step (Ho et al.).
    :param mixed_precision: ``auto`` (bf16 on a CUDA GPU that has it, else ``no``), ``no``, ``bf16``, ``fp16``.
    :param channels_last: the model's weights (and so its activations) in channels_last, the layout
        tensor cores want under bf16/fp16; None: on a CUDA GPU with mixed precision and an image model.
    :param compile: ``torch.compile`` the model for the training steps with this mode (``no``: eager).
        ``max-autotune-no-cudagraphs`` tunes kernels without Inductor's CUDA graphs; the first steps
        compile (minutes for ``ddpm_cifar10``).  The EMA copy, validation and checkpoints use the eager module.
    :param nonfinite: what a non-finite loss or gradient norm does: ``error`` stops training
        with a ``FloatingPointError`` naming the step (checked every ``log_every`` steps, before
        any validation, sample or checkpoint, so none holds the poisoned weights); ``skip``
        leaves the weights, optimizer state and EMA as they were (on the device, no synchronisation
        with a fused optimizer), counts the step in the ``skipped`` log column and goes on (an
        error still if every step of a logging window is skipped).
    :param seed: seeds the data order, timesteps, flips, noise and dropout; the initial weights are the
        model's, built by the caller: ``create_model(preset, seed=seed)`` makes them reproducible too (the
        command line does so with ``--seed``).
    :param random_flip: horizontal flips with probability 1/2.
    :param class_cond: train a class-conditional model (``create_model(..., num_classes=K)``, or a
        diffusers ``UNet2DModel(num_class_embeds=K + 1)``) on the dataset's labels.
    :param cond_drop: in a class-conditional run, the probability that an example's label is replaced
        by the null class (classifier-free guidance, Ho & Salimans 2022: 0.1-0.2), drawn from the step's
        seeded stream, so a resumed run drops the same labels.
    :param val_fraction: share of the dataset held out for the validation loss (0: none).
    :param val_every: validate every this many steps (0: only at the end).
    :param sample_every: save an EMA sample grid every this many steps (0: never).
    :param sample_n: images in a sample grid.
    :param sample_steps: sampling steps (None: the full process).
    :param checkpoint_every: checkpoint every this many steps (0: only at the end).
    :param checkpoint_minutes: also checkpoint when this many minutes of training passed since the
        last checkpoint (0: no time-based checkpoints), so a crash loses at most that much work.
    :param keep_last: step checkpoints kept.
    :param keep_best: keep ``best.safetensors``.
    :param log_every: read metrics back and log them every this many steps.
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    ema_start: int = 0
    ema_warmup_power: float | None = 0.75
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    compile: TrainCompileMode = "no"
    nonfinite: Literal["error", "skip"] = "error"
    seed: int = 0
    random_flip: bool = True
    class_cond: bool = False
    cond_drop: float = 0.1
    val_fraction: float = 0.0
    val_every: int = 500
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int | None = None
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 0.0
    keep_last: int = 2
    keep_best: bool = True
    log_every: int = 50

    _label: ClassVar[str] = "train"

    def __post_init__(self):
        if isinstance(self.adam_betas, list):
            object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        for name in ("steps", "batch_size", "grad_accum", "sample_n", "keep_last", "log_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "ema_start", "val_every", "sample_every", "checkpoint_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not _is_num(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            raise ValueError(f"checkpoint_minutes must be a float >= 0, got {self.checkpoint_minutes!r}")
        if not _is_num(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a float > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a float >= 0, got {self.weight_decay!r}")
        b = self.adam_betas
        if not (isinstance(b, tuple) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)):
            raise ValueError(f"adam_betas must be two floats in [0, 1), got {b!r}")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be a float > 0 or None, got {self.grad_clip!r}")
        if not _is_num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be a float in [0, 1), got {self.ema_decay!r}")
        power = self.ema_warmup_power
        if power is not None and (not _is_num(power) or power <= 0):
            raise ValueError(f"ema_warmup_power must be a float > 0 or None (no warm-up), got {self.ema_warmup_power!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16', "
                             f"got {self.mixed_precision!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool or None (automatic), got {self.channels_last!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {self.compile!r}")
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {self.nonfinite!r}")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        for name in ("random_flip", "keep_best", "class_cond"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_num(self.cond_drop) or not 0 <= self.cond_drop < 1:
            raise ValueError(f"cond_drop must be a float in [0, 1), got {self.cond_drop!r}")
        if not _is_num(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be a float in [0, 1), got {self.val_fraction!r}")
        if self.sample_steps is not None and (not is_int(self.sample_steps) or self.sample_steps < 1):
            raise ValueError(f"sample_steps must be a positive int or None, got {self.sample_steps!r}")

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay after optimizer step ``step`` (0-based): 0 (a copy) before ``ema_start``, then
        the warm-up schedule capped by ``ema_decay`` (see ``ema_warmup_power``)."""
        k = step - self.ema_start
        if k < 0:
            return 0.0
        if self.ema_warmup_power is None:
            return self.ema_decay
        return min(self.ema_decay, 1.0 - (1.0 + k) ** -self.ema_warmup_power)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum
