"""diffusers interop: a diffusers scheduler (or its config) as the equal fastddpm process config,
and the duck typing of a diffusers pipeline (``DDPMPipeline``, ``DDIMPipeline``).

``diffusion_config`` (the conversion behind ``DDPM.from_diffusers``) maps every ``__init__`` field of ``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, ``DPMSolverSinglestepScheduler``,
``DEISMultistepScheduler``, ``PNDMScheduler`` and the k-samplers' ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``, ``KDPM2DiscreteScheduler``,
``KDPM2AncestralDiscreteScheduler``, ``LMSDiscreteScheduler`` and ``DPMSolverSDEScheduler`` (diffusers 0.42) to the
``DiffusionConfig`` that samples the same trajectory, or raises a ``ValueError`` that names the
field, its value and what is supported: a process is never silently approximated.

    diffusers                                  fastddpm
    num_train_timesteps                        num_timesteps
    beta_schedule linear / scaled_linear       linear / quadratic (at fastddpm's default end points),
                                               else explicit betas from beta_start, beta_end
    beta_schedule squaredcos_cap_v2            cosine
    beta_schedule sigmoid (DDPM)               explicit betas (diffusers' GeoDiff formula, float64)
    trained_betas                              schedule="custom", betas
    (from_diffusers table_dtype=torch.float32,  table_dtype="float32": the schedule built in float32 as
      DDPM and DDIM only)                       diffusers' __init__ builds it, its float32 alphas_cumprod
                                               and step arithmetic (float64 default: the exact math)
    prediction_type epsilon/sample/v_prediction  prediction epsilon/x0/v
    variance_type fixed_small(_log)/fixed_large  variance fixed_small/fixed_large (DDPM)
    clip_sample (clip_sample_range=1)          clip_denoised (DDPM, DDIM)
    thresholding (sample_max_value=1)          clip_denoised (the quantile is clamped to 1: a clip)
    thresholding (sample_max_value != 1)       clip_denoised="dynamic" with dynamic_thresholding_ratio and
                                               sample_max_value (Imagen's dynamic thresholding; below 1
                                               every bound is sample_max_value, as diffusers' clamp gives)
    timestep_spacing                           timestep_spacing (DDPM/DDIM respacing too)
    steps_offset                               0 only with leading spacing (unused otherwise)
    DDIM                                       sampler="ddim" (eta: a step argument; pass eta=),
                                               set_alpha_to_one, ddim_direction "raw" (clip_sample or
                                               thresholding; "clipped" with use_clipped_model_output=True)
    DPM-Solver++ (dpmsolver++ order 2/3,       sampler dpm++2m / dpm++3m / dpm++2m-sde
      sde-dpmsolver++ order 2)                 (dpmsolver: algorithm_type; heun: solver_type)
    lower_order_final, final_sigmas_type,      the same fields (DPM-Solver, UniPC)
      use_lu_lambdas, euler_at_final
    UniPC (bh2, order 2, predict_x0)           sampler unipc, lambda_min_clipped=-inf
    use_karras_sigmas                          karras_sigmas
    lambda_min_clipped                         lambda_min_clipped
    Euler / EulerAncestral / Heun /            sampler euler / euler-a / heun / dpm2 / dpm2-a / lms
      KDPM2 / KDPM2Ancestral / LMS             (fastddpm.ksamplers; LMS order 4, step()'s default)
    DPMSolverSDE                               sampler dpm++sde (its noise_sampler_seed: the draws are
                                               the noise contract's Brownian increments)
    use_exponential_sigmas, use_beta_sigmas    exponential_sigmas, beta_sigmas (k-samplers)
    final_sigmas_type (Euler)                  final_sigmas_type
    clip_sample (Heun, clip_sample_range=1)    clip_denoised
    DPMSolverSinglestep (orders 1-3,           sampler dpm-solver, solver_order, algorithm_type, solver_type,
      dpmsolver++/dpmsolver/sde-dpmsolver++,     lower_order_final, final_sigmas_type (fastddpm.singlestep)
      midpoint/heun)
    DEIS (deis, logrho, orders 1-3)            sampler deis, solver_order, lower_order_final (fastddpm.lmsolvers)
    PNDM (skip_prk_steps=True: PLMS)           sampler pndm, set_alpha_to_one, steps_offset (leading)

Refused (each a ValueError naming the field): rescale_betas_zero_snr=True; beta_schedule laplace/exp;
trained_betas of another length than num_train_timesteps;
clip_sample_range != 1; steps_offset != 0 with leading spacing; DDPM variance_type fixed_large_log,
learned, learned_range, and fixed_large with trailing spacing (diffusers' last step then adds noise);
DDIM linspace spacing (diffusers' DDIM steps t -> t - T//steps, not to the next
linspace timestep), DPM-Solver
algorithm_type sde-dpmsolver, solver_order 1 (3 with sde-dpmsolver++: its D2 weight), exponential/beta/flow
sigmas, dynamic shifting, learned variance, Karras or Lu sigmas with a finite lambda_min_clipped; UniPC bh1, solver_order != 2, predict_x0=False,
disable_corrector, solver_p, sigma_min/sigma_max/shift_terminal; prediction_type flow_prediction; Euler
interpolation_type log_linear, timestep_type continuous, sigma_min/sigma_max; PNDM skip_prk_steps=False (the
PRK warm-up outlives the fused step's history) and sample prediction; DEIS/singlestep exponential, beta or
flow sigmas, dynamic shifting; singlestep Karras sigmas with a finite lambda_min_clipped.
At sample time, DDIM with trailing spacing needs steps that divide num_train_timesteps (``DDPM.respace``).

A scheduler's state (``set_timesteps``) is not read: the number of steps is ``sample``'s ``steps``.
Config keys that start with ``_`` and keys the diffusers class does not take are ignored (as
diffusers ignores them); missing keys take the installed diffusers' defaults.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import numpy as np
import torch

from .checks import is_int
from .config import DiffusionConfig
from .modes import SPACINGS
from .schedule import NoiseSchedule, betas_from_float32_cumprod, diffusers_betas32, make_betas, table_dtype_name

__all__ = ["SCHEDULERS", "diffusion_config", "scheduler_config", "is_pipeline"]

# the k-samplers' schedulers (fastddpm.ksamplers) and the sampler each is
K_SCHEDULERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-a",
                "HeunDiscreteScheduler": "heun", "KDPM2DiscreteScheduler": "dpm2",
                "KDPM2AncestralDiscreteScheduler": "dpm2-a", "LMSDiscreteScheduler": "lms",
                "DPMSolverSDEScheduler": "dpm++sde"}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
              "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "PNDMScheduler", *K_SCHEDULERS)
PREDICTIONS = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_COMMON = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
           "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "steps_offset",
           "rescale_betas_zero_snr")
_MULTISTEP = ("solver_order", "solver_type", "lower_order_final", "use_karras_sigmas", "use_exponential_sigmas",
              "use_beta_sigmas", "use_flow_sigmas", "flow_shift", "final_sigmas_type", "use_dynamic_shifting",
              "time_shift_type")
# every __init__ field of each class that this module reads (a newer diffusers' extra field raises)
HANDLED = {
    "DDPMScheduler": _COMMON + ("variance_type", "clip_sample", "clip_sample_range"),
    "DDIMScheduler": _COMMON + ("clip_sample", "clip_sample_range", "set_alpha_to_one"),
    "DPMSolverMultistepScheduler": _COMMON + _MULTISTEP + ("algorithm_type", "euler_at_final", "use_lu_lambdas",
                                                           "lambda_min_clipped", "variance_type"),
    "UniPCMultistepScheduler": _COMMON + _MULTISTEP + ("predict_x0", "disable_corrector", "solver_p", "sigma_min",
                                                       "sigma_max", "shift_terminal"),
    # diffusers' singlestep scheduler has no timestep_spacing or steps_offset (its timesteps are linspace)
    "DPMSolverSinglestepScheduler": tuple(k for k in _COMMON if k not in ("timestep_spacing", "steps_offset"))
    + _MULTISTEP + ("algorithm_type", "lambda_min_clipped", "variance_type"),
    "DEISMultistepScheduler": _COMMON + _MULTISTEP + ("algorithm_type",),
    "PNDMScheduler": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "timestep_spacing", "steps_offset", "skip_prk_steps", "set_alpha_to_one"),
}
_K_COMMON = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
             "timestep_spacing", "steps_offset")
_K_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
HANDLED.update({
    "EulerDiscreteScheduler": _K_COMMON + _K_SIGMAS + ("interpolation_type", "sigma_min", "sigma_max", "timestep_type",
                                                       "rescale_betas_zero_snr", "final_sigmas_type"),
    "EulerAncestralDiscreteScheduler": _K_COMMON + ("rescale_betas_zero_snr",),
    "HeunDiscreteScheduler": _K_COMMON + _K_SIGMAS + ("clip_sample", "clip_sample_range"),
    "KDPM2DiscreteScheduler": _K_COMMON + _K_SIGMAS,
    "KDPM2AncestralDiscreteScheduler": _K_COMMON + _K_SIGMAS,
    "LMSDiscreteScheduler": _K_COMMON + _K_SIGMAS,
    # its Brownian tree's seed: fastddpm's draws are the noise contract's (sample(seed=)), the same path law
    "DPMSolverSDEScheduler": _K_COMMON + _K_SIGMAS + ("noise_sampler_seed",),
})


class _Fields:
    """A scheduler's full config (defaults filled in) and the errors that name its fields."""

    def __init__(self, name: str, config: dict):
        self.name, self.config = name, config

    def __getitem__(self, key):
        return self.config[key]

    def reject(self, key, supported: str, why: str = ""):
        value = repr(self.config[key])
        value = value if len(value) <= 80 else value[:60] + f"... ({len(value)} characters)"
        raise ValueError(f"{self.name}.{key}={value} has no fastddpm equivalent"
                         f"{': ' + why if why else ''}; supported: {supported}")

    def require(self, key, allowed: tuple, why: str = ""):
        if self.config[key] not in allowed:
            self.reject(key, " or ".join(repr(a) for a in allowed), why)


