"""Sampling a DDPM U-Net end to end: fastddpm against the loops people run today.

Rows, measured side by side in one run on the same architecture with random
weights (nothing is downloaded).  The diffusers rows run diffusers' own
``UNet2DModel``, the fastddpm rows fastddpm's ``UNet``: two models of one
architecture, so on a CPU, where the model is nearly all of a step, the ratios
mix the models with the samplers.  For CPU numbers use
``bench_sample_cpu.py``: every row on the same model object, interleaved.

* ``diffusers``: the loop ``DDPMPipeline`` runs, ``unet(x, t).sample`` +
  ``DDPMScheduler.step``, eager fp32, on a ``UNet2DModel`` built from
  google/ddpm-cifar10-32's config (the baseline of the goals).  Image
  post-processing (to PIL) is left out.
* ``diffusers_compile``: the same loop with ``torch.compile(unet,
  mode="reduce-overhead")`` (GPU only).  The UNet gets ``t`` as a device
  tensor, so CUDA graphs are not skipped for a CPU input; the scheduler gets
  the CPU ``t`` as in the pipeline.
* ``ddpm_pytorch``: denoising-diffusion-pytorch's ``GaussianDiffusion.sample``
  (eager, its own loop and math) around fastddpm's ``ddpm_cifar10`` UNet with
  the reference ops: the same network, so this row differs from
  ``fastddpm_reference`` only in the sampler loop.  (Its own ``Unet(dim=128,
  dim_mults=(1, 2, 2, 2))`` is another network: linear attention at every
  level.)  Its progress bar is switched off, as in every other row.
* ``fastddpm_reference``: ``fastddpm.sample`` under ``ops.use_backend("reference")``.
* ``fastddpm_sample``: ``fastddpm.sample`` with the automatic backend (eager).
* ``engine_*``: ``fastddpm.engine.engine_sample``, one row per stage, each
  adding one thing to the previous: CUDA graph (fp32, reference ops), +
  ``torch.compile``, + bf16 model inputs, + fused kernels (``backend="triton"``:
  the attention and the update).  ``engine_eager`` (no graph) is the CPU row.

The models and rows are built in ``sample_rows.py``.

Columns: seconds per 1000-step batch (each row times ``--steps`` denoising
steps and scales to 1000: extrapolated when fewer, the header says so),
images/s, speed-up over each baseline row and over the previous engine stage,
achieved TFLOP/s (the model's FLOPs per forward, counted once by
``torch.utils.flop_counter`` on fastddpm's UNet with the reference ops, times
the steps) and % of the GPU's dense bf16 tensor-core peak, peak memory, the
first call's seconds (compilation and capture).

    python benchmarks/bench_sample.py                      # GPU: ddpm_cifar10, n 1,16,256
    python benchmarks/bench_sample.py --smoke              # CPU: small preset, n 1,4, 20 steps
    pytest benchmarks/bench_sample.py --benchmark-enable   # the same rows under pytest-benchmark

Goals (issue 5, H100): at n=1, >= 25x the diffusers eager loop and >= 2x
diffusers + reduce-overhead; at n=256, >= 40% of the bf16 tensor-core peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakMemory, bf16_peak_tflops, environment, error_line, measure, synchronize, timing_fields, time_limit,
    write_results,
)
from peers import DIFFUSERS_PRESETS, NUM_TIMESTEPS, param_count  # noqa: E402
from sample_rows import (  # noqa: E402
    ENGINE_STAGES, FAST_ROW, ROWS, SEED, Runner, Setup, default_rows, make_runners, make_setup,
)

PACKAGES = ("fastddpm", "diffusers", "denoising-diffusion-pytorch", "triton", "pytest-benchmark")

BASELINES = {  # column -> row whose time it divides
    "x diffusers": "diffusers",
    "x diffusers+compile": "diffusers_compile",
    "x ddpm-pytorch": "ddpm_pytorch",
    "x fastddpm ref": "fastddpm_reference",
}
COLUMNS = ["label", "n", "steps timed", "s/1000 steps", "images/s", *BASELINES, "x prev stage", "TFLOP/s",
           "% bf16 peak", "mem_MB", "first call s", "note"]


# -- measuring -----------------------------------------------------------------------------
def measure_row(runner: Runner, n: int, steps: int, device, *, reps: int, first_call_timeout_s: float,
                max_total_s: float) -> dict:
    """Time ``runner`` at ``n``: a first call (compiles, captures), then ``measure``'s runs."""
    try:
        t0 = time.perf_counter()
        with time_limit(first_call_timeout_s):
            runner.call(n, steps)
        synchronize(device)
        first_s = time.perf_counter() - t0
        how = runner.describe()
        with PeakMemory(device) as memory:
            timing = measure(lambda: runner.call(n, steps), device, warmup=0, reps=reps, min_sample_ms=0.0,
                             max_total_s=max_total_s)
    finally:
        runner.release()
    return dict(**timing_fields(timing), mem_MB=memory.mb, first_s=first_s, how=how)


