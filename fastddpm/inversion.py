"""DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F): an image to the ``x_T``
that the deterministic DDIM sampler maps back to it.

    x_T = fastddpm.invert(model, images, steps=50, process=process)
    again = fastddpm.sample(model, len(images), noise=x_T, sampler="ddim", eta=0, steps=50, process=process)

The convention is diffusers' ``DDIMInverseScheduler`` (``set_alpha_to_one=True``, no clipping), on the
kept timesteps ``t_0 < ... < t_{K-1}`` of the same respaced process the sampler runs.  Step ``i`` takes
``x`` from the level of ``t_{i-1}`` (``abar = 1`` before the first: the image itself) to that of ``t_i``,
with the model called at ``t_i`` (the step's destination, as diffusers' pipelines call it) and its
output read as ``x0`` and ``eps`` at the current level, then DDIM's Eq. 12 with eta = 0::

    x0  = x0_hat(x, out; abar_cur)            # the prediction type, at the current level
    eps = eps_hat(x, out; abar_cur)
    x   = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps

(diffusers' ``timestep - T // steps`` is the previous kept timestep for ``leading`` spacing and for
``trailing`` with steps dividing T; here it is the previous kept timestep for every spacing.)

The update is linear in ``(x, out)``, so it is a row ``(a, b, c0, c1, sigma = 0, c2 = 0)`` of the fused step op
``ops.ddpm_step`` with the clip off (``inverse_step_coefficients``, float64 on the host): the loop runs
on every backend, and the model call is the package's one ``Denoiser`` (class labels,
``model_kwargs``, classifier-free guidance), as the samplers make it.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_float_dtype, check_output_flag
from .denoiser import Denoiser
from .diffusion import DDPM
from .image_tensors import check_model_images
from .local import resolve_pipeline
from .modes import PREDICTIONS
from .noise import check_noise_capacity
from .request import SamplingRequest, replaced_x
from .schedule import NoiseSchedule

__all__ = ["invert", "inverse_step_coefficients", "inversion_process"]

# the conditioning keywords invert takes beside its named ones (fastddpm.request.REQUEST_OPTIONS less noise)
_REQUEST_EXTRAS = ("uncond_kwargs", "guidance_rescale", "guidance_batching")


def inverse_step_coefficients(schedule: NoiseSchedule, prediction: str = "epsilon",
                              start_alpha_cumprod: float = 1.0) -> np.ndarray:
    """The ``(a, b, c0, c1, sigma, c2)`` row of every inverse DDIM step, float64 ``[K, 6]``, for ``ops.ddpm_step``
    with ``clip_denoised=False``: row ``i`` takes ``x`` from ``abar_cur = abar[i - 1]`` (``start_alpha_cumprod``
    for ``i = 0``) to ``abar_next = abar[i]`` of ``schedule`` (respaced: its kept timesteps).

    ``a, b`` are the prediction type's ``x0_hat = a x + b out`` at ``abar_cur`` (diffusers'
    ``pred_original_sample``), and ``c0, c1`` solve ``c0 x0_hat + c1 x = A x + B out``, the DDIM update
    ``sqrt(abar_next) x0 + sqrt(1 - abar_next) eps`` with ``eps`` converted at ``abar_cur`` too.  At
    ``abar_cur = 1`` (the first row of diffusers' ``set_alpha_to_one=True``) ``x`` is its own ``x0``:

    * epsilon and v give ``b = 0`` there (``out`` does not move ``x0_hat``), so the row is written
      ``(0, 1, B, A)`` (``x0_hat`` then stands for ``out``; nothing clips it);
    * x0 has no noise direction there (diffusers divides by ``sqrt(1 - 1)``: inf/NaN), so the
      direction is read at the level of the model call, ``eps = (x - sqrt(abar_next) out) /
      sqrt(1 - abar_next)``, which makes the step the identity ``(0, 1, 0, 1)``: the image is taken as
      ``x_{t_0}`` (``t_0 = 0`` by default spacing: ``abar`` within 1e-4 of 1).

    :param schedule: the process's (respaced) schedule: ``alphas_cumprod64`` are the steps' levels.
    :param prediction: ``epsilon``, ``x0`` or ``v``.
    :param start_alpha_cumprod: the level of the image, in (0, 1]: 1 (diffusers' ``set_alpha_to_one=True``),
        or ``abar_0`` of the unrespaced process (``False``).
    :return: float64 ``[K, 6]``, sigma 0 and c2 0 (``reference.COEF_COLUMNS``).
    """
    if not 0.0 < start_alpha_cumprod <= 1.0:
        raise ValueError(f"start_alpha_cumprod must lie in (0, 1], got {start_alpha_cumprod!r}")
    ac_next = schedule.alphas_cumprod64
    ac_cur = np.append(float(start_alpha_cumprod), ac_next[:-1])
    top = ac_cur == 1.0  # x is its own x0: sqrt(1 - abar_cur) = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s_cur, r_cur = np.sqrt(ac_cur), np.sqrt(1.0 - ac_cur)
        # x0_hat = a x + b out and eps_hat = ex x + eo out, both at the current level (diffusers' step, part 3)
        if prediction == "epsilon":
            a, b, ex, eo = 1.0 / s_cur, -r_cur / s_cur, np.zeros_like(ac_cur), np.ones_like(ac_cur)
        elif prediction == "x0":
            a, b, ex, eo = np.zeros_like(ac_cur), np.ones_like(ac_cur), 1.0 / r_cur, -s_cur / r_cur
        elif prediction == "v":
            a, b, ex, eo = s_cur, -r_cur, r_cur, s_cur
        else:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        # Eq. 12 of Song et al. with eta = 0: x_next = A x + B out
        s_next, r_next = np.sqrt(ac_next), np.sqrt(1.0 - ac_next)
        A, B = s_next * a + r_next * ex, s_next * b + r_next * eo
        c0 = B / b
        c1 = A - c0 * a
    if prediction == "x0":
        A, B = np.where(top, 1.0, A), np.where(top, 0.0, B)  # the identity, see above
    # rows where out does not move x0_hat: x0_hat := out, c0 = B, c1 = A
    c0, c1 = np.where(top, B, c0), np.where(top, A, c1)
    a, b = np.where(top, 0.0, a), np.where(top, 1.0, b)
    rows = np.stack([a, b, c0, c1, np.zeros_like(ac_next), np.zeros_like(ac_next)], axis=1)
    if not np.isfinite(rows).all():
        raise ValueError(f"the inverse DDIM table of this schedule is not finite (abar in "
                         f"[{ac_next.min():.3g}, {ac_next.max():.3g}]): a level of 0 cannot be inverted")
    return rows


def inversion_process(process: DDPM | None, steps: int | None, options: dict) -> DDPM:
    """The DDIM process (eta 0) of ``steps`` that ``invert`` walks backward and ``fastddpm.sample(...,
    sampler="ddim", eta=0, steps=steps)`` walks forward: ``DDPM.resolve`` of ``process`` (None: the
    process of ``options``) with DDIM set.  ``options`` are config fields (popped: sampler, eta);
    another sampler or a non-zero eta raises, as they are not what is inverted."""
    sampler = options.pop("sampler", "ddim")
    eta = options.pop("eta", 0.0)
    if sampler != "ddim":
        raise ValueError(f"invert inverts deterministic DDIM (sampler='ddim', eta=0); got sampler={sampler!r}: "
                         f"reconstruct with fastddpm.sample(..., noise=x_T, sampler='ddim', eta=0)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta != 0:
        raise ValueError(f"invert inverts deterministic DDIM (eta=0): a stochastic sampler has no inverse, "
                         f"got eta={eta!r}")
    return DDPM.resolve(process, steps, {**options, "sampler": "ddim", "eta": 0.0})


@torch.no_grad()
def invert(model, image, *, steps: int | None = 50, seed: int = 0, class_labels=None, model_kwargs=None,
           guidance_scale: float | None = None, process: DDPM | None = None, progress: bool = True, device=None,
           callback=None, **options) -> torch.Tensor:
    """DDIM inversion: the ``x_T`` from which ``fastddpm.sample(model, n, noise=x_T, sampler="ddim", eta=0,
    steps=steps, process=process)`` reconstructs ``image`` (up to the inversion's approximation: the model is
    called on the current ``x`` at the next timestep; exact where the model's noise prediction does not
    change over a step).

    The round trip is closest sampled back without the x0 clip (``clip_denoised=False``): the inversion never
    clips, and on the shipped digits model the clip's error grows with the steps on a few images
    (``benchmarks/results/inversion_cpu.md``: mean MSE 3.8e-4 unclipped against 8.6e-3 clipped at 100 steps).

    :param model: as ``fastddpm.sample`` takes it (a diffusers pipeline: its unet and scheduler).
    :param image: float ``[n, C, H, W]`` or ``[C, H, W]`` in [-1, 1], the model's channels and size.
    :param steps: DDIM steps (a respacing of ``process``, as ``sample``'s ``steps``); None: the process's own.
    :param seed: the noise key given to the step op (its sigma is 0: ``x_T`` does not depend on it).
    :param class_labels, model_kwargs, guidance_scale: the conditioning, as ``fastddpm.sample`` (also
        ``uncond_kwargs``, ``guidance_rescale``, ``guidance_batching`` in ``options``); reconstruct with the same.
    :param process: the model's ``DDPM`` (``fastddpm.load_model`` returns it); run as DDIM with eta 0 whatever
        its sampler.  Never clipped or thresholded: a clipped ``x0`` has no inverse.
    :param progress: a tqdm bar.
    :param device: where to run (default: the model's).
    :param callback: ``callback(i, t, x)`` after step ``i`` (``x`` now at the level of model timestep ``t``); a
        tensor it returns replaces ``x``, as ``fastddpm.sample``'s.
    :param options: config fields of the process (``schedule``, ``prediction``, ``timestep_spacing`` ...;
        ``sampler`` may only be ``"ddim"`` and ``eta`` 0), ``image_size``/``channels`` for a model that does
        not say, and the conditioning keywords above.
    :return: float32 ``[n, C, H, W]`` ``x_T`` on ``device``.
    """
    model, process = resolve_pipeline(model, process)
    request_options = {k: options.pop(k) for k in _REQUEST_EXTRAS if k in options}
    adapter = ModelAdapter(model, image_size=options.pop("image_size", None), channels=options.pop("channels", None))
    process = inversion_process(process, steps, options)
    check_float_dtype("the model's dtype", adapter.dtype)
    device = torch.device(device) if device is not None else adapter.device
    x = check_model_images("image", image, adapter.shape(1)[1:]).to(device)
    n = x.shape[0]
    request = SamplingRequest.make(n, seed=seed, class_labels=class_labels, model_kwargs=model_kwargs,
                                   guidance_scale=guidance_scale, callback=callback, **request_options)
    K = process.num_steps
    check_noise_capacity(x[0].numel(), K + 1, n - 1)
    denoiser = Denoiser(adapter, request, device)  # checks the conditioning against the model, before any call
    coefs = torch.as_tensor(inverse_step_coefficients(process.schedule, process.config.prediction),
                            dtype=torch.float64).to(torch.float32).to(device)
    timesteps = process.tables(device)["timesteps"]
    watch = torch.zeros((), dtype=torch.bool, device=device)  # any model output non-finite or beyond the limit
    bar = tqdm(total=K, disable=not progress, desc="inverting", unit="step", leave=False)
    for i in range(K):  # upward: t_0 -> t_{K-1}
        step = torch.full((n,), i, dtype=torch.int64, device=device)
        out, uncond = denoiser(x.to(adapter.dtype), timesteps[step], watch)
        x = ops.ddpm_step(x=x, model_output=out, step=step, coefs=coefs, seed=seed, sample_offset=0,
                          clip_denoised=False, uncond_output=uncond, guidance_scale=denoiser.step_scale)
        bar.update(1)
        if callback is not None:
            x = replaced_x(callback(i, int(process.schedule.timesteps[i]), x), x)
    bar.close()
    check_output_flag(watch)
    return check_finite_values("the inverted noise x_T", x)
