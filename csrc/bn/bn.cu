// BatchNorm pieces around the fused convolutions: per-tile statistics of a tensor (bn_stats), the
// Chan merge of partials into mean/invstd/scale/shift with the running-stat update (bn_finalize),
// and the elementwise BatchNorm backward dx = A*g + B*x + C [+ d_residual] (bn_backward).
// All reductions run in a fixed order: results are bitwise reproducible.
#include "../common.cuh"

namespace preact_fused {

// ---- bn_stats ---------------------------------------------------------------------------------
// Block (32, 8) covers one tile of kTileRows rows and 32 channels; two passes over the tile held
// in registers: mean first, then the sum of squared deviations (M2).
template <typename T>
__global__ void __launch_bounds__(256) bn_stats_kernel(const T* __restrict__ x,  // [rows, c]
                                                       long long rows, int c, int tiles,
                                                       float* __restrict__ partials) {  // [3, tiles, c]
  constexpr int kPer = kTileRows / 8;
  __shared__ float red[8][33];
  __shared__ float mean_sh[32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int ch = blockIdx.y * 32 + tx;
  const long long r0 = static_cast<long long>(blockIdx.x) * kTileRows;
  const int count = static_cast<int>(min(static_cast<long long>(kTileRows), rows - r0));
  float v[kPer];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = ty + 8 * i;
    v[i] = (r < count && ch < c) ? to_float(x[(r0 + r) * c + ch]) : 0.f;
    s += v[i];
  }
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += red[y][tx];
    mean_sh[tx] = total / static_cast<float>(count);
  }
  __syncthreads();
  const float mean = mean_sh[tx];
  float s2 = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = ty + 8 * i;
    if (r < count) {
      const float d = v[i] - mean;
      s2 = fmaf(d, d, s2);
    }
  }
  red[ty][tx] = s2;  // reuse: the first sum was read before the barrier above
  __syncthreads();
  if (ty == 0 && ch < c) {
    float m2 = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) m2 += red[y][tx];
    const long long plane = static_cast<long long>(tiles) * c;
    const long long o = static_cast<long long>(blockIdx.x) * c + ch;
    partials[o] = static_cast<float>(count);
    partials[plane + o] = mean;
    partials[2 * plane + o] = m2;
  }
}

cudaError_t launch_bn_stats(const BnStatsArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  const int tiles = ceil_div(a.rows, kTileRows);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(a.c, 32)));
  const dim3 block(32, 8);
  return dispatch_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    PF_LAUNCH(bn_stats_kernel<T>, grid, block, stream, static_cast<const T*>(a.x), a.rows, a.c, tiles, a.partials);
    return cudaGetLastError();
  });
}

// ---- bn_finalize ------------------------------------------------------------------------------
// Block (kFinalCh, kFinalT) = (8, 64): 8 channels, 64 threads striding over the tiles of each (a
// large batch has thousands of tiles per channel: short strides, many loads in flight), float64
// accumulation, a fixed-order tree over the 64 per-thread sums.
//   total = sum n_t, mean = sum n_t mean_t / total, M2 = sum (M2_t + n_t (mean_t - mean)^2)
constexpr int kFinalCh = 8, kFinalT = 64;

// The sum of v over the kFinalT threads of each channel (threadIdx.y), returned to all of them.
__device__ __forceinline__ double sum_over_tile_threads(double v, double (&red)[kFinalT][kFinalCh]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  red[ty][tx] = v;
  __syncthreads();
  for (int s = kFinalT / 2; s > 0; s >>= 1) {
    if (ty < s) red[ty][tx] += red[ty + s][tx];
    __syncthreads();
  }
  const double total = red[0][tx];
  __syncthreads();  // red is written again by the next call
  return total;
}

