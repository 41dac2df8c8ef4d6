"""The rows of ``bench_sample.py``: the models of a run and one ``Runner`` a row.

``make_setup`` builds fastddpm's U-Net and diffusers' ``UNet2DModel`` of the same
architecture (random weights, seeded); ``ROWS`` names every row, what it runs and
where it runs by default (the module docstring of ``bench_sample.py`` says what each
row is); ``make_runners`` builds the rows of a run, or the reason one cannot run here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from common import error_line, forward_flops
from peers import NUM_TIMESTEPS, ddpm_pytorch_sampler, diffusers_loop, diffusers_preset_kwargs, param_count

import fastddpm
from fastddpm import ops
from fastddpm.engine import clear_engine_cache, engine_sample, last_plan

SEED = 0


# -- the models ----------------------------------------------------------------------------
@dataclass
class Setup:
    """The models of one run, on one device, with random weights."""

    device: torch.device
    preset: str
    model: nn.Module  # fastddpm's UNet
    unet: nn.Module  # diffusers' UNet2DModel of the same architecture
    _flops: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.image_size, c.image_size)

    def flops(self, n: int) -> int:
        """FLOPs of one forward of the model at batch ``n`` (reference ops, so attention is SDPA)."""
        if n not in self._flops:
            x = torch.randn(n, *self.image_shape, device=self.device)
            t = torch.full((n,), NUM_TIMESTEPS // 2, device=self.device)
            with ops.use_backend("reference"):
                self._flops[n] = forward_flops(lambda: self.model(x, t))
        return self._flops[n]


def make_setup(device, preset: str) -> Setup:
    from diffusers import UNet2DModel

    device = torch.device(device)
    torch.manual_seed(SEED)
    model = fastddpm.create_model(preset).to(device).eval().requires_grad_(False)
    unet = UNet2DModel(**diffusers_preset_kwargs(preset)).to(device).eval().requires_grad_(False)
    if param_count(model) != param_count(unet):
        print(f"warning: diffusers UNet2DModel has {param_count(unet):,} parameters, fastddpm's {preset} "
              f"{param_count(model):,}: not the same architecture", file=sys.stderr)
    return Setup(device, preset, model, unet)


# -- the rows --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runner:
    """``call(n, steps)`` draws ``n`` images with ``steps`` denoising steps.

    :param describe: after a call, a line saying how it ran (the engine's plan).
    :param release: called after a row's measurements at one n (frees cached graphs).
    """

    call: Callable[[int, int], object]
    describe: Callable[[], str | None] = lambda: None
    release: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Row:
    label: str
    make: Callable[[Setup], Runner]
    needs_cuda: bool = False
    compiles: bool = False  # left out of smoke runs unless named
    default_on: tuple[str, ...] = ("cpu", "cuda")  # device types where the row runs unless named


def _diffusers(setup: Setup) -> Runner:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS)
    return Runner(lambda n, steps: diffusers_loop(setup.unet, scheduler, n, steps, setup.device))


def _diffusers_compile(setup: Setup) -> Runner:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS)
    unet = torch.compile(setup.unet, mode="reduce-overhead", dynamic=False)
    return Runner(lambda n, steps: diffusers_loop(unet, scheduler, n, steps, setup.device, compiled=True))


def _ddpm_pytorch(setup: Setup) -> Runner:
    sampler = ddpm_pytorch_sampler(setup.model, setup.device)

    def call(n, steps):
        with ops.use_backend("reference"):
            return sampler(n, steps)

    return Runner(call)


def _fastddpm_sample(backend: str | None):
    def make(setup: Setup) -> Runner:
        def call(n, steps):
            with ops.use_backend(backend):
                return fastddpm.sample(setup.model, n, steps=steps, seed=SEED, progress=False)

        return Runner(call)

    return make


def _plan_line(plan) -> str | None:
    if plan is None:
        return None
    fields = ("dtype", "channels_last", "backend", "cuda_graph", "compile", "steps_per_graph", "micro_batch")
    return " ".join(f"{f}={str(getattr(plan, f, '?')).replace('torch.', '')}" for f in fields)


def _engine(ops_backend: str | None = None, **options):
    """A row of ``fastddpm.engine.engine_sample(model, n, ..., **options)``.

    The engine's ``backend`` is that of its fused step; ``ops_backend`` is forced
    (``ops.use_backend``) for the model's attention as well, at capture and
    compile time: ``"reference"`` keeps SDPA, None lets the dispatch choose
    (Triton on a GPU)."""

    def make(setup: Setup) -> Runner:
        def call(n, steps):
            with ops.use_backend(ops_backend):
                return engine_sample(setup.model, n, steps=steps, seed=SEED, progress=False, **options)

        return Runner(call, describe=lambda: _plan_line(last_plan()), release=clear_engine_cache)

    return make


FP32, BF16 = torch.float32, torch.bfloat16
ROWS: dict[str, Row] = {
    "diffusers": Row("diffusers loop, eager fp32", _diffusers),
    "diffusers_compile": Row("diffusers loop + compile(reduce-overhead)", _diffusers_compile, needs_cuda=True,
                             compiles=True),
    "ddpm_pytorch": Row("denoising-diffusion-pytorch sample, eager", _ddpm_pytorch),
    "fastddpm_reference": Row("fastddpm.sample, reference ops", _fastddpm_sample("reference")),
    "fastddpm_sample": Row("fastddpm.sample, automatic ops (eager)", _fastddpm_sample(None)),
    "engine_eager": Row("engine, no graph, automatic ops",
                        _engine(None, cuda_graph=False, compile=False, dtype=FP32), default_on=("cpu",)),
    "engine_graph": Row("engine: CUDA graph (fp32, reference ops)",
                        _engine("reference", cuda_graph=True, compile=False, dtype=FP32, backend="reference"),
                        needs_cuda=True),
    "engine_compile": Row("engine: + torch.compile",
                          _engine("reference", cuda_graph=True, compile=True, dtype=FP32, backend="reference"),
                          needs_cuda=True, compiles=True),
    "engine_bf16": Row("engine: + bf16 (channels_last)",
                       _engine("reference", cuda_graph=True, compile=True, dtype=BF16, backend="reference"),
                       needs_cuda=True, compiles=True),
    "engine_fast": Row("engine: + fused attention and step (triton)",
                       _engine(None, cuda_graph=True, compile=True, dtype=BF16, backend="triton"),
                       needs_cuda=True, compiles=True),
}
ENGINE_STAGES = ("fastddpm_reference", "engine_graph", "engine_compile", "engine_bf16", "engine_fast")
FAST_ROW = "engine_fast"  # the fast path the goals are about


def default_rows(device: torch.device, smoke: bool) -> list[str]:
    """The rows that run on ``device`` (no compile rows in smoke mode)."""
    return [name for name, row in ROWS.items() if device.type in row.default_on
            and (device.type == "cuda" or not row.needs_cuda) and not (smoke and row.compiles)]


def make_runners(setup: Setup, names) -> dict[str, Runner | str]:
    """name -> Runner, or the reason the row cannot run here."""
    runners = {}
    for name in names:
        row = ROWS[name]
        if row.needs_cuda and setup.device.type != "cuda":
            runners[name] = "needs CUDA"
            continue
        try:
            runners[name] = row.make(setup)
        except Exception as e:  # noqa: BLE001 -- recorded in the results
            runners[name] = f"setup failed: {error_line(e, 100)}"
    return runners
