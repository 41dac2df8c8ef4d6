"""Offline evaluation: Fréchet distance and precision/recall in a feature space.

``features`` (the feature networks), ``statistics`` (FD, precision/recall of feature sets) and
``scores`` (``fid``, ``evaluate`` on images); the ``eval`` command is in ``fastddpm.cli_tools``.

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
from .features import (DIGITS_CLASSIFIER, FEATURES, DigitsFeatureNet, DigitsFeatures, FeatureExtractor,
                       InceptionFeatures, digits_classifier_split, feature_extractor, load_digits_classifier)
from .scores import evaluate, fid
from .statistics import feature_statistics, frechet_distance, precision_recall

__all__ = [
    "DIGITS_CLASSIFIER",
    "FEATURES",
    "DigitsFeatureNet",
    "FeatureExtractor",
    "DigitsFeatures",
    "InceptionFeatures",
    "digits_classifier_split",
    "evaluate",
    "feature_extractor",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "load_digits_classifier",
    "precision_recall",
]