def run(setup: Setup, names, sizes, steps: int, *, reps: int = 3, first_call_timeout_s: float = 600.0,
        max_total_s: float = 60.0, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every row at every ``n``: a list of result dicts (``note`` set where a row did not run).

    :param on_row: called with the results so far after every row (the GPU check writes
        them out, so a run stopped at its time limit still leaves its numbers).
    """
    device, peak = setup.device, bf16_peak_tflops(setup.device)
    runners = make_runners(setup, names)
    results = []
    for n in sizes:
        flops = setup.flops(n)
        for name in names:
            result = dict(row=name, label=ROWS[name].label, n=n)
            runner = runners[name]
            if isinstance(runner, str):
                result["note"] = runner
            else:
                try:
                    m = measure_row(runner, n, steps, device, reps=reps, first_call_timeout_s=first_call_timeout_s,
                                    max_total_s=max_total_s)
                except Exception as e:  # noqa: BLE001 -- recorded in the results
                    result["note"] = f"failed: {error_line(e, 120)}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    seconds = m["median_ms"] * 1e-3 * NUM_TIMESTEPS / steps
                    tflops = flops * steps / (m["median_ms"] * 1e-3) / 1e12
                    result.update({
                        "steps timed": steps, "median_ms": m["median_ms"], "p20_ms": m["p20_ms"],
                        "p80_ms": m["p80_ms"], "reps": m["reps"], "s/1000 steps": seconds, "images/s": n / seconds,
                        "TFLOP/s": tflops, "% bf16 peak": 100.0 * tflops / peak if peak else None,
                        "mem_MB": m["mem_MB"], "first call s": m["first_s"],
                    } | ({"plan": m["how"]} if m["how"] else {}))
            results.append(result)
            print(_line(result), flush=True)
            if on_row is not None:
                on_row(results)
    add_speedups(results)
    return results


def _line(r: dict) -> str:
    head = f"{r['label']:44s} n={r['n']:<4d}"
    if "s/1000 steps" not in r:
        return f"{head} -- {r['note']}"
    pct = f" {r['% bf16 peak']:5.1f}% peak" if r.get("% bf16 peak") is not None else ""
    mem = f" {r['mem_MB']:8.1f} MB" if r.get("mem_MB") is not None else ""
    return (f"{head} {r['s/1000 steps']:9.3f} s/1000 steps {r['images/s']:9.2f} img/s "
            f"{r['TFLOP/s']:7.3f} TFLOP/s{pct}{mem}")


def add_speedups(results: list[dict]) -> None:
    """Speed-up columns: each baseline's time over the row's at the same n, and the
    previous engine stage's (the stage's share)."""
    seconds = {(r["row"], r["n"]): r["s/1000 steps"] for r in results if "s/1000 steps" in r}
    for r in results:
        mine = seconds.get((r["row"], r["n"]))
        if mine is None:
            continue
        for column, base in BASELINES.items():
            other = seconds.get((base, r["n"]))
            r[column] = other / mine if other and base != r["row"] else None
        if r["row"] in ENGINE_STAGES[1:]:
            prev = seconds.get((ENGINE_STAGES[ENGINE_STAGES.index(r["row"]) - 1], r["n"]))
            r["x prev stage"] = prev / mine if prev else None


def fast_row(results: list[dict], n: int) -> dict | None:
    """The fast path at ``n``: the ``engine_fast`` row, else the fastest fastddpm row measured."""
    timed = [r for r in results if r["n"] == n and "s/1000 steps" in r]
    ours = ([r for r in timed if r["row"] == FAST_ROW]
            or [r for r in timed if r["row"].startswith(("fastddpm", "engine"))])
    return min(ours, key=lambda r: r["s/1000 steps"]) if ours else None


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each "met", "not met" or "n/a" with the numbers."""
    lines = []
    fast1 = fast_row(results, 1)
    for base, target in (("diffusers", 25.0), ("diffusers_compile", 2.0)):
        what = f"n=1: fast path >= {target:g}x {ROWS[base].label}"
        base_row = next((r for r in results if r["row"] == base and r["n"] == 1 and "s/1000 steps" in r), None)
        if fast1 is None or base_row is None:
            lines.append(f"{what}: n/a (no {'fastddpm' if fast1 is None else base} row measured at n=1)")
            continue
        x = base_row["s/1000 steps"] / fast1["s/1000 steps"]
        lines.append(f"{what}: {'met' if x >= target else 'not met'} ({x:.2f}x, {fast1['row']})")
    fast256 = fast_row(results, 256)
    what = "n=256: fast path >= 40% of the bf16 tensor-core peak"
    if fast256 is None:
        lines.append(f"{what}: n/a (no fastddpm row measured at n=256)")
    elif fast256.get("% bf16 peak") is None:
        lines.append(f"{what}: n/a (peak of this device unknown; {fast256['TFLOP/s']:.2f} TFLOP/s, {fast256['row']})")
    else:
        pct = fast256["% bf16 peak"]
        lines.append(f"{what}: {'met' if pct >= 40.0 else 'not met'} ({pct:.1f}%, {fast256['row']})")
    return lines


