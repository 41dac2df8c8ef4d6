"""``fastddpm.inpaint``: fill the masked-out part of images with a trained model (RePaint, Lugmayr et al. 2022).

``mask`` is 1 where the image is kept and 0 where the model fills it in (diffusers' RePaint convention).
Each reverse step is one fused pass of the step op (``ops.ddpm_step`` with ``known``/``mask``):

    x_{k-1} = m * (sqrt(abar_{k-1}) x0_known + sqrt(1 - abar_{k-1}) z1) + (1 - m) * step(x_k, model(x_k))

the known region the original forward-noised to the step's target level (closed form), the unknown one
the sampler's reverse step (DDPM ancestral, or DDIM with ``eta``).  ``method="repaint"`` resamples: after
every ``jump_length`` steps down it goes back up ``jump_length`` steps by re-noising (``x_k =
sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) z``, the process's own one-step forward), ``jump_n_sample - 1``
times, so the filled region is harmonised with the kept one; ``method="replace"`` never goes back.

The walk is a list of *visits* (diffusers' ``RePaintScheduler.set_timesteps`` in step indices): a reverse
visit calls the model (through the one ``Denoiser``: class labels, model kwargs, guidance) and the fused
step with its row of a per-visit ``[V, 7]`` table; an up visit is the same op with a ``[V, 5]`` row
``(1, 0, 0, sqrt(1 - beta), sqrt(beta))`` and no model call.  Noise follows the contract with the visit
index as the slot: ``z`` of visit ``v`` is slot ``v``, ``x_T`` slot ``V``, the known region's ``z1`` slot
``V + 1 + v`` (drawn inside the op), so an image's result does not depend on ``n`` or the batch split.
After the last step (``abar = 1``) the kept pixels equal the input exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_output_flag, check_sample_args, is_int
from .denoiser import Denoiser
from .diffusion import DDPM
from .local import resolve_pipeline
from .noise import check_noise_capacity
from .ops import reference
from .request import SamplingRequest, check_start_noise, replaced_x
from .thresholding import step_threshold

__all__ = ["inpaint", "repaint_visits", "visit_tables", "INPAINT_METHODS", "DEFAULT_INPAINT_STEPS"]

INPAINT_METHODS = ("repaint", "replace")
DEFAULT_INPAINT_STEPS = 250  # the RePaint paper's (and diffusers' RePaint example's) T
INPAINT_SAMPLERS = ("ddpm", "ddim")


def repaint_visits(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[tuple[bool, int]]:
    """The walk of RePaint over a process of ``num_steps`` steps: ``(up, k)`` per visit, in order.

    ``(False, k)``: the reverse step ``x_k -> x_{k-1}`` (a model call); ``(True, k)``: back up
    ``x_{k-1} -> x_k``.  The same walk as diffusers' ``RePaintScheduler.set_timesteps`` (its timesteps
    divided by ``T // steps``; an up visit is its ``undo_step(t_last)``).  ``jump_n_sample=1``: no
    jumps, ``num_steps`` reverse visits (the ``replace`` method).
    """
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    walk, t = [], num_steps
    while t >= 1:
        t -= 1
        walk.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                walk.append(t)
    visits, last = [], walk[0] + 1
    for t in walk:
        visits.append((False, t) if t < last else (True, last))
        last = t
    return visits


def visit_tables(process: DDPM, visits: list[tuple[bool, int]]) -> dict[str, np.ndarray]:
    """The float64 tables of a walk: ``reverse`` ``[V, 7]`` (the step's ``(a, b, c0, c1, sigma)`` and the
    known region's ``(sqrt(abar_{k-1}), sqrt(1 - abar_{k-1}))``), ``up`` ``[V, 5]`` (``(1, 0, 0,
    sqrt(1 - beta_k), sqrt(beta_k))``), zero rows where a visit is of the other kind, and ``timesteps``
    ``[V]`` (the model timestep of each reverse visit)."""
    c = process.config
    tb = process.schedule.tables64()
    coefs = reference.step_coefficients(process.schedule, c.prediction, c.variance, c.sampler, c.eta)
    V = len(visits)
    rev, up = np.zeros((V, 7)), np.zeros((V, 5))
    timesteps = np.zeros(V, dtype=np.int64)
    kept = np.asarray(process.schedule.timesteps, dtype=np.int64)
    for v, (is_up, k) in enumerate(visits):
        if is_up:
            up[v] = (1.0, 0.0, 0.0, np.sqrt(1.0 - tb["betas"][k]), np.sqrt(tb["betas"][k]))
        else:
            ac_prev = tb["alphas_cumprod_prev"][k]
            rev[v, :5] = coefs[k]
            rev[v, 5:] = (np.sqrt(ac_prev), np.sqrt(1.0 - ac_prev))
        timesteps[v] = kept[k]
    return {"reverse": rev, "up": up, "timesteps": timesteps}


def _check_image(image, shape) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"image must be a float tensor [n, C, H, W] (or [C, H, W]) in [-1, 1], got "
                        f"{image.dtype if isinstance(image, torch.Tensor) else type(image).__name__}")
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(shape):
        raise ValueError(f"image must have the model's image shape [n, {', '.join(map(str, shape))}] "
                         f"(or [{', '.join(map(str, shape))}]), got {tuple(image.shape)}")
    if image.shape[0] < 1:
        raise ValueError("image must hold at least one image, got n=0")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"image has {int((~torch.isfinite(image)).sum())} values that are not finite")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"image must be in the model's data range [-1, 1] (from [0, 1]: 2 * x - 1), got values "
                         f"in [{lo:.4g}, {hi:.4g}]")
    return image


def _check_mask(mask, image: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool or 0/1 numbers; ``[H, W]``, ``[1, H, W]``, ``[C, H, W]``, ``[n, 1, H, W]`` or
    ``[n, C, H, W]``) as float32 of the image's shape, 1 = keep."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor (1 = keep, 0 = fill), got {type(mask).__name__}")
    n, C, H, W = image.shape
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[None]
    ok = mask.ndim == 4 and mask.shape[0] in (1, n) and mask.shape[1] in (1, C) and tuple(mask.shape[2:]) == (H, W)
    if not ok:
        raise ValueError(f"mask must broadcast to the image's shape {(n, C, H, W)}: [H, W], [1, H, W], "
                         f"[n, 1, H, W] or [n, C, H, W] with H, W = {H}, {W}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"mask must be bool or real 0/1 values, got {mask.dtype}")
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            bad = mask[~binary].flatten()[0].item()
            raise ValueError(f"mask must be binary (1 = keep, 0 = fill; e.g. mask > 0.5), got a value {bad!r}")
    return mask.to(torch.float32).expand(n, C, H, W).contiguous()


def _check_method(method, jump_length, jump_n_sample) -> int:
    """The ``jump_n_sample`` the method walks with (1 for ``replace``)."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"method must be one of {INPAINT_METHODS}, got {method!r}")
    repaint_visits(1, jump_length, jump_n_sample)  # checks the two
    return jump_n_sample if method == "repaint" else 1


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask: torch.Tensor, *, method: str = "repaint", jump_length: int = 10,
            jump_n_sample: int = 10, steps: int | None = None, seed: int = 0, sample_offset: int = 0,
            class_labels=None, model_kwargs=None, guidance_scale: float | None = None, uncond_kwargs=None,
            guidance_rescale: float = 0.0, guidance_batching: str = "batched", noise: torch.Tensor | None = None,
            callback=None, batch_size: int | None = None, device=None, progress: bool = True,
            process: DDPM | None = None, **process_options) -> torch.Tensor:
    """Fill in the region where ``mask`` is 0, keep the one where it is 1.

    :param model: any model ``fastddpm.sample`` takes (or a diffusers pipeline: its ``unet`` and scheduler).
    :param image: float ``[n, C, H, W]`` (or ``[C, H, W]``) in [-1, 1], the model's image shape; the
        values under ``mask == 0`` are not read.
    :param mask: 1 = keep, 0 = fill: bool or 0/1 values, ``[H, W]``, ``[1, H, W]``, ``[n, 1, H, W]``
        (broadcast over channels and batch) or ``[n, C, H, W]``.
    :param method: ``"repaint"`` (resampling, Lugmayr et al.) or ``"replace"`` (the known region replaced
        by the forward-noised original at every step, no resampling).
    :param jump_length, jump_n_sample: RePaint's ``j`` and ``r`` (the paper's 10 and 10): every
        ``jump_length`` steps, go back up ``jump_length`` steps, ``jump_n_sample - 1`` times.  Reverse
        model calls: ``steps + (jump_n_sample - 1) * jump_length * (jumps)``, about ``jump_n_sample`` times
        ``steps``.
    :param steps: reverse steps of the (respaced) process; default ``min(250, T)`` (the paper's 250)
        unless ``process`` is already respaced, then its own.
    :param seed, sample_offset: the noise contract's (image ``i`` of a seed is the same whatever ``n``).
    :param class_labels, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale, guidance_batching:
        the conditioning and classifier-free guidance, as ``fastddpm.sample``'s.
    :param noise: ``x_T`` in place of the contract's (slot ``V`` of the walk).
    :param callback: ``callback(v, t, x)`` after each visit (a tensor it returns replaces ``x``).
    :param batch_size: micro-batch size (default: all ``n``).
    :param process, process_options: the process (``sampler="ddpm"`` ancestral, the paper's, or
        ``"ddim"`` with ``eta``; ``clip_denoised``, dynamic thresholding, prediction type, ...).
    :return: float32 ``[n, C, H, W]`` in [-1, 1] on ``device``; pixels with ``mask == 1`` are the input's.
    """
    model, process = resolve_pipeline(model, process)
    jump_n_sample = _check_method(method, jump_length, jump_n_sample)
    adapter = ModelAdapter(model)
    image = _check_image(image, adapter.shape(1)[1:])
    n = image.shape[0]
    check_sample_args(n, sample_offset, batch_size, callback)
    mask = _check_mask(mask, image)
    request = SamplingRequest.make(n, seed=seed, sample_offset=sample_offset, class_labels=class_labels,
                                   model_kwargs=model_kwargs, guidance_scale=guidance_scale,
                                   uncond_kwargs=uncond_kwargs, guidance_rescale=guidance_rescale,
                                   guidance_batching=guidance_batching, noise=noise, callback=callback)
    check_start_noise(request, image.shape)
    if process is not None and not isinstance(process, DDPM):
        raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
    base = DDPM.resolve(process, None, dict(process_options))
    if base.config.sampler not in INPAINT_SAMPLERS:
        raise ValueError(f"inpaint runs the one-step samplers {INPAINT_SAMPLERS} (RePaint goes back up the chain, "
                         f"which a multistep solver's history cannot), got sampler={base.config.sampler!r}")
    if getattr(base.config, "begin_index", 0):
        raise ValueError(f"inpaint walks the whole chain: begin_index must be 0, got {base.config.begin_index} "
                         "(to start part-way from an image, see fastddpm.img2img)")
    if steps is None:
        steps = base.num_steps if base.schedule.is_respaced else min(DEFAULT_INPAINT_STEPS, base.num_steps)
    process = DDPM.resolve(base, steps, {})
    visits = repaint_visits(process.num_steps, jump_length, jump_n_sample)
    V = len(visits)
    numel = int(image[0].numel())
    check_noise_capacity(numel, 2 * V + 1, sample_offset + n - 1)

    device = torch.device(device) if device is not None else adapter.device
    tables = {k: torch.as_tensor(v).to(device) for k, v in visit_tables(process, visits).items()}
    rev = tables["reverse"].to(torch.float32)
    tables = dict(reverse=rev, reverse5=rev[:, :5].contiguous(), up=tables["up"].to(torch.float32),
                  timesteps=tables["timesteps"])
    image, mask = image.to(device=device, dtype=torch.float32), mask.to(device)
    batch_size = batch_size or n
    batches = [(start, part, Denoiser(adapter, part, device)) for start, part in request.batches(batch_size)]
    bar = tqdm(total=V * len(batches), disable=not progress, desc=f"inpaint ({method})", unit="visit", leave=False)
    watch = torch.zeros((), dtype=torch.bool, device=device)
    chunks = []
    for start, part, denoiser in batches:
        stop = start + part.n
        chunks.append(_inpaint_batch(denoiser, adapter, process, visits, tables, part, image[start:stop],
                                     mask[start:stop], device, bar, watch))
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(watch)
    check_finite_values("the inpainted images", x)
    return x


