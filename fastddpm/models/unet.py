"""The DDPM U-Net of Ho et al. 2020, configurable.

Architecture as in the TF original (``diffusion_tf/models/unet.py``) and its
PyTorch port (pesser's ``pytorch_diffusion`` ``Model``):

* a sinusoidal timestep embedding (Transformer-style, Ho et al. Sec. 4) fed to
  an MLP ``Linear(ch, 4ch) - SiLU - Linear(4ch, 4ch)``; a class-conditional
  model (``num_classes=K``) adds a learned class embedding ``label_emb``
  (``nn.Embedding(K + 1, 4ch)``) to it, as guided-diffusion's ``label_emb`` and
  diffusers' ``num_class_embeds`` do, index ``K`` being the null class that
  classifier-free guidance (Ho & Salimans 2022) trains with and samples from;
* per resolution level ``num_res_blocks`` residual blocks (Wide-ResNet style,
  GroupNorm, the timestep added as a per-channel shift), self-attention after
  each block where the feature map has one of ``attention_resolutions``, and a
  stride-2 downsample between levels;
* a middle block ``ResBlock - Attention - ResBlock``;
* an up path with ``num_res_blocks + 1`` blocks per level, each taking one
  stored activation of the down path by channel concatenation (every block
  output, the input conv and each downsample are stored);
* ``GroupNorm - SiLU - conv3x3`` to the output channels.

Module names mirror pesser's port (``temb.dense``, ``down[i].block[j]``,
``mid.attn_1``, ``up[i].upsample.conv``, ``norm_out`` ...), and an attention
block accepts his separate ``q``/``k``/``v`` weights when loading a state
dict, so his converted checkpoints of Ho et al.'s models load unchanged
(``ddpm_cifar10`` has exactly his 35,746,307 parameters).

Differences from the original, on purpose:

* Attention is multi-head (``num_heads`` / ``head_channels``; one head gives
  Ho et al.'s block) and computed by ``fastddpm.ops.attention`` on
  ``[B, heads, L, d]`` so a fused kernel replaces it (the dispatch's automatic
  choice, or the backend ``set_attention_backend`` names, which also holds
  inside ``torch.compile``); q, k, v come from one fused 1x1 conv (same
  parameters as three).
* Initialisation is PyTorch's default for every layer (as diffusers and
  pesser's port), not Ho et al.'s fan-avg uniform with near-zero output
  layers: the model trains well either way, and an untrained model then
  depends on every parameter and on ``t``, which the tests check.

The blocks live in :mod:`fastddpm.models.blocks` (re-exported here); this
module holds the configuration and the assembly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..checks import is_int
from ..config import JsonConfig
from .blocks import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, timestep_embedding

__all__ = ["UNetConfig", "UNet", "timestep_embedding", "ResBlock", "AttentionBlock", "Downsample", "Upsample"]


# -- configuration ---------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """Hyper-parameters of :class:`UNet`; JSON-safe via :meth:`to_dict`.

    :param image_size: the training resolution; decides where attention goes.
        Any input whose sides are divisible by ``2**(len(channel_mult)-1)``
        runs.
    :param out_channels: None means ``in_channels`` (epsilon prediction).
    :param channel_mult: channels of level ``i`` are ``base_channels * channel_mult[i]``.
    :param attention_resolutions: feature-map sizes at which attention blocks
        follow the residual blocks; the middle block always has attention.
    :param num_heads: heads of every attention block, unless ``head_channels``
        is set, in which case a block of ``C`` channels has ``C // head_channels`` heads.
    :param num_classes: None: unconditional; K: class-conditional on K classes, with
        the class embedding's index K the null class (classifier-free guidance).
    """

    image_size: int
    in_channels: int = 3
    out_channels: int | None = None
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.1
    resample_with_conv: bool = True
    num_groups: int = 32
    num_classes: int | None = None

    _label: ClassVar[str] = "UNet"

    def __post_init__(self):
        # Lists (from JSON or keyword arguments) become tuples, so the config stays hashable.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            elif is_int(value):
                object.__setattr__(self, name, (value,))
            else:
                raise TypeError(f"{name} must be a tuple of ints, got {type(value).__name__}")
        self._validate()

    def _validate(self) -> None:
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads", "num_groups"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("out_channels", "head_channels", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if not self.channel_mult or not all(is_int(m) and m > 0 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult!r}")
        if not all(is_int(r) and r > 0 for r in self.attention_resolutions):
            raise ValueError(f"attention_resolutions must be positive ints, got {self.attention_resolutions!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.resample_with_conv, bool):
            raise ValueError(f"resample_with_conv must be a bool, got {self.resample_with_conv!r}")

        factor = self.downsample_factor
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1) = {factor} "
                f"(channel_mult={self.channel_mult} has {self.num_levels} levels)")
        for mult in (1,) + self.channel_mult:
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide the channels of every level, but "
                    f"base_channels={self.base_channels} x {mult} = {channels} is not divisible by it")
        sizes = self.feature_sizes
        unknown = [r for r in self.attention_resolutions if r not in sizes]
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} match no feature-map size; with image_size={self.image_size} "
                f"and {self.num_levels} levels the sizes are {sizes}")
        attn_channels = [self.base_channels * m for m, s in zip(self.channel_mult, sizes)
                         if s in self.attention_resolutions] + [self.base_channels * self.channel_mult[-1]]
        for channels in attn_channels:
            if self.head_channels is not None:
                if channels % self.head_channels:
                    raise ValueError(
                        f"head_channels={self.head_channels} must divide the channels of every attention "
                        f"block, but a block has {channels}")
            elif channels % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the channels of every attention block, "
                    f"but a block has {channels}")

    # derived quantities
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Input sides must be divisible by this."""
        return 2 ** (self.num_levels - 1)

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Feature-map side at each level for an ``image_size`` input."""
        return tuple(self.image_size // 2**i for i in range(self.num_levels))

    @property
    def resolved_out_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def heads_for(self, channels: int) -> int:
        """Number of heads of an attention block with ``channels`` channels."""
        return channels // self.head_channels if self.head_channels is not None else self.num_heads


# -- the model -------------------------------------------------------------------------
class _Level(nn.Module):
    """One resolution level: ``block[i]`` each followed by ``attn[i]`` if the level has attention."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNet(nn.Module):
    """The DDPM noise-prediction U-Net: ``model(x, t) -> [n, out_channels, H, W]``, or
    ``model(x, t, class_labels=y)`` for a class-conditional one (``num_classes`` set).

    Build with ``UNet(config)`` or ``UNet(image_size=32, ...)`` (the
    :class:`UNetConfig` fields).  ``num_classes`` and ``null_class`` are K (None when
    unconditional): labels lie in ``[0, K]``, K the null class.
    """

    def __init__(self, config: UNetConfig | None = None, **fields):
        super().__init__()
        if config is None:
            config = UNetConfig(**fields)
        elif fields:
            raise TypeError("give UNet a config or keyword fields, not both")
        elif isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        elif not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.out_channels = config.resolved_out_channels
        self.num_classes = self.null_class = config.num_classes

        ch, groups, dropout = config.base_channels, config.num_groups, config.dropout
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        # the class embedding, added to the time embedding after its MLP; row K is the null class
        self.label_emb = nn.Embedding(config.num_classes + 1, temb_ch) if config.num_classes is not None else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, config.heads_for(channels), groups)

        # Down path; skip_channels lists the channels of every stored activation.
        skip_channels = [ch]
        block_in = ch
        self.down = nn.ModuleList()
        for level, (mult, size) in enumerate(zip(config.channel_mult, config.feature_sizes)):
            down = _Level()
            block_out = ch * mult
            for _ in range(config.num_res_blocks):
                down.block.append(ResBlock(block_in, block_out, temb_ch, dropout, groups))
                block_in = block_out
                if size in config.attention_resolutions:
                    down.attn.append(attention(block_in))
                skip_channels.append(block_in)
            if level != config.num_levels - 1:
                down.downsample = Downsample(block_in, config.resample_with_conv)
                skip_channels.append(block_in)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(block_in, block_in, temb_ch, dropout, groups)
        self.mid.attn_1 = attention(block_in)
        self.mid.block_2 = ResBlock(block_in, block_in, temb_ch, dropout, groups)

        # Up path: self.up[level], built (and run) from the deepest level up.
        up_levels = []
        for level in reversed(range(config.num_levels)):
            up = _Level()
            block_out = ch * config.channel_mult[level]
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResBlock(block_in + skip_channels.pop(), block_out, temb_ch, dropout, groups))
                block_in = block_out
                if config.feature_sizes[level] in config.attention_resolutions:
                    up.attn.append(attention(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, config.resample_with_conv)
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        assert not skip_channels

        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, self.out_channels, 3, padding=1)

    def _check_inputs(self, x, t):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        factor = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x must have shape [n, {self.in_channels}, H, W] with H and W divisible by {factor} "
                f"(e.g. [n, {self.in_channels}, {self.image_size}, {self.image_size}]), got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be an integer or float tensor, got {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")

    def _class_labels(self, class_labels, x: torch.Tensor) -> torch.Tensor | None:
        """``class_labels`` checked (shape and dtype only, so nothing synchronises) as int64 ``[n]``;
        None on a conditional model is the null class.  The values are the caller's to keep in
        ``[0, num_classes]`` (the trainer and ``sample`` check them once, not every call)."""
        n = x.shape[0]
        if self.label_emb is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet (num_classes=None); build the model "
                                 "with num_classes=K to condition it on K classes")
            return None
        if class_labels is None:
            return torch.full((n,), self.null_class, dtype=torch.int64, device=x.device)
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels must be an int64 torch.Tensor [n], got {type(class_labels).__name__}")
        if class_labels.dtype == torch.bool or class_labels.is_floating_point() or class_labels.is_complex():
            raise TypeError(f"class_labels must be an integer tensor (int64), got {class_labels.dtype}")
        if class_labels.ndim > 1 or (class_labels.ndim == 1 and class_labels.shape[0] != n):
            raise ValueError(f"class_labels must be a scalar or have shape ({n},), got {tuple(class_labels.shape)}")
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(n)
        return class_labels.to(device=x.device, dtype=torch.int64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` ``[n, C, H, W]`` (any float dtype) at timesteps ``t`` (``[n]`` or 0-dim).

        :param class_labels: a conditional model's classes, int64 ``[n]`` (or 0-dim) in
            ``[0, num_classes]``, ``num_classes`` the null class; None: the null class.  An
            unconditional model takes none.
        ``x`` is cast to the parameters' dtype; under autocast the output has
        the autocast dtype.  Shape checks only: no device synchronisation.
        """
        self._check_inputs(x, t)
        labels = self._class_labels(class_labels, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = x.to(self.conv_in.weight.dtype)

        temb = timestep_embedding(t, self.config.base_channels).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        if labels is not None:
            temb = temb + self.label_emb(labels).to(temb.dtype)

        hs = [self.conv_in(x)]
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                if len(down.attn):
                    h = down.attn[i](h)
                hs.append(h)
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_attention_backend(self, backend: str | None) -> "UNet":
        """Run every attention block's ``fastddpm.ops.attention`` on ``backend`` (``reference``,
        ``cpp`` or ``triton``; None: the automatic choice).  Unlike ``ops.use_backend`` around a
        call, it is part of the model, so ``torch.compile`` traces it (and guards on it)."""
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS} or None, got {backend!r}")
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.attention_backend = backend
        return self
