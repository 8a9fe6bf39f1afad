// Implicit-GEMM convolution shared by the forward pass and the input gradient (dgrad).
//
//   out[m, n] = sum_k A[m, k] * B[k, n]      m: pixel (row), n: channel (column), k = (tap, c)
//
// forward: rows are output pixels (n, oh, ow); A[m, (kh, kw, ci)] = P(x[n, oh*s-p+kh, ow*s-p+kw, ci])
//          with P = relu(x*scale + shift) (or identity) and 0 outside the image (padding is
//          applied after the activation); B[(kh, kw, ci), co] = w[co, ci, kh, kw].
// dgrad:   rows are input pixels (n, ih, iw); A[m, (kh, kw, co)] = dy[n, oh, ow, co] where
//          ih + p - kh = oh*s exactly (tap masks for stride > 1, no zero insertion), else 0;
//          B[(kh, kw, co), ci] = w[co, ci, kh, kw].
//
// Block: 128 threads (4 warps), tile 128 rows x BN columns (BN = 16, 32 or 64), reduction chunks
// of 64 bytes per pixel (BK = 32 bf16/fp16 or 16 fp32 elements). Each warp owns 32 rows x BN.
// Pipeline: register-staged double buffering. Chunk c+1 is fetched from global memory into
// registers while chunk c is multiplied from shared memory; the BN affine + ReLU is applied when
// the registers are written to the other shared buffer; one __syncthreads per chunk.
// Math: bf16/fp16 through mma.sync m16n8k16 (fp32 accumulators); fp32 through exact FFMA with
// the same accumulator ownership, so the epilogue is common.
// Epilogue: accumulators are staged in shared memory as fp32 and written back as 16-byte vectors
// per row; forward adds the residual, rounds, stores and takes per-tile (count, mean, M2) of the
// stored values (two passes over the tile, deterministic); dgrad applies the ReLU mask of the
// forward, stores g and emits per-tile sums of g and g*(x - mean).
#pragma once

#include "../common.cuh"

