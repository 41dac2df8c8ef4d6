"""fastddpm: train and sample DDPM image models fast, with the reference math.

    import fastddpm
    images = fastddpm.sample(model, 16)          # [16, C, H, W] in [-1, 1]
"""
from .checkpoint import load_model, save_model
from .config import DiffusionConfig
from .diffusion import DDPM, StepOutput
from .img2img import img2img
from .inpaint import inpaint
from .inversion import invert
from .models import UNet, UNetConfig, create_model
from .noise import normal
from .patching import patch_attention, unpatch_attention
from .sampling import sample
from .schedule import NoiseSchedule
from .trainer import TrainConfig, Trainer
from .version import __version__

__all__ = ["DDPM", "DiffusionConfig", "NoiseSchedule", "TrainConfig", "Trainer", "UNet", "UNetConfig",
           "create_model", "img2img", "inpaint", "invert", "load_model", "normal", "patch_attention", "sample", "unpatch_attention", "save_model", "StepOutput", "__version__"]
