// torch.library registration of the preact_fused ops and their CUDA implementations.
//
// Schemas are preact_fused/contract.py's SCHEMAS, character for character. Each op takes logical
// NCHW tensors in any memory format (channels_last activations in the op's dtype are used as they
// are; others are made so), reads the weight in torch's layout and dtype, allocates its outputs
// (channels_last activations, float32 summaries / folds / sums / dW) with at::empty and makes
// exactly one kernel launch on the current stream: no packing, casting, zero-filling or reducing
// launches, no host synchronisation (CUDA-graph safe). Outputs an op does not produce are empty
// [0] tensors (preact_fused/cuda.py maps them to None).
// With PF_EMULATE (the CPU test build of tests/test_cuda_build.py) the same code registers CPU
// implementations under the namespace preact_fused_emu, running the kernels in csrc/emulate/.
#ifndef PF_EMULATE
#include <Python.h>
#endif

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#ifndef PF_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <torch/library.h>
#include <torch/version.h>

#include "launch.h"

namespace preact_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define PF_CHECK_CUDA(expr)                                                                          \
  do {                                                                                               \
    const cudaError_t pf_err_ = (expr);                                                              \
    TORCH_CHECK(pf_err_ == cudaSuccess, "preact_fused: ", #expr, " failed: ", cudaGetErrorString(pf_err_), \
                pf_err_ == cudaErrorNoKernelImageForDevice                                           \
                    ? " (rebuild with PREACT_FUSED_CUDA_ARCHS including this GPU's compute capability)"  \
                    : "");                                                                           \
  } while (0)

// Pixel rows per batch that the kernels index in int, with room for a tile's offsets past the last row.
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1 - 1024;

#ifdef PF_EMULATE
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
int multiprocessor_count() { return kEmulatedSMs; }
bool on_device(const Tensor& t) { return t.is_cpu(); }
int device_index(const Tensor&) { return 0; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
bool on_device(const Tensor& t) { return t.is_cuda(); }
int device_index(const Tensor& t) { return t.get_device(); }
#endif

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

DType to_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::kBFloat16 : (t == at::kHalf ? DType::kFloat16 : DType::kFloat32);
}

DType dtype_of(const Tensor& t, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), "preact_fused cuda backend: ", name, " has dtype ", t.scalar_type(),
              "; supported dtypes are float32, bfloat16 and float16 (use backend='reference' for float64)");
  return to_dtype(t.scalar_type());
}

void check_same_device(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "preact_fused: ", name, " is on ", t.device(), " but the input is on ",
              ref.device());
}

void check_activation(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 4, "preact_fused: ", name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(on_device(t), "preact_fused cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
  check_same_device(t, name, ref);
}

// Channels_last contiguous in dtype: the tensor itself when it already is (no copy, no launch).
Tensor nhwc(const Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
}

// Uninitialised output or scratch; the emulation build fills it with NaN so that an element the
// kernels fail to write shows up in the tests.
Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#ifdef PF_EMULATE
  if (t.is_floating_point()) t.fill_(std::numeric_limits<float>::quiet_NaN());
#endif
  return t;
}

Tensor placeholder(const Tensor& ref) { return at::empty({0}, ref.options().dtype(at::kFloat)); }

// A float32 statistics tensor [planes, c] (summary, fold, sums) as the kernels read it.
Tensor stats_tensor(const Tensor& t, int64_t planes, int64_t c, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == planes && t.size(1) == c, "preact_fused: ", name, " must have shape [",
              planes, ", ", c, "], got ", t.sizes());
  check_same_device(t, name, ref);
  TORCH_CHECK(t.is_floating_point(), "preact_fused: ", name, " must be float32, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// A per-channel parameter [c] in float32, bfloat16 or float16 (read as stored).
Tensor param_vector(const Tensor& v, int64_t c, const char* name, const Tensor& ref) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == c, "preact_fused: ", name, " must have shape [", c, "], got ", v.sizes());
  check_same_device(v, name, ref);
  TORCH_CHECK(is_float_type(v.scalar_type()), "preact_fused cuda backend: ", name, " has dtype ", v.scalar_type(),
              "; supported are float32, bfloat16 and float16");
  return v.contiguous();
}

