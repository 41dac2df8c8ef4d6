"""Singlestep DPM-Solver (fastddpm.singlestep) equals diffusers' DPMSolverSinglestepScheduler call for call.

As ``test_multistep``: both sides get the same x, model outputs and (sde-dpmsolver++) noise at every
call, x chained through diffusers' outputs.  At float32 the comparison is at PEER (PEER_KARRAS32 on
Karras sigmas) and ours is held to FP32 against our float64 run on the same inputs; at float64 diffusers
computes in float64 on our schedule (``_as_float64``) and the table is checked to PEER64.  diffusers'
singlestep scheduler has linspace timesteps only: leading/trailing are its multistep scheduler's, given
to the singlestep one as ``set_timesteps(timesteps=...)``.  Few-call ``dpmsolver`` runs of order >= 2
span sigma 157 -> 0.01 in one group, where diffusers' float32 step is ~1e-2 off its float64 one, and
``dpmsolver`` on the cosine schedule (2e-3 off, with our float32 alphas_cumprod too): those are compared
with diffusers at float64 only (ours at float32 is held to its float64 run).  Where the update weighs
D's by more than 1 (sde-dpmsolver++ heun of order 3: up to 16) PEER's atol is scaled by that weight, and
FP32's by the update's largest term (coefficient times |a x|, the magnitude D = a x + b out rounds at).
"""
import math

import numpy as np
import pytest
import torch

from fastddpm import singlestep
from fastddpm.multistep import COSINE_LAMBDA_MIN, TABLE_COLUMNS, MultistepSampler
from fastddpm.schedule import NoiseSchedule
from fastddpm.singlestep import make_singlestep_plan, singlestep_orders, singlestep_table
from test_multistep import DIFFUSERS_PREDICTION, DIFFUSERS_SCHEDULE, _as_float64
from tolerances import FP32, PEER, PEER64, PEER_KARRAS32, assert_close, fp32_at

T = 1000
ALGORITHMS = singlestep.ALGORITHMS


def _final(algorithm):
    return "sigma_min" if algorithm == "dpmsolver" else "zero"  # diffusers refuses dpmsolver onto sigma 0


