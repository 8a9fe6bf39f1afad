// The CUDA vocabulary the kernels use, for a host compiler: vector types, 16-bit float types,
// intrinsics, qualifiers and the few runtime calls of the launchers. Only for the CPU emulation
// build (PF_EMULATE), which runs the unchanged kernel sources on the host to test their index
// arithmetic; nothing here is used by the real CUDA build.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
// Aligned as CUDA's vector types: a vector access at a misaligned address faults on the GPU, and
// here it is undefined behaviour that the sanitizer run (tests/test_cuda_build.py) reports.
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorNoKernelImageForDevice = 209;
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
constexpr int kEmulatedSMs = 132;
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = kEmulatedSMs; return cudaSuccess; }

// 16-bit floating point types: storage only, conversions below.
struct __nv_bfloat16 { unsigned short x; };
struct __half { unsigned short x; };

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<unsigned short>(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.x, 2); return static_cast<float>(v); }
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }

// Correctly rounded single operations (the build uses -ffp-contract=off: no implicit FMA).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
template <typename T> inline T __ldg(const T* p) { return *p; }
[[noreturn]] inline void __trap() { std::abort(); }
using std::max;
using std::min;

// Device-wide memory operations. Blocks run one after another and a block's threads never run
// at the same time, so plain memory accesses implement them.
inline void __threadfence() {}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline int atomicExch(int* address, int value) {
  const int old = *address;
  *address = value;
  return old;
}
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename K> inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }

namespace emu {
// Dynamic shared memory of the running block (extern __shared__ on the device).
constexpr int kDynamicSharedBytes = 227 * 1024;
inline unsigned char* dynamic_shared() {
  alignas(16) static unsigned char buffer[kDynamicSharedBytes];
  return buffer;
}
inline void check_dynamic_shared(long long bytes) {
  if (bytes > kDynamicSharedBytes) std::abort();
}
// Kernel launches (counted by PF_LAUNCH, csrc/common.cuh): read by the tests through the debug op
// preact_fused_emu_debug::launches, and read and reset by benchmarks/launches.py through
// pf_emu_launches (kernels.cpp).
inline long long& launches() {
  static long long count = 0;
  return count;
}
// When set, PF_LAUNCH counts a launch but runs nothing: the host path of the ops alone, for
// benchmarks/host_overhead.py (pf_emu_skip_kernels, kernels.cpp).
inline bool& skip_kernels() {
  static bool skip = false;
  return skip;
}
}  // namespace emu
