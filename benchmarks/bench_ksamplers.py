"""Quality per model call of the k-samplers on the shipped digits model: fastddpm against diffusers and k-diffusion.

Rows ``(impl, sampler, budget)``: ``n`` samples of the shipped ``digits_small`` model (linear betas,
epsilon prediction), on this CPU, each sampler of ``fastddpm.ksamplers.KSAMPLERS`` at a budget of
5, 8, 10, 15, 20 or 35 model calls.  A budget is ``steps = budget`` sigma steps for a single-stage
sampler and ``steps = ceil((budget + 1) / 2)`` for a two-stage one (``ksamplers.TWO_STAGE``: ``2 *
steps - 1`` calls); the row reports the calls it made (11 for Heun at 10).  Every row steps on the
default sigmas (diffusers' ``linspace`` spacing, ``karras_sigmas=False``).

* ``fastddpm``: ``fastddpm.sample(model, n, sampler=..., steps=...)`` with ``clip_denoised=False``:
  diffusers' k-schedulers have no x0 clip and k-diffusion's denoiser none either, so this is the
  peers' math; ``fastddpm-clip`` is the model's own process (D clipped to [-1, 1]), for reference.
* ``diffusers`` (the five it has: ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
  ``HeunDiscreteScheduler``, ``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``),
  configured with the model's betas (``trained_betas``) and prediction, its pipelines' loop
  (``x_T * init_noise_sigma``, ``scale_model_input``, ``step``).
* ``k-diffusion`` (all eight ``sample_*``): the model as its ``DiscreteEpsDDPMDenoiser(model,
  alphas_cumprod, quantize=False)`` (float32 alphas_cumprod), fastddpm's plan's ``step_sigmas`` as its
  sigmas, ``x = x_T * sigmas[0]``.

Every row starts from the noise contract's x_T of its seed; the stochastic samplers' peer rows are
given the contract's noise of each call (diffusers: its scheduler module's ``randn_tensor`` patched;
k-diffusion: a ``noise_sampler``, DPM++ SDE's two draws one Brownian path's increments), so
fastddpm and its peers make the same images up to float32 rounding.  That noise is drawn before the
peer row's clock starts (fastddpm draws its own inside the step op, on the clock).  The images are
clamped to [-1, 1] (as a pipeline's output is) before scoring.

Columns: Fréchet distance (mean over the seeds, and its range), precision and recall (k=3) in the
shipped digits classifier's feature space against all 1797 digits (``fastddpm.metrics.evaluate``);
``seconds`` (median over seeds), ``seconds_per_call``, ``bare_call_seconds``: the model alone on the
row's batch (a fixed fractional timestep), the median of ``--bare-calls`` calls timed right before
each seed's run of the row, in the same process, so a busy machine slows both alike; ``overhead``:
per-call time over the bare call's, minus 1 (median over seeds).

Goal (the issue): every fastddpm row within 3% of a bare model call, and ahead of the same sampler
in diffusers and k-diffusion (compared as per-call time relative to the bare call, i.e. overhead).

    OMP_NUM_THREADS=1 python benchmarks/bench_ksamplers.py --n 1000 --seeds 0,1,2 \\
        --rows 'fastddpm:*:5,fastddpm:*:10,fastddpm:*:20,diffusers:*:10,k-diffusion:*:10' --peer-seeds 0
    python benchmarks/bench_ksamplers.py --smoke          # seconds: Euler, Euler a, Heun at 5 calls, n=16

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (FD against model calls per impl and
sampler) after every row.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_solvers import model_shape  # noqa: E402
from common import environment, error_line, write_results  # noqa: E402

PACKAGES = ("fastddpm", "diffusers", "k-diffusion")
IMPLS = ("fastddpm", "fastddpm-clip", "diffusers", "k-diffusion")
PEERS = ("diffusers", "k-diffusion")
DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                        "heun": "HeunDiscreteScheduler", "dpm2": "KDPM2DiscreteScheduler",
                        "dpm2-a": "KDPM2AncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler"}
K_FUNCTIONS = {"euler": "sample_euler", "euler-a": "sample_euler_ancestral", "heun": "sample_heun",
               "dpm2": "sample_dpm_2", "dpm2-a": "sample_dpm_2_ancestral", "lms": "sample_lms",
               "dpm++2s-a": "sample_dpmpp_2s_ancestral", "dpm++sde": "sample_dpmpp_sde",
               "dpm++3m-sde": "sample_dpmpp_3m_sde"}
BUDGETS = (5, 8, 10, 15, 20, 35)
COLUMNS = ["impl", "sampler", "budget", "steps", "model_calls", "seeds", "fd", "fd_range", "precision", "recall",
           "seconds", "seconds_per_call", "bare_call_seconds", "overhead", "note"]
MAX_OVERHEAD = 0.03
BARE_T = 499.5  # the bare call's timestep: fractional and float32, as the k-samplers give it


def _samplers(impl: str) -> tuple[str, ...]:
    from fastddpm.ksamplers import KSAMPLERS

    return tuple(DIFFUSERS_SCHEDULERS) if impl == "diffusers" else KSAMPLERS


# budget-major, the comparison budget first, each sampler's impls side by side (so a run cut short
# still has its comparisons, and a sampler's rows are timed close together)
FULL_ROWS = [(impl, sampler, budget) for budget in (10, 5, 20, 8, 15, 35) for sampler in _samplers("fastddpm")
             for impl in IMPLS if sampler in _samplers(impl)]
SMOKE_ROWS = [(impl, sampler, 5) for sampler in ("euler", "euler-a") for impl in ("fastddpm", "diffusers",
                                                                                   "k-diffusion")] + [
    ("fastddpm", "heun", 5)]


def sigma_steps(sampler: str, budget: int) -> int:
    """The sigma steps whose model calls are at most ``budget`` + 1: ``budget`` for a single-stage
    sampler, ``ceil((budget + 1) / 2)`` for a two-stage one (``2 * steps - 1`` calls)."""
    from fastddpm.ksamplers import TWO_STAGE

    return math.ceil((budget + 1) / 2) if sampler in TWO_STAGE else budget


def k_diffusion_modules():
    """k-diffusion's ``sampling`` and ``external`` modules without its package ``__init__`` (which
    imports its training stack: clip, kornia, wandb, ...): the package is put in ``sys.modules``
    unexecuted, then only the two submodules are imported."""
    import importlib.util

    if "k_diffusion" not in sys.modules or not hasattr(sys.modules["k_diffusion"], "sampling"):
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed (pip install k-diffusion)")
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)  # not executed
        import k_diffusion.external  # noqa: F401
        import k_diffusion.sampling  # noqa: F401
    return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]


def contract_noise(seed: int, calls: int, shape) -> list[torch.Tensor]:
    """The contract's noise of each model call, in running order: call ``j`` is row ``calls - 1 - j``'s slot."""
    from fastddpm.ops.reference import batch_noise

    return [batch_noise(seed, 0, calls - 1 - j, shape, "cpu") for j in range(calls)]


def k_noise_sampler(sampler: str, step_sigmas, noise: list[torch.Tensor]):
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` giving fastddpm's noise (``noise[call]``):
    the noisy call of the step from ``sigma`` (a two-stage step's second call); for DPM++ SDE the first
    draw over ``[sigma, sigma_mid]`` is the first call's noise and the draw over ``[sigma, sigma_next]``
    the Brownian increment containing it (fastddpm's second row adds the independent part)."""
    from fastddpm.ksamplers import TWO_STAGE

    s = [float(v) for v in step_sigmas]
    two = sampler in TWO_STAGE

    def draw(sigma, sigma_next):
        i = min(range(len(s) - 1), key=lambda k: abs(s[k] - float(sigma)))
        first = 2 * i if two else i  # step i's first call
        if sampler != "dpm++sde":
            call = first + 1 if two else first
            return noise[call] if call < len(noise) else torch.zeros_like(noise[0])
        if abs(float(sigma_next) - s[i + 1]) > 1e-9 * s[i]:  # [sigma, sigma_mid]: the first call's draw
            return noise[first]
        s_mid = math.sqrt(s[i] * s[i + 1])
        return (math.sqrt(s[i] - s_mid) * noise[first] + math.sqrt(s_mid - s[i + 1]) * noise[first + 1]) / math.sqrt(
            s[i] - s[i + 1])

    return draw


