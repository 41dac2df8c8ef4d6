"""The noise contract: counter-based Gaussian noise, identical on every backend.

``normal(seed, offsets)`` is Triton's ``tl.randn(seed, offset)`` written in
PyTorch: Philox4x32-10 (Salmon et al. 2011) keyed by the 64-bit ``seed`` and
counted by the 64-bit ``offset`` (low word in counter 0, high word in counter
1, as ``triton.language.random.randint4x`` does), then Box-Muller on the first
two output words.  The integers are bit-exact; the normals agree with Triton,
CUDA and the C++ op to a few ulp (``log``/``cos``/``sin`` round differently in
each library).

Where an element's offset comes from (``noise_offsets``): the sample index is
the high word, so sample ``i`` gets the same noise whatever the batch is, and
the low word is ``slot * numel + element`` where ``slot`` is the step index of
the reverse process (``0..K``; slot ``K`` draws ``x_T``) or 0 for the training
noise.
"""
from __future__ import annotations

import torch

from .checks import is_int

__all__ = [
    "MAX_SEED",
    "philox4x32",
    "normal",
    "noise_offsets",
    "check_seed",
    "check_noise_capacity",
]

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63 - 1
# Triton's uint_to_uniform_float scale for 32-bit words: the largest float
# with INT32_MAX * scale < 1 after float32 rounding.
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
U1_MIN = 1.0e-7


def check_seed(seed: int, name: str = "seed") -> int:
    """Validate a user seed: a Python int in ``[0, 2**63)``."""
    if not is_int(seed):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def check_noise_capacity(numel: int, slots: int, last_sample: int) -> None:
    """Raise if (slot, element) or the sample index overflow their 32-bit words."""
    if slots * numel > 2**32:
        raise ValueError(
            f"noise counter overflow: {slots} noise slots x {numel} elements per sample "
            f"exceeds 2**32; use fewer steps or smaller images"
        )
    if last_sample >= 2**32:
        raise ValueError(f"sample index {last_sample} exceeds the noise contract's 2**32 samples")


def _umulhi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and an
    int64 tensor ``b`` holding uint32 values, without 64-bit overflow."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    # a*b = (a*b_hi) * 2**16 + a*b_lo, each partial product < 2**48.
    mid = a * b_hi + ((a * b_lo) >> 16)
    hi = mid >> 16
    lo = (a * b) & MASK32  # int64 wraps mod 2**64, low 32 bits are exact
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2=None, c3=None, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 as in ``triton.language.random.philox_impl``.

    :param seed: 64-bit key; low word is k0, high word k1.
    :param c0, c1, c2, c3: int64 tensors of uint32 counter words (c2, c3 default 0).
    :return: four int64 tensors of uint32 words.
    """
    zeros = torch.zeros_like(c0)
    c2 = zeros if c2 is None else c2
    c3 = zeros if c3 is None else c3
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _umulhi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umulhi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """``uint_to_uniform_float``: bitcast to int32, fold negatives with ``~x``, scale."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast uint32 -> int32
    x = torch.where(x < 0, ~x, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def normal(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normals equal to ``tl.randn(seed, offsets)``.

    :param seed: int in ``[0, 2**63)``.
    :param offsets: int64 tensor of any shape (non-negative counters).
    :return: float32 tensor of the same shape and device.
    """
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    c0 = offsets & MASK32
    c1 = (offsets >> 32) & MASK32
    i1, i2, _, _ = philox4x32(seed, c0, c1)
    u1 = torch.clamp_min(_uint32_to_uniform(i1), U1_MIN)
    th = torch.tensor(TWO_PI, dtype=torch.float32) * _uint32_to_uniform(i2)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


def noise_offsets(sample_index: torch.Tensor, slot: torch.Tensor, numel: int) -> torch.Tensor:
    """Offsets of every element of a batch: ``(sample << 32) | (slot * numel + element)``.

    :param sample_index: int64 ``[n]`` global sample indices.
    :param slot: int64 ``[n]`` or scalar step slot per sample.
    :param numel: elements per sample.
    :return: int64 ``[n, numel]``.
    """
    element = torch.arange(numel, device=sample_index.device, dtype=torch.int64)
    slot = torch.as_tensor(slot, device=sample_index.device, dtype=torch.int64).expand(sample_index.shape)
    return (sample_index[:, None] << 32) | (slot[:, None] * numel + element[None, :])
