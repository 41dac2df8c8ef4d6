"""Route diffusers models' attention through ``fastddpm.ops.attention``.

``patch_attention(unet)`` gives every diffusers ``Attention`` layer of the
model a :class:`FastAttnProcessor`: the math of diffusers' ``AttnProcessor2_0``
(norms, projections, residual, output rescale) with the softmax attention done
by ``fastddpm.ops.attention`` on ``[B, heads, L, head_dim]``, so the dispatch
picks the fused kernel (Triton on a GPU).  What the op does not cover (a mask,
keys of another length than the queries as in cross-attention, a scale other
than ``head_dim**-0.5``, another dtype) goes to
``F.scaled_dot_product_attention`` as diffusers would compute it.

Only layers running diffusers' standard processors (``AttnProcessor2_0``,
``AttnProcessor``) are patched; a layer with any other processor (LoRA,
IP-Adapter, fused QKV, added KV, ...) keeps it, with a warning.
fastddpm's own ``UNet`` already calls ``ops.attention`` and is returned as is.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checks import FLOAT_DTYPES

__all__ = ["FastAttnProcessor", "patch_attention", "unpatch_attention"]


class FastAttnProcessor:
    """A diffusers attention processor whose attention is ``fastddpm.ops.attention``.

    Call signature and math are those of diffusers' ``AttnProcessor2_0``; the
    deprecated positional/``scale`` arguments are ignored as there.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # [B, C, H, W] -> [B, H*W, C]
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA wants (batch, heads, query length, key length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = _attention(query, key, value, attention_mask, getattr(attn, "scale", None))

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention(query, key, value, mask, scale) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` over ``[B, heads, L, d]``: ``ops.attention`` where it
    computes exactly that, SDPA (with diffusers' arguments) elsewhere."""
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    if (mask is None and scale == head_dim**-0.5 and query.dtype in FLOAT_DTYPES
            and key.shape == query.shape and value.shape == query.shape
            and key.dtype == query.dtype and value.dtype == query.dtype):
        return ops.attention(query, key, value)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                          scale=scale)


# -- installing it -------------------------------------------------------------------------
def _is_fastddpm_unet(model) -> bool:
    from .models import UNet

    return isinstance(model, UNet)


def _attention_layers(model) -> list[tuple[str, nn.Module]]:
    """diffusers attention layers of ``model`` (modules with a swappable ``processor``)."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__module__.startswith("diffusers") and hasattr(m, "processor")
            and callable(getattr(m, "set_processor", None))]


def _checked(model, what: str) -> list[tuple[str, nn.Module]] | None:
    """The attention layers to work on, None for a fastddpm UNet, TypeError for anything else."""
    if _is_fastddpm_unet(model):
        return None
    if isinstance(model, nn.Module):
        layers = _attention_layers(model)
        if layers or type(model).__module__.startswith("diffusers"):
            return layers
    raise TypeError(f"{what} takes a diffusers model (e.g. UNet2DModel) or a module holding one, or a fastddpm "
                    f"UNet; {type(model).__name__} has no diffusers attention layers")


def _is_standard(processor) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0, FastAttnProcessor)


def _default_processor(layer):
    """The processor diffusers' ``Attention`` picks for itself (see its ``__init__``)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if getattr(layer, "scale_qk", True) else AttnProcessor()


def patch_attention(model):
    """Make ``model``'s attention run through ``fastddpm.ops.attention``; returns ``model``.

    :param model: a diffusers model (``UNet2DModel``, ...) or a module holding
        one: each attention layer with a standard diffusers processor gets a
        :class:`FastAttnProcessor` (others keep theirs, with a warning); a
        fastddpm ``UNet`` is returned unchanged (it uses ``ops.attention`` already).
    :raises TypeError: for any other model.
    """
    layers = _checked(model, "patch_attention")
    if not layers:
        return model
    processor = FastAttnProcessor()
    kept = []
    for name, layer in layers:
        if _is_standard(layer.processor):
            layer.set_processor(processor)
        else:
            kept.append(f"{name} ({type(layer.processor).__name__})")
    if kept:
        warnings.warn(f"patch_attention: {len(kept)} attention layer(s) keep their own processor: "
                      f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}", RuntimeWarning, stacklevel=2)
    return model


def unpatch_attention(model):
    """Undo :func:`patch_attention`: patched layers get diffusers' default processor back
    (``AttnProcessor2_0``, or ``AttnProcessor`` for ``scale_qk=False``); returns ``model``."""
    layers = _checked(model, "unpatch_attention")
    for _, layer in layers or ():
        if isinstance(layer.processor, FastAttnProcessor):
            layer.set_processor(_default_processor(layer))
    return model
