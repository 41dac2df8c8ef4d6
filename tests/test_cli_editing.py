"""The editing commands ``fastddpm inpaint``, ``img2img`` and ``invert``: each equals its library
function (``fastddpm.inpaint``, ``fastddpm.img2img``, ``fastddpm.inversion.invert``) on the images
the command read; files in and out (one image, a folder as a batch, masks binarised at 0.5,
channels converted, the size checked or resized), conditioning, and the errors that name the file.

The inpaint and img2img tests skip (saying why) while ``fastddpm.inpaint`` / ``fastddpm.img2img``
are not there yet; they run against the real functions."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastddpm
from fastddpm.cli import main
from fastddpm.cli_args import SHIPPED_MODELS
from fastddpm.edit_io import load_images, load_masks, load_noise
from fastddpm.image_tensors import LUMA
from fastddpm.inversion import invert
from tolerances import EXACT, STEPS_FP32, assert_close

FAST_INPAINT = ["--steps", "4", "--jump-length", "2", "--jump-n-sample", "2", "--quiet"]


def _inpaint_module():
    return pytest.importorskip("fastddpm.inpaint", reason="fastddpm/inpaint.py (fastddpm.inpaint) is not written yet")


def _img2img_module():
    return pytest.importorskip("fastddpm.img2img", reason="fastddpm/img2img.py (fastddpm.img2img) is not written yet")


@pytest.fixture(scope="module")
def digits_model():
    return fastddpm.load_model(SHIPPED_MODELS["digits_small"], device="cpu")


@pytest.fixture(scope="module")
def digits():
    from fastddpm.data import digits_dataset

    return digits_dataset(16).images[:3]  # float [3, 1, 16, 16] in [-1, 1]


def _uint8(x: torch.Tensor) -> np.ndarray:
    """float [C, H, W] in [-1, 1] -> uint8 [H, W] or [H, W, 3]."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _write(path: Path, arr: np.ndarray, **kw) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def _read(path: Path) -> torch.Tensor:
    """A written PNG as float [1, C, H, W] in [-1, 1]."""
    arr = np.asarray(Image.open(path))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)


