"""The eager sampling loop (Ho et al. Algorithm 2) for any model: ``fastddpm.sample(..., engine=False)``.

This loop runs on every device; it is the reference that the engine (``fastddpm.engine``) is held
to.  Noise follows the contract (``noise.py``): ``x_T`` is slot K and the noise of step ``i`` is slot
``i`` of each sample's stream, so sample ``i`` of a seed is the same whatever ``n`` or the batch
split.  The multistep solvers (``fastddpm.multistep``) run the same loop with their own table and
history; ``steps`` is then their number of model calls.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import multistep, ops
from .adapters import ModelAdapter
from .checks import check_finite_values, check_float_dtype, check_output_flag, check_sample_args, watch_output
from .diffusion import DDPM
from .noise import check_noise_capacity, check_seed
from .ops import reference

__all__ = ["sample_eager"]


@torch.no_grad()
def sample_eager(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None, image_size=None,
                 channels=None, batch_size: int | None = None, progress: bool = True, callback=None,
                 process: DDPM | None = None, sample_offset: int = 0, **process_options) -> torch.Tensor:
    """``fastddpm.sample(..., engine=False)`` on this process: the same arguments (less ``distributed``,
    ``engine`` and ``threads``, which ``fastddpm.sample`` handles), the same result.

    :return: float32 ``[n, C, H, W]`` in [-1, 1] on ``device``.
    """
    check_sample_args(n, sample_offset, batch_size, callback)
    check_seed(seed)
    process = DDPM.resolve(process, steps, process_options)
    adapter = ModelAdapter(model, image_size=image_size, channels=channels)
    device = torch.device(device) if device is not None else adapter.device
    dtype = dtype if dtype is not None else adapter.dtype
    check_float_dtype("dtype", dtype)
    shape = adapter.shape(n)
    numel = int(torch.Size(shape[1:]).numel())
    plan = process.multistep_plan(steps) if process.is_multistep else None
    num_steps = plan.num_steps if plan is not None else process.num_steps
    check_noise_capacity(numel, num_steps + 1, sample_offset + n - 1)

    batch_size = batch_size or n
    chunks = []
    bar = tqdm(total=num_steps * ((n + batch_size - 1) // batch_size), disable=not progress,
               desc="sampling", unit="step", leave=False)
    run_batch = _sample_batch if plan is None else _multistep_batch
    watch = torch.zeros((), dtype=torch.bool, device=device)  # any model output non-finite or beyond the limit
    for first in range(0, n, batch_size):
        m = min(batch_size, n - first)
        chunks.append(run_batch(adapter, plan or process, (m, *shape[1:]), seed, sample_offset + first, device,
                                dtype, callback, bar, watch))
    bar.close()
    x = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    check_output_flag(watch)  # the x0 clip keeps a diverged model's images finite: refuse them
    check_finite_values("the sampled images", x)
    return x


def _model_output(adapter, x, t, dtype, first: bool, watch: torch.Tensor) -> torch.Tensor:
    """The model's output at ``(x, t)``, run in ``dtype`` (autocast where it is not the weights'),
    its shape checked on the ``first`` step, and ``watch`` raised by a diverged output (``watch_output``)."""
    autocast = dtype != adapter.dtype
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        out = adapter(x.to(dtype) if not autocast else x, t)
    if first:
        adapter.check_output(out, x)
    watch_output(watch, out)
    return out


def _sample_batch(adapter, process, shape, seed, sample_offset, device, dtype, callback, bar, watch):
    tables = process.tables(device)
    coefs, timesteps = tables["coefs"], tables["timesteps"]
    K = process.num_steps
    x = reference.batch_noise(seed, sample_offset, K, shape, device)  # x_T: slot K
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out = _model_output(adapter, x, timesteps[step], dtype, i == K - 1, watch)
        x = ops.ddpm_step(x, out, step, coefs, seed=seed, sample_offset=sample_offset,
                          clip_denoised=process.config.clip_denoised)
        bar.update(1)
        if callback is not None:
            callback(i, int(process.schedule.timesteps[i]), x)
    return x


def _multistep_batch(adapter, plan, shape, seed, sample_offset, device, dtype, callback, bar, watch):
    """The same loop for a multistep solver: row ``i`` of its table, its history on the device,
    SDE noise from slot ``i`` (as the DDPM step's), drawn inside the fused ``multistep_step``."""
    table, timesteps = plan.tensors(device)
    K = plan.num_steps
    x = reference.batch_noise(seed, sample_offset, K, shape, device)  # x_T: slot K
    history = multistep.new_history(x)
    for i in reversed(range(K)):
        step = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        out = _model_output(adapter, x, timesteps[step], dtype, i == K - 1, watch)
        x = ops.multistep_step(x, out, history, step[0], table, seed=seed, sample_offset=sample_offset,
                               clip_denoised=plan.clip_denoised, stochastic=plan.stochastic)
        bar.update(1)
        if callback is not None:
            callback(i, int(plan.timesteps[i]), x)
    return x
