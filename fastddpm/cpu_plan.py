"""The sampling plan on a CPU, measured: compile or not, the input layout, the precision, the threads.

On a CPU the model's forward is 96-99% of a sampling step, so every choice is
about the model call.  The engine asks ``choose`` before it samples; ``choose``
returns what to do and one reason per automatic choice (``Plan.explain()``):

* ``channels_last``: no for a 1-channel input (the same strides as contiguous);
  otherwise, when the run is long enough for it, the model's first calls are
  timed in both layouts, interleaved, and the faster kept (contiguous unless
  channels_last wins by more than ``LAYOUT_MARGIN``); a short run keeps
  contiguous without measuring.
* ``compile``: only when it pays back.  The eager run is estimated from the
  timed forward (x steps x batches); compiling saves ``1 - 1/COMPILE_SPEEDUP``
  of it and costs: nothing if this process already compiled the model for this
  input, the time recorded for it before when Inductor's on-disk cache holds it
  (``record_compile``, a JSON next to that cache, so deleting the cache forgets
  it), else ``COLD_COMPILE_S``.  Repeated calls count together (the ski-rental
  rule): what earlier calls in this process lost by running eager for the same
  input is added to this call's saving, so a process that keeps sampling
  compiles once the eager time it has lost reaches the compile's cost, and in
  total never spends more than about twice what the best choice in hindsight
  would have (one compile's cost beyond it).
* ``dtype``: the model's (float32) unless low precision is asked for.
  ``dtype=torch.bfloat16`` is the one low-precision option on a CPU: it pays on
  CPUs with AVX-512 BF16 or AMX, most when compiled, in channels_last (measured
  below); eager bf16 is slower than fp32 at n=1.  ``x`` stays float32.
* ``threads``: torch's setting (``torch.get_num_threads()``) unless ``threads=``
  is given; on a machine busier than its cores a note says that fewer threads
  are steadier (two threads on a loaded 2-core machine made steps 10-100x
  slower at random).

Measured on a shared 2-core AVX-512 BF16 CPU, 1 thread, fastddpm's "small" U-Net
(forward ms, median of 7 interleaved calls; the numbers behind the constants):

    n    eager  compile  +freezing  +max-autotune  eager bf16  compile bf16 (NHWC)
    1     5.2     4.2      3.2         3.3            7.9         5.2
    16   45.8    41.5     40.4        39.1           39.2        30.9
    64  224.7   160.8    161.4       160.0          120.7        98.3

Compile's first call: 47-127 s cold on the loaded machine (19-39 s on a quiet one),
2-5 s from a warm cache.  Inductor's ``freezing`` and CPU max-autotune add nothing
measurable over the default mode here, and freezing bakes the weights into the
compiled code (an EMA model updated in place would sample with stale weights), so
the plan compiles with the default mode only.  Measured later on the same machine, quieter (the
digits model, 1 thread, 15 interleaved forwards): Inductor's C++ wrapper (``cpp_wrapper``) is
1.06x the default compile at n=1 and 1.01x at n=16 for a first compile 25-28 s longer, and
channels_last *weights* for a 1-channel input (whose own layout changes nothing) 1.02-1.05x
compiled, which would mean converting the user's model; neither is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .checks import is_int

__all__ = ["CpuChoice", "choose", "why_not_timed", "bf16_native", "record_compile", "compile_key", "warm_up",
           "using_threads", "check_threads", "isolated_memory", "COMPILE_SPEEDUP", "COLD_COMPILE_S"]

# Conservative (low-end) compile speed-ups of the forward on a CPU, by model-input dtype: the
# plan compiles only when the saving at this speed-up beats the compile's cost.
COMPILE_SPEEDUP = {torch.float32: 1.15, torch.bfloat16: 1.2, torch.float16: 1.15}
COLD_COMPILE_S = 60.0  # a first compile with an empty Inductor cache (19-127 s measured on 2 shared cores)
MIN_COMPILE_S = 1.0  # no compile takes less, even from a warm cache: a smaller saving never pays
WARM_FRACTION = 0.15  # a warm-cache compile, as a share of the cold one, when only the cold one was recorded
MEASURE_SHARE = 0.05  # at most this share of the estimated run is spent timing layouts
LAYOUT_MARGIN = 1.03  # channels_last must be this much faster to be picked (timing noise)
LAYOUT_CALLS = 2  # timed calls per layout, interleaved, after the first call
RECORD_NAME = "fastddpm_compile_times.json"

_COMPILED_HERE: set = set()  # (id(model), compile_key()) compiled in this process: dynamo's cache holds them
_FORWARDS: dict = {}  # (id(model), batch shape, dtype, channels_last, threads) -> (forward s, exact)
_LAYOUTS: dict = {}  # (id(model), batch shape, dtype, threads) -> a measured layout choice, reused in this process
_FOREGONE: dict = {}  # (id(model), compile_key()) -> seconds earlier eager calls in this process could have saved
_MEMORY = ("_COMPILED_HERE", "_FORWARDS", "_LAYOUTS", "_FOREGONE")  # the process's plan memory: every cache above


@contextlib.contextmanager
def isolated_memory(memory: dict | None = None):
    """``with isolated_memory(memory):`` the plan inside the block remembers only ``memory`` (what
    it compiled, timed and lost to eager calls), and the process's memory is back after it.

    :param memory: a dict from an earlier block, to go on from where it stopped; a cache it lacks
        (an empty dict: all of them) is added to it, new.  None: new caches, forgotten after the block.
    :return: (as the ``with`` target) ``memory``, which the plan updates in place.
    """
    memory = {} if memory is None else memory
    for name in _MEMORY:
        memory.setdefault(name, type(globals()[name])())
    saved = {name: globals()[name] for name in _MEMORY}
    globals().update({name: memory[name] for name in _MEMORY})
    try:
        yield memory
    finally:
        globals().update(saved)


@dataclasses.dataclass(frozen=True)
class CpuChoice:
    """What ``choose`` picked (given values are kept) and why, one line per choice."""

    dtype: torch.dtype
    channels_last: bool
    compile: str | None
    threads: int
    reasons: tuple[str, ...]
    forward_s: float | None = None  # one eager forward at the batch size, when measured
    measure_s: float = 0.0  # spent measuring


def bf16_native() -> bool:
    """This CPU computes bfloat16 natively (AVX-512 BF16 or AMX), so bf16 matmuls and convolutions pay."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _busy_note(threads: int) -> str:
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = os.cpu_count() or 1
    if threads > 1 and load + threads > cores + 0.5:
        return (f" (note: load {load:.1f} on {cores} cores; on a busy machine fewer threads are steadier: "
                "threads=1)")
    return ""


