"""A run's output folder: claimed (a fastddpm run or empty, locked, created, writable, with room for the
checkpoints it keeps, cleared of interrupted writes) and its ``config.json`` written.

What a trainer writes there::

    config.json                          model config, diffusion, train config
    checkpoints/step_0001000.safetensors (+ .json)   the last ``keep_last``
    checkpoints/best.safetensors         lowest val loss (or smoothed train loss)
    metrics.jsonl, metrics.csv           step, loss, lr, grad_norm, val_loss, ...
    loss.png                             the loss curve
    samples/step_0001000.png             EMA samples every ``sample_every`` steps
    .fastddpm.lock                       held by the process writing the run (``run_dir.RunDirLock``)

A folder that holds anything else and no fastddpm ``config.json`` is refused, not written into.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import model_config_dict
from ..diffusion import DDPM
from ..files import remove_stale_temp_files, write_text_atomic
from ..run_dir import RunDirLock, check_is_run_dir
from ..train_config import TrainConfig
from ..version import __version__

__all__ = ["claim_out_dir", "prepare_out_dir", "write_run_config"]


def prepare_out_dir(out_dir: Path, keep_last: int, keep_best: bool, checkpoint_bytes: int) -> None:
    """Create ``out_dir/checkpoints`` and check that ``out_dir`` is writable and has room for ``keep_last``
    step checkpoints, ``best.safetensors`` (``keep_best``) and one being written, each ``checkpoint_bytes``.

    :raises OSError: naming the folder, when it cannot be written or the disk is too full.
    """
    where = repr(str(out_dir))
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".fastddpm_write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"out_dir {where} cannot be created or written to: {e.strerror or e}") from e
    free = shutil.disk_usage(out_dir).free
    # the kept step checkpoints, best.safetensors and the one being written
    count = keep_last + int(keep_best) + 1
    one = checkpoint_bytes
    if free < count * one:
        raise OSError(f"out_dir {where} has {free / 2**20:.1f} MiB free; checkpoints need about "
                      f"{count * one / 2**20:.1f} MiB ({count} checkpoints of {one / 2**20:.1f} MiB: keep_last="
                      f"{keep_last}, best, one being written)")


def write_run_config(out_dir: Path, model: nn.Module, process: DDPM, config: TrainConfig, *, precision: str,
                     device: torch.device, world_size: int) -> Path:
    """Write ``out_dir/config.json`` (atomically): the model's config (``checkpoint.model_config_dict``:
    ``model.config.to_dict()``, None for a model without one), the diffusion, the train config, what the run
    resolved (precision, device, world size) and the versions of fastddpm and torch.

    :return: the file's path.
    """
    d = {"model_config": model_config_dict(model),
         "diffusion": process.to_dict(), "train_config": config.to_dict(),
         "precision": precision, "device": str(device), "world_size": world_size,
         "fastddpm_version": __version__,
         "torch_version": torch.__version__}
    path = Path(out_dir) / "config.json"
    write_text_atomic(path, json.dumps(d, indent=2, sort_keys=True) + "\n")
    return path


def claim_out_dir(out_dir: Path, lock: RunDirLock, keep_last: int, keep_best: bool, checkpoint_bytes: int) -> None:
    """Make ``out_dir`` the run's (rank 0, before anything is written there): refuse a folder that is not a
    fastddpm run (``run_dir.check_is_run_dir``), ready it (``prepare_out_dir``), take ``lock`` (the caller
    releases it) and remove the temporary files of writes a kill cut short, which only the lock's holder may.

    :raises RunDirInUseError: another trainer holds the lock.
    """
    check_is_run_dir(out_dir)
    prepare_out_dir(out_dir, keep_last, keep_best, checkpoint_bytes)
    lock.acquire()
    for folder in (out_dir, out_dir / "checkpoints", out_dir / "samples"):
        remove_stale_temp_files(folder)
