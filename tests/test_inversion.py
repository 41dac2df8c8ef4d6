"""DDIM inversion (``fastddpm.inversion``): the inverse table and the loop against diffusers'
``DDIMInverseScheduler`` step for step, the round trip through ``fastddpm.sample(..., noise=x_T,
sampler="ddim", eta=0)``, conditioning and guidance through the ``Denoiser``, every backend of the
fused step op against the reference, and the errors of bad inputs (before any model call)."""
import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler

import fastddpm
from backends import need
from fastddpm import DDPM, ops
from fastddpm.inversion import invert, inverse_step_coefficients
from tolerances import PEER, STEPS_FP32, assert_close, fp32_at
from toy_models import LabelledPointwise, Pointwise

T, K = 50, 10
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


class TimeOnly(torch.nn.Module):
    """An epsilon model whose output depends on ``t`` alone: DDIM inversion is then exact (the
    noise it reads at the next timestep is the noise the sampler reads there), so the round trip
    gives the image back to rounding, whatever the steps."""

    image_size, in_channels = 6, 2

    def forward(self, x, t):
        return (0.5 * torch.sin(t.float() / 7.0 + 0.3)).reshape(-1, 1, 1, 1).expand_as(x).contiguous()


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ``N(mu, s^2 I)`` (per pixel ``mu``) in any prediction type: its DDIM
    sampler is the probability-flow ODE, so inversion converges to exact as the steps grow."""

    image_size, in_channels = 6, 2

    def __init__(self, prediction: str, num_timesteps: int = T, s: float = 0.4):
        super().__init__()
        self.prediction, self.s = prediction, s
        self.ac = torch.as_tensor(DDPM(num_timesteps=num_timesteps).schedule.alphas_cumprod64)
        self.mu = torch.linspace(-0.5, 0.5, 72, dtype=torch.float64).reshape(1, 2, 6, 6)

    def data(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (self.mu + self.s * torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)).clamp(-1, 1).float()

    def forward(self, x, t):
        a = self.ac[t].reshape(-1, 1, 1, 1)
        x = x.double()
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"epsilon": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return out.float()


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 6, 6, generator=g) * 1.6 - 0.8


def _scheduler(prediction, spacing="leading", set_alpha_to_one=True, dtype=torch.float32, steps=K):
    """diffusers' inverse scheduler on our schedule (its alphas_cumprod ours, in ``dtype``)."""
    process = DDPM(num_timesteps=T)
    sched = DDIMInverseScheduler(num_train_timesteps=T, trained_betas=process.schedule.betas.tolist(),
                                 clip_sample=False, set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                                 prediction_type=DIFFUSERS_PREDICTION[prediction])
    sched.alphas_cumprod = torch.as_tensor(process.schedule.alphas_cumprod64).to(dtype)
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=dtype) if set_alpha_to_one else sched.alphas_cumprod[0]
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def _diffusers_loop(model, image, sched, dtype):
    """The inversion loop of diffusers' pipelines (``for t in timesteps: x = step(model(x, t), t, x)``),
    the model and the scheduler in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    x = image.to(dtype)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(x.shape[0])), int(t), x).prev_sample
    return x


def _invert(model, image, **kw):
    kw = {"steps": K, "num_timesteps": T, "progress": False, **kw}
    return invert(model, image, **kw)


# -- the table -------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_every_row_is_diffusers_inverse_step(prediction, spacing, set_alpha_to_one):
    """Row i through the fused step op (reference) is diffusers' ``DDIMInverseScheduler.step`` at the
    kept timestep i, computed in float64, on the same x and model output; at abar = 1 an x0 model's
    step is the identity, where diffusers divides by zero."""
    process = DDPM(num_timesteps=T, sampler="ddim", timestep_spacing=spacing).respace(K)
    sched = _scheduler(prediction, spacing, set_alpha_to_one, torch.float64)
    assert list(process.schedule.timesteps) == sched.timesteps.tolist()
    start = 1.0 if set_alpha_to_one else float(DDPM(num_timesteps=T).schedule.alphas_cumprod64[0])
    coefs = torch.as_tensor(inverse_step_coefficients(process.schedule, prediction, start)).float()
    assert coefs[:, 4].abs().max() == 0
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps.tolist()):
        x, out = torch.randn(3, 2, 6, 6, generator=g), torch.randn(3, 2, 6, 6, generator=g)
        with ops.use_backend("reference"):
            ours = ops.ddpm_step(x=x, model_output=out, step=torch.full((3,), i), coefs=coefs, seed=0,
                                 clip_denoised=False)
        theirs = sched.step(out.double(), t, x.double()).prev_sample
        if prediction == "x0" and set_alpha_to_one and i == 0:
            assert not torch.isfinite(theirs).all()  # diffusers: (x - x0) / sqrt(1 - 1)
            assert torch.equal(ours, x)
            continue
        assert_close(ours, theirs, **fp32_at(float(theirs.abs().max())), msg=f"{prediction} {spacing} step {i} (t={t})")


def test_table_rejects_a_bad_start_and_prediction():
    schedule = DDPM(num_timesteps=T).schedule
    with pytest.raises(ValueError, match=r"start_alpha_cumprod must lie in \(0, 1\]"):
        inverse_step_coefficients(schedule, "epsilon", 0.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        inverse_step_coefficients(schedule, "noise")


# -- the loop against diffusers' ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_invert_equals_the_diffusers_inverse_loop(prediction, spacing, dtype):
    """The whole inversion is diffusers' loop on the same model: in float32 and against diffusers in
    float64 (our float32 loop on float64-derived tables)."""
    model = Pointwise()
    image = _images()
    ours = _invert(model, image, prediction=prediction, timestep_spacing=spacing)
    theirs = _diffusers_loop(model, image, _scheduler(prediction, spacing, dtype=dtype), dtype)
    assert ours.dtype == torch.float32 and ours.shape == image.shape
    assert_close(ours, theirs, **PEER, msg=f"{prediction} {spacing} {dtype}")


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_invert_is_diffusers_step_for_step(prediction):
    """Each step of invert (seen through its callback) is diffusers' step from the previous one, the
    model called at the step's timestep on the previous x; an x0 model's first step is the identity."""
    model = Pointwise()
    image = _images()
    seen = []
    _invert(model, image, prediction=prediction, timestep_spacing="leading",
            callback=lambda i, t, x: seen.append((i, t, x.clone())))
    sched = _scheduler(prediction)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(sched.timesteps.tolist()))
    prev = image
    for i, t, x in seen:
        with torch.no_grad():
            expected = sched.step(model(prev, torch.full((3,), t)), t, prev).prev_sample
        if prediction == "x0" and i == 0:
            assert not torch.isfinite(expected).all() and torch.equal(x, image)
        else:
            assert_close(x, expected, **fp32_at(float(expected.abs().max())), msg=f"{prediction} step {i}")
        prev = x


# -- the round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, T])
def test_round_trip_is_exact_for_a_model_of_t_alone(steps, spacing):
    """A model whose noise prediction depends on t alone is exactly invertible: sample(noise=invert(x))
    gives x back to float32 rounding, for any steps and spacing."""
    model, image = TimeOnly(), _images(4)
    kw = dict(steps=steps, num_timesteps=T, timestep_spacing=spacing, progress=False)
    x_T = invert(model, image, **kw)
    again = fastddpm.sample(model, 4, noise=x_T, sampler="ddim", eta=0, clip_denoised=False, **kw)
    assert_close(again, image, **STEPS_FP32, msg=f"{steps} steps {spacing}")
    assert float((x_T - image).abs().max()) > 0.1  # it did move


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_round_trip_converges_for_the_exact_gaussian_denoiser(prediction):
    """For the exact denoiser of a Gaussian (its DDIM sampler is the probability-flow ODE), invert then
    sample gives the image back ever closer as the steps grow (first order: the model is read at the
    next timestep on the current x), for every prediction type; x_T looks like standard noise."""
    model = GaussianDenoiser(prediction, num_timesteps=1000)
    image = model.data(6)
    errors = []
    for steps in (10, 50, 200):
        kw = dict(steps=steps, prediction=prediction, progress=False)
        x_T = invert(model, image, **kw)
        again = fastddpm.sample(model, 6, noise=x_T, sampler="ddim", eta=0, **kw)
        errors.append(float((again - image).abs().max()))
    # measured: epsilon 0.50, 0.10, 0.025; v 0.57, 0.13, 0.032; x0 1.34, 0.33, 0.034
    assert errors[0] > errors[1] > 2.5 * errors[2], errors
    assert errors[2] < 0.05, errors
    assert 0.8 < float(x_T.std()) < 1.2 and abs(float(x_T.mean())) < 0.2


def test_round_trip_through_a_checkpoint_process():
    """The process of a checkpoint (sampler ddpm, clip on) is inverted as DDIM, unclipped; sampling
    back with that process and sampler='ddim' reconstructs."""
    model = GaussianDenoiser("epsilon", num_timesteps=1000)
    process = DDPM()  # what load_model returns for the shipped models
    image = model.data(2)
    x_T = invert(model, image, steps=20, process=process, progress=False)
    assert torch.equal(x_T, invert(model, image, steps=20, progress=False))  # DDPM(sampler="ddim", eta=0)'s
    again = fastddpm.sample(model, 2, noise=x_T, sampler="ddim", eta=0, steps=20, process=process, progress=False)
    assert float((again - image).abs().max()) < 0.3  # first order at 20 steps (0.25 here; 0.025 at 200)
    assert torch.equal(invert(model, image[0], steps=20, process=process, progress=False), x_T[:1])  # [C, H, W]
    respaced = DDPM(sampler="ddim").respace(20)
    assert torch.equal(invert(model, image, steps=None, process=respaced, progress=False), x_T)  # its own steps


# -- conditioning ------------------------------------------------------------------------------------
def test_labels_kwargs_and_guidance_pass_through():
    """Class labels, per-sample model_kwargs and classifier-free guidance reach the model as the
    samplers give them: equal to diffusers' inverse loop on the guided output u + w (c - u)."""
    model = LabelledPointwise()
    image = _images()
    labels, shift, w = torch.tensor([0, 2, 1]), torch.tensor([0.1, -0.2, 0.3]), 3.0
    ours = _invert(model, image, class_labels=labels, model_kwargs={"shift": shift}, guidance_scale=w,
                   timestep_spacing="leading")
    sched, x = _scheduler("epsilon"), image
    for t in sched.timesteps:
        tt = t.expand(3)
        c, u = model(x, tt, y=labels, shift=shift), model(x, tt, y=torch.full((3,), 3), shift=shift)
        x = sched.step(u + w * (c - u), int(t), x).prev_sample
    assert_close(ours, x, **PEER)
    plain = _invert(model, image, class_labels=labels, timestep_spacing="leading")
    assert float((plain - ours).abs().max()) > 1e-3  # guidance changed it
    sequential = _invert(model, image, class_labels=labels, model_kwargs={"shift": shift}, guidance_scale=w,
                         timestep_spacing="leading", guidance_batching="sequential")
    assert_close(sequential, ours, **PEER)


