"""The reference implementation: pure PyTorch, the single source of truth.

Every fast backend (``csrc/``, ``kernels/``) is tested against these
functions.  Conventions:

* ``t`` is always a per-sample int64 tensor ``[n]``; tables are gathered with
  it (``extract``), never indexed with a Python int, and branches on values
  are masks, so every function could run inside a CUDA graph.
* Arithmetic is float32 whatever the model output's dtype.
* The reverse step is one elementwise pass driven by a row of six
  coefficients per step, ``(a, b, c0, c1, sigma, c2)`` (``COEF_COLUMNS``)::

      x0_hat = a * x_t + b * out          # from the prediction type
      x0_hat = clamp(x0_hat, -1, 1)       # if clip_denoised
      x_prev = c0 * x0_hat + c1 * x_t + c2 * out + sigma * z

  DDPM (Ho et al. Eq. 6-7, both variances, every prediction type) and DDIM
  (Song et al. Eq. 12, any eta) differ only in the coefficients, which
  ``step_coefficients`` computes in float64.  ``c2`` weights the raw (guided) model
  output: 0 but in DDIM's ``direction="raw"`` (diffusers' ``DDIMScheduler`` with
  ``clip_sample``: the direction from the unclipped output), and where it is 0 the term is
  not added at all (a mask, not ``+ 0 * out``: an inf output the clip bounds stays bounded).
* Classifier-free guidance (Ho & Salimans 2022) is part of the same pass: given the
  unconditional output ``u`` too, the step uses ``out = u + w * (c - u)``
  (``guided_output``; ``w = 1`` is the conditional output ``c`` alone).
* Dynamic thresholding (Saharia et al. 2022, Imagen; diffusers' ``thresholding=True``) too:
  given each sample's bound ``s`` (float32 ``[n]``, ``dynamic_threshold``: a per-sample
  quantile, so a pass of its own before the step), ``x0_hat = clamp(x0_hat, -s, s) / s``
  in place of the ``[-1, 1]`` clamp (``s = 1`` is that clamp).
* Inpainting (RePaint, Lugmayr et al. 2022, Eq. 8-10) too: given the image to keep ``known``,
  its ``mask`` (1 = keep) and a ``[K, 8]`` table whose last two columns ``(ka, kb)`` forward-noise
  ``known`` to the step's target level, ``x_prev = mask * (ka * known + kb * z1) + (1 - mask) *
  x_prev`` (``inpaint_blend``), ``z1`` the contract's normal of slot ``step + K + 1``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..modes import LOSSES, PREDICTIONS, SAMPLERS, VARIANCES
from ..noise import noise_offsets, normal
from ..schedule import NoiseSchedule

__all__ = [
    "PREDICTIONS",
    "VARIANCES",
    "LOSSES",
    "extract",
    "q_sample",
    "training_target",
    "loss_weights",
    "diffusion_loss",
    "step_coefficients",
    "guided_output",
    "dynamic_threshold",
    "apply_threshold",
    "predict_x0",
    "inpaint_blend",
    "ddpm_step",
    "multistep_step",
    "batch_noise",
    "attention",
]

# A one-step row (``ddpm_step``): ``c2`` (the raw output's weight) came last so the first five kept
# their indices (csrc/fused_math.h: kCoefColumns; dispatch, fakes and the kernels check the width).
COEF_COLUMNS = ("a", "b", "c0", "c1", "sigma", "c2")
COEF_WIDTH = len(COEF_COLUMNS)  # 6
# The row of a step that also blends in the known image (inpainting: ``ddpm_step``'s known/mask):
# ``ka, kb`` = sqrt(abar_prev), sqrt(1 - abar_prev) of the step's target level (csrc/fused_math.h:
# kInpaintColumns; dispatch, fakes and the kernels check the width: 8 with known, 6 without).
INPAINT_COEF_COLUMNS = COEF_COLUMNS + ("ka", "kb")
INPAINT_COEF_WIDTH = len(INPAINT_COEF_COLUMNS)  # 8
# The step directions of DDIM's rows (step_coefficients): eps from the clipped x0_hat, or from the raw output.
DIRECTIONS = ("clipped", "raw")
# A multistep solver's [K, 14] row, in the order ``multistep_step`` reads it (``fastddpm.multistep``
# builds it as ``TABLE_COLUMNS``, this tuple; dispatch, fakes and the Triton launcher check its width).
# ``p3`` (the third-previous history term) and ``hx`` (what the ring stores, D + hx * x) came last so
# the first twelve kept their indices; 0 in both is the 12-column update (DPM-Solver++, UniPC).
MULTISTEP_COLUMNS = ("a", "b", "u", "cl", "k0", "k1", "k2", "cx", "p0", "p1", "p2", "cz", "p3", "hx")
MULTISTEP_WIDTH = len(MULTISTEP_COLUMNS)  # 14 (csrc/fused_math.h: kMultistepColumns)
# The history ring: the last three stored predictions (slot step % 3) and x_last (slot 3).
MULTISTEP_RING = 3
MULTISTEP_HISTORY_SLOTS = MULTISTEP_RING + 1  # 4 (csrc/fused_math.h: kHistorySlots)


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``table[t]`` and shape it ``[n, 1, ..., 1]`` to broadcast over a
    batch of ``ndim``-dimensional tensors."""
    return table.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def batch_noise(seed: int, sample_offset: int, slot: torch.Tensor | int, shape, device) -> torch.Tensor:
    """The contract's noise for a batch: sample ``b`` is global sample
    ``sample_offset + b``; ``slot`` is per sample or a scalar."""
    n = shape[0]
    numel = math.prod(shape[1:])  # 1 for a 1-D batch; plain ints keep it traceable
    samples = torch.arange(sample_offset, sample_offset + n, device=device, dtype=torch.int64)
    return normal(seed, noise_offsets(samples, slot, numel)).reshape(shape)


