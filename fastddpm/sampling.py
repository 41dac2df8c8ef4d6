"""``fastddpm.sample``: the DDPM sampler (Ho et al. Algorithm 2) for any model, the front door.

It hands over to the modules that sample, each of which depends on the process
(``DDPM.resolve``) and never on another's private names:

* ``fastddpm.eager``: the eager loop, the reference on every device;
* ``fastddpm.engine``: the engine (static buffers, CUDA graphs, an automatic plan);
* ``fastddpm.local``: one process's choice between the two;
* ``fastddpm.distributed``: ``n`` sharded over the ranks, each rank sampling through ``local``.
"""
from __future__ import annotations

import torch

from .diffusion import DDPM
from .distributed import dist_info, sample_distributed
from .local import resolve_pipeline, sample_local
from .request import SamplingRequest

__all__ = ["sample"]


@torch.no_grad()
def sample(model, n: int, *, steps: int | None = None, seed: int = 0, device=None, dtype=None, image_size=None,
           channels=None, batch_size: int | None = None, progress: bool = True, callback=None,
           process: DDPM | None = None, sample_offset: int = 0, distributed: bool = False,
           engine: bool | None = None, threads: int | None = None, class_labels=None, model_kwargs=None,
           guidance_scale: float | None = None, uncond_kwargs=None, guidance_rescale: float = 0.0,
           guidance_batching: str = "batched", noise: torch.Tensor | None = None, **process_options) -> torch.Tensor:
    """Draw ``n`` images from ``model`` with the DDPM reverse process.

    :param model: fastddpm ``UNet``, diffusers ``UNet2DModel``, denoising-diffusion-pytorch
        ``Unet``, or any ``model(x, t)`` (t int64 ``[n]``) returning a tensor shaped like x.  Or a
        diffusers pipeline (``DDPMPipeline``, ``DDIMPipeline``: anything with ``.unet`` and
        ``.scheduler``): its ``unet`` sampled with ``DDPM.from_diffusers(pipeline.scheduler)``, the
        schedule and sampler it was trained/configured with; a ``process=`` given too wins over the
        pipeline's scheduler, and ``process_options`` apply on top of either.
    :param n: number of images.
    :param steps: sampling steps; fewer than T samples the respaced process.  For a multistep
        ``sampler`` (``dpm++2m``, ``dpm++3m``, ``dpm++2m-sde``, ``unipc``) the number of model
        calls, default 20.
    :param seed: noise seed (int in [0, 2**63)); sample i of a seed is fixed.
    :param device: where to sample (default: the model's device).
    :param dtype: model input dtype (default: the model's); x itself stays float32.
    :param image_size, channels: when the model does not say.
    :param batch_size: micro-batch size (default: all ``n`` at once).
    :param progress: show a tqdm bar.
    :param callback: ``callback(i, t, x)`` after each step (step index, model timestep, current x); a
        tensor it returns replaces ``x`` (as diffusers' ``callback_on_step_end`` may change the latents),
        on every path.
    :param process: a ``DDPM`` (default: built from ``process_options``: schedule, prediction,
        variance, clip_denoised, sampler, eta, num_timesteps, ...).
    :param sample_offset: global index of the first sample (for sharding).
    :param distributed: shard ``n`` over the ranks of ``torch.distributed`` and gather the
        images to every rank (``fastddpm.distributed``); equal to one device's images.
    :param engine: run through ``fastddpm.engine`` (static buffers, CUDA graphs, an automatic
        plan; on CUDA ``dtype=None`` then means bfloat16 where supported).  None (default): on a
        CPU yes, with the measured CPU plan (``fastddpm.cpu_plan``: compile only where it pays
        back within the call, the faster input layout, the model's dtype; ``dtype=torch.bfloat16``
        is the low-precision option on CPUs with AVX-512 BF16/AMX), except for the multistep
        samplers (the eager loop unless ``engine=True``); elsewhere no, until the engine's CUDA path has been
        verified on a GPU.  Plan overrides ``cuda_graph``, ``compile``, ``backend``,
        ``micro_batch``, ``steps_per_graph``, ``channels_last`` need the engine (None then
        means yes).
        ``fastddpm.engine.last_plan().explain()`` says what was chosen and why.
    :param threads: torch's CPU threads while sampling (default: torch's setting, which is the
        machine's cores unless changed; on a busy machine 1 is often much steadier).
    :param class_labels: an int, a list of ints or an int64 tensor ``[n]``: each sample's class, given to
        the model the way its family takes it (``fastddpm.adapters``: ``class_labels=`` for fastddpm's
        ``UNet(num_classes=K)`` and diffusers' ``UNet2DModel(num_class_embeds=...)``, ``classes=`` for
        denoising-diffusion-pytorch's classifier-free ``Unet``, ``y=`` for any other callable).
    :param model_kwargs: a dict passed to every model call, ``model(x, t, **model_kwargs)`` (e.g.
        ``encoder_hidden_states`` of a diffusers ``UNet2DConditionModel``); a tensor whose first
        dimension is ``n`` is per-sample and goes with its samples into every micro-batch and shard,
        anything else is passed as it is.
    :param guidance_scale: classifier-free guidance (Ho & Salimans 2022), ``out = u + w (c - u)`` with
        ``w = guidance_scale`` in diffusers' convention (1: the conditional model alone).  The
        unconditional call ``u`` is the model's null class, or ``uncond_kwargs``.  The combine is fused
        into the step op; prediction types and every sampler take it as they take the model output.
    :param uncond_kwargs: keywords of the unconditional call, replacing the conditional ones of the
        same name (e.g. ``{"encoder_hidden_states": zeros}``); per-sample tensors as in ``model_kwargs``.
    :param guidance_rescale: ``phi`` in [0, 1] of Lin et al. 2023 (diffusers' ``guidance_rescale``):
        the guided output's per-sample std moved toward the conditional one's.
    :param guidance_batching: ``"batched"`` (default: one model call on the doubled batch
        ``[uncond; cond]``, as diffusers) or ``"sequential"`` (two calls of ``n``: less memory).
    :param noise: the starting noise ``x_T`` ``[n, C, H, W]`` (diffusers' ``latents``), in place of the
        contract's; the noise of every step still follows ``seed`` and the noise contract.
    :return: float32 ``[n, C, H, W]`` in the model's data range [-1, 1], on ``device``.
    """
    model, process = resolve_pipeline(model, process)
    # the request, checked once here; against the model by the loop that samples it (the eager loop's
    # and the engine's Denoisers), before any sampling starts
    request = SamplingRequest.make(n, seed=seed, sample_offset=sample_offset, callback=callback,
                                   class_labels=class_labels, model_kwargs=model_kwargs,
                                   guidance_scale=guidance_scale, uncond_kwargs=uncond_kwargs,
                                   guidance_rescale=guidance_rescale, guidance_batching=guidance_batching, noise=noise)
    kwargs = dict(steps=steps, device=device, dtype=dtype, image_size=image_size, channels=channels,
                  batch_size=batch_size, process=process, engine=engine, threads=threads, **process_options)
    if distributed:
        x = sample_distributed(model, n, progress=progress and dist_info()[0] == 0, request=request, **kwargs)
    else:
        x = sample_local(model, n, progress=progress, request=request, **kwargs)
    sample.last_seconds = getattr(sample_local, "last_seconds", None)
    return x
