"""The fused ops as users call them: argument checks, then the backend the
registry picks (``fastddpm.ops.registry``) or the reference
(``fastddpm.ops.reference``).

Each function checks metadata only (no device synchronisation), so it is safe
inside the sampling loop and a CUDA graph.  ``backend=`` names the backend for
that one call (it raises if it cannot run); without it the registry chooses.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..modes import LOSSES, PREDICTIONS
from ..noise import check_noise_capacity, check_seed
from . import reference
from .registry import implementation, resolve

__all__ = ["q_sample", "diffusion_loss", "ddpm_step", "multistep_step", "dynamic_threshold", "attention"]


def _impl(op: str, device: torch.device, dtype: torch.dtype, backend: str | None, head_dim: int | None = None):
    """The backend function for ``op``, or None for the reference."""
    return implementation(op, resolve(op, device.type, dtype, backend, head_dim))


def _check_batch(op, x, t, **tables):
    check_tensor("t", t, dtypes=(torch.int64,))
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"{op}: t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    for name, table in tables.items():
        check_tensor(name, table, dtypes=(torch.float32,))
    check_same_device(x=x, t=t, **tables)


def _check_guidance(model_output, uncond_output, guidance_scale) -> None:
    """Classifier-free guidance's arguments (metadata only): ``uncond_output`` None or a tensor of
    ``model_output``'s shape and dtype on its device; ``guidance_scale`` a finite real number."""
    if uncond_output is not None:
        check_tensor("uncond_output", uncond_output, dtypes=(model_output.dtype,), shape=model_output.shape,
                     device=model_output.device)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise TypeError(f"guidance_scale must be a real number, got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")


def _check_threshold(x, threshold) -> None:
    """Dynamic thresholding's bounds (metadata only): None or float32 ``[n]`` on ``x``'s device."""
    if threshold is not None:
        check_tensor("threshold", threshold, dtypes=(torch.float32,), shape=(x.shape[0],), device=x.device)


def _check_inpaint(x, coefs, known, mask, known_noise) -> None:
    """The inpainting blend's arguments (metadata only): ``known`` and ``mask`` both None, or both
    float32 tensors of ``x``'s exact shape on its device (the caller broadcasts a shared mask); the
    table's width then 8, else 6 (``reference.INPAINT_COEF_WIDTH``, ``COEF_WIDTH``); ``known_noise`` (explicit ``z1``) only with ``known``."""
    if known is None:
        if mask is not None:
            raise ValueError("mask was given without known: the inpainting blend needs both (or neither)")
        if known_noise is not None:
            raise ValueError("known_noise was given without known: it is the inpainting blend's noise z1")
    else:
        if mask is None:
            raise ValueError("known was given without mask: the inpainting blend needs both (mask 1 = keep known)")
        check_tensor("known", known, dtypes=(torch.float32,), shape=x.shape, device=x.device)
        check_tensor("mask", mask, dtypes=(torch.float32,), shape=x.shape, device=x.device)
    width = coefs.shape[1]
    step_columns = ", ".join(reference.COEF_COLUMNS)
    if known is not None and width != reference.INPAINT_COEF_WIDTH:
        raise ValueError(f"coefs must have shape (K, {reference.INPAINT_COEF_WIDTH}) with known: ({step_columns}) and "
                         f"the blend's ka, kb (sqrt(abar_prev), sqrt(1 - abar_prev)), got {tuple(coefs.shape)}")
    if known is None and width != reference.COEF_WIDTH:
        hint = (f" ({reference.INPAINT_COEF_WIDTH} columns are the inpainting table: pass known and mask with it)"
                if width == reference.INPAINT_COEF_WIDTH else "")
        raise ValueError(f"coefs must have shape (K, {reference.COEF_WIDTH}): ({step_columns}){hint}, "
                         f"got {tuple(coefs.shape)}")


# -- the ops ---------------------------------------------------------------------------
def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, *, seed: int, sample_offset: int = 0,
             noise=None, backend: str | None = None):
    """Forward noising with the contract's noise (slot 0) or an explicit ``noise``.

    :param x0: ``[n, ...]`` float; :param t: int64 ``[n]``; tables float32 ``[T]``.
    :return: float32 ``x_t``.
    """
    check_tensor("x0", x0, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_batch("q_sample", x0, t, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                 sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod)
    check_seed(seed)
    t = t.expand(x0.shape[0]) if t.ndim == 0 else t
    if noise is None:
        impl = _impl("q_sample", x0.device, x0.dtype, backend)
        if impl is not None:
            return impl(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, sample_offset)
        noise = reference.batch_noise(seed, sample_offset, 0, x0.shape, x0.device)
    else:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES, shape=x0.shape, device=x0.device)
    return reference.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)


