// conv_dgrad: da = conv_transpose(dy, w) as an implicit GEMM over input pixels with tap masks;
// with a fold, the epilogue masks g = da where the forward's ReLU passes and sums g and
// g*(x - mean) per channel, merged in the same launch into sums [3, cin] (see igemm.cuh).
#include "igemm.cuh"

namespace preact_fused {

template <typename T>
static cudaError_t run_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  constexpr int kVec = Elem<T>::kVec;
  const bool bn = a.fold != nullptr;
  IgemmParams<T> p{};
  set_igemm_geometry(p, s, true, a.dy, s.ho, s.wo, s.cout, s.h, s.w, s.cin, a.weight, a.weight_dtype, a.w_strides,
                     a.tile_rows);
  p.out = static_cast<T*>(a.g);
  p.out_vec = s.cin % kVec == 0 && aligned16(a.g) && (!bn || aligned16(a.x));
  p.ex = bn ? static_cast<const T*>(a.x) : nullptr;
  p.e_fold = a.fold;
  p.sums = a.sums;
  p.ws = a.ws;
  p.counters = a.counters;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  return launch_igemm<T, true>(p, a.tile_rows, stream);
}

cudaError_t launch_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto t) { return run_conv_dgrad<decltype(t)>(a, stream); });
}

}  // namespace preact_fused
