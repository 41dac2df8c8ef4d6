"""``Denoiser``: the whole model call of one sampling step, built once per batch.

Every sampling path calls ``denoiser(x, t) -> (out, uncond)`` where it used to call ``model(x, t)``:
the eager loop, the engine (eagerly or inside its CUDA graph) and through them the micro-batches and
the distributed shards.  It owns what conditioning adds to the call:

* the family's keywords (``ModelAdapter.label_kwargs``: ``class_labels=``, ``classes=``, ``y=``) and
  the request's ``model_kwargs``, per-sample tensors already sliced with the batch's samples;
* classifier-free guidance (Ho & Salimans 2022): the unconditional keywords (the model's null class,
  or ``uncond_kwargs`` replacing conditional ones), and the call — one on the doubled batch
  ``[uncond; cond]`` as diffusers makes it, or two of ``n`` (``guidance_batching="sequential"``, and
  wherever the two calls' keywords cannot share one batch, e.g. denoising-diffusion-pytorch's
  ``cond_drop_prob``).  It returns the two halves; the step ops combine them (``u + w (c - u)``) in
  their one pass.  With ``guidance_rescale`` (Lin et al. 2023, a per-sample reduction) it combines
  and rescales here and returns ``(guided, None)``.

An engine's denoiser is ``static``: its keyword tensors are buffers a CUDA graph reads, refilled by
``load`` before each batch, as the engine refills its noise key.
"""
from __future__ import annotations

import torch

from .adapters import ModelAdapter
from .checks import watch_output
from .request import SamplingRequest

__all__ = ["Denoiser", "rescale_guidance"]

