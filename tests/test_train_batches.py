"""The trainer's batch stream (``fastddpm.training.batches``): exact resume from ``(epoch, index)``, the
flips of ``data.random_flip``, and ranks that split the one-process batch."""
import pytest
import torch

from fastddpm.data import random_flip
from fastddpm.training.batches import TrainBatches, check_dataset
from fastddpm.training.streams import STREAM_STEP, mix

SEED, T = 3, 1000


@pytest.fixture(scope="module")
def images():
    """Seven distinct 1x2x3 images (an odd count: batches cross epochs at varying places)."""
    return [torch.arange(6, dtype=torch.float32).reshape(1, 2, 3) / 6 + i for i in range(7)]


def _stream(images, **kw):
    kw = dict(seed=SEED, num_steps=T, batch_size=4, grad_accum=1) | kw
    n = len(images)
    return TrainBatches(images, torch.arange(n), torch.empty(0, dtype=torch.int64), **kw)


def test_a_stream_resumed_at_its_position_continues_bit_for_bit(images):
    whole = _stream(images, random_flip=True)
    expected = [whole.next(step) for step in range(6)]
    first = _stream(images, random_flip=True)
    for step in range(3):
        first.next(step)
    again = _stream(images, random_flip=True)
    again.seek(first.epoch, first.index)  # what a checkpoint saves
    for step in range(3, 6):
        x0, t = again.next(step)
        assert torch.equal(x0, expected[step][0]) and torch.equal(t, expected[step][1])
    assert (again.epoch, again.index) == (whole.epoch, whole.index) == (24 // 7, 24 % 7)


def test_each_epoch_visits_every_image_once(images):
    stream = _stream(images, batch_size=7)
    seen = [stream.next(step)[0][:, 0, 0, 0].floor().tolist() for step in range(3)]
    for epoch in seen:
        assert sorted(epoch) == list(range(7))
    assert seen[0] != seen[1]  # a permutation of its own per epoch


def test_the_flips_are_data_random_flip_after_the_timesteps(images):
    flipped, plain = _stream(images, random_flip=True), _stream(images, random_flip=False)
    for step in range(3):
        x_flip, t_flip = flipped.next(step)
        x0, t = plain.next(step)
        g = torch.Generator().manual_seed(mix(SEED, STREAM_STEP, step))
        assert torch.equal(t, torch.randint(0, T, (4,), generator=g)) and torch.equal(t_flip, t)
        assert torch.equal(x_flip, random_flip(x0, g))  # the step's generator, after the timesteps
    assert not torch.equal(x_flip, x0)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_ranks_take_their_rows_of_each_micro_batch(images, grad_accum):
    """Two ranks (no process group needed: the split is arithmetic) hold rank 0's then rank 1's rows
    of every micro-batch of the one-process step."""
    one = _stream(images, random_flip=True, grad_accum=grad_accum)
    ranks = [_stream(images, random_flip=True, grad_accum=grad_accum, rank=r, world_size=2) for r in (0, 1)]
    for step in range(3):
        x0, t = one.next(step)
        parts = [r.next(step) for r in ranks]
        for m in range(grad_accum):
            for r, (xr, tr) in enumerate(parts):
                rows = slice(m * 4 + r * 2, m * 4 + (r + 1) * 2)
                assert torch.equal(xr[m * 2:(m + 1) * 2], x0[rows]) and torch.equal(tr[m * 2:(m + 1) * 2], t[rows])


def test_an_uncached_split_gathers_the_same_images(images, monkeypatch):
    import fastddpm.training.batches as batches_module

    cached = _stream(images, random_flip=True)
    monkeypatch.setattr(batches_module, "DATA_CACHE_BYTES", 0)
    uncached = _stream(images, random_flip=True)
    assert uncached.train_cache is None and cached.train_cache is not None
    for step in range(2):
        assert torch.equal(uncached.next(step)[0], cached.next(step)[0])


def test_split_holds_out_the_validation_images(images):
    stream = TrainBatches.split(images, 0.3, SEED, num_steps=T, batch_size=2)
    assert stream.train_indices.numel() + stream.val_indices.numel() == 7 and stream.val_indices.numel() >= 1
    assert torch.equal(stream.val_batch(torch.arange(stream.val_indices.numel())),
                       torch.stack([images[int(i)] for i in stream.val_indices]))


def test_check_dataset_refuses_what_the_trainer_cannot_use(images):
    assert check_dataset(images) == (1, 2, 3)
    with pytest.raises(ValueError, match="model takes"):
        check_dataset(images, (1, 3, 3))
    with pytest.raises(ValueError, match="empty"):
        check_dataset([])
    with pytest.raises(TypeError, match="float tensors"):
        check_dataset([torch.zeros(2, 2, dtype=torch.int64)])
