"""The building blocks of the DDPM U-Net (``fastddpm.models.unet``): the
sinusoidal timestep embedding, the residual block, the multi-head attention
block and the resamplers.

Each follows Ho et al.'s TF original (``diffusion_tf/models/unet.py``) and
keeps the parameter names of pesser's PyTorch port, so his checkpoints load;
:class:`AttentionBlock` also accepts his separate ``q``/``k``/``v`` weights.
GroupNorm everywhere has the original's epsilon, :data:`GROUPNORM_EPS`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

__all__ = ["GROUPNORM_EPS", "group_norm", "timestep_embedding", "ResBlock", "AttentionBlock", "Downsample",
           "Upsample"]

GROUPNORM_EPS = 1e-6  # as the TF original (tf.contrib group_norm) and pesser's port


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of Ho et al. (``get_timestep_embedding``): ``[n] -> [n, dim]`` float32.

    Frequencies ``exp(-log(10000) * i / (half - 1))``, sines then cosines, a
    zero column when ``dim`` is odd.  Always float32, whatever autocast says.
    """
    half = dim // 2
    scale = math.log(10000) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """The U-Net's GroupNorm: ``groups`` groups over ``channels``, epsilon :data:`GROUPNORM_EPS`."""
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)


class ResBlock(nn.Module):
    """``x + conv(drop(act(norm(conv(act(norm(x))) + W act(temb)))))`` with a 1x1
    shortcut when the channel count changes (Ho et al.'s ``resnet_block``)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, with a residual.

    ``norm -> 1x1 conv to q, k, v -> fastddpm.ops.attention -> 1x1 proj_out``.
    The attention call sees ``[B, heads, L, d]`` views (scale ``d**-0.5``); with
    one head this is Ho et al.'s ``attn_block``.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.channels, self.num_heads = channels, num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # output channels ordered (q|k|v, head, d)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.attention_backend: str | None = None  # None: fastddpm.ops' choice

    def qkv_heads(self, x: torch.Tensor):
        """q, k, v of shape ``[B, heads, H*W, d]`` for input ``x``, each contiguous.

        Contiguous, not views of the conv's output: ``scaled_dot_product_attention``
        on a CPU takes its flash kernel only when the last dim has stride 1, and a
        strided q/k/v falls back to the slow math path (one copy here is cheaper).
        """
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x))  # [B, 3C, H, W], channels ordered (q|k|v, head, d)
        # [B, 3, heads, d, L] (a view for either layout) -> one copy to [3, B, heads, L, d]
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv_heads(x)
        o = ops.attention(q, k, v, backend=self.attention_backend)  # [B, heads, L, d]
        if _memory_format(x) == torch.channels_last:  # one copy to NHWC, seen as channels_last NCHW
            o = o.transpose(1, 2).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        else:  # one copy to NCHW
            o = o.transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(o)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept pesser's / Ho et al.'s separate q, k, v 1x1 convs by fusing them.
        names = [prefix + f"{p}.{s}" for p in "qkv" for s in ("weight", "bias")]
        if all(n in state_dict for n in names) and prefix + "qkv.weight" not in state_dict:
            for s in ("weight", "bias"):
                state_dict[prefix + "qkv." + s] = torch.cat([state_dict.pop(prefix + f"{p}.{s}") for p in "qkv"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class Downsample(nn.Module):
    """Halve H and W: conv3x3 stride 2 after a TF-"SAME"-style (0, 1, 0, 1) pad, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then conv3x3 (if ``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)
