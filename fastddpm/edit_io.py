"""Files in and out of the editing commands (``fastddpm inpaint``, ``img2img``, ``invert``).

* ``load_images``: one PNG/JPEG (or any format of ``image_folder.IMAGE_EXTENSIONS``), or a folder of
  them (its own files, sorted by name) as one batch: float32 ``[n, C, H, W]`` in [-1, 1] with the
  model's channels (gray repeated to RGB, RGB to luma; ``image_tensors.convert_channels``).  Each file
  must have the model's size, or be resized (``resize=True``: shorter side, centre crop); never silently.
* ``load_masks``: one mask for every image or a folder holding a mask of each image's name, read as
  gray in [0, 1] and binarised at 0.5 as diffusers' RePaint pipeline does: 1 (white) = keep,
  0 (black) = fill.
* ``output_paths`` / ``save_images``: one PNG for one image file, a folder of PNGs of the same names
  for a folder; ``save_noise``: a safetensors file of ``x_T`` and its metadata.

PIL is imported where a file is read or written, not with this module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cli_args import check_output
from .files import atomic_write, save_pil_atomic
from .image_folder import IMAGE_EXTENSIONS
from .image_tensors import PIL_MODES, convert_channels, resize_center_crop, to_float_images
from .images import to_uint8

__all__ = ["MASK_THRESHOLD", "NOISE_KEY", "find_inputs", "load_images", "load_masks", "output_paths",
           "save_images", "save_noise", "load_noise"]

MASK_THRESHOLD = 0.5  # diffusers' RePaintPipeline: mask < 0.5 -> 0 (fill), >= 0.5 -> 1 (keep)
NOISE_KEY = "x_T"
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La")


def find_inputs(path, arg: str) -> tuple[list[Path], bool]:
    """``(files, is_folder)`` of an ``--image``/``--mask`` argument: the file itself, or the image files
    directly in a folder, sorted by name (hidden files skipped)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{arg} {str(path)!r}: the folder has no images ({' '.join(IMAGE_EXTENSIONS)})")
        return files, True
    if not path.exists():
        raise FileNotFoundError(f"{arg} {str(path)!r} does not exist")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{arg} {str(path)!r} is not an image file ({' '.join(IMAGE_EXTENSIONS)}) or a folder")
    return [path], False


def _read(path: Path, arg: str, gray: bool) -> torch.Tensor:
    """One file as uint8 ``[1, c, H, W]``: c = 1 for a gray file (or ``gray``), else 3 (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit gray: PIL's convert("L") clips at 255
                arr = np.asarray(im).astype(np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
                im = Image.fromarray(np.clip(np.round(arr / max(top, 1.0) * 255.0), 0, 255).astype(np.uint8), "L")
            mode = "L" if gray or im.mode in GRAY_MODES else "RGB"
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{arg} {str(path)!r}: cannot read the image ({e})") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)


def _sized(x: torch.Tensor, path: Path, arg: str, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """``x`` (float ``[1, c, h, w]``) at the model's ``size = (H, W)``: as it is, resized with ``resize``
    (shorter side, centre crop; a non-square model: stretched), or an error naming the file and both sizes."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if not resize:
        raise ValueError(f"{arg} {str(path)!r} is {w}x{h} pixels but the model takes {size[1]}x{size[0]}: "
                         f"give --resize to resize it (shorter side to the model's, centre crop), or resize it first")
    if size[0] == size[1]:
        return resize_center_crop(x, size[0])
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)


def load_images(path, channels: int, size: tuple[int, int], *, resize: bool = False,
                arg: str = "--image") -> tuple[torch.Tensor, list[Path], bool]:
    """``(images, files, is_folder)``: float32 ``[n, channels, H, W]`` in [-1, 1] of ``path`` (a file or a
    folder's files, sorted), each converted to ``channels`` and checked (or resized) to ``size``."""
    if channels not in PIL_MODES:
        raise ValueError(f"the model has {channels} channels; images can be given to models of 1 (gray) or 3 (RGB)")
    files, is_folder = find_inputs(path, arg)
    images = []
    for f in files:
        x = convert_channels(to_float_images(_read(f, arg, gray=False)), channels)
        images.append(_sized(x, f, arg, size, resize))
    return torch.cat(images).float().contiguous(), files, is_folder