// Zero-initialised int32 arrival counters for one launch: one workspace per (device, stream),
// allocated once (grown when too small). The kernels leave every counter zero again, so no launch
// needs a memset; launches on one stream run one after another, so they can share it.
int* counters(int64_t n, const Tensor& ref) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, Tensor> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& ws = cache[{device_index(ref), current_stream()}];
  if (!ws.defined() || ws.numel() < n) {
    const int64_t size = std::max<int64_t>({n, int64_t{4096}, ws.defined() ? 2 * ws.numel() : 0});
    ws = at::zeros({size}, ref.options().dtype(at::kInt));
  }
  return ws.data_ptr<int>();
}

int64_t conv_out(int64_t in, int64_t k, int64_t stride, int64_t pad) { return (in + 2 * pad - k) / stride + 1; }

void check_geometry(int64_t stride, int64_t padding) {
  TORCH_CHECK(stride >= 1, "preact_fused: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "preact_fused: padding must be >= 0, got ", padding);
}

ConvShape make_shape(const Tensor& x, int64_t cout, int64_t kh, int64_t kw, int64_t ho, int64_t wo, int64_t stride,
                     int64_t padding) {
  TORCH_CHECK(x.size(1) > 0 && cout > 0 && kh > 0 && kw > 0,
              "preact_fused: a convolution needs at least one input channel, output channel and tap; got input ",
              x.sizes(), ", ", cout, " output channels, kernel ", kh, "x", kw);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) <= kMaxRows && x.size(0) * ho * wo <= kMaxRows,
              "preact_fused: at most ", kMaxRows, " pixels per batch are supported");
  TORCH_CHECK(cout * x.size(1) * kh * kw < (int64_t{1} << 31), "preact_fused: weights of at most 2^31 elements");
  ConvShape s;
  s.n = static_cast<int>(x.size(0));
  s.cin = static_cast<int>(x.size(1));
  s.h = static_cast<int>(x.size(2));
  s.w = static_cast<int>(x.size(3));
  s.cout = static_cast<int>(cout);
  s.kh = static_cast<int>(kh);
  s.kw = static_cast<int>(kw);
  s.ho = static_cast<int>(ho);
  s.wo = static_cast<int>(wo);
  s.stride = static_cast<int>(stride);
  s.pad = static_cast<int>(padding);
  return s;
}

// The weight as the kernels read it: in its dtype and layout when its taps (kh, kw) form one
// linear index (NCHW-contiguous or channels_last weights: no copy), else a contiguous copy.
Tensor weight_tensor(const Tensor& weight, const Tensor& ref) {
  check_same_device(weight, "weight", ref);
  TORCH_CHECK(is_float_type(weight.scalar_type()), "preact_fused cuda backend: weight has dtype ",
              weight.scalar_type(), "; supported are float32, bfloat16 and float16");
  const bool taps_linear = weight.size(2) == 1 || weight.stride(2) == weight.size(3) * weight.stride(3);
  const bool dense = weight.is_contiguous() || weight.is_contiguous(at::MemoryFormat::ChannelsLast);
  return taps_linear && dense ? weight : weight.contiguous();
}

WeightStrides weight_strides(const Tensor& w) {
  const int64_t tap = w.size(2) == 1 && w.size(3) == 1 ? 1 : (w.size(3) == 1 ? w.stride(2) : w.stride(3));
  return {static_cast<int>(w.stride(0)), static_cast<int>(w.stride(1)), static_cast<int>(tap)};
}

