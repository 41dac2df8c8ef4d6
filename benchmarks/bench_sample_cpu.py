"""Sampling on a CPU: fastddpm against the loops people already run, on the same model object.

Every row samples with the **same model object** (``--model diffusers``: a
``UNet2DModel`` of the preset's architecture, the model users already have;
``--model fastddpm``: fastddpm's U-Net, the demo's), with random weights
(nothing is downloaded).  Rows are interleaved: round r calls every row once
before round r+1, so a change in machine load hits all rows alike.  Call 0 of a
row is its first call (compilation, the plan's timing) and is reported
separately; the median and spread (min, max) are of calls 1..reps.  The ratios to
the diffusers loop are taken round by round (the diffusers call and the row's
call of the same round, minutes apart at most) and their median reported, so a
load change between rounds cancels; the first-call ratio compares both rows'
first calls.

Rows:

* ``diffusers``: the loop ``DDPMPipeline`` runs (``model(x, t).sample`` +
  ``DDPMScheduler.step``), eager: the baseline of every ratio.
* ``diffusers_compile``: the same loop with ``torch.compile(model)``.
* ``ddpm_pytorch``: denoising-diffusion-pytorch's ``GaussianDiffusion.sample``
  (its own loop and math) around the same model.
* ``fastddpm``: ``fastddpm.sample(model, n)``, the default: on a CPU the engine
  with the measured plan (``fastddpm.cpu_plan``).
* ``fastddpm_eager``: ``fastddpm.sample(..., engine=False)``, the eager loop.
* ``fastddpm_before``: the eager loop with the U-Net attention as it was before
  issue 15 (strided q/k/v into SDPA; only with ``--model fastddpm``): "today".
* ``fastddpm_compile``: ``compile=True``.
* ``fastddpm_bf16``: ``dtype=torch.bfloat16`` (the plan picks the rest).
* ``fastddpm_bf16_compile``: ``dtype=torch.bfloat16, compile=True, channels_last=True``.

Every fastddpm row keeps its own CPU-plan memory (what it compiled, the layouts
it timed), so one row's compile does not make another row's plan compile; they
share Dynamo's and Inductor's caches, so a later compile row may compile faster
than in a fresh process (``--cold-cache`` starts from an empty Inductor cache).

    python benchmarks/bench_sample_cpu.py                        # small, n 1,4,16,64, 1000 steps
    python benchmarks/bench_sample_cpu.py --model fastddpm       # the demo's model
    python benchmarks/bench_sample_cpu.py --smoke                # seconds: n=1, 3 steps, no compile rows

Goals (issue 15), printed met / not met: the default ``fastddpm.sample`` never
slower than the diffusers loop at any n with its first call included (within
noise, 5%); >= 1.25x the diffusers loop at every n once warm; compiled fastddpm
>= 1.1x the compiled diffusers loop once both warm; bf16 >= 2x the diffusers
loop at n >= 16 once warm; ``fastddpm demo``'s sampling (``--model fastddpm``,
n=64, first call included) >= 1.5x shorter than before issue 15.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, error_line, write_results  # noqa: E402
from peers import (  # noqa: E402
    DIFFUSERS_PRESETS, NUM_TIMESTEPS, ddpm_pytorch_sampler, diffusers_loop, diffusers_preset_kwargs, param_count,
    strided_attention_forward,
)

import fastddpm  # noqa: E402
from fastddpm import cpu_plan  # noqa: E402
from fastddpm.engine import clear_engine_cache, last_plan  # noqa: E402
from fastddpm.models.unet import AttentionBlock  # noqa: E402

SEED = 0
PACKAGES = ("fastddpm", "diffusers", "denoising-diffusion-pytorch")
NOISE = 0.05  # "within noise" for the first-call goal
COLUMNS = ["label", "n", "steps", "first call s/1000", "median s/1000", "min", "max", "reps", "x diffusers (warm)",
           "x diffusers (first call)", "plan", "note"]


# -- the rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    make: Callable  # make(model, device) -> call(n, steps)
    compiles: bool = False
    fastddpm_model_only: bool = False


def _diffusers(compiled: bool):
    def make(model, device):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS)
        net = torch.compile(model, dynamic=False) if compiled else model
        return lambda n, steps: diffusers_loop(_WithSample(net, model), scheduler, n, steps, device)

    return make


class _WithSample:
    """``net(x, t).sample`` for any model (fastddpm's returns a tensor), with the model's config."""

    def __init__(self, net, model):
        self.net, self.config = net, _config(model)
        self.per_sample_t = not hasattr(model.config, "sample_size")  # diffusers' broadcasts a scalar t itself

    def __call__(self, x, t):
        out = self.net(x, t.expand(x.shape[0]) if self.per_sample_t and t.ndim == 0 else t)
        return out if hasattr(out, "sample") else _Out(out)


@dataclass
class _Out:
    sample: torch.Tensor


@dataclass
class _Config:
    in_channels: int
    sample_size: int


def _config(model):
    cfg = model.config
    if hasattr(cfg, "sample_size"):
        return cfg
    return _Config(cfg.in_channels, cfg.image_size)


def _fastddpm(**options):
    def make(model, device):
        memory = {}  # this row's plan memory, kept across its calls (filled by cpu_plan on the first)

        def call(n, steps):
            with cpu_plan.isolated_memory(memory):
                return fastddpm.sample(model, n, steps=steps, seed=SEED, progress=False, device=device, **options)

        return call

    return make


def _fastddpm_before(model, device):
    def call(n, steps):
        saved = AttentionBlock.forward
        AttentionBlock.forward = strided_attention_forward
        try:
            return fastddpm.sample(model, n, steps=steps, seed=SEED, progress=False, device=device, engine=False)
        finally:
            AttentionBlock.forward = saved

    return call


BF16 = torch.bfloat16
ROWS: dict[str, Row] = {
    "diffusers": Row("diffusers loop, eager", _diffusers(False)),
    "ddpm_pytorch": Row("denoising-diffusion-pytorch sample", ddpm_pytorch_sampler),
    "fastddpm": Row("fastddpm.sample (default: CPU plan)", _fastddpm()),
    "fastddpm_eager": Row("fastddpm.sample, engine=False", _fastddpm(engine=False)),
    "fastddpm_before": Row("fastddpm.sample before issue 15", _fastddpm_before, fastddpm_model_only=True),
    "fastddpm_bf16": Row("fastddpm.sample, dtype=bf16", _fastddpm(dtype=BF16)),
    "diffusers_compile": Row("diffusers loop + torch.compile", _diffusers(True), compiles=True),
    "fastddpm_compile": Row("fastddpm.sample, compile=True", _fastddpm(compile=True), compiles=True),
    "fastddpm_bf16_compile": Row("fastddpm.sample, bf16 + compile + NHWC",
                                 _fastddpm(dtype=BF16, compile=True, channels_last=True), compiles=True),
}


def default_rows(model_kind: str, smoke: bool) -> list[str]:
    return [name for name, row in ROWS.items()
            if not (smoke and row.compiles) and not (row.fastddpm_model_only and model_kind != "fastddpm")]


# -- the models ---------------------------------------------------------------------------------
def make_model(kind: str, preset: str, device) -> nn.Module:
    torch.manual_seed(SEED)
    if kind == "fastddpm":
        model = fastddpm.create_model(preset)
    else:
        from diffusers import UNet2DModel

        model = UNet2DModel(**diffusers_preset_kwargs(preset))
    return model.to(device).eval().requires_grad_(False)


# -- measuring ----------------------------------------------------------------------------------
def _plan_line() -> str | None:
    plan = last_plan()
    if plan is None:
        return None
    return " ".join(f"{f}={str(getattr(plan, f)).replace('torch.', '')}"
                    for f in ("dtype", "channels_last", "compile", "threads"))


def run(model, device, names, sizes, steps: int, reps: int, on_row=None) -> list[dict]:
    """Every row at every n, interleaved: a list of result dicts (``note`` where a row failed)."""
    results = []
    for n in sizes:
        clear_engine_cache()
        calls, first, times, notes, plans = {}, {}, {name: [] for name in names}, {}, {}
        for name in names:
            try:
                calls[name] = ROWS[name].make(model, device)
            except Exception as e:  # noqa: BLE001 -- recorded in the results
                notes[name] = f"setup failed: {error_line(e, 100)}"
        for r in range(reps + 1):  # round 0: the first calls
            for name in names:
                if name in notes:
                    continue
                try:
                    start = time.perf_counter()
                    calls[name](n, steps)
                    seconds = time.perf_counter() - start
                except Exception as e:  # noqa: BLE001
                    notes[name] = f"failed: {error_line(e, 120)}"
                    continue
                if r == 0:
                    first[name] = seconds
                    plans[name] = _plan_line() if name.startswith("fastddpm") and "eager" not in name \
                        and "before" not in name else None
                else:
                    times[name].append(seconds)
        scale = NUM_TIMESTEPS / steps
        for name in names:
            row = dict(row=name, label=ROWS[name].label, n=n, steps=steps)
            if name in notes or not times[name]:
                row["note"] = notes.get(name, "not measured")
            else:
                s = sorted(times[name])
                row.update({"first call s/1000": first[name] * scale, "median s/1000": statistics.median(s) * scale,
                            "min": s[0] * scale, "max": s[-1] * scale, "reps": len(s), "plan": plans.get(name),
                            "rounds s/1000": [x * scale for x in [first[name], *times[name]]]})
            results.append(row)
            print(_line(row), flush=True)
        if on_row is not None:
            on_row(results)
    add_ratios(results)
    return results


def _line(r: dict) -> str:
    head = f"{r['label']:42s} n={r['n']:<3d}"
    if "median s/1000" not in r:
        return f"{head} -- {r['note']}"
    return (f"{head} median {r['median s/1000']:9.3f} s/1000 steps [{r['min']:.3f}, {r['max']:.3f}]  "
            f"first call {r['first call s/1000']:9.3f}" + (f"  ({r['plan']})" if r.get("plan") else ""))


def ratio(results: list[dict], slow: str, fast: str, n: int, *, first: bool = False) -> float | None:
    """Row ``slow``'s time over row ``fast``'s at ``n``, round by round (the two calls closest
    in time, so a change in machine load cancels): the median over the warm rounds, or round 0
    (both first calls) with ``first``.  None if either was not measured."""
    a, b = (_get(results, row, n, "rounds s/1000") for row in (slow, fast))
    if a is None or b is None:
        return None
    if first:
        return a[0] / b[0]
    return statistics.median(x / y for x, y in zip(a[1:], b[1:]))


def add_ratios(results: list[dict]) -> None:
    """The ``x diffusers`` columns: ``ratio`` of the diffusers loop over each row, warm and first call."""
    for r in results:
        if "rounds s/1000" in r:
            r["x diffusers (warm)"] = ratio(results, "diffusers", r["row"], r["n"])
            r["x diffusers (first call)"] = ratio(results, "diffusers", r["row"], r["n"], first=True)


def _get(results, row, n, key):
    return next((r[key] for r in results if r["row"] == row and r["n"] == n and key in r), None)


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each "met", "not met" or "n/a" with the numbers."""
    sizes = sorted({r["n"] for r in results})
    lines = []

    def verdict(what, pairs, target, more=""):
        pairs = [(n, x) for n, x in pairs if x is not None]
        if not pairs:
            return f"{what}: n/a (not measured){more}"
        worst = min(x for _, x in pairs)
        shown = ", ".join(f"n={n}: {x:.2f}x" for n, x in pairs)
        return f"{what}: {'met' if worst >= target else 'not met'} ({shown}){more}"

    first = [(n, _get(results, "fastddpm", n, "x diffusers (first call)")) for n in sizes]
    lines.append(verdict("default fastddpm.sample never slower than the diffusers loop, first call included "
                         f"(>= {1 - NOISE:.2f}x)", first, 1 - NOISE))
    warm = [(n, _get(results, "fastddpm", n, "x diffusers (warm)")) for n in sizes]
    lines.append(verdict("default fastddpm.sample >= 1.25x the diffusers loop at every n once warm", warm, 1.25))
    compiled = [(n, ratio(results, "diffusers_compile", "fastddpm_compile", n)) for n in sizes]
    lines.append(verdict("fastddpm compile=True >= 1.1x the diffusers loop under torch.compile, both warm",
                         compiled, 1.1))
    bf16 = []
    for n in (s for s in sizes if s >= 16):
        best = [x for x in (_get(results, row, n, "x diffusers (warm)") for row in ("fastddpm_bf16",
                                                                                   "fastddpm_bf16_compile")) if x]
        bf16.append((n, max(best) if best else None))
    lines.append(verdict("bf16 option >= 2x the diffusers loop at n >= 16 once warm (best bf16 row)", bf16, 2.0))
    demo = ratio(results, "fastddpm_before", "fastddpm", 64, first=True)  # a demo run is a first call
    lines.append(verdict("fastddpm demo's sampling (n=64, first call included) >= 1.5x shorter than before issue 15",
                         [(64, demo)], 1.5, "" if demo else " -- needs --model fastddpm and n=64"))
    return lines


# -- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="diffusers", choices=("diffusers", "fastddpm"),
                   help="the one model object every row samples with (default: diffusers' UNet2DModel)")
    p.add_argument("--preset", default="small", choices=sorted(DIFFUSERS_PRESETS), help="architecture (default: small)")
    p.add_argument("--sizes", default=None, help="batch sizes n (default: 1,4,16,64; smoke: 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per call, reported per 1000 "
                                                           "(default: 1000; smoke: 3)")
    p.add_argument("--reps", type=int, default=None, help="warm calls per row after the first (default: 3; smoke: 2)")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all): {','.join(ROWS)}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, steadiest on shared cores)")
    p.add_argument("--cold-cache", action="store_true", help="start from an empty Inductor cache (a temp folder)")
    p.add_argument("--smoke", action="store_true", help="n=1, 3 steps, 2 reps, no compile rows")
    p.add_argument("--name", default=None, help="results file name (default: sample_cpu_<model>[_smoke])")
    p.add_argument("--out-dir", default=None, help="where the results go (default: benchmarks/results)")
    return p


