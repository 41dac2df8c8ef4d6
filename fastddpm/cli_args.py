"""Checks of command-line arguments that run before any work: argparse types for bounded
numbers, the device, output paths (the suffix, and a folder that exists and is writable) and a
class-conditional model's ``--class``, each error naming the argument and what was expected."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["SHIPPED_MODELS", "SAMPLER_HELP", "sampler_help", "int_in", "float_in", "check_output", "resolve_device", "model_path", "model_classes",
           "class_label"]

ASSETS = Path(__file__).parent / "assets"
# the models that ship in the package, by the names --model takes (the demo's two)
# --sampler's choices, each with its one line in --help (tests/test_cli.py holds this to modes' tuples)
SAMPLER_HELP = {
    "ddpm": "ancestral DDPM (Ho et al. 2020), steps < T respaced",
    "ddim": "DDIM (Song et al. 2021), --eta for its noise",
    "dpm++2m": "DPM-Solver++(2M) (Lu et al. 2022), 10-25 calls",
    "dpm++3m": "DPM-Solver++(3M)",
    "dpm++2m-sde": "SDE-DPM-Solver++(2M), stochastic",
    "unipc": "UniPC-bh2 (Zhao et al. 2023), predictor-corrector",
    "dpm-solver": "singlestep DPM-Solver (Lu et al. 2022), order 1-3 (--order, default 2)",
    "deis": "DEIS (Zhang & Chen 2023), order 1-3 (--order, default 2)",
    "pndm": "PLMS (Liu et al. 2022; diffusers' PNDM, skip_prk_steps): steps + 1 calls",
    "euler": "Euler in sigma (Karras et al. 2022; diffusers' EulerDiscreteScheduler)",
    "euler-a": "Euler ancestral (k-diffusion), stochastic",
    "heun": "Heun, 2nd order (EDM): 2 x steps - 1 calls",
    "dpm2": "DPM2 (k-diffusion): 2 x steps - 1 calls",
    "dpm2-a": "DPM2 ancestral: 2 x steps - 1 calls, stochastic",
    "lms": "linear multistep in sigma, order 4 (--order; diffusers' LMSDiscreteScheduler)",
    "dpm++2s-a": "DPM++ 2S ancestral (k-diffusion): 2 x steps - 1 calls, stochastic",
    "dpm++sde": "DPM++ SDE (k-diffusion, Brownian noise): 2 x steps - 1 calls",
    "dpm++3m-sde": "DPM++ 3M SDE (k-diffusion), stochastic",
}


def sampler_help(choices) -> str:
    """``--sampler``'s help: each choice and its line."""
    return "override the sampler: " + "; ".join(f"{name}: {SAMPLER_HELP[name]}" for name in choices)


SHIPPED_MODELS = {"digits_small": ASSETS / "digits_small.safetensors",
                  "digits_cond_small": ASSETS / "digits_cond_small.safetensors"}


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


def float_in(lo: float, hi: float):
    """An argparse ``type``: a float in ``[lo, hi]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {text!r}")
        return value

    parse.__name__ = "float"
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


def model_path(name: str, arg: str = "--model") -> Path:
    """A checkpoint file (``fastddpm train``/``export``'s), or the file of a shipped model's name."""
    if name in SHIPPED_MODELS:
        return SHIPPED_MODELS[name]
    path = Path(name)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{arg} {name!r} {what}: give a checkpoint file (.safetensors) or a shipped model "
                         f"({', '.join(SHIPPED_MODELS)})")
    return path


def model_classes(model) -> tuple[int, list[str]]:
    """``(K, class names)`` of a class-conditional model, for ``--class``; raise for another model."""
    from .adapters import ModelAdapter

    k = ModelAdapter(model).num_classes
    if k is None:
        raise ValueError("--class: this model is not class-conditional (trained without --class-cond)")
    return k, list(getattr(model, "class_names", None) or [str(c) for c in range(k)])


def class_label(model, text: str | None, guidance: float | None, allow_all: bool = False) -> int | None:
    """``--class`` as one class index of ``model`` (an index or a class name), None without it; ``--guidance``
    needs it.  (``all``, one row per class, is ``fastddpm sample``'s: ``allow_all`` names it in the errors.)"""
    if text is None:
        if guidance is not None:
            toward = "the class to guide toward, or 'all'" if allow_all else "the class to guide toward"
            raise ValueError(f"--guidance needs --class ({toward})")
        return None
    k, names = model_classes(model)
    try:
        label = int(text)
    except ValueError:
        if text not in names:
            forms = (f"a class index in [0, {k - 1}], a class name ({', '.join(names)}) or 'all'" if allow_all else
                     f"a class index in [0, {k - 1}] or a class name ({', '.join(names)})")
            raise ValueError(f"--class must be {forms}, got {text!r}") from None
        label = names.index(text)
    if not 0 <= label < k:
        raise ValueError(f"--class must lie in [0, {k - 1}] (the model's {k} classes), got {label}")
    return label
