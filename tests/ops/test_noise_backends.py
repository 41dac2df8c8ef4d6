"""The noise contract on every backend: the Philox words bit for bit and the normals within
``NORMAL_ULP`` of ``fastddpm.noise`` (the reference), for edge and random offsets.

Reference: ``fastddpm/noise.py``; kernels: ``csrc/fused_math.h`` (``philox4x32``,
``philox_normal`` ops) and ``kernels/noise.py``.  The known answers of the contract itself
are in ``tests/test_noise.py``.
"""
import pytest
import torch

from fastddpm import noise
from backends import need
from op_cases import TARGETS, target_id
from tolerances import EXACT, NORMAL_ULP, assert_close

pytestmark = pytest.mark.ops

EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, (5 << 32) | 12345, (7 << 32) | 12345, (2**31 - 1) << 32,
         2**63 - 1, -1, -(2**32) + 5]


def offsets(device):
    g = torch.Generator().manual_seed(1)
    random = torch.randint(0, 2**62, (4096 - len(EDGES),), generator=g, dtype=torch.int64)
    return torch.cat([random, torch.tensor(EDGES, dtype=torch.int64)]).to(device)


def words_and_normals(backend):
    """The backend's (words(seed, offsets) -> int64 [..., 4], normal(seed, offsets))."""
    if backend == "cpp":
        from fastddpm.ops import cpp
        return cpp.philox4x32, cpp.philox_normal
    from fastddpm.kernels import noise as knoise
    return (lambda seed, off: torch.stack(knoise.philox_words(seed, off), dim=-1)), knoise.normal


@pytest.mark.parametrize("seed", [0, 1, 7, 1234567, 2**40 + 3, 0x1234_5678_9ABC_DEF, 2**63 - 1])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_philox_integers_exact(target, seed):
    backend, device = target
    need(backend, "q_sample", device)
    off = offsets(device)
    words, _ = words_and_normals(backend)
    expected = noise.philox4x32(seed, off & noise.MASK32, (off >> 32) & noise.MASK32)
    assert_close(words(seed, off), torch.stack(expected, dim=-1), **EXACT, msg="philox words")


@pytest.mark.parametrize("seed", [0, 7, 0x1234_5678_9ABC_DEF, 2**63 - 1])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_normals_within_ulp(target, seed):
    backend, device = target
    need(backend, "q_sample", device)
    off = offsets(device).reshape(64, 64)
    _, normal = words_and_normals(backend)
    assert_close(normal(seed, off), noise.normal(seed, off), **NORMAL_ULP, msg="normals")
