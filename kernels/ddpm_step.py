"""One reverse step ``x_t -> x_{t-1}`` for every sample, in one elementwise pass::

    x0_hat = a * x_t + b * out            # from the prediction type
    x0_hat = clamp(x0_hat, -1, 1)         # if clip_denoised
    x_prev = c0 * x0_hat + c1 * x_t + c2 * out + sigma * z

with the row ``(a, b, c0, c1, sigma, c2)`` of ``coefs`` picked by the step index,
which is read from a device tensor in the kernel: per sample (``step`` of
shape ``[n]``) or one for the batch (0-dim or ``[1]``, read with stride 0), so
a captured CUDA graph replays every step by updating that tensor.  The noise
slot is the step index.  ``sigma == 0`` (last DDPM step, DDIM with eta 0)
skips the noise generation, and ``c2 == 0`` (every row but DDIM's raw direction) the
``c2 * out`` term (so an inf output the clip bounds stays bounded).  Optionally the kernel also writes ``x_prev`` in the
model's dtype, contiguous or channels_last: the next model call's input.  With
classifier-free guidance (``uncond_output`` given) ``out = u + w * (c - u)`` in float32
(``guided_output``) in the same pass; ``GUIDED`` is a compile-time flag, so the unguided
kernel is unchanged.  With dynamic thresholding (``threshold``: float32 ``[n]``, each sample's
bound ``s``, from ``fastddpm.ops.dynamic_threshold``) ``x0_hat = clamp(x0_hat, -s, s) / s`` in
place of the clip (``denoised``), under the compile-time flag ``THRESHOLD``.  With inpainting
(RePaint, Lugmayr et al. 2022: ``known`` and ``mask``, float32 of x's shape, and a ``[K, 8]`` table
``(a, b, c0, c1, sigma, c2, ka, kb)``) ``x_prev = mask * (ka * known + kb * z1) + (1 - mask) * x_prev``
(``inpaint_blend``), ``z1`` the contract's normal of slot ``step + K + 1``, under ``INPAINT``.

Ops (as the C++ backend's ``torch.ops.fastddpm.*``, here ``fastddpm_triton``):
``ddpm_step`` (functional), ``ddpm_step_cast`` (also returns the model-dtype
copy) and ``ddpm_step_`` (updates ``x`` and ``model_input`` in place, the form
a captured CUDA graph replays).  The functional ops take the noise key as two
ints, ``seed`` and ``sample_offset``, which a captured graph would bake in;
``ddpm_step_`` takes it as a device tensor ``rng = (seed, sample_offset)``
(int64 ``[2]``) that the kernel loads, so one captured graph serves every seed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastddpm.checks import FLOAT_DTYPES
from fastddpm.noise import check_noise_capacity

from fastddpm.ops import fakes
from fastddpm.ops.reference import COEF_COLUMNS, COEF_WIDTH, INPAINT_COEF_COLUMNS, INPAINT_COEF_WIDTH

from ._library import ELEMENTWISE_WARPS, elementwise_block, elementwise_grid, launch, op
from .noise import contract_offsets

__all__ = ["ddpm_step", "ddpm_step_cast", "ddpm_step_", "ddpm_step_into", "check_threshold", "check_inpaint"]

# a row's width in the kernel (the launcher checks coefs against the reference's widths, 6 and 8)
STEP_COLUMNS: tl.constexpr = tl.constexpr(COEF_WIDTH)
INPAINT_COLUMNS: tl.constexpr = tl.constexpr(INPAINT_COEF_WIDTH)


@triton.jit
def guided_output(out_ptr, uncond_ptr, offs, mask, guidance_scale, GUIDED: tl.constexpr):
    """The float32 model output a step uses: ``c``, or with guidance ``u + w * (c - u)``
    (``reference.guided_output``; ``uncond_ptr`` read only when ``GUIDED``).  Shared by the DDPM
    and multistep kernels."""
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        uncond = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = uncond + guidance_scale * (out - uncond)
    return out


@triton.jit
def denoised(x0_hat, threshold_ptr, row, CLIP: tl.constexpr, THRESHOLD: tl.constexpr):
    """The x0 prediction a step uses (``reference.predict_x0``): with ``THRESHOLD``,
    ``clamp(x0_hat, -s, s) / s`` with row ``row``'s bound ``s`` (a correctly rounded division, as
    torch's; whatever ``CLIP``), else clamped to ``[-1, 1]`` if ``CLIP``.  Shared by the DDPM and
    multistep kernels."""
    if THRESHOLD:
        s = tl.load(threshold_ptr + row)
        x0_hat = tl.div_rn(tl.minimum(tl.maximum(x0_hat, -s), s), s)
    elif CLIP:
        x0_hat = tl.minimum(tl.maximum(x0_hat, -1.0), 1.0)
    return x0_hat


@triton.jit
def noise_key(seed, sample_offset, rng_ptr, row, RNG_IN_MEMORY: tl.constexpr):
    """The key seed and the global sample index of row ``row``: from device memory (``rng_ptr``
    holds ``(seed, sample_offset)``) or the launch arguments."""
    if RNG_IN_MEMORY:
        key_seed = tl.load(rng_ptr)
        first_sample = tl.load(rng_ptr + 1)
    else:
        key_seed = seed
        first_sample = sample_offset
    return key_seed, row.to(tl.int64) + first_sample


@triton.jit
def inpaint_blend(x_prev, known_ptr, keep_ptr, offs, mask, ka, kb, key_seed, sample, low):
    """RePaint's blend (``reference.inpaint_blend``): ``m * (ka * known + kb * z1) + (1 - m) * x_prev``
    with ``m`` the inpainting mask at ``offs`` and ``z1`` the contract's normal of counters ``low``
    (slot ``step + K + 1``), skipped where ``kb == 0`` (uniform per program: ``kb * z1 == 0``)."""
    known = tl.load(known_ptr + offs, mask=mask, other=0.0)
    m = tl.load(keep_ptr + offs, mask=mask, other=0.0)
    known_part = ka * known
    if kb != 0.0:
        known_part = known_part + kb * tl.randn(key_seed, contract_offsets(sample, low))
    return m * known_part + (1.0 - m) * x_prev


@triton.jit
def store_model_input(model_input_ptr, base, element, value, mask, channels, spatial, CHANNELS_LAST: tl.constexpr):
    """Write a row's new ``x`` (``value`` at ``element``, the row starting at ``base``) into the
    model-input buffer in its dtype: contiguous, or channels_last, where element c*HW + hw of the
    sample lives at hw*C + c.  Shared by the DDPM and multistep in-place kernels."""
    if CHANNELS_LAST:
        dst = (element % spatial) * channels + element // spatial
    else:
        dst = element
    tl.store(model_input_ptr + base + dst, value.to(model_input_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ddpm_step_kernel(x_ptr, out_ptr, step_ptr, step_stride, coefs_ptr, x_prev_ptr, model_input_ptr, numel, channels,
                      spatial, seed, sample_offset, rng_ptr, uncond_ptr, guidance_scale, threshold_ptr, known_ptr,
                      keep_ptr, num_steps, CLIP: tl.constexpr, WRITE_MODEL_INPUT: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, RNG_IN_MEMORY: tl.constexpr, GUIDED: tl.constexpr,
                      THRESHOLD: tl.constexpr, INPAINT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    element = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = element < numel
    base = row.to(tl.int64) * numel
    step = tl.load(step_ptr + row * step_stride).to(tl.int64)
    if INPAINT:  # the [K, 8] table: (a, b, c0, c1, sigma, c2, ka, kb)
        coef = coefs_ptr + step * INPAINT_COLUMNS
    else:  # the [K, 6] table: (a, b, c0, c1, sigma, c2)
        coef = coefs_ptr + step * STEP_COLUMNS
    a = tl.load(coef)
    b = tl.load(coef + 1)
    c0 = tl.load(coef + 2)
    c1 = tl.load(coef + 3)
    sigma = tl.load(coef + 4)
    c2 = tl.load(coef + 5)
    x = tl.load(x_ptr + base + element, mask=mask, other=0.0).to(tl.float32)
    out = guided_output(out_ptr, uncond_ptr, base + element, mask, guidance_scale, GUIDED)
    x0_hat = denoised(a * x + b * out, threshold_ptr, row, CLIP, THRESHOLD)
    x_prev = c0 * x0_hat + c1 * x
    if c2 != 0.0:  # uniform per program: DDIM's raw direction weighs the (guided) output itself
        x_prev = x_prev + c2 * out
    if sigma != 0.0:  # uniform per program: sigma*z == 0 exactly, skip Philox
        # the key (seed, sample_offset) from device memory (RNG_IN_MEMORY) or the launch arguments
        key_seed, sample = noise_key(seed, sample_offset, rng_ptr, row, RNG_IN_MEMORY)
        z = tl.randn(key_seed, contract_offsets(sample, step * numel + element))
        x_prev = x_prev + sigma * z
    if INPAINT:  # the known image noised to the step's target where the mask keeps it; z1: slot step + K + 1
        key_seed, sample = noise_key(seed, sample_offset, rng_ptr, row, RNG_IN_MEMORY)
        x_prev = inpaint_blend(x_prev, known_ptr, keep_ptr, base + element, mask, tl.load(coef + STEP_COLUMNS),
                               tl.load(coef + STEP_COLUMNS + 1),
                               key_seed, sample, (step + num_steps + 1) * numel + element)
    tl.store(x_prev_ptr + base + element, x_prev, mask=mask)
    if WRITE_MODEL_INPUT:
        store_model_input(model_input_ptr, base, element, x_prev, mask, channels, spatial, CHANNELS_LAST)


def model_input_layout(model_input, x) -> tuple[bool, int, int]:
    """(channels_last, C, H*W) of the model-input buffer (``ddpm_step_``'s and ``multistep_step_``'s)."""
    if not isinstance(model_input, torch.Tensor) or model_input.dtype not in FLOAT_DTYPES:
        what = model_input.dtype if isinstance(model_input, torch.Tensor) else type(model_input).__name__
        raise ValueError(f"model_input must be float32, float16 or bfloat16, got {what}")
    if model_input.shape != x.shape or model_input.device != x.device:
        raise ValueError(f"model_input must have x's shape {tuple(x.shape)} and device {x.device}, got "
                         f"{tuple(model_input.shape)} on {model_input.device}")
    if model_input.is_contiguous():
        return False, 1, 1
    if x.ndim == 4 and model_input.is_contiguous(memory_format=torch.channels_last):
        return True, x.shape[1], x.shape[2] * x.shape[3]
    raise ValueError("model_input must be contiguous or channels_last")


def check_guidance(model_output: torch.Tensor, uncond_output, guidance_scale) -> torch.Tensor | None:
    """Classifier-free guidance's arguments of every step op: ``uncond_output`` None or a tensor of
    ``model_output``'s shape, dtype and device (e.g. a dim-0 slice of a ``[2n, ...]`` batch),
    ``guidance_scale`` finite.  Returns ``uncond_output`` contiguous (as ``model_output`` is made)."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if uncond_output is None:
        return None
    if not isinstance(uncond_output, torch.Tensor):
        raise ValueError(f"uncond_output must be a tensor or None, got {type(uncond_output).__name__}")
    if (uncond_output.shape != model_output.shape or uncond_output.dtype != model_output.dtype
            or uncond_output.device != model_output.device):
        raise ValueError(f"uncond_output must have model_output's shape {tuple(model_output.shape)}, dtype "
                         f"{model_output.dtype} and device {model_output.device}, got {tuple(uncond_output.shape)} "
                         f"{uncond_output.dtype} on {uncond_output.device}")
    return uncond_output.contiguous()


