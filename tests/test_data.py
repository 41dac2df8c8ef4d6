"""Datasets (image folders, arrays, digits), routing, flips and splits."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm.data import (
    ArrayDataset,
    DigitsDataset,
    ImageFolderDataset,
    digits_dataset,
    load_dataset,
    random_flip,
    split_validation,
)
from tolerances import EXACT, assert_close


def _write(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """Nested folders: RGB PNG 20x12, gray JPEG 12x30, RGBA upper-case .PNG, plus a non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    _write(root / "b" / "wide.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    _write(root / "a" / "deep" / "tall.jpg", rng.integers(0, 256, (30, 12), dtype=np.uint8), "L")
    _write(root / "c.PNG", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"resource fork junk")
    return root


# -- image folders ------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_shapes_order_range(folder, channels):
    ds = ImageFolderDataset(folder, image_size=10, channels=channels)
    assert len(ds) == 3
    assert [p.relative_to(folder).as_posix() for p in ds.paths] == ["a/deep/tall.jpg", "b/wide.png", "c.PNG"]
    assert (ds.image_size, ds.channels) == (10, channels)
    for i in range(len(ds)):
        x = ds[i]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert x.shape == (channels, 10, 10)
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    uncached = ImageFolderDataset(folder, image_size=10, channels=channels, cache=False)
    first = ds[1]
    assert_close(first, uncached[1], **EXACT)  # the cache holds the decoded image
    first.fill_(0.5)  # a caller writing into an item does not change the cache
    assert_close(ds[1], uncached[1], **EXACT)


def test_image_folder_resize_then_center_crop(tmp_path):
    # 40x20 image: left half black, right half white; a 10x10 output resizes to
    # 20x10 and keeps the middle, so columns 0-4 are dark and 5-9 bright.
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 20:] = 255
    _write(tmp_path / "x" / "half.png", arr, "L")
    x = ImageFolderDataset(tmp_path / "x", image_size=10, channels=1, cache=False)[0]
    assert x.shape == (1, 10, 10)
    assert float(x[0, :, :4].max()) < -0.9 and float(x[0, :, 6:].min()) > 0.9
    # a same-size image is only converted: exact values
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _write(tmp_path / "y" / "same.png", arr, "L")
    y = ImageFolderDataset(tmp_path / "y", image_size=8, channels=1)[0]
    assert_close(y[0], torch.from_numpy(arr).float() / 127.5 - 1.0, **EXACT)


