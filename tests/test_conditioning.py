"""Conditional sampling: class labels, model kwargs, classifier-free guidance, ``noise=`` and
editable callbacks through ``fastddpm.sample`` on every path (eager, engine, micro-batches), the
``SamplingRequest`` that slices them and the ``Denoiser`` that makes the model call; the diffusers
and denoising-diffusion-pytorch families as they are, against hand-written guided loops.
(The sharded path is in test_distributed.py; the fused guided step ops in tests/ops/.)"""
import pathlib
import sys

import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.adapters import ModelAdapter
from fastddpm.denoiser import Denoiser, rescale_guidance
from fastddpm.request import SamplingRequest
from tolerances import EXACT, FP32, PEER, assert_close
from toy_models import LabelledPointwise, Pointwise

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from peers import diffusers_guided_loop  # noqa: E402  (the one diffusers-style guided loop, the benchmark's)

LABELS = [0, 2, 1, 1, 0]
SAMPLERS = {"ddpm": dict(steps=6), "ddim": dict(sampler="ddim", steps=6), "dpm++2m": dict(sampler="dpm++2m", steps=6),
            "dpm++2m-sde": dict(sampler="dpm++2m-sde", steps=6), "unipc": dict(sampler="unipc", steps=6)}
PATHS = {"eager": dict(engine=False), "engine": dict(engine=True),
         "engine-reference": dict(engine=True, backend="reference")}


def _sample(model, n, **kw):
    return fastddpm.sample(model, n, progress=False, **kw)


# -- the request -----------------------------------------------------------------------------------
def test_request_slices_per_sample_tensors_with_their_samples():
    shared = torch.ones(2, 3)  # first dimension 2: shared, even in a slice of 2 samples
    per = torch.arange(5.0)
    r = SamplingRequest.make(5, seed=3, sample_offset=10, class_labels=LABELS,
                             model_kwargs={"shift": per, "table": shared, "mode": "a"}, noise=torch.randn(5, 2, 6, 6))
    part = r.slice(1, 3)
    assert (part.n, part.seed, part.sample_offset) == (2, 3, 11)
    assert part.class_labels.tolist() == LABELS[1:3]
    assert part.model_kwargs["shift"].tolist() == [1.0, 2.0]
    assert part.model_kwargs["table"] is shared and part.model_kwargs["mode"] == "a"
    assert torch.equal(part.noise, r.noise[1:3])
    assert [(start, b.n, b.sample_offset) for start, b in r.batches(2)] == [(0, 2, 10), (2, 2, 12), (4, 1, 14)]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(class_labels=[0, 1]), ValueError, r"one label per sample: shape \(5,\)"),
    (dict(class_labels=[0, 1, 2, 3, -1]), ValueError, "class_labels must be >= 0"),
    (dict(class_labels=torch.zeros(5)), TypeError, "class_labels must be integers"),
    (dict(class_labels=[0, 1, 2, 3, 0.5]), TypeError, "list of ints"),
    (dict(class_labels="3"), TypeError, "class_labels must be an int"),
    (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict"),
    (dict(model_kwargs={"t": 1}), ValueError, r"model_kwargs\['t'\]"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=True), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=2.0, guidance_rescale=1.5), ValueError, r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(guidance_rescale=0.5), ValueError, "give guidance_scale= too"),
    (dict(uncond_kwargs={}), ValueError, "give guidance_scale= too"),
    (dict(guidance_scale=2.0, guidance_batching="parallel"), ValueError, "guidance_batching must be one of"),
    (dict(noise=torch.randn(4, 2, 6, 6)), ValueError, r"noise must be the starting noise x_T .* n=5"),
    (dict(noise=torch.zeros(5, 2, 6, 6, dtype=torch.int64)), TypeError, "noise must be a floating-point tensor"),
])
def test_request_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingRequest.make(5, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(class_labels=[0, 1, 2, 3, 3]), ValueError, r"class_labels must lie in \[0, 2\]"),
    (dict(guidance_scale=2.0, class_labels=LABELS, model_kwargs={"shift": torch.zeros(4)}), ValueError,
     r"model_kwargs\['shift'\] has first dimension 4"),
    (dict(noise=torch.randn(5, 1, 6, 6)), ValueError, r"noise must be x_T of shape \(5, 2, 6, 6\)"),
    (dict(noise=torch.full((5, 2, 6, 6), float("nan"))), ValueError, "not finite"),
])
@pytest.mark.parametrize("path", ["eager", "engine"])
def test_bad_conditioning_fails_before_the_model_is_called(kwargs, error, match, path):
    model = LabelledPointwise()
    with pytest.raises(error, match=match):
        _sample(model, 5, steps=3, **PATHS[path], **kwargs)
    assert model.calls == 0


