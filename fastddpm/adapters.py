"""Call any supported model as ``model(x, t, **kwargs) -> predicted tensor``.

Accepted as they are: fastddpm's ``UNet``; diffusers' ``UNet2DModel`` (output
``.sample``; image size and channels read from its config) and ``UNet2DConditionModel``;
denoising-diffusion-pytorch's ``Unet`` (channels read from it) and its classifier-free
``classifier_free_guidance.Unet``; and any callable ``model(x, t, **kwargs)`` with ``t`` an
int64 tensor ``[n]``.

The adapter is the one place that knows how a family takes class labels and what its
unconditional call is (``label_kwargs``, ``null_kwargs``):

=================================  ======================  ==========================================
family                             labels                  unconditional (classifier-free guidance)
=================================  ======================  ==========================================
fastddpm ``UNet(num_classes=K)``   ``class_labels=y``      the null class ``K``
diffusers ``UNet2DModel``          ``class_labels=y``      ``model.fastddpm_null_class`` if set (the
                                                           fastddpm trainer sets it), else
                                                           ``uncond_kwargs`` must say
d-d-pytorch classifier-free Unet   ``classes=y``           ``cond_drop_prob=1.0`` (its null embedding)
anything else (guided-diffusion)   ``y=y``                 ``uncond_kwargs`` must say
=================================  ======================  ==========================================
"""
from __future__ import annotations

import torch
from torch import nn

from .checks import is_int

__all__ = ["ModelAdapter"]


def _as_hw(size, name="image_size"):
    if size is None:
        return None
    if is_int(size):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        hw = tuple(size)
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return hw


class ModelAdapter:
    """Uniform view of a denoising model.

    :param model: the model.
    :param image_size: int or (H, W); overrides what the model says.
    :param channels: input channels; overrides what the model says.
    """

    def __init__(self, model, image_size=None, channels=None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        self.model = model
        module = type(model).__module__
        config = getattr(model, "config", None)
        if type(model).__name__ == "UNet2DModel" or (module.startswith("diffusers") and hasattr(config, "sample_size")):
            self.kind = "diffusers"
            found_size, found_channels = config.sample_size, config.in_channels
            self.out_channels = config.out_channels
        elif module.startswith("denoising_diffusion_pytorch"):
            self.kind = "denoising_diffusion_pytorch"
            found_size, found_channels = getattr(model, "image_size", None), getattr(model, "channels", None)
            self.out_channels = getattr(model, "out_dim", found_channels)
        else:
            self.kind = "fastddpm" if module.startswith("fastddpm") else "callable"
            found_size = getattr(model, "image_size", None)
            found_channels = getattr(model, "in_channels", None)
            self.out_channels = getattr(model, "out_channels", found_channels)
        self.num_classes, self.null_class = self._classes(model, config)
        self.image_size = _as_hw(image_size if image_size is not None else found_size)
        self.channels = channels if channels is not None else found_channels
        if self.channels is not None and (not is_int(self.channels)
                                          or self.channels < 1):
            raise ValueError(f"channels must be a positive int, got {self.channels!r}")

    @property
    def is_cfg_unet(self) -> bool:
        """denoising-diffusion-pytorch's ``classifier_free_guidance.Unet`` (it takes ``classes``)."""
        return self.kind == "denoising_diffusion_pytorch" and type(self.model).__module__.endswith(
            "classifier_free_guidance")

    def _classes(self, model, config) -> tuple[int | None, int | None]:
        """``(number of classes, null class index)`` as the family says (None where it does not)."""
        if self.kind == "diffusers":
            k = getattr(config, "num_class_embeds", None)
            null = getattr(model, "fastddpm_null_class", None)
            return (null if null is not None else k), null
        if self.kind == "denoising_diffusion_pytorch":
            emb = getattr(model, "classes_emb", None)  # the classifier-free Unet's; its null is separate
            return (emb.num_embeddings if isinstance(emb, nn.Embedding) else None), None
        k = getattr(model, "num_classes", None)
        null = getattr(model, "null_class", None)
        return (k if is_int(k) else None), (null if is_int(null) else None)

    def label_kwargs(self, labels: torch.Tensor) -> dict:
        """The keyword this family takes class labels by: ``{name: labels}``."""
        if self.kind in ("fastddpm", "diffusers"):
            return {"class_labels": labels}
        if self.kind == "denoising_diffusion_pytorch":
            return {"classes": labels}
        return {"y": labels}

    def cond_kwargs(self) -> dict:
        """Keywords every conditional call of this family needs: the classifier-free ``Unet`` of
        denoising-diffusion-pytorch drops its condition at random unless told not to."""
        return {"cond_drop_prob": 0.0} if self.is_cfg_unet else {}

    def null_kwargs(self, labels: torch.Tensor | None) -> dict | None:
        """The unconditional call's keywords for guidance (``labels`` the conditional ones, or None),
        or None where the family has no null condition (then ``uncond_kwargs`` must say)."""
        if self.is_cfg_unet:
            return {"classes": labels, "cond_drop_prob": 1.0} if labels is not None else None
        if self.null_class is None or labels is None:
            return None
        return self.label_kwargs(torch.full_like(labels, self.null_class))

    # -- where and how the model runs -----------------------------------------------
    def _first_param(self):
        if isinstance(self.model, nn.Module):
            for p in self.model.parameters():
                return p
        return None

    @property
    def device(self) -> torch.device:
        p = self._first_param()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_param()
        return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32

    def shape(self, n: int) -> tuple[int, ...]:
        """The ``[n, C, H, W]`` shape of a batch, or a clear error if unknown."""
        if self.channels is None or self.image_size is None:
            missing = " and ".join(x for x, v in (("channels", self.channels), ("image_size", self.image_size)) if v is None)
            raise ValueError(f"cannot tell the model's {missing}: pass {missing}= to sample()")
        return (n, self.channels, *self.image_size)

    # -- the call ------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(x, t, **kwargs)
        if hasattr(out, "sample"):  # diffusers' UNet2DOutput
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def check_output(self, out, x: torch.Tensor) -> torch.Tensor:
        """Raise if the model's output is not a float tensor shaped like ``x``."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a tensor (or an object with .sample), got {type(out).__name__}")
        if tuple(out.shape) != tuple(x.shape):
            hint = ""
            if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
                hint = " (a model with learned variance outputs 2x channels; fastddpm samples with fixed variance)"
            raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                             f"expected the same shape{hint}")
        if not out.dtype.is_floating_point:
            raise TypeError(f"model must return a floating-point tensor, got {out.dtype}")
        return out
