"""The compiled extension ``fastddpm._C`` against the reference.

CPU: every op and variant against ``fastddpm.ops.reference`` with the contract's
noise, odd and round shapes, model outputs in float32/bfloat16/float16 (the
reference computed from the same rounded output); the noise against
``fastddpm.noise`` (Philox integers exactly, normals within NORMAL_ULP); the
loss and its gradient against autograd of the reference; ``opcheck`` of every
op; one ``torch.compile(fullgraph=True)``; the dispatch; the in-place step,
whose noise key is a tensor, bit for bit against the functional one with the
key as ints.  GPU (``gpu`` marker): the CUDA ops against the reference and the
CPU ops, and inside a captured CUDA graph driven by a device step counter and
a device noise key.
"""
from functools import lru_cache

import pytest
import torch

from backends import import_backend  # noqa: E402

import_backend("fastddpm._C")

from fastddpm import noise, ops  # noqa: E402
from fastddpm.ops import cpp as cpp_ops  # noqa: E402
from fastddpm.ops import reference  # noqa: E402
from fastddpm.schedule import NoiseSchedule  # noqa: E402
from tolerances import BY_DTYPE, EXACT, FP32, NORMAL_ULP, assert_close  # noqa: E402

pytestmark = pytest.mark.ops

SEED = 0x1234_5678_9ABC_DEF
SAMPLE_OFFSET = 5
T = 1000
SHAPES = [(3, 5, 7, 9), (4, 3, 16, 16), (1, 1, 8, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEP_VARIANTS = (
    [(p, "ddpm", v, 0.0) for p in reference.PREDICTIONS for v in reference.VARIANCES]
    + [(p, "ddim", "fixed_small", eta) for p in reference.PREDICTIONS for eta in (0.0, 0.5, 1.0)]
)
HAS_CUDA = torch.cuda.is_available()


def _id(v):
    return str(v).replace("torch.", "")


@lru_cache(maxsize=None)
def _schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear", T)


@lru_cache(maxsize=None)
def _coefs(prediction, sampler, variance, eta) -> torch.Tensor:
    rows = reference.step_coefficients(_schedule(), prediction, variance, sampler, eta)
    return torch.as_tensor(rows, dtype=torch.float64).to(torch.float32)


def _tables(device="cpu"):
    s = _schedule()
    return s.table("sqrt_alphas_cumprod", device), s.table("sqrt_one_minus_alphas_cumprod", device)


def _timesteps(n, device="cpu"):
    """Per-sample t covering both ends of the schedule."""
    base = [T - 1, 0, 1, T // 2, 17, T - 2]
    return torch.tensor((base * (n // len(base) + 1))[:n], dtype=torch.int64, device=device)


def _weights(prediction, device="cpu"):
    w = reference.loss_weights(_schedule(), prediction, 5.0)  # min-SNR-5
    return torch.as_tensor(w, dtype=torch.float64).to(torch.float32).to(device)


def _inputs(shape, dtype, device="cpu"):
    x = torch.randn(shape).to(device)
    out = (torch.randn(shape) * 1.5).to(device=device, dtype=dtype)
    return x, out


def _ref_step(x, out, step, coefs, clip, seed=SEED, sample_offset=SAMPLE_OFFSET):
    z = reference.batch_noise(seed, sample_offset, step, x.shape, x.device)
    return reference.ddpm_step(x, out, coefs.index_select(0, step), clip, z)


def _rng(seed, sample_offset, device="cpu"):
    """The noise key of the in-place step: int64 [2] (seed, sample_offset)."""
    return torch.tensor([seed, sample_offset], dtype=torch.int64, device=device)


def _ref_loss(out, x0, t, weights, prediction, loss_type, delta):
    sac, s1mac = _tables(out.device)
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, x0.shape, x0.device)
    return reference.diffusion_loss(out, x0, z, t, sac, s1mac, weights, prediction, loss_type, delta)


def _assert_grad_close(actual, expected, dtype):
    """Gradients are ~1/numel: compare them relative to their largest entry."""
    scale = expected.float().abs().max().clamp_min(1e-30)
    assert_close(actual.float() / scale, expected.float() / scale, **BY_DTYPE[dtype], msg="grad / max|grad|")


# -- noise ---------------------------------------------------------------------------------
def _offsets(device="cpu"):
    g = torch.Generator().manual_seed(1)
    random = torch.randint(0, 2**62, (4090,), generator=g, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1, (7 << 32) | 12345], dtype=torch.int64)
    return torch.cat([random, edges]).to(device)


@pytest.mark.parametrize("seed", [0, 1, SEED, 2**63 - 1])
def test_philox_integers_exact(seed):
    off = _offsets()
    words = cpp_ops.philox4x32(seed, off)
    expected = noise.philox4x32(seed, off & noise.MASK32, (off >> 32) & noise.MASK32)
    assert_close(words, torch.stack(expected, dim=-1), **EXACT, msg="philox words")


@pytest.mark.parametrize("seed", [0, SEED, 2**63 - 1])
def test_philox_normals_within_ulp(seed):
    off = _offsets().reshape(64, 64)
    assert_close(cpp_ops.philox_normal(seed, off), noise.normal(seed, off), **NORMAL_ULP, msg="normals")


# -- q_sample --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_q_sample_matches_reference(shape, dtype):
    x0 = torch.randn(shape).to(dtype)
    t = _timesteps(shape[0])
    sac, s1mac = _tables()
    actual = cpp_ops.q_sample(x0, t, sac, s1mac, SEED, SAMPLE_OFFSET)
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, x0.shape, x0.device)
    assert actual.dtype == torch.float32
    assert_close(actual, reference.q_sample(x0, t, sac, s1mac, z), **BY_DTYPE[dtype], msg=f"q_sample {dtype}")


# -- ddpm_step -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_ddpm_step_matches_reference(variant, clip, shape, dtype):
    coefs = _coefs(*variant)
    x, out = _inputs(shape, dtype)
    step = _timesteps(shape[0])
    actual = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, clip)
    assert actual.dtype == torch.float32
    assert_close(actual, _ref_step(x, out, step, coefs, clip), **BY_DTYPE[dtype], msg=f"ddpm_step {variant}")


@pytest.mark.parametrize("step_shape", [(), (1,), "expanded"], ids=_id)
def test_ddpm_step_single_step_index(step_shape):
    """A step index shared by the batch (a 0-dim/[1] counter, or an expanded
    0-dim) is read in the kernel: same result as a per-sample [n] step."""
    coefs = _coefs("epsilon", "ddpm", "fixed_large", 0.0)
    x, out = _inputs((4, 3, 16, 16), torch.float32)
    k = torch.tensor(T // 3)
    step = k.expand(4) if step_shape == "expanded" else k.reshape(step_shape)
    actual = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, True)
    expected = cpp_ops.ddpm_step(x, out, k.repeat(4), coefs, SEED, SAMPLE_OFFSET, True)
    assert_close(actual, expected, **EXACT)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("model_dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=_id)
def test_ddpm_step_cast_and_inplace(shape, model_dtype, channels_last):
    """The low-precision copy for the next model call is x_prev rounded, in the
    asked layout; the in-place form writes the same into given buffers."""
    coefs = _coefs("v", "ddim", "fixed_small", 0.5)
    x, out = _inputs(shape, torch.bfloat16)
    step = _timesteps(shape[0])
    x_prev = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, True)
    x_cast, model_input = cpp_ops.ddpm_step_cast(x, out, step, coefs, SEED, SAMPLE_OFFSET, True, model_dtype,
                                                 channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert model_input.dtype == model_dtype and model_input.is_contiguous(memory_format=layout)
    assert_close(x_cast, x_prev, **EXACT)
    assert_close(model_input, x_prev.to(model_dtype), **EXACT, msg="model input")

    x_buf = x.clone()
    buf = torch.empty(shape, dtype=model_dtype).to(memory_format=layout)
    cpp_ops.ddpm_step_(x_buf, out, step, coefs, _rng(SEED, SAMPLE_OFFSET), True, buf)
    assert_close(x_buf, x_prev, **EXACT)
    assert_close(buf, model_input, **EXACT)


# (seed, sample_offset): zero, a seed that fills both key words, the largest seed, offsets past 2**31
RNG_KEYS = [(0, 0), (SEED, SAMPLE_OFFSET), (2**32 + 3, 2**31 + 1), (2**63 - 1, 2**32 - 8)]


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=_id)
@pytest.mark.parametrize("key", RNG_KEYS, ids=_id)
def test_ddpm_step_inplace_rng_equals_functional(key, shape, dtype, clip):
    """ddpm_step_ reads (seed, sample_offset) from the tensor rng: bit for bit the
    functional op given them as ints, for a per-sample and a shared step index, with
    no model input, one of the output's dtype and a float16 channels_last one."""
    seed, sample_offset = key
    coefs = _coefs("epsilon", "ddpm", "fixed_large", 0.0)  # sigma > 0 at every step: noise everywhere
    x, out = _inputs(shape, dtype)
    for step in (_timesteps(shape[0]), torch.tensor(T // 2)):
        want = cpp_ops.ddpm_step(x, out, step.expand(shape[0]), coefs, seed, sample_offset, clip)
        for model_input in (None, torch.empty(shape, dtype=dtype),
                            torch.empty(shape, dtype=torch.float16).to(memory_format=torch.channels_last)):
            x_buf = x.clone()
            cpp_ops.ddpm_step_(x_buf, out, step, coefs, _rng(seed, sample_offset), clip, model_input)
            assert_close(x_buf, want, **EXACT, msg=f"x, step {tuple(step.shape)}")
            if model_input is not None:
                assert_close(model_input, x_buf.to(model_input.dtype), **EXACT, msg="model input")
    # the key is what rng holds: another sample offset draws other noise
    x_buf = x.clone()
    cpp_ops.ddpm_step_(x_buf, out, step, coefs, _rng(seed, sample_offset + 1), clip, None)
    assert not torch.equal(x_buf, want)


@pytest.mark.parametrize("rng, match", [
    (torch.tensor([1, 0], dtype=torch.int32), "rng must be Long"),
    (torch.tensor([1.0, 0.0]), "rng must be Long"),
    (torch.tensor([SEED, 0, 0]), r"rng must have shape \[2\]"),
    (torch.tensor([[SEED, 0]]), r"rng must have shape \[2\]"),
    (torch.tensor(SEED), r"rng must have shape \[2\]"),
    (torch.tensor([SEED, 7, 0, 9])[::2], "rng must be contiguous"),
    (torch.tensor([-1, 0]), r"rng must hold \(seed, sample_offset\)"),
    (torch.tensor([SEED, -2]), r"rng must hold \(seed, sample_offset\)"),
    # a meta rng with CPU x dispatches to the fake implementation, which checks the device
    (torch.tensor([SEED, 0], device="meta"), r"rng must be an int64 \[2\] tensor .* on cpu"),
], ids=["int32", "float", "3", "1x2", "0-dim", "strided", "negative-seed", "negative-offset", "other-device"])
def test_ddpm_step_inplace_rejects_bad_rng(rng, match):
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    x, out = _inputs((2, 3, 4, 4), torch.float32)
    x_buf = x.clone()
    with pytest.raises(RuntimeError, match=match):
        cpp_ops.ddpm_step_(x_buf, out, torch.tensor([0, 1]), coefs, rng, True, None)
    assert torch.equal(x_buf, x)


def test_ddpm_step_rejects_bad_inputs():
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    x, out = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="step must lie in"):
        cpp_ops.ddpm_step(x, out, torch.tensor([0, T]), coefs, SEED, 0, True)
    with pytest.raises(RuntimeError, match="x must be Float"):
        cpp_ops.ddpm_step(x.double(), out, torch.tensor([0, 1]), coefs, SEED, 0, True)
    with pytest.raises(RuntimeError, match="coefs must have shape"):
        cpp_ops.ddpm_step(x, out, torch.tensor([0, 1]), coefs[:, :4], SEED, 0, True)
    with pytest.raises(RuntimeError, match="model_output must have shape"):
        cpp_ops.ddpm_step(x, out[:1], torch.tensor([0, 1]), coefs, SEED, 0, True)


# -- diffusion_loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_id)
@pytest.mark.parametrize("loss_type", reference.LOSSES)
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
def test_diffusion_loss_and_gradient_match_reference(prediction, loss_type, shape, dtype):
    x0 = torch.randn(shape).clamp(-1, 1)
    out = torch.randn(shape).to(dtype)
    t = _timesteps(shape[0])
    weights = _weights(prediction)
    sac, s1mac = _tables()
    delta = 0.7

    out_cpp = out.clone().requires_grad_()
    loss = cpp_ops.diffusion_loss(out_cpp, x0, t, sac, s1mac, weights, SEED, SAMPLE_OFFSET, prediction, loss_type,
                                  delta)
    loss.backward()
    out_ref = out.clone().requires_grad_()
    expected = _ref_loss(out_ref, x0, t, weights, prediction, loss_type, delta)
    expected.backward()

    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, expected, **FP32, msg="loss")
    assert out_cpp.grad.dtype == dtype
    _assert_grad_close(out_cpp.grad, out_ref.grad, dtype)


@pytest.mark.parametrize("shape", [(3, 3, 97, 101), (2, 3, 151, 150)], ids=_id)
def test_large_odd_shapes_split_across_tasks(shape):
    """Rows that straddle parallel tasks and chunks, and loss rows of more than
    one partial sum (> 65536 elements)."""
    coefs = _coefs("v", "ddpm", "fixed_large", 0.0)
    x, out = _inputs(shape, torch.bfloat16)
    step = _timesteps(shape[0])
    actual = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, False)
    assert_close(actual, _ref_step(x, out, step, coefs, False), **FP32, msg="ddpm_step")
    sac, s1mac = _tables()
    x_t = cpp_ops.q_sample(x, step, sac, s1mac, SEED, SAMPLE_OFFSET)
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, shape, "cpu")
    assert_close(x_t, reference.q_sample(x, step, sac, s1mac, z), **FP32, msg="q_sample")
    weights = _weights("epsilon")
    loss = cpp_ops.diffusion_loss(out, x, step, sac, s1mac, weights, SEED, SAMPLE_OFFSET, "epsilon", "l2", 1.0)
    assert_close(loss, _ref_loss(out, x, step, weights, "epsilon", "l2", 1.0), **FP32, msg="loss")


