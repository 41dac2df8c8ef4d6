"""Classifier-free guidance on the shipped class-conditional digits model: quality per guidance
scale, and the time guidance costs.

Quality rows (``--quality``): for each sampler (DDPM-1000, dpm++2m-20) and guidance scale ``w``
(0, 1, 2, 3, 5; ``w = 0`` is the unconditional model, ``w = 1`` the conditional one alone),
``--n-per-class`` samples of each of the 10 classes, from the same x_T for every ``w`` (the
noise contract: sample ``i`` of a seed is fixed), scored per class and averaged over classes:

* ``accuracy``: the shipped digits classifier's prediction equals the requested class;
* ``fd``, ``precision``, ``recall``: against the digits of that class (all 1797 digits split by
  label), in the classifier's feature space (``fastddpm.metrics.evaluate``).

With ``--seeds 0,1,2`` each row is the mean over seeds and ``fd_range`` its spread.
Published shape: accuracy and precision rise with ``w``, recall falls.  Goal (issue 34):
accuracy >= 0.95 at the best ``w`` with dpm++2m-20.

Speed rows (``--speed``), interleaved on the same model object, medians with the 20th/80th
percentiles (``common.measure``):

* fastddpm guided (w = 3, one call on the doubled batch) against unguided, seconds per sample
  at n = 1, 16, 64 (goal: guided <= 2.05x unguided);
* fastddpm guided against a diffusers-style guided loop (``peers.diffusers_guided_loop``: the
  loop of diffusers' pipelines) on a diffusers ``UNet2DModel(num_class_embeds=11)`` of the
  small preset's architecture with the equal ``DPMSolverMultistepScheduler``, from the same x_T:
  the largest difference of the images and the speed ratio (goal: equal, >= 1.0x at every n).

    OMP_NUM_THREADS=1 python benchmarks/bench_guidance.py                    # both parts
    python benchmarks/bench_guidance.py --smoke                              # seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, measure, write_results  # noqa: E402
from peers import diffusers_guided_loop, diffusers_preset_kwargs  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "fastddpm" / "assets" / "digits_cond_small.safetensors"
PACKAGES = ("fastddpm", "diffusers")
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
SAMPLERS = (("ddpm", 1000), ("dpm++2m", 20))
QUALITY_COLUMNS = ["sampler", "steps", "w", "seeds", "accuracy", "fd", "fd_range", "precision", "recall", "seconds"]
SPEED_COLUMNS = ["impl", "n", "w", "s_per_sample", "p20", "p80", "ratio", "max_abs_diff", "note"]
GOAL_ACCURACY, GOAL_GUIDED_RATIO = 0.95, 2.05


def _sample(model, process, labels, w, sampler, steps, seed):
    import fastddpm

    chosen = process.with_options(sampler=sampler) if sampler != "ddpm" else process
    return fastddpm.sample(model, len(labels), steps=steps, seed=seed, process=chosen, class_labels=labels,
                           guidance_scale=None if w == 1.0 else w, progress=False, device="cpu")


def quality_rows(model, process, n_per_class: int, seeds: list[int], samplers) -> list[dict]:
    from fastddpm.data import digits_dataset
    from fastddpm.metrics import evaluate
    from fastddpm.metrics.features import load_digits_classifier

    digits = digits_dataset(16)
    classifier = load_digits_classifier()
    k = 10
    labels = torch.arange(k).repeat_interleave(n_per_class)
    rows = []
    for sampler, steps in samplers:
        for w in SCALES:
            runs = []
            for seed in seeds:
                start = time.perf_counter()
                x = _sample(model, process, labels, w, sampler, steps, seed)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    predicted = classifier(x).argmax(dim=1)
                per_class = [evaluate(x[labels == c], reference=digits.images[digits.labels == c]) for c in range(k)]
                runs.append({"accuracy": float((predicted == labels).float().mean()), "seconds": seconds,
                             **{m: statistics.fmean(s[m] for s in per_class) for m in ("fd", "precision", "recall")}})
            fds = [r["fd"] for r in runs]
            rows.append({"sampler": sampler, "steps": steps, "w": w, "seeds": ",".join(map(str, seeds)),
                         "fd_range": f"{min(fds):.3g}-{max(fds):.3g}",
                         **{m: statistics.fmean(r[m] for r in runs) for m in ("accuracy", "fd", "precision", "recall")},
                         "seconds": statistics.median(r["seconds"] for r in runs)})
            print(rows[-1], flush=True)
    return rows


def _diffusers_twin(num_classes: int):
    """A diffusers ``UNet2DModel`` of the small preset's architecture with ``num_classes`` classes
    and the null class (untrained: speed and equality need no training)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**diffusers_preset_kwargs("small"), num_class_embeds=num_classes + 1).eval()
    unet.fastddpm_null_class = num_classes
    return unet


