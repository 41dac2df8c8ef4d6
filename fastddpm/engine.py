"""The fast sampling engine: ``engine_sample``, the engines' cache and the last plan.

``fastddpm.sample`` runs it by default on a CPU and with ``engine=True``; it runs Algorithm 2
(Ho et al.) as ``fastddpm.eager`` does, with no host work per step on a GPU.  Its parts:

* ``fastddpm.plan``: ``make_plan``, every automatic choice (CUDA graphs, compile, dtype, layout,
  backend, micro-batch) with its reason; on a CPU refined by measuring (``fastddpm.cpu_plan``);
* ``fastddpm.sampler_engine``: ``SamplerEngine``, the static buffers, the device-side step
  counter and the CUDA graphs of one batch shape (the mechanism is described there);
* this module: ``EngineCache``, the run state in one object (the engines, each holding its model,
  compiled model and graphs, so a second call neither recompiles nor recaptures; the last plan
  and time), and the entry point ``engine_sample``.

    from fastddpm.engine import engine_sample, last_plan
    images = engine_sample(model, 64, steps=250)
    print(last_plan().explain())
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time

import torch
from tqdm.auto import tqdm

from . import cpu_plan
from .adapters import ModelAdapter
from .checks import check_finite_values, check_output_flag, check_sample_args
from .denoiser import Denoiser
from .diffusion import DDPM
from .noise import check_noise_capacity
from .plan import COMPILE_MODES, Plan, make_plan, resolve_device
from .repaint import walk_visits
from .request import SamplingRequest, check_start_noise
from .sampler_engine import SamplerEngine

__all__ = ["Plan", "make_plan", "SamplerEngine", "EngineCache", "DEFAULT_CACHE", "engine_sample", "last_plan",
           "cached_engines", "clear_engine_cache", "COMPILE_MODES"]

MAX_ENGINES = 8


# -- the cache and the entry point ----------------------------------------------------------------
def _weights_signature(model) -> tuple:
    """Where the weights live: a moved/cast/replaced parameter gets a new engine."""
    if not isinstance(model, torch.nn.Module):
        return ()
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t.dtype, str(t.device)) for t in tensors)


class EngineCache:
    """The engine's run state, in one object: the engines of past calls (each holds its model, compiled
    model, buffers and CUDA graphs), and the plan and sampling time of the last call.

    ``engine_sample`` uses ``DEFAULT_CACHE`` unless given ``cache=``; ``cached_engines``,
    ``clear_engine_cache`` and ``last_plan`` read and clear that default one.

    :param max_engines: engines kept, the least recently used dropped first.
    """

    def __init__(self, max_engines: int = MAX_ENGINES):
        self.max_engines = max_engines
        self._engines: collections.OrderedDict = collections.OrderedDict()
        self.last_plan: Plan | None = None  # the plan of the last engine_sample call
        self.last_seconds: float | None = None  # its sampling time (plan, compile and loop)

    def engine(self, model, adapter, process, shape, plan: Plan, steps: int | None = None,
               request: SamplingRequest | None = None, denoiser: Denoiser | None = None) -> SamplerEngine:
        """The cached engine of these arguments, made on a miss (``steps``: a multistep solver's
        ``multistep_plan(steps)``, the whole plan's steps even when it begins part-way, else None; ``request``: the batch's, and ``denoiser`` its ``Denoiser`` when it is
        conditioned, whose form is part of the key)."""
        conditioning = denoiser.signature() if denoiser is not None else None
        if request is not None and request.inpainting is not None:  # the walk's form (fastddpm.repaint)
            conditioning = (conditioning, request.inpainting.signature())
        # The cached engine holds the model, so id(model) cannot be reused while the entry lives.
        key = (id(model), _weights_signature(model), process.to_json(), tuple(shape), plan.key(), steps, conditioning)
        engine = self._engines.get(key)
        if engine is None:
            engine = SamplerEngine(adapter, process, shape, plan, steps, request=request)
            self._engines[key] = engine
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
        else:
            self._engines.move_to_end(key)
        return engine

    def engines(self) -> list[SamplerEngine]:
        """The engines held, least recently used first."""
        return list(self._engines.values())

    def clear(self) -> None:
        """Drop every engine (and with them their buffers, graphs and compiled models)."""
        self._engines.clear()


DEFAULT_CACHE = EngineCache()


def cached_engines() -> list[SamplerEngine]:
    """The engines in the default cache, least recently used first."""
    return DEFAULT_CACHE.engines()


def clear_engine_cache() -> None:
    """Drop every engine of the default cache (and with them their buffers, graphs and compiled models)."""
    DEFAULT_CACHE.clear()


def last_plan() -> Plan | None:
    """The plan of the last ``engine_sample`` call on the default cache."""
    return DEFAULT_CACHE.last_plan


def _cpu_plan(model, adapter, n, shape, device, num_steps: int, op: str, plan: Plan, dtype, compile, channels_last,
              threads, forward):
    """``(plan, choice)``: ``plan`` (checked by ``make_plan``) with ``cpu_plan.choose``'s dtype,
    layout, compile and threads, and its reasons in place of the requested-value lines."""
    choice = cpu_plan.choose(model, adapter.dtype, (plan.micro_batch, *shape[1:]), num_steps,
                             -(-n // plan.micro_batch), dtype=dtype, compile=compile, channels_last=channels_last,
                             threads=threads, forward=forward)
    chosen = make_plan(adapter, n, shape[1:], device, dtype=choice.dtype, cuda_graph=plan.cuda_graph,
                       compile=choice.compile or False, backend=plan.backend, micro_batch=plan.micro_batch,
                       steps_per_graph=plan.steps_per_graph, channels_last=choice.channels_last, op=op)
    # the first plan's lines for what it chose (automatic or requested), the CPU plan's for the rest
    reasons = [r for r in plan.reasons if not r.startswith(("dtype=", "channels_last=", "compile="))]
    return dataclasses.replace(chosen, threads=choice.threads, reasons=tuple(reasons) + choice.reasons), choice


def _in_threads(fn):
    """Run ``fn`` with torch's CPU threads set to its ``threads=`` keyword (None: unchanged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cpu_plan.using_threads(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper


