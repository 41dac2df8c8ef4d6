"""Singlestep DPM-Solver (Lu et al. 2022, "DPM-Solver" and "DPM-Solver++"), orders 1-3, as rows of
the one fused multistep table (``fastddpm.multistep``): diffusers' ``DPMSolverSinglestepScheduler``.

A singlestep solver of order ``k`` takes one step of the probability-flow ODE from a sample ``x_s``
(diffusers' ``self.sample``) with ``k`` model calls: the group's call ``j`` (``j = 0 .. k-1``, at the
order ``j + 1``; ``singlestep_orders`` is diffusers' ``get_order_list``) sees the ``x`` its previous
call gave and lands on the next sigma from ``x_s`` itself, with the group's outputs so far::

    x_{n+j+1} = C_j x_s + sum_{m <= j} g_jm M_m        (+ cz z for sde-dpmsolver++)

``M_m`` is the group's call ``m``'s data prediction ``D`` (``dpmsolver++``, ``sde-dpmsolver++``) or its
noise prediction ``eps`` (``dpmsolver``).  Each call is one row of the table; for the data-prediction
algorithms ``x_s`` is kept in the history's ``x_last``: the group's first row has ``u = 1, cl = 0`` (``x_corr = x = x_s``), its later rows
``u = 0, cl = 1`` (``x_corr = x_last = x_s``), and ``x_next = cx * x_s + p0 * D + p1 * H1 + p2 * H2 (+ cz z)``.

* ``dpmsolver++``: the ring keeps ``D`` (``hx = 0``), so ``p0, p1, p2`` are ``g`` of the current call, one
  and two calls back and ``cx = C``.
* ``dpmsolver``: the ring keeps ``E = D - x / alpha = -(sigma / alpha) eps`` (``hx = -1 / alpha``), so a
  past call's ``eps`` is ``-H / s`` (``s = sigma / alpha`` of that call), and the current one ``eps = x /
  sigma - D / s`` needs ``x`` itself, which only ``x_corr`` reads: every row is ``x_corr = x_next`` (``cx =
  1``, ``u = g_jj / sigma_j``, ``k0 = -g_jj / s_j``, ``k1, k2`` the earlier ``eps``), and a later call of the
  group gets ``x_s`` back from ``x_last = C_{j-1} x_s + sum g_{j-1,m} eps_m`` (its own update) as
  ``cl = C_j / C_{j-1}``, the ratio of neighbouring alphas (``C_{j-1} = alpha / alpha_s`` is >= 1).  (Rewriting ``x`` in ``x_s`` instead, to keep
  ``x_last = x_s``, cancels terms of ~1e4 at few steps.)

``D`` is the true x0 prediction (the ``a, b`` of ``multistep_table``), so ``clip_denoised`` (diffusers'
``thresholding=True, sample_max_value=1``) and dynamic thresholding act on it as in diffusers, also for
``dpmsolver`` (whose ``eps`` diffusers rebuilds from the thresholded x0; diffusers 0.42 reads its alpha
as ``alpha_t[None]`` there and fails, so it is compared with that index fixed).  The timesteps are diffusers'
(``linspace`` below ``lambda_min_clipped``, or Karras sigmas rounded to timesteps), from
``multistep.solver_timesteps``; diffusers' singlestep scheduler has no ``timestep_spacing``, and
``leading``/``trailing`` are those of its multistep scheduler (equal to passing them to its
``set_timesteps(timesteps=...)``).  As in ``multistep``, ``lambda_min_clipped`` also bounds the Karras
sigma_max (diffusers' singlestep Karras sigmas ignore it: they agree at ``-inf``).  The last sigma is 0
(``final_sigmas_type="zero"``: the last call is first order and lands on ``D``) or the schedule's
sigma at t = 0 (``"sigma_min"``, which ``dpmsolver`` requires, as in diffusers).  As diffusers'
``set_timesteps``, ``lower_order_final=False`` is taken as True unless ``steps`` is a multiple of the
order and ``final_sigmas_type="sigma_min"``.  Row ``i`` is the reverse-process step index (``K-1``
runs first); the SDE noise of row ``i`` is noise slot ``i``.

Beginning part-way (img2img, diffusers' ``set_begin_index(b)``) keeps the whole plan's order list and
runs its calls ``b ..`` with an empty history: diffusers lowers a call's order while
``model_outputs[-order] is None``, so call ``b + m`` is of order ``min(orders[b + m], m + 1)``, and a
first-order call stores its ``x`` as the group's ``x_s``.  Begun mid-group, the first call starts a
group of its own (its ``x_s`` the start) that runs on with the whole list's orders: still groups
``1, 2, ..`` (``singlestep_orders(..., begin_index=b)``), the rows the whole plan's last ``K - b``.
"""
from __future__ import annotations