// The BatchNorm arguments of conv_fwd / bn_fold (contract.py's four forms) for c channels; the
// tensors the kernel reads are kept alive in `keep`.
BnFoldArgs make_bn(const OptTensor& stats, const OptTensor& fold, const OptTensor& gamma, const OptTensor& beta,
                   const OptTensor& running_mean, const OptTensor& running_var,
                   const OptTensor& num_batches_tracked, double eps, std::optional<double> momentum,
                   bool update_running, int64_t c, const Tensor& ref, std::vector<Tensor>& keep) {
  BnFoldArgs b{};
  b.c = static_cast<int>(c);
  b.eps = static_cast<float>(eps);
  if (fold.has_value()) {
    keep.push_back(stats_tensor(*fold, 4, c, "fold", ref));
    b.source = BnSource::kFold;
    b.fold = keep.back().data_ptr<float>();
    return b;
  }
  if (!stats.has_value() && !running_mean.has_value()) return b;
  if (gamma.has_value()) {
    keep.push_back(param_vector(*gamma, c, "gamma", ref));
    b.gamma = keep.back().data_ptr();
    b.gamma_dtype = to_dtype(keep.back().scalar_type());
  }
  if (beta.has_value()) {
    keep.push_back(param_vector(*beta, c, "beta", ref));
    b.beta = keep.back().data_ptr();
    b.beta_dtype = to_dtype(keep.back().scalar_type());
  }
  const bool update = stats.has_value() && update_running;
  if (!stats.has_value() || update) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "preact_fused: ",
                update ? "update_running needs running_mean and running_var"
                       : "running statistics need both running_mean and running_var");
    const Tensor& rm = *running_mean;
    const Tensor& rv = *running_var;
    for (const Tensor* t : {&rm, &rv}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == c && t->is_contiguous(), "preact_fused: running statistics must be ",
                  "contiguous [", c, "], got ", t->sizes());
      check_same_device(*t, "running statistics", ref);
      TORCH_CHECK(is_float_type(t->scalar_type()), "preact_fused cuda backend: running statistics have dtype ",
                  t->scalar_type(), "; supported are float32, bfloat16 and float16");
    }
    TORCH_CHECK(rm.scalar_type() == rv.scalar_type(), "preact_fused: running_mean and running_var dtypes differ");
    b.running_mean = rm.data_ptr();
    b.running_var = rv.data_ptr();
    b.running_dtype = to_dtype(rm.scalar_type());
  }
  if (stats.has_value()) {
    keep.push_back(stats_tensor(*stats, 4, c, "stats", ref));
    b.source = BnSource::kStats;
    b.stats = keep.back().data_ptr<float>();
    b.update_running = update_running;
    if (update_running) {
      b.use_momentum = momentum.has_value();
      b.momentum = momentum.has_value() ? static_cast<float>(*momentum) : 0.f;
      b.one_minus_momentum = momentum.has_value() ? static_cast<float>(1.0 - *momentum) : 0.f;
      if (num_batches_tracked.has_value()) {
        const Tensor& nbt = *num_batches_tracked;
        TORCH_CHECK(nbt.numel() == 1 && nbt.scalar_type() == at::kLong, "preact_fused: num_batches_tracked must be ",
                    "a one-element int64 tensor, got ", nbt.scalar_type(), " ", nbt.sizes());
        check_same_device(nbt, "num_batches_tracked", ref);
        b.num_batches_tracked = reinterpret_cast<long long*>(nbt.data_ptr<int64_t>());
      } else {
        TORCH_CHECK(momentum.has_value(),
                    "preact_fused: momentum=None needs num_batches_tracked for the cumulative average");
      }
    }
  } else {
    b.source = BnSource::kRunning;
  }
  return b;
}

