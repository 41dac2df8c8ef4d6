"""The k-samplers (Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral, DPM++ 2S a / SDE / 3M SDE) equal
diffusers' ``*DiscreteScheduler`` call for call and k-diffusion's ``sample_*`` sample for sample.

Call for call: the same model (a logging wrapper) on both sides, diffusers' loop as its pipelines run
it (``latents * init_noise_sigma``, ``scale_model_input``, ``step``, its ``randn_tensor`` handed the
contract's noise of the call's row); every model input and timestep of ours equals theirs.  At float32
on the spacings' own sigmas at PEER; Karras, exponential and beta sigmas against diffusers made to
compute in float64 (its float32 ``1 - alphas_cumprod`` moves sigma_min by 8e-5, which every such sigma
carries), with our float64 loop, at PEER64-like tolerances.
"""
import math
import sys
import types

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import DDPM, ksamplers
from fastddpm.ksamplers import KSAMPLERS, make_kplan, model_calls
from fastddpm.multistep import TABLE_COLUMNS, MultistepSampler
from fastddpm.ops.reference import batch_noise
from fastddpm.schedule import NoiseSchedule
from test_multistep import _as_float64
from tolerances import FP32, PEER, assert_close

T = 1000
SHAPE = (3, 2, 5, 7)  # odd
DIFFUSERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
             "heun": "HeunDiscreteScheduler", "dpm2": "KDPM2DiscreteScheduler",
             "dpm2-a": "KDPM2AncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
PEER64_LOOP = dict(atol=1e-9, rtol=1e-9)  # float64 tables, chained through a whole loop
# diffusers at float32 on Karras sigmas: its float32 1 - alphas_cumprod moves sigma_min by 8e-5
PEER_KARRAS = dict(atol=2e-3, rtol=1e-3)


class Logged(torch.nn.Module):
    """A batch-invariant model that records every input and timestep it is called with."""

    image_size, in_channels = (5, 7), 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().double().clone()))
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(self.w.to(x.dtype) * x + t / 1000) + 0.1 * torch.sin(3 * x)


def _scheduler(sampler, prediction="epsilon", spacing="linspace", sigmas="default", float64=False, monkeypatch=None):
    import diffusers

    kw = dict(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing)
    if sigmas != "default":
        kw[f"use_{sigmas}_sigmas"] = True
    sched = getattr(diffusers, DIFFUSERS[sampler])(**kw)
    ours = NoiseSchedule.make("linear", T)
    if float64:
        _as_float64(sched, ours, monkeypatch)
    else:  # its float32 cumprod drifts; give it ours rounded to float32
        sched.alphas_cumprod = torch.as_tensor(ours.alphas_cumprod64).float()
    return sched


@torch.no_grad()
def _diffusers_loop(sched, model, K, seed, dtype, monkeypatch):
    """diffusers' pipeline loop from the contract's x_T; its draws are the contract's noise of each call's row."""
    sched.set_timesteps(K)
    R = len(sched.timesteps)
    module = sys.modules[type(sched).__module__]
    call = {"j": 0}
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor",
                            lambda *a, **k: batch_noise(seed, 0, R - 1 - call["j"], SHAPE, "cpu").to(dtype))
    x = batch_noise(seed, 0, R, SHAPE, "cpu").to(dtype) * sched.init_noise_sigma
    for j, t in enumerate(sched.timesteps):
        call["j"] = j
        out = model(sched.scale_model_input(x, t), t.expand(SHAPE[0]))
        x = sched.step(out, t, x).prev_sample
    return x, R


@torch.no_grad()
def _our_loop(plan, model, seed, dtype):
    """Our plan stepped as a diffusers scheduler (``MultistepSampler``) in ``dtype``."""
    x = batch_noise(seed, 0, plan.num_steps, SHAPE, "cpu").to(dtype) * plan.start_scale
    sampler = MultistepSampler(plan, x)
    for j, t in enumerate(sampler.timesteps):
        row = plan.num_steps - 1 - j
        noise = batch_noise(seed, 0, row, SHAPE, "cpu").to(dtype) if plan.stochastic else None
        x = sampler.step(model(x, t.expand(SHAPE[0]).to(dtype)), x, noise=noise)
    return x


