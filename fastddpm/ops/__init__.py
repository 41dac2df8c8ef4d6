"""The op subsystem: every fused op, the one registry that picks its backend, the reference math.

Where things are:

* ``fastddpm.ops.dispatch``: the ops as callers use them (``q_sample``, ``diffusion_loss``,
  ``ddpm_step``, ``multistep_step``, ``attention``): argument checks, then the backend; and
  ``dynamic_threshold``, the per-sample bounds the step ops' ``threshold`` takes (reference math);
* ``fastddpm.ops.registry``: the one registry: which backend runs an op per (op, device,
  dtype), ``FASTDDPM_BACKEND`` and the scoped ``use_backend``, and ``implementation(op,
  backend)`` for the in-place kernels the sampler engine replays (``ddpm_step_``,
  ``multistep_step_``);
* ``fastddpm.ops.reference``: the pure-PyTorch math, the single source of truth;
* ``fastddpm.ops.schemas``: the one schema table (``schemas.def``), which the C++ library
  (``csrc/module.cpp``) and the Triton registration (``kernels/_library.py``) are defined from;
* ``fastddpm.ops.fakes`` and ``fastddpm.ops.autograd``: the fake implementations and the
  autograd formulas, registered for both compiled namespaces (``fastddpm``, ``fastddpm_triton``);
* ``fastddpm.ops.cpp``: the ``cpp`` backend adapter over the extension ``fastddpm._C``
  (``csrc/``); the ``triton`` backend is ``fastddpm.kernels.ops`` (``kernels/``).

The names of the modes (predictions, losses...) are ``fastddpm.modes``'s.
Everything public is re-exported here: ``from fastddpm import ops; ops.ddpm_step(...)``.
"""
from __future__ import annotations

from . import reference
from .dispatch import attention, ddpm_step, diffusion_loss, dynamic_threshold, multistep_step, q_sample
from .registry import (BACKENDS, KERNELS, OPS, available_backends, implementation, load_error, resolve,
                       select_backend, unsupported, use_backend)

__all__ = ["BACKENDS", "OPS", "KERNELS", "q_sample", "diffusion_loss", "ddpm_step", "multistep_step", "attention",
           "dynamic_threshold", "select_backend", "use_backend", "available_backends", "load_error", "unsupported",
           "resolve", "implementation", "reference"]
