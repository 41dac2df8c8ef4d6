"""The samplers on the multistep table that their own modules build -- ``dpm-solver`` (fastddpm.singlestep),
``deis`` and ``pndm`` (fastddpm.lmsolvers) -- through the public API: ``DDPM.from_diffusers`` of their
schedulers, ``fastddpm.sample`` of a pipeline equal to diffusers' own loop, the engine equal to the eager
loop, the config fields they read, and the errors.  Their step-for-step equality with diffusers is in
tests/test_singlestep.py and tests/test_lmsolvers.py."""
import types

import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.modes import TABLE_SAMPLERS
from test_ksamplers import SHAPE, Logged, _diffusers_loop, _scaled
from tolerances import FP32, PEER, assert_close

T = 1000
CASES = {  # (diffusers class, its config, the fastddpm config fields it maps to)
    "pndm-sd": ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012),
                dict(sampler="pndm", set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")),
    "pndm-v": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing"),
               dict(sampler="pndm", set_alpha_to_one=True, prediction="v", timestep_spacing="trailing")),
    "deis": ("DEISMultistepScheduler", dict(), dict(sampler="deis", solver_order=2)),
    "deis-3-karras": ("DEISMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False,
                                                     prediction_type="sample"),
                      dict(sampler="deis", solver_order=3, karras_sigmas=True, lower_order_final=False,
                           prediction="x0")),
    "dpm-solver": ("DPMSolverSinglestepScheduler", dict(), dict(sampler="dpm-solver", solver_order=2)),
    "dpm-solver-3-heun": ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun",
                                                               prediction_type="v_prediction"),
                          dict(sampler="dpm-solver", solver_order=3, solver_type="heun", prediction="v")),
    "dpm-solver-noise": ("DPMSolverSinglestepScheduler",
                         dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                         dict(sampler="dpm-solver", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    "dpm-solver-sde": ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++"),
                       dict(sampler="dpm-solver", algorithm_type="sde-dpmsolver++")),
}