def _scaled(tol, expected):
    """``tol`` with its atol times the largest |value| of ``expected`` (at least 1): float32 rounding of a
    state is relative to the state's scale, and the toy model's epsilon-prediction samples reach ~300."""
    return dict(atol=tol["atol"] * max(1.0, float(expected.abs().max())), rtol=tol["rtol"])


def _compare_calls(ours, theirs, tol, msg):
    assert len(ours.calls) == len(theirs.calls), msg
    for j, ((xo, to), (xt, tt)) in enumerate(zip(ours.calls, theirs.calls)):
        assert_close(to, tt, atol=2e-3 if xo.dtype == torch.float32 else 1e-9, rtol=0, msg=f"{msg}: t of call {j}")
        assert_close(xo, xt, **_scaled(tol, xt), msg=f"{msg}: model input of call {j}")


# -- diffusers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_sample_equals_diffusers_call_for_call(sampler, prediction, spacing, monkeypatch):
    """``fastddpm.sample(model, n, sampler=..., steps=K)`` (float32, the eager loop) against diffusers'
    own loop: every model call's input and timestep, and the result."""
    K, seed = 6, 5
    theirs_model, ours_model = Logged(), Logged()
    theirs, R = _diffusers_loop(_scheduler(sampler, prediction, spacing), theirs_model, K, seed, torch.float32,
                                monkeypatch)
    assert R == model_calls(sampler, K)
    ours = fastddpm.sample(ours_model, SHAPE[0], steps=K, seed=seed, sampler=sampler, prediction=prediction,
                           timestep_spacing=spacing, clip_denoised=False, progress=False)
    msg = f"{sampler} {prediction} {spacing}"
    _compare_calls(ours_model, theirs_model, PEER, msg)
    assert_close(ours, theirs, **_scaled(PEER, theirs), msg=msg)


@pytest.mark.parametrize("sigmas", ["default", "leading", "trailing", "karras", "exponential", "beta"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler", list(DIFFUSERS))
@pytest.mark.parametrize("steps", [2, 7])
def test_float64_equals_diffusers_in_float64(sampler, prediction, sigmas, steps, monkeypatch):
    """Our float64 loop against diffusers computing in float64, on every sigma schedule it has (``leading``
    and ``trailing``: the spacings' own sigmas, whose start differs: init_noise_sigma)."""
    if sampler == "euler-a" and sigmas not in ("default", "leading", "trailing"):
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler has no use_*_sigmas")
    pytest.importorskip("scipy")
    spacing = sigmas if sigmas in ("leading", "trailing") else "linspace"
    sigmas = "default" if sigmas in ("leading", "trailing") else sigmas
    theirs_model, ours_model = Logged(), Logged()
    theirs, _ = _diffusers_loop(_scheduler(sampler, prediction, spacing, sigmas, float64=True, monkeypatch=monkeypatch),
                                theirs_model, steps, 3, torch.float64, monkeypatch)
    plan = make_kplan(NoiseSchedule.make("linear", T), sampler, steps, prediction, spacing, sigma_schedule=sigmas)
    ours = _our_loop(plan, ours_model, 3, torch.float64)
    msg = f"{sampler} {prediction} {spacing} {sigmas} K={steps}"
    _compare_calls(ours_model, theirs_model, PEER64_LOOP, msg)
    assert ours.dtype == torch.float64
    assert_close(ours, theirs, **PEER64_LOOP, msg=msg)


def test_final_sigma_min_equals_diffusers(monkeypatch):
    import diffusers

    sched = diffusers.EulerDiscreteScheduler(final_sigmas_type="sigma_min")
    _as_float64(sched, NoiseSchedule.make("linear", T), monkeypatch)
    theirs_model, ours_model = Logged(), Logged()
    theirs, _ = _diffusers_loop(sched, theirs_model, 5, 1, torch.float64, monkeypatch)
    plan = make_kplan(NoiseSchedule.make("linear", T), "euler", 5, final_sigmas_type="sigma_min")
    ours = _our_loop(plan, ours_model, 1, torch.float64)
    _compare_calls(ours_model, theirs_model, PEER64_LOOP, "sigma_min")
    assert_close(ours, theirs, **PEER64_LOOP, msg="sigma_min")


# -- k-diffusion ----------------------------------------------------------------------------------
def _k_diffusion():
    """k-diffusion's ``sampling`` and ``external`` modules, without its package ``__init__`` (which imports
    its training stack: clip, kornia, wandb, ...)."""
    import importlib.util

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (make test installs it)")
    if "k_diffusion" not in sys.modules or not hasattr(sys.modules["k_diffusion"], "sampling"):
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)  # not executed
        import k_diffusion.external  # noqa: F401
        import k_diffusion.sampling  # noqa: F401
    return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]