def diffusion_loss(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, *,
                   seed: int, sample_offset: int = 0, prediction: str = "epsilon", loss_type: str = "l2",
                   huber_delta: float = 1.0, noise=None, backend: str | None = None):
    """The training loss against the target built from the same noise as
    ``q_sample`` (regenerated from ``seed``, or the explicit ``noise``)."""
    check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("x0", x0, dtypes=FLOAT_DTYPES, shape=model_output.shape)
    _check_batch("diffusion_loss", x0, t, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                 sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod, weights=weights)
    check_same_device(model_output=model_output, x0=x0)
    check_seed(seed)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSSES}, got {loss_type!r}")
    t = t.expand(x0.shape[0]) if t.ndim == 0 else t
    if noise is None:
        impl = _impl("diffusion_loss", model_output.device, model_output.dtype, backend)
        if impl is not None:
            return impl(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                        seed, sample_offset, prediction, loss_type, float(huber_delta))
        noise = reference.batch_noise(seed, sample_offset, 0, x0.shape, x0.device)
    else:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES, shape=x0.shape, device=x0.device)
    return reference.diffusion_loss(model_output, x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                    weights, prediction, loss_type, huber_delta)


def ddpm_step(x, model_output, step, coefs, *, seed: int, sample_offset: int = 0, clip_denoised: bool = True,
              noise=None, uncond_output=None, guidance_scale: float = 1.0, threshold=None, known=None, mask=None,
              known_noise=None, backend: str | None = None):
    """One reverse step ``x_t -> x_{t-1}`` for every sample.

    :param x: float32 ``[n, ...]``.
    :param model_output: ``[n, ...]`` float32/bf16/fp16 (the conditional output, with guidance).
    :param step: int64 ``[n]`` or 0-dim: the process step index (row of
        ``coefs`` and the noise slot).
    :param coefs: float32 ``[K, 6]`` from ``reference.step_coefficients`` (``[K, 8]`` with ``known``:
        ``reference.INPAINT_COEF_COLUMNS``, the blend's ``ka, kb`` last).
    :param noise: explicit standard normals; default: the contract's (slot ``step``).
    :param uncond_output: classifier-free guidance's unconditional output (model_output's shape,
        dtype and device), or None (no guidance): the step uses ``u + w * (c - u)``, fused.
    :param guidance_scale: ``w`` (1: the conditional model alone); ignored without uncond_output.
    :param threshold: dynamic thresholding's float32 ``[n]`` bounds on x's device
        (``dynamic_threshold``), or None: ``x0_hat`` becomes ``clamp(x0_hat, -s, s) / s`` in place
        of the clip, whatever ``clip_denoised`` says.
    :param known: inpainting (RePaint, Lugmayr et al. 2022): the image to keep, float32 of x's shape
        on its device, or None (today's step).  Given, ``x_prev = mask * (ka * known + kb * z1) +
        (1 - mask) * step``, fused, ``z1`` the contract's normal of slot ``step + K + 1``
        (``K = coefs.shape[0]``; the blend uses ``2K + 1`` slots in all).
    :param mask: with ``known``: float32 of x's shape, 1 where ``known`` is kept, 0 where the model
        fills in (values not checked: a GPU tensor would synchronise).
    :param known_noise: explicit ``z1`` (with ``known``; runs the reference); default: the contract's.
    :return: float32 ``x_{t-1}``.
    """
    check_tensor("x", x, dtypes=(torch.float32,), min_ndim=1)
    check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES, shape=x.shape)
    check_tensor("coefs", coefs, dtypes=(torch.float32,), ndim=2)
    _check_inpaint(x, coefs, known, mask, known_noise)
    _check_batch("ddpm_step", x, step, coefs=coefs)
    check_same_device(x=x, model_output=model_output)
    _check_guidance(model_output, uncond_output, guidance_scale)
    _check_threshold(x, threshold)
    check_seed(seed)
    K = coefs.shape[0]
    if known is not None:  # z1 draws slots K+1..2K: 2K+1 slots in all
        check_noise_capacity(math.prod(x.shape[1:]), 2 * K + 1, sample_offset + x.shape[0] - 1)
    step = step.expand(x.shape[0]) if step.ndim == 0 else step
    if noise is None and known_noise is None:
        impl = _impl("ddpm_step", x.device, model_output.dtype, backend)
        if impl is not None:
            return impl(x, model_output, step, coefs, seed, sample_offset, bool(clip_denoised), uncond_output,
                        float(guidance_scale), threshold, known, mask)
    if noise is None:
        noise = reference.batch_noise(seed, sample_offset, step, x.shape, x.device)
    else:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES, shape=x.shape, device=x.device)
    if known is not None:
        if known_noise is None:
            known_noise = reference.batch_noise(seed, sample_offset, step + K + 1, x.shape, x.device)
        else:
            check_tensor("known_noise", known_noise, dtypes=FLOAT_DTYPES, shape=x.shape, device=x.device)
    return reference.ddpm_step(x, model_output, coefs.index_select(0, step), clip_denoised, noise,
                               uncond_output=uncond_output, guidance_scale=float(guidance_scale), threshold=threshold,
                               known=known, mask=mask, known_noise=known_noise)


