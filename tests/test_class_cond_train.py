"""Class-conditional training: the U-Net's class embedding, labelled data from every source, the
label drops of classifier-free guidance in the seeded batch stream (exact resume), checkpoints that
carry the class names, a diffusers ``UNet2DModel`` with class embeddings, and ``train --class-cond``.

Runs use the ``tiny`` preset (8x8 gray) on a few digits, a few steps each.
"""
import inspect
import json
import math

import numpy as np
import pytest
import torch

from fastddpm import DDPM
from fastddpm.checkpoint import load_checkpoint, load_model, read_metadata, save_model
from fastddpm.data import ArrayDataset, ImageFolderDataset, dataset_labels, digits_dataset, load_dataset
from fastddpm.models import UNet, UNetConfig, create_model
from fastddpm.trainer import TrainConfig, Trainer
from fastddpm.training.batches import TrainBatches

from tolerances import FP32, assert_close

K = 10  # the digits' classes
QUIET = dict(log_every=10, checkpoint_every=0, val_every=0, random_flip=False)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(image_size=8)


@pytest.fixture(scope="module")
def labelled(digits):
    """20 digits with their labels (every class twice), as (images, labels) give them."""
    return ArrayDataset(digits.images[:20].numpy(), labels=digits.labels[:20])


def _model(num_classes=K, seed=0):
    return create_model("tiny", num_classes=num_classes, seed=seed)


def _trainer(out_dir, dataset, model=None, resume=False, **config):
    return Trainer(model if model is not None else _model(), DDPM(), dataset,
                   TrainConfig(**{"class_cond": True, **config}), out_dir, device="cpu", resume=resume,
                   progress=False)


def _tensors(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema_model.state_dict().items()})
    for i, entries in trainer.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in entries.items()})
    return out


# -- the model ---------------------------------------------------------------------------------
def test_class_embedding_conditions_the_output_and_none_is_the_null_class():
    model = _model().eval()
    assert (model.num_classes, model.null_class) == (K, K)
    assert tuple(model.label_emb.weight.shape) == (K + 1, 4 * model.config.base_channels)
    x, t = torch.randn(K + 1, 1, 8, 8), torch.full((K + 1,), 500)
    x = x[:1].expand(K + 1, -1, -1, -1)  # the same image and step for every class
    with torch.no_grad():
        out = model(x, t, class_labels=torch.arange(K + 1))
        # every class (and the null class) gives another prediction for the same input
        flat = out.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(K + 1) * 1e9).min() > 1e-4
        # None is the null class; a 0-dim label is every sample's
        assert torch.equal(model(x, t), model(x, t, class_labels=torch.full((K + 1,), K)))
        assert torch.equal(model(x, t, class_labels=torch.tensor(3)), model(x, t, class_labels=torch.full((K + 1,), 3)))
        # any integer dtype is taken as int64
        assert torch.equal(model(x, t, class_labels=torch.arange(K + 1, dtype=torch.int32)), out)


def test_an_unconditional_model_is_unchanged_and_refuses_labels():
    plain = create_model("tiny", seed=0)
    assert plain.num_classes is None and plain.null_class is None and plain.label_emb is None
    assert not any("label_emb" in k for k in plain.state_dict())
    assert "num_classes" in plain.config.to_dict() and plain.config.num_classes is None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_labels given to an unconditional UNet"):
        plain(x, t, class_labels=torch.tensor([0, 1]))
    # the shipped unconditional presets load as before (no num_classes in their config)
    assert create_model(PRESET_CONFIG, seed=0).num_classes is None


PRESET_CONFIG = {k: v for k, v in UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                                             attention_resolutions=(4,), num_groups=4).to_dict().items()
                 if k != "num_classes"}