def scheduler_config(scheduler_or_config) -> tuple[str, dict]:
    """``(class name, full config)`` of a diffusers scheduler or its config dict.

    :param scheduler_or_config: a scheduler instance, its ``.config`` (a FrozenDict, whose class is
        then told by ``_class_name``) or a plain dict with ``_class_name`` (a ``scheduler_config.json``).
    """
    if isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
        name = config.get("_class_name") or _class_of(config)
    elif isinstance(getattr(scheduler_or_config, "config", None), Mapping):
        known = [c.__name__ for c in type(scheduler_or_config).__mro__ if c.__name__ in SCHEDULERS]
        name = known[0] if known else type(scheduler_or_config).__name__
        config = dict(scheduler_or_config.config)
    else:
        raise TypeError(f"scheduler_or_config must be a diffusers scheduler ({', '.join(SCHEDULERS)}) or its "
                        f"config dict, got {type(scheduler_or_config).__name__}")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler_or_config: _class_name={name!r} has no fastddpm equivalent; supported: "
                         f"{', '.join(SCHEDULERS)}")
    diffusers = _diffusers()
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    # a field newer than this module is accepted at its default (diffusers keeps old behaviour there)
    # and refused when the config sets it to anything else
    unknown = sorted(k for k in set(params) - {"self"} - set(HANDLED[name])
                     if k in config and not _same(config[k], params[k].default))
    if unknown:
        raise ValueError(f"{name} fields {unknown} (this diffusers {diffusers.__version__}) are set away from their "
                         "defaults and unknown to fastddpm.interop, which cannot tell whether they change the process")
    full = {k: p.default for k, p in params.items() if k != "self"}
    full.update({k: v for k, v in config.items() if k in full})  # others: ignored, as diffusers does
    return name, full


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("from_diffusers needs diffusers installed (pip install diffusers) for its schedulers' "
                          "defaults") from e
    return diffusers


