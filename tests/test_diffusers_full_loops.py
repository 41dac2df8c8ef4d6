"""diffusers' scheduler full-loop numbers, reproduced through fastddpm's public API.

diffusers' own scheduler tests (``tests/schedulers/test_scheduler_*.py`` in huggingface/diffusers) end
their full loops with hard-coded ``sum(|x|)`` and ``mean(|x|)`` of the final sample, for a toy model
``eps(x, t) = x * t / (t + 1)`` started from a deterministic ramp (``SchedulerCommonTest``'s
``dummy_model``, ``dummy_sample_deter``; ``dummy_noise_deter`` is the ramp reversed).  Each case below is
one such number, run here as fastddpm runs it: the process is ``DDPM.from_diffusers(scheduler)`` of the
test's scheduler config, the loop is ``fastddpm.sample(..., noise=x_T)`` (deterministic loops from the
start) or, where diffusers' loop steps one call at a time from part-way in or draws from a
``torch.Generator``, ``DDPM.step(..., generator=)`` (DDPM/DDIM) or ``fastddpm.multistep.MultistepSampler``
handed the same draws diffusers' ``randn_tensor`` makes.  Every number was checked first against
diffusers 0.42.1's own loop on this CPU at the test's tolerance (all reproduce; where a test has CPU and
CUDA/MPS branches the CPU number is the one used).  The tolerances are the tests' own (1e-2 on the sum
and 1e-3 on the mean unless said).

Status of a case: passes; ``xfail(raises=ValueError, strict=True)`` where ``from_diffusers`` (or the plan)
refuses a field, named in the reason; ``xfail(strict=True)`` where the port runs but misses the number,
with the measured values and the diagnosis in the reason; skipped where the loop's noise cannot be
reproduced.  The k-sampler tests (Euler, Euler ancestral, Heun, LMS, KDPM2, KDPM2 ancestral) run their
loop as ``sample = scheduler.scale_model_input(sample, t)``, so each step is taken from the *scaled*
sample ``x / sqrt(sigma^2 + 1)`` as if it were unscaled: a loop no pipeline runs (pipelines keep the
latents unscaled and give only the model the scaled copy), which fastddpm's sampler does not reproduce.

Ported numbers (source file in diffusers' ``tests/schedulers/``, test):

* ``test_scheduler_ddpm.py``: ``DDPMSchedulerTest.test_full_loop_no_noise``, ``test_full_loop_with_v_prediction``,
  ``test_full_loop_with_noise``
* ``test_scheduler_ddim.py``: ``DDIMSchedulerTest.test_full_loop_no_noise``, ``test_full_loop_with_v_prediction``,
  ``test_full_loop_with_set_alpha_to_one``, ``test_full_loop_with_no_set_alpha_to_one``, ``test_full_loop_with_noise``
* ``test_scheduler_dpm_multi.py``: ``DPMSolverMultistepSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_noise``, ``test_full_loop_no_noise_thres``, ``test_full_loop_with_v_prediction``,
  ``test_full_loop_with_karras_and_v_prediction``, ``test_full_loop_with_lu_and_v_prediction``, ``test_switch``
* ``test_scheduler_dpm_single.py``: ``DPMSolverSinglestepSchedulerTest.test_full_uneven_loop``, ``test_switch``,
  ``test_full_loop_no_noise``, ``test_full_loop_with_karras``, ``test_full_loop_with_v_prediction``,
  ``test_full_loop_with_karras_and_v_prediction``, ``test_full_loop_with_noise``
* ``test_scheduler_deis.py``: ``DEISMultistepSchedulerTest.test_switch``, ``test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_with_noise``
* ``test_scheduler_unipc.py``: ``UniPCMultistepSchedulerTest`` and ``UniPCMultistepScheduler1DTest`` (samples
  ``[4, 3, 8]``), each ``test_switch``, ``test_full_loop_no_noise``, ``test_full_loop_with_karras``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_with_karras_and_v_prediction``, ``test_full_loop_with_noise``
* ``test_scheduler_euler.py``: ``EulerDiscreteSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_device_karras_sigmas``,
  ``test_full_loop_with_noise``
* ``test_scheduler_euler_ancestral.py``: ``EulerAncestralDiscreteSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_with_noise``
* ``test_scheduler_heun.py``: ``HeunDiscreteSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_device_karras_sigmas``,
  ``test_full_loop_with_noise``
* ``test_scheduler_lms.py``: ``LMSDiscreteSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_device_karras_sigmas``,
  ``test_full_loop_with_noise``
* ``test_scheduler_kdpm2_discrete.py``: ``KDPM2DiscreteSchedulerTest.test_full_loop_with_v_prediction``,
  ``test_full_loop_no_noise``, ``test_full_loop_device``, ``test_full_loop_with_noise``
* ``test_scheduler_kdpm2_ancestral.py``: ``KDPM2AncestralDiscreteSchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_with_noise``
* ``test_scheduler_pndm.py``: ``PNDMSchedulerTest.test_full_loop_no_noise``, ``test_full_loop_with_v_prediction``,
  ``test_full_loop_with_set_alpha_to_one``, ``test_full_loop_with_no_set_alpha_to_one`` (all PRK + PLMS)
* ``test_scheduler_dpm_sde.py``: ``DPMSolverSDESchedulerTest.test_full_loop_no_noise``,
  ``test_full_loop_with_v_prediction``, ``test_full_loop_device``, ``test_full_loop_device_karras_sigmas``
  (skipped: Brownian-tree noise)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.multistep import MultistepSampler

diffusers = pytest.importorskip("diffusers")

SHAPE = (4, 3, 8, 8)  # SchedulerCommonTest's batch, channels, height, width
SHAPE_1D = (4, 3, 8)  # UniPCMultistepScheduler1DTest's


def ramp(shape=SHAPE, reverse: bool = False) -> torch.Tensor:
    """diffusers' ``dummy_sample_deter`` (``reverse``: ``dummy_noise_deter``): the values k / numel laid out
    with the batch index fastest, i.e. element ``[b, *rest]`` is ``(flat(rest) * batch + b) / numel``."""
    numel = math.prod(shape)
    values = torch.arange(numel)
    if reverse:
        values = values.flip(-1)
    values = values.reshape(*shape[1:], shape[0]) / numel
    return values.movedim(-1, 0).contiguous()


class RampModel(torch.nn.Module):
    """diffusers' ``dummy_model``: ``eps(x, t) = x * t / (t + 1)``, t (a scalar or one per sample, int or
    fractional) in x's dtype, broadcast over the sample's other dimensions."""

    image_size, in_channels = SHAPE[2:], SHAPE[1]

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
        return x * t / (t + 1)


# -- the scheduler configs of diffusers' tests (get_scheduler_config) --------------------------------------
LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
LINEAR_1100 = dict(LINEAR, num_train_timesteps=1100)  # the k-scheduler tests'
V = dict(prediction_type="v_prediction")
DDPM_CONFIG = dict(LINEAR, variance_type="fixed_small", clip_sample=True)
DDIM_CONFIG = dict(LINEAR, clip_sample=True)
DPM_MULTI = dict(LINEAR, solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
                 algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False, euler_at_final=False,
                 lambda_min_clipped=-math.inf, variance_type=None, final_sigmas_type="sigma_min")
DPM_SINGLE = dict(LINEAR, solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
                  algorithm_type="dpmsolver++", solver_type="midpoint", lambda_min_clipped=-math.inf,
                  variance_type=None, final_sigmas_type="sigma_min")
DEIS = dict(LINEAR, solver_order=2)
UNIPC = dict(LINEAR, solver_order=2, solver_type="bh2", final_sigmas_type="sigma_min")
SWITCHES = {  # test_switch: the from_config chain each test walks before sampling again
    "DPMSolverMultistepScheduler": ("DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                                    "DEISMultistepScheduler", "DPMSolverMultistepScheduler"),
    "DPMSolverSinglestepScheduler": ("DEISMultistepScheduler", "DPMSolverMultistepScheduler",
                                     "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"),
    "DEISMultistepScheduler": ("DPMSolverSinglestepScheduler", "DPMSolverMultistepScheduler",
                               "UniPCMultistepScheduler", "DEISMultistepScheduler"),
    "UniPCMultistepScheduler": ("DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                                "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
}
# the calls at which diffusers' step draws from its generator (call index j of R calls), for the
# samplers whose step draws: Euler ancestral at every call (sigma_up = 0 at the last), KDPM2 ancestral
# at the second stage of each two-stage step (the odd calls; the last call is one Euler step, no draw)
DRAWS = {"euler-a": lambda j, R: True, "dpm2-a": lambda j, R: j % 2 == 1}


@dataclass(frozen=True)
class Case:
    """One hard-coded number of diffusers' tests.

    :param source: the test file under diffusers' ``tests/schedulers/``.
    :param test: ``TestClass.test_name``.
    :param scheduler: the diffusers scheduler class.
    :param config: its ``get_scheduler_config(**overrides)``.
    :param loop: ``"ddpm"`` (every train timestep, a generator), ``"sample"`` (``fastddpm.sample`` from
        ``dummy_sample_deter``), ``"generator"`` (stepwise with diffusers' draws), ``"tail"`` (from step
        ``t_start`` of the plan, after ``add_noise`` unless ``noised=False``).
    :param expected: ``(sum, mean)`` of ``|x|``; a sum of None: the test checks the mean only.
    :param tol: ``(sum, mean)`` tolerances.
    :param options: ``DDPM.from_diffusers`` keywords beyond the scheduler (e.g. ``table_dtype``).
    """

    source: str
    test: str
    scheduler: str
    config: dict
    loop: str
    expected: tuple
    tol: tuple = (1e-2, 1e-3)
    steps: int = 10
    t_start: int = 0
    noised: bool = True
    shape: tuple = SHAPE
    switch: bool = False
    options: dict = field(default_factory=dict)
    marks: tuple = field(default=(), compare=False)

    @property
    def id(self) -> str:
        cls, name = self.test.split(".")
        return f"{cls}.{name.removeprefix('test_')}"


def refused(field_name: str, why: str):
    return (pytest.mark.xfail(raises=ValueError, strict=True, reason=f"refused: {field_name} ({why})"),)


def mismatch(reason: str):
    return (pytest.mark.xfail(strict=True, reason=reason),)


SCALED_LOOP = ("diffusers' test overwrites its sample with scale_model_input's x / sqrt(sigma^2 + 1) and steps "
               "from that as if unscaled (a loop no pipeline runs); fastddpm steps the pipeline's loop")
NO_BROWNIAN = ("DPMSolverSDEScheduler draws from a torchsde Brownian tree (noise_sampler_seed), whose "
               "increments cannot be made from a torch.Generator nor handed to fastddpm's dpm++sde rows")

DDPM_FILE, DDIM_FILE = "test_scheduler_ddpm.py", "test_scheduler_ddim.py"
MULTI_FILE, SINGLE_FILE = "test_scheduler_dpm_multi.py", "test_scheduler_dpm_single.py"
# supported since these numbers were ported (DDIM's raw direction, DPM-Solver's and UniPC's final-step options,
# Lu lambdas): the cases pass, no mark
DDIM_CLIP = MULTI_REFUSED = MULTI_LU = UNIPC_REFUSED = ()
PNDM_PRK = refused("skip_prk_steps=False", "fastddpm's PNDM is PLMS only: the PRK warm-up is not supported")

CASES = [
    # DDPM: all 1000 train timesteps, a generator (the 'no noise' loops draw at every t > 0 too)
    Case(DDPM_FILE, "DDPMSchedulerTest.test_full_loop_no_noise", "DDPMScheduler", DDPM_CONFIG, "ddpm",
         (258.9606, 0.3372)),
    Case(DDPM_FILE, "DDPMSchedulerTest.test_full_loop_with_v_prediction", "DDPMScheduler", dict(DDPM_CONFIG, **V),
         "ddpm", (202.0296, 0.2631)),
    Case(DDPM_FILE, "DDPMSchedulerTest.test_full_loop_with_noise", "DDPMScheduler", DDPM_CONFIG, "ddpm",
         (387.9466, 0.5051), t_start=998, options=dict(table_dtype=torch.float32)),
    # (with fastddpm's default float64 tables the sum is 387.9673, off by 0.021: the last two steps, t = 1, 0,
    # where diffusers' float32 1 - alphas_cumprod moves its posterior-mean coefficients; tests/test_table_dtype.py)
    # DDIM: 10 leading steps, eta 0
    Case(DDIM_FILE, "DDIMSchedulerTest.test_full_loop_no_noise", "DDIMScheduler", DDIM_CONFIG, "sample",
         (172.0067, 0.223967), marks=DDIM_CLIP),
    Case(DDIM_FILE, "DDIMSchedulerTest.test_full_loop_with_v_prediction", "DDIMScheduler", dict(DDIM_CONFIG, **V),
         "sample", (52.5302, 0.0684), marks=DDIM_CLIP),
    Case(DDIM_FILE, "DDIMSchedulerTest.test_full_loop_with_set_alpha_to_one", "DDIMScheduler",
         dict(DDIM_CONFIG, set_alpha_to_one=True, beta_start=0.01), "sample", (149.8295, 0.1951), marks=DDIM_CLIP),
    Case(DDIM_FILE, "DDIMSchedulerTest.test_full_loop_with_no_set_alpha_to_one", "DDIMScheduler",
         dict(DDIM_CONFIG, set_alpha_to_one=False, beta_start=0.01), "sample", (149.0784, 0.1941), marks=DDIM_CLIP),
    Case(DDIM_FILE, "DDIMSchedulerTest.test_full_loop_with_noise", "DDIMScheduler", DDIM_CONFIG, "ddim_tail",
         (354.5418, 0.4616), t_start=8, marks=DDIM_CLIP),
    # DPM-Solver++ multistep (its 'no noise' loops pass a generator, which dpmsolver++ never draws from)
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_no_noise", "DPMSolverMultistepScheduler",
         DPM_MULTI, "sample", (None, 0.3301), marks=MULTI_REFUSED),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_with_noise", "DPMSolverMultistepScheduler",
         DPM_MULTI, "tail", (318.4111, 0.4146), t_start=5, marks=MULTI_REFUSED),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_no_noise_thres", "DPMSolverMultistepScheduler",
         dict(DPM_MULTI, thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5), "sample",
         (None, 1.1364), marks=MULTI_REFUSED),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_with_v_prediction", "DPMSolverMultistepScheduler",
         dict(DPM_MULTI, **V), "sample", (None, 0.2251), marks=MULTI_REFUSED),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_with_karras_and_v_prediction",
         "DPMSolverMultistepScheduler", dict(DPM_MULTI, use_karras_sigmas=True, **V), "sample", (None, 0.2096),
         marks=MULTI_REFUSED),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_full_loop_with_lu_and_v_prediction",
         "DPMSolverMultistepScheduler", dict(DPM_MULTI, use_lu_lambdas=True, **V), "sample", (None, 0.1554),
         marks=MULTI_LU),
    Case(MULTI_FILE, "DPMSolverMultistepSchedulerTest.test_switch", "DPMSolverMultistepScheduler", DPM_MULTI,
         "sample", (None, 0.3301), switch=True, marks=MULTI_REFUSED),
    # DPM-Solver singlestep
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_uneven_loop", "DPMSolverSinglestepScheduler",
         DPM_SINGLE, "tail", (None, 0.2574), steps=50, t_start=3, noised=False),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_switch", "DPMSolverSinglestepScheduler", DPM_SINGLE,
         "sample", (None, 0.2791), switch=True),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_loop_no_noise", "DPMSolverSinglestepScheduler",
         DPM_SINGLE, "sample", (None, 0.2791)),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_loop_with_karras", "DPMSolverSinglestepScheduler",
         dict(DPM_SINGLE, use_karras_sigmas=True), "sample", (None, 0.2248)),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_loop_with_v_prediction",
         "DPMSolverSinglestepScheduler", dict(DPM_SINGLE, **V), "sample", (None, 0.1453)),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_loop_with_karras_and_v_prediction",
         "DPMSolverSinglestepScheduler", dict(DPM_SINGLE, use_karras_sigmas=True, **V), "sample", (None, 0.0649)),
    Case(SINGLE_FILE, "DPMSolverSinglestepSchedulerTest.test_full_loop_with_noise", "DPMSolverSinglestepScheduler",
         DPM_SINGLE, "tail", (269.2187, 0.3505), t_start=5),
    # DEIS
    Case("test_scheduler_deis.py", "DEISMultistepSchedulerTest.test_switch", "DEISMultistepScheduler", DEIS,
         "sample", (None, 0.23916), switch=True),
    Case("test_scheduler_deis.py", "DEISMultistepSchedulerTest.test_full_loop_no_noise", "DEISMultistepScheduler",
         DEIS, "sample", (None, 0.23916)),
    Case("test_scheduler_deis.py", "DEISMultistepSchedulerTest.test_full_loop_with_v_prediction",
         "DEISMultistepScheduler", dict(DEIS, **V), "sample", (None, 0.091)),
    Case("test_scheduler_deis.py", "DEISMultistepSchedulerTest.test_full_loop_with_noise", "DEISMultistepScheduler",
         DEIS, "tail", (315.3016, 0.41054), t_start=8),
]
for _cls, _shape in (("UniPCMultistepSchedulerTest", SHAPE), ("UniPCMultistepScheduler1DTest", SHAPE_1D)):
    _one_d = _shape == SHAPE_1D
    CASES += [
        Case("test_scheduler_unipc.py", f"{_cls}.test_switch", "UniPCMultistepScheduler", UNIPC, "sample",
             (None, 0.2441 if _one_d else 0.2464), shape=_shape, switch=True, marks=UNIPC_REFUSED),
        Case("test_scheduler_unipc.py", f"{_cls}.test_full_loop_no_noise", "UniPCMultistepScheduler", UNIPC,
             "sample", (None, 0.2441 if _one_d else 0.2464), shape=_shape, marks=UNIPC_REFUSED),
        Case("test_scheduler_unipc.py", f"{_cls}.test_full_loop_with_karras", "UniPCMultistepScheduler",
             dict(UNIPC, use_karras_sigmas=True), "sample", (None, 0.2898 if _one_d else 0.2925), shape=_shape,
             marks=UNIPC_REFUSED),
        Case("test_scheduler_unipc.py", f"{_cls}.test_full_loop_with_v_prediction", "UniPCMultistepScheduler",
             dict(UNIPC, **V), "sample", (None, 0.1014), shape=_shape, marks=UNIPC_REFUSED),
        Case("test_scheduler_unipc.py", f"{_cls}.test_full_loop_with_karras_and_v_prediction",
             "UniPCMultistepScheduler", dict(UNIPC, use_karras_sigmas=True, **V), "sample",
             (None, 0.1944 if _one_d else 0.1966), shape=_shape, marks=UNIPC_REFUSED),
        Case("test_scheduler_unipc.py", f"{_cls}.test_full_loop_with_noise", "UniPCMultistepScheduler", UNIPC,
             "tail", (39.0870, 0.4072) if _one_d else (315.5757, 0.4109), t_start=8, shape=_shape,
             marks=UNIPC_REFUSED),
    ]

# the k-schedulers: their loops overwrite the sample with scale_model_input's (SCALED_LOOP)
_K = [  # (file, class, scheduler, loop of the deterministic tests, [(test, overrides, (sum, mean), tol)])
    ("test_scheduler_euler.py", "EulerDiscreteSchedulerTest", "EulerDiscreteScheduler", [
        ("test_full_loop_no_noise", {}, (10.0807, 0.0131), (1e-2, 1e-3)),
        ("test_full_loop_with_v_prediction", V, (0.0002, 2.2676e-06), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (10.0807, 0.0131), (1e-2, 1e-3)),
        ("test_full_loop_device_karras_sigmas", dict(use_karras_sigmas=True), (124.52299499511719, 0.16213932633399963),
         (1e-2, 1e-3)),
        ("test_full_loop_with_noise", {}, (57062.9297, 74.3007), (1e-2, 1e-3))]),
    ("test_scheduler_euler_ancestral.py", "EulerAncestralDiscreteSchedulerTest", "EulerAncestralDiscreteScheduler", [
        ("test_full_loop_no_noise", {}, (152.3192, 0.1983), (1e-2, 1e-3)),
        ("test_full_loop_with_v_prediction", V, (108.4439, 0.1412), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (152.3192, 0.1983), (1e-2, 1e-3)),
        ("test_full_loop_with_noise", {}, (56163.0508, 73.1290), (1e-2, 1e-3))]),
    ("test_scheduler_heun.py", "HeunDiscreteSchedulerTest", "HeunDiscreteScheduler", [
        ("test_full_loop_no_noise", {}, (0.1233, 0.0002), (1e-2, 1e-3)),
        ("test_full_loop_with_v_prediction", V, (4.6934e-07, 6.1112e-10), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (0.1233, 0.0002), (1e-2, 1e-3)),
        ("test_full_loop_device_karras_sigmas", dict(use_karras_sigmas=True), (0.00015, 1.9869554535034695e-07),
         (1e-2, 1e-2)),
        ("test_full_loop_with_noise", {}, (75074.8906, 97.7538), (1e-2, 1e-3))]),
    ("test_scheduler_lms.py", "LMSDiscreteSchedulerTest", "LMSDiscreteScheduler", [
        ("test_full_loop_no_noise", {}, (1006.388, 1.31), (1e-2, 1e-3)),
        ("test_full_loop_with_v_prediction", V, (0.0017, 2.2676e-06), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (1006.388, 1.31), (1e-2, 1e-3)),
        ("test_full_loop_device_karras_sigmas", dict(use_karras_sigmas=True), (3812.9927, 4.9648), (2e-2, 1e-3)),
        ("test_full_loop_with_noise", {}, (27663.6895, 36.0204), (1e-2, 1e-3))]),
    ("test_scheduler_kdpm2_discrete.py", "KDPM2DiscreteSchedulerTest", "KDPM2DiscreteScheduler", [
        ("test_full_loop_with_v_prediction", V, (4.6934e-07, 6.1112e-10), (1e-2, 1e-3)),
        ("test_full_loop_no_noise", {}, (20.4125, 0.0266), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (20.4125, 0.0266), (1e-2, 1e-3)),
        ("test_full_loop_with_noise", {}, (70408.4062, 91.6776), (1e-2, 1e-3))]),
    ("test_scheduler_kdpm2_ancestral.py", "KDPM2AncestralDiscreteSchedulerTest", "KDPM2AncestralDiscreteScheduler", [
        ("test_full_loop_no_noise", {}, (13979.9433, 18.2030), (1e-2, 5e-3)),
        ("test_full_loop_with_v_prediction", V, (331.8133, 0.4320), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (13979.9433, 18.2030), (1e-1, 1e-3)),
        ("test_full_loop_with_noise", {}, (93087.3437, 121.2074), (1e-2, 5e-3))]),
]
# measured on this CPU (diffusers 0.42.1): fastddpm's (sum, mean), and the sum of diffusers' own scheduler
# run as its pipelines run it (the sample kept unscaled, only the model given scale_model_input's copy),
# which fastddpm's final sample equals to < 1e-5 in every element (the draws included)
K_MEASURED = {
    "EulerDiscreteSchedulerTest.full_loop_no_noise": (168.0514, 0.21882, 168.0516),
    "EulerDiscreteSchedulerTest.full_loop_with_v_prediction": (46.9140, 0.06109, 46.9141),
    "EulerDiscreteSchedulerTest.full_loop_device": (168.0514, 0.21882, 168.0516),
    "EulerDiscreteSchedulerTest.full_loop_device_karras_sigmas": (156.6842, 0.20402, 156.6845),
    "EulerAncestralDiscreteSchedulerTest.full_loop_no_noise": (233.2861, 0.30376, 233.2861),
    "EulerAncestralDiscreteSchedulerTest.full_loop_with_v_prediction": (137.2153, 0.17867, 137.2153),
    "EulerAncestralDiscreteSchedulerTest.full_loop_device": (233.2861, 0.30376, 233.2861),
    "HeunDiscreteSchedulerTest.full_loop_no_noise": (244.6023, 0.31849, 244.6025),
    "HeunDiscreteSchedulerTest.full_loop_with_v_prediction": (116.0958, 0.15117, 116.0958),
    "HeunDiscreteSchedulerTest.full_loop_device": (244.6023, 0.31849, 244.6025),
    "HeunDiscreteSchedulerTest.full_loop_device_karras_sigmas": (248.2053, 0.32318, 248.2056),
    "LMSDiscreteSchedulerTest.full_loop_no_noise": (191.1939, 0.24895, 191.1941),
    "LMSDiscreteSchedulerTest.full_loop_with_v_prediction": (76.9393, 0.10018, 76.9394),
    "LMSDiscreteSchedulerTest.full_loop_device": (191.1939, 0.24895, 191.1941),
    "LMSDiscreteSchedulerTest.full_loop_device_karras_sigmas": (172.0856, 0.22407, 172.0860),
    "KDPM2DiscreteSchedulerTest.full_loop_with_v_prediction": (107.8791, 0.14047, 107.8789),
    "KDPM2DiscreteSchedulerTest.full_loop_no_noise": (218.2557, 0.28419, 218.2556),
    "KDPM2DiscreteSchedulerTest.full_loop_device": (218.2557, 0.28419, 218.2556),
    "KDPM2AncestralDiscreteSchedulerTest.full_loop_no_noise": (456.5528, 0.59447, 456.5533),
    "KDPM2AncestralDiscreteSchedulerTest.full_loop_with_v_prediction": (422.6230, 0.55029, 422.6230),
    "KDPM2AncestralDiscreteSchedulerTest.full_loop_device": (456.5528, 0.59447, 456.5533),
}
# fastddpm's sums of the begun (t_start = 8) loops, measured here; diffusers' numbers are of the scaled loop
K_TAIL_MEASURED = {"EulerDiscreteSchedulerTest": 344.0350, "EulerAncestralDiscreteSchedulerTest": 339.6921,
                   "HeunDiscreteSchedulerTest": 440.4987, "LMSDiscreteSchedulerTest": 344.0984,
                   "KDPM2DiscreteSchedulerTest": 401.4454, "KDPM2AncestralDiscreteSchedulerTest": 537.4406}
for _file, _cls, _sched, _tests in _K:
    _stochastic = _sched in ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
    for _name, _over, _expected, _tol in _tests:
        _tail = _name == "test_full_loop_with_noise"
        _id = f"{_cls}.{_name.removeprefix('test_')}"
        if _tail:
            _marks = mismatch(f"sum {K_TAIL_MEASURED[_cls]} against diffusers' {_expected[0]}: {SCALED_LOOP}")
        else:
            _sum, _mean, _pipeline = K_MEASURED[_id]
            _marks = mismatch(f"sum {_sum} / mean {_mean} against diffusers' {_expected[0]} / {_expected[1]}: "
                              f"{SCALED_LOOP}; diffusers' scheduler in its pipeline loop gives sum {_pipeline}, "
                              "which fastddpm matches")
        CASES.append(Case(_file, f"{_cls}.{_name}", _sched, dict(LINEAR_1100, **_over),
                          "tail" if _tail else "generator" if _stochastic else "sample", _expected, _tol,
                          t_start=8 if _tail else 0, marks=_marks))

for _name, _over, _expected in (("test_full_loop_no_noise", {}, (198.1318, 0.2580)),
                                ("test_full_loop_with_v_prediction", V, (67.3986, 0.0878)),
                                ("test_full_loop_with_set_alpha_to_one", dict(set_alpha_to_one=True, beta_start=0.01),
                                 (230.0399, 0.2995)),
                                ("test_full_loop_with_no_set_alpha_to_one",
                                 dict(set_alpha_to_one=False, beta_start=0.01), (186.9482, 0.2434))):
    CASES.append(Case("test_scheduler_pndm.py", f"PNDMSchedulerTest.{_name}", "PNDMScheduler", dict(LINEAR, **_over),
                      "sample", _expected, marks=PNDM_PRK))

for _name, _over, _expected, _tol in (
        ("test_full_loop_no_noise", {}, (162.52383422851562, 0.211619570851326), (1e-2, 1e-3)),
        ("test_full_loop_with_v_prediction", V, (119.8487548828125, 0.1560530662536621), (1e-2, 1e-3)),
        ("test_full_loop_device", {}, (162.52383422851562, 0.211619570851326), (1e-2, 1e-3)),
        ("test_full_loop_device_karras_sigmas", dict(use_karras_sigmas=True), (170.3135223388672, 0.23003872730981811),
         (1e-2, 1e-2))):
    CASES.append(Case("test_scheduler_dpm_sde.py", f"DPMSolverSDESchedulerTest.{_name}", "DPMSolverSDEScheduler",
                      dict(LINEAR_1100, noise_sampler_seed=0, **_over), "sample", _expected, _tol,
                      marks=(pytest.mark.skip(reason=NO_BROWNIAN),)))


# -- the loops ------------------------------------------------------------------------------------------
def _scheduler(case: Case):
    return getattr(diffusers, case.scheduler)(**case.config)


def _switched(scheduler):
    """test_switch's round trip: the config through each scheduler class of the chain, back to its own."""
    for name in SWITCHES[type(scheduler).__name__]:
        scheduler = getattr(diffusers, name).from_config(scheduler.config)
    return scheduler


