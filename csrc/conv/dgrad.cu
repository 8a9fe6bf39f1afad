// conv_dgrad: da = conv_transpose(dy, w) as an implicit GEMM over input pixels with tap masks;
// epilogue g = da * (x*scale + shift > 0) and per-tile sums of g and g*(x - mean), reduced here
// over the tiles in a fixed order.
#include "igemm.cuh"

namespace preact_fused {

// out0[c] = sum_t part[0, t, c], out1[c] = sum_t part[1, t, c]; block (32, 16), grid (ceil(c/32), 2).
__global__ void __launch_bounds__(512) tile_sums_kernel(const float* __restrict__ part,  // [2, tiles, c]
                                                        int tiles, int c,
                                                        float* __restrict__ out0,        // [c]
                                                        float* __restrict__ out1) {      // [c]
  __shared__ double red[16][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int ch = blockIdx.x * 32 + tx;
  const float* src = part + static_cast<long long>(blockIdx.y) * tiles * c;
  double s = 0.0;
  if (ch < c)
    for (int t = ty; t < tiles; t += 16) s += src[static_cast<long long>(t) * c + ch];
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && ch < c) {
    double total = 0.0;
#pragma unroll
    for (int y = 0; y < 16; ++y) total += red[y][tx];
    (blockIdx.y == 0 ? out0 : out1)[ch] = static_cast<float>(total);
  }
}

template <typename T>
static cudaError_t run_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  constexpr int kVec = Elem<T>::kVec;
  const bool bn = a.scale != nullptr;
  IgemmParams<T> p{};
  set_igemm_geometry(p, s, a.dy, s.ho, s.wo, s.cout, s.h, s.w, s.cin, a.w_packed, a.k_pad);
  p.out = static_cast<T*>(a.g);
  p.out_vec = s.cin % kVec == 0 && aligned16(a.g) && (!bn || aligned16(a.x));
  p.ex = bn ? static_cast<const T*>(a.x) : nullptr;
  p.e_scale = a.scale;
  p.e_shift = a.shift;
  p.e_mean = a.mean;
  p.sums = a.sum_partials;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  PF_RETURN_IF_ERROR((launch_igemm<T, true>(p, stream)));
  if (bn) {
    PF_LAUNCH(tile_sums_kernel, dim3(ceil_div(s.cin, 32), 2), dim3(32, 16), stream, a.sum_partials, p.tiles, s.cin,
              a.sum_g, a.sum_gx);
    PF_CHECK_LAUNCH();
  }
  return cudaSuccess;
}

cudaError_t launch_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto t) { return run_conv_dgrad<decltype(t)>(a, stream); });
}

}  // namespace preact_fused
