"""Implicit-GEMM convolutions in NHWC: forward, dgrad and wgrad of conv(relu(bn(x))).

Two kernels, one design:

* ``_conv_kernel`` computes out[row, col] = sum over taps and channels of A[src(row, tap), ch] *
  B[tap, ch, col], a GEMM whose A operand is gathered from an NHWC activation. The forward (rows =
  output pixels, A = P(x), cols = Cout) and dgrad (TRANSPOSED: rows = input pixels, A = dy, cols =
  Cin) are the same kernel with compile-time switches for the loader (identity or BN-ReLU) and the
  epilogue (residual add, statistics partials of the output, or dgrad's ReLU mask with its
  BN-backward partial sums).
* ``_wgrad_kernel`` computes dW[tap, ci, co] = sum over output pixels of P(x)[src(pix, tap), ci] *
  dy[pix, co] with the same loader and tap geometry; the long pixel reduction is split across
  programs into fp32 partials that a plain ``sum`` reduces (deterministic, no atomics).

Weights are packed once per call as [KH, KW, Cin, Cout] in the activation dtype: the forward reads
it with Cout contiguous, dgrad reads the same tensor as its transpose.

fp32 inputs use exact fp32 dot products ('ieee') unless TF32 is asked for (``tf32=True``);
bf16/fp16 use tensor cores with fp32 accumulation. Statistics and sums are fp32.
"""
from __future__ import annotations

import math
import os
import threading

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, STATS_ROWS, bn_affine, dot_precision, empty_nhwc, load_operand, moments,
                     nhwc, source_pixel, split_rows, store_partial, vector)


# Autotuning times the configurations that fit a problem (the interpreter has a single one);
# PREACT_FUSED_TRITON_AUTOTUNE=0 (or AUTOTUNE = False) launches the first fitting one untimed.
AUTOTUNE = os.environ.get("PREACT_FUSED_TRITON_AUTOTUNE", "1") != "0"


