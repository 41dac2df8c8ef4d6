"""The multistep solvers' final-step, spacing and form options equal diffusers step for step.

``make_plan``'s ``lower_order_final``, ``final_sigmas_type``, ``euler_at_final``, ``use_lu_lambdas``,
``algorithm`` (``dpmsolver``: noise prediction) and ``solver_type`` (``heun``) against
``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` with the same options, in the style of
``test_multistep`` (its ``_run_both``: same x and outputs each step, x chained through diffusers';
fp32 at PEER / PEER_KARRAS32 and ours-fp32 against ours-fp64 at FP32; fp64 at PEER64).  Each test
runs every spacing (incl. Karras) with the prediction rotating over the parametrisation, so each
(prediction, spacing) pair is met across a test's ids.
"""
import math

import numpy as np
import pytest
import torch

from fastddpm import multistep
from fastddpm.multistep import MultistepSampler, make_plan, solver_orders
from fastddpm.schedule import NoiseSchedule
from test_multistep import T, _run_both
from tolerances import EXACT, PEER64, assert_close

PREDICTIONS = ["epsilon", "x0", "v"]
SPACINGS = ["linspace", "leading", "trailing", "karras"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
STEPS = pytest.mark.parametrize("steps", [7, 16])  # < 15 and >= 15: diffusers' lower_order_final differs
DPM = ["dpm++2m", "dpm++3m", "dpm++2m-sde"]


def _nan_at_end(solver, spacing, steps, dtype, options, begin=0):
    """Whether diffusers' last step is NaN where ours is (about) the identity: Karras (Lu) sigmas end at the
    schedule's smallest, and ``sigma_min`` repeats it -- exactly in float32 (h = 0: DPM-Solver's heun
    and third-order forms divide 0 by 0), 1 ulp below it in float64 (h ~ -1e-15 < 0: the SDE's noise
    scale is the square root of 1 - e^{-2h} < 0).  Ours clamps that square root at 0."""
    if solver == "unipc" or spacing not in ("karras", "lu") or options.get("final_sigmas_type") != "sigma_min":
        return False
    if dtype == torch.float64:
        return solver == "dpm++2m-sde"
    keys = ("lower_order_final", "final_sigmas_type", "euler_at_final")
    last = solver_orders(solver, steps, begin, **{k: options[k] for k in keys if k in options})[-1]
    return bool(last == 3 or (last == 2 and options.get("solver_type") == "heun"))


def _sweep(solver, steps, dtype, monkeypatch, k, spacings=SPACINGS, **options):
    """Every spacing, the prediction rotating with ``k``."""
    for i, spacing in enumerate(spacings):
        prediction = PREDICTIONS[(i + k) % 3]
        _run_both(solver, prediction, spacing, steps, dtype, monkeypatch,
                  nan_at_end=_nan_at_end(solver, spacing, steps, dtype, options), **options)


FINAL_OPTIONS = {
    "lof=False": {"lower_order_final": False},
    "sigma_min": {"final_sigmas_type": "sigma_min"},
    "sigma_min,lof=False": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "sigma_min,euler_at_final": {"final_sigmas_type": "sigma_min", "euler_at_final": True},
}


@DTYPES
@STEPS
@pytest.mark.parametrize("options", list(FINAL_OPTIONS.values()), ids=list(FINAL_OPTIONS))
@pytest.mark.parametrize("solver", multistep.SOLVERS)
def test_final_step_options_match_diffusers(solver, options, steps, dtype, monkeypatch):
    """lower_order_final=False keeps the full order to the end (DPM-Solver's last step onto 0 stays first
    order, as diffusers forces it); sigma_min ends at sigma(t=0) instead of on D; euler_at_final makes
    that last step first order.  UniPC has no euler_at_final, and needs sigma_min without
    lower_order_final (diffusers' second-order step onto 0 is inf)."""
    if solver == "unipc":
        if "euler_at_final" in options:
            pytest.skip("diffusers' UniPC has no euler_at_final")
        options = {**options, "final_sigmas_type": "sigma_min"}
    _sweep(solver, steps, dtype, monkeypatch, steps + (dtype == torch.float64), **options)


@DTYPES
@STEPS
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("solver", DPM)
def test_lu_lambdas_match_diffusers(solver, final, steps, dtype, monkeypatch):
    """use_lu_lambdas: sigmas uniform in lambda, their timesteps rounded from sigma_to_t, with either end."""
    for k, prediction in enumerate(PREDICTIONS):
        options = {"final_sigmas_type": final, "lower_order_final": k != 1}
        _run_both(solver, prediction, "lu", steps, dtype, monkeypatch,
                  nan_at_end=_nan_at_end(solver, "lu", steps, dtype, options), **options)


@DTYPES
@STEPS
@pytest.mark.parametrize("solver", DPM)
def test_heun_matches_diffusers(solver, steps, dtype, monkeypatch):
    """solver_type='heun': diffusers' other second-order form (dpm++3m's warm-up and lowered steps too)."""
    _sweep(solver, steps, dtype, monkeypatch, steps + (dtype == torch.float64), solver_type="heun")
    _sweep(solver, steps, dtype, monkeypatch, 1, spacings=["trailing", "karras"], solver_type="heun",
           final_sigmas_type="sigma_min", lower_order_final=False)


@DTYPES
@STEPS
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("solver", ["dpm++2m", "dpm++3m"])
def test_noise_prediction_form_matches_diffusers(solver, solver_type, steps, dtype, monkeypatch):
    """algorithm='dpmsolver' (DPM-Solver's eps form; diffusers needs sigma_min for it), lower_order_final
    both ways."""
    options = dict(algorithm="dpmsolver", solver_type=solver_type, final_sigmas_type="sigma_min")
    _sweep(solver, steps, dtype, monkeypatch, steps + (dtype == torch.float64), **options)
    _sweep(solver, steps, dtype, monkeypatch, 2, spacings=["linspace", "lu"], lower_order_final=False, **options)


@pytest.mark.parametrize("options", [dict(algorithm="dpmsolver", final_sigmas_type="sigma_min"),
                                     dict(solver_type="heun", lower_order_final=False),
                                     dict(final_sigmas_type="sigma_min", lower_order_final=False)],
                         ids=["dpmsolver", "heun", "sigma_min"])
@pytest.mark.parametrize("solver", multistep.SOLVERS)
def test_clip_denoised_with_options_matches_diffusers_thresholding(solver, options, monkeypatch):
    """clip_denoised (diffusers' thresholding at sample_max_value=1) acts on the x0 prediction D in every
    form: dpmsolver's eps is rebuilt from the clipped D, as diffusers' is."""
    if solver == "unipc" and options.get("solver_type") == "heun":
        pytest.skip("unipc is UniPC-bh2")
    if options.get("algorithm") == "dpmsolver" and solver not in ("dpm++2m", "dpm++3m"):
        pytest.skip("the noise-prediction form is dpm++2m's and dpm++3m's")
    if solver == "unipc":
        options = {**options, "final_sigmas_type": "sigma_min"}
    for dtype in (torch.float32, torch.float64):
        for prediction in ("epsilon", "v"):
            _run_both(solver, prediction, "linspace", 8, dtype, monkeypatch, clip=True, **options)


@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("steps, begin", [(7, 2), (7, 5), (16, 3), (16, 14)])
def test_begun_plan_with_options_matches_diffusers(solver, steps, begin, monkeypatch):
    """begin_index with lower_order_final=False and sigma_min: the final orders count against the whole
    plan's steps, the warm-up from the first step run (float64)."""
    options = dict(final_sigmas_type="sigma_min", lower_order_final=False)
    if solver in ("dpm++2m", "dpm++3m"):
        options.update(algorithm="dpmsolver", solver_type="heun")
    _run_both(solver, "v", "trailing", steps, torch.float64, monkeypatch, begin=begin, **options)


@pytest.mark.parametrize("solver", DPM)
def test_cosine_with_options_matches_diffusers(solver, monkeypatch):
    """The cosine schedule: sigma_min is sigma(t=0) whatever the lambda clip drops; Lu's timesteps are
    truncated there, as diffusers' (compared unclipped, at float64: diffusers' Lu lambdas ignore the clip)."""
    options = dict(final_sigmas_type="sigma_min", lower_order_final=False)
    if solver != "dpm++2m-sde":
        options["algorithm"] = "dpmsolver"
    for dtype in (torch.float32, torch.float64):
        _run_both(solver, "epsilon", "linspace", 10, dtype, monkeypatch, schedule="cosine",
                  lambda_min=multistep.COSINE_LAMBDA_MIN, **options)
    _run_both(solver, "v", "lu", 10, torch.float64, monkeypatch, schedule="cosine", solver_type="heun")


@pytest.mark.parametrize("solver", multistep.SOLVERS)
def test_odd_shapes_with_options_match_diffusers(solver, monkeypatch):
    options = dict(final_sigmas_type="sigma_min", lower_order_final=False)
    if solver != "unipc":
        options["solver_type"] = "heun"
    if solver in ("dpm++2m", "dpm++3m"):
        options["algorithm"] = "dpmsolver"
    for shape in [(3, 1, 5, 7), (5, 123)]:
        _run_both(solver, "epsilon", "leading", 6, torch.float32, monkeypatch, shape=shape, seed=1, **options)


# -- the table on its own ---------------------------------------------------------------------------
LIN = NoiseSchedule.make("linear", T)


@pytest.mark.parametrize("solver", multistep.SOLVERS)
def test_default_options_are_the_plan_without_them(solver):
    """Spelled-out defaults give the same plan bit for bit (existing plans are unchanged)."""
    for steps, karras in ((7, False), (16, True)):
        plain = make_plan(LIN, solver, steps, "v", karras_sigmas=karras)
        spelled = make_plan(LIN, solver, steps, "v", karras_sigmas=karras, lower_order_final=True,
                            final_sigmas_type="zero", euler_at_final=False, use_lu_lambdas=False,
                            algorithm="dpmsolver++", solver_type="midpoint")
        assert plain.table.tobytes() == spelled.table.tobytes()
        assert np.array_equal(plain.timesteps, spelled.timesteps) and np.array_equal(plain.sigmas, spelled.sigmas)


def test_orders_of_the_final_steps():
    """diffusers' rules: DPM-Solver's last step onto 0 is first order whatever lower_order_final says;
    onto sigma_min only with lower_order_final below 15 steps, or euler_at_final; UniPC lowers to the
    steps left only with lower_order_final."""
    o = solver_orders
    assert o("dpm++3m", 7).tolist() == [1, 2, 3, 3, 3, 2, 1]
    assert o("dpm++3m", 7, lower_order_final=False).tolist() == [1, 2, 3, 3, 3, 3, 1]
    assert o("dpm++3m", 7, lower_order_final=False, final_sigmas_type="sigma_min").tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert o("dpm++3m", 7, final_sigmas_type="sigma_min").tolist() == [1, 2, 3, 3, 3, 2, 1]
    assert o("dpm++3m", 16, final_sigmas_type="sigma_min")[-2:].tolist() == [3, 3]
    assert o("dpm++3m", 16, final_sigmas_type="sigma_min", euler_at_final=True)[-2:].tolist() == [3, 1]
    assert o("dpm++2m", 16, lower_order_final=False, final_sigmas_type="sigma_min", euler_at_final=True,
             begin_index=14).tolist() == [1, 1]
    assert o("unipc", 5, lower_order_final=False).tolist() == [1, 2, 2, 2, 2]
    assert o("unipc", 5).tolist() == [1, 2, 2, 2, 1]


def test_sigma_min_ends_above_zero_and_the_noise_form_keeps_its_ring_in_eps():
    for solver in multistep.SOLVERS:
        plan = make_plan(LIN, solver, 12, "epsilon", final_sigmas_type="sigma_min")
        last = dict(zip(multistep.TABLE_COLUMNS, plan.table[0]))
        s0 = math.sqrt((1 - LIN.alphas_cumprod64[0]) / LIN.alphas_cumprod64[0])
        s1 = plan.sigmas[0]
        assert last["cx"] == pytest.approx(s0 / math.sqrt(1 + s0**2) / (s1 / math.sqrt(1 + s1**2)), rel=1e-12) \
            or solver == "dpm++2m-sde"
        assert last["cx"] > 0 and last["p0"] < 1
    plan = make_plan(LIN, "dpm++3m", 12, "x0", algorithm="dpmsolver", final_sigmas_type="sigma_min")
    alpha = 1 / np.sqrt(1 + plan.sigmas**2)
    hx = plan.table[:, multistep.TABLE_COLUMNS.index("hx")]
    assert_close(torch.as_tensor(hx), torch.as_tensor(-1 / alpha), **EXACT)  # E = -(sigma/alpha) eps
    assert plan.table[:, multistep.TABLE_COLUMNS.index("a")].max() == 0  # D is still the x0 prediction


def test_zero_length_last_step_is_the_identity():
    """UniPC's Karras sigmas end at their own last sigma with sigma_min (diffusers': h = 0 exactly): the
    last predictor is x_next = x_corr, at either order; DPM-Solver's ends ~1 ulp from it: ~x."""
    for lof in (True, False):
        plan = make_plan(LIN, "unipc", 7, karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=lof)
        last = dict(zip(multistep.TABLE_COLUMNS, plan.table[0]))
        assert last["cx"] == 1 and last["p0"] == last["p1"] == last["p2"] == 0
    x = torch.randn(2, 5, dtype=torch.float64)
    for options in (dict(solver_type="heun"), dict(algorithm="dpmsolver"), {}):
        solver = "dpm++2m" if options else "dpm++3m"
        plan = make_plan(LIN, solver, 16, karras_sigmas=True, final_sigmas_type="sigma_min", **options)
        sampler = MultistepSampler(plan, x)
        y = x
        for _ in range(plan.num_steps):
            prev, y = y, sampler.step(torch.randn_like(x), y)
        assert_close(y, prev, **PEER64)


# -- refusals: one per argument -------------------------------------------------------------------
REFUSALS = [
    ("dpm++2m", dict(lower_order_final="yes"), r"lower_order_final must be a bool, got 'yes'"),
    ("dpm++2m", dict(euler_at_final=1), r"euler_at_final must be a bool, got 1"),
    ("dpm++2m", dict(use_lu_lambdas=None), r"use_lu_lambdas must be a bool, got None"),
    ("dpm++2m", dict(final_sigmas_type="min"), r"final_sigmas_type must be one of \('zero', 'sigma_min'\), got 'min'"),
    ("dpm++2m", dict(algorithm="deis"), r"algorithm must be one of \('dpmsolver\+\+', 'dpmsolver'\), got 'deis'"),
    ("dpm++2m", dict(solver_type="bh2"), r"solver_type must be one of \('midpoint', 'heun'\), got 'bh2'"),
    ("dpm++2m-sde", dict(algorithm="dpmsolver", final_sigmas_type="sigma_min"),
     r"algorithm='dpmsolver' .* is for dpm\+\+2m and dpm\+\+3m; expected algorithm='dpmsolver\+\+' for dpm\+\+2m-sde"),
    ("dpm++3m", dict(algorithm="dpmsolver"), r"algorithm='dpmsolver' .* cannot step to sigma 0: expected "
                                             r"final_sigmas_type='sigma_min'"),
    ("unipc", dict(euler_at_final=True), r"euler_at_final=True is DPM-Solver's .* expected euler_at_final=False"),
    ("unipc", dict(use_lu_lambdas=True), r"use_lu_lambdas=True is DPM-Solver's .* expected use_lu_lambdas=False"),
    ("unipc", dict(solver_type="heun"), r"solver_type='heun' is DPM-Solver's .* expected solver_type='midpoint'"),
    ("unipc", dict(lower_order_final=False), r"lower_order_final=False with final_sigmas_type='zero' is not finite "
                                             r"for unipc .* expected lower_order_final=True or final_sigmas_type"),
    ("dpm++2m", dict(use_lu_lambdas=True, karras_sigmas=True), r"use_lu_lambdas and karras_sigmas .* at most one"),
]


@pytest.mark.parametrize("solver, options, message", REFUSALS, ids=[f"{s}-{','.join(o)}" for s, o, _ in REFUSALS])
def test_option_refusals_name_the_argument(solver, options, message, monkeypatch):
    """Each option is checked before any work (here: solver_timesteps is never reached)."""
    def no_work(*a, **k):
        raise AssertionError("make_plan did work before refusing")

    monkeypatch.setattr(multistep, "solver_timesteps", no_work)
    with pytest.raises(ValueError, match=message):
        make_plan(LIN, solver, 10, **options)