def speed_rows(model, ns, steps: int, w: float = 3.0) -> list[dict]:
    import fastddpm
    from diffusers import DPMSolverMultistepScheduler
    from fastddpm import DDPM
    from fastddpm.ops.reference import batch_noise

    rows = []
    unet = _diffusers_twin(10)
    scheduler = DPMSolverMultistepScheduler(thresholding=True, sample_max_value=1.0)
    process = DDPM.from_diffusers(scheduler)
    for n in ns:
        labels = torch.arange(n) % 10
        x_T = batch_noise(0, 0, steps, (n, 1, 16, 16), "cpu")
        # 1. guided against unguided, fastddpm's own model
        runs = {
            "unguided": lambda: _sample(model, DDPM(), labels, 1.0, "dpm++2m", steps, 0),
            "guided": lambda: _sample(model, DDPM(), labels, w, "dpm++2m", steps, 0),
        }
        timings = _interleaved(runs)
        base = timings["unguided"].median_ms
        for name, t in timings.items():
            rows.append({"impl": f"fastddpm {name}", "n": n, "w": w if name == "guided" else 1.0,
                         "s_per_sample": t.median_ms / 1e3 / n, "p20": t.p20_ms / 1e3 / n, "p80": t.p80_ms / 1e3 / n,
                         "ratio": t.median_ms / base, "note": "ratio: time / unguided"})
        # 2. fastddpm guided against the diffusers-style guided loop, one diffusers model
        def ours():
            return fastddpm.sample(unet, n, steps=steps, process=process, class_labels=labels, guidance_scale=w,
                                   noise=x_T, progress=False, device="cpu")

        def theirs():
            scheduler.set_timesteps(steps)
            return diffusers_guided_loop(unet, scheduler, x_T, labels, 10, w)

        diff = float((ours() - theirs()).abs().max())
        timings = _interleaved({"fastddpm": ours, "diffusers": theirs})
        for name, t in timings.items():
            rows.append({"impl": f"{name} guided (UNet2DModel)", "n": n, "w": w, "s_per_sample": t.median_ms / 1e3 / n,
                         "p20": t.p20_ms / 1e3 / n, "p80": t.p80_ms / 1e3 / n,
                         "ratio": timings["diffusers"].median_ms / t.median_ms, "max_abs_diff": diff,
                         "note": "ratio: diffusers time / this"})
        print(rows[-4:], flush=True)
    return rows


