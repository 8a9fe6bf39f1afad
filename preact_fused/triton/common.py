"""Pieces shared by the Triton kernels: the BatchNorm fold and activation, tap geometry, the in-launch
reduction tree, the persistent semaphores, layout and dtype rules.

``bn_fold_vectors`` and ``preact`` are the one place where the fold and relu(bn(x)) are computed: the
forward's loader, the fold an op writes, wgrad's loader and dgrad's ReLU mask all call them, so every
program of every kernel gets the same bits (DESIGN.md section 5; contract.py for the formulas).

Reductions across programs (statistics of a conv output, dgrad's sums, bn_stats, wgrad's split-K)
stay inside the producing launch: each program writes its partial to a workspace and increments an
int32 semaphore; the program that completes a group of partials merges them in index order (so the
result does not depend on which program arrives last) and resets the semaphore to zero. The
semaphores live in one zero-initialised int32 buffer per (device, stream), allocated once: no
memset per call. No float atomics anywhere: reruns are bit-identical.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .launch import current_stream

# Kernels are built for the interpreter when TRITON_INTERPRET=1 is set before this module is
# imported (Triton decides when a kernel is decorated): then CPU tensors are accepted and every
# launch uses one small, fixed tile configuration.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The BatchNorm of a conv's input (constexpr ``BN``): none, batch statistics, a given fold, running
# statistics (contract.py's four forms). constexpr objects, so kernels may read them (launchers pass
# ``.value``).
BN_NONE, BN_STATS, BN_FOLD, BN_RUNNING = (tl.constexpr(i) for i in range(4))

# Partials per first-level group of the reduction tree. Small under the interpreter so that its
# small tensors already give several groups and a partial last one.
GROUP = 4 if INTERPRET else 32

# Kinds of reduction tree (constexpr ``KIND``): statistics summaries (count, pivot, offset, M2;
# merged with contract.merge_summaries' formula) or plain sums (sum_g, sum_gx).
KIND_SUMMARY, KIND_SUMS = tl.constexpr(0), tl.constexpr(1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid sizes (triton.cdiv is a constexpr_function: several times slower
    on the host, and the launch path calls it a few times per op)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (see cdiv)."""
    return 1 << (n - 1).bit_length()


_SAME_DEVICE = contextlib.nullcontext()