_HISTORY_DTYPES = (torch.float32, torch.float64)


def _noise_key(seed: int, sample_offset: int, device) -> torch.Tensor:
    """The noise key ``(seed, sample_offset)`` as the int64 ``[2]`` tensor the in-place ops read,
    on ``device`` (filled by kernels there: no host-to-device copy)."""
    rng = torch.empty(2, dtype=torch.int64, device=device)
    rng[0].fill_(seed)
    rng[1].fill_(sample_offset)
    return rng


def _check_multistep_args(x, model_output, history, step, table) -> None:
    """Checks of one multistep update: metadata, and the step's range where it is a CPU tensor
    (a device one is not read: that would synchronise; the CUDA kernel traps instead)."""
    check_tensor("x", x, dtypes=_HISTORY_DTYPES, min_ndim=1)
    check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES + (torch.float64,), shape=x.shape)
    check_tensor("history", history, dtypes=_HISTORY_DTYPES, shape=(reference.MULTISTEP_HISTORY_SLOTS, *x.shape))
    if x.dtype != history.dtype:
        raise TypeError(f"x must have history's dtype {history.dtype} (the compute dtype), got {x.dtype}")
    check_tensor("step", step, dtypes=(torch.int64,))
    if step.numel() != 1 or step.ndim > 1:
        raise ValueError(f"step must hold one value (0-dim or [1]): the step of the whole batch, "
                         f"got shape {tuple(step.shape)}")
    check_tensor("table", table, dtypes=_HISTORY_DTYPES, ndim=2)
    if table.shape[1] != reference.MULTISTEP_WIDTH or table.shape[0] < 1:
        raise ValueError(f"table must have shape (K, {reference.MULTISTEP_WIDTH}) with K >= 1, "
                         f"got {tuple(table.shape)}")
    check_same_device(x=x, model_output=model_output, history=history, step=step, table=table)
    if step.device.type == "cpu" and not 0 <= int(step.reshape(())) < table.shape[0]:  # no sync on a CPU tensor
        raise ValueError(f"step must lie in [0, {table.shape[0] - 1}] (a row of table), got {int(step.reshape(()))}")


