"""The Triton kernels (``fastddpm.kernels``) against the reference, the noise
contract and, when it is built, the C++ op.

Without a GPU every kernel runs in the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``): float32/float16 only and tiny shapes.  ``gpu`` tests
(bf16, CUDA graphs, ``torch.compile`` with Inductor) run only on a GPU.
"""
import pytest
import torch

from fastddpm import noise, ops
from fastddpm.ops import reference
from fastddpm.schedule import NoiseSchedule
from tolerances import BY_DTYPE, EXACT, FP32, NORMAL_ULP, assert_close

from backends import import_backend  # noqa: E402

kernels = import_backend("fastddpm.kernels.ops")
from fastddpm.kernels import noise as knoise  # noqa: E402
from fastddpm.kernels.ddpm_step import ddpm_step_, ddpm_step_cast, ddpm_step_into  # noqa: E402

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
SHAPES = [(3, 5, 7, 9), (2, 1, 8, 8), (4, 3, 16, 16)]
T = 1000
SEED = 20240601


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.make("linear", T)


def tables(schedule):
    return (schedule.table("sqrt_alphas_cumprod", DEVICE), schedule.table("sqrt_one_minus_alphas_cumprod", DEVICE))


def timesteps(n, top=T):
    """n timesteps that include 0 and top-1."""
    t = torch.randint(0, top, (n,), dtype=torch.int64)
    t[0], t[-1] = 0, top - 1
    return t.to(DEVICE)


def coefficients(schedule, prediction="epsilon", variance="fixed_small", sampler="ddpm", eta=0.0):
    rows = reference.step_coefficients(schedule, prediction, variance, sampler, eta)
    return torch.as_tensor(rows, dtype=torch.float32).to(DEVICE)


def cpp_available(op):
    return "cpp" in ops.available_backends(op, DEVICE)


# -- noise --------------------------------------------------------------------------
OFFSETS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, (5 << 32) | 12345, (2**31 - 1) << 32, 2**63 - 1, -1, -(2**32) + 5]


@pytest.mark.parametrize("seed", [0, 1, 1234567, 2**40 + 3, 2**63 - 1])
def test_philox_integers_exact(seed):
    offsets = torch.cat([torch.tensor(OFFSETS, dtype=torch.int64),
                         torch.randint(0, 2**62, (300,), dtype=torch.int64)]).to(DEVICE)
    words = knoise.philox_words(seed, offsets)
    expected = noise.philox4x32(seed, offsets & noise.MASK32, (offsets >> 32) & noise.MASK32)
    for i, (w, e) in enumerate(zip(words, expected)):
        assert torch.equal(w, e), f"Philox word {i} differs from fastddpm.noise.philox4x32"


@pytest.mark.parametrize("seed", [0, 7, 2**63 - 1])
def test_normals_within_ulp(seed):
    offsets = torch.cat([torch.tensor(OFFSETS, dtype=torch.int64),
                         torch.randint(0, 2**62, (300,), dtype=torch.int64)]).to(DEVICE)
    assert_close(knoise.normal(seed, offsets), noise.normal(seed, offsets), **NORMAL_ULP)


# -- q_sample -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_matches_reference(schedule, shape, dtype):
    x0 = torch.randn(shape, device=DEVICE).to(dtype)
    t = timesteps(shape[0])
    got = ops.q_sample(x0, t, *tables(schedule), seed=SEED, sample_offset=11, backend="triton")
    want = ops.q_sample(x0, t, *tables(schedule), seed=SEED, sample_offset=11, backend="reference")
    assert got.dtype == torch.float32
    assert_close(got, want, **FP32, msg=f"q_sample {shape} {dtype}")


def test_q_sample_noise_independent_of_batching(schedule):
    """Sample i's noise depends on its global index only: a split batch equals the whole."""
    x0 = torch.randn(4, 3, 8, 8, device=DEVICE)
    t = timesteps(4)
    whole = kernels.IMPLS["q_sample"](x0, t, *tables(schedule), SEED, 100)
    parts = [kernels.IMPLS["q_sample"](x0[i:i + 2], t[i:i + 2], *tables(schedule), SEED, 100 + i) for i in (0, 2)]
    assert_close(torch.cat(parts), whole, **EXACT)


def test_q_sample_scalar_t_broadcast(schedule):
    x0 = torch.randn(3, 2, 4, 4, device=DEVICE)
    t = torch.tensor(T - 1, device=DEVICE)
    got = ops.q_sample(x0, t, *tables(schedule), seed=SEED, backend="triton")
    want = ops.q_sample(x0, t, *tables(schedule), seed=SEED, backend="reference")
    assert_close(got, want, **FP32)