def test_label_checks_in_forward_and_config():
    model = _model()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="integer tensor"):
        model(x, t, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(x, t, class_labels=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="must be an int64 torch.Tensor"):
        model(x, t, class_labels=[0, 1])
    with pytest.raises(ValueError, match=r"class_labels must be a scalar or have shape \(2,\)"):
        model(x, t, class_labels=torch.tensor([0, 1, 2]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be None or a positive int"):
            UNetConfig(image_size=8, num_classes=bad)
    config = create_model("small", num_classes=K).config
    assert config.num_classes == K and UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- labelled data -----------------------------------------------------------------------------
def test_digits_have_their_digits_as_labels(digits):
    labels, names = dataset_labels(digits)
    assert names == [str(d) for d in range(10)] and labels.dtype == torch.int64 and labels.shape == (1797,)
    assert torch.equal(labels, digits.labels) and set(labels.tolist()) == set(range(10))


def test_image_folder_classes_are_its_sorted_subfolders(tmp_path):
    from PIL import Image

    for cls, n in (("dog", 2), ("cat", 1), ("emu", 3)):
        (tmp_path / "root" / cls / "nested").mkdir(parents=True)
        for i in range(n):
            where = tmp_path / "root" / cls / ("nested" if i == 2 else "") / f"{i}.png"
            Image.new("L", (8, 8), 40 * i).save(where)
    ds = ImageFolderDataset(tmp_path / "root", 8, channels=1)
    labels, names = dataset_labels(ds)
    assert names == ["cat", "dog", "emu"]  # torchvision's ImageFolder: sorted names give the indices
    assert [p.relative_to(tmp_path / "root").parts[0] for p in ds.paths] == [names[i] for i in labels.tolist()]
    assert labels.tolist() == [0, 1, 1, 2, 2, 2]
    # an image in the root itself: no labels, and a class-conditional run says so
    Image.new("L", (8, 8)).save(tmp_path / "root" / "stray.png")
    flat = ImageFolderDataset(tmp_path / "root", 8, channels=1)
    assert flat.labels is None and dataset_labels(flat) is None
    with pytest.raises(ValueError, match="class_cond=True needs a dataset with class labels.*ImageFolderDataset"):
        _trainer(tmp_path / "run", flat, steps=1, batch_size=2)


def test_npz_labels_by_y_or_labels_with_clear_errors(tmp_path, digits):
    images = (digits.images[:6, 0].numpy() + 1) / 2
    y = np.array([0, 1, 2, 0, 1, 2])
    for key in ("y", "labels"):
        np.savez(tmp_path / f"{key}.npz", images=images, **{key: y})
        labels, names = dataset_labels(load_dataset(tmp_path / f"{key}.npz"))
        assert labels.tolist() == y.tolist() and names == ["0", "1", "2"]
    np.savez(tmp_path / "named.npz", images=images, y=y, class_names=np.array(["a", "b", "c", "d"]))
    assert dataset_labels(load_dataset(tmp_path / "named.npz"))[1] == ["a", "b", "c", "d"]
    np.savez(tmp_path / "plain.npz", images=images)
    assert load_dataset(tmp_path / "plain.npz").labels is None
    np.savez(tmp_path / "both.npz", images=images, y=y, labels=y)
    with pytest.raises(ValueError, match="both 'y' and 'labels'"):
        load_dataset(tmp_path / "both.npz")
    bad = {"short": (y[:5], ValueError, r"must have shape \(6,\), one class per image, got \(5,\)"),
           "float": (y.astype(np.float32), TypeError, "must be integers.*float32.*cast them"),
           "negative": (y - 1, ValueError, r"must lie in \[0, \.\.\.\)"),
           "bool": (y > 0, TypeError, "must be integers")}
    for name, (labels, error, match) in bad.items():
        np.savez(tmp_path / f"{name}.npz", images=images, y=labels)
        with pytest.raises(error, match=match):
            load_dataset(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "names.npz", images=images, y=y, class_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="labels go up to 2 but there are only 2"):
        load_dataset(tmp_path / "names.npz")


def test_arrays_and_tensors_with_labels_in_python(digits):
    images, labels = digits.images[:6], digits.labels[:6]
    for ds in (load_dataset((images, labels)), load_dataset((images.numpy(), labels.numpy())),
               ArrayDataset(images, labels=labels.tolist())):
        assert torch.equal(dataset_labels(ds)[0], labels)
    with pytest.raises(ValueError, match=r"must have shape \(6,\)"):
        load_dataset((images, labels[:3]))
    with pytest.raises(ValueError, match="class_names given for array without labels"):
        ArrayDataset(images, class_names=["a"])


# -- the trainer -------------------------------------------------------------------------------
def test_class_cond_refuses_what_cannot_train(tmp_path, digits, labelled):
    unlabelled = ArrayDataset(digits.images[:8].numpy())
    with pytest.raises(ValueError, match="class_cond=True needs a dataset with class labels.*ArrayDataset"):
        _trainer(tmp_path / "a", unlabelled, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=r"class_cond=True needs a class-conditional model: create_model\(preset, "
                                         r"num_classes=K\)"):
        _trainer(tmp_path / "b", labelled, model=create_model("tiny"), steps=1, batch_size=2)
    with pytest.raises(ValueError, match="the dataset has 10 classes .* but the model 12: build it with num_classes=10"):
        _trainer(tmp_path / "c", labelled, model=_model(12), steps=1, batch_size=2)
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"cond_drop must be a float in \[0, 1\)"):
            TrainConfig(cond_drop=bad)
    with pytest.raises(ValueError, match="class_cond must be a bool"):
        TrainConfig(class_cond=1)
    # labels on a dataset object are checked once, before training
    bad = ArrayDataset(digits.images[:8].numpy())
    bad.labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7.5])
    with pytest.raises(TypeError, match="ArrayDataset.labels must be integers"):
        _trainer(tmp_path / "d", bad, steps=1, batch_size=2)