def metadata(setup: Setup, steps: int, smoke: bool) -> dict:
    peak = bf16_peak_tflops(setup.device)
    scaled = ("measured" if steps == NUM_TIMESTEPS
              else f"extrapolated: {steps} steps timed, scaled by {NUM_TIMESTEPS / steps:g}")
    meta = environment(setup.device, PACKAGES) | {
        "mode": "smoke (the goals are for ddpm_cifar10 on an H100)" if smoke else "full",
        "preset": setup.preset,
        "image": "x".join(map(str, setup.image_shape)),
        "params fastddpm": param_count(setup.model),
        "params diffusers": param_count(setup.unet),
        "GFLOP per image per forward": round(setup.flops(1) / 1e9, 4),
        "FLOPs": "fastddpm's UNet forward at batch n (torch FlopCounterMode, reference ops) x steps, every row",
        "s/1000 steps": scaled,
        "bf16 peak TFLOP/s": peak if peak else "unknown for this device",
        "mem_MB": PeakMemory.kind[setup.device.type],
        "seed": SEED,
    }
    if setup.device.type == "cuda":
        meta |= {"tf32 matmul": torch.backends.cuda.matmul.allow_tf32, "tf32 cudnn": torch.backends.cudnn.allow_tf32}
    return meta


# -- CLI -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_check.py's arguments are checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="small preset, n 1,4, 20 steps, no compile rows "
                                                        "(always on a CPU)")
    p.add_argument("--preset", default=None, choices=sorted(DIFFUSERS_PRESETS),
                   help="model preset (default: ddpm_cifar10; small in smoke mode)")
    p.add_argument("--sizes", default=None, help="batch sizes n (default: 1,16,256; smoke 1,4)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps timed per call; seconds are scaled to 1000 (default: 100; smoke 20)")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all that run here): {','.join(ROWS)}")
    p.add_argument("--reps", type=int, default=3, help="timed calls per row (after a first call and one more)")
    p.add_argument("--max-row-seconds", type=float, default=60.0, help="fewer reps (>= 3) past this per row")
    p.add_argument("--first-call-timeout", type=float, default=600.0, help="seconds allowed for a row's first "
                                                                          "call (compilation, graph capture)")
    p.add_argument("--name", default=None, help="results file name (default: sample_<device type>[_smoke])")
    p.add_argument("--out-dir", default=None, help="where the results go (default: benchmarks/results)")
    return p


