"""The flash-attention backward kernels (FlashAttention-2, Alg. 2), which
recompute the probabilities from the forward's log-sum-exp:
``delta = rowsum(dO * O)``, then one program per key block for ``dK, dV``
(a loop over queries; ``WRITE_DK``/``WRITE_DV`` choose the outputs, so a
large head dim runs it twice) and one per query block for ``dQ`` (a loop over
keys): no atomics, deterministic.  Launched by ``attention_backward`` in
``fastddpm.kernels.attention``."""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import DKDV_CONFIGS, DQ_CONFIGS, load_tile, pruner, store_tile


@triton.jit
def attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, L,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """``delta = rowsum(dO * O)`` in float32 (FlashAttention-2, Alg. 2 line 4)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + b * sob + h * soh, offs_m, offs_d, som, sod, L, HEAD_DIM, True, MASK_D).to(tl.float32)
    do = load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, True, MASK_D).to(tl.float32)
    tl.store(DELTA + (b * H + h) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, start_m, L, qk_scale,
                offs_d, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr,
                MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_DK: tl.constexpr,
                WRITE_DV: tl.constexpr):
    """Accumulate one query block's contribution to this key block's dK and/or dV."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_t = load_tile(q_base, offs_d, offs_m, sqd, sqm, HEAD_DIM, L, MASK_D, MASK_M)
    do = load_tile(do_base, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, MASK_M, MASK_D)
    if MASK_M:  # padded queries: lse = +inf makes their probabilities 0
        lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
    if WRITE_DV:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    if WRITE_DK:
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["L_BUCKET", "HEAD_DIM", "WRITE_DK", "WRITE_DV"],
                 prune_configs_by=pruner("dkdv"))
@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                         H, L, L_BUCKET, sm_scale, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, WRITE_DK: tl.constexpr, WRITE_DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, L, HEAD_DIM, True, MASK_D)
    if WRITE_DK:
        v = load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, L, HEAD_DIM, True, MASK_D)
    else:  # dV alone needs no V
        v = k
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + (b * H + h) * L
    delta_base = DELTA + (b * H + h) * L
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_full = (L // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, start_m, L,
                             qk_scale, offs_d, BLOCK_M, HEAD_DIM, MASK_D, False, DOT_PRECISION, WRITE_DK, WRITE_DV)
    if m_full < L:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, m_full, L,
                             qk_scale, offs_d, BLOCK_M, HEAD_DIM, MASK_D, True, DOT_PRECISION, WRITE_DK, WRITE_DV)
    # dK, dV are allocated contiguous [B, H, L, d]
    out_offset = (b * H + h) * L * HEAD_DIM
    if WRITE_DK:
        store_tile(DK + out_offset, dk * sm_scale, offs_n, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)
    if WRITE_DV:
        store_tile(DV + out_offset, dv, offs_n, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start_n, L, qk_scale, offs_d,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Accumulate one key block's contribution to this query block's dQ."""
    kn = start_n + tl.arange(0, BLOCK_N)
    k_t = load_tile(k_base, offs_d, kn, skd, skn, HEAD_DIM, L, MASK_D, MASK_N)
    v_t = load_tile(v_base, offs_d, kn, svd, svn, HEAD_DIM, L, MASK_D, MASK_N)
    p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((kn < L)[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["L_BUCKET", "HEAD_DIM"], prune_configs_by=pruner("dq"))
@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                       sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                       H, L, L_BUCKET, sm_scale, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, L, HEAD_DIM, True, MASK_D)
    do = load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, True, MASK_D)
    row = (b * H + h) * L + offs_m
    lse = tl.load(LSE + row, mask=offs_m < L, other=0.0)
    delta = tl.load(DELTA + row, mask=offs_m < L, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start_n, L, qk_scale, offs_d,
                       BLOCK_N, HEAD_DIM, MASK_D, False, DOT_PRECISION)
    if n_full < L:
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, n_full, L, qk_scale, offs_d,
                       BLOCK_N, HEAD_DIM, MASK_D, True, DOT_PRECISION)
    store_tile(DQ + (b * H + h) * L * HEAD_DIM, dq * sm_scale, offs_m, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)
