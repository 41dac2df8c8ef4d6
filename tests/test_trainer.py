"""The trainer: exact resume, gradient accumulation, failure modes and the files a run writes.

All runs use the ``tiny`` preset (8x8 gray) on a handful of images, a few steps each.
"""
import json
import os
import shutil
import signal

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import DDPM
from fastddpm.checkpoint import load_checkpoint, load_model
from fastddpm.data import ArrayDataset, digits_dataset
from fastddpm.models import create_model
from fastddpm.trainer import TrainConfig, Trainer

from tolerances import FP32, assert_close

QUIET = dict(log_every=10, checkpoint_every=0, val_every=0, random_flip=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(image_size=8)


@pytest.fixture(scope="module")
def ten_images(digits):
    return ArrayDataset(digits.images[:10].numpy())


def _trainer(out_dir, dataset, seed=0, process=None, resume=False, dropout=0.0, device="cpu", **config):
    torch.manual_seed(seed)  # model init
    model = create_model("tiny", dropout=dropout)
    return Trainer(model, process or DDPM(), dataset, TrainConfig(**config), out_dir, device=device, resume=resume,
                   progress=False)


def _tensors(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema_model.state_dict().items()})
    for i, entries in trainer.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in entries.items()})
    return out


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# -- configuration --------------------------------------------------------------------------
def test_cpu_training_plan_never_picks_a_slower_option_and_says_why(tmp_path, ten_images):
    trainer = _trainer(tmp_path / "auto", ten_images, steps=1, batch_size=2)
    assert trainer.precision == "no" and not trainer.channels_last
    lines = trainer.explain().splitlines()
    for choice in ("device=", "mixed_precision=", "channels_last=", "compile=", "threads="):
        assert sum(line.startswith(choice) for line in lines) == 1, (choice, lines)
    assert "mixed_precision='no': automatic; a CPU trains fastest in float32" in trainer.explain()
    assert "compile='no': the default, not timed" in trainer.explain()
    assert "pays back after" in trainer.explain()  # the measured break-even, for choosing --compile
    asked = _trainer(tmp_path / "asked", ten_images, steps=1, batch_size=2, mixed_precision="bf16", channels_last=True)
    assert "mixed_precision='bf16': requested; note: on a CPU bf16 training measured" in asked.explain()
    assert "channels_last=True: requested" in asked.explain()


def test_config_round_trip_and_validation():
    c = TrainConfig(steps=5, adam_betas=(0.8, 0.99), grad_clip=None, mixed_precision="bf16")
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert TrainConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown train config keys.*'stepz'"):
        TrainConfig.from_dict({"stepz": 3})
    for bad, field in [(dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(optimizer="sgd"), "optimizer"),
                       (dict(mixed_precision="fp8"), "mixed_precision"), (dict(ema_decay=1.0), "ema_decay"),
                       (dict(grad_clip=0.0), "grad_clip"), (dict(adam_betas=(0.9,)), "adam_betas"),
                       (dict(val_fraction=1.0), "val_fraction"), (dict(sample_steps=0), "sample_steps"),
                       (dict(keep_last=0), "keep_last"), (dict(seed=-1), "seed"), (dict(batch_size=2.0), "batch_size"),
                       (dict(compile="fast"), "compile"), (dict(compile=True), "compile"),
                       (dict(channels_last="yes"), "channels_last"), (dict(nonfinite="ignore"), "nonfinite")]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**bad)