def _compile_on_cpu(model, adapter, engine: SamplerEngine, choice) -> None:
    """Compile a new CPU engine's model before its loop, timed, and record the time
    (``cpu_plan`` estimates the next compile of this model from it)."""
    if cpu_plan.why_not_timed(model) is not None:
        return  # a model the plan must not call on made-up inputs: it compiles in its first step, unrecorded
    plan = engine.plan
    seconds = cpu_plan.warm_up(engine.forward, engine.shape, plan.dtype, adapter.dtype, plan.channels_last)
    key = cpu_plan.compile_key(model, engine.shape, plan.dtype, plan.channels_last, plan.compile, plan.threads)
    cpu_plan.record_compile(model, key, max(0.0, seconds - (choice.forward_s or 0.0)))


@_in_threads
@torch.no_grad()
def engine_sample(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None,
                  image_size=None, channels=None, batch_size: int | None = None, progress: bool = True,
                  callback=None, process=None, sample_offset: int = 0, distributed: bool = False,
                  cuda_graph=None, compile=None, backend=None, micro_batch=None, steps_per_graph=None,
                  channels_last=None, threads=None, return_plan: bool = False, cache: EngineCache | None = None,
                  request: SamplingRequest | None = None, **options):
    """``fastddpm.sample`` through the engine: same arguments, same noise contract.

    Plan overrides (None: automatic, see ``make_plan``): ``cuda_graph``,
    ``compile``, ``dtype``, ``backend``, ``micro_batch`` (``batch_size`` is its
    alias), ``steps_per_graph``, ``channels_last``.  On CUDA ``dtype`` defaults
    to bfloat16 where supported (``fastddpm.sample`` defaults to the model's).
    On a CPU ``compile``, ``channels_last`` and ``dtype`` left None are chosen by
    ``fastddpm.cpu_plan`` from timing the model's first calls (compile only when
    it pays back within this call); ``threads`` sets torch's CPU threads while
    sampling (None: torch's setting).

    Engines are cached by (model, its weights' storage, process, batch shape,
    plan): a second call with the same arguments, or another ``seed`` or
    ``sample_offset``, neither recompiles nor recaptures (the fused step reads
    the noise key from a device buffer; only ``backend="reference"`` recaptures
    for a new key).  ``callback`` makes the loop eager (a tensor it returns replaces x).

    Conditioning (``fastddpm.request.REQUEST_OPTIONS`` in ``options``: class labels, model kwargs,
    guidance, the start noise; or a ``request`` made above) is the engine's static ``Denoiser``: its
    form (keyword shapes, guidance settings) is part of the engine's key, and each micro-batch's
    tensors are copied into its buffers before the loop.

    :param return_plan: return ``(images, plan)``.
    :param cache: where the engines are kept and the plan and time are recorded (default
        ``DEFAULT_CACHE``: ``last_plan()``, ``cached_engines()``).
    :return: float32 ``[n, C, H, W]`` on ``device`` (and the plan).
    """
    if distributed:
        raise ValueError("engine_sample does not shard; use fastddpm.sample(..., distributed=True)")
    request = SamplingRequest.from_options(n, options, seed=seed, sample_offset=sample_offset, callback=callback,
                                           request=request)
    check_sample_args(n, request.sample_offset, batch_size, request.callback)
    if batch_size is not None:
        if micro_batch is not None and micro_batch != batch_size:
            raise ValueError(f"batch_size={batch_size} and micro_batch={micro_batch} disagree; give one")
        micro_batch = batch_size
    process = DDPM.resolve(process, steps, options)
    # a multistep solver's steps are its model calls (its plan, checked here once); else the respacing's
    solver = process.multistep_plan(steps) if process.is_multistep else None
    num_steps = solver.num_steps if solver is not None else process.num_steps
    slots, model_calls = num_steps + 1, num_steps
    if request.inpainting is not None:  # the walk's rows are the steps, two noise slots each (each engine's tables)
        visits = walk_visits(process, request.inpainting)
        num_steps, slots, model_calls = len(visits), 2 * len(visits) + 1, sum(not up for up, _ in visits)
    adapter = ModelAdapter(model, image_size=image_size, channels=channels)
    device = resolve_device(device if device is not None else adapter.device)
    shape = adapter.shape(n)
    check_start_noise(request, shape)
    check_noise_capacity(math.prod(shape[1:]), slots, request.sample_offset + n - 1)
    whole = Denoiser(adapter, request, device)  # checks the conditioning against the model before any work
    start = time.perf_counter()  # the plan's timing calls and any compile count as sampling time
    op = "multistep_step" if process.is_multistep else "ddpm_step"
    plan = make_plan(adapter, n, shape[1:], device, dtype=dtype, cuda_graph=cuda_graph, compile=compile,
                     backend=backend, micro_batch=micro_batch, steps_per_graph=steps_per_graph,
                     channels_last=channels_last, op=op)
    choice = None
    if device.type == "cpu":  # measured: compile, layout, dtype, threads (fastddpm.cpu_plan)
        # the plan times the whole model call of a micro-batch (the doubled one under guidance)
        forward = Denoiser(adapter, request.slice(0, min(plan.micro_batch, n)), device).forward
        plan, choice = _cpu_plan(model, adapter, n, shape, device, model_calls, op, plan, dtype, compile,
                                 channels_last, threads, forward)
    if whole.guidance_scale is not None:  # how guidance calls the model, and why
        plan = dataclasses.replace(plan, reasons=plan.reasons + (whole.batching_reason,))
    cache = DEFAULT_CACHE if cache is None else cache
    cache.last_plan = plan

    m = plan.micro_batch
    bar = tqdm(total=num_steps * -(-n // m), disable=not progress, desc="sampling", unit="step", leave=False)
    chunks = []
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    for _, batch in request.batches(m):
        denoiser = Denoiser(adapter, batch, device) if batch.conditioned else None  # the key's and the run's
        engine = cache.engine(model, adapter, process, (batch.n, *shape[1:]), plan,
                              solver.whole_steps if solver is not None else None, batch, denoiser)
        if choice is not None and plan.compile and engine.runs == 0:
            _compile_on_cpu(model, adapter, engine, choice)
        chunks.append(engine.run(bar=bar, request=batch, denoiser=denoiser))
        diverged |= engine.diverged  # on the device; the engine resets its flag each run
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(diverged)  # read back once, after the loop, as the images' check
    check_finite_values("the sampled images", x)
    cache.last_seconds = time.perf_counter() - start
    return (x, plan) if return_plan else x
