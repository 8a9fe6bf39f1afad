// conv_fwd: y = conv(P(x), w) [+ residual], optional per-tile statistics of y as stored.
#include "igemm.cuh"

namespace preact_fused {

template <typename T>
static cudaError_t run_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  constexpr int kVec = Elem<T>::kVec;
  IgemmParams<T> p{};
  set_igemm_geometry(p, s, a.x, s.h, s.w, s.cin, s.ho, s.wo, s.cout, a.w_packed, a.k_pad);
  p.a_scale = a.scale;
  p.a_shift = a.shift;
  p.out = static_cast<T*>(a.y);
  p.residual = static_cast<const T*>(a.residual);
  p.out_vec = s.cout % kVec == 0 && aligned16(a.y) && (a.residual == nullptr || aligned16(a.residual));
  p.stats = a.partials;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  return launch_igemm<T, false>(p, stream);
}

cudaError_t launch_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto t) { return run_conv_fwd<decltype(t)>(a, stream); });
}

}  // namespace preact_fused