def _interleaved(fns: dict, rounds: int = 3) -> dict:
    """``common.measure`` of each function, in alternating rounds (a shared machine drifts)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure(fn, "cpu", warmup=1, reps=3, max_total_s=30.0))
    from common import Timing

    return {name: Timing(statistics.median(t.median_ms for t in ts), min(t.p20_ms for t in ts),
                         max(t.p80_ms for t in ts), sum(t.reps for t in ts)) for name, ts in samples.items()}


def verdicts(quality: list[dict], speed: list[dict]) -> list[str]:
    out = []
    fast = [r for r in quality if r["sampler"] == "dpm++2m"]
    if fast:
        best = max(fast, key=lambda r: r["accuracy"])
        ok = best["accuracy"] >= GOAL_ACCURACY
        out.append(f"accuracy goal {'met' if ok else 'not met'}: {best['accuracy']:.3f} at w={best['w']:g} with "
                   f"dpm++2m-{best['steps']} (goal >= {GOAL_ACCURACY})")
    guided = [r for r in speed if r["impl"] == "fastddpm guided"]
    if guided:
        worst = max(guided, key=lambda r: r["ratio"])
        out.append(f"guided/unguided goal {'met' if worst['ratio'] <= GOAL_GUIDED_RATIO else 'not met'}: at most "
                   f"{worst['ratio']:.2f}x (n={worst['n']}; goal <= {GOAL_GUIDED_RATIO}x)")
    peer = [r for r in speed if r["impl"].startswith("fastddpm guided (")]
    if peer:
        slowest = min(peer, key=lambda r: r["ratio"])
        out.append(f"against the diffusers guided loop: at least {slowest['ratio']:.2f}x (n={slowest['n']}; goal >= "
                   f"1.0x), images equal within {max(r['max_abs_diff'] for r in peer):.2g}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL), help="a class-conditional fastddpm checkpoint (default: shipped)")
    p.add_argument("--quality", action="store_true", help="only the quality rows")
    p.add_argument("--speed", action="store_true", help="only the speed rows")
    p.add_argument("--n-per-class", type=int, default=100, help="samples per class and row (default 100)")
    p.add_argument("--seeds", default="0", help="seeds, separated by commas (default 0)")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="the DDPM rows' steps (default 1000)")
    p.add_argument("--samplers", default="ddpm,dpm++2m", help="the quality rows' samplers (default ddpm,dpm++2m)")
    p.add_argument("--smoke", action="store_true", help="seconds: 4 per class, short samplers, n=1 and 4")
    p.add_argument("--name", default=None, help="results file name (default guidance_cpu[_smoke])")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    import fastddpm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model, process = fastddpm.load_model(args.model, device="cpu")
    both = not (args.quality or args.speed)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    samplers = (("ddpm", 20), ("dpm++2m", 5)) if args.smoke else (("ddpm", args.ddpm_steps), ("dpm++2m", 20))
    wanted = args.samplers.split(",")
    samplers = tuple(s for s in samplers if s[0] in wanted)
    quality = quality_rows(model, process, 4 if args.smoke else args.n_per_class, seeds, samplers) \
        if both or args.quality else []
    speed = speed_rows(model, (1, 4) if args.smoke else (1, 16, 64), 5 if args.smoke else 20) \
        if both or args.speed else []
    name = args.name or ("guidance_cpu_smoke" if args.smoke else "guidance_cpu")
    meta = environment(torch.device("cpu"), PACKAGES) | {
        "model": Path(args.model).name, "threads": torch.get_num_threads(), "verdicts": verdicts(quality, speed),
        "n_per_class": 4 if args.smoke else args.n_per_class}
    rows = [dict(r, part="quality") for r in quality] + [dict(r, part="speed") for r in speed]
    write_results(name, rows, ["part"] + QUALITY_COLUMNS + [c for c in SPEED_COLUMNS if c not in QUALITY_COLUMNS],
                  meta, args.out_dir)
    if quality:
        plot(quality, Path(args.out_dir or Path(__file__).parent / "results") / f"{name}.png")
    for line in meta["verdicts"]:
        print(line)
    return 0


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy, precision and recall against w for each sampler."""
    from fastddpm.plots import plot_lines

    series = {}
    for r in rows:
        for metric in ("accuracy", "precision", "recall"):
            xs, ys = series.setdefault(f"{r['sampler']}-{r['steps']} {metric}", ([], []))
            xs.append(r["w"])
            ys.append(r[metric])
    return plot_lines(series, path, title="classifier-free guidance (shipped conditional digits model)",
                      xlabel="guidance scale w", ylabel="score", size=(760, 480))


if __name__ == "__main__":
    sys.exit(main())
