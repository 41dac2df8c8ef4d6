"""The ``fastddpm`` command line (also ``python -m fastddpm``).

    fastddpm train  --data digits --preset small --steps 4000 --batch-size 64 --out runs/digits
    fastddpm sample --checkpoint runs/digits/checkpoints/best.safetensors -n 64 --out samples.png
    fastddpm demo
    fastddpm export --checkpoint CKPT --out model.safetensors
    fastddpm plot-schedule --out schedules.png
    fastddpm forward-strip --data digits --out forward.png
    fastddpm eval --samples samples.npz --reference digits
    fastddpm inpaint --model digits_small --image in.png --mask mask.png --out out.png
    fastddpm img2img --model digits_small --image in.png --strength 0.5 --out out.png
    fastddpm invert  --model digits_small --image in.png --out noise.safetensors

Here: the parser, ``main`` and the commands that train and sample (``train``, ``sample``,
``demo``); the tools (``export``, ``plot-schedule``, ``forward-strip``, ``eval``) and the editing
commands (``inpaint``, ``img2img``, ``invert``) are ``fastddpm.cli_tools``'.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from .cli_args import SHIPPED_MODELS, check_output, sampler_help, class_label, int_in, model_classes, resolve_device
from .cli_tools import add_tool_parsers
from .modes import ALL_SAMPLERS
from .noise import MAX_SEED

DEMO_MODEL = SHIPPED_MODELS["digits_small"]
DEMO_COND_MODEL = SHIPPED_MODELS["digits_cond_small"]  # class-conditional
DEMO_GUIDANCE, DEMO_PER_CLASS, DEMO_COND_STEPS = 3.0, 8, 20
SAMPLER_CHOICES = ALL_SAMPLERS


def _diffusion_options(args) -> dict:
    options = {"schedule": args.schedule, "prediction": args.prediction, "num_timesteps": args.timesteps}
    if getattr(args, "min_snr_gamma", None) is not None:
        options["min_snr_gamma"] = args.min_snr_gamma
    return options


# -- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .data import load_dataset
    from .diffusion import DDPM
    from .models import PRESETS, create_model
    from .trainer import TrainConfig, Trainer

    if args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; known presets: {sorted(PRESETS)}")
    preset = PRESETS[args.preset]
    image_size = args.image_size if args.image_size is not None else preset.image_size
    channels = args.channels if args.channels is not None else preset.in_channels
    dataset = load_dataset(args.data, image_size=image_size, channels=channels)
    classes = {}
    if args.class_cond:  # a class embedding for each of the data's classes (and the null class)
        from .data import dataset_labels

        found = dataset_labels(dataset)
        if found is None:
            raise ValueError(f"--class-cond: the data {args.data!r} has no class labels (digits, an image folder of "
                             f"one subfolder per class, or an .npz with a 'y' or 'labels' array have them)")
        classes = {"num_classes": len(found[1])}
    # the initial weights come from --seed too: two runs with the same arguments give the same checkpoints
    model = create_model(args.preset, seed=args.seed, image_size=dataset.image_size, in_channels=dataset.channels,
                         **classes)
    process = DDPM(**_diffusion_options(args))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
                         ema_warmup_power=args.ema_warmup_power or None,
                         sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                         checkpoint_minutes=args.checkpoint_minutes, keep_last=args.keep_last,
                         val_fraction=args.val_fraction, log_every=args.log_every,
                         mixed_precision=args.mixed_precision, channels_last=args.channels_last,
                         compile=args.compile, nonfinite=args.nonfinite, class_cond=args.class_cond,
                         cond_drop=args.cond_drop,
                         # digits are not mirror-symmetric: no flips unless asked for
                         random_flip=args.flip if args.flip is not None else args.data != "digits")
    trainer = Trainer(model, process, dataset, config, args.out, device=resolve_device(args.device),
                      resume=args.resume)
    if trainer.is_main:
        print("training plan:\n  " + trainer.explain().replace("\n", "\n  "))
    if args.resume and trainer.step == 0:
        print(f"--resume: no checkpoint in {str(Path(args.out) / 'checkpoints')!r}; starting a new run")
    elif trainer.step >= config.steps:
        raise ValueError(f"--steps {config.steps} is not beyond the checkpoint's step {trainer.step}: nothing to "
                         f"train; give --steps above {trainer.step} to continue the run")
    metrics = trainer.train()
    if metrics["stopped_by"]:
        argv = list(args.argv)
        resume = shlex.join(["fastddpm", *argv, *([] if "--resume" in argv else ["--resume"])])
        print(f"stopped by {metrics['stopped_by']} at step {metrics['step']} of {config.steps}; checkpoint: "
              f"{metrics['checkpoint']}\nto continue:\n  {resume}")
        return 128 + signal.Signals[metrics["stopped_by"]].value
    print(f"trained to step {metrics.get('step')}: {metrics}")
    return 0


# -- sample ------------------------------------------------------------------------------------
OUTPUT_SUFFIXES = (".png", ".npz", ".npy")
MAX_SCALE = 64  # PNG/GIF upscaling: a 64x grid of 64 16x16 images is already 8192 px wide
DEFAULT_MICRO_BATCH = 256  # images sampled at once unless --batch-size says otherwise: bounded memory for any -n


def _check_sample_outputs(args) -> None:
    """``sample``/``demo``'s --out and --gif, before anything is loaded."""
    check_output(args.out, "--out", OUTPUT_SUFFIXES)
    if args.gif:
        check_output(args.gif, "--gif", (".gif",))


