"""What is the C++ backend's alone (the extension ``fastddpm._C``, ``csrc/``): its input checks
(``TORCH_CHECK``s), its torch.library registration (``opcheck`` of every op, one node under
``torch.compile(fullgraph=True)``), the dispatch choosing it, and on a GPU the CUDA ops against
the reference and the CPU ops, and inside a captured CUDA graph driven by a device step counter
and a device noise key.  Each op's conformance against the reference, shared with the Triton
backend, is in ``tests/ops/test_<op>.py``.
"""
import pytest
import torch

from backends import import_backend

import_backend("fastddpm._C")

from fastddpm import noise, ops  # noqa: E402
from fastddpm.ops import cpp as cpp_ops  # noqa: E402
from fastddpm.ops import reference  # noqa: E402
from op_cases import (DTYPES, RNG_KEYS, SAMPLE_OFFSET, SEED, SHAPES, STEP_VARIANTS, T, coefficients,  # noqa: E402
                      loss_weights, target_id, variant_id)
from op_cases import inputs as _inputs  # noqa: E402
from op_cases import rng_key as _rng  # noqa: E402
from op_cases import tables as _tables  # noqa: E402
from op_cases import timesteps as _timesteps  # noqa: E402
from tolerances import BY_DTYPE, EXACT, FP32, NORMAL_ULP, assert_close  # noqa: E402

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()
_id = target_id
_weights = loss_weights


def _coefs(*variant) -> torch.Tensor:
    return coefficients(variant)


def _ref_step(x, out, step, coefs, clip, seed=SEED, sample_offset=SAMPLE_OFFSET):
    z = reference.batch_noise(seed, sample_offset, step, x.shape, x.device)
    return reference.ddpm_step(x, out, coefs.index_select(0, step), clip, z)


def _ref_loss(out, x0, t, weights, prediction, loss_type, delta):
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _tables(out.device)
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, x0.shape, x0.device)
    return reference.diffusion_loss(out, x0, z, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                                    prediction, loss_type, delta)


def _assert_grad_close(actual, expected, dtype):
    """Gradients are ~1/numel: compare them relative to their largest entry."""
    scale = expected.float().abs().max().clamp_min(1e-30)
    assert_close(actual.float() / scale, expected.float() / scale, **BY_DTYPE[dtype], msg="grad / max|grad|")


def _offsets(device="cpu"):
    g = torch.Generator().manual_seed(1)
    random = torch.randint(0, 2**62, (4090,), generator=g, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1, (7 << 32) | 12345], dtype=torch.int64)
    return torch.cat([random, edges]).to(device)


# -- input checks ------------------------------------------------------------------------------
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
        cpp_ops.ddpm_step_(x_buf, out, torch.tensor([0, 1]), coefs, rng, True, None, None, 1.0, None, None, None)
    assert torch.equal(x_buf, x)


def test_ddpm_step_rejects_bad_inputs():
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    x, out = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="step must lie in"):
        cpp_ops.ddpm_step(x, out, torch.tensor([0, T]), coefs, SEED, 0, True, None, 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="x must be Float"):
        cpp_ops.ddpm_step(x.double(), out, torch.tensor([0, 1]), coefs, SEED, 0, True, None, 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="coefs must have shape"):
        cpp_ops.ddpm_step(x, out, torch.tensor([0, 1]), coefs[:, :4], SEED, 0, True, None, 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="model_output must have shape"):
        cpp_ops.ddpm_step(x, out[:1], torch.tensor([0, 1]), coefs, SEED, 0, True, None, 1.0, None, None, None)


# -- torch.library: opcheck, compile, dispatch ------------------------------------------------------
def _opcheck_cases():
    coefs = _coefs("epsilon", "ddpm", "fixed_small", 0.0)
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _tables()
    x, out = _inputs((2, 3, 4, 4), torch.bfloat16)
    out32 = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([0, T - 1])
    return [
        ("philox_normal", (SEED, _offsets()[:64])),
        ("philox4x32", (SEED, _offsets()[:64])),
        ("q_sample", (x, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, SEED, 3)),
        ("diffusion_loss", (out32, x, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, _weights("v"), SEED, 3,
                            "v", "huber", 1.0)),
        ("diffusion_loss_backward", (torch.tensor(2.0), out, x, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                     _weights("v"), SEED, 3, "v", "l2", 1.0)),
        ("ddpm_step", (x, out, t, coefs, SEED, 3, True, None, 1.0, None, None, None)),
        ("ddpm_step_cast", (x, out, t, coefs, SEED, 3, True, torch.float16, True, None, 1.0, None, None, None)),
        ("ddpm_step_", (x.clone(), out, torch.tensor(7), coefs, _rng(SEED, 3), False,
                        torch.empty(2, 3, 4, 4, dtype=torch.bfloat16), None, 1.0, None, None, None)),
        ("ddpm_step_", (x.clone(), out, torch.tensor(7), coefs, _rng(SEED, 3), False, None, None, 1.0, None, None,
                        None)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastddpm, name).default, args)


