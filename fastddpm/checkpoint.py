"""Checkpoints: one self-contained ``.safetensors`` file, never pickled.

Layout of a checkpoint file:

* tensors ``model.<name>`` (the model's state dict), ``ema.<name>`` (the EMA
  model's), ``optim.<i>.<key>`` (optimizer state of parameter ``i``),
  ``rng.torch_cpu`` (``torch.get_rng_state()``) and ``rng.cuda.<k>`` (each
  CUDA device's generator state, when CUDA is initialised);
* the JSON state in the safetensors header metadata under the key
  ``fastddpm``: ``format_version``, ``model_config`` (a ``UNetConfig`` dict),
  ``diffusion`` (``DDPM.to_dict()``), ``train_config``, ``step``, the data
  position, the optimizer's ``param_groups``, the best metric, versions and a
  timestamp (whatever the trainer passes as ``state``); for a class-conditional
  model ``class_names`` (the model's ``class_names`` attribute: one string per
  class; ``num_classes`` is in ``model_config``) and, for a diffusers
  ``UNet2DModel`` trained by fastddpm, ``fastddpm_null_class``.

A sidecar ``<name>.json`` holds the same JSON for people to read; loading
reads only the ``.safetensors`` file.  Both are written atomically (temp file
in the same directory, fsync, ``os.replace``), so a crash mid-write leaves the
previous file, never a truncated one, under the final name.
"""
from __future__ import annotations

import datetime
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checks import is_int
from .files import atomic_write, write_text_atomic
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "load_model",
    "save_model",
    "load_weights",
    "check_model_config",
    "model_config_dict",
    "class_metadata",
]

FORMAT_VERSION = 1
METADATA_KEY = "fastddpm"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_SHOW = 5  # how many offending names an error lists


# -- the file in memory --------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (CPU) and its JSON metadata.

    :param path: where it was read from.
    :param tensors: every tensor, by its full name (``model.conv_in.weight``, ...).
    :param metadata: the ``fastddpm`` JSON state.
    """

    path: Path
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named ``<prefix>.<rest>``, keyed by ``<rest>``."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def has(self, prefix: str) -> bool:
        p = prefix + "."
        return any(k.startswith(p) for k in self.tensors)

    def optimizer_state_dict(self) -> dict:
        """The optimizer's ``state_dict()`` as saved (tensors from ``optim.*``, groups from the metadata)."""
        opt = self.metadata.get("optimizer")
        if opt is None:
            raise ValueError(f"checkpoint {str(self.path)!r} holds no optimizer state")
        state: dict[int, dict] = {}
        for name, tensor in self.section("optim").items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
        for index, scalars in opt.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(scalars)
        groups = []
        for g in opt["param_groups"]:
            g = dict(g)
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def restore_rng(self) -> None:
        """Set torch's global CPU (and CUDA, where saved and present) generators to the saved states."""
        if "rng.torch_cpu" in self.tensors:
            torch.set_rng_state(self.tensors["rng.torch_cpu"])
        cuda = self.section("rng.cuda")
        if cuda and torch.cuda.is_available():
            for k, state in cuda.items():
                if int(k) < torch.cuda.device_count():
                    torch.cuda.set_rng_state(state, int(k))


# -- writing -------------------------------------------------------------------------------
def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write a safetensors file at ``path`` (the temp file; a seam for tests)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _jsonable(value):
    """Optimizer hyper-parameters as JSON values (tensors become floats)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _state_of(module_or_state) -> dict[str, torch.Tensor]:
    if isinstance(module_or_state, nn.Module):
        return module_or_state.state_dict()
    if isinstance(module_or_state, dict):
        return module_or_state
    raise TypeError(f"expected an nn.Module or a state dict, got {type(module_or_state).__name__}")


def model_config_dict(model) -> dict | None:
    """``model.config.to_dict()``: the model's config as checkpoints and a run's ``config.json`` record it
    (None for a model without one)."""
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def class_metadata(model) -> dict:
    """What a checkpoint records of a class-conditional model: its ``class_names`` (one string per
    class) and a diffusers model's ``fastddpm_null_class``, where the model has them."""
    meta = {}
    names = getattr(model, "class_names", None)
    if names is not None:
        meta["class_names"] = [str(c) for c in names]
    null = getattr(model, "fastddpm_null_class", None)
    if is_int(null):
        meta["fastddpm_null_class"] = int(null)
    return meta


def _versions() -> dict:
    try:
        import safetensors

        st = safetensors.__version__
    except Exception:  # pragma: no cover
        st = None
    return {"fastddpm": __version__, "torch": torch.__version__, "safetensors": st}