# -- diffusion_loss -----------------------------------------------------------------
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
@pytest.mark.parametrize("loss_type", reference.LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_forward_and_gradient(schedule, prediction, loss_type, dtype):
    shape = (3, 5, 7, 9)
    x0 = torch.randn(shape, device=DEVICE).to(dtype)
    t = timesteps(shape[0])
    weights = torch.as_tensor(reference.loss_weights(schedule, prediction, 5.0), dtype=torch.float32).to(DEVICE)
    # model outputs near the target, so that Huber sees both branches
    target = reference.training_target(prediction, x0, reference.batch_noise(SEED, 3, 0, shape, DEVICE), t,
                                       *tables(schedule))
    base = (target + 0.8 * torch.randn(shape, device=DEVICE)).to(dtype)
    kw = dict(seed=SEED, sample_offset=3, prediction=prediction, loss_type=loss_type, huber_delta=0.5)
    results = {}
    for backend in ("triton", "reference"):
        out = base.clone().requires_grad_()
        loss = ops.diffusion_loss(out, x0, t, *tables(schedule), weights, backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, out)
        results[backend] = (loss, grad)
    (loss, grad), (ref_loss, ref_grad) = results["triton"], results["reference"]
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, **FP32, msg="loss")
    # gradients are O(1/numel): compare relative to their scale, at the output's dtype
    scale = ref_grad.float().abs().max()
    assert_close(grad.float() / scale, ref_grad.float() / scale, **BY_DTYPE[dtype], msg="d loss / d out")


def test_diffusion_loss_scalar_t_and_second_call(schedule):
    """A 0-dim t (expanded with stride 0) and a repeated call give the same loss."""
    x0 = torch.randn(2, 3, 8, 8, device=DEVICE)
    out = torch.randn(2, 3, 8, 8, device=DEVICE)
    weights = torch.ones(T, device=DEVICE)
    t = torch.tensor(17, device=DEVICE)
    kw = dict(seed=SEED, prediction="v", loss_type="l2")
    got = ops.diffusion_loss(out, x0, t, *tables(schedule), weights, backend="triton", **kw)
    again = ops.diffusion_loss(out, x0, t, *tables(schedule), weights, backend="triton", **kw)
    want = ops.diffusion_loss(out, x0, t, *tables(schedule), weights, backend="reference", **kw)
    assert_close(got, want, **FP32)
    assert_close(got, again, **EXACT)


# -- ddpm_step ----------------------------------------------------------------------
STEP_VARIANTS = [
    dict(prediction=p, variance=v, sampler="ddpm", clip=c)
    for p in reference.PREDICTIONS for v in reference.VARIANCES for c in (True, False)
] + [dict(prediction="epsilon", variance="fixed_small", sampler="ddim", eta=eta, clip=True) for eta in (0.0, 1.0)]


def _variant_id(v):
    return "-".join(str(x) for x in v.values())


@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_step_matches_reference(schedule, variant, dtype):
    variant = dict(variant)
    clip = variant.pop("clip")
    coefs = coefficients(schedule, **variant)
    shape = (3, 5, 7, 9)
    x = torch.randn(shape, device=DEVICE)
    out = torch.randn(shape, device=DEVICE).to(dtype)
    step = timesteps(shape[0], coefs.shape[0])
    kw = dict(seed=SEED, sample_offset=5, clip_denoised=clip)
    got = ops.ddpm_step(x, out, step, coefs, backend="triton", **kw)
    want = ops.ddpm_step(x, out, step, coefs, backend="reference", **kw)
    assert got.dtype == torch.float32
    # x_t reaches ~1/sqrt(abar) ~ 160 * out at t=T-1 for epsilon: relative error on the magnitude
    assert_close(got, want, atol=FP32["atol"] * max(1.0, want.abs().max().item()), rtol=FP32["rtol"],
                 msg=f"ddpm_step {variant} clip={clip} {dtype}")


@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_step_device_step_tensor(schedule, shape):
    """A whole-batch step read from a 0-dim/[1] device tensor (stride 0) equals the per-sample launch."""
    coefs = coefficients(schedule, "epsilon", "fixed_large")
    x = torch.randn(shape, device=DEVICE)
    out = torch.randn(shape, device=DEVICE)
    per_sample = kernels.IMPLS["ddpm_step"](x, out, torch.full((shape[0],), 321, device=DEVICE), coefs, SEED, 2, True)
    for step in (torch.tensor(321, device=DEVICE), torch.tensor([321], device=DEVICE)):
        x_prev = torch.empty_like(x)
        ddpm_step_into(x, out, step, coefs, SEED, 2, True, x_prev)
        assert_close(x_prev, per_sample, **EXACT)


