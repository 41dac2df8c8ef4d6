"""fastddpm.metrics: Fréchet distance, precision/recall, the shipped feature network, ``fastddpm eval``.

Measured with the shipped classifier (64-d features, tr Σ of all digits ≈ 2.8e3):
FD between two random halves of digits (898 / 899 images) is 13–33 over 20
splits (split seed 0: 27.4), precision/recall of halves 0.88–0.93; adding
Gaussian noise of σ = 0.25 / 0.5 / 1.0 to one half gives FD ≈ 53 / 260 / 1095
and precision ≈ 0.84 / 0.51 / 0.11.
"""
import argparse
import json

import numpy as np
import pytest
import torch

from fastddpm import cli_tools, metrics
from fastddpm.data import digits_dataset
from fastddpm.metrics import (DIGITS_CLASSIFIER, evaluate, feature_statistics, fid, frechet_distance,
                              precision_recall)
from tolerances import FP32, assert_close

# bounds of the measured values above, with margin
FD_HALVES_MAX = 60.0
PR_HALVES_MIN = 0.8
NOISE_SIGMAS = (0.0, 0.25, 0.5, 1.0)
CLASSIFIER_MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(16)


@pytest.fixture(scope="module")
def halves(digits):
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    half = len(digits) // 2
    return digits.images[perm[:half]], digits.images[perm[half:]]


@pytest.fixture(scope="module")
def noise_curve(halves, one_thread):
    """FD and precision/recall of half A against half B with noise of growing sigma."""
    a, b = halves
    net = metrics.feature_extractor("digits")
    fa = net(a)
    stats_a = feature_statistics(fa)
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for sigma in NOISE_SIGMAS:
        fb = net((b + sigma * noise).clamp(-1, 1))
        rows.append({"sigma": sigma, "fd": frechet_distance(*stats_a, *feature_statistics(fb)),
                     **precision_recall(fa, fb)})
    return rows


def _random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).numpy()


# -- frechet_distance ------------------------------------------------------------------------------
def test_identical_statistics_give_zero():
    sigma = _random_spd(32, 0)
    mu = np.linspace(-1, 1, 32)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))


def test_diagonal_gaussians_match_the_closed_form():
    # for diagonal covariances FD = |mu1 - mu2|² + sum_i (sqrt(a_i) - sqrt(b_i))²
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert_close(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, **FP32)
    # the same Gaussians in a rotated basis: the distance is unchanged
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert_close(got, expected, **FP32)


def test_general_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _random_spd(24, 1), _random_spd(24, 2)
    mu1, mu2 = np.zeros(24), np.full(24, 0.1)
    # pytorch-fid's formula
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert_close(frechet_distance(mu1, s1, mu2, s2), expected, **FP32)