def _stream(dataset, labels, cond_drop=0.2, random_flip=True, **kw):
    return TrainBatches.split(dataset, 0.0, 3, num_steps=1000, batch_size=16, random_flip=random_flip,
                              labels=labels, cond_drop=cond_drop, null_class=K, **kw)


def test_cond_drop_draws_the_null_class_at_its_rate_and_leaves_the_rest_of_the_stream_alone(labelled):
    labels = dataset_labels(labelled)[0]
    cond = _stream(labelled, labels, cond_drop=0.2)
    plain = _stream(labelled, None)
    dropped = total = 0
    for step in range(200):
        x0, t, y = cond.next_batch(step)
        px, pt = plain.next(step)
        assert torch.equal(x0, px) and torch.equal(t, pt)  # timesteps, flips, data order as unconditional
        keep = y != K
        dropped += int((~keep).sum())
        total += y.numel()
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= K
    # 3200 Bernoulli(0.2) draws: mean 640, sd ~22.6; 5 sd either way
    assert abs(dropped - 0.2 * total) < 5 * math.sqrt(total * 0.2 * 0.8), dropped / total
    # the kept labels are the labels of the images drawn: replay the positions
    again = _stream(labelled, labels, cond_drop=0.2)
    for step in range(5):
        index_before = (again.epoch, again.index)
        _, _, y = again.next_batch(step)
        check = _stream(labelled, labels, cond_drop=0.0)
        check.seek(*index_before)
        _, _, y_true = check.next_batch(step)
        assert torch.equal(torch.where(y == K, y_true, y), y_true)
    # the drops are the seeded step stream's, a function of (seed, step) alone: not torch's global RNG,
    # which ranks > 0 draw from on their own (they would drop other labels than rank 0)
    a, b = _stream(labelled, labels), _stream(labelled, labels)
    for step in range(5):
        torch.manual_seed(step)
        ya = a.next_batch(step).labels
        torch.manual_seed(step + 100)
        assert torch.equal(ya, b.next_batch(step).labels)
    # cond_drop 0: no label is ever the null class
    never = _stream(labelled, labels, cond_drop=0.0)
    assert all(int(never.next_batch(s)[2].max()) < K for s in range(20))


