// Host-side interface between the torch bindings (bindings.cpp) and the kernels (*.cu).
//
// Nothing here includes torch: the .cu files compile against CUDA headers only. Every tensor is
// passed as a raw pointer with its layout spelled out in the comment beside it. Activations are
// NHWC (channels_last contiguous); summaries, folds, sums and dW are float32 (the statistics dtype
// of preact_fused/contract.py). Each launcher makes exactly one kernel launch (none for an empty
// problem) and returns the cudaError_t of it.
//
// In-launch reductions (statistics, sums, split-K) use a workspace of int32 arrival counters that
// must be zero before the launch and that the kernels leave zero again: a block that finds itself
// the last of a group to arrive (atomicAdd after __threadfence) merges the group's partial results
// in a fixed order and resets the counter. The bindings keep one zero-initialised workspace per
// (device, stream), so no launch needs a memset.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace preact_fused {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Partial results merged per group of kTreeGroup tiles, then the groups in order (two levels).
constexpr int kTreeGroup = 32;
// Arrival counters of a tree over `tiles` partial results: one per group and one for the groups.
inline int tree_counters(int tiles) { return ceil_div(tiles, kTreeGroup) + 1; }

// Column tile (output channels per block) of the forward / dgrad implicit GEMM for `cols` columns.
inline int conv_tile_cols(int cols) { return cols <= 16 ? 16 : (cols <= 32 ? 32 : 64); }

// The BatchNorm fold the conv loader applies (contract.py's four forms), or its producer bn_fold.
enum class BnSource : int { kNone = 0, kStats = 1, kFold = 2, kRunning = 3 };

struct BnFoldArgs {
  BnSource source = BnSource::kNone;
  int c = 0;                          // channels
  const float* stats = nullptr;       // [4, c] count, pivot, offset, M2           (kStats)
  const float* fold = nullptr;        // [4, c] mean, invstd, scale, shift        (kFold)
  void* running_mean = nullptr;       // [c] running_dtype: read (kRunning), updated (kStats + update)
  void* running_var = nullptr;        // [c]
  DType running_dtype = DType::kFloat32;
  const void* gamma = nullptr;        // [c] gamma_dtype or nullptr
  DType gamma_dtype = DType::kFloat32;
  const void* beta = nullptr;         // [c] beta_dtype or nullptr
  DType beta_dtype = DType::kFloat32;
  float eps = 1e-5f;
  bool update_running = false;        // kStats only
  bool use_momentum = true;           // false: factor 1 / num_batches_tracked (after the increment)
  float momentum = 0.1f;              // momentum rounded to float
  float one_minus_momentum = 0.9f;    // (1 - momentum) computed in double, rounded to float
  long long* num_batches_tracked = nullptr;  // [] int64 or nullptr, incremented with the update
  float* fold_out = nullptr;          // [4, c] written (by one block) when not nullptr
};

// Geometry of one convolution, stride and padding equal in both dimensions.
struct ConvShape {
  int n, h, w, cin;     // input x [n, h, w, cin]
  int cout, kh, kw;     // weight [cout, cin, kh, kw]
  int ho, wo;           // output [n, ho, wo, cout]
  int stride, pad;
};

// Element strides of torch's weight [cout, cin, kh, kw]: (kh, kw) must be one linear tap index
// kh*KW + kw of stride `tap` (true of NCHW-contiguous and channels_last weights).
struct WeightStrides {
  int co, ci, tap;
};

// Rows per block of the forward / dgrad GEMM: 128, or 64 when 128 would give under one block per
// multiprocessor.
int conv_tile_rows(long long rows, int cols, int num_sms);

// Workspace of conv_fwd (want_stats) / conv_dgrad (fold given) for a GEMM of `rows` x `cols`:
// floats of the tile results and int32 arrival counters.
long long conv_tree_floats(long long rows, int cols, int tile_rows, int planes);
long long conv_tree_counters(long long rows, int cols, int tile_rows);

struct ConvFwdArgs {
  ConvShape s;
  DType dtype;
  int tile_rows;           // conv_tile_rows(...)
  const void* x;           // [n, h, w, cin]            dtype
  const void* weight;      // [cout, cin, kh, kw]       weight_dtype, strides w_strides
  DType weight_dtype;
  WeightStrides w_strides;
  BnFoldArgs bn;           // the loader's BatchNorm (c = cin); kNone: identity
  const void* residual;    // [n, ho, wo, cout] or nullptr
  void* y;                 // [n, ho, wo, cout]          dtype
  float* stats;            // [4, cout] summary of y as stored, or nullptr
  float* ws;               // conv_tree_floats(.., 4) floats, when stats
  int* counters;           // conv_tree_counters(..) zeroed int32, when stats
};
cudaError_t launch_conv_fwd(const ConvFwdArgs& a, cudaStream_t stream);

