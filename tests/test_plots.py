"""The PIL plots: line charts and the noise schedules' panels."""
import numpy as np
import pytest
import torch
from PIL import Image

import fastddpm.images
from fastddpm.plots import plot_lines, plot_schedule
from fastddpm.schedule import NoiseSchedule


def test_images_re_exports_the_plots():
    """``fastddpm.images`` named the plots before ``fastddpm.plots`` held them."""
    assert fastddpm.images.plot_lines is plot_lines and fastddpm.images.plot_schedule is plot_schedule


def _assert_plot(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        arr = np.asarray(im.convert("RGB")).astype(int)
    colored = (np.abs(arr[..., 0] - arr[..., 2]) > 60).sum()  # pixels of the coloured lines
    dark = (arr.sum(-1) < 200).sum()  # axes, ticks and text
    assert path.stat().st_size > 3000
    return colored, dark


def test_plot_lines(tmp_path):
    steps = np.arange(0, 2000, 10)
    loss = 1.0 / (1.0 + steps / 100.0)
    loss[50:55] = np.nan
    path = plot_lines({"train": (steps, loss), "val": (torch.tensor([0.0, 1000.0]), [1.0, 0.1])},
                      tmp_path / "p" / "loss.png", title="loss", xlabel="step", ylabel="loss", logy=True)
    colored, dark = _assert_plot(path, (640, 400))
    assert colored > 500 and dark > 500
    # ys only, a single point, an empty series, all-NaN: drawn without error
    path = plot_lines({"a": [3.0, 1.0, 2.0], "one": ([5], [2.0]), "none": ([], []), "nan": ([0, 1], [np.nan] * 2)},
                      tmp_path / "misc.png", size=(300, 200))
    _assert_plot(path, (300, 200))
    # log axis with non-positive values skips them; constant series and no series at all
    _assert_plot(plot_lines({"z": ([0, 1, 2], [0.0, -1.0, 1e-3])}, tmp_path / "logz.png", logy=True), (640, 400))
    _assert_plot(plot_lines({"c": ([1, 2], [4.0, 4.0])}, tmp_path / "const.png"), (640, 400))
    _assert_plot(plot_lines({}, tmp_path / "empty.png", title="nothing"), (640, 400))
    with pytest.raises(ValueError, match="series 'bad' has 3 x values and 2 y values"):
        plot_lines({"bad": ([1, 2, 3], [1, 2])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"size must be at least \(100, 80\)"):
        plot_lines({}, tmp_path / "tiny.png", size=(50, 50))


def test_plot_schedule(tmp_path):
    one = plot_schedule(NoiseSchedule.make("cosine", 1000), tmp_path / "cosine.png")
    colored, _ = _assert_plot(one, (960, 360))
    assert colored > 300
    many = {k: NoiseSchedule.make(k, 1000) for k in ("linear", "cosine", "sigmoid")}
    many["linear, 50 steps"] = many["linear"].respace(50)
    _assert_plot(plot_schedule(many, tmp_path / "all.png", size=(400, 300)), (800, 300))
    with pytest.raises(ValueError, match="schedules must be a NoiseSchedule or a non-empty"):
        plot_schedule({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"schedules\['x'\] must be a NoiseSchedule"):
        plot_schedule({"x": [0.1, 0.2]}, tmp_path / "x.png")