@torch.no_grad()
def _ddpm_loop(case: Case, process: DDPM, model) -> torch.Tensor:
    """Every train timestep from ``t_start`` down (``add_noise`` there first when ``t_start > 0``), each
    ``step`` drawing from a generator seeded 0 where diffusers' does (t > 0)."""
    generator = torch.manual_seed(0)
    T = process.config.num_timesteps
    timesteps = list(range(T - 1 - case.t_start, -1, -1))
    x = ramp(case.shape)
    if case.t_start:
        x = process.q_sample(x, timesteps[0], noise=ramp(case.shape, reverse=True))
    for t in timesteps:
        x = process.step(model(x, t), t, x, generator=generator)
    return x


@torch.no_grad()
def _ddim_tail(case: Case, process: DDPM, model) -> torch.Tensor:
    """DDIM respaced to ``steps``, from its ``t_start``-th step on, after ``add_noise`` at that timestep."""
    respaced = process.respace(case.steps)
    timesteps = sorted(respaced.schedule.timesteps, reverse=True)[case.t_start:]
    x = respaced.q_sample(ramp(case.shape), timesteps[0], noise=ramp(case.shape, reverse=True))
    for t in timesteps:
        x = respaced.step(model(x, t), t, x)
    return x


@torch.no_grad()
def _plan_loop(case: Case, process: DDPM, model) -> torch.Tensor:
    """A table sampler stepped call by call (``MultistepSampler``): from ``begin_index=t_start`` (the whole
    plan's sigma there is ``add_noise``'s: ``x = alpha (x0 + sigma z)``), or from the start with the
    generator draws diffusers' step makes (``DRAWS``)."""
    plan = process.multistep_plan(case.steps)
    x0 = ramp(case.shape)
    if case.loop == "tail":
        x = x0
        if case.noised:
            sigma = float(plan.sigmas[-1])
            x = (x0 + sigma * ramp(case.shape, reverse=True)) / math.sqrt(1.0 + sigma**2)
    else:
        x = x0 * plan.start_scale  # diffusers: dummy_sample_deter * init_noise_sigma, as the model sees it
    sampler = MultistepSampler(plan, x)
    generator = torch.manual_seed(0)
    draws = DRAWS.get(process.config.sampler)
    R = len(sampler.timesteps)
    for j, t in enumerate(sampler.timesteps):
        out = model(x, t)
        noise = None
        if plan.stochastic:
            noise = torch.zeros_like(x)
            if draws is not None and draws(j, R):
                noise = torch.randn(x.shape, generator=generator, dtype=out.dtype)
        x = sampler.step(out, x, noise=noise)
    return x


