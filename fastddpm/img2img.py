"""Image-to-image: SDEdit (Meng et al. 2022) with any sampler, ``fastddpm.img2img``.

SDEdit noises a guide image to an intermediate time ``t0`` with the forward process in closed
form, ``x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) z``, and solves the reverse process from there:
the larger ``t0``, the more the result follows the model rather than the image.  ``strength`` picks
``t0`` as diffusers' img2img pipelines do (``get_timesteps``)::

    init_timestep = min(int(N * strength), N)      # N: the sampling plan's steps
    t_start       = max(N - init_timestep, 0)      # begin_index: the plan's steps skipped

and the plan runs from its step ``t_start`` on: ``DiffusionConfig.begin_index``, which every
sampling path (the eager loop, the engine, micro-batches, distributed shards) takes from the
process, as diffusers' ``scheduler.set_begin_index(t_start)``.  The start is diffusers'
``add_noise`` at the plan's start: ``q_sample`` at the first kept timestep for DDPM/DDIM, the
plan's own start sigma for a multistep solver (``alpha = 1/sqrt(1 + sigma^2)``: a Karras sigma need
not be a timestep's).

Noise: ``z`` is the noise contract's slot ``K'`` (``batch_noise(seed, sample_offset, K', ...)``) where
``K'`` are the steps that run: the begun process's x_T slot, which none of its steps (slots
``0 .. K'-1``, the whole chain's own) uses.  So sample ``i`` of a seed is the same whatever ``n``
or the batch split, and ``strength=1`` (``K' = N``: every step runs) is ``fastddpm.sample`` itself,
a plain sample from the contract's x_T that ignores the image.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .adapters import ModelAdapter
from .checks import check_sample_args
from .config import DiffusionConfig
from .diffusion import DDPM
from .image_tensors import check_model_images
from .local import resolve_pipeline
from .noise import check_seed
from .ops import reference
from .request import REQUEST_OPTIONS, SamplingRequest
from .sampling import sample

__all__ = ["img2img", "start_step"]

PROCESS_OPTIONS = frozenset(f.name for f in dataclasses.fields(DiffusionConfig))
RANGE_SLACK = 1e-5  # images at +-1 that rounding moved past it


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number in [0, 1] (0: the image, 1: a plain sample), "
                        f"got {type(strength).__name__}")
    if not 0.0 <= float(strength) <= 1.0:  # nan fails too
        raise ValueError(f"strength must be in [0, 1] (0: the image, 1: a plain sample), got {strength!r}")
    return float(strength)


def start_step(num_steps: int, strength: float) -> int:
    """``t_start``: the leading steps of an ``num_steps``-step plan that img2img skips at ``strength``
    (diffusers' ``get_timesteps``; the scheduler's ``order`` is 1 for every sampler here)."""
    init_timestep = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_timestep, 0)


@torch.no_grad()
def img2img(model, image, *, strength: float = 0.6, steps: int | None = None, seed: int = 0, sample_offset: int = 0,
            class_labels=None, model_kwargs=None, guidance_scale: float | None = None, process: DDPM | None = None,
            progress: bool = True, device=None, **options) -> torch.Tensor:
    """SDEdit: ``image`` noised to ``t0 = strength * T`` (closed form) and sampled from there.

    :param model: as ``fastddpm.sample`` (a diffusers pipeline gives its ``unet`` and scheduler).
    :param image: float ``[n, C, H, W]`` (or ``[C, H, W]``: n = 1) in [-1, 1], the model's image shape.
    :param strength: in [0, 1]: how much of the plan runs (diffusers' img2img ``strength``).  0 returns
        the image (a float32 copy on ``device``), as does any strength that leaves no step to run
        (``int(N * strength) = 0``); 1 is ``fastddpm.sample(model, n, seed=seed, ...)`` exactly.
    :param steps: the whole plan's steps ``N``, as ``sample``'s (a respacing for DDPM/DDIM, model calls
        for a multistep solver, default 20); about ``strength * N`` of them run.
    :param seed, sample_offset: the noise contract's: the start noise (slot ``K'``) and every step's.
    :param class_labels, model_kwargs, guidance_scale: conditioning and classifier-free guidance, as
        ``sample``'s (``uncond_kwargs``, ``guidance_rescale``, ``guidance_batching`` go in ``options``).
    :param process: a ``DDPM`` (its own ``begin_index`` is replaced by the one ``strength`` gives).
    :param progress, device: as ``sample``'s.
    :param options: the rest of ``sample``'s keywords (``batch_size``, ``engine``, ``dtype``, ``callback``,
        ``distributed``, ...) and process options (``sampler``, ``eta``, ...); not ``noise`` or
        ``begin_index``, which img2img makes.
    :return: float32 ``[n, C, H, W]`` in [-1, 1] on ``device``.
    """
    for made in ("noise", "begin_index"):
        if made in options:
            raise TypeError(f"img2img makes {made}= itself (from image, strength and seed); use "
                            f"fastddpm.sample(..., {made}=...) to give it")
    strength = _check_strength(strength)
    model, process = resolve_pipeline(model, process)
    adapter = ModelAdapter(model, image_size=options.get("image_size"), channels=options.get("channels"))
    image = check_model_images("image", image, adapter.shape(1)[1:], slack=RANGE_SLACK)
    n = image.shape[0]
    check_seed(seed)
    check_sample_args(n, sample_offset, None, None)
    # the conditioning, checked now (strength=0 samples nothing); sample() checks it against the model
    SamplingRequest.make(n, seed=seed, sample_offset=sample_offset, class_labels=class_labels,
                         model_kwargs=model_kwargs, guidance_scale=guidance_scale,
                         **{k: options[k] for k in REQUEST_OPTIONS if k in options})
    process_options = {k: options.pop(k) for k in list(options) if k in PROCESS_OPTIONS}
    whole = DDPM.resolve(process, steps, {**process_options, "begin_index": 0})
    # the steps strength counts: a k-sampler's sigma steps (diffusers' t_start * scheduler.order skips its calls)
    num_steps = whole.multistep_plan(steps).whole_steps if whole.is_multistep else whole.num_steps
    device = torch.device(device) if device is not None else adapter.device
    t_start = start_step(num_steps, strength)
    run = dict(steps=steps, seed=seed, sample_offset=sample_offset, class_labels=class_labels,
               model_kwargs=model_kwargs, guidance_scale=guidance_scale, progress=progress, device=device, **options)
    if t_start == num_steps:  # no step to run: the image itself
        return image.to(device=device, dtype=torch.float32, copy=True)
    if t_start == 0:  # every step runs: a plain sample, from the contract's x_T
        return sample(model, n, process=whole, **run)
    begun = whole.with_options(begin_index=t_start)
    x_start = _noised(begun, steps, image.to(device=device, dtype=torch.float32), seed, sample_offset)
    return sample(model, n, process=begun, noise=x_start, **run)


def _noised(process: DDPM, steps, image: torch.Tensor, seed: int, sample_offset: int) -> torch.Tensor:
    """diffusers' ``add_noise`` at the begun process's start, with the contract's noise of its x_T slot."""
    if process.is_multistep:
        plan = process.multistep_plan(steps)
        z = reference.batch_noise(seed, sample_offset, plan.num_steps, image.shape, image.device)
        s = float(plan.sigmas[-1])  # sigma / alpha of the start: alpha^2 + sigma^2 = 1
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return alpha * image + (s * alpha) * z
    K = process.num_steps
    z = reference.batch_noise(seed, sample_offset, K, image.shape, image.device)
    return process.q_sample(image, process.schedule.timesteps[K - 1], noise=z)