# -- torch.library: opcheck, compile, dispatch ------------------------------------------------------
def _opcheck_cases():
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    sac, s1mac = _tables()
    x, out = _inputs((2, 3, 4, 4), torch.bfloat16)
    out32 = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([0, T - 1])
    return [
        ("philox_normal", (SEED, _offsets()[:64])),
        ("philox4x32", (SEED, _offsets()[:64])),
        ("q_sample", (x, t, sac, s1mac, SEED, 3)),
        ("diffusion_loss", (out32, x, t, sac, s1mac, _weights("v"), SEED, 3, "v", "huber", 1.0)),
        ("diffusion_loss_backward", (torch.tensor(2.0), out, x, t, sac, s1mac, _weights("v"), SEED, 3, "v", "l2", 1.0)),
        ("ddpm_step", (x, out, t, coefs, SEED, 3, True)),
        ("ddpm_step_cast", (x, out, t, coefs, SEED, 3, True, torch.float16, True)),
        ("ddpm_step_", (x.clone(), out, torch.tensor(7), coefs, _rng(SEED, 3), False,
                        torch.empty(2, 3, 4, 4, dtype=torch.bfloat16))),
        ("ddpm_step_", (x.clone(), out, torch.tensor(7), coefs, _rng(SEED, 3), False, None)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastddpm, name).default, args)


