"""The eager sampling loop (Ho et al. Algorithm 2) for any model: ``fastddpm.sample(..., engine=False)``.

This loop runs on every device; it is the reference that the engine (``fastddpm.engine``) is held
to.  Noise follows the contract (``noise.py``): ``x_T`` is slot K and the noise of step ``i`` is slot
``i`` of each sample's stream, so sample ``i`` of a seed is the same whatever ``n`` or the batch
split.  The multistep solvers (``fastddpm.multistep``) run the same loop with their own table and
history; ``steps`` is then their number of model calls.
"""
from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm

from . import multistep, ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_float_dtype, check_output_flag, check_sample_args
from .denoiser import Denoiser
from .diffusion import DDPM
from .noise import check_noise_capacity
from .ops import reference
from .repaint import make_walk
from .request import SamplingRequest, check_start_noise, replaced_x
from .thresholding import step_threshold

__all__ = ["sample_eager"]


@torch.no_grad()
def sample_eager(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None, image_size=None,
                 channels=None, batch_size: int | None = None, progress: bool = True, callback=None,
                 process: DDPM | None = None, sample_offset: int = 0, request: SamplingRequest | None = None,
                 **options) -> torch.Tensor:
    """``fastddpm.sample(..., engine=False)`` on this process: the same arguments (less ``distributed``,
    ``engine`` and ``threads``, which ``fastddpm.sample`` handles), the same result.

    :param request: the ``SamplingRequest`` (n, seed, sample offset, conditioning, callback) when a
        layer above made it; else made here from the arguments and the ``REQUEST_OPTIONS`` in ``options``.
    :param options: the conditioning options (``fastddpm.request.REQUEST_OPTIONS``) and the process's.
    :return: float32 ``[n, C, H, W]`` in [-1, 1] on ``device``.
    """
    request = SamplingRequest.from_options(n, options, seed=seed, sample_offset=sample_offset, callback=callback,
                                           request=request)
    check_sample_args(n, request.sample_offset, batch_size, request.callback)
    process = DDPM.resolve(process, steps, options)
    adapter = ModelAdapter(model, image_size=image_size, channels=channels)
    device = torch.device(device) if device is not None else adapter.device
    dtype = dtype if dtype is not None else adapter.dtype
    check_float_dtype("dtype", dtype)
    shape = adapter.shape(n)
    check_start_noise(request, shape)
    numel = int(torch.Size(shape[1:]).numel())
    plan = process.multistep_plan(steps) if process.is_multistep else None
    # inpainting walks the chain (fastddpm.repaint): its visits are the steps, two noise slots each
    walk = make_walk(process, request.inpainting, device) if request.inpainting is not None else None
    num_steps = walk.num_steps if walk is not None else plan.num_steps if plan is not None else process.num_steps
    check_noise_capacity(numel, (2 if walk is not None else 1) * num_steps + 1, request.sample_offset + n - 1)

    batch_size = batch_size or n
    # every batch's model call, built (and so checked) before any sampling starts
    batches = [(batch, Denoiser(adapter, batch, device)) for _, batch in request.batches(batch_size)]
    chunks = []
    bar = tqdm(total=num_steps * len(batches), disable=not progress, desc="sampling", unit="step", leave=False)
    run_batch = _sample_batch if plan is None else _multistep_batch
    if walk is not None:
        run_batch = functools.partial(_inpaint_batch, walk)
    watch = torch.zeros((), dtype=torch.bool, device=device)  # any model output non-finite or beyond the limit
    for batch, denoiser in batches:
        chunks.append(run_batch(denoiser, adapter, plan or process, batch, (batch.n, *shape[1:]), device, dtype,
                                bar, watch))
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(watch)  # the x0 clip keeps a diverged model's images finite: refuse them
    check_finite_values("the sampled images", x)
    return x


def _model_output(denoiser: Denoiser, weights_dtype, x, t, dtype, watch: torch.Tensor):
    """``(out, uncond)`` of the denoiser at ``(x, t)``, run in ``dtype`` (autocast where it is not the
    weights'), ``watch`` raised by a diverged output (``watch_output``)."""
    autocast = dtype != weights_dtype
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        return denoiser(x.to(dtype) if not autocast else x, t, watch)