def diffusers_scheduler(sampler: str, process):
    """diffusers' scheduler of ``sampler`` configured as ``process`` (its betas and prediction)."""
    import diffusers

    config = process.config
    prediction = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}[config.prediction]
    return getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])(
        num_train_timesteps=config.num_timesteps, trained_betas=process.schedule.betas.tolist(),
        prediction_type=prediction)


@contextlib.contextmanager
def patched_randn(module, noise: list[torch.Tensor] | None, call: dict):
    """``module.randn_tensor`` returning ``noise[call["j"]]`` (the model call now running); as is if None."""
    if noise is None or not hasattr(module, "randn_tensor"):
        yield
        return
    original = module.randn_tensor
    module.randn_tensor = lambda *a, **k: noise[call["j"]]
    try:
        yield
    finally:
        module.randn_tensor = original


@torch.no_grad()
def run_row(ctx: dict, impl: str, sampler: str, steps: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    """One sample of a row: ``(images, seconds)``; the peers' step noise is drawn before the clock starts."""
    import fastddpm
    from fastddpm import ksamplers
    from fastddpm.ops.reference import batch_noise

    model, process = ctx["model"], ctx["process"]
    shape = (n, *model_shape(model))
    calls = ksamplers.model_calls(sampler, steps)
    noise = contract_noise(seed, calls, shape) if impl in PEERS and sampler in ksamplers.STOCHASTIC else None
    if impl.startswith("fastddpm"):
        chosen = process.with_options(sampler=sampler, clip_denoised=impl == "fastddpm-clip")
        start = time.perf_counter()
        x = fastddpm.sample(model, n, steps=steps, seed=seed, process=chosen, progress=False, device="cpu")
        return x, time.perf_counter() - start
    if impl == "diffusers":
        sched = diffusers_scheduler(sampler, process)
        module, call = sys.modules[type(sched).__module__], {"j": 0}
        with patched_randn(module, noise, call):
            start = time.perf_counter()
            sched.set_timesteps(steps)
            x = batch_noise(seed, 0, calls, shape, "cpu") * sched.init_noise_sigma  # the contract's x_T
            for j, t in enumerate(sched.timesteps):
                call["j"] = j
                out = model(sched.scale_model_input(x, t), t.expand(n))
                x = sched.step(out, t, x).prev_sample
            seconds = time.perf_counter() - start
        if len(sched.timesteps) != calls:
            raise AssertionError(f"diffusers {sampler} made {len(sched.timesteps)} calls, fastddpm's plan {calls}")
        return x, seconds
    if impl == "k-diffusion":
        ks, ext = ctx["k_diffusion"]
        plan = process.with_options(sampler=sampler, clip_denoised=False).multistep_plan(steps)
        sigmas = torch.as_tensor(plan.step_sigmas, dtype=torch.float64)
        kwargs = {"disable": True}
        if noise is not None:
            kwargs["noise_sampler"] = k_noise_sampler(sampler, plan.step_sigmas, noise)
        start = time.perf_counter()
        denoiser = ext.DiscreteEpsDDPMDenoiser(model, ctx["alphas_cumprod"], quantize=False)
        x = batch_noise(seed, 0, calls, shape, "cpu") * sigmas[0]
        x = getattr(ks, K_FUNCTIONS[sampler])(denoiser, x, sigmas, **kwargs)
        return x, time.perf_counter() - start
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


@torch.no_grad()
def bare_call_seconds(model, n: int, calls: int) -> float:
    """Seconds of one call of the model alone on a batch of ``n`` (a float32 fractional timestep): the
    median of ``calls`` calls (the first after a row's scoring runs on cold caches)."""
    x = torch.randn((n, *model_shape(model)), generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), BARE_T)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model(x, t)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_row(ctx: dict, impl: str, sampler: str, steps: int, n: int, seeds: list[int], evaluate,
                bare_calls: int) -> dict:
    """One row over ``seeds``: mean scores, the FD's range; median seconds, bare call and overhead, the
    bare calls timed right before each seed's run."""
    from fastddpm.ksamplers import model_calls

    calls = model_calls(sampler, steps)
    runs = []
    for seed in seeds:
        bare = bare_call_seconds(ctx["model"], n, bare_calls)
        x, seconds = run_row(ctx, impl, sampler, steps, n, seed)
        scores = evaluate(x.clamp(-1.0, 1.0))  # one pass of the classifier gives all three
        runs.append({k: scores[k] for k in ("fd", "precision", "recall")}
                    | {"seconds": seconds, "bare": bare, "overhead": seconds / calls / bare - 1.0})
    fds = [r["fd"] for r in runs]
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"model_calls": calls, "seeds": ",".join(map(str, seeds)), "fd_range": f"{min(fds):.3g}-{max(fds):.3g}",
            **{k: statistics.fmean(r[k] for r in runs) for k in ("fd", "precision", "recall")},
            "seconds": seconds, "seconds_per_call": seconds / calls,
            "bare_call_seconds": statistics.median(r["bare"] for r in runs),
            "overhead": statistics.median(r["overhead"] for r in runs)}