def test_torch_compile_fullgraph():
    coefs = _coefs("x0", "ddpm", "fixed_large", 0.0)
    sac, s1mac = _tables()
    weights = _weights("x0")
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, T - 1])

    def train_and_step(x0, t, out):
        x_t = torch.ops.fastddpm.q_sample(x0, t, sac, s1mac, SEED, 0)
        loss = torch.ops.fastddpm.diffusion_loss(out, x0, t, sac, s1mac, weights, SEED, 0, "x0", "l2", 1.0)
        x_prev = torch.ops.fastddpm.ddpm_step(x_t, out, t, coefs, SEED, 0, True)
        return x_prev, loss

    compiled = torch.compile(train_and_step, fullgraph=True)
    out = torch.randn(2, 3, 8, 8)
    for actual, expected in zip(compiled(x0, t, out), train_and_step(x0, t, out)):
        assert_close(actual, expected, **EXACT)


def test_dispatch_selects_cpp():
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    x, out = _inputs((2, 3, 8, 8), torch.float16)
    step = torch.tensor(T - 1)
    with ops.use_backend("cpp"):
        assert ops.select_backend("ddpm_step", torch.device("cpu"), torch.float16) == "cpp"
        actual = ops.ddpm_step(x, out, step, coefs, seed=SEED, sample_offset=2)
    expected = cpp_ops.ddpm_step(x, out, step.repeat(2), coefs, SEED, 2, True)
    assert_close(actual, expected, **EXACT)
    with ops.use_backend("reference"):
        reference_result = ops.ddpm_step(x, out, step, coefs, seed=SEED, sample_offset=2)
    assert_close(actual, reference_result, **BY_DTYPE[torch.float16])
    assert "cpp" in ops.available_backends("q_sample", "cpu", torch.bfloat16)
    assert cpp_ops.unsupported("ddpm_step", torch.device("cpu"), torch.float64) is not None