def test_image_folder_16bit_gray(tmp_path):
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)
    (tmp_path / "g").mkdir()
    Image.fromarray(arr).save(tmp_path / "g" / "deep.png")
    with Image.open(tmp_path / "g" / "deep.png") as im:
        assert im.mode.startswith("I")
    x = ImageFolderDataset(tmp_path / "g", image_size=4, channels=1)[0]
    expected = torch.from_numpy((arr // 257).astype(np.float32)) / 127.5 - 1.0
    assert_close(x[0], expected, atol=1e-6, rtol=0)
    assert ImageFolderDataset(tmp_path / "g", image_size=4, channels=3)[0].shape == (3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", image_size=8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found in .*empty.*\.png.*\.jpeg.*\.webp"):
        ImageFolderDataset(tmp_path / "empty", image_size=8)
    _write(tmp_path / "bad" / "ok.png", np.zeros((8, 8), dtype=np.uint8), "L")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x00garbage, not a png" * 10)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ImageFolderDataset(tmp_path / "bad", image_size=8)
    # without the eager check, the first load names the file
    ds = ImageFolderDataset(tmp_path / "bad", image_size=8, verify=False)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ds[0]
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        ImageFolderDataset(tmp_path / "bad", image_size=8, channels=2)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        ImageFolderDataset(tmp_path / "bad", image_size=0)


# -- arrays ------------------------------------------------------------------------------
def _images_u8(n=5, h=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, h, c), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
@pytest.mark.parametrize("kind", ["uint8", "float01", "float11"])
@pytest.mark.parametrize("fmt", ["npy", "npz_images", "npz_arr0", "npz_single"])
def test_array_dataset_layouts_dtypes_files(tmp_path, layout, kind, fmt):
    u8 = _images_u8(c=1 if layout == "nhw" else 3)  # NHWC
    expected = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    arr = {"uint8": u8, "float01": u8 / 255.0, "float11": u8 / 127.5 - 1.0}[kind]
    arr = {"nhwc": arr, "nchw": arr.transpose(0, 3, 1, 2), "nhw": arr[..., 0]}[layout]
    if fmt == "npy":
        path = tmp_path / "a.npy"
        np.save(path, arr)
    else:
        path = tmp_path / "a.npz"
        key = {"npz_images": "images", "npz_arr0": "arr_0", "npz_single": "pictures"}[fmt]
        extra = {"labels": np.arange(5)} if fmt == "npz_images" else {}
        np.savez(path, **{key: arr}, **extra)
    ds = ArrayDataset(path)
    assert len(ds) == 5 and ds.image_size == 6 and ds.channels == expected.shape[1]
    got = torch.stack([ds[i] for i in range(len(ds))])
    assert got.dtype == torch.float32
    assert_close(got, expected, atol=1e-6, rtol=0)


def test_array_dataset_from_array_channels_and_resize():
    u8 = _images_u8(n=3, h=8, c=3)
    ds = ArrayDataset(u8, channels=1)
    assert ds.channels == 1 and ds[0].shape == (1, 8, 8)
    luma = (torch.from_numpy(u8[0]).float() @ torch.tensor([0.299, 0.587, 0.114])) / 127.5 - 1.0
    assert_close(ds[0][0], luma, atol=1e-5, rtol=0)
    gray = ArrayDataset(u8[..., :1], channels=3)
    assert gray[1].shape == (3, 8, 8) and torch.equal(gray[1][0], gray[1][2])
    small = ArrayDataset(torch.from_numpy(u8), image_size=4)
    assert small.image_size == 4 and small[2].shape == (3, 4, 4)
    assert -1.0 <= float(small[2].min()) and float(small[2].max()) <= 1.0
    # non-square with image_size: shorter side resized, centre cropped
    wide = ArrayDataset(np.zeros((2, 6, 12), dtype=np.uint8), image_size=3)
    assert wide[0].shape == (1, 3, 3)


def test_array_dataset_errors(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((4, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npy.*shape \(4, 8\)"):
        ArrayDataset(path)
    with pytest.raises(ValueError, match=r"array has shape \(2, 5, 6, 7\)"):
        ArrayDataset(np.zeros((2, 5, 6, 7), dtype=np.uint8))
    nan = np.zeros((2, 4, 4), dtype=np.float32)
    nan[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="1 non-finite values"):
        ArrayDataset(nan)
    with pytest.raises(ValueError, match=r"values in \[0, 255\]: expected \[0, 1\] or \[-1, 1\].*divide by 255"):
        ArrayDataset(np.linspace(0.0, 255.0, 32).reshape(2, 4, 4))
    low = np.zeros((2, 4, 4))
    low[1, 2, 3] = -2.0
    with pytest.raises(ValueError, match=r"values in \[-2, 0\]: expected \[0, 1\] or \[-1, 1\]"):
        ArrayDataset(low)
    wide = np.zeros((2, 4, 4), dtype=np.int64)
    wide[0, 0, 0] = 300
    with pytest.raises(ValueError, match=r"integer array with values in \[0, 300\]"):
        ArrayDataset(wide)
    with pytest.raises(ValueError, match="not square: pass image_size"):
        ArrayDataset(np.zeros((2, 4, 6), dtype=np.uint8))
    many = tmp_path / "many.npz"
    np.savez(many, a=np.zeros((1, 4, 4)), b=np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]"):
        ArrayDataset(many)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        ArrayDataset(tmp_path / "missing.npy")
    with pytest.raises(TypeError, match="got list"):
        ArrayDataset([[1, 2]])


# -- digits ---------------------------------------------------------------------------------
def test_digits():
    ds = digits_dataset()
    assert isinstance(ds, DigitsDataset)
    assert len(ds) == 1797 and ds.image_size == 16 and ds.channels == 1
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    assert ds.labels.shape == (1797,) and ds.labels.dtype == torch.int64
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert ds[0].shape == (1, 16, 16)
    assert float(ds[0][0, 0, 0]) == -1.0  # background corner
    # at 8x8 the values are the original 0..16 scaled
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert_close(digits_dataset(8).images[:, 0], raw / 8.0 - 1.0, atol=1e-6, rtol=0)
    assert digits_dataset(12, channels=3)[5].shape == (3, 12, 12)


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install scikit-learn .*fastddpm\[digits\]"):
        digits_dataset()


# -- routing ---------------------------------------------------------------------------------
def test_load_dataset_routing(folder, tmp_path):
    digits = load_dataset("digits")
    assert isinstance(digits, DigitsDataset) and digits.image_size == 16
    assert load_dataset("digits", image_size=8).image_size == 8
    imgs = load_dataset(folder, image_size=6)
    assert isinstance(imgs, ImageFolderDataset) and imgs.channels == 3 and imgs[0].shape == (3, 6, 6)
    assert load_dataset(str(folder), image_size=6, channels=1)[0].shape == (1, 6, 6)
    np.save(tmp_path / "a.npy", _images_u8(n=2))
    arr = load_dataset(str(tmp_path / "a.npy"))
    assert isinstance(arr, ArrayDataset) and len(arr) == 2 and arr.image_size == 6
    np.savez(tmp_path / "a.npz", images=_images_u8(n=3))
    assert len(load_dataset(tmp_path / "a.npz", image_size=4)) == 3
    assert len(load_dataset(_images_u8(n=4))) == 4
    for ds in (digits, imgs, arr):
        assert isinstance(ds[0], torch.Tensor)


def test_load_dataset_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="image_size is required for the image folder"):
        load_dataset(folder)
    with pytest.raises(ValueError, match=r"cannot load dataset .*notes\.txt.*'digits', a folder of images"):
        load_dataset(folder / "notes.txt")
    with pytest.raises(FileNotFoundError, match=r"'nope' not found; expected 'digits', a folder"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        load_dataset(tmp_path / "gone.npz")
    with pytest.raises(ValueError, match="dataset must be 'digits'.*got int"):
        load_dataset(3)


# -- flips and splits ---------------------------------------------------------------------------
def test_random_flip_deterministic():
    batch = torch.arange(64 * 2 * 3 * 5, dtype=torch.float32).reshape(64, 2, 3, 5)
    out1 = random_flip(batch, torch.Generator().manual_seed(7))
    out2 = random_flip(batch, torch.Generator().manual_seed(7))
    assert_close(out1, out2, **EXACT)
    flipped = torch.tensor([torch.equal(out1[i], batch[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(out1[i], batch[i]) for i in range(64)])
    assert bool((flipped ^ kept).all())  # every sample is one or the other
    assert 10 < int(flipped.sum()) < 54
    # one draw per sample: the generator advances by exactly n uniforms
    g = torch.Generator().manual_seed(7)
    expected = torch.rand(64, generator=g) < 0.5
    assert torch.equal(flipped, expected)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    random_flip(batch, g1)
    torch.rand(64, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="batch must be"):
        random_flip(torch.zeros(3), g1)


def test_split_validation():
    train, val = split_validation(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == list(range(100))
    assert (train, val) == split_validation(list(range(100)), 0.1, seed=3)
    assert val != split_validation(100, 0.1, seed=4)[1]
    assert split_validation(5, 0.01, seed=0)[1].__len__() == 1  # a positive fraction holds out one
    assert split_validation(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        split_validation(5, 1.0, seed=0)


def test_folders_follow_links_once_and_read_regular_files_only(folder):
    import os

    os.symlink(folder, folder / "b" / "loop")  # a link back to the root
    os.mkfifo(folder / "a" / "pipe.png")  # reading it would block forever
    ds = ImageFolderDataset(folder, image_size=8, channels=1)
    assert len(ds) == 3


def test_garbage_and_special_array_files_are_named(tmp_path):
    import os

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not numpy at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.npz' is not a readable \.npz array file"):
        ArrayDataset(garbage)
    os.mkfifo(tmp_path / "pipe.npy")
    with pytest.raises(ValueError, match=r"pipe\.npy' is not a regular file"):
        ArrayDataset(tmp_path / "pipe.npy")