def _configs(m_tiles, n_tiles, k_tiles):
    """Tile configurations for Hopper/Ampere GPUs; one small fixed tile under the interpreter.

    Warps follow the accumulator: 8 from 128 x 64 fp32 values up, 4 below. With 4 warps a 128 x 64
    tile needs all 255 registers and spills in the epilogue, 128 x 128 spills hundreds of bytes.
    tests/test_triton_compile.py compiles every build the ResNet-1001 shapes can select for sm_90
    and checks that none spills; tests/test_triton_gpu.py checks every configuration listed here
    against the reference.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8 if bm * bn >= 128 * 64 else 4,
                          num_stages=3)
            for bn in n_tiles for bk in k_tiles for bm in m_tiles]


# Forward / dgrad: rows x output channels x reduced channels per tap.
CONV_CONFIGS = _configs((64, 128), (16, 32, 64, 128), (16, 32, 64))
# wgrad: input channels x output channels x output pixels.
WGRAD_CONFIGS = _configs((16, 32, 64, 128), (16, 32, 64, 128), (16, 32, 64))

# Limits that keep a tile's registers in budget (tests/test_triton_compile.py checks the builds):
# * exact fp32 products ('ieee') run on the FMA units with both operand slices of a thread in
#   registers for a whole reduction block: reduction blocks of 16, free row blocks of at most 64
#   (reduction blocks of 32 spill on sm_80, 128 x 128 accumulators under Triton 3.6 on sm_90);
# * TF32 operands take twice the registers of bf16 ones: reduction blocks of at most 32;
# * channel counts that are not multiples of 16 defeat vectorized loads (an address per element):
#   reduction blocks of at most 32, free row blocks of at most 64;
# * tensor-core products keep free reduction blocks (wgrad's pixels) of at least 32: 16 only adds
#   loop overhead.
IEEE_MAX_BLOCK_K, IEEE_MAX_FREE_BLOCK_M = 16, 64
TF32_MAX_BLOCK_K = 32
UNALIGNED_MAX_BLOCK_K, UNALIGNED_MAX_FREE_BLOCK_M = 32, 64
MMA_MIN_FREE_BLOCK_K = 32


def _limits(precision: str, aligned: bool) -> tuple[float, float, float]:
    """(largest BLOCK_K, largest free BLOCK_M, smallest free BLOCK_K) under the rules above."""
    max_k, max_free_m, min_free_k = math.inf, math.inf, MMA_MIN_FREE_BLOCK_K
    if precision == "ieee":
        max_k, max_free_m = IEEE_MAX_BLOCK_K, IEEE_MAX_FREE_BLOCK_M
    elif precision == "tf32":
        max_k = TF32_MAX_BLOCK_K
    if not aligned:
        max_k, max_free_m = min(max_k, UNALIGNED_MAX_BLOCK_K), min(max_free_m, UNALIGNED_MAX_FREE_BLOCK_M)
    return max_k, max_free_m, min(min_free_k, max_k)


def _fitting(fitted):
    """An early_config_prune keeping the tiles that fit the channel counts of a problem.

    fitted maps a block name to the argument it tiles: the block must be the channel count rounded
    up to a power of two (at least 16, tl.dot's minimum), or the largest block listed when the count
    is larger. A whole channel range in one tile reads the gathered operand once; the remaining
    choices (BLOCK_M, or BLOCK_K over pixels for wgrad) are what autotuning times, among those that
    keep to the register limits above.
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        max_k, max_free_m, min_free_k = _limits(args["PRECISION"], all(args[a] % 16 == 0 for a in fitted.values()))
        configs = [c for c in configs if c.kwargs["BLOCK_K"] <= max_k
                   and ("BLOCK_M" in fitted or c.kwargs["BLOCK_M"] <= max_free_m)
                   and ("BLOCK_K" in fitted or c.kwargs["BLOCK_K"] >= min_free_k)]
        if not configs:  # the interpreter's single tile
            return []
        targets = {block: min(max(16, triton.next_power_of_2(args[arg])), max(c.kwargs[block] for c in configs))
                   for block, arg in fitted.items()}
        return [c for c in configs if all(c.kwargs[b] == t for b, t in targets.items())]
    return prune


_CONV_FIT = _fitting({"BLOCK_N": "N_out", "BLOCK_K": "K_ch"})
_WGRAD_FIT = _fitting({"BLOCK_M": "Cin", "BLOCK_N": "Cout"})


_SWITCHES = ["KH", "KW", "STRIDE", "PAD", "TRANSPOSED", "PREACT", "BN_MASK", "HAS_RESIDUAL", "WANT_STATS",
             "PRECISION"]


@triton.autotune(configs=CONV_CONFIGS, key=["M", "N_out", "K_ch", *_SWITCHES],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _CONV_FIT})
@triton.jit
def _conv_kernel(
    a_ptr,      # gathered operand, NHWC [N, SH, SW, K_ch]: x (forward) or dy (dgrad)
    w_ptr,      # packed weight [KH, KW, Cin, Cout], a_ptr's dtype
    out_ptr,    # NHWC [N, OH, OW, N_out]: y (forward) or g / dx (dgrad)
    res_ptr,    # residual, NHWC [N, OH, OW, N_out] (HAS_RESIDUAL)
    scale_ptr,  # [Cin] fp32: BN folded scale (forward loader PREACT, dgrad mask BN_MASK)
    shift_ptr,  # [Cin] fp32: BN folded shift (same)
    mean_ptr,   # [Cin] fp32: batch mean for sum_gx (BN_MASK)
    x_ptr,      # pre-BN input, NHWC [N, OH, OW, Cin], for dgrad's ReLU mask (BN_MASK)
    part_ptr,   # fp32 partials per STATS_ROWS rows: [3, T, N_out] (count, mean, M2) of the stored
                # output (WANT_STATS) or [2, T, Cin] (sum_g, sum_gx) (BN_MASK)
    M, N_out, K_ch,  # GEMM sizes: rows N*OH*OW, output channels, reduced channels per tap
    SH, SW, OH, OW, T,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    TRANSPOSED: tl.constexpr,    # False: convolution (forward); True: its transpose (dgrad)
    PREACT: tl.constexpr,        # loader applies relu(a * scale + shift) (forward)
    BN_MASK: tl.constexpr,       # dgrad epilogue: g = da * (x * scale + shift > 0) and its sums
    HAS_RESIDUAL: tl.constexpr, WANT_STATS: tl.constexpr, PRECISION: tl.constexpr,
    STATS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_out
    n = rows // (OH * OW)
    oh = (rows // OW) % OH
    ow = rows % OW
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(K_ch, BLOCK_K)
    # One flat loop over (tap, channel block) so that the pipeliner sees a single loop even when a
    # tap has a single channel block.
    for it in range(0, KH * KW * k_blocks):
        tap = it // k_blocks
        k0 = (it - tap * k_blocks) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        if KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0:
            pix = rows.to(tl.int64)  # 1x1 stride 1: a plain GEMM over NHWC rows
            ok = row_ok
        else:
            pix, ok = source_pixel(n, oh, ow, kh, kw, row_ok, SH, SW, STRIDE, PAD, TRANSPOSED)
        ch = k0 + ks
        ch_ok = ch < K_ch
        a = load_operand(a_ptr, pix[:, None] * K_ch, ok[:, None], ch[None, :], ch_ok[None, :],
                         scale_ptr, shift_ptr, PREACT)
        w_tap = w_ptr + tap * K_ch * N_out
        if TRANSPOSED:  # B[k = co, n = ci] of the [.., Cin, Cout] packing
            b_ptrs = w_tap + cols[None, :] * K_ch + ch[:, None]
        else:           # B[k = ci, n = co]
            b_ptrs = w_tap + ch[:, None] * N_out + cols[None, :]
        b = tl.load(b_ptrs, mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_off = rows.to(tl.int64)[:, None] * N_out + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    sub_tiles = pid_m * (BLOCK_M // STATS_ROWS) + tl.arange(0, BLOCK_M // STATS_ROWS)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
    if BN_MASK:
        x = tl.load(x_ptr + out_off, mask=out_ok, other=0.0)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        z = bn_affine(x, scale[None, :], shift[None, :])
        acc = tl.where(out_ok & (z > 0), acc, 0.0)
        gx = acc * (x.to(tl.float32) - mean[None, :])
        store_partial(part_ptr, 0, T, N_out, sub_tiles, cols, tl.sum(split_rows(acc, STATS_ROWS), axis=1))
        store_partial(part_ptr, 1, T, N_out, sub_tiles, cols, tl.sum(split_rows(gx, STATS_ROWS), axis=1))
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_off, out, mask=out_ok)
    if WANT_STATS:  # statistics of the output as stored (after rounding), per STATS_ROWS rows
        valid = tl.broadcast_to(row_ok[:, None], (BLOCK_M, BLOCK_N))
        count, mean, m2 = moments(split_rows(out.to(tl.float32), STATS_ROWS), split_rows(valid, STATS_ROWS), 1)
        store_partial(part_ptr, 0, T, N_out, sub_tiles, cols, count)
        store_partial(part_ptr, 1, T, N_out, sub_tiles, cols, mean)
        store_partial(part_ptr, 2, T, N_out, sub_tiles, cols, m2)


@triton.autotune(configs=WGRAD_CONFIGS,
                 key=["P", "Cin", "Cout", "CHUNK", "KH", "KW", "STRIDE", "PAD", "PREACT", "PRECISION"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _WGRAD_FIT})
@triton.jit
def _wgrad_kernel(
    x_ptr,      # pre-BN input, NHWC [N, H, W, Cin]
    dy_ptr,     # NHWC [N, OH, OW, Cout], x_ptr's dtype
    scale_ptr,  # [Cin] fp32: BN folded scale (PREACT)
    shift_ptr,  # [Cin] fp32: BN folded shift (PREACT)
    part_ptr,   # fp32 [SPLITS, Cout, Cin, KH, KW]: dW of each split's pixel range
    P, Cin, Cout, H, W, OH, OW,
    CHUNK,      # output pixels per split (program axis 2)
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    PREACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ci_blocks = tl.cdiv(Cin, BLOCK_M)
    tap = tl.program_id(0) // ci_blocks
    kh = tap // KW
    kw = tap % KW
    ci = (tl.program_id(0) % ci_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci_ok = ci < Cin
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    split = tl.program_id(2)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        pix = p0 + tl.arange(0, BLOCK_K)
        pix_ok = pix < end
        src, ok = source_pixel(pix // (OH * OW), (pix // OW) % OH, pix % OW, kh, kw, pix_ok, H, W,
                               STRIDE, PAD, False)
        # A = P(x)^T [BLOCK_M (ci), BLOCK_K (pixels)], the forward's loader in transposed orientation
        a = load_operand(x_ptr, src[None, :] * Cin, ok[None, :], ci[:, None], ci_ok[:, None],
                         scale_ptr, shift_ptr, PREACT)
        b = tl.load(dy_ptr + pix.to(tl.int64)[:, None] * Cout + co[None, :],
                    mask=pix_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # dW[co, ci, kh, kw] of this split, written straight into torch's weight layout.
    offs = split.to(tl.int64) * Cout * Cin * KH * KW + (co[None, :] * Cin + ci[:, None]) * (KH * KW) + tap
    tl.store(part_ptr + offs, acc, mask=ci_ok[:, None] & co_ok[None, :])


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [Cout, Cin, KH, KW] -> [KH, KW, Cin, Cout] contiguous in dtype."""
    return weight.to(dtype).permute(2, 3, 1, 0).contiguous()


# The tile configuration chosen for each (kernel, autotuning key, argument dtypes) so far.
_chosen: dict[tuple, triton.Config] = {}
_tuning = threading.Lock()


def _capturing(args) -> bool:
    """Whether a CUDA graph is being captured on the current stream of the arguments' device."""
    tensor = next(v for v in args.values() if isinstance(v, torch.Tensor))
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _launch(kernel, fit, grid, args, config):
    """Launch an autotuned kernel with keyword ``args``.

    config None: the configuration chosen for this problem. The first launch of a problem times the
    fitting configurations (Triton's autotuner, which keeps per-call state on the kernel: one thread
    at a time); later launches reuse the choice without the autotuner. Where timing cannot run (a
    CUDA graph being captured: timing synchronises) or is turned off (AUTOTUNE), the first fitting
    configuration runs untimed. A ``triton.Config``: exactly that configuration (tests check each one).
    """
    if config is None:
        key = (kernel.fn.__name__, *(args[name] for name in kernel.keys),
               *(str(v.dtype) for v in args.values() if isinstance(v, torch.Tensor)))
        config = _chosen.get(key)
        if config is None and AUTOTUNE and not _capturing(args):
            with _tuning:
                kernel[grid](**args)
                _chosen[key] = kernel.best_config
            return
        if config is None:
            config = (fit(kernel.configs, {}, **args) or kernel.configs)[0]
    kernel.fn[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _run_conv(a, wp, out, rows_shape, src_hw, k_ch, n_out, stride, padding, tf32, *, scale=None,
              shift=None, residual=None, mean=None, x=None, partials=None, transposed=False,
              want_stats=False, config=None):
    """Launch ``_conv_kernel``: out [rows_shape..., n_out] (NHWC) from the gathered operand a."""
    n, oh, ow = rows_shape
    m = n * oh * ow
    dummy = out  # stands in for pointer arguments a configuration does not read
    args = dict(
        a_ptr=a, w_ptr=wp, out_ptr=out, res_ptr=dummy if residual is None else residual,
        scale_ptr=dummy if scale is None else scale, shift_ptr=dummy if shift is None else shift,
        mean_ptr=dummy if mean is None else mean, x_ptr=dummy if x is None else x,
        part_ptr=dummy if partials is None else partials,
        M=m, N_out=n_out, K_ch=k_ch, SH=src_hw[0], SW=src_hw[1], OH=oh, OW=ow,
        T=0 if partials is None else partials.shape[1],
        KH=wp.shape[0], KW=wp.shape[1], STRIDE=stride, PAD=padding, TRANSPOSED=transposed,
        PREACT=scale is not None and not transposed, BN_MASK=scale is not None and transposed,
        HAS_RESIDUAL=residual is not None, WANT_STATS=want_stats, PRECISION=dot_precision(a.dtype, tf32),
        STATS_ROWS=STATS_ROWS)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"])

    _launch(_conv_kernel, _CONV_FIT, grid, args, config)


def conv_fwd(x, weight, stride, padding, scale=None, shift=None, residual=None, want_stats=False,
             tf32=False, config=None):
    """y = conv2d(P(x), weight) [+ residual] and, if want_stats, the partials of y as stored.

    x: [N, Cin, H, W] any layout; weight: [Cout, Cin, KH, KW]; scale, shift: [Cin] or None;
    residual: [N, Cout, Ho, Wo] or None. Returns y [N, Cout, Ho, Wo] channels_last in x's dtype and
    partials [3, cdiv(N*Ho*Wo, STATS_ROWS), Cout] fp32 ([3, 0, Cout] without statistics).
    """
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    x = nhwc(x)
    y = empty_nhwc(n, cout, ho, wo, x)
    tiles = triton.cdiv(n * ho * wo, STATS_ROWS) if want_stats else 0
    partials = torch.empty((3, tiles, cout), dtype=torch.float32, device=x.device)
    _run_conv(x, pack_weight(weight, x.dtype), y, (n, ho, wo), (h, w), cin, cout, stride, padding, tf32,
              scale=vector(scale), shift=vector(shift),
              residual=None if residual is None else nhwc(residual.to(x.dtype)),
              partials=partials if want_stats else None, want_stats=want_stats, config=config)
    return y, partials


def conv_dgrad(dy, weight, x, stride, padding, scale=None, shift=None, mean=None, tf32=False, config=None):
    """Gradient through the conv with dgrad's BN epilogue (see reference.conv_dgrad).

    dy: [N, Cout, Ho, Wo]; weight: [Cout, Cin, KH, KW]; x: [N, Cin, H, W] (pre-BN input; fixes H, W).
    Returns g [N, Cin, H, W] channels_last in dy's dtype and sums [2, Cin] fp32 (sum_g, sum_gx; zeros
    for the identity loader, where g is the plain input gradient).
    """
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    dy = nhwc(dy)
    g = empty_nhwc(n, cin, h, w, dy)
    with_bn = scale is not None
    tiles = triton.cdiv(n * h * w, STATS_ROWS) if with_bn else 0
    partials = torch.empty((2, tiles, cin), dtype=torch.float32, device=dy.device)
    _run_conv(dy, pack_weight(weight, dy.dtype), g, (n, h, w), (dy.shape[2], dy.shape[3]), cout, cin,
              stride, padding, tf32, scale=vector(scale), shift=vector(shift), mean=vector(mean),
              x=nhwc(x) if with_bn else None, partials=partials if with_bn else None, transposed=True,
              config=config)
    return g, partials.sum(1)


def _wgrad_chunk(pixels: int) -> int:
    """Output pixels per wgrad split: enough splits to fill the GPU, few enough to keep them long."""
    if INTERPRET:
        return 64
    return triton.cdiv(max(512, triton.cdiv(pixels, 128)), 128) * 128


def conv_wgrad(x, dy, weight_shape, stride, padding, scale=None, shift=None, tf32=False, config=None):
    """dW [Cout, Cin, KH, KW] fp32 = sum over output pixels of P(x) (x) dy (see reference.conv_wgrad).

    x: [N, Cin, H, W] (pre-BN input); dy: [N, Cout, Ho, Wo]; scale, shift: [Cin] or None.
    """
    cout, cin, kh, kw = weight_shape
    n, _, h, w = x.shape
    ho, wo = dy.shape[2], dy.shape[3]
    x = nhwc(x)
    dy = nhwc(dy.to(x.dtype))
    pixels = n * ho * wo
    chunk = _wgrad_chunk(pixels)
    splits = max(1, triton.cdiv(pixels, chunk))
    partials = torch.empty((splits, cout, cin, kh, kw), dtype=torch.float32, device=x.device)
    scale, shift = vector(scale), vector(shift)
    args = dict(x_ptr=x, dy_ptr=dy, scale_ptr=partials if scale is None else scale,
                shift_ptr=partials if shift is None else shift, part_ptr=partials,
                P=pixels, Cin=cin, Cout=cout, H=h, W=w, OH=ho, OW=wo, CHUNK=chunk,
                KH=kh, KW=kw, STRIDE=stride, PAD=padding, PREACT=scale is not None,
                PRECISION=dot_precision(x.dtype, tf32))

    def grid(meta):
        return kh * kw * triton.cdiv(cin, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]), splits

    _launch(_wgrad_kernel, _WGRAD_FIT, grid, args, config)
    return partials.sum(0)
