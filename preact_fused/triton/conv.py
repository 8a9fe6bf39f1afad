"""Implicit-GEMM convolutions in NHWC: forward, dgrad and wgrad of conv(relu(bn(x))), one launch each.

Two kernels, one design:

* ``_conv_kernel`` computes out[row, col] = sum over taps and channels of A[src(row, tap), ch] *
  B[tap, ch, col], a GEMM whose A operand is gathered from an activation read through its strides
  (any layout, no copy). The forward (rows = output pixels, A = P(x), cols = Cout) and dgrad
  (TRANSPOSED: rows = input pixels, A = dy, cols = Cin) are the same kernel with compile-time
  switches for the loader (identity or BN-ReLU, the fold computed in the loader from the batch
  statistics, a given fold or the running statistics) and the epilogue (residual add, the summary
  [4, Cout] of the stored output, or dgrad's ReLU mask with its sums [3, Cin]). One program writes
  the fold it used and updates the running statistics; the summaries and sums are reduced inside
  the launch by the fixed-order tree of common.reduce_tiles.
* ``_wgrad_kernel`` computes dW[co, ci, kh, kw] = sum over output pixels of P(x)[src(pix, tap), ci] *
  dy[pix, co] with the same loader and tap geometry; the long pixel reduction is split across
  programs (about two waves of the GPU) into fp32 partials that the last split of each output tile
  sums in split order (deterministic, no float atomics), in the same launch.

Weights are read as torch's [Cout, Cin, KH, KW] through their strides, in any float dtype, rounded
to the activation dtype on load: no packing, no cast launch.

fp32 inputs use exact fp32 dot products ('ieee') unless TF32 is asked for (``tf32=True``);
bf16/fp16 use tensor cores with fp32 accumulation. Statistics, folds and sums are fp32.
"""
from __future__ import annotations

import math
import os
import threading

import torch
import triton
import triton.language as tl

from .. import contract
from .common import (BN_FOLD, BN_NONE, BN_RUNNING, BN_STATS, GROUP, INTERPRET, KIND_SUMMARY, KIND_SUMS,
                     bn_fold_vectors, bn_z, buffer, cdiv, dot_precision, empty_nhwc, next_power_of_2,
                     pixel_coordinates, preact, reduce_tiles, semaphores, sm_count, source_offset, strides4,
                     tile_summary, vector, write_fold)
from .bn_grad import bn_backward_coefficients, bn_backward_value, check_fold_and_sums
from .launch import Plan, launch, pointer, resolved


# Autotuning times the configurations that fit a problem (the interpreter has a single one);
# PREACT_FUSED_TRITON_AUTOTUNE=0 (or AUTOTUNE = False) launches the first fitting one untimed.
AUTOTUNE = os.environ.get("PREACT_FUSED_TRITON_AUTOTUNE", "1") != "0"