import numpy as np

from .checks import is_int
from .modes import PREDICTIONS, SPACINGS
from .multistep import TABLE_COLUMNS, MultistepPlan, default_lambda_min, multistep_table, solver_timesteps
from .schedule import NoiseSchedule

__all__ = ["ALGORITHMS", "SOLVER_TYPES", "FINAL_SIGMAS_TYPES", "ORDERS", "singlestep_orders",
           "singlestep_timesteps", "singlestep_table", "make_singlestep_plan"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")  # diffusers' algorithm_type
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ORDERS = (1, 2, 3)
SOLVER_NAME = "dpm-solver"  # the plan's solver; "dpm-solver-sde" for sde-dpmsolver++ (a stochastic plan)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_steps(steps, T):
    if not is_int(steps) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (model calls), got {steps!r}")


def singlestep_orders(steps: int, order: int, lower_order_final: bool = True,
                      final_sigmas_type: str = "zero", begin_index: int = 0) -> np.ndarray:
    """The order of each model call, running order: diffusers' ``get_order_list``.  Groups ``[1, 2, 3]``
    (order 3) or ``[1, 2]`` (order 2); with ``lower_order_final`` the tail is lower order, and a final
    sigma of 0 makes the last call first order.  ``lower_order_final=False`` needs ``steps`` a multiple of
    ``order`` (diffusers' list would be short: its ``set_timesteps`` sets it True instead).

    :param begin_index: the calls from ``begin_index`` on (``steps - begin_index`` of them) as diffusers'
        ``step`` runs them after ``set_begin_index``: the list's order lowered while the history is short,
        ``min(list[begin_index + m], m + 1)``.
    """
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    _check_choice("order", order, ORDERS)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
    group = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if not lower_order_final:
        if rest:
            raise ValueError(f"lower_order_final=False needs steps a multiple of order={order}, got steps={steps}")
        orders = group * full
    elif order == 3 and rest == 0:
        orders = group * (full - 1) + [1, 2] + [1]
    elif order == 2 and rest == 0:
        orders = group * (full - 1) + [1, 1]
    else:
        orders = group * full + list(range(1, rest + 1))
    if final_sigmas_type == "zero":
        orders[-1] = 1
    if not is_int(begin_index) or not 0 <= begin_index < steps:
        raise ValueError(f"begin_index must be an int in [0, steps) = [0, {steps}) (the leading calls of the "
                         f"{steps}-call plan to skip; at least one must run), got {begin_index!r}")
    # diffusers: `while self.model_outputs[-order] is None: order -= 1` (begin_index + m has m outputs before it)
    return np.minimum(np.asarray(orders[begin_index:], dtype=np.int64), np.arange(1, steps - begin_index + 1))


def singlestep_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "linspace", karras_sigmas: bool = False,
                         lambda_min_clipped: float | None = None, final_sigmas_type: str = "zero"):
    """``(timesteps int64 [K], sigmas float64 [K + 1])`` in running order: ``multistep.solver_timesteps``
    (Karras timesteps rounded, as diffusers' singlestep scheduler) with the final sigma of
    ``final_sigmas_type``.  One step is the first timestep of two (``leading``: ``last // 2``)."""
    _check_choice("timestep_spacing", spacing, SPACINGS)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if schedule.is_respaced:
        raise ValueError("dpm-solver chooses its own timesteps: give the full (not respaced) schedule")
    _check_steps(steps, schedule.num_timesteps)
    if lambda_min_clipped is None:
        lambda_min_clipped = default_lambda_min(schedule)
    ac = schedule.alphas_cumprod64
    all_sigmas = np.sqrt((1.0 - ac) / ac)
    # solver_timesteps' solvers need two steps; "unipc" is the one that rounds Karras timesteps
    ts, sigmas = solver_timesteps(schedule, max(steps, 2), "unipc", spacing, karras_sigmas, lambda_min_clipped)
    if steps == 1:
        if spacing == "leading" and not karras_sigmas:  # linspace's first timestep is last - 1
            last = int(solver_timesteps(schedule, 2, "unipc", "linspace", False, lambda_min_clipped)[0][0]) + 1
            ts, sigmas = np.array([last // 2], dtype=np.int64), all_sigmas[[last // 2]]
        ts, sigmas = ts[:1], sigmas[:1]
    else:
        sigmas = sigmas[:-1]
    final = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
    return ts, np.append(sigmas, final)


def _update(lam, alpha, sigma, n, j, algorithm, solver_type):
    """diffusers' order-(j+1) singlestep update from ``x_s`` at sigma index ``n`` to ``n + j + 1``:
    ``(C, g [j + 1], cz)`` with ``x = C x_s + g @ M + cz z``."""
    t = n + j + 1
    h = lam[t] - lam[n]
    e = np.eye(j + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # h = inf on a final first-order step
        if algorithm == "dpmsolver++":
            C = sigma[t] / sigma[n]
            em1 = np.expm1(-h)
            c0, c1, c2 = -alpha[t] * em1, alpha[t] * (em1 / h + 1.0), -alpha[t] * ((em1 + h) / h**2 - 0.5)
            cz = 0.0
        elif algorithm == "dpmsolver":
            C = alpha[t] / alpha[n]
            ep1 = np.expm1(h)
            c0, c1, c2 = -sigma[t] * ep1, -sigma[t] * (ep1 / h - 1.0), -sigma[t] * ((ep1 - h) / h**2 - 0.5)
            cz = 0.0
        else:  # sde-dpmsolver++
            C = sigma[t] / sigma[n] * np.exp(-h)
            e2 = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
            c0, c1 = alpha[t] * e2, alpha[t] * (e2 / (-2.0 * h) + 1.0)
            c2 = alpha[t] * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            cz = sigma[t] * np.sqrt(e2)
    g = c0 * e[0]
    if j == 1:
        r0 = (lam[n + 1] - lam[n]) / h
        d1 = (e[1] - e[0]) / r0
        g = g + (0.5 * c0 if solver_type == "midpoint" else c1) * d1
    elif j == 2:
        r0, r1 = (lam[n + 2] - lam[n]) / h, (lam[n + 1] - lam[n]) / h
        d1_0, d1_1 = (e[1] - e[0]) / r1, (e[2] - e[0]) / r0
        if solver_type == "midpoint":
            g = g + c1 * d1_1
        else:
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            g = g + c1 * d1 + c2 * d2
    return C, g, cz


def singlestep_table(sigmas: np.ndarray, orders: np.ndarray, prediction: str = "epsilon",
                     algorithm: str = "dpmsolver++", solver_type: str = "midpoint") -> np.ndarray:
    """The float64 ``[K, 14]`` table (``TABLE_COLUMNS``, row order) of the calls of ``orders`` (running
    order, ``singlestep_orders``) over ``sigmas`` (float64 ``[K + 1]``, running order)."""
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("solver_type", solver_type, SOLVER_TYPES)
    s = np.asarray(sigmas, dtype=np.float64)
    orders = np.asarray(orders)
    K = s.size - 1
    if orders.shape != (K,) or orders[0] != 1 or np.any((orders[1:] != 1) & (orders[1:] != orders[:-1] + 1)):
        raise ValueError(f"orders must be [K] = [{K}] groups 1, 2, .. (singlestep_orders), got {orders!r}")
    # a, b (D = a x + b out) as multistep_table's; every other column is this module's
    tab = multistep_table(s, "dpm++2m", prediction, np.ones(K, dtype=np.int64))[::-1].copy()
    tab[:, 2:] = 0.0
    col = {name: c for c, name in enumerate(TABLE_COLUMNS)}
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = -np.log(s)
    C_prev, g_prev = 1.0, np.zeros(0)  # dpmsolver: x_last = C_prev x_s + g_prev @ eps (the previous output)
    for i in range(K):
        j = int(orders[i]) - 1
        n = i - j
        C, g, cz = _update(lam, alpha, sigma, n, j, algorithm, solver_type)
        row = tab[i]
        if algorithm == "dpmsolver":  # x_corr = x_next; eps_j = x / sigma_j - D / s_j, eps_m = -H / s_m
            row[col["hx"]] = -1.0 / alpha[i]
            row[col["u"]] = g[j] / sigma[i] + (C if j == 0 else 0.0)
            row[col["k0"]] = -g[j] / s[i]
            if j > 0:  # x_s = (x_last - g_prev @ eps) / C_prev
                row[col["cl"]] = C / C_prev
                for back, name in ((1, "k1"), (2, "k2")):
                    if j - back >= 0:
                        m = j - back
                        row[col[name]] = -(g[m] - C / C_prev * g_prev[m]) / s[n + m]
            row[col["cx"]] = 1.0
            C_prev, g_prev = C, g
            continue
        # x_corr = x_s (the first call's x, kept in x_last); x_next = C x_s + g @ D
        row[col["u"]], row[col["cl"]] = (1.0, 0.0) if j == 0 else (0.0, 1.0)
        row[col["cx"]], row[col["p0"]], row[col["cz"]] = C, g[j], cz
        for back, name in ((1, "p1"), (2, "p2")):
            if j - back >= 0:
                row[col[name]] = g[j - back]
    return tab[::-1].copy()


def make_singlestep_plan(schedule: NoiseSchedule, steps: int, prediction: str = "epsilon", spacing: str = "linspace",
                         karras_sigmas: bool = False, lambda_min_clipped: float | None = None,
                         clip_denoised: bool = False, thresholding: tuple[float, float] | None = None, *,
                         order: int = 2, algorithm: str = "dpmsolver++", solver_type: str = "midpoint",
                         lower_order_final: bool = True, final_sigmas_type: str = "zero",
                         begin_index: int = 0) -> MultistepPlan:
    """The plan of singlestep DPM-Solver over ``steps`` model calls (diffusers' ``num_inference_steps``)
    of a model trained on ``schedule``: diffusers' ``DPMSolverSinglestepScheduler(solver_order=order,
    algorithm_type=algorithm, solver_type=solver_type, lower_order_final=..., final_sigmas_type=...)``.

    :param begin_index: begin part-way (img2img), as diffusers' ``set_begin_index``: the whole plan's calls
        from ``begin_index`` on (``steps - begin_index`` of them), the orders lowered where the history is
        short (``singlestep_orders``), the first call's ``x`` the group start; the rows are the whole plan's
        last ones, so the SDE noise slot of each call is the whole plan's.
    :return: a ``MultistepPlan`` with solver ``"dpm-solver"`` (``"dpm-solver-sde"``: stochastic, for
        ``sde-dpmsolver++``), timesteps int64 ``[K]`` in row order and ``sigmas`` the sigma/alpha of the
        ``x`` each row is called at.
    """
    _check_choice("order", order, ORDERS)
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("solver_type", solver_type, SOLVER_TYPES)
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
    if algorithm == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError("algorithm='dpmsolver' (noise prediction) cannot step to sigma 0: use "
                         "final_sigmas_type='sigma_min' or algorithm='dpmsolver++'")
    ts, sigmas = singlestep_timesteps(schedule, steps, spacing, karras_sigmas, lambda_min_clipped, final_sigmas_type)
    # diffusers' set_timesteps: lower_order_final=False only for whole groups ending above sigma 0
    lower_order_final = lower_order_final or steps % order != 0 or final_sigmas_type == "zero"
    orders = singlestep_orders(steps, order, lower_order_final, final_sigmas_type, begin_index)
    b = int(begin_index)
    table = singlestep_table(sigmas[b:], orders, prediction, algorithm, solver_type)
    if not np.all(np.isfinite(table)):
        raise ValueError("dpm-solver table is not finite for this schedule; try lambda_min_clipped")
    name = SOLVER_NAME + ("-sde" if algorithm.startswith("sde") else "")
    return MultistepPlan(name, ts[b:][::-1].copy(), table, bool(clip_denoised), thresholding,
                         sigmas=sigmas[b:-1][::-1].copy(), begin_index=b)