def verdict(rows: list[dict]) -> str:
    """The best fastddpm sampler at each budget (lowest mean FD), and whether every fastddpm row is
    within ``MAX_OVERHEAD`` of a bare model call and ahead of its peers' rows (lower overhead)."""
    measured = [r for r in rows if "fd" in r]
    ours = [r for r in measured if r["impl"].startswith("fastddpm")]
    if not ours:
        return "not evaluated: no fastddpm row"
    best = []
    for budget in sorted({r["budget"] for r in ours}):
        top = min((r for r in ours if r["budget"] == budget), key=lambda r: r["fd"])
        label = top["sampler"] + (" (clipped)" if top["impl"] == "fastddpm-clip" else "")
        best.append(f"{budget}: {label} FD {top['fd']:.2f} ({top['model_calls']} calls)")
    over = [r for r in ours if r["overhead"] > MAX_OVERHEAD]
    behind = [(r, p) for r in ours if r["impl"] == "fastddpm" for p in measured
              if p["impl"] in PEERS and (p["sampler"], p["budget"]) == (r["sampler"], r["budget"])
              and p["overhead"] <= r["overhead"]]
    peers = sum(p["impl"] in PEERS for p in measured)
    worst = max(ours, key=lambda r: r["overhead"])
    ok = not over and not behind
    text = (f"best fastddpm sampler per budget: {', '.join(best)}; "
            f"{'met' if ok else 'not met'}: {len(ours) - len(over)}/{len(ours)} fastddpm rows within "
            f"{MAX_OVERHEAD:.0%} of a bare model call (worst {worst['impl']} {worst['sampler']} {worst['budget']}: "
            f"{worst['overhead']:+.1%})")
    if peers:
        text += f", ahead of every one of the {peers} peer rows of the same sampler and budget" if not behind else (
            ", behind " + ", ".join(f"{p['impl']} {p['sampler']} {p['budget']} ({p['overhead']:+.1%} vs "
                                    f"{r['overhead']:+.1%})" for r, p in behind))
    else:
        text += "; no peer row to compare"
    return text


