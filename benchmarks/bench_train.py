"""Training throughput: images/s and % of the bf16 tensor-core peak of one
training step, fastddpm's stages against the training loops of the public peers.

A step is forward + backward + optimizer step (+ the EMA update for fastddpm),
timed after warm-up; the median over ``--steps`` steps (20th/80th percentiles)
comes from ``common.measure`` (CUDA events, the device synchronised around the
timed steps).  Rows (``--rows``), in this order:

* ``diffusers``: a diffusers-style loop (as diffusers'
  ``examples/unconditional_image_generation/train_unconditional.py``):
  ``UNet2DModel`` with google/ddpm-cifar10-32's architecture (for another preset:
  that preset's architecture in diffusers' blocks) and random weights, the
  preset's dropout, ``DDPMScheduler.add_noise``, MSE, AdamW, gradient clipping
  at 1, eager fp32.
* ``ddp``: denoising-diffusion-pytorch: ``GaussianDiffusion(Unet)`` forward loss
  (linear schedule, epsilon objective, as DDPM), Adam, clipping at 1 (as its
  ``Trainer``), eager fp32.  Its ``Unet`` is not Ho et al.'s: for
  ``ddpm_cifar10`` it is the library's default ``Unet(dim=64, dim_mults=(1, 2, 4, 8))``
  (35.71M parameters against 35.75M), elsewhere the preset's widths.
* fastddpm's ``Trainer`` step (``Trainer.train_step``: what ``train()`` runs
  per step, without its logging and checkpoints; Adam, fused on CUDA, clipping
  at 1, EMA; no flips, like the peers' loops), stage by stage, each adding to
  the one before:
  ``reference`` (reference ops, eager fp32), ``fused_ops`` (q_sample and the
  loss on ``--fused-backend``: triton on CUDA, cpp on CPU), ``bf16_cl`` (bf16
  autocast, channels_last model), ``compile`` (``torch.compile`` of the model),
  ``fused_attn`` (attention on ``--attention-backend``, triton).  Attention is
  ``F.scaled_dot_product_attention`` (the reference) until the last stage.

Columns: ``x diffusers`` (images/s over the diffusers-style loop's), ``x prev``
(over the previous fastddpm stage) and ``share %`` (the stage's part of the
speedup from ``reference`` to the last stage measured, on a log scale:
``ln(t_prev / t) / ln(t_reference / t_last)``).

FLOPs per step are the model's forward + backward as
``torch.utils.flop_counter.FlopCounterMode`` counts them, once per model
family, in fp32 with ``scaled_dot_product_attention`` pinned to its math
backend and fastddpm's ops on the reference backend (so attention counts on
every device; the fused kernels are custom ops the counter cannot see).
``% bf16 peak`` = FLOPs per step / median step time / the device's dense bf16
peak (``common.bf16_peak_tflops``; ``--peak-tflops`` overrides), also for the
fp32 rows.

    python benchmarks/bench_train.py                       # GPU: ddpm_cifar10, batch 128, every row
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --device cpu   # CPU smoke: small, batch 16
    python benchmarks/bench_train.py --quality             # the quality check (slow on a CPU)

Goals (issue 6), printed as met / not met: the fastest fastddpm row >= 2x the
diffusers-style fp32 loop, and >= 35% of the bf16 peak on an H100.

``--quality``: train the ``small`` preset on digits for ``--quality-steps``
steps with the reference path and with a fast path (same seed, same initial
weights), sample ``--quality-samples`` images from each EMA model (the same
sampler and seed for both) and report ``fastddpm.metrics.fid`` against the
1797 digits (feature ``digits``).  The recipe is the README's for the shipped
digits model (lr 5e-4, EMA 0.999, no flips), shortened, with the EMA started
halfway so that a short run's EMA is not its random start.  Met when the fast path's Fréchet distance
is at most the reference's plus ``max(--quality-rel-tol x it, --quality-abs-tol)``
(two random halves of digits are 13-33 apart: the noise of the measurement).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakMemory, bf16_peak_tflops, environment, error_line, free_memory, measure,  # noqa: E402
                    timing_fields, time_limit, write_results)
from peers import ddp_unet_kwargs, diffusers_unet_kwargs, param_count  # noqa: E402

from fastddpm import DDPM, ops  # noqa: E402
from fastddpm.models.presets import PRESETS, create_model  # noqa: E402
from fastddpm.train_config import COMPILE_MODES  # noqa: E402
from fastddpm.trainer import TrainConfig, Trainer  # noqa: E402

SEED = 0
T = 1000
GRAD_CLIP = 1.0
PACKAGES = ("fastddpm", "diffusers", "denoising-diffusion-pytorch", "triton")
GOAL_X_DIFFUSERS = 2.0
GOAL_PEAK_PCT = 35.0
SHARE_MIN_LOG_SPEEDUP = math.log(1.1)  # no "share %" when reference -> last stage is within 10%
COLUMNS = ["row", "path", "precision", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "GFLOP/step",
           "TFLOP/s", "% bf16 peak", "x diffusers", "x prev", "share %", "params (M)", "peak_mem_MB", "note"]
QUALITY_COLUMNS = ["path", "stage", "steps", "train_s", "images/s", "samples", "sample_steps", "fd", "note"]


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


# -- running -------------------------------------------------------------------------------------
def run_row(name: str, cfg: BenchConfig, flops: dict[str, int]) -> dict:
    """Build, warm up and time one row; a row that cannot run becomes a note."""
    row = dict(row=name, batch=cfg.batch)
    runner = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp, PeakMemory(cfg.device) as mem:
            family = "fastddpm" if name in STAGE_BY_NAME else name
            with time_limit(cfg.first_call_timeout):  # building, counting and the first (compiling) step
                runner = BUILDERS[name](cfg, tmp, family not in flops)
                runner.step()
            if runner.flops is not None:
                flops[family] = runner.flops
            timing = measure(runner.step, cfg.device, warmup=cfg.warmup, reps=cfg.steps, max_total_s=cfg.max_seconds)
        row.update(path=runner.path, precision=runner.precision, family=runner.family, **timing_fields(timing))
        row["images/s"] = cfg.batch / (timing.median_ms * 1e-3)
        row["params (M)"] = runner.params / 1e6
        row["peak_mem_MB"] = mem.mb
        if flops.get(family):
            row["GFLOP/step"] = flops[family] / 1e9
            row["TFLOP/s"] = flops[family] / (timing.median_ms * 1e-3) / 1e12
    except Skipped as e:
        row["note"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 -- recorded in the results, the other rows still run
        row["note"] = f"failed: {error_line(e)}"
    finally:
        del runner
        free_memory(cfg.device)
    return row


def add_comparisons(rows: list[dict], peak_tflops: float | None) -> None:
    """``% bf16 peak``, ``x diffusers``, ``x prev`` and ``share %`` (see the module docstring)."""
    timed = [r for r in rows if r.get("median_ms")]
    base = next((r for r in timed if r["row"] == "diffusers"), None)
    stages = [r for r in timed if r["row"] in STAGE_BY_NAME]
    for r in timed:
        if peak_tflops and r.get("TFLOP/s"):
            r["% bf16 peak"] = 100.0 * r["TFLOP/s"] / peak_tflops
        if base is not None and r is not base:
            r["x diffusers"] = base["median_ms"] / r["median_ms"]
    for prev, r in zip(stages, stages[1:]):
        r["x prev"] = prev["median_ms"] / r["median_ms"]
    first = next((r for r in stages if r["row"] == "reference"), None)
    if first is not None and len(stages) > 1 and stages[0] is first:
        total = math.log(first["median_ms"] / stages[-1]["median_ms"])
        if abs(total) >= SHARE_MIN_LOG_SPEEDUP:  # shares of a speedup near 1x are noise
            for prev, r in zip(stages, stages[1:]):
                r["share %"] = 100.0 * math.log(prev["median_ms"] / r["median_ms"]) / total


def goals(rows: list[dict], device_label: str, peak_tflops: float | None) -> dict:
    """The issue's two goals, as ``met`` / ``not met`` / ``not evaluated`` lines."""
    fast = [r for r in rows if r.get("family") == "fastddpm" and r.get("images/s")]
    best = max(fast, key=lambda r: r["images/s"]) if fast else None
    where = "" if "H100" in device_label else f"; measured on {device_label}, the goals are for an H100"
    out = {}
    key = f"goal >= {GOAL_X_DIFFUSERS:g}x diffusers-style fp32"
    if best is None or best.get("x diffusers") is None:
        out[key] = "not evaluated: needs a fastddpm row and the diffusers row"
    else:
        x = best["x diffusers"]
        out[key] = f"{'met' if x >= GOAL_X_DIFFUSERS else 'not met'}: {x:.2f}x ({best['row']}{where})"
    key = f"goal >= {GOAL_PEAK_PCT:g}% of bf16 peak on an H100"
    if best is None or best.get("% bf16 peak") is None:
        why = "no fastddpm row" if best is None else f"no bf16 peak known for {device_label}"
        out[key] = f"not evaluated: {why}"
    else:
        pct = best["% bf16 peak"]
        out[key] = f"{'met' if pct >= GOAL_PEAK_PCT else 'not met'}: {pct:.1f}% ({best['row']}{where})"
    return out


