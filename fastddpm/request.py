"""``SamplingRequest``: what ``fastddpm.sample`` was asked for, resolved once and frozen.

Every sampling path (the eager loop, the engine and its micro-batches, the distributed shards)
receives one request and asks it for the samples it owns with ``request.slice(a, b)``: the
per-sample tensors (class labels, per-sample ``model_kwargs`` and ``uncond_kwargs``, the starting
noise ``x_T``) sliced with their samples and the sample offset moved, so no path computes a
slice by hand.  ``fastddpm.denoiser.Denoiser`` turns a request's conditioning into the model call.

A value of ``model_kwargs``/``uncond_kwargs`` is *per-sample* when it is a tensor whose first
dimension is the request's ``n``; anything else (a tensor of another first dimension, a number, a
string) is passed to every model call as it is.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

import torch

from .checks import check_sample_args, is_int
from .noise import check_seed
from .repaint import Inpainting

__all__ = ["SamplingRequest", "GUIDANCE_BATCHING", "GuidanceBatching", "REQUEST_OPTIONS"]

# The conditioning keywords of ``fastddpm.sample``, declared here once: the layers below it (local,
# eager, engine, distributed) take them as options and hand them to ``SamplingRequest.from_options``.
REQUEST_OPTIONS = ("class_labels", "model_kwargs", "guidance_scale", "uncond_kwargs", "guidance_rescale",
                   "guidance_batching", "noise")

GuidanceBatching = Literal["batched", "sequential"]
GUIDANCE_BATCHING: tuple[str, ...] = ("batched", "sequential")


def _labels(class_labels, n: int) -> torch.Tensor | None:
    """``class_labels`` (int, list of ints, integer tensor ``[n]`` or 0-dim) as int64 ``[n]``."""
    if class_labels is None:
        return None
    if is_int(class_labels):
        return torch.full((n,), class_labels, dtype=torch.int64)
    if isinstance(class_labels, (list, tuple)):
        if not all(is_int(v) for v in class_labels):
            raise TypeError(f"class_labels must be an int, a list of ints or an integer tensor [n], got a "
                            f"list holding {sorted({type(v).__name__ for v in class_labels if not is_int(v)})}")
        class_labels = torch.tensor(list(class_labels), dtype=torch.int64)
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(f"class_labels must be an int, a list of ints or an integer tensor [n], "
                        f"got {type(class_labels).__name__}")
    if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.is_complex():
        raise TypeError(f"class_labels must be integers, got a {class_labels.dtype} tensor")
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(n)
    if class_labels.ndim != 1 or class_labels.shape[0] != n:
        raise ValueError(f"class_labels must have one label per sample: shape ({n},) for n={n}, "
                         f"got {tuple(class_labels.shape)}")
    labels = class_labels.to(torch.int64)
    if n and int(labels.min()) < 0:
        raise ValueError(f"class_labels must be >= 0, got {int(labels.min())}")
    return labels


def _kwargs(name: str, kwargs) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments for the model, got {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise TypeError(f"{name} keys must be keyword names, got {bad!r}")
    for reserved in ("x", "t", "sample", "timestep"):
        if reserved in kwargs:
            raise ValueError(f"{name}[{reserved!r}]: the model's input and timestep are fastddpm's to pass")
    return dict(kwargs)


def _noise(noise, n: int) -> torch.Tensor | None:
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor x_T of shape [n, C, H, W], got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.ndim < 2 or noise.shape[0] != n:
        raise ValueError(f"noise must be the starting noise x_T of shape [n, C, H, W] with n={n}, "
                         f"got {tuple(noise.shape)}")
    return noise


def _inpainting(inpainting, n: int):
    if inpainting is None:
        return None
    if not isinstance(inpainting, Inpainting):
        raise TypeError(f"inpainting must be a fastddpm.repaint.Inpainting, got {type(inpainting).__name__}")
    if inpainting.known.shape[0] != n or inpainting.mask.shape != inpainting.known.shape:
        raise ValueError(f"inpainting's known image and mask must both be [n, C, H, W] with n={n}, got "
                         f"{tuple(inpainting.known.shape)} and {tuple(inpainting.mask.shape)}")
    return inpainting


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingRequest:
    """The samples ``[sample_offset, sample_offset + n)`` of ``seed``, and how the model is conditioned.

    Build with :meth:`make` (which checks every argument); :meth:`slice` gives the request of a part.

    :param n: number of samples.
    :param seed: the noise seed.
    :param sample_offset: global index of the first sample (the noise contract's sample index).
    :param class_labels: int64 ``[n]`` on the CPU, or None.
    :param model_kwargs: keywords of every model call (per-sample tensors have first dimension ``n``).
    :param uncond_kwargs: keywords of the unconditional call of classifier-free guidance, replacing
        the conditional ones of the same name (None: the model's null class).
    :param guidance_scale: ``w`` of ``out = u + w (c - u)`` (diffusers' convention), or None.
    :param guidance_rescale: ``phi`` of Lin et al. 2023 (0: off).
    :param guidance_batching: ``"batched"`` (one model call on the doubled batch) or ``"sequential"``.
    :param noise: the starting noise ``x_T`` ``[n, C, H, W]`` (None: the noise contract's slot K).
    :param callback: ``callback(i, t, x)`` after each step; a tensor it returns replaces ``x``.
    :param inpainting: a ``fastddpm.repaint.Inpainting`` (the known image and mask, sliced with their
        samples, and RePaint's jumps) for ``fastddpm.inpaint``, or None: a plain sample.
    """

    n: int
    seed: int = 0
    sample_offset: int = 0
    class_labels: torch.Tensor | None = None
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uncond_kwargs: Mapping[str, Any] | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    guidance_batching: GuidanceBatching = "batched"
    noise: torch.Tensor | None = None
    callback: Callable | None = None
    inpainting: Inpainting | None = None
    # the names of model_kwargs / uncond_kwargs that are per-sample, fixed when the request is made
    # (a slice of m samples must not take a shared tensor of first dimension m for a per-sample one)
    per_sample_names: frozenset = frozenset()
    per_sample_uncond_names: frozenset = frozenset()

    @classmethod
    def make(cls, n: int, *, seed: int = 0, sample_offset: int = 0, class_labels=None, model_kwargs=None,
             uncond_kwargs=None, guidance_scale=None, guidance_rescale=0.0, guidance_batching="batched",
             noise=None, callback=None, inpainting=None) -> "SamplingRequest":
        """Check the arguments of ``fastddpm.sample`` that do not need the model, and freeze them.

        (What needs the model — labels in its range, a null class for guidance — is checked by
        ``fastddpm.denoiser.Denoiser``, also before any sampling starts.)
        """
        check_sample_args(n, sample_offset, None, callback)
        check_seed(seed)
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                    or not math.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be a finite number (w; 1 is the conditional model alone) "
                                 f"or None, got {guidance_scale!r}")
            guidance_scale = float(guidance_scale)
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) \
                or not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if guidance_batching not in GUIDANCE_BATCHING:
            raise ValueError(f"guidance_batching must be one of {GUIDANCE_BATCHING}, got {guidance_batching!r}")
        if guidance_scale is None and (uncond_kwargs is not None or guidance_rescale):
            given = "uncond_kwargs" if uncond_kwargs is not None else "guidance_rescale"
            raise ValueError(f"{given} is for classifier-free guidance: give guidance_scale= too")
        model_kwargs = _kwargs("model_kwargs", model_kwargs)
        uncond = None if uncond_kwargs is None else _kwargs("uncond_kwargs", uncond_kwargs)

        def per_sample(kwargs):
            return frozenset(k for k, v in (kwargs or {}).items()
                             if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n)

        return cls(n=n, seed=seed, sample_offset=sample_offset, class_labels=_labels(class_labels, n),
                   model_kwargs=model_kwargs, uncond_kwargs=uncond, guidance_scale=guidance_scale,
                   guidance_rescale=float(guidance_rescale), guidance_batching=guidance_batching,
                   noise=_noise(noise, n), callback=callback, inpainting=_inpainting(inpainting, n),
                   per_sample_names=per_sample(model_kwargs),
                   per_sample_uncond_names=per_sample(uncond))

    @classmethod
    def from_options(cls, n: int, options: dict, *, seed: int = 0, sample_offset: int = 0, callback=None,
                     request: "SamplingRequest | None" = None) -> "SamplingRequest":
        """The request of a sampling layer's arguments: ``request`` if one was handed down (then no
        conditioning option may be given beside it), else one made from ``n``, ``seed``, ``sample_offset``,
        ``callback`` and the ``REQUEST_OPTIONS`` popped from ``options`` (the rest stays there)."""
        given = {k: options.pop(k) for k in REQUEST_OPTIONS if k in options}
        if request is None:
            return cls.make(n, seed=seed, sample_offset=sample_offset, callback=callback, **given)
        if not isinstance(request, cls):
            raise TypeError(f"request must be a SamplingRequest, got {type(request).__name__}")
        if given:
            raise TypeError(f"give {sorted(given)} to the request, not beside it")
        if request.n != n:
            raise ValueError(f"request is for n={request.n} samples, not {n}")
        return request

    # -- what it holds ---------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        """Classifier-free guidance with an unconditional branch (``w = 1`` is the conditional model alone)."""
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    @property
    def conditioned(self) -> bool:
        """Whether the model call takes anything beyond ``(x, t)``."""
        return self.class_labels is not None or bool(self.model_kwargs) or self.guided

    # -- the one operation -----------------------------------------------------------------
    def slice(self, start: int, stop: int) -> "SamplingRequest":
        """The request of samples ``[start, stop)`` of this one (indices relative to it): the per-sample
        tensors sliced, the sample offset moved by ``start``; everything else shared."""
        if not (is_int(start) and is_int(stop) and 0 <= start < stop <= self.n):
            raise ValueError(f"slice must satisfy 0 <= start < stop <= n={self.n}, got [{start}, {stop})")
        if (start, stop) == (0, self.n):
            return self

        def cut(kwargs, names):
            if kwargs is None:
                return None
            return {k: v[start:stop] if k in names else v for k, v in kwargs.items()}

        return dataclasses.replace(
            self, n=stop - start, sample_offset=self.sample_offset + start,
            class_labels=None if self.class_labels is None else self.class_labels[start:stop],
            model_kwargs=cut(self.model_kwargs, self.per_sample_names),
            uncond_kwargs=cut(self.uncond_kwargs, self.per_sample_uncond_names),
            noise=None if self.noise is None else self.noise[start:stop],
            inpainting=None if self.inpainting is None else self.inpainting.slice(start, stop))

    def batches(self, size: int):
        """``(start, request)`` of each micro-batch of at most ``size`` samples, in order."""
        for start in range(0, self.n, size):
            yield start, self.slice(start, min(start + size, self.n))


def check_start_noise(request: SamplingRequest, shape) -> None:
    """The request's ``noise`` (x_T), if any, has the batch shape ``[n, C, H, W]`` the model samples."""
    if request.noise is not None and tuple(request.noise.shape) != tuple(shape):
        raise ValueError(f"noise must be x_T of shape {tuple(shape)} (n and the model's image shape), "
                         f"got {tuple(request.noise.shape)}")
    if request.noise is not None and not bool(torch.isfinite(request.noise).all()):
        raise ValueError("noise (x_T) has values that are not finite")


def replaced_x(returned, x: torch.Tensor) -> torch.Tensor:
    """What a callback's return value makes of ``x``: None keeps it, a tensor of its shape replaces it
    (as diffusers' ``callback_on_step_end`` may change the latents)."""
    if returned is None:
        return x
    if not isinstance(returned, torch.Tensor) or not returned.is_floating_point():
        raise TypeError(f"callback must return None or a float tensor shaped like x {tuple(x.shape)}, got "
                        f"{returned.dtype if isinstance(returned, torch.Tensor) else type(returned).__name__}")
    if tuple(returned.shape) != tuple(x.shape):
        raise ValueError(f"callback returned shape {tuple(returned.shape)}; x has shape {tuple(x.shape)}")
    return returned.to(device=x.device, dtype=x.dtype)
