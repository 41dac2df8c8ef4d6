"""Flash attention (Dao et al. 2022, FlashAttention-2 loop order) for the
U-Net's spatial self-attention: ``softmax(q k^T / sqrt(d)) v`` over
``[B, heads, L, d]``, forward and backward, no ``L x L`` matrix in memory.

* Online softmax in base 2 (``exp2`` of scores pre-scaled by ``log2(e)/sqrt(d)``),
  float32 accumulation; the forward keeps the row log-sum-exp (base 2) for the
  backward, which recomputes the probabilities.
* Any ``L`` (the last key/query block is masked; full blocks run unmasked) and
  any ``d <= 256`` (padded to a power of two >= 16 with masked loads).
* fp16/bf16 inputs run the tensor cores.  fp32 inputs use IEEE-precision
  ``tl.dot`` under the interpreter (the CPU tests); on a GPU ``attention``
  routes fp32 to the reference, ``F.scaled_dot_product_attention`` (see
  ``attention_unsupported``).
* Backward: ``delta = rowsum(dO * O)``, then one kernel per key block for
  ``dK, dV`` (loop over queries; for head dims above 128 run twice, dK then
  dV, so one float32 accumulator is live) and one per query block for ``dQ``
  (loop over keys): no atomics, deterministic.

Launch configs are autotuned per ``(L bucket, d, dtype)`` on a GPU; the interpreter
gets one small config (it cannot autotune).

The kernels are in ``attention_fwd`` and ``attention_bwd``, their configs and
tile helpers in ``attention_tiles``; this module holds the host launchers, the
torch ops (``attention_forward``/``attention_backward``), their autograd and
the dispatch's entry point ``attention``.
"""
from __future__ import annotations

import torch
import triton

from ._library import INTERPRET, launch, op
from .attention_bwd import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .attention_fwd import attn_fwd_kernel
from .attention_tiles import dkdv_passes

__all__ = ["attention", "attention_forward", "attention_backward", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# -- host launchers and torch ops -------------------------------------------------------
def _head_meta(q: torch.Tensor) -> dict:
    d = int(q.shape[-1])  # a compile-time constant of the kernels
    block_d = max(16, triton.next_power_of_2(d))
    return dict(HEAD_DIM=d, BLOCK_D=block_d, MASK_D=block_d != d,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def l_bucket(L: int) -> int:
    """The autotuner's key for the sequence length: the power of two >= ``L``
    from 64 to 4096, so a new ``L`` re-tunes only in a new bucket (the
    ``L_BUCKET`` argument of the kernels is read by the autotuner alone)."""
    return min(max(64, 1 << max(int(L) - 1, 0).bit_length()), 4096)


def _grid_over(L: int, H: int, B: int, block: str):
    return lambda meta: (triton.cdiv(L, meta[block]), H, B)


def _fake_forward(q, k, v):
    B, H, L, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, H, L), dtype=torch.float32, device=q.device))


@op("attention_forward", fake=_fake_forward)
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:return: ``out`` (``q``'s dtype, contiguous ``[B, H, L, d]``) and the
    base-2 log-sum-exp of the scaled scores, float32 ``[B, H, L]``."""
    B, H, L, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    launch(attn_fwd_kernel)[_grid_over(L, H, B, "BLOCK_M")](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, L, l_bucket(L),
        int(d) ** -0.5 * LOG2E, **_head_meta(q))
    return out, lse


def _fake_backward(grad_out, q, k, v, out, lse):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


@op("attention_backward", fake=_fake_backward)
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:return: ``dq, dk, dv`` (contiguous, ``q``'s dtype)."""
    B, H, L, d = q.shape
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if dq.numel() == 0:
        return dq, dk, dv
    grad_out = grad_out.to(q.dtype)
    meta = _head_meta(q)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    block_m = 64 if not INTERPRET else 32
    launch(attn_bwd_delta_kernel)[(triton.cdiv(L, block_m), H, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, HEAD_DIM=meta["HEAD_DIM"],
        BLOCK_D=meta["BLOCK_D"], MASK_D=meta["MASK_D"], BLOCK_M=block_m, num_warps=4)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    sm_scale = int(d) ** -0.5
    for write_dk, write_dv in dkdv_passes(meta["BLOCK_D"]):
        launch(attn_bwd_dkdv_kernel)[_grid_over(L, H, B, "BLOCK_N")](
            q, k, v, grad_out, lse, delta, dk, dv, *strides, H, L, l_bucket(L), sm_scale, sm_scale * LOG2E,
            WRITE_DK=write_dk, WRITE_DV=write_dv, **meta)
    launch(attn_bwd_dq_kernel)[_grid_over(L, H, B, "BLOCK_M")](
        q, k, v, grad_out, lse, delta, dq, *strides, H, L, l_bucket(L), sm_scale, sm_scale * LOG2E, **meta)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return attention_backward(grad_out, q, k, v, out, lse)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why the kernels do not take this attention (the dispatch then runs the
    reference, ``F.scaled_dot_product_attention``, and says so), or None.

    Float32 on a GPU: a float32 ``tl.dot`` has no full-precision tensor-core
    path (IEEE or TF32x3 tiles spill in every config at d >= 64), and the
    U-Net runs its attention in bf16/fp16 there.  Under the interpreter float32
    runs the kernels (IEEE dot), which is how they are tested on a CPU.
    """
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"takes head dims up to {MAX_HEAD_DIM}, not {head_dim}"
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return "runs float32 attention on a GPU through scaled_dot_product_attention (no full-precision tensor-core dot)"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over ``[B, heads, L, d]``, differentiable.

    Only what ``attention_unsupported`` accepts: the dispatch (``fastddpm.ops``)
    routes the rest to the reference, so the backend it reports is the one that ran.
    """
    reason = attention_unsupported(q.device, q.dtype, int(q.shape[-1]))
    if reason is not None:
        raise ValueError(f"the Triton attention {reason}")
    return attention_forward(q, k, v)[0]