def test_ddpm_step_in_place_and_model_input_copy(schedule):
    """``ddpm_step_cast`` / ``ddpm_step_``: the float32 state plus the next model input in its dtype and layout."""
    coefs = coefficients(schedule, "v", "fixed_small")
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    out = torch.randn(2, 3, 8, 8, device=DEVICE)
    step = torch.tensor([999, 1], device=DEVICE)
    want = kernels.IMPLS["ddpm_step"](x, out, step, coefs, SEED, 0, False)
    for channels_last in (False, True):
        x_prev, model_input = ddpm_step_cast(x, out, step, coefs, SEED, 0, False, torch.float16, channels_last)
        assert_close(x_prev, want, **EXACT)
        assert model_input.dtype == torch.float16
        assert model_input.is_contiguous(memory_format=torch.channels_last if channels_last else
                                          torch.contiguous_format)
        assert_close(model_input, want.half(), **EXACT)
    buffer = x.clone()
    model_input = torch.empty_like(x, dtype=torch.float16, memory_format=torch.channels_last)
    ddpm_step_(buffer, out, step, coefs, rng_key(SEED, 0), False, model_input)  # the sampler's buffers, in place
    assert_close(buffer, want, **EXACT)
    assert_close(model_input, want.half(), **EXACT)
    buffer = x.clone()
    ddpm_step_(buffer, out, step, coefs, rng_key(SEED, 0), False, None)
    assert_close(buffer, want, **EXACT)


def rng_key(seed, sample_offset):
    """The noise key of the in-place step: int64 [2] (seed, sample_offset) on the device."""
    return torch.tensor([seed, sample_offset], dtype=torch.int64, device=DEVICE)


