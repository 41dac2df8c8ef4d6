"""The ``fastddpm`` command line (also ``python -m fastddpm``).

    fastddpm train  --data digits --preset small --steps 4000 --batch-size 64 --out runs/digits
    fastddpm sample --checkpoint runs/digits/checkpoints/best.safetensors -n 64 --out samples.png
    fastddpm demo
    fastddpm export --checkpoint CKPT --out model.safetensors
    fastddpm plot-schedule --out schedules.png
    fastddpm forward-strip --data digits --out forward.png
    fastddpm eval --samples samples.npz --reference digits
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "assets" / "digits_small.safetensors"
# reference.SAMPLERS + multistep.SOLVERS, spelled out so that --help imports no torch (a test holds them equal)
SAMPLER_CHOICES = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")


def _device(name: str | None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        raise SystemExit(f"error: unknown --preset {args.preset!r}; known presets: {sorted(PRESETS)}")
    preset = PRESETS[args.preset]
    image_size = args.image_size or preset.image_size
    dataset = load_dataset(args.data, image_size=image_size, channels=args.channels or preset.in_channels)
    model = create_model(args.preset, image_size=dataset.image_size, in_channels=dataset.channels)
    process = DDPM(**_diffusion_options(args))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
                         sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                         val_fraction=args.val_fraction, log_every=args.log_every,
                         mixed_precision=args.mixed_precision, channels_last=args.channels_last,
                         compile=args.compile, nonfinite=args.nonfinite,
                         # digits are not mirror-symmetric: no flips unless asked for
                         random_flip=args.flip if args.flip is not None else args.data != "digits")
    trainer = Trainer(model, process, dataset, config, args.out, device=_device(args.device), resume=args.resume)
    metrics = trainer.train()
    print(f"trained to step {metrics.get('step')}: {metrics}")
    return 0


# -- sample ------------------------------------------------------------------------------------
OUTPUT_SUFFIXES = (".png", ".npz", ".npy")


def _sample_and_save(model, process, args, out: Path) -> float:
    from . import images

    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise SystemExit(f"error: --out must end in .png, .npz or .npy, got {str(out)!r}")
    from .sampling import sample

    if args.sampler is not None:
        process = process.with_options(sampler=args.sampler, eta=args.eta)
    steps = None  # a multistep solver's --steps are its model calls, not a respacing
    if process.is_multistep:
        steps = process.multistep_plan(args.steps).num_steps  # checks them now
    elif args.steps is not None and args.steps != process.num_steps:
        process = process.respace(args.steps)
    num_steps = steps or process.num_steps
    frames = []
    every = max(1, num_steps // 50) if args.gif else 0

    def keep_frames(i, t, x):
        if i % every == 0 or i == num_steps - 1:
            frames.append(x.detach().cpu().clamp(-1, 1))

    start = time.perf_counter()
    x = sample(model, args.n, steps=steps, seed=args.seed, process=process, device=_device(args.device),
               batch_size=args.batch_size, progress=not args.quiet, callback=keep_frames if every else None)
    seconds = time.perf_counter() - start
    x = x.cpu()
    if out.suffix.lower() == ".png":
        images.save_image_grid(x, out, scale=args.scale)
    else:
        images.save_images_npz(x, out)
    if args.gif:
        images.save_gif(frames, args.gif, scale=args.scale)
    return seconds


def cmd_sample(args) -> int:
    from .checkpoint import load_model

    model, process = load_model(args.checkpoint, ema=not args.no_ema, device=_device(args.device))
    seconds = _sample_and_save(model, process, args, Path(args.out))
    print(f"sampled {args.n} images in {seconds:.1f} s -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .checkpoint import load_model

    model, process = load_model(args.checkpoint or DEMO_MODEL, device=_device(args.device))
    steps = args.steps or process.num_steps
    print(f"fastddpm demo: {args.n} digits from the shipped 'small' model, {steps} DDPM steps "
          f"on {_device(args.device)}")
    seconds = _sample_and_save(model, process, args, Path(args.out))
    print(f"sampling time: {seconds:.1f} s for {args.n} images ({args.n / seconds:.1f} images/s) -> {args.out}")
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_checkpoint, load_model, save_model

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
    from .images import plot_schedule
    from .schedule import NoiseSchedule

    schedules = {name: NoiseSchedule.make(name, args.timesteps) for name in args.schedules.split(",")}
    plot_schedule(schedules, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_forward_strip(args) -> int:
    import torch

    from .data import load_dataset
    from .images import forward_process_strip
    from .schedule import NoiseSchedule

    dataset = load_dataset(args.data, image_size=args.image_size, channels=args.channels)
    x0 = torch.stack([dataset[i] for i in range(min(args.n, len(dataset)))])
    T = args.timesteps
    ts = [0, T // 20, T // 10, T // 5, 2 * T // 5, 3 * T // 5, 4 * T // 5, T - 1]
    forward_process_strip(x0, NoiseSchedule.make(args.schedule, T), ts, args.out, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


# -- parser ------------------------------------------------------------------------------------
def _add_diffusion_args(p):
    p.add_argument("--schedule", default="linear", help="linear | cosine | sigmoid | quadratic (default: linear)")
    p.add_argument("--prediction", default="epsilon", help="epsilon | x0 | v (default: epsilon)")
    p.add_argument("--timesteps", type=int, default=1000, help="T, the process length (default: 1000)")


def _add_sample_args(p, n=64, out="samples.png"):
    p.add_argument("-n", type=int, default=n, help=f"number of images (default: {n})")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps; fewer than T respaces (a multistep sampler: model calls, default 20)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None, help="override the sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (with --sampler ddim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default: all at once)")
    p.add_argument("--out", default=out, help="output .png grid or .npz/.npy uint8 array")
    p.add_argument("--gif", default=None, help="also write the reverse process as an animated GIF")
    p.add_argument("--scale", type=int, default=4, help="PNG/GIF upscaling factor (default: 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .train_config import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="fastddpm", description="Train and sample DDPM image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a U-Net on a dataset")
    p.add_argument("--data", required=True, help="'digits', an image folder, or a .npy/.npz file")
    p.add_argument("--preset", default="small", help="model preset: small, ddpm_cifar10, tiny (default: small)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--channels", type=int, default=None, help="default: the preset's")
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--mixed-precision", default="auto", help="auto | no | bf16 | fp16")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, except for digits)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="model in channels_last (default: on a CUDA GPU with mixed precision)")
    p.add_argument("--compile", default="no", choices=COMPILE_MODES,
                   help="torch.compile the model with this mode (default: no)")
    p.add_argument("--nonfinite", default="error", choices=("error", "skip"),
                   help="a non-finite loss stops training (error) or its step is left out (skip)")
    p.add_argument("--min-snr-gamma", type=float, default=None)
    p.add_argument("--device", default=None)
    _add_diffusion_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    _add_sample_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="sample digits with the model shipped in the package")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    _add_sample_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write the EMA weights of a checkpoint as a release file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--note", default=None, help="a line stored in the file's metadata")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot-schedule", help="plot betas and alphas_cumprod of schedules")
    p.add_argument("--schedules", default="linear,cosine,sigmoid,quadratic")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--out", default="schedules.png")
    p.set_defaults(func=cmd_plot_schedule)

    p = sub.add_parser("forward-strip", help="show images noised at increasing t")
    p.add_argument("--data", default="digits")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("-n", type=int, default=6)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="forward.png")
    p.set_defaults(func=cmd_forward_strip)

    from .metrics import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError, PermissionError) as e:
        print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
