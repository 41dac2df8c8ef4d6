"""The feature spaces of the metrics: the shipped digits classifier (64-d) and, given its
weights on disk, the FID Inception-v3 (2048-d).  ``feature_extractor(name)`` returns either as a
callable from float images ``[n, C, H, W]`` in [-1, 1] to features ``[n, dim]``."""
from __future__ import annotations

import glob
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

__all__ = ["DIGITS_CLASSIFIER", "FEATURES", "DigitsFeatureNet", "FeatureExtractor", "DigitsFeatures",
           "InceptionFeatures", "digits_classifier_split", "feature_extractor", "load_digits_classifier"]

DIGITS_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"
METADATA_KEY = "fastddpm"
FEATURES = ("digits", "inception")
# the held-out split of digits_dataset() the shipped classifier is scored on
SPLIT_SEED = 0
TEST_FRACTION = 0.2
INCEPTION_GLOB = "pt_inception-2015-12-05-*.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")


# -- the shipped feature network -----------------------------------------------------------------
class DigitsFeatureNet(nn.Module):
    """A small CNN for ``[n, 1, 16, 16]`` images in [-1, 1]: three 3x3 conv
    layers (16x16 -> 8x8 -> 4x4), a ``feature_dim`` penultimate layer and a
    10-way head.  ``features`` are the activations the head reads."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``[n, 1, 16, 16]`` in [-1, 1]. :return: ``[n, feature_dim]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"DigitsFeatureNet takes [n, 1, 16, 16] images, got shape {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[n, num_classes]``."""
        return self.head(self.features(x))


def digits_classifier_split(n: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` indices into ``digits_dataset()``: the fixed split the
    shipped classifier was trained and scored on."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(n, generator=g)
    n_test = round(n * TEST_FRACTION)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata: not a fastddpm feature network")
    return json.loads(raw)


@lru_cache(maxsize=4)
def _load_classifier_cpu(path: str) -> DigitsFeatureNet:
    from safetensors.torch import load_file

    from ..checkpoint import load_weights

    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature network {path!r} not found (it ships with fastddpm; reinstall, or "
                                f"rebuild it with scripts/train_digits_classifier.py)")
    meta = _read_metadata(Path(path))
    net = DigitsFeatureNet(**meta["architecture"]["config"])
    load_weights(net, load_file(path), path=path, what="feature network")
    return net.eval().requires_grad_(False)


def _on_device(net: DigitsFeatureNet, device) -> DigitsFeatureNet:
    """``net`` itself on the CPU (it is cached: never moved), else a copy on ``device``."""
    if device is None or torch.device(device).type == "cpu":
        return net
    copy = DigitsFeatureNet(**net.config)
    copy.load_state_dict(net.state_dict())
    return copy.to(device).eval().requires_grad_(False)


def load_digits_classifier(path=None, device=None) -> DigitsFeatureNet:
    """The shipped digits classifier (eval mode, no gradients), read with safetensors only.

    :param path: another file written by ``scripts/train_digits_classifier.py``.
    :param device: where to put it (default: CPU).
    """
    return _on_device(_load_classifier_cpu(str(path or DIGITS_CLASSIFIER)), device)


# -- feature extractors --------------------------------------------------------------------------
class FeatureExtractor(Protocol):
    """Maps float images ``[n, C, H, W]`` in [-1, 1] to features ``[n, dim]``."""

    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class DigitsFeatures:
    """The shipped digits classifier's 64-d features; images are turned gray
    (luma) and resized to 16x16 (bilinear, antialiased, centre crop) first."""

    name = "digits"

    def __init__(self, device=None, batch_size: int = 256, path=None):
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.net = load_digits_classifier(path, self.device)
        self.dim = self.net.config["feature_dim"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from ..image_tensors import convert_channels, resize_center_crop

        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = convert_channels(images[i:i + self.batch_size].float(), 1)
            x = resize_center_crop(x.contiguous(), 16).to(self.device)
            out.append(self.net.features(x).double().cpu())
        return torch.cat(out)


def _inception_weights(path=None) -> Path:
    """The FID Inception weights: ``path``, else the newest file of torch hub's cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {str(p)!r} not found")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(glob.glob(str(cache / INCEPTION_GLOB)))
    if not found:
        raise FileNotFoundError(
            f"feature='inception' needs the FID Inception weights, and fastddpm never downloads them. "
            f"Looked for {str(cache / INCEPTION_GLOB)!r} (torch hub's cache; set TORCH_HOME to move it) and found "
            f"nothing. Provide them with inception_weights=PATH (CLI: --inception-weights PATH), or put "
            f"pytorch-fid's file there: download {INCEPTION_URL} on a connected machine, or run pytorch-fid once "
            f"there and copy {INCEPTION_GLOB} from its torch hub cache. Without them, use feature='digits'."
        )
    return Path(found[-1])


class InceptionFeatures:
    """Standard FID features: pytorch-fid's ``InceptionV3`` pool3 (2048-d) with
    weights read from a local file (``torch.load(weights_only=True)``).  Images
    are quantised to 8 bits first, as when samples are saved and scored from
    files; gray is repeated to RGB; the network resizes to 299x299."""

    name = "inception"
    dim = 2048

    def __init__(self, weights=None, device=None, batch_size: int = 64):
        try:
            from pytorch_fid import inception as fid_inception
        except ImportError as e:
            raise ImportError("feature='inception' needs pytorch-fid (pip install pytorch-fid) and its weights "
                              "file; or use feature='digits'") from e
        path = _inception_weights(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read Inception weights {str(path)!r}: {e}") from None
        original = fid_inception.load_state_dict_from_url
        # pytorch-fid fetches its weights from a URL while building the model: hand it the local file instead
        fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[self.dim]])
        except RuntimeError as e:  # load_state_dict lists every missing key: keep the first lines
            detail = "\n".join(str(e).splitlines()[:2])[:300]
            raise ValueError(f"{str(path)!r} does not hold the FID Inception weights "
                             f"(pt_inception-2015-12-05-*.pth of pytorch-fid): {detail} ...") from None
        finally:
            fid_inception.load_state_dict_from_url = original
        self.path = path
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].float()
            x = ((x + 1.0) * 127.5).round() / 255.0  # 8-bit, [0, 1] as pytorch-fid reads files
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(self.model(x.to(self.device))[0].flatten(1).double().cpu())
        return torch.cat(out)


def feature_extractor(feature: str = "digits", *, inception_weights=None, device=None,
                      batch_size: int = 256) -> FeatureExtractor:
    """The named feature network.

    :param feature: ``"digits"`` (shipped, offline) or ``"inception"`` (standard FID; needs pytorch-fid and
        a local weights file).
    :param inception_weights: path to ``pt_inception-2015-12-05-*.pth``; default: torch hub's cache.
    :param device: default: CPU for ``digits`` (a tiny net), CUDA when available for ``inception``.
    """
    if feature == "digits":
        return DigitsFeatures(device=device, batch_size=batch_size)
    if feature == "inception":
        if device is None:  # a 2048-d Inception pass per image: worth a GPU when there is one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return InceptionFeatures(inception_weights, device=device, batch_size=min(batch_size, 64))
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
