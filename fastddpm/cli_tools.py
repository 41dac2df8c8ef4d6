"""The ``fastddpm`` commands that are small tools around a model: ``export`` (a
checkpoint's EMA weights as a release file), ``plot-schedule``, ``forward-strip`` and
``eval`` (the metrics of samples against a reference), each with its sub-parser.
``fastddpm.cli`` builds the parser and runs the commands.
"""
from __future__ import annotations

from pathlib import Path

from .cli_args import check_output, int_in
from .metrics.features import FEATURES, INCEPTION_GLOB
from .noise import MAX_SEED

__all__ = ["add_tool_parsers", "add_eval_parser", "cmd_export", "cmd_plot_schedule", "cmd_forward_strip",
           "cmd_eval"]


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


def add_tool_parsers(subparsers) -> None:
    """Add ``export``, ``plot-schedule``, ``forward-strip`` and ``eval`` to ``subparsers``."""
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
