// Device helpers shared by the kernels: element types, 16-byte vectors, tensor-core MMA, reductions.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef PF_EMULATE
#include "emulate/emu.h"
#endif

#include "launch.h"

// Return the error of the last launch from a host launcher.
#define PF_RETURN_IF_ERROR(expr)              \
  do {                                        \
    cudaError_t pf_err_ = (expr);             \
    if (pf_err_ != cudaSuccess) return pf_err_; \
  } while (0)
#define PF_CHECK_LAUNCH() PF_RETURN_IF_ERROR(cudaGetLastError())

// Kernel launch; a template-id with commas goes in parentheses. With PF_EMULATE (the CPU test
// build, csrc/emulate/) blocks run one after another with cooperative threads on the host.
// PF_LAUNCH_SMEM also gives the bytes of dynamic shared memory (PF_DYNAMIC_SHARED in the kernel).
#ifdef PF_EMULATE
#define PF_LAUNCH(kernel, grid, block, stream, ...) \
  (++::emu::launches(), ::emu::skip_kernels() ? void() : ::emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__))
#define PF_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  (::emu::check_dynamic_shared(smem), PF_LAUNCH(kernel, grid, block, stream, __VA_ARGS__))
#define PF_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(::emu::dynamic_shared())
#else
#define PF_LAUNCH(kernel, grid, block, stream, ...) (kernel)<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define PF_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define PF_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace preact_fused {
// Let `kernel` use `bytes` of dynamic shared memory (beyond the default 48 KB with its static
// shared memory, an opt-in per kernel; a host-side attribute, not a launch).
template <typename Kernel>
cudaError_t allow_dynamic_shared(Kernel kernel, int bytes) {
  if (bytes <= 8 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
}  // namespace preact_fused

namespace preact_fused {

constexpr int kWarp = 32;

__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }
__device__ __forceinline__ int tree_counters_dev(int tiles) { return ceil_div_dev(tiles, kTreeGroup) + 1; }

// Host: call launch(T{}) with the element type T of dtype (float, __nv_bfloat16 or __half) and
// return its error; an unknown dtype is cudaErrorInvalidValue.
template <typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(float{});
    case DType::kBFloat16: return launch(__nv_bfloat16{});
    case DType::kFloat16: return launch(__half{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// Element types. A 16-byte vector holds kVec<T> elements; float conversions are exact widening
// and round-to-nearest-even narrowing.
// ---------------------------------------------------------------------------------------------
template <typename T> struct Elem;
template <> struct Elem<float> { static constexpr int kVec = 4; };
template <> struct Elem<__nv_bfloat16> { static constexpr int kVec = 8; };
template <> struct Elem<__half> { static constexpr int kVec = 8; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 16-bit payload <-> float for the packed vectors.
template <typename T> __device__ __forceinline__ float bits_to_float(uint32_t bits16);
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);
}
template <> __device__ __forceinline__ float bits_to_float<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <typename T> __device__ __forceinline__ uint32_t float_to_bits(float v);
template <> __device__ __forceinline__ uint32_t float_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint32_t float_to_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// Unpack a 16-byte vector into kVec floats (element i at the lower address first).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[Elem<T>::kVec]) {
  if constexpr (sizeof(T) == 4) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = bits_to_float<T>(w[i] & 0xffffu);
      f[2 * i + 1] = bits_to_float<T>(w[i] >> 16);
    }
  }
}

