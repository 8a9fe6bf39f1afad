"""BatchNorm statistics: the summary of a tensor (``bn_stats``) and the fold (``bn_fold``), one launch each.

``bn_stats`` summarises tiles of rows (count, pivot = the tile's first row, offset, M2; two passes in
registers) and merges them inside the launch with the fixed-order tree of common.reduce_tiles
(contract.merge_summaries' formula): the variance stays accurate when |mean| is orders of magnitude
above the standard deviation, and no float atomics make it nondeterministic. ``bn_fold`` is one
small program: the fold of a summary or of the running statistics, and the running-statistic update
(momentum, or 1/num_batches_tracked read from its tensor when momentum is None): no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (GROUP, INTERPRET, KIND_SUMMARY, cdiv, pixel_coordinates, reduce_tiles, semaphores, strides4,
                     tile_summary, write_fold)
from .launch import Plan, launch, pointer

# bn_stats: rows and channels per program (the whole tile is summarised in registers), warps.
_STATS_BLOCK_R, _STATS_BLOCK_C, _STATS_WARPS = (16, 16, 4) if INTERPRET else (256, 32, 4)
# bn_fold: channels per step of its single program.
_FOLD_BLOCK = 16 if INTERPRET else 256


@triton.jit
def _bn_stats_kernel(
    x_ptr, sx_n, sx_c, sx_h, sx_w,  # [N, C, H, W] (strided), M = N*H*W rows
    ws_ptr,                         # fp32 workspace [T + groups, 4, C]
    sem_ptr,                        # zero int32 semaphores (left zero)
    out_ptr,                        # fp32 [4, C] summary
    M, C, H, W,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)
    rows = t.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    n, h, w = pixel_coordinates(rows, H, W)
    off = n * sx_n + h * sx_h + w * sx_w
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    v = tl.load(x_ptr + off[:, None] + cols.to(tl.int64)[None, :] * sx_c, mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    count = tl.minimum(M - t.to(tl.int64) * BLOCK_R, BLOCK_R)
    c, p, d, m2 = tile_summary(v, row_ok[:, None], count)
    tiles = tl.maximum(tl.cdiv(M, BLOCK_R), 1)
    sem_base = tl.program_id(1) * (tl.cdiv(tiles, GROUP) + 1)
    reduce_tiles(c, p, d, m2, t, tiles, cols, C, ws_ptr, sem_ptr, sem_base, out_ptr, c, KIND_SUMMARY, GROUP)


@triton.jit
def _bn_fold_kernel(
    fold_ptr,                   # fp32 [4, C] output
    stats_ptr,                  # [4, C] summary (BN_STATS)
    gamma_ptr, beta_ptr,        # [C] affine (HAS_GAMMA, HAS_BETA)
    rmean_ptr, rvar_ptr,        # [C] running statistics: read (BN_RUNNING) or updated (UPDATE)
    nbt_ptr,                    # [] int64 num_batches_tracked (HAS_NBT)
    C, eps, momentum, keep,
    BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, UPDATE: tl.constexpr,
    HAS_NBT: tl.constexpr, FACTOR_FROM_COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    write_fold(fold_ptr, C, stats_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, eps, momentum, keep,
               BN, HAS_GAMMA, HAS_BETA, UPDATE, HAS_NBT, FACTOR_FROM_COUNT, BLOCK)


def bn_stats(x: torch.Tensor) -> torch.Tensor:
    """The summary [4, C] fp32 (count, pivot, offset, M2) of x [N, C, H, W] (any layout), one launch."""

    def build():
        n, c, h, w = x.shape
        rows = n * h * w
        tiles = max(1, cdiv(rows, _STATS_BLOCK_R))
        groups = cdiv(tiles, GROUP)
        col_blocks = max(1, cdiv(c, _STATS_BLOCK_C))
        outputs = (torch.empty((4, c), dtype=torch.float32, device=x.device),
                   torch.empty((tiles + groups) * 4 * max(c, 1), dtype=torch.float32, device=x.device))
        tensors = (x, *outputs)  # x, the summary, the workspace
        sem = semaphores(x.device, col_blocks * (groups + 1))
        sx = strides4(x)
        kwargs = dict(x_ptr=pointer(tensors, 0, sem), sx_n=sx[0], sx_c=sx[1], sx_h=sx[2], sx_w=sx[3],
                      ws_ptr=pointer(tensors, 2, sem), sem_ptr=sem, out_ptr=pointer(tensors, 1, sem), M=rows, C=c,
                      H=h, W=w, GROUP=GROUP, BLOCK_R=_STATS_BLOCK_R, BLOCK_C=_STATS_BLOCK_C)
        return Plan(_bn_stats_kernel, kwargs, outputs, lambda meta: (tiles, col_blocks),
                    triton.Config({}, num_warps=_STATS_WARPS))

    return launch(("bn_stats",), build, (x,), x.device)[0]


def bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum, update_running):
    """The fold [4, C] fp32 of ``stats`` [4, C] (with update_running: the running statistics updated
    in place) or, stats None, of running_mean / running_var. One launch (contract.bn_fold)."""
    from .conv import bn_args, bn_inputs

    if stats is None and running_mean is None:
        raise ValueError("bn_fold needs stats or running statistics")
    ref = stats if stats is not None else running_mean
    inputs = bn_inputs(stats, None, gamma, beta, running_mean, running_var, num_batches_tracked, update_running)
    problem = ("bn_fold", float(eps), momentum, bool(update_running))

    def build():
        c = stats.shape[1] if stats is not None else running_mean.shape[0]
        outputs = (torch.empty((4, c), dtype=torch.float32, device=ref.device),)
        tensors = (*inputs, *outputs)  # bn_inputs' seven, the fold
        sem = semaphores(ref.device, 1)
        bn = bn_args(tensors, 0, eps, momentum, update_running, sem)
        kwargs = dict(bn, fold_ptr=pointer(tensors, 7, sem), C=c, BLOCK=_FOLD_BLOCK)
        return Plan(_bn_fold_kernel, kwargs, outputs, lambda meta: (1,), triton.Config({}, num_warps=4))

    return launch(problem, build, inputs, ref.device)[0]