def _half_mask(size=16) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    m[:, : size // 2] = 255  # white: keep the left half
    return m


@pytest.fixture()
def one_digit(tmp_path, digits):
    return _write(tmp_path / "digit.png", _uint8(digits[0]))


@pytest.fixture()
def digit_folder(tmp_path, digits):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, x in zip(("b.png", "a.png", "c.png"), digits):  # read back sorted: a, b, c
        _write(folder / name, _uint8(x))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _expected_images(folder: Path) -> torch.Tensor:
    return torch.cat([_read(folder / n) for n in ("a.png", "b.png", "c.png")])


# -- inpaint ---------------------------------------------------------------------------------------
def test_inpaint_one_image_is_the_library_call(tmp_path, one_digit, digits_model):
    module = _inpaint_module()
    model, process = digits_model
    mask_path = _write(tmp_path / "mask.png", _half_mask())
    out = tmp_path / "out.png"
    assert main(["inpaint", "--model", "digits_small", "--image", str(one_digit), "--mask", str(mask_path),
                 "--out", str(out), "--seed", "3", "--method", "replace", *FAST_INPAINT]) == 0
    image = _read(one_digit)
    mask = torch.from_numpy(_half_mask() >= 128).float().reshape(1, 1, 16, 16)
    expected = module.inpaint(model, image, mask, method="replace", jump_length=2, jump_n_sample=2, steps=4, seed=3,
                              process=process, progress=False)
    got = _read(out)
    assert_close(got, _read(_write(tmp_path / "e.png", _uint8(expected[0]))), **EXACT)
    assert torch.equal(got[..., :8], image[..., :8])  # the white half is kept


def test_inpaint_a_folder_with_one_mask_or_a_mask_folder(tmp_path, digit_folder, digits_model):
    module = _inpaint_module()
    model, process = digits_model
    images = _expected_images(digit_folder)
    one_mask = _write(tmp_path / "mask.png", _half_mask())
    masks = tmp_path / "masks"
    masks.mkdir()
    per_image = []
    for i, name in enumerate(("a.png", "b.png", "c.jpg")):  # c.png's mask by its stem
        m = np.zeros((16, 16), dtype=np.uint8)
        m[: 4 + 4 * i] = 255
        _write(masks / name, m, **({"quality": 100} if name.endswith(".jpg") else {}))
        per_image.append(torch.from_numpy(m >= 128).float().reshape(1, 1, 16, 16))
    for mask_arg, mask in ((one_mask, torch.from_numpy(_half_mask() >= 128).float().reshape(1, 1, 16, 16)),
                           (masks, torch.cat(per_image))):
        out = tmp_path / f"out_{Path(mask_arg).stem}"
        assert main(["inpaint", "--model", "digits_small", "--image", str(digit_folder), "--mask", str(mask_arg),
                     "--out", str(out), *FAST_INPAINT]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
        expected = module.inpaint(model, images, mask, jump_length=2, jump_n_sample=2, steps=4, process=process,
                                  progress=False)
        for i, name in enumerate(("a.png", "b.png", "c.png")):
            got = _read(out / name)
            assert_close(got, _read(_write(tmp_path / "e.png", _uint8(expected[i]))), **EXACT, msg=name)
            keep = mask[min(i, mask.shape[0] - 1)].bool().expand_as(got[0])
            assert torch.equal(got[0][keep], images[i][keep])


def test_mask_folder_missing_an_image_names_it(tmp_path, digit_folder, capsys):
    _inpaint_module()
    masks = tmp_path / "masks"
    masks.mkdir()
    _write(masks / "a.png", _half_mask())
    assert main(["inpaint", "--model", "digits_small", "--image", str(digit_folder), "--mask", str(masks),
                 "--out", str(tmp_path / "out"), *FAST_INPAINT]) == 2
    err = capsys.readouterr().err
    assert "--mask" in err and "has no mask for the image" in err and "in/b.png'" in err and "'b.png'" in err


# -- masks, images and sizes -------------------------------------------------------------------------
def test_masks_are_gray_in_0_1_binarised_at_one_half(tmp_path):
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8).repeat(4, axis=0)
    gray = _write(tmp_path / "m.png", values)
    rgb = _write(tmp_path / "rgb.png", np.stack([values] * 3, axis=-1))
    for path in (gray, rgb):
        mask = load_masks(path, [Path("x.png")] * 2, (4, 4))
        assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.float32
        assert mask[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # 127/255 < 0.5 <= 128/255


def test_gray_and_rgb_files_become_the_models_channels(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 51, 0
    path = _write(tmp_path / "rgb.png", rgb)
    gray, _, _ = load_images(path, 1, (4, 4))
    luma = LUMA[0] * 1.0 + LUMA[1] * (51 / 127.5 - 1) + LUMA[2] * -1.0
    assert gray.shape == (1, 1, 4, 4) and abs(float(gray[0, 0, 0, 0]) - luma) < 1e-6
    as_rgb, _, _ = load_images(_write(tmp_path / "g.png", np.full((4, 4), 255, dtype=np.uint8)), 3, (4, 4))
    assert as_rgb.shape == (1, 3, 4, 4) and bool((as_rgb == 1).all())
    rgba = _write(tmp_path / "rgba.png", np.concatenate([rgb, np.full((4, 4, 1), 7, dtype=np.uint8)], axis=-1))
    assert torch.equal(load_images(rgba, 3, (4, 4))[0], load_images(path, 3, (4, 4))[0])  # alpha dropped


def test_a_wrong_size_is_an_error_naming_the_file_unless_resize(tmp_path, digits_model, capsys):
    big = _write(tmp_path / "big.png", np.full((20, 24), 200, dtype=np.uint8))
    out = tmp_path / "noise.safetensors"
    assert main(["invert", "--model", "digits_small", "--image", str(big), "--out", str(out), "--steps", "2",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "big.png" in err and "24x20" in err and "16x16" in err and "--resize" in err
    assert not out.exists()
    assert main(["invert", "--model", "digits_small", "--image", str(big), "--out", str(out), "--steps", "2",
                 "--resize", "--quiet"]) == 0
    x_T, _ = load_noise(out)
    assert x_T.shape == (1, 1, 16, 16)
    images, _, _ = load_images(big, 1, (16, 16), resize=True)
    assert images.shape == (1, 1, 16, 16)
    small_mask = _write(tmp_path / "mask.png", np.full((8, 8), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"--mask '.*mask.png' is 8x8 pixels but the model takes 16x16"):
        load_masks(small_mask, [big], (16, 16))
    assert load_masks(small_mask, [big], (16, 16), resize=True).shape == (1, 1, 16, 16)


# -- img2img -------------------------------------------------------------------------------------------
def test_img2img_one_image_and_a_folder_are_the_library_call(tmp_path, one_digit, digit_folder, digits_model):
    module = _img2img_module()
    model, process = digits_model
    kw = dict(strength=0.5, steps=6, seed=2, process=process, progress=False, sampler="ddim")
    out = tmp_path / "out.png"
    assert main(["img2img", "--model", "digits_small", "--image", str(one_digit), "--strength", "0.5", "--steps", "6",
                 "--seed", "2", "--sampler", "ddim", "--out", str(out), "--quiet"]) == 0
    expected = module.img2img(model, _read(one_digit), **kw)
    assert_close(_read(out), _read(_write(tmp_path / "e.png", _uint8(expected[0]))), **EXACT)
    folder_out = tmp_path / "edited"
    assert main(["img2img", "--model", "digits_small", "--image", str(digit_folder), "--strength", "0.5",
                 "--steps", "6", "--seed", "2", "--sampler", "ddim", "--out", str(folder_out), "--quiet"]) == 0
    expected = module.img2img(model, _expected_images(digit_folder), **kw)
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        assert_close(_read(folder_out / name), _read(_write(tmp_path / "e.png", _uint8(expected[i]))), **EXACT)


def test_img2img_with_a_class_and_guidance(tmp_path, one_digit):
    module = _img2img_module()
    model, process = fastddpm.load_model(SHIPPED_MODELS["digits_cond_small"], device="cpu")
    out = tmp_path / "out.png"
    assert main(["img2img", "--model", "digits_cond_small", "--image", str(one_digit), "--strength", "0.7",
                 "--steps", "5", "--sampler", "dpm++2m", "--class", "7", "--guidance", "2", "--out", str(out),
                 "--quiet"]) == 0
    expected = module.img2img(model, _read(one_digit), strength=0.7, steps=5, sampler="dpm++2m", class_labels=7,
                              guidance_scale=2.0, process=process, progress=False)
    assert_close(_read(out), _read(_write(tmp_path / "e.png", _uint8(expected[0]))), **EXACT)


# -- invert --------------------------------------------------------------------------------------------
def test_invert_writes_x_T_and_its_metadata(tmp_path, digit_folder, digits_model, capsys):
    model, process = digits_model
    out = tmp_path / "noise.safetensors"
    assert main(["invert", "--model", "digits_small", "--image", str(digit_folder), "--out", str(out),
                 "--steps", "20"]) == 0
    captured = capsys.readouterr()
    assert "inverting" in captured.err  # the progress bar
    assert "inverted 3 images (20 DDIM steps)" in captured.out
    x_T, meta = load_noise(out)
    images = _expected_images(digit_folder)
    assert_close(x_T, invert(model, images, steps=20, process=process, progress=False), **EXACT)
    assert meta["steps"] == 20 and meta["model"] == "digits_small" and meta["format"] == "fastddpm.invert"
    assert [Path(p).name for p in meta["images"]] == ["a.png", "b.png", "c.png"] and meta["shape"] == [3, 1, 16, 16]
    assert meta["diffusion"]["config"]["sampler"] == "ddim" and len(meta["diffusion"]["timesteps"]) == 20
    again = fastddpm.sample(model, 3, noise=x_T, sampler="ddim", eta=0, steps=20, process=process, progress=False)
    assert float(((again - images) ** 2).mean()) < 0.02  # the shipped model gives its digits back


def test_invert_a_conditional_model_with_a_checkpoint_path(tmp_path, one_digit):
    model, process = fastddpm.load_model(SHIPPED_MODELS["digits_cond_small"], device="cpu")
    out = tmp_path / "noise.safetensors"
    assert main(["invert", "--model", str(SHIPPED_MODELS["digits_cond_small"]), "--image", str(one_digit),
                 "--out", str(out), "--steps", "5", "--class", "0", "--guidance", "1.5", "--quiet"]) == 0
    x_T, meta = load_noise(out)
    expected = invert(model, _read(one_digit), steps=5, process=process, class_labels=0, guidance_scale=1.5,
                      progress=False)
    assert_close(x_T, expected, **STEPS_FP32)
    assert meta["class_labels"] == 0 and meta["guidance_scale"] == 1.5


def test_an_rgb_checkpoint_takes_gray_files(tmp_path):
    from fastddpm.models import create_model

    model = create_model("tiny", seed=0, in_channels=3)
    path = fastddpm.save_model(tmp_path / "rgb.safetensors", model, fastddpm.DDPM())
    image = _write(tmp_path / "g.png", np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8))
    out = tmp_path / "noise.safetensors"
    assert main(["invert", "--model", str(path), "--image", str(image), "--out", str(out), "--steps", "3",
                 "--quiet"]) == 0
    x_T, _ = load_noise(out)
    gray = _read(image)
    loaded, process = fastddpm.load_model(path, device="cpu")
    assert_close(x_T, invert(loaded, gray.expand(-1, 3, -1, -1), steps=3, process=process, progress=False), **EXACT)


# -- errors and help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["invert", "--model", "digits_large"], "--model 'digits_large' does not exist: give a checkpoint file"),
    (["invert", "--image", "{tmp}/nothing.png"], "--image '.*nothing.png' does not exist"),
    (["invert", "--image", "{empty}"], "the folder has no images"),
    (["invert", "--image", "{tmp}/file.png"], "--image '.*file.png': cannot read the image"),
    (["invert", "--out", "{tmp}/x.pt"], "--out must end in .safetensors"),
    (["invert", "--class", "3"], "--class: this model is not class-conditional"),
    (["invert", "--guidance", "2"], "--guidance needs --class"),
    (["invert", "--model", "digits_cond_small", "--class", "eleven"],
     r"--class must be a class index in \[0, 9\] or a class name"),
    (["img2img", "--out", "{tmp}/x.npz"], "--out must end in .png"),
    (["img2img", "--image", "{folder}", "--out", "{tmp}/file.png"], "--out '.*file.png' is a file; for a folder"),
    (["inpaint", "--mask", "{tmp}/none.png"], "--mask '.*none.png' does not exist"),
])
def test_errors_name_the_argument(argv, message, tmp_path, one_digit, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.png", np.zeros((16, 16), dtype=np.uint8))
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    command = argv[0]
    defaults = {"--model": "digits_small", "--image": str(one_digit),
                "--out": str(tmp_path / ("noise.safetensors" if command == "invert" else "out.png"))}
    if command == "inpaint":
        defaults["--mask"] = str(one_digit)
    given = dict(zip(argv[1::2], argv[2::2]))
    places = dict(tmp=tmp_path, folder=folder, empty=tmp_path / "empty")
    args = [command] + [a for k, v in {**defaults, **given}.items() for a in (k, v.format(**places))]
    if command == "inpaint":
        _inpaint_module()
    assert main(args + ["--quiet", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_bad_numbers_are_argparse_errors(one_digit, tmp_path, capsys):
    for argv in (["img2img", "--strength", "1.5"], ["inpaint", "--jump-length", "0", "--mask", "m.png"],
                 ["invert", "--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--model", "digits_small", "--image", str(one_digit), "--out", str(tmp_path / "o.png")])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "expected a number in [0, 1], got '1.5'" in err and "expected an int >= 1, got '0'" in err


def test_help_says_how_masks_are_read(capsys):
    with pytest.raises(SystemExit):
        main(["inpaint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "binarised at 0.5" in text and "white (1) = keep, black (0) = fill" in text
    assert "--resize" in text and "digits_small" in text
