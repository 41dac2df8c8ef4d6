"""The training loss, forward and backward, with the noise regenerated in
both kernels instead of stored.

``loss = mean_b( weights[t_b] * mean_j loss(out_bj, target_bj) )`` where the
target is ``eps``, ``x0`` or ``v = sqrt(abar) eps - sqrt(1-abar) x0``
(Salimans & Ho 2022) and ``loss`` is ``F.mse_loss`` / ``F.l1_loss`` /
``F.huber_loss(delta)`` elementwise.  The forward kernel writes one partial sum
per (sample, block), already scaled by ``weights[t] / (n * numel)``; their sum
is the loss, in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.modes import LOSSES, PREDICTIONS
from fastddpm.noise import check_noise_capacity

from fastddpm.ops import fakes
from fastddpm.ops.autograd import register_diffusion_loss_autograd

from ._library import ELEMENTWISE_WARPS, NAMESPACE, elementwise_block, elementwise_grid, launch, op
from .noise import contract_offsets

__all__ = ["diffusion_loss", "diffusion_loss_backward"]

# the kernels' codes: the position in fastddpm.modes (as csrc/fused_math.h's enums)
PREDICTION_CODE = {name: code for code, name in enumerate(PREDICTIONS)}
LOSS_CODE = {name: code for code, name in enumerate(LOSSES)}


@triton.jit
def _diff_and_scale(out_ptr, x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr, sqrt_one_minus_alphas_cumprod_ptr,
                    weights_ptr, numel, seed, sample_offset, inv_count, PREDICTION: tl.constexpr, BLOCK: tl.constexpr):
    """``out - target`` over this program's block, its mask and the sample's
    scale ``weights[t] / (n * numel)``."""
    row = tl.program_id(0)
    element = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = element < numel
    base = row.to(tl.int64) * numel
    t = tl.load(t_ptr + row * t_stride)
    out = tl.load(out_ptr + base + element, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + base + element, mask=mask, other=0.0).to(tl.float32)
    if PREDICTION == 1:
        target = x0
    else:
        sample = row.to(tl.int64) + sample_offset
        eps = tl.randn(seed, contract_offsets(sample, element.to(tl.int64)))
        if PREDICTION == 0:
            target = eps
        else:
            sqrt_alphas_cumprod_t = tl.load(sqrt_alphas_cumprod_ptr + t)
            sqrt_one_minus_alphas_cumprod_t = tl.load(sqrt_one_minus_alphas_cumprod_ptr + t)
            target = sqrt_alphas_cumprod_t * eps - sqrt_one_minus_alphas_cumprod_t * x0
    scale = tl.load(weights_ptr + t) * inv_count
    return out - target, mask, scale


@triton.jit
def _loss_fwd_kernel(out_ptr, x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr, sqrt_one_minus_alphas_cumprod_ptr,
                     weights_ptr, partial_ptr, numel, seed, sample_offset, inv_count, huber_delta,
                     PREDICTION: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    diff, mask, scale = _diff_and_scale(out_ptr, x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr,
                                        sqrt_one_minus_alphas_cumprod_ptr, weights_ptr, numel, seed, sample_offset,
                                        inv_count, PREDICTION, BLOCK)
    if LOSS == 0:
        loss = diff * diff
    elif LOSS == 1:
        loss = tl.abs(diff)
    else:
        ad = tl.abs(diff)
        loss = tl.where(ad < huber_delta, 0.5 * diff * diff, huber_delta * (ad - 0.5 * huber_delta))
    loss = tl.where(mask, loss, 0.0)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(loss, axis=0) * scale)


@triton.jit
def _loss_bwd_kernel(grad_loss_ptr, out_ptr, x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr,
                     sqrt_one_minus_alphas_cumprod_ptr, weights_ptr, grad_out_ptr, numel, seed, sample_offset,
                     inv_count, huber_delta, PREDICTION: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    diff, mask, scale = _diff_and_scale(out_ptr, x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr,
                                        sqrt_one_minus_alphas_cumprod_ptr, weights_ptr, numel, seed, sample_offset,
                                        inv_count, PREDICTION, BLOCK)
    # d loss / d out, as PyTorch's mse/l1/huber backward (sign(0) = 0)
    if LOSS == 0:
        dloss = 2.0 * diff
    elif LOSS == 1:
        dloss = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        dloss = tl.minimum(tl.maximum(diff, -huber_delta), huber_delta)
    grad = dloss * (scale * tl.load(grad_loss_ptr))
    base = tl.program_id(0).to(tl.int64) * numel
    element = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(grad_out_ptr + base + element, grad.to(grad_out_ptr.dtype.element_ty), mask=mask)


def _launch_args(model_output, x0, t, seed, sample_offset, prediction, loss_type):
    if prediction not in PREDICTION_CODE:
        raise ValueError(f"prediction must be one of {tuple(PREDICTION_CODE)}, got {prediction!r}")
    if loss_type not in LOSS_CODE:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_CODE)}, got {loss_type!r}")
    n = model_output.shape[0]
    numel = model_output.numel() // n if n else 0
    check_noise_capacity(numel, 1, sample_offset + n - 1)
    block = elementwise_block(numel)
    return n, numel, block, dict(PREDICTION=PREDICTION_CODE[prediction], LOSS=LOSS_CODE[loss_type], BLOCK=block,
                                 num_warps=ELEMENTWISE_WARPS)


@op("diffusion_loss", fake=fakes.diffusion_loss)
def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                   sqrt_one_minus_alphas_cumprod: torch.Tensor, weights: torch.Tensor, seed: int, sample_offset: int,
                   prediction: str, loss_type: str, huber_delta: float) -> torch.Tensor:
    """0-dim float32 loss; differentiable w.r.t. ``model_output``."""
    n, numel, block, meta = _launch_args(model_output, x0, t, seed, sample_offset, prediction, loss_type)
    grid = elementwise_grid(n, numel, block)
    partial = torch.empty(grid, dtype=torch.float32, device=model_output.device)
    if partial.numel() == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=model_output.device)
    launch(_loss_fwd_kernel)[grid](
        model_output.contiguous(), x0.contiguous(), t, t.stride(0), sqrt_alphas_cumprod.contiguous(),
        sqrt_one_minus_alphas_cumprod.contiguous(), weights.contiguous(), partial, numel, seed, sample_offset,
        1.0 / (n * numel), huber_delta, **meta)
    return partial.sum()


@op("diffusion_loss_backward", fake=fakes.diffusion_loss_backward)
def diffusion_loss_backward(grad: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                            sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
                            weights: torch.Tensor, seed: int, sample_offset: int, prediction: str, loss_type: str,
                            huber_delta: float) -> torch.Tensor:
    """``d loss / d model_output`` for the 0-dim upstream ``grad``, in ``model_output``'s dtype."""
    n, numel, block, meta = _launch_args(model_output, x0, t, seed, sample_offset, prediction, loss_type)
    grad_out = torch.empty_like(model_output, memory_format=torch.contiguous_format)
    if grad_out.numel() == 0:
        return grad_out
    launch(_loss_bwd_kernel)[elementwise_grid(n, numel, block)](
        grad, model_output.contiguous(), x0.contiguous(), t, t.stride(0), sqrt_alphas_cumprod.contiguous(),
        sqrt_one_minus_alphas_cumprod.contiguous(), weights.contiguous(), grad_out, numel, seed, sample_offset,
        1.0 / (n * numel), huber_delta, **meta)
    return grad_out


register_diffusion_loss_autograd(NAMESPACE)
