"""diffusers interop: ``DDPM.from_diffusers`` samples the trajectory of the scheduler it converts,
``fastddpm.sample(pipeline, n)`` samples a DDPM/DDIM pipeline, ``DDPM.step(generator=, return_dict=)``
is diffusers' step, and every field fastddpm cannot represent is refused by name.

Trajectories are compared as in ``test_peers``/``test_multistep``: both sides get the same x, the same
model outputs and the same noise at every step, x chained through diffusers' outputs.
"""
import math
import re

import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.interop import HANDLED, SCHEDULERS, scheduler_config
from fastddpm.multistep import MultistepSampler
from fastddpm.ops.reference import batch_noise
from fastddpm.schedule import space_timesteps, spaced_timesteps
from tolerances import PEER, PEER_KARRAS32, assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,  # noqa: E402
                       UniPCMultistepScheduler)
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

SHAPE = (2, 3, 4, 4)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return g, 0.8 * torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _output(prediction, x, t, data):
    """A model output: for x0 prediction ``data`` (some |x0| > 1, so the clip acts), else random normals
    (as ``test_peers``; an output made consistent with ``data`` divides by sigma ~ 0 at small t)."""
    if prediction == "sample":
        return data
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))


# -- DDPM and DDIM: step for step -----------------------------------------------------------------
DDPM_CONFIGS = [
    {},  # diffusers' defaults: linear, epsilon, fixed_small, clip, leading
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", variance_type="fixed_large",
         timestep_spacing="linspace"),
    dict(prediction_type="sample", clip_sample=False, timestep_spacing="trailing"),
    dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         variance_type="fixed_small_log", thresholding=True, sample_max_value=1.0),
    dict(num_train_timesteps=300, trained_betas=torch.linspace(2e-4, 0.03, 300).tolist(), timestep_spacing="trailing"),
    dict(beta_schedule="sigmoid", prediction_type="v_prediction", steps_offset=1, timestep_spacing="linspace"),
    # dynamic thresholding (Imagen): clip_denoised="dynamic"
    dict(prediction_type="sample", thresholding=True, sample_max_value=1.5),
    dict(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9, timestep_spacing="trailing"),
    dict(thresholding=True, sample_max_value=0.5),  # below 1: every bound is 0.5 (diffusers' clamp, min > max)
]


@pytest.mark.parametrize("steps", [10, None])
@pytest.mark.parametrize("kw", DDPM_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()
                                                                     if k != "trained_betas") or "defaults")
def test_ddpm_scheduler_trajectory(kw, steps, monkeypatch):
    sched = DDPMScheduler(**kw)
    T = sched.config.num_train_timesteps
    steps = steps or T
    sched.set_timesteps(steps)
    process = DDPM.from_diffusers(sched)
    if steps != process.num_steps:
        process = process.respace(steps)  # as fastddpm.sample(steps=...) does
    assert list(process.schedule.timesteps) == sorted(sched.timesteps.tolist())
    g, data, x = _data(1)
    for t in sched.timesteps.tolist()[:: max(1, steps // 50)] if steps == T else sched.timesteps.tolist():
        out = _output(sched.config.prediction_type, x, t, data)
        z = torch.randn(SHAPE, generator=g)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
        theirs = sched.step(out, t, x)
        ours = process.step(out, t, x, noise=z, return_dict=True)
        assert_close(ours.prev_sample, theirs.prev_sample, **PEER, msg=f"t={t}")
        assert_close(ours.pred_original_sample, theirs.pred_original_sample, **PEER, msg=f"x0 t={t}")
        x = theirs.prev_sample


DDIM_CONFIGS = [
    dict(clip_sample=False),
    dict(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", steps_offset=3, timestep_spacing="trailing",
         clip_sample=False),
    dict(),  # clip_sample=True: with use_clipped_model_output=True on both sides
    dict(thresholding=True, prediction_type="v_prediction"),
    dict(thresholding=True, prediction_type="sample", sample_max_value=2.0, dynamic_thresholding_ratio=0.9),
    dict(clip_sample=False, set_alpha_to_one=False),  # the last step onto alphas_cumprod[0], eta's noise there too
    dict(clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction", timestep_spacing="trailing",
         steps_offset=1),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kw", DDIM_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "clip")
def test_ddim_scheduler_trajectory(kw, eta):
    sched = DDIMScheduler(**kw)
    clipped = sched.config.clip_sample or sched.config.thresholding
    process = DDPM.from_diffusers(sched, use_clipped_model_output=clipped, eta=eta).respace(20)
    sched.set_timesteps(20)
    assert list(process.schedule.timesteps) == sorted(sched.timesteps.tolist())
    g, data, x = _data(2)
    for t in sched.timesteps.tolist():
        out = _output(sched.config.prediction_type, x, t, data)
        z = torch.randn(SHAPE, generator=g)
        theirs = sched.step(out, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=z)
        ours = process.step(out, t, x, noise=z, return_dict=True)
        assert_close(ours.prev_sample, theirs.prev_sample, **PEER, msg=f"t={t}")
        assert_close(ours.pred_original_sample, theirs.pred_original_sample, **PEER, msg=f"x0 t={t}")
        x = theirs.prev_sample


# -- the multistep solvers: step for step ---------------------------------------------------------
MULTISTEP_CONFIGS = [
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing")),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", prediction_type="sample",
                                       timestep_spacing="leading", thresholding=True)),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, solver_order=3)),
    (DPMSolverMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                                       euler_at_final=True)),
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, dict(prediction_type="v_prediction", timestep_spacing="trailing", thresholding=True)),
    (UniPCMultistepScheduler, dict(use_karras_sigmas=True, prediction_type="sample", steps_offset=2)),
    (UniPCMultistepScheduler, dict(timestep_spacing="leading", beta_schedule="scaled_linear")),
    # dynamic thresholding (Imagen): clip_denoised="dynamic"
    (DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=1.5, prediction_type="sample")),
    (UniPCMultistepScheduler, dict(thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9)),
    (DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=0.5, dynamic_thresholding_ratio=0.87)),
]