def _print_row(r: dict) -> None:
    if not r.get("median_ms"):
        print(f"{r['row']:11s} {r.get('note', '')}")
        return
    extra = "".join(f"  {k} {r[k]:.2f}" for k in ("x diffusers", "x prev") if r.get(k) is not None)
    peak = f" {r['% bf16 peak']:5.1f}% peak" if r.get("% bf16 peak") is not None else ""
    tflops = f" {r['TFLOP/s']:7.2f} TFLOP/s" if r.get("TFLOP/s") is not None else ""
    print(f"{r['row']:11s} {r['precision']:4s} {r['median_ms']:9.2f} ms {r['images/s']:9.1f} img/s{tflops}{peak}"
          f"{extra}")


def run_benchmark(cfg: BenchConfig, row_names, peak_tflops: float | None, name: str, out_dir) -> tuple[Path, Path]:
    device_label = environment(cfg.device)["device"]
    peak = peak_tflops if peak_tflops is not None else bf16_peak_tflops(cfg.device)
    print(f"{device_label}: preset {cfg.preset}, batch {cfg.batch}, bf16 peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown'}")
    flops: dict[str, int] = {}
    rows = []
    for row_name in row_names:
        rows.append(run_row(row_name, cfg, flops))
        _print_row(rows[-1])
    add_comparisons(rows, peak)
    goal_lines = goals(rows, device_label, peak)
    for k, v in goal_lines.items():
        print(f"{k}: {v}")
    meta = environment(cfg.device, PACKAGES) | {
        "preset": cfg.preset, "batch": cfg.batch, "steps timed": cfg.steps, "warmup steps": cfg.warmup,
        "fused backend": cfg.fused_backend, "attention backend": cfg.attention_backend,
        "compile mode": cfg.compile_mode, "bf16 peak TFLOP/s": peak,
        "FLOPs": "model forward+backward, FlopCounterMode, fp32, SDPA math backend",
        "peak memory": PeakMemory.kind.get(cfg.device.type),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "seed": cfg.seed,
    } | goal_lines
    json_path, md_path = write_results(name, rows, COLUMNS, meta, out_dir=out_dir)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


