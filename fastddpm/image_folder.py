"""Image folders as a dataset: every image file under a folder, square-cropped.

Files are found recursively in sorted order (hidden ones skipped, symlinked folders followed
once), decoded with PIL (imported when a dataset is built, not with this module) and returned as
float32 ``[C, H, W]`` in ``[-1, 1]``.

Class labels follow torchvision's ``ImageFolder``: when every image lies in an immediate subfolder
of the root (``root/cat/x.png``, ``root/dog/a/y.png``), each subfolder is a class, the sorted names
giving the indices; with images directly in the root there are no labels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_tensors import PIL_MODES, check_channels, check_image_size, to_float_images

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _find_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by relative path.
    Hidden files and folders (name starting with '.') are skipped, so are files that are not regular
    files (a FIFO would block the read forever); symlinked folders are followed once each (a link
    loop would list the same images again and again)."""
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _classes_of(root: Path, paths: list[Path]) -> tuple[list[str] | None, torch.Tensor | None]:
    """``(class names, labels)`` by immediate subfolder (torchvision's ``ImageFolder``: sorted names);
    ``(None, None)`` when some image lies directly in ``root``."""
    tops = [p.relative_to(root).parts for p in paths]
    if any(len(parts) < 2 for parts in tops):
        return None, None
    names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([index[parts[0]] for parts in tops], dtype=torch.int64)


def _convert_mode(im, mode: str):
    """``im.convert(mode)``, except that 16/32-bit integer gray images are
    scaled to 8 bits (PIL's own conversion clips them at 255)."""
    from PIL import Image

    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        im = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return im.convert(mode)


class ImageFolderDataset(Dataset):
    """Every image under a folder (recursively), square-cropped.

    Each image is converted to gray (``L``) or RGB, resized so its shorter side
    is ``image_size`` (PIL bicubic, antialiased), and centre-cropped to
    ``image_size x image_size``.

    :param root: the folder; nested folders are searched, in sorted order.  ``class_names`` and
        ``labels`` are its immediate subfolders' (None when images lie in the root itself).
    :param image_size: side of the square output.
    :param channels: 1 (gray) or 3 (RGB).
    :param cache: keep decoded tensors in memory after the first load.
    :param verify: open every file with PIL's ``verify()`` at construction, so a
        corrupt file is reported before training starts (a file that passes
        ``verify()`` but fails to decode is still reported, by name, when loaded).
    """

    def __init__(self, root, image_size: int, channels: int = 3, cache: bool = True, verify: bool = True):
        from PIL import Image

        self.root = Path(root)
        self.image_size = check_image_size(image_size)
        check_channels(channels)
        self.channels = channels
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"{str(self.root)!r} is not a folder")
        self.paths = _find_images(self.root)
        if not self.paths:
            raise ValueError(
                f"no images found in {str(self.root)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                f"any case)"
            )
        self.class_names, self.labels = _classes_of(self.root, self.paths)
        if verify:
            for path in self.paths:
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:
                    raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image, ImageOps

        size = self.image_size
        try:
            with Image.open(path) as im:
                im = _convert_mode(ImageOps.exif_transpose(im), PIL_MODES[self.channels])
                w, h = im.size
                s = size / min(w, h)
                new_w, new_h = max(size, round(w * s)), max(size, round(h * s))
                if (new_w, new_h) != (w, h):
                    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
                left, top = (new_w - size) // 2, (new_h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
        arr = arr.reshape(size, size, self.channels)
        return to_float_images(torch.from_numpy(arr.copy()).permute(2, 0, 1))

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        x = self._cache.get(index)
        if x is None:
            x = self._load(self.paths[index])
            if self.cache:
                self._cache[index] = x
        return x.clone() if self.cache else x

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, image_size={self.image_size}, "
                f"channels={self.channels})")