def _same(value, default) -> bool:
    try:
        return bool(value == default) if not isinstance(value, (list, tuple)) else list(value) == list(default or [])
    except Exception:  # noqa: BLE001 -- e.g. arrays: not provably the default
        return False


def _fields(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _class_of(config: dict) -> str:
    """The scheduler class whose ``__init__`` fields are exactly the config's keys (``scheduler.config``
    holds them all but not ``_class_name``)."""
    diffusers = _diffusers()
    keys = {k for k in config if not k.startswith("_")}
    found = [n for n in SCHEDULERS if keys == _fields(getattr(diffusers, n))]
    if len(found) != 1:
        raise ValueError("scheduler_or_config is a config dict without '_class_name' whose keys are not exactly "
                         "one scheduler's fields: give the scheduler itself, or add '_class_name' "
                         f"(one of {SCHEDULERS})")
    return found[0]


def diffusion_config(scheduler_or_config, *, use_clipped_model_output: bool = False,
                     table_dtype=torch.float64, **options) -> DiffusionConfig:
    """The config of the fastddpm process (and sampler) equal to a diffusers scheduler; see the module
    docstring.  ``DDPM.from_diffusers`` is the process made from it.

    :param scheduler_or_config: a ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``
        or ``UniPCMultistepScheduler``, or its config (``scheduler.config`` or a dict with ``_class_name``).
    :param use_clipped_model_output: DDIM with ``clip_sample=True`` (or thresholding): the step's direction
        from the clipped x0 (diffusers' ``step(..., use_clipped_model_output=True)``, ``DDIMPipeline(...,
        use_clipped_model_output=True)``; ``ddim_direction="clipped"``).  Without it, diffusers' default: the
        direction from the raw model output (``ddim_direction="raw"``, the fused step's ``c2`` column).
    :param table_dtype: ``torch.float64`` (the default): fastddpm's tables are the exact math of the schedule
        in float64.  ``torch.float32`` (``DDPMScheduler``, ``DDIMScheduler``): the schedule built in float32
        as their ``__init__`` builds it (``alphas_cumprod`` equal to the scheduler's) and the tables from
        diffusers' float32 step arithmetic, to reproduce diffusers' rounding (``table_dtype="float32"``).
    :param options: ``DiffusionConfig`` fields set after the conversion (e.g. DDIM's ``eta``, the training
        ``loss``).
    :return: a ``DiffusionConfig`` over the full ``num_train_timesteps``; ``sample(..., steps=K)`` picks
        the K timesteps as the scheduler's ``set_timesteps(K)`` does.
    """
    table_dtype = table_dtype_name(table_dtype)
    name, config = scheduler_config(scheduler_or_config)
    f = _Fields(name, config)
    if use_clipped_model_output and name != "DDIMScheduler":
        raise ValueError(f"use_clipped_model_output is DDIMScheduler's, not {name}'s")
    if table_dtype == "float32" and name not in ("DDPMScheduler", "DDIMScheduler"):
        raise ValueError(f"table_dtype=torch.float32 is for DDPMScheduler and DDIMScheduler (whose step is "
                         f"reproduced in float32), not {name}: its fastddpm plan is float64 math")
    kw = {**(_schedule32(f) if table_dtype == "float32" else _schedule(f)), "prediction": _prediction(f)}
    if "timestep_spacing" not in f.config:  # DPMSolverSinglestepScheduler: linspace, no offset
        f.config.update(timestep_spacing="linspace", steps_offset=0)
    spacing = f["timestep_spacing"]
    f.require("timestep_spacing", SPACINGS)
    if spacing == "leading" and f["steps_offset"] != 0 and name != "PNDMScheduler":
        f.reject("steps_offset", "0 with timestep_spacing='leading' (any value with 'linspace' or 'trailing')",
                 "fastddpm's leading timesteps start at 0")
    kw["timestep_spacing"] = spacing
    if name in K_SCHEDULERS:
        kw.update(_k_sampler(f, K_SCHEDULERS[name]))
    elif name == "DDPMScheduler":
        kw.update(_ddpm(f))
    elif name == "DDIMScheduler":
        kw.update(_ddim(f, use_clipped_model_output))
    elif name == "DPMSolverMultistepScheduler":
        kw.update(_dpm_solver(f))
    elif name == "DPMSolverSinglestepScheduler":
        kw.update(_singlestep(f))
    elif name == "DEISMultistepScheduler":
        kw.update(_deis(f))
    elif name == "PNDMScheduler":
        kw.update(_pndm(f))
    else:
        kw.update(_unipc(f))
    config = DiffusionConfig(**kw)
    return config.replace(**options) if options else config


# -- the fields ----------------------------------------------------------------------------------
def _schedule(f: _Fields) -> dict:
    T = f["num_train_timesteps"]
    if not is_int(T) or T < 1:
        f.reject("num_train_timesteps", "a positive int")
    if f.config.get("rescale_betas_zero_snr"):
        f.reject("rescale_betas_zero_snr", "False", "zero terminal SNR makes beta_T = 1, where x_T carries no "
                 "signal and fastddpm's reverse coefficients are infinite")
    if f["trained_betas"] is not None:
        betas = tuple(float(b) for b in np.asarray(f["trained_betas"], dtype=np.float64).reshape(-1))
        if len(betas) != T:
            f.reject("trained_betas", f"{T} betas (num_train_timesteps)", f"it has {len(betas)}")
        return {"schedule": "custom", "betas": betas}
    kind, start, end = f["beta_schedule"], float(f["beta_start"]), float(f["beta_end"])
    if kind == "squaredcos_cap_v2":
        return {"schedule": "cosine", "num_timesteps": T}  # the same formula (Nichol & Dhariwal), cap 0.999
    if kind == "linear":
        betas, named = np.linspace(start, end, T, dtype=np.float64), "linear"
    elif kind == "scaled_linear":
        betas, named = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2, "quadratic"
    elif kind == "sigmoid" and f.name == "DDPMScheduler":  # GeoDiff's, not fastddpm's sigmoid
        betas, named = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (end - start) + start, None
    else:
        supported = "'linear', 'scaled_linear', 'squaredcos_cap_v2'" + (
            ", 'sigmoid'" if f.name == "DDPMScheduler" else "") + " or trained_betas"
        f.reject("beta_schedule", supported)
    if named is not None and _equals_named(betas, named, T):
        return {"schedule": named, "num_timesteps": T}
    return {"schedule": "custom", "betas": tuple(betas.tolist())}


def _schedule32(f: _Fields) -> dict:
    """The schedule as a ``DDPMScheduler``/``DDIMScheduler`` builds it in float32 (``diffusers_betas32``, a
    float32 ``torch.cumprod``), kept by the betas whose products round to its ``alphas_cumprod``; named where
    fastddpm's ``table_dtype="float32"`` schedule of that name is the same."""
    named = _schedule(f)  # its checks and refusals
    T = f["num_train_timesteps"]
    betas32 = diffusers_betas32(f["beta_schedule"], T, float(f["beta_start"]), float(f["beta_end"]),
                                f["trained_betas"])
    betas = betas_from_float32_cumprod(torch.cumprod(1.0 - betas32, dim=0))
    if named["schedule"] != "custom" and np.array_equal(
            betas, NoiseSchedule.make(named["schedule"], T, table_dtype="float32").betas):
        return {**named, "table_dtype": "float32"}
    return {"schedule": "custom", "betas": tuple(betas.tolist()), "table_dtype": "float32"}


def _equals_named(betas: np.ndarray, kind: str, T: int) -> bool:
    try:
        return bool(np.array_equal(betas, make_betas(kind, T)))
    except ValueError:  # fastddpm's scaled end points reach beta >= 1 at small T
        return False


def _prediction(f: _Fields) -> str:
    f.require("prediction_type", tuple(PREDICTIONS))
    return PREDICTIONS[f["prediction_type"]]


def _clip(f: _Fields, has_clip_sample: bool) -> dict:
    """``clip_denoised`` (and the dynamic thresholding's fields): thresholding with sample_max_value=1
    clamps the quantile s to [1, 1], exactly the clip to [-1, 1]; above 1 it is the dynamic one."""
    if f["thresholding"]:
        most, ratio = f["sample_max_value"], f["dynamic_thresholding_ratio"]
        if isinstance(most, bool) or not isinstance(most, (int, float)) or not 0.0 < most < math.inf:
            f.reject("sample_max_value", "a finite number > 0 with thresholding=True")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            f.reject("dynamic_thresholding_ratio", "a quantile in (0, 1]")
        if most == 1.0:
            return {"clip_denoised": True}
        return {"clip_denoised": "dynamic", "dynamic_thresholding_ratio": float(ratio),
                "sample_max_value": float(most)}
    if has_clip_sample and f["clip_sample"]:
        if f["clip_sample_range"] != 1.0:
            f.reject("clip_sample_range", "1.0", "fastddpm clips x0 to [-1, 1]")
        return {"clip_denoised": True}
    return {"clip_denoised": False}


def _ddpm(f: _Fields) -> dict:
    variance = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",  # exp(log(var)/2): the same std
                "fixed_large": "fixed_large"}
    f.require("variance_type", tuple(variance), "fixed_large_log and learned variances are not fastddpm's")
    if f["variance_type"] == "fixed_large" and f["timestep_spacing"] == "trailing":
        f.reject("timestep_spacing", "'linspace' or 'leading' with variance_type='fixed_large'",
                 "with trailing timesteps diffusers' last step (t = T/steps - 1 > 0) adds sqrt(beta) noise, "
                 "fastddpm's last step adds none")
    return {"sampler": "ddpm", "variance": variance[f["variance_type"]], **_clip(f, True)}