std::tuple<Tensor, Tensor, Tensor> conv_fwd(const Tensor& x_in, const Tensor& weight_in, int64_t stride,
                                            int64_t padding, const OptTensor& stats, const OptTensor& fold,
                                            const OptTensor& gamma, const OptTensor& beta,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            const OptTensor& num_batches_tracked, double eps,
                                            std::optional<double> momentum, bool update_running,
                                            const OptTensor& residual_in, bool want_stats) {
  check_activation(x_in, "x", x_in);
  check_geometry(stride, padding);
  TORCH_CHECK(weight_in.dim() == 4 && weight_in.size(1) == x_in.size(1), "preact_fused: weight shape ",
              weight_in.sizes(), " does not match input channels ", x_in.size(1));
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const Tensor weight = weight_tensor(weight_in, x);
  const int64_t cin = x.size(1), cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t ho = conv_out(x.size(2), kh, stride, padding), wo = conv_out(x.size(3), kw, stride, padding);
  TORCH_CHECK(ho > 0 && wo > 0, "preact_fused: empty convolution output for input ", x.sizes(), " and kernel ",
              weight.sizes());
  ConvFwdArgs a{};
  a.s = make_shape(x, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  std::vector<Tensor> keep;
  a.bn = make_bn(stats, fold, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum,
                 update_running, cin, x, keep);
  const bool folds = a.bn.source == BnSource::kStats || a.bn.source == BnSource::kRunning;
  Tensor residual;
  if (residual_in.has_value()) {
    check_activation(*residual_in, "residual", x);
    TORCH_CHECK(residual_in->sizes() == at::IntArrayRef({x.size(0), cout, ho, wo}), "preact_fused: residual shape ",
                residual_in->sizes(), " does not match the output [", x.size(0), ", ", cout, ", ", ho, ", ", wo, "]");
    residual = nhwc(*residual_in, x.scalar_type());
  }
  const int64_t rows = x.size(0) * ho * wo;
  Tensor y = new_tensor({x.size(0), cout, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  Tensor stats_out = want_stats ? new_tensor({4, cout}, x.options().dtype(at::kFloat)) : placeholder(x);
  Tensor fold_out = folds ? new_tensor({4, cin}, x.options().dtype(at::kFloat)) : placeholder(x);
  a.bn.fold_out = folds ? fold_out.data_ptr<float>() : nullptr;
  if (rows == 0) {  // empty batch: no convolution; the fold (and running update) still happen
    if (want_stats) stats_out.zero_();
    if (folds) PF_CHECK_CUDA(launch_bn_fold(a.bn, current_stream()));
    return {y, stats_out, fold_out};
  }
  a.tile_rows = conv_tile_rows(rows, static_cast<int>(cout), multiprocessor_count());
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.weight_dtype = to_dtype(weight.scalar_type());
  a.w_strides = weight_strides(weight);
  a.residual = residual.defined() ? residual.data_ptr() : nullptr;
  a.y = y.data_ptr();
  Tensor ws;
  if (want_stats) {
    ws = new_tensor({conv_tree_floats(rows, static_cast<int>(cout), a.tile_rows, 4)}, x.options().dtype(at::kFloat));
    a.stats = stats_out.data_ptr<float>();
    a.ws = ws.data_ptr<float>();
    a.counters = counters(conv_tree_counters(rows, static_cast<int>(cout), a.tile_rows), x);
  }
  PF_CHECK_CUDA(launch_conv_fwd(a, current_stream()));
  return {y, stats_out, fold_out};
}

Tensor bn_stats(const Tensor& x_in) {
  check_activation(x_in, "x", x_in);
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const int64_t rows = x.size(0) * x.size(2) * x.size(3), c = x.size(1);
  Tensor stats = new_tensor({4, c}, x.options().dtype(at::kFloat));
  if (rows == 0 || c == 0) return stats.zero_();
  TORCH_CHECK(rows <= kMaxRows * int64_t{64}, "preact_fused: bn_stats supports at most ", kMaxRows * int64_t{64},
              " rows");
  Tensor ws = new_tensor({bn_stats_floats(rows, static_cast<int>(c))}, x.options().dtype(at::kFloat));
  BnStatsArgs a{};
  a.dtype = dt;
  a.x = x.data_ptr();
  a.rows = rows;
  a.c = static_cast<int>(c);
  a.stats = stats.data_ptr<float>();
  a.ws = ws.data_ptr<float>();
  a.counters = counters(bn_stats_counters(rows, static_cast<int>(c)), x);
  PF_CHECK_CUDA(launch_bn_stats(a, current_stream()));
  return stats;
}

Tensor bn_fold(const OptTensor& stats, const OptTensor& gamma, const OptTensor& beta, const OptTensor& running_mean,
               const OptTensor& running_var, const OptTensor& num_batches_tracked, double eps,
               std::optional<double> momentum, bool update_running) {
  TORCH_CHECK(stats.has_value() || running_mean.has_value(),
              "preact_fused: bn_fold needs stats or the running statistics");
  const Tensor& ref = stats.has_value() ? *stats : *running_mean;
  TORCH_CHECK(on_device(ref), "preact_fused cuda backend: bn_fold's tensors must be CUDA tensors, got ", ref.device());
  const int64_t c = stats.has_value() ? stats->size(-1) : running_mean->size(0);
  const DeviceGuard guard(ref.device());
  std::vector<Tensor> keep;
  BnFoldArgs b = make_bn(stats, std::nullopt, gamma, beta, running_mean, running_var, num_batches_tracked, eps,
                         momentum, update_running, c, ref, keep);
  Tensor out = new_tensor({4, c}, ref.options().dtype(at::kFloat));
  b.fold_out = out.data_ptr<float>();
  PF_CHECK_CUDA(launch_bn_fold(b, current_stream()));
  return out;
}

std::tuple<Tensor, Tensor> conv_dgrad(const Tensor& dy_in, const Tensor& weight_in, const Tensor& x_in,
                                      int64_t stride, int64_t padding, const OptTensor& fold_in) {
  check_activation(dy_in, "dy", dy_in);
  check_activation(x_in, "x", dy_in);
  check_geometry(stride, padding);
  TORCH_CHECK(weight_in.dim() == 4 && weight_in.size(0) == dy_in.size(1) && weight_in.size(1) == x_in.size(1),
              "preact_fused: weight shape ", weight_in.sizes(), " does not match dy ", dy_in.sizes(), " and x ",
              x_in.sizes());
  const DType dt = dtype_of(dy_in, "dy");
  const DeviceGuard guard(dy_in.device());
  const Tensor dy = nhwc(dy_in, dy_in.scalar_type());
  const Tensor weight = weight_tensor(weight_in, dy);
  const int64_t n = x_in.size(0), cin = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t ho = conv_out(h, kh, stride, padding), wo = conv_out(w, kw, stride, padding);
  TORCH_CHECK(ho > 0 && wo > 0, "preact_fused: empty convolution output for input ", x_in.sizes(), " and kernel ",
              weight.sizes());
  TORCH_CHECK(dy.size(0) == n && dy.size(2) == ho && dy.size(3) == wo, "preact_fused: dy shape ", dy.sizes(),
              " does not match the convolution of x ", x_in.sizes(), " (expected [", n, ", ", cout, ", ", ho, ", ", wo,
              "])");
  ConvDgradArgs a{};
  a.s = make_shape(x_in, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  Tensor g = new_tensor({n, cin, h, w}, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const bool bn = fold_in.has_value();
  Tensor sums = bn ? new_tensor({3, cin}, dy.options().dtype(at::kFloat)) : placeholder(dy);
  const int64_t rows = n * h * w;
  if (rows == 0) {
    if (bn) sums.zero_();
    return {g, sums};
  }
  a.tile_rows = conv_tile_rows(rows, static_cast<int>(cin), multiprocessor_count());
  a.dy = dy.data_ptr();
  a.weight = weight.data_ptr();
  a.weight_dtype = to_dtype(weight.scalar_type());
  a.w_strides = weight_strides(weight);
  a.g = g.data_ptr();
  Tensor x, fold, ws;
  if (bn) {
    x = nhwc(x_in, dy.scalar_type());
    fold = stats_tensor(*fold_in, 4, cin, "fold", dy);
    ws = new_tensor({conv_tree_floats(rows, static_cast<int>(cin), a.tile_rows, 2)}, dy.options().dtype(at::kFloat));
    a.x = x.data_ptr();
    a.fold = fold.data_ptr<float>();
    a.sums = sums.data_ptr<float>();
    a.ws = ws.data_ptr<float>();
    a.counters = counters(conv_tree_counters(rows, static_cast<int>(cin), a.tile_rows), dy);
  }
  PF_CHECK_CUDA(launch_conv_dgrad(a, current_stream()));
  return {g, sums};
}

// The BatchNorm whose backward gives conv_wgrad_bn_backward's dy: its input, fold and sums.
struct NextBn {
  const Tensor& x;
  const Tensor& fold;
  const Tensor& sums;
  double count;
  bool training;
};

// conv_wgrad, and with `next` conv_wgrad_bn_backward (dy_in is then the next BN's g): (dW, the dy
// computed, or an empty placeholder).
std::tuple<Tensor, Tensor> wgrad(const Tensor& x_in, const Tensor& dy_in, const Tensor& weight, int64_t stride,
                                 int64_t padding, const OptTensor& fold_in, const NextBn* next) {
  const char* dy_name = next != nullptr ? "g" : "dy";
  check_activation(x_in, "x", x_in);
  check_activation(dy_in, dy_name, x_in);
  check_geometry(stride, padding);
  const at::IntArrayRef weight_shape = weight.sizes();
  TORCH_CHECK(weight_shape.size() == 4 && weight_shape[1] == x_in.size(1) && weight_shape[0] == dy_in.size(1),
              "preact_fused: weight ", weight_shape, " does not match x ", x_in.sizes(), " and ", dy_name, " ",
              dy_in.sizes());
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const Tensor dy = nhwc(dy_in, x_in.scalar_type());
  const int64_t cout = weight_shape[0], cin = weight_shape[1], kh = weight_shape[2], kw = weight_shape[3];
  const int64_t ho = conv_out(x.size(2), kh, stride, padding), wo = conv_out(x.size(3), kw, stride, padding);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == ho && dy.size(3) == wo, "preact_fused: ", dy_name, " shape ",
              dy.sizes(), " does not match the convolution of x ", x.sizes());
  ConvWgradArgs a{};
  a.s = make_shape(x, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  // dW in the weight's memory format (contract.weight_grad_like): autograd accumulates it without a copy.
  Tensor dw = at::empty_like(weight, weight.options().dtype(at::kFloat), at::MemoryFormat::Preserve);
  TORCH_CHECK(dw.numel() < (int64_t{1} << 31), "preact_fused: a weight of ", dw.numel(), " elements (at most 2^31 - 1)");
  Tensor bn_x, bn_fold, bn_sums, dy_out = placeholder(x);
  if (next != nullptr) {
    check_activation(next->x, "bn_x", x_in);
    TORCH_CHECK(next->x.sizes() == dy_in.sizes(), "preact_fused: bn_x shape ", next->x.sizes(), " != g shape ",
                dy_in.sizes());
    TORCH_CHECK(next->x.scalar_type() == x_in.scalar_type() && dy_in.scalar_type() == x_in.scalar_type(),
                "preact_fused: conv_wgrad_bn_backward needs x, g and bn_x of one dtype, got ", x_in.scalar_type(), ", ",
                dy_in.scalar_type(), " and ", next->x.scalar_type());
    bn_fold = stats_tensor(next->fold, 4, cout, "bn_fold", x);
    if (next->training) {
      bn_x = nhwc(next->x, x_in.scalar_type());
      bn_sums = stats_tensor(next->sums, 3, cout, "bn_sums", x);
    }
    dy_out = new_tensor(dy_in.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
    a.bn_x = bn_x.defined() ? bn_x.data_ptr() : nullptr;
    a.bn_fold = bn_fold.data_ptr<float>();
    a.bn_sums = bn_sums.defined() ? bn_sums.data_ptr<float>() : nullptr;
    a.bn_count = static_cast<float>(next->count);
    a.bn_training = next->training;
    a.dy_out = dy_out.data_ptr();
  }
  if (x.size(0) * ho * wo == 0) return {dw.zero_(), dy_out};
  for (int d = 0; d < 4; ++d) a.dw_stride[d] = dw.stride(d);
  Tensor fold, part;
  if (fold_in.has_value()) fold = stats_tensor(*fold_in, 4, cin, "fold", x);
  a.splits = conv_wgrad_splits(a.s, dt, multiprocessor_count());
  if (a.splits > 1) {
    part = new_tensor({a.splits, cout, kh * kw * cin}, x.options().dtype(at::kFloat));
    a.partials = part.data_ptr<float>();
    a.counters = counters(conv_wgrad_tiles(a.s), x);
  }
  a.x = x.data_ptr();
  a.dy = dy.data_ptr();
  a.fold = fold.defined() ? fold.data_ptr<float>() : nullptr;
  a.dw = dw.data_ptr<float>();
  PF_CHECK_CUDA(launch_conv_wgrad(a, current_stream()));
  return {dw, dy_out};
}

Tensor conv_wgrad(const Tensor& x_in, const Tensor& dy_in, const Tensor& weight, int64_t stride, int64_t padding,
                  const OptTensor& fold_in) {
  return std::get<0>(wgrad(x_in, dy_in, weight, stride, padding, fold_in, nullptr));
}

std::tuple<Tensor, Tensor> conv_wgrad_bn_backward(const Tensor& x_in, const Tensor& g_in, const Tensor& weight,
                                                  int64_t stride, int64_t padding, const OptTensor& fold_in,
                                                  const Tensor& bn_x, const Tensor& bn_fold, const Tensor& bn_sums,
                                                  double count, bool training) {
  const NextBn next{bn_x, bn_fold, bn_sums, count, training};
  return wgrad(x_in, g_in, weight, stride, padding, fold_in, &next);
}

Tensor bn_backward(const Tensor& g_in, const Tensor& x_in, const Tensor& fold_in, const Tensor& sums_in,
                   double count, bool training, const OptTensor& d_residual_in) {
  check_activation(x_in, "x", x_in);
  check_activation(g_in, "g", x_in);
  TORCH_CHECK(g_in.sizes() == x_in.sizes(), "preact_fused: g shape ", g_in.sizes(), " != x shape ", x_in.sizes());
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const Tensor g = nhwc(g_in, x_in.scalar_type());
  const int64_t c = x.size(1);
  Tensor d_res;
  if (d_residual_in.has_value()) {
    check_activation(*d_residual_in, "d_residual", x_in);
    TORCH_CHECK(d_residual_in->sizes() == x_in.sizes(), "preact_fused: d_residual shape ", d_residual_in->sizes(),
                " != x shape ", x_in.sizes());
    d_res = nhwc(*d_residual_in, x_in.scalar_type());
  }
  const Tensor fold = stats_tensor(fold_in, 4, c, "fold", x);
  const Tensor sums = training ? stats_tensor(sums_in, 3, c, "sums", x) : Tensor();
  Tensor dx = new_tensor(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  BnBackwardArgs a{};
  a.dtype = dt;
  a.g = g.data_ptr();
  a.x = x.data_ptr();
  a.d_residual = d_res.defined() ? d_res.data_ptr() : nullptr;
  a.fold = fold.data_ptr<float>();
  a.sums = training ? sums.data_ptr<float>() : nullptr;
  a.count = static_cast<float>(count);
  a.training = training;
  a.rows = x.size(0) * x.size(2) * x.size(3);
  a.c = static_cast<int>(c);
  a.dx = dx.data_ptr();
  PF_CHECK_CUDA(launch_bn_backward(a, current_stream()));
  return dx;
}

// The schemas of preact_fused/contract.py (SCHEMAS), verbatim.
void define_ops(torch::Library& m) {
  m.def("conv_fwd(Tensor x, Tensor weight, int stride, int padding, Tensor? stats, Tensor? fold, "
        "Tensor? gamma, Tensor? beta, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, float eps, float? momentum, bool update_running, "
        "Tensor? residual, bool want_stats) -> (Tensor, Tensor, Tensor)");
  m.def("bn_stats(Tensor x) -> Tensor");
  m.def("bn_fold(Tensor? stats, Tensor? gamma, Tensor? beta, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float eps, float? momentum, "
        "bool update_running) -> Tensor");
  m.def("conv_dgrad(Tensor dy, Tensor weight, Tensor x, int stride, int padding, Tensor? fold) "
        "-> (Tensor, Tensor)");
  m.def("conv_wgrad(Tensor x, Tensor dy, Tensor weight, int stride, int padding, Tensor? fold) "
        "-> Tensor");
  m.def("bn_backward(Tensor g, Tensor x, Tensor fold, Tensor sums, float count, bool training, "
        "Tensor? d_residual) -> Tensor");
  m.def("conv_wgrad_bn_backward(Tensor x, Tensor g, Tensor weight, int stride, int padding, Tensor? fold, "
        "Tensor bn_x, Tensor bn_fold, Tensor bn_sums, float count, bool training) -> (Tensor, Tensor)");
}

void impl_ops(torch::Library& m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_fold", &bn_fold);
  m.impl("conv_dgrad", &conv_dgrad);
  m.impl("conv_wgrad", &conv_wgrad);
  m.impl("bn_backward", &bn_backward);
  m.impl("conv_wgrad_bn_backward", &conv_wgrad_bn_backward);
}

}  // namespace

#ifdef PF_EMULATE
TORCH_LIBRARY(preact_fused_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(preact_fused_emu, CPU, m) { impl_ops(m); }
// The emulator's kernel-launch counter (tests: each op call is one launch).
TORCH_LIBRARY(preact_fused_emu_debug, m) {
  m.def("launches() -> int", []() -> int64_t { return ::emu::launches(); });
  m.def("wgrad_splits(Tensor x, int[] weight_shape, int stride, int padding) -> int",
        [](const Tensor& x, at::IntArrayRef ws, int64_t stride, int64_t padding) -> int64_t {
          const int64_t ho = conv_out(x.size(2), ws[2], stride, padding), wo = conv_out(x.size(3), ws[3], stride, padding);
          const ConvShape s = make_shape(x, ws[0], ws[2], ws[3], ho, wo, stride, padding);
          return conv_wgrad_splits(s, dtype_of(x, "x"), multiprocessor_count());
        });
}
#else
TORCH_LIBRARY(preact_fused, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(preact_fused, CUDA, m) { impl_ops(m); }
#endif

}  // namespace preact_fused

#ifndef PF_EMULATE
// `import preact_fused._C` loads the library (registering the ops above) and tells which torch
// and CUDA it was built against.
static struct PyModuleDef preact_fused_module = {PyModuleDef_HEAD_INIT, "_C",
                                                 "Compiled CUDA ops of preact_fused (registered as torch.ops.preact_fused)",
                                                 -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&preact_fused_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "torch_version_major", TORCH_VERSION_MAJOR) < 0 ||
      PyModule_AddIntConstant(module, "torch_version_minor", TORCH_VERSION_MINOR) < 0 ||
      PyModule_AddIntConstant(module, "cuda_runtime_version", CUDART_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif  // PF_EMULATE
