"""The names of every mode, declared once: a ``Literal`` type each (what config fields and
signatures are annotated with) and the tuple of its values derived from it.

The order of ``PREDICTIONS`` and ``LOSSES`` is also their integer code in the kernels
(``csrc/fused_math.h``: ``enum Prediction``, ``enum LossType``; ``kernels/diffusion_loss.py``);
``tests/test_modes.py`` holds the C++ spellings and codes to these.
"""
from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Prediction", "Variance", "LossType", "Sampler", "Solver", "SamplerChoice", "Spacing", "TorchCompileMode",
           "TrainCompileMode", "PREDICTIONS", "VARIANCES", "LOSSES", "SAMPLERS", "SOLVERS", "SPACINGS",
           "KSampler", "KSAMPLERS", "TableSampler", "TABLE_SAMPLERS", "MULTISTEP_SAMPLERS", "ALL_SAMPLERS",
           "SOLVER_ORDERS", "SigmaSchedule", "SIGMA_SCHEDULES", "CHURNED", "LMS_ORDER",
           "TORCH_COMPILE_MODES", "TRAIN_COMPILE_MODES"]

Prediction = Literal["epsilon", "x0", "v"]  # what the model outputs
Variance = Literal["fixed_small", "fixed_large"]  # the reverse step's sigma^2: beta_tilde or beta
LossType = Literal["l2", "l1", "huber"]
Sampler = Literal["ddpm", "ddim"]  # one-step samplers: a [K, 6] coefficient table (ops.ddpm_step)
Solver = Literal["dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"]  # multistep solvers (ops.multistep_step)
# samplers on the multistep table whose rows their own modules build (fastddpm.singlestep, fastddpm.lmsolvers)
TableSampler = Literal["dpm-solver", "deis", "pndm"]
# sigma-space samplers (k-diffusion's sample_*, diffusers' *DiscreteScheduler): rows of the multistep table
KSampler = Literal["euler", "euler-a", "heun", "dpm2", "dpm2-a", "lms", "dpm++2s-a", "dpm++sde", "dpm++3m-sde"]
SamplerChoice = Literal[Sampler, Solver, TableSampler, KSampler]  # DiffusionConfig.sampler: any kind
SigmaSchedule = Literal["default", "karras", "exponential", "beta"]  # a k-sampler's sigmas (diffusers' use_*_sigmas)
Spacing = Literal["linspace", "leading", "trailing"]  # a multistep solver's timesteps (diffusers' timestep_spacing)
# torch.compile's modes.  The sampler engine takes compile=True/False/None or one of these; a
# training config spells "off" as "no" (a CLI choice and a JSON value), so its set has one more.
TorchCompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
TrainCompileMode = Literal["no", TorchCompileMode]

PREDICTIONS: tuple[str, ...] = get_args(Prediction)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSSES: tuple[str, ...] = get_args(LossType)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SOLVERS: tuple[str, ...] = get_args(Solver)
SPACINGS: tuple[str, ...] = get_args(Spacing)
TABLE_SAMPLERS: tuple[str, ...] = get_args(TableSampler)
KSAMPLERS: tuple[str, ...] = get_args(KSampler)
MULTISTEP_SAMPLERS: tuple[str, ...] = SOLVERS + TABLE_SAMPLERS + KSAMPLERS  # every sampler on the multistep table
ALL_SAMPLERS: tuple[str, ...] = SAMPLERS + MULTISTEP_SAMPLERS
SIGMA_SCHEDULES: tuple[str, ...] = get_args(SigmaSchedule)
CHURNED: tuple[str, ...] = ("euler", "heun", "dpm2")  # EDM's s_churn (k-diffusion's sample_euler/heun/dpm_2)
LMS_ORDER = 4  # LMS's default and largest order: the multistep ring holds three earlier derivatives
# the samplers with a solver_order: (the orders they take, the default)
SOLVER_ORDERS: dict[str, tuple[tuple[int, ...], int]] = {"lms": ((1, 2, 3, 4), LMS_ORDER), "deis": ((1, 2, 3), 2),
                                                         "dpm-solver": ((1, 2, 3), 2)}
TORCH_COMPILE_MODES: tuple[str, ...] = get_args(TorchCompileMode)
TRAIN_COMPILE_MODES: tuple[str, ...] = get_args(TrainCompileMode)