def _save(path, tensors: dict[str, torch.Tensor], meta: dict, sidecar: bool) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path {str(path)!r} must end in .safetensors")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {str(path)!r}: directory {str(path.parent)!r} does not exist")
    meta = {"format": "fastddpm.checkpoint", "format_version": FORMAT_VERSION, **meta,
            "versions": _versions(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(meta, sort_keys=True, allow_nan=True)
    atomic_write(path, lambda tmp: _write_safetensors(tensors, {METADATA_KEY: text}, tmp))
    if sidecar:
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, allow_nan=True) + "\n")
    return path


def save_checkpoint(path, *, model: nn.Module, ema=None, optimizer: torch.optim.Optimizer | None = None,
                    state: dict, rng: bool = True, sidecar: bool = True) -> Path:
    """Write a resumable checkpoint (atomically) and its ``.json`` sidecar.

    :param path: the ``.safetensors`` file to write.
    :param model: the trained model (``model.*`` tensors; ``model.config`` gives ``model_config``).
    :param ema: the EMA model or its state dict (``ema.*``), or None.
    :param optimizer: its state goes to ``optim.<i>.<key>`` and its param_groups to the metadata.
    :param state: JSON-able trainer state (``diffusion``, ``train_config``, ``step``, ...).
    :param rng: save torch's global RNG states (``rng.*``), as of now.
    :return: the path written.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    tensors = {f"model.{k}": _cpu(v) for k, v in _state_of(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": _cpu(v) for k, v in _state_of(ema).items()})
    meta = {"model_config": model_config_dict(model), **class_metadata(model), **state}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for index, entries in sd["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = _cpu(value)
                else:
                    scalars.setdefault(str(index), {})[key] = _jsonable(value)
        meta["optimizer"] = {"type": type(optimizer).__name__, "param_groups": _jsonable(sd["param_groups"]),
                             "scalars": scalars}
    if rng:
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for k, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{k}"] = s
    return _save(path, tensors, meta, sidecar)


def save_model(path, model: nn.Module, process, ema_state=None, *, extra: dict | None = None,
               sidecar: bool = True) -> Path:
    """Write a weights-only release file: model config, diffusion process and weights (no optimizer).

    :param model: the model (its ``config`` must serialise, as fastddpm's ``UNet`` does).
    :param process: the ``DDPM`` it was trained with.
    :param ema_state: EMA weights (module or state dict) to ship beside the model's, or None.
    :param extra: more JSON to store (e.g. a description of the training run).
    """
    if model_config_dict(model) is None:
        raise TypeError(f"save_model needs a model with a serialisable .config (fastddpm UNet), "
                        f"got {type(model).__name__}")
    tensors = {f"model.{k}": _cpu(v) for k, v in _state_of(model).items()}
    if ema_state is not None:
        tensors.update({f"ema.{k}": _cpu(v) for k, v in _state_of(ema_state).items()})
    meta = {"model_config": model_config_dict(model), **class_metadata(model), "diffusion": process.to_dict(),
            "kind": "model", **(extra or {})}
    return _save(path, tensors, meta, sidecar)


# -- reading -------------------------------------------------------------------------------
def _read_header(path: Path) -> dict:
    """The safetensors JSON header, after checking the file is whole."""
    size = path.stat().st_size
    where = repr(str(path))
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{where} is not a fastddpm checkpoint: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            if 8 + n > size and n <= MAX_HEADER_BYTES:
                raise ValueError(f"{where} is truncated or corrupt: header says {n} bytes, file has {size - 8}")
            raise ValueError(f"{where} is not a fastddpm checkpoint (not a safetensors file: bad header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{where} is not a fastddpm checkpoint (its safetensors header nests too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not a fastddpm checkpoint (corrupt safetensors header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is not a fastddpm checkpoint (corrupt safetensors header)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{where} is corrupt: bad entry for tensor {name!r} in the header") from None
    if 8 + n + end > size:
        raise ValueError(f"{where} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header


def _metadata_of(path: Path, header: dict) -> dict:
    """The ``fastddpm`` JSON of a file's safetensors header, checked."""
    where = repr(str(path))
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where} is a safetensors file without fastddpm metadata (key {METADATA_KEY!r}); "
                         f"it was not written by fastddpm")
    try:
        metadata = json.loads(raw)
    except RecursionError:
        raise ValueError(f"{where} has corrupt fastddpm metadata (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} has corrupt fastddpm metadata: {e}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{where} has corrupt fastddpm metadata (not a JSON object)")
    version = metadata.get("format_version")
    if not is_int(version):
        raise ValueError(f"{where} has corrupt fastddpm metadata: no format_version")
    if version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{where} has checkpoint format version {version}; this fastddpm reads version "
                         f"{FORMAT_VERSION} (upgrade fastddpm to read it)")
    return metadata


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a fastddpm checkpoint (not a file)")
    return path


