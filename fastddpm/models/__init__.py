"""Models: the DDPM U-Net of Ho et al. and its presets."""
from .presets import PRESETS, create_model
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "PRESETS", "create_model"]