def test_labels_for_an_unconditional_model_and_guidance_without_a_null_class_are_refused():
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match="unconditional model"):
        _sample(fastddpm.create_model("tiny").eval(), 2, steps=2, class_labels=1)
    unet = _tiny_unet2d(num_class_embeds=4)
    assert isinstance(unet, UNet2DModel)
    with pytest.raises(ValueError, match=r"guidance_scale=3 needs an unconditional model call.*uncond_kwargs"):
        _sample(unet, 2, steps=2, class_labels=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"guidance_scale=2 needs an unconditional model call"):
        _sample(Pointwise(), 2, steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        _sample(unet, 2, steps=2, class_labels=4)


# -- the noise contract, every path ------------------------------------------------------------------
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_sample_i_with_label_y_i_is_the_same_for_any_batching_and_path(sampler, path, guidance):
    model = LabelledPointwise()
    shift = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05])
    kw = dict(SAMPLERS[sampler], seed=4, guidance_scale=guidance, model_kwargs={"shift": shift})
    whole = _sample(model, 5, engine=False, class_labels=LABELS, **kw)
    parts = _sample(model, 5, batch_size=2, class_labels=LABELS, **PATHS[path], **kw)
    assert_close(parts, whole, **FP32)
    tail = _sample(model, 2, sample_offset=3, class_labels=LABELS[3:], **PATHS[path],
                   **dict(kw, model_kwargs={"shift": shift[3:]}))
    assert_close(tail, whole[3:], **FP32)
    # the conditioning changes the images: the labels, and the guidance
    other = _sample(model, 5, engine=False, class_labels=[1, 1, 0, 2, 2], **kw)
    assert (other - whole).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_guidance_equals_the_combined_output_of_a_hand_guided_model(sampler):
    """sample(guidance_scale=w) equals sampling a model that returns u + w (c - u) itself, for both
    batchings (the doubled batch and two calls)."""
    model, w = LabelledPointwise(), 2.5
    labels = torch.tensor(LABELS)

    class Guided(torch.nn.Module):
        image_size, in_channels = 6, 2

        def forward(self, x, t, y=None):
            c, u = model(x, t, y=y), model(x, t, y=torch.full_like(y, 3))
            return u + w * (c - u)

    expected = _sample(Guided(), 5, engine=False, class_labels=labels, **SAMPLERS[sampler])
    for batching in ("batched", "sequential"):
        for path in PATHS.values():
            got = _sample(model, 5, class_labels=labels, guidance_scale=w, guidance_batching=batching,
                          **path, **SAMPLERS[sampler])
            assert_close(got, expected, **FP32)


def test_guidance_scale_one_is_the_conditional_model_alone():
    model = LabelledPointwise()
    plain = _sample(model, 5, steps=4, class_labels=LABELS)
    calls = model.calls
    assert_close(_sample(model, 5, steps=4, class_labels=LABELS, guidance_scale=1.0), plain, **EXACT)
    assert model.calls - calls == 4  # one call per step, no unconditional branch


def test_the_doubled_batch_makes_one_call_per_step_and_sequential_two():
    model = LabelledPointwise()
    _sample(model, 3, steps=4, class_labels=1, guidance_scale=2.0, engine=False)
    assert model.calls == 4
    _sample(model, 3, steps=4, class_labels=1, guidance_scale=2.0, engine=False, guidance_batching="sequential")
    assert model.calls == 4 + 8


def _diffusers_rescale_noise_cfg():
    """diffusers' ``rescale_noise_cfg``, taken from its source (its module imports transformers, which
    the test extras do not install)."""
    import ast
    import importlib.util
    import pathlib

    path = pathlib.Path(importlib.util.find_spec("diffusers").origin).parent / "pipelines" / "stable_diffusion" / \
        "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "rescale_noise_cfg"]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["rescale_noise_cfg"]


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg():
    rescale_noise_cfg = _diffusers_rescale_noise_cfg()
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    guided = uncond + 4.0 * (cond - uncond)
    assert_close(rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, guidance_rescale=0.7), **FP32)
    class Linear(LabelledPointwise):  # an output that never saturates (its std stays away from 0)
        def forward(self, x, t, y=None):
            return (0.5 + self.emb[y].reshape(-1, 1, 1, 1)) * x + 0.1 * torch.sin(3 * x)

    model = Linear()
    kw = dict(sampler="ddim", steps=4, class_labels=LABELS, guidance_scale=4.0, clip_denoised=False)
    a = _sample(model, 5, guidance_rescale=0.7, engine=False, **kw)
    b = _sample(model, 5, guidance_rescale=0.7, batch_size=2, **kw)
    c = _sample(model, 5, engine=False, **kw)
    assert_close(b, a, **FP32)
    assert (a - c).abs().max() > 1e-4


