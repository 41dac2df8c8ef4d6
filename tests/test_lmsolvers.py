"""PNDM (PLMS) and DEIS as multistep-table rows equal diffusers' PNDMScheduler(skip_prk_steps=True)
and DEISMultistepScheduler step for step.

As ``test_multistep._run_both``: both sides get the same x and model outputs at every call, x chained
through diffusers' outputs; float32 at PEER (and our float32 at FP32 against our float64 on the same
inputs), float64 with diffusers made to compute in float64 (``_as_float64``) at PEER64.
"""
import math

import numpy as np
import pytest
import torch

from fastddpm.lmsolvers import deis_coefficients, make_deis_plan, make_pndm_plan
from fastddpm.multistep import TABLE_COLUMNS, MultistepSampler
from fastddpm.schedule import NoiseSchedule
from test_multistep import _as_float64
from tolerances import PEER, PEER64, PEER_KARRAS32, assert_close, fp32_at

T = 1000
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
# diffusers' float32 PNDM on its last call, onto final_alpha_cumprod: it forms abar_prev - abar_t of two
# numbers near 1 (1 - abar_1 ~ 3e-4) in float32, a relative error up to ~3e-4 in the step's epsilon
# coefficient, times a combined epsilon that is large at t ~ 0 (sigma ~ 0.01; measured up to 8.6e-4).
# Our float32 stays within FP32 (scaled) of float64 there, and float64 diffusers within PEER64.
PNDM_FINAL32 = dict(atol=2e-3, rtol=1e-4)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
LINEAR = NoiseSchedule.make("linear", T)


def _pndm(prediction="epsilon", spacing="leading", set_alpha_to_one=False, steps_offset=0):
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=T, skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one,
                         prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
                         steps_offset=steps_offset)


def _deis(prediction="epsilon", spacing="linspace", karras=False, clip=False, order=2, lower_order_final=True):
    from diffusers import DEISMultistepScheduler

    return DEISMultistepScheduler(num_train_timesteps=T, solver_order=order, prediction_type=DIFFUSERS_PREDICTION[
        prediction], timestep_spacing=spacing, use_karras_sigmas=karras, thresholding=clip, sample_max_value=1.0,
        lower_order_final=lower_order_final)


def _run_both(sched, plan, prediction, dtype, monkeypatch, *, set_alpha_to_one=False, shape=(2, 3, 4, 4), seed=0,
              steps=None, karras=False):
    """Step ``sched`` (not yet ``set_timesteps``) and ``plan`` side by side from the same x and outputs."""
    if dtype == torch.float64:
        _as_float64(sched, LINEAR, monkeypatch)
        if hasattr(sched, "final_alpha_cumprod"):  # PNDM's, computed from float32 in __init__
            sched.final_alpha_cumprod = torch.tensor(1.0 if set_alpha_to_one else LINEAR.alphas_cumprod64[0],
                                                     dtype=torch.float64)
    elif karras:  # as test_multistep: diffusers' float32 cumprod drift moves every Karras sigma
        sched.alphas_cumprod = torch.as_tensor(LINEAR.alphas_cumprod64).float()
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    assert plan.timesteps[::-1].tolist() == sched.timesteps.tolist()
    if plan.solver == "deis":  # the sigma (sigma / alpha) of the x each row steps from
        assert_close(torch.as_tensor(plan.sigmas[::-1].copy()), sched.sigmas[:-1], **PEER)
    else:
        ts = plan.timesteps
        assert np.array_equal(plan.sigmas, np.sqrt((1 - LINEAR.alphas_cumprod64[ts]) / LINEAR.alphas_cumprod64[ts]))
    ac = LINEAR.alphas_cumprod64
    g = torch.Generator().manual_seed(seed)
    data = (0.8 * torch.randn(shape, generator=g)).to(dtype)  # some |x0| > 1, so clipping acts
    x = torch.randn(shape, generator=g).to(dtype)
    ours_sampler, exact = MultistepSampler(plan, x), (MultistepSampler(plan, x.double()) if dtype != torch.float64
                                                      else None)
    tol = PEER64 if dtype == torch.float64 else PEER_KARRAS32 if karras else PEER
    for j, t in enumerate(sched.timesteps.tolist()):
        alpha, sigma = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
        eps = (x - alpha * data) / sigma + 0.05 * torch.randn(shape, generator=g).to(dtype)
        out = {"epsilon": eps, "x0": data + 0.05 * torch.randn(shape, generator=g).to(dtype),
               "v": alpha * eps - sigma * data}[prediction]
        theirs = sched.step(out, t, x).prev_sample
        ours = ours_sampler.step(out, x)
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        last32 = plan.solver == "pndm" and dtype == torch.float32 and j == plan.num_steps - 1
        msg = f"{plan.solver} {prediction} call {j} (t={t})"
        assert_close(ours, theirs, **(PNDM_FINAL32 if last32 else tol), msg=msg)
        if exact is not None:
            # FP32 scaled by p0 * a, the weight x_next gives x through D = a x + b out: D's float32
            # rounding is ulp(a x) (a = 1/alpha ~ 157 at t = T-1), and a one-call PLMS lands on D
            row = dict(zip(TABLE_COLUMNS, plan.table[plan.num_steps - 1 - j]))
            truth = exact.step(out.double(), x.double())
            assert_close(ours, truth, **fp32_at(abs(row["p0"] * row["a"])), msg=f"float64 {msg}")
        x = theirs


