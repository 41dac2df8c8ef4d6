"""What is the Triton backend's alone (``fastddpm.kernels``): its reasons for refusing a case,
its checks of the in-place step's noise key, its torch.library registration (opcheck, one node
under ``torch.compile``) and, on a GPU, CUDA graphs and bf16.  Each op's conformance against the
reference, shared with the C++ backend, is in ``tests/ops/test_<op>.py``.

Without a GPU every kernel runs in the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``): float32/float16 only and tiny shapes.
"""
import pytest
import torch

from backends import import_backend
from fastddpm import ops
from fastddpm.ops import reference
from op_cases import SEED, T, coefficients, rng_key, tables, timesteps
from tolerances import EXACT, FP32, STEPS_FP32, assert_close

kernels = import_backend("fastddpm.kernels.ops")
from fastddpm.kernels.ddpm_step import ddpm_step_  # noqa: E402

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.mark.parametrize("rng, match", [
    (torch.tensor([1, 0], dtype=torch.int32), "rng must be an int64 tensor of shape"),
    (torch.tensor([SEED, 0, 0]), "rng must be an int64 tensor of shape"),
    (torch.tensor([[SEED, 0]]), "rng must be an int64 tensor of shape"),
    (torch.tensor([SEED, 7, 0, 9])[::2], "rng must be contiguous"),
    (torch.tensor([SEED, -1]), r"rng must hold \(seed, sample_offset\)"),
], ids=["int32", "3", "1x2", "strided", "negative"])
def test_ddpm_step_inplace_rejects_bad_rng(rng, match):
    if HAS_CUDA and match.startswith("rng must hold"):
        pytest.skip("a GPU rng's values are not read on the host (that would synchronise)")
    coefs = coefficients(device=DEVICE)
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    buffer = x.clone()
    with pytest.raises(ValueError, match=match):
        ddpm_step_(buffer, torch.randn_like(x), torch.tensor([0, 1], device=DEVICE), coefs, rng.to(DEVICE), True, None, None, 1.0, None, None, None)
    assert torch.equal(buffer, x)


def test_ddpm_step_inplace_rejects_rng_on_another_device():
    coefs = coefficients(device=DEVICE)
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    args = (x.clone(), torch.randn_like(x), torch.tensor([0, 1], device=DEVICE), coefs)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="rng must be on x's device"):
            ddpm_step_(*args, torch.tensor([SEED, 0]), True, None, None, 1.0, None, None, None)
    else:  # a meta rng with a CPU x dispatches to the fake implementation, which checks the device
        with pytest.raises(RuntimeError, match=r"rng must be an int64 \[2\] tensor .* on cpu"):
            ddpm_step_(*args, torch.tensor([SEED, 0], device="meta"), True, None, None, 1.0, None, None, None)


# -- registration and dispatch ------------------------------------------------------
def test_unsupported_reasons():
    assert kernels.unsupported("q_sample", torch.device(DEVICE), torch.float32) is None
    if not HAS_CUDA:
        assert "interpreter" in kernels.unsupported("attention", torch.device("cpu"), torch.bfloat16)
        assert ops.select_backend("attention", torch.device("cpu"), torch.float32) != "triton"  # not automatic on CPU
    assert kernels.unsupported("nope", torch.device(DEVICE), torch.float32) is not None


def test_opcheck_elementwise_ops():
    """Schema, fake implementation, autograd registration, AOT dispatch with dynamic shapes (opcheck)."""
    x0 = torch.randn(2, 1, 4, 4, device=DEVICE)
    t = torch.tensor([0, T - 1], device=DEVICE)
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = tables(DEVICE)
    coefs = coefficients(device=DEVICE)
    lib = torch.ops.fastddpm_triton
    out = torch.randn(2, 1, 4, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(lib.q_sample, (x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, SEED, 0))
    torch.library.opcheck(lib.diffusion_loss, (out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                               torch.ones(T, device=DEVICE), SEED, 0, "v", "huber", 1.0))
    torch.library.opcheck(lib.ddpm_step, (x0, out.detach(), t, coefs, SEED, 0, True, None, 1.0, None, None, None))
    torch.library.opcheck(lib.ddpm_step_cast, (x0, out.detach(), t, coefs, SEED, 0, True, torch.float16, True,
                                                    None, 1.0, None, None, None))
    torch.library.opcheck(lib.ddpm_step_, (x0.clone(), out.detach(), t, coefs, rng_key(SEED, 0, DEVICE), True,
                                           torch.empty_like(x0, dtype=torch.float16), None, 1.0, None, None, None))
    torch.library.opcheck(lib.ddpm_step_, (x0.clone(), out.detach(), t, coefs, rng_key(SEED, 0, DEVICE), True, None,
                                           None, 1.0, None, None, None))


def test_torch_compile_sees_one_op():
    """fullgraph=True traces through the op (opaque custom op on CPU, triton_op on GPU), backward included."""
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = tables(DEVICE)
    weights = torch.ones(T, device=DEVICE)
    coefs = coefficients(device=DEVICE)

    def train_and_step(out, x0, t, x):
        loss = kernels.IMPLS["diffusion_loss"](out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights,
                                               SEED, 0, "epsilon", "l2", 1.0)
        x_t = kernels.IMPLS["q_sample"](x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, SEED, 0)
        return loss, kernels.IMPLS["ddpm_step"](x, x_t, t, coefs, SEED, 0, True, None, 1.0, None, None, None)

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
def test_elementwise_ops_in_cuda_graph():
    """The sampler's pattern: buffers allocated once, step index and noise key in device
    tensors, one graph replayed for every step and every seed."""
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), DEVICE)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    out = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    step = torch.tensor(999, device="cuda")
    rng = rng_key(SEED, 0, DEVICE)
    x_half = torch.empty_like(x, dtype=torch.bfloat16)
    start = x.clone()
    ddpm_step_(x, out, step, coefs, rng, True, x_half, None, 1.0, None, None, None)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ddpm_step_(x, out, step, coefs, rng, True, x_half, None, 1.0, None, None, None)
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
        assert_close(x, want, **STEPS_FP32, msg=f"seed {seed}")
        assert_close(x_half, x.bfloat16(), **EXACT)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (7, 3, 65, 33)])
def test_elementwise_ops_bf16_gpu(shape):
    x0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t = timesteps(shape[0], DEVICE)
    got = ops.q_sample(x0, t, *tables(DEVICE), seed=SEED, backend="triton")
    want = ops.q_sample(x0, t, *tables(DEVICE), seed=SEED, backend="reference")
    assert_close(got, want, **FP32)


def test_the_gpu_registration_traces_to_the_fakes():
    """The path a GPU takes and this run does not: with Triton compiling (no interpreter) every op
    is a ``triton_op`` with the table's schema, and its body traced on fake CUDA tensors gives the
    explicit fakes' outputs (``gpu_registration_check.py``, in a fresh interpreter, no GPU needed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(here / "gpu_registration_check.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    from fastddpm.ops import schemas
    assert sorted(line.split()[1] for line in run.stdout.splitlines() if line.startswith("ok ")) == \
        sorted(schemas.names("triton"))