def _ddim(f: _Fields, use_clipped_model_output: bool) -> dict:
    if not isinstance(f["set_alpha_to_one"], bool):
        f.reject("set_alpha_to_one", "True or False")
    if f["timestep_spacing"] == "linspace":
        f.reject("timestep_spacing", "'leading' or 'trailing'", "diffusers' DDIMScheduler steps t -> t - T//steps, "
                 "which is not the next linspace timestep; fastddpm's DDIM steps between kept timesteps")
    clip = _clip(f, True)
    # diffusers' DDIM step (as DDIMPipeline calls it) takes its direction from the unclipped model output;
    # its use_clipped_model_output=True from the clipped x0's epsilon (fastddpm's default form)
    direction = "raw" if clip["clip_denoised"] and not use_clipped_model_output else "clipped"
    return {"sampler": "ddim", "set_alpha_to_one": f["set_alpha_to_one"], "ddim_direction": direction, **clip}


def _multistep_common(f: _Fields) -> dict:
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
        if f[key]:
            f.reject(key, "False", "fastddpm's solvers step on the schedule's sigmas, Karras' or Lu's")
    f.require("final_sigmas_type", ("zero", "sigma_min"))
    for key in ("use_karras_sigmas", "lower_order_final"):
        if not isinstance(f[key], bool):
            f.reject(key, "True or False")
    return {"karras_sigmas": f["use_karras_sigmas"], "lower_order_final": f["lower_order_final"],
            "final_sigmas_type": f["final_sigmas_type"]}