def _configs(m_tiles, n_tiles, k_tiles):
    """Tile configurations for Hopper/Ampere GPUs; one small fixed tile under the interpreter.

    Warps follow the accumulator: 8 from 64 x 64 fp32 values up, 4 below. With 4 warps a 128 x 64
    tile needs all 255 registers and spills in the epilogue, 128 x 128 spills hundreds of bytes, and
    the BN-folding loader and the statistics epilogue make exact-fp32 64 x 64 and TF32 128 x 32 tiles
    spill too.
    tests/test_triton_compile.py compiles every build the ResNet-1001 shapes can select for sm_90
    and checks that none spills; tests/test_triton_gpu.py checks every configuration listed here
    against the reference.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8 if bm * bn >= 64 * 64 else 4,
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
    """(largest BLOCK_K, largest free BLOCK_M, smallest free BLOCK_K) under the rules above;
    precision: "ieee" or "tf32" (float32 operands), anything else for 16-bit ones."""
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
        # the dot's operand dtype decides the rule: 16-bit operands carry PRECISION "tf32" (ignored
        # by tl.dot for them) but are not TF32 operands
        operand = args["a_ptr"] if "a_ptr" in args else args["x_ptr"]
        precision = args["PRECISION"] if operand.dtype == torch.float32 else "mma16"
        max_k, max_free_m, min_free_k = _limits(precision, all(args[a] % 16 == 0 for a in fitted.values()))
        configs = [c for c in configs if c.kwargs["BLOCK_K"] <= max_k
                   and ("BLOCK_M" in fitted or c.kwargs["BLOCK_M"] <= max_free_m)
                   and ("BLOCK_K" in fitted or c.kwargs["BLOCK_K"] >= min_free_k)]
        if not configs:  # the interpreter's single tile
            return []
        targets = {block: min(max(16, next_power_of_2(args[arg])), max(c.kwargs[block] for c in configs))
                   for block, arg in fitted.items()}
        return [c for c in configs if all(c.kwargs[b] == t for b, t in targets.items())]
    return prune


_CONV_FIT = _fitting({"BLOCK_N": "N_out", "BLOCK_K": "K_ch"})
_WGRAD_FIT = _fitting({"BLOCK_M": "Cin", "BLOCK_N": "Cout"})

# The smallest row and column blocks of the conv configurations: the reduction workspace and the
# semaphores are sized for them before autotuning picks a configuration.
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONV_CONFIGS)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONV_CONFIGS)
_FOLD_BLOCK = tl.constexpr(64)  # channels per step of the one program that writes the fold

_SWITCHES = ["KH", "KW", "STRIDE", "PAD", "TRANSPOSED", "BN", "PREACT", "BN_MASK", "HAS_GAMMA", "HAS_BETA",
             "UPDATE", "HAS_NBT", "FACTOR_FROM_COUNT", "HAS_RESIDUAL", "WANT_STATS", "PRECISION"]


@triton.autotune(configs=CONV_CONFIGS, key=["M", "N_out", "K_ch", *_SWITCHES],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _CONV_FIT},
                 restore_value=["rmean_ptr", "rvar_ptr", "nbt_ptr"])
@triton.jit
def _conv_kernel(
    a_ptr, sa_n, sa_c, sa_h, sa_w,      # gathered operand [N, K_ch, SH, SW] (strided): x (forward) or dy (dgrad)
    w_ptr, sw_o, sw_i, sw_h, sw_w,      # weight [Cout, Cin, KH, KW] (strided), any float dtype
    out_ptr,                            # NHWC [N, OH, OW, N_out], a_ptr's dtype: y (forward) or g / dx (dgrad)
    aux_ptr, se_n, se_c, se_h, se_w,    # [N, N_out, OH, OW] (strided): residual (HAS_RESIDUAL) or pre-BN x (BN_MASK)
    stats_ptr,                          # [4, C_bn] summary of the BN's input (BN_STATS)
    fold_ptr,                           # [4, C_bn] fold (BN_FOLD)
    gamma_ptr, beta_ptr,                # [C_bn] affine (HAS_GAMMA, HAS_BETA)
    rmean_ptr, rvar_ptr,                # [C_bn] running statistics: read (BN_RUNNING) or updated (UPDATE)
    nbt_ptr,                            # [] int64 num_batches_tracked, incremented (HAS_NBT)
    fold_out_ptr,                       # [4, K_ch] fold written by program (0, 0) (BN_STATS / BN_RUNNING forward)
    ws_ptr,                             # fp32 reduction workspace [T + groups, Q, N_out]
    sem_ptr,                            # zero int32 semaphores (left zero)
    red_ptr,                            # [4, N_out] summary of y (WANT_STATS) or [3, N_out] sums (BN_MASK)
    M, N_out, K_ch, SH, SW, OH, OW,     # GEMM rows N*OH*OW, output channels, reduced channels per tap; grids
    eps, momentum, keep,                # BN epsilon, momentum and 1 - momentum
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    TRANSPOSED: tl.constexpr,           # False: convolution (forward); True: its transpose (dgrad)
    BN: tl.constexpr,                   # BN_NONE / BN_STATS / BN_FOLD / BN_RUNNING: the BN of x
    PREACT: tl.constexpr,               # forward loader applies P(x)
    BN_MASK: tl.constexpr,              # dgrad epilogue: g = da * !(z <= 0) and its sums
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr,
    FACTOR_FROM_COUNT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WANT_STATS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PREACT and (BN == BN_STATS or BN == BN_RUNNING):
        if (pid_m == 0) & (pid_n == 0):
            write_fold(fold_out_ptr, K_ch, stats_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, eps,
                       momentum, keep, BN, HAS_GAMMA, HAS_BETA, UPDATE, HAS_NBT, FACTOR_FROM_COUNT, _FOLD_BLOCK)

    rows32 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # M < 2^31 (_run_conv checks); offsets in int64
    row_ok = rows32 < M
    n32, oh, ow = pixel_coordinates(rows32, OH, OW)
    n = n32.to(tl.int64)
    rows = rows32.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_out
    ks = tl.arange(0, BLOCK_K)
    dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K_ch, BLOCK_K)):
        ch = kb * BLOCK_K + ks
        ch_ok = ch < K_ch
        if PREACT:  # the fold of this channel block, once for all taps
            _, _, scale, shift = bn_fold_vectors(ch, ch_ok, K_ch, stats_ptr, fold_ptr, gamma_ptr, beta_ptr,
                                                 rmean_ptr, rvar_ptr, eps, BN, HAS_GAMMA, HAS_BETA)
        a_ch = ch.to(tl.int64)[None, :] * sa_c
        for tap in range(0, KH * KW):
            kh = tap // KW
            kw = tap % KW
            src, ok = source_offset(n, oh, ow, kh, kw, row_ok, SH, SW, sa_n, sa_h, sa_w, STRIDE, PAD, TRANSPOSED)
            mask = ok[:, None] & ch_ok[None, :]
            a = tl.load(a_ptr + src[:, None] + a_ch, mask=mask, other=0.0)
            if PREACT:
                a = preact(a, mask, scale[None, :], shift[None, :]).to(dtype)
            w_tap = w_ptr + kh * sw_h + kw * sw_w
            if TRANSPOSED:  # B[k = co, n = ci]
                b_ptrs = w_tap + ch[:, None] * sw_o + cols[None, :] * sw_i
            else:           # B[k = ci, n = co]
                b_ptrs = w_tap + ch[:, None] * sw_i + cols[None, :] * sw_o
            b = tl.load(b_ptrs, mask=ch_ok[:, None] & col_ok[None, :], other=0.0).to(dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_off = rows[:, None] * N_out + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    aux_off = n[:, None] * se_n + oh.to(tl.int64)[:, None] * se_h + ow.to(tl.int64)[:, None] * se_w \
        + cols.to(tl.int64)[None, :] * se_c
    if HAS_RESIDUAL:
        acc += tl.load(aux_ptr + aux_off, mask=out_ok, other=0.0).to(tl.float32)
    if BN_MASK:
        x = tl.load(aux_ptr + aux_off, mask=out_ok, other=0.0).to(tl.float32)
        mean, invstd, scale_o, shift_o = bn_fold_vectors(cols, col_ok, N_out, stats_ptr, fold_ptr, gamma_ptr,
                                                         beta_ptr, rmean_ptr, rvar_ptr, eps, BN, HAS_GAMMA,
                                                         HAS_BETA)
        z = bn_z(x, scale_o[None, :], shift_o[None, :])
        acc = tl.where(out_ok, tl.where(z <= 0, 0.0, acc), 0.0)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_off, out, mask=out_ok)

    tiles = tl.maximum(tl.cdiv(M, BLOCK_M), 1)
    sem_base = pid_n * (tl.cdiv(tiles, GROUP) + 1)
    if BN_MASK:  # sums of g before rounding, reduced over the launch's row tiles
        sum_g = tl.sum(acc, axis=0)
        sum_gx = tl.sum(acc * (x - mean[None, :]), axis=0)
        reduce_tiles(sum_g, sum_gx, sum_g, sum_g, pid_m, tiles, cols, N_out, ws_ptr, sem_ptr, sem_base, red_ptr,
                     invstd, KIND_SUMS, GROUP)
    if WANT_STATS:  # summary of the output as stored (after rounding)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        c, p, d, m2 = tile_summary(out.to(tl.float32), row_ok[:, None], count)
        reduce_tiles(c, p, d, m2, pid_m, tiles, cols, N_out, ws_ptr, sem_ptr, sem_base, red_ptr, c,
                     KIND_SUMMARY, GROUP)


@triton.autotune(configs=WGRAD_CONFIGS,
                 key=["P", "Cin", "Cout", "CHUNK", "KH", "KW", "STRIDE", "PAD", "PREACT", "BN_BACKWARD",
                      "BN_TRAINING", "PRECISION"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _WGRAD_FIT})
@triton.jit
def _wgrad_kernel(
    x_ptr, sx_n, sx_c, sx_h, sx_w,      # pre-BN input [N, Cin, H, W] (strided)
    dy_ptr, sd_n, sd_c, sd_h, sd_w,     # [N, Cout, OH, OW] (strided), any float dtype: dy, or with
                                        # BN_BACKWARD the next BN's masked gradient g
    fold_ptr,                           # [4, Cin] fold (PREACT)
    bnx_ptr, sq_n, sq_c, sq_h, sq_w,    # BN_BACKWARD: [N, Cout, OH, OW] (strided) the next BN's input
    bnfold_ptr,                         # BN_BACKWARD: [4, Cout] its fold
    bnsums_ptr,                         # BN_BACKWARD and BN_TRAINING: [3, Cout] its sums
    dyout_ptr,                          # BN_BACKWARD: NHWC [P, Cout] output dy = bn_backward(g, ...), bnx's dtype
    part_ptr,                           # fp32 [SPLITS, KH*KW, Cin, Cout]: dW of each split's pixel range
    sem_ptr,                            # zero int32 semaphores, one per output tile (left zero)
    dw_ptr, sw_o, sw_i, sw_h, sw_w,     # fp32 [Cout, Cin, KH, KW] output (strided: the weight's format)
    P, Cin, Cout, H, W, OH, OW,
    CHUNK, SPLITS,                      # output pixels per split (program axis 2), number of splits
    count,                              # BN_BACKWARD: the next BN's element count per channel
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    PREACT: tl.constexpr, BN_BACKWARD: tl.constexpr, BN_TRAINING: tl.constexpr, PRECISION: tl.constexpr,
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
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, P)
    dtype = x_ptr.dtype.element_ty
    if PREACT:
        _, _, scale, shift = bn_fold_vectors(ci, ci_ok, Cin, fold_ptr, fold_ptr, fold_ptr, fold_ptr, fold_ptr,
                                             fold_ptr, 0.0, BN_FOLD, False, False)
    x_ch = ci.to(tl.int64)[:, None] * sx_c
    dy_co = co.to(tl.int64)[None, :] * sd_c
    if BN_BACKWARD:  # dy = bn_backward(g, bn_x): its coefficients; the programs of tap 0, channel block 0 store dy
        d_scale, d_b, d_c = bn_backward_coefficients(bnfold_ptr, bnsums_ptr, co, co_ok, Cout, count, BN_TRAINING)
        bnx_co = co.to(tl.int64)[None, :] * sq_c
        stores_dy = tl.program_id(0) == 0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        pix = (p0 + tl.arange(0, BLOCK_K)).to(tl.int32)  # < 2^31 (conv_wgrad checks)
        pix_ok = pix < end
        n32, oh, ow = pixel_coordinates(pix, OH, OW)
        n = n32.to(tl.int64)
        src, ok = source_offset(n, oh, ow, kh, kw, pix_ok, H, W, sx_n, sx_h, sx_w, STRIDE, PAD, False)
        # A = P(x)^T [BLOCK_M (ci), BLOCK_K (pixels)], the forward's loader in transposed orientation
        mask = ci_ok[:, None] & ok[None, :]
        a = tl.load(x_ptr + src[None, :] + x_ch, mask=mask, other=0.0)
        if PREACT:
            a = preact(a, mask, scale[:, None], shift[:, None]).to(dtype)
        dy_pix = n * sd_n + oh.to(tl.int64) * sd_h + ow.to(tl.int64) * sd_w
        b_ok = pix_ok[:, None] & co_ok[None, :]
        b = tl.load(dy_ptr + dy_pix[:, None] + dy_co, mask=b_ok, other=0.0)
        if BN_BACKWARD:
            q = b
            if BN_TRAINING:
                q_pix = n * sq_n + oh.to(tl.int64) * sq_h + ow.to(tl.int64) * sq_w
                q = tl.load(bnx_ptr + q_pix[:, None] + bnx_co, mask=b_ok, other=0.0)
            d = bn_backward_value(b, q, d_scale[None, :], d_b[None, :], d_c[None, :], BN_TRAINING)
            b = tl.where(b_ok, d, 0.0).to(dyout_ptr.dtype.element_ty)  # the stored value, 0 off the tile
            tl.store(dyout_ptr + pix.to(tl.int64)[:, None] * Cout + co.to(tl.int64)[None, :], b,
                     mask=b_ok & stores_dy)
        b = b.to(dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # This split's partial, then the last split of the output tile sums all of them in split order.
    taps = KH * KW
    tile_off = (tap * Cin + ci.to(tl.int64)[:, None]) * Cout + co[None, :]
    tile_ok = ci_ok[:, None] & co_ok[None, :]
    split_elems = taps * Cin.to(tl.int64) * Cout
    tl.store(part_ptr + split * split_elems + tile_off, acc, mask=tile_ok)
    tl.debug_barrier()  # every thread's partial is written before the release below
    sem = sem_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    arrived = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLITS - 1:
        tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLITS):
            total += tl.load(part_ptr + s * split_elems + tile_off, mask=tile_ok, other=0.0, cache_modifier=".cg")
        # dW[co, ci, kh, kw] through the weight's strides
        dw_off = co.to(tl.int64)[None, :] * sw_o + ci.to(tl.int64)[:, None] * sw_i + kh * sw_h + kw * sw_w
        tl.store(dw_ptr + dw_off, total, mask=tile_ok)


# The tile configuration chosen for each (kernel, autotuning key, tensor dtypes) so far.
_chosen: dict[tuple, triton.Config] = {}
_tuning = threading.Lock()


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _plan(kernel, fit, grid, kwargs, tensors, outputs, config, device) -> Plan:
    """The Plan of an autotuned kernel's launch (kwargs: its arguments, Slots for ``tensors``, the
    call's inputs and example outputs).

    config None: the configuration chosen for this problem before, else the one the autotuner picks
    on the plan's first call by timing the fitting ones (Triton's autotuner, which keeps per-call
    state on the kernel: one thread at a time). Where timing cannot run (a CUDA graph being
    captured: timing synchronises) or is turned off (AUTOTUNE), the first fitting configuration runs
    untimed, and while autotuning is on that plan serves this call only. A ``triton.Config``:
    exactly that configuration (tests check each one).
    """
    if config is None:
        choice = (kernel.fn.__name__, *[kwargs[name] for name in kernel.keys],
                  *[t.dtype for t in tensors if t is not None])
        config = _chosen.get(choice)
        if config is None and AUTOTUNE and not _capturing(device):
            def tune(args):
                with _tuning:
                    kernel[grid](**args)
                    _chosen[choice] = kernel.best_config
                return kernel.best_config
            return Plan(kernel.fn, kwargs, outputs, grid, tune=tune)
        if config is None:
            first = (fit(kernel.configs, {}, **resolved(kwargs, tensors)) or kernel.configs)[0]
            return Plan(kernel.fn, kwargs, outputs, grid, first, keep=not AUTOTUNE)
    return Plan(kernel.fn, kwargs, outputs, grid, config)


def bn_mode(stats, fold, running_mean) -> int:
    """The form of the BatchNorm of a conv's input (contract.py): BN_FOLD > BN_STATS > BN_RUNNING > BN_NONE."""
    if fold is not None:
        return BN_FOLD.value
    if stats is not None:
        return BN_STATS.value
    if running_mean is not None:
        return BN_RUNNING.value
    return BN_NONE.value


