// In-launch, fixed-order reductions across the blocks of one launch (no float atomics).
//
// Each block publishes its partial result (a statistics summary or a few sums per column) in a
// float workspace, fences, and counts itself in with atomicAdd on an int32 counter of its group of
// kTreeGroup tiles. The block that arrives last in a group merges the group's partials in tile
// order and publishes the group's result; the block that completes the last group merges the
// groups in order and writes the final result. Which block does the merging depends on timing;
// what it merges and in which order does not, so results are bitwise reproducible. The merging
// block resets the counter it consumed to zero: the counters stay zero between launches.
#pragma once

#include "common.cuh"

namespace preact_fused {

// Statistics summary of one channel: count, pivot (one of the summarised values), mean - pivot, M2.
struct Summary {
  float n, p, d, m2;
};

// contract.merge_summaries: b merged into a; the pivot stays a's; an empty summary is neutral.
__device__ __forceinline__ Summary merge_summary(const Summary& a, const Summary& b) {
  if (!(b.n > 0.f)) return a;
  if (!(a.n > 0.f)) return b;
  const float n = a.n + b.n;
  const float delta = (b.p - a.p) + (b.d - a.d);
  const float frac = b.n / n;
  return {n, a.p, a.d + delta * frac, (a.m2 + b.m2) + ((delta * delta) * a.n) * frac};
}

// True in every thread of the block when this block is the last of `expected` to arrive at
// *counter (which it then resets to 0). Call from all threads; the block's global writes before
// the call are visible to the last block's reads after it (__threadfence on both sides).
__device__ __forceinline__ bool arrive_last(int* counter, int expected, int* flag) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int old = atomicAdd(counter, 1);
    const bool last = old == expected - 1;
    if (last) {
      atomicExch(counter, 0);
      __threadfence();
    }
    *flag = last ? 1 : 0;
  }
  __syncthreads();
  return *flag != 0;
}

// The two-level tree over `tiles` partials of kPlanes floats per column.
//   ws        float [tiles + groups, kPlanes, cols]: tile partials, then group partials
//   counters  int32 [groups + 1] of this column block (zero before and after)
// Thread tid < ncols owns column col0 + tid (< cols) and passes its tile partial in `mine`;
// merge(a, b) merges partial b into a; final(col, total) runs once per column in one block.
// Must be called by all threads of the block.
template <int kPlanes, typename Merge, typename Final>
__device__ __forceinline__ void tree_reduce(float* ws, int* counters, int tiles, int tile, int cols, int col0,
                                            int ncols, const float (&mine)[kPlanes], Merge merge, Final final,
                                            int* flag) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int col = col0 + tid;
  const bool owner = tid < ncols && col < cols;
  const long long plane = cols;
  auto slot = [&](int s) { return ws + static_cast<long long>(s) * kPlanes * plane + col; };
  if (owner) {
    float* dst = slot(tile);
#pragma unroll
    for (int q = 0; q < kPlanes; ++q) dst[q * plane] = mine[q];
  }
  const int groups = ceil_div_dev(tiles, kTreeGroup);
  const int group = tile / kTreeGroup;
  const int first = group * kTreeGroup;
  const int size = min(kTreeGroup, tiles - first);
  if (!arrive_last(counters + group, size, flag)) return;
  float acc[kPlanes];
  auto merge_range = [&](int s0, int count) {
    const float* src = slot(s0);
#pragma unroll
    for (int q = 0; q < kPlanes; ++q) acc[q] = load_cg(src + q * plane);
    for (int s = 1; s < count; ++s) {
      const float* nxt = slot(s0 + s);
      float b[kPlanes];
#pragma unroll
      for (int q = 0; q < kPlanes; ++q) b[q] = load_cg(nxt + q * plane);
      merge(acc, b);
    }
  };
  if (owner) merge_range(first, size);
  if (groups == 1) {
    if (owner) final(col, acc);
    return;
  }
  if (owner) {
    float* dst = slot(tiles + group);
#pragma unroll
    for (int q = 0; q < kPlanes; ++q) dst[q * plane] = acc[q];
  }
  if (!arrive_last(counters + groups, groups, flag)) return;
  if (owner) {
    merge_range(tiles, groups);
    final(col, acc);
  }
}

// Merge functors of tree_reduce: summaries (4 planes) and plain sums (any planes).
struct MergeSummary {
  __device__ __forceinline__ void operator()(float (&a)[4], const float (&b)[4]) const {
    const Summary m = merge_summary({a[0], a[1], a[2], a[3]}, {b[0], b[1], b[2], b[3]});
    a[0] = m.n;
    a[1] = m.p;
    a[2] = m.d;
    a[3] = m.m2;
  }
};
struct MergeSums {
  template <int kPlanes>
  __device__ __forceinline__ void operator()(float (&a)[kPlanes], const float (&b)[kPlanes]) const {
#pragma unroll
    for (int q = 0; q < kPlanes; ++q) a[q] += b[q];
  }
};

}  // namespace preact_fused