K_FUNCTIONS = {"euler": "sample_euler", "euler-a": "sample_euler_ancestral", "heun": "sample_heun",
               "dpm2": "sample_dpm_2", "dpm2-a": "sample_dpm_2_ancestral", "lms": "sample_lms",
               "dpm++2s-a": "sample_dpmpp_2s_ancestral", "dpm++sde": "sample_dpmpp_sde",
               "dpm++3m-sde": "sample_dpmpp_3m_sde"}


def _k_noise(plan, sigmas, seed, dtype):
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` giving the contract's noise of our rows: the step's
    noisy row, and for DPM++ SDE the Brownian increments our rows make of two draws."""
    R = plan.num_steps
    s = sigmas.tolist()
    z = lambda call: batch_noise(seed, 0, R - 1 - call, SHAPE, "cpu").to(dtype)  # noqa: E731
    two = plan.solver in ksamplers.TWO_STAGE

    def sampler(sigma, sigma_next):
        i = min(range(len(s) - 1), key=lambda k: abs(s[k] - float(sigma)))
        first = 2 * i if two else i  # running call index of step i's first call
        if plan.solver != "dpm++sde":
            return z(first + 1 if two else first)
        if abs(float(sigma_next) - s[i + 1]) > 1e-12 * s[i]:  # [sigma, sigma_s]: the first row's draw
            return z(first)
        s_mid = math.sqrt(s[i] * s[i + 1])
        return (math.sqrt(s[i] - s_mid) * z(first) + math.sqrt(s_mid - s[i + 1]) * z(first + 1)) / math.sqrt(
            s[i] - s[i + 1])

    return sampler


@pytest.mark.parametrize("sigmas", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", KSAMPLERS)
def test_equals_k_diffusion(sampler, sigmas):
    """Whole samples equal k-diffusion's ``sample_*`` on the model wrapped as its ``DiscreteEpsDDPMDenoiser``,
    the same sigmas (``get_sigmas_karras`` / ``get_sigmas_exponential``) and noise, in float64; and our
    float32 ``fastddpm.sample`` equals it at PEER."""
    ks, ext = _k_diffusion()
    schedule = NoiseSchedule.make("linear", T)
    K, seed = 7, 2
    plan = make_kplan(schedule, sampler, K, sigma_schedule=sigmas, round_karras_timesteps=False)
    ac = torch.as_tensor(schedule.alphas_cumprod64)
    inner = Logged()
    denoiser = ext.DiscreteEpsDDPMDenoiser(inner, ac, quantize=False)
    get = ks.get_sigmas_karras if sigmas == "karras" else ks.get_sigmas_exponential
    # k-diffusion's sigmas (its ramp is float32) are ours to float32 rounding: both sides step on ours
    assert_close(get(K, float(denoiser.sigma_min), float(denoiser.sigma_max)).double(),
                 torch.as_tensor(plan.step_sigmas), atol=1e-12, rtol=1e-6, msg="sigmas")
    k_sigmas = torch.as_tensor(plan.step_sigmas)
    x = batch_noise(seed, 0, plan.num_steps, SHAPE, "cpu").double() * k_sigmas[0]
    kwargs = {"disable": True}
    if sampler in ksamplers.STOCHASTIC:
        kwargs["noise_sampler"] = _k_noise(plan, k_sigmas, seed, torch.float64)
    theirs = getattr(ks, K_FUNCTIONS[sampler])(denoiser, x, k_sigmas, **kwargs)
    assert len(inner.calls) == plan.num_steps == model_calls(sampler, K)

    ours_model = Logged()
    ours = _our_loop(plan, ours_model, seed, torch.float64)
    for j, ((xo, to), (xt, tt)) in enumerate(zip(ours_model.calls, inner.calls)):
        assert_close(to, tt, atol=1e-8, rtol=0, msg=f"{sampler}: t of call {j}")
        assert_close(xo, xt, **PEER64_LOOP, msg=f"{sampler}: model input of call {j}")
    assert_close(ours, theirs, **PEER64_LOOP, msg=sampler)
    fast = fastddpm.sample(Logged(), SHAPE[0], steps=K, seed=seed, sampler=sampler, clip_denoised=False,
                           karras_sigmas=sigmas == "karras", exponential_sigmas=sigmas == "exponential",
                           progress=False)
    if sampler in ("dpm2", "dpm2-a"):
        return  # fastddpm.sample rounds DPM2's Karras timesteps as diffusers does; k-diffusion does not
    assert_close(fast, theirs, **_scaled(PEER, theirs), msg=f"{sampler} float32")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_orders_equal_k_diffusion(order):
    """``sample_lms(order=)``: our LMS of each lower order on the same model, sigmas and start (float64)."""
    ks, ext = _k_diffusion()
    schedule = NoiseSchedule.make("linear", T)
    plan = make_kplan(schedule, "lms", 6, sigma_schedule="karras", order=order)
    inner = Logged()
    denoiser = ext.DiscreteEpsDDPMDenoiser(inner, torch.as_tensor(schedule.alphas_cumprod64), quantize=False)
    sigmas = torch.as_tensor(plan.step_sigmas)
    x = batch_noise(1, 0, plan.num_steps, SHAPE, "cpu").double() * sigmas[0]
    theirs = ks.sample_lms(denoiser, x, sigmas, disable=True, order=order)
    ours = _our_loop(plan, Logged(), 1, torch.float64)
    assert_close(ours, theirs, **PEER64_LOOP, msg=f"lms order {order}")
    assert DDPM(sampler="lms", solver_order=order, karras_sigmas=True).multistep_plan(6).table.tolist() == \
        plan.table.tolist()


@pytest.mark.parametrize("window", [(0.0, math.inf), (0.5, 10.0)], ids=["every-step", "tmin-tmax"])
@pytest.mark.parametrize("sampler", ksamplers.CHURNED)
def test_churn_equals_k_diffusion(sampler, window):
    """EDM's stochastic sampler (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) equals k-diffusion's
    ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` given the same draws: step i's (k-diffusion's i-th
    ``randn_like``) is the contract's noise of our step i-1's last row; the first step's churn is folded into
    our start, so k-diffusion gets that start and a zero first draw."""
    ks, ext = _k_diffusion()
    schedule = NoiseSchedule.make("linear", T)
    K, seed, churn, s_noise = 6, 3, 2.0, 0.9
    kw = dict(s_churn=churn, s_tmin=window[0], s_tmax=window[1], s_noise=s_noise)
    plan = make_kplan(schedule, sampler, K, sigma_schedule="karras", round_karras_timesteps=False, **kw)
    assert plan.stochastic
    R = plan.num_steps
    last_call = [2 * i + 1 if sampler != "euler" and i < K - 1 else (2 * i if sampler != "euler" else i)
                 for i in range(K)]
    draws = iter([torch.zeros(SHAPE, dtype=torch.float64)] + [
        batch_noise(seed, 0, R - 1 - last_call[i - 1], SHAPE, "cpu").double() for i in range(1, K)])
    inner = Logged()
    denoiser = ext.DiscreteEpsDDPMDenoiser(inner, torch.as_tensor(schedule.alphas_cumprod64), quantize=False)
    sigmas = torch.as_tensor(plan.step_sigmas)
    hats = ksamplers._churn(plan.step_sigmas, churn, *window)
    x_start = batch_noise(seed, 0, R, SHAPE, "cpu").double() * plan.start_scale / ksamplers._alpha(hats[0])
    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(ks.torch, "randn_like", lambda x, **_: next(draws).to(x.dtype))
        theirs = getattr(ks, K_FUNCTIONS[sampler])(denoiser, x_start, sigmas, disable=True, **kw)
    assert len(inner.calls) == R
    ours_model = Logged()
    ours = _our_loop(plan, ours_model, seed, torch.float64)
    for j, ((xo, to), (xt, tt)) in enumerate(zip(ours_model.calls, inner.calls)):
        assert_close(to, tt, atol=1e-8, rtol=0, msg=f"{sampler}: t of call {j}")
        assert_close(xo, xt, **PEER64_LOOP, msg=f"{sampler}: model input of call {j}")
    assert_close(ours, theirs, **PEER64_LOOP, msg=sampler)
    if window == (0.0, math.inf):
        assert hats[0] > plan.step_sigmas[0]  # the first step churned: its start is sigma_hat_0's
    else:
        assert hats[0] == plan.step_sigmas[0] and any(h > s for h, s in zip(hats, plan.step_sigmas))


# -- every path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", KSAMPLERS)
def test_engine_equals_eager_and_the_float64_loop(sampler):
    model = Logged()
    kw = dict(steps=5, seed=4, sampler=sampler, clip_denoised=False, progress=False)
    eager = fastddpm.sample(model, SHAPE[0], engine=False, **kw)
    engine = fastddpm.sample(model, SHAPE[0], engine=True, **kw)
    assert_close(engine, eager, **FP32, msg=sampler)
    plan = DDPM(sampler=sampler, clip_denoised=False).multistep_plan(5)
    truth = _our_loop(plan, Logged(), 4, torch.float64)
    assert_close(eager, truth, **_scaled(PEER, truth), msg=f"{sampler} vs float64")


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_churn_through_sample_engine_and_eager(sampler):
    """``s_churn`` through ``fastddpm.sample``: the engine equals the eager loop, both our float64 plan loop,
    and churn changes the sample (it is not ignored)."""
    kw = dict(steps=5, seed=4, sampler=sampler, clip_denoised=False, progress=False, s_churn=1.5, s_tmax=30.0,
              s_noise=1.003)
    eager = fastddpm.sample(Logged(), SHAPE[0], engine=False, **kw)
    engine = fastddpm.sample(Logged(), SHAPE[0], engine=True, **kw)
    assert_close(engine, eager, **FP32, msg=sampler)
    plan = DDPM(sampler=sampler, clip_denoised=False, s_churn=1.5, s_tmax=30.0, s_noise=1.003).multistep_plan(5)
    truth = _our_loop(plan, Logged(), 4, torch.float64)
    assert_close(eager, truth, **_scaled(PEER, truth), msg=f"{sampler} vs float64")
    plain = fastddpm.sample(Logged(), SHAPE[0], steps=5, seed=4, sampler=sampler, clip_denoised=False,
                            progress=False)
    assert (plain - eager).abs().max() > 1e-2


@pytest.mark.parametrize("sampler,options", [("euler-a", {}), ("dpm++sde", {}), ("heun", {"s_churn": 1.0})])
def test_noise_contract(sampler, options):
    """Sample i of a seed is the same for any n, batch split or offset."""
    kw = dict(steps=4, seed=9, sampler=sampler, progress=False, **options)
    whole = fastddpm.sample(Logged(), 5, **kw)
    assert torch.equal(fastddpm.sample(Logged(), 5, batch_size=2, **kw), whole)
    assert torch.equal(fastddpm.sample(Logged(), 2, sample_offset=3, **kw), whole[3:])
    assert not torch.equal(fastddpm.sample(Logged(), 5, **{**kw, "seed": 10}), whole)


def test_callback_gets_each_call_and_its_fractional_timestep():
    calls = []
    fastddpm.sample(Logged(), 1, steps=3, sampler="heun", progress=False,
                    callback=lambda i, t, x: calls.append((i, t)))
    plan = DDPM(sampler="heun").multistep_plan(3)
    assert [i for i, _ in calls] == [4, 3, 2, 1, 0]
    assert [t for _, t in calls] == [plan.callback_timestep(i) for i in range(4, -1, -1)]
    assert calls[0][1] == 999 and isinstance(calls[1][1], float)


def test_dpmpp_sde_increments_are_one_brownian_path():
    """The second row's noise is the Brownian increment over [sigma, sigma_next] containing the first's."""
    plan = make_kplan(NoiseSchedule.make("linear", T), "dpm++sde", 3)
    assert plan.stochastic and plan.num_steps == 5
    # a deterministic eta=0 plan draws nothing
    assert not make_kplan(NoiseSchedule.make("linear", T), "dpm++sde", 3, eta=0.0).stochastic


def test_plans_and_errors():
    schedule = NoiseSchedule.make("linear", T)
    for sampler in KSAMPLERS:
        plan = make_kplan(schedule, sampler, 6)
        assert plan.num_steps == model_calls(sampler, 6) and np.isfinite(plan.table).all()
        assert plan.sigma_steps == 6 and plan.step_sigmas[-1] == 0.0
    with pytest.raises(ValueError, match=r"sampler must be one of \(.*'euler', 'euler-a', 'heun'"):
        fastddpm.sample(Logged(), 1, sampler="euler_a", progress=False)
    with pytest.raises(ValueError, match="at most one of karras_sigmas, exponential_sigmas and beta_sigmas"):
        DDPM(sampler="euler", karras_sigmas=True, beta_sigmas=True)
    with pytest.raises(ValueError, match=r"exponential_sigmas=True is for the k-samplers"):
        DDPM(sampler="dpm++2m", exponential_sigmas=True)
    with pytest.raises(ValueError, match=r"final_sigmas_type='sigma_min' is only for single-stage samplers"):
        make_kplan(schedule, "heun", 4, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"final_sigmas_type must be one of \('zero', 'sigma_min'\)"):
        DDPM(sampler="euler", final_sigmas_type="max")
    with pytest.raises(ValueError, match="eta is DDIM's; sampler='euler-a' uses k-diffusion's eta=1"):
        DDPM(sampler="euler-a", eta=0.5)
    with pytest.raises(ValueError, match="s_noise must be a finite number >= 0"):
        make_kplan(schedule, "euler-a", 4, s_noise=-1.0)
    with pytest.raises(ValueError, match=r"s_churn is for \('euler', 'heun', 'dpm2'\).*not sampler='euler-a'"):
        make_kplan(schedule, "euler-a", 4, s_churn=1.0)
    with pytest.raises(ValueError, match=r"s_tmax must be a number >= s_tmin=2.0"):
        make_kplan(schedule, "euler", 4, s_churn=1.0, s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(ValueError, match=r"order is LMS's \(sampler='lms'\), not sampler='heun'"):
        make_kplan(schedule, "heun", 4, order=2)
    with pytest.raises(ValueError, match=r"order must be an int in \[1, 4\]"):
        make_kplan(schedule, "lms", 4, order=5)
    assert make_kplan(schedule, "lms", 4, order=1).table[:, -2].tolist() == [0.0] * 4  # Euler: no H3
    with pytest.raises(ValueError, match=r"s_churn, s_tmin and s_tmax are for the samplers .*not sampler='lms'"):
        DDPM(sampler="lms", s_churn=0.5)
    with pytest.raises(ValueError, match=r"s_tmax must be a finite number >= 1.0"):
        DDPM(sampler="euler", s_churn=0.5, s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(ValueError, match=r"s_noise is for the k-samplers"):
        DDPM(sampler="dpm++2m", s_noise=0.9)
    with pytest.raises(ValueError,
                       match=r"solver_order is for the samplers \('lms', 'deis', 'dpm-solver'\), not sampler='euler'"):
        DDPM(sampler="euler", solver_order=2)
    with pytest.raises(ValueError, match=r"solver_order must be one of \(1, 2, 3, 4\) for lms, got 0"):
        fastddpm.sample(Logged(), 1, sampler="lms", solver_order=0, progress=False)
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
        fastddpm.sample(Logged(), 1, sampler="heun", steps=0, progress=False)
    assert DDPM(sampler="euler", begin_index=2).multistep_plan(5).num_steps == 3  # img2img's begun plan
    process = DDPM(sampler="dpm++3m-sde", karras_sigmas=True, prediction="v")
    assert DDPM.from_json(process.to_json()).config == process.config


# -- from_diffusers --------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_from_diffusers_samples_as_the_scheduler(sampler, monkeypatch):
    """``DDPM.from_diffusers(scheduler)`` and a pipeline with that scheduler sample as diffusers' loop does."""
    import diffusers

    cls = getattr(diffusers, DIFFUSERS[sampler])
    options = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    if sampler != "euler-a":
        options["use_karras_sigmas"] = sampler != "dpm2"
    scheduler = cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, **options)
    process = DDPM.from_diffusers(scheduler)
    assert process.config.sampler == sampler and process.config.prediction == "v"
    assert process.config.karras_sigmas == options.get("use_karras_sigmas", False)
    assert DDPM.from_diffusers({**scheduler.config, "_class_name": cls.__name__}).config == process.config
    if sampler.startswith("dpm2") or sampler == "lms":  # KDPM2, KDPM2Ancestral and LMS have the same fields
        with pytest.raises(ValueError, match="config dict without '_class_name' whose keys are not exactly one"):
            DDPM.from_diffusers(dict(scheduler.config))
    else:
        assert DDPM.from_diffusers(dict(scheduler.config)).config == process.config
    theirs, _ = _diffusers_loop(scheduler, Logged(), 5, 7, torch.float32, monkeypatch)
    pipeline = types.SimpleNamespace(unet=Logged(), scheduler=scheduler)
    ours = fastddpm.sample(pipeline, SHAPE[0], steps=5, seed=7, progress=False)
    assert_close(ours, theirs, **_scaled(PEER_KARRAS, theirs), msg=sampler)