def _callback(request: SamplingRequest, i: int, t: int, x: torch.Tensor) -> torch.Tensor:
    """Call the request's callback after step ``i``; a tensor it returns replaces ``x``."""
    if request.callback is None:
        return x
    return replaced_x(request.callback(i, t, x), x)


def _start(request: SamplingRequest, K: int, shape, device) -> torch.Tensor:
    """``x_T``: the request's ``noise``, or the contract's slot K."""
    if request.noise is not None:
        return request.noise.to(device=device, dtype=torch.float32).reshape(shape).clone()
    return reference.batch_noise(request.seed, request.sample_offset, K, shape, device)


def _sample_batch(denoiser, adapter, process, request, shape, device, dtype, bar, watch):
    tables = process.tables(device)
    coefs, timesteps = tables["coefs"], tables["timesteps"]
    K = process.num_steps
    seed, offset = request.seed, request.sample_offset
    x = _start(request, K, shape, device)
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out, uncond = _model_output(denoiser, adapter.dtype, x, timesteps[step], dtype, watch)
        w = denoiser.step_scale
        x = ops.ddpm_step(x, out, step, coefs, seed=seed, sample_offset=offset,
                          clip_denoised=bool(process.config.clip_denoised), uncond_output=uncond, guidance_scale=w,
                          threshold=step_threshold(x, out, step, coefs, process.config.thresholding, uncond, w))
        bar.update(1)
        x = _callback(request, i, int(process.schedule.timesteps[i]), x)
    return x


def _multistep_batch(denoiser, adapter, plan, request, shape, device, dtype, bar, watch):
    """The same loop for a multistep solver: row ``i`` of its table, its history on the device,
    SDE noise from slot ``i`` (as the DDPM step's), drawn inside the fused ``multistep_step``."""
    table, timesteps = plan.tensors(device)
    K = plan.num_steps
    seed, offset = request.seed, request.sample_offset
    x = _start(request, K, shape, device)
    if plan.start_scale != 1.0:  # a k-sampler's start: init_noise_sigma x_T, as the model sees it
        x.mul_(plan.start_scale)
    history = multistep.new_history(x)
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out, uncond = _model_output(denoiser, adapter.dtype, x, timesteps[step], dtype, watch)
        w = denoiser.step_scale
        x = ops.multistep_step(x, out, history, step[0], table, seed=seed, sample_offset=offset,
                               clip_denoised=plan.clip_denoised, stochastic=plan.stochastic, uncond_output=uncond,
                               guidance_scale=w,
                               threshold=step_threshold(x, out, step[0], table, plan.thresholding, uncond, w))
        bar.update(1)
        x = _callback(request, i, plan.callback_timestep(i), x)
    return x


def _inpaint_batch(walk, denoiser, adapter, process, request, shape, device, dtype, bar, watch):
    """The inpainting walk (``fastddpm.repaint``): row ``r`` of its tables from ``V - 1`` down, a reverse
    row a model call and the fused step with the blend, an up row the same op re-noising ``x``."""
    V = walk.num_steps
    seed, offset = request.seed, request.sample_offset
    known = request.inpainting.known.to(device=device, dtype=torch.float32)
    mask = request.inpainting.mask.to(device=device, dtype=torch.float32)
    clip, thresholding = bool(process.config.clip_denoised), process.config.thresholding
    x = _start(request, V, shape, device)
    no_output = torch.zeros_like(x)  # an up row reads no model output (its b is 0)
    for r in reversed(range(V)):
        step = torch.full((shape[0],), r, dtype=torch.int64, device=device)
        if walk.up_rows[r]:
            x = ops.ddpm_step(x, no_output, step, walk.up, seed=seed, sample_offset=offset, clip_denoised=False)
        else:
            out, uncond = _model_output(denoiser, adapter.dtype, x, walk.timesteps[step], dtype, watch)
            w = denoiser.step_scale
            threshold = step_threshold(x, out, step, walk.reverse_step, thresholding, uncond, w)
            x = ops.ddpm_step(x, out, step, walk.reverse, seed=seed, sample_offset=offset, clip_denoised=clip,
                              uncond_output=uncond, guidance_scale=w, threshold=threshold, known=known, mask=mask)
        bar.update(1)
        x = _callback(request, V - 1 - r, int(walk.timesteps[r]), x)
    return x