# -- forward process and training -------------------------------------------------
def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. Eq. 4)."""
    x0 = x0.float()
    return (
        extract(sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise.float()
    )


def training_target(prediction, x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """What the model learns to output: ``eps``, ``x0``, or
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022)."""
    if prediction == "epsilon":
        return noise.float()
    if prediction == "x0":
        return x0.float()
    if prediction == "v":
        return (
            extract(sqrt_alphas_cumprod, t, x0.ndim) * noise.float()
            - extract(sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0.float()
        )
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def loss_weights(schedule: NoiseSchedule, prediction: str, min_snr_gamma: float | None) -> np.ndarray:
    """Per-timestep loss weights, float64 ``[T]``: ones, or min-SNR-gamma
    (Hang et al. 2023) expressed for the prediction type so that every type
    weights the same x0-error by ``min(SNR, gamma)``."""
    snr = schedule.tables64()["snr"]
    if min_snr_gamma is None:
        return np.ones_like(snr)
    clipped = np.minimum(snr, float(min_snr_gamma))
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def elementwise_loss(diff_input, target, loss_type: str, huber_delta: float = 1.0):
    if loss_type == "l2":
        return F.mse_loss(diff_input, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(diff_input, target, reduction="none")
    if loss_type == "huber":
        return F.huber_loss(diff_input, target, reduction="none", delta=huber_delta)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss_type!r}")


def diffusion_loss(model_output, x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                   prediction="epsilon", loss_type="l2", huber_delta=1.0):
    """Training loss: per-sample mean of the elementwise loss against the
    target, times ``weights[t]``, averaged over the batch (a 0-dim float32)."""
    target = training_target(prediction, x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    per_elem = elementwise_loss(model_output.float(), target, loss_type, huber_delta)
    per_sample = per_elem.reshape(per_elem.shape[0], -1).mean(dim=1)
    return (per_sample * weights.gather(0, t)).mean()


# -- reverse process -----------------------------------------------------------------
def step_coefficients(schedule: NoiseSchedule, prediction: str = "epsilon", variance: str = "fixed_small",
                      sampler: str = "ddpm", eta: float = 0.0, final_alpha_cumprod: float | None = None,
                      direction: str = "clipped") -> np.ndarray:
    """The ``(a, b, c0, c1, sigma, c2)`` row of every step, float64 ``[K, 6]`` (``COEF_COLUMNS``).

    ``a, b`` turn the model output into ``x0_hat`` (epsilon: Eq. 15 of Ho et al.;
    v: ``x0 = sqrt(abar) x_t - sqrt(1-abar) v``).  DDPM uses the posterior
    mean of Eq. 7 and ``sigma^2 = beta_tilde`` (fixed_small) or ``beta``
    (fixed_large).  DDIM rewrites Eq. 12 of Song et al. with ``eps`` re-derived
    from the (clipped) ``x0_hat``, as improved-diffusion and GLIDE do.
    ``sigma_0 = 0``: the last step adds no noise -- except DDIM given ``final_alpha_cumprod``
    (diffusers' ``set_alpha_to_one=False``: the last step lands on that ``abar``, e.g. the full
    schedule's ``abar_0``, instead of 1, with eta's noise as any other step).

    ``direction`` (DDIM only): ``"clipped"`` (the above; ``c2 = 0``) or ``"raw"``, diffusers'
    ``DDIMScheduler`` with ``clip_sample=True`` (``use_clipped_model_output=False``): ``x_prev =
    sqrt(abar_prev) clip(x0_hat) + sqrt(1 - abar_prev - sigma^2) eps_raw + sigma z``, ``eps_raw = ex x_t
    + eo out`` the epsilon of the raw output (epsilon: ``out``; v: ``sqrt(abar) out + sqrt(1-abar) x_t``;
    x0: ``(x_t - sqrt(abar) out) / sqrt(1-abar)``), so ``c0 = sqrt(abar_prev)``, ``c1`` and ``c2`` the
    direction times ``ex`` and ``eo``.  Without a clip (or threshold) both directions are the same step.
    DDPM's rows always have ``c2 = 0``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction != "clipped" and sampler != "ddim":
        raise ValueError(f"direction={direction!r} is DDIM's (diffusers' clip_sample), not sampler={sampler!r}'s")
    tb = schedule.tables64()
    ac, ac_prev = tb["alphas_cumprod"], tb["alphas_cumprod_prev"]
    if final_alpha_cumprod is not None:
        if sampler != "ddim":
            raise ValueError(f"final_alpha_cumprod is DDIM's (set_alpha_to_one=False), not sampler={sampler!r}'s")
        if not 0.0 < final_alpha_cumprod <= 1.0:
            raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod!r}")
        ac_prev = ac_prev.copy()
        ac_prev[0] = float(final_alpha_cumprod)
    # x0_hat = a x + b out; eps_raw = ex x + eo out (the raw output's epsilon, DDIM's raw direction)
    if prediction == "epsilon":
        a, b = tb["sqrt_recip_alphas_cumprod"], -tb["sqrt_recipm1_alphas_cumprod"]
        ex, eo = np.zeros_like(ac), np.ones_like(ac)
    elif prediction == "x0":
        a, b = np.zeros_like(ac), np.ones_like(ac)
        ex, eo = 1.0 / np.sqrt(1.0 - ac), -np.sqrt(ac) / np.sqrt(1.0 - ac)
    elif prediction == "v":
        a, b = tb["sqrt_alphas_cumprod"], -tb["sqrt_one_minus_alphas_cumprod"]
        ex, eo = tb["sqrt_one_minus_alphas_cumprod"], tb["sqrt_alphas_cumprod"]
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    c2 = np.zeros_like(ac)
    if sampler == "ddpm":
        c0, c1 = tb["posterior_mean_coef1"], tb["posterior_mean_coef2"]
        if variance == "fixed_small":
            sigma = np.sqrt(tb["posterior_variance"])
        elif variance == "fixed_large":
            sigma = np.sqrt(tb["betas"])
        else:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    elif sampler == "ddim":
        if not (isinstance(eta, (int, float)) and eta >= 0 and np.isfinite(eta)):
            raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
        sigma = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
        weight = np.sqrt(np.maximum(1.0 - ac_prev - sigma**2, 0.0))
        if direction == "clipped":
            # x_prev = sqrt(abar_prev) x0 + weight * eps,  eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            c1 = weight / np.sqrt(1.0 - ac)
            c0 = np.sqrt(ac_prev) - c1 * np.sqrt(ac)
        else:
            # x_prev = sqrt(abar_prev) x0 + weight * eps_raw,  eps_raw = ex x_t + eo out
            c0, c1, c2 = np.sqrt(ac_prev), weight * ex, weight * eo
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sigma = np.array(sigma, dtype=np.float64)
    if final_alpha_cumprod is None:
        sigma[0] = 0.0
    return np.stack([a, b, c0, c1, sigma, c2], axis=1)


