"""The trainer's parts on their own (``fastddpm.training``): the public ``train_step``, the EMA, the
checkpoint rotation and the loop's device-side bookkeeping."""
import pytest
import torch
from torch import nn

from fastddpm import DDPM
from fastddpm.training import meter as meter_module
from fastddpm.training.ema import EMA
from fastddpm.training.meter import StepMeter
from fastddpm.train_config import TrainConfig
from fastddpm.training.rotation import checkpoints_in, latest_checkpoint, remove_old_checkpoints, step_name
from fastddpm.training.schedule import due_after
from fastddpm.training.step import learning_rate, train_step

from toy_models import Pointwise


class Scaled(nn.Module):
    """``w * x`` with a buffer; NaN out when ``nan`` is set."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("calls", torch.zeros(()))
        self.nan = False

    def forward(self, x, t):
        self.calls += 1
        return self.w * x * (float("nan") if self.nan else 1.0)


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 6, 6, generator=g) * 2 - 1, torch.randint(0, 1000, (n,), generator=g)


# -- train_step ---------------------------------------------------------------------------------------
def test_train_step_descends_the_process_loss_with_the_noise_of_the_examples_global_indices():
    torch.manual_seed(0)
    model, process = Pointwise(), DDPM()
    x0, t = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = 5
    with torch.no_grad():
        expected = process.training_loss(model, x0, t, seed=7, sample_offset=step * 4)
    w = model.w.detach().clone()
    loss, grad_norm, ok = train_step(model, opt, process, x0, t, step=step, lr=0.5, seed=7, batch_size=4,
                                     params=list(model.parameters()))
    assert ok is None and opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(loss, expected)
    moved = (model.w.detach() - w).abs()  # one scalar weight: its gradient's norm is its size
    assert float(grad_norm) > 0 and torch.allclose(moved, 0.5 * grad_norm)


def test_train_step_accumulates_micro_batches_to_the_whole_batch():
    """grad_accum=2 of batch 2 takes the step of one batch of 4 (the offsets continue across them)."""
    x0, t = _batch()
    steps = {}
    for accum, b in ((1, 4), (2, 2)):
        torch.manual_seed(0)
        model = Pointwise()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _, _ = train_step(model, opt, DDPM(), x0, t, step=3, lr=0.1, seed=1, batch_size=b, grad_accum=accum,
                                params=list(model.parameters()))
        steps[accum] = (loss, model.w.detach().clone())
    torch.testing.assert_close(steps[2][0], steps[1][0])
    torch.testing.assert_close(steps[2][1], steps[1][1])


@pytest.mark.parametrize("fused", [False, True])
def test_train_step_skip_leaves_a_non_finite_step_out(fused):
    model = Scaled()
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    x0, t = _batch()
    kw = dict(step=0, lr=0.1, seed=0, batch_size=4, params=[model.w], nonfinite="skip")
    _, _, ok = train_step(model, opt, DDPM(), x0, t, **kw)
    assert bool(ok) and int(opt.state[model.w]["step"]) == 1
    w = model.w.detach().clone()
    model.nan = True
    loss, _, ok = train_step(model, opt, DDPM(), x0, t, **kw)
    assert not bool(ok) and not torch.isfinite(loss)
    assert torch.equal(model.w.detach(), w) and int(opt.state[model.w]["step"]) == 1
    assert not hasattr(opt, "found_inf")  # the private flag is the step's own, never left behind


def test_train_step_clips_the_gradient_norm():
    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x0, t = _batch()
    w = model.w.detach().clone()
    _, grad_norm, _ = train_step(model, opt, DDPM(), x0, t, step=0, lr=1.0, seed=0, batch_size=4,
                                 params=[model.w], grad_clip=1e-3)
    assert float(grad_norm) > 1e-3  # the norm before clipping
    assert abs(float(model.w.detach() - w)) == pytest.approx(1e-3, rel=1e-4)


# -- EMA ----------------------------------------------------------------------------------------------
def test_ema_lerps_by_the_decay_of_the_step_and_copies_buffers():
    model = Scaled()
    ema = EMA(model, lambda step: 0.0 if step == 0 else 0.75)
    assert not ema.model.training and not ema.model.w.requires_grad
    with torch.no_grad():
        model.w.fill_(2.0)
        model.calls.fill_(3)
    ema.update(0)  # decay 0: an exact copy
    assert float(ema.model.w) == 2.0 and float(ema.model.calls) == 3
    with torch.no_grad():
        model.w.fill_(6.0)
    ema.update(1)
    assert float(ema.model.w) == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)


def test_ema_leaves_a_skipped_step_out_on_the_device():
    model = Scaled()
    ema = EMA(model, lambda step: 0.5)
    with torch.no_grad():
        model.w.fill_(4.0)
        model.calls.fill_(9)
    ema.update(0, torch.tensor(False))
    assert float(ema.model.w) == 0.5 and float(ema.model.calls) == 0
    ema.update(0, torch.tensor(True))
    assert float(ema.model.w) == pytest.approx(2.25) and float(ema.model.calls) == 9


# -- checkpoint rotation ------------------------------------------------------------------------------
def _touch(out, *steps):
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    for s in steps:
        (d / f"{step_name(s)}.safetensors").write_bytes(b"")
        (d / f"{step_name(s)}.json").write_text("{}")
    return d


def test_checkpoints_are_found_by_step_not_by_name(tmp_path):
    d = _touch(tmp_path, 100, 20, 3)
    (d / "best.safetensors").write_bytes(b"")
    (d / "step_x.safetensors").write_bytes(b"")
    assert [p.name for p in checkpoints_in(tmp_path)] == [f"{step_name(s)}.safetensors" for s in (3, 20, 100)]
    assert latest_checkpoint(tmp_path).name == "step_0000100.safetensors"
    assert latest_checkpoint(tmp_path / "none") is None and checkpoints_in(tmp_path / "none") == []


def test_rotation_keeps_the_last_and_leaves_later_checkpoints_alone(tmp_path):
    """After a resume from step 30, step 40's checkpoint is the old run's: training overwrites it later."""
    d = _touch(tmp_path, 10, 20, 30, 40)
    removed = remove_old_checkpoints(tmp_path, 30, keep_last=2)
    assert [p.name for p in removed] == ["step_0000010.safetensors"]
    assert sorted(p.name for p in d.iterdir()) == [f"{step_name(s)}{e}" for s in (20, 30, 40)
                                                   for e in (".json", ".safetensors")]


# -- the loop's bookkeeping ---------------------------------------------------------------------------
def test_meter_averages_the_taken_steps_of_a_window():
    meter = StepMeter(torch.device("cpu"))
    for done, (loss, ok) in enumerate([(1.0, True), (float("nan"), False), (3.0, True)], 1):
        meter.add(done, torch.tensor(loss), torch.tensor(2.0 * done), torch.tensor(ok))
    meter.check(3, lambda: None)
    assert meter.take_window(skipping=True) == (2.0, 4.0, 3, 2)
    assert meter.take_window(skipping=True) == (None, None, 0, 0)
    assert meter.smoothed_loss() == pytest.approx((0.02 * 0.98 + 0.02 * 3.0) / (1 - 0.98 ** 3))


def test_meter_names_the_first_non_finite_step(tmp_path):
    meter = StepMeter(torch.device("cpu"))
    for done, loss in enumerate([1.0, float("inf"), float("nan")], 1):
        meter.add(done, torch.tensor(loss), torch.tensor(1.0), None)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 2;.*last checkpoint: none"):
        meter.check(3, lambda: None)


def test_meter_stops_a_run_of_skipped_steps(monkeypatch):
    monkeypatch.setattr(meter_module, "MAX_CONSECUTIVE_SKIPS", 2)
    meter = StepMeter(torch.device("cpu"))
    for done, ok in enumerate([False, True, False], 1):
        meter.add(done, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(ok))
    meter.check(3, lambda: None)  # never two in a row
    meter.add(4, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(False))
    with pytest.raises(FloatingPointError, match=r"2 training steps in a row \(up to step 4\)"):
        meter.check(4, lambda: "ckpt")


def test_meter_looks_up_the_last_checkpoint_only_to_name_it(monkeypatch):
    monkeypatch.setattr(meter_module, "MAX_CONSECUTIVE_SKIPS", 2)
    lookups = []

    def last_checkpoint():
        lookups.append(1)
        return "run/checkpoints/step_0000002.safetensors"

    meter = StepMeter(torch.device("cpu"))
    meter.add(1, torch.tensor(1.0), torch.tensor(1.0), None)
    meter.check(1, last_checkpoint)
    assert lookups == []  # nothing to raise: checkpoints/ is not listed
    meter.add(2, torch.tensor(float("nan")), torch.tensor(1.0), None)
    with pytest.raises(FloatingPointError,
                       match=r"step 2;.*\(last checkpoint: run/checkpoints/step_0000002\.safetensors\)"):
        meter.check(2, last_checkpoint)
    assert lookups == [1]
    meter = StepMeter(torch.device("cpu"))
    for done in (1, 2):
        meter.add(done, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(False))
    with pytest.raises(FloatingPointError,
                       match=r"diverged \(last checkpoint: run/checkpoints/step_0000002\.safetensors\)"):
        meter.check(2, last_checkpoint)
    assert lookups == [1, 1]


# -- the loop's schedule ------------------------------------------------------------------------------
def test_the_schedule_of_a_run():
    c = TrainConfig(steps=12, log_every=2, checkpoint_every=6, val_every=4, sample_every=5, warmup_steps=4, lr=1.0)
    due = {done: due_after(c, done, has_val=True) for done in range(1, 13)}
    assert [d for d in due if due[d].log] == [2, 4, 6, 8, 10, 12]
    assert [d for d in due if due[d].checkpoint] == [6, 12]
    assert [d for d in due if due[d].validate] == [4, 8, 12]
    assert [d for d in due if due[d].sample] == [5, 10, 12]  # and the last step
    assert not due[1] and not due[3] and due[5]
    assert not due_after(c, 12, has_val=False).validate
    stopped = due_after(c, 7, has_val=True, stop=True)
    assert stopped.checkpoint and stopped.log and due_after(c, 7, has_val=True, overdue=True).checkpoint
    assert [learning_rate(c, s) for s in (0, 2, 3, 10)] == [0.25, 0.75, 1.0, 1.0]


# -- what the trainer wires together ------------------------------------------------------------------
def test_the_automatic_layout_and_the_image_shape_a_model_says():
    from fastddpm.training.batches import model_image_shape
    from fastddpm.training.plan import resolve_channels_last

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not resolve_channels_last(None, cpu, "bf16") and not resolve_channels_last(None, gpu, "no")
    assert resolve_channels_last(None, gpu, "bf16") and resolve_channels_last(True, cpu, "no")
    assert not resolve_channels_last(False, gpu, "bf16")

    class Config:
        in_channels, image_size = 3, 8

    with_config = Scaled()
    with_config.config = Config()
    assert model_image_shape(with_config) == (3, 8, 8) and model_image_shape(Scaled()) is None


def test_prepare_model_on_one_rank_trains_the_module_itself():
    from fastddpm.training.step import prepare_model

    model = Scaled().eval()
    plain, ddp, train_model = prepare_model(model, torch.device("cpu"), channels_last=False, world_size=1)
    assert plain is model and plain.training and ddp is None and train_model is model


def test_a_checkpoints_state_restores_the_loops_counters_and_an_ema_from_the_model(tmp_path):
    """``checkpoint_state`` and ``restore_checkpoint`` round-trip; a checkpoint without an EMA section
    gives the EMA the model's weights."""
    from fastddpm.checkpoint import load_checkpoint, save_checkpoint
    from fastddpm.training.batches import TrainBatches
    from fastddpm.training.checkpointing import checkpoint_state, restore_checkpoint

    process, config = DDPM(), TrainConfig(batch_size=2)
    data = [torch.zeros(2, 6, 6) for _ in range(4)]

    def parts():
        model = Pointwise()
        batches = TrainBatches.split(data, 0.0, 0, num_steps=process.num_steps, batch_size=2, grad_accum=1,
                                     random_flip=False, device=torch.device("cpu"), rank=0, world_size=1)
        return model, torch.optim.Adam(model.parameters()), batches, StepMeter(torch.device("cpu"))

    model, optimizer, batches, meter = parts()
    with torch.no_grad():
        model.w.fill_(0.7)
    batches.seek(1, 2)
    meter.restore(0.25, 3)
    state = checkpoint_state(process=process, config=config, step=5, batches=batches, best_metric=0.5, best_step=4,
                             last_val=None, meter=meter, skipped_steps=1, elapsed=2.5, precision="no", scaler=None,
                             world_size=1)
    assert state["metric"] == "train_loss_smoothed" and (state["epoch"], state["index"]) == (1, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=optimizer, state=state)

    model2, optimizer2, batches2, meter2 = parts()
    ema = Pointwise()
    done = restore_checkpoint(load_checkpoint(path), model=model2, ema_model=ema, optimizer=optimizer2, scaler=None,
                              batches=batches2, meter=meter2)
    assert (done.step, done.best_metric, done.best_step, done.skipped_steps, done.elapsed) == (5, 0.5, 4, 1, 2.5)
    assert (batches2.epoch, batches2.index) == (1, 2) and meter2.loss_ema_count == 3
    assert float(model2.w.detach()) == float(ema.w.detach()) == pytest.approx(0.7)


