"""``SamplerEngine``: static buffers, a device-side step counter, CUDA graphs, for one batch shape.

``fastddpm.eager`` is the reference loop; an engine runs the same
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
* The multistep solvers (``fastddpm.multistep``: DPM-Solver++ 2M/3M/2M-SDE, UniPC; the k-samplers too)
  run the same loop: their ``[R, 14]`` table and timesteps replace the DDPM ones,
  a static ``[4, *shape]`` history ring (zeroed before the loop) is advanced by
  the fused in-place ``multistep_step_`` after the model call (it reads the step
  index, and for the SDE solver the noise key, on the device, and writes both
  ``x`` and the model input, as ``ddpm_step_``).

Inpainting (``fastddpm.repaint``): a request with an ``Inpainting`` makes the engine run its walk
instead of the K steps: the walk's per-row tables replace ``coefs`` and ``timesteps``, the known image
and the mask are static buffers (refilled from each batch's request before the loop) that the fused
``ddpm_step_`` blends with, and the up rows (no model call) are the same op re-noising ``x``.  The
graphs are one per run of same-kind rows (their form is fixed by the walk), replayed in the walk's order.

Conditioning (``fastddpm.denoiser``): the model call is a static ``Denoiser`` built once per engine
over its (compiled) model; its keyword tensors (class labels, per-sample ``model_kwargs``, the
doubled guidance batch's) are buffers that ``run`` refills from the batch's request before the loop,
as it refills the noise key, and the fused step takes the guidance halves and ``w``.  A start noise
``x_T`` given in the request is copied into ``x`` there too.  A callback that returns a tensor
replaces ``x`` (the loop is eager with a callback).

A CUDA graph bakes its kernels' scalar arguments; the seed and the sample
offset are not among them (the kernel loads them from ``rng``), so an engine
captures its graphs once: every later run, whatever its seed or micro-batch
offset, only replays them.  The exception is the ``reference`` backend, whose
step is plain PyTorch with the key as Python ints: its graphs are recaptured
when the key changes.

On CPU (or ``cuda_graph=False``) the very same step runs eagerly, and equals
the eager loop (``fastddpm.eager``) bit for bit on the same backend.  With a ``callback`` the
loop also runs eagerly (the callback sees every step's ``x``, which a replayed
graph never hands to Python).

``fastddpm.engine`` caches engines and runs them for ``engine_sample``.
"""
from __future__ import annotations

import copy
import math

import torch

from . import multistep, ops
from .adapters import ModelAdapter
from .checks import check_sample_args
from .denoiser import Denoiser
from .noise import check_noise_capacity
from .ops import reference
from .plan import INDUCTOR_GRAPH_MODES, Plan
from .repaint import make_walk
from .request import SamplingRequest, replaced_x
from .thresholding import step_threshold

__all__ = ["SamplerEngine", "WARMUP_STEPS"]

WARMUP_STEPS = 2  # eager steps on a side stream before each capture (autotuning, lazy init, JIT)


