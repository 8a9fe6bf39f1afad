// conv_fwd: y = conv(P(x), w) [+ residual] and, optionally, the summary [4, cout] of y as stored,
// in one launch (see igemm.cuh).
#include "igemm.cuh"

namespace preact_fused {

int conv_tile_rows(long long rows, int cols, int num_sms) {
  const long long blocks = static_cast<long long>(ceil_div(rows, 128)) * ceil_div(cols, conv_tile_cols(cols));
  return blocks < (num_sms > 0 ? num_sms : 1) ? 64 : 128;
}

long long conv_tree_floats(long long rows, int cols, int tile_rows, int planes) {
  const int tiles = ceil_div(rows, tile_rows);
  return static_cast<long long>(tiles + ceil_div(tiles, kTreeGroup)) * planes * cols;
}

long long conv_tree_counters(long long rows, int cols, int tile_rows) {
  return static_cast<long long>(ceil_div(cols, conv_tile_cols(cols))) * tree_counters(ceil_div(rows, tile_rows));
}

template <typename T>
static cudaError_t run_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  constexpr int kVec = Elem<T>::kVec;
  IgemmParams<T> p{};
  set_igemm_geometry(p, s, false, a.x, s.h, s.w, s.cin, s.ho, s.wo, s.cout, a.weight, a.weight_dtype, a.w_strides,
                     a.tile_rows);
  p.bn = a.bn;
  p.out = static_cast<T*>(a.y);
  p.residual = static_cast<const T*>(a.residual);
  p.out_vec = s.cout % kVec == 0 && aligned16(a.y) && (a.residual == nullptr || aligned16(a.residual));
  p.stats = a.stats;
  p.ws = a.ws;
  p.counters = a.counters;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  return launch_igemm<T, false>(p, a.tile_rows, stream);
}

cudaError_t launch_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto t) { return run_conv_fwd<decltype(t)>(a, stream); });
}

}  // namespace preact_fused