def test_singular_covariances_are_fine():
    mu = np.ones(4)
    s2 = np.diag([1.0, 4.0, 0.0, 0.0])
    # a point mass against N(mu, s2): only the trace of s2 remains
    assert_close(frechet_distance(mu, np.zeros((4, 4)), mu, s2), 5.0, **FP32)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def test_feature_statistics():
    f = torch.randn(50, 6, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    assert_close(mu, f.mean(0), **FP32)
    assert_close(sigma, np.cov(f.numpy(), rowvar=False), **FP32)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])
    with pytest.raises(ValueError, match=r"\[n, dim\]"):
        feature_statistics(f[0])
    f[3, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        feature_statistics(f)


# -- on digits -------------------------------------------------------------------------------------
def test_fd_of_two_halves_is_small(noise_curve):
    assert noise_curve[0]["fd"] < FD_HALVES_MAX, noise_curve


def test_fd_grows_with_noise(noise_curve):
    fds = [row["fd"] for row in noise_curve]
    assert all(x < y for x, y in zip(fds, fds[1:])), noise_curve
    assert fds[-1] > 10 * FD_HALVES_MAX, noise_curve


def test_precision_recall_of_halves_and_noise(noise_curve):
    clean, _, half, heavy = noise_curve
    assert clean["precision"] > PR_HALVES_MIN and clean["recall"] > PR_HALVES_MIN, noise_curve
    assert clean["precision"] > half["precision"] > heavy["precision"], noise_curve
    assert clean["recall"] > half["recall"] > heavy["recall"], noise_curve
    assert heavy["precision"] < 0.3 and heavy["recall"] < 0.3, noise_curve


def test_fid_takes_tensors_and_uint8_arrays(halves):
    a, b = halves[0][:300], halves[1][:300]
    from_floats = fid(a, b)
    as_uint8 = [((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for x in (a, b)]
    assert from_floats < FD_HALVES_MAX * 3
    # 8-bit rounding moves the features only a little
    assert fid(*as_uint8) == pytest.approx(from_floats, rel=0.05)
    # RGB and other sizes are converted to 16x16 gray: a 3-channel 32x32 copy scores about the same
    big = torch.nn.functional.interpolate(b, size=32, mode="bilinear").expand(-1, 3, -1, -1)
    assert fid(a, big) < FD_HALVES_MAX * 3


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(torch.randn(10, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="dim"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 5))


# -- the shipped classifier ------------------------------------------------------------------------
def test_the_shipped_classifier_classifies_the_test_split(digits):
    net = metrics.load_digits_classifier()
    train, test = metrics.digits_classifier_split(len(digits))
    assert len(train) + len(test) == len(digits) and not set(train.tolist()) & set(test.tolist())
    with torch.no_grad():
        pred = net(digits.images[test]).argmax(1)
    accuracy = float((pred == digits.labels[test]).double().mean())
    assert accuracy >= CLASSIFIER_MIN_ACCURACY, accuracy
    assert net.features(digits.images[:5]).shape == (5, 64)


def test_the_shipped_classifier_file():
    assert DIGITS_CLASSIFIER.stat().st_size < 2**20
    meta = json.loads(DIGITS_CLASSIFIER.with_suffix(".json").read_text())
    assert meta["architecture"]["config"]["feature_dim"] == 64
    assert meta["accuracy"]["test"] >= 0.97
    assert "train_digits_classifier.py" in meta["command"]
    with open(DIGITS_CLASSIFIER, "rb") as f:  # a safetensors file: 8-byte length, then a JSON header
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["fastddpm"]


# -- input validation ------------------------------------------------------------------------------
GOOD = torch.zeros(4, 1, 16, 16)


@pytest.mark.parametrize("bad, error, message", [
    (torch.zeros(4, 16, 16), ValueError, r"images_b: a tensor must be \[n, C, H, W\]"),
    (torch.zeros(4, 2, 16, 16), ValueError, "C = 1 or 3"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.int64), TypeError, "images_b: a tensor must be floating point"),
    (np.zeros((4, 16, 16, 1), np.float32), TypeError, "images_b: a numpy array must be uint8"),
    (np.zeros((4, 1, 16, 16), np.uint8), ValueError, r"images_b: a uint8 array must be \[n, H, W, C\]"),
    (torch.full((4, 1, 16, 16), float("nan")), ValueError, "images_b has 1024 non-finite"),
    (torch.full((4, 1, 16, 16), 2.0), ValueError, r"images_b has values in \[2, 2\]"),
    (torch.zeros(1, 1, 16, 16), ValueError, "images_b holds 1 images: at least 2"),
    (torch.zeros(0, 1, 16, 16), ValueError, "images_b is empty"),
    ([[0.0]], TypeError, "images_b: expected a float tensor"),
])
def test_bad_images_raise_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        fid(GOOD, bad)


def test_unknown_feature():
    with pytest.raises(ValueError, match="feature must be one of"):
        fid(GOOD, GOOD, feature="clip")


# -- inception -------------------------------------------------------------------------------------
def test_inception_without_weights_says_where_it_looked(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_fid")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        fid(GOOD, GOOD, feature="inception")
    text = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-*.pth") in text
    assert "never downloads" in text and "--inception-weights" in text
    with pytest.raises(FileNotFoundError, match="not found"):
        fid(GOOD, GOOD, feature="inception", inception_weights=tmp_path / "missing.pth")


def test_inception_weights_of_the_wrong_network(tmp_path):
    pytest.importorskip("pytorch_fid")
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        fid(GOOD, GOOD, feature="inception", inception_weights=path)


def test_inception_plumbing_with_random_weights(tmp_path, monkeypatch, one_thread):
    """The real weights cannot be fetched here: a randomly initialised network of
    the same architecture, found in torch hub's cache, checks loading and shapes."""
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    import torchvision

    with monkeypatch.context() as patch:  # build the architecture without its weights (and without the network)
        patch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None)
        state = fid_inception.fid_inception_v3().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "pt_inception-2015-12-05-00000000.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    extractor = metrics.feature_extractor("inception")
    assert extractor.path.parent == cache
    feats = extractor(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert feats.shape == (2, 2048) and bool(feats.isfinite().all())
    assert frechet_distance(*feature_statistics(feats), *feature_statistics(feats)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    """Same covariance, means apart by d: FD = |d|^2 (the trace terms cancel)."""
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    shift = torch.arange(8, dtype=torch.float64) / 4
    a, b = feature_statistics(feats), feature_statistics(feats + shift)
    assert frechet_distance(*a, *b) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)


# -- evaluate and the command line -----------------------------------------------------------------
def _eval_args(argv):
    parser = argparse.ArgumentParser(prog="fastddpm")
    cli_tools.add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_cmd_eval_prints_metrics(halves, tmp_path, capsys):
    samples = ((halves[0][:200] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    path = tmp_path / "samples.npz"
    np.savez(path, images=samples)
    args = _eval_args(["--samples", str(path), "--n-reference", "400", "--out", str(tmp_path / "m.json")])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert result["n"] == 200 and result["n_reference"] == 400 and result["feature"] == "digits"
    assert 0 <= result["fd"] < 3 * FD_HALVES_MAX
    assert result["precision"] > 0.7 and result["recall"] > 0.5


def test_cmd_eval_rejects_png(tmp_path):
    args = _eval_args(["--samples", str(tmp_path / "grid.png")])
    with pytest.raises(ValueError, match="PNG grids are not supported"):
        args.func(args)


def test_evaluate_against_noise_is_worse(halves):
    a, b = halves[0][:300], halves[1][:300]
    clean = evaluate(a, b)
    noisy = evaluate((a + 0.5 * torch.randn_like(a)).clamp(-1, 1), b)
    assert noisy["fd"] > clean["fd"] and noisy["precision"] < clean["precision"]
    with pytest.raises(ValueError, match="n_reference must be"):
        evaluate(a, "digits", n_reference=1)


def test_the_eval_command_spells_the_metrics_names():
    """``eval``'s --feature choices and --inception-weights help are the metrics' own names."""
    from fastddpm.metrics import features

    p = cli_tools.add_eval_parser(argparse.ArgumentParser().add_subparsers())
    actions = {a.dest: a for a in p._actions}
    assert tuple(actions["feature"].choices) == metrics.FEATURES
    assert features.INCEPTION_GLOB in actions["inception_weights"].help
