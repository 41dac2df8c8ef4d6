"""The engine's plan: how ``fastddpm.engine`` samples, every automatic choice with its reason.

``make_plan`` picks the CUDA graphs, the ``torch.compile`` mode, the model-input dtype and layout,
the fused step's backend, the steps per graph and the micro-batch for a model, a batch and a device;
``Plan.explain()`` says what was picked and why.  On a CPU the engine then refines it by measuring
(``fastddpm.cpu_plan``).
"""
from __future__ import annotations

import dataclasses

import torch

from . import ops
from .adapters import ModelAdapter
from .checks import check_float_dtype, is_int
from .modes import TORCH_COMPILE_MODES

__all__ = ["Plan", "make_plan", "resolve_device", "COMPILE_MODES", "INDUCTOR_GRAPH_MODES", "CUDA_MICRO_BATCH"]

COMPILE_MODES = TORCH_COMPILE_MODES  # compile= takes these, or True/False/None (the trainer's "no" is its own)
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes that bring Inductor's own CUDA graphs
CUDA_MICRO_BATCH = 256  # automatic cap on one graph's batch (activation memory); micro_batch= overrides


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


def resolve_device(device) -> torch.device:
    """``device`` as a ``torch.device``; a bare ``cuda`` is the current CUDA device (an error without CUDA)."""
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
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    shape = tuple(int(s) for s in shape)
    device = resolve_device(device)
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
                if cuda_graph and mode in INDUCTOR_GRAPH_MODES else "")
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
    check_float_dtype("dtype", dtype)

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
        why = ops.unsupported(backend, op, device, dtype)  # an unknown name raises there
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
    elif not is_int(steps_per_graph) or steps_per_graph < 1:
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
    elif not is_int(micro_batch) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
    else:
        micro_batch = min(micro_batch, n)
        reasons.append(f"micro_batch={micro_batch}: requested")

    return Plan(device=device, dtype=dtype, channels_last=channels_last, backend=backend, cuda_graph=cuda_graph,
                compile=mode, steps_per_graph=steps_per_graph, micro_batch=micro_batch, reasons=tuple(reasons))