def _sampling_process(process, args):
    """``(process, steps)`` that ``sample``/``demo`` run, checked before any work: ``steps`` is a
    multistep solver's number of model calls (``--steps`` or its default), None for DDPM/DDIM,
    whose ``--steps`` respace the process instead."""
    sampler = args.sampler or process.config.sampler
    if args.eta is not None and sampler != "ddim":
        raise ValueError(f"--eta is DDIM's: give --sampler ddim with it (the process samples with {sampler!r})")
    options = {k: v for k, v in (("sampler", args.sampler), ("eta", args.eta), ("solver_order", args.order),
                                 ("s_churn", args.s_churn)) if v is not None}
    chosen = process.with_options(**options) if options else process
    if chosen.is_multistep:
        return chosen, chosen.multistep_plan(args.steps).num_steps
    if args.steps is not None and args.steps > process.num_steps:
        raise ValueError(f"--steps {args.steps} is more than the model's process has ({process.num_steps})")
    if args.steps is not None and args.steps != process.num_steps:
        process = process.respace(args.steps)
    return (process.with_options(**options) if options else process), None


def _plan_options(args, process) -> dict:
    """``sample``'s keyword arguments for --dtype and --compile (the engine when --compile is given)."""
    import torch

    options = {}
    if args.dtype != "auto":
        options["dtype"] = getattr(torch, args.dtype)
    if args.compile != "auto":
        options |= {"engine": True, "compile": args.compile == "yes"}
    return options


def _class_labels(model, args):
    """``(labels, row names)`` for --class (None, None without it): one class for every image, or with
    ``all`` ``ceil(n / K)`` images of each of the model's K classes, a row each."""
    if args.class_ == "all":
        from .training.samples import class_rows

        k, names = model_classes(model)
        return class_rows(k, args.n), names
    return class_label(model, args.class_, args.guidance, allow_all=True), None


