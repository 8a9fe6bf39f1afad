// A small CUDA emulator for testing the kernels' index arithmetic on a machine without a GPU.
//
// Built only with PF_EMULATE (tests/test_cuda_build.py compiles csrc/ this way with the host
// compiler). The unchanged kernel sources run on the host: the blocks of a launch one after
// another, the threads of a block as cooperative fibers (ucontext) on one OS thread, switching at
// __syncthreads and at the warp-collective operations. `__shared__` variables are function
// statics, shared by the fibers of the running block. Warp collectives follow the PTX ISA:
//   mma.sync m16n8k16 (A row-major, B column-major, fp32 accumulators), fragment ownership
//     A: lane l, reg r -> row l/4 + 8*(r%2), k 2*(l%4) + 8*(r/2) + {0, 1} (lower k in the low half)
//     B: lane l, reg r -> k 2*(l%4) + 8*r + {0, 1}, column l/4
//     C: lane l, elem i -> row l/4 + 8*(i/2), column 2*(l%4) + i%2
//   ldmatrix .x4 .trans: lanes 8q..8q+7 give the row addresses of matrix q; lane l receives of
//     matrix q the elements [2*(l%4)][l/4] (low half) and [2*(l%4)+1][l/4] (high half).
// Products are summed in double and rounded once (the tensor cores keep at least fp32).
//
// Between two switch points the fibers run one after another, in an order set by PF_EMU_ORDER:
// "forward" (default: thread 0 first), "reverse", or "shuffle" (a new seeded permutation every
// round). A thread that reads shared memory another thread writes in the same phase (a missing
// __syncthreads) sees stale data in at least one of these orders, so the tests run them all.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "emu_runtime.h"

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Fiber {
  ucontext_t ctx;
  bool done;
  uint3 tid;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t main;
  int cur = 0, n = 0;
  int arrived = 0;
  unsigned gen = 0;
  int warp_arrived[kMaxThreads / 32] = {};
  unsigned warp_gen[kMaxThreads / 32] = {};
  uint64_t slot[kMaxThreads][8] = {};
  unsigned long long progress = 0;
  std::function<void()> body;
};

inline Block& block() {
  static Block b;
  return b;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulated CUDA: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();
}

inline void yield() {
  Block& b = block();
  swapcontext(&b.fibers[b.cur].ctx, &b.main);
}

inline void syncthreads() {
  Block& b = block();
  const unsigned g = b.gen;
  ++b.progress;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == g) yield();
}

inline void syncwarp() {
  Block& b = block();
  const int w = b.cur / 32;
  const int lanes = std::min(32, b.n - w * 32);
  const unsigned g = b.warp_gen[w];
  ++b.progress;
  if (++b.warp_arrived[w] == lanes) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
    return;
  }
  while (b.warp_gen[w] == g) yield();
}

inline void fiber_entry() {
  Block& b = block();
  b.body();
  b.fibers[b.cur].done = true;
  ++b.progress;
}

// The order in which the fibers of a block run between switch points (see PF_EMU_ORDER above).
struct Schedule {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  std::mt19937 rng{12345u};

  Schedule() {
    const char* env = std::getenv("PF_EMU_ORDER");
    if (env == nullptr || std::strcmp(env, "forward") == 0) return;
    if (std::strcmp(env, "reverse") == 0) {
      kind = kReverse;
    } else if (std::strcmp(env, "shuffle") == 0) {
      kind = kShuffle;
    } else {
      fail("PF_EMU_ORDER must be forward, reverse or shuffle");
    }
  }

  // order: a permutation of 0..n-1 (forward at first), rearranged for the next round.
  void next(std::vector<int>& order) {
    if (kind == kShuffle) {
      std::shuffle(order.begin(), order.end(), rng);
    } else if (kind == kReverse && order.front() == 0) {
      std::reverse(order.begin(), order.end());
    }
  }
};

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 blk, Args... args) {
  Block& b = block();
  const int n = static_cast<int>(blk.x * blk.y * blk.z);
  if (n <= 0 || n > kMaxThreads || n % 32 != 0) fail("block size must be a multiple of 32 up to 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  while (static_cast<int>(b.stacks.size()) < n) b.stacks.emplace_back(new char[kStackBytes]);
  gridDim = grid;
  blockDim = blk;
  b.body = [&]() { kernel(args...); };
  b.fibers.resize(n);
  Schedule schedule;
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        b.n = n;
        b.arrived = 0;
        for (int w = 0; w < n / 32; ++w) b.warp_arrived[w] = 0;
        for (int i = 0; i < n; ++i) {
          Fiber& f = b.fibers[i];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = b.stacks[i].get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.main;
          makecontext(&f.ctx, fiber_entry, 0);
          f.done = false;
          f.tid = {i % blk.x, (i / blk.x) % blk.y, i / (blk.x * blk.y)};
        }
        for (bool alive = true; alive;) {
          alive = false;
          const unsigned long long before = b.progress;
          schedule.next(order);
          for (int i : order) {
            if (b.fibers[i].done) continue;
            b.cur = i;
            threadIdx = b.fibers[i].tid;
            swapcontext(&b.main, &b.fibers[i].ctx);
            alive = alive || !b.fibers[i].done;
          }
          if (alive && b.progress == before) fail("deadlock: threads wait at a barrier that cannot complete");
        }
      }
}

inline float shfl_xor(float v, int off) {
  Block& b = block();
  const int me = b.cur, lane = me % 32;
  std::memcpy(&b.slot[me][0], &v, sizeof v);
  syncwarp();
  float r;
  std::memcpy(&r, &b.slot[me - lane + (lane ^ off)][0], sizeof r);
  syncwarp();
  return r;
}

template <bool kBf16>
inline float half_to_float(uint32_t word, int high) {
  const unsigned short bits = static_cast<unsigned short>(high ? word >> 16 : word & 0xffffu);
  return kBf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

template <bool kBf16>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&bf)[2]) {
  Block& b = block();
  const int me = b.cur, lane = me % 32, base = me - lane;
  for (int i = 0; i < 4; ++i) b.slot[me][i] = a[i];
  b.slot[me][4] = bf[0];
  b.slot[me][5] = bf[1];
  syncwarp();
  auto A = [&](int row, int k) {
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    const int l = (row % 8) * 4 + (k % 8) / 2;
    return half_to_float<kBf16>(static_cast<uint32_t>(b.slot[base + l][reg]), k % 2);
  };
  auto B = [&](int k, int col) {
    const int l = col * 4 + (k % 8) / 2;
    return half_to_float<kBf16>(static_cast<uint32_t>(b.slot[base + l][4 + (k >= 8 ? 1 : 0)]), k % 2);
  };
  float out[4];
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double s = c[i];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * B(k, col);
    out[i] = static_cast<float>(s);
  }
  syncwarp();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  Block& b = block();
  const int me = b.cur, lane = me % 32, base = me - lane;
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  b.slot[me][0] = reinterpret_cast<uintptr_t>(row_address);
  syncwarp();
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    auto elem = [&](int row, int col) -> uint32_t {
      const auto* p = reinterpret_cast<const unsigned short*>(static_cast<uintptr_t>(b.slot[base + 8 * q + row][0]));
      return p[col];
    };
    r[q] = elem(2 * t, g) | (elem(2 * t + 1, g) << 16);
  }
  syncwarp();
}

}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int off) { return emu::shfl_xor(v, off); }
inline unsigned __cvta_generic_to_shared(const void*) { return 0; }
template <>
inline uint4 __ldg<uint4>(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("16-byte global load not aligned");
  return *p;
}