_MISSING = object()


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, Sec. 3.4 (diffusers' ``rescale_noise_cfg``): move the guided output's per-sample
    standard deviation toward the conditional one's, by ``guidance_rescale`` in [0, 1]."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def _describe(value) -> tuple:
    """What an engine's graph depends on in a keyword value: a tensor's metadata, another value itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    try:
        hash(value)
        return ("value", type(value).__name__, value)
    except TypeError:
        return ("object", id(value))


class Denoiser:
    """The model call of one batch of ``request.n`` samples: ``denoiser(x, t) -> (out, uncond or None)``.

    :param adapter: the model's ``ModelAdapter`` (an engine passes its compiled copy).
    :param request: the batch's ``SamplingRequest`` (``request.slice`` of the whole one).
    :param device: where the keyword tensors go (the sampling device).
    :param static: keep the keyword tensors in buffers of this object (for a CUDA graph); ``load``
        refills them for the next batch.
    :raises ValueError, TypeError: for conditioning the model cannot take (before any sampling).
    """

    def __init__(self, adapter: ModelAdapter, request: SamplingRequest, device, static: bool = False):
        self.adapter = adapter
        self.n = request.n
        self.device = torch.device(device)
        self.static = static
        self.guidance_scale = request.guidance_scale if request.guided else None
        self.guidance_rescale = request.guidance_rescale
        # the step op's guidance_scale: w where the call returns the unconditional half for the op to
        # combine, 1 where there is none (no guidance, or the rescale combined the halves here)
        combines = self.guidance_scale is not None and not self.guidance_rescale
        self.step_scale = self.guidance_scale if combines else 1.0
        self._checked = False
        self.cond, self.uncond = self._keywords(request)
        self.batched, self.batching_reason = self._batching(request.guidance_batching)
        self.doubled = self._doubled() if self.batched else None
        if static:
            self.cond, self.uncond, self.doubled = (self._own(d) for d in (self.cond, self.uncond, self.doubled))

    # -- building the keywords -------------------------------------------------------------
    def _keywords(self, request: SamplingRequest) -> tuple[dict, dict | None]:
        adapter, n = self.adapter, request.n
        labels = request.class_labels
        if labels is not None:
            if adapter.kind in ("fastddpm", "diffusers") and adapter.num_classes is None:
                raise ValueError("class_labels given to an unconditional model (it has no class embedding: "
                                 f"{_no_classes(adapter)})")
            if adapter.num_classes is not None and int(labels.max()) >= adapter.num_classes:
                raise ValueError(f"class_labels must lie in [0, {adapter.num_classes - 1}] (the model's "
                                 f"{adapter.num_classes} classes), got values up to {int(labels.max())}")
            labels = labels.to(self.device)
            if adapter.kind == "denoising_diffusion_pytorch" and not adapter.is_cfg_unet:
                raise ValueError("class_labels given to an unconditional model (denoising-diffusion-pytorch's Unet "
                                 "takes no classes; its classifier_free_guidance.Unet does)")
        elif adapter.is_cfg_unet:
            raise ValueError("denoising-diffusion-pytorch's classifier-free Unet needs class_labels=")
        cond = {**adapter.cond_kwargs(), **(adapter.label_kwargs(labels) if labels is not None else {}),
                **self._checked_kwargs("model_kwargs", request.model_kwargs, n)}
        if self.guidance_scale is None:
            return cond, None
        if request.uncond_kwargs is not None:
            return cond, {**cond, **self._checked_kwargs("uncond_kwargs", request.uncond_kwargs, n)}
        null = adapter.null_kwargs(labels)
        if null is None:
            why = ("the model has no null class" if labels is not None or adapter.num_classes is None else
                   "it is not told the model's null class (a diffusers UNet2DModel trained elsewhere: set "
                   "model.fastddpm_null_class, or pass uncond_kwargs)")
            raise ValueError(f"guidance_scale={self.guidance_scale:g} needs an unconditional model call, and {why}: "
                             "pass uncond_kwargs= (the keywords of the unconditional call, e.g. "
                             "{'encoder_hidden_states': zeros}), or give class_labels= to a model trained with a "
                             "null class (fastddpm train --class-cond)")
        return cond, {**cond, **null}

    def _checked_kwargs(self, name: str, kwargs: dict, n: int) -> dict:
        out = {}
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if value.ndim >= 1 and value.shape[0] not in (n, 1):
                    raise ValueError(f"{name}[{key!r}] has first dimension {value.shape[0]}: a per-sample tensor "
                                     f"needs one row per sample (n={n}), a shared one 1 row or none")
                value = value.to(self.device)
            out[key] = value
        return out

    def _batching(self, wanted: str) -> tuple[bool, str]:
        """Whether guidance runs as one call on the doubled batch, and why (or why not)."""
        if self.uncond is None:
            return False, "no guidance: one model call per step"
        if wanted == "sequential":
            return False, "guidance_batching='sequential': two model calls of n per step"
        for key in self.cond.keys() | self.uncond.keys():
            c, u = self.cond.get(key, _MISSING), self.uncond.get(key, _MISSING)
            if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
                if c.shape[1:] != u.shape[1:] or c.dtype != u.dtype:
                    return False, f"two model calls per step: {key!r} differs in shape or dtype between the calls"
            elif c is not u and not (c is not _MISSING and u is not _MISSING and _same_value(c, u)):
                return False, f"two model calls per step: {key!r} is not the same value in both calls"
        return True, "guidance: one model call on the doubled batch [uncond; cond] per step"

    def _doubled(self) -> dict:
        """The keywords of the doubled batch: tensors as ``[uncond; cond]`` (a shared row expanded)."""
        doubled = {}
        for key, c in self.cond.items():
            u = self.uncond[key]
            if isinstance(c, torch.Tensor):
                if c.ndim == 0:
                    c, u = c.expand(self.n), u.expand(self.n)
                doubled[key] = torch.cat([u.expand(self.n, *u.shape[1:]), c.expand(self.n, *c.shape[1:])])
            else:
                doubled[key] = c
        return doubled

    @staticmethod
    def _own(kwargs):
        if kwargs is None:
            return None
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    # -- the engine's static form ----------------------------------------------------------
    def signature(self) -> tuple:
        """What a captured graph bakes in: the guidance settings and each keyword's metadata or value."""
        def sig(kwargs):
            return None if kwargs is None else tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))
        return (self.guidance_scale, self.guidance_rescale, self.batched, sig(self.cond), sig(self.uncond),
                sig(self.doubled))

    def load(self, other: "Denoiser") -> None:
        """Refill this static denoiser's keyword buffers with those of ``other``, another batch's denoiser
        of the same signature."""
        if not self.static:
            raise RuntimeError("load() is for a static denoiser (an engine's)")
        if other.batched != self.batched or other.n != self.n:
            raise ValueError("load(): the batch is conditioned differently from this engine's")
        for mine, theirs in ((self.cond, other.cond), (self.uncond, other.uncond), (self.doubled, other.doubled)):
            if mine is None:
                continue
            for key, buffer in mine.items():
                value = theirs[key]
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(value)
                elif _describe(buffer) != _describe(value):
                    raise ValueError(f"load(): keyword {key!r} changed value; this engine captured {buffer!r}")

    # -- the call --------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor, watch: torch.Tensor | None = None):
        """``(out, uncond)``: the model's output at ``(x, t)`` and, with guidance, the unconditional one
        for the step op to combine (None without guidance, or when the rescale combined them here).

        :param watch: a 0-dim bool raised on the device by a diverged output (``checks.watch_output``).
        """
        if self.uncond is None:
            out = self._call(x, t, self.cond, x)
            uncond = None
        elif self.batched:
            both = self._call(torch.cat([x, x]), torch.cat([t, t]), self.doubled, None)
            if not self._checked:
                self.adapter.check_output(both, torch.cat([x, x]))
                self._checked = True
            uncond, out = both[: self.n], both[self.n:]
        else:
            out = self._call(x, t, self.cond, x)
            uncond = self._call(x, t, self.uncond, None)
        if watch is not None:
            watch_output(watch, out)
            if uncond is not None:
                watch_output(watch, uncond)
        if uncond is not None and self.guidance_rescale:
            guided = uncond.float() + self.guidance_scale * (out.float() - uncond.float())
            return rescale_guidance(guided, out.float(), self.guidance_rescale), None
        return out, uncond

    def _call(self, x, t, kwargs, check_against):
        out = self.adapter(x, t, **kwargs)
        if check_against is not None and not self._checked:
            self.adapter.check_output(out, check_against)
            self._checked = True
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        """The whole model call as a plain ``forward(x, t)`` (what the CPU planner times)."""
        return self(x, t)


def _same_value(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an object without a plain ==: not the same)
        return False


def _no_classes(adapter: ModelAdapter) -> str:
    if adapter.kind == "diffusers":
        return "UNet2DModel(num_class_embeds=None)"
    return "UNetConfig(num_classes=None)"