# -- noise= and the callback -----------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_start_noise_replaces_x_T_and_the_default_is_the_contracts(path, sampler):
    from fastddpm.ops import reference

    model = Pointwise()
    K = 6
    x_T = reference.batch_noise(0, 0, K, (3, 2, 6, 6), "cpu")
    assert_close(_sample(model, 3, noise=x_T, **SAMPLERS[sampler], **PATHS[path]),
                 _sample(model, 3, **SAMPLERS[sampler], **PATHS[path]), **EXACT)
    mine = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    a = _sample(model, 3, noise=mine, **SAMPLERS[sampler], **PATHS[path])
    b = _sample(model, 3, noise=mine, batch_size=2, **SAMPLERS[sampler], engine=False)
    assert_close(a, b, **FP32)
    assert (a - _sample(model, 3, **SAMPLERS[sampler], **PATHS[path])).abs().max() > 1e-3


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_a_callback_that_returns_x_replaces_it_on_every_path(path, sampler):
    model = Pointwise()
    seen = []

    def zero_at_2(i, t, x):
        seen.append(i)
        return torch.zeros_like(x) if i == 2 else None

    def expected_rest(i, t, x):  # what the last two steps make of x = 0 after step 2
        return None

    got = _sample(model, 3, callback=zero_at_2, **SAMPLERS[sampler], **PATHS[path])
    assert seen == [5, 4, 3, 2, 1, 0]
    plain = _sample(model, 3, **SAMPLERS[sampler], engine=False)
    assert (got - plain).abs().max() > 1e-3
    again = _sample(model, 3, callback=zero_at_2, **SAMPLERS[sampler], engine=False)
    assert_close(got, again, **FP32)
    with pytest.raises(ValueError, match="callback returned shape"):
        _sample(model, 3, callback=lambda i, t, x: x[:1], **SAMPLERS[sampler], **PATHS[path])
    with pytest.raises(TypeError, match="callback must return None or a float tensor"):
        _sample(model, 3, callback=lambda i, t, x: 1.0, **SAMPLERS[sampler], **PATHS[path])


# -- the engine's static form ------------------------------------------------------------------------
def test_the_engine_refills_its_buffers_for_another_batch_without_a_new_engine():
    from fastddpm.engine import EngineCache

    model = LabelledPointwise()
    cache = EngineCache()
    shift = torch.tensor([0.1, -0.2, 0.0, 0.3])
    kw = dict(steps=4, guidance_scale=2.0, model_kwargs={"shift": shift}, engine=True)
    a = fastddpm.engine.engine_sample(model, 4, batch_size=2, class_labels=[0, 1, 2, 0], cache=cache, progress=False,
                                      **{k: v for k, v in kw.items() if k != "engine"})
    assert len(cache.engines()) == 1 and cache.engines()[0].runs == 2
    b = _sample(model, 4, class_labels=[0, 1, 2, 0], engine=False, **{k: v for k, v in kw.items() if k != "engine"})
    assert_close(a, b, **FP32)
    # another guidance scale is another graph: another engine
    fastddpm.engine.engine_sample(model, 2, steps=4, class_labels=[0, 1], guidance_scale=3.0,
                                  model_kwargs={"shift": shift[:2]}, cache=cache, progress=False)
    assert len(cache.engines()) == 2


def test_static_denoiser_load_refuses_another_form():
    adapter = ModelAdapter(LabelledPointwise())
    d = Denoiser(adapter, SamplingRequest.make(2, class_labels=[0, 1], guidance_scale=2.0), "cpu", static=True)
    with pytest.raises(ValueError, match="conditioned differently"):
        d.load(Denoiser(adapter, SamplingRequest.make(2, class_labels=[0, 1], guidance_scale=2.0,
                                                      guidance_batching="sequential"), "cpu"))