def parse_rows(text: str) -> list[tuple[str, str, int]]:
    """``"impl:sampler:budget,..."`` as rows of the full table, in its order; ``*`` as impl or sampler
    matches every one."""
    wanted = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"--rows: {item!r} is not impl:sampler:budget (e.g. fastddpm:heun:10, k-diffusion:*:5)")
        matched = [r for r in FULL_ROWS
                   if parts[0] in ("*", r[0]) and parts[1] in ("*", r[1]) and int(parts[2]) == r[2]]
        if not matched:
            raise ValueError(f"--rows: {item!r} is not a row of the table: impls {', '.join(IMPLS)}, samplers "
                             f"{', '.join(_samplers('fastddpm'))} (diffusers: {', '.join(DIFFUSERS_SCHEDULERS)}), "
                             f"budgets {', '.join(map(str, BUDGETS))}")
        wanted += matched
    if not wanted:
        raise ValueError("--rows: no rows given")
    return [r for r in FULL_ROWS if r in set(wanted)]


def plot(rows: list[dict], path: Path) -> Path:
    """Fréchet distance (log scale: at 5 calls it is 10x that at 20) against model calls, a line per
    impl and sampler (a dot where it has one row), fastddpm's first (on the same seeds a peer's dot,
    the same images, lies on fastddpm's line)."""
    from fastddpm.plots import plot_lines

    order = {(impl, sampler): k for k, (impl, sampler) in enumerate(
        (impl, sampler) for impl in IMPLS for sampler in _samplers("fastddpm"))}
    series = {}
    for r in sorted((r for r in rows if "fd" in r), key=lambda r: (order[r["impl"], r["sampler"]], r["model_calls"])):
        xs, ys = series.setdefault(f"{r['impl']} {r['sampler']}", ([], []))
        xs.append(r["model_calls"])
        ys.append(r["fd"])
    return plot_lines(series, path, title="k-samplers: quality per model call (shipped digits model)",
                      xlabel="model calls", ylabel="Frechet distance (log)", logy=True, size=(900, 640))