def _scheduler(name):
    import diffusers

    cls, options, _ = CASES[name]
    options = {"beta_start": 1e-4, "beta_end": 0.02, **options}
    return getattr(diffusers, cls)(num_train_timesteps=T, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_from_diffusers_samples_as_the_scheduler(case, monkeypatch):
    """``from_diffusers`` gives the fields; a pipeline with the scheduler samples as diffusers' loop does."""
    scheduler = _scheduler(case)
    process = DDPM.from_diffusers(scheduler)
    for key, value in CASES[case][2].items():
        assert getattr(process.config, key) == value, key
    assert DDPM.from_diffusers({**scheduler.config, "_class_name": type(scheduler).__name__}).config == process.config
    scheduler.alphas_cumprod = torch.as_tensor(process.schedule.alphas_cumprod64).float()  # diffusers' float32 drift
    if hasattr(scheduler, "alpha_t"):
        ac = scheduler.alphas_cumprod
        scheduler.alpha_t, scheduler.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    steps = 7
    theirs, calls = _diffusers_loop(scheduler, Logged(), steps, 3, torch.float32, monkeypatch)
    pipeline = types.SimpleNamespace(unet=Logged(), scheduler=scheduler)
    ours = fastddpm.sample(pipeline, SHAPE[0], steps=steps, seed=3, progress=False)
    assert process.multistep_plan(steps).num_steps == calls
    # diffusers' float32 sums of alphas near 1 (PNDM's last step; the noise form over sigma_max..sigma_min)
    tol = dict(atol=5e-3, rtol=1e-3) if case.startswith(("pndm", "dpm-solver-noise")) else PEER
    assert_close(ours, theirs, **_scaled(tol, theirs), msg=case)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_eager(case):
    fields = dict(CASES[case][2])
    kw = dict(steps=6, seed=4, clip_denoised=False, progress=False, **fields)
    eager = fastddpm.sample(Logged(), SHAPE[0], engine=False, **kw)
    engine = fastddpm.sample(Logged(), SHAPE[0], engine=True, **kw)
    assert_close(engine, eager, **FP32, msg=case)
    if fields.get("algorithm_type") == "sde-dpmsolver++":
        assert fastddpm.sample(Logged(), 5, batch_size=2, **{**kw, "clip_denoised": True})[3:].equal(
            fastddpm.sample(Logged(), 2, sample_offset=3, **{**kw, "clip_denoised": True}))


def test_callback_and_steps_map_to_calls():
    """PNDM makes steps + 1 model calls (the second timestep twice), the others steps; callbacks see each."""
    for sampler, calls in (("pndm", 6), ("deis", 5), ("dpm-solver", 5)):
        seen = []
        fastddpm.sample(Logged(), 1, steps=5, sampler=sampler, progress=False,
                        callback=lambda i, t, x: seen.append((i, t)))
        assert [i for i, _ in seen] == list(range(calls - 1, -1, -1)), sampler
        assert all(isinstance(t, int) for _, t in seen)


def test_config_fields_and_errors():
    import diffusers

    assert set(TABLE_SAMPLERS) == {"dpm-solver", "deis", "pndm"}
    for sampler in TABLE_SAMPLERS:
        assert DDPM.from_json(DDPM(sampler=sampler).to_json()).config.sampler == sampler
    with pytest.raises(ValueError, match=r"PNDMScheduler.skip_prk_steps=False has no fastddpm equivalent: the PRK"):
        DDPM.from_diffusers(diffusers.PNDMScheduler())
    with pytest.raises(ValueError, match=r"solver_order=3 has no fastddpm equivalent: diffusers' third-order SDE"):
        DDPM.from_diffusers(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3))
    with pytest.raises(ValueError, match=r"DEISMultistepScheduler.solver_type='bh2'"):
        DDPM.from_diffusers({"_class_name": "DEISMultistepScheduler", "solver_type": "bh2"})
    with pytest.raises(ValueError, match=r"DPMSolverSinglestepScheduler.use_exponential_sigmas=True"):
        DDPM.from_diffusers(diffusers.DPMSolverSinglestepScheduler(use_exponential_sigmas=True))
    with pytest.raises(ValueError, match=r"solver_order must be one of \(1, 2, 3\) for deis, got 4"):
        DDPM(sampler="deis", solver_order=4)
    with pytest.raises(ValueError,
                       match=r"lower_order_final=False is for the samplers \('deis', 'dpm-solver', 'dpm\+\+2m'"):
        DDPM(sampler="euler", lower_order_final=False)
    with pytest.raises(ValueError, match=r"algorithm_type='sde-dpmsolver\+\+' is dpm-solver's"):
        DDPM(sampler="dpm++2m", algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match=r"ddim_direction='raw' is for the samplers \('ddim',\)"):
        DDPM(sampler="ddpm", ddim_direction="raw")
    with pytest.raises(ValueError, match=r"euler_at_final=True is for the samplers"):
        DDPM(sampler="unipc", euler_at_final=True)
    with pytest.raises(ValueError, match=r"set_alpha_to_one=False is for the samplers \('pndm', 'ddim'\)"):
        DDPM(sampler="ddpm", set_alpha_to_one=False)
    with pytest.raises(ValueError, match=r"steps_offset=1 is for the samplers \('pndm',\)"):
        DDPM(sampler="deis", steps_offset=1)
    with pytest.raises(ValueError, match=r"algorithm_type='dpmsolver' is for the samplers \('dpm-solver', 'dpm\+\+2m'"):
        DDPM(sampler="deis", algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match=r"algorithm_type must be one of"):
        DDPM(sampler="dpm-solver", algorithm_type="dpmsolver+")
    with pytest.raises(ValueError, match=r"karras_sigmas=True is not used by sampler='pndm'"):
        DDPM(sampler="pndm", karras_sigmas=True).multistep_plan(5)
    with pytest.raises(ValueError, match=r"lambda_min_clipped=-5.0 is not used by sampler='deis'"):
        DDPM(sampler="deis", lambda_min_clipped=-5.0).multistep_plan(5)
    with pytest.raises(ValueError, match=r"begin_index=2 is not supported by sampler='pndm' yet"):
        DDPM(sampler="pndm", begin_index=2).multistep_plan(5)
    with pytest.raises(ValueError, match=r"final_sigmas_type='sigma_min' is for the k-samplers .* and dpm-solver"):
        DDPM(sampler="deis", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"sampler must be one of \(.*'dpm-solver', 'deis', 'pndm'"):
        fastddpm.sample(Logged(), 1, sampler="plms", progress=False)