@pytest.mark.parametrize("sigmas", ["default", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_dpm_solver_sde_scheduler_equals_dpmpp_sde(prediction, sigmas, monkeypatch):
    """diffusers' ``DPMSolverSDEScheduler`` (k-diffusion's DPM++ SDE with a Brownian tree) is ``dpm++sde``: a
    pipeline with it samples as diffusers' loop given the same Brownian increments (its ``noise_sampler``
    handed our rows' draws), call for call, in float64."""
    import diffusers

    sched = diffusers.DPMSolverSDEScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction],
                                            use_karras_sigmas=sigmas == "karras", noise_sampler_seed=123)
    process = DDPM.from_diffusers(sched)
    assert process.config.sampler == "dpm++sde" and process.config.karras_sigmas == (sigmas == "karras")
    _as_float64(sched, NoiseSchedule.make("linear", T), monkeypatch)
    K, seed = 5, 6
    plan = make_kplan(NoiseSchedule.make("linear", T), "dpm++sde", K, prediction, sigma_schedule=sigmas)
    sched.set_timesteps(K)
    sched.noise_sampler = _k_noise(plan, torch.as_tensor(plan.step_sigmas), seed, torch.float64)
    theirs_model, ours_model = Logged(), Logged()
    x = batch_noise(seed, 0, plan.num_steps, SHAPE, "cpu").double() * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = theirs_model(sched.scale_model_input(x, t), t.expand(SHAPE[0]))
            x = sched.step(out, t, x).prev_sample
    ours = _our_loop(plan, ours_model, seed, torch.float64)
    _compare_calls(ours_model, theirs_model, PEER64_LOOP, f"DPMSolverSDE {prediction} {sigmas}")
    assert_close(ours, x, **PEER64_LOOP, msg=f"DPMSolverSDE {prediction} {sigmas}")


