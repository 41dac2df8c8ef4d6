"""Noise schedules: betas and every table derived from them (Ho et al. 2020, §2).

Tables are computed in float64 (as improved-diffusion and
denoising-diffusion-pytorch do) and handed out as float32 tensors on the
device that uses them, cached per device.  ``table_dtype="float32"`` builds
them as diffusers does instead (``NoiseSchedule``): its float32 rounding, for
reproducing diffusers' numbers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from .modes import SPACINGS

__all__ = ["ScheduleKind", "NoiseSchedule", "make_betas", "space_timesteps", "spaced_timesteps", "TABLE_DTYPES",
           "table_dtype_name", "betas_from_float32_cumprod", "diffusers_betas32"]

ScheduleKind = Literal["linear", "cosine", "sigmoid", "quadratic", "custom"]
SCHEDULE_KINDS = ("linear", "cosine", "sigmoid", "quadratic")
TABLE_DTYPES = ("float64", "float32")


def table_dtype_name(table_dtype) -> str:
    """``"float64"`` or ``"float32"`` for a table dtype given as that name, a torch dtype or a numpy dtype;
    anything else raises ValueError naming ``table_dtype``."""
    for name in TABLE_DTYPES:
        if (isinstance(table_dtype, str) and table_dtype == name) or table_dtype is getattr(torch, name) or (
                not isinstance(table_dtype, (str, bool, torch.dtype)) and _is_numpy_dtype(table_dtype, name)):
            return name
    raise ValueError(f"table_dtype must be torch.float64 (the default: exact tables) or torch.float32 (diffusers' "
                     f"float32 rounding), or their names, got {table_dtype!r}")


def _is_numpy_dtype(value, name: str) -> bool:
    try:
        return np.dtype(value) == np.dtype(name)
    except TypeError:
        return False


def betas_from_float32_cumprod(alphas_cumprod32: torch.Tensor) -> np.ndarray:
    """The float64 betas ``1 - abar_t / abar_{t-1}`` of float32 ``alphas_cumprod``: their float64 products
    are within ~1e-13 relative of those values, so they round back to exactly them (how a
    ``table_dtype="float32"`` schedule stores diffusers' float32 ``alphas_cumprod``)."""
    ac = alphas_cumprod32.detach().to("cpu", torch.float32).double().numpy()
    return 1.0 - ac / np.append(1.0, ac[:-1])


def diffusers_betas32(kind: str, num_timesteps: int, beta_start: float, beta_end: float,
                      trained_betas=None) -> torch.Tensor:
    """float32 betas ``[T]`` as diffusers' ``DDPMScheduler.__init__`` builds them (``DDIMScheduler``'s are the
    same but for ``sigmoid``): ``linear`` ``torch.linspace(beta_start, beta_end, T, dtype=torch.float32)``,
    ``scaled_linear`` the same in sqrt(beta) squared, ``squaredcos_cap_v2`` ``betas_for_alpha_bar`` (Python
    floats, then float32), ``sigmoid`` GeoDiff's ``sigmoid(linspace(-6, 6, T)) * (end - start) + start`` in
    float32; ``trained_betas`` (given) ``torch.tensor(trained_betas, dtype=torch.float32)``."""
    T = num_timesteps
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas, dtype=np.float64).reshape(-1).tolist(), dtype=torch.float32)
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float32)
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"diffusers' beta_schedule {kind!r} has no float32 construction here; supported: 'linear', "
                     "'scaled_linear', 'squaredcos_cap_v2', 'sigmoid' or trained_betas")


def _float32_schedule(kind: str, num_timesteps: int, beta_start=None, beta_end=None) -> np.ndarray:
    """A named fastddpm schedule built in float32 as diffusers builds its equal (linear, quadratic:
    ``scaled_linear``, cosine: ``squaredcos_cap_v2``; sigmoid, which diffusers lacks: fastddpm's float64
    betas rounded to float32), its ``alphas_cumprod`` a float32 ``torch.cumprod``: the betas of that."""
    if kind in ("linear", "quadratic"):
        make_betas(kind, num_timesteps, beta_start, beta_end)  # its checks (every beta < 1)
        scale = 1000.0 / num_timesteps
        start = beta_start if beta_start is not None else scale * 1e-4
        end = beta_end if beta_end is not None else scale * 0.02
        betas32 = diffusers_betas32("linear" if kind == "linear" else "scaled_linear", num_timesteps, start, end)
    elif kind == "cosine":
        betas32 = diffusers_betas32("squaredcos_cap_v2", num_timesteps, 0.0, 0.0)
    else:
        betas32 = torch.tensor(make_betas(kind, num_timesteps, beta_start, beta_end), dtype=torch.float32)
    return betas_from_float32_cumprod(torch.cumprod(1.0 - betas32, dim=0))


