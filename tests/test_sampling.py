"""fastddpm.sample: models as they are, the noise contract, and bad input."""
import pytest
import torch

import fastddpm
from fastddpm import DDPM, ops
from fastddpm.ops.reference import batch_noise
from toy_models import Pointwise
from tolerances import EXACT, FP32, STEPS_FP32, assert_close




def _manual_loop(model, process, n, shape, seed):
    """Algorithm 2 of Ho et al., written with DDPM.step and the contract's noise."""
    K = process.num_steps
    x = batch_noise(seed, 0, K, (n, *shape), "cpu")
    for i in reversed(range(K)):
        t = process.schedule.timesteps[i]
        out = model(x, torch.full((n,), t, dtype=torch.int64))
        x = process.step(out, t, x, noise=batch_noise(seed, 0, i, (n, *shape), "cpu"))
    return x


@pytest.mark.parametrize("steps", [None, 25])
@pytest.mark.parametrize("options", [{}, {"prediction": "v", "variance": "fixed_large", "clip_denoised": False},
                                     {"sampler": "ddim", "eta": 0.5, "schedule": "cosine"}])
def test_sample_equals_algorithm_2(steps, options):
    """On the reference backend, bit for bit; on the automatic one (the C++ op on
    CPU when built), within the fp32 tolerance after every step."""
    model = Pointwise()
    process = DDPM(**options)
    if steps:
        process = process.respace(steps)
    with ops.use_backend("reference"):
        expected = _manual_loop(model, process, 3, (2, 6, 6), seed=11)
        assert torch.equal(fastddpm.sample(model, 3, seed=11, progress=False, process=process), expected)
    assert_close(fastddpm.sample(model, 3, seed=11, progress=False, process=process), expected, **STEPS_FP32)


def test_sample_i_is_the_same_whatever_n():
    model = Pointwise()
    full = fastddpm.sample(model, 5, steps=20, seed=3, progress=False)
    assert torch.equal(full[:2], fastddpm.sample(model, 2, steps=20, seed=3, progress=False))
    assert torch.equal(full, fastddpm.sample(model, 5, steps=20, seed=3, progress=False, batch_size=2))
    shard = fastddpm.sample(model, 2, steps=20, seed=3, progress=False, sample_offset=3)
    assert torch.equal(full[3:], shard)
    assert not torch.equal(full, fastddpm.sample(model, 5, steps=20, seed=4, progress=False))


def test_defaults_are_the_original_ddpm():
    c = DDPM().config
    assert (c.num_timesteps, c.schedule, c.prediction, c.variance, c.clip_denoised, c.sampler) == \
        (1000, "linear", "epsilon", "fixed_small", True, "ddpm")
    seen = []
    fastddpm.sample(Pointwise(), 1, progress=False, callback=lambda i, t, x: seen.append((i, t)))
    assert len(seen) == 1000 and seen[0] == (999, 999) and seen[-1] == (0, 0)


def test_output_range_and_callback():
    frames = []
    x = fastddpm.sample(Pointwise(), 4, steps=10, progress=False, callback=lambda i, t, x: frames.append(x.clone()))
    assert x.dtype == torch.float32 and x.shape == (4, 2, 6, 6)
    assert len(frames) == 10 and torch.equal(frames[-1], x)
    assert fastddpm.sample.last_seconds > 0


def test_diffusers_unet2dmodel_as_is():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    x = fastddpm.sample(unet, 2, steps=5, progress=False)
    assert x.shape == (2, 1, 8, 8)
    process = DDPM().respace(5)
    manual = _manual_loop(lambda x, t: unet(x, t).sample, process, 2, (1, 8, 8), seed=0)
    assert_close(x, manual, **FP32)


def test_denoising_diffusion_pytorch_unet_as_is():
    from denoising_diffusion_pytorch import Unet

    unet = Unet(dim=8, dim_mults=(1, 2), channels=1, flash_attn=False).eval()
    x = fastddpm.sample(unet, 2, steps=5, image_size=8, progress=False)
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="pass image_size= to sample"):
        fastddpm.sample(unet, 2, steps=5, progress=False)


def test_plain_function_needs_a_shape():
    with pytest.raises(ValueError, match="channels and image_size"):
        fastddpm.sample(lambda x, t: x, 1, steps=2, progress=False)
    x = fastddpm.sample(lambda x, t: torch.zeros_like(x), 2, steps=3, image_size=(4, 6), channels=3, progress=False)
    assert x.shape == (2, 3, 4, 6)


