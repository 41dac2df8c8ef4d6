"""Serialisable, frozen configuration of a diffusion process."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

from .reference import LOSSES, PREDICTIONS, SAMPLERS, VARIANCES
from .schedule import SCHEDULE_KINDS

__all__ = ["DiffusionConfig"]


@dataclass(frozen=True)
class DiffusionConfig:
    """How a DDPM process is defined.  Defaults are the original DDPM (Ho et al.
    2020): 1000 steps, linear betas 1e-4..0.02, epsilon prediction, x0 clipped
    to [-1, 1], sigma^2 = beta_tilde — the defaults of diffusers'
    ``DDPMScheduler`` (with ``variance_type="fixed_small"``) and of
    denoising-diffusion-pytorch's ``GaussianDiffusion(beta_schedule="linear",
    objective="pred_noise")``.

    :param num_timesteps: T, the training process length.
    :param schedule: beta schedule name, or ``custom`` with ``betas`` given.
    :param betas: explicit betas (only with ``schedule="custom"``).
    :param prediction: what the model outputs: ``epsilon``, ``x0`` or ``v``.
    :param variance: reverse variance ``fixed_small`` (beta_tilde) or ``fixed_large`` (beta).
    :param clip_denoised: clamp the predicted x0 to [-1, 1] in the reverse step.
    :param sampler: ``ddpm`` (ancestral) or ``ddim``.
    :param eta: DDIM's eta (0: deterministic; 1: DDPM's fixed_small variance).
    :param loss: ``l2``, ``l1`` or ``huber`` (with ``huber_delta``).
    :param min_snr_gamma: min-SNR-gamma loss weighting, or None for uniform.
    """

    num_timesteps: int = 1000
    schedule: Literal["linear", "cosine", "sigmoid", "quadratic", "custom"] = "linear"
    betas: tuple[float, ...] | None = None
    prediction: Literal["epsilon", "x0", "v"] = "epsilon"
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small"
    clip_denoised: bool = True
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 0.0
    loss: Literal["l2", "l1", "huber"] = "l2"
    huber_delta: float = 1.0
    min_snr_gamma: float | None = None

    def __post_init__(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")

        choice("schedule", SCHEDULE_KINDS + ("custom",))
        choice("prediction", PREDICTIONS)
        choice("variance", VARIANCES)
        choice("sampler", SAMPLERS)
        choice("loss", LOSSES)
        if self.betas is not None:
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
            if self.schedule != "custom":
                raise ValueError("betas can only be given with schedule='custom'")
            object.__setattr__(self, "num_timesteps", len(self.betas))
        elif self.schedule == "custom":
            raise ValueError("schedule='custom' needs betas")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {self.num_timesteps!r}")
        if not isinstance(self.clip_denoised, bool):
            raise TypeError(f"clip_denoised must be a bool, got {self.clip_denoised!r}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta < float("inf")):
            raise ValueError(f"eta must be a float >= 0, got {self.eta!r}")
        if not (isinstance(self.huber_delta, (int, float)) and self.huber_delta > 0):
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta!r}")
        if self.min_snr_gamma is not None and not (isinstance(self.min_snr_gamma, (int, float)) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma!r}")

    def replace(self, **changes) -> "DiffusionConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown diffusion options: {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return DiffusionConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        if not isinstance(d, dict):
            raise TypeError(f"diffusion config must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown diffusion config keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffusionConfig":
        return cls.from_dict(json.loads(text))
