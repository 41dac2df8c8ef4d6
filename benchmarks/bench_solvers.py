"""Quality per model call: few-step solvers against 1000-step DDPM on the shipped digits model.

Rows (each ``n`` samples from the shipped ``digits_small`` model, eager on this device):

* ``fastddpm`` DDPM (ancestral) at 1000/250/100 steps, DDIM (eta 0) at 50/20/10, and the
  multistep solvers ``dpm++2m``, ``dpm++3m``, ``unipc`` at 25/20/10/5 model calls and
  ``dpm++2m-sde`` at 25/20, all through ``fastddpm.sample`` (the noise contract's x_T).
* ``diffusers``: ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` configured
  as the same process (linear betas, epsilon, ``thresholding=True, sample_max_value=1`` for
  the model's clipped x0), the loop its pipelines run, from the same x_T as the fastddpm
  row of the same solver and steps (the SDE rows draw their step noise from a
  ``torch.Generator`` seeded with the row's seed, as diffusers' pipelines do).

With ``--seeds 0,1,2`` each row is sampled once per seed (the seed sets x_T and the SDE noise) and
reports the mean FD, precision and recall, the FD's range over the seeds and the median seconds:
at 1000 samples the FD of one setting moves by several units from one draw to the next.

Columns: Fréchet distance, precision and recall (k=3) in the shipped digits
classifier's feature space against all 1797 digits (``fastddpm.metrics.evaluate``),
wall seconds, speed-up over DDPM-1000.

Goal (issue 14): a solver at <= 20 model calls within 1.1x the FD of DDPM-1000, and the
fastest fastddpm setting that meets it >= 30x faster than DDPM-1000 and no slower than
diffusers' fastest setting that meets it.

    OMP_NUM_THREADS=1 python benchmarks/bench_solvers.py --n 1000     # the full table
    python benchmarks/bench_solvers.py --smoke                        # seconds: a few rows, n=16
    # add or redo rows, keeping the others of an earlier run:
    python benchmarks/bench_solvers.py --reuse benchmarks/results/solvers_cpu.json --rows fastddpm:ddpm:100

Besides ``<name>.json`` and ``<name>.md`` it draws ``<name>.png``: Fréchet distance against
model calls per solver, with DDPM-1000's and the goal's line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, error_line, write_results  # noqa: E402

PACKAGES = ("fastddpm", "diffusers")
COLUMNS = ["impl", "sampler", "steps", "model_calls", "seeds", "fd", "fd_range", "precision", "recall", "seconds",
           "speedup_vs_ddpm1000", "note"]
# the rows the goal needs first, so that a run cut short still answers it
FULL_ROWS = ([("fastddpm", "ddpm", 1000)]
             + [(impl, solver, s) for solver in ("dpm++2m", "dpm++3m", "unipc") for s in (25, 20, 10, 5)
                for impl in ("fastddpm", "diffusers")]
             + [(impl, "dpm++2m-sde", s) for s in (25, 20) for impl in ("fastddpm", "diffusers")]
             + [("fastddpm", "ddim", s) for s in (50, 20, 10)]
             + [("fastddpm", "ddpm", s) for s in (250, 100)])
SMOKE_ROWS = [("fastddpm", "ddpm", 20), ("fastddpm", "dpm++2m", 5), ("diffusers", "dpm++2m", 5), ("fastddpm", "unipc", 5)]
FD_FACTOR, MAX_CALLS, SPEEDUP = 1.1, 20, 30.0


def diffusers_scheduler(solver: str, config):
    """The diffusers scheduler equal to fastddpm's ``solver`` on a DDPM config (linear or cosine betas)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    prediction = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}[config.prediction]
    kw = dict(num_train_timesteps=config.num_timesteps, prediction_type=prediction,
              beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[config.schedule],
              thresholding=config.clip_denoised, sample_max_value=1.0)
    if solver == "unipc":
        return UniPCMultistepScheduler(**kw)
    return DPMSolverMultistepScheduler(**kw, solver_order=3 if solver == "dpm++3m" else 2,
                                       algorithm_type="sde-dpmsolver++" if solver.endswith("sde") else "dpmsolver++")


@torch.no_grad()
def diffusers_sample(model, process, solver: str, steps: int, n: int, seed: int) -> torch.Tensor:
    from fastddpm.ops.reference import batch_noise

    sched = diffusers_scheduler(solver, process.config)
    sched.set_timesteps(steps)
    x = batch_noise(seed, 0, steps, (n, *model_shape(model)), "cpu")  # fastddpm's x_T for the same steps
    generator = torch.Generator().manual_seed(seed)  # the SDE solver's step noise
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(n)), t, x, generator=generator).prev_sample
    return x


