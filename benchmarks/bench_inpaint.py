"""Inpainting on the shipped digits model: how well each method fills four kinds of hole.

Inputs: the digits the shipped classifier was tested on (``split_validation(1797, 0.2, seed 0)``'s
359 held-out images, the first ``--n``); the shipped *diffusion* model was trained on all 1797, so
this measures filling in, not generalisation.  Masks (1 = keep): ``bottom`` (the bottom half is
filled), ``left`` (the left half), ``centre`` (an 8x8 square), ``random`` (50% of the pixels, one
seeded draw per image).  Methods, each on the same images and masks:

* ``zero``: the hole filled with the background (pixel 0, -1 in the model's range);
* ``mean``: the hole filled with the digits' mean image;
* ``replace``: ``fastddpm.inpaint(method="replace")`` (the known region forward-noised each step);
* ``repaint``: ``fastddpm.inpaint(method="repaint")`` (Lugmayr et al.: resampling jumps).

Scores per (mask, method), mean over ``--seeds`` (inpainting's noise; the spread is ``acc_range``):
the shipped classifier's accuracy against the true labels, FD / precision / recall of the filled
images against all digits (``fastddpm.metrics.evaluate``; at 100 images FD is biased upward, compare
rows, not with other tables), the largest change of a kept pixel (must be 0), and seconds per image.
**Goal (issue 36): repaint >= replace >= both baselines in accuracy on every mask, known pixels exact.**

    OMP_NUM_THREADS=1 python benchmarks/bench_inpaint.py            # the table + figure
    python benchmarks/bench_inpaint.py --smoke                       # seconds
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
from common import environment, write_results  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "fastddpm" / "assets" / "digits_small.safetensors"
MASKS = ("bottom", "left", "centre", "random")
METHODS = ("zero", "mean", "replace", "repaint")
COLUMNS = ["mask", "method", "steps", "model_calls", "seeds", "accuracy", "acc_range", "fd", "precision", "recall",
           "known_max_change", "s_per_image"]


def make_mask(kind: str, n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``[n, 1, size, size]`` float 0/1, 1 = keep."""
    m = torch.ones(n, 1, size, size)
    half, q = size // 2, size // 4
    if kind == "bottom":
        m[..., half:, :] = 0
    elif kind == "left":
        m[..., :, :half] = 0
    elif kind == "centre":
        m[..., q:size - q, q:size - q] = 0
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        m = (torch.rand(n, 1, size, size, generator=g) < 0.5).float()
    else:
        raise ValueError(f"mask kind must be one of {MASKS}, got {kind!r}")
    return m


def held_out_digits(n: int):
    """The classifier's held-out test digits: images [-1, 1] ``[n, 1, 16, 16]`` and labels."""
    from fastddpm.data import digits_dataset, split_validation

    digits = digits_dataset(16)
    _, test = split_validation(len(digits.images), 0.2, 0)
    idx = torch.tensor(test[:n])
    return digits.images[idx], digits.labels[idx], digits.images.mean(dim=0, keepdim=True)


def fill(method, model, image, mask, mean_image, seed, steps, jump_length, jump_n_sample):
    import fastddpm

    if method == "zero":
        return mask * image + (1 - mask) * -1.0
    if method == "mean":
        return mask * image + (1 - mask) * mean_image
    return fastddpm.inpaint(model, image, mask, method=method, steps=steps, jump_length=jump_length,
                            jump_n_sample=jump_n_sample, seed=seed, progress=False, device="cpu")


def model_calls(method, steps, jump_length, jump_n_sample) -> int:
    from fastddpm.repaint import repaint_visits

    if method in ("zero", "mean"):
        return 0
    visits = repaint_visits(steps, jump_length, jump_n_sample if method == "repaint" else 1)
    return sum(not up for up, _ in visits)


