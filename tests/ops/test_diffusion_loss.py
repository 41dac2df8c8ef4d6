"""``diffusion_loss`` (the training loss, noise regenerated) and its gradient on every backend
against autograd of the reference.

Reference: ``fastddpm.ops.reference.diffusion_loss``; kernels: ``csrc/`` and
``kernels/diffusion_loss.py`` (forward and backward); autograd: ``fastddpm/ops/autograd.py`` (one
registration, both namespaces); schema: ``fastddpm/ops/schemas.def``; benchmark: ``benchmarks/bench_ops.py``.
"""
import pytest
import torch

from fastddpm import ops
from fastddpm.ops import reference
from backends import need
from op_cases import (DTYPES, LARGE_ODD_SHAPES, SAMPLE_OFFSET, SEED, SHAPES, T, TARGETS, loss_weights, tables,
                      target_id, timesteps)
from tolerances import BY_DTYPE, EXACT, FP32, assert_close

pytestmark = pytest.mark.ops


def loss_and_grad(out, x0, t, weights, backend, **kw):
    out = out.detach().clone().requires_grad_()
    loss = ops.diffusion_loss(out, x0, t, *tables(out.device), weights, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, out)
    return loss, grad


def assert_grad_close(actual, expected, dtype):
    """Gradients are ~1/numel: compare them relative to their largest entry, at the output's dtype."""
    scale = expected.float().abs().max().clamp_min(1e-30)
    assert_close(actual.float() / scale, expected.float() / scale, **BY_DTYPE[dtype], msg="grad / max|grad|")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("loss_type", reference.LOSSES)
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_diffusion_loss_and_gradient_match_reference(target, prediction, loss_type, dtype, shape):
    backend, device = target
    need(backend, "diffusion_loss", device, dtype)
    x0 = torch.randn(shape, device=device).clamp(-1, 1)
    t = timesteps(shape[0], device)
    weights = loss_weights(prediction, device)
    # model outputs near the target, so that Huber sees both branches
    noise = reference.batch_noise(SEED, SAMPLE_OFFSET, 0, shape, device)
    target_value = reference.training_target(prediction, x0, noise, t, *tables(device))
    out = (target_value + 0.8 * torch.randn(shape, device=device)).to(dtype)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, prediction=prediction, loss_type=loss_type, huber_delta=0.5)
    loss, grad = loss_and_grad(out, x0, t, weights, backend, **kw)
    want_loss, want_grad = loss_and_grad(out, x0, t, weights, "reference", **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.dtype == dtype
    assert_close(loss, want_loss, **FP32, msg="loss")
    assert_grad_close(grad, want_grad, dtype)


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_diffusion_loss_large_odd_shapes(target, shape):
    """Loss rows of more than one partial sum (> 65536 elements)."""
    backend, device = target
    need(backend, "diffusion_loss", device, torch.bfloat16 if backend == "cpp" else torch.float32)
    x0 = torch.randn(shape, device=device)
    out = torch.randn(shape, device=device).to(torch.bfloat16 if backend == "cpp" else torch.float32)
    t = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, prediction="epsilon", loss_type="l2")
    got = ops.diffusion_loss(out, x0, t, *tables(device), loss_weights("epsilon", device), backend=backend, **kw)
    want = ops.diffusion_loss(out, x0, t, *tables(device), loss_weights("epsilon", device), backend="reference", **kw)
    assert_close(got, want, **FP32, msg="loss")


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_diffusion_loss_scalar_t_and_second_call(target):
    """A 0-dim t (expanded with stride 0) and a repeated call give the same loss."""
    backend, device = target
    need(backend, "diffusion_loss", device)
    x0 = torch.randn(2, 3, 8, 8, device=device)
    out = torch.randn(2, 3, 8, 8, device=device)
    weights = torch.ones(T, device=device)
    t = torch.tensor(17, device=device)
    kw = dict(seed=SEED, prediction="v", loss_type="l2")
    got = ops.diffusion_loss(out, x0, t, *tables(device), weights, backend=backend, **kw)
    again = ops.diffusion_loss(out, x0, t, *tables(device), weights, backend=backend, **kw)
    want = ops.diffusion_loss(out, x0, t, *tables(device), weights, backend="reference", **kw)
    assert_close(got, want, **FP32)
    assert_close(got, again, **EXACT)


@pytest.mark.parametrize("loss_type", reference.LOSSES)
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
def test_diffusion_loss_backends_agree(prediction, loss_type):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need("cpp", "diffusion_loss", device)
    need("triton", "diffusion_loss", device)
    x0 = torch.randn(3, 5, 7, 9, device=device)
    t = timesteps(3, device)
    weights = torch.rand(T, device=device)
    out = torch.ones(3, 5, 7, 9, device=device).mul_(0.3)
    kw = dict(seed=SEED, prediction=prediction, loss_type=loss_type, huber_delta=0.7)
    (loss, grad), (cpp_loss, cpp_grad) = (loss_and_grad(out, x0, t, weights, b, **kw) for b in ("triton", "cpp"))
    assert_close(loss, cpp_loss, **FP32, msg="loss")
    scale = cpp_grad.abs().max()
    assert_close(grad / scale, cpp_grad / scale, **FP32, msg="gradient")
