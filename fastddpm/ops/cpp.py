"""The ``cpp`` backend: the compiled extension ``fastddpm._C`` (``csrc/``).

Importing this module loads the extension, which registers the schemas and
the CPU (and, when built with CUDA, CUDA) implementations of
``torch.ops.fastddpm.*``; it raises ImportError when the extension was not
built, and the registry (``fastddpm.ops.registry``) then falls back to another backend.  Here the ops
get what the C++ side does not declare: a fake implementation each
(``fastddpm.ops.fakes``: shapes only, so ``torch.compile(fullgraph=True)`` and
FakeTensor tracing see one node) and the autograd formula of ``diffusion_loss``
(``fastddpm.ops.autograd``: its backward is another fused op that regenerates
the noise instead of storing it).

Ops (schemas in the one table, ``fastddpm/ops/schemas.def``):

* ``philox_normal(seed, offsets)``: the noise contract alone;
  ``philox4x32(seed, offsets)``: its four Philox words (int64 ``[..., 4]``).
* ``q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, sample_offset)``.
* ``diffusion_loss(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, seed,
  sample_offset, prediction, loss_type, huber_delta)`` and its backward.
* ``ddpm_step(x, model_output, step, coefs, seed, sample_offset, clip_denoised, uncond_output,
  guidance_scale, threshold, known, mask)`` (classifier-free guidance fused: ``uncond_output`` None, or the unconditional
  output, and the step uses ``u + guidance_scale * (c - u)``; the same two arguments on every
  step op, then ``threshold``: None, or dynamic thresholding's float32 ``[n]`` bounds, and the
  x0 prediction is ``clamp(x0_hat, -s, s) / s`` in place of the clip; then, on the three DDPM step
  ops only, ``known, mask``: None, or inpainting's image to keep and its 0/1 mask, float32 of x's
  shape, with a ``[K, 8]`` coefs whose ``ka, kb`` blend ``mask * (ka * known + kb * z1) + (1 -
  mask) * x_prev``, ``z1`` of noise slot ``step + K + 1``); ``ddpm_step_cast(..., model_dtype,
  channels_last, uncond_output, guidance_scale, threshold, known, mask)`` also returns
  ``x_prev`` in the model's dtype/layout; ``ddpm_step_(x, model_output, step, coefs, rng,
  clip_denoised, model_input, uncond_output, guidance_scale, threshold, known, mask)`` (``model_input`` None or a tensor) updates
  ``x`` (and ``model_input``) in
  place, for CUDA graphs: its noise key ``rng`` is an int64 ``[2]`` tensor
  ``(seed, sample_offset)`` on ``x``'s device, read by the kernel, so one
  captured graph serves every seed.  ``step`` is int64 ``[n]`` or a single
  value (0-dim/``[1]``, e.g. a device step counter read by the kernel).
* ``multistep_step_(x, model_output, history, step, table, rng, clip_denoised, stochastic,
  model_input, uncond_output, guidance_scale, threshold)``: one multistep solver step (``reference.multistep_step``) in place: ``x`` becomes
  ``x_next`` and the ``[4, *x.shape]`` history ring advances; ``step`` holds one value; the SDE noise
  (``stochastic``) is slot ``step`` under the key ``rng``, as ``ddpm_step_``'s; ``model_input`` (None
  or a tensor) gets ``x_next`` in its dtype and layout, as ``ddpm_step_``'s.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from .. import _C  # noqa: F401  (registers torch.ops.fastddpm.*; ImportError when not built)
from ..checks import FLOAT_DTYPES
from . import fakes
from .autograd import register_diffusion_loss_autograd

__all__ = ["IMPLS", "unsupported", "has_cuda", "stale_build", "philox_normal", "philox4x32", "q_sample",
           "diffusion_loss", "ddpm_step", "ddpm_step_cast", "ddpm_step_", "multistep_step_"]

_ops = torch.ops.fastddpm

philox_normal = _ops.philox_normal.default
philox4x32 = _ops.philox4x32.default
q_sample = _ops.q_sample.default
diffusion_loss = _ops.diffusion_loss.default
ddpm_step = _ops.ddpm_step.default
ddpm_step_cast = _ops.ddpm_step_cast.default
ddpm_step_ = _ops.ddpm_step_.default
multistep_step_ = _ops.multistep_step_.default

# The kernels of the registry (fastddpm.ops.registry.KERNELS), with the positional signatures
# fastddpm.ops.dispatch and the engine call them with; fastddpm.ops.multistep_step runs
# multistep_step_ on a copy of x.
IMPLS = {"q_sample": q_sample, "diffusion_loss": diffusion_loss, "ddpm_step": ddpm_step, "ddpm_step_": ddpm_step_,
         "multistep_step_": multistep_step_}


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::ddpm_step", "CUDA")


def stale_build(root: Path | None = None) -> str | None:
    """Why the loaded extension was not compiled from the sources of the checkout at ``root``
    (default: the one this package runs from), or None when it was, or when there are no
    sources to compare with (an installed package).  The build records the hash of its
    sources (``csrc/build.py``'s ``source_hash``, ``fastddpm._C.source_hash``)."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    helper = root / "csrc" / "build.py"
    if not helper.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fastddpm_csrc_build", helper)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built, current = getattr(_C, "source_hash", "unknown"), build.source_hash(root)
    if built == current:
        return None
    return (f"fastddpm._C ({_C.__file__}) was built from other sources (hash {built}) than those in {root} "
            f"({current}: csrc/ or the schema table changed since); rebuild it: python setup.py build_ext --inplace "
            "(or make)")


def unsupported(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``op`` cannot run on ``device`` for ``dtype`` (None when it can)."""
    if device.type == "cuda" and not has_cuda():
        return "was built without CUDA"
    if device.type not in ("cpu", "cuda"):
        return f"runs on CPU and CUDA only, not {device.type}"
    if dtype not in FLOAT_DTYPES:
        return f"supports float32, float16 and bfloat16, not {dtype}"
    return None


# -- fake implementations (shapes, dtypes, devices only; shared with the Triton backend) -----------
for _name in fakes.__all__:
    torch.library.register_fake(f"fastddpm::{_name}")(getattr(fakes, _name))


@torch.library.register_fake("fastddpm::philox_normal")
def _philox_normal_fake(seed, offsets):
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


@torch.library.register_fake("fastddpm::philox4x32")
def _philox4x32_fake(seed, offsets):
    return offsets.new_empty((*offsets.shape, 4))


register_diffusion_loss_autograd("fastddpm")

_stale = stale_build()
if _stale is not None:
    warnings.warn(_stale, stacklevel=2)