@pytest.mark.parametrize("strength,N", [(0.6, 6), (0.35, 9)])
@pytest.mark.parametrize("sampler", [s for s in DIFFUSERS if s != "lms"])
def test_img2img_equals_the_diffusers_loop(sampler, strength, N, monkeypatch):
    """``fastddpm.img2img`` with a k-sampler is diffusers' img2img loop: ``set_begin_index(t_start * order)``,
    ``add_noise`` at that sigma (the contract's noise of our x_T slot), the rest of the calls (each model
    input and timestep equal) and the result."""
    from fastddpm.img2img import img2img, start_step

    sched = _scheduler(sampler)
    sched.set_timesteps(N)
    t_start = start_step(N, strength)
    sched.set_begin_index(t_start * sched.order)
    timesteps = sched.timesteps[t_start * sched.order:]
    R = len(timesteps)
    image = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    module = sys.modules[type(sched).__module__]
    call = {"j": 0}
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor",
                            lambda *a, **k: batch_noise(8, 0, R - 1 - call["j"], SHAPE, "cpu"))
    theirs_model = Logged()
    x = sched.add_noise(image, batch_noise(8, 0, R, SHAPE, "cpu"), timesteps[:1].repeat(SHAPE[0]))
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            call["j"] = j
            x = sched.step(theirs_model(sched.scale_model_input(x, t), t.expand(SHAPE[0])), t, x).prev_sample
    ours_model = Logged()
    ours = img2img(ours_model, image, strength=strength, steps=N, seed=8, sampler=sampler, clip_denoised=False,
                   progress=False)
    msg = f"img2img {sampler} strength={strength} N={N}"
    _compare_calls(ours_model, theirs_model, PEER, msg)
    assert_close(ours, x, **_scaled(PEER, x), msg=msg)


