"""uint8 conversion, grids, PNG/NPZ/GIF files and the forward-process strip."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm.images import (
    forward_process_strip,
    make_grid,
    save_gif,
    save_image_grid,
    save_images_npz,
    to_uint8,
)
from fastddpm.ops.reference import batch_noise
from fastddpm.schedule import NoiseSchedule


def _images(n=5, c=3, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


# -- to_uint8 -----------------------------------------------------------------------
def test_to_uint8_exact_values():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 3.0, 0.5, float("nan")]).reshape(1, 1, 1, 7)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 1)
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 0, 255, 191, 128]
    rgb = to_uint8(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)
    # layout: channel c of pixel (h, w) lands at [n, h, w, c]
    x = _images(2, 3, 4, 5)
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(to_uint8(x), ref.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(to_uint8(x.half()), to_uint8(x.half().float()))
    u8 = torch.randint(0, 256, (1, 1, 2, 2), dtype=torch.uint8)
    assert np.array_equal(to_uint8(u8)[..., 0], u8[:, 0].numpy())


def test_to_uint8_validates():
    with pytest.raises(ValueError, match=r"images must be \[n, C, H, W\] with C = 1 or 3, got shape \(3, 4, 4\)"):
        to_uint8(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"images must be .*got shape \(1, 2, 4, 4\)"):
        to_uint8(torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        to_uint8(np.zeros((1, 1, 4, 4)))
    with pytest.raises(TypeError, match="images must be a float tensor"):
        to_uint8(torch.zeros(1, 1, 4, 4, dtype=torch.int32))


# -- grids and files --------------------------------------------------------------------
@pytest.mark.parametrize("n,nrow,rows,cols", [(5, None, 2, 3), (4, None, 2, 2), (1, None, 1, 1), (7, 7, 1, 7),
                                              (3, 10, 1, 3), (6, 1, 6, 1)])
def test_make_grid_shapes(n, nrow, rows, cols):
    h, w, p = 6, 7, 2
    grid = make_grid(_images(n, 3, h, w), nrow=nrow, padding=p, pad_value=17)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * (h + p) + p, cols * (w + p) + p, 3)
    assert (grid[:p] == 17).all() and (grid[:, :p] == 17).all()


def test_make_grid_places_images():
    x = _images(4, 1, 3, 3)
    grid = make_grid(x, nrow=2, padding=1)
    assert grid.shape == (9, 9, 1)  # gray stays single channel
    u8 = to_uint8(x)
    assert np.array_equal(grid[1:4, 1:4], u8[0])
    assert np.array_equal(grid[1:4, 5:8], u8[1])
    assert np.array_equal(grid[5:8, 1:4], u8[2])
    assert np.array_equal(grid[5:8, 5:8], u8[3])
    assert np.array_equal(make_grid(u8, nrow=2, padding=1), grid)  # uint8 NHWC input
    with pytest.raises(ValueError, match="images is empty"):
        make_grid(torch.zeros(0, 1, 3, 3))
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        make_grid(x, nrow=0)
    with pytest.raises(ValueError, match="numpy array must be uint8"):
        make_grid(np.zeros((1, 3, 3, 1), dtype=np.float32))


@pytest.mark.parametrize("c,mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_png(tmp_path, c, mode):
    x = _images(4, c, 5, 5)
    path = save_image_grid(x, tmp_path / "out" / "nested" / "grid.png", nrow=2, scale=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == mode
        assert im.size == (3 * (2 * 7 + 2), 3 * (2 * 7 + 2))
        back = np.asarray(im)
    grid = make_grid(x, nrow=2).squeeze(-1) if c == 1 else make_grid(x, nrow=2)
    assert np.array_equal(back[::3, ::3], grid)  # nearest-neighbour upscaling
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left
    with pytest.raises(ValueError, match="scale must be a positive int"):
        save_image_grid(x, tmp_path / "g.png", scale=0)


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_save_images_npz(tmp_path, suffix):
    x = _images(3, 3, 4, 4)
    path = save_images_npz(x, tmp_path / "d" / f"samples{suffix}")
    assert path.exists()
    if suffix == ".npz":
        with np.load(path) as z:
            assert list(z.keys()) == ["images"]
            back = z["images"]
    else:
        back = np.load(path)
    assert back.dtype == np.uint8 and back.shape == (3, 4, 4, 3)
    assert np.array_equal(back, to_uint8(x))
    # overwriting is atomic and leaves nothing else behind
    save_images_npz(x[:1], path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(ValueError, match=r"path must end in \.npz or \.npy"):
        save_images_npz(x, tmp_path / "samples.png")


def test_save_gif(tmp_path):
    frames = [torch.full((4, 3, 6, 6), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    frames[2][0, 0] = 1.0  # some colour
    path = save_gif(frames, tmp_path / "g" / "reverse.gif", duration_ms=40, scale=2)
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == 5
        assert im.info.get("loop") == 0
        assert im.info.get("duration") == 40
        assert im.size == (2 * (2 * 8 + 2), 2 * (2 * 8 + 2))
        im.seek(4)
        assert np.asarray(im.convert("L"))[4, 4] == 255
    gray = save_gif([torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)], tmp_path / "gray.gif")
    with Image.open(gray) as im:
        assert im.n_frames == 2
    with pytest.raises(ValueError, match="frames is empty"):
        save_gif([], tmp_path / "e.gif")
    with pytest.raises(ValueError, match=r"frame 1 is \(1, 1, 5, 5\)"):
        save_gif([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 5)], tmp_path / "e.gif")


# -- the forward process -------------------------------------------------------------------
def test_forward_process_strip(tmp_path):
    schedule = NoiseSchedule.make("linear", 1000)
    x0 = _images(3, 1, 8, 8)
    ts = [0, 100, 500, 999]
    path = forward_process_strip(x0, schedule, ts, tmp_path / "strip.png", seed=5, scale=2)
    with Image.open(path) as im:
        assert im.mode == "L"
        w, h = im.size
        arr = np.asarray(im)
    assert w == 2 * (len(ts) * 10 + 2)  # columns = timesteps
    header = h - 2 * (3 * 10 + 2)  # rows = images, below a label row
    assert 8 <= header <= 40
    # each cell is sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the contract's noise (seed 5)
    eps = batch_noise(5, 0, 0, tuple(x0.shape), "cpu")
    abar = schedule.tables64()["alphas_cumprod"]
    for i in range(3):
        for j, t in enumerate(ts):
            xt = math.sqrt(abar[t]) * x0[i] + math.sqrt(1 - abar[t]) * eps[i]
            top, left = header + 2 * (2 + 10 * i), 2 * (2 + 10 * j)
            cell = arr[top:top + 16:2, left:left + 16:2].astype(int)
            assert np.abs(cell - to_uint8(xt[None])[0, ..., 0].astype(int)).max() <= 1, (i, t)
    # default scale makes columns at least 48 px wide; RGB stays RGB
    rgb = forward_process_strip(_images(2, 3, 8, 8), schedule, [0, 999], tmp_path / "rgb.png")
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.width >= 2 * 48
    with pytest.raises(ValueError, match=r"timesteps must be .* in \[0, 999\], got \[0, 1000\]"):
        forward_process_strip(x0, schedule, [0, 1000], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"x0 must be a tensor \[k, C, H, W\]"):
        forward_process_strip(x0[0], schedule, [0], tmp_path / "x.png")
