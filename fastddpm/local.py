"""Sampling on this process: ``fastddpm.sample`` without ``distributed``, through the engine
(``fastddpm.engine``) or the eager loop (``fastddpm.eager``).

``fastddpm.sample`` calls it directly, and ``fastddpm.distributed`` once per rank for the rank's
shard; neither the engine nor the eager loop knows of the other or of the ranks.
"""
from __future__ import annotations

import time

import torch

from .adapters import ModelAdapter
from .cpu_plan import using_threads
from .diffusion import DDPM
from .eager import sample_eager
from .engine import DEFAULT_CACHE, engine_sample
from .interop import is_pipeline
from .modes import SAMPLERS

__all__ = ["sample_local", "resolve_pipeline", "ENGINE_OPTIONS"]

ENGINE_OPTIONS = ("cuda_graph", "compile", "backend", "micro_batch", "steps_per_graph", "channels_last")


def resolve_pipeline(model, process):
    """``(model, process)`` for ``sample``: a pipeline gives its ``unet`` and, unless ``process`` is given
    (an explicit process wins), ``DDPM.from_diffusers(pipeline.scheduler)``; anything else passes through."""
    if not is_pipeline(model):
        return model, process
    missing = [a for a in ("unet", "scheduler") if getattr(model, a, None) is None]
    if missing:
        raise TypeError(f"model looks like a diffusers pipeline ({type(model).__name__}) but has no "
                        f"{' or '.join('.' + m for m in missing)}: sample() takes a pipeline with .unet and "
                        ".scheduler (DDPMPipeline, DDIMPipeline), or the model itself")
    if process is None:
        try:
            process = DDPM.from_diffusers(model.scheduler)
        except ValueError as e:
            raise ValueError(f"{type(model).__name__}.scheduler: {e} (or pass process= explicitly)") from None
    return model.unet, process


@torch.no_grad()
def sample_local(model, n: int, *, engine: bool | None = None, threads: int | None = None, process=None,
                 device=None, **kwargs) -> torch.Tensor:
    """``fastddpm.sample(model, n, ...)`` on this process (see it for the arguments; ``distributed`` is
    ``fastddpm.distributed``'s).  ``sample_local.last_seconds`` is the sampling time of the last call.

    :param engine: the engine (True), the eager loop (False), or None: the engine on a CPU for the
        samplers it has, and wherever a plan override (``ENGINE_OPTIONS``) is given.
    """
    model, process = resolve_pipeline(model, process)
    engine_options = {k: kwargs.pop(k) for k in ENGINE_OPTIONS if k in kwargs}
    if engine is None:  # plan overrides ask for the engine
        engine = bool(engine_options) or _engine_by_default(model, device, process, kwargs)
    elif not isinstance(engine, bool):
        raise TypeError(f"engine must be True, False or None, got {engine!r}")
    if engine:
        x = engine_sample(model, n, process=process, device=device, threads=threads, **engine_options, **kwargs)
        sample_local.last_seconds = DEFAULT_CACHE.last_seconds
        return x
    if engine_options:
        raise TypeError(f"{sorted(engine_options)} need engine=True")
    with using_threads(threads):
        start = time.perf_counter()
        x = sample_eager(model, n, process=process, device=device, **kwargs)
        sample_local.last_seconds = time.perf_counter() - start
        return x


def _engine_by_default(model, device, process, process_options) -> bool:
    """``engine=None``: the engine on a CPU for the one-step samplers; the eager loop elsewhere."""
    try:
        where = torch.device(device) if device is not None else ModelAdapter(model).device
    except (RuntimeError, TypeError, ValueError):
        return False  # the eager path reports the bad argument
    sampler = process_options.get("sampler", process.config.sampler if isinstance(process, DDPM) else "ddpm")
    return where.type == "cpu" and sampler in SAMPLERS