def _run_both(order, algorithm, solver_type, steps, dtype, monkeypatch, *, prediction="epsilon", spacing="linspace",
              lower_order_final=True, final=None, schedule="linear", clip=False, lambda_min=-math.inf,
              shape=(2, 3, 4, 4), seed=0, begin=0):
    """Run diffusers and fastddpm side by side, asserting each call; return the worst difference.
    ``begin``: the plan's ``begin_index`` and diffusers' ``set_begin_index`` (its calls from there on)."""
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

    final = final or _final(algorithm)
    karras = spacing == "karras"
    sched = DPMSolverSinglestepScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule], solver_order=order,
        prediction_type=DIFFUSERS_PREDICTION[prediction], thresholding=clip, sample_max_value=1.0,
        algorithm_type=algorithm, solver_type=solver_type, lower_order_final=lower_order_final,
        use_karras_sigmas=karras, final_sigmas_type=final, lambda_min_clipped=lambda_min)
    module = __import__(type(sched).__module__, fromlist=["_"])
    ours_schedule = NoiseSchedule.make(schedule, T)
    if dtype == torch.float64:
        _as_float64(sched, ours_schedule, monkeypatch)
    elif karras:  # as test_multistep: diffusers' float32 cumprod drift would move every Karras sigma
        sched.alphas_cumprod = torch.as_tensor(ours_schedule.alphas_cumprod64).float()
    plan = make_singlestep_plan(ours_schedule, steps, prediction, "linspace" if karras else spacing, karras,
                                lambda_min, clip, order=order, algorithm=algorithm, solver_type=solver_type,
                                lower_order_final=lower_order_final, final_sigmas_type=final, begin_index=begin)
    assert plan.num_steps == steps - begin and plan.begin_index == begin and plan.whole_steps == steps
    ours_ts = plan.timesteps[::-1].tolist()
    if spacing in ("leading", "trailing"):
        multi = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                            timestep_spacing=spacing, lambda_min_clipped=lambda_min)
        multi.set_timesteps(steps)
        assert ours_ts == multi.timesteps.tolist()[begin:]
        sched.set_timesteps(timesteps=multi.timesteps.tolist())
    else:
        sched.set_timesteps(steps)
    assert ours_ts == sched.timesteps.tolist()[begin:]
    assert np.allclose(plan.sigmas[::-1], sched.sigmas[begin:-1].double().numpy(),  # fp32: cumprod drifts
                       rtol=1e-12 if dtype == torch.float64 else 2e-4, atol=0)
    sched.set_begin_index(begin)  # begun part-way; at 0 too: repeated Karras timesteps
    if algorithm == "dpmsolver" and clip:
        # diffusers' dpmsolver thresholding reads alpha_t[timestep] with timestep=None (a [1, T] broadcast):
        # give it the current timestep, as intended
        convert = sched.convert_model_output
        monkeypatch.setattr(sched, "convert_model_output", lambda out, sample=None: convert(
            out, sched.timesteps[sched.step_index], sample=sample))
    noise = [None]
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: noise[0])

    g = torch.Generator().manual_seed(seed)
    data = (0.8 * torch.randn(shape, generator=g)).to(dtype)  # some |x0| > 1, so clipping acts
    x = torch.randn(shape, generator=g).to(dtype)
    ours_sampler = MultistepSampler(plan, x)
    exact = MultistepSampler(plan, x.double()) if dtype != torch.float64 else None
    tol = PEER64 if dtype == torch.float64 else PEER_KARRAS32 if karras else PEER
    # see the module docstring
    ill = algorithm == "dpmsolver" and (order > 1 and steps <= 3 or schedule == "cosine")
    worst, d_mag = 0.0, []
    for j, t in enumerate(sched.timesteps[begin:].tolist()):
        s = float(sched.sigmas[begin + j])
        alpha, sigma = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        eps = (x - alpha * data) / sigma + 0.05 * torch.randn(shape, generator=g).to(dtype)
        out = {"epsilon": eps, "x0": data + 0.05 * torch.randn(shape, generator=g).to(dtype),
               "v": alpha * eps - sigma * data}[prediction]
        z = torch.randn(shape, generator=g).to(dtype)
        noise[0] = z if algorithm == "sde-dpmsolver++" else None
        theirs = sched.step(out, t, x).prev_sample
        ours = ours_sampler.step(out, x, noise=noise[0])
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        msg = (f"order {order} {algorithm} {solver_type} {prediction} {spacing} steps {steps} begin {begin} "
               f"call {j} (t={t})")
        row = plan.table[plan.num_steps - 1 - j]
        if dtype == torch.float64:
            assert_close(ours, theirs, **tol, msg=msg)
        elif not ill:  # sde heun order 3 weighs D's by up to 16: each side's rounding of them grows so
            weight = max(1.0, *(abs(row[TABLE_COLUMNS.index(c)]) for c in ("p0", "p1", "p2")))
            assert_close(ours, theirs, atol=tol["atol"] * weight, rtol=tol["rtol"], msg=msg)
        if exact is not None:
            truth = exact.step(out.double(), x.double(), noise=None if noise[0] is None else noise[0].double())
            # FP32 relative to the update's largest term: |coefficient| x |a x| of the D's it reads
            # (D = x / alpha - s out rounds to ulp(|x| / alpha), up to ~500 at sigma_max)
            d_mag.append(float(x.abs().max()) * max(1.0, abs(row[0])))
            coef = max(abs(row[TABLE_COLUMNS.index(c)]) for c in ("u", "k0", "k1", "k2", "p0", "p1", "p2"))
            assert_close(ours, truth, **fp32_at(coef * max(d_mag[-3:])), msg="float64 " + msg)
        worst = max(worst, float((ours.double() - theirs.double()).abs().max()))
        x = theirs
    return worst


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