# -- PNDM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 16])
def test_pndm_matches_diffusers(steps, prediction, spacing, dtype, monkeypatch):
    plan = make_pndm_plan(LINEAR, steps, prediction, spacing)
    assert plan.num_steps == (steps + 1 if steps >= 2 else 1) and plan.solver == "pndm"
    _run_both(_pndm(prediction, spacing), plan, prediction, dtype, monkeypatch, steps=steps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_pndm_alpha_to_one_and_steps_offset(prediction, steps_offset, set_alpha_to_one, dtype, monkeypatch):
    """The Stable Diffusion setting (leading, steps_offset=1, set_alpha_to_one=False) and the others."""
    plan = make_pndm_plan(LINEAR, 10, prediction, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    _run_both(_pndm(prediction, "leading", set_alpha_to_one, steps_offset), plan, prediction, dtype, monkeypatch,
              set_alpha_to_one=set_alpha_to_one, steps=10, shape=(3, 1, 5, 7), seed=2)


def test_pndm_trailing_with_alpha_to_one(monkeypatch):
    for dtype in (torch.float32, torch.float64):
        plan = make_pndm_plan(LINEAR, 6, "v", "trailing", set_alpha_to_one=True)
        _run_both(_pndm("v", "trailing", True), plan, "v", dtype, monkeypatch, set_alpha_to_one=True, steps=6,
                  shape=(3, 1, 5, 7))


def test_pndm_clip_denoised_clamps_the_data_prediction():
    """No diffusers counterpart: D is clamped, and the ring keeps the output implied by the clamped D."""
    plan = make_pndm_plan(LINEAR, 6, clip_denoised=True)
    assert plan.clip_denoised
    x = 3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s = MultistepSampler(plan, x)
    s.step(torch.zeros_like(x), x)
    row = dict(zip(TABLE_COLUMNS, plan.table[-1]))
    d = (row["a"] * x).clamp(-1, 1)
    assert (d.abs() == 1).any()  # the clamp acted
    assert torch.allclose(s.history[(plan.num_steps - 1) % 3], d - row["a"] * x, atol=1e-5)


def test_pndm_refuses_prk():
    with pytest.raises(ValueError, match=r"skip_prk_steps=False .* 4, 8 and 12 calls back, more than a ring of 3 "
                                         r"\+ x_last"):
        make_pndm_plan(LINEAR, 10, skip_prk_steps=False)


# -- DEIS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [7, 16])  # < 15 and >= 15: lower_order_final differs
def test_deis_matches_diffusers(steps, order, prediction, spacing, dtype, monkeypatch):
    karras = spacing == "karras"
    spacing = "linspace" if karras else spacing
    plan = make_deis_plan(LINEAR, steps, prediction, spacing, karras, order=order)
    _run_both(_deis(prediction, spacing, karras, order=order), plan, prediction, dtype, monkeypatch, steps=steps,
              karras=karras)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [2, 3, 5])
def test_deis_few_steps_and_lower_order_final(steps, order, lower_order_final, dtype, monkeypatch):
    plan = make_deis_plan(LINEAR, steps, "v", "trailing", order=order, lower_order_final=lower_order_final)
    _run_both(_deis("v", "trailing", order=order, lower_order_final=lower_order_final), plan, "v", dtype,
              monkeypatch, steps=steps, shape=(3, 1, 5, 7), seed=1)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_deis_clip_denoised_matches_diffusers_thresholding(prediction, monkeypatch):
    for dtype in (torch.float32, torch.float64):
        plan = make_deis_plan(LINEAR, 8, prediction, clip_denoised=True, order=3)
        _run_both(_deis(prediction, clip=True, order=3), plan, prediction, dtype, monkeypatch, steps=8)


def test_deis_karras_lower_order_final_off(monkeypatch):
    for dtype in (torch.float32, torch.float64):
        plan = make_deis_plan(LINEAR, 9, "epsilon", karras_sigmas=True, order=3, lower_order_final=False)
        _run_both(_deis(karras=True, order=3, lower_order_final=False), plan, "epsilon", dtype, monkeypatch,
                  steps=9, karras=True, shape=(3, 1, 5, 7))


def test_deis_coefficients_are_the_integrals_of_the_lagrange_basis():
    """Against diffusers' closed forms (order 2 and 3) and a quadrature; they sum to rho_t - rho_s."""
    rt, r0, r1, r2 = 0.3, 0.5, 0.9, 1.6
    got = deis_coefficients(rt, np.array([r0, r1, r2]))
    L = np.log
    grid = np.linspace(r0, rt, 200001)
    u = L(grid)
    for k, (b, c, d) in enumerate([(r0, r1, r2), (r1, r2, r0), (r2, r0, r1)]):
        ell = (u - L(c)) * (u - L(d)) / ((L(b) - L(c)) * (L(b) - L(d)))
        quad = np.sum((ell[1:] + ell[:-1]) / 2 * np.diff(grid))
        assert abs(got[k] - quad) < 1e-9
    assert abs(got.sum() - (rt - r0)) < 1e-14
    two = deis_coefficients(rt, np.array([r0, r1]))

    def ind(t, b, c):
        return t * (-L(c) + L(t) - 1) / (L(b) - L(c))
    assert abs(two[0] - (ind(rt, r0, r1) - ind(r0, r0, r1))) < 1e-14
    assert abs(two[1] - (ind(rt, r1, r0) - ind(r0, r1, r0))) < 1e-14


# -- errors ------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
        make_pndm_plan(LINEAR, 0)
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
        make_pndm_plan(LINEAR, 2.0)
    with pytest.raises(ValueError, match=r"prediction must be one of \('epsilon', 'v'\)"):
        make_pndm_plan(LINEAR, 5, "x0")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        make_pndm_plan(LINEAR, 5, spacing="uniform")
    with pytest.raises(ValueError, match="steps_offset must be an int >= 0"):
        make_pndm_plan(LINEAR, 5, steps_offset=-1)
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        make_pndm_plan(LINEAR, 1000, steps_offset=1)
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        make_pndm_plan(LINEAR, 61, spacing="trailing")  # numpy's arange gives a 62nd point, timestep -1
    with pytest.raises(ValueError, match="set_alpha_to_one must be a bool"):
        make_pndm_plan(LINEAR, 5, set_alpha_to_one=1)
    with pytest.raises(ValueError, match="clip_denoised must be a bool"):
        make_pndm_plan(LINEAR, 5, clip_denoised="yes")
    with pytest.raises(ValueError, match="thresholding must be None or"):
        make_deis_plan(LINEAR, 5, thresholding=0.995)
    for make in (make_pndm_plan, make_deis_plan):
        with pytest.raises(ValueError, match="not respaced"):
            make(LINEAR.respace(50), 10)
    with pytest.raises(ValueError, match=r"steps must be an int in \[2, 1000\]"):
        make_deis_plan(LINEAR, 1, order=1)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\)"):
        make_deis_plan(LINEAR, 5, order=4)
    with pytest.raises(ValueError, match="prediction must be one of"):
        make_deis_plan(LINEAR, 5, "eps")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        make_deis_plan(LINEAR, 5, spacing="karras")
    with pytest.raises(ValueError, match="lower_order_final and karras_sigmas must be bools"):
        make_deis_plan(LINEAR, 5, lower_order_final=None)