def rows_for(model, n, seeds, steps, jump_length, jump_n_sample, masks=MASKS, examples=None):
    from fastddpm.metrics import evaluate
    from fastddpm.metrics.features import load_digits_classifier

    images, labels, mean_image = held_out_digits(n)
    classifier = load_digits_classifier()
    rows = []
    for kind in masks:
        mask = make_mask(kind, images.shape[0])
        for method in METHODS:
            runs = []
            for seed in seeds:
                start = time.perf_counter()
                x = fill(method, model, images, mask, mean_image, seed, steps, jump_length, jump_n_sample)
                seconds = time.perf_counter() - start
                keep = mask.expand_as(x).bool()
                with torch.no_grad():
                    accuracy = float((classifier(x).argmax(dim=1) == labels).float().mean())
                scores = evaluate(x, reference="digits")
                runs.append(dict(accuracy=accuracy, seconds=seconds, known=float((x - images)[keep].abs().max()),
                                 **{m: scores[m] for m in ("fd", "precision", "recall")}))
                if examples is not None and seed == seeds[0]:
                    examples.setdefault(kind, {"masked": mask * images + (1 - mask) * 0.0, "original": images})
                    examples[kind][method] = x
            accs = [r["accuracy"] for r in runs]
            rows.append({"mask": kind, "method": method, "steps": steps if method in ("replace", "repaint") else 0,
                         "model_calls": model_calls(method, steps, jump_length, jump_n_sample),
                         "seeds": ",".join(map(str, seeds)), "acc_range": f"{min(accs):.3f}-{max(accs):.3f}",
                         **{m: statistics.fmean(r[m] for r in runs) for m in ("accuracy", "fd", "precision", "recall")},
                         "known_max_change": max(r["known"] for r in runs),
                         "s_per_image": statistics.median(r["seconds"] for r in runs) / images.shape[0]})
            print(rows[-1], flush=True)
    return rows


def verdicts(rows) -> list[str]:
    out, ok_all = [], True
    for kind in sorted({r["mask"] for r in rows}, key=list(MASKS).index):
        acc = {r["method"]: r["accuracy"] for r in rows if r["mask"] == kind}
        ok = acc["repaint"] >= acc["replace"] >= max(acc["zero"], acc["mean"])
        ok_all &= ok
        out.append(f"{kind}: repaint {acc['repaint']:.3f} >= replace {acc['replace']:.3f} >= baselines "
                   f"(zero {acc['zero']:.3f}, mean {acc['mean']:.3f}): {'met' if ok else 'not met'}")
    exact = all(r["known_max_change"] == 0.0 for r in rows)
    out.append(f"known pixels exact: {'met' if exact else 'not met'} "
               f"(largest change {max(r['known_max_change'] for r in rows):.3g})")
    out.insert(0, f"goal repaint >= replace >= baselines on every mask: {'met' if ok_all else 'not met'}")
    return out


def figure(examples: dict, path: Path, k: int = 8) -> Path:
    """Per mask: the masked input (hole grey), zero, mean, replace, repaint, the original; ``k`` digits each."""
    from fastddpm.images import save_labelled_rows

    parts, labels = [], []
    for kind, ex in examples.items():
        for name in ("masked", "zero", "mean", "replace", "repaint", "original"):
            parts.append(ex[name][:k])
            labels.append(f"{kind} {name}" if name == "masked" else name)
    return save_labelled_rows(torch.cat(parts), labels, path, scale=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL), help="a fastddpm digits checkpoint (default: the shipped one)")
    p.add_argument("--n", type=int, default=100, help="held-out digits per row (default 100, at most 359)")
    p.add_argument("--seeds", default="0,1", help="inpainting seeds, separated by commas (default 0,1)")
    p.add_argument("--steps", type=int, default=50, help="reverse steps of the respaced process (default 50)")
    p.add_argument("--jump-length", type=int, default=5, help="RePaint's j (default 5: 50 steps, 9 jumps)")
    p.add_argument("--jump-n-sample", type=int, default=5, help="RePaint's r (default 5)")
    p.add_argument("--smoke", action="store_true", help="seconds: 12 digits, 8 steps, one seed, two masks")
    p.add_argument("--name", default=None, help="results file name (default inpaint_cpu[_smoke])")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    import fastddpm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model, _ = fastddpm.load_model(args.model, device="cpu")
    if args.smoke:
        args.n, args.seeds, args.steps, args.jump_length, args.jump_n_sample = 12, "0", 8, 2, 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    masks = ("bottom", "random") if args.smoke else MASKS
    examples = {}
    rows = rows_for(model, args.n, seeds, args.steps, args.jump_length, args.jump_n_sample, masks, examples)
    name = args.name or ("inpaint_cpu_smoke" if args.smoke else "inpaint_cpu")
    out_dir = Path(args.out_dir or Path(__file__).parent / "results")
    meta = environment(torch.device("cpu"), ("fastddpm",)) | {
        "model": Path(args.model).name, "threads": torch.get_num_threads(), "n": args.n,
        "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample, "verdicts": verdicts(rows),
        "images": "the shipped classifier's held-out test digits (the diffusion model trained on all digits)"}
    write_results(name, rows, COLUMNS, meta, out_dir)
    figure(examples, out_dir / f"{name}.png")
    for line in meta["verdicts"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