// Pack kVec floats (rounded to T) into a 16-byte vector.
template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[Elem<T>::kVec]) {
  uint4 v;
  if constexpr (sizeof(T) == 4) {
    v.x = __float_as_uint(f[0]); v.y = __float_as_uint(f[1]);
    v.z = __float_as_uint(f[2]); v.w = __float_as_uint(f[3]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits<T>(f[2 * i]) | (float_to_bits<T>(f[2 * i + 1]) << 16);
    v.x = w[0]; v.y = w[1]; v.z = w[2]; v.w = w[3];
  }
  return v;
}

// Element i (a compile-time constant after unrolling) of a packed vector set to value rounded to T.
template <typename T>
__device__ __forceinline__ void set_elem(uint4& v, int i, float value) {
  uint32_t bits, keep;
  int word;
  if constexpr (sizeof(T) == 4) {
    bits = __float_as_uint(value);
    keep = 0u;
    word = i;
  } else {
    const int shift = (i & 1) * 16;
    bits = float_to_bits<T>(value) << shift;
    keep = ~(0xffffu << shift);
    word = i >> 1;
  }
  switch (word) {
    case 0: v.x = (v.x & keep) | bits; break;
    case 1: v.y = (v.y & keep) | bits; break;
    case 2: v.z = (v.z & keep) | bits; break;
    default: v.w = (v.w & keep) | bits; break;
  }
}

__device__ __forceinline__ uint4 zero_vec() { return make_uint4(0u, 0u, 0u, 0u); }

__device__ __forceinline__ uint4 ldg_vec(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The BN-ReLU activation of the contract: z = fma(x, scale, shift) in fp32, P = (z <= 0) ? 0 : z
// (NaN kept, as PyTorch's ReLU); the dgrad mask recomputes z the same way: the gradient passes
// where !(z <= 0) (z > 0 or NaN).
__device__ __forceinline__ float bn_affine(float x, float scale, float shift) { return fmaf(x, scale, shift); }
__device__ __forceinline__ float relu_keep_nan(float z) { return z <= 0.f ? 0.f : z; }
__device__ __forceinline__ float bn_relu(float x, float scale, float shift) {
  return relu_keep_nan(bn_affine(x, scale, shift));
}

// A float parameter vector element of any of the activation dtypes (gamma, beta, running stats,
// weights: read as they are stored, no cast launch).
__device__ __forceinline__ float load_any(const void* p, DType dt, long long i) {
  switch (dt) {
    case DType::kBFloat16: return to_float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    case DType::kFloat16: return to_float(__ldg(static_cast<const __half*>(p) + i));
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}
// The value v rounded to dt (as torch's .to(dt) rounds), back in float.
__device__ __forceinline__ float round_to(DType dt, float v) {
  switch (dt) {
    case DType::kBFloat16: return to_float(from_float<__nv_bfloat16>(v));
    case DType::kFloat16: return to_float(from_float<__half>(v));
    default: return v;
  }
}
__device__ __forceinline__ void store_any(void* p, DType dt, long long i, float v) {
  switch (dt) {
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}
// A plain (non-cached) read of a buffer element that another block of the same launch wrote
// before a __threadfence (L1 is not coherent across multiprocessors).
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }

// ---------------------------------------------------------------------------------------------
// Tensor cores: mma.sync m16n8k16, fp32 accumulators. Fragment ownership (lane l, g = l/4,
// t = l%4): A regs {a0: (g, 2t..2t+1), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..)};
// B regs {b0: (k 2t..2t+1, n g), b1: (k 2t+8.., n g)}; C {c0,c1: (g, 2t..2t+1), c2,c3: (g+8, ..)}.
// Each 32-bit register holds two consecutive-k elements, the lower k in the low half.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
  }
#elif defined(PF_EMULATE)
  ::emu::mma_16816<std::is_same<T, __nv_bfloat16>::value>(c, a, b);
#else
  __trap();  // the build targets sm_80 and newer only
#endif
}

// ldmatrix .x4 .trans: lane l supplies the row address of matrix l/8, row l%8 (16 bytes each);
// register q receives, of matrix q, the elements [2t][g] and [2t+1][g] (stored row-major), i.e.
// the transposed fragment: a K-major ([k][m]) tile in shared memory read as the A or B operand.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(PF_EMULATE)
  ::emu::ldmatrix_x4_trans(r, smem_row);
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Butterfly sum over the lanes that share (lane % group): every such lane gets the same total,
// in a fixed order (deterministic).
template <int kGroup>
__device__ __forceinline__ float sum_over_lane_groups(float v) {
#pragma unroll
  for (int off = kWarp / 2; off >= kGroup; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace preact_fused