@pytest.mark.parametrize("order", [2, 4])
def test_lms_img2img_equals_k_diffusion(order):
    """LMS begun part-way warms up from first order, as k-diffusion's ``sample_lms`` on ``sigmas[t_start:]``.
    (diffusers' ``LMSDiscreteScheduler`` after ``set_begin_index`` keeps the whole plan's order and drops the
    terms of the derivatives it has not seen: its first steps are not a consistent method; not reproduced.)"""
    from fastddpm.img2img import img2img, start_step

    ks, ext = _k_diffusion()
    schedule = NoiseSchedule.make("linear", T)
    N, strength = 8, 0.6
    t_start = start_step(N, strength)
    image = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    whole = make_kplan(schedule, "lms", N, order=order)
    sigmas = torch.as_tensor(whole.step_sigmas[t_start:])
    begun = make_kplan(schedule, "lms", N, order=order, begin_index=t_start)
    x = image + sigmas[0] * batch_noise(3, 0, begun.num_steps, SHAPE, "cpu").double()  # add_noise, k-diffusion's x
    inner = Logged()
    denoiser = ext.DiscreteEpsDDPMDenoiser(inner, torch.as_tensor(schedule.alphas_cumprod64), quantize=False)
    theirs = ks.sample_lms(denoiser, x, sigmas, disable=True, order=order)
    ours = img2img(Logged(), image.float(), strength=strength, steps=N, seed=3, sampler="lms", solver_order=order,
                   clip_denoised=False, progress=False)
    assert_close(ours, theirs, **_scaled(PEER, theirs), msg=f"lms order {order} img2img")


