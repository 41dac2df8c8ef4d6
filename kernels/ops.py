"""The ``triton`` backend of the registry (``fastddpm.ops.registry``): ``IMPLS`` and ``unsupported``.

Every entry is a kernel of ``registry.KERNELS``, with the signature ``fastddpm.ops.dispatch``
(and the engine, for the in-place ones) calls it with, and calls a
``torch.ops.fastddpm_triton`` operator (``triton_op`` on a GPU, an opaque
custom op under the interpreter; see ``_library``).  Importing this module
makes no CUDA call.
"""
from __future__ import annotations

import functools

import torch

from fastddpm.checks import FLOAT_DTYPES

from ._library import INTERPRET
from .attention import attention, attention_unsupported
from .ddpm_step import ddpm_step, ddpm_step_
from .diffusion_loss import diffusion_loss
from .multistep_step import multistep_step_
from .q_sample import q_sample

__all__ = ["IMPLS", "unsupported"]

IMPLS = {
    "q_sample": q_sample,
    "diffusion_loss": diffusion_loss,
    "ddpm_step": ddpm_step,
    "ddpm_step_": ddpm_step_,
    "multistep_step_": multistep_step_,  # fastddpm.ops.multistep_step hands it a copy of x
    "attention": attention,
}


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported(op: str, device, dtype: torch.dtype, *, head_dim: int | None = None) -> str | None:
    """Why the Triton kernels cannot run ``op`` on ``device`` for ``dtype`` (for
    attention, with heads of ``head_dim`` channels if given), or None."""
    device = torch.device(device)
    if op not in IMPLS:
        return f"has no {op}"
    if dtype not in FLOAT_DTYPES:
        return f"supports float32, float16 and bfloat16, not {dtype}"
    if op == "attention":
        reason = attention_unsupported(device, dtype, head_dim)
        if reason is not None:
            return reason
    if device.type == "cuda":
        if torch.version.hip is None:
            major, _ = _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
            if major < 7:
                return "Triton needs a GPU of compute capability 7.0 or newer"
            if dtype == torch.bfloat16 and major < 8:
                return "bfloat16 needs a GPU of compute capability 8.0 or newer"
        return None
    if device.type == "cpu" and INTERPRET:
        if dtype == torch.bfloat16:
            return "bfloat16 is not supported by the Triton interpreter"
        return None
    if device.type == "cpu":
        return "Triton runs on CUDA (set TRITON_INTERPRET=1 to interpret on CPU)"
    return f"Triton does not run on {device.type}"
