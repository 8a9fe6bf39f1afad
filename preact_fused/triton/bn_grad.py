"""BatchNorm backward given the masked gradient: dx = A*g + B*x + C [+ d_residual], elementwise.

A, B, C are per-channel (DESIGN.md section 1) and computed in each program from the vectors, so the
op is one launch: A = scale, B = -scale * invstd^2 * sum_gx / M, C = -scale * sum_g / M - B * mean
(training); B = C = 0 with running statistics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, empty_nhwc, nhwc, vector

_MAX_BLOCK_C, _TILE = (16, 256) if INTERPRET else (128, 4096)  # channels per program, elements per program


@triton.jit
def _bn_backward_kernel(
    g_ptr,      # NHWC [M, C] masked gradient g
    x_ptr,      # NHWC [M, C] pre-BN input
    dres_ptr,   # NHWC [M, C] residual gradient added to dx (HAS_RESIDUAL)
    dx_ptr,     # NHWC [M, C] output, x_ptr's dtype
    mean_ptr, invstd_ptr, scale_ptr, sum_g_ptr, sum_gx_ptr,  # [C] fp32
    M, C,
    TRAINING: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows[:, None] < M) & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    a = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    dx = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * a[None, :]
    if TRAINING:
        invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
        b = -a * invstd * invstd * tl.load(sum_gx_ptr + cols, mask=col_ok, other=0.0) / M
        c = -a * tl.load(sum_g_ptr + cols, mask=col_ok, other=0.0) / M \
            - b * tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dx += x * b[None, :] + c[None, :]
    if HAS_RESIDUAL:
        dx += tl.load(dres_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training=True, d_residual=None):
    """dx [N, C, H, W] channels_last in x's dtype (see reference.bn_backward); inputs in any layout."""
    n, c, h, w = x.shape
    rows = n * h * w
    g, x = nhwc(g), nhwc(x)
    d_residual = None if d_residual is None else nhwc(d_residual)
    dx = empty_nhwc(n, c, h, w, x)
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(c))
    block_r = _TILE // block_c
    grid = (triton.cdiv(rows, block_r), triton.cdiv(c, block_c))
    scale = vector(scale)
    # With running statistics only scale is read: the other vectors may be None.
    mean, invstd, sum_g, sum_gx = (scale if v is None else vector(v) for v in (mean, invstd, sum_g, sum_gx))
    _bn_backward_kernel[grid](g, x, dx if d_residual is None else d_residual, dx, mean, invstd, scale, sum_g, sum_gx,
                              rows, c, TRAINING=bool(training), HAS_RESIDUAL=d_residual is not None,
                              BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if INTERPRET else 8)
    return dx
