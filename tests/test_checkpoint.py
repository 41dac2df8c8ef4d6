"""Checkpoint files: round trip, atomic writes, and a clear error for every kind of bad file."""
import copy
import json
import os
import struct

import pytest
import torch

import fastddpm
import fastddpm.models.unet
from fastddpm import DDPM, checkpoint, files
from fastddpm.checkpoint import (check_model_config, load_checkpoint, load_model, load_weights, save_checkpoint,
                                 save_model)
from fastddpm.models import create_model

from tolerances import EXACT, assert_close


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(dropout=0.0):
    """A tiny model, its EMA copy (different values) and an Adam optimizer with state."""
    model = create_model("tiny", dropout=dropout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).square().mean().backward()
    opt.step()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    return model, ema, opt


STATE = {"kind": "train", "diffusion": DDPM().to_dict(), "train_config": {"steps": 7}, "step": 3, "epoch": 1,
         "index": 2, "best_metric": 0.25}


def test_round_trip(tmp_path):
    model, ema, opt = _trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, ema=ema, optimizer=opt, state=STATE)
    ckpt = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert_close(ckpt.tensors[f"model.{k}"], v, **EXACT, msg=k)
    for k, v in ema.state_dict().items():
        assert_close(ckpt.tensors[f"ema.{k}"], v, **EXACT, msg=k)
    for k, v in STATE.items():
        assert ckpt.metadata[k] == v
    assert ckpt.step == 3
    assert ckpt.metadata["model_config"] == model.config.to_dict()
    assert ckpt.metadata["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt.metadata["versions"]["fastddpm"] == fastddpm.__version__
    # the sidecar says the same
    assert json.loads(path.with_suffix(".json").read_text()) == ckpt.metadata

    # the optimizer state restores into a fresh optimizer exactly
    fresh = torch.optim.Adam(create_model("tiny").parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt.optimizer_state_dict())
    for i, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            assert torch.equal(fresh.state_dict()["state"][i][key], value)
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]

    # and RNG restore puts the global generator back to where it was at save time
    torch.rand(5)
    ckpt.restore_rng()
    assert torch.equal(torch.get_rng_state(), ckpt.tensors["rng.torch_cpu"])


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.parametrize("where", ["writer", "replace"])
def test_atomic_write(tmp_path, monkeypatch, where):
    model, ema, opt = _trained()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=model, ema=ema, optimizer=opt, state={**STATE, "step": 1})
    before = path.read_bytes()

    if where == "writer":
        def crash(tensors, metadata, tmp):  # half a file, then the machine "dies"
            with open(tmp, "wb") as f:
                f.write(before[:100])
            raise OSError("disk full")
        monkeypatch.setattr(checkpoint, "_write_safetensors", crash)
    else:
        def crash(src, dst):
            raise OSError("power cut")
        monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model=model, ema=ema, optimizer=opt, state={**STATE, "step": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 1
    assert _no_temp_files(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_garbage_and_short_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="garbage.safetensors.*not a fastddpm checkpoint"):
        load_checkpoint(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="short.safetensors.*not a fastddpm checkpoint"):
        load_checkpoint(short)
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 10) + b"{not json!" + b"\0" * 16)
    with pytest.raises(ValueError, match="badjson.safetensors.*corrupt"):
        load_checkpoint(bad_json)


def test_deeply_nested_header(tmp_path):
    header = ("[" * 100_000 + "]" * 100_000).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=r"deep\.safetensors.*nests too deeply"):
        load_checkpoint(path)
    model, _, _ = _trained()
    deep = save_model(tmp_path / "m.safetensors", model, DDPM())
    raw = load_checkpoint(deep)
    checkpoint._write_safetensors(dict(raw.tensors), {"fastddpm": "[" * 100_000 + "]" * 100_000}, str(path))
    with pytest.raises(ValueError, match=r"deep\.safetensors.*nested too deeply"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    model, ema, opt = _trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, ema=ema, optimizer=opt, state=STATE)
    data = path.read_bytes()
    for keep in (len(data) - 100, 200, 9):  # tensors cut, header cut, header length only
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=r"c\.safetensors.*(truncated|corrupt)"):
            load_checkpoint(path)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.ones(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="other.safetensors.*without fastddpm metadata"):
        load_checkpoint(path)
    save_file({"weight": torch.ones(3)}, str(path))
    with pytest.raises(ValueError, match="without fastddpm metadata"):
        load_checkpoint(path)


def test_unsupported_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    meta = {"format_version": checkpoint.FORMAT_VERSION + 1, "model_config": None}
    checkpoint._write_safetensors({"model.w": torch.ones(2)}, {"fastddpm": json.dumps(meta)}, str(path))
    with pytest.raises(ValueError, match=rf"future.safetensors.*format version {checkpoint.FORMAT_VERSION + 1}"):
        load_checkpoint(path)


