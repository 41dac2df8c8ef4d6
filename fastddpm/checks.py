"""Input validation with messages that name the argument and what was expected.

These read metadata only (shape, dtype, device), except the ``*_values``
checks, which read tensor values and so synchronise with a GPU: they belong
at API boundaries, never in a hot loop.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_int(v) -> bool:
    """A Python int that is not a bool (``True`` is an ``int`` to ``isinstance``)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_float_dtype(name: str, dtype) -> None:
    """``dtype`` is one of :data:`FLOAT_DTYPES` (a model or sample dtype)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")


def check_sample_args(n, sample_offset, batch_size, callback) -> None:
    """The arguments every sampler (the eager loop, the engine) takes, checked once for both.

    :param n: number of images: a positive int.
    :param sample_offset: global index of the first sample: a non-negative int.
    :param batch_size: samples per batch: None or a positive int.
    :param callback: None or ``callback(i, t, x)``.
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not is_int(sample_offset) or sample_offset < 0:
        raise ValueError(f"sample_offset must be a non-negative int, got {sample_offset!r}")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(i, t, x)")


def check_tensor(name: str, x, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | None = None,
                 min_ndim: int | None = None, shape=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on {torch.device(device)}, got {x.device}")
    return x


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def check_timesteps(name: str, t, n: int, num_timesteps: int, device) -> torch.Tensor:
    """Turn an int or int tensor into an int64 ``[n]`` tensor, checking the range."""
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an int64 tensor, got bool")
    if isinstance(t, int):
        t = torch.full((n,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.ndim == 0:
        t = t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        raise ValueError(f"{name} must lie in [0, {num_timesteps - 1}], got values in [{int(t.min())}, {int(t.max())}]")
    return t


def check_finite_values(name: str, x: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(f"{name} has {bad} non-finite values (NaN or inf)")
    return x


# A trained model predicts noise, x0 or v: values of a few units.  An output beyond this (or not
# finite) means a diverged model, whose images the x0 clip would still keep finite.
OUTPUT_LIMIT = 1e4


def watch_output(flag: torch.Tensor, out: torch.Tensor) -> None:
    """Raise the 0-dim bool ``flag`` in place, on the device (no synchronisation; a CUDA graph
    can hold it), if ``out`` has a value not finite or beyond ``OUTPUT_LIMIT``."""
    flag |= ~(out.abs() <= OUTPUT_LIMIT).all()  # NaN compares False: caught too


def check_output_flag(flag: torch.Tensor) -> None:
    """After sampling: refuse the images if ``watch_output`` raised ``flag`` (one read-back)."""
    if bool(flag):
        raise FloatingPointError(f"the model gave outputs that are not finite or beyond ±{OUTPUT_LIMIT:g} while "
                                 f"sampling: the images would look finite but be wrong, so none are returned "
                                 f"(a diverged checkpoint? try an earlier one, or the weights without EMA)")
