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

The rows are built in ``train_rows.py``, the quality check runs in ``train_quality.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakMemory, bf16_peak_tflops, environment, error_line, free_memory, measure,  # noqa: E402
                    timing_fields, time_limit, write_results)
from train_quality import run_quality  # noqa: E402
from train_rows import BUILDERS, PACKAGES, ROWS, STAGE_BY_NAME, BenchConfig, Skipped  # noqa: E402

from fastddpm.models.presets import PRESETS  # noqa: E402
from fastddpm.train_config import COMPILE_MODES  # noqa: E402

GOAL_X_DIFFUSERS = 2.0
GOAL_PEAK_PCT = 35.0
SHARE_MIN_LOG_SPEEDUP = math.log(1.1)  # no "share %" when reference -> last stage is within 10%
COLUMNS = ["row", "path", "precision", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "GFLOP/step",
           "TFLOP/s", "% bf16 peak", "x diffusers", "x prev", "share %", "params (M)", "peak_mem_MB", "note"]


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