def test_two_ranks_share_the_labels_of_one_process(labelled):
    labels = dataset_labels(labelled)[0]
    one = _stream(labelled, labels, grad_accum=2)
    ranks = [_stream(labelled, labels, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        y = one.next_batch(step).labels
        parts = [r.next_batch(step).labels for r in ranks]
        # micro-batch m of rank r: rows m*16 + r*8 ... of the global step
        want = torch.cat([torch.cat([y[m * 16 + r * 8: m * 16 + (r + 1) * 8] for m in range(2)]) for r in range(2)])
        assert torch.equal(torch.cat(parts), want)


def test_labels_reach_the_model_and_dropped_ones_train_the_null_class(tmp_path, labelled):
    trainer = _trainer(tmp_path / "a", labelled, steps=1, batch_size=20, cond_drop=0.0, **QUIET)
    trainer.train_step(0)
    grad = trainer.model.label_emb.weight.grad
    assert (grad[:K].abs().sum(1) > 0).all() and torch.equal(grad[K], torch.zeros_like(grad[K]))
    dropping = _trainer(tmp_path / "b", labelled, steps=1, batch_size=20, cond_drop=0.5, **QUIET)
    dropping.train_step(0)
    assert dropping.model.label_emb.weight.grad[K].abs().sum() > 0


def test_resume_is_bit_identical_with_label_drops_ema_accumulation_and_validation(tmp_path, labelled):
    cfg = dict(batch_size=4, grad_accum=2, lr=1e-3, ema_decay=0.9, val_fraction=0.2, val_every=4, log_every=2,
               checkpoint_every=4, cond_drop=0.3, random_flip=True)
    whole = _trainer(tmp_path / "whole", labelled, steps=8, **cfg)
    whole.train()
    _trainer(tmp_path / "split", labelled, steps=4, **cfg).train()
    torch.rand(100)  # the global RNG moves on; resume restores it
    second = _trainer(tmp_path / "split", labelled, model=_model(seed=1), steps=8, resume=True, **cfg)
    assert second.step == 4
    second.train()
    a, b = _tensors(whole), _tensors(second)
    assert a.keys() == b.keys() and any("label_emb" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] is not None for r in rows if r["step"] % 4 == 0)
    # a different drop rate is a different run
    other = _trainer(tmp_path / "other", labelled, steps=8, **{**cfg, "cond_drop": 0.0})
    other.train()
    assert not torch.equal(other.model.label_emb.weight, whole.model.label_emb.weight)


def test_checkpoints_carry_class_names_through_load_model_and_export(tmp_path, labelled, digits):
    _trainer(tmp_path / "run", labelled, steps=2, batch_size=4, **QUIET).train()
    path = tmp_path / "run" / "checkpoints" / "step_0000002.safetensors"
    meta = read_metadata(path)
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["model_config"]["num_classes"] == K
    model, process = load_model(path)
    assert model.class_names == [str(d) for d in range(10)] and model.num_classes == K
    # named classes survive the export (save_model) and its load
    model.class_names = list("abcdefghij")
    save_model(tmp_path / "release.safetensors", model, process)
    again, _ = load_model(tmp_path / "release.safetensors")
    assert again.class_names == list("abcdefghij")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # an unconditional model has none
    plain = create_model("tiny", seed=0)
    save_model(tmp_path / "plain.safetensors", plain, process)
    assert load_model(tmp_path / "plain.safetensors")[0].class_names is None
    assert "class_names" not in read_metadata(tmp_path / "plain.safetensors")


def test_load_model_refuses_class_names_that_do_not_fit(tmp_path):
    model = _model()
    model.class_names = ["a", "b"]
    save_model(tmp_path / "bad.safetensors", model, DDPM())
    with pytest.raises(ValueError, match="has 2 class_names but its model has 10 classes"):
        load_model(tmp_path / "bad.safetensors")


def _tiny_unet2d(num_class_embeds):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_class_embeds)


def test_diffusers_unet2dmodel_with_class_embeds_trains_class_conditionally(tmp_path, labelled):
    pytest.importorskip("diffusers")
    from fastddpm.adapters import ModelAdapter

    model = _tiny_unet2d(K + 1)
    trainer = _trainer(tmp_path / "run", labelled, model=model, steps=3, batch_size=4, cond_drop=0.5, **QUIET)
    assert model.fastddpm_null_class == K and trainer.ema_model.fastddpm_null_class == K
    adapter = ModelAdapter(trainer.ema_model)
    assert (adapter.num_classes, adapter.null_class) == (K, K)
    before = model.class_embedding.weight.detach().clone()
    result = trainer.train()
    assert result["step"] == 3 and math.isfinite(result["loss"])
    changed = (model.class_embedding.weight.detach() != before).any(1)
    assert changed.any()  # the class embedding was trained
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000003.safetensors").metadata
    assert meta["fastddpm_null_class"] == K and meta["class_names"] == [str(d) for d in range(10)]
    # the loss through DDPM.loss with the adapter's keyword equals the trainer's call
    x0, t = torch.stack([labelled[i] for i in range(4)]), torch.tensor([3, 300, 600, 900])
    y = torch.tensor([0, 1, 2, K])
    loss = DDPM().loss(model, x0, t, seed=0, model_kwargs=ModelAdapter(model).label_kwargs(y))
    null = DDPM().loss(model, x0, t, seed=0, model_kwargs={"class_labels": torch.full((4,), K)})
    assert torch.isfinite(loss) and loss != null
    with pytest.raises(ValueError, match=r"needs a diffusers UNet2DModel with num_class_embeds=K \+ 1"):
        _trainer(tmp_path / "plain", labelled, model=_tiny_unet2d(None), steps=1, batch_size=2)


def test_ddpm_loss_passes_model_kwargs():
    model = _model().eval()
    x0, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([10, 500, 900])
    y = torch.tensor([1, 2, 3])
    process = DDPM()
    with_labels = process.loss(model, x0, t, seed=5, model_kwargs={"class_labels": y})
    by_hand = process.training_loss(lambda x, tt: model(x, tt, class_labels=y), x0, t, seed=5)
    assert_close(with_labels, by_hand, **FP32)
    assert process.loss(model, x0, t, seed=5) != with_labels  # None: the null class
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        process.loss(model, x0, t, seed=5, model_kwargs=[y])