# -- exactness -------------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path, ten_images):
    """40 steps in one go == 20 steps + resume + 20, with dropout, flips, warmup, validation and
    epochs that end mid-batch (10 training images, batches of 4)."""
    cfg = dict(batch_size=4, lr=1e-3, warmup_steps=10, ema_decay=0.9, val_fraction=0.2, val_every=20,
               log_every=10, checkpoint_every=20, dropout=0.1)
    whole = _trainer(tmp_path / "whole", ten_images, steps=40, **cfg)
    whole.train()

    first = _trainer(tmp_path / "split", ten_images, steps=20, **cfg)
    first.train()
    # a crash after logging step 30 but before its checkpoint: the row must not be duplicated
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "loss": 123.0}) + "\n")
    torch.rand(100)  # the global RNG moves on; resume must restore it
    second = _trainer(tmp_path / "split", ten_images, seed=1, steps=40, resume=True, **cfg)
    assert second.step == 20
    second.train()

    a, b = _tensors(whole), _tensors(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a, rows_b = _rows(tmp_path / "whole"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_b] == [10, 20, 30, 40]
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["loss"], ra["val_loss"]) == (rb["loss"], rb["val_loss"])
    csv_steps = [line.split(",")[0] for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()]
    assert csv_steps == ["step", "10", "20", "30", "40"]
    # the checkpoint written at the end holds the same tensors
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_0000040.safetensors")
    for k, v in a.items():
        assert torch.equal(ckpt.tensors[k], v), k


def test_ema_copies_the_model_exactly_before_ema_start(tmp_path, ten_images):
    # no warm-up: the first averaged step (step 4) lags the model (with the warm-up it copies it too, below)
    trainer = _trainer(tmp_path, ten_images, steps=3, batch_size=2, lr=1e-2, ema_decay=0.9, ema_start=3,
                       ema_warmup_power=None, **QUIET)
    trainer.train()
    for (k, a), b in zip(trainer.model.state_dict().items(), trainer.ema_model.state_dict().values()):
        assert torch.equal(a, b), k
    trainer.config = trainer.config.replace(steps=4)
    trainer.train()  # step 4 averages: the EMA now lags the model
    assert not all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), trainer.ema_model.parameters()))


def test_ema_warmup_schedule():
    c = TrainConfig(ema_decay=0.999, ema_start=10)
    assert [c.ema_decay_at(s) for s in (0, 9, 10)] == [0.0, 0.0, 0.0]  # copies, then the first warm-up step
    assert c.ema_decay_at(10 + 300) == pytest.approx(1 - 301 ** -0.75)  # ema-pytorch / diffusers, inv_gamma 1
    decays = [c.ema_decay_at(s) for s in range(10, 100_000, 997)]
    assert decays == sorted(decays) and max(decays) == 0.999  # rises to the cap and stays there
    assert TrainConfig(ema_decay=0.9, ema_warmup_power=None).ema_decay_at(0) == 0.9
    with pytest.raises(ValueError, match="ema_warmup_power"):
        TrainConfig(ema_warmup_power=0.0)


def test_short_runs_have_an_ema_of_recent_weights_by_default(tmp_path, ten_images):
    """With the default decay (0.9999), 40 steps leave a plain EMA 99.6% the random start (samples are
    noise); the warm-up makes it an average of the run's recent weights."""
    trainer = _trainer(tmp_path, ten_images, steps=40, batch_size=2, lr=1e-2, **QUIET)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    moved = sum((p - s).norm() ** 2 for p, s in zip(trainer.model.parameters(), start)) ** 0.5
    lag = sum((p - e).norm() ** 2 for p, e in zip(trainer.model.parameters(), trainer.ema_model.parameters())) ** 0.5
    assert lag < 0.5 * moved


def test_grad_accumulation_matches_one_big_batch(tmp_path, ten_images):
    """2 micro-batches of 2 give the gradients of one batch of 4 (same images, timesteps, noise)."""
    grads, losses = [], []
    for batch_size, accum in ((4, 1), (2, 2)):
        trainer = _trainer(tmp_path / f"b{batch_size}", ten_images, steps=1, batch_size=batch_size,
                           grad_accum=accum, grad_clip=None, **QUIET)
        loss, _, _ = trainer.train_step(0)
        losses.append(loss)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    assert_close(losses[1], losses[0], **FP32, msg="loss")
    for i, (g2, g1) in enumerate(zip(grads[1], grads[0])):
        assert_close(g2, g1, **FP32, msg=f"grad {i}")


# -- failures -----------------------------------------------------------------------------
class NaNAt(nn.Module):
    """A tiny U-Net whose output becomes NaN from its ``at``-th call on."""

    def __init__(self, at: int):
        super().__init__()
        self.inner = create_model("tiny")
        self.at, self.calls = at, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.inner(x, t)
        return out * float("nan") if self.calls >= self.at else out


