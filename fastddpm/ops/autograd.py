"""The autograd formulas of the fused ops, one registration per op, used by every backend.

``diffusion_loss``: the gradient goes to ``model_output`` only; the backward is another
fused op of the same backend (``<namespace>::diffusion_loss_backward``), which regenerates
the noise instead of storing it.  (``attention``'s backward is the Triton backend's alone:
the other backends run ``F.scaled_dot_product_attention``, which has its own.)
"""
from __future__ import annotations

import torch

__all__ = ["register_diffusion_loss_autograd"]

_DIFFUSION_LOSS_TENSORS = 6  # model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights
_DIFFUSION_LOSS_ARGS = 11


def register_diffusion_loss_autograd(namespace: str) -> None:
    """Register the backward of ``<namespace>::diffusion_loss`` (the ``fastddpm`` C++ ops or
    the ``fastddpm_triton`` ones)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:_DIFFUSION_LOSS_TENSORS])
        ctx.scalars = inputs[_DIFFUSION_LOSS_TENSORS:]  # seed, sample_offset, prediction, loss_type, huber_delta

    def backward(ctx, grad):
        grad_model_output = None
        if ctx.needs_input_grad[0]:
            backward_op = getattr(torch.ops, namespace).diffusion_loss_backward
            grad_model_output = backward_op(grad.float().contiguous(), *ctx.saved_tensors, *ctx.scalars)
        return (grad_model_output,) + (None,) * (_DIFFUSION_LOSS_ARGS - 1)

    torch.library.register_autograd(f"{namespace}::diffusion_loss", backward, setup_context=setup_context)