def test_class_cond_sample_grid_has_a_row_per_class(tmp_path, labelled):
    from fastddpm import sample

    if "class_labels" not in inspect.signature(sample).parameters:
        pytest.skip("fastddpm.sample(class_labels=) is not there yet (the lead adds it)")
    from PIL import Image

    trainer = _trainer(tmp_path / "run", labelled, steps=1, batch_size=4, sample_every=1, sample_n=20,
                       sample_steps=2, **QUIET)
    trainer.train()
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000001.png")
    # 10 rows of 2 images of 8 px with 2 px padding, upscaled by 256 // 16
    scale = 256 // 16
    assert grid.size == ((2 * 10 + 2) * scale, (10 * 10 + 2) * scale)


def test_cli_train_class_cond_tiny_run(tmp_path, digits, capsys):
    from fastddpm.cli import main

    out = tmp_path / "run"
    code = main(["train", "--data", "digits", "--preset", "tiny", "--steps", "2", "--batch-size", "8",
                 "--class-cond", "--cond-drop", "0.2", "--out", str(out), "--log-every", "1"])
    assert code == 0
    model, _ = load_model(out / "checkpoints" / "step_0000002.safetensors")
    assert model.num_classes == K and model.class_names == [str(d) for d in range(10)]
    saved = read_metadata(out / "checkpoints" / "step_0000002.safetensors")["train_config"]
    assert saved["class_cond"] is True and saved["cond_drop"] == 0.2
    np.savez(tmp_path / "plain.npz", images=(digits.images[:8, 0].numpy() + 1) / 2)
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "plain.npz"), "--preset", "tiny", "--steps", "1",
                 "--class-cond", "--out", str(tmp_path / "plain")]) == 2
    assert "--class-cond: the data" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--preset", "tiny", "--steps", "1", "--class-cond",
                 "--cond-drop", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "cond_drop must be a float in [0, 1)" in capsys.readouterr().err


# -- several ranks -----------------------------------------------------------------------------
DDP_RUN = dict(steps=4, batch_size=8, grad_accum=2, val_fraction=0.2, val_every=2, checkpoint_every=2, cond_drop=0.3,
               lr=2e-4, ema_decay=0.9, random_flip=True, log_every=1, mixed_precision="no")


def _ddp_images():
    d = digits_dataset(image_size=8)
    return ArrayDataset(d.images[:22].numpy(), labels=d.labels[:22])


def _job_class_cond(rank, tmp):
    trainer = _trainer(tmp / f"run{rank}", _ddp_images(), **DDP_RUN)
    trainer.train()
    return {k: v.detach().clone() for k, v in _tensors(trainer).items() if not k.startswith("optim.")}


def test_two_ranks_train_class_conditionally_like_one_process(tmp_path, monkeypatch):
    from test_trainer_ddp import AFTER_STEPS, _spawn

    got = _spawn(_job_class_cond, tmp_path, monkeypatch)
    one = _trainer(tmp_path / "one", _ddp_images(), **DDP_RUN)
    one.train()
    want = {k: v for k, v in _tensors(one).items() if not k.startswith("optim.")}
    assert got.keys() == want.keys() and "model.label_emb.weight" in want
    for k, v in want.items():
        assert_close(got[k], v, **AFTER_STEPS, msg=k)
    assert read_metadata(tmp_path / "run0" / "checkpoints" / "step_0000004.safetensors")["class_names"] == \
        [str(d) for d in range(10)]


def test_the_readme_class_conditional_recipe(tmp_path, monkeypatch):
    """The README's recipe of the class-conditional digits model, at the README tests' small scale."""
    from test_readme import _blocks_after, _run_all

    commands = _blocks_after("## Class-conditional training")
    assert [c.split()[2 if c.startswith("OMP") else 1] for c in commands] == ["train", "export"]
    assert "--class-cond" in commands[0]
    (tmp_path / "fastddpm" / "assets").mkdir(parents=True)
    _run_all(commands, tmp_path, monkeypatch)
    model, process = load_model(tmp_path / "fastddpm" / "assets" / "digits_cond_small.safetensors")
    assert model.num_classes == K and model.class_names == [str(d) for d in range(10)]
    assert process.num_steps == 50