def _seeds(text: str, flag: str, p) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError
    except ValueError:
        p.error(f"{flag} must be distinct non-negative ints separated by commas, got {text!r}")
    return seeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--seeds", default="0", help="seeds per row, separated by commas (default 0); a row reports "
                   "the mean over them")
    p.add_argument("--peer-seeds", default=None, help="seeds of the diffusers and k-diffusion rows (default --seeds)")
    p.add_argument("--bare-calls", type=int, default=None,
                   help="bare model calls timed before each seed's run of a row (default 3, 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a few short rows, n=16 unless --n is given")
    p.add_argument("--name", default=None, help="results file name (default ksamplers_cpu[_smoke])")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--rows", default=None,
                   help="run only these rows, impl:sampler:budget separated by commas; * matches every impl or "
                        "sampler (e.g. 'fastddpm:*:5,k-diffusion:euler:10')")
    args = p.parse_args(argv)
    try:
        only = parse_rows(args.rows) if args.rows is not None else None
    except ValueError as e:
        p.error(str(e))
    seeds = _seeds(args.seeds, "--seeds", p)
    peer_seeds = _seeds(args.peer_seeds, "--peer-seeds", p) if args.peer_seeds is not None else seeds
    bare_calls = args.bare_calls if args.bare_calls is not None else (1 if args.smoke else 3)
    if bare_calls < 1:
        p.error(f"--bare-calls must be >= 1, got {bare_calls}")
    import fastddpm
    from fastddpm.metrics import evaluate

    n = 16 if args.smoke and "--n" not in (argv if argv is not None else sys.argv) else args.n
    name = args.name or ("ksamplers_cpu_smoke" if args.smoke else "ksamplers_cpu")
    model, process = fastddpm.load_model(Path(fastddpm.__file__).parent / "assets" / "digits_small.safetensors",
                                         device="cpu")
    ctx = {"model": model, "process": process, "k_diffusion": k_diffusion_modules(),
           "alphas_cumprod": torch.as_tensor(process.schedule.alphas_cumprod64, dtype=torch.float32)}
    import diffusers  # noqa: F401 -- imported before any row is timed

    for impl in ("fastddpm", "diffusers", "k-diffusion"):  # no row pays for a first call's set-up
        run_row(ctx, impl, "euler-a", 2, 2, 0)
    bare_call_seconds(model, n, 1)  # and none for the first call at this batch size
    table = only if only is not None else (SMOKE_ROWS if args.smoke else FULL_ROWS)
    meta = environment("cpu", PACKAGES) | {
        "model": "digits_small (shipped): linear betas, epsilon; its process clips D to [-1, 1]",
        "samples per row": n, "seeds of the fastddpm rows": seeds, "seeds of the peer rows": peer_seeds,
        "bare model calls before each seed's run": bare_calls,
        "same math": "fastddpm rows clip_denoised=False as diffusers' k-schedulers and k-diffusion (no x0 clip); "
                     "fastddpm-clip is the model's own process",
        "sigmas": "default (linspace spacing, no Karras); a budget is steps=budget, ceil((budget+1)/2) for the "
                  "two-stage samplers",
        "noise": "every row from the contract's x_T; the peers' stochastic rows get the contract's noise of each call, "
                 "drawn before their clock starts; images clamped to [-1, 1] before scoring",
        "reference": "digits (1797), digits classifier features"}
    key = (f"verdict (goal: every fastddpm row within {MAX_OVERHEAD:.0%} of a bare model call and ahead of the same "
           f"sampler in diffusers / k-diffusion, compared as overhead)")
    rows = []
    for impl, sampler, budget in table:
        steps = sigma_steps(sampler, budget)
        row = dict(impl=impl, sampler=sampler, budget=budget, steps=steps)
        try:
            row |= measure_row(ctx, impl, sampler, steps, n, peer_seeds if impl in PEERS else seeds, evaluate,
                               bare_calls)
        except Exception as e:  # noqa: BLE001 -- recorded in the results
            row["note"] = f"failed: {error_line(e)}"
        rows.append(row)
        print(f"{impl:13s} {sampler:12s} {budget:3d}  " + (
            f"calls {row['model_calls']:3d}  FD {row['fd']:7.2f}  P {row['precision']:.3f}  R {row['recall']:.3f}  "
            f"{row['seconds']:7.1f} s  bare {row['bare_call_seconds']:.3f} s  overhead {row['overhead']:+.1%}"
            if "fd" in row else row["note"]), flush=True)
        json_path, _ = write_results(name, rows, COLUMNS, meta | {key: verdict(rows)}, out_dir=args.out_dir)
        plot(rows, json_path.with_suffix(".png"))  # after every row, so that a run cut short keeps its rows
    print(f"{key}: {verdict(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