# -- the model families as they are ------------------------------------------------------------------
def _tiny_unet2d(**kw):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **kw).eval()


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc"])
@pytest.mark.parametrize("path", ["eager", "engine"])
def test_diffusers_unet2dmodel_with_class_embeds_equals_a_hand_written_guided_loop(name, path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    steps, w = 8, 3.0
    unet = _tiny_unet2d(num_class_embeds=5)
    unet.fastddpm_null_class = 4  # classes 0..3 and the null class, as the fastddpm trainer leaves it
    make = {"ddim": lambda: DDIMScheduler(clip_sample=False),
            "dpm++2m": lambda: DPMSolverMultistepScheduler(), "unipc": lambda: UniPCMultistepScheduler()}[name]
    scheduler = make()
    process = DDPM.from_diffusers(scheduler)
    scheduler.set_timesteps(steps)
    labels = torch.tensor([0, 3, 1])
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = diffusers_guided_loop(unet, scheduler, x_T, labels, 4, w)
    got = _sample(unet, 3, steps=steps, process=process, class_labels=labels, guidance_scale=w, noise=x_T,
                  **PATHS[path])
    assert_close(got, expected, **PEER)


def test_diffusers_unet2dconditionmodel_takes_encoder_hidden_states_through_model_kwargs():
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=6, attention_head_dim=2).eval()
    text = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    empty = torch.zeros(1, 4, 6)  # one shared "empty prompt", as a pipeline's negative embedding
    scheduler = DPMSolverMultistepScheduler()
    process = DDPM.from_diffusers(scheduler)
    scheduler.set_timesteps(6)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    w = 4.0
    with torch.no_grad():
        latents = x_T
        for t in scheduler.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([empty.expand(3, -1, -1), text])).sample
            u, c = out.chunk(2)
            latents = scheduler.step(u + w * (c - u), t, latents).prev_sample
    for path in ("eager", "engine"):
        got = _sample(unet, 3, steps=6, process=process, model_kwargs={"encoder_hidden_states": text},
                      guidance_scale=w, uncond_kwargs={"encoder_hidden_states": empty}, noise=x_T, image_size=8,
                      channels=1, batch_size=2, **PATHS[path])
        assert_close(got, latents, **PEER)
    plain = _sample(unet, 3, steps=6, process=process, model_kwargs={"encoder_hidden_states": text}, image_size=8,
                    channels=1)
    assert plain.shape == (3, 1, 8, 8)


def test_denoising_diffusion_pytorch_classifier_free_unet_as_it_is():
    from denoising_diffusion_pytorch.classifier_free_guidance import Unet

    torch.manual_seed(0)
    unet = Unet(dim=8, dim_mults=(1, 2), num_classes=3, channels=1, cond_drop_prob=0.5).eval()
    adapter = ModelAdapter(unet)
    assert adapter.is_cfg_unet and adapter.num_classes == 3
    labels = torch.tensor([0, 2])
    a = _sample(unet, 2, steps=4, image_size=8, class_labels=labels)
    b = _sample(unet, 2, steps=4, image_size=8, class_labels=labels, batch_size=1)
    assert_close(a, b, **FP32)  # the condition is never dropped at random while sampling
    w = 2.0

    class Guided(torch.nn.Module):
        image_size, in_channels = 8, 1

        def forward(self, x, t, y=None):
            c = unet(x, t, classes=y, cond_drop_prob=0.0)
            u = unet(x, t, classes=y, cond_drop_prob=1.0)
            return u + w * (c - u)

    expected = _sample(Guided(), 2, steps=4, class_labels=labels, engine=False)
    d = Denoiser(adapter, SamplingRequest.make(2, class_labels=labels, guidance_scale=w), "cpu")
    assert not d.batched and "cond_drop_prob" in d.batching_reason  # one value per call: two calls
    assert_close(_sample(unet, 2, steps=4, image_size=8, class_labels=labels, guidance_scale=w), expected, **FP32)
    assert "cond_drop_prob" in fastddpm.engine.last_plan().explain()  # the plan says why: two calls
    with pytest.raises(ValueError, match="needs class_labels"):
        _sample(unet, 2, steps=4, image_size=8)


def test_the_family_keywords_are_the_adapters():
    from diffusers import UNet2DModel

    y = torch.tensor([1, 2])
    assert ModelAdapter(LabelledPointwise()).label_kwargs(y).keys() == {"y"}
    assert ModelAdapter(_tiny_unet2d(num_class_embeds=3)).label_kwargs(y).keys() == {"class_labels"}
    assert isinstance(_tiny_unet2d(num_class_embeds=3), UNet2DModel)
    null = ModelAdapter(LabelledPointwise()).null_kwargs(y)
    assert null["y"].tolist() == [3, 3]