def on_device_of(t: torch.Tensor):
    """A context in which kernels launch on t's device: Triton launches on the current CUDA device
    (and its current stream), which need not hold the tensors. A no-op for CPU tensors and for
    tensors on the current device."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device)


def check_activation(t: torch.Tensor, name: str) -> None:
    """A clear error unless t is a 4-D float32 / bfloat16 / float16 activation."""
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"the triton backend supports float32, bfloat16 and float16 activations, "
                        f"got {name} of dtype {t.dtype} (use backend='reference' for {t.dtype})")


def empty_nhwc(n: int, c: int, h: int, w: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A new [n, c, h, w] channels_last tensor on like's device (like's dtype unless given)."""
    return torch.empty((n, c, h, w), dtype=dtype or like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(N, C, H, W) element strides of a 4-D activation; zeros for an absent one. Kernels index
    activations through these, so any layout is read in place (channels_last: C stride 1, which
    Triton specialises)."""
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel input as it is (kernels cast on load); a copy only if it is not contiguous."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def buffer(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A buffer updated in place: it must be contiguous."""
    if t is not None and not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous")
    return t


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """tl.dot input_precision: 'ieee' (exact fp32) for float32 unless TF32 is asked for."""
    return "ieee" if dtype == torch.float32 and not tf32 else "tf32"


# ---- persistent semaphores -------------------------------------------------------------------------

_SEMAPHORES: dict[tuple, torch.Tensor] = {}
_MIN_SEMAPHORES = 1 << 12


def semaphores(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` zero int32 counters for launches on ``device``'s current stream.

    Every kernel leaves the counters it used at zero, so kernels running one after another on a
    stream share them without a memset. Allocated (zeroed) once per (device, stream), regrown when a
    launch needs more.
    """
    key = (device.type, device.index, current_stream(device))
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < count:
        size = max(_MIN_SEMAPHORES, next_power_of_2(max(count, 1)))
        buf = _SEMAPHORES[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 for anything else: an H100/H200)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# ---- the BatchNorm fold and the activation ---------------------------------------------------------

@triton.jit
def bn_fold_vectors(ch, ch_ok, C, stats_ptr, fold_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, eps,
                    BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """(mean, invstd, scale, shift) fp32 of channels ``ch`` (contract.py's fold, one operation each).

    stats_ptr: [4, C] summary (BN_STATS); fold_ptr: [4, C] fold (BN_FOLD); rmean_ptr, rvar_ptr: [C]
    running statistics (BN_RUNNING); gamma_ptr, beta_ptr: [C] affine (any float dtype).
    mean = pivot + offset, var = M2 / count, invstd = 1 / sqrt(var + eps) (both correctly rounded),
    scale = gamma * invstd, shift = fma(-mean, scale, beta).
    """
    if BN == BN_FOLD:
        mean = tl.load(fold_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
        invstd = tl.load(fold_ptr + C + ch, mask=ch_ok, other=0.0).to(tl.float32)
        scale = tl.load(fold_ptr + 2 * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
        shift = tl.load(fold_ptr + 3 * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
    else:
        if BN == BN_STATS:
            count = tl.load(stats_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32)
            pivot = tl.load(stats_ptr + C + ch, mask=ch_ok, other=0.0).to(tl.float32)
            offset = tl.load(stats_ptr + 2 * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
            m2 = tl.load(stats_ptr + 3 * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
            mean = pivot + offset
            var = tl.div_rn(m2, count)
        else:
            mean = tl.load(rmean_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
            var = tl.load(rvar_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32)
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        scale = invstd
        if HAS_GAMMA:
            scale = tl.load(gamma_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32) * invstd
        beta = tl.zeros_like(scale)
        if HAS_BETA:
            beta = tl.load(beta_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
        shift = tl.fma(-mean, scale, beta)
    return mean, invstd, scale, shift


@triton.jit
def bn_z(v, scale, shift):
    """z = fma(x, scale, shift) in fp32: the forward's activation input and the backward's mask."""
    return tl.fma(v.to(tl.float32), scale, shift)


@triton.jit
def preact(v, ok, scale, shift):
    """P(x) in fp32: (z <= 0) ? 0 : z (NaN kept, as PyTorch's ReLU), 0 where ``ok`` is false
    (padding and out-of-range pixels are zero after the activation)."""
    z = bn_z(v, scale, shift)
    return tl.where(ok, tl.where(z <= 0, 0.0, z), 0.0)


@triton.jit
def write_fold(fold_out_ptr, C, stats_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, eps, momentum,
               keep, BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, UPDATE: tl.constexpr,
               HAS_NBT: tl.constexpr, FACTOR_FROM_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """The fold [4, C] of batch (BN_STATS) or running (BN_RUNNING) statistics, and with UPDATE the
    running-statistic update (contract.update_running). Run by ONE program of a launch.

    num_batches_tracked ([] int64, HAS_NBT) is incremented first; the factor is ``momentum`` (with
    ``keep`` = 1 - momentum) or, FACTOR_FROM_COUNT, 1 / num_batches_tracked after the increment.
    """
    factor = momentum
    one_minus = keep
    if UPDATE:
        if HAS_NBT:
            tracked = tl.load(nbt_ptr) + 1
            tl.store(nbt_ptr, tracked)
            if FACTOR_FROM_COUNT:
                factor = tl.div_rn(1.0, tracked.to(tl.float32))
                one_minus = 1.0 - factor
    for c0 in range(0, C, BLOCK):
        ch = c0 + tl.arange(0, BLOCK)
        ok = ch < C
        mean, invstd, scale, shift = bn_fold_vectors(ch, ok, C, stats_ptr, fold_out_ptr, gamma_ptr, beta_ptr,
                                                     rmean_ptr, rvar_ptr, eps, BN, HAS_GAMMA, HAS_BETA)
        tl.store(fold_out_ptr + ch, mean, mask=ok)
        tl.store(fold_out_ptr + C + ch, invstd, mask=ok)
        tl.store(fold_out_ptr + 2 * C + ch, scale, mask=ok)
        tl.store(fold_out_ptr + 3 * C + ch, shift, mask=ok)
        if UPDATE:
            count = tl.load(stats_ptr + ch, mask=ok, other=2.0).to(tl.float32)
            m2 = tl.load(stats_ptr + 3 * C + ch, mask=ok, other=0.0).to(tl.float32)
            unbiased = tl.div_rn(m2, tl.maximum(count - 1.0, 1.0))
            rm = tl.load(rmean_ptr + ch, mask=ok, other=0.0)
            rv = tl.load(rvar_ptr + ch, mask=ok, other=0.0)
            new_mean = rm.to(tl.float32) * one_minus + mean * factor
            new_var = rv.to(tl.float32) * one_minus + unbiased * factor
            tl.store(rmean_ptr + ch, new_mean.to(rm.dtype), mask=ok)
            tl.store(rvar_ptr + ch, new_var.to(rv.dtype), mask=ok)


# ---- tap geometry --------------------------------------------------------------------------------

@triton.jit
def pixel_coordinates(rows, H, W):
    """(n, h, w) of flat row indices over an [N, H, W] pixel grid, in the rows' integer type."""
    n = rows // (H * W)
    rem = rows - n * (H * W)
    return n, rem // W, rem % W


@triton.jit
def source_offset(n, oh, ow, kh, kw, row_ok, SH, SW, s_n, s_h, s_w, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    """The element offset (int64, channel 0) of the pixel that tap (kh, kw) reads for row (n, oh, ow).

    Convolution (TRANSPOSED False): ih = oh * STRIDE - PAD + kh. Transposed (dgrad): the row is an
    input pixel and the source is dy at ih = (oh + PAD - kh) / STRIDE, a tap that exists only when
    the division is exact (stride 2 by masking taps, no zero insertion). n: int64 image index;
    s_n, s_h, s_w: the source's strides. Returns (offset, validity).
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
    return n * s_n + ih.to(tl.int64) * s_h + iw.to(tl.int64) * s_w, ok


# ---- summaries and the in-launch reduction tree ---------------------------------------------------

@triton.jit
def tile_summary(v, valid, count):
    """(count, pivot, offset, M2) per column of the valid rows of v [R, BC] (contract.summarize):
    pivot = the first row if finite, else 0 (row 0 must be valid unless count is 0), two passes in registers.
    valid: [R, 1] or [R, BC]; count: the number of valid rows (a scalar)."""
    first = tl.arange(0, v.shape[0])[:, None] == 0
    pivot = tl.sum(tl.where(first & valid, v, 0.0), axis=0)
    pivot = tl.where(tl.abs(pivot) < float("inf"), pivot, 0.0)  # a finite pivot: inf/NaN stay in the offset
    shifted = v - pivot[None, :]
    n = tl.zeros_like(pivot) + count.to(tl.float32)
    offset = tl.div_rn(tl.sum(tl.where(valid, shifted, 0.0), axis=0), tl.maximum(n, 1.0))
    d = shifted - offset[None, :]
    return n, pivot, offset, tl.sum(tl.where(valid, d * d, 0.0), axis=0)


@triton.jit
def _combine(n_a, p_a, d_a, m_a, n_b, p_b, d_b, m_b, KIND: tl.constexpr):
    """a then b: contract.merge_summaries' formula (an empty summary is neutral), or plain sums."""
    if KIND == KIND_SUMMARY:
        n = n_a + n_b
        delta = (p_b - p_a) + (d_b - d_a)
        frac = tl.div_rn(n_b, tl.maximum(n, 1.0))
        d = tl.div_rn(d_a * n_a + (d_b + (p_b - p_a)) * n_b, tl.maximum(n, 1.0))
        m = m_a + m_b + delta * delta * n_a * frac
        a_empty = n_a == 0
        b_empty = n_b == 0
        n = tl.where(a_empty, n_b, tl.where(b_empty, n_a, n))
        p = tl.where(a_empty, p_b, p_a)
        d = tl.where(a_empty, d_b, tl.where(b_empty, d_a, d))
        m = tl.where(a_empty, m_b, tl.where(b_empty, m_a, m))
        return n, p, d, m
    else:
        return n_a + n_b, p_a + p_b, d_a, m_a


@triton.jit
def _store_planes(ptr, row, C, cols, ok, q0, q1, q2, q3, Q: tl.constexpr):
    base = ptr + tl.cast(row, tl.int64) * (Q * C) + cols
    tl.store(base, q0, mask=ok)
    tl.store(base + C, q1, mask=ok)
    if Q == 4:
        tl.store(base + 2 * C, q2, mask=ok)
        tl.store(base + 3 * C, q3, mask=ok)


@triton.jit
def _load_planes(ptr, row, C, cols, ok, Q: tl.constexpr):
    # .cg: from L2, never a stale L1 line of another program's partial
    base = ptr + tl.cast(row, tl.int64) * (Q * C) + cols
    q0 = tl.load(base, mask=ok, other=0.0, cache_modifier=".cg")
    q1 = tl.load(base + C, mask=ok, other=0.0, cache_modifier=".cg")
    q2 = q0
    q3 = q0
    if Q == 4:
        q2 = tl.load(base + 2 * C, mask=ok, other=0.0, cache_modifier=".cg")
        q3 = tl.load(base + 3 * C, mask=ok, other=0.0, cache_modifier=".cg")
    return q0, q1, q2, q3


@triton.jit
def _merge_rows(ptr, first, last, C, cols, ok, Q: tl.constexpr, KIND: tl.constexpr):
    """Rows first..last-1 of a [rows, Q, C] partials workspace merged in row order."""
    a0, a1, a2, a3 = _load_planes(ptr, first, C, cols, ok, Q)
    for r in range(first + 1, last):
        b0, b1, b2, b3 = _load_planes(ptr, r, C, cols, ok, Q)
        a0, a1, a2, a3 = _combine(a0, a1, a2, a3, b0, b1, b2, b3, KIND)
    return a0, a1, a2, a3


@triton.jit
def reduce_tiles(q0, q1, q2, q3, tile, T, cols, C, ws_ptr, sem_ptr, sem_base, out_ptr, extra,
                 KIND: tl.constexpr, GROUP: tl.constexpr):
    """Reduce one column block's per-tile partials over the T tiles of a launch, in tile order.

    q0..q3 [BC]: this program's partial of tile ``tile`` for columns ``cols`` (< C stored).
    ws_ptr: fp32 workspace [T + cdiv(T, GROUP), Q, C] (tile partials, then group partials);
    sem_ptr + sem_base: cdiv(T, GROUP) + 1 zero int32 counters of this column block (left zero).
    KIND_SUMMARY: Q = 4, out [4, C] = the merged (count, pivot, offset, M2);
    KIND_SUMS: Q = 2, out [3, C] = (sum_g, sum_gx, sum_gx * extra), extra [BC] = invstd.
    The program completing a group of GROUP tiles merges them; the one completing the last group
    merges the group partials. Merge order is fixed by tile index: the result does not depend on
    which program arrives last.
    """
    Q: tl.constexpr = 4 if KIND == KIND_SUMMARY else 2
    ok = cols < C
    _store_planes(ws_ptr, tile, C, cols, ok, q0, q1, q2, q3, Q)
    tl.debug_barrier()  # every thread's partial is written before the release below
    groups = tl.cdiv(T, GROUP)
    group = tile // GROUP
    first = group * GROUP
    last = tl.minimum(first + GROUP, T)
    arrived = tl.atomic_add(sem_ptr + sem_base + group, 1, sem="acq_rel", scope="gpu")
    if arrived == last - first - 1:
        tl.atomic_xchg(sem_ptr + sem_base + group, 0, sem="relaxed", scope="gpu")
        a0, a1, a2, a3 = _merge_rows(ws_ptr, first, last, C, cols, ok, Q, KIND)
        _store_planes(ws_ptr, T + group, C, cols, ok, a0, a1, a2, a3, Q)
        tl.debug_barrier()
        done = tl.atomic_add(sem_ptr + sem_base + groups, 1, sem="acq_rel", scope="gpu")
        if done == groups - 1:
            tl.atomic_xchg(sem_ptr + sem_base + groups, 0, sem="relaxed", scope="gpu")
            r0, r1, r2, r3 = _merge_rows(ws_ptr, T, T + groups, C, cols, ok, Q, KIND)
            if KIND == KIND_SUMMARY:
                tl.store(out_ptr + cols, r0, mask=ok)
                tl.store(out_ptr + C + cols, r1, mask=ok)
                tl.store(out_ptr + 2 * C + cols, r2, mask=ok)
                tl.store(out_ptr + 3 * C + cols, r3, mask=ok)
            else:
                tl.store(out_ptr + cols, r0, mask=ok)
                tl.store(out_ptr + C + cols, r1, mask=ok)
                tl.store(out_ptr + 2 * C + cols, r1 * extra, mask=ok)