def main(argv=None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    sizes = [int(s) for s in (a.sizes or ("1" if a.smoke else "1,4,16,64")).split(",")]
    steps = a.steps or (3 if a.smoke else NUM_TIMESTEPS)
    reps = a.reps or (2 if a.smoke else 3)
    if not 1 <= steps <= NUM_TIMESTEPS:
        p.error(f"--steps must be in [1, {NUM_TIMESTEPS}], got {steps}")
    if reps < 1 or a.threads < 1 or min(sizes) < 1:
        p.error("--reps, --threads and --sizes must be positive")
    names = a.rows.split(",") if a.rows else default_rows(a.model, a.smoke)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    if "fastddpm_before" in names and a.model != "fastddpm":
        p.error("row fastddpm_before needs --model fastddpm")
    cache = None
    if a.cold_cache:
        cache = tempfile.mkdtemp(prefix="inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch.set_num_threads(a.threads)
    torch._dynamo.config.cache_size_limit = 64
    device = torch.device("cpu")
    model = make_model(a.model, a.preset, device)
    records = cpu_plan._records()
    image = _config(model)
    meta = environment(device, PACKAGES) | {
        "model": f"{a.model} ({type(model).__name__}, preset {a.preset}, {param_count(model):,} parameters, "
                 "random weights): the same object in every row",
        "image": f"{image.in_channels}x{image.sample_size}x{image.sample_size}",
        "steps per call": steps,
        "s/1000": "seconds per 1000 denoising steps" + ("" if steps == NUM_TIMESTEPS
                                                        else f" (extrapolated from {steps} steps)"),
        "reps": f"{reps} warm calls per row after the first, rows interleaved; median, min, max",
        "inductor cache": f"empty ({cache})" if cache else f"as found ({len(records)} fastddpm compile records)",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpu bf16": "native (AVX-512 BF16/AMX)" if cpu_plan.bf16_native() else "not native",
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
    }
    name = a.name or f"sample_cpu_{a.model}" + ("_smoke" if a.smoke else "")
    print(f"{meta['device']}: {meta['model']}, n={sizes}, {steps} steps per call")

    def write_partial(rows):
        write_results(name, rows, COLUMNS, meta | {"partial": f"{len(rows)} rows so far"}, out_dir=a.out_dir)

    results = run(model, device, names, sizes, steps, reps, on_row=write_partial)
    meta["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["goals"] = goals(results)
    json_path, md_path = write_results(name, results, COLUMNS, meta, out_dir=a.out_dir)
    print("goals" + (" (smoke run: too short to judge)" if a.smoke else "") + ":")
    for g in meta["goals"]:
        print(f"  {g}")
    print(f"wrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()