namespace preact_fused {

template <typename T, int BN_>
struct IgemmConfig {
  static constexpr int kThreads = 128;
  static constexpr int BM = kTileRows;                    // 128 pixels per tile
  static constexpr int BN = BN_;                          // channels per tile
  static constexpr int kVec = Elem<T>::kVec;              // elements per 16-byte vector
  static constexpr int BK = 64 / static_cast<int>(sizeof(T));  // reduction elements per chunk
  static constexpr int kVecPerRow = BK / kVec;            // 4
  static constexpr int kLds = BK + 16 / static_cast<int>(sizeof(T));  // smem row: 80 bytes
  static constexpr int kARowsPerPass = kThreads / kVecPerRow;        // 32
  static constexpr int kAIters = BM / kARowsPerPass;                 // 4
  static constexpr int kBVecs = BN * kVecPerRow;
  static constexpr int kBIters = (kBVecs + kThreads - 1) / kThreads; // 1 or 2
  static constexpr int kMT = 2;                           // m16 tiles per warp
  static constexpr int kNT = BN / 8;                      // n8 tiles per warp
  static constexpr int kLdc = BN + 8;                     // fp32 staging row (bank spread)
  static constexpr int kChunksPerRow = BN / kVec;         // epilogue: vectors per row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = BM / kRowsPerPass;
  static constexpr int kMainBytes = 2 * (BM + BN) * kLds * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = BM * kLdc * 4;
  static constexpr int kSmemBytes = kMainBytes > kStageBytes ? kMainBytes : kStageBytes;
  static_assert(kVecPerRow == 4, "loader mapping assumes 4 vectors per row");
  static_assert(kChunksPerRow <= kWarp && kWarp % kChunksPerRow == 0, "epilogue mapping");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

template <typename T>
struct IgemmParams {
  const T* src;            // gather source, NHWC [n, src_h, src_w, src_c] (fwd: x, dgrad: dy)
  int src_h, src_w, src_c;
  int row_h, row_w;        // pixel grid of the rows (fwd: ho, wo; dgrad: h, w)
  int rows;                // n * row_h * row_w
  int kw, stride, pad;     // taps along w, conv stride and padding
  int k;                   // reduction length kh*kw*src_c
  int k_pad;               // multiple of BK
  const T* wt;             // [col_tiles*BN, k_pad], B transposed (k contiguous), zero padded
  int cols;                // columns (fwd: cout, dgrad: cin)
  int tiles, col_tiles;    // ceil(rows / BM), ceil(cols / BN)
  const float* a_scale;    // [src_c] BN scale of the loader (fwd only) or nullptr
  const float* a_shift;    // [src_c]
  bool a_vec;              // src_c % kVec == 0 and src 16-byte aligned: vector gathers
  T* out;                  // [rows, cols]
  bool out_vec;            // cols % kVec == 0 and out/residual/ex 16-byte aligned
  const T* residual;       // fwd: [rows, cols] or nullptr
  float* stats;            // fwd: [3, tiles, cols] (count, mean, M2) or nullptr
  const T* ex;             // dgrad: pre-BN input x [rows, cols], or nullptr (no mask, no sums)
  const float* e_scale;    // dgrad: [cols]
  const float* e_shift;    // [cols]
  const float* e_mean;     // [cols]
  float* sums;             // dgrad: [2, tiles, cols] partial sum_g, sum_gx
};

template <typename T, int BN, bool kDgrad>
__global__ void __launch_bounds__(128) igemm_conv_kernel(const IgemmParams<T> p) {
  using Cfg = IgemmConfig<T, BN>;
  constexpr int BM = Cfg::BM, BK = Cfg::BK, kVec = Cfg::kVec, kLds = Cfg::kLds;
  constexpr int kAIters = Cfg::kAIters, kBIters = Cfg::kBIters;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kLdc = Cfg::kLdc;
  constexpr bool kTensorCores = sizeof(T) == 2;

  __shared__ __align__(16) unsigned char smem[Cfg::kSmemBytes];
  __shared__ float red[2][4][BN];
  __shared__ float col_mean[BN];
  T* const As = reinterpret_cast<T*>(smem);        // [2][BM][kLds]
  T* const Bs = As + 2 * BM * kLds;                // [2][BN][kLds]
  float* const Cs = reinterpret_cast<float*>(smem);  // [BM][kLdc], after the main loop

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int tile_m = blockIdx.x / p.col_tiles;
  const int tile_n = blockIdx.x - tile_m * p.col_tiles;
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const bool a_bn = !kDgrad && p.a_scale != nullptr;

  // ---- A gather: this thread's 16-byte column a_kv and rows a_r0 + 32 i of the tile ----------
  const int a_kv = tid % Cfg::kVecPerRow;
  const int a_r0 = tid / Cfg::kVecPerRow;
  long long a_base[kAIters];  // element offset of image n in src
  int a_hb[kAIters], a_wb[kAIters];
  {
    const int plane = p.row_h * p.row_w;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int m = m0 + a_r0 + i * Cfg::kARowsPerPass;
      if (m < p.rows) {
        const int n = m / plane;
        const int rem = m - n * plane;
        const int oh = rem / p.row_w;
        const int ow = rem - oh * p.row_w;
        a_base[i] = static_cast<long long>(n) * p.src_h * p.src_w * p.src_c;
        if constexpr (kDgrad) {
          a_hb[i] = oh + p.pad;
          a_wb[i] = ow + p.pad;
        } else {
          a_hb[i] = oh * p.stride - p.pad;
          a_wb[i] = ow * p.stride - p.pad;
        }
      } else {  // past the last row: every tap falls outside the image
        a_base[i] = 0;
        a_hb[i] = -(1 << 28);
        a_wb[i] = -(1 << 28);
      }
    }
  }

  // Source pixel of row i for tap (kh, kw): element offset of channel 0, or -1 when outside.
  auto src_pixel = [&](int i, int kh, int kw) -> long long {
    int sh, sw;
    if constexpr (kDgrad) {
      const int th = a_hb[i] - kh, tw = a_wb[i] - kw;
      if (th < 0 || tw < 0) return -1;
      if (p.stride == 1) {
        sh = th;
        sw = tw;
      } else {
        if (th % p.stride != 0 || tw % p.stride != 0) return -1;
        sh = th / p.stride;
        sw = tw / p.stride;
      }
      if (sh >= p.src_h || sw >= p.src_w) return -1;
    } else {
      sh = a_hb[i] + kh;
      sw = a_wb[i] + kw;
      if (static_cast<unsigned>(sh) >= static_cast<unsigned>(p.src_h) ||
          static_cast<unsigned>(sw) >= static_cast<unsigned>(p.src_w))
        return -1;
    }
    return a_base[i] + (static_cast<long long>(sh) * p.src_w + sw) * p.src_c;
  };

  // Registers of the stage in flight.
  uint4 a_reg[kAIters];
  uint32_t a_ok = 0;            // vector path: bit i = row i loaded (BN still to apply)
  float a_sc[kVec], a_sh[kVec]; // vector path with BN: scale/shift of the thread's channels
  uint4 b_reg[kBIters];

