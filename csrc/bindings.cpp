// torch.library registration of the preact_fused ops and their CUDA implementations.
//
// Schemas follow preact_fused/reference.py; optional tensors are `Tensor?`. Each op takes logical
// NCHW tensors in any memory format, makes the activations channels_last contiguous, packs the
// weight for the kernel, allocates its outputs (channels_last activations, float32 statistics)
// and launches on the current stream. No host synchronisation anywhere (CUDA-graph safe).
// Where the reference returns None, the op returns an empty tensor; preact_fused/cuda.py maps it
// back to None.
// With PF_EMULATE (the CPU test build of tests/test_cuda_build.py) the same code registers CPU
// implementations under the namespace preact_fused_emu, running the kernels in csrc/emulate/.
#ifndef PF_EMULATE
#include <Python.h>
#endif

#include <limits>
#include <optional>
#include <tuple>

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
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
bool on_device(const Tensor& t) { return t.is_cuda(); }
#endif

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "preact_fused cuda backend: ", name, " has dtype ", t.scalar_type(),
                  "; supported dtypes are float32, bfloat16 and float16 (use backend='reference' for float64)");
  }
  return DType::kFloat32;
}

void check_activation(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 4, "preact_fused: ", name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(on_device(t), "preact_fused cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "preact_fused: ", name, " is on ", t.device(), " but the input is on ",
              ref.device());
}

Tensor nhwc(const Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
}

// A per-channel float32 vector [c], contiguous, on ref's device.
Tensor channel_vector(const Tensor& v, int64_t c, const char* name, const Tensor& ref) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == c, "preact_fused: ", name, " must have shape [", c, "], got ", v.sizes());
  TORCH_CHECK(v.device() == ref.device(), "preact_fused: ", name, " is on ", v.device(), " but the input is on ",
              ref.device());
  return v.to(at::kFloat).contiguous();
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

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

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
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) <= kMaxRows && x.size(0) * ho * wo <= kMaxRows,
              "preact_fused: at most ", kMaxRows, " pixels per batch are supported");
  return s;
}

// [rows_pad, k_pad] with rows_pad = cols tile multiple, k_pad = reduction tile multiple, zero padded;
// `mat` [rows, k] is the weight already permuted to (row, k) order.
Tensor pack_weight(const Tensor& mat, DType dtype) {
  const int64_t rows = mat.size(0), k = mat.size(1);
  const int64_t bn = conv_tile_cols(static_cast<int>(rows)), bk = conv_tile_k(dtype);
  const int64_t rows_pad = (rows + bn - 1) / bn * bn, k_pad = (k + bk - 1) / bk * bk;
  Tensor packed = at::zeros({rows_pad, k_pad}, mat.options());
  packed.narrow(0, 0, rows).narrow(1, 0, k).copy_(mat);
  return packed;
}