# -- backends ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_every_backend_gives_the_reference_inversion(backend):
    need(backend, "ddpm_step", "cpu")
    model, image = Pointwise(), _images()
    kw = dict(prediction="v", guidance_scale=None)
    with ops.use_backend("reference"):
        expected = _invert(model, image, **kw)
    with ops.use_backend(backend):
        got = _invert(model, image, **kw)
    assert_close(got, expected, **STEPS_FP32, msg=backend)


def test_the_environment_variable_picks_the_backend(monkeypatch):
    """FASTDDPM_BACKEND=reference runs the inversion on the reference (the default choice too)."""
    model, image = Pointwise(), _images()
    with ops.use_backend("reference"):
        expected = _invert(model, image)
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    assert torch.equal(_invert(model, image), expected)


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("image, kwargs, error, match", [
    ([[0.0]], {}, TypeError, "image must be a float tensor"),
    (torch.zeros(2, 2, 6, 6, dtype=torch.uint8), {}, TypeError, "image must be a float tensor in .*to_float_images"),
    (torch.zeros(2, 1, 6, 6), {}, ValueError, r"image has shape \(2, 1, 6, 6\); the model takes \[n, 2, 6, 6\]"),
    (torch.zeros(2, 2, 8, 8), {}, ValueError, r"image has shape \(2, 2, 8, 8\)"),
    (torch.zeros(1, 2, 2, 6, 6), {}, ValueError, r"image must be \[n, 2, 6, 6\] \(or one image \[2, 6, 6\]\)"),
    (torch.zeros(0, 2, 6, 6), {}, ValueError, "with n >= 1"),
    (torch.full((1, 2, 6, 6), 1.5), {}, ValueError, r"image must be in the model's data range \[-1, 1\]"),
    (torch.full((1, 2, 6, 6), 0.5).index_fill_(3, torch.tensor([0]), 255.0), {}, ValueError,
     r"values in \[0.5, 255\] \(images in \[0, 1\]: pass 2 \* x - 1\)"),
    (torch.full((1, 2, 6, 6), float("nan")), {}, ValueError, "image has values that are not finite"),
    (torch.zeros(1, 2, 6, 6), dict(sampler="ddpm"), ValueError, "invert inverts deterministic DDIM.*sampler='ddpm'"),
    (torch.zeros(1, 2, 6, 6), dict(eta=0.5), ValueError, "eta=0.5"),
    (torch.zeros(1, 2, 6, 6), dict(steps=0), ValueError, "steps must be a positive int"),
    (torch.zeros(1, 2, 6, 6), dict(steps=T + 1), ValueError, f"steps must be <= num_timesteps={T}"),
    (torch.zeros(1, 2, 6, 6), dict(class_labels=[0, 1]), ValueError, "one label per sample"),
    (torch.zeros(1, 2, 6, 6), dict(class_labels=[5]), ValueError, r"class_labels must lie in \[0, 2\]"),
    (torch.zeros(1, 2, 6, 6), dict(noise=torch.zeros(1, 2, 6, 6)), TypeError, "unknown diffusion options"),
    (torch.zeros(1, 2, 6, 6), dict(callback=3), TypeError, "callback must be callable"),
])
def test_bad_inputs_raise_naming_the_argument_before_any_model_call(image, kwargs, error, match):
    model = LabelledPointwise()
    with pytest.raises(error, match=match):
        _invert(model, image, **kwargs)
    assert model.calls == 0


def test_a_model_without_a_size_needs_one():
    image = _images(1)
    with pytest.raises(ValueError, match="cannot tell the model's channels and image_size"):
        _invert(lambda x, t: x, image)
    assert _invert(lambda x, t: torch.zeros_like(x), image, image_size=6, channels=2).shape == (1, 2, 6, 6)


def test_a_diverged_model_is_refused():
    with pytest.raises(FloatingPointError, match="not finite or beyond"):
        _invert(lambda x, t: torch.full_like(x, float("nan")), _images(1), image_size=6, channels=2)


def test_the_table_is_float64_and_the_first_row_reads_the_image():
    """abar = 1 before the first step: an epsilon model's first step is sqrt(abar_0) x + sqrt(1-abar_0) out."""
    schedule = DDPM(num_timesteps=T).respace(K).schedule
    rows = inverse_step_coefficients(schedule, "epsilon")
    assert rows.dtype == np.float64 and rows.shape == (K, 6)
    a0 = schedule.alphas_cumprod64[0]
    np.testing.assert_allclose(rows[0], [0.0, 1.0, np.sqrt(1 - a0), np.sqrt(a0), 0.0, 0.0], rtol=1e-15)