  auto load_a = [&](int chunk) {
    const int k0 = chunk * BK + a_kv * kVec;
    if (p.a_vec) {
      // The vector lies inside one tap because src_c % kVec == 0.
      const bool kvalid = k0 < p.k;
      const int tap = k0 / p.src_c;
      const int c = k0 - tap * p.src_c;
      const int kh = tap / p.kw;
      const int kw = tap - kh * p.kw;
      if (a_bn) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          a_sc[j] = kvalid ? __ldg(p.a_scale + c + j) : 0.f;
          a_sh[j] = kvalid ? __ldg(p.a_shift + c + j) : 0.f;
        }
      }
      a_ok = 0;
#pragma unroll
      for (int i = 0; i < kAIters; ++i) {
        const long long off = kvalid ? src_pixel(i, kh, kw) : -1;
        if (off >= 0) {
          a_reg[i] = ldg_vec(p.src + off + c);
          a_ok |= 1u << i;
        } else {
          a_reg[i] = zero_vec();
        }
      }
    } else {
      // Scalar fallback (channels not a multiple of the vector): activation applied right away.
#pragma unroll
      for (int i = 0; i < kAIters; ++i) a_reg[i] = zero_vec();
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int k = k0 + j;
        if (k < p.k) {
          const int tap = k / p.src_c;
          const int c = k - tap * p.src_c;
          const int kh = tap / p.kw;
          const int kw = tap - kh * p.kw;
          const float sc = a_bn ? __ldg(p.a_scale + c) : 1.f;
          const float sf = a_bn ? __ldg(p.a_shift + c) : 0.f;
#pragma unroll
          for (int i = 0; i < kAIters; ++i) {
            const long long off = src_pixel(i, kh, kw);
            if (off >= 0) {
              float v = to_float(p.src[off + c]);
              if (a_bn) v = bn_relu(v, sc, sf);
              set_elem<T>(a_reg[i], j, v);
            }
          }
        }
      }
      a_ok = 0;
    }
  };

  auto store_a = [&](int buf) {
    T* dst = As + buf * BM * kLds;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      uint4 v = a_reg[i];
      if (p.a_vec && a_bn && ((a_ok >> i) & 1u)) {
        float f[kVec];
        unpack<T>(v, f);
#pragma unroll
        for (int j = 0; j < kVec; ++j) f[j] = bn_relu(f[j], a_sc[j], a_sh[j]);
        v = pack<T>(f);
      }
      *reinterpret_cast<uint4*>(dst + (a_r0 + i * Cfg::kARowsPerPass) * kLds + a_kv * kVec) = v;
    }
  };

  auto load_b = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      if (idx < Cfg::kBVecs) {
        const int row = idx / Cfg::kVecPerRow, kv = idx % Cfg::kVecPerRow;
        b_reg[i] = ldg_vec(p.wt + static_cast<long long>(n0 + row) * p.k_pad + chunk * BK + kv * kVec);
      }
    }
  };

  auto store_b = [&](int buf) {
    T* dst = Bs + buf * BN * kLds;
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      if (idx < Cfg::kBVecs) {
        const int row = idx / Cfg::kVecPerRow, kv = idx % Cfg::kVecPerRow;
        *reinterpret_cast<uint4*>(dst + row * kLds + kv * kVec) = b_reg[i];
      }
    }
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int a = 0; a < kMT; ++a)
#pragma unroll
    for (int b = 0; b < kNT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  auto compute = [&](int buf) {
    const T* Ab = As + buf * BM * kLds;
    const T* Bb = Bs + buf * BN * kLds;
    if constexpr (kTensorCores) {
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const T* r0 = Ab + (warp * 32 + mt * 16 + g) * kLds + ks * 16 + 2 * t4;
          af[mt][0] = lds32(r0);
          af[mt][1] = lds32(r0 + 8 * kLds);
          af[mt][2] = lds32(r0 + 8);
          af[mt][3] = lds32(r0 + 8 * kLds + 8);
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const T* c0 = Bb + (nt * 8 + g) * kLds + ks * 16 + 2 * t4;
          const uint32_t bf[2] = {lds32(c0), lds32(c0 + 8)};
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) mma_16816<T>(acc[mt][nt], af[mt], bf);
        }
      }
    } else {
      // Exact fp32: acc[mt][nt][h*2+j] (row g + 8h, col 2*t4 + j of tile (mt, nt)).
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float av[kMT][2], bv[kNT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) av[mt][h] = to_float(Ab[(warp * 32 + mt * 16 + h * 8 + g) * kLds + kk]);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) bv[nt][j] = to_float(Bb[(nt * 8 + 2 * t4 + j) * kLds + kk]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int j = 0; j < 2; ++j) acc[mt][nt][h * 2 + j] = fmaf(av[mt][h], bv[nt][j], acc[mt][nt][h * 2 + j]);
      }
    }
  };

  // ---- main loop -------------------------------------------------------------------------------
  const int chunks = p.k_pad / BK;
  load_a(0);
  load_b(0);
  store_a(0);
  store_b(0);
  __syncthreads();
  for (int c = 0; c < chunks; ++c) {
    const int buf = c & 1;
    const bool more = c + 1 < chunks;
    if (more) {
      load_a(c + 1);
      load_b(c + 1);
    }
    compute(buf);
    if (more) {
      store_a(buf ^ 1);
      store_b(buf ^ 1);
    }
    __syncthreads();
  }

  // ---- epilogue: stage the fp32 tile in shared memory ------------------------------------------
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int row = warp * 32 + mt * 16 + g, col = nt * 8 + 2 * t4;
      *reinterpret_cast<float2*>(Cs + row * kLdc + col) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(Cs + (row + 8) * kLdc + col) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  __syncthreads();

  // Each thread owns columns [cc*kVec, cc*kVec + kVec) of rows rr + pass*kRowsPerPass.
  constexpr int kCpr = Cfg::kChunksPerRow, kRpp = Cfg::kRowsPerPass;
  const int cc = tid % kCpr, rr = tid / kCpr;
  const int col0 = n0 + cc * kVec;                // global column of element 0
  const bool col_in = col0 < p.cols;
  const bool full = col_in && p.out_vec;          // all kVec columns valid and aligned
  const int count = min(BM, p.rows - m0);

  auto load_row = [&](const T* base, long long off, float (&f)[kVec]) {
    if (full) {
      unpack<T>(ldg_vec(base + off), f);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = (col0 + j < p.cols) ? to_float(base[off + j]) : 0.f;
    }
  };
  // v = this thread's columns of staged row r of the tile; returns the row's offset in out.
  auto staged_row = [&](int r, float (&v)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = Cs[r * kLdc + cc * kVec + j];
    return static_cast<long long>(m0 + r) * p.cols + col0;
  };
  auto store_row = [&](long long off, const float (&f)[kVec]) {
    if (full) {
      *reinterpret_cast<uint4*>(p.out + off) = pack<T>(f);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (col0 + j < p.cols) p.out[off + j] = from_float<T>(f[j]);
    }
  };
  // Sum s[kVec] over the threads sharing cc (fixed order), into red[which][warp][...].
  auto reduce_to_smem = [&](float (&s)[kVec], int which) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] = sum_over_lane_groups<kCpr>(s[j]);
    if (lane < kCpr) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) red[which][warp][cc * kVec + j] = s[j];
    }
  };
  auto block_total = [&](int which, int col) {
    return ((red[which][0][col] + red[which][1][col]) + red[which][2][col]) + red[which][3][col];
  };

  if constexpr (!kDgrad) {
    float s1[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) s1[j] = 0.f;
#pragma unroll
    for (int ps = 0; ps < Cfg::kPasses; ++ps) {
      const int r = rr + ps * kRpp;
      if (r < count && col_in) {
        float v[kVec];
        const long long off = staged_row(r, v);
        if (p.residual != nullptr) {
          float res[kVec];
          load_row(p.residual, off, res);
#pragma unroll
          for (int j = 0; j < kVec; ++j) v[j] += res[j];
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] = to_float(from_float<T>(v[j]));  // the stored value
        store_row(off, v);
        if (p.stats != nullptr) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            Cs[r * kLdc + cc * kVec + j] = v[j];
            s1[j] += v[j];
          }
        }
      }
    }
    if (p.stats != nullptr) {  // block-uniform
      reduce_to_smem(s1, 0);
      __syncthreads();
      if (tid < BN) col_mean[tid] = block_total(0, tid) / static_cast<float>(count);
      __syncthreads();
      float s2[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) s2[j] = 0.f;
#pragma unroll
      for (int ps = 0; ps < Cfg::kPasses; ++ps) {
        const int r = rr + ps * kRpp;
        if (r < count && col_in) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float d = Cs[r * kLdc + cc * kVec + j] - col_mean[cc * kVec + j];
            s2[j] = fmaf(d, d, s2[j]);
          }
        }
      }
      reduce_to_smem(s2, 1);
      __syncthreads();
      if (tid < BN && n0 + tid < p.cols) {
        const long long plane = static_cast<long long>(p.tiles) * p.cols;
        const long long o = static_cast<long long>(tile_m) * p.cols + n0 + tid;
        p.stats[o] = static_cast<float>(count);
        p.stats[plane + o] = col_mean[tid];
        p.stats[2 * plane + o] = block_total(1, tid);
      }
    }
  } else {
    const bool bn = p.ex != nullptr;
    float sc[kVec], sf[kVec], mu[kVec], sg[kVec], sgx[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool in = bn && col0 + j < p.cols;
      sc[j] = in ? __ldg(p.e_scale + col0 + j) : 0.f;
      sf[j] = in ? __ldg(p.e_shift + col0 + j) : 0.f;
      mu[j] = in ? __ldg(p.e_mean + col0 + j) : 0.f;
      sg[j] = 0.f;
      sgx[j] = 0.f;
    }
#pragma unroll
    for (int ps = 0; ps < Cfg::kPasses; ++ps) {
      const int r = rr + ps * kRpp;
      if (r < count && col_in) {
        float v[kVec];
        const long long off = staged_row(r, v);
        if (bn) {
          float xf[kVec];
          load_row(p.ex, off, xf);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            // g = da * (x*scale + shift > 0), the forward's arithmetic; sums before rounding g.
            const float gv = bn_affine(xf[j], sc[j], sf[j]) > 0.f ? v[j] : 0.f;
            sg[j] += gv;
            sgx[j] = fmaf(gv, xf[j] - mu[j], sgx[j]);
            v[j] = gv;
          }
        }
        store_row(off, v);
      }
    }
    if (bn) {  // block-uniform
      reduce_to_smem(sg, 0);
      reduce_to_smem(sgx, 1);
      __syncthreads();
      if (tid < BN && n0 + tid < p.cols) {
        const long long plane = static_cast<long long>(p.tiles) * p.cols;
        const long long o = static_cast<long long>(tile_m) * p.cols + n0 + tid;
        p.sums[o] = block_total(0, tid);
        p.sums[plane + o] = block_total(1, tid);
      }
    }
  }
}