@DTYPES
@pytest.mark.parametrize("solver_type", singlestep.SOLVER_TYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("order", singlestep.ORDERS)
def test_matches_diffusers(order, algorithm, solver_type, dtype, monkeypatch):
    """Steps that are and are not multiples of the order, each prediction."""
    for steps in (1, 2, 3, 7, 8, 16):
        _run_both(order, algorithm, solver_type, steps, dtype, monkeypatch)
    for prediction in ("x0", "v"):
        for steps in (7, 9):
            _run_both(order, algorithm, solver_type, steps, dtype, monkeypatch, prediction=prediction)


@DTYPES
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_spacings_match_diffusers(spacing, algorithm, dtype, monkeypatch):
    cases = ((2, 1, "epsilon"), (1, 5, "v"), (2, 7, "epsilon"), (3, 8, "x0"), (3, 12, "epsilon"))
    for order, steps, prediction in cases:
        _run_both(order, algorithm, "heun" if steps == 8 else "midpoint", steps, dtype, monkeypatch,
                  prediction=prediction, spacing=spacing)


@DTYPES
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lower_order_final_and_final_sigmas_match_diffusers(algorithm, dtype, monkeypatch):
    """lower_order_final=False (whole groups, final sigma_min: the last call is of full order), and what
    diffusers' set_timesteps makes of it otherwise (True); final sigma_min for every algorithm."""
    for order, steps, solver_type in ((2, 6, "midpoint"), (3, 9, "heun"), (3, 12, "midpoint"), (3, 7, "heun")):
        for final in ("sigma_min", "zero") if algorithm != "dpmsolver" else ("sigma_min",):
            _run_both(order, algorithm, solver_type, steps, dtype, monkeypatch, lower_order_final=False, final=final)
        if algorithm != "dpmsolver":
            _run_both(order, algorithm, solver_type, steps, dtype, monkeypatch, final="sigma_min")


@DTYPES
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_clip_denoised_matches_diffusers_thresholding(algorithm, prediction, dtype, monkeypatch):
    for order, steps in ((1, 4), (2, 8), (3, 9)):
        _run_both(order, algorithm, "midpoint", steps, dtype, monkeypatch, prediction=prediction, clip=True)


@DTYPES
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cosine_with_lambda_clip_matches_diffusers(algorithm, dtype, monkeypatch):
    """diffusers applies lambda_min_clipped to its linspace timesteps (and, given them, to ours)."""
    for order, steps, spacing in ((2, 10, "linspace"), (3, 10, "linspace"), (3, 8, "trailing")):
        _run_both(order, algorithm, "midpoint", steps, dtype, monkeypatch, schedule="cosine",
                  lambda_min=COSINE_LAMBDA_MIN, spacing=spacing)
    if dtype == torch.float64:  # unclipped Karras sigmas (diffusers' singlestep Karras ignores the clip)
        _run_both(3, algorithm, "heun", 9, dtype, monkeypatch, schedule="cosine", spacing="karras")


@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (2, 3, 4, 4), (5, 123)], ids=str)
def test_odd_shapes_match_diffusers(shape, monkeypatch):
    for algorithm in ALGORITHMS:
        _run_both(3, algorithm, "heun", 7, torch.float32, monkeypatch, shape=shape, seed=1, spacing="trailing")


# -- beginning part-way (img2img, set_begin_index) ----------------------------------------------------
BEGUN = ((7, 1), (7, 2), (7, 3), (7, 5), (7, 6), (12, 4), (12, 8), (12, 10))  # (steps, begin): mid-group ones too


