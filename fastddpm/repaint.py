"""Inpainting as every sampling path runs it: the request's ``Inpainting`` and the RePaint walk.

``fastddpm.inpaint`` (the front door) puts an ``Inpainting`` (the known image, the mask, RePaint's
jumps) into the ``SamplingRequest``; the request slices it with its samples for micro-batches and
shards, and each loop (``fastddpm.eager``, the engine) asks ``make_walk`` for the walk's tables.

The walk (Lugmayr et al. 2022; diffusers' ``RePaintScheduler.set_timesteps`` in step indices) is a
list of *visits*: a reverse one calls the model and the fused step with the blend (``ops.ddpm_step``
with ``known``/``mask``: ``x = m (ka known + kb z1) + (1 - m) step(x, out)``), an up one re-noises
``x_{k-1} -> x_k`` with the same op and a row ``(1, 0, 0, sqrt(1 - beta_k), sqrt(beta_k))``, no model
call.  Rows are in the loops' counter order, ``r = V - 1 - v`` for visit ``v`` (the counter runs
down from ``V - 1`` as a sampler's step index does), and the row is the noise slot: ``z`` of row
``r`` is slot ``r``, ``x_T`` slot ``V``, the blend's ``z1`` slot ``V + 1 + r``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .checks import is_int
from .ops import reference

__all__ = ["Inpainting", "Walk", "repaint_visits", "walk_visits", "make_walk"]


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting:
    """What to keep and how to resample: ``known`` and ``mask`` float32 ``[n, C, H, W]`` (mask 1 = keep,
    0/1 only), RePaint's ``jump_length`` and ``jump_n_sample`` (1: no resampling, the replace method)."""

    known: torch.Tensor
    mask: torch.Tensor
    jump_length: int = 10
    jump_n_sample: int = 10

    def slice(self, start: int, stop: int) -> "Inpainting":
        return dataclasses.replace(self, known=self.known[start:stop], mask=self.mask[start:stop])

    def signature(self) -> tuple:
        """The walk's form (the engine's key): the buffers' contents are not part of it."""
        return ("inpaint", self.jump_length, self.jump_n_sample)


def repaint_visits(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[tuple[bool, int]]:
    """The walk of RePaint over a process of ``num_steps`` steps: ``(up, k)`` per visit, in order.

    ``(False, k)``: the reverse step ``x_k -> x_{k-1}`` (a model call); ``(True, k)``: back up
    ``x_{k-1} -> x_k``.  The same walk as diffusers' ``RePaintScheduler.set_timesteps`` (its timesteps
    divided by ``T // steps``; an up visit is its ``undo_step(t_last)``).  ``jump_n_sample=1``: no
    jumps, ``num_steps`` reverse visits (the ``replace`` method).
    """
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    walk, t = [], num_steps
    while t >= 1:
        t -= 1
        walk.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                walk.append(t)
    visits, last = [], walk[0] + 1
    for t in walk:
        visits.append((False, t) if t < last else (True, last))
        last = t
    return visits


@dataclasses.dataclass(frozen=True, eq=False)
class Walk:
    """A walk's tables on a device, row ``r`` = visit ``V - 1 - r``: ``reverse`` float32 ``[V, 8]`` (the
    step's ``(a, b, c0, c1, sigma, c2)`` and the blend's ``(sqrt(abar_{k-1}), sqrt(1 - abar_{k-1}))``:
    ``reference.INPAINT_COEF_COLUMNS``), ``reverse_step`` its first six columns (``COEF_COLUMNS``: the
    thresholding reads ``a, b``), ``up`` ``[V, 6]``, ``timesteps``
    int64 ``[V]`` (each row's model timestep), ``up_rows`` (whether each row goes up), ``visits``."""

    visits: tuple
    up_rows: tuple
    reverse: torch.Tensor
    reverse_step: torch.Tensor
    up: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        """Rows (visits): the loops' step count; the noise uses ``2 V + 1`` slots."""
        return len(self.visits)


def walk_tables(process, visits) -> dict[str, np.ndarray]:
    """The float64 tables of ``visits`` over ``process`` (``Walk``'s, before the cast), in row order."""
    tb = process.schedule.tables64()
    coefs = process.step_coefficients()
    V = len(visits)
    width = reference.COEF_WIDTH
    rev, up = np.zeros((V, reference.INPAINT_COEF_WIDTH)), np.zeros((V, width))
    timesteps = np.zeros(V, dtype=np.int64)
    kept = np.asarray(process.schedule.timesteps, dtype=np.int64)
    for v, (is_up, k) in enumerate(visits):
        r = V - 1 - v
        if is_up:
            up[r] = (1.0, 0.0, 0.0, np.sqrt(1.0 - tb["betas"][k]), np.sqrt(tb["betas"][k]), 0.0)  # c2 = 0
        else:
            ac_prev = tb["alphas_cumprod_prev"][k]
            rev[r, :width] = coefs[k]
            rev[r, width:] = (np.sqrt(ac_prev), np.sqrt(1.0 - ac_prev))
        timesteps[r] = kept[k]
    return {"reverse": rev, "up": up, "timesteps": timesteps}


def walk_visits(process, inpainting: Inpainting) -> list[tuple[bool, int]]:
    """The visits of ``inpainting``'s jumps over ``process``, which must be a one-step sampler's."""
    if process.is_multistep:
        raise ValueError(f"inpainting runs the one-step samplers (ddpm, ddim): RePaint goes back up the chain, "
                         f"which a multistep solver's history cannot; got sampler={process.config.sampler!r}")
    return repaint_visits(process.num_steps, inpainting.jump_length, inpainting.jump_n_sample)


def make_walk(process, inpainting: Inpainting, device) -> Walk:
    """The walk of ``inpainting``'s jumps over ``process`` (a one-step sampler's), its tables on ``device``."""
    visits = walk_visits(process, inpainting)
    t = walk_tables(process, visits)
    rev = torch.as_tensor(t["reverse"]).to(torch.float32).to(device)
    return Walk(visits=tuple(visits), up_rows=tuple(up for up, _ in reversed(visits)), reverse=rev,
                reverse_step=rev[:, :reference.COEF_WIDTH].contiguous(), up=torch.as_tensor(t["up"]).to(torch.float32).to(device),
                timesteps=torch.as_tensor(t["timesteps"]).to(device))
