"""The ``fastddpm`` commands that are tools around a model, each with its sub-parser: ``export`` (a
checkpoint's EMA weights as a release file), ``plot-schedule``, ``forward-strip``, ``eval`` (the
metrics of samples against a reference), and the editing commands ``inpaint``, ``img2img`` and
``invert`` (their files: ``fastddpm.edit_io``).  ``fastddpm.cli`` builds the parser and runs them.

    fastddpm inpaint --model digits_small --image in.png --mask mask.png --out out.png
    fastddpm img2img --model digits_small --image in.png --strength 0.5 --out out.png
    fastddpm invert  --model digits_small --image in.png --out noise.safetensors --steps 50
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from .cli_args import (SHIPPED_MODELS, check_output, class_label, float_in, int_in, model_path, resolve_device,
                       sampler_help)
from .metrics.features import FEATURES, INCEPTION_GLOB
from .modes import KSAMPLERS, SAMPLERS, SOLVERS
from .noise import MAX_SEED

__all__ = ["add_tool_parsers", "add_eval_parser", "add_edit_parsers", "cmd_export", "cmd_plot_schedule",
           "cmd_forward_strip", "cmd_eval", "cmd_inpaint", "cmd_img2img", "cmd_invert"]

BEGINNABLE = SAMPLERS + SOLVERS + ("dpm-solver", "deis") + KSAMPLERS  # the samplers img2img can begin part-way


# -- export ------------------------------------------------------------------------------------
def _check_export_target(checkpoint: Path, out: Path, force: bool) -> None:
    """Refuse to write the release file over its own checkpoint or over any training checkpoint (the
    run could not resume from EMA-only weights), unless forced."""
    from .checkpoint import read_metadata

    if force or not out.exists():
        return
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {str(out)!r} is the --checkpoint itself: the export (EMA weights only) would "
                         f"replace the training checkpoint; choose another --out (or --force)")
    try:
        kind = read_metadata(out).get("kind")
    except (ValueError, OSError):
        return  # not a fastddpm checkpoint
    if kind == "train":
        raise ValueError(f"--out {str(out)!r} is a training checkpoint; writing the export (EMA weights only) over "
                         f"it would lose what resuming needs; choose another --out (or --force)")


def cmd_export(args) -> int:
    from .checkpoint import load_checkpoint, load_model, save_model

    check_output(args.out, "--out", (".safetensors",))
    _check_export_target(Path(args.checkpoint), Path(args.out), args.force)
    ckpt = load_checkpoint(args.checkpoint)
    model, process = load_model(args.checkpoint, ema=True)
    extra = {"exported_from": {"step": ckpt.metadata.get("step"), "train_config": ckpt.metadata.get("train_config")}}
    if args.note:
        extra["note"] = args.note
    save_model(args.out, model.float(), process, extra=extra)
    print(f"exported EMA weights of step {ckpt.metadata.get('step')} -> {args.out}")
    return 0


# -- visuals -----------------------------------------------------------------------------------
def cmd_plot_schedule(args) -> int:
    from .plots import plot_schedule
    from .schedule import NoiseSchedule

    check_output(args.out, "--out", (".png",))
    schedules = {name: NoiseSchedule.make(name, args.timesteps) for name in args.schedules.split(",")}
    plot_schedule(schedules, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_forward_strip(args) -> int:
    import torch

    from .data import load_dataset
    from .images import forward_process_strip
    from .schedule import NoiseSchedule

    check_output(args.out, "--out", (".png",))
    dataset = load_dataset(args.data, image_size=args.image_size, channels=args.channels)
    x0 = torch.stack([dataset[i] for i in range(min(args.n, len(dataset)))])
    T = args.timesteps
    ts = [0, T // 20, T // 10, T // 5, 2 * T // 5, 3 * T // 5, 4 * T // 5, T - 1]
    forward_process_strip(x0, NoiseSchedule.make(args.schedule, T), ts, args.out, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


# -- eval --------------------------------------------------------------------------------------
def _load_samples(path: str):
    from .array_data import ARRAY_EXTENSIONS, ArrayDataset

    p = Path(path)
    if p.suffix.lower() not in ARRAY_EXTENSIONS:
        raise ValueError(f"--samples must be a .npz or .npy array (write one with `fastddpm sample --out x.npz`); "
                         f"got {str(p)!r}" + (" (PNG grids are not supported)" if p.suffix.lower() == ".png" else ""))
    return ArrayDataset(p).float_images()


def cmd_eval(args) -> int:
    """``fastddpm eval``: print the metrics of ``--samples`` against ``--reference`` as JSON."""
    import json

    from .metrics import evaluate

    samples = _load_samples(args.samples)
    metrics = evaluate(samples, args.reference, args.n_reference, feature=args.feature, k=args.k,
                       batch_size=args.batch_size, device=args.device, inception_weights=args.inception_weights,
                       seed=args.seed)
    metrics["samples"] = str(args.samples)
    metrics["reference"] = str(args.reference)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out:
        from .files import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def add_eval_parser(subparsers):
    """Add the ``eval`` sub-command to ``subparsers``; returns its parser."""
    p = subparsers.add_parser("eval", help="Fréchet distance and precision/recall of samples against a reference")
    p.add_argument("--samples", required=True,
                   help="a .npz/.npy uint8 [n, H, W, C] array (fastddpm sample --out x.npz)")
    p.add_argument("--reference", default="digits", help="'digits' or a .npz/.npy array of real images "
                                                         "(default: digits)")
    p.add_argument("--feature", choices=FEATURES, default="digits",
                   help="digits: the shipped classifier (offline); inception: standard FID (needs pytorch-fid and "
                        "local weights)")
    p.add_argument("--inception-weights", default=None,
                   help=f"path to {INCEPTION_GLOB} (default: looked up in torch hub's cache)")
    p.add_argument("--n-reference", type=int_in(1), default=None, help="random subset of the reference (default: all)")
    p.add_argument("-k", "--k", type=int_in(1), default=3,
                   help="k of the k-NN manifolds for precision/recall (default: 3)")
    p.add_argument("--batch-size", type=int_in(1), default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subset")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=cmd_eval)
    return p


# -- editing: inpaint, img2img, invert -----------------------------------------------------------
MASK_HELP = ("the mask: one image for every --image, or a folder holding a mask of each image's file name; "
             "read as gray in [0, 1] and binarised at 0.5 (as diffusers' RePaint pipeline): white (1) = keep, "
             "black (0) = fill; the model's size (or --resize)")


def _edit_inputs(args, *, mask: bool = False, out_suffixes: tuple[str, ...] | None = None) -> SimpleNamespace:
    """What an editing command reads, all checked before the model runs: the outputs' paths (one file,
    or a folder's PNGs), the model and its process, the images (and masks) at the model's channels
    and size, and ``--class``."""
    from .adapters import ModelAdapter
    from .checkpoint import load_model
    from .edit_io import find_inputs, load_images, load_masks, output_paths

    files, is_folder = find_inputs(args.image, "--image")
    if out_suffixes is not None:  # one file for the whole batch
        paths = [check_output(args.out, "--out", out_suffixes)]
    else:
        paths = output_paths(args.out, files, is_folder)
    if mask:
        find_inputs(args.mask, "--mask")
    device = resolve_device(args.device)
    path = model_path(args.model)
    model, process = load_model(path, ema=not args.no_ema, device=device)
    adapter = ModelAdapter(model)
    images, files, _ = load_images(args.image, adapter.channels, adapter.image_size, resize=args.resize)
    masks = load_masks(args.mask, files, adapter.image_size, resize=args.resize) if mask else None
    label = class_label(model, args.class_, args.guidance)
    return SimpleNamespace(model=model, process=process, device=device, images=images.to(device), files=files,
                           paths=paths, masks=None if masks is None else masks.to(device), label=label,
                           model_file=path)


def _conditioning(args, inputs) -> dict:
    return {"class_labels": inputs.label, "guidance_scale": args.guidance}


def _report(verb: str, how: str, inputs, seconds: float, out) -> None:
    n = inputs.images.shape[0]
    print(f"{verb} {n} image{'s' if n != 1 else ''} ({how}) in {seconds:.1f} s -> {out}")


def cmd_inpaint(args) -> int:
    from .edit_io import save_images
    from .inpaint import inpaint

    inputs = _edit_inputs(args, mask=True)
    start = time.perf_counter()
    x = inpaint(inputs.model, inputs.images, inputs.masks, method=args.method, jump_length=args.jump_length,
                jump_n_sample=args.jump_n_sample, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                process=inputs.process, device=inputs.device, progress=not args.quiet, **_conditioning(args, inputs))
    seconds = time.perf_counter() - start
    save_images(x.cpu(), inputs.paths)
    _report("inpainted", args.method, inputs, seconds, args.out)
    return 0


def cmd_img2img(args) -> int:
    from .edit_io import save_images
    from .img2img import img2img

    inputs = _edit_inputs(args)
    options = {"sampler": args.sampler} if args.sampler is not None else {}
    start = time.perf_counter()
    x = img2img(inputs.model, inputs.images, strength=args.strength, steps=args.steps, seed=args.seed,
                batch_size=args.batch_size, process=inputs.process, device=inputs.device, progress=not args.quiet,
                **_conditioning(args, inputs), **options)
    seconds = time.perf_counter() - start
    save_images(x.cpu(), inputs.paths)
    _report("edited", f"img2img, strength {args.strength:g}", inputs, seconds, args.out)
    return 0


def cmd_invert(args) -> int:
    from .edit_io import save_noise
    from .inversion import invert, inversion_process
    from .version import __version__

    inputs = _edit_inputs(args, out_suffixes=(".safetensors",))
    process = inversion_process(inputs.process, args.steps, {})
    start = time.perf_counter()
    x_T = invert(inputs.model, inputs.images, steps=args.steps, seed=args.seed, process=inputs.process,
                 device=inputs.device, progress=not args.quiet, **_conditioning(args, inputs))
    seconds = time.perf_counter() - start
    save_noise(args.out, x_T, {
        "format": "fastddpm.invert", "format_version": 1, "steps": process.num_steps, "model": args.model,
        "model_file": str(inputs.model_file), "images": [str(f) for f in inputs.files], "shape": list(x_T.shape),
        "class_labels": inputs.label, "guidance_scale": args.guidance, "diffusion": process.to_dict(),
        "fastddpm_version": __version__,
        "reconstruct": f"fastddpm.sample(model, {x_T.shape[0]}, noise=x_T, sampler='ddim', eta=0, "
                       f"steps={process.num_steps}, process=process)"})
    _report("inverted", f"{process.num_steps} DDIM steps", inputs, seconds, args.out)
    return 0


def _add_edit_args(p, out_help: str) -> None:
    p.add_argument("--model", required=True,
                   help=f"a checkpoint (fastddpm train/export) or a shipped model: {', '.join(SHIPPED_MODELS)}")
    p.add_argument("--no-ema", action="store_true", help="a training checkpoint's raw weights, not the EMA ones")
    p.add_argument("--image", required=True,
                   help="a PNG/JPEG image, or a folder of them (one batch, sorted by name); gray or RGB, converted "
                        "to the model's channels; the model's size unless --resize")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--resize", action="store_true",
                   help="resize images (and masks) of another size to the model's (shorter side, centre crop); "
                        "without it such an image is an error")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument("--class", dest="class_", default=None, metavar="CLASS",
                   help="a class-conditional model's class for every image (index or name)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale w (1: the conditional model alone; needs --class)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_edit_parsers(subparsers) -> None:
    """Add ``inpaint``, ``img2img`` and ``invert`` to ``subparsers``."""
    images_out = "the output: a .png for one image, a folder (made if missing) of PNGs of the same names for a folder"
    p = subparsers.add_parser("inpaint", help="fill the black region of a mask, keep the white (RePaint)")
    _add_edit_args(p, images_out)
    p.add_argument("--mask", required=True, help=MASK_HELP)
    p.add_argument("--method", choices=("repaint", "replace"), default="repaint",
                   help="repaint: resampling (Lugmayr et al. 2022); replace: the known region replaced at every "
                        "step, no resampling (default: repaint)")
    p.add_argument("--jump-length", type=int_in(1), default=10, help="RePaint's jump length j (default: 10)")
    p.add_argument("--jump-n-sample", type=int_in(1), default=10,
                   help="RePaint's resamplings r (default: 10; about r times the model calls)")
    p.add_argument("--steps", type=int_in(1), default=None, help="reverse steps (default: min(250, T))")
    p.add_argument("--batch-size", type=int_in(1), default=None, help="micro-batch size (default: all at once)")
    p.set_defaults(func=cmd_inpaint)

    p = subparsers.add_parser("img2img", help="re-imagine images: noise them part way and denoise (SDEdit)")
    _add_edit_args(p, images_out)
    p.add_argument("--strength", type=float_in(0.0, 1.0), default=0.6,
                   help="how far to noise, in [0, 1]: 0 keeps the image, 1 ignores it (default: 0.6)")
    p.add_argument("--steps", type=int_in(1), default=None,
                   help="the whole plan's steps, about strength x steps run (default: the sampler's, as sample)")
    p.add_argument("--sampler", choices=BEGINNABLE, default=None,
                   help=sampler_help(BEGINNABLE) + " (pndm cannot begin part-way yet)")
    p.add_argument("--batch-size", type=int_in(1), default=None, help="micro-batch size (default: all at once)")
    p.set_defaults(func=cmd_img2img)

    p = subparsers.add_parser("invert", help="DDIM inversion: the noise x_T that DDIM (eta 0) maps to each image")
    _add_edit_args(p, "a .safetensors file: the tensor 'x_T' [n, C, H, W] and the steps, model, process and "
                      "images as metadata (one file for a folder too)")
    p.add_argument("--steps", type=int_in(1), default=50, help="DDIM steps (default: 50); sample back with the same")
    p.set_defaults(func=cmd_invert)


def add_tool_parsers(subparsers) -> None:
    """Add ``export``, ``plot-schedule``, ``forward-strip``, ``eval`` and the editing commands to ``subparsers``."""
    p = subparsers.add_parser("export", help="write the EMA weights of a checkpoint as a release file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--note", default=None, help="a line stored in the file's metadata")
    p.add_argument("--force", action="store_true", help="write --out even over a training checkpoint")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("plot-schedule", help="plot betas and alphas_cumprod of schedules")
    p.add_argument("--schedules", default="linear,cosine,sigmoid,quadratic")
    p.add_argument("--timesteps", type=int_in(1), default=1000)
    p.add_argument("--out", default="schedules.png")
    p.set_defaults(func=cmd_plot_schedule)

    p = subparsers.add_parser("forward-strip", help="show images noised at increasing t")
    p.add_argument("--data", default="digits")
    p.add_argument("--image-size", type=int_in(1), default=None)
    p.add_argument("--channels", type=int_in(1), default=None)
    p.add_argument("-n", type=int_in(1), default=6)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--timesteps", type=int_in(1), default=1000)
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument("--out", default="forward.png")
    p.set_defaults(func=cmd_forward_strip)

    add_eval_parser(subparsers)
    add_edit_parsers(subparsers)
