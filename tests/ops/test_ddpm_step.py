"""``ddpm_step`` (one reverse step) and its cast and in-place forms on every backend against the
reference.

Reference: ``fastddpm.ops.reference.ddpm_step`` (coefficients: ``reference.step_coefficients``);
kernels: ``csrc/`` and ``kernels/ddpm_step.py``; schemas: ``fastddpm/ops/schemas.def``
(``ddpm_step``, ``ddpm_step_cast``, ``ddpm_step_``); benchmark: ``benchmarks/bench_ops.py``.
The in-place ``ddpm_step_`` (what the sampler engine replays, from ``ops.implementation``)
reads its noise key from a device tensor: it must equal the functional op bit for bit.
"""
import pytest
import torch

from fastddpm import ops
from fastddpm.ops import reference
from backends import need
from op_cases import (DTYPES, LARGE_ODD_SHAPES, RNG_KEYS, SAMPLE_OFFSET, SEED, SHAPES, T, TARGETS, coefficients,
                      inputs, namespace_op, rng_key, target_id, timesteps, variant_id)
from op_cases import STEP_VARIANTS
from tolerances import EXACT, FP32, fp32_at, assert_close

pytestmark = pytest.mark.ops


def functional(backend):
    return ops.implementation("ddpm_step", backend)


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_matches_reference(target, variant, clip, dtype, shape):
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    coefs = coefficients(variant, device)
    x, out = inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=clip)
    got = ops.ddpm_step(x, out, step, coefs, backend=backend, **kw)
    want = ops.ddpm_step(x, out, step, coefs, backend="reference", **kw)
    assert got.dtype == torch.float32
    # on a GPU (FMA contraction) x_t's terms reach ~1/sqrt(abar) ~ 160 * out at t=T-1 for epsilon:
    # the error is relative to that magnitude there
    tol = fp32_at(want.abs().max()) if device == "cuda" else FP32
    assert_close(got, want, **tol, msg=f"ddpm_step {variant} clip={clip} {dtype}")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_large_odd_shapes(target, shape):
    """Rows that straddle parallel tasks and chunks."""
    backend, device = target
    dtype = torch.bfloat16 if backend == "cpp" else torch.float16
    need(backend, "ddpm_step", device, dtype)
    coefs = coefficients(("v", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=False)
    got = ops.ddpm_step(x, out, step, coefs, backend=backend, **kw)
    assert_close(got, ops.ddpm_step(x, out, step, coefs, backend="reference", **kw), **FP32, msg="ddpm_step")


@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("step_shape", [(), (1,), "expanded"], ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_single_step_index(target, step_shape, shape):
    """A step index shared by the batch (a 0-dim/[1] device counter, or an expanded 0-dim) is
    read in the kernel: the same result as a per-sample [n] step."""
    backend, device = target
    need(backend, "ddpm_step", device)
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs(shape, torch.float32, device)
    k = torch.tensor(T // 3, device=device)
    step = k.expand(shape[0]) if step_shape == "expanded" else k.reshape(step_shape)
    got = functional(backend)(x, out, step, coefs, SEED, SAMPLE_OFFSET, True)
    assert_close(got, functional(backend)(x, out, k.repeat(shape[0]), coefs, SEED, SAMPLE_OFFSET, True), **EXACT)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("model_dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_cast_and_inplace(target, shape, model_dtype, channels_last):
    """The low-precision copy for the next model call is x_prev rounded, in the asked layout;
    the in-place form writes the same into given buffers."""
    backend, device = target
    need(backend, "ddpm_step", device, model_dtype)
    coefs = coefficients(("v", "ddim", "fixed_small", 0.5), device)
    x, out = inputs(shape, torch.float16, device)
    step = timesteps(shape[0], device)
    x_prev = functional(backend)(x, out, step, coefs, SEED, SAMPLE_OFFSET, True)
    x_cast, model_input = namespace_op(backend, "ddpm_step_cast")(x, out, step, coefs, SEED, SAMPLE_OFFSET, True,
                                                                  model_dtype, channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert model_input.dtype == model_dtype and model_input.is_contiguous(memory_format=layout)
    assert_close(x_cast, x_prev, **EXACT)
    assert_close(model_input, x_prev.to(model_dtype), **EXACT, msg="model input")
    x_buf = x.clone()
    buf = torch.empty(shape, dtype=model_dtype, device=device).to(memory_format=layout)
    ops.implementation("ddpm_step_", backend)(x_buf, out, step, coefs, rng_key(SEED, SAMPLE_OFFSET, device), True, buf)
    assert_close(x_buf, x_prev, **EXACT)
    assert_close(buf, model_input, **EXACT)


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("key", RNG_KEYS, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_inplace_rng_equals_functional(target, key, shape, dtype, clip):
    """``ddpm_step_`` reads (seed, sample_offset) from the tensor rng: bit for bit the functional
    op given them as ints, for a per-sample and a shared step index, with no model input, one
    of the output's dtype and a float16 channels_last one."""
    backend, device = target
    need(backend, "ddpm_step_", device, dtype)
    seed, sample_offset = key
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)  # sigma > 0 at every step
    x, out = inputs(shape, dtype, device)
    inplace = ops.implementation("ddpm_step_", backend)
    for step in (timesteps(shape[0], device), torch.tensor(T // 2, device=device)):
        want = functional(backend)(x, out, step.expand(shape[0]), coefs, seed, sample_offset, clip)
        for model_input in (None, torch.empty(shape, dtype=dtype, device=device),
                            torch.empty(shape, dtype=torch.float16, device=device).to(memory_format=torch.channels_last)):
            x_buf = x.clone()
            inplace(x_buf, out, step, coefs, rng_key(seed, sample_offset, device), clip, model_input)
            assert_close(x_buf, want, **EXACT, msg=f"x, step {tuple(step.shape)}")
            if model_input is not None:
                assert_close(model_input, x_buf.to(model_input.dtype), **EXACT, msg="model input")
    # the key is what rng holds: another seed or sample offset draws other noise
    for other in ((seed ^ 1, sample_offset), (seed, sample_offset + 1)):
        x_buf = x.clone()
        inplace(x_buf, out, step, coefs, rng_key(*other, device), clip, None)
        assert not torch.equal(x_buf, want), other


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_last_step_adds_no_noise(target):
    backend, device = target
    need(backend, "ddpm_step", device)
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs((2, 1, 8, 8), torch.float32, device)
    step = torch.zeros(2, dtype=torch.int64, device=device)
    got = functional(backend)(x, out, step, coefs, SEED, 0, True)
    want = reference.ddpm_step(x, out, coefs[step], True, torch.zeros_like(x))
    assert_close(got, want, **FP32)


@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
def test_ddpm_step_backends_agree(variant):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need("cpp", "ddpm_step", device)
    need("triton", "ddpm_step", device)
    coefs = coefficients(variant, device)
    x, out = inputs((3, 5, 7, 9), torch.float32, device)
    step = timesteps(3, device)
    for clip in (True, False):
        got, cpp = (ops.ddpm_step(x, out, step, coefs, seed=SEED, sample_offset=1, clip_denoised=clip, backend=b)
                    for b in ("triton", "cpp"))
        assert_close(got, cpp, **fp32_at(cpp.abs().max()))