def test_non_finite_loss_stops_before_any_checkpoint_of_it(tmp_path, ten_images):
    out = tmp_path / "run"
    trainer = Trainer(NaNAt(5), DDPM(), ten_images, TrainConfig(steps=10, batch_size=2, checkpoint_every=2,
                                                              log_every=100, keep_last=10), out, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 5"):
        trainer.train()
    names = sorted(p.name for p in (out / "checkpoints").glob("*.safetensors"))
    assert names == ["best.safetensors", "step_0000002.safetensors", "step_0000004.safetensors"]
    for name in names:
        ckpt = load_checkpoint(out / "checkpoints" / name)
        assert ckpt.step <= 4
        assert all(bool(torch.isfinite(v).all()) for k, v in ckpt.tensors.items() if k.startswith(("model", "ema")))


class NaNOn(nn.Module):
    """A tiny U-Net whose output is NaN on the calls numbered in ``bad`` (1-based)."""

    def __init__(self, bad):
        super().__init__()
        self.inner = create_model("tiny")
        self.bad, self.calls = set(bad), 0

    def forward(self, x, t):
        self.calls += 1
        out = self.inner(x, t)
        return out * float("nan") if self.calls in self.bad else out


def _checkpoint_tensors(out, step):
    return load_checkpoint(out / "checkpoints" / f"step_{step:07d}.safetensors").tensors


@pytest.mark.parametrize("device, fused", [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=pytest.mark.gpu)],
                         ids=["cpu-host-check", "cpu-fused-found_inf", "cuda-fused-found_inf"])
def test_nonfinite_skip_leaves_the_state_of_skipped_steps(tmp_path, ten_images, device, fused):
    """Steps 3 and 4 have a NaN loss: with nonfinite='skip' the weights, the EMA and the optimizer
    state (step count included) after step 4 are those after step 2; training goes on from there."""
    out = tmp_path / "run"
    torch.manual_seed(0)
    trainer = Trainer(NaNOn({3, 4}), DDPM(), ten_images,
                      TrainConfig(steps=6, batch_size=2, ema_decay=0.9, checkpoint_every=2, keep_last=10, log_every=2,
                                  val_every=0, nonfinite="skip", mixed_precision="no"), out, device=device,
                      progress=False)
    if fused and device == "cpu":  # the fused kernels' found_inf path (the trainer makes fused Adam on CUDA)
        trainer.optimizer = torch.optim.Adam(trainer.params, lr=trainer.config.lr, fused=True)
    assert bool(trainer.optimizer.defaults.get("fused")) == fused
    result = trainer.train()
    assert result["skipped_steps"] == 2 and trainer.skipped_steps == 2
    s2, s4, s6 = (_checkpoint_tensors(out, s) for s in (2, 4, 6))
    assert s2.keys() == s4.keys()
    moved = [k for k in s2 if k.startswith(("model.", "ema.", "optim.")) and not torch.equal(s2[k], s4[k])]
    assert moved == []
    assert int(s4["optim.0.step"]) == 2 and int(s6["optim.0.step"]) == 4
    assert any(not torch.equal(s4[k], s6[k]) for k in s4 if k.startswith("model."))
    assert all(bool(torch.isfinite(v).all()) for k, v in s6.items() if k.startswith(("model.", "ema.", "optim.")))
    rows = _rows(out)
    assert [(r["step"], r["skipped"]) for r in rows] == [(2, 0), (4, 2), (6, 0)]
    assert rows[1]["loss"] is None and rows[2]["loss"] is not None
    header, *lines = (out / "metrics.csv").read_text().splitlines()
    assert header.split(",")[-1] == "skipped" and [line.split(",")[-1] for line in lines] == ["0", "2", "0"]
    # the count survives a resume
    again = Trainer(NaNOn(()), DDPM(), ten_images, TrainConfig(steps=7, batch_size=2, ema_decay=0.9, log_every=2,
                                                               val_every=0, nonfinite="skip", mixed_precision="no"),
                    out, device=device, progress=False, resume=True)
    assert again.skipped_steps == 2


