"""BatchNorm statistics: per-tile partials of a tensor (``bn_stats``) and their merge (``bn_finalize``).

Partials are (count, mean, M2) per channel and row tile, fp32, merged with Chan's formula: two
passes in registers inside a tile, Chan merges across tiles. Nothing forms E[x^2] - E[x]^2, so the
variance stays accurate when |mean| is orders of magnitude above the standard deviation.
``bn_finalize`` is one small launch that also updates the running statistics on the device
(momentum, or 1/num_batches_tracked read from its tensor when momentum is None): no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, chan_merge, empty_summary, moments, nhwc

# bn_stats: rows per partial (one program each), rows loaded at a time, channels per program.
TILE_ROWS, _STATS_BLOCK_R, _STATS_BLOCK_C = (32, 16, 16) if INTERPRET else (1024, 64, 64)
# bn_finalize: partial tiles merged at a time, channels per program, warps. A program reads every
# tile of its channels (thousands for a large batch): few channels and many tiles per step keep
# more programs and more loads in flight than the transposed choice.
_FINAL_BLOCK_T, _FINAL_BLOCK_C, _FINAL_WARPS = (16, 16, 4) if INTERPRET else (256, 16, 8)


@triton.jit
def _bn_stats_kernel(
    x_ptr,     # NHWC [M, C] (a channels_last [N, C, H, W] tensor, M = N*H*W)
    part_ptr,  # fp32 [3, T, C]: count, mean, M2 of rows [t * TILE_ROWS, (t + 1) * TILE_ROWS)
    M, C, T,
    TILE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count, mean, m2 = empty_summary(BLOCK_C)
    for r0 in range(0, TILE_ROWS, BLOCK_R):
        rows = t.to(tl.int64) * TILE_ROWS + r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        valid = tl.broadcast_to(row_ok[:, None], (BLOCK_R, BLOCK_C))
        n_b, mean_b, m2_b = moments(v.to(tl.float32), valid, 0)
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    out = part_ptr + t.to(tl.int64) * C + cols
    tl.store(out, count, mask=col_ok)
    tl.store(out + T * C, mean, mask=col_ok)
    tl.store(out + 2 * T * C, m2, mask=col_ok)


@triton.jit
def _bn_finalize_kernel(
    part_ptr,     # fp32 [3, T, C] partials (count, mean, M2)
    weight_ptr,   # [C] gamma, any float dtype (HAS_WEIGHT)
    bias_ptr,     # [C] beta (HAS_BIAS)
    rmean_ptr,    # [C] running mean, updated in place (UPDATE_RUNNING)
    rvar_ptr,     # [C] running variance, updated in place (UPDATE_RUNNING)
    nbt_ptr,      # [] int64 num_batches_tracked, already incremented (FACTOR_FROM_COUNT)
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # [C] fp32 outputs
    T, C, eps, momentum,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    FACTOR_FROM_COUNT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count, mean, m2 = empty_summary(BLOCK_C)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        ok = (tiles[:, None] < T) & col_ok[None, :]
        offs = tiles.to(tl.int64)[:, None] * C + cols[None, :]
        n_t = tl.load(part_ptr + offs, mask=ok, other=0.0)
        mean_t = tl.load(part_ptr + T * C + offs, mask=ok, other=0.0)
        m2_t = tl.load(part_ptr + 2 * T * C + offs, mask=ok, other=0.0)
        # Chan's formula for BLOCK_T summaries at once, then merged into the running summary.
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(n_t * mean_t, axis=0) / tl.maximum(n_b, 1.0)
        d = mean_t - mean_b[None, :]
        m2_b = tl.sum(m2_t + n_t * d * d, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    var = m2 / tl.maximum(count, 1.0)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + cols, mask=col_ok, other=1.0).to(tl.float32) * invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) - mean * scale
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + cols, invstd, mask=col_ok)
    tl.store(scale_ptr + cols, scale, mask=col_ok)
    tl.store(shift_ptr + cols, shift, mask=col_ok)
    if UPDATE_RUNNING:
        if FACTOR_FROM_COUNT:
            factor = 1.0 / tl.load(nbt_ptr).to(tl.float32)
        else:
            factor = momentum
        unbiased = var * count / tl.maximum(count - 1.0, 1.0)
        rmean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0)
        rvar = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0)
        new_mean = rmean.to(tl.float32) * (1.0 - factor) + mean * factor
        new_var = rvar.to(tl.float32) * (1.0 - factor) + unbiased * factor
        tl.store(rmean_ptr + cols, new_mean.to(rmean.dtype), mask=col_ok)
        tl.store(rvar_ptr + cols, new_var.to(rvar.dtype), mask=col_ok)


def bn_stats(x: torch.Tensor) -> torch.Tensor:
    """Partials [3, cdiv(N*H*W, TILE_ROWS), C] fp32 of x [N, C, H, W] (any layout)."""
    n, c, h, w = x.shape
    x = nhwc(x)
    rows = n * h * w
    tiles = triton.cdiv(rows, TILE_ROWS)
    partials = torch.empty((3, tiles, c), dtype=torch.float32, device=x.device)
    grid = (tiles, triton.cdiv(c, _STATS_BLOCK_C))
    _bn_stats_kernel[grid](x, partials, rows, c, tiles, TILE_ROWS=TILE_ROWS, BLOCK_R=_STATS_BLOCK_R,
                           BLOCK_C=_STATS_BLOCK_C)
    return partials


def bn_finalize(partials, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1,
                num_batches_tracked=None):
    """(mean, invstd, scale, shift), each [C] fp32, from partials [3, T, C]; running stats updated in place.

    weight, bias: [C] or None; running_mean, running_var: [C] contiguous buffers or None (no update);
    momentum None: the factor is 1/num_batches_tracked (a 0-dim integer tensor, read on the device).
    """
    partials = partials.to(torch.float32).contiguous()
    c = partials.shape[2]
    mean, invstd, scale, shift = (torch.empty(c, dtype=torch.float32, device=partials.device) for _ in range(4))
    update = running_mean is not None
    from_count = update and momentum is None
    if update and not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError("bn_finalize updates running_mean/running_var in place: they must be contiguous")
    if from_count and num_batches_tracked is None:
        raise ValueError("bn_finalize with momentum=None needs num_batches_tracked")
    dummy = mean  # stands in for pointer arguments that are not read
    grid = (triton.cdiv(c, _FINAL_BLOCK_C),)
    _bn_finalize_kernel[grid](
        partials, dummy if weight is None else weight.contiguous(), dummy if bias is None else bias.contiguous(),
        running_mean if update else dummy, running_var if update else dummy,
        num_batches_tracked if from_count else dummy, mean, invstd, scale, shift,
        partials.shape[1], c, float(eps), 0.0 if momentum is None else float(momentum),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE_RUNNING=update,
        FACTOR_FROM_COUNT=from_count, BLOCK_T=_FINAL_BLOCK_T, BLOCK_C=_FINAL_BLOCK_C, num_warps=_FINAL_WARPS)
    return mean, invstd, scale, shift