struct ConvDgradArgs {
  ConvShape s;
  DType dtype;
  int tile_rows;
  const void* dy;          // [n, ho, wo, cout]          dtype
  const void* weight;      // [cout, cin, kh, kw]        weight_dtype, strides w_strides
  DType weight_dtype;
  WeightStrides w_strides;
  const void* x;           // [n, h, w, cin] pre-BN input (read only with fold)
  const float* fold;       // [4, cin] or nullptr (then g = da, no sums)
  void* g;                 // [n, h, w, cin]             dtype
  float* sums;             // [3, cin] sum_g, sum_gx, sum_gx * invstd, with fold
  float* ws;               // conv_tree_floats(.., 2) floats, with fold
  int* counters;           // conv_tree_counters(..) zeroed int32, with fold
};
cudaError_t launch_conv_dgrad(const ConvDgradArgs& a, cudaStream_t stream);

// Split-K plan of the weight gradient: the number of pixel slices whose partial dW are summed
// (in the same launch, in slice order).
int conv_wgrad_splits(const ConvShape& s, DType dtype, int num_sms);
// Output tiles of the weight-gradient GEMM (arrival counters needed when splits > 1).
int conv_wgrad_tiles(const ConvShape& s);

struct ConvWgradArgs {
  ConvShape s;
  DType dtype;
  const void* x;           // [n, h, w, cin]             dtype
  const void* dy;          // [n, ho, wo, cout]          dtype
  const float* fold;       // [4, cin] or nullptr (identity loader)
  // conv_wgrad_bn_backward: dy above is the next BatchNorm's masked gradient g, and the kernel
  // uses and stores dy = bn_backward(g, bn_x, bn_fold, bn_sums, bn_count, bn_training)
  const void* bn_x;        // [n, ho, wo, cout]          dtype, read in training; else nullptr
  const float* bn_fold;    // [4, cout], or nullptr (plain conv_wgrad)
  const float* bn_sums;    // [3, cout] (training)
  float bn_count;
  bool bn_training;
  void* dy_out;            // [n, ho, wo, cout]          dtype
  int splits;              // from conv_wgrad_splits
  float* partials;         // [splits, cout, kh*kw*cin] scratch when splits > 1
  int* counters;           // conv_wgrad_tiles zeroed int32 when splits > 1
  float* dw;               // [cout, cin, kh, kw]        float32, strides dw_stride
  long long dw_stride[4];  // dW's strides (elements): the weight's memory format
};
cudaError_t launch_conv_wgrad(const ConvWgradArgs& a, cudaStream_t stream);

// bn_stats: per row tile of kStatsTileRows rows and 32 channels a summary, merged in the launch.
constexpr int kStatsTileRows = 128;
long long bn_stats_floats(long long rows, int c);
long long bn_stats_counters(long long rows, int c);

struct BnStatsArgs {
  DType dtype;
  const void* x;           // [rows, c] (NHWC pixels x channels)
  long long rows;
  int c;
  float* stats;            // [4, c]
  float* ws;               // bn_stats_floats floats
  int* counters;           // bn_stats_counters zeroed int32
};
cudaError_t launch_bn_stats(const BnStatsArgs& a, cudaStream_t stream);

// bn_fold: the fold [4, c] of a.bn (kStats or kRunning) into a.bn.fold_out, running update.
cudaError_t launch_bn_fold(const BnFoldArgs& a, cudaStream_t stream);

struct BnBackwardArgs {
  DType dtype;
  const void* g;           // [rows, c]                  dtype
  const void* x;           // [rows, c]                  dtype
  const void* d_residual;  // [rows, c] or nullptr       dtype
  const float* fold;       // [4, c] mean, invstd, scale, shift
  const float* sums;       // [3, c] sum_g, sum_gx, dgamma (training)
  float count;
  bool training;
  long long rows;
  int c;
  void* dx;                // [rows, c]                  dtype
};
cudaError_t launch_bn_backward(const BnBackwardArgs& a, cudaStream_t stream);

}  // namespace preact_fused
