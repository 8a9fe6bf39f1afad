// BatchNorm pieces around the fused convolutions, one launch each: the summary [4, C] of a tensor
// (bn_stats: per-tile summaries merged in the launch), the fold of a summary or of the running
// statistics with the running-statistic update (bn_fold), and the elementwise BatchNorm backward
// dx = scale*g + B*x + C [+ d_residual] (bn_backward). All reductions run in a fixed order:
// results are bitwise reproducible.
#include "backward.cuh"
#include "fold.cuh"
#include "../reduce.cuh"

namespace preact_fused {

// ---- bn_stats ---------------------------------------------------------------------------------
// Block (32, 8) covers one tile of kStatsTileRows rows and 32 channels; two passes over the tile
// held in registers: offset = mean of (x - pivot) with pivot = the tile's first row, then the sum
// of squared deviations (M2). Tile summaries are merged by reduce.cuh's tree into stats [4, c].
constexpr int kStatsChannels = 32;

long long bn_stats_floats(long long rows, int c) {
  const int tiles = ceil_div(rows, kStatsTileRows);
  return static_cast<long long>(tiles + ceil_div(tiles, kTreeGroup)) * 4 * c;
}

long long bn_stats_counters(long long rows, int c) {
  return static_cast<long long>(ceil_div(c, kStatsChannels)) * tree_counters(ceil_div(rows, kStatsTileRows));
}

template <typename T>
__global__ void __launch_bounds__(256) bn_stats_kernel(const T* __restrict__ x,  // [rows, c]
                                                       long long rows, int c, int tiles,
                                                       float* __restrict__ stats,  // [4, c]
                                                       float* ws, int* counters) {
  constexpr int kPer = kStatsTileRows / 8;
  __shared__ float red[8][33];
  __shared__ float pivot_sh[32], offset_sh[32];
  __shared__ int flag;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int ch = blockIdx.y * kStatsChannels + tx;
  const long long r0 = static_cast<long long>(blockIdx.x) * kStatsTileRows;
  const int count = static_cast<int>(min(static_cast<long long>(kStatsTileRows), rows - r0));
  float v[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = ty + 8 * i;
    v[i] = (r < count && ch < c) ? to_float(x[(r0 + r) * c + ch]) : 0.f;
  }
  if (ty == 0) pivot_sh[tx] = v[0];  // row 0 of the tile
  __syncthreads();
  const float pivot = pivot_sh[tx];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (ty + 8 * i < count) s += v[i] - pivot;
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += red[y][tx];
    offset_sh[tx] = total / static_cast<float>(count);
  }
  __syncthreads();
  const float offset = offset_sh[tx];
  float s2 = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (ty + 8 * i < count) {
      const float d = (v[i] - pivot) - offset;
      s2 = fmaf(d, d, s2);
    }
  }
  red[ty][tx] = s2;  // reuse: the first sum was read before the barrier above
  __syncthreads();
  float mine[4] = {0.f, 0.f, 0.f, 0.f};
  if (ty == 0) {
    float m2 = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) m2 += red[y][tx];
    mine[0] = static_cast<float>(count);
    mine[1] = pivot;
    mine[2] = offset;
    mine[3] = m2;
  }
  const long long cs = c;
  tree_reduce<4>(ws, counters + static_cast<long long>(blockIdx.y) * tree_counters_dev(tiles), tiles,
                 static_cast<int>(blockIdx.x), c, blockIdx.y * kStatsChannels, kStatsChannels, mine, MergeSummary{},
                 [&](int col, const float (&t)[4]) {
                   stats[col] = t[0];
                   stats[cs + col] = t[1];
                   stats[2 * cs + col] = t[2];
                   stats[3 * cs + col] = t[3];
                 },
                 &flag);
}

cudaError_t launch_bn_stats(const BnStatsArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  const int tiles = ceil_div(a.rows, kStatsTileRows);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(a.c, kStatsChannels)));
  const dim3 block(kStatsChannels, 8);
  return dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    PF_LAUNCH(bn_stats_kernel<T>, grid, block, stream, static_cast<const T*>(a.x), a.rows, a.c, tiles, a.stats, a.ws,
              a.counters);
    return cudaGetLastError();
  });
}