def test_a_new_best_is_finite_and_lower():
    from fastddpm.training.checkpointing import is_new_best

    assert is_new_best(1.0, None) and is_new_best(0.5, 1.0)
    assert not is_new_best(1.0, 1.0) and not is_new_best(None, 1.0) and not is_new_best(float("nan"), None)


def test_a_window_row_counts_images_per_second_and_skipped_steps():
    from fastddpm.training.report import train_result, window_row

    row = window_row(10, loss=0.5, lr=1e-3, grad_norm=2.0, steps=5, kept=4, images_per_step=8, seconds=2.0,
                     elapsed=7.0)
    assert row["images_per_s"] == 20.0 and row["skipped"] == 1 and row["val_loss"] is None
    result = train_result(step=10, last_row=row, smoothed_loss=0.4, last_val={"val_loss": 0.3}, best_metric=0.3,
                          best_step=10, skipped_steps=1, elapsed=7.0, checkpoint="", stopped_by=None)
    assert (result["loss"], result["val_loss"], result["val_loss_ema"], result["lr"]) == (0.5, 0.3, None, 1e-3)


def test_claiming_an_out_dir_locks_it_and_clears_interrupted_writes(tmp_path):
    from fastddpm.run_dir import RunDirLock
    from fastddpm.training.out_dir import claim_out_dir

    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".step_0000001.safetensors.tmp"
    stale.write_bytes(b"")
    lock = RunDirLock(tmp_path)
    claim_out_dir(tmp_path, lock, keep_last=1, keep_best=False, checkpoint_bytes=1)
    try:
        assert lock.held and not stale.exists()
    finally:
        lock.release()


def test_the_run_config_records_the_models_config_as_checkpoints_do(tmp_path):
    import json

    from fastddpm.checkpoint import model_config_dict
    from fastddpm.models import create_model
    from fastddpm.training.out_dir import write_run_config

    for model, expected in ((create_model("tiny"), create_model("tiny").config.to_dict()), (Scaled(), None)):
        assert model_config_dict(model) == expected
        path = write_run_config(tmp_path, model, DDPM(), TrainConfig(steps=1), precision="fp32",
                                device=torch.device("cpu"), world_size=1)
        assert json.loads(path.read_text())["model_config"] == expected
