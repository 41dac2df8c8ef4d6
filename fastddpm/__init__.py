"""fastddpm: train and sample DDPM image models fast, with the reference math.

    import fastddpm
    images = fastddpm.sample(model, 16)          # [16, C, H, W] in [-1, 1]
"""
from .config import DiffusionConfig
from .diffusion import DDPM
from .noise import normal
from .sampling import sample
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["DDPM", "DiffusionConfig", "NoiseSchedule", "normal", "sample", "__version__"]
