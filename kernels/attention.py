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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._library import INTERPRET, launch, op

__all__ = ["attention", "attention_forward", "attention_backward", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# Shared memory per block on an H100 (227 KiB); configs above it cannot launch.
SMEM_LIMIT = 227 * 1024


def _configs(blocks, interpret_blocks):
    """``triton.Config`` list from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples."""
    if INTERPRET:
        blocks = [interpret_blocks + (4, 1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in blocks]


# Registers one thread may fill by the estimate below (ptxas stops at 255; the
# rest holds pointers, offsets and the softmax statistics).
REGISTER_BUDGET = 224


# Above this (padded) head dim the dK/dV kernel runs twice, once per output: dK and dV
# accumulators of [BLOCK_N, 256] float32 together spill in every sm_90 config.
SPLIT_DKDV_ABOVE = 128


def dkdv_passes(block_d: int) -> tuple[tuple[bool, bool], ...]:
    """(WRITE_DK, WRITE_DV) of each launch of the dK/dV kernel."""
    return ((True, False), (False, True)) if block_d > SPLIT_DKDV_ABOVE else ((True, True),)


def tile_cost(kind: str, block_m: int, block_n: int, block_d: int, stages: int, esize: int,
              outputs: int = 2) -> tuple[int, int]:
    """(shared memory bytes, 32-bit registers over the whole block) of one
    kernel's tiles.  Registers: the float32 accumulators (``outputs`` of them
    for dK/dV), the tiles that stay resident (``esize`` bytes per element), and
    the float32 score-sized intermediates of the inner loop; shared memory: the
    resident tiles and ``stages`` copies of the pipelined ones."""
    if kind == "fwd":  # acc [m,d] + q [m,d] resident; s, p [m,n]; k, v pipelined
        smem = esize * block_d * (block_m + 2 * stages * block_n)
        regs = block_m * block_d * (4 + esize) // 4 + 2 * block_m * block_n
    elif kind == "dkdv":  # dk, dv [n,d] + k, v [n,d] resident; q, dO [m,d] tiles; p, dp, ds [n,m]
        smem = esize * block_d * (2 * block_n + 2 * stages * block_m)
        regs = (outputs * block_n * block_d + 2 * block_n * block_d * esize // 4 + 2 * block_m * block_d * esize // 4
                + 3 * block_n * block_m)
    else:  # dq: dq [m,d] + q, dO [m,d] resident; p, dp, ds [m,n]; k, v pipelined
        smem = esize * block_d * (2 * block_m + 2 * stages * block_n)
        regs = block_m * block_d * (4 + 2 * esize) // 4 + 3 * block_m * block_n
    return smem, regs


def config_fits(kind: str, block_m: int, block_n: int, block_d: int, num_warps: int, stages: int, esize: int,
                outputs: int = 2) -> bool:
    """Whether a config's tiles fit shared memory and ``REGISTER_BUDGET`` registers per thread."""
    smem, regs = tile_cost(kind, block_m, block_n, block_d, stages, esize, outputs)
    return smem <= SMEM_LIMIT and regs <= REGISTER_BUDGET * 32 * num_warps


def _pruner(kind: str):
    """Autotuning prune for one kernel: drop the configs whose tiles exceed
    shared memory or whose registers per thread exceed ``REGISTER_BUDGET``
    (they spill).  ``scripts/compile_sm90.py`` compiles every config this keeps
    for sm_90 at every head dim the tests and benchmarks use, and fails CI on
    a spill: the estimate is held to ptxas's figures there."""

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        q = named_args.get("Q")
        esize = q.element_size() if hasattr(q, "element_size") else 2
        outputs = int(kwargs.get("WRITE_DK", True)) + int(kwargs.get("WRITE_DV", True))
        keep = [c for c in configs if config_fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d,
                                                  c.num_warps, c.num_stages, esize, outputs)]
        return keep or configs[-1:]

    return {"early_config_prune": prune}


# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) cover d = 16 (big tiles)
# to d = 256 (small tiles, 8 warps); the pruner keeps those that fit the head
# dim.  The last of each list fits any d <= 256.
FWD_BLOCKS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 8, 2),
              (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]
# (dK/dV: BLOCK_N under 64 spills on sm_90 whatever the head dim, a warpgroup's MMA spanning 64
# rows; so does one stage, unpipelined, at d = 256)
DKDV_BLOCKS = [(32, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2), (64, 64, 8, 2),
               (32, 64, 8, 2)]
DQ_BLOCKS = [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (64, 16, 4, 2), (128, 32, 8, 2),
             (64, 32, 8, 2)]
