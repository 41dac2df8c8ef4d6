"""Schedules: our float64 tables against the peers' and the papers' definitions."""
import numpy as np
import pytest
import torch

from fastddpm.schedule import NoiseSchedule, make_betas, space_timesteps
from tolerances import FP32, assert_close


def test_linear_is_ho_et_al():
    betas = make_betas("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # scaled for other T (improved-diffusion): same end points times 1000/T
    assert make_betas("linear", 250)[-1] == pytest.approx(0.08)


@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2"),
                                          ("quadratic", "scaled_linear")])
def test_tables_match_diffusers(ours, theirs):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=1e-4, beta_end=0.02)
    s = NoiseSchedule.make(ours, 1000)
    assert_close(s.table("betas"), ref.betas, **FP32)
    assert_close(s.table("alphas_cumprod"), ref.alphas_cumprod, atol=1e-6, rtol=2e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [1000, 100])
def test_tables_match_denoising_diffusion_pytorch(kind, T):
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import (
        cosine_beta_schedule, linear_beta_schedule, sigmoid_beta_schedule)

    fn = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule, "sigmoid": sigmoid_beta_schedule}[kind]
    # their sigmoid end points are float32 (torch.tensor(start).sigmoid()): ~1e-5 relative
    rtol = 5e-5 if kind == "sigmoid" else 1e-12
    np.testing.assert_allclose(make_betas(kind, T), fn(T).numpy(), rtol=rtol, atol=1e-15)


def test_tables_are_float64_then_float32():
    s = NoiseSchedule.make("linear", 1000)
    t = s.tables64()
    assert all(v.dtype == np.float64 for v in t.values())
    assert s.table("alphas_cumprod").dtype == torch.float32
    assert s.table("alphas_cumprod") is s.table("alphas_cumprod")  # cached
    ac = t["alphas_cumprod"]
    np.testing.assert_allclose(ac, np.cumprod(1 - t["betas"]))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_is_gaussian_conditioning(kind):
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0, written
    independently of the closed forms in the schedule:
    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) e1, x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2."""
    t = NoiseSchedule.make(kind, 1000).tables64()
    abar, prev, alpha = t["alphas_cumprod"], t["alphas_cumprod_prev"], 1 - t["betas"]
    cov = np.sqrt(alpha) * (1 - prev)  # Cov(x_{t-1}, x_t | x0)
    var = 1 - abar  # Var(x_t | x0)
    gain = cov / var
    np.testing.assert_allclose(t["posterior_mean_coef2"], gain, rtol=1e-10)
    np.testing.assert_allclose(t["posterior_mean_coef1"], np.sqrt(prev) - gain * np.sqrt(abar), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(t["posterior_variance"], (1 - prev) - cov * gain, rtol=1e-9, atol=1e-15)


def test_space_timesteps_like_improved_diffusion():
    assert space_timesteps(1000, 1000) == list(range(1000))
    ts = space_timesteps(1000, 10)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    assert space_timesteps(10, 4) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="steps must be in"):
        space_timesteps(10, 11)


def test_respace_keeps_alphas_cumprod_and_recomputes_betas():
    s = NoiseSchedule.make("cosine", 1000)
    r = s.respace(50)
    assert r.num_timesteps == 50 and r.is_respaced
    np.testing.assert_allclose(r.alphas_cumprod64, s.alphas_cumprod64[list(r.timesteps)], rtol=1e-9)
    # the respaced betas chain back to the original alphas_cumprod at the kept timesteps
    np.testing.assert_allclose(np.cumprod(1 - r.betas), s.alphas_cumprod64[list(r.timesteps)], rtol=1e-9)
    assert np.all((r.betas > 0) & (r.betas < 1)) and r.betas[0] == pytest.approx(s.betas[0])
    explicit = s.respace([0, 500, 999])
    assert explicit.timesteps == (0, 500, 999)
    assert NoiseSchedule.from_dict(r.to_dict()).timesteps == r.timesteps
    old = {k: v for k, v in explicit.to_dict().items() if k != "base_num_timesteps"}  # written before the field
    assert NoiseSchedule.from_dict(old).is_respaced


def test_bad_schedules():
    with pytest.raises(ValueError, match="schedule must be one of"):
        NoiseSchedule.make("exponential")
    with pytest.raises(ValueError, match=r"betas must be finite and in \(0, 1\)"):
        NoiseSchedule.make([0.1, 1.5])
    with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
        NoiseSchedule.make("linear", 0)
    with pytest.raises(ValueError, match="respace timesteps must lie in"):
        NoiseSchedule.make("linear", 100).respace([0, 100])