# -- the command line --------------------------------------------------------------------------------
@pytest.fixture
def cond_checkpoint(tmp_path):
    from fastddpm.checkpoint import save_model

    model = fastddpm.create_model("tiny", seed=0, num_classes=3)
    model.class_names = ["cat", "dog", "eel"]
    return save_model(tmp_path / "cond.safetensors", model, DDPM(num_timesteps=50))


def test_cli_samples_a_class_with_guidance_and_a_labelled_row_per_class(tmp_path, cond_checkpoint, capsys):
    from PIL import Image

    from fastddpm.cli import main

    one = tmp_path / "one.npz"
    assert main(["sample", "--checkpoint", str(cond_checkpoint), "-n", "4", "--steps", "3", "--class", "dog",
                 "--guidance", "3.0", "--out", str(one), "--quiet"]) == 0
    model, process = fastddpm.load_model(cond_checkpoint)
    expected = _sample(model, 4, steps=3, process=process, class_labels=1, guidance_scale=3.0, batch_size=4)
    import numpy as np

    from fastddpm.images import to_uint8
    assert np.array_equal(np.load(one)["images"], to_uint8(expected))
    grid = tmp_path / "all.png"
    assert main(["sample", "--checkpoint", str(cond_checkpoint), "-n", "5", "--steps", "2", "--class", "all",
                 "--out", str(grid), "--quiet", "--scale", "1"]) == 0
    assert "sampled 6 images" in capsys.readouterr().out  # ceil(5 / 3) = 2 per class, a row each
    width, height = Image.open(grid).size
    side = model.image_size
    assert height == 3 * (side + 2) + 2 and width > 2 * (side + 2) + 2  # three rows, the labels at the left


@pytest.mark.parametrize("argv, message", [
    (["--class", "7"], r"--class must lie in \[0, 2\]"),
    (["--class", "fox"], r"--class must be a class index in \[0, 2\], a class name \(cat, dog, eel\)"),
    (["--guidance", "2"], "--guidance needs --class"),
    (["--class", "1", "--guidance", "2", "--guidance-rescale", "3"], r"guidance_rescale must be a number in \[0, 1\]"),
])
def test_cli_refuses_bad_class_and_guidance_flags(tmp_path, cond_checkpoint, capsys, argv, message):
    import re

    from fastddpm.cli import main

    out = tmp_path / "x.png"
    assert main(["sample", "--checkpoint", str(cond_checkpoint), "-n", "2", "--steps", "2", "--out", str(out),
                 "--quiet", *argv]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_cli_class_on_an_unconditional_model_is_refused(tmp_path, capsys):
    from fastddpm.checkpoint import save_model
    from fastddpm.cli import main

    path = save_model(tmp_path / "plain.safetensors", fastddpm.create_model("tiny", seed=0), DDPM(num_timesteps=50))
    assert main(["sample", "--checkpoint", str(path), "-n", "2", "--steps", "2", "--class", "1",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "not class-conditional" in capsys.readouterr().err


# -- dynamic thresholding on every path ---------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc"])
def test_dynamic_thresholding_is_the_same_on_every_path_and_differs_from_the_clip(sampler):
    """clip_denoised="dynamic" (step for step against diffusers' thresholding=True in test_interop)
    through the eager loop, the engine (fused and reference steps) and micro-batches, guided too."""
    model = LabelledPointwise()
    kw = dict(SAMPLERS[sampler], class_labels=LABELS, guidance_scale=4.0, clip_denoised="dynamic",
              sample_max_value=2.0, dynamic_thresholding_ratio=0.9)
    eager = _sample(model, 5, engine=False, **kw)
    for path in ("engine", "engine-reference"):
        assert_close(_sample(model, 5, batch_size=2, **PATHS[path], **kw), eager, **FP32)
    clipped = _sample(model, 5, engine=False, **dict(kw, clip_denoised=True))
    assert (eager - clipped).abs().max() > 1e-3
    same_as_clip = _sample(model, 5, engine=False, **dict(kw, sample_max_value=1.0))  # s clamped to 1: the clip
    assert_close(same_as_clip, clipped, **FP32)


def test_dynamic_thresholding_options_are_checked():
    with pytest.raises(ValueError, match="sample_max_value must be a finite number > 0"):
        DDPM(clip_denoised="dynamic", sample_max_value=0.0)
    with pytest.raises(ValueError, match=r"dynamic_thresholding_ratio must be a quantile in \(0, 1\]"):
        DDPM(clip_denoised="dynamic", dynamic_thresholding_ratio=1.5)
    with pytest.raises(TypeError, match="clip_denoised must be True, False or 'dynamic'"):
        DDPM(clip_denoised="yes")
