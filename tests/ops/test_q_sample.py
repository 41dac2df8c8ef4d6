"""``q_sample`` (forward noising with the contract's noise) on every backend against the reference.

Reference: ``fastddpm.ops.reference.q_sample``; kernels: ``csrc/`` (``fused_math.h``,
``cpu_kernels.cpp``, ``cuda_kernels.cu``) and ``kernels/q_sample.py``; schema:
``fastddpm/ops/schemas.def``; benchmark: ``benchmarks/bench_ops.py``.
"""
import pytest
import torch

from fastddpm import ops
from backends import need
from op_cases import (DTYPES, LARGE_ODD_SHAPES, SAMPLE_OFFSET, SEED, SHAPES, TARGETS, tables, target_id,
                      timesteps)
from tolerances import EXACT, FP32, assert_close

pytestmark = pytest.mark.ops


@pytest.mark.parametrize("shape", SHAPES + [(5, 123)], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_q_sample_matches_reference(target, dtype, shape):
    """float32 x_t from an x0 of any float dtype (the reference reads the same rounded x0)."""
    backend, device = target
    need(backend, "q_sample", device, dtype)
    x0 = torch.randn(shape).to(device=device, dtype=dtype)
    t = timesteps(shape[0], device)
    got = ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=SAMPLE_OFFSET, backend=backend)
    want = ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=SAMPLE_OFFSET, backend="reference")
    assert got.dtype == torch.float32
    assert_close(got, want, **FP32, msg=f"q_sample {backend} {shape} {dtype}")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_q_sample_large_odd_shapes(target, shape):
    backend, device = target
    need(backend, "q_sample", device)
    x0 = torch.randn(shape, device=device)
    t = timesteps(shape[0], device)
    got = ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=SAMPLE_OFFSET, backend=backend)
    want = ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=SAMPLE_OFFSET, backend="reference")
    assert_close(got, want, **FP32, msg="q_sample")


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_q_sample_noise_independent_of_batching(target):
    """Sample i's noise depends on its global index only: a split batch equals the whole."""
    backend, device = target
    need(backend, "q_sample", device)
    x0 = torch.randn(4, 3, 8, 8, device=device)
    t = timesteps(4, device)
    whole = ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=100, backend=backend)
    parts = [ops.q_sample(x0[i:i + 2], t[i:i + 2], *tables(device), seed=SEED, sample_offset=100 + i, backend=backend)
             for i in (0, 2)]
    assert_close(torch.cat(parts), whole, **EXACT)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_q_sample_scalar_t_broadcast(target):
    backend, device = target
    need(backend, "q_sample", device)
    x0 = torch.randn(3, 2, 4, 4, device=device)
    t = torch.tensor(999, device=device)
    got = ops.q_sample(x0, t, *tables(device), seed=SEED, backend=backend)
    want = ops.q_sample(x0, t, *tables(device), seed=SEED, backend="reference")
    assert_close(got, want, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=target_id)
def test_q_sample_backends_agree(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need("cpp", "q_sample", device, dtype)
    need("triton", "q_sample", device, dtype)
    x0 = torch.randn(4, 3, 16, 16, device=device).to(dtype)
    t = timesteps(4, device)
    got, cpp = (ops.q_sample(x0, t, *tables(device), seed=SEED, sample_offset=9, backend=b) for b in ("triton", "cpp"))
    assert_close(got, cpp, **FP32)
