"""Offline evaluation: Fréchet distance and precision/recall in a feature space.

The Fréchet distance (FD) between two sets of images is the distance between
Gaussians fitted to their features (Heusel et al. 2017, Eq. 6):

    FD = |mu_1 - mu_2|² + tr(S_1 + S_2 - 2 (S_1 S_2)^½)

With Inception-v3 pool features this is the standard FID.  Those weights are
not part of fastddpm and are never downloaded; for the ``digits`` dataset the
package ships a small classifier trained on digits itself
(``assets/digits_classifier.safetensors``, made by
``scripts/train_digits_classifier.py``) whose 64-d penultimate layer is the
feature space.  FD values in different feature spaces are not comparable.

Precision and recall are those of Kynkäänniemi et al. 2019: each set's
manifold is the union of balls around its points reaching the k-th nearest
neighbour; precision is the fraction of generated points inside the real
manifold, recall the fraction of real points inside the generated one.

    fastddpm eval --samples samples.npz --reference digits
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .data import to_float_images

__all__ = [
    "DIGITS_CLASSIFIER",
    "DigitsFeatureNet",
    "FeatureExtractor",
    "DigitsFeatures",
    "InceptionFeatures",
    "add_eval_parser",
    "cmd_eval",
    "digits_classifier_split",
    "evaluate",
    "feature_extractor",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "load_digits_classifier",
    "precision_recall",
]

DIGITS_CLASSIFIER = Path(__file__).parent / "assets" / "digits_classifier.safetensors"
METADATA_KEY = "fastddpm"
FEATURES = ("digits", "inception")
# the held-out split of digits_dataset() the shipped classifier is scored on
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# float images may overshoot [-1, 1] by this much (rounding); larger is an error
RANGE_SLACK = 1e-3
CDIST_CHUNK = 1024
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

    from .checkpoint import load_weights

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


# -- images in, validated ------------------------------------------------------------------------
def _as_float_images(images, name: str) -> torch.Tensor:
    """Float ``[n, C, H, W]`` in [-1, 1] (C = 1 or 3) from a float tensor of that
    form or a uint8 numpy array ``[n, H, W, C]``; errors name the argument."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"{name}: a numpy array must be uint8 [n, H, W, C] (as `fastddpm sample --out x.npz` "
                            f"writes), got dtype {images.dtype}; pass floats as a torch tensor [n, C, H, W] in [-1, 1]")
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: a uint8 array must be [n, H, W, C] with C = 1 or 3, got shape {images.shape}")
        return to_float_images(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [n, C, H, W] in [-1, 1] or a uint8 numpy array "
                        f"[n, H, W, C], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: a tensor must be [n, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name}: a tensor must be floating point in [-1, 1], got {images.dtype} "
                        f"(uint8 images go in as a numpy array [n, H, W, C])")
    x = images.detach().float().cpu()  # features are computed a batch at a time, moved to the device then
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise ValueError(f"{name} has {int((~finite).sum())} non-finite values (NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"{name} has values in [{lo:.4g}, {hi:.4g}]: expected images in [-1, 1]")
    return x.clamp(-1.0, 1.0)


def _check_count(n: int, name: str, at_least: int = 2) -> None:
    if n < at_least:
        raise ValueError(f"{name} holds {n} images: at least {at_least} are needed for a covariance")


def _statistics_of(features: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    n, dim = features.shape
    if n <= dim:
        warnings.warn(f"{name} holds {n} images for {dim}-d features: the covariance is rank-deficient and the "
                      f"Fréchet distance strongly biased; use more than {dim} (ideally thousands)", stacklevel=3)
    return feature_statistics(features)


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
        from .data import _convert_channels, _resize_center_crop

        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = _convert_channels(images[i:i + self.batch_size].float(), 1)
            x = _resize_center_crop(x.contiguous(), 16).to(self.device)
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


# -- the statistics ------------------------------------------------------------------------------
def _features_array(features, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be [n, dim], got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} has {int((~np.isfinite(f)).sum())} non-finite values")
    return f


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[dim]`` and covariance ``[dim, dim]`` (unbiased, float64) of ``[n, dim]`` features."""
    f = _features_array(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"features holds {f.shape[0]} samples: at least 2 are needed for a covariance")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``tr (S_1 S_2)^½`` is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``S_1^½ S_2 S_1^½`` (same spectrum as ``S_1 S_2``), so
    no non-symmetric matrix square root is taken; rounding's tiny negative
    eigenvalues are clamped to 0, and so is the result.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape} (expected [d] and [d, d])")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite values")
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).sum()
    return max(float(fd), 0.0)


def _kth_neighbour_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``f`` to its k-th nearest other row."""
    radii = []
    for i in range(0, f.shape[0], CDIST_CHUNK):
        d = torch.cdist(f[i:i + CDIST_CHUNK], f)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(radii)


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball ``|p - centre_j| <= radius_j``."""
    inside = 0
    for i in range(0, points.shape[0], CDIST_CHUNK):
        d = torch.cdist(points[i:i + CDIST_CHUNK], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(feats_real, feats_fake, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    :param feats_real: ``[n, dim]`` features of real images.
    :param feats_fake: ``[m, dim]`` features of generated images.
    :param k: the neighbour whose distance sets each ball's radius (the paper's 3).
    :return: ``{"precision": fake in real manifold, "recall": real in fake manifold}``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    real = torch.from_numpy(_features_array(feats_real, "feats_real"))
    fake = torch.from_numpy(_features_array(feats_fake, "feats_fake"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feats_real has dim {real.shape[1]}, feats_fake has dim {fake.shape[1]}")
    for name, f in (("feats_real", real), ("feats_fake", fake)):
        if f.shape[0] <= k:
            raise ValueError(f"{name} holds {f.shape[0]} points: more than k={k} are needed")
    return {"precision": _inside_fraction(fake, real, _kth_neighbour_radii(real, k)),
            "recall": _inside_fraction(real, fake, _kth_neighbour_radii(fake, k))}


# -- the entry points ----------------------------------------------------------------------------
def fid(images_a, images_b, *, feature: str = "digits", batch_size: int = 256, device=None,
        inception_weights=None) -> float:
    """Fréchet distance between two sets of images in a feature space.

    :param images_a, images_b: float tensors ``[n, C, H, W]`` in [-1, 1] or uint8 numpy ``[n, H, W, C]``
        (C = 1 or 3), at least 2 images each (and for a full-rank covariance, more than the feature dim).
    :param feature: ``"digits"`` (the shipped classifier, 64-d) or ``"inception"`` (standard FID).
    :param inception_weights: local ``pt_inception-2015-12-05-*.pth``; default: torch hub's cache.
    """
    a, b = _as_float_images(images_a, "images_a"), _as_float_images(images_b, "images_b")
    _check_count(a.shape[0], "images_a")
    _check_count(b.shape[0], "images_b")
    net = feature_extractor(feature, inception_weights=inception_weights, device=device, batch_size=batch_size)
    return frechet_distance(*_statistics_of(net(a), "images_a"), *_statistics_of(net(b), "images_b"))


def _reference_images(reference, n_reference, seed: int) -> torch.Tensor:
    if isinstance(reference, str) and reference == "digits":
        from .data import digits_dataset

        x = digits_dataset(16).images
    elif isinstance(reference, (str, os.PathLike)):
        from .data import ArrayDataset

        x = ArrayDataset(reference).float_images()
    else:
        x = _as_float_images(reference, "reference")
    if n_reference is not None:
        if isinstance(n_reference, bool) or not isinstance(n_reference, int) or n_reference < 2:
            raise ValueError(f"n_reference must be an int >= 2, got {n_reference!r}")
        if n_reference < x.shape[0]:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:n_reference].sort().values]
    return x


def evaluate(images, reference="digits", n_reference: int | None = None, *, feature: str = "digits",
             k: int = 3, batch_size: int = 256, device=None, inception_weights=None, seed: int = 0) -> dict:
    """Score generated images against a reference set.

    :param images: generated images (float tensor ``[n, C, H, W]`` in [-1, 1] or uint8 numpy ``[n, H, W, C]``).
    :param reference: ``"digits"`` (all 1797 of ``digits_dataset(16)``), a ``.npy``/``.npz`` file, or images.
    :param n_reference: use a random subset (``seed``) of this many reference images.
    :return: ``{"fd", "precision", "recall", "n", "n_reference", "feature", "k"}``.
    """
    x = _as_float_images(images, "images")
    _check_count(x.shape[0], "images", at_least=max(2, k + 1))
    ref = _reference_images(reference, n_reference, seed)
    _check_count(ref.shape[0], "reference", at_least=max(2, k + 1))
    net = feature_extractor(feature, inception_weights=inception_weights, device=device, batch_size=batch_size)
    fake, real = net(x), net(ref)
    pr = precision_recall(real, fake, k=k)
    return {"fd": frechet_distance(*_statistics_of(real, "reference"), *_statistics_of(fake, "images")),
            "precision": pr["precision"], "recall": pr["recall"], "n": int(x.shape[0]),
            "n_reference": int(ref.shape[0]), "feature": feature, "k": k}


# -- command line --------------------------------------------------------------------------------
def _load_samples(path: str) -> torch.Tensor:
    from .data import ArrayDataset

    p = Path(path)
    if p.suffix.lower() not in (".npz", ".npy"):
        raise ValueError(f"--samples must be a .npz or .npy array (write one with `fastddpm sample --out x.npz`); "
                         f"got {str(p)!r}" + (" (PNG grids are not supported)" if p.suffix.lower() == ".png" else ""))
    return ArrayDataset(p).float_images()


def cmd_eval(args) -> int:
    """``fastddpm eval``: print the metrics of ``--samples`` against ``--reference`` as JSON."""
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
    from .cli_args import int_in

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