def guided_output(model_output, uncond_output, guidance_scale: float, dtype: torch.dtype = torch.float32):
    """The model output a step uses, in ``dtype``: classifier-free guidance (Ho & Salimans 2022,
    diffusers' convention) ``u + w * (c - u)`` with ``c = model_output`` (the conditional output),
    ``u = uncond_output`` and ``w = guidance_scale`` (1: the conditional model alone); or
    ``model_output`` itself where ``uncond_output`` is None (``guidance_scale`` ignored)."""
    c = model_output.to(dtype)
    if uncond_output is None:
        return c
    u = uncond_output.to(dtype)
    return u + guidance_scale * (c - u)


def dynamic_threshold(x, model_output, ab, ratio: float, max_value: float, uncond_output=None,
                      guidance_scale: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding's per-sample bounds (Saharia et al. 2022, Sec. 2.3; diffusers'
    ``_threshold_sample``): ``s = clamp(quantile(|x0_hat|, ratio), 1, max_value)`` over each
    sample's elements, in float32.

    :param x: ``[n, ...]`` the current sample.
    :param model_output: ``[n, ...]`` any float dtype (the conditional output, with guidance).
    :param ab: ``[n, 2]`` or ``[1, 2]`` rows ``(a, b)`` with ``x0_hat = a * x + b * out``: the
        first two columns of the DDPM ``[K, 6]`` table or the multistep ``[K, 14]`` one
        (``table.index_select(0, step)[:, :2]``).
    :param ratio: the quantile, in ``(0, 1]`` (diffusers' ``dynamic_thresholding_ratio``).
    :param max_value: the largest bound, ``> 0`` (diffusers' ``sample_max_value``).
    :param uncond_output, guidance_scale: as ``guided_output``.
    :return: float32 ``[n]``, each in ``[1, max_value]``; every one ``max_value`` when it is below 1
        (``torch.clamp`` with ``min > max`` gives ``max``: diffusers' ``_threshold_sample`` the same).
    """
    n = x.shape[0]
    shape = (ab.shape[0],) + (1,) * (x.ndim - 1)
    ab = ab.float()
    out = guided_output(model_output, uncond_output, guidance_scale)
    x0_hat = ab[:, 0].reshape(shape) * x.float() + ab[:, 1].reshape(shape) * out
    s = torch.quantile(x0_hat.abs().reshape(n, -1), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def apply_threshold(x0_hat, threshold):
    """``clamp(x0_hat, -s, s) / s`` with sample ``b``'s bound ``s = threshold[b]`` (float32 ``[n]``),
    in ``x0_hat``'s dtype."""
    s = threshold.to(x0_hat.dtype).reshape((threshold.shape[0],) + (1,) * (x0_hat.ndim - 1))
    return torch.clamp(x0_hat, -s, s) / s


def predict_x0(x_t, model_output, coefs, clip_denoised: bool, *, uncond_output=None, guidance_scale: float = 1.0,
               threshold=None):
    """The step's float32 ``x0_hat = a * x_t + b * out`` from each sample's ``coefs`` row
    (``[n, 6]``, as ``ddpm_step``), clamped to ``[-1, 1]`` if ``clip_denoised``; ``out`` is
    ``guided_output(model_output, uncond_output, guidance_scale)``.  With ``threshold`` (float32
    ``[n]``, ``dynamic_threshold``'s bounds) ``apply_threshold`` instead, whatever ``clip_denoised``."""
    shape = (coefs.shape[0],) + (1,) * (x_t.ndim - 1)
    out = guided_output(model_output, uncond_output, guidance_scale)
    x0_hat = coefs[:, 0].reshape(shape) * x_t.float() + coefs[:, 1].reshape(shape) * out
    if threshold is not None:
        return apply_threshold(x0_hat, threshold)
    return x0_hat.clamp(-1.0, 1.0) if clip_denoised else x0_hat


def inpaint_blend(x_prev, known, mask, coefs, known_noise):
    """RePaint's blend (Lugmayr et al. 2022, Eq. 8-10): the known region forward-noised to the
    step's target level, the rest the reverse step's sample, in float32::

        x_prev = mask * (ka * known + kb * z1) + (1 - mask) * x_prev

    Written as ``m * known_part + (1 - m) * step_part`` so that ``m = 1, ka = 1, kb = 0`` (after
    the last step) gives ``known`` bit for bit, and ``m = 0`` the step's ``x_prev`` bit for bit.

    :param x_prev: float32 ``[n, ...]``, the reverse step's result.
    :param known: ``[n, ...]`` the image to keep (float32).
    :param mask: ``[n, ...]`` 1 where ``known`` is kept, 0 where the model fills in.
    :param coefs: ``[n, 8]`` each sample's row (``INPAINT_COEF_COLUMNS``): ``ka, kb`` are the last two.
    :param known_noise: ``[n, ...]`` standard normals ``z1`` (the contract's slot ``step + K + 1``).
    """
    if coefs.shape[-1] != len(INPAINT_COEF_COLUMNS):
        raise ValueError(f"coefs must have {len(INPAINT_COEF_COLUMNS)} columns {INPAINT_COEF_COLUMNS} with known, "
                         f"got shape {tuple(coefs.shape)}")
    shape = (coefs.shape[0],) + (1,) * (x_prev.ndim - 1)
    ka, kb = coefs[:, COEF_WIDTH].reshape(shape), coefs[:, COEF_WIDTH + 1].reshape(shape)
    m = mask.float()
    return m * (ka * known.float() + kb * known_noise.float()) + (1.0 - m) * x_prev


def ddpm_step(x_t, model_output, coefs, clip_denoised: bool, noise, *, uncond_output=None,
              guidance_scale: float = 1.0, threshold=None, known=None, mask=None, known_noise=None):
    """One reverse step, elementwise.

    :param x_t: float32 ``[n, ...]``.
    :param model_output: ``[n, ...]``, any float dtype (computed in float32).
    :param coefs: float32 ``[n, 6]``: each sample's ``(a, b, c0, c1, sigma, c2)`` row (``[n, 8]``,
        ``INPAINT_COEF_COLUMNS``, with ``known``); ``c2`` weights ``out`` itself, where it is not 0.
    :param clip_denoised: clamp ``x0_hat`` to ``[-1, 1]``.
    :param noise: float32 ``[n, ...]`` standard normals.
    :param uncond_output: the unconditional output (model_output's shape), or None: no guidance.
    :param guidance_scale: ``w`` of ``guided_output``.
    :param threshold: float32 ``[n]`` dynamic-thresholding bounds (``dynamic_threshold``), or None:
        ``x0_hat`` is ``apply_threshold``'s in place of the clip.
    :param known, mask, known_noise: inpainting (``inpaint_blend``): the image to keep, its mask
        (1 = keep) and the normals ``z1`` of its forward noising, each ``[n, ...]``; or all None.
    :return: ``x_{t-1}`` in float32.
    """
    shape = (coefs.shape[0],) + (1,) * (x_t.ndim - 1)
    c0, c1, sigma, c2 = (coefs[:, i].reshape(shape) for i in (2, 3, 4, 5))
    x0_hat = predict_x0(x_t, model_output, coefs, clip_denoised, uncond_output=uncond_output,
                        guidance_scale=guidance_scale, threshold=threshold)
    x_prev = c0 * x0_hat + c1 * x_t.float()
    # c2 = 0: no term (a mask, so that an inf output the clip bounded stays bounded)
    x_prev = torch.where(c2 != 0, x_prev + c2 * guided_output(model_output, uncond_output, guidance_scale), x_prev)
    x_prev = x_prev + sigma * noise.float()
    if known is None:
        if mask is not None or known_noise is not None:
            raise ValueError("mask and known_noise are the inpainting blend's: they need known")
        return x_prev
    if mask is None or known_noise is None:
        raise ValueError("known needs mask and known_noise (the inpainting blend)")
    return inpaint_blend(x_prev, known, mask, coefs, known_noise)


def multistep_step(x, model_output, history, step, table, clip_denoised: bool, noise, *, uncond_output=None,
                   guidance_scale: float = 1.0, threshold=None):
    """One multistep solver step (``fastddpm.multistep``), elementwise; advances ``history`` in place::

        D      = a * x + b * out                           # clamped to [-1, 1] if clip_denoised
                                                           # (thresholded instead, given threshold)
        E      = D + hx * x                                # what the ring keeps (hx = 0: D itself)
        x_corr = u * x + cl * history[3] + k0 * D + k1 * H1 + k2 * H2
        x_next = cx * x_corr + p0 * D + p1 * H1 + p2 * H2 + p3 * H3 + cz * z
        history[step % 3] = E,  history[3] = x_corr

    with ``out = guided_output(model_output, uncond_output, guidance_scale)`` and the ring read before
    it is written: ``H1 = history[(step + 1) % 3]``, ``H2 = history[(step + 2) % 3]``,
    ``H3 = history[step % 3]``.  The step index counts down, so these are the ``E`` of the previous
    call (step + 1), of two calls back and of three calls back.  ``p3 = hx = 0`` (DPM-Solver++,
    UniPC) is the 12-column update bit for bit: ``+ 0 * H3`` and ``+ 0 * x`` add an exact zero.
    Computed in ``history``'s dtype (float32, or float64 for a float64 run), the guidance too.

    :param x: ``[n, ...]`` current sample.
    :param model_output: ``[n, ...]`` any float dtype.
    :param history: ``[4, n, ...]`` the ring of the last three stored predictions ``E`` and the
        last ``x_corr`` (``MULTISTEP_HISTORY_SLOTS``).
    :param step: int64 tensor holding one value: the reverse-process step index (row of ``table``).
    :param table: ``[K, 14]`` coefficient table (``MULTISTEP_COLUMNS``; its row is cast to the
        compute dtype).
    :param noise: ``[n, ...]`` standard normals for the SDE solver, or None (no noise term).
    :param uncond_output: the unconditional output (model_output's shape), or None: no guidance.
    :param guidance_scale: ``w`` of ``guided_output``.
    :param threshold: float32 ``[n]`` dynamic-thresholding bounds, or None: ``D`` is
        ``apply_threshold``'s (in the compute dtype) in place of the clip.
    :return: the next sample, in the compute dtype.
    """
    dtype = history.dtype
    step = step.reshape(1)
    row = table.index_select(0, step).to(dtype).reshape(-1).unbind(0)
    a, b, u, cl, k0, k1, k2, cx, p0, p1, p2, cz, p3, hx = row
    x = x.to(dtype)
    d = a * x + b * guided_output(model_output, uncond_output, guidance_scale, dtype)
    if threshold is not None:
        d = apply_threshold(d, threshold)
    elif clip_denoised:
        d = d.clamp(-1.0, 1.0)
    cur = torch.remainder(step, MULTISTEP_RING)  # ring slot: written at this step, read at the next three
    h1 = history.index_select(0, torch.remainder(step + 1, MULTISTEP_RING))[0]
    h2 = history.index_select(0, torch.remainder(step + 2, MULTISTEP_RING))[0]
    h3 = history.index_select(0, cur)[0]
    x_last = history[MULTISTEP_RING]
    x_corr = u * x + cl * x_last + k0 * d + k1 * h1 + k2 * h2
    x_next = cx * x_corr + p0 * d + p1 * h1 + p2 * h2 + p3 * h3
    if noise is not None:
        x_next = x_next + cz * noise.to(dtype)
    history.index_copy_(0, cur, (d + hx * x).unsqueeze(0))
    x_last.copy_(x_corr)
    return x_next


def attention(q, k, v):
    """Softmax attention over ``[B, heads, L, d]`` (scale ``d**-0.5``)."""
    return F.scaled_dot_product_attention(q, k, v)