# -- GPU ---------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
# On a GPU, an extension built without CUDA fails these (and test_backends says why), never skips them.
needs_cuda_ops = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("seed", [0, SEED, 2**63 - 1])
def test_cuda_noise_equals_cpu(seed):
    off = _offsets()
    assert_close(cpp_ops.philox4x32(seed, off.cuda()), cpp_ops.philox4x32(seed, off), **EXACT, msg="words")
    assert_close(cpp_ops.philox_normal(seed, off.cuda()), noise.normal(seed, off), **NORMAL_ULP, msg="normals")


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=_id)
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_cuda_ddpm_step_matches_reference_and_cpu(variant, shape, dtype):
    coefs = _coefs(*variant)
    x, out = _inputs(shape, dtype)
    step = _timesteps(shape[0])
    cpu = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, True)
    cuda = cpp_ops.ddpm_step(x.cuda(), out.cuda(), step.cuda(), coefs.cuda(), SEED, SAMPLE_OFFSET, True)
    expected = _ref_step(x.cuda(), out.cuda(), step.cuda(), coefs.cuda(), True)
    assert_close(cuda, expected, **BY_DTYPE[dtype], msg="cuda vs reference")
    assert_close(cuda, cpu, **BY_DTYPE[dtype], msg="cuda vs cpu")


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_cuda_ddpm_step_cast(model_dtype, channels_last):
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    x, out = _inputs((4, 3, 16, 16), torch.bfloat16)
    step = _timesteps(4).cuda()
    x, out, coefs = x.cuda(), out.cuda(), coefs.cuda()
    x_prev, model_input = cpp_ops.ddpm_step_cast(x, out, step, coefs, SEED, 0, True, model_dtype, channels_last)
    assert_close(model_input, x_prev.to(model_dtype), **EXACT)
    assert model_input.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=_id)