# (seed, sample_offset): zero, a seed past 32 bits, the largest seed, offsets past 2**31
RNG_KEYS = [(0, 0), (SEED, 3), (2**32 + 3, 2**31 + 1), (2**63 - 1, 2**32 - 8)]


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)])
@pytest.mark.parametrize("key", RNG_KEYS)
def test_ddpm_step_inplace_rng_equals_functional(schedule, key, shape, dtype, clip):
    """``ddpm_step_`` loads (seed, sample_offset) from the tensor ``rng`` in the kernel: bit
    for bit the functional op given them as ints, for a per-sample and a shared step, with
    no model input, one of the output's dtype and a float16 channels_last one."""
    seed, sample_offset = key
    coefs = coefficients(schedule, "epsilon", "fixed_large")  # sigma > 0 at every step: noise everywhere
    x = torch.randn(shape, device=DEVICE)
    out = torch.randn(shape, device=DEVICE).to(dtype)
    for step in (timesteps(shape[0]), torch.tensor(T // 2, device=DEVICE)):
        want = kernels.IMPLS["ddpm_step"](x, out, step.expand(shape[0]), coefs, seed, sample_offset, clip)
        channels_last = torch.empty(shape, dtype=torch.float16, device=DEVICE).to(memory_format=torch.channels_last)
        for model_input in (None, torch.empty(shape, dtype=dtype, device=DEVICE), channels_last):
            buffer = x.clone()
            ddpm_step_(buffer, out, step, coefs, rng_key(seed, sample_offset), clip, model_input)
            assert_close(buffer, want, **EXACT, msg=f"x, step {tuple(step.shape)}")
            if model_input is not None:
                assert_close(model_input, buffer.to(model_input.dtype), **EXACT, msg="model input")
    buffer = x.clone()  # the key is what rng holds: another seed draws other noise
    ddpm_step_(buffer, out, step, coefs, rng_key(seed ^ 1, sample_offset), clip, None)
    assert not torch.equal(buffer, want)


@pytest.mark.parametrize("rng, match", [
    (torch.tensor([1, 0], dtype=torch.int32), "rng must be an int64 tensor of shape"),
    (torch.tensor([SEED, 0, 0]), "rng must be an int64 tensor of shape"),
    (torch.tensor([[SEED, 0]]), "rng must be an int64 tensor of shape"),
    (torch.tensor([SEED, 7, 0, 9])[::2], "rng must be contiguous"),
    (torch.tensor([SEED, -1]), r"rng must hold \(seed, sample_offset\)"),
], ids=["int32", "3", "1x2", "strided", "negative"])
def test_ddpm_step_inplace_rejects_bad_rng(schedule, rng, match):
    if HAS_CUDA and match.startswith("rng must hold"):
        pytest.skip("a GPU rng's values are not read on the host (that would synchronise)")
    coefs = coefficients(schedule)
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    buffer = x.clone()
    with pytest.raises(ValueError, match=match):
        ddpm_step_(buffer, torch.randn_like(x), torch.tensor([0, 1], device=DEVICE), coefs, rng.to(DEVICE), True, None)
    assert torch.equal(buffer, x)


def test_ddpm_step_inplace_rejects_rng_on_another_device(schedule):
    coefs = coefficients(schedule)
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    args = (x.clone(), torch.randn_like(x), torch.tensor([0, 1], device=DEVICE), coefs)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="rng must be on x's device"):
            ddpm_step_(*args, torch.tensor([SEED, 0]), True, None)
    else:  # a meta rng with a CPU x dispatches to the fake implementation, which checks the device
        with pytest.raises(RuntimeError, match=r"rng must be an int64 \[2\] tensor .* on cpu"):
            ddpm_step_(*args, torch.tensor([SEED, 0], device="meta"), True, None)


def test_ddpm_step_last_step_adds_no_noise(schedule):
    coefs = coefficients(schedule, "epsilon", "fixed_large")
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    out = torch.randn(2, 1, 8, 8, device=DEVICE)
    step = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    got = kernels.IMPLS["ddpm_step"](x, out, step, coefs, SEED, 0, True)
    want = reference.ddpm_step(x, out, coefs[step], True, torch.zeros_like(x))
    assert_close(got, want, **FP32)


# -- against the C++ op (fastddpm._C, when built) ------------------------------------
def _require_cpp(op):
    if not cpp_available(op):
        reason = ops.unsupported("cpp", op, DEVICE, torch.float32)
        pytest.skip(f"C++ backend unavailable on {DEVICE.type}: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_q_sample_matches_cpp(schedule, dtype):
    _require_cpp("q_sample")
    x0 = torch.randn(4, 3, 16, 16, device=DEVICE).to(dtype)
    t = timesteps(4)
    got, cpp = (ops.q_sample(x0, t, *tables(schedule), seed=SEED, sample_offset=9, backend=b) for b in ("triton", "cpp"))
    assert_close(got, cpp, **FP32)


@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
@pytest.mark.parametrize("loss_type", reference.LOSSES)
def test_diffusion_loss_matches_cpp(schedule, prediction, loss_type):
    _require_cpp("diffusion_loss")
    x0 = torch.randn(3, 5, 7, 9, device=DEVICE)
    t = timesteps(3)
    weights = torch.rand(T, device=DEVICE)
    results = []
    for backend in ("triton", "cpp"):
        out = torch.ones(3, 5, 7, 9, device=DEVICE).mul_(0.3).requires_grad_()
        loss = ops.diffusion_loss(out, x0, t, *tables(schedule), weights, seed=SEED, prediction=prediction,
                                  loss_type=loss_type, huber_delta=0.7, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, out)))
    assert_close(results[0][0], results[1][0], **FP32, msg="loss")
    scale = results[1][1].abs().max()
    assert_close(results[0][1] / scale, results[1][1] / scale, **FP32, msg="gradient")


@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=_variant_id)
def test_ddpm_step_matches_cpp(schedule, variant):
    _require_cpp("ddpm_step")
    variant = dict(variant)
    clip = variant.pop("clip")
    coefs = coefficients(schedule, **variant)
    x = torch.randn(3, 5, 7, 9, device=DEVICE)
    out = torch.randn(3, 5, 7, 9, device=DEVICE)
    step = timesteps(3, coefs.shape[0])
    got, cpp = (ops.ddpm_step(x, out, step, coefs, seed=SEED, sample_offset=1, clip_denoised=clip, backend=b)
                for b in ("triton", "cpp"))
    assert_close(got, cpp, atol=FP32["atol"] * max(1.0, cpp.abs().max().item()), rtol=FP32["rtol"])


# -- registration and dispatch ------------------------------------------------------
def test_unsupported_reasons():
    assert kernels.unsupported("q_sample", torch.device(DEVICE), torch.float32) is None
    if not HAS_CUDA:
        assert "interpreter" in kernels.unsupported("attention", torch.device("cpu"), torch.bfloat16)
        assert ops.select_backend("attention", torch.device("cpu"), torch.float32) != "triton"  # not automatic on CPU
    assert kernels.unsupported("nope", torch.device(DEVICE), torch.float32) is not None


