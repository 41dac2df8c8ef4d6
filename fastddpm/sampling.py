"""``fastddpm.sample``: the DDPM sampler (Ho et al. Algorithm 2) for any model.

This is the eager loop, run on every device; it is the reference that the
CUDA-graph engine is held to.  Noise follows the contract (``noise.py``):
``x_T`` is slot K and the noise of step ``i`` is slot ``i`` of each sample's
stream, so sample ``i`` of a seed is the same whatever ``n`` or the batch split.
The multistep solvers (``fastddpm.multistep``) run the same loop with their
own table and history; ``steps`` is then their number of model calls.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from . import multistep, ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_output_flag, watch_output
from .cpu_plan import using_threads
from .diffusion import DDPM
from .interop import resolve_pipeline
from .noise import check_noise_capacity, check_seed
from .ops import reference

__all__ = ["sample"]

ENGINE_OPTIONS = ("cuda_graph", "compile", "backend", "micro_batch", "steps_per_graph", "channels_last")


def _process(process, steps, options) -> DDPM:
    if process is None:
        process = DDPM(**options)
    elif not isinstance(process, DDPM):
        raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
    elif options:
        process = process.with_options(**options)
    if process.is_multistep:
        return process  # a solver's steps are its own (DDPM.multistep_plan), not a respacing
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if steps > process.config.num_timesteps:
            raise ValueError(f"steps must be <= num_timesteps={process.config.num_timesteps}, got {steps}")
        if steps != process.num_steps:
            process = process.respace(steps)
    return process


@torch.no_grad()
def sample(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None, image_size=None,
           channels=None, batch_size: int | None = None, progress: bool = True, callback=None,
           process: DDPM | None = None, sample_offset: int = 0, distributed: bool = False,
           engine: bool | None = None, threads: int | None = None, **process_options) -> torch.Tensor:
    """Draw ``n`` images from ``model`` with the DDPM reverse process.

    :param model: fastddpm ``UNet``, diffusers ``UNet2DModel``, denoising-diffusion-pytorch
        ``Unet``, or any ``model(x, t)`` (t int64 ``[n]``) returning a tensor shaped like x.  Or a
        diffusers pipeline (``DDPMPipeline``, ``DDIMPipeline``: anything with ``.unet`` and
        ``.scheduler``): its ``unet`` sampled with ``DDPM.from_diffusers(pipeline.scheduler)``, the
        schedule and sampler it was trained/configured with; a ``process=`` given too wins over the
        pipeline's scheduler, and ``process_options`` apply on top of either.
    :param n: number of images.
    :param steps: sampling steps; fewer than T samples the respaced process.  For a multistep
        ``sampler`` (``dpm++2m``, ``dpm++3m``, ``dpm++2m-sde``, ``unipc``) the number of model
        calls, default 20.
    :param seed: noise seed (int in [0, 2**63)); sample i of a seed is fixed.
    :param device: where to sample (default: the model's device).
    :param dtype: model input dtype (default: the model's); x itself stays float32.
    :param image_size, channels: when the model does not say.
    :param batch_size: micro-batch size (default: all ``n`` at once).
    :param progress: show a tqdm bar.
    :param callback: ``callback(i, t, x)`` after each step (step index, model timestep, current x).
    :param process: a ``DDPM`` (default: built from ``process_options``: schedule, prediction,
        variance, clip_denoised, sampler, eta, num_timesteps, ...).
    :param sample_offset: global index of the first sample (for sharding).
    :param distributed: shard ``n`` over the ranks of ``torch.distributed`` and gather the
        images to every rank (``fastddpm.distributed``); equal to one device's images.
    :param engine: run through ``fastddpm.engine`` (static buffers, CUDA graphs, an automatic
        plan; on CUDA ``dtype=None`` then means bfloat16 where supported).  None (default): on a
        CPU yes, with the measured CPU plan (``fastddpm.cpu_plan``: compile only where it pays
        back within the call, the faster input layout, the model's dtype; ``dtype=torch.bfloat16``
        is the low-precision option on CPUs with AVX-512 BF16/AMX), except for the multistep
        samplers (not yet in the engine); elsewhere no, until the engine's CUDA path has been
        verified on a GPU.  Plan overrides ``cuda_graph``, ``compile``, ``backend``,
        ``micro_batch``, ``steps_per_graph``, ``channels_last`` need the engine (None then
        means yes).
        ``fastddpm.engine.last_plan().explain()`` says what was chosen and why.
    :param threads: torch's CPU threads while sampling (default: torch's setting, which is the
        machine's cores unless changed; on a busy machine 1 is often much steadier).
    :return: float32 ``[n, C, H, W]`` in the model's data range [-1, 1], on ``device``.
    """
    model, process = resolve_pipeline(model, process)
    if distributed:
        from .distributed import dist_info, sample_distributed

        return sample_distributed(model, n, steps=steps, seed=seed, device=device, dtype=dtype,
                                  image_size=image_size, channels=channels, batch_size=batch_size,
                                  progress=progress and dist_info()[0] == 0, callback=callback,
                                  process=process, sample_offset=sample_offset, engine=engine, threads=threads,
                                  **process_options)
    engine_options = {k: process_options.pop(k) for k in ENGINE_OPTIONS if k in process_options}
    if engine is None:  # plan overrides ask for the engine
        engine = bool(engine_options) or _engine_by_default(model, device, process, process_options)
    elif not isinstance(engine, bool):
        raise TypeError(f"engine must be True, False or None, got {engine!r}")
    if engine:
        from .engine import engine_sample

        x = engine_sample(model, n, steps=steps, seed=seed, device=device, dtype=dtype, image_size=image_size,
                          channels=channels, batch_size=batch_size, progress=progress, callback=callback,
                          process=process, sample_offset=sample_offset, threads=threads, **engine_options,
                          **process_options)
        sample.last_seconds = engine_sample.last_seconds
        return x
    with using_threads(threads):
        return _sample_eager(model, n, steps, seed, device, dtype, image_size, channels, batch_size, progress, callback,
                             process, sample_offset, engine_options, process_options)


def _engine_by_default(model, device, process, process_options) -> bool:
    """``engine=None``: the engine on a CPU, for the samplers it has; the eager loop elsewhere."""
    try:
        where = torch.device(device) if device is not None else ModelAdapter(model).device
    except (RuntimeError, TypeError, ValueError):
        return False  # the eager path reports the bad argument
    sampler = process_options.get("sampler", process.config.sampler if isinstance(process, DDPM) else "ddpm")
    return where.type == "cpu" and sampler not in multistep.SOLVERS


def _sample_eager(model, n, steps, seed, device, dtype, image_size, channels, batch_size, progress, callback, process,
                  sample_offset, engine_options, process_options):
    if engine_options:
        raise TypeError(f"{sorted(engine_options)} need engine=True")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_seed(seed)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(i, t, x)")
    process = _process(process, steps, process_options)
    adapter = ModelAdapter(model, image_size=image_size, channels=channels)
    device = torch.device(device) if device is not None else adapter.device
    dtype = dtype if dtype is not None else adapter.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    shape = adapter.shape(n)
    numel = int(torch.Size(shape[1:]).numel())
    plan = process.multistep_plan(steps) if process.is_multistep else None
    num_steps = plan.num_steps if plan is not None else process.num_steps
    check_noise_capacity(numel, num_steps + 1, sample_offset + n - 1)

    batch_size = batch_size or n
    chunks = []
    start = time.perf_counter()
    bar = tqdm(total=num_steps * ((n + batch_size - 1) // batch_size), disable=not progress,
               desc="sampling", unit="step", leave=False)
    run_batch = _sample_batch if plan is None else _multistep_batch
    watch = torch.zeros((), dtype=torch.bool, device=device)  # any model output non-finite or beyond the limit
    for first in range(0, n, batch_size):
        m = min(batch_size, n - first)
        chunks.append(run_batch(adapter, plan or process, (m, *shape[1:]), seed, sample_offset + first, device,
                                dtype, callback, bar, watch))
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(watch)  # the x0 clip keeps a diverged model's images finite: refuse them
    check_finite_values("the sampled images", x)
    sample.last_seconds = time.perf_counter() - start
    return x


def _model_output(adapter, x, t, dtype, first: bool, watch: torch.Tensor) -> torch.Tensor:
    """The model's output at ``(x, t)``, run in ``dtype`` (autocast where it is not the weights'),
    its shape checked on the ``first`` step, and ``watch`` raised by a diverged output (``watch_output``)."""
    autocast = dtype != adapter.dtype
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        out = adapter(x.to(dtype) if not autocast else x, t)
    if first:
        adapter.check_output(out, x)
    watch_output(watch, out)
    return out


def _sample_batch(adapter, process, shape, seed, sample_offset, device, dtype, callback, bar, watch):
    tables = process.tables(device)
    coefs, timesteps = tables["coefs"], tables["timesteps"]
    K = process.num_steps
    x = reference.batch_noise(seed, sample_offset, K, shape, device)  # x_T: slot K
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out = _model_output(adapter, x, timesteps[step], dtype, i == K - 1, watch)
        x = ops.ddpm_step(x, out, step, coefs, seed=seed, sample_offset=sample_offset,
                          clip_denoised=process.config.clip_denoised)
        bar.update(1)
        if callback is not None:
            callback(i, int(process.schedule.timesteps[i]), x)
    return x


def _multistep_batch(adapter, plan, shape, seed, sample_offset, device, dtype, callback, bar, watch):
    """The same loop for a multistep solver: row ``i`` of its table, its history on the device,
    SDE noise from slot ``i`` (as the DDPM step's), drawn inside the fused ``multistep_step``."""
    table, timesteps = plan.tensors(device)
    K = plan.num_steps
    x = reference.batch_noise(seed, sample_offset, K, shape, device)  # x_T: slot K
    history = multistep.new_history(x)
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out = _model_output(adapter, x, timesteps[step], dtype, i == K - 1, watch)
        x = ops.multistep_step(x, out, history, step[0], table, seed=seed, sample_offset=sample_offset,
                               clip_denoised=plan.clip_denoised, stochastic=plan.stochastic)
        bar.update(1)
        if callback is not None:
            callback(i, int(plan.timesteps[i]), x)
    return x