def test_nonfinite_skip_without_progress_stops(tmp_path, ten_images, monkeypatch):
    import fastddpm.training.meter as meter_module

    monkeypatch.setattr(meter_module, "MAX_CONSECUTIVE_SKIPS", 3)
    out = tmp_path / "run"
    trainer = Trainer(NaNOn(range(2, 100)), DDPM(), ten_images,
                      TrainConfig(steps=8, batch_size=2, checkpoint_every=1, keep_last=10, log_every=1, val_every=0,
                                  nonfinite="skip"), out, device="cpu", progress=False)
    with pytest.raises(FloatingPointError, match=r"3 training steps in a row \(up to step 4\).*skipped"):
        trainer.train()
    assert trainer.skipped_steps == 2  # steps 2 and 3 were logged before step 4 ended the run
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.safetensors"))[-1] == "step_0000003.safetensors"


def _assert_trained_alike(trainer, expected):
    """The same logged losses (to rounding) and the same state within what Adam makes of rounding:
    a near-zero gradient's sign can flip, which moves that weight by up to a step (lr, 1e-3 here);
    a real difference in the step moves every weight by about that much."""
    for ra, rb in zip(_rows(expected.out_dir), _rows(trainer.out_dir), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    a, b = _tensors(expected), _tensors(trainer)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], atol=3e-4 if k.startswith(("model", "ema")) else 1e-6, rtol=1e-4, msg=k)