@torch.no_grad()
def _sample(case: Case, process: DDPM, model) -> torch.Tensor:
    """``fastddpm.sample`` from ``dummy_sample_deter`` as x_T (a k-sampler scales it by init_noise_sigma);
    a sample shape the front door does not take ([n, C, W]) through the same plan step by step."""
    if len(case.shape) != 4:
        return _plan_loop(case, process, model)
    return fastddpm.sample(model, case.shape[0], steps=case.steps, noise=ramp(case.shape), process=process,
                           progress=False, engine=False)


LOOPS = {"ddpm": _ddpm_loop, "ddim_tail": _ddim_tail, "tail": _plan_loop, "generator": _plan_loop,
         "sample": _sample}


def run_case(case: Case, scheduler=None) -> torch.Tensor:
    """The final sample of ``case``'s loop, through fastddpm, for ``scheduler`` (default: the case's)."""
    scheduler = _scheduler(case) if scheduler is None else scheduler
    options = dict(case.options, **({"begin_index": case.t_start} if case.loop == "tail" else {}))
    process = DDPM.from_diffusers(scheduler, **options)
    return LOOPS[case.loop](case, process, RampModel())


def _check(case: Case, x: torch.Tensor, label: str = ""):
    total, mean = x.abs().sum().item(), x.abs().mean().item()
    (want_sum, want_mean), (tol_sum, tol_mean) = case.expected, case.tol
    assert x.shape == case.shape and bool(torch.isfinite(x).all())
    if want_sum is not None:
        assert abs(total - want_sum) < tol_sum, f"{label}sum {total} vs diffusers' {want_sum} (tol {tol_sum})"
    assert abs(mean - want_mean) < tol_mean, f"{label}mean {mean} vs diffusers' {want_mean} (tol {tol_mean})"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_diffusers_full_loop(case: Case):
    scheduler = _scheduler(case)
    _check(case, run_case(case, scheduler))
    if case.switch:
        _check(case, run_case(case, _switched(scheduler)), "after the from_config round trip: ")


def test_cases_are_the_ported_numbers():
    """Each case is one diffusers test, and the docstring names each one's source."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        cls, name = c.test.split(".")
        assert c.source in __doc__ and name in __doc__ and cls in __doc__, c.test
