"""The fast sampling engine: static buffers, device-side step counter, CUDA graphs.

``fastddpm.sample`` is the eager reference loop; this module runs the same
Algorithm 2 (Ho et al.) with no host work per step on a GPU:

* Every tensor the loop touches is allocated once per engine: ``x`` (float32),
  the model-input copy (``Plan.dtype``, channels_last for images), the
  model-timestep vector, a 0-dim int64 ``step`` counter and the noise key
  ``rng = (seed, sample_offset)`` (int64 ``[2]``), all on the device.
* One step is ``t = timesteps[step]`` (a gather), the model call, the fused
  in-place ``ddpm_step_`` (which reads the row of ``coefs`` and the noise slot
  from ``step`` and the noise key from ``rng``, draws the contract's noise
  itself and writes both ``x`` and the model input), then ``step -= 1`` on the
  device.  Nothing in it reads a value back, branches on a tensor, or copies
  from the host, so ``steps_per_graph`` of these are captured as one CUDA graph
  and replayed ``K / steps_per_graph`` times.
* Before the loop, on the device and outside the graph: ``rng`` is filled with
  this run's seed and sample offset, and ``x_T`` (noise slot K) is drawn.
* The multistep solvers (``fastddpm.multistep``: DPM-Solver++ 2M/3M/2M-SDE, UniPC)
  run the same loop: their ``[K, 12]`` table and timesteps replace the DDPM ones,
  a static ``[3, *shape]`` history ring (zeroed before the loop) is advanced by
  the fused in-place ``multistep_step_`` after the model call (it reads the step
  index, and for the SDE solver the noise key, on the device), and the model
  input copy is refreshed from ``x`` on the device.

A CUDA graph bakes its kernels' scalar arguments; the seed and the sample
offset are not among them (the kernel loads them from ``rng``), so an engine
captures its graphs once: every later run, whatever its seed or micro-batch
offset, only replays them.  The exception is the ``reference`` backend, whose
step is plain PyTorch with the key as Python ints: its graphs are recaptured
when the key changes.

On CPU (or ``cuda_graph=False``) the very same step runs eagerly, and equals
``fastddpm.sample`` bit for bit on the same backend.  With a ``callback`` the
loop also runs eagerly (the callback sees every step's ``x``, which a replayed
graph never hands to Python).

    from fastddpm.engine import engine_sample, last_plan
    images = engine_sample(model, 64, steps=250)
    print(last_plan().explain())
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import math
import time

import torch
from tqdm.auto import tqdm

from . import cpu_plan, ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_output_flag, watch_output
from .noise import check_noise_capacity, check_seed
from .ops import reference
from .sampling import _process

__all__ = ["Plan", "make_plan", "SamplerEngine", "engine_sample", "last_plan", "cached_engines",
           "clear_engine_cache", "COMPILE_MODES"]

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes that bring Inductor's own CUDA graphs
CUDA_MICRO_BATCH = 256  # automatic cap on one graph's batch (activation memory); micro_batch= overrides
WARMUP_STEPS = 2  # eager steps on a side stream before each capture (autotuning, lazy init, JIT)
MAX_ENGINES = 8


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# -- the plan ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """How an engine samples, and why (``reasons``: one line per choice).

    :param device: where everything lives.
    :param dtype: the model input's dtype (``x`` itself is always float32).
    :param channels_last: model input in channels_last (4-D images only).
    :param backend: the ``fastddpm.ops`` backend of the fused step.
    :param cuda_graph: capture the steps as CUDA graphs and replay them.
    :param compile: ``torch.compile`` mode of the model, or None (eager model).
    :param steps_per_graph: steps captured in one graph.
    :param micro_batch: samples per engine batch.
    :param threads: torch's CPU threads while sampling (None: unchanged); Inductor's CPU
        code is compiled for a thread count, so it is part of the key.
    """

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    backend: str
    cuda_graph: bool
    compile: str | None
    steps_per_graph: int
    micro_batch: int
    reasons: tuple[str, ...] = ()
    threads: int | None = None

    def key(self) -> tuple:
        """What an engine depends on (``micro_batch`` and ``reasons`` excluded)."""
        return (str(self.device), self.dtype, self.channels_last, self.backend, self.cuda_graph, self.compile,
                self.steps_per_graph, self.threads)

    def explain(self) -> str:
        """What was picked and why, one choice a line."""
        return "\n".join(self.reasons)


def _device_of(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _bf16_supported() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch
        return torch.cuda.is_bf16_supported()


def make_plan(model, n: int, shape, device, *, dtype=None, cuda_graph=None, compile=None, backend=None,
              micro_batch=None, steps_per_graph=None, channels_last=None, op: str = "ddpm_step") -> Plan:
    """The fastest available way to sample ``n`` images of ``shape`` on ``device``.

    Every argument left None is chosen automatically, with its reason; a given
    one is validated and kept, or a ``ValueError``/``TypeError`` names it.

    :param model: the model (or a ``ModelAdapter``); its weights' dtype matters.
    :param n: number of images.
    :param shape: one sample's shape, ``(C, H, W)``.
    :param device: where to sample.
    :param dtype: model input dtype: float32, float16 or bfloat16.
    :param cuda_graph: capture and replay CUDA graphs (CUDA only).
    :param compile: False/None (off), True (mode "default") or a ``torch.compile`` mode.
    :param backend: ``reference``, ``cpp`` or ``triton`` for the fused step.
    :param micro_batch: samples per engine batch.
    :param steps_per_graph: steps per captured graph (needs ``cuda_graph``).
    :param channels_last: model input layout (4-D images only).
    :param op: the fused update the backend must run: ``ddpm_step``, or ``multistep_step`` for a
        multistep solver.
    """
    if op not in ("ddpm_step", "multistep_step"):
        raise ValueError(f"op must be 'ddpm_step' or 'multistep_step', got {op!r}")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    shape = tuple(int(s) for s in shape)
    device = _device_of(device)
    on_cuda = device.type == "cuda"
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    reasons = []

    # cuda_graph
    if cuda_graph is None:
        cuda_graph = on_cuda
        reasons.append("cuda_graph=True: the model call and the fused step are captured once and replayed"
                       if on_cuda else f"cuda_graph=False: CUDA graphs need a CUDA device, sampling on {device.type}")
    elif not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    elif cuda_graph and not on_cuda:
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    else:
        reasons.append(f"cuda_graph={cuda_graph}: requested")

    # compile
    if compile is None or compile is False:
        mode = None
        reasons.append("compile=None: the model runs eagerly (default; pass compile=True or a mode)")
    elif compile is True or compile in COMPILE_MODES:
        mode = "default" if compile is True else compile
        note = (": Inductor's own CUDA graphs are turned off inside the engine's graph"
                if cuda_graph and mode in _INDUCTOR_GRAPH_MODES else "")
        reasons.append(f"compile={mode!r}: requested{note}")
    else:
        raise ValueError(f"compile must be True, False, None or one of {COMPILE_MODES}, got {compile!r}")

    # dtype
    model_dtype = adapter.dtype
    if dtype is None:
        if on_cuda and model_dtype in (torch.float16, torch.bfloat16):
            dtype = model_dtype
            reasons.append(f"dtype={dtype}: the model's weights")
        elif on_cuda and _bf16_supported():
            dtype = torch.bfloat16
            reasons.append("dtype=torch.bfloat16: this GPU runs bfloat16 natively (x stays float32)")
        elif on_cuda:
            dtype = torch.float32
            reasons.append("dtype=torch.float32: no native bfloat16 on this GPU, and float16 can overflow "
                           "(pass dtype=torch.float16 to opt in)")
        else:
            dtype = model_dtype
            reasons.append(f"dtype={dtype}: the model's dtype, as fastddpm.sample (off CUDA low precision is "
                           "not faster)")
    else:
        reasons.append(f"dtype={dtype}: requested")
    if dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")

    # channels_last
    if channels_last is None:
        channels_last = on_cuda and len(shape) == 3 and dtype != torch.float32
        reasons.append(f"channels_last={channels_last}: " + (
            "low-precision convolutions on a GPU are fastest in NHWC" if channels_last else
            "only for low-precision 4-D model inputs on a GPU"))
    elif not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be True, False or None, got {channels_last!r}")
    elif channels_last and len(shape) != 3:
        raise ValueError(f"channels_last=True needs [n, C, H, W] images, got sample shape {shape}")
    else:
        reasons.append(f"channels_last={channels_last}: requested")

    # backend of the fused step
    if backend is None:
        backend = ops.select_backend(op, device, dtype)
        reasons.append(f"backend={backend!r}: fastddpm.ops' automatic choice for {op} on {device.type} "
                       f"(available: {', '.join(ops.available_backends(op, device, dtype))})")
    else:
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        why = ops.unsupported(backend, op, device, dtype)
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot run {op} on {device} ({dtype}): it {why}")
        reasons.append(f"backend={backend!r}: requested")
    if cuda_graph and backend == "reference":
        reasons.append("note: the reference step is many small kernels (captured all the same)")

    # steps_per_graph
    if steps_per_graph is None:
        steps_per_graph = 1
        if cuda_graph:
            reasons.append("steps_per_graph=1: a replay costs microseconds next to a model call, and a "
                           "one-step graph is the cheapest to capture")
    elif not _is_int(steps_per_graph) or steps_per_graph < 1:
        raise ValueError(f"steps_per_graph must be a positive int, got {steps_per_graph!r}")
    elif steps_per_graph != 1 and not cuda_graph:
        raise ValueError("steps_per_graph needs cuda_graph=True (eager steps are not grouped)")
    else:
        reasons.append(f"steps_per_graph={steps_per_graph}: requested")

    # micro_batch
    if micro_batch is None:
        if on_cuda and n > CUDA_MICRO_BATCH:
            chunks = -(-n // CUDA_MICRO_BATCH)
            micro_batch = -(-n // chunks)  # balanced: at most two batch sizes, so at most two engines
            reasons.append(f"micro_batch={micro_batch}: {n} samples in {chunks} batches of at most "
                           f"{CUDA_MICRO_BATCH} (graph memory)")
        else:
            micro_batch = n
            reasons.append(f"micro_batch={n}: all samples in one batch")
    elif not _is_int(micro_batch) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
    else:
        micro_batch = min(micro_batch, n)
        reasons.append(f"micro_batch={micro_batch}: requested")

    return Plan(device=device, dtype=dtype, channels_last=channels_last, backend=backend, cuda_graph=cuda_graph,
                compile=mode, steps_per_graph=steps_per_graph, micro_batch=micro_batch, reasons=tuple(reasons))


# -- the engine ------------------------------------------------------------------------------
def _inplace_step_op(backend: str, name: str = "ddpm_step_"):
    """The in-place op ``name`` of a fast backend: ``ddpm_step_(x, out, step, coefs, rng, clip,
    model_input)`` or ``multistep_step_(x, out, history, step, table, rng, clip, stochastic)``."""
    return ops.implementation(name, backend)


class SamplerEngine:
    """Static buffers and the step loop for one ``(model, process, batch shape, plan)``.

    :param model: anything ``fastddpm.sample`` accepts, or a ``ModelAdapter``.
    :param process: a ``fastddpm.DDPM`` (already respaced to the steps wanted), or one whose
        sampler is a multistep solver (``fastddpm.multistep``).
    :param shape: the batch shape ``(m, C, H, W)``.
    :param plan: from ``make_plan`` (its ``micro_batch`` is not used here).
    :param steps: a multistep solver's model calls (default ``multistep.DEFAULT_STEPS``); ignored
        otherwise.

    A multistep solver runs the same loop with its own ``[K, 12]`` table, its timesteps, and a static
    ``[3, *shape]`` float32 history ring that ``_reset`` zeroes and the fused ``multistep_step_``
    advances in place after the model call (it reads the step index from the device counter).

    Counters for tests and profiling: ``captures`` (graphs recorded), ``warmups``
    (eager warm-up steps), ``runs``.
    """

    def __init__(self, model, process, shape, plan: Plan, steps: int | None = None):
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        self.process = process
        self.shape = tuple(int(s) for s in shape)
        self.plan = plan
        self.solver = process.multistep_plan(steps) if process.is_multistep else None
        self.num_steps = K = process.num_steps if self.solver is None else self.solver.num_steps
        n, device = self.shape[0], plan.device
        self.numel = math.prod(self.shape[1:])
        check_noise_capacity(self.numel, K + 1, n - 1)
        if plan.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        if plan.channels_last and len(self.shape) != 4:
            raise ValueError(f"channels_last needs a 4-D batch shape, got {self.shape}")

        self.history = None  # the multistep solvers' ring: [3, *shape] float32
        if self.solver is None:
            tables = process.tables(device)
            self.coefs, self.timesteps = tables["coefs"], tables["timesteps"]
            self.clip_denoised = bool(process.config.clip_denoised)
        else:
            self.coefs, self.timesteps = self.solver.tensors(device)  # coefs: the [K, 12] table
            self.clip_denoised = self.solver.clip_denoised
            self.history = torch.zeros((3, *self.shape), dtype=torch.float32, device=device)
        # -- static buffers: allocated once, updated in place ------------------------------
        self.x = torch.empty(self.shape, dtype=torch.float32, device=device)
        self.model_input = None  # None: the model reads x itself
        if plan.dtype != torch.float32 or plan.channels_last:
            layout = torch.channels_last if plan.channels_last else torch.contiguous_format
            self.model_input = torch.empty(self.shape, dtype=plan.dtype, device=device, memory_format=layout)
        self.step = torch.full((), K - 1, dtype=torch.int64, device=device)  # process step index
        self.step_n = self.step.expand(n)  # the same counter seen per sample (stride 0)
        self.model_t = torch.empty(n, dtype=self.timesteps.dtype, device=device)  # timesteps[step]
        self._slot_x_T = torch.full((), K, dtype=torch.int64, device=device)  # noise slot of x_T
        self.rng = torch.zeros(2, dtype=torch.int64, device=device)  # (seed, sample_offset), read by the fused step
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)  # raised by a diverged model output
        # -- the step's parts --------------------------------------------------------------
        self._autocast = plan.dtype != self.adapter.dtype  # as fastddpm.sample
        self._forward = self._compiled() if plan.compile else self.adapter
        op_name = "ddpm_step_" if self.solver is None else "multistep_step_"
        self._inplace = None if plan.backend == "reference" else _inplace_step_op(plan.backend, op_name)
        self._checked = False
        self._graphs: list | None = None  # [(graph, steps, replays), ...], captured once
        self._graphs_key = None  # the key baked into them: None, or (seed, sample_offset) for the reference step
        self._pool = None
        self.captures = self.warmups = self.runs = 0

    def _compiled(self) -> ModelAdapter:
        mode = self.plan.compile
        if self.plan.cuda_graph and mode in _INDUCTOR_GRAPH_MODES:
            # the engine's graph holds the model: Inductor must not capture its own inside it
            options = dict(torch._inductor.list_mode_options(mode))
            options["triton.cudagraphs"] = False
            kwargs = {"options": options}
        else:
            kwargs = {"mode": mode}
        adapter = copy.copy(self.adapter)
        adapter.model = torch.compile(self.adapter.model, dynamic=False, **kwargs)
        return adapter

    # -- one step: what a graph captures ------------------------------------------------------
    def _step(self, seed: int, sample_offset: int) -> None:
        """``x <- x_{t-1}`` for the step index held by ``self.step``, then ``step -= 1``,
        all on the device (no value read back, no host copy).  The fused step reads
        the noise key from ``self.rng``; ``seed`` and ``sample_offset`` are used by the
        reference step only."""
        torch.index_select(self.timesteps, 0, self.step_n, out=self.model_t)
        model_input = self.x if self.model_input is None else self.model_input
        with torch.autocast(self.plan.device.type, dtype=self.plan.dtype, enabled=self._autocast,
                            cache_enabled=False):  # no cast cache: it would outlive a graph capture
            out = self._forward(model_input, self.model_t)
        if not self._checked:  # metadata only, first call of this engine
            self.adapter.check_output(out, self.x)
            self._checked = True
        watch_output(self.diverged, out)  # in place, on the device: a graph replays it
        if self.solver is not None:
            self._multistep_update(out, seed, sample_offset)
        elif self._inplace is not None:  # fused: reads step on the device, writes x and the model input
            self._inplace(self.x, out, self.step, self.coefs, self.rng, self.clip_denoised, self.model_input)
        else:
            x_prev = ops.ddpm_step(self.x, out, self.step_n, self.coefs, seed=seed, sample_offset=sample_offset,
                                   clip_denoised=self.clip_denoised, backend="reference")
            self.x.copy_(x_prev)
            if self.model_input is not None:
                self.model_input.copy_(x_prev)
        self.step.sub_(1)

    def _multistep_update(self, out: torch.Tensor, seed: int, sample_offset: int) -> None:
        """The solver's update after the model call: ``x`` and ``history`` in place, the step index
        and (for the SDE solver) the noise key read on the device by the fused op."""
        if self._inplace is not None:
            self._inplace(self.x, out, self.history, self.step, self.coefs, self.rng, self.clip_denoised,
                          self.solver.stochastic)
        else:
            x_next = ops.multistep_step(self.x, out, self.history, self.step, self.coefs, seed=seed,
                                        sample_offset=sample_offset, clip_denoised=self.clip_denoised,
                                        stochastic=self.solver.stochastic, backend="reference")
            self.x.copy_(x_next)
        if self.model_input is not None:  # the next model call's input: a cast (and layout) copy
            self.model_input.copy_(self.x)

    def _reset(self, seed: int, sample_offset: int) -> None:
        """``rng = (seed, sample_offset)``, ``x = x_T`` (the contract's slot K), its model-input
        copy, ``step = K - 1``; on the device, outside any graph."""
        self.rng[0].fill_(seed)  # fills with a kernel argument: no host-to-device copy, no sync
        self.rng[1].fill_(sample_offset)
        self.diverged.fill_(False)
        if self.history is not None:
            self.history.zero_()
        self.x.copy_(reference.batch_noise(seed, sample_offset, self._slot_x_T, self.shape, self.plan.device))
        if self.model_input is not None:
            self.model_input.copy_(self.x)
        self.step.fill_(self.num_steps - 1)

    # -- CUDA graphs --------------------------------------------------------------------------
    def _warm_up(self, seed: int, sample_offset: int) -> None:
        """Eager steps on a side stream (as torch.cuda.graphs' docs require): Triton
        autotuning, JIT specialisations, compilation, lazy inits."""
        device = self.plan.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._reset(seed, sample_offset)
                self._step(seed, sample_offset)
                self.warmups += 1
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)  # once per capture, outside the sampling loop

    def _capture(self, steps: int, seed: int, sample_offset: int):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            for _ in range(steps):
                self._step(seed, sample_offset)
        self.captures += 1
        return graph

    def graphs(self, seed: int, sample_offset: int) -> list:
        """``[(graph, steps, replays), ...]`` covering the K steps, captured on the first
        call.  The fused step reads the noise key from ``self.rng`` at replay time, so
        they serve every seed and offset; the reference step bakes the key in, so its
        graphs are recaptured when the key changes."""
        key = (seed, sample_offset) if self._inplace is None else None
        if self._graphs is not None and self._graphs_key == key:
            return self._graphs
        self._graphs = None  # the reference step's old graphs: their memory goes back to the pool
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # shared by all this engine's graphs
        self._warm_up(seed, sample_offset)
        per_graph = min(self.plan.steps_per_graph, self.num_steps)
        full, rest = divmod(self.num_steps, per_graph)
        sets = [(self._capture(per_graph, seed, sample_offset), per_graph, full)]
        if rest:
            sets.append((self._capture(rest, seed, sample_offset), rest, 1))
        self._graphs, self._graphs_key = sets, key
        return sets

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, seed: int = 0, sample_offset: int = 0, callback=None, bar=None) -> torch.Tensor:
        """Sample one batch: global samples ``sample_offset .. sample_offset + m - 1`` of ``seed``.

        :param callback: ``callback(i, t, x)`` after every step (x a copy); makes
            the loop eager, since a replayed graph never returns to Python per step.
        :param bar: a tqdm bar to advance (optional).
        :return: float32 ``[m, C, H, W]``, a new tensor (the buffers are reused).
        """
        check_seed(seed)
        if not _is_int(sample_offset) or sample_offset < 0:
            raise ValueError(f"sample_offset must be a non-negative int, got {sample_offset!r}")
        check_noise_capacity(self.numel, self.num_steps + 1, sample_offset + self.shape[0] - 1)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable as callback(i, t, x)")
        if self.plan.cuda_graph and callback is None:
            sets = self.graphs(seed, sample_offset)  # captured (and warmed up) once
            self._reset(seed, sample_offset)  # writes this run's key into rng, outside the graph
            for graph, steps, replays in sets:
                for _ in range(replays):
                    graph.replay()
                    if bar is not None:
                        bar.update(steps)
        else:
            self._reset(seed, sample_offset)
            timesteps = self.process.schedule.timesteps if self.solver is None else self.solver.timesteps
            for i in reversed(range(self.num_steps)):
                self._step(seed, sample_offset)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(i, int(timesteps[i]), self.x.clone())
        self.runs += 1
        return self.x.clone()


# -- the cache and the entry point ----------------------------------------------------------------
_ENGINES: collections.OrderedDict = collections.OrderedDict()
_LAST_PLAN: list = [None]


def _weights_signature(model) -> tuple:
    """Where the weights live: a moved/cast/replaced parameter gets a new engine."""
    if not isinstance(model, torch.nn.Module):
        return ()
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t.dtype, str(t.device)) for t in tensors)


def _engine(model, adapter, process, shape, plan: Plan, steps: int | None = None) -> SamplerEngine:
    """The cached engine of these arguments (``steps``: a multistep solver's model calls, else None)."""
    # The cached engine holds the model, so id(model) cannot be reused while the entry lives.
    key = (id(model), _weights_signature(model), process.to_json(), tuple(shape), plan.key(), steps)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = SamplerEngine(adapter, process, shape, plan, steps)
        _ENGINES[key] = engine
        while len(_ENGINES) > MAX_ENGINES:
            _ENGINES.popitem(last=False)
    else:
        _ENGINES.move_to_end(key)
    return engine


def cached_engines() -> list[SamplerEngine]:
    """The engines in the cache, least recently used first."""
    return list(_ENGINES.values())


def clear_engine_cache() -> None:
    """Drop every cached engine (and with them their buffers, graphs and compiled models)."""
    _ENGINES.clear()


def last_plan() -> Plan | None:
    """The plan of the last ``engine_sample`` call."""
    return _LAST_PLAN[0]


def _cpu_plan(model, adapter, n, shape, device, num_steps: int, op: str, plan: Plan, dtype, compile, channels_last,
              threads):
    """``(plan, choice)``: ``plan`` (checked by ``make_plan``) with ``cpu_plan.choose``'s dtype,
    layout, compile and threads, and its reasons in place of the requested-value lines."""
    choice = cpu_plan.choose(model, adapter.dtype, (plan.micro_batch, *shape[1:]), num_steps,
                             -(-n // plan.micro_batch), dtype=dtype, compile=compile, channels_last=channels_last,
                             threads=threads, forward=adapter)
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
    seconds = cpu_plan.warm_up(engine._forward, engine.shape, plan.dtype, adapter.dtype, plan.channels_last)
    key = cpu_plan.compile_key(model, engine.shape, plan.dtype, plan.channels_last, plan.compile, plan.threads)
    cpu_plan.record_compile(model, key, max(0.0, seconds - (choice.forward_s or 0.0)))


@_in_threads
@torch.no_grad()
def engine_sample(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None,
                  image_size=None, channels=None, batch_size: int | None = None, progress: bool = True,
                  callback=None, process=None, sample_offset: int = 0, distributed: bool = False,
                  cuda_graph=None, compile=None, backend=None, micro_batch=None, steps_per_graph=None,
                  channels_last=None, threads=None, return_plan: bool = False, **process_options):
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
    for a new key).  ``callback`` makes the loop eager.

    :param return_plan: return ``(images, plan)``.
    :return: float32 ``[n, C, H, W]`` on ``device`` (and the plan).
    """
    if distributed:
        raise ValueError("engine_sample does not shard; use fastddpm.sample(..., distributed=True)")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_seed(seed)
    if not _is_int(sample_offset) or sample_offset < 0:
        raise ValueError(f"sample_offset must be a non-negative int, got {sample_offset!r}")
    if batch_size is not None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if micro_batch is not None and micro_batch != batch_size:
            raise ValueError(f"batch_size={batch_size} and micro_batch={micro_batch} disagree; give one")
        micro_batch = batch_size
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(i, t, x)")
    process = _process(process, steps, process_options)
    # a multistep solver's steps are its model calls (its plan, checked here once); else the respacing's
    num_steps = process.multistep_plan(steps).num_steps if process.is_multistep else process.num_steps
    adapter = ModelAdapter(model, image_size=image_size, channels=channels)
    device = _device_of(device if device is not None else adapter.device)
    shape = adapter.shape(n)
    check_noise_capacity(math.prod(shape[1:]), num_steps + 1, sample_offset + n - 1)
    start = time.perf_counter()  # the plan's timing calls and any compile count as sampling time
    op = "multistep_step" if process.is_multistep else "ddpm_step"
    plan = make_plan(adapter, n, shape[1:], device, dtype=dtype, cuda_graph=cuda_graph, compile=compile,
                     backend=backend, micro_batch=micro_batch, steps_per_graph=steps_per_graph,
                     channels_last=channels_last, op=op)
    choice = None
    if device.type == "cpu":  # measured: compile, layout, dtype, threads (fastddpm.cpu_plan)
        plan, choice = _cpu_plan(model, adapter, n, shape, device, num_steps, op, plan, dtype, compile,
                                 channels_last, threads)
    _LAST_PLAN[0] = plan

    m = plan.micro_batch
    bar = tqdm(total=num_steps * -(-n // m), disable=not progress, desc="sampling", unit="step", leave=False)
    chunks = []
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    for first in range(0, n, m):
        size = min(m, n - first)
        engine = _engine(model, adapter, process, (size, *shape[1:]), plan,
                         num_steps if process.is_multistep else None)
        if choice is not None and plan.compile and engine.runs == 0:
            _compile_on_cpu(model, adapter, engine, choice)
        chunks.append(engine.run(seed, sample_offset + first, callback, bar))
        diverged |= engine.diverged  # on the device; the engine resets its flag each run
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(diverged)  # read back once, after the loop, as the images' check
    check_finite_values("the sampled images", x)
    engine_sample.last_seconds = time.perf_counter() - start
    return (x, plan) if return_plan else x
