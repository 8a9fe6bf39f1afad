"""Pieces shared by the Triton kernels: the BN-ReLU loader, statistics helpers, layout and dtype rules.

The loader (``load_operand``) and the affine (``bn_affine``) are the one place where relu(bn(x)) is
computed: the forward's loader, wgrad's loader and dgrad's ReLU mask all call them, so the mask of
the backward is bit-for-bit the forward's (DESIGN.md section 5).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Kernels are built for the interpreter when TRITON_INTERPRET=1 is set before this module is
# imported (Triton decides when a kernel is decorated): then CPU tensors are accepted and every
# launch uses one small, fixed tile configuration.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Rows (NHWC pixels) per statistics tile of a conv epilogue. Every conv configuration's BLOCK_M is
# a multiple of it, so the number of tiles T = cdiv(rows, STATS_ROWS) is known before autotuning
# picks a configuration (outputs are allocated before the launch).
STATS_ROWS = 16 if INTERPRET else 64


def on_device_of(t: torch.Tensor):
    """A context in which kernels launch on t's device: Triton launches on the current CUDA device
    (and its current stream), which need not hold the tensors. A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_activation(t: torch.Tensor, name: str) -> None:
    """A clear error unless t is a 4-D float32 / bfloat16 / float16 activation."""
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"the triton backend supports float32, bfloat16 and float16 activations, "
                        f"got {name} of dtype {t.dtype} (use backend='reference' for {t.dtype})")


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """t [N, C, H, W] as a channels_last-contiguous tensor (NHWC in memory); no copy if it is one."""
    return t.contiguous(memory_format=torch.channels_last)


def empty_nhwc(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """A new [n, c, h, w] channels_last tensor with like's dtype and device."""
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector as contiguous float32 (the statistics dtype of every kernel)."""
    return None if t is None else t.to(torch.float32).contiguous()


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """tl.dot input_precision: 'ieee' (exact fp32) for float32 unless TF32 is asked for."""
    return "ieee" if dtype == torch.float32 and not tf32 else "tf32"


@triton.jit
def bn_affine(v, scale, shift):
    """x * scale + shift in float32, one fused multiply-add (the forward and dgrad's mask share it)."""
    return tl.fma(v.to(tl.float32), scale, shift)


@triton.jit
def load_operand(ptr, row_off, row_ok, ch, ch_ok, scale_ptr, shift_ptr, PREACT: tl.constexpr):
    """A tile of an NHWC activation, optionally through relu(x * scale + shift).

    ptr: NHWC activation; row_off: int64 offset of each pixel's channel 0, row_ok: pixel in range
    (both broadcastable to the tile, e.g. [BM, 1] or [1, BK]); ch, ch_ok: channel indices and
    their mask (broadcastable the other way); scale_ptr, shift_ptr: [C] float32 (PREACT).
    Returns the tile in ptr's dtype. The zero of padding and of out-of-range pixels is applied after
    the activation, so padding contributes 0, not relu(shift).
    """
    ok = row_ok & ch_ok
    v = tl.load(ptr + row_off + ch, mask=ok, other=0.0)
    if PREACT:
        scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
        shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
        z = bn_affine(v, scale, shift)
        v = tl.where(ok & (z > 0), z, 0.0).to(ptr.dtype.element_ty)
    return v


@triton.jit
def source_pixel(n, oh, ow, kh, kw, row_ok, SH, SW, STRIDE: tl.constexpr, PAD: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """The pixel of the gathered operand that tap (kh, kw) reads for output row (n, oh, ow).

    Convolution (TRANSPOSED False): ih = oh * STRIDE - PAD + kh. Transposed (dgrad): the output
    row is an input pixel and the source is dy at ih = (oh + PAD - kh) / STRIDE, a tap that exists
    only when the division is exact (stride 2 by masking taps, no zero insertion).
    Returns (int64 flat pixel index into the [N, SH, SW] grid, validity).
    """
    if TRANSPOSED:
        th = oh + PAD - kh
        tw = ow + PAD - kw
        ih = th // STRIDE
        iw = tw // STRIDE
        ok = row_ok & (th >= 0) & (tw >= 0) & (ih < SH) & (iw < SW)
        if STRIDE > 1:
            ok = ok & (th % STRIDE == 0) & (tw % STRIDE == 0)
    else:
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        ok = row_ok & (ih >= 0) & (ih < SH) & (iw >= 0) & (iw < SW)
    pix = (n.to(tl.int64) * SH + ih) * SW + iw
    return pix, ok


@triton.jit
def moments(v, valid, AXIS: tl.constexpr):
    """(count, mean, M2) in float32 of the valid entries of v along AXIS (two passes in registers)."""
    count = tl.sum(valid.to(tl.float32), axis=AXIS)
    mean = tl.sum(tl.where(valid, v, 0.0), axis=AXIS) / tl.maximum(count, 1.0)
    d = tl.where(valid, v - tl.expand_dims(mean, AXIS), 0.0)
    return count, mean, tl.sum(d * d, axis=AXIS)


@triton.jit
def empty_summary(BLOCK_C: tl.constexpr):
    """(count, mean, M2) of no values for BLOCK_C channels: the neutral start of Chan merges."""
    zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return zero, zero, zero


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; empty summaries are neutral."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def store_partial(ptr, q, T, C, tiles, cols, val):
    """Store val [TILES, BC] as rows ``tiles`` of plane q of a [Q, T, C] float32 partials tensor.

    tiles: [TILES] tile indices (only those < T are stored); cols: [BC] channel indices (< C stored).
    """
    tiles = tiles.to(tl.int64)
    offs = (q * T + tiles[:, None]) * C + cols[None, :]
    tl.store(ptr + offs, val, mask=(tiles[:, None] < T) & (cols[None, :] < C))


@triton.jit
def split_rows(v, ROWS: tl.constexpr):
    """v [BM, BN] viewed as [BM // ROWS, ROWS, BN]: per-sub-tile reductions along axis 1."""
    return tl.reshape(v, (v.shape[0] // ROWS, ROWS, v.shape[1]))