def test_begun_plans_are_the_whole_plans_tail():
    """Begun part-way, a history-free k-sampler's rows are the whole plan's last rows (the same noise slots);
    LMS and DPM++ 3M SDE restart their history (k-diffusion's sample_* on the tail of the sigmas)."""
    schedule = NoiseSchedule.make("linear", T)
    for sampler in ("euler", "euler-a", "heun", "dpm2-a", "dpm++sde"):
        whole, begun = make_kplan(schedule, sampler, 7), make_kplan(schedule, sampler, 7, begin_index=3)
        R = begun.num_steps
        assert R == model_calls(sampler, 4) and begun.start_scale == 1.0 and begun.whole_steps == 7
        assert np.array_equal(begun.table, whole.table[:R]) and np.array_equal(begun.timesteps, whole.timesteps[:R])
    lms = make_kplan(schedule, "lms", 7, begin_index=3)
    assert lms.table[-1, TABLE_COLUMNS.index("p1")] == 0.0  # its first step is first order
    assert not np.array_equal(lms.table, make_kplan(schedule, "lms", 7).table[:4])  # the whole plan's is 4th order
    with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 7\)"):
        make_kplan(schedule, "euler", 7, begin_index=7)


def test_from_diffusers_refuses_what_it_cannot_represent():
    import diffusers

    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler.interpolation_type='log_linear' has no fastddpm"):
        DDPM.from_diffusers(diffusers.EulerDiscreteScheduler(interpolation_type="log_linear"))
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler.sigma_max=80.0 has no fastddpm equivalent"):
        DDPM.from_diffusers(diffusers.EulerDiscreteScheduler(sigma_max=80.0))
    with pytest.raises(ValueError, match=r"HeunDiscreteScheduler.clip_sample_range=2.0"):
        DDPM.from_diffusers(diffusers.HeunDiscreteScheduler(clip_sample=True, clip_sample_range=2.0))
    process = DDPM.from_diffusers(diffusers.EulerDiscreteScheduler(final_sigmas_type="sigma_min",
                                                                   use_exponential_sigmas=True))
    assert process.config.final_sigmas_type == "sigma_min" and process.config.exponential_sigmas
    assert DDPM.from_diffusers(diffusers.HeunDiscreteScheduler(clip_sample=True)).config.clip_denoised is True
