"""One multistep solver step (``fastddpm.multistep``) in one elementwise pass, in place::

    D      = a * x + b * out                                # clamped to [-1, 1] if clip_denoised
    E      = D + hx * x                                     # what the ring keeps
    x_corr = u * x + cl * x_last + k0 * D + k1 * H1 + k2 * H2
    x_next = cx * x_corr + p0 * D + p1 * H1 + p2 * H2 + p3 * H3 + cz * z

with the row of the ``[K, 14]`` table (``MULTISTEP_COLUMNS``) picked by the step index, read from a
device tensor in the kernel (one value for the batch), and the ``[4, *x.shape]`` history, a ring of
three and ``x_last = history[3]``: ``H1 = history[(step + 1) % 3]`` (the previous call's ``E``: the
step counts down), ``H2 = history[(step + 2) % 3]``, ``H3 = history[step % 3]``.  The kernel writes
``x_next`` into ``x``, ``E`` into ``history[step % 3]`` and ``x_corr`` into ``history[3]``; every
element reads its own values before writing them.  With ``stochastic`` (the SDE solver) ``z`` is the contract's noise of
slot ``step`` under the key ``rng = (seed, sample_offset)`` (int64 ``[2]`` on the device, as
``ddpm_step_``), skipped where ``cz == 0``.  Optionally the kernel also writes ``x_next`` into
``model_input`` in the model's dtype, contiguous or channels_last (the next model call's input), as
``ddpm_step_`` does.  With classifier-free guidance (``uncond_output`` given) ``out = u + w * (c - u)``
in float32, as ``ddpm_step``'s (a compile-time flag: the unguided kernel is unchanged); with dynamic
thresholding (``threshold``, float32 ``[n]``) ``D = clamp(D, -s, s) / s`` in place of the clip, as
``ddpm_step``'s (``THRESHOLD``, a compile-time flag too).

Op (as the C++ backend's ``torch.ops.fastddpm.multistep_step_``, here ``fastddpm_triton``):
``multistep_step_(x, model_output, history, step, table, rng, clip_denoised, stochastic, model_input,
uncond_output, guidance_scale, threshold)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastddpm.ops import fakes
from fastddpm.noise import check_noise_capacity
from fastddpm.ops.reference import MULTISTEP_HISTORY_SLOTS, MULTISTEP_WIDTH

from ._library import ELEMENTWISE_WARPS, elementwise_block, elementwise_grid, launch, op
from .ddpm_step import (check_guidance, check_rng, check_threshold, denoised, guided_output, model_input_layout,
                        store_model_input)
from .noise import contract_offsets

__all__ = ["multistep_step_", "multistep_step_into"]


@triton.jit
def _multistep_step_kernel(x_ptr, out_ptr, history_ptr, step_ptr, table_ptr, rng_ptr, model_input_ptr, numel, total,
                           channels, spatial, uncond_ptr, guidance_scale, threshold_ptr, CLIP: tl.constexpr,
                           STOCHASTIC: tl.constexpr, WRITE_MODEL_INPUT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           GUIDED: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    element = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = element < numel
    offs = row.to(tl.int64) * numel + element
    step = tl.load(step_ptr).to(tl.int64)
    coef = table_ptr + step * 14  # a row is MULTISTEP_WIDTH (14) floats, checked by the launcher
    a = tl.load(coef)
    b = tl.load(coef + 1)
    u = tl.load(coef + 2)
    cl = tl.load(coef + 3)
    k0 = tl.load(coef + 4)
    k1 = tl.load(coef + 5)
    k2 = tl.load(coef + 6)
    cx = tl.load(coef + 7)
    p0 = tl.load(coef + 8)
    p1 = tl.load(coef + 9)
    p2 = tl.load(coef + 10)
    cz = tl.load(coef + 11)
    p3 = tl.load(coef + 12)
    hx = tl.load(coef + 13)
    # the ring of three (the step counts down): H1 the previous call's E, H2 two back, H3 three back,
    # whose slot step % 3 this step's E then overwrites; x_last after the ring
    h1_ptr = history_ptr + ((step + 1) % 3) * total + offs
    h2_ptr = history_ptr + ((step + 2) % 3) * total + offs
    h3_ptr = history_ptr + (step % 3) * total + offs
    x_last_ptr = history_ptr + 3 * total + offs
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    out = guided_output(out_ptr, uncond_ptr, offs, mask, guidance_scale, GUIDED)
    x_last = tl.load(x_last_ptr, mask=mask, other=0.0)
    h1 = tl.load(h1_ptr, mask=mask, other=0.0)
    h2 = tl.load(h2_ptr, mask=mask, other=0.0)
    h3 = tl.load(h3_ptr, mask=mask, other=0.0)
    d = denoised(a * x + b * out, threshold_ptr, row, CLIP, THRESHOLD)
    x_corr = u * x + cl * x_last + k0 * d + k1 * h1 + k2 * h2
    x_next = cx * x_corr + p0 * d + p1 * h1 + p2 * h2 + p3 * h3
    if STOCHASTIC:
        if cz != 0.0:  # uniform per program: cz * z == 0 exactly, skip Philox
            sample = row.to(tl.int64) + tl.load(rng_ptr + 1)
            z = tl.randn(tl.load(rng_ptr), contract_offsets(sample, step * numel + element))
            x_next = x_next + cz * z
    tl.store(x_ptr + offs, x_next, mask=mask)
    tl.store(h3_ptr, d + hx * x, mask=mask)
    tl.store(x_last_ptr, x_corr, mask=mask)
    if WRITE_MODEL_INPUT:
        store_model_input(model_input_ptr, row.to(tl.int64) * numel, element, x_next, mask, channels, spatial,
                          CHANNELS_LAST)


def multistep_step_into(x, model_output, history, step, table, rng, clip_denoised: bool, stochastic: bool,
                        model_input: torch.Tensor | None = None, *, uncond_output: torch.Tensor | None = None,
                        guidance_scale: float = 1.0, threshold: torch.Tensor | None = None) -> None:
    """Host launcher: validates metadata (no value of a device tensor is read: the step index and the
    key are checked where they are CPU tensors only) and launches.

    :param x: float32 ``[n, ...]`` contiguous, overwritten with ``x_next``.
    :param model_output: ``[n, ...]`` float32/bf16/fp16 (made contiguous).
    :param history: float32 ``[4, n, ...]`` contiguous (``MULTISTEP_HISTORY_SLOTS``), advanced in place.
    :param step: int64 0-dim or ``[1]`` on the device: the row of ``table`` and the noise slot.
    :param table: float32 ``[K, 14]`` (``MULTISTEP_COLUMNS``).
    :param rng: the noise key ``(seed, sample_offset)``, int64 ``[2]`` on x's device.  The host cannot
        check ``sample_offset + n <= 2**32`` then; the caller does (the engine checks every run).
    :param model_input: optional copy of ``x_next`` in another dtype (float32/bf16/fp16, x's shape and
        device), contiguous or channels_last.
    :param uncond_output: classifier-free guidance's unconditional output (model_output's shape and
        dtype; made contiguous), or None; :param guidance_scale: its ``w`` (a float32 kernel argument).
    :param threshold: dynamic thresholding's float32 ``[n]`` bounds on x's device, or None.
    """
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"multistep_step: x must be float32 and contiguous (updated in place), got {x.dtype}")
    if model_output.shape != x.shape or model_output.device != x.device:
        raise ValueError(f"model_output must have x's shape {tuple(x.shape)} and device {x.device}, got "
                         f"{tuple(model_output.shape)} on {model_output.device}")
    slots = (MULTISTEP_HISTORY_SLOTS, *x.shape)
    if history.dtype != torch.float32 or history.shape != slots or history.device != x.device:
        raise ValueError(f"history must be float32 of shape {slots} on {x.device}, got {history.dtype} "
                         f"{tuple(history.shape)} on {history.device}")
    if not history.is_contiguous():
        raise ValueError("history is updated in place and must be contiguous")
    if table.dtype != torch.float32 or table.ndim != 2 or table.shape[1] != MULTISTEP_WIDTH or table.shape[0] < 1:
        raise ValueError(f"table must be float32 of shape (K, {MULTISTEP_WIDTH}), got {table.dtype} "
                         f"{tuple(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"table must be on x's device {x.device}, got {table.device}")
    if step.dtype != torch.int64 or step.numel() != 1 or step.ndim > 1 or step.device != x.device:
        raise ValueError(f"step must be an int64 tensor holding one value (0-dim or [1]) on {x.device}, got "
                         f"{step.dtype} {tuple(step.shape)} on {step.device}")
    if step.device.type == "cpu" and not 0 <= int(step.reshape(())) < table.shape[0]:  # no sync on a CPU tensor
        raise ValueError(f"step must lie in [0, {table.shape[0] - 1}] (a row of table), got {int(step.reshape(()))}")
    check_rng(rng, x)
    uncond_output = check_guidance(model_output, uncond_output, guidance_scale)
    threshold = check_threshold(threshold, x)
    n = x.shape[0]
    numel = x.numel() // n if n else 0
    check_noise_capacity(numel, table.shape[0] + 1, n - 1)
    channels_last, channels, spatial = (False, 1, 1) if model_input is None else model_input_layout(model_input, x)
    if x.numel() == 0:
        return
    block = elementwise_block(numel)
    launch(_multistep_step_kernel)[elementwise_grid(n, numel, block)](
        x, model_output.contiguous(), history, step, table.contiguous(), rng, model_input, numel, n * numel,
        channels, spatial, uncond_output, float(guidance_scale), threshold, CLIP=bool(clip_denoised),
        STOCHASTIC=bool(stochastic), WRITE_MODEL_INPUT=model_input is not None, CHANNELS_LAST=channels_last,
        GUIDED=uncond_output is not None, THRESHOLD=threshold is not None, BLOCK=block, num_warps=ELEMENTWISE_WARPS)


@op("multistep_step_", fake=fakes.multistep_step_)
def multistep_step_(x: torch.Tensor, model_output: torch.Tensor, history: torch.Tensor, step: torch.Tensor,
                    table: torch.Tensor, rng: torch.Tensor, clip_denoised: bool, stochastic: bool,
                    model_input: Optional[torch.Tensor], uncond_output: Optional[torch.Tensor],
                    guidance_scale: float, threshold: Optional[torch.Tensor]) -> None:
    """One multistep solver step in place (see the module docstring); ``model_input`` (contiguous or
    channels_last; None for none) gets the cast copy of ``x_next``; ``uncond_output`` (None for none)
    and ``guidance_scale``: classifier-free guidance, fused; ``threshold`` (None for none): dynamic
    thresholding's per-sample bounds, fused.  No defaults: torch 2.11's custom ops raise IndexError
    on a mutable optional argument with a default (and the table gives none)."""
    multistep_step_into(x, model_output, history, step, table, rng, clip_denoised, stochastic, model_input,
                        uncond_output=uncond_output, guidance_scale=guidance_scale, threshold=threshold)
