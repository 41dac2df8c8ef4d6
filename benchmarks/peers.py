"""The baselines every benchmark compares against, each defined once.

* diffusers: ``UNet2DModel`` of a fastddpm preset's architecture (Ho et al.'s U-Net in diffusers'
  blocks; for ``ddpm_cifar10`` google/ddpm-cifar10-32's config) and ``DDPMPipeline``'s loop;
* denoising-diffusion-pytorch: its ``Unet`` of a comparable size, and ``GaussianDiffusion.sample``
  around any ``model(x, t)``.

``bench_sample.py`` (and its ``sample_rows.py``), ``bench_sample_cpu.py`` and ``bench_train.py``'s
``train_rows.py`` import them from here.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from fastddpm.adapters import ModelAdapter
from fastddpm.models.presets import PRESETS
from fastddpm.models.unet import UNetConfig

NUM_TIMESTEPS = 1000
DIFFUSERS_PRESETS = ("ddpm_cifar10", "small")  # the presets the sampling benchmarks build in diffusers too

# google/ddpm-cifar10-32's config.json (the UNet2DModel fields that shape it)
GOOGLE_DDPM_CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu", flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, mid_block_scale_factor=1, center_input_sample=False,
    time_embedding_type="positional",
)



# -- the models ------------------------------------------------------------------------------------
def diffusers_unet_kwargs(config: UNetConfig) -> dict:
    """``UNet2DModel`` keyword arguments with the architecture of ``config``: Ho et al.'s
    U-Net in diffusers' blocks (for ``ddpm_cifar10``: google/ddpm-cifar10-32's config),
    plus the preset's dropout."""
    attn_sizes = set(config.attention_resolutions)
    channels = [config.base_channels * m for m in config.channel_mult]
    attn_channels = [c for c, s in zip(channels, config.feature_sizes) if s in attn_sizes] + [channels[-1]]
    if config.head_channels is not None:
        head_dim = config.head_channels
    elif config.num_heads == 1:
        head_dim = None  # diffusers: one head of all the block's channels
    else:
        dims = {c // config.num_heads for c in attn_channels}
        if len(dims) != 1:
            raise ValueError(f"diffusers takes one head size; {config} has attention blocks of {sorted(dims)}")
        head_dim = dims.pop()
    down = tuple("AttnDownBlock2D" if s in attn_sizes else "DownBlock2D" for s in config.feature_sizes)
    up = tuple("AttnUpBlock2D" if s in attn_sizes else "UpBlock2D" for s in reversed(config.feature_sizes))
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.resolved_out_channels,
        layers_per_block=config.num_res_blocks, block_out_channels=tuple(channels), down_block_types=down,
        up_block_types=up, attention_head_dim=head_dim, norm_num_groups=config.num_groups, norm_eps=1e-6,
        act_fn="silu", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=1,
        center_input_sample=False, time_embedding_type="positional", dropout=config.dropout,
    )


def ddp_unet_kwargs(preset: str) -> dict:
    """denoising-diffusion-pytorch ``Unet`` keyword arguments of a size comparable to ``preset``."""
    config = PRESETS[preset]
    if preset == "ddpm_cifar10":  # the library's default Unet: 35.71M parameters
        return dict(dim=64, dim_mults=(1, 2, 4, 8), channels=3, dropout=config.dropout)
    return dict(dim=config.base_channels, dim_mults=tuple(config.channel_mult), channels=config.in_channels,
                dropout=config.dropout)


def diffusers_preset_kwargs(preset: str) -> dict:
    """``UNet2DModel`` keyword arguments of fastddpm's preset ``preset``: the same architecture (the
    benchmarks check the parameter counts)."""
    return diffusers_unet_kwargs(PRESETS[preset])


@torch.no_grad()
def diffusers_guided_loop(unet, scheduler, x_T, labels, null_class: int, guidance_scale: float):
    """Classifier-free guidance as diffusers' pipelines write it: one ``unet`` call on the doubled batch
    ``[uncond; cond]`` (``class_labels`` the null class, then ``labels``), ``u + w (c - u)``, then
    ``scheduler.step``; from ``x_T`` (scaled by ``init_noise_sigma``), over the timesteps the caller set."""
    latents = x_T * scheduler.init_noise_sigma
    y = torch.cat([torch.full_like(labels, null_class), labels])
    for t in scheduler.timesteps:
        out = unet(torch.cat([latents] * 2), t, class_labels=y).sample
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + guidance_scale * (out_cond - out_uncond), t, latents).prev_sample
    return latents


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the samplers ----------------------------------------------------------------------------------
@torch.no_grad()
def diffusers_loop(unet, scheduler, n: int, steps: int, device, *, compiled: bool = False):
    """``DDPMPipeline.__call__`` without the image post-processing; ``unet(x, t).sample`` with a
    ``config`` of ``in_channels`` and ``sample_size``."""
    cfg = unet.config
    image = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if compiled:  # a new step: the CUDA-graph outputs of the last one are consumed
            torch.compiler.cudagraph_mark_step_begin()
        model_output = unet(image, t.to(device) if compiled else t).sample
        image = scheduler.step(model_output, t, image).prev_sample
    return image


class AsDDPMPytorchModel(nn.Module):
    """Any ``model(x, t)`` (fastddpm's, diffusers', a callable with ``in_channels`` and ``image_size``) behind
    denoising-diffusion-pytorch's model interface, with the channels fastddpm's ``ModelAdapter`` reads from it."""

    self_condition = False

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.adapter = ModelAdapter(model)
        self.channels = self.out_dim = self.adapter.channels

    def forward(self, x, t, x_self_cond=None):
        return self.adapter(x, t)


def ddpm_pytorch_sampler(model, device):
    """denoising-diffusion-pytorch's ``GaussianDiffusion.sample`` (linear schedule, epsilon prediction)
    around ``model``, of the image size and channels ``ModelAdapter`` reads from it, without its
    progress bar: ``call(n, steps)``, the last ``steps`` steps of the 1000-step chain
    (``p_sample_loop`` walks ``t = num_timesteps-1 .. 0``)."""
    from denoising_diffusion_pytorch import GaussianDiffusion

    peer = sys.modules["denoising_diffusion_pytorch.denoising_diffusion_pytorch"]
    wrapped = AsDDPMPytorchModel(model)
    diffusion = GaussianDiffusion(wrapped, image_size=wrapped.adapter.image_size, timesteps=NUM_TIMESTEPS,
                                  objective="pred_noise", beta_schedule="linear", auto_normalize=False).to(device)
    quiet = functools.partial(peer.tqdm, disable=True)  # no progress bar, as in every other row

    def call(n, steps):
        diffusion.num_timesteps = steps
        saved, peer.tqdm = peer.tqdm, quiet
        try:
            return diffusion.sample(batch_size=n)
        finally:
            peer.tqdm = saved

    return call


def strided_attention_forward(block, x: torch.Tensor) -> torch.Tensor:
    """fastddpm's ``AttentionBlock.forward`` before issue 15: strided views of the qkv conv's output
    into SDPA (its slow math path on a CPU), the output reshaped back.  Set as
    ``AttentionBlock.forward`` for the "before" row; ``tests/test_unet.py`` compares with it."""
    import torch.nn.functional as F

    b, c, hgt, wid = x.shape
    qkv = block.qkv(block.norm(x))
    qkv = qkv.flatten(2).transpose(1, 2).reshape(b, hgt * wid, 3, block.num_heads, c // block.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)
    o = o.transpose(1, 2).reshape(b, hgt * wid, c).transpose(1, 2).reshape(b, c, hgt, wid)
    return x + block.proj_out(o)