std::tuple<Tensor, Tensor> conv_fwd(const Tensor& x_in, const Tensor& weight, int64_t stride, int64_t padding,
                                    const OptTensor& scale_in, const OptTensor& shift_in, const OptTensor& residual_in,
                                    bool want_stats) {
  check_activation(x_in, "x", x_in);
  check_geometry(stride, padding);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x_in.size(1), "preact_fused: weight shape ", weight.sizes(),
              " does not match input channels ", x_in.size(1));
  TORCH_CHECK(scale_in.has_value() == shift_in.has_value(), "preact_fused: scale and shift go together");
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t ho = conv_out(x.size(2), kh, stride, padding), wo = conv_out(x.size(3), kw, stride, padding);
  TORCH_CHECK(ho > 0 && wo > 0, "preact_fused: empty convolution output for input ", x.sizes(), " and kernel ",
              weight.sizes());
  ConvFwdArgs a{};
  a.s = make_shape(x, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  const Tensor w = weight.to(x.device(), x.scalar_type()).permute({0, 2, 3, 1}).reshape({cout, kh * kw * x.size(1)});
  const Tensor wp = pack_weight(w, dt);
  a.w_packed = wp.data_ptr();
  a.k_pad = static_cast<int>(wp.size(1));
  Tensor scale, shift, residual;
  if (scale_in.has_value()) {
    scale = channel_vector(*scale_in, x.size(1), "scale", x);
    shift = channel_vector(*shift_in, x.size(1), "shift", x);
  }
  if (residual_in.has_value()) {
    check_activation(*residual_in, "residual", x);
    TORCH_CHECK(residual_in->sizes() == at::IntArrayRef({x.size(0), cout, ho, wo}), "preact_fused: residual shape ",
                residual_in->sizes(), " does not match the output [", x.size(0), ", ", cout, ", ", ho, ", ", wo, "]");
    residual = nhwc(*residual_in, x.scalar_type());
  }
  Tensor y = new_tensor({x.size(0), cout, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t tiles = want_stats ? (x.size(0) * ho * wo + kTileRows - 1) / kTileRows : 0;
  Tensor partials = new_tensor({3, tiles, cout}, x.options().dtype(at::kFloat));
  a.x = x.data_ptr();
  a.scale = fptr(scale);
  a.shift = fptr(shift);
  a.residual = residual.defined() ? residual.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.partials = want_stats ? partials.data_ptr<float>() : nullptr;
  PF_CHECK_CUDA(launch_conv_fwd(a, current_stream()));
  return {y, partials};
}

Tensor bn_stats(const Tensor& x_in) {
  check_activation(x_in, "x", x_in);
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const int64_t rows = x.size(0) * x.size(2) * x.size(3), c = x.size(1);
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  Tensor partials = new_tensor({3, tiles, c}, x.options().dtype(at::kFloat));
  BnStatsArgs a{};
  a.dtype = dt;
  a.x = x.data_ptr();
  a.rows = rows;
  a.c = static_cast<int>(c);
  a.partials = partials.data_ptr<float>();
  PF_CHECK_CUDA(launch_bn_stats(a, current_stream()));
  return partials;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize(const Tensor& partials_in, const OptTensor& weight,
                                                       const OptTensor& bias, double eps, const OptTensor& running_mean,
                                                       const OptTensor& running_var, std::optional<double> momentum,
                                                       const OptTensor& num_batches_tracked) {
  TORCH_CHECK(partials_in.dim() == 3 && partials_in.size(0) == 3, "preact_fused: partials must be [3, T, C], got ",
              partials_in.sizes());
  TORCH_CHECK(on_device(partials_in), "preact_fused cuda backend: partials must be a CUDA tensor");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "preact_fused: running_mean and running_var go together");
  const DeviceGuard guard(partials_in.device());
  const Tensor partials = partials_in.to(at::kFloat).contiguous();
  const int64_t c = partials.size(2);
  BnFinalizeArgs a{};
  a.partials = partials.data_ptr<float>();
  a.tiles = static_cast<int>(partials.size(1));
  a.c = static_cast<int>(c);
  Tensor gamma, beta, rm, rv, nbt;
  if (weight.has_value()) gamma = channel_vector(*weight, c, "weight", partials);
  if (bias.has_value()) beta = channel_vector(*bias, c, "bias", partials);
  a.gamma = fptr(gamma);
  a.beta = fptr(beta);
  a.eps = static_cast<float>(eps);
  const bool update = running_mean.has_value();
  if (update) {
    // float32 contiguous buffers are updated in place; others through a float32 copy.
    rm = channel_vector(*running_mean, c, "running_mean", partials);
    rv = channel_vector(*running_var, c, "running_var", partials);
    a.running_mean = rm.data_ptr<float>();
    a.running_var = rv.data_ptr<float>();
    a.use_momentum = momentum.has_value();
    a.momentum = momentum.has_value() ? static_cast<float>(*momentum) : 0.f;
    if (!momentum.has_value()) {
      TORCH_CHECK(num_batches_tracked.has_value(),
                  "preact_fused: momentum=None needs num_batches_tracked for the cumulative average");
      TORCH_CHECK(num_batches_tracked->numel() == 1 && num_batches_tracked->device() == partials.device(),
                  "preact_fused: num_batches_tracked must be a one-element tensor on ", partials.device());
      nbt = num_batches_tracked->to(at::kLong).contiguous();
      a.num_batches_tracked = reinterpret_cast<const long long*>(nbt.data_ptr<int64_t>());
    }
  }
  const auto opts = partials.options();
  Tensor mean = new_tensor({c}, opts), invstd = new_tensor({c}, opts), scale = new_tensor({c}, opts),
         shift = new_tensor({c}, opts);
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.scale = scale.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  PF_CHECK_CUDA(launch_bn_finalize(a, current_stream()));
  if (update) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {mean, invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor> conv_dgrad(const Tensor& dy_in, const Tensor& weight, const Tensor& x_in,
                                              int64_t stride, int64_t padding, const OptTensor& scale_in,
                                              const OptTensor& shift_in, const OptTensor& mean_in) {
  check_activation(dy_in, "dy", dy_in);
  check_activation(x_in, "x", dy_in);
  check_geometry(stride, padding);
  TORCH_CHECK(scale_in.has_value() == shift_in.has_value() && scale_in.has_value() == mean_in.has_value(),
              "preact_fused: scale, shift and mean go together");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == dy_in.size(1) && weight.size(1) == x_in.size(1),
              "preact_fused: weight shape ", weight.sizes(), " does not match dy ", dy_in.sizes(), " and x ",
              x_in.sizes());
  const DType dt = dtype_of(dy_in, "dy");
  const DeviceGuard guard(dy_in.device());
  const Tensor dy = nhwc(dy_in, dy_in.scalar_type());
  const int64_t n = x_in.size(0), cin = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t ho = conv_out(h, kh, stride, padding), wo = conv_out(w, kw, stride, padding);
  TORCH_CHECK(dy.size(0) == n && dy.size(2) == ho && dy.size(3) == wo, "preact_fused: dy shape ", dy.sizes(),
              " does not match the convolution of x ", x_in.sizes(), " (expected [", n, ", ", cout, ", ", ho, ", ", wo,
              "])");
  ConvDgradArgs a{};
  a.s = make_shape(x_in, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  const Tensor wt = weight.to(dy.device(), dy.scalar_type()).permute({1, 2, 3, 0}).reshape({cin, kh * kw * cout});
  const Tensor wp = pack_weight(wt, dt);
  a.w_packed = wp.data_ptr();
  a.k_pad = static_cast<int>(wp.size(1));
  a.dy = dy.data_ptr();
  Tensor g = new_tensor({n, cin, h, w}, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  a.g = g.data_ptr();
  const bool bn = scale_in.has_value();
  Tensor x, scale, shift, mean, part;
  Tensor sum_g = new_tensor({bn ? cin : 0}, dy.options().dtype(at::kFloat));
  Tensor sum_gx = new_tensor({bn ? cin : 0}, dy.options().dtype(at::kFloat));
  if (bn) {
    x = nhwc(x_in, dy.scalar_type());
    scale = channel_vector(*scale_in, cin, "scale", dy);
    shift = channel_vector(*shift_in, cin, "shift", dy);
    mean = channel_vector(*mean_in, cin, "mean", dy);
    const int64_t tiles = (n * h * w + kTileRows - 1) / kTileRows;
    part = new_tensor({2, tiles, cin}, dy.options().dtype(at::kFloat));
    a.x = x.data_ptr();
    a.scale = scale.data_ptr<float>();
    a.shift = shift.data_ptr<float>();
    a.mean = mean.data_ptr<float>();
    a.sum_partials = part.data_ptr<float>();
    a.sum_g = sum_g.data_ptr<float>();
    a.sum_gx = sum_gx.data_ptr<float>();
  }
  PF_CHECK_CUDA(launch_conv_dgrad(a, current_stream()));
  return {g, sum_g, sum_gx};
}

Tensor conv_wgrad(const Tensor& x_in, const Tensor& dy_in, at::IntArrayRef weight_shape, int64_t stride,
                  int64_t padding, const OptTensor& scale_in, const OptTensor& shift_in) {
  check_activation(x_in, "x", x_in);
  check_activation(dy_in, "dy", x_in);
  check_geometry(stride, padding);
  TORCH_CHECK(scale_in.has_value() == shift_in.has_value(), "preact_fused: scale and shift go together");
  TORCH_CHECK(weight_shape.size() == 4 && weight_shape[1] == x_in.size(1) && weight_shape[0] == dy_in.size(1),
              "preact_fused: weight_shape ", weight_shape, " does not match x ", x_in.sizes(), " and dy ",
              dy_in.sizes());
  const DType dt = dtype_of(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const Tensor x = nhwc(x_in, x_in.scalar_type());
  const Tensor dy = nhwc(dy_in, x_in.scalar_type());
  const int64_t cout = weight_shape[0], cin = weight_shape[1], kh = weight_shape[2], kw = weight_shape[3];
  const int64_t ho = conv_out(x.size(2), kh, stride, padding), wo = conv_out(x.size(3), kw, stride, padding);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == ho && dy.size(3) == wo, "preact_fused: dy shape ", dy.sizes(),
              " does not match the convolution of x ", x.sizes());
  ConvWgradArgs a{};
  a.s = make_shape(x, cout, kh, kw, ho, wo, stride, padding);
  a.dtype = dt;
  Tensor scale, shift;
  if (scale_in.has_value()) {
    scale = channel_vector(*scale_in, cin, "scale", x);
    shift = channel_vector(*shift_in, cin, "shift", x);
  }
  const int sms = multiprocessor_count();
  a.splits = conv_wgrad_splits(a.s, dt, sms);
  Tensor part = new_tensor({a.splits, cout, kh * kw * cin}, x.options().dtype(at::kFloat));
  Tensor dw = new_tensor({cout, cin, kh, kw}, x.options().dtype(at::kFloat));
  a.x = x.data_ptr();
  a.dy = dy.data_ptr();
  a.scale = fptr(scale);
  a.shift = fptr(shift);
  a.partials = part.data_ptr<float>();
  a.dw = dw.data_ptr<float>();
  if (x.size(0) * ho * wo == 0) {
    dw.zero_();
    return dw;
  }
  PF_CHECK_CUDA(launch_conv_wgrad(a, current_stream()));
  return dw;
}

Tensor bn_backward(const Tensor& g_in, const Tensor& x_in, const Tensor& mean, const Tensor& invstd,
                   const Tensor& scale, const Tensor& sum_g, const Tensor& sum_gx, bool training,
                   const OptTensor& d_residual_in) {
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
  const Tensor mean_f = channel_vector(mean, c, "mean", x), invstd_f = channel_vector(invstd, c, "invstd", x),
               scale_f = channel_vector(scale, c, "scale", x), sum_g_f = channel_vector(sum_g, c, "sum_g", x),
               sum_gx_f = channel_vector(sum_gx, c, "sum_gx", x);
  Tensor coef = new_tensor({3, c}, x.options().dtype(at::kFloat));
  Tensor dx = new_tensor(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  BnBackwardArgs a{};
  a.dtype = dt;
  a.g = g.data_ptr();
  a.x = x.data_ptr();
  a.d_residual = d_res.defined() ? d_res.data_ptr() : nullptr;
  a.mean = mean_f.data_ptr<float>();
  a.invstd = invstd_f.data_ptr<float>();
  a.scale = scale_f.data_ptr<float>();
  a.sum_g = sum_g_f.data_ptr<float>();
  a.sum_gx = sum_gx_f.data_ptr<float>();
  a.training = training;
  a.rows = x.size(0) * x.size(2) * x.size(3);
  a.c = static_cast<int>(c);
  a.coef = coef.data_ptr<float>();
  a.dx = dx.data_ptr();
  PF_CHECK_CUDA(launch_bn_backward(a, current_stream()));
  return dx;
}

void define_ops(torch::Library& m) {
  m.def("conv_fwd(Tensor x, Tensor weight, int stride, int padding, Tensor? scale, Tensor? shift, "
        "Tensor? residual, bool want_stats) -> (Tensor, Tensor)");
  m.def("bn_stats(Tensor x) -> Tensor");
  m.def("bn_finalize(Tensor partials, Tensor? weight, Tensor? bias, float eps, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float? momentum, Tensor? num_batches_tracked) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_dgrad(Tensor dy, Tensor weight, Tensor x, int stride, int padding, Tensor? scale, Tensor? shift, "
        "Tensor? mean) -> (Tensor, Tensor, Tensor)");
  m.def("conv_wgrad(Tensor x, Tensor dy, int[] weight_shape, int stride, int padding, Tensor? scale, "
        "Tensor? shift) -> Tensor");
  m.def("bn_backward(Tensor g, Tensor x, Tensor mean, Tensor invstd, Tensor scale, Tensor sum_g, Tensor sum_gx, "
        "bool training, Tensor? d_residual) -> Tensor");
}

void impl_ops(torch::Library& m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_finalize", &bn_finalize);
  m.impl("conv_dgrad", &conv_dgrad);
  m.impl("conv_wgrad", &conv_wgrad);
  m.impl("bn_backward", &bn_backward);
}

}  // namespace

#ifdef PF_EMULATE
TORCH_LIBRARY(preact_fused_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(preact_fused_emu, CPU, m) { impl_ops(m); }
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