_FWD_CONFIGS = _configs(FWD_BLOCKS, (32, 16))
_DKDV_CONFIGS = _configs(DKDV_BLOCKS, (16, 32))
_DQ_CONFIGS = _configs(DQ_BLOCKS, (32, 16))


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A ``[len(rows), len(cols)]`` tile, zero outside ``n_rows x n_cols`` where masked."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptr, tile, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_COLS: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    mask = rows[:, None] < n_rows
    if MASK_COLS:
        mask = mask & (cols[None, :] < n_cols)
    tl.store(ptrs, tile.to(ptr.dtype.element_ty), mask=mask)


# -- forward ------------------------------------------------------------------------
@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, L, qk_scale,
               offs_n, offs_d, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One key/value block of the online softmax (FlashAttention-2, Alg. 1)."""
    kn = start_n + offs_n
    k_t = _load_tile(k_base, offs_d, kn, stride_kd, stride_kn, HEAD_DIM, L, MASK_D, MASK_N)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where((kn < L)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base, kn, offs_d, stride_vn, stride_vd, L, HEAD_DIM, MASK_N, MASK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=_FWD_CONFIGS, key=["L_BUCKET", "HEAD_DIM"], prune_configs_by=_pruner("fwd"))
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
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
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, L, HEAD_DIM, True, MASK_D)
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
    _store_tile(O + b * sob + h * soh, acc, offs_m, offs_d, som, sod, L, HEAD_DIM, MASK_D)
    lse_ptrs = LSE + (b * H + h) * L + offs_m
    tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=offs_m < L)


# -- backward -----------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, L,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """``delta = rowsum(dO * O)`` in float32 (FlashAttention-2, Alg. 2 line 4)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, som, sod, L, HEAD_DIM, True, MASK_D).to(tl.float32)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, True, MASK_D).to(tl.float32)
    tl.store(DELTA + (b * H + h) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, start_m, L, qk_scale,
                offs_d, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr,
                MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_DK: tl.constexpr,
                WRITE_DV: tl.constexpr):
    """Accumulate one query block's contribution to this key block's dK and/or dV."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_t = _load_tile(q_base, offs_d, offs_m, sqd, sqm, HEAD_DIM, L, MASK_D, MASK_M)
    do = _load_tile(do_base, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, MASK_M, MASK_D)
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


@triton.autotune(configs=_DKDV_CONFIGS, key=["L_BUCKET", "HEAD_DIM", "WRITE_DK", "WRITE_DV"],
                 prune_configs_by=_pruner("dkdv"))
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
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
    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, L, HEAD_DIM, True, MASK_D)
    if WRITE_DK:
        v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, L, HEAD_DIM, True, MASK_D)
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
        _store_tile(DK + out_offset, dk * sm_scale, offs_n, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)
    if WRITE_DV:
        _store_tile(DV + out_offset, dv, offs_n, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start_n, L, qk_scale, offs_d,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Accumulate one key block's contribution to this query block's dQ."""
    kn = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_tile(k_base, offs_d, kn, skd, skn, HEAD_DIM, L, MASK_D, MASK_N)
    v_t = _load_tile(v_base, offs_d, kn, svd, svn, HEAD_DIM, L, MASK_D, MASK_N)
    p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((kn < L)[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["L_BUCKET", "HEAD_DIM"], prune_configs_by=_pruner("dq"))
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                        H, L, L_BUCKET, sm_scale, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, L, HEAD_DIM, True, MASK_D)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, L, HEAD_DIM, True, MASK_D)
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
    _store_tile(DQ + (b * H + h) * L * HEAD_DIM, dq * sm_scale, offs_m, offs_d, HEAD_DIM, 1, L, HEAD_DIM, MASK_D)


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
    launch(_attn_fwd_kernel)[_grid_over(L, H, B, "BLOCK_M")](
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
    launch(_attn_bwd_delta_kernel)[(triton.cdiv(L, block_m), H, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, HEAD_DIM=meta["HEAD_DIM"],
        BLOCK_D=meta["BLOCK_D"], MASK_D=meta["MASK_D"], BLOCK_M=block_m, num_warps=4)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    sm_scale = int(d) ** -0.5
    for write_dk, write_dv in dkdv_passes(meta["BLOCK_D"]):
        launch(_attn_bwd_dkdv_kernel)[_grid_over(L, H, B, "BLOCK_N")](
            q, k, v, grad_out, lse, delta, dk, dv, *strides, H, L, l_bucket(L), sm_scale, sm_scale * LOG2E,
            WRITE_DK=write_dk, WRITE_DV=write_dv, **meta)
    launch(_attn_bwd_dq_kernel)[_grid_over(L, H, B, "BLOCK_M")](
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
