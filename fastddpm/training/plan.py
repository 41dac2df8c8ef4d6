"""What a trainer runs with on its device (precision, layout) and why, one line a choice."""
from __future__ import annotations

import torch

__all__ = ["CPU_BF16_TRAIN_SPEED", "CPU_COMPILE_TRAIN", "resolve_channels_last", "resolve_precision", "training_reasons"]


def resolve_precision(mode: str, device: torch.device) -> str:
    """The precision ``"auto"`` stands for on ``device`` (bf16 on a GPU that runs it natively, else none)."""
    if mode != "auto":
        return mode
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def resolve_channels_last(requested: bool | None, device: torch.device, precision: str) -> bool:
    """The layout ``None`` (automatic) stands for: channels_last with mixed precision on a CUDA GPU only."""
    if requested is not None:
        return requested
    return device.type == "cuda" and precision != "no"


# Measured on a 2-core AVX-512 BF16 CPU (issue 15): bf16 autocast with channels_last weights trains at
# 0.58-0.95x the fp32 step, so a CPU never gets it automatically.
CPU_BF16_TRAIN_SPEED = "0.58-0.95x"
# torch.compile of the training step on the same CPU (digits "small" U-Net, batch 64, 1 thread, 20
# interleaved steps): 218 vs 227 ms per step, 1.04x, for a 53 s first compile, so it pays back after
# about 6000 steps.  It is not chosen automatically: when to compile would then depend on the
# machine's timing, and a compiled step's float32 rounding differs from the eager one's, so the same
# --seed would train different weights on different machines.
CPU_COMPILE_TRAIN = "1.04x the eager step after a ~53 s first compile (pays back after ~6000 steps)"


def training_reasons(config, device: torch.device, precision: str, channels_last: bool) -> tuple[str, ...]:
    """One line per training choice and why (``Trainer.explain()``), as ``Plan.explain()`` for sampling."""
    on_cuda = device.type == "cuda"
    lines = [f"device={device}"]
    if config.mixed_precision == "auto":
        why = ("this GPU runs bfloat16 natively" if precision == "bf16" else
               f"a CPU trains fastest in float32 (bf16 autocast measured {CPU_BF16_TRAIN_SPEED} the fp32 step)"
               if not on_cuda else "no native bfloat16 on this GPU")
        lines.append(f"mixed_precision={precision!r}: automatic; {why}")
    else:
        note = (f"; note: on a CPU bf16 training measured {CPU_BF16_TRAIN_SPEED} the fp32 step (slower)"
                if not on_cuda and precision in ("bf16", "fp16") else "")
        lines.append(f"mixed_precision={precision!r}: requested{note}")
    if config.channels_last is None:
        lines.append(f"channels_last={channels_last}: automatic; " + (
            "low-precision convolutions on a GPU are fastest in NHWC" if channels_last else
            "only with mixed precision on a CUDA GPU (on a CPU it does not pay)"))
    else:
        lines.append(f"channels_last={channels_last}: requested")
    if config.compile == "no":
        lines.append("compile='no': the default, not timed (a choice from timing would make what a --seed trains "
                     "depend on the machine's load); " + (
            f"on a CPU compiling measured {CPU_COMPILE_TRAIN} on the digits model: pass --compile default "
            "for longer runs" if not on_cuda else
            "compiling takes minutes for ddpm_cifar10: pass --compile default for long runs"))
    else:
        lines.append(f"compile={config.compile!r}: requested")
    lines.append(f"threads={torch.get_num_threads()}: torch's setting (fastddpm train --threads N to change it)"
                 if not on_cuda else f"threads={torch.get_num_threads()}: torch's CPU threads (data, host work)")
    return tuple(lines)