def _sample_and_save(model, process, steps, args, device) -> tuple[float, int]:
    """Sample with ``(process, steps)`` from ``_sampling_process`` and write --out (and --gif);
    ``(seconds, images drawn)`` (``--class all`` draws whole rows, more than -n)."""
    from . import images
    from .sampling import sample

    labels, rows = _class_labels(model, args)
    n = len(labels) if rows is not None else args.n
    guidance = {"guidance_scale": args.guidance, "guidance_rescale": args.guidance_rescale} \
        if args.guidance is not None else {}

    num_steps = steps or process.num_steps
    frames = []
    every = max(1, num_steps // 50) if args.gif else 0  # about 50 frames of the steps actually taken

    def keep_frames(i, t, x):
        if i % every == 0 or i == num_steps - 1:
            frames.append(x.detach().cpu().clamp(-1, 1))

    options = _plan_options(args, process)
    start = time.perf_counter()  # sample() refuses a diverged model's images (finite but wrong)
    x = sample(model, n, steps=steps, seed=args.seed, process=process, device=device,
               batch_size=args.batch_size or min(n, DEFAULT_MICRO_BATCH), progress=not args.quiet,
               callback=keep_frames if every else None, class_labels=labels, **guidance, **options)
    seconds = time.perf_counter() - start
    if args.explain:
        from .engine import last_plan

        plan = last_plan() if options.get("engine", device.type == "cpu" and not process.is_multistep) else None
        dtype = str(options.get("dtype", "the model's")).replace("torch.", "")
        print("sampling plan:\n  " + (plan.explain().replace("\n", "\n  ") if plan is not None else
                                      f"the eager loop (fastddpm.sample's default for this device and sampler), "
                                      f"dtype: {dtype}"))
    x = x.cpu()
    out = Path(args.out)
    if out.suffix.lower() == ".png" and rows is not None:
        images.save_labelled_rows(x, rows, out, scale=args.scale)
    elif out.suffix.lower() == ".png":
        images.save_image_grid(x, out, scale=args.scale)
    else:
        images.save_images_npz(x, out)
    if args.gif:
        images.save_gif(frames, args.gif, scale=args.scale)
    return seconds, n


def cmd_sample(args) -> int:
    from .checkpoint import load_model

    device = resolve_device(args.device)
    _check_sample_outputs(args)
    model, process = load_model(args.checkpoint, ema=not args.no_ema, device=device)
    seconds, n = _sample_and_save(model, *_sampling_process(process, args), args, device)
    print(f"sampled {n} images in {seconds:.1f} s -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .checkpoint import load_model

    device = resolve_device(args.device)
    _check_sample_outputs(args)
    model, process = load_model(args.checkpoint or DEMO_MODEL, device=device)
    process, steps = _sampling_process(process, args)
    how = (f"{steps} {process.config.sampler} model calls" if steps is not None
           else f"{process.num_steps} {process.config.sampler.upper()} steps")
    print(f"fastddpm demo: {args.n} digits from the shipped 'small' model, {how} on {device}")
    seconds, _ = _sample_and_save(model, process, steps, args, device)
    print(f"sampling time: {seconds:.1f} s for {args.n} images ({args.n / seconds:.1f} images/s) -> {args.out}")
    if args.checkpoint is None and args.by_class:
        _demo_by_class(args, device)
    return 0


def _demo_by_class(args, device) -> None:
    """The shipped class-conditional model: one labelled row per digit, guided (dpm++2m, 20 model calls,
    w = DEMO_GUIDANCE), written beside --out as ``<name>_by_class.png``."""
    from .checkpoint import load_model

    out = Path(args.out)
    path = out.with_name(f"{out.stem}_by_class.png")
    model, process = load_model(DEMO_COND_MODEL, device=device)
    cond = argparse.Namespace(**{**vars(args), "class_": "all", "guidance": DEMO_GUIDANCE, "guidance_rescale": 0.0,
                                  "n": 10 * DEMO_PER_CLASS, "sampler": "dpm++2m", "steps": DEMO_COND_STEPS,
                                  "eta": None, "out": str(path), "gif": None, "explain": False})
    process, steps = _sampling_process(process, cond)
    print(f"fastddpm demo: {DEMO_PER_CLASS} of each digit from the shipped class-conditional model, guidance "
          f"w={DEMO_GUIDANCE:g}, {steps} dpm++2m model calls")
    seconds, n = _sample_and_save(model, process, steps, cond, device)
    print(f"sampling time: {seconds:.1f} s for {n} images, one row per digit -> {path}")


# -- parser ------------------------------------------------------------------------------------
def _add_diffusion_args(p):
    p.add_argument("--schedule", default="linear", help="linear | cosine | sigmoid | quadratic (default: linear)")
    p.add_argument("--prediction", default="epsilon", help="epsilon | x0 | v (default: epsilon)")
    p.add_argument("--timesteps", type=int, default=1000, help="T, the process length (default: 1000)")


def _add_sample_args(p, n=64, out="samples.png"):
    p.add_argument("-n", type=int_in(1), default=n, help=f"number of images (default: {n})")
    p.add_argument("--steps", type=int_in(1), default=None,
                   help="sampling steps; fewer than T respaces (a multistep solver: model calls, default 20; a "
                        "k-sampler: sigma steps, default 20)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None, help=sampler_help(SAMPLER_CHOICES))
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (with --sampler ddim; default: 0)")
    p.add_argument("--order", type=int_in(1, 4), default=None,
                   help="the order of a sampler that has one (lms: 1-4, default 4; deis, dpm-solver: 1-3, default 2)")
    p.add_argument("--s-churn", type=float, default=None,
                   help="EDM's churn for euler, heun, dpm2 (k-diffusion's s_churn; default 0: none)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument("--batch-size", type=int_in(1), default=None,
                   help=f"micro-batch size (default: up to {DEFAULT_MICRO_BATCH}; the images do not depend on it)")
    p.add_argument("--out", default=out, help="output .png grid or .npz/.npy uint8 array")
    p.add_argument("--gif", default=None, help="also write the reverse process as an animated .gif")
    p.add_argument("--scale", type=int_in(1, MAX_SCALE), default=4, help="PNG/GIF upscaling factor (default: 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the model's precision (auto: its weights', float32); bfloat16 pays on CPUs with AVX-512 "
                        "BF16 or AMX (about 1.9x at n=64) and on GPUs; the images are computed in float32")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="torch.compile the model (auto: on a CPU when it pays back within this run)")
    p.add_argument("--class", dest="class_", default=None, metavar="CLASS",
                   help="a class-conditional model's class for every image (index or name), or 'all': a grid of "
                        "one labelled row per class, ceil(n / classes) images each")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale w (diffusers' guidance_scale: 1 is the conditional model "
                        "alone; needs --class and a model trained with --class-cond)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided output's std toward the conditional one's (Lin et al. 2023), in [0, 1]")
    p.add_argument("--explain", action="store_true", help="print the sampling plan and why")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .train_config import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="fastddpm", description="Train and sample DDPM image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a U-Net on a dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows the defaults
    p.add_argument("--data", required=True, help="'digits', an image folder, or a .npy/.npz file")
    p.add_argument("--preset", default="small", help="model preset: small, ddpm_cifar10, tiny")
    p.add_argument("--steps", type=int_in(1), required=True, help="optimizer steps in total (a resumed run too)")
    p.add_argument("--batch-size", type=int_in(1), default=64, help="global batch (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int_in(0), default=0, help="linear learning-rate warmup")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="the EMA decay once warmed up")
    p.add_argument("--ema-warmup-power", type=float, default=0.75,
                   help="EMA warm-up: step k's decay is min(ema_decay, 1 - (1 + k)^-power); 0: ema_decay from the "
                        "first step")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0,
                   help="seeds everything: initial weights, data order, timesteps, noise, dropout")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--image-size", type=int_in(1), default=None, help="default: the preset's")
    p.add_argument("--channels", type=int_in(1), default=None, help="default: the preset's")
    p.add_argument("--sample-every", type=int_in(0), default=0, help="EMA sample grid every N steps (0: never)")
    p.add_argument("--checkpoint-every", type=int_in(0), default=1000, help="0: only at the end")
    p.add_argument("--checkpoint-minutes", type=float, default=0.0,
                   help="also checkpoint when this many minutes passed since the last one (0: off)")
    p.add_argument("--keep-last", type=int_in(1), default=2, help="step checkpoints kept")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of the data held out for validation")
    p.add_argument("--log-every", type=int_in(1), default=50, help="metrics read back and logged every N steps")
    p.add_argument("--mixed-precision", default="auto", help="auto | no | bf16 | fp16")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (None: on, except for digits)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="model in channels_last (None: on a CUDA GPU with mixed precision)")
    p.add_argument("--compile", default="no", choices=COMPILE_MODES, help="torch.compile the model with this mode")
    p.add_argument("--nonfinite", default="error", choices=("error", "skip"),
                   help="a non-finite loss stops training (error) or its step is left out (skip)")
    p.add_argument("--class-cond", action="store_true",
                   help="train a class-conditional model on the data's labels (digits: the digit; an image folder: "
                        "its subfolders; an .npz: its 'y' or 'labels' array)")
    p.add_argument("--cond-drop", type=float, default=0.1,
                   help="with --class-cond: probability of training a label as the null class (classifier-free "
                        "guidance)")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    _add_diffusion_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    _add_sample_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="sample digits with the model shipped in the package")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--by-class", action=argparse.BooleanOptionalAction, default=True,
                   help="also sample the shipped class-conditional model, one labelled row per digit, guided, to "
                        "<out>_by_class.png")
    _add_sample_args(p)
    p.set_defaults(func=cmd_demo)

    add_tool_parsers(sub)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int_in(1), default=None,
                             help="CPU threads torch uses (default: torch's; on a busy machine 1 or 2 is often "
                                  "much faster)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # to print the command that resumes an interrupted run
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError) as e:
        print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