def test_channels_last_trains_like_contiguous_and_resumes_exactly(tmp_path, ten_images):
    cfg = dict(batch_size=4, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=2, val_every=0)
    grads = []
    for channels_last in (False, True):
        trainer = _trainer(tmp_path / f"grads{channels_last}", ten_images, steps=1, channels_last=channels_last,
                           **cfg)
        trainer.train_step(0)
        grads.append([p.grad for p in trainer.model.parameters()])
    for i, (g1, g0) in enumerate(zip(*grads[::-1])):
        assert_close(g1, g0, **FP32, msg=f"grad {i}")

    plain = _trainer(tmp_path / "plain", ten_images, steps=4, channels_last=False, **cfg)
    plain.train()
    whole = _trainer(tmp_path / "whole", ten_images, steps=4, channels_last=True, **cfg)
    conv = next(p for p in whole.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    whole.train()
    _assert_trained_alike(whole, plain)
    b = _tensors(whole)
    first = _trainer(tmp_path / "split", ten_images, steps=2, channels_last=True, **cfg)
    first.train()
    second = _trainer(tmp_path / "split", ten_images, steps=4, channels_last=True, resume=True, **cfg)
    second.train()
    c = _tensors(second)
    for k in b:
        assert torch.equal(b[k], c[k]), k
    # the checkpoint loads into a plain (contiguous) model
    model, _ = load_model(tmp_path / "whole" / "checkpoints" / "step_0000004.safetensors")
    for (k, v), w in zip(model.state_dict().items(), whole.ema_model.state_dict().values()):
        assert torch.equal(v, w), k


def test_compiled_model_trains_like_eager(tmp_path, ten_images):
    """compile='default' (Inductor on the CPU): the same losses and weights as eager within tolerance,
    checkpoints hold the plain module's names, and the EMA model stays eager."""
    cfg = dict(steps=3, batch_size=4, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=3, val_every=0)
    eager = _trainer(tmp_path / "eager", ten_images, **cfg)
    eager.train()
    compiled = _trainer(tmp_path / "compiled", ten_images, compile="default", **cfg)
    assert compiled.train_model is not compiled.model
    assert type(compiled.ema_model).__name__ == "UNet"
    compiled.train()
    _assert_trained_alike(compiled, eager)
    names = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step_0000003.safetensors").tensors.keys()
    assert not any("_orig_mod" in k for k in names)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_and_writes_a_checkpoint(tmp_path, ten_images, monkeypatch, signum):
    trainer = _trainer(tmp_path / "run", ten_images, steps=50, batch_size=2, checkpoint_every=0, log_every=10)
    take_step = trainer.train_step

    def step_then_signal(step):
        out = take_step(step)
        if step == 2:  # arrives inside step 3; the step still completes
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    before = signal.getsignal(signum)
    metrics = trainer.train()
    assert signal.getsignal(signum) is before  # handlers restored
    assert metrics["stopped_by"] == signal.Signals(signum).name and metrics["step"] == 3
    assert metrics["checkpoint"].endswith("step_0000003.safetensors")
    assert _rows(tmp_path / "run")[-1]["step"] == 3
    again = _trainer(tmp_path / "run", ten_images, steps=5, batch_size=2, checkpoint_every=0, log_every=10,
                     resume=True)
    assert again.step == 3 and again.train()["stopped_by"] is None


def test_a_second_signal_exits_at_once(tmp_path, ten_images, monkeypatch):
    trainer = _trainer(tmp_path / "run", ten_images, steps=50, batch_size=2, checkpoint_every=0, log_every=10)
    take_step = trainer.train_step

    def signal_twice(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return take_step(step)

    monkeypatch.setattr(trainer, "train_step", signal_twice)
    with pytest.raises(SystemExit) as stopped:
        trainer.train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert trainer.step == 2 and not list((tmp_path / "run" / "checkpoints").iterdir())


def test_unwritable_out_dir(tmp_path, ten_images):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"out_dir .*a_file.*cannot be created"):
        _trainer(blocker / "run", ten_images, steps=1, batch_size=2)


def test_not_enough_disk_space(tmp_path, ten_images, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"out_dir .*MiB free"):
        _trainer(tmp_path / "run", ten_images, steps=1, batch_size=2)


def test_refuses_to_mix_runs_and_resumes_only_the_same_model(tmp_path, ten_images):
    _trainer(tmp_path, ten_images, steps=2, batch_size=2, **QUIET).train()
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):
        _trainer(tmp_path, ten_images, steps=4, batch_size=2, **QUIET).train()
    model = create_model("tiny", base_channels=8)
    with pytest.raises(ValueError, match="different model config.*base_channels"):
        Trainer(model, DDPM(), ten_images, TrainConfig(steps=4, batch_size=2), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="another diffusion process"):
        _trainer(tmp_path, ten_images, process=DDPM(schedule="cosine"), steps=4, batch_size=2, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        _trainer(tmp_path / "empty", ten_images, steps=4, batch_size=2).resume()


def test_dataset_must_fit_the_model(tmp_path, digits):
    with pytest.raises(ValueError, match=r"dataset images have shape \(1, 16, 16\).*\(1, 8, 8\)"):
        _trainer(tmp_path, digits_dataset(image_size=16), steps=1)


# -- a real (small) run -------------------------------------------------------------------
def test_loss_decreases(tmp_path, digits):
    trainer = _trainer(tmp_path, digits, steps=100, batch_size=16, lr=2e-3, log_every=10, checkpoint_every=0,
                       random_flip=False)
    result = trainer.train()
    rows = _rows(tmp_path)
    assert len(rows) == 10 and rows[-1]["step"] == 100 == result["step"]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"], [r["loss"] for r in rows]
    assert result["best_metric"] == pytest.approx(result["smoothed_loss"])


def test_outputs_of_a_run(tmp_path, ten_images):
    out = tmp_path / "run"
    cfg = dict(steps=6, batch_size=2, checkpoint_every=2, keep_last=2, log_every=2, val_fraction=0.3, val_every=3,
               sample_every=3, sample_n=4, sample_steps=3, mixed_precision="no")
    result = _trainer(out, ten_images, **cfg).train()
    assert result["step"] == 6 and result["val_loss"] is not None

    config = json.loads((out / "config.json").read_text())
    assert config["model_config"] == create_model("tiny").config.to_dict()
    assert config["train_config"] == TrainConfig(**cfg).to_dict()
    assert DDPM.from_dict(config["diffusion"]).to_dict() == DDPM().to_dict()

    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert [r["val_loss"] is not None for r in rows] == [False, True, False, True]
    header, *lines = (out / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:5] == ["step", "loss", "lr", "grad_norm", "val_loss"]
    assert len(lines) == 4
    for name in ("loss.png", "samples/step_0000003.png", "samples/step_0000006.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.json", "best.safetensors", "step_0000004.json", "step_0000004.safetensors",
                     "step_0000006.json", "step_0000006.safetensors"]
    best = load_checkpoint(out / "checkpoints" / "best.safetensors")
    assert best.metadata["best_metric"] == min(r["val_loss"] for r in rows if r["val_loss"] is not None)
    assert best.metadata["metric"] == "val_loss"

    model, process = load_model(out / "checkpoints" / "step_0000006.safetensors")
    images = fastddpm.sample(model, 2, steps=3, process=process, progress=False)
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, ten_images, precision):
    trainer = _trainer(tmp_path, ten_images, steps=2, batch_size=2, mixed_precision=precision, **QUIET)
    assert trainer.precision == precision
    result = trainer.train()
    assert result["loss"] is not None and result["loss"] == result["loss"]
    if precision == "fp16":  # the grad scaler's state is saved and restored
        saved = load_checkpoint(tmp_path / "checkpoints" / "step_0000002.safetensors").metadata["scaler"]
        resumed = _trainer(tmp_path, ten_images, steps=3, batch_size=2, mixed_precision=precision, resume=True,
                           **QUIET)
        assert resumed.scaler.state_dict() == saved == trainer.scaler.state_dict()
    assert _trainer(tmp_path / "auto", ten_images, steps=1, batch_size=2).precision == "no"  # auto on CPU


