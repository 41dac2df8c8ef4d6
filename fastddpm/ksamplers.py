"""The sigma-space samplers of k-diffusion and diffusers' ``*DiscreteScheduler``: Euler, Euler
ancestral, Heun, DPM2, DPM2 ancestral, LMS, DPM++ 2S ancestral, DPM++ SDE and DPM++ 3M SDE -- as rows
of the one fused multistep table (``fastddpm.multistep``); EDM's churn (``s_churn``) for Euler, Heun
and DPM2.

These samplers are written (Karras et al. 2022, "EDM") for ``x = x0 + sigma * eps`` with
``sigma = sqrt((1 - abar) / abar)``: a DDPM sample is ``x_vp = alpha x`` with ``alpha = 1 / sqrt(1 +
sigma^2)``, the model's input (diffusers' ``scale_model_input``, k-diffusion's ``c_in``).  Every
update of every one of them is linear in the current ``x``, the data prediction ``D``, earlier
``D``'s, the ``x`` a two-stage step began from and a normal draw, with coefficients that depend only
on the sigmas -- so each model call is one row of the ``[R, W]`` table that ``multistep_step`` reads,
computed here once in float64 and rescaled to the DDPM variable the loop keeps::

    x_next = alpha_out * (cx * x / alpha_in + cl * x_start / alpha_start + cd * D + c1 * H1 + c2 * H2 + cz * z)

LMS keeps ``E = D - x = -sigma d`` in the ring (the row's ``hx``), so its order-4 step ``x + sum_j
c_j d_{i-j}`` reads the three earlier derivatives as ``H1..H3``; the ``c_j`` are the Lagrange
integrals (``lms_coefficients``).  A two-stage step (Heun, DPM2, DPM++ 2S, DPM++ SDE) is two rows: the first keeps the ``x`` it began
from in the history's ``x_last``, the second reads it back.  ``steps`` is, as diffusers'
``num_inference_steps``, the number of sigmas stepped from; the last step (to sigma 0) is always one
Euler call, so a two-stage sampler makes ``2 * steps - 1`` model calls (``model_calls``).

Noise: row ``r``'s draw is the contract's slot ``r`` (as every other sampler's).  DPM++ SDE's two draws
of a step are one Brownian path's increments over ``[sigma, sigma_s]`` and ``[sigma, sigma_next]``
(k-diffusion's ``BrownianTreeNoiseSampler``): the second row rebuilds the first increment from its
``x`` exactly (it is linear in ``x``, ``x_last`` and ``H1``) and adds the second's independent part.

The sigmas and model timesteps are diffusers' ``EulerDiscreteScheduler.set_timesteps`` (``linspace``,
``leading``, ``trailing``; Karras, exponential or beta sigmas; ``final_sigmas_type``) with the
fractional timesteps it gives the model; the start is diffusers' ``init_noise_sigma`` times a unit
normal (``sigma_max`` for linspace/trailing, as k-diffusion's ``randn * sigmas[0]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import is_int
from .modes import CHURNED, KSAMPLERS, LMS_ORDER, PREDICTIONS, SIGMA_SCHEDULES, SPACINGS
from .multistep import TABLE_COLUMNS, MultistepPlan, sigma_to_t
from .schedule import NoiseSchedule

__all__ = ["KSAMPLERS", "SIGMA_SCHEDULES", "TWO_STAGE", "STOCHASTIC", "CHURNED", "lms_coefficients", "KPlan",
           "ksampler_sigmas", "make_kplan", "model_calls", "ancestral_step"]

TWO_STAGE = ("heun", "dpm2", "dpm2-a", "dpm++2s-a", "dpm++sde")  # two model calls per step but the last
STOCHASTIC = ("euler-a", "dpm2-a", "dpm++2s-a", "dpm++sde", "dpm++3m-sde")
KARRAS_RHO = 7.0  # Karras et al. 2022's rho, diffusers' fixed value
BETA_SIGMAS_AB = (0.6, 0.6)  # diffusers' _convert_to_beta alpha, beta (Lee et al. 2024)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def model_calls(sampler: str, steps: int) -> int:
    """The model calls ``sampler`` makes over ``steps`` sigma steps (the last step is one Euler call)."""
    _check_choice("sampler", sampler, KSAMPLERS)
    return 2 * steps - 1 if sampler in TWO_STAGE else steps


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step (k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
    return math.sqrt(max(sigma_to**2 - up**2, 0.0)), up


# -- the sigmas -------------------------------------------------------------------------------
def ksampler_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "linspace", sigma_schedule: str = "default",
                    final_sigmas_type: str = "zero", round_karras_timesteps: bool = False):
    """The ``steps + 1`` sigmas (descending, the last 0 or ``sigma_min``) and the ``steps`` model
    timesteps (float64, fractional) of diffusers' ``EulerDiscreteScheduler.set_timesteps``
    (``steps_offset=0``, ``interpolation_type="linear"``).

    :param sigma_schedule: ``default`` (the spacing's timesteps, sigmas interpolated), ``karras``
        (rho 7), ``exponential`` or ``beta`` (diffusers' ``use_*_sigmas``; sigma_max and sigma_min
        those of the spacing), whose timesteps are ``sigma_to_t``'s (log-sigma interpolation).
    :param round_karras_timesteps: round Karras timesteps (diffusers' ``KDPM2*DiscreteScheduler``).
    """
    _check_choice("timestep_spacing", spacing, SPACINGS)
    _check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    if schedule.is_respaced:
        raise ValueError("k-samplers choose their own sigmas: give the full (not respaced) schedule")
    T = schedule.num_timesteps
    if not is_int(steps) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    K = int(steps)
    ac = schedule.alphas_cumprod64
    all_sigmas = np.sqrt((1.0 - ac) / ac)
    log_sigmas = np.log(all_sigmas)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, K)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, K) * (T // K)).round()[::-1].astype(np.float64)
    else:  # trailing
        ts = np.arange(T, 0, -T / K).round() - 1.0
    sigmas = np.interp(ts, np.arange(T), all_sigmas)
    if sigma_schedule != "default":
        hi, lo = float(sigmas[0]), float(sigmas[-1])
        if sigma_schedule == "karras":
            ramp = np.linspace(0, 1, K)
            sigmas = (hi ** (1 / KARRAS_RHO) + ramp * (lo ** (1 / KARRAS_RHO) - hi ** (1 / KARRAS_RHO))) ** KARRAS_RHO
        elif sigma_schedule == "exponential":
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), K))
        else:
            try:
                from scipy.stats import beta as beta_dist
            except ImportError as e:  # pragma: no cover - scipy comes with the test extras
                raise ImportError("sigma_schedule='beta' needs scipy (pip install scipy)") from e
            ppf = beta_dist.ppf(1 - np.linspace(0, 1, K), *BETA_SIGMAS_AB)
            sigmas = lo + ppf * (hi - lo)
        ts = sigma_to_t(sigmas, log_sigmas)
        if round_karras_timesteps and sigma_schedule == "karras":
            ts = ts.round()
    last = all_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.append(sigmas, last).astype(np.float64), np.asarray(ts, dtype=np.float64)


# -- the rows ---------------------------------------------------------------------------------
@dataclass
class _Row:
    """One model call in sigma space: the model at ``(t, s)`` on the current ``x`` (at sigma ``s``)."""

    t: float  # model timestep
    s: float  # sigma of x and of the model call
    s_out: float  # sigma of the row's output (the next row's s); the last row's output is returned as is
    cx: float = 0.0  # x
    cl: float = 0.0  # x_last (the x the step began from)
    cd: float = 0.0  # D
    c1: float = 0.0  # H1: the previous call's D
    c2: float = 0.0  # H2: two calls back
    c3: float = 0.0  # H3: three calls back
    cz: float = 0.0  # the row's normal draw
    hx: float = 0.0  # the ring keeps E = D + hx x (sigma space; LMS: -1, so E = -sigma d)
    keep: bool = True  # x_last <- this row's x (a step's first row); False: the row reads x_last
    s_last: float = 0.0  # sigma of x_last, when read
    final: bool = False


def _euler(t, s, s_to, s_out=None):
    """x + (s_to - s) (x - D) / s: to ``s_to``, output at sigma ``s_out`` (default ``s_to``)."""
    if s_to == 0.0:
        return _Row(t, s, 0.0, cd=1.0)
    r = s_to / s
    return _Row(t, s, s_to if s_out is None else s_out, cx=r, cd=1.0 - r)


def _churn(sigmas, s_churn, s_tmin, s_tmax):
    """EDM's churn (Karras et al. 2022, Algorithm 2; k-diffusion's ``s_churn``): the ``sigma_hat`` each step
    raises its sigma to, ``gamma = min(s_churn / steps, sqrt 2 - 1)`` where ``s_tmin <= sigma <= s_tmax``."""
    K = sigmas.size - 1
    gamma = min(s_churn / K, math.sqrt(2.0) - 1.0) if s_churn else 0.0
    return [s * (1.0 + gamma) if gamma > 0.0 and s_tmin <= s <= s_tmax else s for s in sigmas[:K].tolist()]


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """The ``order`` weights of ``d_i, d_{i-1}, ...`` in LMS step ``i``: the integral over ``[sigma_i,
    sigma_{i+1}]`` of each Lagrange basis polynomial through ``sigma_i, ..., sigma_{i-order+1}`` (diffusers'
    ``get_lms_coefficient``, k-diffusion's ``linear_multistep_coeff``), exact: Gauss-Legendre with as
    many nodes as the order integrates a polynomial of degree ``order - 1`` to rounding."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    xg, wg = np.polynomial.legendre.leggauss(max(order, 1))
    tau = 0.5 * (hi - lo) * xg + 0.5 * (hi + lo)
    out = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float(0.5 * (hi - lo) * np.dot(wg, basis)))
    return out


def _lms_row(t, s, s_next, i, sigmas, order):
    """LMS step ``i``: ``x + sum_j c_j d_{i-j}``, ``d = (x - D) / sigma``; the ring keeps ``E = D - x = -sigma d``."""
    q = min(i + 1, order)
    c = lms_coefficients(sigmas, i, q)
    row = _Row(t, s, s_next, cx=1.0 + c[0] / s, cd=-c[0] / s, hx=-1.0)
    for j, name in zip(range(1, q), ("c1", "c2", "c3")):
        setattr(row, name, -c[j] / float(sigmas[i - j]))
    return row


def _rows(sampler, sigmas, ts, log_sigmas, eta=1.0, s_noise=1.0, order=4, churn=None):
    K = ts.size
    t_of = lambda sig: float(sigma_to_t(np.array([sig]), log_sigmas)[0])  # noqa: E731
    hats = list(sigmas[:K]) if churn is None else churn  # sigma_hat of each step (EDM's churn)
    rows = []
    h_prev = []  # DPM++ 3M SDE: the previous steps' h
    for i in range(K):
        s, s_next = float(hats[i]), float(sigmas[i + 1])
        t = float(ts[i]) if s == float(sigmas[i]) else t_of(s)  # the model sees sigma_hat
        t_next = float(ts[i + 1]) if i + 1 < K else None
        last = i == K - 1
        if sampler == "euler":
            rows.append(_euler(t, s, s_next))
        elif sampler == "lms":
            rows.append(_lms_row(t, s, s_next, i, sigmas, order))
        elif sampler == "euler-a":
            down, up = ancestral_step(s, s_next, eta)
            row = _euler(t, s, down, s_out=s_next)
            row.cz = up * s_noise
            rows.append(row)
        elif sampler == "dpm++3m-sde":
            rows.append(_three_m_sde_row(t, s, s_next, h_prev, eta, s_noise))
        elif s_next == 0.0 or (sampler in ("dpm2-a", "dpm++2s-a") and ancestral_step(s, s_next, eta)[0] == 0.0):
            # the last step of a two-stage sampler: one Euler call (k-diffusion and diffusers alike)
            down, up = ancestral_step(s, s_next, eta) if sampler in ("dpm2-a", "dpm++2s-a") else (s_next, 0.0)
            row = _euler(t, s, down, s_out=s_next)
            row.cz = up * s_noise
            rows.append(row)
        elif sampler == "heun":
            dt = s_next - s
            rows.append(_euler(t, s, s_next))
            rows.append(_Row(t_next, s_next, s_next, cx=dt / (2 * s_next), cl=1.0 + dt / (2 * s),
                             c1=-dt / (2 * s), cd=-dt / (2 * s_next), keep=False, s_last=s))
        elif sampler in ("dpm2", "dpm2-a"):
            down, up = ancestral_step(s, s_next, eta) if sampler == "dpm2-a" else (s_next, 0.0)
            mid = math.exp(0.5 * (math.log(s) + math.log(down)))
            rows.append(_euler(t, s, mid))
            dt = down - s
            rows.append(_Row(t_of(mid), mid, s_next, cx=dt / mid, cl=1.0, cd=-dt / mid, cz=up * s_noise,
                             keep=False, s_last=s))
        elif sampler == "dpm++2s-a":
            down, up = ancestral_step(s, s_next, eta)
            mid = math.sqrt(s * down)  # sigma at t + h / 2 in t = -log sigma
            rows.append(_euler(t, s, mid))
            r = down / s
            rows.append(_Row(t_of(mid), mid, s_next, cl=r, cd=1.0 - r, cz=up * s_noise, keep=False, s_last=s))
        elif sampler == "dpm++sde":
            rows.extend(_dpmpp_sde_rows(t, s, s_next, t_of, eta, s_noise))
        else:  # pragma: no cover - KSAMPLERS is checked by the caller
            raise ValueError(sampler)
        if last:
            rows[-1].final = True
        elif float(hats[i + 1]) != s_next:  # the next step's churn: its draw ends this step, at sigma_hat
            if rows[-1].cz:  # pragma: no cover - only CHURNED samplers churn, and their last rows draw nothing
                raise AssertionError(f"{sampler}'s step {i} already draws")
            rows[-1].cz = math.sqrt(float(hats[i + 1]) ** 2 - s_next**2) * s_noise
            rows[-1].s_out = float(hats[i + 1])
    return rows


def _three_m_sde_row(t, s, s_next, h_prev, eta, s_noise):
    """k-diffusion's ``sample_dpmpp_3m_sde`` step (order 1, 2, then 3; the last step lands on D)."""
    if s_next == 0.0:
        return _Row(t, s, 0.0, cd=1.0)
    h = math.log(s) - math.log(s_next)
    h_eta = h * (eta + 1.0)
    e = math.exp(-h_eta)
    row = _Row(t, s, s_next, cx=e, cd=-math.expm1(-h_eta))
    phi_2 = math.expm1(-h_eta) / h_eta + 1.0
    if len(h_prev) >= 2:
        r0, r1 = h_prev[-1] / h, h_prev[-2] / h
        # d1_0 = (D - H1) / r0, d1_1 = (H1 - H2) / r1; x += phi_2 d1 - phi_3 d2
        phi_3 = phi_2 / h_eta - 0.5
        g1 = phi_2 * (1.0 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)  # weight of d1_0
        g2 = -phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1)  # weight of d1_1
        row.cd += g1 / r0
        row.c1 += -g1 / r0 + g2 / r1
        row.c2 += -g2 / r1
    elif len(h_prev) == 1:
        r = h_prev[-1] / h
        row.cd += phi_2 / r
        row.c1 -= phi_2 / r
    if eta:
        row.cz = s_next * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise
    h_prev.append(h)
    return row