# -- timing the model ---------------------------------------------------------------------
def _inputs(shape, channels_last: bool, dtype=torch.float32):
    """A model input as the engine's buffer holds it: ``dtype``, in the layout, and a timestep
    vector (t = 0, valid for any process length).  Its own generator: torch's global RNG, which
    the user may rely on, is left alone."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.zeros(shape[0], dtype=torch.int64)
    return x, t


def _forward(forward, x, t, dtype, weights_dtype) -> float:
    """Seconds of one ``forward(x, t)`` as the engine calls it (autocast when ``dtype`` is not the weights')."""
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != weights_dtype, cache_enabled=False):
        forward(x, t)
    return time.perf_counter() - start


def warm_up(forward, shape, dtype, weights_dtype, channels_last: bool) -> float:
    """Call ``forward`` once on an input like the engine's (layout, dtype, autocast): for a
    compiled model this is the compile.  :return: its seconds."""
    x, t = _inputs(shape, channels_last, dtype)
    return _forward(forward, x, t, dtype, weights_dtype)


# -- compile records ------------------------------------------------------------------------
def compile_key(model, shape, dtype, channels_last: bool, mode: str, threads: int) -> str:
    """What a compiled forward depends on, stable across processes: the model's class and
    parameter shapes, the input, the mode, the threads (Inductor's CPU code bakes them in),
    and torch's version."""
    params = ()
    if isinstance(model, torch.nn.Module):
        params = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters())
    text = repr((type(model).__module__, type(model).__qualname__, params, tuple(shape), str(dtype), channels_last,
                 mode, threads, torch.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _record_path() -> Path | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir()) / RECORD_NAME
    except Exception:  # noqa: BLE001 -- no record, the cold estimate is used
        return None


def _records() -> dict:
    path = _record_path()
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def record_compile(model, key: str, seconds: float) -> None:
    """Remember that ``model`` was compiled for ``key`` in ``seconds``: in this process, and for
    later processes in a JSON in Inductor's cache folder (unless this process had compiled it)."""
    if (id(model), key) in _COMPILED_HERE:
        return
    _COMPILED_HERE.add((id(model), key))
    path = _record_path()
    if path is None:
        return
    records = _records()
    records[key] = (records.get(key, []) + [round(float(seconds), 3)])[-5:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the next process uses the cold estimate


def _compile_cost(model, key: str) -> tuple[float, str]:
    """Estimated seconds to compile ``model`` for ``key`` now, and where the estimate comes from."""
    if (id(model), key) in _COMPILED_HERE:
        return 0.0, "already compiled in this process"
    try:
        import torch._inductor.config as inductor_config

        cache_on = bool(inductor_config.fx_graph_cache)
    except Exception:  # noqa: BLE001
        cache_on = False
    seen = _records().get(key) if cache_on else None
    if seen and len(seen) >= 2:
        return seen[-1], f"a warm Inductor cache: compiled in {seen[-1]:.1f} s last time"
    if seen:
        est = seen[0] * WARM_FRACTION
        return est, f"a warm Inductor cache: ~{WARM_FRACTION:.0%} of the {seen[0]:.1f} s cold compile recorded"
    return COLD_COMPILE_S, f"a cold compile, estimated {COLD_COMPILE_S:.0f} s (nothing recorded for this model)"


# -- the choice -----------------------------------------------------------------------------
def choose(model, weights_dtype: torch.dtype, batch_shape, num_steps: int, batches: int, *, dtype=None,
           compile=None, channels_last=None, threads=None, forward=None) -> CpuChoice:
    """The CPU plan's automatic choices for ``batches`` engine batches of ``batch_shape``.

    :param model: the user's model (its class and parameter shapes key the compile records).
    :param weights_dtype: the model's weights' dtype.
    :param batch_shape: ``(m, C, H, W)`` of one engine batch.
    :param num_steps: model calls per batch.
    :param batches: engine batches in this call.
    :param dtype, compile, channels_last, threads: None for automatic; a given value is kept
        (and checked here only for what is CPU-specific).
    :param forward: ``forward(x, t)``, the model call as the engine makes it (default ``model``).
    """
    forward = forward if forward is not None else model
    reasons = []
    image = len(batch_shape) == 4

    # threads
    if threads is None:
        threads = torch.get_num_threads()
        reasons.append(f"threads={threads}: torch's setting (pass threads= to change it){_busy_note(threads)}")
    else:
        check_threads(threads)
        reasons.append(f"threads={threads}: requested")

    # dtype
    if dtype is None:
        dtype = weights_dtype
        option = ("; dtype=torch.bfloat16 is an option on this CPU (AVX-512 BF16/AMX): it pays at n >= 16, "
                  "most when compiled" if bf16_native() and dtype == torch.float32 else "")
        reasons.append(f"dtype={dtype}: the model's; a CPU keeps it unless low precision is asked for{option}")
    elif dtype == torch.bfloat16 and not bf16_native():
        reasons.append("dtype=torch.bfloat16: requested; note: this CPU has no native bfloat16 (AVX-512 BF16 or "
                       "AMX), so it is emulated and likely slower than float32")
    else:
        reasons.append(f"dtype={dtype}: requested")
    low = dtype != torch.float32

    # channels_last (with the timing of the first calls), then compile
    start = time.perf_counter()
    forward_s = None
    unmeasured = why_not_timed(model)
    auto_layout, auto_compile = channels_last is None, compile is None
    if unmeasured is not None:
        if channels_last is None:
            channels_last = False
            reasons.append(f"channels_last=False: {unmeasured}")
        if compile is None:
            compile = False
            reasons.append(f"compile=None: {unmeasured}")
    if channels_last is None:
        if not image:
            channels_last = False
            reasons.append("channels_last=False: the model input is not a 4-D image batch")
        elif batch_shape[1] == 1:
            channels_last = False
            reasons.append("channels_last=False: a 1-channel input has the same strides in either layout")
        else:
            key = (id(model), tuple(batch_shape), dtype, threads)
            if key in _LAYOUTS:
                channels_last, forward_s, why = _LAYOUTS[key]
                why += " (measured by an earlier call in this process)"
            else:
                channels_last, forward_s, why, timed = _pick_layout(forward, batch_shape, dtype, weights_dtype,
                                                                    num_steps, batches, prefer_nhwc=low)
                if timed:  # a short run's default is not kept: a longer one measures
                    _LAYOUTS[key] = (channels_last, forward_s, why)
                    _bound(_LAYOUTS)
                elif forward_s is not None:  # a first call's time: an upper bound for the compile choice
                    _FORWARDS.setdefault((id(model), tuple(batch_shape), dtype, False, threads), (forward_s, False))
                    forward_s = None
            reasons.append(why)
    elif not (unmeasured and auto_layout):
        reasons.append(f"channels_last={channels_last}: requested")
    if compile is None:
        mode, forward_s, why = _pick_compile(model, forward, batch_shape, dtype, weights_dtype, channels_last,
                                             threads, forward_s, num_steps, batches)
        reasons.append(why)
    else:
        mode = None if compile is False else ("default" if compile is True else compile)
        if not (unmeasured and auto_compile):
            reasons.append(f"compile={mode!r}: requested")
    measure_s = time.perf_counter() - start
    if measure_s >= 0.01:
        reasons.append(f"timing={measure_s:.2f} s: the model calls the plan timed (part of the sampling time)")
    return CpuChoice(dtype=dtype, channels_last=channels_last, compile=mode, threads=threads, reasons=tuple(reasons),
                     forward_s=forward_s, measure_s=measure_s)


def why_not_timed(model) -> str | None:
    """Why the plan must not call ``model`` on a made-up input, or None when it may."""
    if not isinstance(model, torch.nn.Module):
        return "not timed: the model is a plain callable (a timing call could have side effects); eager, as given"
    if model.training:
        return ("not timed: the model is in training mode (a timing call could update its state, e.g. batch-norm "
                "statistics); eager, as given (call model.eval() for the measured plan)")
    return None


def _pick_layout(forward, batch_shape, dtype, weights_dtype, num_steps, batches, prefer_nhwc):
    """``(channels_last, seconds of one forward in it or None, reason, timed)`` from timing both
    layouts, or the default without timing when the run is too short to pay for it."""
    x0, t = _inputs(batch_shape, False, dtype)
    x1 = x0.contiguous(memory_format=torch.channels_last)
    first = _forward(forward, x0, t, dtype, weights_dtype)  # the first call: lazy init included
    estimate = first * num_steps * batches
    calls = 1 + 2 * (LAYOUT_CALLS + 1)
    if first * calls > MEASURE_SHARE * estimate:
        keep = prefer_nhwc
        why = (f"channels_last={keep}: not measured, the run is short (~{estimate:.1f} s; timing both layouts would "
               f"take ~{first * calls:.1f} s); " + ("low precision runs best in NHWC" if keep else "contiguous kept"))
        return keep, None if keep else first, why, False
    _forward(forward, x1, t, dtype, weights_dtype)  # the first channels_last call
    times = {False: [], True: []}
    for _ in range(LAYOUT_CALLS):
        times[False].append(_forward(forward, x0, t, dtype, weights_dtype))
        times[True].append(_forward(forward, x1, t, dtype, weights_dtype))
    nchw, nhwc = min(times[False]), min(times[True])  # the least disturbed call of each (shared cores)
    keep = nchw > nhwc * LAYOUT_MARGIN
    why = (f"channels_last={keep}: timed at batch {batch_shape[0]}: NHWC {nhwc * 1e3:.1f} ms vs NCHW "
           f"{nchw * 1e3:.1f} ms per forward ({nchw / nhwc:.2f}x; picked only if > {LAYOUT_MARGIN:.2f}x)")
    return keep, nhwc if keep else nchw, why, True


def _pick_compile(model, forward, batch_shape, dtype, weights_dtype, channels_last, threads, forward_s, num_steps,
                  batches):
    """``(mode or None, seconds of an eager forward, reason)``: compile when the saving over
    this call, plus what earlier eager calls for this input lost (``_FOREGONE``), beats the
    compile's cost.  The forward is timed once per process for an input (``_FORWARDS``), and
    the records are read only when the saving could beat any compile."""
    speedup = COMPILE_SPEEDUP.get(dtype, 1.15)
    key = compile_key(model, batch_shape, dtype, channels_last, "default", threads)
    if (id(model), key) in _COMPILED_HERE:
        return "default", forward_s, "compile='default': already compiled in this process (this input, these threads)"
    foregone = _FOREGONE.get((id(model), key), 0.0)
    timed = (id(model), tuple(batch_shape), dtype, channels_last, threads)
    exact = forward_s is not None
    if not exact:  # (seconds, exact): a first call's time (lazy init included) is an upper bound
        forward_s, exact = _FORWARDS.get(timed, (None, False))
    x = None
    if forward_s is None:
        x, t = _inputs(batch_shape, channels_last, dtype)
        forward_s = _forward(forward, x, t, dtype, weights_dtype)
    if not exact and forward_s * num_steps * batches * (1.0 - 1.0 / speedup) + foregone > MIN_COMPILE_S:
        if x is None:
            x, t = _inputs(batch_shape, channels_last, dtype)
            _forward(forward, x, t, dtype, weights_dtype)
        forward_s, exact = _forward(forward, x, t, dtype, weights_dtype), True
    _FORWARDS[timed] = (forward_s, exact)
    _bound(_FORWARDS)
    eager_s = forward_s * num_steps * batches
    saving = eager_s * (1.0 - 1.0 / speedup)
    run = (f"the eager run is ~{eager_s:.1f} s ({forward_s * 1e3:.1f} ms x {num_steps} steps x {batches} "
           f"batch{'es' if batches > 1 else ''}), compiling saves ~{saving:.1f} s at {speedup:.2f}x")
    if foregone > 0.0:
        run += (f", plus ~{foregone:.1f} s that earlier eager calls in this process lost on this input "
                f"(~{saving + foregone:.1f} s together)")
    if saving + foregone <= MIN_COMPILE_S:
        _forgo(model, key, foregone + saving)
        return None, forward_s, (f"compile=None: {run}, less than any compile takes (>= {MIN_COMPILE_S:.0f} s); "
                                 "pass compile=True to compile anyway")
    cost, source = _compile_cost(model, key)
    run += f"; compiling costs ~{cost:.1f} s ({source})"
    if saving + foregone > cost:
        _FOREGONE.pop((id(model), key), None)
        return "default", forward_s, f"compile='default': {run}"
    _forgo(model, key, foregone + saving)
    return None, forward_s, f"compile=None: {run}; pass compile=True to compile anyway"


def _forgo(model, key: str, seconds: float) -> None:
    """Remember that eager calls for ``key`` have lost ``seconds`` in this process so far."""
    _FOREGONE[(id(model), key)] = seconds
    _bound(_FOREGONE)


def _bound(cache: dict, size: int = 64) -> None:
    """Drop the oldest entries of a per-process cache beyond ``size``."""
    while len(cache) > size:
        cache.pop(next(iter(cache)))


# -- threads ---------------------------------------------------------------------------------
def check_threads(threads) -> None:
    """``threads`` is None (torch's setting) or a positive int, else a ``ValueError`` naming it."""
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")


class using_threads:
    """``with using_threads(k):`` torch uses ``k`` CPU threads inside the block (None: unchanged)."""

    def __init__(self, threads):
        check_threads(threads)
        self.threads = threads

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.threads is not None and self.threads != self.saved:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)
        return False
