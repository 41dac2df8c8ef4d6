"""Fake (meta) implementations of the fused ops: shapes, dtypes and devices
only, so ``torch.compile`` and FakeTensor tracing see each op as one node.

The C++ (``fastddpm::``) and Triton (``fastddpm_triton::``) backends are defined
from the same schema table (``schemas.def``) and register these same functions.
"""
from __future__ import annotations

import torch

from ..checks import FLOAT_DTYPES
from .reference import COEF_COLUMNS, INPAINT_COEF_COLUMNS, MULTISTEP_HISTORY_SLOTS, MULTISTEP_WIDTH

__all__ = ["q_sample", "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddpm_step_cast", "ddpm_step_",
           "multistep_step_"]


def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, sample_offset):
    torch._check(x0.dim() >= 1, lambda: "x0 must have a batch dimension")
    return x0.new_empty(x0.shape, dtype=torch.float32)


def diffusion_loss(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, seed,
                   sample_offset, prediction, loss_type, huber_delta):
    torch._check(x0.shape == model_output.shape, lambda: "x0 must have model_output's shape")
    return model_output.new_empty((), dtype=torch.float32)


def diffusion_loss_backward(grad, model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                            seed, sample_offset, prediction, loss_type, huber_delta):
    return model_output.new_empty(model_output.shape)


def _check_uncond_output(uncond_output, model_output):
    """Classifier-free guidance's optional unconditional output: model_output's shape, dtype and device."""
    if uncond_output is None:
        return
    torch._check(uncond_output.shape == model_output.shape and uncond_output.dtype == model_output.dtype
                 and uncond_output.device == model_output.device,
                 lambda: f"uncond_output must have model_output's shape {tuple(model_output.shape)}, dtype "
                         f"{model_output.dtype} and device {model_output.device}, got {tuple(uncond_output.shape)} "
                         f"{uncond_output.dtype} on {uncond_output.device}")


def _check_threshold(threshold, x):
    """Dynamic thresholding's optional per-sample bounds: float32 ``[n]`` on ``x``'s device."""
    if threshold is None:
        return
    torch._check(threshold.dtype == torch.float32 and threshold.shape == (x.shape[0],)
                 and threshold.device == x.device,
                 lambda: f"threshold must be a float32 [{x.shape[0]}] tensor (one bound per sample) on {x.device}, "
                         f"got {threshold.dtype} {tuple(threshold.shape)} on {threshold.device}")


def _check_inpaint(known, mask, x, coefs):
    """The inpainting blend's optional image and mask: both None (coefs ``[K, 6]``) or both float32 of
    ``x``'s shape on its device (coefs ``[K, 8]``: the blend's ka, kb last)."""
    torch._check(mask is None or known is not None, lambda: "mask was given without known: the inpainting blend "
                                                           "needs both (or neither)")
    torch._check(known is None or mask is not None, lambda: "known was given without mask: the inpainting blend "
                                                           "needs both (or neither)")
    for name, t in (("known", known), ("mask", mask)):
        if t is not None:
            torch._check(t.dtype == torch.float32 and t.shape == x.shape and t.device == x.device,
                         lambda: f"{name} must be a float32 tensor of x's shape {tuple(x.shape)} on {x.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
    width = len(INPAINT_COEF_COLUMNS) if known is not None else len(COEF_COLUMNS)
    torch._check(coefs.dim() == 2 and coefs.shape[1] == width,
                 lambda: f"coefs must have shape (K, {width}) {'with' if known is not None else 'without'} known, "
                         f"got {tuple(coefs.shape)}")


def ddpm_step(x, model_output, step, coefs, seed, sample_offset, clip_denoised, uncond_output, guidance_scale,
              threshold, known, mask):
    torch._check(model_output.shape == x.shape, lambda: "model_output must have x's shape")
    _check_uncond_output(uncond_output, model_output)
    _check_threshold(threshold, x)
    _check_inpaint(known, mask, x, coefs)
    return x.new_empty(x.shape, dtype=torch.float32)


def ddpm_step_cast(x, model_output, step, coefs, seed, sample_offset, clip_denoised, model_dtype, channels_last,
                   uncond_output, guidance_scale, threshold, known, mask):
    torch._check(model_output.shape == x.shape, lambda: "model_output must have x's shape")
    _check_uncond_output(uncond_output, model_output)
    _check_threshold(threshold, x)
    _check_inpaint(known, mask, x, coefs)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return (x.new_empty(x.shape, dtype=torch.float32),
            torch.empty(x.shape, dtype=model_dtype, device=x.device, memory_format=layout))


def _check_rng(rng, x):
    """The in-place ops' noise key: int64 ``[2]`` ``(seed, sample_offset)`` on ``x``'s device."""
    torch._check(rng.dtype == torch.int64 and rng.shape == (2,) and rng.device == x.device,
                 lambda: f"rng must be an int64 [2] tensor (seed, sample_offset) on {x.device}, got "
                         f"{rng.dtype} {tuple(rng.shape)} on {rng.device}")


def _check_model_input(model_input, x):
    """The in-place ops' optional model-input buffer: a float copy of the new ``x`` (a CPU op given a
    meta one dispatches here, so this is where its device is checked then)."""
    if model_input is None:
        return
    torch._check(model_input.dtype in FLOAT_DTYPES
                 and model_input.shape == x.shape and model_input.device == x.device,
                 lambda: f"model_input must be a float32/float16/bfloat16 tensor of shape {tuple(x.shape)} on "
                         f"{x.device}, got {model_input.dtype} {tuple(model_input.shape)} on {model_input.device}")


def ddpm_step_(x, model_output, step, coefs, rng, clip_denoised, model_input, uncond_output, guidance_scale,
               threshold, known, mask):
    torch._check(model_output.shape == x.shape, lambda: "model_output must have x's shape")
    _check_uncond_output(uncond_output, model_output)
    _check_threshold(threshold, x)
    _check_inpaint(known, mask, x, coefs)
    _check_rng(rng, x)
    _check_model_input(model_input, x)
    return None


def multistep_step_(x, model_output, history, step, table, rng, clip_denoised, stochastic, model_input, uncond_output,
                    guidance_scale, threshold):
    torch._check(model_output.shape == x.shape, lambda: "model_output must have x's shape")
    _check_uncond_output(uncond_output, model_output)
    _check_threshold(threshold, x)
    torch._check(history.shape == (MULTISTEP_HISTORY_SLOTS, *x.shape),
                 lambda: f"history must have shape ({MULTISTEP_HISTORY_SLOTS}, *x.shape), got {tuple(history.shape)}")
    torch._check(table.dim() == 2 and table.shape[1] == MULTISTEP_WIDTH,
                 lambda: f"table must have shape (K, {MULTISTEP_WIDTH}), got {tuple(table.shape)}")
    _check_rng(rng, x)
    _check_model_input(model_input, x)
    return None
