"""The one registry of the fused ops: which backend runs an op, per (op, device, dtype).

Backends: ``reference`` (pure PyTorch, ``fastddpm.ops.reference``, always there),
``cpp`` (the compiled extension, adapter ``fastddpm.ops.cpp``, CPU and CUDA) and
``triton`` (``fastddpm.kernels.ops``, CUDA, or CPU under ``TRITON_INTERPRET=1``).
A backend module exposes ``IMPLS = {kernel_name: fn}`` and ``unsupported(kernel_name,
device, dtype) -> str | None`` (a reason, or None when it can run).  A backend is
loaded by name the first time it is asked for (a plugin load: the backends import
the ops' fakes, never this module).

Ops and the kernel each backend provides for them (``KERNELS``): the functional
``multistep_step`` runs the in-place ``multistep_step_`` kernel on a copy of ``x``;
every other op is its own kernel.  The reference has no kernels: ``implementation``
returns None for it and ``fastddpm.ops.dispatch`` runs ``fastddpm.ops.reference``.

Choosing a backend, two ways only:

* ``FASTDDPM_BACKEND=reference|cpp|triton`` in the environment forces one for the
  process; ``use_backend(name)`` forces one for the calls inside a block (this
  thread), overriding the environment;
* otherwise the first available of ``triton, cpp, reference`` on CUDA and
  ``cpp, reference`` on CPU, with one warning when a fast backend that should be
  there failed to load.

A forced backend that cannot run the op raises.  (The op functions' ``backend=``
argument goes through ``resolve``, which is the same as forcing it for that one call;
``engine.make_plan`` asks ``unsupported`` and raises a ``ValueError`` of its own.)

The functions here read metadata only (no device synchronisation), so they are
safe inside the sampling loop and a CUDA graph.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

import torch

__all__ = ["BACKENDS", "OPS", "KERNELS", "select_backend", "use_backend", "available_backends", "load_error",
           "unsupported", "resolve", "implementation"]

BACKENDS = ("reference", "cpp", "triton")
# op -> the kernel that a fast backend registers for it
KERNELS = {"q_sample": "q_sample", "diffusion_loss": "diffusion_loss", "ddpm_step": "ddpm_step",
           "ddpm_step_": "ddpm_step_", "multistep_step": "multistep_step_", "multistep_step_": "multistep_step_",
           "attention": "attention"}
OPS = tuple(KERNELS)
BACKEND_MODULES = {"cpp": "fastddpm.ops.cpp", "triton": "fastddpm.kernels.ops"}
AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_warned: set = set()
_local = threading.local()


def _backend_module(name: str):
    """The backend's module, or None (reason kept in ``_load_errors``)."""
    if name in _loaded or name in _load_errors:
        return _loaded.get(name)
    module_name = BACKEND_MODULES[name]
    try:
        _loaded[name] = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            _load_errors[name] = "not part of this installation"
        else:
            _load_errors[name] = f"failed to load: {e}"
    except Exception as e:  # a broken build must not break the package
        _load_errors[name] = f"failed to load: {type(e).__name__}: {e}"
    return _loaded.get(name)


def _check_op(op: str) -> str:
    if op not in KERNELS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return KERNELS[op]


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def unsupported(backend: str, op: str, device, dtype: torch.dtype, *, head_dim: int | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` for tensors on ``device`` of ``dtype`` (for
    ``attention``, with heads of ``head_dim`` channels if given), or None when it can."""
    _check_backend(backend)
    kernel = _check_op(op)
    if backend == "reference":
        return None
    mod = _backend_module(backend)
    if mod is None:
        return _load_errors[backend]
    if kernel not in mod.IMPLS:
        return f"has no {op}"
    device = torch.device(device)
    if head_dim is not None:  # attention: the kernels' limits depend on the head dim too
        return mod.unsupported(kernel, device, dtype, head_dim=head_dim)
    return mod.unsupported(kernel, device, dtype)


def _forced() -> str | None:
    name = getattr(_local, "backend", None) or os.environ.get("FASTDDPM_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTDDPM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend for the ops called inside the block, in this thread (None: automatic);
    it overrides ``FASTDDPM_BACKEND``."""
    if name is not None:
        _check_backend(name)
    old = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = old


def select_backend(op: str, device: torch.device, dtype: torch.dtype, *, head_dim: int | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``
    (for ``attention``, with heads of ``head_dim`` channels if given)."""
    device = torch.device(device)
    forced = _forced()
    if forced is not None:
        reason = unsupported(forced, op, device, dtype, head_dim=head_dim)
        if reason is not None:
            raise RuntimeError(f"backend {forced!r} was requested for {op} on {device} ({dtype}) but {reason}")
        return forced
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        reason = unsupported(name, op, device, dtype, head_dim=head_dim)
        if reason is None:
            return name
        if name != "reference" and reason.startswith("failed to load") and name not in _warned:
            _warned.add(name)
            warnings.warn(f"fastddpm: backend {name!r} {reason}; falling back", RuntimeWarning, stacklevel=3)
    return "reference"


def load_error(name: str) -> str | None:
    """Why backend ``name`` cannot be loaded here (None: it loads, or it is the reference)."""
    _check_backend(name)
    if name == "reference" or _backend_module(name) is not None:
        return None
    return _load_errors[name]


def available_backends(op: str, device, dtype=torch.float32, *, head_dim: int | None = None) -> list[str]:
    """The backends that can run ``op`` here, in ``BACKENDS`` order."""
    device = torch.device(device)
    return [b for b in BACKENDS if unsupported(b, op, device, dtype, head_dim=head_dim) is None]


def resolve(op: str, device_type: str, dtype: torch.dtype, backend: str | None,
            head_dim: int | None = None) -> str:
    """The backend name for ``op``: ``backend`` if given (raising if it cannot run
    the op), else ``select_backend``'s choice.  Under ``torch.compile`` this runs
    eagerly at trace time and its result is a constant of the graph (module
    imports and environment reads cannot be traced), so a compiled function keeps
    the backend it was compiled with."""
    device = torch.device(device_type)
    if backend is None:
        return select_backend(op, device, dtype, head_dim=head_dim)
    reason = unsupported(backend, op, device, dtype, head_dim=head_dim)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} was requested for {op} on {device} ({dtype}) but {reason}")
    return backend


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (about 1 s, and
# triton with it) at `import fastddpm`; test_dispatch_traces_under_torch_compile_fullgraph guards it.
resolve._dynamo_marked_constant = True


def implementation(op: str, backend: str):
    """The kernel of a fast ``backend`` for ``op`` (for ``ddpm_step_``:
    ``(x, out, step, coefs, rng, clip, model_input)``; for ``multistep_step_``:
    ``(x, out, history, step, table, rng, clip, stochastic, model_input)``), or None for the
    reference.  Raises if the backend cannot be loaded or lacks the op."""
    kernel = _check_op(op)
    _check_backend(backend)
    if backend == "reference":
        return None
    mod = _backend_module(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r} {_load_errors[backend]}")
    if kernel not in mod.IMPLS:
        raise RuntimeError(f"backend {backend!r} has no {op}")
    return mod.IMPLS[kernel]