def model_shape(model) -> tuple[int, int, int]:
    c = model.config
    return (c.in_channels, c.image_size, c.image_size)


def run_row(model, process, impl: str, sampler: str, steps: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    import fastddpm

    start = time.perf_counter()
    if impl == "diffusers":
        x = diffusers_sample(model, process, sampler, steps, n, seed)
    else:
        x = fastddpm.sample(model, n, steps=steps, seed=seed, process=process.with_options(sampler=sampler),
                            progress=False, device="cpu")
    return x, time.perf_counter() - start


def measure_row(model, process, impl: str, sampler: str, steps: int, n: int, seeds: list[int], evaluate) -> dict:
    """One row over ``seeds``: mean scores, the FD's range and the median seconds."""
    import statistics

    runs = []
    for seed in seeds:
        x, seconds = run_row(model, process, impl, sampler, steps, n, seed)
        scores = evaluate(x)  # one pass of the classifier gives all three
        runs.append({k: scores[k] for k in ("fd", "precision", "recall")} | {"seconds": seconds})
    fds = [r["fd"] for r in runs]
    return {"seeds": ",".join(map(str, seeds)), "fd_range": f"{min(fds):.3g}-{max(fds):.3g}",
            "seconds": statistics.median(r["seconds"] for r in runs),
            **{k: statistics.fmean(r[k] for r in runs) for k in ("fd", "precision", "recall")}}


def baseline(rows: list[dict]) -> dict | None:
    """The measured DDPM row with the most steps (DDPM-1000 in the full table)."""
    return max((r for r in rows if r["sampler"] == "ddpm" and "fd" in r), key=lambda r: r["steps"], default=None)


def verdict(rows: list[dict]) -> str:
    base = baseline(rows)
    if base is None:
        return "not evaluated: no DDPM row"
    name = f"DDPM-{base['steps']}"
    bound = FD_FACTOR * base["fd"]
    meets = [r for r in rows if "fd" in r and r["sampler"] not in ("ddpm",) and r["model_calls"] <= MAX_CALLS
             and r["fd"] <= bound]
    ours = min((r for r in meets if r["impl"] == "fastddpm"), key=lambda r: r["seconds"], default=None)
    theirs = min((r for r in meets if r["impl"] == "diffusers"), key=lambda r: r["seconds"], default=None)
    if ours is None:
        return (f"not met: no fastddpm setting at <= {MAX_CALLS} calls has FD <= {bound:.2f} ({FD_FACTOR}x {name}'s "
                f"{base['fd']:.2f})")
    speedup = base["seconds"] / ours["seconds"]
    ok = speedup >= SPEEDUP and (theirs is None or ours["seconds"] <= theirs["seconds"])
    vs = (f"; diffusers' fastest meeting it: {theirs['sampler']} {theirs['steps']} in {theirs['seconds']:.1f} s"
          if theirs else "; no diffusers setting meets it")
    return (f"{'met' if ok else 'not met'}: fastddpm {ours['sampler']} {ours['steps']} FD {ours['fd']:.2f} <= "
            f"{bound:.2f}, {ours['seconds']:.1f} s = {speedup:.1f}x faster than {name} (goal {SPEEDUP:g}x){vs}")


def parse_rows(text: str) -> list[tuple[str, str, int]]:
    """``"impl:sampler:steps,..."`` as rows, each checked against the full table's."""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"--rows: {item!r} is not impl:sampler:steps (e.g. fastddpm:ddpm:100)")
        row = (parts[0], parts[1], int(parts[2]))
        if row not in FULL_ROWS:
            raise ValueError(f"--rows: {item!r} is not a row of the table; rows are "
                             + ", ".join(":".join(map(str, r)) for r in FULL_ROWS))
        rows.append(row)
    if not rows:
        raise ValueError("--rows: no rows given")
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    """Fréchet distance against model calls (up to 50) for each impl and sampler, with
    DDPM-1000's FD and the goal's bound as horizontal lines."""
    from fastddpm.plots import plot_lines

    series = {}
    for r in sorted((r for r in rows if "fd" in r and r["model_calls"] <= 50), key=lambda r: r["model_calls"]):
        xs, ys = series.setdefault(f"{r['impl']} {r['sampler']}", ([], []))
        xs.append(r["model_calls"])
        ys.append(r["fd"])
    base = baseline(rows)
    if base is not None and series:
        span = [min(min(xs) for xs, _ in series.values()), max(max(xs) for xs, _ in series.values())]
        series[f"DDPM-{base['steps']}"] = (span, [base["fd"]] * 2)
        series[f"{FD_FACTOR}x DDPM-{base['steps']} (goal)"] = (span, [FD_FACTOR * base["fd"]] * 2)
    return plot_lines(series, path, title="quality per model call (shipped digits model)",
                      xlabel="model calls", ylabel="Frechet distance", size=(760, 480))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--seeds", default="0", help="seeds per row, separated by commas (default 0); a row reports "
                   "the mean over them")
    p.add_argument("--smoke", action="store_true", help="a few short rows, n=16 unless --n is given")
    p.add_argument("--name", default=None, help="results file name (default solvers_cpu[_smoke])")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--reuse", default=None,
                   help="a results JSON of an earlier run (same --n): its measured rows are kept, not rerun")
    p.add_argument("--rows", default=None,
                   help="run only these rows, impl:sampler:steps separated by commas (with --reuse: run them "
                        "again, keep the others)")
    args = p.parse_args(argv)
    try:
        only = parse_rows(args.rows) if args.rows is not None else None
    except ValueError as e:
        p.error(str(e))
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError
    except ValueError:
        p.error(f"--seeds must be distinct non-negative ints separated by commas, got {args.seeds!r}")
    import fastddpm
    from fastddpm.metrics import evaluate

    n = 16 if args.smoke and "--n" not in (argv or sys.argv) else args.n
    name = args.name or ("solvers_cpu_smoke" if args.smoke else "solvers_cpu")
    model, process = fastddpm.load_model(Path(fastddpm.__file__).parent / "assets" / "digits_small.safetensors",
                                         device="cpu")
    import diffusers  # noqa: F401 -- imported before any row is timed
    with torch.no_grad():  # one warm-up call, so that no row pays for first-call set-up
        model(torch.zeros(2, *model_shape(model)), torch.tensor([999, 0]))
    rows = []
    meta = environment("cpu", PACKAGES) | {"model": "digits_small (shipped)", "samples per row": n,
                                          "seeds of the rows run here": seeds, "reference": "digits (1797), digits classifier features"}
    reused = {}
    if args.reuse:
        import json

        earlier = json.loads(Path(args.reuse).read_text())
        if earlier["meta"]["samples per row"] != n:
            raise SystemExit(f"--reuse {args.reuse}: its rows have {earlier['meta']['samples per row']} samples, not {n}")
        old_seed = str(earlier["meta"].get("seed", ""))  # a run from before --seeds: one seed for every row
        reused = {(r["impl"], r["sampler"], r["steps"]): {"seeds": old_seed} | r for r in earlier["rows"] if "fd" in r}
    key = f"goal: a solver at <= {MAX_CALLS} calls within {FD_FACTOR}x the longest DDPM run's FD, >= {SPEEDUP:g}x faster"
    table = SMOKE_ROWS if args.smoke else FULL_ROWS
    for impl, sampler, steps in table:
        if only is not None and (impl, sampler, steps) not in only and (impl, sampler, steps) not in reused:
            continue
        row = dict(impl=impl, sampler=sampler, steps=steps, model_calls=steps)
        try:
            if (impl, sampler, steps) in reused and (only is None or (impl, sampler, steps) not in only):
                row = dict(reused[(impl, sampler, steps)], note="reused from the earlier run (--reuse)")
                rows.append(row)
                continue
            row |= measure_row(model, process, impl, sampler, steps, n, seeds, evaluate)
        except Exception as e:  # noqa: BLE001 -- recorded in the results
            row["note"] = f"failed: {error_line(e)}"
        rows.append(row)
        base = next((r["seconds"] for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000 and "seconds" in r),
                    None)
        for r in rows:
            if base and "seconds" in r:
                r["speedup_vs_ddpm1000"] = base / r["seconds"]
        print(f"{impl:9s} {sampler:12s} {steps:5d}  " + (f"FD {row['fd']:7.2f}  P {row['precision']:.3f}  "
              f"R {row['recall']:.3f}  {row['seconds']:7.1f} s" if "fd" in row else row["note"]), flush=True)
        meta["rows reused from earlier runs (--reuse)"] = sum("reused" in r.get("note", "") for r in rows)
        json_path, _ = write_results(name, rows, COLUMNS, meta | {key: verdict(rows)}, out_dir=args.out_dir)
        plot(rows, json_path.with_suffix(".png"))  # after every row, so that a run cut short keeps its rows
    print(f"{key}: {verdict(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