def _dpm_solver(f: _Fields) -> dict:
    kw = _multistep_common(f)
    algorithm = "dpmsolver++" if f["algorithm_type"] == "deis" else f["algorithm_type"]  # as diffusers maps it
    f.require("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "deis"),
              "sde-dpmsolver (the noise-prediction SDE) is not fastddpm's")
    if (algorithm, f["solver_order"]) == ("sde-dpmsolver++", 3):
        f.reject("solver_order", "2 with algorithm_type='sde-dpmsolver++' (sampler='dpm++3m-sde' for k-diffusion's "
                 "third-order SDE solver)", "diffusers' third-order SDE update weights D2 by (1 - e^-2h - 2h) / "
                 "(2h)^2 - 1/2; its ODE form's convention (and k-diffusion's sample_dpmpp_3m_sde) gives + 1/2, "
                 "and fastddpm does not reproduce the difference")
    solvers = {("dpmsolver++", 2): "dpm++2m", ("dpmsolver++", 3): "dpm++3m", ("dpmsolver", 2): "dpm++2m",
               ("dpmsolver", 3): "dpm++3m", ("sde-dpmsolver++", 2): "dpm++2m-sde"}
    if (algorithm, f["solver_order"]) not in solvers:
        f.reject("solver_order", "2 or 3 (2 with 'sde-dpmsolver++')", "a first-order DPM-Solver is DDIM: "
                 "sampler='ddim'" if f["solver_order"] == 1 else "")
    # diffusers turns these solver_types into midpoint
    f.require("solver_type", ("midpoint", "heun", "logrho", "bh1", "bh2"))
    solver_type = "heun" if f["solver_type"] == "heun" else "midpoint"
    for key in ("use_lu_lambdas", "euler_at_final"):
        if not isinstance(f[key], bool):
            f.reject(key, "True or False")
    if f["use_lu_lambdas"] and f["use_karras_sigmas"]:
        f.reject("use_lu_lambdas", "False with use_karras_sigmas=True", "diffusers then uses Karras' silently")
    if f["variance_type"] is not None:
        f.reject("variance_type", "None", "a learned-variance model outputs 2x channels")
    lam = f["lambda_min_clipped"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam != lam:
        f.reject("lambda_min_clipped", "a float (-inf: no clip)")
    if (f["use_karras_sigmas"] or f["use_lu_lambdas"]) and lam != -math.inf:
        f.reject("lambda_min_clipped", "-inf with use_karras_sigmas=True or use_lu_lambdas=True",
                 "diffusers' Karras and Lu sigmas ignore the clip, fastddpm's keep to it")
    if f["use_karras_sigmas"] and f["trained_betas"] is not None and f["beta_schedule"] == "squaredcos_cap_v2":
        f.reject("trained_betas", "None with beta_schedule='squaredcos_cap_v2' and use_karras_sigmas=True",
                 "diffusers truncates the Karras timesteps by the schedule's name, not its betas")
    out = {"sampler": solvers[(algorithm, f["solver_order"])], **kw, **_clip(f, False),
           "lambda_min_clipped": float(lam), "use_lu_lambdas": f["use_lu_lambdas"],
           "euler_at_final": f["euler_at_final"]}
    if algorithm == "dpmsolver":
        out["algorithm_type"] = "dpmsolver"
    if solver_type == "heun":
        out["solver_type"] = "heun"
    return out


def _table_sampler_common(f: _Fields, final_sigmas=("zero",)):
    """The fields DPM-Solver singlestep and DEIS share with the multistep schedulers."""
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
        if f[key]:
            f.reject(key, "False", "fastddpm's solvers step on the schedule's sigmas or Karras'")
    if "final_sigmas_type" in f.config:
        f.require("final_sigmas_type", final_sigmas)
    for key in ("use_karras_sigmas", "lower_order_final"):
        if not isinstance(f[key], bool):
            f.reject(key, "True or False")
    if not is_int(f["solver_order"]) or f["solver_order"] not in (1, 2, 3):
        f.reject("solver_order", "1, 2 or 3")
    return {"solver_order": int(f["solver_order"]), "lower_order_final": f["lower_order_final"],
            "karras_sigmas": f["use_karras_sigmas"], **_clip(f, False)}


def _singlestep(f: _Fields) -> dict:
    """``DPMSolverSinglestepScheduler``: ``dpm-solver`` (``fastddpm.singlestep``)."""
    kw = _table_sampler_common(f, ("zero", "sigma_min"))
    f.require("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"))
    f.require("solver_type", ("midpoint", "heun"))
    if f["variance_type"] is not None:
        f.reject("variance_type", "None", "a learned-variance model outputs 2x channels")
    lam = f["lambda_min_clipped"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam != lam:
        f.reject("lambda_min_clipped", "a float (-inf: no clip)")
    if f["use_karras_sigmas"] and lam != -math.inf:
        f.reject("lambda_min_clipped", "-inf with use_karras_sigmas=True",
                 "diffusers' Karras sigmas ignore the clip, fastddpm's keep to it")
    return {"sampler": "dpm-solver", **kw, "algorithm_type": f["algorithm_type"], "solver_type": f["solver_type"],
            "final_sigmas_type": f["final_sigmas_type"], "lambda_min_clipped": float(lam)}


def _deis(f: _Fields) -> dict:
    """``DEISMultistepScheduler``: ``deis`` (``fastddpm.lmsolvers``)."""
    kw = _table_sampler_common(f)
    f.require("algorithm_type", ("deis",), "diffusers implements DEIS only")
    f.require("solver_type", ("logrho",), "diffusers implements logrho only")
    return {"sampler": "deis", **kw}


def _pndm(f: _Fields) -> dict:
    """``PNDMScheduler``: ``pndm`` (PLMS, ``fastddpm.lmsolvers``), its final alpha and timestep offset."""
    f.require("skip_prk_steps", (True,), "the PRK warm-up needs the first outputs of three earlier 4-call steps, "
              "more than the fused step's history holds; skip_prk_steps=True (Stable Diffusion's setting) is PLMS")
    f.require("prediction_type", ("epsilon", "v_prediction"), "diffusers' PNDM has no x0 form")
    if not isinstance(f["set_alpha_to_one"], bool):
        f.reject("set_alpha_to_one", "True or False")
    if not is_int(f["steps_offset"]) or f["steps_offset"] < 0:
        f.reject("steps_offset", "an int >= 0")
    offset = int(f["steps_offset"]) if f["timestep_spacing"] == "leading" else 0  # diffusers adds it there only
    return {"sampler": "pndm", "clip_denoised": False, "set_alpha_to_one": f["set_alpha_to_one"],
            "steps_offset": offset}


def _unipc(f: _Fields) -> dict:
    kw = _multistep_common(f)
    f.require("solver_order", (2,), "fastddpm's UniPC is of order 2")
    f.require("predict_x0", (True,), "fastddpm's UniPC predicts x0 (data prediction)")
    # diffusers turns midpoint/heun/logrho into bh2
    f.require("solver_type", ("bh2", "midpoint", "heun", "logrho"), "fastddpm's UniPC is UniPC-bh2")
    if f["disable_corrector"]:
        f.reject("disable_corrector", "[]", "fastddpm's UniPC corrects every step")
    for key, why in (("solver_p", "fastddpm's UniPC predicts with its own solver"),
                     ("sigma_min", "Karras sigmas span the schedule's sigmas"),
                     ("sigma_max", "Karras sigmas span the schedule's sigmas"),
                     ("shift_terminal", "flow sigmas are not fastddpm's")):
        if f[key] is not None:
            f.reject(key, "None", why)
    if not f["lower_order_final"] and f["final_sigmas_type"] == "zero":
        f.reject("lower_order_final", "True with final_sigmas_type='zero'", "diffusers' second-order last step "
                 "onto sigma 0 divides by an infinite step and returns inf")
    # diffusers' UniPC has no lambda clip; fastddpm's default clips the cosine schedule
    return {"sampler": "unipc", **kw, **_clip(f, False), "lambda_min_clipped": -math.inf}


def _k_sampler(f: _Fields, sampler: str) -> dict:
    """Euler, Euler ancestral, Heun, KDPM2, KDPM2 ancestral, LMS: ``fastddpm.ksamplers`` with the same sigmas
    (LMS of order 4, the default of diffusers' ``step(order=)``)."""
    kw = {"sampler": sampler, "clip_denoised": False}
    chosen = [key for key in _K_SIGMAS if f.config.get(key)]
    for key in chosen:
        if not isinstance(f[key], bool):
            f.reject(key, "True or False")
    if len(chosen) > 1:
        f.reject(chosen[1], f"False with {chosen[0]}=True", "one sigma schedule at a time")
    if chosen:
        kw[{"use_karras_sigmas": "karras_sigmas", "use_exponential_sigmas": "exponential_sigmas",
            "use_beta_sigmas": "beta_sigmas"}[chosen[0]]] = True
    if "interpolation_type" in f.config:
        f.require("interpolation_type", ("linear",), "fastddpm interpolates the schedule's sigmas linearly")
        f.require("timestep_type", ("discrete",), "continuous timesteps are for EDM-trained v models")
        for key in ("sigma_min", "sigma_max"):
            if f[key] is not None:
                f.reject(key, "None", "the sigmas span the schedule's own")
        f.require("final_sigmas_type", ("zero", "sigma_min"))
        kw["final_sigmas_type"] = f["final_sigmas_type"]
    if "clip_sample" in f.config and f["clip_sample"]:
        if f["clip_sample_range"] != 1.0:
            f.reject("clip_sample_range", "1.0", "fastddpm clips x0 to [-1, 1]")
        kw["clip_denoised"] = True
    return kw


# -- pipelines -----------------------------------------------------------------------------------
def is_pipeline(obj) -> bool:
    """Duck typing for a diffusers pipeline: not a module, with ``.unet`` or ``.scheduler``."""
    return not isinstance(obj, torch.nn.Module) and (hasattr(obj, "unet") or hasattr(obj, "scheduler"))
