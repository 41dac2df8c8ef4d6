"""Dynamic thresholding (Imagen, Saharia et al. 2022; diffusers' ``thresholding=True``) as every
sampling path asks for it: the per-sample bound of one step, or None when the process only clips.

The bound ``s = clamp(quantile(|x0_hat|, ratio), 1, sample_max_value)`` is a per-sample reduction, so
it is one small pass (``ops.dynamic_threshold``, on the device, no host synchronisation: a CUDA graph
captures it); the step op then applies ``x0 = clamp(x0_hat, -s, s) / s`` inside its fused pass.
"""
from __future__ import annotations

import torch

from . import ops

__all__ = ["step_threshold"]


def step_threshold(x: torch.Tensor, model_output: torch.Tensor, step: torch.Tensor, table: torch.Tensor,
                   thresholding: tuple[float, float] | None, uncond_output: torch.Tensor | None = None,
                   guidance_scale: float = 1.0) -> torch.Tensor | None:
    """The float32 ``[n]`` bounds of this step's ``x0_hat`` (from the table's ``a, b`` columns and the
    guided output), or None without dynamic thresholding.

    :param thresholding: ``(dynamic_thresholding_ratio, sample_max_value)`` (``DiffusionConfig.thresholding``,
        ``MultistepPlan.thresholding``), or None.
    """
    if thresholding is None:
        return None
    ratio, max_value = thresholding
    return ops.dynamic_threshold(x, model_output, step, table, ratio=ratio, max_value=max_value,
                                 uncond_output=uncond_output, guidance_scale=guidance_scale)
