"""Few-step multistep solvers: DPM-Solver++ 2M/3M/2M-SDE and UniPC-bh2, as one table.

The probability-flow ODE of a VP diffusion, written in ``lambda = log(alpha/sigma)``
(half the log-SNR) with the data prediction ``D`` (the model's x0 estimate), has the
exact solution (Lu et al. 2022, "DPM-Solver++", §3)::

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D dlambda

Each solver approximates ``D`` over the step by a polynomial through the last one to
three model outputs, so every step is a linear combination of ``x``, the current
``D`` and the previous one or two, with coefficients that depend only on the
schedule.  They are all computed here once, in float64, into a per-step table
whose row ``i`` holds fourteen numbers (``TABLE_COLUMNS``)::

    D      = a * x + b * model_output              # x0 from the prediction type
    D      = clamp(D, -1, 1)                        # if clip_denoised
    E      = D + hx * x                             # what the history keeps (hx = 0: D)
    x_corr = u * x + cl * x_last + k0 * D + k1 * H1 + k2 * H2   # UniPC's corrector (else x_corr = x)
    x_next = cx * x_corr + p0 * D + p1 * H1 + p2 * H2 + p3 * H3 + cz * z  # predictor (+ SDE noise)

where ``H1``, ``H2``, ``H3`` are the stored ``E`` of the previous three steps and
``x_last`` the (corrected) ``x`` of the previous step, all kept in a small
history buffer on the device that ``multistep_update`` advances: ``[4, *x.shape]``,
a ring of three (step ``i`` reads ``H1, H2, H3`` at slots ``(i + 1) % 3, (i + 2) % 3,
i % 3``, then writes ``E`` at ``i % 3``) and ``x_last`` at slot 3.  DPM-Solver++ and
UniPC set ``p3 = hx = 0`` (``E = D``, two steps of history); the two columns leave
room for linear-multistep methods of order up to four.  The step index
is the only per-step input; the update branches on nothing but static flags.

Conventions are those of the DDPM sampler (``reference.step_coefficients``): row
``i`` is the reverse-process step index, ``K-1`` first and ``0`` last; the model
timestep of row ``i`` is ``timesteps[i]``; SDE noise of row ``i`` is noise slot ``i``.

Everything equals diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``, ``dpmsolver``,
``sde-dpmsolver++``; ``midpoint`` or ``heun``; ``lower_order_final``, ``euler_at_final``,
``final_sigmas_type``, ``use_lu_lambdas``) and ``UniPCMultistepScheduler`` (bh2, order 2;
``lower_order_final``, ``final_sigmas_type``) step for step.  The defaults are diffusers': the last
step is first order and lands on ``D`` (``final_sigmas_type="zero"``).  Where diffusers' own step is
not finite we refuse (UniPC's second-order step onto sigma 0) or take the limit: ``sigma_min`` after
Karras or Lu sigmas, which end at the schedule's smallest already, makes the last step of length 0
(UniPC's, exactly: its row is ``x_next = x_corr``) or ~1 ulp (DPM-Solver's: ``x_next`` ~ ``x``), where
diffusers' float32 heun and third-order forms divide 0 by 0 and its float64 SDE takes the square root
of ``1 - e^{-2h} < 0`` (NaN both).

``algorithm="dpmsolver"`` (DPM-Solver's noise-prediction form) keeps ``D`` the x0 prediction (so
clipping and thresholding act on it, as diffusers' thresholding does before it rebuilds ``eps``) and
stores ``E = D - x / alpha = -(sigma / alpha) eps`` in the ring (``hx = -1 / alpha``): a past step's
``eps`` is ``-H / s`` (``s = sigma / alpha`` of that step), the current one ``x / sigma - D / s``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .checks import is_int
from .modes import PREDICTIONS, SOLVERS, SPACINGS
from .schedule import NoiseSchedule
from .thresholding import step_threshold

__all__ = [
    "SOLVERS",
    "SPACINGS",
    "ALGORITHMS",
    "SOLVER_TYPES",
    "FINAL_SIGMAS_TYPES",
    "TABLE_COLUMNS",
    "COSINE_LAMBDA_MIN",
    "MultistepPlan",
    "make_plan",
    "check_options",
    "solver_timesteps",
    "solver_orders",
    "multistep_table",
    "new_history",
    "multistep_update",
    "MultistepSampler",
]

TABLE_COLUMNS = ops.reference.MULTISTEP_COLUMNS  # the order the reference step reads a row in
# The order of each solver, which is also the fewest steps it accepts.
SOLVER_ORDER = {"dpm++2m": 2, "dpm++3m": 3, "dpm++2m-sde": 2, "unipc": 2}
ALGORITHMS = ("dpmsolver++", "dpmsolver")  # diffusers' algorithm_type of dpm++2m/dpm++3m (data or noise prediction)
SOLVER_TYPES = ("midpoint", "heun")  # diffusers' solver_type: the form of DPM-Solver's second-order steps
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")  # diffusers' final_sigmas_type: the last step onto 0 or sigma(t=0)
# The cosine schedule's alpha_T is ~1e-4 (beta capped at 0.999), so lambda_T ~ -9 and the first
# step's 1/alpha amplifies rounding by ~1e4.  DPM-Solver's authors stop the ODE early for it
# (T = 0.9946 for the continuous cosine); diffusers expresses that as lambda_min_clipped, and its
# cosine pipelines (DeepFloyd IF, unCLIP) use -5.1.  We apply it by default for the cosine schedule.
COSINE_LAMBDA_MIN = -5.1
DEFAULT_STEPS = 20  # model calls when none are given (DPM-Solver: ~DDPM-1000 quality at 10-25)
HISTORY_SLOTS = ops.reference.MULTISTEP_HISTORY_SLOTS  # 4: three stored predictions (a ring, step % 3) and x_last


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_options(solver: str, *, lower_order_final: bool = True, final_sigmas_type: str = "zero",
                  euler_at_final: bool = False, use_lu_lambdas: bool = False, algorithm: str = "dpmsolver++",
                  solver_type: str = "midpoint", karras_sigmas: bool = False) -> None:
    """Refuse (``ValueError`` naming the argument and what it takes) the final-step, spacing and form
    options of ``make_plan`` that ``solver`` does not have, or that diffusers cannot step:

    * ``euler_at_final``, ``use_lu_lambdas`` and ``solver_type="heun"`` are DPM-Solver's (diffusers'
      UniPC has neither of the first two; its ``solver_type`` is bh2 here);
    * ``algorithm="dpmsolver"`` is for ``dpm++2m``/``dpm++3m`` and needs ``final_sigmas_type="sigma_min"``
      (diffusers refuses ``"zero"``: ``alpha_t / alpha_s x - sigma_t (e^h - 1) eps`` at ``sigma_t = 0``);
    * UniPC with ``lower_order_final=False`` needs ``final_sigmas_type="sigma_min"``: diffusers takes its last
      step onto sigma 0 at second order, whose ``(m1 - m0) / r`` with ``r = (lambda_1 - lambda_0) / inf``
      is infinite (it returns inf/nan);
    * ``use_lu_lambdas`` and ``karras_sigmas`` both choose the sigmas (diffusers silently takes Karras').
    """
    _check_choice("sampler", solver, SOLVERS)
    for name, value in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final),
                        ("use_lu_lambdas", use_lu_lambdas)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("solver_type", solver_type, SOLVER_TYPES)
    if algorithm == "dpmsolver" and solver not in ("dpm++2m", "dpm++3m"):
        raise ValueError(f"algorithm='dpmsolver' (noise prediction) is for dpm++2m and dpm++3m; expected "
                         f"algorithm='dpmsolver++' for {solver}")
    if algorithm == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError("algorithm='dpmsolver' (noise prediction) cannot step to sigma 0: expected "
                         "final_sigmas_type='sigma_min' (as diffusers) or algorithm='dpmsolver++'")
    if solver == "unipc":
        for name, value, default in (("euler_at_final", euler_at_final, False),
                                     ("use_lu_lambdas", use_lu_lambdas, False), ("solver_type", solver_type, "midpoint")):
            if value != default:
                raise ValueError(f"{name}={value!r} is DPM-Solver's (dpm++2m, dpm++3m, dpm++2m-sde): unipc is "
                                 f"diffusers' UniPC-bh2, which has none; expected {name}={default!r} for unipc")
        if not lower_order_final and final_sigmas_type == "zero":
            raise ValueError("lower_order_final=False with final_sigmas_type='zero' is not finite for unipc (diffusers' "
                             "second-order last step onto sigma 0 returns inf/nan): expected lower_order_final=True "
                             "or final_sigmas_type='sigma_min'")
    if use_lu_lambdas and karras_sigmas:
        raise ValueError("use_lu_lambdas and karras_sigmas both choose the sigmas: expected at most one of them True")


# -- the steps -------------------------------------------------------------------------------
def default_lambda_min(schedule: NoiseSchedule) -> float:
    return COSINE_LAMBDA_MIN if schedule.kind == "cosine" else -math.inf


def solver_timesteps(schedule: NoiseSchedule, steps: int, solver: str = "dpm++2m", spacing: str = "linspace",
                     karras_sigmas: bool = False, lambda_min_clipped: float | None = None, *,
                     use_lu_lambdas: bool = False, final_sigmas_type: str = "zero"):
    """The model timesteps and sigmas of ``steps`` solver steps, in the order they run.

    As diffusers' ``set_timesteps`` (``linspace``/``leading``/``trailing``, ``steps_offset=0``):
    timesteps where ``lambda`` is below ``lambda_min_clipped`` are dropped, and Karras sigmas
    (Karras et al. 2022, rho = 7) or, with ``use_lu_lambdas``, sigmas uniform in lambda (Lu et al.
    2022; diffusers' ``_convert_to_lu``: log sigma linear from the largest to the smallest) replace the
    spacing when asked, their timesteps from ``sigma_to_t``.  diffusers has the
    clip for DPM-Solver++'s spacings only; we apply it to every solver and to the Karras and Lu
    sigma_max too (so ``lambda_min_clipped=-inf`` gives diffusers' UniPC, Karras and Lu sigmas).

    :param final_sigmas_type: the sigma after the last step: ``zero`` or ``sigma_min``, the schedule's
        sigma at t = 0 (UniPC's on Karras sigmas: the last Karras sigma, as diffusers, which is the same
        up to rounding, so that last step has length ~0).
    :return: ``(timesteps int64 [K], sigmas float64 [K + 1])`` with ``sigma = sqrt((1 - abar) / abar)``
        and the final sigma.
    """
    _check_choice("sampler", solver, SOLVERS)
    _check_choice("timestep_spacing", spacing, SPACINGS)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if use_lu_lambdas and karras_sigmas:
        raise ValueError("use_lu_lambdas and karras_sigmas both choose the sigmas: expected at most one of them True")
    T = schedule.num_timesteps
    if schedule.is_respaced:
        raise ValueError("multistep solvers choose their own timesteps: give the full (not respaced) schedule")
    if not is_int(steps) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    if steps < SOLVER_ORDER[solver]:
        raise ValueError(f"{solver} is a {SOLVER_ORDER[solver]}-step method: it needs at least "
                         f"{SOLVER_ORDER[solver]} steps of history, got steps={steps}")
    K = steps
    ac = schedule.alphas_cumprod64
    all_sigmas = np.sqrt((1.0 - ac) / ac)
    if lambda_min_clipped is None:
        lambda_min_clipped = default_lambda_min(schedule)
    lam = -np.log(all_sigmas)
    last = T - int(np.searchsorted(lam[::-1], lambda_min_clipped))  # torch.searchsorted, side="left"
    if last < K + 1:
        raise ValueError(f"lambda_min_clipped={lambda_min_clipped} leaves {last} timesteps, too few for {K} steps")
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, K + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (K + 1)
        ts = (np.arange(0, K + 1) * ratio).round()[::-1][:-1].astype(np.int64)
    else:  # trailing
        ts = np.arange(last, 0, -T / K).round().astype(np.int64) - 1
    if karras_sigmas or use_lu_lambdas:
        ramp = np.linspace(0, 1, K)
        log_sigmas = np.log(all_sigmas)
        if karras_sigmas:
            rho = 7.0
            hi, lo = all_sigmas[last - 1] ** (1 / rho), all_sigmas[0] ** (1 / rho)  # the clip bounds sigma_max too
            sigmas = (hi + ramp * (lo - hi)) ** rho
        else:  # diffusers' _convert_to_lu: its "lambdas" are log sigmas, rho = 1
            hi, lo = log_sigmas[last - 1], log_sigmas[0]
            sigmas = np.exp(hi + ramp * (lo - hi))
        t_cont = sigma_to_t(sigmas, log_sigmas)
        # diffusers rounds, except DPM-Solver on the cosine schedule, where it truncates
        ts = (t_cont if solver != "unipc" and schedule.kind == "cosine" else t_cont.round()).astype(np.int64)
    else:
        sigmas = all_sigmas[ts]
    if final_sigmas_type == "zero":
        final = 0.0
    else:
        final = sigmas[-1] if solver == "unipc" and karras_sigmas else all_sigmas[0]
    return ts, np.append(sigmas, final)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def solver_orders(solver: str, K: int, begin_index: int = 0, *, lower_order_final: bool = True,
                  final_sigmas_type: str = "zero", euler_at_final: bool = False) -> np.ndarray:
    """The order of each step of a K-step plan run from step ``begin_index`` on, in running order:
    warm-up from first order at the first step run (the history starts empty there), and the final
    steps counted against the whole plan's K -- exactly what diffusers' ``step`` does after
    ``set_begin_index(begin_index)``: ``lower_order_nums`` counts the steps taken, ``step_index``
    starts at ``begin_index`` and ``len(timesteps)`` is K.

    * DPM-Solver: the last step is first order when ``euler_at_final``, or ``lower_order_final`` and
      K < 15, or ``final_sigmas_type="zero"`` (whatever ``lower_order_final`` says); the step before it is
      at most second order when ``lower_order_final`` and K < 15.
    * UniPC: ``lower_order_final`` lowers the order to the steps left (``min(2, K - j)``: the last step
      first order, for any K); without it every step after the warm-up is second order.
    """
    j = np.arange(begin_index, K)
    warm = j - begin_index + 1  # diffusers' lower_order_nums + 1
    if solver == "unipc":
        return np.minimum(np.minimum(2, K - j) if lower_order_final else 2, warm)
    full = SOLVER_ORDER[solver]
    low = lower_order_final and K < 15
    order = np.where((j == K - 2) & low, min(2, full), full)
    final_first = euler_at_final or low or final_sigmas_type == "zero"
    return np.minimum(np.where((j == K - 1) & final_first, 1, order), warm)


# -- the table -------------------------------------------------------------------------------
def multistep_table(sigmas: np.ndarray, solver: str, prediction: str = "epsilon",
                    orders: np.ndarray | None = None, *, algorithm: str = "dpmsolver++",
                    solver_type: str = "midpoint") -> np.ndarray:
    """The float64 ``[K, 14]`` table (``TABLE_COLUMNS``), row ``i`` for reverse-process step ``i``.

    :param sigmas: float64 ``[K + 1]`` from ``solver_timesteps`` (running order, last 0 or sigma_min),
        or its tail from a begin index on.
    :param solver: one of ``SOLVERS``.
    :param prediction: ``epsilon``, ``x0`` or ``v``.
    :param orders: the order of each of the K steps, running order (default ``solver_orders(solver, K)``;
        a plan begun part-way gives ``solver_orders(solver, K_whole, begin_index)``).  The first step's
        row has no history and no corrector whatever its order says, and a step of length 0 (equal
        sigmas) is first order: the identity.
    :param algorithm: ``dpmsolver++`` or ``dpmsolver`` (dpm++2m/dpm++3m onto sigma_min: ``_noise_columns``).
    :param solver_type: ``midpoint`` or ``heun``: the form of DPM-Solver's second-order steps.
    """
    _check_choice("sampler", solver, SOLVERS)
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("solver_type", solver_type, SOLVER_TYPES)
    if algorithm == "dpmsolver" and (solver not in ("dpm++2m", "dpm++3m") or sigmas[-1] == 0):
        raise ValueError(f"algorithm='dpmsolver' is for dpm++2m and dpm++3m onto a last sigma above 0, "
                         f"got {solver} onto {sigmas[-1]}")
    K = sigmas.size - 1
    s = np.asarray(sigmas, dtype=np.float64)
    alpha = 1.0 / np.sqrt(1.0 + s**2)  # VP: alpha^2 + sigma^2 = 1, s = sigma / alpha
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = -np.log(s)  # lambda_K = +inf: only first-order steps reach it
    tab = np.zeros((K, len(TABLE_COLUMNS)), dtype=np.float64)
    col = {name: tab[:, c] for c, name in enumerate(TABLE_COLUMNS)}

    # D = a x + b out
    if prediction == "epsilon":
        col["a"][:], col["b"][:] = 1.0 / alpha[:K], -s[:K]
    elif prediction == "x0":
        col["a"][:], col["b"][:] = 0.0, 1.0
    elif prediction == "v":
        col["a"][:], col["b"][:] = alpha[:K], -sigma[:K]
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    orders = solver_orders(solver, K) if orders is None else np.asarray(orders)
    if orders.shape != (K,) or orders[0] != 1:
        raise ValueError(f"orders must be [K] = [{K}] with a first-order first step, got {orders!r}")
    j = np.arange(K)
    t = j + 1
    final = s[t] == 0.0
    # e^{-h} = sigma-ratio of the step and h_phi_1 = e^{-h} - 1, exact 0 and -1 on the final step
    h = np.where(final, np.inf, lam[np.minimum(t, K)] - lam[j])
    orders = np.where(h == 0.0, 1, orders)  # a step of length 0 (sigma_min after Karras sigmas): the identity
    with np.errstate(invalid="ignore"):
        em1 = np.where(final, -1.0, np.expm1(-h))  # e^{-h} - 1
    e = em1 + 1.0
    ratio = sigma[t] / sigma[j]
    # r0 = h_{j-1} / h_j, r1 = h_{j-2} / h_j (only read where the order needs them)
    lam_m1 = lam[np.maximum(j - 1, 0)]
    lam_m2 = lam[np.maximum(j - 2, 0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        r0 = (lam[j] - lam_m1) / h
        r1 = (lam_m1 - lam_m2) / h

    col["u"][:] = 1.0
    if solver == "unipc":
        _unipc_columns(col, orders, alpha, ratio, em1, h, r0, lam)
        return tab[::-1].copy()
    at = alpha[t]
    with np.errstate(divide="ignore", invalid="ignore"):  # h = inf on the final step: first order there
        if solver == "dpm++2m-sde":
            # SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' sde-dpmsolver++): x_t = cx x + c0 D0 + g D1 (+ cz z)
            col["cx"][:] = ratio * e
            c0 = at * (1.0 - e**2)
            col["cz"][:] = sigma[t] * np.sqrt(np.maximum(1.0 - e**2, 0.0))
            g1 = at * (-np.expm1(-2.0 * h) / (-2.0 * h) + 1.0)  # heun's D1 weight
            g2 = np.full(K, np.nan)  # no third order
        elif algorithm == "dpmsolver++":
            # DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and the third-order multistep form
            # diffusers uses for solver_order=3: x_t = cx x + c0 D0 + g1 D1 + g2 D2
            col["cx"][:] = ratio
            c0 = -at * em1  # alpha_t (1 - e^{-h})
            g1 = at * (em1 / h + 1.0)
            g2 = -at * ((em1 + h) / h**2 - 0.5)
        else:  # dpmsolver: the same in eps, x_t = alpha_t / alpha_s x + c0 eps0 + g1 eps'_1 + g2 eps'_2
            ep1 = np.expm1(h)
            c0 = -sigma[t] * ep1
            g1 = -sigma[t] * (ep1 / h - 1.0)
            g2 = -sigma[t] * ((ep1 - h) / h**2 - 0.5)
        w0, w1, w2 = _dpm_weights(orders, r0, r1, c0, g1 if solver_type == "heun" else 0.5 * c0, g1, g2)
    if algorithm == "dpmsolver++":
        col["p0"][:], col["p1"][:], col["p2"][:] = c0 + w0, w1, w2
    else:
        _noise_columns(col, s, alpha, sigma, ratio, em1, w0, w1, w2)
    return tab[::-1].copy()


def _dpm_weights(orders, r0, r1, c0, g, g1, g2):
    """The weights of the last three model values ``m0, m1, m2`` in DPM-Solver's multistep update
    beyond the first-order ``c0 m0`` (diffusers' ``D0, D1, D2``; zero where the order is 1):

    * order 2: ``g D1`` with ``D1 = (m0 - m1) / r0`` (``g = c0 / 2``: midpoint, ``g1``: heun);
    * order 3: ``g1 D1 + g2 D2`` with ``D1 = (1 + r0/(r0+r1)) D1_0 - r0/(r0+r1) D1_1``,
      ``D2 = (D1_0 - D1_1)/(r0+r1)``, ``D1_0 = (m0 - m1) / r0``, ``D1_1 = (m1 - m2) / r1``.

    :return: ``(w0, w1, w2)`` float64 ``[K]`` each.
    """
    w0, w1, w2 = (np.zeros(orders.shape) for _ in range(3))
    o2, o3 = orders == 2, orders == 3
    w0[o2] = g[o2] / r0[o2]
    w1[o2] = -w0[o2]
    if o3.any():
        rr0, rr1 = r0[o3], r1[o3]
        A = g1[o3] * (1.0 + rr0 / (rr0 + rr1)) + g2[o3] / (rr0 + rr1)
        B = -g1[o3] * rr0 / (rr0 + rr1) - g2[o3] / (rr0 + rr1)
        w0[o3] = A / rr0
        w1[o3] = -A / rr0 + B / rr1
        w2[o3] = -B / rr1
    return w0, w1, w2


def _noise_columns(col, s, alpha, sigma, ratio, em1, w0, w1, w2):
    """The columns of DPM-Solver's noise-prediction form (diffusers' ``algorithm_type="dpmsolver"``).

    The ring keeps ``E = D - x / alpha = -s eps`` (``hx = -1 / alpha``, ``s = sigma / alpha``), so the
    previous steps' ``eps`` are ``-H1 / s_{j-1}``, ``-H2 / s_{j-2}`` and the current one is
    ``x / sigma_j - D / s_j`` (the true x0 prediction ``D``, clipped or thresholded as diffusers' is before
    it rebuilds ``eps``).  The first-order part ``alpha_t / alpha_s x - sigma_t (e^h - 1) eps`` is the DDIM
    step, written as DPM-Solver++'s ``sigma_t / sigma_s x + alpha_t (1 - e^{-h}) D`` (no cancellation);
    the higher-order weights ``w`` of ``eps`` go onto ``x``, ``D``, ``H1`` and ``H2``.
    """
    K = w0.size
    j = np.arange(K)
    col["hx"][:] = -1.0 / alpha[:K]
    col["cx"][:] = ratio + w0 / sigma[:K]
    col["p0"][:] = -alpha[1:] * em1 - w0 / s[:K]
    col["p1"][1:] = -w1[1:] / s[j[1:] - 1]
    col["p2"][2:] = -w2[2:] / s[j[2:] - 2]


def _unipc_columns(col, orders, alpha, ratio, em1, h, r0, lam):
    """UniPC-bh2 (Zhao et al. 2023; B(h) = e^{-h} - 1) with data prediction, order 2.

    Predictor of order 2 (rho = 1/2) equals DPM-Solver++(2M).  The corrector of step ``j``
    re-solves step ``j-1 -> j`` from ``x_last`` with ``D_j`` included, at the order the
    predictor of step ``j-1`` used; step 0 has none (``u = 1``, identity).
    """
    K = orders.size
    # predictor: x_next = ratio x_c - alpha_t em1 D - alpha_t em1 * 0.5 * (H1 - D) / rk,  rk = -r0
    col["cx"][:] = ratio
    at = alpha[1:]
    col["p0"][:] = -at * em1
    o2 = orders == 2
    rk = -r0
    col["p0"][o2] += at[o2] * em1[o2] * 0.5 / rk[o2]
    col["p1"][o2] = -at[o2] * em1[o2] * 0.5 / rk[o2]
    # corrector of step j (j >= 1): step j-1 -> j again, so its h, ratio, em1 are step j-1's
    for j in range(1, K):
        q = orders[j - 1]
        hj, bh = h[j - 1], em1[j - 1]  # B(h) = h_phi_1 = expm1(-h) for bh2
        a_t = alpha[j]
        hh = -hj
        phi_k = bh / hh - 1.0
        b1 = phi_k / bh
        phi_k = phi_k / hh - 0.5
        b2 = phi_k * 2.0 / bh
        if q == 1:
            rho0, rho1, rkc = 0.0, 0.5, 1.0
        else:
            rkc = (lam[j - 2] - lam[j - 1]) / hj
            rho0, rho1 = np.linalg.solve(np.array([[1.0, 1.0], [rkc, 1.0]]), np.array([b1, b2]))
        col["u"][j] = 0.0
        col["cl"][j] = ratio[j - 1]
        col["k0"][j] = -a_t * bh * rho1
        col["k1"][j] = -a_t * bh + a_t * bh * rho0 / rkc + a_t * bh * rho1
        col["k2"][j] = -a_t * bh * rho0 / rkc


# -- a plan: the timesteps and the table of one sampler setting --------------------------------
@dataclass(frozen=True, eq=False)
class MultistepPlan:
    """Everything a multistep sampler needs, computed once on the host.

    :param solver: one of ``SOLVERS``.
    :param timesteps: int64 ``[K]``: model timestep of reverse-process step ``i`` (row ``i``).
    :param table: float64 ``[K, 14]`` coefficient table.
    :param clip_denoised: clamp ``D`` to [-1, 1] (diffusers: ``thresholding=True, sample_max_value=1``).
    :param thresholding: ``(ratio, sample_max_value)`` of dynamic thresholding on ``D`` (diffusers:
        ``thresholding=True`` with ``sample_max_value > 1``), or None.
    :param sigmas: float64 ``[K]``: ``sigma = sqrt((1 - abar) / abar)`` of the ``x`` row ``i`` steps from
        (diffusers' ``scheduler.sigmas``, row order); ``sigmas[-1]`` is the start's, where
        ``add_noise`` noises an image (``x = alpha x0 + sigma_t z``, ``alpha = 1 / sqrt(1 + sigma^2)``).
    :param begin_index: the leading steps of the whole plan that this one skips (0: none).
    :param steps_given: the ``steps`` the plan was made from where its model calls differ (0: the calls).
    """

    solver: str
    timesteps: np.ndarray
    table: np.ndarray
    clip_denoised: bool = False
    thresholding: tuple[float, float] | None = None
    sigmas: np.ndarray | None = None
    begin_index: int = 0
    steps_given: int = 0

    start_scale = 1.0  # the start x is x_T times this (a k-sampler's init_noise_sigma: ksamplers.KPlan)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.size)

    def callback_timestep(self, i: int):
        """The model timestep of row ``i`` as a callback gets it: an int (a k-sampler's may be a float)."""
        return int(self.timesteps[i])

    @property
    def whole_steps(self) -> int:
        """The ``steps`` the whole plan was made from, that rebuild it (``make_plan``'s; ``steps_given``
        where a sampler's calls are not its steps, e.g. PNDM's ``steps + 1``)."""
        return self.steps_given or self.num_steps + self.begin_index

    @property
    def stochastic(self) -> bool:
        return self.solver.endswith("-sde")

    def tensors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table [K, 14] in dtype, timesteps int64 [K])`` on ``device``."""
        table = torch.as_tensor(self.table, dtype=torch.float64).to(dtype).to(device)
        return table, torch.as_tensor(self.timesteps, dtype=torch.int64, device=device)


def make_plan(schedule: NoiseSchedule, solver: str, steps: int, prediction: str = "epsilon",
              spacing: str = "linspace", karras_sigmas: bool = False, lambda_min_clipped: float | None = None,
              clip_denoised: bool = False, thresholding: tuple[float, float] | None = None, *,
              begin_index: int = 0, lower_order_final: bool = True, final_sigmas_type: str = "zero",
              euler_at_final: bool = False, use_lu_lambdas: bool = False, algorithm: str = "dpmsolver++",
              solver_type: str = "midpoint") -> MultistepPlan:
    """The plan of ``solver`` over ``steps`` model calls of a model trained on ``schedule``
    (``thresholding``: ``(ratio, sample_max_value)`` of dynamic thresholding, or None).

    :param begin_index: begin part-way, as diffusers' ``set_begin_index``: the whole plan's timesteps
        and sigmas from step ``begin_index`` on (``steps - begin_index`` model calls), warming up from
        first order with an empty history there, ``lower_order_final`` counted against ``steps``
        (``solver_orders``).  Its row ``i`` is still the whole plan's step ``i`` from the end, so the
        SDE noise slot of each step is the whole plan's.

    The rest are diffusers' options of the same names (``check_options`` refuses those a solver lacks):

    :param lower_order_final: lower the order of the final steps (``solver_orders``): DPM-Solver below
        15 steps only, UniPC always.  False keeps the full order to the end, except that DPM-Solver's
        last step onto sigma 0 is first order whatever it says (as diffusers').
    :param final_sigmas_type: ``zero``: the last step lands on ``D``; ``sigma_min``: it ends at the
        schedule's sigma at t = 0 (``solver_timesteps``), so the last row is an ordinary step.
    :param euler_at_final: DPM-Solver: the last step first order (matters with ``sigma_min``).
    :param use_lu_lambdas: DPM-Solver: timesteps uniform in lambda (``solver_timesteps``).
    :param algorithm: dpm++2m/dpm++3m: ``dpmsolver++`` (data prediction) or ``dpmsolver`` (noise
        prediction; needs ``final_sigmas_type="sigma_min"``).
    :param solver_type: DPM-Solver's second-order steps: ``midpoint`` or ``heun`` (dpm++3m's too,
        at its warm-up and lowered steps).
    """
    check_options(solver, lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type,
                  euler_at_final=euler_at_final, use_lu_lambdas=use_lu_lambdas, algorithm=algorithm,
                  solver_type=solver_type, karras_sigmas=karras_sigmas)
    ts, sigmas = solver_timesteps(schedule, steps, solver, spacing, karras_sigmas, lambda_min_clipped,
                                  use_lu_lambdas=use_lu_lambdas, final_sigmas_type=final_sigmas_type)
    if not is_int(begin_index) or not 0 <= begin_index < steps:
        raise ValueError(f"begin_index must be an int in [0, steps) = [0, {steps}) (the leading steps of the "
                         f"{steps}-step plan to skip; at least one must run), got {begin_index!r}")
    orders = solver_orders(solver, steps, begin_index, lower_order_final=lower_order_final,
                           final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final)
    table = multistep_table(sigmas[begin_index:], solver, prediction, orders, algorithm=algorithm,
                            solver_type=solver_type)
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{solver} table is not finite for this schedule; try lambda_min_clipped")
    return MultistepPlan(solver, ts[begin_index:][::-1].copy(), table, bool(clip_denoised), thresholding,
                         sigmas=sigmas[begin_index:-1][::-1].copy(), begin_index=begin_index)


# -- the update --------------------------------------------------------------------------------
def new_history(x: torch.Tensor) -> torch.Tensor:
    """A zeroed history buffer for a batch like ``x``: ``[4, *x.shape]`` (``HISTORY_SLOTS``: the
    ring of three stored predictions, then ``x_last``; float64 for a float64 ``x``, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.zeros((HISTORY_SLOTS, *x.shape), dtype=dtype, device=x.device)


def multistep_update(x, model_output, history, step, table, noise=None, clip_denoised: bool = False,
                     thresholding: tuple[float, float] | None = None):
    """One multistep solver step, elementwise; advances ``history`` in place.

    The math is ``reference.multistep_step``; this runs it through ``fastddpm.ops`` (the fused
    ``multistep_step`` op of the selected backend, or the reference for explicit ``noise`` and
    float64 runs).

    :param x: ``[n, ...]`` current sample (float32, or float64 for a float64 run).
    :param model_output: ``[n, ...]`` any float dtype.
    :param history: ``new_history(x)`` at the first step, then passed back unchanged.
    :param step: int64 0-dim (or ``[1]``) device tensor: the reverse-process step index (row).
    :param table: ``[K, 14]`` coefficient table (its row is cast to the compute dtype).
    :param noise: ``[n, ...]`` standard normals for the SDE solver (None: no noise term).
    :param clip_denoised: clamp the data prediction to [-1, 1].
    :param thresholding: ``(ratio, sample_max_value)``: dynamic thresholding of the data prediction.
    :return: the next sample, in the compute dtype.
    """
    x = x.to(history.dtype)
    return ops.multistep_step(x, model_output, history, step, table, clip_denoised=clip_denoised, noise=noise,
                              threshold=step_threshold(x, model_output, step, table, thresholding))


class MultistepSampler:
    """Step-by-step use of a plan, like a diffusers scheduler::

        sampler = MultistepSampler(plan, x)
        for t in sampler.timesteps:           # running order
            x = sampler.step(model(x, t), x)

    To begin part-way, make the plan with ``begin_index`` (``make_plan``): moving ``index`` of a
    whole plan's sampler would keep the whole plan's orders with an empty history.

    :param plan: a ``MultistepPlan``.
    :param x: the initial sample (sets shape, device and the compute dtype).
    """

    def __init__(self, plan: MultistepPlan, x: torch.Tensor):
        self.plan = plan
        self.history = new_history(x)
        self.table, timesteps = plan.tensors(x.device, self.history.dtype)
        self.timesteps = timesteps.flip(0)  # running order
        self.index = plan.num_steps - 1  # reverse-process step of the next call

    def step(self, model_output, x, noise=None):
        """Advance one step; ``noise`` is required by the SDE solver."""
        if self.index < 0:
            raise RuntimeError(f"all {self.plan.num_steps} steps have been taken")
        if self.plan.stochastic and noise is None:
            raise ValueError(f"{self.plan.solver} needs noise at every step")
        step = torch.tensor(self.index, dtype=torch.int64, device=x.device)
        self.index -= 1
        return multistep_update(x, model_output, self.history, step, self.table, noise, self.plan.clip_denoised,
                                self.plan.thresholding)
