"""Linear-multistep samplers: PNDM's PLMS and DEIS, as rows of the fused multistep table.

Both are linear multistep methods on the noise prediction: each step combines the current and up
to three earlier model outputs with weights fixed by the schedule, so each model call is one row
of the ``[R, 14]`` table that ``multistep_step`` reads (``fastddpm.multistep``)::

    D      = a * x + b * out          # a true x0-prediction (clamped / thresholded if asked)
    E      = D + hx * x               # what the ring keeps: H1, H2, H3 are E of 1, 2, 3 calls back
    x_corr = u * x + cl * x_last + k0 * D + k1 * H1 + k2 * H2        # x_last: the previous x_corr
    x_next = cx * x_corr + p0 * D + p1 * H1 + p2 * H2 + p3 * H3

The current output is read back from ``D`` and ``x`` as ``(D - a x) / b`` (so with clipping it is
the output implied by the clipped ``D``).  Rows are in the order of ``multistep_table``: row ``i`` is
reverse-process step ``i``, ``R-1`` runs first.  Every coefficient is computed here once, in float64.

**PNDM** (Liu et al. 2022; diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True``).  Its
``_get_prev_sample`` moves a sample ``S`` from timestep ``tau`` to ``prev`` (``prev = tau - T // N``;
below 0 it lands on ``final_alpha_cumprod``, 1 with ``set_alpha_to_one``) with an epsilon
``e``: ``x' = sqrt(abar_p / abar_tau) S - (abar_p - abar_tau) e / (abar_tau sqrt(1 - abar_p)
+ sqrt(abar_tau (1 - abar_tau) abar_p))``, i.e. ``x' = A S + B c`` with ``c`` the combination of
RAW model outputs (v-prediction: diffusers converts the combination, ``e = sqrt(abar_tau) c +
sqrt(1 - abar_tau) S``, which folds into ``A`` and ``B``).  So the ring keeps raw outputs, scaled:
``hx = -a`` gives ``E = b * out``.  With ``N`` steps the calls are ``N + 1`` (``N >= 2``; 1 for
``N = 1``), diffusers' ``scheduler.timesteps`` (the second timestep repeated):

* call 0: ``c = o0``, from ``x``; its ``x_corr = x`` keeps ``x0`` in ``x_last``;
* call 1 (the repeated timestep, transfer from ``t + T//N`` to ``t``): ``c = (o1 + o0) / 2`` from
  ``x_last = x0`` (diffusers' ``cur_sample``): ``x_corr = u x + cl x_last``, ``cx = 1``;
* call 2, 3: ``(3 o2 - o0) / 2``, ``(23 o3 - 16 o2 + 5 o0) / 12`` (``o1`` is never in diffusers' ``ets``);
* call 4: ``(55 o4 - 59 o3 + 37 o2 - 9 o0) / 24`` needs ``o0``, four calls back, past the ring.  It is
  rebuilt exactly from call 3's update, ``x4 = A3 x3 + B3 (23 o3 - 16 o2 + 5 o0) / 12``, with ``x3``
  in ``x_last`` (call 3's ``x_corr = x``) -- valid when ``x`` is chained from step to step, as a
  sampling loop does (an edit of ``x`` between calls 3 and 4 changes that call, nothing else);
* calls >= 5: ``(55 o - 59 H1 + 37 H2 - 9 H3) / 24``, each ``H`` divided by its own row's ``b``.

The PRK warm-up (``skip_prk_steps=False``) is refused.  Its four-call Runge-Kutta steps would fit
(the step's start sample is rebuilt from ``x`` and ``H1`` as call 4's ``o0`` is, the 1/6, 1/3, 1/3,
1/6 sum reads ``H1..H3``), but its first PLMS call needs the first outputs of all three PRK steps,
4, 8 and 12 calls back, and the next two calls two and one of them: every row's ``x_corr`` must carry
its own ``x`` into ``x_next``, so ``x_last`` cannot keep the older ones that long (we found no
assignment of the 14 columns that does).

**DEIS** (Zhang & Chen 2023; diffusers' ``DEISMultistepScheduler``, ``deis``/``logrho``) integrates
the noise prediction ``m`` as a Lagrange polynomial in ``log rho`` (``rho = sigma / alpha``)::

    x_t = alpha_t * (x / alpha_s + sum_k coef_k m_k),   coef_k = int_{rho_s}^{rho_t} l_k(log rho) d rho

computed exactly (``int P(u) e^u du = e^u sum_n (-1)^n P^(n)(u)``).  The ring keeps
``E = D - x / alpha = -rho * m`` (``hx = -1 / alpha``); the current ``m = (x / alpha - D) / rho``.
Orders warm up from 1; ``lower_order_final`` (with fewer than 15 steps) makes the last step first
order and the one before at most second.  The timesteps are ``multistep.solver_timesteps``' (no
lambda clip, as diffusers' DEIS); the last sigma is diffusers': ``sigma(abar_0)``, or with Karras
sigmas ``sigma_min`` again (the last step then returns its ``x``).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import Polynomial

from .checks import is_int
from .multistep import TABLE_COLUMNS, MultistepPlan, solver_timesteps
from .schedule import NoiseSchedule

__all__ = ["LM_SOLVERS", "PNDM_PREDICTIONS", "DEIS_PREDICTIONS", "PNDM_SPACINGS", "DEIS_SPACINGS", "pndm_timesteps",
           "make_pndm_plan", "deis_orders", "deis_coefficients", "make_deis_plan"]

LM_SOLVERS = ("pndm", "deis")
PNDM_PREDICTIONS = ("epsilon", "v")  # diffusers' PNDM combines raw epsilon or v outputs only
DEIS_PREDICTIONS = ("epsilon", "x0", "v")
PNDM_SPACINGS = ("leading", "linspace", "trailing")
DEIS_SPACINGS = ("linspace", "leading", "trailing")
LOWER_ORDER_FINAL_BELOW = 15  # diffusers' lower_order_final applies to fewer steps than this
# PLMS weights of the raw outputs, newest first, by how many outputs diffusers' ets holds
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_common(schedule, steps, clip_denoised, thresholding, low=1):
    if schedule.is_respaced:
        raise ValueError("linear-multistep samplers choose their own timesteps: give the full (not respaced) schedule")
    T = schedule.num_timesteps
    if not is_int(steps) or not low <= steps <= T:
        raise ValueError(f"steps must be an int in [{low}, {T}], got {steps!r}")
    if not isinstance(clip_denoised, bool):
        raise ValueError(f"clip_denoised must be a bool, got {clip_denoised!r}")
    if thresholding is not None and (not isinstance(thresholding, tuple) or len(thresholding) != 2):
        raise ValueError(f"thresholding must be None or (ratio, sample_max_value), got {thresholding!r}")


def _x0_columns(prediction, alpha, sigma):
    """``(a, b)`` of ``D = a x + b out`` at a model call of ``alpha, sigma`` (arrays)."""
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "x0":
        return np.zeros_like(alpha), np.ones_like(alpha)
    return alpha, -sigma  # v


# -- PNDM (PLMS) -------------------------------------------------------------------------------
def pndm_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 0):
    """Diffusers' ``PNDMScheduler(skip_prk_steps=True).timesteps`` (running order, int64): its ``N``
    spacing points (``linspace`` over ``[0, T-1]`` with N points, ``leading`` ``k * (T // N) +
    steps_offset``, ``trailing``), the second one repeated -- ``N + 1`` model calls (1 for N = 1)."""
    T, N = schedule.num_timesteps, steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round().astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / N))[::-1].astype(np.int64) - 1
    if ts.size != N or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"{spacing} spacing with steps={N}, steps_offset={steps_offset} gives timesteps outside "
                         f"[0, {T - 1}] (diffusers' would index past its schedule): use other steps or steps_offset")
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()


def make_pndm_plan(schedule: NoiseSchedule, steps: int, prediction: str = "epsilon", spacing: str = "leading",
                   clip_denoised: bool = False, thresholding: tuple[float, float] | None = None, *,
                   skip_prk_steps: bool = True, set_alpha_to_one: bool = False, steps_offset: int = 0) -> MultistepPlan:
    """The plan of diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (PLMS) over ``steps`` inference
    steps: ``steps + 1`` model calls for ``steps >= 2`` (the second timestep is run twice), 1 for
    ``steps = 1``; ``plan.timesteps[::-1]`` is diffusers' ``scheduler.timesteps``.

    :param prediction: ``epsilon`` or ``v`` (diffusers' ``prediction_type``, ``v_prediction``).
    :param spacing: diffusers' ``timestep_spacing``; ``steps_offset`` is added under ``leading`` only.
    :param set_alpha_to_one: the last call lands on ``abar = 1`` (else ``abar_0``), diffusers' flag.
    :param clip_denoised, thresholding: act on ``D`` (diffusers' PNDM has neither).
    """
    if skip_prk_steps is not True:
        raise ValueError("skip_prk_steps=False (the PRK warm-up) does not fit the multistep op: its first PLMS "
                         "call needs the first outputs of the three 4-call PRK steps, 4, 8 and 12 calls back, "
                         "more than a ring of 3 + x_last holds; use skip_prk_steps=True (PLMS, the Stable "
                         "Diffusion setting)")
    _check_common(schedule, steps, clip_denoised, thresholding)
    _check_choice("prediction", prediction, PNDM_PREDICTIONS)
    _check_choice("timestep_spacing", spacing, PNDM_SPACINGS)
    if not is_int(steps_offset) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
    if not isinstance(set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be a bool, got {set_alpha_to_one!r}")
    T = schedule.num_timesteps
    ac = schedule.alphas_cumprod64
    final = 1.0 if set_alpha_to_one else float(ac[0])
    ts = pndm_timesteps(schedule, steps, spacing, steps_offset)
    R, delta = ts.size, T // steps
    a, b = _x0_columns(prediction, np.sqrt(ac[ts]), np.sqrt(1.0 - ac[ts]))  # at each call's model timestep
    tab = np.zeros((R, len(TABLE_COLUMNS)), dtype=np.float64)
    c = {name: tab[:, k] for k, name in enumerate(TABLE_COLUMNS)}
    c["a"][:], c["b"][:], c["hx"][:] = a, b, -a  # E = b * out: the raw output, scaled
    A, B = np.zeros(R), np.zeros(R)
    for j in range(R):
        tau, prev = (ts[j] + delta, ts[j]) if j == 1 else (ts[j], ts[j] - delta)
        if tau > T - 1:
            raise ValueError(f"steps={steps} puts PLMS's repeated step at timestep {tau} > {T - 1}")
        at, ap = ac[tau], (ac[prev] if prev >= 0 else final)
        cs = math.sqrt(ap / at)
        ce = (ap - at) / (at * math.sqrt(1.0 - ap) + math.sqrt(at * (1.0 - at) * ap))
        A[j], B[j] = (cs, -ce) if prediction == "epsilon" else (cs - ce * math.sqrt(1.0 - at), -ce * math.sqrt(at))
        if j == 1:  # (o1 + o0) / 2 from cur_sample = x_last
            c["u"][j], c["cl"][j], c["cx"][j] = -0.5 * B[j] * a[j] / b[j], A[j], 1.0
            c["p0"][j], c["p1"][j] = 0.5 * B[j] / b[j], 0.5 * B[j] / b[0]
            continue
        if j == 4:  # o0 from call 3's update: o0 = 12/5 ((x - A3 x_last) / B3 - (23 o3 - 16 o2) / 12)
            q = -0.9 * B[4]  # -9/24 * 12/5 * B4
            w0, w1, w2 = 55 / 24, -59 / 24 + 23 * 0.075, 37 / 24 - 16 * 0.075  # 0.075 = 9/24 * 12/5 / 12
            c["u"][j] = A[4] - B[4] * w0 * a[4] / b[4] + q / B[3]
            c["cl"][j], c["cx"][j] = -q * A[3] / B[3], 1.0
            c["p0"][j], c["p1"][j], c["p2"][j] = B[4] * w0 / b[4], B[4] * w1 / b[3], B[4] * w2 / b[2]
            continue
        # the raw outputs in diffusers' ets: the calls back each weight reads (call 1's is never there)
        back = {0: [], 2: [2], 3: [1, 3]}.get(j, [1, 2, 3])
        w = _AB[len(back) + 1]
        c["u"][j] = 1.0
        c["cx"][j] = A[j] - B[j] * w[0] * a[j] / b[j]
        c["p0"][j] = B[j] * w[0] / b[j]
        for wk, k in zip(w[1:], back):
            c[f"p{k}"][j] = B[j] * wk / b[j - k]
    if not np.all(np.isfinite(tab)):
        raise ValueError("pndm table is not finite for this schedule")
    return MultistepPlan("pndm", ts[::-1].copy(), tab[::-1].copy(), clip_denoised, thresholding,
                         sigmas=np.sqrt((1.0 - ac[ts]) / ac[ts])[::-1].copy(), steps_given=int(steps))


# -- DEIS ------------------------------------------------------------------------------------
def deis_orders(K: int, order: int, lower_order_final: bool = True, begin_index: int = 0) -> np.ndarray:
    """The order of each step run of a K-step plan begun at ``begin_index`` (running order), as diffusers'
    ``DEISMultistepScheduler.step`` after ``set_begin_index``: warm-up from the first step run, the final
    steps' lowering counted against the whole K."""
    j = np.arange(begin_index, K)
    q = np.minimum(order, j - begin_index + 1)  # warm-up: lower_order_nums
    if lower_order_final and K < LOWER_ORDER_FINAL_BELOW:
        q = np.where(j == K - 2, np.minimum(q, 2), q)
        q = np.where(j == K - 1, 1, q)
    return q


def deis_coefficients(rho_t: float, nodes: np.ndarray) -> np.ndarray:
    """``int_{nodes[0]}^{rho_t} l_k(log rho) d rho`` for the Lagrange basis ``l_k`` in ``log rho`` through
    ``log nodes`` (``nodes[0]`` the current step's rho, then older ones), exactly in float64."""
    u = np.log(np.asarray(nodes, dtype=np.float64))
    ut, us = math.log(rho_t), u[0]
    out = np.zeros(u.size)
    for k in range(u.size):
        others = np.delete(u, k)
        ell = Polynomial.fromroots(others) / np.prod(u[k] - others) if others.size else Polynomial([1.0])
        g, d = Polynomial([0.0]), ell
        for n in range(u.size):  # int P(u) e^u du = e^u * sum_n (-1)^n P^(n)(u)
            g, d = g + (-1) ** n * d, d.deriv()
        out[k] = rho_t * g(ut) - nodes[0] * g(us)
    return out


def make_deis_plan(schedule: NoiseSchedule, steps: int, prediction: str = "epsilon", spacing: str = "linspace",
                   karras_sigmas: bool = False, clip_denoised: bool = False,
                   thresholding: tuple[float, float] | None = None, *, order: int = 2,
                   lower_order_final: bool = True, begin_index: int = 0) -> MultistepPlan:
    """The plan of diffusers' ``DEISMultistepScheduler`` (``deis``, ``logrho``, ``solver_order=order``)
    over ``steps`` model calls (``steps >= 2``: a one-step DEIS is one DDIM step, ``sampler="ddim"``).

    :param prediction: ``epsilon``, ``x0`` or ``v``.
    :param spacing: diffusers' ``timestep_spacing`` (``steps_offset=0``); ``karras_sigmas`` its
        ``use_karras_sigmas``.
    :param clip_denoised: diffusers' ``thresholding=True, sample_max_value=1``.
    :param begin_index: begin part-way (img2img), as diffusers' ``set_begin_index``: the whole plan's steps
        from ``begin_index`` on, warming up from first order there (``deis_orders``); the rows keep the whole
        plan's indices.
    """
    _check_common(schedule, steps, clip_denoised, thresholding, low=2)
    _check_choice("prediction", prediction, DEIS_PREDICTIONS)
    _check_choice("timestep_spacing", spacing, DEIS_SPACINGS)
    if not is_int(order) or order not in (1, 2, 3):
        raise ValueError(f"order must be one of (1, 2, 3) (diffusers' solver_order), got {order!r}")
    if not isinstance(lower_order_final, bool) or not isinstance(karras_sigmas, bool):
        raise ValueError(f"lower_order_final and karras_sigmas must be bools, got {lower_order_final!r}, "
                         f"{karras_sigmas!r}")
    # "unipc": solver_timesteps rounds Karras timesteps for it on every schedule, as diffusers' DEIS does
    ts, rho = solver_timesteps(schedule, steps, "unipc", spacing, karras_sigmas, lambda_min_clipped=-math.inf)
    if ts.size != steps or ts.min() < 0:
        raise ValueError(f"{spacing} spacing with steps={steps} gives timesteps outside [0, T-1]: use other steps")
    ac = schedule.alphas_cumprod64
    rho = rho.copy()
    rho[-1] = rho[-2] if karras_sigmas else math.sqrt((1.0 - ac[0]) / ac[0])  # diffusers' last sigma
    if not is_int(begin_index) or not 0 <= begin_index < steps:
        raise ValueError(f"begin_index must be an int in [0, steps) = [0, {steps}), got {begin_index!r}")
    orders = deis_orders(steps, order, lower_order_final, int(begin_index))
    ts, rho = ts[begin_index:], rho[begin_index:]
    K = steps - begin_index
    alpha = 1.0 / np.sqrt(1.0 + rho**2)
    tab = np.zeros((K, len(TABLE_COLUMNS)), dtype=np.float64)
    c = {name: tab[:, k] for k, name in enumerate(TABLE_COLUMNS)}
    c["a"][:], c["b"][:] = _x0_columns(prediction, alpha[:K], rho[:K] * alpha[:K])
    c["hx"][:], c["u"][:] = -1.0 / alpha[:K], 1.0  # E = D - x / alpha = -rho * m
    for j, q in enumerate(orders):
        coef = deis_coefficients(rho[j + 1], rho[j - np.arange(q)])
        at = alpha[j + 1]
        c["cx"][j] = at / alpha[j] * (1.0 + coef[0] / rho[j])  # m0 = (x / alpha - D) / rho
        c["p0"][j] = -at * coef[0] / rho[j]
        for k in range(1, q):  # m_k = -H_k / rho_{j-k}
            c[f"p{k}"][j] = -at * coef[k] / rho[j - k]
    if not np.all(np.isfinite(tab)):
        raise ValueError("deis table is not finite for this schedule")
    return MultistepPlan("deis", ts[::-1].copy(), tab[::-1].copy(), clip_denoised, thresholding,
                         sigmas=rho[:-1][::-1].copy(), begin_index=int(begin_index))