def _mask_of(image: Path, masks: list[Path], folder, arg: str) -> Path:
    """The mask of ``image`` in a folder of ``masks``: the one of its file name, else the one of its stem."""
    for f in masks:
        if f.name == image.name:
            return f
    stems = [f for f in masks if f.stem == image.stem]
    if len(stems) == 1:
        return stems[0]
    found = f"several masks ({', '.join(f.name for f in stems)})" if stems else "no mask"
    raise ValueError(f"{arg} {str(folder)!r} has {found} for the image {str(image)!r}: a folder of masks needs one "
                     f"mask named as each image ({image.name!r}, or {image.stem!r} with another suffix)")


def load_masks(path, image_files: list[Path], size: tuple[int, int], *, resize: bool = False,
               arg: str = "--mask") -> torch.Tensor:
    """float32 ``[n, 1, H, W]`` of 0/1 (1 = keep, 0 = fill) for the ``n`` images: one mask file for all,
    or a folder with a mask of each image's file name (else of its name's stem: ``a.jpg`` takes ``a.png``).
    Read as gray in [0, 1] (resized first with ``resize``), then binarised: ``>= 0.5`` keeps."""
    files, is_folder = find_inputs(path, arg)
    if is_folder:
        files = [_mask_of(image, files, path, arg) for image in image_files]
    masks = []
    for f in files:
        m = _read(f, arg, gray=True).float() / 255.0
        m = _sized(m * 2 - 1, f, arg, size, resize).add(1).div(2)  # resized in [-1, 1] like an image
        masks.append((m >= MASK_THRESHOLD).float())
    mask = torch.cat(masks)
    return mask.expand(len(image_files), -1, -1, -1).contiguous() if not is_folder else mask


def output_paths(out, files: list[Path], is_folder: bool, arg: str = "--out",
                 suffixes: tuple[str, ...] = (".png",)) -> list[Path]:
    """Where each result goes, checked before any work: ``out`` itself for one image (a file ending in one
    of ``suffixes``), or ``out/<name>.png`` for the images of a folder (``out`` a folder, made if missing)."""
    out = Path(out)
    if not is_folder:
        return [check_output(out, arg, suffixes)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"{arg} {str(out)!r} is a file; for a folder of images give a folder (made if missing)")
    if not out.parent.is_dir():
        raise ValueError(f"{arg} {str(out)!r}: its folder {str(out.parent)!r} does not exist")
    paths = [out / (f.stem + ".png") for f in files]
    seen: dict[Path, Path] = {}
    for f, p in zip(files, paths):
        if p in seen:
            raise ValueError(f"{arg}: {str(seen[p])!r} and {str(f)!r} would both be written to {str(p)!r}")
        seen[p] = f
    return paths


def save_images(x: torch.Tensor, paths: list[Path]) -> None:
    """Image ``i`` of float ``[n, C, H, W]`` in [-1, 1] as a PNG at ``paths[i]`` (gray or RGB), atomically."""
    from PIL import Image

    arrays = to_uint8(x)
    for arr, path in zip(arrays, paths):
        image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode=PIL_MODES[arr.shape[-1]])
        save_pil_atomic(image, path, "PNG")


def save_noise(path, x_T: torch.Tensor, metadata: dict) -> Path:
    """``x_T`` (float32 ``[n, C, H, W]``) under the key ``"x_T"`` in a safetensors file, ``metadata`` (JSON
    values) as its string metadata, written atomically."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {NOISE_KEY: x_T.detach().float().cpu().contiguous()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_noise(path) -> tuple[torch.Tensor, dict]:
    """``(x_T, metadata)`` of a ``save_noise`` file (metadata values decoded from JSON where they are)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        if NOISE_KEY not in f.keys():
            raise ValueError(f"{str(path)!r} has no {NOISE_KEY!r} tensor: not a fastddpm invert file")
        x_T, raw = f.get_tensor(NOISE_KEY), f.metadata() or {}

    def decode(v):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    return x_T, {k: decode(v) for k, v in raw.items()}