def check_threshold(threshold, x: torch.Tensor) -> torch.Tensor | None:
    """Dynamic thresholding's argument of every step op: None, or float32 ``[n]`` (one bound per
    sample) on ``x``'s device (values not read: a GPU one would synchronise).  Returns it contiguous."""
    if threshold is None:
        return None
    if not isinstance(threshold, torch.Tensor):
        raise ValueError(f"threshold must be a tensor or None, got {type(threshold).__name__}")
    if threshold.dtype != torch.float32 or threshold.shape != (x.shape[0],) or threshold.device != x.device:
        raise ValueError(f"threshold must be a float32 tensor of shape ({x.shape[0]},) (one bound per sample) on "
                         f"{x.device}, got {threshold.dtype} {tuple(threshold.shape)} on {threshold.device}")
    return threshold.contiguous()


def check_inpaint(known, mask, x: torch.Tensor, coefs: torch.Tensor) -> tuple:
    """The inpainting arguments of the DDPM step ops: ``known`` and ``mask`` both None (a ``[K, 6]``
    table), or both float32 tensors of ``x``'s shape on its device (a ``[K, 8]`` table, ``ka, kb``
    last).  Returns them contiguous (the caller broadcasts; values not read)."""
    if known is None and mask is not None:
        raise ValueError("mask was given without known: the inpainting blend needs both (or neither)")
    if known is not None and mask is None:
        raise ValueError("known was given without mask: the inpainting blend needs both (or neither)")
    width = COEF_WIDTH if known is None else INPAINT_COEF_WIDTH
    if coefs.ndim != 2 or coefs.shape[1] != width:
        what = (f"without known ({', '.join(COEF_COLUMNS)})" if known is None
                else f"with known ({', '.join(INPAINT_COEF_COLUMNS)})")
        raise ValueError(f"coefs must have shape (K, {width}) {what}, got {tuple(coefs.shape)}")
    if known is None:
        return None, None
    for name, t in (("known", known), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32 or t.shape != x.shape or t.device != x.device:
            raise ValueError(f"{name} must be a float32 tensor of x's shape {tuple(x.shape)} on {x.device} (the "
                             f"inpainting blend), got {t.dtype} {tuple(t.shape)} on {t.device}")
    return known.contiguous(), mask.contiguous()


def check_rng(rng: torch.Tensor, x: torch.Tensor) -> None:
    """``rng``: the noise key ``(seed, sample_offset)``, int64 ``[2]``, contiguous, on ``x``'s device.
    Its values are checked for CPU tensors only (reading a GPU one would synchronise)."""
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or rng.shape != (2,):
        what = f"{rng.dtype} {tuple(rng.shape)}" if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise ValueError(f"rng must be an int64 tensor of shape (2,) holding (seed, sample_offset), got {what}")
    if rng.device != x.device:
        raise ValueError(f"rng must be on x's device {x.device}, got {rng.device}")
    if not rng.is_contiguous():
        raise ValueError("rng must be contiguous")
    if rng.device.type == "cpu" and bool((rng < 0).any()):
        raise ValueError(f"rng must hold (seed, sample_offset) with seed in [0, 2**63) and sample_offset >= 0, "
                         f"got {tuple(rng.tolist())}")


def ddpm_step_into(x, model_output, step, coefs, seed: int, sample_offset: int, clip_denoised: bool,
                   x_prev: torch.Tensor, model_input: torch.Tensor | None = None, *,
                   rng: torch.Tensor | None = None, uncond_output: torch.Tensor | None = None,
                   guidance_scale: float = 1.0, threshold: torch.Tensor | None = None,
                   known: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
    """Host launcher writing into preallocated buffers.

    :param x: float32 ``[n, ...]`` contiguous; may be the same tensor as ``x_prev``
        (each element is read before it is written).
    :param model_output: ``[n, ...]`` float32/bf16/fp16 (made contiguous).
    :param step: int64 ``[n]`` (per sample) or 0-dim/``[1]`` (whole batch) on the device.
    :param coefs: float32 ``[K, 6]`` (``[K, 8]`` with ``known``).
    :param seed, sample_offset: the noise key, as kernel arguments (baked into a captured graph).
    :param x_prev: float32 output, shape of ``x``, contiguous.
    :param model_input: optional copy of ``x_prev`` in another dtype, contiguous or channels_last.
    :param rng: the noise key as an int64 ``[2]`` tensor ``(seed, sample_offset)`` on ``x``'s
        device, loaded by the kernel instead: pass ``seed = sample_offset = 0``.  The host cannot
        check ``sample_offset + n <= 2**32`` then; the caller does (the engine checks every run).
    :param uncond_output: classifier-free guidance's unconditional output (model_output's shape and
        dtype; made contiguous), or None; :param guidance_scale: its ``w`` (a float32 kernel argument).
    :param threshold: dynamic thresholding's float32 ``[n]`` bounds on x's device, or None.
    :param known, mask: inpainting's image to keep and its mask (1 = keep), float32 of x's shape on
        its device (made contiguous), or None; the blend's noise ``z1`` is slot ``step + K + 1``.
    """
    uncond_output = check_guidance(model_output, uncond_output, guidance_scale)
    threshold = check_threshold(threshold, x)
    known, mask = check_inpaint(known, mask, x, coefs)
    n = x.shape[0]
    numel = x.numel() // n if n else 0
    if rng is not None:
        check_rng(rng, x)
    K = coefs.shape[0]
    # slots 0..K-1 the steps' noise, K x_T's, K+1..2K the blend's z1
    check_noise_capacity(numel, K + 1 if known is None else 2 * K + 1, sample_offset + n - 1)
    if not (x.is_contiguous() and x_prev.is_contiguous() and x_prev.dtype == torch.float32):
        raise ValueError("ddpm_step: x and x_prev must be contiguous, x_prev float32")
    if step.numel() not in (1, n):
        raise ValueError(f"step must have 1 or {n} elements, got shape {tuple(step.shape)}")
    channels_last, channels, spatial = (False, 1, 1) if model_input is None else model_input_layout(model_input, x)
    if x.numel() == 0:
        return
    step_stride = 0 if step.numel() == 1 else step.stride(0)
    block = elementwise_block(numel)
    launch(_ddpm_step_kernel)[elementwise_grid(n, numel, block)](
        x, model_output.contiguous(), step, step_stride, coefs.contiguous(), x_prev, model_input, numel, channels,
        spatial, seed, sample_offset, rng, uncond_output, float(guidance_scale), threshold, known, mask, K,
        CLIP=bool(clip_denoised), WRITE_MODEL_INPUT=model_input is not None, CHANNELS_LAST=channels_last,
        RNG_IN_MEMORY=rng is not None, GUIDED=uncond_output is not None, THRESHOLD=threshold is not None,
        INPAINT=known is not None, BLOCK=block,
        # guidance + inpainting + thresholding at once spill 8 bytes on sm_90 with 4 warps (triton 3.6)
        num_warps=2 * ELEMENTWISE_WARPS if uncond_output is not None and known is not None else ELEMENTWISE_WARPS)


@op("ddpm_step", fake=fakes.ddpm_step)
def ddpm_step(x: torch.Tensor, model_output: torch.Tensor, step: torch.Tensor, coefs: torch.Tensor, seed: int,
              sample_offset: int, clip_denoised: bool, uncond_output: Optional[torch.Tensor],
              guidance_scale: float, threshold: Optional[torch.Tensor], known: Optional[torch.Tensor],
              mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:return: float32 ``x_{t-1}`` (see the module docstring); ``uncond_output`` (None for none)
    and ``guidance_scale``: classifier-free guidance, fused; ``threshold`` (None for none): dynamic
    thresholding's per-sample bounds, fused; ``known``, ``mask`` (None for none): the inpainting
    blend, fused (``coefs`` ``[K, 8]`` then)."""
    x = x.contiguous()
    x_prev = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    ddpm_step_into(x, model_output, step, coefs, seed, sample_offset, clip_denoised, x_prev,
                   uncond_output=uncond_output, guidance_scale=guidance_scale, threshold=threshold, known=known,
                   mask=mask)
    return x_prev


@op("ddpm_step_cast", fake=fakes.ddpm_step_cast)
def ddpm_step_cast(x: torch.Tensor, model_output: torch.Tensor, step: torch.Tensor, coefs: torch.Tensor, seed: int,
                   sample_offset: int, clip_denoised: bool, model_dtype: torch.dtype, channels_last: bool,
                   uncond_output: Optional[torch.Tensor], guidance_scale: float,
                   threshold: Optional[torch.Tensor], known: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:return: ``x_{t-1}`` in float32 and the same values in ``model_dtype``
    (channels_last if asked; needs a 4-D ``x``)."""
    if channels_last and x.ndim != 4:
        raise ValueError(f"channels_last needs a 4-D x, got shape {tuple(x.shape)}")
    x = x.contiguous()
    x_prev = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model_input = torch.empty(x.shape, dtype=model_dtype, device=x.device, memory_format=layout)
    ddpm_step_into(x, model_output, step, coefs, seed, sample_offset, clip_denoised, x_prev, model_input,
                   uncond_output=uncond_output, guidance_scale=guidance_scale, threshold=threshold, known=known,
                   mask=mask)
    return x_prev, model_input


@op("ddpm_step_", fake=fakes.ddpm_step_)
def ddpm_step_(x: torch.Tensor, model_output: torch.Tensor, step: torch.Tensor, coefs: torch.Tensor, rng: torch.Tensor,
               clip_denoised: bool, model_input: Optional[torch.Tensor], uncond_output: Optional[torch.Tensor],
               guidance_scale: float, threshold: Optional[torch.Tensor], known: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> None:
    """Update ``x`` (float32, contiguous) to ``x_{t-1}`` in place, and
    ``model_input`` (contiguous or channels_last; None for none) with its cast copy.
    ``model_input`` has no default: torch 2.11's custom ops raise IndexError on a
    mutable optional argument with a default.

    :param rng: the noise key ``(seed, sample_offset)``, int64 ``[2]`` on ``x``'s device, read by
        the kernel: a captured graph draws the noise of whatever it holds at replay time.
    :param uncond_output, guidance_scale: classifier-free guidance (None: none), as ``ddpm_step``'s.
    :param threshold: dynamic thresholding's bounds (None: none), as ``ddpm_step``'s.
    :param known, mask: the inpainting blend (None: none), as ``ddpm_step``'s; ``z1`` under the key ``rng``.
    """
    ddpm_step_into(x, model_output, step, coefs, 0, 0, clip_denoised, x, model_input, rng=rng,
                   uncond_output=uncond_output, guidance_scale=guidance_scale, threshold=threshold, known=known,
                   mask=mask)