@pytest.mark.parametrize("steps", [7, 16])
@pytest.mark.parametrize("cls,kw", MULTISTEP_CONFIGS,
                         ids=lambda v: v.__name__[:5] if isinstance(v, type) else ",".join(f"{k}={x}"
                                                                                          for k, x in v.items()))
def test_multistep_scheduler_trajectory(cls, kw, steps):
    sched = cls(**kw)
    process = DDPM.from_diffusers(sched)
    karras = sched.config.use_karras_sigmas
    if karras:  # as test_multistep: diffusers' float32 cumprod drift would move sigma_max
        sched.alphas_cumprod = torch.as_tensor(process.schedule.alphas_cumprod64).float()
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    plan = process.multistep_plan(steps)
    assert plan.timesteps[::-1].tolist() == sched.timesteps.tolist()
    g, data, x = _data(3)
    ours_sampler = MultistepSampler(plan, x)
    sde = plan.stochastic
    for j, t in enumerate(sched.timesteps.tolist()):
        # an output consistent with data plus a little noise, as test_multistep (random outputs make the
        # high-order differences large and amplify diffusers' float32 sigmas beyond PEER_KARRAS32)
        s = float(sched.sigmas[j])
        alpha, sigma = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        eps = (x - alpha * data) / sigma + 0.05 * torch.randn(SHAPE, generator=g)
        out = {"epsilon": eps, "sample": data + 0.05 * torch.randn(SHAPE, generator=g),
               "v_prediction": alpha * eps - sigma * data}[sched.config.prediction_type]
        z = torch.randn(SHAPE, generator=g)
        theirs = sched.step(out, t, x, **({"variance_noise": z} if sde else {})).prev_sample
        ours = ours_sampler.step(out, x, noise=z if sde else None)
        assert_close(ours, theirs, **(PEER_KARRAS32 if karras else PEER), msg=f"step {j} t={t}")
        x = theirs


# -- the config forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_instance_frozen_config_and_json_dict_give_the_same_process(cls):
    kw = dict(prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2")
    if cls is DDIMScheduler:
        kw["clip_sample"] = False
    sched = cls(**kw)
    as_json = {"_class_name": cls.__name__, "_diffusers_version": "0.42.1", **dict(sched.config)}
    partial = {"_class_name": cls.__name__, **kw}  # missing keys: diffusers' defaults
    configs = [DDPM.from_diffusers(x).config for x in (sched, sched.config, as_json, partial)]
    assert all(c == configs[0] for c in configs)
    assert configs[0].prediction == "v" and configs[0].schedule == "cosine"


def test_every_init_field_is_handled():
    """A newer diffusers with a new field fails here, not silently."""
    import inspect

    for name in SCHEDULERS:
        params = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}
        assert params <= set(HANDLED[name]), (name, params - set(HANDLED[name]))
        assert scheduler_config({"_class_name": name})[0] == name