@DTYPES
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("order", singlestep.ORDERS)
def test_begun_plan_matches_diffusers_after_set_begin_index(order, algorithm, dtype, monkeypatch):
    """The plan from call ``begin`` on equals diffusers after ``set_timesteps(steps)``, ``set_begin_index(begin)``:
    its order list kept, each order lowered while the history is short, the first call's x the group start."""
    for steps, begin in BEGUN:
        _run_both(order, algorithm, "midpoint", steps, dtype, monkeypatch, begin=begin)
    for steps, begin, prediction in ((7, 2, "v"), (9, 4, "v"), (8, 1, "x0")):
        _run_both(order, algorithm, "heun", steps, dtype, monkeypatch, prediction=prediction, begin=begin)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_begun_spacings_match_diffusers(algorithm, monkeypatch):
    for spacing, order, steps, begin in (("trailing", 3, 8, 2), ("leading", 2, 7, 3), ("karras", 3, 9, 4)):
        _run_both(order, algorithm, "midpoint", steps, torch.float64, monkeypatch, spacing=spacing, begin=begin)


def test_begun_orders_are_the_orders_diffusers_steps_with():
    """``singlestep_orders(..., begin_index=b)`` is the ``order`` diffusers' ``step`` hands its update, call for
    call, after ``set_begin_index(b)`` (recorded from ``singlestep_dpm_solver_update``)."""
    from diffusers import DPMSolverSinglestepScheduler

    x = torch.zeros(1, 2)
    for order in singlestep.ORDERS:
        for lower, final in ((True, "zero"), (False, "sigma_min")):
            sched = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower, final_sigmas_type=final)
            seen = []
            update = sched.singlestep_dpm_solver_update
            sched.singlestep_dpm_solver_update = lambda *a, **k: (seen.append(k["order"]), update(*a, **k))[1]
            for steps in range(1, 13):
                sched.set_timesteps(steps)
                lof = sched.config.lower_order_final  # set_timesteps may have forced it True
                for begin in range(steps):
                    sched.set_timesteps(steps)
                    sched.set_begin_index(begin)
                    seen.clear()
                    for t in sched.timesteps[begin:]:
                        sched.step(x, t, x)
                    want = singlestep_orders(steps, order, lof, final, begin_index=begin).tolist()
                    assert seen == want, f"order {order} {final} steps {steps} begin {begin}"
    # the first call of a begun plan starts a group: its x is the x_s of the calls after it
    plan = make_singlestep_plan(NoiseSchedule.make("linear", T), 8, order=3, begin_index=1)
    col = {name: plan.table[::-1, c] for c, name in enumerate(TABLE_COLUMNS)}  # running order
    assert singlestep_orders(8, 3, begin_index=1).tolist() == [1, 2, 1, 2, 3, 1, 1]
    assert col["u"][0] == 1 and col["cl"][0] == 0 and col["u"][1] == 0 and col["cl"][1] == 1


IMG2IMG = {  # diffusers' DPMSolverSinglestepScheduler options
    "order2": dict(),
    "order3-heun-v": dict(solver_order=3, solver_type="heun", prediction_type="v_prediction"),
    "noise": dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "sde": dict(algorithm_type="sde-dpmsolver++"),
}


@pytest.mark.parametrize("strength,N", [(0.6, 6), (0.35, 9), (0.75, 8)])  # t_start 3, 6, 2 (mid-group ones)
@pytest.mark.parametrize("config", list(IMG2IMG))
def test_img2img_equals_the_diffusers_loop(config, strength, N, monkeypatch):
    """``fastddpm.img2img`` with ``sampler="dpm-solver"`` (the process ``from_diffusers``) is diffusers' img2img
    loop: ``set_begin_index(t_start)``, ``add_noise`` at that sigma (the contract's noise of our x_T slot), the
    rest of the calls (each model input and timestep equal; sde: the contract's noise of each row) and the
    result."""
    import sys

    from diffusers import DPMSolverSinglestepScheduler

    from fastddpm import DDPM
    from fastddpm.img2img import img2img, start_step
    from fastddpm.ops.reference import batch_noise
    from test_ksamplers import SHAPE, Logged, _compare_calls, _scaled

    sched = DPMSolverSinglestepScheduler(num_train_timesteps=T, **IMG2IMG[config])
    process = DDPM.from_diffusers(sched)
    assert process.config.sampler == "dpm-solver"
    sched.set_timesteps(N)
    t_start = start_step(N, strength)
    assert 0 < t_start < N and sched.order == 1
    sched.set_begin_index(t_start)
    timesteps = sched.timesteps[t_start:]
    R = len(timesteps)
    image = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    call = {"j": 0}
    monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor",
                        lambda *a, **k: batch_noise(8, 0, R - 1 - call["j"], SHAPE, "cpu"))
    theirs_model = Logged()
    x = sched.add_noise(image, batch_noise(8, 0, R, SHAPE, "cpu"), timesteps[:1].repeat(SHAPE[0]))
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            call["j"] = j
            x = sched.step(theirs_model(sched.scale_model_input(x, t), t.expand(SHAPE[0])), t, x).prev_sample
    ours_model = Logged()
    ours = img2img(ours_model, image, strength=strength, steps=N, seed=8, process=process, progress=False)
    msg = f"img2img dpm-solver {config} strength={strength} N={N}"
    tol = dict(atol=5e-3, rtol=1e-3) if config == "noise" else PEER  # as test_sampler_zoo's dpm-solver-noise
    _compare_calls(ours_model, theirs_model, tol, msg)
    assert_close(ours, x, **_scaled(tol, x), msg=msg)


