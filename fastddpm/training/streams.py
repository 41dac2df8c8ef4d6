"""The trainer's random streams: each a seed derived from ``(seed, stream, i)``, no carried state.

A stream's item ``i`` (an epoch, a step) gets a generator of its own seeded by ``mix(seed, stream, i)``,
so a resumed run rebuilds any of them from the position it saved, and the streams never collide.
"""
from __future__ import annotations

from ..noise import MAX_SEED

__all__ = ["STREAM_DROPOUT", "STREAM_EPOCH", "STREAM_STEP", "STREAM_VAL", "dropout_seed", "mix"]

MASK64 = 2**64 - 1
# generator streams derived from the seed
STREAM_EPOCH, STREAM_STEP, STREAM_VAL, STREAM_DROPOUT = 1, 2, 3, 4


def mix(seed: int, stream: int, i: int) -> int:
    """A 63-bit seed for item ``i`` of ``stream`` (splitmix64 finaliser), so streams never collide."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + i * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & MAX_SEED


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The global RNG's seed of rank ``rank`` > 0 from step ``step`` on (rank 0 uses ``seed`` and the
    checkpointed state): its own dropout masks, not a copy of rank 0's."""
    return mix(mix(seed, STREAM_DROPOUT, rank), STREAM_DROPOUT, step)
