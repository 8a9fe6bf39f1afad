"""BatchNorm backward given the masked gradient: dx = scale*g + B*x + C [+ d_residual], one launch;
and the two functions of that formula, which conv.py's wgrad also uses when it computes the
gradient it consumes (conv_wgrad_bn_backward).

B and C are per channel (DESIGN.md section 1) and computed in each program from the fold [4, C],
the sums [3, C] and the element count: B = -scale * invstd^2 * sum_gx / count,
C = -scale * sum_g / count - B * mean (training); B = C = 0 with running statistics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, cdiv, empty_nhwc, next_power_of_2, pixel_coordinates, semaphores, strides4, vector
from .launch import Plan, launch, pointer

_MAX_BLOCK_C, _TILE = (16, 256) if INTERPRET else (128, 4096)  # channels per program, elements per program


@triton.jit
def bn_backward_coefficients(fold_ptr, sums_ptr, cols, col_ok, C, count, TRAINING: tl.constexpr):
    """(scale, B, C) fp32 of channels ``cols``: dx = scale g + B x + C (B = C = 0 without TRAINING).

    fold_ptr: [4, C] mean, invstd, scale, shift; sums_ptr: [3, C] sum_g, sum_gx, dgamma (TRAINING).
    bn_backward and the wgrad that consumes it (conv.py) both compute dx with these two functions.
    """
    scale = tl.load(fold_ptr + 2 * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.zeros_like(scale)
    c = tl.zeros_like(scale)
    if TRAINING:
        mean = tl.load(fold_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        invstd = tl.load(fold_ptr + C + cols, mask=col_ok, other=0.0).to(tl.float32)
        sum_g = tl.load(sums_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        sum_gx = tl.load(sums_ptr + C + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = -scale * invstd * invstd * sum_gx / count
        c = -scale * sum_g / count - b * mean
    return scale, b, c


@triton.jit
def bn_backward_value(g, x, scale, b, c, TRAINING: tl.constexpr):
    """dx = scale g + (B x + C) in fp32 (x is read only with TRAINING)."""
    dx = g.to(tl.float32) * scale
    if TRAINING:
        dx += x.to(tl.float32) * b + c
    return dx


@triton.jit
def _bn_backward_kernel(
    g_ptr, sg_n, sg_c, sg_h, sg_w,      # [N, C, H, W] (strided) masked gradient g
    x_ptr, sx_n, sx_c, sx_h, sx_w,      # [N, C, H, W] (strided) pre-BN input (TRAINING)
    dr_ptr, sr_n, sr_c, sr_h, sr_w,     # [N, C, H, W] (strided) residual gradient (HAS_RESIDUAL)
    dx_ptr,                             # NHWC [M, C] output, x_ptr's dtype
    fold_ptr,                           # [4, C] mean, invstd, scale, shift
    sums_ptr,                           # [3, C] sum_g, sum_gx, dgamma (TRAINING)
    M, C, H, W, count,
    TRAINING: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows[:, None] < M) & col_ok[None, :]
    n, ih, iw = pixel_coordinates(rows, H, W)
    c64 = cols.to(tl.int64)[None, :]
    scale, b, c = bn_backward_coefficients(fold_ptr, sums_ptr, cols, col_ok, C, count, TRAINING)
    g = tl.load(g_ptr + (n * sg_n + ih * sg_h + iw * sg_w)[:, None] + c64 * sg_c, mask=ok, other=0.0)
    x = g
    if TRAINING:
        x = tl.load(x_ptr + (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + c64 * sx_c, mask=ok, other=0.0)
    dx = bn_backward_value(g, x, scale[None, :], b[None, :], c[None, :], TRAINING)
    if HAS_RESIDUAL:
        dr = tl.load(dr_ptr + (n * sr_n + ih * sr_h + iw * sr_w)[:, None] + c64 * sr_c, mask=ok, other=0.0)
        dx += dr.to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * C + c64, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def check_fold_and_sums(fold, sums, training, op: str, prefix: str = "") -> None:
    """A clear error unless ``fold`` is [4, C] and, in training, ``sums`` [3, C] (2-D); ``prefix``
    of the argument names in the message (``bn_`` for conv_wgrad_bn_backward's)."""
    if fold.dim() != 2 or (training and sums.dim() != 2):
        raise ValueError(f"{op} needs {prefix}fold [4, C] and, in training, {prefix}sums [3, C]")


def bn_backward(g, x, fold, sums, count, training, d_residual):
    """dx [N, C, H, W] channels_last in x's dtype (contract.bn_backward); inputs in any layout."""
    check_fold_and_sums(fold, sums, training, "bn_backward")
    inputs = (g, x, d_residual, vector(fold), vector(sums) if training else None)
    problem = ("bn_backward", float(count), bool(training))

    def build():
        n, c, h, w = x.shape
        rows = n * h * w
        outputs = (empty_nhwc(n, c, h, w, x),)
        tensors = (*inputs, *outputs)  # g, x, d_residual, fold, sums, dx
        block_c = min(_MAX_BLOCK_C, next_power_of_2(max(c, 1)))
        block_r = _TILE // block_c
        grid = (max(1, cdiv(rows, block_r)), max(1, cdiv(c, block_c)))
        dummy = semaphores(x.device, 1)  # stands in for pointers this problem does not dereference

        def act(index, ptr, prefix):
            t = tensors[index]
            s = strides4(t) if t is not None and t.numel() and t.dim() == 4 else (0, 0, 0, 0)
            return {ptr: pointer(tensors, index, dummy), **{f"{prefix}_{d}": v for d, v in zip("nchw", s)}}

        kwargs = dict(**act(0, "g_ptr", "sg"), **act(1, "x_ptr", "sx"), **act(2, "dr_ptr", "sr"),
                      dx_ptr=pointer(tensors, 5, dummy), fold_ptr=pointer(tensors, 3, dummy),
                      sums_ptr=pointer(tensors, 4, dummy), M=rows, C=c, H=h, W=w, count=float(count),
                      TRAINING=bool(training), HAS_RESIDUAL=d_residual is not None, BLOCK_R=block_r,
                      BLOCK_C=block_c)
        return Plan(_bn_backward_kernel, kwargs, outputs, lambda meta: grid,
                    triton.Config({}, num_warps=4 if INTERPRET else 8))

    return launch(problem, build, inputs, x.device)[0]