# diffusers' tests/schedulers/test_scheduler_dpm_single.py numbers of the loops that begin part-way, through
# test_diffusers_full_loops' own loop (the whole plan's call t_start on; add_noise there unless noised=False)
BEGUN_FULL_LOOPS = [
    ("DPMSolverSinglestepSchedulerTest.test_full_uneven_loop", dict(steps=50, t_start=3, noised=False),
     (None, 0.2574)),
    ("DPMSolverSinglestepSchedulerTest.test_full_loop_with_noise", dict(t_start=5), (269.2187, 0.3505)),
]


@pytest.mark.parametrize("test, loop, expected", BEGUN_FULL_LOOPS, ids=[c[0].split(".")[1] for c in BEGUN_FULL_LOOPS])
def test_diffusers_begun_full_loops(test, loop, expected):
    import test_diffusers_full_loops as full

    case = full.Case(full.SINGLE_FILE, test, "DPMSolverSinglestepScheduler", full.DPM_SINGLE, "tail", expected,
                     **loop)
    full._check(case, full.run_case(case))


# -- the orders, the table and the errors -------------------------------------------------------------
def test_orders_equal_diffusers_get_order_list():
    from diffusers import DPMSolverSinglestepScheduler

    for order in singlestep.ORDERS:
        for lower in (True, False):
            for final in singlestep.FINAL_SIGMAS_TYPES:
                sched = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower,
                                                     final_sigmas_type=final)
                for steps in range(1, 21):
                    if not lower and steps % order:
                        with pytest.raises(ValueError, match="lower_order_final=False needs steps a multiple"):
                            singlestep_orders(steps, order, lower, final)
                        continue
                    assert singlestep_orders(steps, order, lower, final).tolist() == sched.get_order_list(steps)