// ---- bn_fold ----------------------------------------------------------------------------------
// One block: the fold of every channel, the running update, then num_batches_tracked (one
// block, so that every channel reads the count before it is incremented).
__global__ void __launch_bounds__(256) bn_fold_kernel(const BnFoldArgs a) { write_fold_block(a); }

cudaError_t launch_bn_fold(const BnFoldArgs& a, cudaStream_t stream) {
  if (a.c == 0) return cudaSuccess;
  PF_LAUNCH(bn_fold_kernel, 1, 256, stream, a);
  return cudaGetLastError();
}

// ---- bn_backward ------------------------------------------------------------------------------
// The coefficients of backward.cuh per channel, computed by every block into (dynamic) shared memory.

template <typename T>
__global__ void __launch_bounds__(256) bn_backward_kernel(const T* __restrict__ g,     // [rows, c]
                                                          const T* __restrict__ x,     // [rows, c]
                                                          const T* __restrict__ dres,  // [rows, c] or nullptr
                                                          const float* __restrict__ fold,  // [4, c]
                                                          const float* __restrict__ sums,  // [3, c]
                                                          float count, bool training,
                                                          long long total, int c, bool vec,
                                                          T* __restrict__ dx) {        // [rows, c]
  constexpr int kVec = Elem<T>::kVec;
  PF_DYNAMIC_SHARED(float, coef);  // [3][c] A, B, C
  for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
    const Coef k = bn_backward_coef(fold, sums, count, training, c, ch);
    coef[ch] = k.a;
    coef[c + ch] = k.b;
    coef[2 * c + ch] = k.c;
  }
  __syncthreads();
  auto get = [&](int ch) -> Coef { return {coef[ch], coef[c + ch], coef[2 * c + ch]}; };
  // dx = bn_backward_value [+ d_residual], each step rounded (the reference's torch ops).
  auto value = [&](float gv, float xv, const Coef& k) { return bn_backward_value(gv, xv, k, training); };
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {  // c % kVec == 0 and every pointer 16-byte aligned
    const long long nvec = total / kVec;
    for (long long v = first; v < nvec; v += step) {
      const long long e = v * kVec;
      const int ch = static_cast<int>(e % c);
      float gf[kVec], xf[kVec], rf[kVec], out[kVec];
      unpack<T>(ldg_vec(g + e), gf);
      unpack<T>(ldg_vec(x + e), xf);
      if (dres != nullptr) unpack<T>(ldg_vec(dres + e), rf);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float d = value(gf[j], xf[j], get(ch + j));
        if (dres != nullptr) d = __fadd_rn(d, rf[j]);
        out[j] = d;
      }
      *reinterpret_cast<uint4*>(dx + e) = pack<T>(out);
    }
  } else {
    for (long long e = first; e < total; e += step) {
      const int ch = static_cast<int>(e % c);
      float d = value(to_float(g[e]), to_float(x[e]), get(ch));
      if (dres != nullptr) d = __fadd_rn(d, to_float(dres[e]));
      dx[e] = from_float<T>(d);
    }
  }
}

cudaError_t launch_bn_backward(const BnBackwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = Elem<T>::kVec;
    auto al = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
    const bool vec =
        a.c % kVec == 0 && al(a.g) && al(a.x) && al(a.dx) && (a.d_residual == nullptr || al(a.d_residual));
    const long long total = a.rows * a.c;
    const long long work = vec ? total / kVec : total;
    int device = 0, sms = 0;
    PF_RETURN_IF_ERROR(cudaGetDevice(&device));
    PF_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const long long cap = 8LL * (sms > 0 ? sms : 1);
    const long long blocks = (work + 255) / 256 < cap ? (work + 255) / 256 : cap;
    const int smem = 12 * a.c;
    PF_RETURN_IF_ERROR(allow_dynamic_shared(bn_backward_kernel<T>, smem));
    PF_LAUNCH_SMEM(bn_backward_kernel<T>, static_cast<unsigned>(blocks), 256, smem, stream, static_cast<const T*>(a.g),
              static_cast<const T*>(a.x), static_cast<const T*>(a.d_residual), a.fold, a.sums, a.count, a.training,
              total, a.c, vec, static_cast<T*>(a.dx));
    return cudaGetLastError();
  });
}

}  // namespace preact_fused
