"""``fastddpm.inpaint``: fill the masked-out part of images with a trained model (RePaint, Lugmayr et al. 2022).

``mask`` is 1 where the image is kept and 0 where the model fills it in (diffusers' RePaint convention).
Each reverse step is one fused pass of the step op (``ops.ddpm_step`` with ``known``/``mask``):

    x_{k-1} = m * (sqrt(abar_{k-1}) x0_known + sqrt(1 - abar_{k-1}) z1) + (1 - m) * step(x_k, model(x_k))

the known region the original forward-noised to the step's target level (closed form), the unknown one
the sampler's reverse step (DDPM ancestral, or DDIM with ``eta``).  ``method="repaint"`` resamples: after
every ``jump_length`` steps down it goes back up ``jump_length`` steps by re-noising (``x_k =
sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) z``, the process's own one-step forward), ``jump_n_sample - 1``
times, so the filled region is harmonised with the kept one; ``method="replace"`` never goes back.

The walk (``fastddpm.repaint``: its visits, tables and noise slots) goes into the ``SamplingRequest``
as an ``Inpainting``, so every sampling path runs it: the eager loop, the engine (known image and mask
in static buffers), micro-batches and ``distributed=True`` shards, each image the same whatever ``n``
or the split.  After the last step (``abar = 1``) the kept pixels equal the input exactly.
"""
from __future__ import annotations

import torch

from .adapters import ModelAdapter
from .checks import check_sample_args
from .diffusion import DDPM
from .distributed import sample_distributed
from .image_tensors import check_model_images
from .local import resolve_pipeline, sample_local
from .repaint import Inpainting, repaint_visits
from .request import SamplingRequest, check_start_noise

__all__ = ["inpaint", "INPAINT_METHODS", "DEFAULT_INPAINT_STEPS"]

INPAINT_METHODS = ("repaint", "replace")
DEFAULT_INPAINT_STEPS = 250  # the RePaint paper's (and diffusers' RePaint example's) T
INPAINT_SAMPLERS = ("ddpm", "ddim")
IMAGE_RANGE_SLACK = 1e-6  # images at +-1 that rounding moved past it


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
            callback=None, batch_size: int | None = None, device=None, dtype=None, progress: bool = True,
            process: DDPM | None = None, engine: bool | None = None, distributed: bool = False,
            threads: int | None = None, **process_options) -> torch.Tensor:
    """Fill in the region where ``mask`` is 0, keep the one where it is 1.

    :param model: any model ``fastddpm.sample`` takes (or a diffusers pipeline: its ``unet`` and scheduler).
    :param image: float ``[n, C, H, W]`` (or ``[C, H, W]``) in [-1, 1], the model's image shape; the
        values under ``mask == 0`` are not read.
    :param mask: 1 = keep, 0 = fill: bool or 0/1 values, ``[H, W]``, ``[1, H, W]``, ``[C, H, W]``,
        ``[n, 1, H, W]`` (broadcast over channels and batch) or ``[n, C, H, W]``.
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
    :param batch_size, device, dtype, engine, distributed, threads: as ``fastddpm.sample``'s (the engine
        holds the known image and mask in static buffers; ``distributed=True`` shards the images).
    :param process, process_options: the process (``sampler="ddpm"`` ancestral, the paper's, or
        ``"ddim"`` with ``eta``; ``clip_denoised``, dynamic thresholding, prediction type, ...).
    :return: float32 ``[n, C, H, W]`` in [-1, 1] on ``device``; pixels with ``mask == 1`` are the input's.
    """
    model, process = resolve_pipeline(model, process)
    jump_n_sample = _check_method(method, jump_length, jump_n_sample)
    adapter = ModelAdapter(model)
    image = check_model_images("image", image, adapter.shape(1)[1:], slack=IMAGE_RANGE_SLACK)
    n = image.shape[0]
    check_sample_args(n, sample_offset, batch_size, callback)
    mask = _check_mask(mask, image)
    if process is not None and not isinstance(process, DDPM):
        raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
    base = DDPM.resolve(process, None, dict(process_options))
    if base.config.sampler not in INPAINT_SAMPLERS:
        raise ValueError(f"inpaint runs the one-step samplers {INPAINT_SAMPLERS} (RePaint goes back up the chain, "
                         f"which a multistep solver's history cannot), got sampler={base.config.sampler!r}")
    if base.config.begin_index:
        raise ValueError(f"inpaint walks the whole chain: begin_index must be 0, got {base.config.begin_index} "
                         "(to start part-way from an image, see fastddpm.img2img)")
    if steps is None:
        steps = base.num_steps if base.schedule.is_respaced else min(DEFAULT_INPAINT_STEPS, base.num_steps)
    process = DDPM.resolve(base, steps, {})
    request = SamplingRequest.make(n, seed=seed, sample_offset=sample_offset, class_labels=class_labels,
                                   model_kwargs=model_kwargs, guidance_scale=guidance_scale,
                                   uncond_kwargs=uncond_kwargs, guidance_rescale=guidance_rescale,
                                   guidance_batching=guidance_batching, noise=noise, callback=callback,
                                   inpainting=Inpainting(image.float(), mask, jump_length, jump_n_sample))
    check_start_noise(request, image.shape)
    kwargs = dict(device=device, dtype=dtype, batch_size=batch_size, process=process, engine=engine, threads=threads,
                  progress=progress, request=request)
    if distributed:
        return sample_distributed(model, n, **kwargs)
    return sample_local(model, n, **kwargs)
