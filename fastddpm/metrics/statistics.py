"""Statistics of feature sets: the Fréchet distance between the Gaussians fitted to two sets
(Heusel et al. 2017, Eq. 6) and k-NN precision and recall (Kynkäänniemi et al. 2019)."""
from __future__ import annotations

import numpy as np
import torch

from ..checks import is_int

__all__ = ["feature_statistics", "frechet_distance", "precision_recall"]

CDIST_CHUNK = 1024


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
    if not is_int(k) or k < 1:
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