def test_rows_keep_the_group_start_and_the_final_call_lands_on_d():
    lin = NoiseSchedule.make("linear", T)
    plan = make_singlestep_plan(lin, 8, "v", order=3)
    col = {name: plan.table[:, c] for c, name in enumerate(TABLE_COLUMNS)}
    orders = singlestep_orders(8, 3)[::-1]  # row order
    assert orders[::-1].tolist() == [1, 2, 3, 1, 2, 3, 1, 1]
    first = orders == 1
    assert np.all(col["u"][first] == 1) and np.all(col["cl"][first] == 0)
    assert np.all(col["u"][~first] == 0) and np.all(col["cl"][~first] == 1)
    assert np.all(col["hx"] == 0) and np.all(col["cz"] == 0) and np.all(col["p3"] == 0)
    assert col["cx"][0] == 0 and col["p0"][0] == 1 and col["p1"][0] == col["p2"][0] == 0  # x = D
    assert np.all(col["p2"][orders < 3] == 0) and np.all(col["p1"][first] == 0)
    # dpmsolver: the ring keeps -(sigma/alpha) eps and x_corr is the next x
    eps_plan = make_singlestep_plan(lin, 8, order=3, algorithm="dpmsolver", final_sigmas_type="sigma_min")
    alpha = 1 / np.sqrt(1 + eps_plan.sigmas**2)
    assert np.allclose(eps_plan.table[:, TABLE_COLUMNS.index("hx")], -1 / alpha)
    assert np.all(eps_plan.table[:, TABLE_COLUMNS.index("cx")] == 1)
    sde = make_singlestep_plan(lin, 8, order=2, algorithm="sde-dpmsolver++")
    assert sde.solver == "dpm-solver-sde" and sde.stochastic and plan.solver == "dpm-solver" and not plan.stochastic
    assert np.all(sde.table[1:, TABLE_COLUMNS.index("cz")] > 0) and sde.table[0, TABLE_COLUMNS.index("cz")] == 0
    with pytest.raises(ValueError, match="needs noise"):
        MultistepSampler(sde, torch.zeros(1, 2)).step(torch.zeros(1, 2), torch.zeros(1, 2))
    # the documented forcing of lower_order_final
    assert np.array_equal(make_singlestep_plan(lin, 9, order=3, lower_order_final=False).table,
                          make_singlestep_plan(lin, 9, order=3).table)


def test_errors_name_the_argument():
    lin = NoiseSchedule.make("linear", T)
    cases = [
        (dict(steps=0), r"steps must be an int in \[1, 1000\]"),
        (dict(steps=1001), r"steps must be an int in \[1, 1000\]"),
        (dict(steps=2.0), r"steps must be an int"),
        (dict(order=4), r"order must be one of \(1, 2, 3\), got 4"),
        (dict(algorithm="deis"), r"algorithm must be one of \('dpmsolver\+\+', 'dpmsolver', 'sde-dpmsolver\+\+'\)"),
        (dict(solver_type="bh2"), r"solver_type must be one of \('midpoint', 'heun'\)"),
        (dict(spacing="uniform"), r"timestep_spacing must be one of \('linspace', 'leading', 'trailing'\)"),
        (dict(prediction="sample"), r"prediction must be one of \('epsilon', 'x0', 'v'\)"),
        (dict(final_sigmas_type="min"), r"final_sigmas_type must be one of \('zero', 'sigma_min'\)"),
        (dict(lower_order_final=1), r"lower_order_final must be a bool"),
        (dict(algorithm="dpmsolver"), r"algorithm='dpmsolver' .* final_sigmas_type='sigma_min'"),
        (dict(lambda_min_clipped=5.0), r"lambda_min_clipped=5.0 leaves"),
    ]
    for kw, match in cases:
        kw = {"steps": 10, **kw}
        with pytest.raises(ValueError, match=match):
            make_singlestep_plan(lin, **kw)
    with pytest.raises(ValueError, match="dpm-solver chooses its own timesteps: give the full"):
        make_singlestep_plan(lin.respace(50), 10)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\)"):
        singlestep_orders(10, 0, True)
    with pytest.raises(ValueError, match="orders must be"):
        singlestep_table(np.array([2.0, 1.0, 0.0]), np.array([1, 3]))


def test_bad_begin_index_is_refused():
    from fastddpm import DDPM

    lin = NoiseSchedule.make("linear", T)
    for bad in (-1, 10, 11, 2.0, True, None):
        with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 10\)"):
            make_singlestep_plan(lin, 10, begin_index=bad)
        with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 10\)"):
            singlestep_orders(10, 2, begin_index=bad)
    with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 5\)"):
        DDPM(sampler="dpm-solver", begin_index=5).multistep_plan(5)
    assert DDPM(sampler="dpm-solver", begin_index=2).multistep_plan(5).num_steps == 3
    with pytest.raises(ValueError, match=r"begin_index=2 is not supported by sampler='pndm' yet"):
        DDPM(sampler="pndm", begin_index=2).multistep_plan(5)