# -- on a GPU (skipped without one) ------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_training_steps_do_not_synchronise(tmp_path, ten_images):
    """The fast path's step (bf16, channels_last, fused Adam, fused ops, nonfinite='skip') never
    waits for the GPU: no value read back, no blocking copy."""
    trainer = _trainer(tmp_path, ten_images, steps=10, batch_size=4, mixed_precision="bf16", nonfinite="skip",
                       device="cuda", **QUIET)
    assert trainer.device.type == "cuda" and trainer.channels_last and trainer.optimizer.defaults["fused"]
    trainer.train_step(0)  # lazy initialisation, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            loss, grad_norm, ok = trainer.train_step(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(loss)) and bool(ok)


@pytest.mark.gpu
def test_gpu_fused_ops_step_matches_the_reference_step(tmp_path, ten_images):
    """One fp32 step on the GPU: the fused q_sample/loss (automatic backend) and the reference ops
    give the same loss and gradients (the same noise, from the contract)."""
    from fastddpm import ops

    results = {}
    for backend in ("reference", None):
        trainer = _trainer(tmp_path / str(backend), ten_images, steps=1, batch_size=4, mixed_precision="no",
                           grad_clip=None, device="cuda", **QUIET)
        with ops.use_backend(backend):
            loss, _, _ = trainer.train_step(0)
        results[backend] = loss, [p.grad.clone() for p in trainer.model.parameters()]
    (loss_ref, grads_ref), (loss_fast, grads_fast) = results["reference"], results[None]
    assert_close(loss_fast, loss_ref, **FP32, msg="loss")
    for i, (g, e) in enumerate(zip(grads_fast, grads_ref)):
        assert_close(g, e, atol=1e-5, rtol=1e-4, msg=f"grad {i}")


@pytest.mark.gpu
def test_gpu_compiled_bf16_run_trains_and_saves_a_loadable_model(tmp_path, digits):
    trainer = _trainer(tmp_path, digits, steps=60, batch_size=32, lr=1e-3, mixed_precision="bf16", compile="default",
                       log_every=20, checkpoint_every=60, val_every=0, device="cuda")
    result = trainer.train()
    rows = _rows(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] and result["skipped_steps"] == 0
    model, process = load_model(tmp_path / "checkpoints" / "step_0000060.safetensors")
    images = fastddpm.sample(model.cuda(), 2, steps=5, process=process, progress=False)
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())