def _dpmpp_sde_rows(t, s, s_next, t_of, eta, s_noise, r=0.5):
    """k-diffusion's ``sample_dpmpp_sde`` step (r = 1/2): two calls, two Brownian increments."""
    lam, lam_next = -math.log(s), -math.log(s_next)
    h = lam_next - lam
    s_mid = math.exp(-(lam + h * r))
    down1, up1 = ancestral_step(s, s_mid, eta)
    first = _euler(t, s, down1, s_out=s_mid)
    first.cz = up1 * s_noise
    fac = 1.0 / (2.0 * r)
    down2, up2 = ancestral_step(s, s_next, eta)
    q = down2 / s
    # x_next = q x_start + (1 - q) ((1 - fac) H1 + fac D) + up2 s_noise n2,
    # n2 = (sqrt(s - s_mid) n1 + sqrt(s_mid - s_next) z) / sqrt(s - s_next), and n1 from x (at s_mid):
    # x = first.cx x_start + first.cd H1 + first.cz n1
    second = _Row(t_of(s_mid), s_mid, s_next, cl=q, cd=(1.0 - q) * fac, c1=(1.0 - q) * (1.0 - fac),
                  keep=False, s_last=s)
    if up1 * s_noise > 0.0 and up2 > 0.0:
        wa = up2 * s_noise * math.sqrt((s - s_mid) / (s - s_next))
        k = wa / first.cz
        second.cx += k
        second.cl -= k * first.cx
        second.c1 -= k * first.cd
        second.cz = up2 * s_noise * math.sqrt((s_mid - s_next) / (s - s_next))
    return [first, second]