def main(argv=None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)

    device = torch.device(a.device)
    smoke = a.smoke or device.type == "cpu"
    preset = a.preset or ("small" if smoke else "ddpm_cifar10")
    sizes = [int(s) for s in (a.sizes or ("1,4" if smoke else "1,16,256")).split(",")]
    steps = a.steps or (20 if smoke else 100)
    if not 1 <= steps <= NUM_TIMESTEPS:
        p.error(f"--steps must be in [1, {NUM_TIMESTEPS}]")
    names = a.rows.split(",") if a.rows else default_rows(device, smoke)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    torch._dynamo.config.cache_size_limit = 64

    setup = make_setup(device, preset)
    meta = metadata(setup, steps, smoke)
    print(f"{meta['device']}: {preset} ({meta['params fastddpm']:,} parameters, "
          f"{meta['GFLOP per image per forward']} GFLOP per image per forward), n={sizes}, "
          f"s/1000 steps {meta['s/1000 steps']}")
    name = a.name or f"sample_{device.type}{'_smoke' if smoke else ''}"

    def write_partial(rows):
        write_results(name, rows, COLUMNS, meta | {"partial": f"{len(rows)} rows so far; the run did not finish"},
                      out_dir=a.out_dir)

    results = run(setup, names, sizes, steps, reps=a.reps, first_call_timeout_s=a.first_call_timeout,
                  max_total_s=a.max_row_seconds, on_row=write_partial)
    goal_lines = goals(results)
    meta["goals"] = goal_lines
    json_path, md_path = write_results(name, results, COLUMNS, meta, out_dir=a.out_dir)
    print("goals" + (" (smoke run: the goals are for ddpm_cifar10 on an H100)" if smoke else "") + ":")
    for g in goal_lines:
        print(f"  {g}")
    print(f"wrote {json_path} and {md_path}")
    return results


# -- pytest-benchmark ------------------------------------------------------------------------
# pytest benchmarks/bench_sample.py --benchmark-enable  (env: BENCH_SAMPLE_SMOKE=1, BENCH_SAMPLE_SIZES=1,16,
# BENCH_SAMPLE_STEPS=100, BENCH_SAMPLE_ROWS=diffusers,engine_fast).  Timings are of `steps` steps per call;
# extra_info carries the seconds scaled to 1000 steps.
try:
    import pytest
except ImportError:  # the CLI does not need pytest
    pytest = None

if pytest is not None:
    _DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _SMOKE = os.environ.get("BENCH_SAMPLE_SMOKE") == "1" or _DEVICE.type == "cpu"
    _SIZES = [int(s) for s in os.environ.get("BENCH_SAMPLE_SIZES", "1,4" if _SMOKE else "1,16,256").split(",")]
    _STEPS = int(os.environ.get("BENCH_SAMPLE_STEPS", "20" if _SMOKE else "100"))
    _ROWS = os.environ["BENCH_SAMPLE_ROWS"].split(",") if "BENCH_SAMPLE_ROWS" in os.environ \
        else default_rows(_DEVICE, _SMOKE)

    @pytest.fixture(scope="module")
    def sample_setup():
        torch._dynamo.config.cache_size_limit = 64
        setup = make_setup(_DEVICE, "small" if _SMOKE else "ddpm_cifar10")
        return setup, make_runners(setup, _ROWS)

    @pytest.mark.parametrize("n", _SIZES)
    @pytest.mark.parametrize("row", _ROWS)
    def test_sample(benchmark, sample_setup, row, n):
        setup, runners = sample_setup
        runner = runners[row]
        if isinstance(runner, str):
            pytest.skip(runner)
        benchmark.group = f"{setup.preset} n={n}"
        benchmark.extra_info.update(row=row, label=ROWS[row].label, n=n, steps=_STEPS,
                                    flops_per_call=setup.flops(n) * _STEPS)
        sync = (lambda: torch.cuda.synchronize(setup.device)) if setup.device.type == "cuda" else (lambda: None)
        benchmark.pedantic(lambda: (runner.call(n, _STEPS), sync()), rounds=3, iterations=1, warmup_rounds=1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:
            benchmark.extra_info["s/1000 steps"] = stats.median * NUM_TIMESTEPS / _STEPS


if __name__ == "__main__":
    main()