def test_a_run_directory_is_locked_while_written(tmp_path, ten_images):
    from fastddpm.run_dir import RunDirInUseError, RunDirLock

    first = _trainer(tmp_path / "run", ten_images, steps=2, batch_size=2, **QUIET)
    other = RunDirLock(tmp_path / "run")  # as another process would: its own open file
    other.acquire()
    try:
        with pytest.raises(RunDirInUseError, match=rf"run directory .*run'.* is in use by pid {os.getpid()}"):
            first.train()
        with pytest.raises(RunDirInUseError, match="in use by pid"):
            _trainer(tmp_path / "run", ten_images, steps=2, batch_size=2, resume=True, **QUIET)
        with pytest.raises(RunDirInUseError, match="in use by pid"):
            first.resume(missing_ok=True)  # it would rewrite the logs
        assert not (tmp_path / "run" / "metrics.csv").exists()  # nothing written by the refused ones
    finally:
        other.release()
    assert first.train()["step"] == 2
    other.acquire()  # released when training ends
    other.release()


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path, ten_images):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"config.json": '{"lr": 1}', "metrics.csv": "a,b\n1,2\n", "loss.png": "not a png"}
    for name, text in files.items():
        (mine / name).write_text(text)
    with pytest.raises(ValueError, match=r"out_dir .*mine.* is not empty and is not a fastddpm run.*config.json"):
        _trainer(mine, ten_images, steps=2, batch_size=2, **QUIET)
    assert sorted(p.name for p in mine.iterdir()) == sorted(files)
    assert all((mine / name).read_text() == text for name, text in files.items())
    # a run's own folder is one: train, then resume into it
    _trainer(tmp_path / "run", ten_images, steps=2, batch_size=2, **QUIET).train()
    assert _trainer(tmp_path / "run", ten_images, steps=3, batch_size=2, resume=True, **QUIET).train()["step"] == 3


def test_a_new_trainer_removes_the_debris_of_killed_writes(tmp_path, ten_images):
    _trainer(tmp_path / "run", ten_images, steps=2, batch_size=2, **QUIET).train()
    debris = [tmp_path / "run" / "checkpoints" / ".step_0000003.safetensors.abc123.tmp",
              tmp_path / "run" / ".metrics.csv.xyz.tmp"]
    for p in debris:
        p.write_bytes(b"\0" * 1000)
    _trainer(tmp_path / "run", ten_images, steps=3, batch_size=2, resume=True, **QUIET)
    assert not any(p.exists() for p in debris)


def test_write_errors_name_the_users_file(tmp_path, monkeypatch):
    from fastddpm import files

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.png.abc.tmp"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"cannot write '.*x\.png': Permission denied") as e:
        files.write_text_atomic(tmp_path / "x.png", "a")
    assert ".tmp" not in str(e.value)


def test_disk_check_counts_every_checkpoint_a_run_keeps(tmp_path, ten_images, monkeypatch):
    one = _trainer(tmp_path / "probe", ten_images, steps=1, batch_size=2).estimated_checkpoint_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=int(3.5 * one)))
    with pytest.raises(OSError, match=r"4 checkpoints of .* keep_last=2, best, one being written"):
        _trainer(tmp_path / "run", ten_images, steps=1, batch_size=2)
    _trainer(tmp_path / "run", ten_images, steps=1, batch_size=2, keep_last=1, keep_best=False)


def test_time_based_checkpoints(tmp_path, ten_images, monkeypatch):
    clock = iter(range(0, 10**6, 20))  # 20 s a call: every step is past checkpoint_minutes=1 of the last save
    import fastddpm.trainer as trainer_module

    trainer = _trainer(tmp_path / "run", ten_images, steps=4, batch_size=2, checkpoint_every=0, log_every=10,
                       keep_last=10, checkpoint_minutes=1.0)
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    trainer.train()
    steps = [p.name for p in Trainer.checkpoints_in(tmp_path / "run")]
    assert len(steps) >= 2 and steps[-1] == "step_0000004.safetensors"  # not only the last one
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        TrainConfig(checkpoint_minutes=-1.0)