def _alpha(sigma):
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _table(rows, prediction: str) -> np.ndarray:
    """The float64 ``[R, W]`` table of the rows (running order in, row order out: the last row first)."""
    col = {name: c for c, name in enumerate(TABLE_COLUMNS)}
    tab = np.zeros((len(rows), len(TABLE_COLUMNS)), dtype=np.float64)
    for j, row in enumerate(rows):
        out = tab[j]
        a_in = _alpha(row.s)
        if prediction == "epsilon":
            out[col["a"]], out[col["b"]] = 1.0 / a_in, -row.s
        elif prediction == "v":
            out[col["a"]], out[col["b"]] = a_in, -row.s * a_in
        elif prediction == "x0":
            out[col["a"]], out[col["b"]] = 0.0, 1.0
        else:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        a_out = 1.0 if row.final else _alpha(row.s_out)
        out[col["p0"]], out[col["p1"]], out[col["p2"]] = a_out * row.cd, a_out * row.c1, a_out * row.c2
        out[col["p3"]], out[col["hx"]] = a_out * row.c3, row.hx / a_in  # x_sigma = x / alpha_in
        out[col["cz"]] = a_out * row.cz
        if row.keep:  # x_corr = x (kept as x_last), x_next = cx x + ...
            if row.cl:
                raise AssertionError("a row that keeps x cannot read x_last")
            out[col["u"]], out[col["cx"]] = 1.0, a_out * row.cx / a_in
        else:  # x_corr = u x + cl x_last, x_next = x_corr + ...
            out[col["u"]], out[col["cl"]] = a_out * row.cx / a_in, a_out * row.cl / _alpha(row.s_last)
            out[col["cx"]] = 1.0
    return tab[::-1].copy()


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class KPlan(MultistepPlan):
    """A ``MultistepPlan`` of a k-sampler: its rows are model calls, its timesteps fractional.

    :param start_scale: the start ``x`` is ``start_scale`` times the unit normal ``x_T`` (diffusers'
        ``init_noise_sigma`` and ``scale_model_input`` of the first step together).
    :param noisy: whether any row draws noise.
    :param sigma_steps: ``steps``: the sigmas stepped from (``model_calls`` gives the calls).
    """

    start_scale: float = 1.0
    noisy: bool = False
    sigma_steps: int = 0
    step_sigmas: np.ndarray = field(default=None)  # [steps + 1] the sigma schedule, running order

    @property
    def stochastic(self) -> bool:
        return self.noisy

    def callback_timestep(self, i: int):
        t = float(self.timesteps[i])
        return int(t) if t.is_integer() else t

    def tensors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table [R, W] in dtype, timesteps [R])`` on ``device``; the model's timesteps are fractional:
        float32 (as diffusers gives them to the model), float64 for a float64 run."""
        table = torch.as_tensor(self.table, dtype=torch.float64).to(dtype).to(device)
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return table, torch.as_tensor(self.timesteps, dtype=torch.float64).to(t_dtype).to(device)


def make_kplan(schedule: NoiseSchedule, sampler: str, steps: int, prediction: str = "epsilon",
               spacing: str = "linspace", sigma_schedule: str = "default", final_sigmas_type: str = "zero",
               clip_denoised: bool = False, thresholding: tuple[float, float] | None = None, *,
               round_karras_timesteps: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
               order: int | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = math.inf, begin_index: int = 0) -> KPlan:
    """The plan of ``sampler`` over ``steps`` sigma steps (``model_calls(sampler, steps)`` model calls).

    :param eta: the ancestral samplers' and SDE samplers' noise (k-diffusion's ``eta``, 1 by default; 0
        makes them deterministic).
    :param s_noise: k-diffusion's ``s_noise``: the scale of every draw.
    :param order: LMS's order, 1 to 4 (None: 4, diffusers' and k-diffusion's default); only for ``lms``.
    :param s_churn, s_tmin, s_tmax: EDM's stochastic sampling for ``euler``, ``heun`` and ``dpm2``
        (k-diffusion's, Karras et al. 2022 Algorithm 2): each step whose sigma is in ``[s_tmin, s_tmax]``
        first raises it to ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / steps, sqrt 2 - 1)``,
        by a draw of variance ``sigma_hat^2 - sigma^2`` (times ``s_noise^2``), and the model sees
        ``sigma_hat``.  The draw ends the step before (its last row's noise slot); the first step's is
        folded into the start, whose scale is then ``sqrt(sigma_0^2 + sigma_hat_0^2 - sigma_0^2)``: the
        same distribution from one draw.  diffusers' ``EulerDiscreteScheduler.step(s_churn=)`` differs: its
        model sees the un-churned ``x`` at ``sigma``.
    :param round_karras_timesteps: None: as diffusers' scheduler for this sampler (KDPM2 rounds).
    :param begin_index: begin part-way (img2img): the leading sigma steps of the whole plan to skip, as
        diffusers' ``set_begin_index(t_start * scheduler.order)``.  The rows are the whole plan's from that
        step on (the same noise slots); LMS and DPM++ 3M SDE warm up from first order there (their history
        starts empty, as k-diffusion's ``sample_*`` on ``sigmas[begin_index:]``).  The start is the sample at
        that step's sigma (``sigmas[-1]``: ``fastddpm.img2img`` noises an image to it), ``start_scale`` 1.
    """
    _check_choice("sampler", sampler, KSAMPLERS)
    for name, v in (("eta", eta), ("s_noise", s_noise), ("s_churn", s_churn), ("s_tmin", s_tmin)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r} (inf: no upper bound), got {s_tmax!r}")
    if s_churn and sampler not in CHURNED:
        raise ValueError(f"s_churn is for {CHURNED} (k-diffusion's sample_euler/heun/dpm_2), not sampler={sampler!r}")
    if order is not None and sampler != "lms":
        raise ValueError(f"order is LMS's (sampler='lms'), not sampler={sampler!r}'s")
    order = LMS_ORDER if order is None else order
    if not is_int(order) or not 1 <= order <= LMS_ORDER:
        raise ValueError(f"order must be an int in [1, {LMS_ORDER}] (the op keeps three earlier derivatives), "
                         f"got {order!r}")
    if round_karras_timesteps is None:
        round_karras_timesteps = sampler in ("dpm2", "dpm2-a")
    sigmas, ts = ksampler_sigmas(schedule, steps, spacing, sigma_schedule, final_sigmas_type, round_karras_timesteps)
    if sampler in TWO_STAGE and final_sigmas_type != "zero":
        raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is only for single-stage samplers; "
                         f"{sampler} ends on sigma 0")
    if not is_int(begin_index) or not 0 <= begin_index < steps:
        raise ValueError(f"begin_index must be an int in [0, steps) = [0, {steps}) (the leading sigma steps of the "
                         f"{steps}-step plan to skip; at least one must run), got {begin_index!r}")
    b = int(begin_index)
    log_sigmas = np.log(np.sqrt((1.0 - schedule.alphas_cumprod64) / schedule.alphas_cumprod64))
    hats = _churn(sigmas, float(s_churn), float(s_tmin), float(s_tmax))[b:] if s_churn else None
    rows = _rows(sampler, sigmas[b:], ts[b:], log_sigmas, eta=float(eta), s_noise=float(s_noise), order=int(order),
                 churn=hats)
    table = _table(rows, prediction)
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{sampler} table is not finite for this schedule")
    init_sigma = sigmas[0] if spacing in ("linspace", "trailing") else math.sqrt(sigmas[0] ** 2 + 1.0)
    s0 = float(rows[0].s)  # sigma_hat of the first step
    start = math.sqrt(init_sigma**2 + (s0**2 - float(sigmas[0]) ** 2) * float(s_noise) ** 2)
    start_scale = float(_alpha(s0) * start) if b == 0 else 1.0  # begun: the given x is the start
    noisy = bool(np.any(table[:, TABLE_COLUMNS.index("cz")] != 0.0))
    timesteps = np.array([r.t for r in rows], dtype=np.float64)[::-1].copy()
    row_sigmas = np.array([r.s for r in rows], dtype=np.float64)[::-1].copy()
    return KPlan(sampler, timesteps, table, bool(clip_denoised), thresholding, sigmas=row_sigmas,
                 begin_index=b, steps_given=int(steps), start_scale=start_scale, noisy=noisy,
                 sigma_steps=int(steps), step_sigmas=sigmas)