def test_cuda_q_sample_and_loss(shape, dtype):
    sac, s1mac = _tables("cuda")
    x0 = torch.randn(shape, device="cuda").clamp(-1, 1)
    out = torch.randn(shape, device="cuda").to(dtype)
    t = _timesteps(shape[0], "cuda")
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, shape, "cuda")
    x_t = cpp_ops.q_sample(x0.to(dtype), t, sac, s1mac, SEED, SAMPLE_OFFSET)
    assert_close(x_t, reference.q_sample(x0.to(dtype), t, sac, s1mac, z), **BY_DTYPE[dtype], msg="q_sample")
    assert_close(x_t, cpp_ops.q_sample(x0.to(dtype).cpu(), t.cpu(), *_tables(), SEED, SAMPLE_OFFSET),
                 **BY_DTYPE[dtype], msg="q_sample cuda vs cpu")
    for prediction, loss_type in [("epsilon", "l2"), ("v", "huber"), ("x0", "l1")]:
        weights = _weights(prediction, "cuda")
        out_cuda = out.clone().requires_grad_()
        loss = cpp_ops.diffusion_loss(out_cuda, x0, t, sac, s1mac, weights, SEED, SAMPLE_OFFSET, prediction,
                                      loss_type, 0.7)
        loss.backward()
        out_ref = out.clone().requires_grad_()
        expected = _ref_loss(out_ref, x0, t, weights, prediction, loss_type, 0.7)
        expected.backward()
        assert_close(loss, expected, **FP32, msg=f"loss {prediction} {loss_type}")
        _assert_grad_close(out_cuda.grad, out_ref.grad, dtype)


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("key", RNG_KEYS, ids=_id)
def test_cuda_ddpm_step_inplace_rng_equals_functional(key):
    seed, sample_offset = key
    coefs = _coefs("epsilon", "ddpm", "fixed_large", 0.0).cuda()
    for shape in [(3, 5, 7, 9), (4, 3, 16, 16)]:
        x, out = (t.cuda() for t in _inputs(shape, torch.bfloat16))
        step = _timesteps(shape[0], "cuda")
        want = cpp_ops.ddpm_step(x, out, step, coefs, seed, sample_offset, True)
        model_input = torch.empty(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        x_buf = x.clone()
        cpp_ops.ddpm_step_(x_buf, out, step, coefs, _rng(seed, sample_offset, "cuda"), True, model_input)
        assert_close(x_buf, want, **EXACT, msg="cuda in place vs functional")
        assert_close(model_input, want.to(torch.bfloat16), **EXACT, msg="model input")
    with pytest.raises(RuntimeError, match="rng must be on cuda"):
        cpp_ops.ddpm_step_(x.clone(), out, step, coefs, _rng(seed, sample_offset), True, None)


@gpu
@needs_cuda_ops
def test_cuda_graph_with_device_step_counter_and_noise_key():
    """The in-place step inside a captured CUDA graph: the step index and the noise
    key live in device tensors (the graph itself decrements the step), so one graph
    replays every seed; each result equals the eager loop with the reference."""
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0).cuda()
    steps = 6
    shape = (4, 3, 16, 16)
    x0 = torch.randn(shape, device="cuda")
    outs = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(steps)]

    x = x0.clone()
    out_buf = torch.empty_like(outs[0])
    model_input = torch.empty(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    counter = torch.tensor([steps - 1], device="cuda")
    rng = _rng(SEED, 0, "cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        cpp_ops.ddpm_step_(x.clone(), out_buf, counter.clone(), coefs, rng, True, model_input.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cpp_ops.ddpm_step_(x, out_buf, counter, coefs, rng, True, model_input)
        counter.sub_(1)
    for seed, sample_offset in [(SEED, 0), (2**32 + 3, 9)]:
        rng.copy_(_rng(seed, sample_offset))
        x.copy_(x0)
        counter.fill_(steps - 1)
        for k in reversed(range(steps)):
            out_buf.copy_(outs[k])
            graph.replay()
        torch.cuda.synchronize()

        expected = x0.clone()
        for k in reversed(range(steps)):
            expected = _ref_step(expected, outs[k], torch.full((shape[0],), k, device="cuda"), coefs, True, seed,
                                 sample_offset)
        assert_close(x, expected, **FP32, msg=f"graph replay vs reference, seed {seed}")
        assert_close(model_input, x.to(torch.bfloat16), **EXACT, msg="model input")
        assert int(counter.item()) == -1