def _betas_from_alphas_cumprod(alphas_cumprod: np.ndarray, max_beta: float = 0.999) -> np.ndarray:
    prev = np.append(1.0, alphas_cumprod[:-1])
    return np.minimum(1.0 - alphas_cumprod / prev, max_beta)


def make_betas(kind: str, num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """Betas of a named schedule, float64 ``[T]``.

    :param kind: ``linear`` (Ho et al.: 1e-4..0.02 at T=1000, scaled by 1000/T
        for other T, as improved-diffusion), ``cosine`` (Nichol & Dhariwal 2021,
        s=0.008, betas capped at 0.999), ``sigmoid`` (Chen 2023, start=-3,
        end=3, tau=1, as denoising-diffusion-pytorch), ``quadratic`` (linear
        in sqrt(beta), diffusers' ``scaled_linear``).
    :param num_timesteps: T.
    :param beta_start, beta_end: override the linear/quadratic end points
        (unscaled when given).
    """
    T = num_timesteps
    if kind in ("linear", "quadratic"):
        scale = 1000.0 / T
        start = beta_start if beta_start is not None else scale * 1e-4
        end = beta_end if beta_end is not None else scale * 0.02
        if max(start, end) >= 1.0:
            # at beta = 1, alphas_cumprod reaches 0 and 1/sqrt(alphas_cumprod) is infinite
            if beta_end is None:
                why = f"its betas scale by 1000/T: 0.02 * 1000/{T}"
                fix = "use num_timesteps (--timesteps) >= 21 or the cosine schedule"
            else:
                why, fix = "beta_start/beta_end as given", "give beta_start and beta_end below 1"
            raise ValueError(f"the {kind} schedule with num_timesteps={T} has beta_T = {end:.4g} ({why}); every beta "
                             f"must be < 1: {fix}")
        if kind == "linear":
            return np.linspace(start, end, T, dtype=np.float64)
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    if kind == "sigmoid":
        start, end, tau = -3.0, 3.0, 1.0
        steps = np.arange(T + 1, dtype=np.float64) / T
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
        v_start, v_end = sig(start / tau), sig(end / tau)
        f = (-sig((steps * (end - start) + start) / tau) + v_end) / (v_end - v_start)
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"schedule must be one of {SCHEDULE_KINDS} or explicit betas, got {kind!r}")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced over ``[0, T-1]``, both ends kept
    (improved-diffusion's ``space_timesteps(T, [steps])``)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The ``steps`` timesteps a respaced DDPM/DDIM sampler keeps, ascending, by diffusers'
    ``timestep_spacing`` rule (``steps_offset=0``): ``linspace`` is ``space_timesteps`` (equal to
    diffusers' for ``steps >= 2``), ``leading`` is ``0, r, 2r, ...`` with ``r = T // steps``, and
    ``trailing`` is ``round(T - j T / steps) - 1`` (ends at ``T - 1``)."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "linspace":
        return space_timesteps(T, steps)
    if spacing == "leading":
        return [j * (T // steps) for j in range(steps)]
    if spacing == "trailing":
        return sorted(int(t) - 1 for t in np.round(np.arange(T, 0, -T / steps)))
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance schedule ``beta_1..beta_T`` and its derived tables.

    Index ``i`` of every table is the process's own step; ``timesteps[i]`` is
    the timestep the model was trained with at that step (``i`` itself unless
    the schedule is respaced).

    :param betas: float64 numpy array ``[T]``, each in (0, 1].
    :param timesteps: original timesteps kept by a respacing.
    :param kind: the name it was made from, for serialisation.
    :param base_num_timesteps: T of the process it was respaced from (0: its own length, or past its
        last timestep).
    :param table_dtype: ``"float64"`` (the default): every table is the exact math of the betas in float64.
        ``"float32"``: the tables diffusers' ``DDPMScheduler``/``DDIMScheduler`` compute, to reproduce its
        rounding: ``alphas_cumprod`` is rounded to float32 (diffusers keeps a float32 ``torch.cumprod``; the
        betas of ``make(..., table_dtype="float32")`` are built in float32 as diffusers builds them), and the
        per-step quantities are diffusers' ``step`` arithmetic in float32 on it (``1 - abar``, ``abar_t /
        abar_{t-1}``, ``beta_t = 1 - that``: near t = 0 its cancellation moves the DDPM posterior
        coefficients by ~1e-4 relative), upcast to float64.
    """

    betas: np.ndarray
    timesteps: tuple[int, ...] = ()
    kind: str = "custom"
    base_num_timesteps: int = 0
    table_dtype: str = "float64"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            bad = int(np.flatnonzero(~(np.isfinite(betas) & (betas > 0) & (betas < 1)))[0])
            raise ValueError(f"betas must be finite and in (0, 1) (at 1, alphas_cumprod is 0 and the reverse "
                             f"coefficients are infinite): beta[{bad}] = {betas[bad]!r} in the {self.kind} schedule "
                             f"of {betas.size} steps")
        object.__setattr__(self, "betas", betas)
        ts = tuple(int(t) for t in self.timesteps) or tuple(range(betas.size))
        if len(ts) != betas.size:
            raise ValueError(f"timesteps has {len(ts)} entries for {betas.size} betas")
        object.__setattr__(self, "timesteps", ts)
        base = self.base_num_timesteps or max(betas.size, max(ts) + 1)  # 0: a dict from before the field
        if base < betas.size or max(ts) >= base:
            raise ValueError(f"base_num_timesteps={base} is smaller than the schedule's timesteps")
        object.__setattr__(self, "base_num_timesteps", base)
        object.__setattr__(self, "table_dtype", table_dtype_name(self.table_dtype))

    # -- constructors -------------------------------------------------------------
    @classmethod
    def make(cls, kind: str | Sequence[float] = "linear", num_timesteps: int = 1000, table_dtype="float64",
             **kw) -> "NoiseSchedule":
        """A named schedule (``linear``, ``cosine``, ``sigmoid``, ``quadratic``) or explicit betas.

        :param table_dtype: ``"float64"``/``torch.float64`` (exact tables) or ``"float32"``/``torch.float32``:
            a named schedule built in float32 as diffusers builds its equal (``_float32_schedule``) and
            diffusers' float32 tables (see the class); explicit betas are taken as they are and their
            ``alphas_cumprod`` rounded to float32.
        """
        table_dtype = table_dtype_name(table_dtype)
        if isinstance(kind, str):
            if not isinstance(num_timesteps, int) or num_timesteps < 1:
                raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
            make = _float32_schedule if table_dtype == "float32" else make_betas
            return cls(make(kind, num_timesteps, **kw), kind=kind, table_dtype=table_dtype)
        return cls(np.asarray(kind, dtype=np.float64), kind="custom", table_dtype=table_dtype)

    def respace(self, steps: int | Sequence[int]) -> "NoiseSchedule":
        """The respaced process over fewer steps (improved-diffusion's ``respace.py``):
        keep ``alphas_cumprod`` at the chosen timesteps and recompute betas from it.

        :param steps: number of steps (evenly spaced, both ends kept) or the
            explicit timesteps to keep.
        """
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
            keep = space_timesteps(self.num_timesteps, int(steps))
        elif isinstance(steps, (str, bytes)) or not isinstance(steps, (Sequence, np.ndarray, torch.Tensor)):
            raise TypeError(f"steps must be a number of steps (int) or a list of timesteps, got {steps!r}")
        else:
            values = list(np.asarray(steps).reshape(-1)) if not isinstance(steps, Sequence) else list(steps)
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values):
                raise TypeError(f"respace timesteps must be ints, got {values[:8]!r}")
            keep = sorted({int(t) for t in values})
            if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
                raise ValueError(f"respace timesteps must lie in [0, {self.num_timesteps - 1}]")
        ac = self.alphas_cumprod64[keep]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])
        return NoiseSchedule(betas, timesteps=tuple(self.timesteps[k] for k in keep), kind=self.kind,
                             base_num_timesteps=self.base_num_timesteps, table_dtype=self.table_dtype)

    def truncate(self, steps: int) -> "NoiseSchedule":
        """The process of this one's first ``steps`` steps (its lowest timesteps), for sampling that
        begins part-way (``DiffusionConfig.begin_index``).  The betas are these betas, not recomputed,
        so row ``i`` of every table (and of the step coefficients) is this schedule's row ``i`` exactly.

        :param steps: steps kept, in ``[1, num_timesteps]``.
        """
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"truncate keeps steps in [1, {self.num_timesteps}], got {steps!r}")
        if steps == self.num_timesteps:
            return self
        return NoiseSchedule(self.betas[:steps].copy(), timesteps=self.timesteps[:steps], kind=self.kind,
                             base_num_timesteps=self.base_num_timesteps, table_dtype=self.table_dtype)

    # -- float64 tables -----------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return int(self.betas.size)

    @property
    def is_respaced(self) -> bool:
        """Whether steps were left out of the process it comes from (any ``respace`` to fewer steps, the
        first ones too: ``respace(range(10))`` of T=1000 is a 10-step process, not a T=10 one)."""
        return self.timesteps != tuple(range(self.base_num_timesteps))

    @property
    def alphas_cumprod64(self) -> np.ndarray:
        """float64 ``[T]``; with ``table_dtype="float32"`` the float32 rounding of it (upcast)."""
        ac = np.cumprod(1.0 - self.betas)
        return ac if self.table_dtype == "float64" else ac.astype(np.float32).astype(np.float64)

    def tables64(self) -> dict[str, np.ndarray]:
        """Every derived table in float64 (names as improved-diffusion); with ``table_dtype="float32"``
        diffusers' float32 values of them, upcast (``_tables32``)."""
        if self.table_dtype == "float32":
            return self._tables32()
        betas = self.betas
        ac = self.alphas_cumprod64
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return {
            "betas": betas,
            "alphas": 1.0 - betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # Eq. 7: posterior mean = coef1 * x0 + coef2 * x_t
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "snr": ac / (1.0 - ac),
        }

    def _tables32(self) -> dict[str, np.ndarray]:
        """The tables as diffusers' ``DDPMScheduler.step``/``_get_variance`` and ``add_noise`` compute them, in
        float32 from the float32 ``alphas_cumprod`` (the previous one 1 before step 0), upcast to float64."""
        ac = torch.from_numpy(self.alphas_cumprod64).to(torch.float32)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        beta_prod, beta_prod_prev = 1 - ac, 1 - ac_prev
        alphas = ac / ac_prev
        betas = 1 - alphas  # diffusers' current_beta_t
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac**0.5,
            "sqrt_one_minus_alphas_cumprod": beta_prod**0.5,
            # x0 = (x_t - beta_prod**0.5 * eps) / ac**0.5
            "sqrt_recip_alphas_cumprod": 1 / ac**0.5,
            "sqrt_recipm1_alphas_cumprod": beta_prod**0.5 / ac**0.5,
            "posterior_variance": torch.clamp(beta_prod_prev / beta_prod * betas, min=1e-20),
            "posterior_mean_coef1": ac_prev**0.5 * betas / beta_prod,
            "posterior_mean_coef2": alphas**0.5 * beta_prod_prev / beta_prod,
            "snr": ac / beta_prod,
        }
        return {k: v.double().numpy() for k, v in tables.items()}

    # -- float32 tensors per device -----------------------------------------------
    def table(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """A float32 table on ``device`` (cached)."""
        key = (name, str(torch.device(device or "cpu")))
        if key not in self._cache:
            arr = self.tables64()[name]
            self._cache[key] = torch.as_tensor(arr, dtype=torch.float64).to(torch.float32).to(device or "cpu")
        return self._cache[key]

    def timesteps_tensor(self, device=None) -> torch.Tensor:
        """int64 ``[T]``: the model timestep of each step."""
        key = ("timesteps", str(torch.device(device or "cpu")))
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.timesteps, dtype=torch.int64, device=device or "cpu")
        return self._cache[key]

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "betas": self.betas.tolist(), "timesteps": list(self.timesteps),
             "base_num_timesteps": self.base_num_timesteps}
        if self.table_dtype != "float64":  # the default stays out: earlier files read the same
            d["table_dtype"] = self.table_dtype
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        return cls(np.asarray(d["betas"], dtype=np.float64), timesteps=tuple(d["timesteps"]),
                   kind=d.get("kind", "custom"), base_num_timesteps=int(d.get("base_num_timesteps", 0)),
                   table_dtype=d.get("table_dtype", "float64"))
