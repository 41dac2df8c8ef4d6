"""Forward noising ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. Eq. 4)
with the contract's noise (slot 0) generated in the kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.noise import check_noise_capacity

from fastddpm.ops import fakes

from ._library import ELEMENTWISE_WARPS, elementwise_block, elementwise_grid, launch, op
from .noise import contract_offsets

__all__ = ["q_sample"]


@triton.jit
def _q_sample_kernel(x0_ptr, t_ptr, t_stride, sqrt_alphas_cumprod_ptr, sqrt_one_minus_alphas_cumprod_ptr, x_t_ptr,
                     numel, seed, sample_offset, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    element = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = element < numel
    base = row.to(tl.int64) * numel
    t = tl.load(t_ptr + row * t_stride)
    sqrt_alphas_cumprod_t = tl.load(sqrt_alphas_cumprod_ptr + t)
    sqrt_one_minus_alphas_cumprod_t = tl.load(sqrt_one_minus_alphas_cumprod_ptr + t)
    x0 = tl.load(x0_ptr + base + element, mask=mask, other=0.0).to(tl.float32)
    sample = row.to(tl.int64) + sample_offset
    eps = tl.randn(seed, contract_offsets(sample, element.to(tl.int64)))
    tl.store(x_t_ptr + base + element, sqrt_alphas_cumprod_t * x0 + sqrt_one_minus_alphas_cumprod_t * eps, mask=mask)


@op("q_sample", fake=fakes.q_sample)
def q_sample(x0: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
             sqrt_one_minus_alphas_cumprod: torch.Tensor, seed: int, sample_offset: int) -> torch.Tensor:
    """:param x0: ``[n, ...]`` float; :param t: int64 ``[n]`` (any stride);
    tables float32 ``[T]``.  :return: float32 ``x_t``."""
    n = x0.shape[0]
    numel = x0.numel() // n if n else 0
    check_noise_capacity(numel, 1, sample_offset + n - 1)
    x0 = x0.contiguous()
    x_t = torch.empty(x0.shape, dtype=torch.float32, device=x0.device)
    if x_t.numel() == 0:
        return x_t
    block = elementwise_block(numel)
    launch(_q_sample_kernel)[elementwise_grid(n, numel, block)](
        x0, t, t.stride(0), sqrt_alphas_cumprod.contiguous(), sqrt_one_minus_alphas_cumprod.contiguous(), x_t,
        numel, seed, sample_offset, BLOCK=block, num_warps=ELEMENTWISE_WARPS)
    return x_t