__global__ void __launch_bounds__(kFinalCh * kFinalT) bn_finalize_kernel(BnFinalizeArgs a) {
  __shared__ double red[kFinalT][kFinalCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int ch = blockIdx.x * kFinalCh + tx;
  const long long plane = static_cast<long long>(a.tiles) * a.c;
  const float* cnt = a.partials;
  const float* mu = a.partials + plane;
  const float* m2 = a.partials + 2 * plane;

  double n_sum = 0.0, nm_sum = 0.0;
  if (ch < a.c) {
    for (int t = ty; t < a.tiles; t += kFinalT) {
      const long long o = static_cast<long long>(t) * a.c + ch;
      const double n = cnt[o];
      n_sum += n;
      nm_sum += n * static_cast<double>(mu[o]);
    }
  }
  const double total = sum_over_tile_threads(n_sum, red);
  const double mean = sum_over_tile_threads(nm_sum, red) / total;
  double q = 0.0;
  if (ch < a.c) {
    for (int t = ty; t < a.tiles; t += kFinalT) {
      const long long o = static_cast<long long>(t) * a.c + ch;
      const double d = static_cast<double>(mu[o]) - mean;
      q += static_cast<double>(m2[o]) + static_cast<double>(cnt[o]) * d * d;
    }
  }
  const double m2_total = sum_over_tile_threads(q, red);
  if (ty != 0 || ch >= a.c) return;
  const double var = m2_total / total;
  const double invstd = 1.0 / sqrt(var + static_cast<double>(a.eps));
  const double scale = a.gamma != nullptr ? static_cast<double>(a.gamma[ch]) * invstd : invstd;
  const double shift = (a.beta != nullptr ? static_cast<double>(a.beta[ch]) : 0.0) - mean * scale;
  a.mean[ch] = static_cast<float>(mean);
  a.invstd[ch] = static_cast<float>(invstd);
  a.scale[ch] = static_cast<float>(scale);
  a.shift[ch] = static_cast<float>(shift);
  if (a.running_mean != nullptr) {
    const float f = a.use_momentum ? a.momentum : static_cast<float>(1.0 / static_cast<double>(*a.num_batches_tracked));
    const double unbiased = var * total / (total - 1.0 > 1.0 ? total - 1.0 : 1.0);
    a.running_mean[ch] = a.running_mean[ch] * (1.f - f) + static_cast<float>(mean) * f;
    a.running_var[ch] = a.running_var[ch] * (1.f - f) + static_cast<float>(unbiased) * f;
  }
}

cudaError_t launch_bn_finalize(const BnFinalizeArgs& a, cudaStream_t stream) {
  if (a.c == 0) return cudaSuccess;
  PF_LAUNCH(bn_finalize_kernel, ceil_div(a.c, kFinalCh), dim3(kFinalCh, kFinalT), stream, a);
  return cudaGetLastError();
}

// ---- bn_backward ------------------------------------------------------------------------------
// coef[0] = A = scale, coef[1] = B = -scale*invstd^2*sum_gx/M, coef[2] = C = -scale*sum_g/M - B*mean
// (B = C = 0 in eval mode), in the reference's order of operations.
__global__ void bn_backward_coef_kernel(const float* __restrict__ mean, const float* __restrict__ invstd,
                                        const float* __restrict__ scale, const float* __restrict__ sum_g,
                                        const float* __restrict__ sum_gx, bool training, float m, int c,
                                        float* __restrict__ coef) {  // [3, c]
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  const float a = scale[ch];
  float b = 0.f, cc = 0.f;
  if (training) {
    b = -a * invstd[ch] * invstd[ch] * sum_gx[ch] / m;
    cc = -a * sum_g[ch] / m - b * mean[ch];
  }
  coef[ch] = a;
  coef[c + ch] = b;
  coef[2 * c + ch] = cc;
}

template <typename T>
__global__ void __launch_bounds__(256) bn_backward_kernel(const T* __restrict__ g,     // [rows, c]
                                                          const T* __restrict__ x,     // [rows, c]
                                                          const T* __restrict__ dres,  // [rows, c] or nullptr
                                                          const float* __restrict__ coef,  // [3, c]
                                                          long long total, int c, bool vec,
                                                          T* __restrict__ dx) {        // [rows, c]
  constexpr int kVec = Elem<T>::kVec;
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
        float d = gf[j] * __ldg(coef + ch + j) + xf[j] * __ldg(coef + c + ch + j) + __ldg(coef + 2 * c + ch + j);
        if (dres != nullptr) d += rf[j];
        out[j] = d;
      }
      *reinterpret_cast<uint4*>(dx + e) = pack<T>(out);
    }
  } else {
    for (long long e = first; e < total; e += step) {
      const int ch = static_cast<int>(e % c);
      float d = to_float(g[e]) * __ldg(coef + ch) + to_float(x[e]) * __ldg(coef + c + ch) + __ldg(coef + 2 * c + ch);
      if (dres != nullptr) d += to_float(dres[e]);
      dx[e] = from_float<T>(d);
    }
  }
}

template <typename T>
static cudaError_t run_bn_backward(const BnBackwardArgs& a, const float* coef, cudaStream_t stream) {
  constexpr int kVec = Elem<T>::kVec;
  auto al = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
  const bool vec = a.c % kVec == 0 && al(a.g) && al(a.x) && al(a.dx) && (a.d_residual == nullptr || al(a.d_residual));
  const long long total = a.rows * a.c;
  const long long work = vec ? total / kVec : total;
  int device = 0, sms = 0;
  PF_RETURN_IF_ERROR(cudaGetDevice(&device));
  PF_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const long long cap = 8LL * (sms > 0 ? sms : 1);
  const long long blocks = (work + 255) / 256 < cap ? (work + 255) / 256 : cap;
  PF_LAUNCH(bn_backward_kernel<T>, static_cast<unsigned>(blocks), 256, stream,
      static_cast<const T*>(a.g), static_cast<const T*>(a.x), static_cast<const T*>(a.d_residual), coef, total, a.c, vec,
      static_cast<T*>(a.dx));
  return cudaGetLastError();
}

cudaError_t launch_bn_backward(const BnBackwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  PF_LAUNCH(bn_backward_coef_kernel, ceil_div(a.c, 128), 128, stream, a.mean, a.invstd, a.scale, a.sum_g, a.sum_gx,
            a.training, static_cast<float>(a.rows), a.c, a.coef);
  PF_CHECK_LAUNCH();
  return dispatch_dtype(a.dtype, [&](auto t) { return run_bn_backward<decltype(t)>(a, a.coef, stream); });
}

}  // namespace preact_fused
