"""Checks of command-line arguments that run before any work: argparse types for bounded
integers, the device, and output paths (the suffix, and a folder that exists and is writable),
each error naming the argument and what was expected."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["int_in", "check_output", "resolve_device"]


def int_in(lo: int, hi: int | None = None):
    """An argparse ``type``: an int in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            what = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def check_output(path, arg: str, suffixes: tuple[str, ...]) -> Path:
    """``path`` as an output file: one of ``suffixes``, not a folder, in an existing writable folder.

    :raises ValueError: naming ``arg``, the path and what to change.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else suffixes[0]
        raise ValueError(f"{arg} must end in {names}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{arg} {str(path)!r}: its folder {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {str(path)!r}: its folder {str(parent)!r} is not writable")
    return path


def resolve_device(name: str | None):
    """``--device``: None/``auto`` (CUDA if available, else the CPU) or a device that exists here."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {name!r} is not supported: use cpu or cuda")
    return device