# -- the quality check -------------------------------------------------------------------------
def run_quality(cfg: BenchConfig, stage_name: str, steps: int, n_samples: int, sample_steps: int | None,
                rel_tol: float, abs_tol: float, name: str, out_dir) -> tuple[Path, Path]:
    """Train ``small`` on digits with the reference path and with ``stage_name``'s path, then
    compare the Fréchet distances of their samples to the digits."""
    from fastddpm.data import digits_dataset
    from fastddpm.metrics import fid
    from fastddpm.sampling import sample

    digits = digits_dataset(16)
    rows = []
    # the README's recipe for the shipped digits model, shortened; the EMA averages the second half only,
    # so that short runs do not sample a model dragged back towards its random start
    recipe = dict(steps=steps, lr=5e-4, warmup_steps=min(100, steps // 10), ema_decay=0.999, ema_start=steps // 2,
                  checkpoint_every=0, keep_best=False, keep_last=1, log_every=steps, val_every=0, sample_every=0)
    for path, stage in (("reference", STAGE_BY_NAME["reference"]), ("fast", STAGE_BY_NAME[stage_name])):
        row = dict(path=path, stage=stage.name, steps=steps, samples=n_samples, sample_steps=sample_steps or T)
        try:
            with tempfile.TemporaryDirectory(prefix="bench_train_quality_") as tmp:
                trainer, ops_backend, _ = fastddpm_trainer(stage, cfg, digits, tmp, **recipe)
                t0 = time.perf_counter()
                with ops.use_backend(ops_backend):
                    trainer.train()
                row["train_s"] = time.perf_counter() - t0
                row["images/s"] = steps * cfg.batch / row["train_s"]
                # the same sampler (automatic backends) and noise for both: only the training differs
                images = sample(trainer.ema_model.set_attention_backend(None), n_samples, steps=sample_steps, seed=cfg.seed + 1,
                                progress=False, process=DDPM(), device=cfg.device)
            row["fd"] = fid(images, digits.images, feature="digits")
        except Skipped as e:
            row["note"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 -- recorded in the results
            row["note"] = f"failed: {error_line(e)}"
        finally:
            free_memory(cfg.device)
        rows.append(row)
        print(f"{path:9s} {stage.name:10s} " + (f"FD {row['fd']:.2f}  ({row['train_s']:.1f} s training)"
                                                if "fd" in row else row.get("note", "")))
    ref, fast = (r.get("fd") for r in rows)
    key = "goal: fast path reaches the reference path's FD"
    if ref is None or fast is None:
        verdict = "not evaluated: a path failed"
    else:
        allowed = ref + max(rel_tol * ref, abs_tol)
        verdict = f"{'met' if fast <= allowed else 'not met'}: {fast:.2f} vs {ref:.2f} (allowed <= {allowed:.2f})"
    print(f"{key}: {verdict}")
    meta = environment(cfg.device, PACKAGES) | {
        "preset": cfg.preset, "batch": cfg.batch, "train steps": steps, "seed": cfg.seed,
        "recipe": {k: v for k, v in recipe.items() if k in ("lr", "warmup_steps", "ema_decay", "ema_start")},
        "reference images": f"digits ({len(digits)})", "feature": "digits",
        "tolerance": f"max({rel_tol:g} x FD_reference, {abs_tol:g})", key: verdict,
    }
    json_path, md_path = write_results(name, rows, QUALITY_COLUMNS, meta, out_dir=out_dir)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


# -- command line --------------------------------------------------------------------------------
def _default_rows(device: torch.device) -> str:
    return ",".join(ROWS) if device.type == "cuda" else "diffusers,reference,fused_ops"


def build_parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_check.py's arguments are checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="default: ddpm_cifar10 on CUDA, small on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    p.add_argument("--rows", default=None, help=f"comma-separated, of {', '.join(ROWS)} "
                                                f"(default: all on CUDA; diffusers,reference,fused_ops on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="timing budget of a row (fewer steps if over)")
    p.add_argument("--fused-backend", default=None, help="of q_sample and the loss (default: triton on CUDA, "
                                                          "cpp on CPU)")
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--compile-mode", default="default", choices=[m for m in COMPILE_MODES if m != "no"],
                   help="the compile stage's TrainConfig.compile (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--first-call-timeout", type=float, default=900.0,
                   help="seconds for a row's build and first (compiling) step")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by device name)")
    p.add_argument("--name", default=None, help="results file name (default: train_<preset>_<device type>; "
                                                "quality: train_quality_<device type>)")
    p.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results)")
    q = p.add_argument_group("quality check")
    q.add_argument("--quality", action="store_true", help="run the quality check instead of the timing")
    q.add_argument("--quality-steps", type=int, default=2000, help="training steps of each path")
    q.add_argument("--quality-samples", type=int, default=512)
    q.add_argument("--quality-sample-steps", type=int, default=None, help="sampling steps (default: all 1000)")
    q.add_argument("--quality-stage", default=None, help="the fast path's stage (default: fused_attn on CUDA, "
                                                         "fused_ops on CPU)")
    q.add_argument("--quality-rel-tol", type=float, default=0.2)
    q.add_argument("--quality-abs-tol", type=float, default=20.0)
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)

    device = torch.device(a.device)
    gpu = device.type == "cuda"
    cfg = BenchConfig(
        device=device, preset=a.preset or ("small" if a.quality or not gpu else "ddpm_cifar10"),
        batch=a.batch or (64 if a.quality else 128 if gpu else 16),
        fused_backend=a.fused_backend or ("triton" if gpu else "cpp"), attention_backend=a.attention_backend,
        compile_mode=a.compile_mode, steps=a.steps or (30 if gpu else 5), warmup=a.warmup if a.warmup is not None
        else (10 if gpu else 1), max_seconds=a.max_seconds, first_call_timeout=a.first_call_timeout)
    if cfg.preset not in PRESETS:
        p.error(f"unknown preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
    torch._dynamo.config.cache_size_limit = 64
    if a.quality:
        if cfg.preset != "small":
            p.error("--quality trains the small preset (16x16 digits)")
        stage = a.quality_stage or ("fused_attn" if gpu else "fused_ops")
        if stage not in STAGE_BY_NAME:
            p.error(f"--quality-stage must be one of {', '.join(STAGE_BY_NAME)}")
        return run_quality(cfg, stage, a.quality_steps, a.quality_samples, a.quality_sample_steps,
                           a.quality_rel_tol, a.quality_abs_tol, a.name or f"train_quality_{device.type}",
                           a.out_dir)
    row_names = (a.rows or _default_rows(device)).split(",")
    unknown = [r for r in row_names if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    return run_benchmark(cfg, row_names, a.peak_tflops, a.name or f"train_{cfg.preset}_{device.type}", a.out_dir)


if __name__ == "__main__":
    main()
