"""DDIM's raw direction (``reference.step_coefficients(..., sampler="ddim", direction="raw")``) stepped
through ``ops.ddpm_step`` is diffusers' default ``DDIMScheduler`` step (``clip_sample=True``,
``use_clipped_model_output=False``: x0 clipped, the direction from the raw output's epsilon), step for
step, for each prediction type, eta 0 and 1 (the same ``variance_noise``), at float32.
"""
import pytest
import torch

from fastddpm import DDPM, ops
from fastddpm.ops import reference
from tolerances import PEER, assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402

SHAPE = (2, 3, 4, 4)
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def _output(prediction, x, t, data):
    """A model output: for x0 prediction ``data`` scaled past [-1, 1] (the clip acts), else normals
    scaled so x0_hat leaves [-1, 1] too."""
    if prediction == "sample":
        return data
    return 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kw", [dict(), dict(timestep_spacing="trailing"), dict(thresholding=True, clip_sample=False,
                                                                                  sample_max_value=1.5)],
                         ids=["clip", "clip-trailing", "thresholding"])
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_raw_direction_is_diffusers_ddim_step(prediction, kw, eta, backend):
    if backend != "reference" and ops.load_error(backend) is not None:
        pytest.skip(f"{backend}: {ops.load_error(backend)}")
    sched = DDIMScheduler(prediction_type=prediction, **kw)
    steps = 20
    sched.set_timesteps(steps)
    # the schedule and its respacing: from_diffusers of the same scheduler without the clip
    base = DDIMScheduler(prediction_type=prediction, clip_sample=False,
                         timestep_spacing=sched.config.timestep_spacing)
    process = DDPM.from_diffusers(base, eta=eta).respace(steps)
    assert list(process.schedule.timesteps) == sorted(sched.timesteps.tolist())
    rows = reference.step_coefficients(process.schedule, PREDICTIONS[prediction], sampler="ddim", eta=eta,
                                       direction="raw")
    coefs = torch.as_tensor(rows).to(torch.float32)
    index = {int(t): k for k, t in enumerate(process.schedule.timesteps)}
    g = torch.Generator().manual_seed(0)
    data = 1.6 * torch.randn(SHAPE, generator=g)
    x = torch.randn(SHAPE, generator=g)
    thresholding = sched.config.thresholding
    for t in sched.timesteps.tolist():
        out = _output(prediction, x, t, data)
        z = torch.randn(SHAPE, generator=g)
        theirs = sched.step(out, t, x, eta=eta, variance_noise=z)
        step = torch.full((SHAPE[0],), index[t], dtype=torch.int64)
        bounds = None
        if thresholding:
            bounds = ops.dynamic_threshold(x, out, step, coefs, ratio=sched.config.dynamic_thresholding_ratio,
                                           max_value=sched.config.sample_max_value)
        with ops.use_backend(backend):
            if eta == 0.0:  # sigma = 0: the op's own (noise-free) kernel
                ours = ops.ddpm_step(x, out, step, coefs, seed=0, clip_denoised=True, threshold=bounds)
            else:  # diffusers' noise: the explicit-noise path (the reference)
                ours = ops.ddpm_step(x, out, step, coefs, seed=0, clip_denoised=True, threshold=bounds, noise=z)
        assert_close(ours, theirs.prev_sample, **PEER, msg=f"t={t}")
        x = theirs.prev_sample


def test_the_clipped_direction_is_not_diffusers_default():
    """The clipped direction (eps re-derived from the clipped x0) differs from diffusers' default step
    where the clip acts: the raw column is needed."""
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    process = DDPM.from_diffusers(DDIMScheduler(clip_sample=False)).respace(10)
    t = sched.timesteps.tolist()[0]
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(SHAPE, generator=g), 3.0 * torch.randn(SHAPE, generator=g)
    theirs = sched.step(out, t, x).prev_sample
    step = torch.full((SHAPE[0],), process.num_steps - 1, dtype=torch.int64)
    clipped = torch.as_tensor(reference.step_coefficients(process.schedule, sampler="ddim")).float()
    raw = torch.as_tensor(reference.step_coefficients(process.schedule, sampler="ddim", direction="raw")).float()
    assert (ops.ddpm_step(x, out, step, clipped, seed=0) - theirs).abs().max() > 1e-2
    assert_close(ops.ddpm_step(x, out, step, raw, seed=0), theirs, **PEER)