def bn_inputs(stats, fold, gamma, beta, running_mean, running_var, num_batches_tracked, update_running) -> tuple:
    """The seven BatchNorm tensors of a launch as ``bn_args`` takes them: the per-channel inputs
    contiguous (a copy only where one is not), the running statistics as given when they are updated."""
    updates = bool(update_running) and bn_mode(stats, fold, running_mean) == BN_STATS.value
    if not updates:
        running_mean, running_var = vector(running_mean), vector(running_var)
    return vector(stats), vector(fold), vector(gamma), vector(beta), running_mean, running_var, num_batches_tracked


def bn_args(tensors, first: int, eps, momentum, update_running, dummy) -> dict:
    """Kernel arguments of the BatchNorm of a conv's (or bn_fold's) input, and the checks they need.

    tensors[first:first + 7]: stats, fold, gamma, beta, running_mean, running_var,
    num_batches_tracked (``bn_inputs``), each None when absent.
    """
    stats, fold, gamma, beta, running_mean, running_var, num_batches_tracked = tensors[first:first + 7]
    bn = bn_mode(stats, fold, running_mean)
    update = bool(update_running) and bn == BN_STATS.value
    if bn == BN_RUNNING.value and running_var is None:
        raise ValueError("running statistics need running_var beside running_mean")
    if update:
        if running_mean is None or running_var is None:
            raise ValueError("update_running needs running_mean and running_var")
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        buffer(running_mean, "running_mean")
        buffer(running_var, "running_var")
    has_nbt = update and num_batches_tracked is not None

    def ptr(i):
        return pointer(tensors, first + i, dummy)

    return dict(
        stats_ptr=ptr(0), fold_ptr=ptr(1), gamma_ptr=ptr(2), beta_ptr=ptr(3), rmean_ptr=ptr(4), rvar_ptr=ptr(5),
        nbt_ptr=ptr(6) if has_nbt else dummy,
        eps=float(eps), momentum=0.0 if momentum is None else float(momentum),
        keep=1.0 if momentum is None else 1.0 - float(momentum),
        BN=bn, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, UPDATE=update, HAS_NBT=has_nbt,
        FACTOR_FROM_COUNT=update and momentum is None)