// Launch the kernel for a column count (BN picked by conv_tile_cols, the same the host used to
// pack the weights).
template <typename T, bool kDgrad>
cudaError_t launch_igemm(const IgemmParams<T>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.tiles) * static_cast<unsigned>(p.col_tiles));
  switch (conv_tile_cols(p.cols)) {
    case 16:
      PF_LAUNCH((igemm_conv_kernel<T, 16, kDgrad>), grid, 128, stream, p);
      break;
    case 32:
      PF_LAUNCH((igemm_conv_kernel<T, 32, kDgrad>), grid, 128, stream, p);
      break;
    default:
      PF_LAUNCH((igemm_conv_kernel<T, 64, kDgrad>), grid, 128, stream, p);
      break;
  }
  return cudaGetLastError();
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The GEMM geometry shared by the forward and dgrad: rows are the pixels of the [s.n, row_h, row_w]
// grid, the gathered operand src is NHWC [s.n, src_h, src_w, src_c] (fwd: x, dgrad: dy), the
// reduction runs over the s.kh * s.kw taps of src_c channels against w_packed [.., k_pad], and the
// output has `cols` columns. Loader and epilogue fields are left to the caller.
template <typename T>
void set_igemm_geometry(IgemmParams<T>& p, const ConvShape& s, const void* src, int src_h, int src_w, int src_c,
                        int row_h, int row_w, int cols, const void* w_packed, int k_pad) {
  p.src = static_cast<const T*>(src);
  p.src_h = src_h;
  p.src_w = src_w;
  p.src_c = src_c;
  p.row_h = row_h;
  p.row_w = row_w;
  p.rows = s.n * row_h * row_w;
  p.kw = s.kw;
  p.stride = s.stride;
  p.pad = s.pad;
  p.k = s.kh * s.kw * src_c;
  p.k_pad = k_pad;
  p.wt = static_cast<const T*>(w_packed);
  p.cols = cols;
  p.tiles = ceil_div(p.rows, kTileRows);
  p.col_tiles = ceil_div(cols, conv_tile_cols(cols));
  p.a_vec = src_c % Elem<T>::kVec == 0 && aligned16(src);
}

}  // namespace preact_fused