class Conv1x1(torch.nn.Module):
    """A float32 model whose convolution autocast runs in low precision (``Pointwise``'s ops it leaves alone)."""

    image_size, in_channels = 6, 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.7, -0.2], [0.1, 0.5]]).reshape(2, 2, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.01, -0.02]))

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + t.reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("engine", [False, True])
def test_bf16_model_inputs_keep_x_in_float32(engine):
    """``dtype=torch.bfloat16`` runs the model in bfloat16 and every update in float32: the images are
    Algorithm 2 in float32 on the model's bfloat16 outputs, bit for bit on the reference backend (a
    comparison within one dtype, so no tolerance for the dtypes' difference is needed)."""
    model = Conv1x1()
    w, b = model.conv.weight.to(torch.bfloat16), model.conv.bias.to(torch.bfloat16)

    def in_bf16(x, t):  # what autocast does with the model: the convolution in bfloat16
        y = torch.nn.functional.conv2d(x.to(torch.bfloat16), w, b) + t.reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(y).float()

    process = DDPM().respace(5)
    kw = dict(channels_last=False) if engine else {}
    with ops.use_backend("reference"):
        expected = _manual_loop(in_bf16, process, 2, (2, 6, 6), seed=0)
        x = fastddpm.sample(model, 2, process=process, dtype=torch.bfloat16, progress=False, engine=engine, **kw)
    assert x.dtype == torch.float32
    assert not torch.equal(x, x.to(torch.bfloat16).float())  # x itself was never rounded to bfloat16
    assert_close(x, expected, **EXACT)
    full = fastddpm.sample(model, 2, process=process, progress=False, engine=engine, **kw)
    assert not torch.equal(full, x)  # the dtype was used: float32 inputs sample other images


# -- bad input ----------------------------------------------------------------------------
def test_model_returning_wrong_shape():
    with pytest.raises(ValueError, match=r"model returned shape \(2, 2, 4, 4\) for input shape \(2, 1, 4, 4\)"):
        fastddpm.sample(lambda x, t: torch.cat([x, x], 1), 2, steps=2, image_size=4, channels=1, progress=False)
    with pytest.raises(TypeError, match="model must return a tensor"):
        fastddpm.sample(lambda x, t: "nope", 2, steps=2, image_size=4, channels=1, progress=False)


def test_non_finite_samples_are_reported_at_the_end():
    calls = []

    def model(x, t):
        calls.append(1)
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="the model gave outputs that are not finite"):
        fastddpm.sample(model, 2, steps=4, image_size=4, channels=1, progress=False, clip_denoised=False)
    assert len(calls) == 4  # checked once at the end, not per step


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n=0), ValueError, "n must be a positive int"),
    (dict(n=2, seed=-1), ValueError, "seed must be in"),
    (dict(n=2, steps=0), ValueError, "steps must be a positive int"),
    (dict(n=2, steps=2000), ValueError, "steps must be <= num_timesteps=1000"),
    (dict(n=2, prediction="score"), ValueError, "prediction must be one of"),
    (dict(n=2, schedule="exp"), ValueError, "schedule must be one of"),
    (dict(n=2, colour="red"), TypeError, "unknown diffusion options"),
    (dict(n=2, dtype=torch.int32), TypeError, "dtype must be float32"),
    (dict(n=2, batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(n=2, image_size=(4,)), ValueError, "image_size must be an int or a pair"),
    (dict(n=2, callback=3), TypeError, "callback must be callable"),
    (dict(n=2, sample_offset=-1), ValueError, "sample_offset must be a non-negative int"),
    (dict(n=2, process="ddpm"), TypeError, "process must be a fastddpm.DDPM"),
])
@pytest.mark.parametrize("engine", [False, True])
def test_bad_arguments(kwargs, error, match, engine):
    """The eager loop and the engine check their arguments in one place (``checks.check_sample_args``,
    ``DDPM.resolve``): the same errors from both."""
    kwargs = dict(kwargs)  # the case's dict is shared by both engines
    n = kwargs.pop("n")
    with pytest.raises(error, match=match):
        fastddpm.sample(Pointwise(), n, progress=False, engine=engine, **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match="model must be callable"):
        fastddpm.sample(42, 1, progress=False)


class Diverged(Pointwise):
    """``Pointwise`` gone wrong: ``value`` at the timesteps where ``when(t)`` holds (default: all)."""

    def __init__(self, value, when=None):
        super().__init__()
        self.value, self.when = value, when

    def forward(self, x, t):
        out = super().forward(x, t)
        hit = torch.ones_like(t, dtype=torch.bool) if self.when is None else self.when(t)
        return torch.where(hit.reshape(-1, 1, 1, 1), torch.full_like(out, self.value), out)


@pytest.mark.parametrize("sampler, engine", [("ddpm", False), ("ddim", False), ("dpm++2m", False), ("ddpm", True),
                                            ("ddim", True)])
@pytest.mark.parametrize("value, when", [(float("inf"), "first step"), (1e30, None),
                                         (float("nan"), lambda t: t < 300)], ids=["inf-once", "1e30-always", "nan-late"])
def test_a_diverged_model_gives_no_images(sampler, engine, value, when):
    """The x0 clip keeps a diverged model's images finite: they must be refused, not returned."""
    steps = 10 if sampler != "ddpm" else None
    if when == "first step":  # the first step's timestep alone (row K-1 runs first)
        first = int(DDPM(sampler=sampler).multistep_plan(steps).timesteps[-1]) if sampler == "dpm++2m" else 999
        when = lambda t: t == first  # noqa: E731
    with pytest.raises(FloatingPointError, match="not finite or beyond"):
        fastddpm.sample(Diverged(value, when), 3, steps=steps, sampler=sampler, progress=False, engine=engine)
    fastddpm.sample(Diverged(1e3), 2, steps=5, sampler=sampler, progress=False, engine=engine)  # large, plausible
