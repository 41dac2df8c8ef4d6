"""The rows of ``bench_train.py``: what a run measures and one training step a row.

``BenchConfig`` is a run's settings; ``STAGES`` are fastddpm's rows, each adding one
thing to the one before; ``BUILDERS`` build any row (the peers' loops and the stages)
into a ``Runner`` whose ``step()`` is one training step, with its model's FLOPs
counted once per family (``train_flops``).  ``fastddpm_trainer`` is also the quality
check's (``train_quality.py``).  The module docstring of ``bench_train.py`` says what
each row is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from peers import ddp_unet_kwargs, diffusers_unet_kwargs, param_count

from fastddpm import DDPM, ops
from fastddpm.models.presets import PRESETS, create_model
from fastddpm.trainer import TrainConfig, Trainer

SEED = 0
T = 1000
GRAD_CLIP = 1.0
PACKAGES = ("fastddpm", "diffusers", "denoising-diffusion-pytorch", "triton")  # versions in the results


class Skipped(Exception):
    """A row that cannot run here (a backend missing on this device): a note, not a failure."""


# -- what a run measures ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    preset: str
    batch: int
    fused_backend: str
    attention_backend: str = "triton"
    compile_mode: str = "default"
    steps: int = 30
    warmup: int = 10
    max_seconds: float = 60.0
    first_call_timeout: float = 900.0
    dataset_size: int = 1024
    seed: int = SEED


@dataclass(frozen=True)
class Stage:
    """A fastddpm row: each stage keeps the ones before it."""

    name: str
    label: str
    fused_ops: bool = False
    bf16_channels_last: bool = False
    compile: bool = False
    fused_attention: bool = False


# labels: format fields ops (q_sample/loss backend), attn (attention backend), mode (compile mode)
STAGES = (
    Stage("reference", "fastddpm Trainer step: reference ops, SDPA attention, eager fp32"),
    Stage("fused_ops", "+ fused q_sample/loss ({ops})", fused_ops=True),
    Stage("bf16_cl", "+ bf16 autocast, channels_last model", True, True),
    Stage("compile", "+ torch.compile(model, mode={mode})", True, True, True),
    Stage("fused_attn", "+ fused attention ({attn})", True, True, True, True),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
BASELINES = ("diffusers", "ddp")
ROWS = BASELINES + tuple(STAGE_BY_NAME)


@dataclass
class Runner:
    """One row, built: ``step()`` runs one training step; ``flops`` of the model's
    forward + backward (None when the family was counted already)."""

    step: Callable[[], object]
    family: str
    path: str
    precision: str
    params: int
    flops: int | None


def _images(cfg: BenchConfig, shape) -> torch.Tensor:
    """``dataset_size`` random images in [-1, 1] on the CPU (the same for every row)."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.rand(cfg.dataset_size, *shape, generator=g) * 2 - 1