def read_metadata(path) -> dict:
    """The ``fastddpm`` JSON state of a checkpoint or release file, without reading its tensors.

    :raises FileNotFoundError, ValueError: as :func:`load_checkpoint`.
    """
    path = _existing_file(path)
    return _metadata_of(path, _read_header(path))


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint (or a release file) written by fastddpm.

    :raises FileNotFoundError: no such file.
    :raises ValueError: not a safetensors file, truncated or corrupt, no ``fastddpm``
        metadata, or a format version this fastddpm does not read.
    """
    path = _existing_file(path)
    where = repr(str(path))
    metadata = _metadata_of(path, _read_header(path))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and friends
        raise ValueError(f"{where} is corrupt: {e}") from None
    return Checkpoint(path=path, tensors=tensors, metadata=metadata)


def _listing(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], *, path="", what: str = "model",
                 check_only: bool = False) -> None:
    """``module.load_state_dict(state)`` after checking names, shapes and kinds of dtype (a float weight
    stored as an integer tensor would be cast silently), with an error that lists a few missing,
    unexpected and mis-shaped entries and names the file.

    :param check_only: check, do not load (``module`` may live on the meta device).
    """
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    common = sorted(set(expected) & set(state))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in common if tuple(state[k].shape) != tuple(expected[k].shape)]
    dtypes = [f"{k} {state[k].dtype} vs model {expected[k].dtype}" for k in common
              if expected[k].is_floating_point() and not state[k].is_floating_point()]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {_listing(shapes)}")
        if dtypes:
            parts.append(f"not floating point {len(dtypes)}: {_listing(dtypes)}")
        raise ValueError(f"{what} weights in {str(path)!r} do not match the model config: " + "; ".join(parts))
    if not check_only:
        module.load_state_dict(state)


def check_model_config(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Raise ValueError if the checkpoint's model config is not ``model``'s (resuming into another model)."""
    saved = checkpoint.metadata.get("model_config")
    mine = model_config_dict(model)
    if saved is None or mine is None:
        return
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {mine.get(k)!r}"
            for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    if diff:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} was saved from a different model config: "
                         + "; ".join(diff[:_SHOW]) + (f" (+{len(diff) - _SHOW} more)" if len(diff) > _SHOW else ""))


def load_model(path, *, ema: bool = True, device="cpu"):
    """The model and process stored in a checkpoint or release file.

    :param ema: load the EMA weights when the file has them (else the model's).
    :param device: where to put the model.
    :return: ``(UNet in eval mode, DDPM)``; the model's ``class_names`` attribute is the file's
        (a list of strings for a class-conditional model; None otherwise).
    """
    from .diffusion import DDPM
    from .models import create_model

    ckpt = load_checkpoint(path)
    where = repr(str(ckpt.path))
    config = ckpt.metadata.get("model_config")
    if config is None:
        raise ValueError(f"{where} has no model_config: it was saved from a model fastddpm cannot rebuild")
    if "diffusion" not in ckpt.metadata:
        raise ValueError(f"{where} has no diffusion process in its metadata")
    try:
        process = DDPM.from_dict(ckpt.metadata["diffusion"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where} has an invalid diffusion process: {e}") from None
    prefix = "ema" if ema and ckpt.has("ema") else "model"
    state = ckpt.section(prefix)
    # the declared config must fit the tensors in the file before anything is allocated: a crafted
    # model_config must not make us build a model far larger than the file (checked on the meta device)
    blocks = config.get("num_res_blocks", 0) * len(config.get("channel_mult") or ()) if isinstance(config, dict) else 0
    if not isinstance(blocks, int) or blocks > len(state):
        raise ValueError(f"{where}: its model_config declares {blocks} residual blocks but the file holds "
                         f"{len(state)} {prefix} tensors; the file is corrupt or crafted")
    try:
        with torch.device("meta"):
            skeleton = create_model(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} has an invalid model_config: {e}") from None
    load_weights(skeleton, state, path=ckpt.path, what=prefix, check_only=True)
    model = create_model(config)
    load_weights(model, state, path=ckpt.path, what=prefix)
    model.class_names = _class_names_of(ckpt, model)
    return model.to(device).eval(), process


def _class_names_of(ckpt: Checkpoint, model) -> list[str] | None:
    """The checkpoint's ``class_names`` (checked against the model's classes); a conditional model saved
    without them gets ``"0".."K-1"``."""
    names = ckpt.metadata.get("class_names")
    k = getattr(model, "num_classes", None)
    if names is None:
        return [str(c) for c in range(k)] if k is not None else None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise ValueError(f"{str(ckpt.path)!r} has corrupt class_names (not a list of strings): {names!r}")
    if len(names) != k:
        raise ValueError(f"{str(ckpt.path)!r} has {len(names)} class_names but its model has "
                         f"{'no classes' if k is None else f'{k} classes'}")
    return names
