// Host-side interface between the torch bindings (bindings.cpp) and the kernels (*.cu).
//
// Nothing here includes torch: the .cu files compile against CUDA headers only. Every tensor is
// passed as a raw pointer with its layout spelled out in the comment beside it. Activations are
// NHWC (channels_last contiguous); statistics, scale/shift and partials are float32.
// Each launcher returns the cudaError_t of its launches (cudaGetLastError after each one).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace preact_fused {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows (NHWC pixels) per tile of the conv kernels and of bn_stats: the T of statistics partials
// [3, T, C] and of the dgrad sum partials is ceil(rows / kTileRows).
constexpr int kTileRows = 128;

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Column tile (output channels per block) of the forward / dgrad implicit GEMM for `cols` columns.
inline int conv_tile_cols(int cols) { return cols <= 16 ? 16 : (cols <= 32 ? 32 : 64); }

// Reduction tile of the forward / dgrad GEMM: 64 bytes of one pixel's channels.
inline int conv_tile_k(DType dtype) { return dtype == DType::kFloat32 ? 16 : 32; }

// Geometry of one convolution, stride and padding equal in both dimensions.
struct ConvShape {
  int n, h, w, cin;     // input x [n, h, w, cin]
  int cout, kh, kw;     // weight [cout, cin, kh, kw]
  int ho, wo;           // output [n, ho, wo, cout]
  int stride, pad;
};

struct ConvFwdArgs {
  ConvShape s;
  DType dtype;
  const void* x;           // [n, h, w, cin]            dtype
  const void* w_packed;    // [cout_pad, k_pad]          dtype, k = (kh*KW + kw)*cin + ci, zero padded
  int k_pad;               // multiple of conv_tile_k(dtype)
  const float* scale;      // [cin] or nullptr (identity loader)
  const float* shift;      // [cin] or nullptr
  const void* residual;    // [n, ho, wo, cout] or nullptr
  void* y;                 // [n, ho, wo, cout]          dtype
  float* partials;         // [3, T, cout] or nullptr, T = ceil(n*ho*wo / kTileRows)
};
cudaError_t launch_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream);

struct ConvDgradArgs {
  ConvShape s;
  DType dtype;
  const void* dy;          // [n, ho, wo, cout]          dtype
  const void* w_packed;    // [cin_pad, k_pad]           dtype, k = (kh*KW + kw)*cout + co, zero padded
  int k_pad;
  const void* x;           // [n, h, w, cin] pre-BN input (read only when scale != nullptr)
  const float* scale;      // [cin] or nullptr (then g = dx, no sums)
  const float* shift;      // [cin]
  const float* mean;       // [cin]
  void* g;                 // [n, h, w, cin]             dtype
  float* sum_partials;     // [2, T, cin] scratch, T = ceil(n*h*w / kTileRows), when scale != nullptr
  float* sum_g;            // [cin], when scale != nullptr
  float* sum_gx;           // [cin], when scale != nullptr
};
cudaError_t launch_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream);

// Split-K plan of the weight gradient: the number of pixel slices whose partial dW are summed.
int conv_wgrad_splits(const ConvShape& s, DType dtype, int num_sms);

struct ConvWgradArgs {
  ConvShape s;
  DType dtype;
  const void* x;           // [n, h, w, cin]             dtype
  const void* dy;          // [n, ho, wo, cout]          dtype
  const float* scale;      // [cin] or nullptr (identity loader)
  const float* shift;      // [cin] or nullptr
  int splits;              // from conv_wgrad_splits
  float* partials;         // [splits, cout, kh*kw*cin]  scratch
  float* dw;               // [cout, cin, kh, kw]        float32
};
cudaError_t launch_conv_wgrad(const ConvWgradArgs& a, cudaStream_t stream);

struct BnStatsArgs {
  DType dtype;
  const void* x;           // [rows, c] (NHWC pixels x channels)
  long long rows;
  int c;
  float* partials;         // [3, T, c], T = ceil(rows / kTileRows)
};
cudaError_t launch_bn_stats(const BnStatsArgs& a, cudaStream_t stream);

struct BnFinalizeArgs {
  const float* partials;   // [3, T, c]
  int tiles, c;
  const float* gamma;      // [c] or nullptr
  const float* beta;       // [c] or nullptr
  float eps;
  float* running_mean;     // [c] or nullptr (updated in place)
  float* running_var;      // [c] or nullptr
  float momentum;          // used when use_momentum
  bool use_momentum;       // false: factor = 1 / *num_batches_tracked
  const long long* num_batches_tracked;  // [] int64 or nullptr
  float* mean;             // [c]
  float* invstd;           // [c]
  float* scale;            // [c]
  float* shift;            // [c]
};
cudaError_t launch_bn_finalize(const BnFinalizeArgs& a, cudaStream_t stream);

struct BnBackwardArgs {
  DType dtype;
  const void* g;           // [rows, c]                  dtype
  const void* x;           // [rows, c]                  dtype
  const void* d_residual;  // [rows, c] or nullptr       dtype
  const float* mean;       // [c]
  const float* invstd;     // [c]
  const float* scale;      // [c]
  const float* sum_g;      // [c]
  const float* sum_gx;     // [c]
  bool training;
  long long rows;
  int c;
  float* coef;             // [3, c] scratch: A, B, C of dx = A*g + B*x + C
  void* dx;                // [rows, c]                  dtype
};
cudaError_t launch_bn_backward(const BnBackwardArgs& a, cudaStream_t stream);

}  // namespace preact_fused