def multistep_step(x, model_output, history, step, table, *, seed: int = 0, sample_offset: int = 0,
                   clip_denoised: bool = False, stochastic: bool = False, noise=None, uncond_output=None,
                   guidance_scale: float = 1.0, threshold=None, backend: str | None = None):
    """One multistep solver step (``reference.multistep_step``); advances ``history`` in place.

    :param x: ``[n, ...]`` float32 (float64 for a float64 run: the reference computes it).
    :param model_output: ``[n, ...]`` float32/bf16/fp16.
    :param history: ``[4, n, ...]`` in x's dtype (``multistep.new_history``): the ring of three stored
        predictions and ``x_last``.
    :param step: int64 0-dim or ``[1]`` on the device: the reverse-process step (row of ``table``,
        and the SDE noise slot).
    :param table: ``[K, 14]`` float32 (``reference.MULTISTEP_COLUMNS``; a float64 one is cast to the
        compute dtype, as the reference's row).
    :param stochastic: add ``cz * z`` with the contract's noise of slot ``step`` (the SDE solver).
    :param noise: explicit standard normals instead (implies the noise term; runs the reference).
    :param uncond_output: classifier-free guidance's unconditional output (model_output's shape,
        dtype and device), or None: the update uses ``u + w * (c - u)`` (in the compute dtype), fused.
    :param guidance_scale: ``w`` (1: the conditional model alone); ignored without uncond_output.
    :param threshold: dynamic thresholding's float32 ``[n]`` bounds on x's device, or None: ``D``
        becomes ``clamp(D, -s, s) / s`` in place of the clip (as ``ddpm_step``'s).
    :return: ``x_next`` in x's dtype (a new tensor; ``x`` is not modified).
    """
    _check_multistep_args(x, model_output, history, step, table)
    _check_guidance(model_output, uncond_output, guidance_scale)
    _check_threshold(x, threshold)
    check_seed(seed)
    if noise is None:
        # float64 runs select against float64, which only the reference supports
        dtype = model_output.dtype if history.dtype == torch.float32 else history.dtype
        impl = _impl("multistep_step", x.device, dtype, backend)
        if impl is not None:
            x_next = x.clone(memory_format=torch.contiguous_format)
            impl(x_next, model_output, history, step, table.to(torch.float32), _noise_key(seed, sample_offset, x.device),
                 bool(clip_denoised), bool(stochastic), None, uncond_output, float(guidance_scale), threshold)
            return x_next
        if stochastic:
            noise = reference.batch_noise(seed, sample_offset, step.reshape(()), x.shape, x.device)
    else:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES + (torch.float64,), shape=x.shape, device=x.device)
    return reference.multistep_step(x, model_output, history, step, table, clip_denoised, noise,
                                    uncond_output=uncond_output, guidance_scale=float(guidance_scale),
                                    threshold=threshold)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def dynamic_threshold(x, model_output, step, table, *, ratio: float, max_value: float, uncond_output=None,
                      guidance_scale: float = 1.0):
    """Dynamic thresholding's per-sample bounds for this step (``reference.dynamic_threshold``;
    Saharia et al. 2022, diffusers' ``thresholding=True``): ``s = clamp(quantile(|x0_hat|, ratio),
    1, max_value)`` per sample, ``x0_hat = a * x + b * out`` from the table's first two columns at
    ``step``.  Pass the result as the step's ``threshold``.  No host synchronisation (the rows are
    gathered with ``index_select``), so it can be captured in a CUDA graph with the step.

    :param x: ``[n, ...]`` float32 (float64 for a float64 multistep run).
    :param model_output: ``[n, ...]`` float32/bf16/fp16 (float64 with a float64 x).
    :param step: int64 ``[n]``, or 0-dim/``[1]`` (one step for the batch), on the device.
    :param table: ``[K, 6]`` DDPM coefficients or ``[K, 14]`` multistep table (``a, b`` first).
    :param ratio: the quantile, in ``(0, 1]`` (diffusers' ``dynamic_thresholding_ratio``, 0.995).
    :param max_value: the largest bound, finite and ``> 0`` (diffusers' ``sample_max_value``); below 1
        every bound is ``max_value``, as ``torch.clamp(q, min=1, max=max_value)`` gives (diffusers').
    :param uncond_output, guidance_scale: classifier-free guidance, as ``ddpm_step``'s: the bound
        is the guided ``x0_hat``'s.
    :return: float32 ``[n]`` on x's device.
    """
    check_tensor("x", x, dtypes=_HISTORY_DTYPES, min_ndim=1)
    check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES + (torch.float64,), shape=x.shape)
    check_tensor("table", table, dtypes=_HISTORY_DTYPES, ndim=2)
    if table.shape[1] not in (len(reference.COEF_COLUMNS), reference.MULTISTEP_WIDTH):
        raise ValueError(f"table must have shape (K, {len(reference.COEF_COLUMNS)}) or "
                         f"(K, {reference.MULTISTEP_WIDTH}), got {tuple(table.shape)}")
    check_tensor("step", step, dtypes=(torch.int64,))
    if step.ndim > 1 or (step.ndim == 1 and step.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"step must be 0-dim or have shape (1,) or ({x.shape[0]},), got {tuple(step.shape)}")
    check_same_device(x=x, model_output=model_output, step=step, table=table)
    _check_guidance(model_output, uncond_output, guidance_scale)
    ratio = _check_real("ratio", ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    max_value = _check_real("max_value", max_value)
    if not 0.0 < max_value < math.inf:
        raise ValueError(f"max_value must be a finite number > 0, got {max_value!r}")
    ab = table.index_select(0, step.reshape(-1))[:, :2]
    return reference.dynamic_threshold(x, model_output, ab, ratio, max_value, uncond_output=uncond_output,
                                       guidance_scale=float(guidance_scale))


def attention(q, k, v, *, backend: str | None = None):
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` over ``[B, heads, L, d]``."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=(q.dtype,), shape=q.shape)
    check_tensor("v", v, dtypes=(q.dtype,), shape=q.shape)
    check_same_device(q=q, k=k, v=v)
    impl = _impl("attention", q.device, q.dtype, backend, int(q.shape[-1]))
    if impl is not None:
        return impl(q, k, v)
    return reference.attention(q, k, v)