def test_torch_compile_fullgraph():
    coefs = _coefs("x0", "ddpm", "fixed_large", 0.0)
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _tables()
    weights = _weights("x0")
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, T - 1])

    def train_and_step(x0, t, out):
        x_t = torch.ops.fastddpm.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, SEED, 0)
        loss = torch.ops.fastddpm.diffusion_loss(out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                                 weights, SEED, 0, "x0", "l2", 1.0)
        x_prev = torch.ops.fastddpm.ddpm_step(x_t, out, t, coefs, SEED, 0, True, None, 1.0, None, None, None)
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
    expected = cpp_ops.ddpm_step(x, out, step.repeat(2), coefs, SEED, 2, True, None, 1.0, None, None, None)
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
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
def test_cuda_ddpm_step_matches_reference_and_cpu(variant, shape, dtype):
    coefs = _coefs(*variant)
    x, out = _inputs(shape, dtype)
    step = _timesteps(shape[0])
    cpu = cpp_ops.ddpm_step(x, out, step, coefs, SEED, SAMPLE_OFFSET, True, None, 1.0, None, None, None)
    cuda = cpp_ops.ddpm_step(x.cuda(), out.cuda(), step.cuda(), coefs.cuda(), SEED, SAMPLE_OFFSET, True, None, 1.0, None,
                             None, None)
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
    x_prev, model_input = cpp_ops.ddpm_step_cast(x, out, step, coefs, SEED, 0, True, model_dtype, channels_last, None,
                                                    1.0, None, None, None)
    assert_close(model_input, x_prev.to(model_dtype), **EXACT)
    assert model_input.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=_id)
def test_cuda_q_sample_and_loss(shape, dtype):
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _tables("cuda")
    x0 = torch.randn(shape, device="cuda").clamp(-1, 1)
    out = torch.randn(shape, device="cuda").to(dtype)
    t = _timesteps(shape[0], "cuda")
    z = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, shape, "cuda")
    x_t = cpp_ops.q_sample(x0.to(dtype), t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, SEED, SAMPLE_OFFSET)
    assert_close(x_t, reference.q_sample(x0.to(dtype), t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, z),
                 **BY_DTYPE[dtype], msg="q_sample")
    assert_close(x_t, cpp_ops.q_sample(x0.to(dtype).cpu(), t.cpu(), *_tables(), SEED, SAMPLE_OFFSET),
                 **BY_DTYPE[dtype], msg="q_sample cuda vs cpu")
    for prediction, loss_type in [("epsilon", "l2"), ("v", "huber"), ("x0", "l1")]:
        weights = _weights(prediction, "cuda")
        out_cuda = out.clone().requires_grad_()
        loss = cpp_ops.diffusion_loss(out_cuda, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                                      SEED, SAMPLE_OFFSET, prediction, loss_type, 0.7)
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
        want = cpp_ops.ddpm_step(x, out, step, coefs, seed, sample_offset, True, None, 1.0, None, None, None)
        model_input = torch.empty(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        x_buf = x.clone()
        cpp_ops.ddpm_step_(x_buf, out, step, coefs, _rng(seed, sample_offset, "cuda"), True, model_input, None, 1.0, None,
                           None, None)
        assert_close(x_buf, want, **EXACT, msg="cuda in place vs functional")
        assert_close(model_input, want.to(torch.bfloat16), **EXACT, msg="model input")
    with pytest.raises(RuntimeError, match="rng must be on cuda"):
        cpp_ops.ddpm_step_(x.clone(), out, step, coefs, _rng(seed, sample_offset), True, None, None, 1.0, None, None,
                           None)


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
        cpp_ops.ddpm_step_(x.clone(), out_buf, counter.clone(), coefs, rng, True, model_input.clone(), None, 1.0, None,
                           None, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cpp_ops.ddpm_step_(x, out_buf, counter, coefs, rng, True, model_input, None, 1.0, None, None, None)
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


# -- the build and its sources ------------------------------------------------------------
def test_the_build_is_of_these_sources_and_a_change_is_seen(tmp_path):
    """fastddpm._C records the hash of the sources it was compiled from: this run's build is of
    this checkout (else a stale .so, e.g. one carried to the GPU machine, would be tested), and a
    change to a C++ source or to the schema table makes it stale, with the way out named."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert cpp_ops.stale_build(root) is None
    shutil.copytree(root / "csrc", tmp_path / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fastddpm" / "ops").mkdir(parents=True)
    shutil.copy(root / "fastddpm" / "ops" / "schemas.def", tmp_path / "fastddpm" / "ops")
    assert cpp_ops.stale_build(tmp_path) is None
    for changed in (tmp_path / "csrc" / "fused_math.h", tmp_path / "fastddpm" / "ops" / "schemas.def"):
        original = changed.read_text()
        changed.write_text(original + "\n// changed\n")
        why = cpp_ops.stale_build(tmp_path)
        assert why is not None and "rebuild it" in why and str(tmp_path) in why, why
        changed.write_text(original)
    assert cpp_ops.stale_build(tmp_path / "installed") is None  # no sources beside it: nothing to compare