class SamplerEngine:
    """Static buffers and the step loop for one ``(model, process, batch shape, plan)``.

    :param model: anything ``fastddpm.sample`` accepts, or a ``ModelAdapter``.
    :param process: a ``fastddpm.DDPM`` (already respaced to the steps wanted), or one whose
        sampler is a multistep solver (``fastddpm.multistep``).
    :param shape: the batch shape ``(m, C, H, W)``.
    :param plan: from ``make_plan`` (its ``micro_batch`` is not used here).
    :param steps: a multistep solver's model calls (default ``multistep.DEFAULT_STEPS``); ignored
        otherwise.
    :param request: a ``SamplingRequest`` of ``m`` samples whose conditioning the engine's model call takes
        (its keyword tensors' shapes and its guidance settings are the engine's; ``run`` takes later
        batches of the same form); None: the plain ``model(x, t)``.

    A multistep solver runs the same loop with its own ``[R, 14]`` table, its timesteps, and a static
    ``[4, *shape]`` float32 history ring that ``_reset`` zeroes and the fused ``multistep_step_``
    advances in place after the model call (it reads the step index from the device counter and
    writes the model input too).

    Counters for tests and profiling: ``captures`` (graphs recorded), ``warmups``
    (eager warm-up steps), ``runs``.
    """

    def __init__(self, model, process, shape, plan: Plan, steps: int | None = None,
                 request: SamplingRequest | None = None):
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        self.process = process
        self.shape = tuple(int(s) for s in shape)
        self.plan = plan
        self.solver = process.multistep_plan(steps) if process.is_multistep else None
        n, device = self.shape[0], plan.device
        inpainting = request.inpainting if request is not None else None
        # inpainting: the walk's rows are the steps, with two noise slots each (fastddpm.repaint)
        self.walk = make_walk(process, inpainting, device) if inpainting is not None else None
        self.num_steps = K = (self.walk.num_steps if self.walk is not None else
                              process.num_steps if self.solver is None else self.solver.num_steps)
        self.numel = math.prod(self.shape[1:])
        self._noise_slots = 2 * K + 1 if self.walk is not None else K + 1
        check_noise_capacity(self.numel, self._noise_slots, n - 1)
        if plan.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        if plan.channels_last and len(self.shape) != 4:
            raise ValueError(f"channels_last needs a 4-D batch shape, got {self.shape}")

        self.known = self.mask = None  # inpainting's static buffers
        if self.walk is not None:
            self.coefs, self.timesteps = self.walk.reverse, self.walk.timesteps
            self.clip_denoised = bool(process.config.clip_denoised)
            self.thresholding = process.config.thresholding
            self.known = torch.zeros(self.shape, dtype=torch.float32, device=device)
            self.mask = torch.zeros(self.shape, dtype=torch.float32, device=device)
            self._no_output = torch.zeros(self.shape, dtype=torch.float32, device=device)  # an up row reads none
        elif self.solver is None:
            tables = process.tables(device)
            self.coefs, self.timesteps = tables["coefs"], tables["timesteps"]
            self.clip_denoised = bool(process.config.clip_denoised)
            self.thresholding = process.config.thresholding
        else:
            self.coefs, self.timesteps = self.solver.tensors(device)  # coefs: the [R, 14] table
            self.clip_denoised = self.solver.clip_denoised
            self.thresholding = self.solver.thresholding
        # the thresholding reads a, b: the walk's one-step columns, else the table itself
        self._threshold_table = self.walk.reverse_step if self.walk is not None else self.coefs
        # -- static buffers: allocated once, updated in place ------------------------------
        self.x = torch.empty(self.shape, dtype=torch.float32, device=device)
        # the multistep solvers' ring: [4, *shape] float32
        self.history = multistep.new_history(self.x) if self.solver is not None else None
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
        self.request = request if request is not None else SamplingRequest.make(n)
        if self.request.n != n:
            raise ValueError(f"request is for {self.request.n} samples; this engine's batch has {n}")
        self.denoiser = Denoiser(self._forward, self.request, device, static=True)
        op_name = "ddpm_step_" if self.solver is None else "multistep_step_"
        self._inplace = ops.implementation(op_name, plan.backend)  # None for the reference
        self._graphs: list | None = None  # [(graph, steps, replays), ...], captured once
        self._graphs_key = None  # the key baked into them: None, or (seed, sample_offset) for the reference step
        self._pool = None
        self.captures = self.warmups = self.runs = 0

    @property
    def forward(self):
        """The model call the steps make, as ``forward(x, t)``: the denoiser over the adapter or its
        compiled copy when the plan compiles."""
        return self.denoiser.forward

    def _compiled(self) -> ModelAdapter:
        mode = self.plan.compile
        if self.plan.cuda_graph and mode in INDUCTOR_GRAPH_MODES:
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
            # shapes checked on its first call; ``diverged`` raised in place, on the device
            out, uncond = self.denoiser(model_input, self.model_t, self.diverged)
        w = self.denoiser.step_scale
        # dynamic thresholding's per-sample bound: a reduction on the device, captured with the step
        threshold = step_threshold(self.x, out, self.step_n, self._threshold_table, self.thresholding, uncond, w)
        if self.solver is not None:
            self._multistep_update(out, uncond, w, threshold, seed, sample_offset)
        elif self._inplace is not None:  # fused: reads step on the device, writes x and the model input
            self._inplace(self.x, out, self.step, self.coefs, self.rng, self.clip_denoised, self.model_input,
                          uncond, w, threshold, self.known, self.mask)  # known, mask: None without inpainting
        else:
            x_prev = ops.ddpm_step(self.x, out, self.step_n, self.coefs, seed=seed, sample_offset=sample_offset,
                                   clip_denoised=self.clip_denoised, uncond_output=uncond, guidance_scale=w,
                                   threshold=threshold, known=self.known, mask=self.mask, backend="reference")
            self.x.copy_(x_prev)
            if self.model_input is not None:
                self.model_input.copy_(x_prev)
        self.step.sub_(1)

    def _up_step(self, seed: int, sample_offset: int) -> None:
        """An up row of the inpainting walk: ``x <- sqrt(1 - beta) x + sqrt(beta) z`` (the same fused op, no
        model call, noise slot ``step``), then ``step -= 1``, on the device."""
        if self._inplace is not None:
            self._inplace(self.x, self._no_output, self.step, self.walk.up, self.rng, False, self.model_input,
                          None, 1.0, None, None, None)
        else:
            x_prev = ops.ddpm_step(self.x, self._no_output, self.step_n, self.walk.up, seed=seed,
                                   sample_offset=sample_offset, clip_denoised=False, backend="reference")
            self.x.copy_(x_prev)
            if self.model_input is not None:
                self.model_input.copy_(x_prev)
        self.step.sub_(1)

    def _row_step(self, row: int, seed: int, sample_offset: int) -> None:
        """The step of ``row`` (the counter's value): an up row's or a model step."""
        if self.walk is not None and self.walk.up_rows[row]:
            self._up_step(seed, sample_offset)
        else:
            self._step(seed, sample_offset)

    def _multistep_update(self, out: torch.Tensor, uncond, w: float, threshold, seed: int, sample_offset: int) -> None:
        """The solver's update after the model call: ``x``, ``history`` and the model input in place,
        the step index and (for the SDE solver) the noise key read on the device by the fused op."""
        if self._inplace is not None:  # fused: writes x, the history and the model input
            self._inplace(self.x, out, self.history, self.step, self.coefs, self.rng, self.clip_denoised,
                          self.solver.stochastic, self.model_input, uncond, w, threshold)
        else:
            x_next = ops.multistep_step(self.x, out, self.history, self.step, self.coefs, seed=seed,
                                        sample_offset=sample_offset, clip_denoised=self.clip_denoised,
                                        stochastic=self.solver.stochastic, uncond_output=uncond,
                                        guidance_scale=w, threshold=threshold, backend="reference")
            self.x.copy_(x_next)
            if self.model_input is not None:
                self.model_input.copy_(x_next)

    def _reset(self, seed: int, sample_offset: int, noise: torch.Tensor | None = None) -> None:
        """``rng = (seed, sample_offset)``, ``x = x_T`` (``noise``, else the contract's slot K), its
        model-input copy, ``step = K - 1``; on the device, outside any graph."""
        self.rng[0].fill_(seed)  # fills with a kernel argument: no host-to-device copy, no sync
        self.rng[1].fill_(sample_offset)
        self.diverged.fill_(False)
        if self.history is not None:
            self.history.zero_()
        if noise is not None:
            self.x.copy_(noise.reshape(self.shape))
        else:
            self.x.copy_(reference.batch_noise(seed, sample_offset, self._slot_x_T, self.shape, self.plan.device))
        if self.solver is not None and self.solver.start_scale != 1.0:  # a k-sampler's init_noise_sigma
            self.x.mul_(self.solver.start_scale)
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
                if self.walk is not None:
                    self._up_step(seed, sample_offset)
                self.warmups += 1
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)  # once per capture, outside the sampling loop

    def _capture(self, steps: int, seed: int, sample_offset: int, up: bool = False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            for _ in range(steps):
                (self._up_step if up else self._step)(seed, sample_offset)
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
        if self.walk is not None:
            self._graphs, self._graphs_key = self._walk_graphs(seed, sample_offset), key
            return self._graphs
        per_graph = min(self.plan.steps_per_graph, self.num_steps)
        full, rest = divmod(self.num_steps, per_graph)
        sets = [(self._capture(per_graph, seed, sample_offset), per_graph, full)]
        if rest:
            sets.append((self._capture(rest, seed, sample_offset), rest, 1))
        self._graphs, self._graphs_key = sets, key
        return sets

    def _walk_graphs(self, seed: int, sample_offset: int) -> list:
        """The inpainting walk's ``[(graph, rows, 1), ...]`` in its order: one graph per run of same-kind rows
        (at most ``steps_per_graph`` long), captured once per distinct (kind, length) and replayed."""
        runs, row = [], self.num_steps - 1
        while row >= 0:
            up, length = self.walk.up_rows[row], 0
            while row >= 0 and self.walk.up_rows[row] == up and length < self.plan.steps_per_graph:
                row, length = row - 1, length + 1
            runs.append((up, length))
        graphs = {}
        for up, length in runs:
            if (up, length) not in graphs:
                graphs[(up, length)] = self._capture(length, seed, sample_offset, up)
        return [(graphs[r], r[1], 1) for r in runs]

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, seed: int = 0, sample_offset: int = 0, callback=None, bar=None,
            request: SamplingRequest | None = None, denoiser: Denoiser | None = None) -> torch.Tensor:
        """Sample one batch: global samples ``sample_offset .. sample_offset + m - 1`` of ``seed``.

        :param callback: ``callback(i, t, x)`` after every step (x a copy; a tensor it returns
            replaces x); makes the loop eager, since a replayed graph never returns to Python per step.
        :param bar: a tqdm bar to advance (optional).
        :param request: the batch's ``SamplingRequest`` (conditioned like the engine's), in place of
            ``seed``, ``sample_offset`` and ``callback``: its keyword tensors and start noise are copied
            into the engine's buffers before the loop.
        :param denoiser: ``request``'s ``Denoiser`` when the caller already built it (the engine cache
            does, for its key); None: built here.
        :return: float32 ``[m, C, H, W]``, a new tensor (the buffers are reused).
        """
        if request is None:
            request = SamplingRequest.make(self.shape[0], seed=seed, sample_offset=sample_offset, callback=callback)
            if self.request.conditioned:
                raise ValueError("this engine's model call is conditioned: run(request=...) with its batch's request")
        elif request is not self.request and (request.conditioned or self.request.conditioned):
            self.denoiser.load(denoiser if denoiser is not None else Denoiser(self.adapter, request, self.plan.device))
        seed, sample_offset, callback = request.seed, request.sample_offset, request.callback
        check_sample_args(self.shape[0], sample_offset, None, callback)
        check_noise_capacity(self.numel, self._noise_slots, sample_offset + self.shape[0] - 1)
        if (self.walk is None) != (request.inpainting is None):
            raise ValueError("this engine's loop is " + ("an inpainting walk: run(request=...) with the batch's "
                             "inpainting" if self.walk is not None else "a plain sample: its request has no inpainting"))
        if self.walk is not None:  # the batch's known image and mask into the static buffers, before the loop
            self.known.copy_(request.inpainting.known)
            self.mask.copy_(request.inpainting.mask)
        noise = None if request.noise is None else request.noise.to(device=self.plan.device, dtype=torch.float32)
        if self.plan.cuda_graph and callback is None:
            sets = self.graphs(seed, sample_offset)  # captured (and warmed up) once
            self._reset(seed, sample_offset, noise)  # writes this run's key into rng, outside the graph
            for graph, steps, replays in sets:
                for _ in range(replays):
                    graph.replay()
                    if bar is not None:
                        bar.update(steps)
        else:
            self._reset(seed, sample_offset, noise)
            timesteps = self.process.schedule.timesteps
            if self.walk is not None:  # the walk's visit index and each row's model timestep
                timesteps = self.walk.timesteps.tolist()
            for i in reversed(range(self.num_steps)):
                self._row_step(i, seed, sample_offset)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    t_i = self.solver.callback_timestep(i) if self.solver is not None else int(timesteps[i])
                    returned = callback(i if self.walk is None else self.num_steps - 1 - i, t_i,
                                        self.x.clone())
                    if returned is not None:  # the callback's x goes on (as diffusers' callback_on_step_end)
                        self.x.copy_(replaced_x(returned, self.x))
                        if self.model_input is not None:
                            self.model_input.copy_(self.x)
        self.runs += 1
        return self.x.clone()