def test_keys_the_class_does_not_take_are_ignored():
    cfg = {"_class_name": "DDPMScheduler", "skip_prk_steps": True, "_use_default_values": ["x"]}
    assert DDPM.from_diffusers(cfg).config == DDPM.from_diffusers(DDPMScheduler()).config


def test_schedules_map_to_named_kinds_where_equal():
    assert DDPM.from_diffusers(DDPMScheduler()).config.schedule == "linear"
    assert DDPM.from_diffusers(DDPMScheduler(beta_schedule="scaled_linear")).config.schedule == "quadratic"
    c = DDPM.from_diffusers(DDPMScheduler(num_train_timesteps=4000)).config  # not fastddpm's scaled linear
    assert c.schedule == "custom" and c.num_timesteps == 4000 and c.betas[-1] == pytest.approx(0.02)
    c = DDPM.from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    assert c.config.schedule == "cosine"
    assert_close(torch.tensor(c.schedule.betas), DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas, **PEER)
    c = DDPM.from_diffusers(UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2")).config
    assert c.lambda_min_clipped == -math.inf  # diffusers' UniPC has no clip; fastddpm's default would clip cosine
    assert DDPM.from_diffusers(DDIMScheduler(clip_sample=False), eta=0.5, loss="l1").config.eta == 0.5
    for sched in (DDPMScheduler(num_train_timesteps=300, beta_schedule="sigmoid"),
                  DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3)):
        process = DDPM.from_diffusers(sched)  # serialises with checkpoints like any process
        assert DDPM.from_json(process.to_json()).config == process.config


