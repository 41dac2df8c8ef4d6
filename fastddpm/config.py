"""Serialisable, frozen configurations: the JSON mixin every config uses, and
the configuration of a diffusion process."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar, Literal

from .checks import is_int
from .modes import (ALL_SAMPLERS, CHURNED, KSAMPLERS, LOSSES, PREDICTIONS, SOLVER_ORDERS, SOLVERS, SPACINGS, VARIANCES,
                    LossType, Prediction, SamplerChoice, Spacing, Variance)
from .schedule import SCHEDULE_KINDS, ScheduleKind, table_dtype_name

__all__ = ["JsonConfig", "DiffusionConfig", "MAX_TIMESTEPS"]

MAX_TIMESTEPS = 100_000  # T: far above any published process (improved-diffusion: 4000); bounds the tables' memory


class JsonConfig:
    """Mixin for frozen dataclass configs: a checked ``replace`` and a JSON round trip
    (tuples are stored as lists; each config turns them back in ``__post_init__``)."""

    _label: ClassVar[str] = "config"

    def replace(self, **changes):
        """A copy with some fields changed; unknown names raise TypeError."""
        names = [f.name for f in fields(self)]
        unknown = set(changes) - set(names)
        if unknown:
            raise TypeError(f"unknown {self._label} options: {sorted(unknown)}; known: {names}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of ``to_dict``; unknown or missing keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls._label} config must be a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown {cls._label} config keys: {sorted(unknown)}; known: {names}")
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
        if missing:
            raise ValueError(f"{cls._label} config needs {missing}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class DiffusionConfig(JsonConfig):
    """How a DDPM process is defined.  Defaults are the original DDPM (Ho et al.
    2020): 1000 steps, linear betas 1e-4..0.02, epsilon prediction, x0 clipped
    to [-1, 1], sigma^2 = beta_tilde — the defaults of diffusers'
    ``DDPMScheduler`` (with ``variance_type="fixed_small"``) and of
    denoising-diffusion-pytorch's ``GaussianDiffusion(beta_schedule="linear",
    objective="pred_noise")``.

    :param num_timesteps: T, the training process length.
    :param schedule: beta schedule name, or ``custom`` with ``betas`` given.
    :param betas: explicit betas (only with ``schedule="custom"``).
    :param prediction: what the model outputs: ``epsilon``, ``x0`` or ``v``.
    :param variance: reverse variance ``fixed_small`` (beta_tilde) or ``fixed_large`` (beta).
    :param clip_denoised: clamp the predicted x0 to [-1, 1] in the reverse step (True), not at all
        (False), or ``"dynamic"``: Imagen's dynamic thresholding (Saharia et al. 2022; diffusers'
        ``thresholding=True``): per sample ``s = quantile(|x0|, dynamic_thresholding_ratio)`` clamped to
        ``[1, sample_max_value]``, then ``x0 = clamp(x0, -s, s) / s`` (with ``sample_max_value < 1``
        every ``s`` is ``sample_max_value``, as diffusers' ``torch.clamp(s, min=1, max=...)`` gives).
    :param dynamic_thresholding_ratio: the quantile of ``"dynamic"`` (diffusers' default 0.995).
    :param sample_max_value: the largest ``s`` of ``"dynamic"`` (1: the plain clip).
    :param sampler: ``ddpm`` (ancestral), ``ddim``, a multistep solver: ``dpm++2m``,
        ``dpm++3m``, ``dpm++2m-sde`` (DPM-Solver++, Lu et al. 2022) or ``unipc`` (UniPC-bh2,
        Zhao et al. 2023), see ``fastddpm.multistep``; ``dpm-solver`` (singlestep DPM-Solver, orders 1-3,
        ``fastddpm.singlestep``), ``deis`` (DEIS, Zhang & Chen 2023) or ``pndm`` (PLMS, Liu et al. 2022),
        see ``fastddpm.lmsolvers``; or a k-sampler: ``euler``, ``euler-a``, ``heun``, ``dpm2``, ``dpm2-a``,
        ``lms``, ``dpm++2s-a``, ``dpm++sde``, ``dpm++3m-sde`` (k-diffusion's ``sample_*``, diffusers'
        ``*DiscreteScheduler``), see ``fastddpm.ksamplers``.
    :param eta: DDIM's eta (0: deterministic; 1: DDPM's fixed_small variance).  The ancestral k-samplers
        use k-diffusion's eta 1 (``ksamplers.make_kplan(eta=)`` for others); here it must stay 0 for them.
    :param timestep_spacing: how a sampler picks its timesteps from a number of steps: ``linspace``,
        ``leading`` or ``trailing`` (diffusers' ``timestep_spacing``, ``steps_offset=0``).  For DDPM and
        DDIM respacing ``linspace`` is improved-diffusion's (both ends kept; diffusers' for steps >= 2);
        DDIM with ``trailing`` needs steps that divide ``num_timesteps``, as diffusers' DDIM steps
        ``t -> t - T // steps``.
    :param karras_sigmas: multistep solvers and k-samplers step on Karras et al.'s sigmas (rho = 7) instead.
    :param exponential_sigmas: k-samplers step on sigmas even in log sigma (diffusers'
        ``use_exponential_sigmas``).
    :param beta_sigmas: k-samplers step on beta(0.6, 0.6)-spaced sigmas (diffusers' ``use_beta_sigmas``;
        needs scipy).  At most one of the three.
    :param final_sigmas_type: a single-stage k-sampler's or ``dpm-solver``'s last sigma: ``zero`` (lands on
        the data prediction) or ``sigma_min`` (the schedule's smallest; diffusers' ``final_sigmas_type``).
    :param lambda_min_clipped: multistep solvers skip timesteps whose ``lambda = log(alpha/sigma)``
        is below this; None: -5.1 for the cosine schedule (DPM-Solver's fix), none otherwise.
    :param solver_order: the order of a sampler that has one (None: its default): ``lms`` 1-4 (4, diffusers'
        and k-diffusion's), ``deis`` and ``dpm-solver`` 1-3 (2, diffusers').
    :param lower_order_final: the multistep solvers, ``deis`` and ``dpm-solver``: lower the order of the
        last steps (DPM-Solver below 15 steps, UniPC always), as diffusers' flag; False keeps the full order.
    :param algorithm_type: ``dpm-solver``'s, ``dpm++2m``'s and ``dpm++3m``'s form: ``dpmsolver++`` (data
        prediction), ``dpmsolver`` (noise prediction; needs ``final_sigmas_type="sigma_min"``, as diffusers)
        or (``dpm-solver`` only) ``sde-dpmsolver++``, diffusers' ``algorithm_type``; ``solver_type`` the
        second-order form, ``midpoint`` or ``heun`` (DPM-Solver's, multistep and singlestep).
    :param euler_at_final, use_lu_lambdas: the DPM-Solver++ multistep solvers' options of those names
        (diffusers'; ``fastddpm.multistep.make_plan``).
    :param set_alpha_to_one: ``ddim`` and ``pndm``: the last step lands on ``abar = 1`` (True) or on the
        schedule's ``abar_0`` (diffusers' flag; ``PNDMScheduler``'s default False, ``DDIMScheduler``'s True).
    :param ddim_direction: DDIM with ``clip_denoised``: the step's direction from the ``clipped`` x0's
        epsilon (improved-diffusion's and diffusers' ``use_clipped_model_output=True``) or from the ``raw``
        model output (diffusers' ``DDIMScheduler`` default, ``clip_sample=True`` alone).
    :param steps_offset: ``pndm`` with ``leading`` spacing: added to every timestep (Stable Diffusion's
        configs: 1), diffusers' ``steps_offset``.
    :param s_churn: EDM's stochastic sampling (Karras et al. 2022, Algorithm 2) for ``euler``, ``heun`` and
        ``dpm2``, as k-diffusion's ``s_churn``: 0 (none) or the total churn; each step whose sigma is in
        ``[s_tmin, s_tmax]`` (``s_tmax`` None: no upper bound) is first raised to ``sigma (1 + gamma)``,
        ``gamma = min(s_churn / steps, sqrt 2 - 1)``, by a draw (``ksamplers.make_kplan``).
    :param s_noise: the scale of a k-sampler's draws (k-diffusion's ``s_noise``; 1: none).
    :param begin_index: sampling begins part-way: the number of leading steps of the sampling plan to
        skip (diffusers' ``set_begin_index``; 0: the whole plan).  For DDPM/DDIM (respaced or not) the
        process is its first ``K - begin_index`` steps, the same rows and noise slots as the whole chain's
        (``NoiseSchedule.truncate``); for a multistep solver its plan of ``steps`` model calls from step
        ``begin_index`` on, warming up from first order with an empty history as diffusers does after
        ``set_begin_index`` (``multistep.make_plan``).  The start ``x`` (``sample(..., noise=)``) is then the
        sample at the first kept timestep, e.g. ``fastddpm.img2img``'s noised image.  Training ignores it.
    :param loss: ``l2``, ``l1`` or ``huber`` (with ``huber_delta``).
    :param min_snr_gamma: min-SNR-gamma loss weighting, or None for uniform.
    :param table_dtype: ``"float64"`` (the default; ``torch.float64`` is taken too): the schedule's tables are
        the exact math in float64.  ``"float32"`` (``torch.float32``): diffusers' float32 rounding of them, to
        reproduce its numbers (``NoiseSchedule``'s ``table_dtype``; ``DDPM.from_diffusers(...,
        table_dtype=torch.float32)``); for the ``ddpm`` and ``ddim`` samplers only.
    """

    num_timesteps: int = 1000
    schedule: ScheduleKind = "linear"
    betas: tuple[float, ...] | None = None
    prediction: Prediction = "epsilon"
    variance: Variance = "fixed_small"
    clip_denoised: bool | Literal["dynamic"] = True
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    sampler: SamplerChoice = "ddpm"
    eta: float = 0.0
    timestep_spacing: Spacing = "linspace"
    karras_sigmas: bool = False
    exponential_sigmas: bool = False
    beta_sigmas: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float | None = None
    solver_order: int | None = None
    lower_order_final: bool = True
    algorithm_type: Literal["dpmsolver++", "dpmsolver", "sde-dpmsolver++"] = "dpmsolver++"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    set_alpha_to_one: bool = True
    ddim_direction: Literal["clipped", "raw"] = "clipped"
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    steps_offset: int = 0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0
    begin_index: int = 0
    loss: LossType = "l2"
    huber_delta: float = 1.0
    min_snr_gamma: float | None = None
    table_dtype: Literal["float64", "float32"] = "float64"

    _label: ClassVar[str] = "diffusion"

    @property
    def sigma_schedule(self) -> str:
        """A k-sampler's sigmas: ``karras``, ``exponential``, ``beta`` or ``default``."""
        return ("karras" if self.karras_sigmas else "exponential" if self.exponential_sigmas
                else "beta" if self.beta_sigmas else "default")

    def _check_k_options(self):
        def number(name, low=0.0):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < float("inf"):
                raise ValueError(f"{name} must be a finite number >= {low}, got {v!r}")

        for name in ("s_churn", "s_tmin", "s_noise"):
            number(name)
        if self.s_tmax is not None:
            number("s_tmax", self.s_tmin)
        if (self.s_churn or self.s_tmin or self.s_tmax is not None) and self.sampler not in CHURNED:
            raise ValueError(f"s_churn, s_tmin and s_tmax are for the samplers {CHURNED} (k-diffusion's "
                             f"sample_euler/heun/dpm_2), not sampler={self.sampler!r}")
        if self.s_noise != 1.0 and self.sampler not in KSAMPLERS:
            raise ValueError(f"s_noise is for the k-samplers {KSAMPLERS}, not sampler={self.sampler!r}")
        if self.solver_order is not None:
            if self.sampler not in SOLVER_ORDERS:
                raise ValueError(f"solver_order is for the samplers {tuple(SOLVER_ORDERS)}, not sampler="
                                 f"{self.sampler!r} (whose order its name says)")
            orders = SOLVER_ORDERS[self.sampler][0]
            if not is_int(self.solver_order) or self.solver_order not in orders:
                raise ValueError(f"solver_order must be one of {orders} for {self.sampler}, got {self.solver_order!r}")
        dpm = ("dpm++2m", "dpm++3m", "dpm++2m-sde")
        only = {"lower_order_final": (True, ("deis", "dpm-solver") + SOLVERS),
                "algorithm_type": ("dpmsolver++", ("dpm-solver", "dpm++2m", "dpm++3m")),
                "solver_type": ("midpoint", ("dpm-solver",) + dpm), "set_alpha_to_one": (True, ("pndm", "ddim")),
                "steps_offset": (0, ("pndm",)), "ddim_direction": ("clipped", ("ddim",)),
                "euler_at_final": (False, dpm), "use_lu_lambdas": (False, dpm)}
        for name, (default, samplers) in only.items():
            value = getattr(self, name)
            if value != default and self.sampler not in samplers:
                raise ValueError(f"{name}={value!r} is for the samplers {samplers}, not sampler={self.sampler!r}")
        for name in ("lower_order_final", "set_alpha_to_one", "euler_at_final", "use_lu_lambdas"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.algorithm_type not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
            raise ValueError(f"algorithm_type must be one of ('dpmsolver++', 'dpmsolver', 'sde-dpmsolver++'), "
                             f"got {self.algorithm_type!r}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be one of ('midpoint', 'heun'), got {self.solver_type!r}")
        if self.algorithm_type == "sde-dpmsolver++" and self.sampler != "dpm-solver":
            raise ValueError(f"algorithm_type='sde-dpmsolver++' is dpm-solver's; the multistep SDE solver is "
                             f"sampler='dpm++2m-sde', not sampler={self.sampler!r}")
        if self.ddim_direction not in ("clipped", "raw"):
            raise ValueError(f"ddim_direction must be one of ('clipped', 'raw'), got {self.ddim_direction!r}")
        if not is_int(self.steps_offset) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")

    @property
    def thresholding(self) -> tuple[float, float] | None:
        """``(dynamic_thresholding_ratio, sample_max_value)`` for ``clip_denoised="dynamic"``, else None."""
        if self.clip_denoised != "dynamic":
            return None
        return float(self.dynamic_thresholding_ratio), float(self.sample_max_value)

    def __post_init__(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")

        choice("schedule", SCHEDULE_KINDS + ("custom",))
        choice("prediction", PREDICTIONS)
        choice("variance", VARIANCES)
        choice("sampler", ALL_SAMPLERS)
        choice("final_sigmas_type", ("zero", "sigma_min"))
        choice("timestep_spacing", SPACINGS)
        choice("loss", LOSSES)
        object.__setattr__(self, "table_dtype", table_dtype_name(self.table_dtype))
        if self.table_dtype == "float32" and self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"table_dtype='float32' (diffusers' float32 tables) is for the samplers ('ddpm', "
                             f"'ddim'), not sampler={self.sampler!r}, whose plan is float64 math")
        if self.betas is not None:
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
            if self.schedule != "custom":
                raise ValueError("betas can only be given with schedule='custom'")
            object.__setattr__(self, "num_timesteps", len(self.betas))
        elif self.schedule == "custom":
            raise ValueError("schedule='custom' needs betas")
        T = self.num_timesteps
        if not is_int(T) or not 1 <= T <= MAX_TIMESTEPS:
            raise ValueError(f"num_timesteps must be a positive int <= {MAX_TIMESTEPS}, got {T!r}")
        if not isinstance(self.clip_denoised, bool) and self.clip_denoised != "dynamic":
            raise TypeError(f"clip_denoised must be True, False or 'dynamic', got {self.clip_denoised!r}")
        ratio, most = self.dynamic_thresholding_ratio, self.sample_max_value
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be a quantile in (0, 1], got {ratio!r}")
        if isinstance(most, bool) or not isinstance(most, (int, float)) or not 0.0 < most < float("inf"):
            raise ValueError(f"sample_max_value must be a finite number > 0, got {most!r}")
        for name in ("karras_sigmas", "exponential_sigmas", "beta_sigmas"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.karras_sigmas + self.exponential_sigmas + self.beta_sigmas > 1:
            raise ValueError("at most one of karras_sigmas, exponential_sigmas and beta_sigmas can be True")
        if self.sampler not in KSAMPLERS:
            for name in ("exponential_sigmas", "beta_sigmas"):
                if getattr(self, name):
                    raise ValueError(f"{name}=True is for the k-samplers {KSAMPLERS}, not sampler={self.sampler!r}")
            if self.final_sigmas_type != "zero" and self.sampler not in ("dpm-solver",) + SOLVERS:
                raise ValueError(f"final_sigmas_type={self.final_sigmas_type!r} is for the k-samplers {KSAMPLERS}, "
                                 f"the multistep solvers {SOLVERS} and dpm-solver, not sampler={self.sampler!r}")
        self._check_k_options()
        if self.lambda_min_clipped is not None and (isinstance(self.lambda_min_clipped, bool) or not isinstance(
                self.lambda_min_clipped, (int, float)) or self.lambda_min_clipped != self.lambda_min_clipped):
            raise ValueError(f"lambda_min_clipped must be a float or None, got {self.lambda_min_clipped!r}")
        if not is_int(self.begin_index) or not 0 <= self.begin_index < MAX_TIMESTEPS:
            raise ValueError(f"begin_index must be an int >= 0 (the leading sampling steps to skip), "
                             f"got {self.begin_index!r}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta < float("inf")):
            raise ValueError(f"eta must be a float >= 0, got {self.eta!r}")
        if self.eta and self.sampler in KSAMPLERS:
            raise ValueError(f"eta is DDIM's; sampler={self.sampler!r} uses k-diffusion's eta=1 "
                             f"(fastddpm.ksamplers.make_kplan(..., eta=) for another), got eta={self.eta!r}")
        if not (isinstance(self.huber_delta, (int, float)) and self.huber_delta > 0):
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta!r}")
        if self.min_snr_gamma is not None and not (isinstance(self.min_snr_gamma, (int, float)) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma!r}")
