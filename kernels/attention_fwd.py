"""The flash-attention forward kernel (FlashAttention-2, Alg. 1): online softmax
in base 2 over key/value blocks, float32 accumulation; writes ``O`` and the
row log-sum-exp (base 2) that the backward (``attention_bwd``) reads.  Launched
by ``attention_forward`` in ``fastddpm.kernels.attention``."""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import FWD_CONFIGS, load_tile, pruner, store_tile


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, L, qk_scale,
               offs_n, offs_d, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One key/value block of the online softmax (FlashAttention-2, Alg. 1)."""
    kn = start_n + offs_n
    k_t = load_tile(k_base, offs_d, kn, stride_kd, stride_kn, HEAD_DIM, L, MASK_D, MASK_N)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where((kn < L)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_tile(v_base, kn, offs_d, stride_vn, stride_vd, L, HEAD_DIM, MASK_N, MASK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=FWD_CONFIGS, key=["L_BUCKET", "HEAD_DIM"], prune_configs_by=pruner("fwd"))
@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                    H, L, L_BUCKET, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, L, HEAD_DIM, True, MASK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n, L, qk_scale,
                                   offs_n, offs_d, HEAD_DIM, MASK_D, False, DOT_PRECISION)
    if n_full < L:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, n_full, L, qk_scale,
                                   offs_n, offs_d, HEAD_DIM, MASK_D, True, DOT_PRECISION)
    acc = acc / l_i[:, None]
    store_tile(O + b * sob + h * soh, acc, offs_m, offs_d, som, sod, L, HEAD_DIM, MASK_D)
    lse_ptrs = LSE + (b * H + h) * L + offs_m
    tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=offs_m < L)
