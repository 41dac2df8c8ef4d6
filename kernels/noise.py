"""The noise contract inside Triton kernels.

Element ``element`` of global sample ``sample`` in noise slot ``slot`` draws
``tl.randn(seed, (sample << 32) | (slot * numel + element))`` with a 64-bit
offset, exactly what ``fastddpm.noise.normal`` computes in PyTorch: Triton's
``randint4x`` puts the offset's low word in Philox counter ``c0`` and its high
word in ``c1``.

``philox_words`` and ``normal`` launch the same generator over given offsets;
the tests compare them with ``fastddpm.noise``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["contract_offsets", "philox_words", "normal"]


@triton.jit
def contract_offsets(sample, low):
    """64-bit counters ``(sample << 32) | low``.

    :param sample: int64 scalar, the global sample index (< 2**32).
    :param low: int64 block, ``slot * numel + element`` (< 2**32).
    """
    return (sample << 32) | low


@triton.jit
def _philox_words_kernel(offsets_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, n, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    offset = tl.load(offsets_ptr + offs, mask=mask, other=0)
    i0, i1, i2, i3 = tl.randint4x(seed, offset)
    # uint32 words widened to int64 without sign extension, as fastddpm.noise stores them
    tl.store(w0_ptr + offs, i0.to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    tl.store(w1_ptr + offs, i1.to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    tl.store(w2_ptr + offs, i2.to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    tl.store(w3_ptr + offs, i3.to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)


@triton.jit
def _normal_kernel(offsets_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    offset = tl.load(offsets_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.randn(seed, offset), mask=mask)


def philox_words(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox4x32-10 output words of ``tl.randint4x(seed, offsets)``
    as int64 tensors holding uint32 values (``fastddpm.noise.philox4x32`` layout)."""
    offsets = offsets.contiguous().reshape(-1)
    words = [torch.empty_like(offsets) for _ in range(4)]
    block = 1024
    _philox_words_kernel[(triton.cdiv(offsets.numel(), block),)](offsets, *words, offsets.numel(), seed, BLOCK=block)
    return tuple(w.reshape(offsets.shape) for w in words)


def normal(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)`` as a float32 tensor shaped like ``offsets``."""
    shape = offsets.shape
    offsets = offsets.contiguous().reshape(-1)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    block = 1024
    _normal_kernel[(triton.cdiv(offsets.numel(), block),)](offsets, out, offsets.numel(), seed, BLOCK=block)
    return out.reshape(shape)
