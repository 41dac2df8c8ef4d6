"""DDIM inversion on the shipped digits model: how well ``invert`` then ``sample`` gives an image back.

For each step count (20, 50, 100) the images are inverted (``fastddpm.inversion.invert``, DDIM run
backward with diffusers' ``DDIMInverseScheduler`` convention) and sampled back from that ``x_T``
(``fastddpm.sample(..., noise=x_T, sampler="ddim", eta=0)``, the same steps), with the model's own
process (its x0 clip on, as ``sample`` runs it) and with the clip off.  Per row: the reconstruction's
mean squared error per image (images in [-1, 1]; mean, standard deviation, median and largest over
the images; PSNR of the mean MSE with the range 2), and the seconds per image of the inversion and of
the reconstruction (the whole batch in one call, wall clock, after an untimed warm-up call).

Images: digits of the held-out split of the shipped digits classifier (``fastddpm.metrics.features
.digits_classifier_split``; the one split the package has).  The shipped diffusion model was trained on
all 1797 digits (``val_fraction`` 0), so these are not unseen by it; the ``mirrored`` rows invert the same
digits flipped left-right, which it never saw (trained without flips).

    OMP_NUM_THREADS=1 python benchmarks/bench_inversion.py            # benchmarks/results/inversion_cpu.*
    python benchmarks/bench_inversion.py --smoke                      # seconds
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "fastddpm" / "assets" / "digits_small.safetensors"
PACKAGES = ("fastddpm",)
STEPS = (20, 50, 100)
SETS = ("heldout", "mirrored")
COLUMNS = ["images", "steps", "clip", "n", "mse_mean", "mse_std", "mse_median", "mse_max", "psnr_db",
           "invert_s_per_image", "sample_s_per_image"]


def held_out_digits(n: int, mirrored: bool = False) -> torch.Tensor:
    """The first ``n`` digits of the classifier's held-out split, float32 ``[n, 1, 16, 16]`` in [-1, 1]."""
    from fastddpm.data import digits_dataset
    from fastddpm.metrics.features import digits_classifier_split

    test = digits_classifier_split()[1]
    if n > len(test):
        raise ValueError(f"--n {n}: the held-out split has {len(test)} digits")
    images = digits_dataset(16).images[test[:n]]
    return images.flip(-1) if mirrored else images


def rows_for(model, process, images: torch.Tensor, name: str, steps_list, clips) -> list[dict]:
    import fastddpm
    from fastddpm.inversion import invert

    n = images.shape[0]
    # untimed: the first sample() of a model measures its CPU plan (fastddpm.cpu_plan), once per process
    for clip in clips:
        fastddpm.sample(model, n, noise=invert(model, images, steps=steps_list[0], process=process, progress=False),
                        sampler="ddim", eta=0, steps=steps_list[0], process=process, clip_denoised=clip,
                        progress=False, device="cpu")
    rows = []
    for steps in steps_list:
        start = time.perf_counter()
        x_T = invert(model, images, steps=steps, process=process, progress=False, device="cpu")
        invert_s = (time.perf_counter() - start) / n
        for clip in clips:
            start = time.perf_counter()
            again = fastddpm.sample(model, n, noise=x_T, sampler="ddim", eta=0, steps=steps, process=process,
                                    clip_denoised=clip, progress=False, device="cpu")
            sample_s = (time.perf_counter() - start) / n
            mse = ((again - images) ** 2).flatten(1).mean(1).tolist()
            mean = statistics.fmean(mse)
            rows.append({"images": name, "steps": steps, "clip": clip, "n": n, "mse_mean": mean,
                         "mse_std": statistics.pstdev(mse), "mse_median": statistics.median(mse), "mse_max": max(mse),
                         "psnr_db": 10 * math.log10(4.0 / mean) if mean > 0 else float("inf"),
                         "invert_s_per_image": invert_s, "sample_s_per_image": sample_s})
            print(rows[-1], flush=True)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for name in dict.fromkeys(r["images"] for r in rows):
        for clip in (True, False):
            chosen = [r for r in rows if r["images"] == name and r["clip"] == clip]
            if chosen:
                trend = ", ".join(f"{r['mse_mean']:.2g} at {r['steps']}" for r in chosen)
                out.append(f"{name} digits, clip {'on' if clip else 'off'}: mean MSE {trend} steps")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL), help="an unconditional fastddpm checkpoint (default: shipped)")
    p.add_argument("--n", type=int, default=64, help="images per set (default 64)")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts, separated by commas")
    p.add_argument("--sets", default=",".join(SETS), help=f"image sets: {', '.join(SETS)} (default both)")
    p.add_argument("--smoke", action="store_true", help="seconds: 4 images, 5 and 10 steps, held-out only")
    p.add_argument("--name", default=None, help="results file name (default inversion_cpu[_smoke])")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    import fastddpm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model, process = fastddpm.load_model(args.model, device="cpu")
    n = 4 if args.smoke else args.n
    steps_list = (5, 10) if args.smoke else tuple(int(s) for s in args.steps.split(",") if s.strip())
    sets = ("heldout",) if args.smoke else tuple(s for s in args.sets.split(",") if s.strip())
    unknown = set(sets) - set(SETS)
    if unknown:
        raise SystemExit(f"--sets: unknown {sorted(unknown)}; known: {SETS}")
    start = time.perf_counter()
    rows = []
    for name in sets:
        images = held_out_digits(n, mirrored=name == "mirrored")
        rows += rows_for(model, process, images, name, steps_list, (True, False))
    name = args.name or ("inversion_cpu_smoke" if args.smoke else "inversion_cpu")
    meta = environment(torch.device("cpu"), PACKAGES) | {
        "model": Path(args.model).name, "process": repr(process), "threads": torch.get_num_threads(),
        "images": f"the first {n} of the digits classifier's held-out split (the diffusion model saw them in "
                  f"training: val_fraction 0); mirrored: the same flipped left-right (never seen)",
        "mse": "per image, mean over pixels of (sample - image)^2, images in [-1, 1]; psnr_db = 10 log10(4 / mse_mean)",
        "clip": "invert never clips (a clipped x0 has no inverse); clip True samples back with the process's x0 "
                "clip (sample()'s default for this model), clip False without it",
        "wall_s": round(time.perf_counter() - start, 1), "verdicts": verdicts(rows)}
    write_results(name, rows, COLUMNS, meta, args.out_dir)
    for line in meta["verdicts"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