# -- refused fields ---------------------------------------------------------------------------------
REJECTED = [
    (DDPMScheduler, dict(variance_type="learned_range"), "variance_type"),
    (DDPMScheduler, dict(variance_type="fixed_large_log"), "variance_type"),
    (DDPMScheduler, dict(variance_type="fixed_large", timestep_spacing="trailing"), "timestep_spacing"),
    (DDPMScheduler, dict(thresholding=True, sample_max_value=0.0), "sample_max_value"),
    (DDPMScheduler, dict(clip_sample_range=2.0), "clip_sample_range"),
    (DDPMScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (DDPMScheduler, dict(steps_offset=1), "steps_offset"),
    (DDPMScheduler, dict(beta_schedule="laplace"), "beta_schedule"),
    (DDPMScheduler, dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (DDPMScheduler, dict(num_train_timesteps=0), "num_train_timesteps"),
    (DDPMScheduler, dict(timestep_spacing="uniform"), "timestep_spacing"),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="linspace"), "timestep_spacing"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver"), "algorithm_type"),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True, use_karras_sigmas=True), "use_lu_lambdas"),
    (DPMSolverMultistepScheduler, dict(solver_order=1), "solver_order"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order"),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    (DPMSolverMultistepScheduler, dict(variance_type="learned_range"), "variance_type"),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, lambda_min_clipped=-5.1), "lambda_min_clipped"),
    (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction"), "prediction_type"),
    (DPMSolverMultistepScheduler, dict(thresholding=True, dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio"),
    (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas="yes"), "use_karras_sigmas"),
    (DPMSolverMultistepScheduler, dict(lambda_min_clipped=float("nan")), "lambda_min_clipped"),
    (DPMSolverMultistepScheduler, dict(num_train_timesteps=3, trained_betas=[0.1, 0.2, 0.3], use_karras_sigmas=True,
                                       beta_schedule="squaredcos_cap_v2"), "trained_betas"),
    (UniPCMultistepScheduler, dict(solver_type="bh1"), "solver_type"),
    (UniPCMultistepScheduler, dict(solver_order=3), "solver_order"),
    (UniPCMultistepScheduler, dict(predict_x0=False), "predict_x0"),
    (UniPCMultistepScheduler, dict(disable_corrector=[0]), "disable_corrector"),
    (UniPCMultistepScheduler, dict(lower_order_final=False), "lower_order_final"),
    (UniPCMultistepScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (UniPCMultistepScheduler, dict(sigma_max=10.0), "sigma_max"),
    (UniPCMultistepScheduler, dict(sigma_min=0.1), "sigma_min"),
    (UniPCMultistepScheduler, dict(shift_terminal=0.5), "shift_terminal"),
    (UniPCMultistepScheduler, dict(solver_p="a DPMSolverMultistepScheduler"), "solver_p"),
    (UniPCMultistepScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
]


@pytest.mark.parametrize("cls,kw,field", REJECTED, ids=lambda v: v.__name__[:5] if isinstance(v, type) else str(v))
def test_unrepresentable_fields_are_refused_by_name(cls, kw, field):
    """The config dict (no scheduler needed: some of these are refused by diffusers' own __init__
    for other reasons, e.g. beta sigmas need scipy) raises a ValueError naming the field and value."""
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}.{field}={kw[field]!r}") + ".*supported"):
        DDPM.from_diffusers({"_class_name": cls.__name__, **kw})


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="scheduler_or_config must be a diffusers scheduler"):
        DDPM.from_diffusers(42)
    with pytest.raises(ValueError, match="_class_name='ScoreSdeVeScheduler' has no fastddpm equivalent"):
        DDPM.from_diffusers({"_class_name": "ScoreSdeVeScheduler"})
    with pytest.raises(ValueError, match="without '_class_name'"):
        DDPM.from_diffusers({"beta_start": 0.001})
    with pytest.raises(ValueError, match="use_clipped_model_output is DDIMScheduler's"):
        DDPM.from_diffusers(DDPMScheduler(), use_clipped_model_output=True)
    with pytest.raises(TypeError, match=r"unknown diffusion options: \['etaa'\]"):
        DDPM.from_diffusers(DDPMScheduler(), etaa=1.0)


# -- respacing by timestep_spacing ------------------------------------------------------------------
def test_respacing_follows_the_spacing_rules():
    T = 1000
    for K in range(2, T + 1):  # linspace: improved-diffusion's == diffusers' for steps >= 2
        assert space_timesteps(T, K) == spaced_timesteps(T, K, "linspace")
    for spacing in ("linspace", "leading", "trailing"):
        for K in (3, 10, 50, 333, 1000):
            sched = DDPMScheduler(timestep_spacing=spacing)
            sched.set_timesteps(K)
            assert spaced_timesteps(T, K, spacing) == sorted(sched.timesteps.tolist()), (spacing, K)
    assert list(DDPM(timestep_spacing="leading").respace(10).schedule.timesteps) == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="DDIM needs steps that divide num_timesteps=1000"):
        DDPM(sampler="ddim", timestep_spacing="trailing").respace(30)
    assert DDPM(sampler="ddim", timestep_spacing="trailing").respace(40).schedule.timesteps[0] == 24


# -- step(generator=, return_dict=) -----------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_step_with_a_generator_equals_diffusers(prediction):
    sched = DDPMScheduler(prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(25)
    process = DDPM.from_diffusers(sched).respace(25)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for t in sched.timesteps.tolist()[-3:]:  # the last steps (t = 0 is not one of them: checked below)
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        theirs = sched.step(out, t, x, generator=g1)
        ours = process.step(out, t, x, generator=g2, return_dict=True)
        assert isinstance(ours, fastddpm.diffusion.StepOutput)
        assert_close(ours.prev_sample, theirs.prev_sample, **PEER, msg=f"t={t}")
        assert_close(ours.pred_original_sample, theirs.pred_original_sample, **PEER, msg=f"t={t}")
        assert torch.equal(g1.get_state(), g2.get_state())
        x = theirs.prev_sample
    full = DDPM.from_diffusers(DDPMScheduler())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = torch.randn(SHAPE)
    assert_close(full.step(out, 0, x, generator=g2), DDPMScheduler().step(out, 0, x, generator=g1).prev_sample, **PEER)
    assert torch.equal(g1.get_state(), g2.get_state())  # t = 0 draws nothing on either side


def test_ddim_step_with_a_generator_draws_only_with_eta():
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    for eta in (0.0, 1.0):
        process = DDPM.from_diffusers(sched, eta=eta).respace(10)
        g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
        theirs = sched.step(out, 500, x, eta=eta, generator=g1).prev_sample
        assert_close(process.step(out, 500, x, generator=g2), theirs, **PEER, msg=f"eta={eta}")
        assert torch.equal(g1.get_state(), g2.get_state())


def test_step_keeps_its_tensor_default_and_refuses_mixed_noise_sources():
    process = DDPM()
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(process.step(out, 5, x), process.step(out, 5, x, seed=0, return_dict=True).prev_sample)
    g = torch.Generator()
    with pytest.raises(ValueError, match="give generator= or seed=, not both"):
        process.step(out, 5, x, generator=g, seed=1)
    with pytest.raises(ValueError, match="give generator= or noise=/sample_offset=, not both"):
        process.step(out, 5, x, torch.zeros_like(x), generator=g, sample_offset=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        process.step(out, 5, x, generator=3)


# -- sample(pipeline, n) --------------------------------------------------------------------------
def _unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_sample_a_ddim_pipeline_equals_its_own_loop(monkeypatch):
    """The pipeline's __call__ on fastddpm's x_T: the same images."""
    from diffusers import DDIMPipeline
    from diffusers.pipelines.ddim import pipeline_ddim

    pipe = DDIMPipeline(_unet(), DDIMScheduler(clip_sample=False, prediction_type="v_prediction",
                                               timestep_spacing="trailing"))
    n, K, seed = 2, 10, 3
    ours = fastddpm.sample(pipe, n, steps=K, seed=seed, progress=False)
    assert ours.shape == (n, 1, 8, 8)
    monkeypatch.setattr(pipeline_ddim, "randn_tensor", lambda *a, **k: batch_noise(seed, 0, K, (n, 1, 8, 8), "cpu"))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=n, num_inference_steps=K, eta=0.0, output_type="pt").images
    assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, **PEER)


def test_sample_a_ddpm_pipeline_equals_its_own_loop(monkeypatch):
    """DDPMPipeline's __call__ with the noise contract's x_T and step noise."""
    from diffusers import DDPMPipeline
    from diffusers.pipelines.ddpm import pipeline_ddpm

    pipe = DDPMPipeline(_unet(), DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large"))
    n, K, seed, shape = 2, 8, 4, (2, 1, 8, 8)
    ours = fastddpm.sample(pipe, n, steps=K, seed=seed, progress=False)
    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", lambda *a, **k: batch_noise(seed, 0, K, shape, "cpu"))
    slots = iter(range(K - 1, 0, -1))  # step noise of running step j is slot K-1-j; t=0 draws none
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda *a, **k: batch_noise(seed, 0, next(slots), shape, "cpu"))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=n, num_inference_steps=K, output_type="pt").images
    assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, **PEER)


def test_sample_a_pipeline_with_a_multistep_scheduler_or_an_explicit_process():
    from diffusers import DDPMPipeline

    unet = _unet()
    pipe = DDPMPipeline(unet, DPMSolverMultistepScheduler())  # a DDPMPipeline holds any scheduler
    a = fastddpm.sample(pipe, 2, steps=6, progress=False)
    b = fastddpm.sample(unet, 2, steps=6, process=DDPM.from_diffusers(pipe.scheduler), progress=False)
    assert torch.equal(a, b)
    # an explicit process wins over the pipeline's scheduler; options apply on top
    c = fastddpm.sample(pipe, 2, steps=6, process=DDPM(sampler="unipc"), progress=False)
    d = fastddpm.sample(unet, 2, steps=6, sampler="unipc", progress=False)
    assert torch.equal(c, d)


def test_sample_refuses_a_broken_pipeline():
    class NoUnet:
        scheduler = DDPMScheduler()

    with pytest.raises(TypeError, match=r"pipeline \(NoUnet\) but has no \.unet"):
        fastddpm.sample(NoUnet(), 1, progress=False)

    class PRKPipeline:
        unet = _unet()
        scheduler = PNDMScheduler()  # diffusers' default skip_prk_steps=False

    with pytest.raises(ValueError, match=r"PRKPipeline.scheduler: PNDMScheduler.skip_prk_steps=False .*process="):
        fastddpm.sample(PRKPipeline(), 1, progress=False)


def test_a_field_newer_than_interop_is_accepted_at_its_default_and_refused_otherwise(monkeypatch):
    """A diffusers upgrade that adds a field: at its default it leaves the process as it was; set to
    anything else, fastddpm cannot tell what it does and says so, naming the field."""
    from fastddpm import interop

    handled = dict(interop.HANDLED)
    handled["DDPMScheduler"] = tuple(f for f in handled["DDPMScheduler"] if f != "rescale_betas_zero_snr")
    monkeypatch.setattr(interop, "HANDLED", handled)
    config = {"_class_name": "DDPMScheduler", "rescale_betas_zero_snr": False}
    assert interop.diffusion_config(config).num_timesteps == 1000
    with pytest.raises(ValueError, match=r"\['rescale_betas_zero_snr'\].*unknown to fastddpm.interop"):
        interop.diffusion_config(config | {"rescale_betas_zero_snr": True})
