"""What the flash-attention kernels (``attention_fwd``, ``attention_bwd``) share:
their launch configs and the tile arithmetic that prunes them, and the masked
tile load/store.

Launch configs are autotuned per ``(L bucket, d, dtype)`` on a GPU from the
candidate ``*_BLOCKS`` lists; the pruner drops those whose tiles exceed shared
memory or spill registers (estimated by :func:`tile_cost`, which
``scripts/compile_sm90.py`` holds to ptxas's figures).  The interpreter gets
one small config (it cannot autotune).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._library import INTERPRET

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


def pruner(kind: str):
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
FWD_CONFIGS = _configs(FWD_BLOCKS, (32, 16))
DKDV_CONFIGS = _configs(DKDV_BLOCKS, (16, 32))
DQ_CONFIGS = _configs(DQ_BLOCKS, (32, 16))


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
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
def store_tile(ptr, tile, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_COLS: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    mask = rows[:, None] < n_rows
    if MASK_COLS:
        mask = mask & (cols[None, :] < n_cols)
    tl.store(ptrs, tile.to(ptr.dtype.element_ty), mask=mask)
