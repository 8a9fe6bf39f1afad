// The BatchNorm fold of contract.py, per channel, on the device: from a batch summary, from an
// earlier fold, or from the running statistics; and the running-statistic update.
//
//   mean = pivot + offset, var = M2 / count (batch) | running_mean, running_var (eval)
//   invstd = 1 / sqrt(var + eps) (IEEE-rounded), scale = gamma * invstd, shift = fma(-mean, scale, beta)
#pragma once

#include "../common.cuh"

namespace preact_fused {

struct Fold {
  float mean, invstd, scale, shift;
};

__device__ __forceinline__ Fold fold_of(float mean, float var, int c, const BnFoldArgs& b) {
  Fold f;
  f.mean = mean;
  f.invstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(var, b.eps)));
  f.scale = b.gamma != nullptr ? __fmul_rn(load_any(b.gamma, b.gamma_dtype, c), f.invstd) : f.invstd;
  f.shift = b.beta != nullptr ? fmaf(-mean, f.scale, load_any(b.beta, b.beta_dtype, c)) : __fmul_rn(-mean, f.scale);
  return f;
}

// The fold of channel c (b.source != kNone).
__device__ __forceinline__ Fold fold_channel(const BnFoldArgs& b, int c) {
  switch (b.source) {
    case BnSource::kFold: {
      const long long cs = b.c;
      return {__ldg(b.fold + c), __ldg(b.fold + cs + c), __ldg(b.fold + 2 * cs + c), __ldg(b.fold + 3 * cs + c)};
    }
    case BnSource::kRunning:
      return fold_of(load_any(b.running_mean, b.running_dtype, c), load_any(b.running_var, b.running_dtype, c), c, b);
    default: {
      const long long cs = b.c;
      const float count = __ldg(b.stats + c), pivot = __ldg(b.stats + cs + c);
      const float offset = __ldg(b.stats + 2 * cs + c), m2 = __ldg(b.stats + 3 * cs + c);
      return fold_of(__fadd_rn(pivot, offset), __fdiv_rn(m2, count), c, b);
    }
  }
}

// Writes the fold of channel c to b.fold_out and, with b.update_running (kStats), updates the
// running statistics of channel c. nbt_old: *num_batches_tracked before this batch's increment.
__device__ __forceinline__ void write_fold_channel(const BnFoldArgs& b, int c, long long nbt_old) {
  const Fold f = fold_channel(b, c);
  const long long cs = b.c;
  b.fold_out[c] = f.mean;
  b.fold_out[cs + c] = f.invstd;
  b.fold_out[2 * cs + c] = f.scale;
  b.fold_out[3 * cs + c] = f.shift;
  if (b.source != BnSource::kStats || !b.update_running) return;
  // contract.update_running in the buffers' dtype: r = (r * (1 - f)) + (value * f), each rounded.
  float factor, keep;
  if (b.use_momentum) {
    factor = b.momentum;
    keep = b.one_minus_momentum;
  } else {
    factor = __fdiv_rn(1.f, static_cast<float>(nbt_old + 1));
    keep = __fadd_rn(1.f, -factor);
  }
  const float count = __ldg(b.stats + c), m2 = __ldg(b.stats + 3 * cs + c);
  const float unbiased = __fdiv_rn(m2, fmaxf(__fadd_rn(count, -1.f), 1.f));
  const DType dt = b.running_dtype;
  const float rm = load_any(b.running_mean, dt, c), rv = load_any(b.running_var, dt, c);
  const float new_rm = __fadd_rn(round_to(dt, __fmul_rn(rm, keep)), round_to(dt, __fmul_rn(f.mean, factor)));
  const float new_rv = __fadd_rn(round_to(dt, __fmul_rn(rv, keep)), round_to(dt, __fmul_rn(unbiased, factor)));
  store_any(b.running_mean, dt, c, new_rm);
  store_any(b.running_var, dt, c, new_rv);
}

// One block writes the fold of every channel (b.fold_out) and does the running update; thread 0
// then increments num_batches_tracked. Call from all threads of that block.
__device__ __forceinline__ void write_fold_block(const BnFoldArgs& b) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y;
  const bool update = b.source == BnSource::kStats && b.update_running;
  const long long nbt_old = (update && b.num_batches_tracked != nullptr) ? *b.num_batches_tracked : 0;
  for (int c = tid; c < b.c; c += nthreads) write_fold_channel(b, c, nbt_old);
  __syncthreads();  // every thread has read num_batches_tracked
  if (tid == 0 && update && b.num_batches_tracked != nullptr) *b.num_batches_tracked = nbt_old + 1;
}

}  // namespace preact_fused