def test_weights_do_not_match_config(tmp_path):
    model, ema, _ = _trained()
    path = save_model(tmp_path / "m.safetensors", model, DDPM(), ema_state=ema)
    # a config that builds another architecture: shapes differ
    ckpt = load_checkpoint(path)
    tensors = dict(ckpt.tensors)
    meta = {**ckpt.metadata, "model_config": {**ckpt.metadata["model_config"], "base_channels": 8}}
    bad = tmp_path / "bad.safetensors"
    checkpoint._write_safetensors(tensors, {"fastddpm": json.dumps(meta)}, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*do not match the model config.*shape mismatch"):
        load_model(bad)
    # weights missing and unexpected
    dropped = {k: v for k, v in tensors.items() if not k.startswith("ema.conv_out")}
    dropped["ema.extra.weight"] = torch.zeros(1)
    checkpoint._write_safetensors(dropped, {"fastddpm": json.dumps(ckpt.metadata)}, str(bad))
    with pytest.raises(ValueError, match=r"missing 2: conv_out.bias, conv_out.weight; unexpected 1: extra.weight"):
        load_model(bad)
    # an invalid config
    meta = {**ckpt.metadata, "model_config": {**ckpt.metadata["model_config"], "num_groups": 5}}
    checkpoint._write_safetensors(tensors, {"fastddpm": json.dumps(meta)}, str(bad))
    with pytest.raises(ValueError, match="invalid model_config"):
        load_model(bad)


def test_a_crafted_config_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A few-KB file whose metadata declares a 77 GiB model (or T = 2e9) must not allocate it."""
    model, ema, _ = _trained()
    path = save_model(tmp_path / "m.safetensors", model, DDPM(), ema_state=ema)
    ckpt = load_checkpoint(path)
    bad = tmp_path / "crafted.safetensors"
    built = []
    monkeypatch.setattr(fastddpm.models.unet.UNet, "__init__",
                        _recording(fastddpm.models.unet.UNet.__init__, built))
    cases = [
        ({"base_channels": 2048, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 6}, "do not match the model config"),
        ({"base_channels": 2048}, "shape mismatch"),
        ({"num_res_blocks": 10**9}, "residual blocks"),
    ]
    for change, match in cases:
        meta = {**ckpt.metadata, "model_config": {**ckpt.metadata["model_config"], **change}}
        checkpoint._write_safetensors(dict(ckpt.tensors), {"fastddpm": json.dumps(meta)}, str(bad))
        built.clear()
        with pytest.raises(ValueError, match=rf"crafted\.safetensors.*{match}"):
            load_model(bad)
        assert all(device == "meta" for device in built), built  # only a meta skeleton, never real memory
    meta = {**ckpt.metadata, "diffusion": {"config": {"num_timesteps": 2 * 10**9}}}
    checkpoint._write_safetensors(dict(ckpt.tensors), {"fastddpm": json.dumps(meta)}, str(bad))
    with pytest.raises(ValueError, match=r"crafted\.safetensors' has an invalid diffusion process.*num_timesteps"):
        load_model(bad)
    # integer weights would be cast silently
    tensors = {k: (v.to(torch.int8) if k == "ema.conv_out.weight" else v) for k, v in ckpt.tensors.items()}
    checkpoint._write_safetensors(tensors, {"fastddpm": json.dumps(ckpt.metadata)}, str(bad))
    with pytest.raises(ValueError, match=r"not floating point 1: conv_out.weight torch.int8"):
        load_model(bad)


def _recording(init, built):
    def wrapped(self, config):
        built.append(str(torch.get_default_device()))
        init(self, config)
    return wrapped


def test_resume_into_another_model(tmp_path):
    model, ema, opt = _trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, ema=ema, optimizer=opt, state=STATE)
    other = create_model("tiny", base_channels=8)
    with pytest.raises(ValueError, match=r"c\.safetensors.*different model config.*base_channels: checkpoint 16"):
        check_model_config(load_checkpoint(path), other)
    with pytest.raises(ValueError, match="do not match"):
        load_weights(other, load_checkpoint(path).section("model"), path=path)


def test_bad_paths(tmp_path):
    model, _, _ = _trained()
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "c.pt", model=model, state={})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "c.safetensors", model=model, state={})
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        load_checkpoint(tmp_path / "dir.safetensors")


def test_load_model_samples(tmp_path):
    model, ema, _ = _trained()
    process = DDPM(num_timesteps=50, schedule="cosine")
    path = save_model(tmp_path / "release.safetensors", model, process, ema_state=ema)
    loaded, loaded_process = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded_process.to_dict() == process.to_dict()
    for k, v in ema.state_dict().items():  # EMA weights by default
        assert torch.equal(loaded.state_dict()[k], v)
    raw, _ = load_model(path, ema=False)
    for k, v in model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
    assert "optim.0.exp_avg" not in load_checkpoint(path).tensors
    images = fastddpm.sample(loaded, 3, steps=4, process=loaded_process, progress=False)
    assert images.shape == (3, 1, 8, 8) and bool(torch.isfinite(images).all())


class _Trap:
    """Unpickling this runs ``_spring``: a checkpoint loader must never do it."""

    sprung = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.sprung = True
    return {}


def test_pickles_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"model": _Trap()}, path)
    with pytest.raises(ValueError, match="evil.safetensors"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="evil.safetensors"):
        load_model(path)
    assert not _Trap.sprung