def train_flops(forward_loss: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``forward_loss().backward()``: matmuls, convolutions and attention
    (SDPA pinned to its math backend, fastddpm's ops on the reference backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), ops.use_backend("reference"):
        forward_loss().backward()
    return counter.get_total_flops()


def _clipped_step(params, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_diffusers(cfg: BenchConfig, out_dir: str, count_flops: bool) -> Runner:
    from diffusers import DDPMScheduler, UNet2DModel

    config, device, b = PRESETS[cfg.preset], cfg.device, cfg.batch
    torch.manual_seed(cfg.seed)
    model = UNet2DModel(**diffusers_unet_kwargs(config)).to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    # the example's defaults: lr 1e-4, betas (0.95, 0.999), weight decay 1e-6
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    params = list(model.parameters())
    data = _images(cfg, (config.in_channels, config.image_size, config.image_size)).to(device)
    flops = None
    if count_flops:
        x, t = data[:b], torch.randint(0, T, (b,), device=device)
        flops = train_flops(lambda: model(x, t).sample.square().mean())
        optimizer.zero_grad(set_to_none=True)

    def step():
        x0 = data[torch.randint(0, data.shape[0], (b,), device=device)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (b,), device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(model(noisy, t).sample, noise)
        loss.backward()
        _clipped_step(params, optimizer)

    return Runner(step, "diffusers", "diffusers-style: UNet2DModel, add_noise, MSE, AdamW", "fp32",
                  param_count(model), flops)


def build_ddp(cfg: BenchConfig, out_dir: str, count_flops: bool) -> Runner:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    config, device, b = PRESETS[cfg.preset], cfg.device, cfg.batch
    torch.manual_seed(cfg.seed)
    kwargs = ddp_unet_kwargs(cfg.preset)
    diffusion = GaussianDiffusion(Unet(**kwargs), image_size=config.image_size, timesteps=T,
                                  beta_schedule="linear", objective="pred_noise", auto_normalize=False)
    diffusion = diffusion.to(device).train()
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=8e-5, betas=(0.9, 0.99))  # its Trainer's defaults
    params = list(diffusion.parameters())
    data = _images(cfg, (config.in_channels, config.image_size, config.image_size)).to(device)
    flops = None
    if count_flops:
        flops = train_flops(lambda: diffusion(data[:b]))
        optimizer.zero_grad(set_to_none=True)

    def step():
        diffusion(data[torch.randint(0, data.shape[0], (b,), device=device)]).backward()
        _clipped_step(params, optimizer)

    desc = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "channels")
    return Runner(step, "ddp", f"denoising-diffusion-pytorch: GaussianDiffusion(Unet({desc})), Adam", "fp32",
                  param_count(diffusion), flops)


def _check_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend not in ops.available_backends(op, device, dtype):
        raise Skipped(f"backend {backend!r} cannot run {op} on {device.type} ({str(dtype).split('.')[-1]}); "
                      f"available: {', '.join(ops.available_backends(op, device, dtype))}")


def stage_backends(stage: Stage, cfg: BenchConfig) -> tuple[str, str]:
    """``(backend of q_sample and the loss, backend of attention)`` of ``stage``, checked to run here."""
    ops_backend = cfg.fused_backend if stage.fused_ops else "reference"
    attn_backend = cfg.attention_backend if stage.fused_attention else "reference"
    model_dtype = torch.bfloat16 if stage.bf16_channels_last else torch.float32
    _check_backend(ops_backend, "q_sample", cfg.device, torch.float32)
    _check_backend(ops_backend, "diffusion_loss", cfg.device, model_dtype)
    _check_backend(attn_backend, "attention", cfg.device, model_dtype)
    return ops_backend, attn_backend


def fastddpm_trainer(stage: Stage, cfg: BenchConfig, dataset, out_dir: str,
                     **train_options) -> tuple[Trainer, str, str]:
    """A ``Trainer`` of a fresh ``cfg.preset`` model (seeded) set up as ``stage`` says, the backend
    its steps must run under (``with ops.use_backend(...)``) and its model's attention backend."""
    ops_backend, attn_backend = stage_backends(stage, cfg)
    torch.manual_seed(cfg.seed)
    # attention's backend is the model's own (it holds under torch.compile, where a use_backend inside
    # the model would not); q_sample and the loss take the ops.use_backend around the step
    model = create_model(cfg.preset).set_attention_backend(attn_backend)
    # the Trainer's own options: what a user sets in TrainConfig
    config = TrainConfig(**{"steps": 10**9, "batch_size": cfg.batch, "random_flip": False, "seed": cfg.seed,
                            "mixed_precision": "bf16" if stage.bf16_channels_last else "no",
                            "channels_last": stage.bf16_channels_last,
                            "compile": cfg.compile_mode if stage.compile else "no", **train_options})
    trainer = Trainer(model, DDPM(), dataset, config, out_dir, device=cfg.device,
                      progress=False)
    return trainer, ops_backend, attn_backend


def build_stage(stage: Stage, cfg: BenchConfig, out_dir: str, count_flops: bool) -> Runner:
    config = PRESETS[cfg.preset]
    dataset = _images(cfg, (config.in_channels, config.image_size, config.image_size))
    trainer, ops_backend, attn_backend = fastddpm_trainer(stage, cfg, dataset, out_dir)
    model = trainer.model
    flops = None
    if count_flops:  # on the eager fp32 model, before any compile
        x = dataset[:cfg.batch].to(cfg.device)
        t = torch.randint(0, T, (x.shape[0],), device=cfg.device)
        model.set_attention_backend("reference")  # so that the counter sees attention's matmuls
        flops = train_flops(lambda: model(x, t).float().square().mean())
        model.set_attention_backend(attn_backend)
        trainer.optimizer.zero_grad(set_to_none=True)

    def step():
        with ops.use_backend(ops_backend):
            # the step train() runs, without its logging and checkpoint bookkeeping
            trainer.train_step(trainer.step)
        trainer.step += 1

    path = stage.label.format(ops=ops_backend, attn=attn_backend, mode=cfg.compile_mode)
    return Runner(step, "fastddpm", path, "bf16" if stage.bf16_channels_last else "fp32", param_count(model), flops)


BUILDERS = {"diffusers": build_diffusers, "ddp": build_ddp,
            **{s.name: (lambda cfg, out, count, s=s: build_stage(s, cfg, out, count)) for s in STAGES}}
