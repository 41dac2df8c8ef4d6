"""The one tolerance table of the test suite, and an assertion helper that
says where values disagree.  Every test that compares numbers imports from here.

* ``EXACT``: same algorithm, same float32 operation order.
* ``FP32``: a fused backend or a peer library against the reference in float32
  (different operation order, FMA contraction).
* ``PEER``: our float64-derived tables against a peer's float32-derived ones
  over all t (the issue's "about 1e-4").
* ``PEER64``: the same comparison with the peer computing in float64 too.
* ``PEER_KARRAS32``: diffusers' float32 multistep step on Karras sigmas, which rounds
  coarser than our float32 update (which is held to ``FP32`` against float64).
* ``BY_DTYPE``: model outputs / inputs at that dtype, compared with the
  reference computed from the same rounded inputs in float32.
* ``NORMAL_ULP``: normals of the noise contract across libraries (log, cos, sin
  round differently); Philox integers are compared exactly.
* ``fp32_at(magnitude)``: ``FP32`` relative to the largest value compared (a reverse step's
  ``x_t`` reaches ~1/sqrt(abar) ~ 160 times the model output at t=T-1).
* ``STEPS_FP32``: a few chained float32 reverse steps on a GPU against the reference
  (each step's rounding feeds the next).
* ``FMA_FP32``: a GPU kernel of the multistep update against the float32 reference,
  where large terms cancel (a few ulp of the largest term).
"""
import torch

EXACT = dict(atol=0.0, rtol=0.0)
FP32 = dict(atol=1e-5, rtol=1e-5)
PEER = dict(atol=1e-4, rtol=1e-4)
# our float64 tables against a peer made to compute in float64 (the multistep solvers)
PEER64 = dict(atol=1e-10, rtol=1e-10)
# diffusers' multistep schedulers at float32 on Karras sigmas (float32 sigmas, float32 log for
# lambda): up to 2.2e-4 from the float64 result at 7 steps, where ours is within 4e-6 of it
PEER_KARRAS32 = dict(atol=5e-4, rtol=1e-4)
NORMAL_ULP = dict(atol=2e-6, rtol=1e-6)
# a GPU kernel (FMA contraction, its own operation order) against the float32 reference of the
# multistep update, whose data prediction a*x + b*out cancels terms up to ~5e2 at the first step
# (1/alpha ~ 156): the float32 reference alone is up to 2.7e-5 from float64 there, a few ulp of 5e2
FMA_FP32 = dict(atol=1e-4, rtol=1e-5)
STEPS_FP32 = dict(atol=1e-4, rtol=1e-4)
BY_DTYPE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
# attention outputs and gradients against F.scaled_dot_product_attention
ATTENTION = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def fp32_at(magnitude: float) -> dict:
    """``FP32`` with its absolute part scaled to ``magnitude`` (at least 1)."""
    return dict(atol=FP32["atol"] * max(1.0, float(magnitude)), rtol=FP32["rtol"])


def assert_close(actual, expected, *, atol, rtol, msg=""):
    """``torch.testing.assert_close`` with the worst element's index and values in the message."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs() - rtol * e.abs()
    if a.numel() and bool((err > atol).any()) or bool((a.isnan() != e.isnan()).any()):
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(err, nan=float("inf"))), a.shape))
        n_bad = int((err > atol).sum())
        raise AssertionError(
            f"{msg} {n_bad}/{a.numel()} elements differ beyond atol={atol}, rtol={rtol}; worst at {idx}: "
            f"actual={a[idx].item()!r} expected={e[idx].item()!r} (max abs diff {(a - e).abs().max().item():.3e})"
        )