def test_opcheck_elementwise_ops(schedule):
    """Schema, fake implementation, autograd registration, AOT dispatch with dynamic shapes (opcheck)."""
    x0 = torch.randn(2, 1, 4, 4, device=DEVICE)
    t = torch.tensor([0, T - 1], device=DEVICE)
    sac, s1 = tables(schedule)
    coefs = coefficients(schedule)
    lib = torch.ops.fastddpm_triton
    out = torch.randn(2, 1, 4, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(lib.q_sample, (x0, t, sac, s1, SEED, 0))
    torch.library.opcheck(lib.diffusion_loss, (out, x0, t, sac, s1, torch.ones(T, device=DEVICE), SEED, 0, "v", "huber",
                                               1.0))
    torch.library.opcheck(lib.ddpm_step, (x0, out.detach(), t, coefs, SEED, 0, True))
    torch.library.opcheck(lib.ddpm_step_cast, (x0, out.detach(), t, coefs, SEED, 0, True, torch.float16, True))
    torch.library.opcheck(lib.ddpm_step_, (x0.clone(), out.detach(), t, coefs, rng_key(SEED, 0), True,
                                           torch.empty_like(x0, dtype=torch.float16)))
    torch.library.opcheck(lib.ddpm_step_, (x0.clone(), out.detach(), t, coefs, rng_key(SEED, 0), True, None))


def test_torch_compile_sees_one_op(schedule):
    """fullgraph=True traces through the op (opaque custom op on CPU, triton_op on GPU), backward included."""
    sac, s1 = tables(schedule)
    weights = torch.ones(T, device=DEVICE)
    coefs = coefficients(schedule)

    def train_and_step(out, x0, t, x):
        loss = kernels.IMPLS["diffusion_loss"](out, x0, t, sac, s1, weights, SEED, 0, "epsilon", "l2", 1.0)
        xt = kernels.IMPLS["q_sample"](x0, t, sac, s1, SEED, 0)
        return loss, kernels.IMPLS["ddpm_step"](x, xt, t, coefs, SEED, 0, True)

    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(train_and_step, fullgraph=True, backend=backend)
    x0 = torch.randn(2, 3, 8, 8, device=DEVICE)
    t = torch.tensor([5, 900], device=DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    out = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    loss, x_prev = compiled(out, x0, t, x)
    (grad,) = torch.autograd.grad(loss, out)
    out2 = out.detach().clone().requires_grad_()
    want_loss, want_prev = train_and_step(out2, x0, t, x)
    (want_grad,) = torch.autograd.grad(want_loss, out2)
    assert_close(loss, want_loss, **FP32)
    assert_close(grad, want_grad, **FP32)
    assert_close(x_prev, want_prev, **FP32)


# -- GPU only -----------------------------------------------------------------------
@pytest.mark.gpu
def test_elementwise_ops_in_cuda_graph(schedule):
    """The sampler's pattern: buffers allocated once, step index and noise key in device
    tensors, one graph replayed for every step and every seed."""
    coefs = coefficients(schedule, "epsilon", "fixed_large")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    out = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    step = torch.tensor(999, device="cuda")
    rng = rng_key(SEED, 0)
    x_half = torch.empty_like(x, dtype=torch.bfloat16)
    start = x.clone()
    ddpm_step_(x, out, step, coefs, rng, True, x_half)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ddpm_step_(x, out, step, coefs, rng, True, x_half)
    for seed, sample_offset in [(SEED, 0), (2**40 + 1, 7)]:
        rng.copy_(torch.tensor([seed, sample_offset]))
        want = start
        x.copy_(start)
        for s in (999, 998, 500):
            step.fill_(s)
            graph.replay()
            want = reference.ddpm_step(want, out, coefs[torch.full((4,), s, device="cuda")], True,
                                       reference.batch_noise(seed, sample_offset, s, x.shape, "cuda"))
        torch.cuda.synchronize()
        assert_close(x, want, atol=1e-4, rtol=1e-4, msg=f"seed {seed}")
        assert_close(x_half, x.bfloat16(), **EXACT)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (7, 3, 65, 33)])
def test_elementwise_ops_bf16_gpu(schedule, shape):
    x0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t = timesteps(shape[0])
    got = ops.q_sample(x0, t, *tables(schedule), seed=SEED, backend="triton")
    want = ops.q_sample(x0, t, *tables(schedule), seed=SEED, backend="reference")
    assert_close(got, want, **FP32)