def _inpaint_batch(denoiser, adapter, process, visits, tables, request, known, mask, device, bar, watch):
    V = len(visits)
    seed, offset, n = request.seed, request.sample_offset, request.n
    if request.noise is not None:
        x = request.noise.to(device=device, dtype=torch.float32).reshape(known.shape).clone()
    else:
        x = reference.batch_noise(seed, offset, V, known.shape, device)
    c = process.config
    clip = bool(c.clip_denoised)
    for v, (is_up, k) in enumerate(visits):
        step = torch.full((n,), v, dtype=torch.int64, device=device)
        if is_up:
            x = ops.ddpm_step(x, x, step, tables["up"], seed=seed, sample_offset=offset, clip_denoised=False)
        else:
            t = tables["timesteps"].index_select(0, step)
            out, uncond = denoiser(x.to(adapter.dtype), t, watch)
            w = denoiser.step_scale
            threshold = step_threshold(x, out, step, tables["reverse5"], c.thresholding, uncond, w)
            x = ops.ddpm_step(x, out, step, tables["reverse"], seed=seed, sample_offset=offset, clip_denoised=clip,
                              uncond_output=uncond, guidance_scale=w, threshold=threshold, known=known, mask=mask)
        bar.update(1)
        if request.callback is not None:
            x = replaced_x(request.callback(v, int(tables["timesteps"][v]), x), x)
    return x