def _reduction_space(m: int, cols: int, planes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(example workspace, semaphores) for reducing per-row-tile partials of ``cols`` columns in a conv launch."""
    tiles = max(1, cdiv(m, _MIN_BLOCK_M))
    groups = cdiv(tiles, GROUP)
    col_blocks = max(1, cdiv(cols, _MIN_BLOCK_N))
    ws = torch.empty((tiles + groups) * planes * max(cols, 1), dtype=torch.float32, device=device)
    return ws, semaphores(device, col_blocks * (groups + 1))


# Rows (pixels) are indexed in int32 inside the conv kernels (int64 coordinates spill registers);
# a tile past the last row must still fit.
MAX_ROWS = 2**31 - 2**16


def check_rows(rows: int, what: str) -> None:
    """A clear error for a problem whose pixel rows the int32 indices of the conv kernels cannot reach."""
    if rows >= MAX_ROWS:
        raise ValueError(f"{what}: {rows} rows (N*H*W pixels); the Triton conv kernels index rows in int32 "
                         f"(fewer than 2^31 - 2^16): split the batch")


# A _conv_kernel call's tensors by index: the inputs (the gathered operand, the weight, the
# epilogue's operand: residual or pre-BN x, then bn_inputs' seven), then the outputs (out, the
# reduced summary or sums, the fold written, the reduction workspace).
_A, _W, _AUX, _BN_FIRST = 0, 1, 2, 3
_OUT, _RED, _FOLD_OUT, _WS = 10, 11, 12, 13


def _conv_plan(tensors, outputs, rows_shape, src_hw, k_ch, n_out, stride, padding, tf32, eps, momentum,
               update_running, sem, *, transposed, has_residual, want_stats, bn_mask, config, device) -> Plan:
    """The Plan of a _conv_kernel launch; tensors: the call's inputs and example ``outputs`` (indices above)."""
    a, weight, aux = tensors[_A], tensors[_W], tensors[_AUX]
    n, oh, ow = rows_shape
    m = n * oh * ow
    check_rows(m, "conv")
    bn = bn_args(tensors, _BN_FIRST, eps, momentum, update_running, sem)
    kwargs = dict(
        a_ptr=pointer(tensors, _A, sem), **dict(zip(("sa_n", "sa_c", "sa_h", "sa_w"), strides4(a))),
        w_ptr=pointer(tensors, _W, sem), **dict(zip(("sw_o", "sw_i", "sw_h", "sw_w"), weight.stride())),
        out_ptr=pointer(tensors, _OUT, sem),
        aux_ptr=pointer(tensors, _AUX, sem), **dict(zip(("se_n", "se_c", "se_h", "se_w"), strides4(aux))),
        fold_out_ptr=pointer(tensors, _FOLD_OUT, sem), ws_ptr=pointer(tensors, _WS, sem), sem_ptr=sem,
        red_ptr=pointer(tensors, _RED, sem), **bn,
        M=m, N_out=n_out, K_ch=k_ch, SH=src_hw[0], SW=src_hw[1], OH=oh, OW=ow,
        KH=weight.shape[2], KW=weight.shape[3], STRIDE=stride, PAD=padding, TRANSPOSED=transposed,
        PREACT=bn["BN"] != BN_NONE.value and not transposed, BN_MASK=bn_mask, HAS_RESIDUAL=has_residual,
        WANT_STATS=want_stats, PRECISION=dot_precision(a.dtype, tf32), GROUP=GROUP)

    def grid(meta):
        return max(1, cdiv(m, meta["BLOCK_M"])), max(1, cdiv(n_out, meta["BLOCK_N"]))

    return _plan(_conv_kernel, _CONV_FIT, grid, kwargs, tensors, outputs, config, device)


def conv_fwd(x, weight, stride, padding, stats=None, fold=None, gamma=None, beta=None, running_mean=None,
             running_var=None, num_batches_tracked=None, eps=1e-5, momentum=0.1, update_running=False,
             residual=None, want_stats=False, tf32=False, config=None):
    """(y, stats of y, fold): y = conv2d(P(x), weight) [+ residual], one launch (contract.conv_fwd).

    x: [N, Cin, H, W] any layout; weight: [Cout, Cin, KH, KW]; residual: [N, Cout, Ho, Wo] any layout
    and float dtype. Returns y [N, Cout, Ho, Wo] channels_last in x's dtype, the summary [4, Cout]
    fp32 of y as stored (want_stats; else [0]) and the fold [4, Cin] computed from ``stats`` or the
    running statistics (else [0]).
    """
    inputs = (x, weight, residual, *bn_inputs(stats, fold, gamma, beta, running_mean, running_var,
                                              num_batches_tracked, update_running))
    problem = ("conv_fwd", stride, padding, float(eps), momentum, bool(update_running), bool(want_stats), tf32,
               config, AUTOTUNE)

    def build():
        n, cin, h, w = x.shape
        cout, _, kh, kw = weight.shape
        ho, wo = contract.conv_output_size(h, kh, stride, padding), contract.conv_output_size(w, kw, stride, padding)
        m = n * ho * wo
        ws, sem = _reduction_space(m, cout, 4, x.device) if want_stats else (None, semaphores(x.device, 1))
        folds = bn_mode(stats, fold, running_mean) in (BN_STATS.value, BN_RUNNING.value)
        outputs = (empty_nhwc(n, cout, ho, wo, x),
                   torch.empty((4, cout) if want_stats else (0,), dtype=torch.float32, device=x.device),
                   torch.empty((4, cin) if folds else (0,), dtype=torch.float32, device=x.device), ws)
        return _conv_plan((*inputs, *outputs), outputs, (n, ho, wo), (h, w), cin, cout, stride, padding, tf32, eps,
                          momentum, update_running, sem, transposed=False, has_residual=residual is not None,
                          want_stats=bool(want_stats), bn_mask=False, config=config, device=x.device)

    y, red, fold_out, _ = launch(problem, build, inputs, x.device)
    return y, red, fold_out


def conv_dgrad(dy, weight, x, stride, padding, fold=None, tf32=False, config=None):
    """(g, sums): the gradient through the conv with dgrad's BN epilogue, one launch (contract.conv_dgrad).

    dy: [N, Cout, Ho, Wo]; weight: [Cout, Cin, KH, KW]; x: [N, Cin, H, W] (pre-BN input; fixes H, W).
    Returns g [N, Cin, H, W] channels_last in dy's dtype and sums [3, Cin] fp32 (sum_g, sum_gx,
    dgamma) with ``fold``; without it the plain input gradient and [0].
    """
    with_bn = fold is not None
    # x is read (the epilogue's operand) only with the fold; without it, only its shape is used
    inputs = (dy, weight, x if with_bn else None, None, vector(fold), None, None, None, None, None)
    problem = ("conv_dgrad", tuple(x.shape), stride, padding, tf32, config, AUTOTUNE)

    def build():
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        m = n * h * w
        ws, sem = _reduction_space(m, cin, 2, dy.device) if with_bn else (None, semaphores(dy.device, 1))
        outputs = (empty_nhwc(n, cin, h, w, dy),
                   torch.empty((3, cin) if with_bn else (0,), dtype=torch.float32, device=dy.device), None, ws)
        return _conv_plan((*inputs, *outputs), outputs, (n, h, w), (dy.shape[2], dy.shape[3]), cout, cin, stride,
                          padding, tf32, 0.0, 0.0, False, sem, transposed=True, has_residual=False,
                          want_stats=False, bn_mask=with_bn, config=config, device=dy.device)

    g, sums, _, _ = launch(problem, build, inputs, dy.device)
    return g, sums


def _wgrad_split(pixels: int, tiles: int, device) -> tuple[int, int]:
    """(pixels per split, splits): about two waves of the GPU's multiprocessors over the output
    tiles, splits of at least 512 pixels (3 splits under the interpreter, to exercise the reduction)."""
    if INTERPRET:
        chunk = max(32, cdiv(cdiv(pixels, 3), 32) * 32)
    else:
        splits = max(1, min(round(2 * sm_count(device) / max(tiles, 1)), cdiv(pixels, 512)))
        chunk = cdiv(cdiv(max(pixels, 1), splits), 128) * 128
    return chunk, max(1, cdiv(pixels, chunk))


def _fitted_block(channels: int) -> int:
    """The wgrad channel block the prune rule picks for ``channels`` (its largest listed block at most)."""
    return min(max(16, next_power_of_2(max(channels, 1))), max(c.kwargs["BLOCK_M"] for c in WGRAD_CONFIGS))


# A _wgrad_kernel call's tensors by index: x, dy (or g), the fold, the next BN's input, fold and sums
# (inputs), dW, the split partials, the dy computed (outputs).
_WX, _WDY, _WFOLD, _BNX, _BNFOLD, _BNSUMS, _DW, _PARTIALS, _DYOUT = range(9)


def conv_wgrad(x, dy, weight, stride, padding, fold=None, tf32=False, config=None):
    """dW [Cout, Cin, KH, KW] fp32 = sum over output pixels of P(x) (x) dy, one launch (contract.conv_wgrad).

    x: [N, Cin, H, W] (pre-BN input); dy: [N, Cout, Ho, Wo]; weight: [Cout, Cin, KH, KW] (only its
    shape and memory format are used: dW has both); fold: [4, Cin] or None.
    """
    return _wgrad(x, dy, weight, stride, padding, fold, None, tf32, config)[0]


def conv_wgrad_bn_backward(x, g, weight, stride, padding, fold, bn_x, bn_fold, bn_sums, count, training,
                           tf32=False, config=None):
    """(dW, dy): conv_wgrad of dy = bn_backward(g, bn_x, bn_fold, bn_sums, count, training), computed
    in the launch and stored (NHWC in bn_x's dtype), one launch (contract.conv_wgrad_bn_backward).

    g, bn_x: [N, Cout, Ho, Wo] (any layout); bn_fold: [4, Cout]; bn_sums: [3, Cout] (training).
    """
    check_fold_and_sums(bn_fold, bn_sums, training, "conv_wgrad_bn_backward", prefix="bn_")
    return _wgrad(x, g, weight, stride, padding, fold, (bn_x, bn_fold, bn_sums, float(count), bool(training)), tf32,
                  config)


def _wgrad(x, dy, weight, stride, padding, fold, bn, tf32, config):
    """(dW, the dy computed or None): one _wgrad_kernel launch; bn: (bn_x, bn_fold, bn_sums, count,
    training) when dy is the masked gradient of the BN that follows the conv, else None."""
    bn_x, bn_fold, bn_sums, count, training = bn if bn is not None else (None, None, None, 0.0, False)
    # bn_x is read only in training; its dtype and layout (those of the dy stored) are part of the problem anyway
    inputs = (x, dy, vector(fold), bn_x, vector(bn_fold), vector(bn_sums) if training else None)
    problem = ("conv_wgrad", tuple(weight.shape), weight.stride(), stride, padding, bn is not None, count, training,
               tf32, config, AUTOTUNE)

    def build():
        cout, cin, kh, kw = weight.shape
        n, _, h, w = x.shape
        ho, wo = dy.shape[2], dy.shape[3]
        device = x.device
        pixels = n * ho * wo
        check_rows(pixels, "conv_wgrad")
        tiles = kh * kw * cdiv(cin, _fitted_block(cin)) * cdiv(cout, _fitted_block(cout))
        chunk, splits = _wgrad_split(pixels, tiles, device)
        dw = contract.weight_grad_like(weight, x)
        outputs = (dw, torch.empty(splits * kh * kw * cin * cout, dtype=torch.float32, device=device),
                   None if bn is None else empty_nhwc(n, cout, ho, wo, bn_x))
        tensors = (*inputs, *outputs)
        sem = semaphores(device, kh * kw * max(1, cdiv(cin, 16)) * max(1, cdiv(cout, 16)))
        kwargs = dict(x_ptr=pointer(tensors, _WX, sem), **dict(zip(("sx_n", "sx_c", "sx_h", "sx_w"), x.stride())),
                      dy_ptr=pointer(tensors, _WDY, sem),
                      **dict(zip(("sd_n", "sd_c", "sd_h", "sd_w"), dy.stride())),
                      fold_ptr=pointer(tensors, _WFOLD, sem),
                      bnx_ptr=pointer(tensors, _BNX, sem) if training else sem,
                      **dict(zip(("sq_n", "sq_c", "sq_h", "sq_w"), strides4(bn_x if training else None))),
                      bnfold_ptr=pointer(tensors, _BNFOLD, sem), bnsums_ptr=pointer(tensors, _BNSUMS, sem),
                      dyout_ptr=pointer(tensors, _DYOUT, sem),
                      part_ptr=pointer(tensors, _PARTIALS, sem), sem_ptr=sem, dw_ptr=pointer(tensors, _DW, sem),
                      **dict(zip(("sw_o", "sw_i", "sw_h", "sw_w"), dw.stride())),
                      P=pixels, Cin=cin, Cout=cout, H=h, W=w, OH=ho, OW=wo, CHUNK=chunk, SPLITS=splits,
                      count=float(count), KH=kh, KW=kw, STRIDE=stride, PAD=padding, PREACT=fold is not None,
                      BN_BACKWARD=bn is not None, BN_TRAINING=bool(training), PRECISION=dot_precision(x.dtype, tf32))

        def grid(meta):
            return (max(1, kh * kw * cdiv(cin, meta["BLOCK_M"])), max(1, cdiv(cout, meta["BLOCK_N"])), splits)

        return _plan(_wgrad_kernel, _WGRAD_FIT, grid, kwargs, tensors, outputs, config, device)

    dw, _, dy_out = launch(problem, build, inputs, x.device)
    return dw, dy_out
