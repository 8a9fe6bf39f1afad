// Implicit-GEMM convolution shared by the forward pass and the input gradient (dgrad).
//
//   out[m, n] = sum_k A[m, k] * B[k, n]      m: pixel (row), n: channel (column), k = (tap, c)
//
// forward: rows are output pixels (n, oh, ow); A[m, (kh, kw, ci)] = P(x[n, oh*s-p+kh, ow*s-p+kw, ci])
//          with P = relu(fma(x, scale, shift)) (NaN kept) or identity and 0 outside the image
//          (padding is applied after the activation); B[(kh, kw, ci), co] = w[co, ci, kh, kw].
// dgrad:   rows are input pixels (n, ih, iw); A[m, (kh, kw, co)] = dy[n, oh, ow, co] where
//          ih + p - kh = oh*s exactly (tap masks for stride > 1, no zero insertion), else 0;
//          B[(kh, kw, co), ci] = w[co, ci, kh, kw].
//
// The weight is read in torch's [Cout, Cin, KH, KW] layout and dtype and rounded to the
// activation dtype while it is staged into shared memory (no packing launch). The forward's BN
// fold (from a batch summary, an earlier fold or the running statistics) is computed by every
// block into (dynamic) shared memory in the prologue, scale and shift of every input channel;
// block 0 also writes it out and updates the running statistics.
//
// Block: 128 threads (4 warps), tile BM rows (128, or 64 for small grids) x BN columns (16, 32 or
// 64), reduction chunks of 64 bytes per pixel (BK = 32 bf16/fp16 or 16 fp32 elements). Each warp
// owns BM/4 rows x BN. Pipeline: register-staged double buffering. Chunk c+1 is fetched from
// global memory into registers while chunk c is multiplied from shared memory; the BN affine +
// ReLU is applied when the registers are written to the other shared buffer; one __syncthreads
// per chunk. Math: bf16/fp16 through mma.sync m16n8k16 (fp32 accumulators); fp32 through exact
// FFMA with the same accumulator ownership, so the epilogue is common.
// Epilogue: accumulators are staged in shared memory as fp32 and written back as 16-byte vectors
// per row; forward adds the residual, rounds, stores and (want_stats) summarises the stored values
// of the tile (pivot = its first row, two passes); dgrad applies the ReLU mask of the forward,
// stores g and sums g and g*(x - mean). Tile results are merged in the same launch by the
// fixed-order tree of reduce.cuh.
#pragma once

#include "../bn/fold.cuh"
#include "../reduce.cuh"

namespace preact_fused {

template <typename T, int BM_, int BN_>
struct IgemmConfig {
  static constexpr int kThreads = 128;
  static constexpr int BM = BM_;                          // pixels per tile (128 or 64)
  static constexpr int BN = BN_;                          // channels per tile
  static constexpr int kVec = Elem<T>::kVec;              // elements per 16-byte vector
  static constexpr int BK = 64 / static_cast<int>(sizeof(T));  // reduction elements per chunk
  static constexpr int kVecPerRow = BK / kVec;            // 4
  static constexpr int kLds = BK + 16 / static_cast<int>(sizeof(T));  // smem row: 80 bytes
  static constexpr int kARowsPerPass = kThreads / kVecPerRow;        // 32
  static constexpr int kAIters = BM / kARowsPerPass;                 // 4 or 2
  static constexpr int kBPer = BN * BK / kThreads;        // weight elements per thread and chunk
  static constexpr int kBThreadsPerRow = BK / kBPer;      // threads sharing one B row
  static constexpr int kBWords = kBPer * static_cast<int>(sizeof(T)) / 4;
  static constexpr int kWarpRows = BM / 4;                // rows per warp
  static constexpr int kMT = kWarpRows / 16;              // m16 tiles per warp
  static constexpr int kNT = BN / 8;                      // n8 tiles per warp
  static constexpr int kLdc = BN + 8;                     // fp32 staging row (bank spread)
  static constexpr int kChunksPerRow = BN / kVec;         // epilogue: vectors per row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = BM / kRowsPerPass;
  static constexpr int kMainBytes = 2 * (BM + BN) * kLds * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = BM * kLdc * 4;
  static constexpr int kSmemBytes = kMainBytes > kStageBytes ? kMainBytes : kStageBytes;
  // Blocks per multiprocessor for __launch_bounds__: tiles up to 128x16 are capped at 128
  // registers, 128x64 at 168 (three blocks per multiprocessor); all spill-free on sm_90.
  static constexpr int kMinBlocks = BM * BN <= 128 * 16 ? 4 : (BM * BN >= 128 * 64 ? 3 : 1);
  static_assert(kVecPerRow == 4, "loader mapping assumes 4 vectors per row");
  static_assert(kBPer * kBThreadsPerRow == BK && kBWords >= 1, "weight loader mapping");
  static_assert(kMT >= 1 && kPasses >= 1, "tile mapping");
  static_assert(kChunksPerRow <= kWarp && kWarp % kChunksPerRow == 0, "epilogue mapping");
  static_assert(kSmemBytes + 4 * 4 * BN <= 40 * 1024, "static shared memory limit");
};

template <typename T>
struct IgemmParams {
  const T* src;            // gather source, NHWC [n, src_h, src_w, src_c] (fwd: x, dgrad: dy)
  int src_h, src_w, src_c;
  int row_h, row_w;        // pixel grid of the rows (fwd: ho, wo; dgrad: h, w)
  int rows;                // n * row_h * row_w
  int kw, stride, pad;     // taps along w, conv stride and padding
  int k;                   // reduction length kh*kw*src_c
  const void* wt;          // torch weight [cout, cin, kh, kw], w_dtype, taps (kh, kw) at tap * w_tap_stride
  DType w_dtype;
  int w_row_stride;        // element stride of B's column index n in wt (fwd: co's, dgrad: ci's)
  int w_c_stride;          // element stride of the reduction channel c (fwd: ci's, dgrad: co's)
  int w_tap_stride;        // element stride of tap = kh*KW + kw (1 contiguous, cin channels_last)
  int cols;                // columns (fwd: cout, dgrad: cin)
  int tiles, col_tiles;    // ceil(rows / BM), ceil(cols / BN)
  BnFoldArgs bn;           // fwd: the loader's BatchNorm (c = src_c), kNone for the identity
  bool a_vec;              // src_c % kVec == 0 and src 16-byte aligned: vector gathers
  T* out;                  // [rows, cols]
  bool out_vec;            // cols % kVec == 0 and out/residual/ex 16-byte aligned
  const T* residual;       // fwd: [rows, cols] or nullptr
  float* stats;            // fwd: [4, cols] summary of the stored output, or nullptr
  const T* ex;             // dgrad: pre-BN input x [rows, cols], or nullptr (no mask, no sums)
  const float* e_fold;     // dgrad: [4, cols] mean, invstd, scale, shift
  float* sums;             // dgrad: [3, cols] sum_g, sum_gx, sum_gx * invstd
  float* ws;               // tree workspace [tiles + groups, planes, cols] (stats or sums)
  int* counters;           // [col_tiles, groups + 1] zeroed arrival counters
};

template <typename T, int BM, int BN, bool kDgrad>
__global__ void __launch_bounds__(128, (IgemmConfig<T, BM, BN>::kMinBlocks)) igemm_conv_kernel(const IgemmParams<T> p) {
  using Cfg = IgemmConfig<T, BM, BN>;
  constexpr int BK = Cfg::BK, kVec = Cfg::kVec, kLds = Cfg::kLds;
  constexpr int kAIters = Cfg::kAIters, kBPer = Cfg::kBPer;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kLdc = Cfg::kLdc, kWarpRows = Cfg::kWarpRows;
  constexpr bool kTensorCores = sizeof(T) == 2;

  __shared__ __align__(16) unsigned char smem[Cfg::kSmemBytes];
  __shared__ float red[2][4][BN];
  __shared__ float col_a[BN], col_b[BN];
  __shared__ int flag;
  PF_DYNAMIC_SHARED(float, fold_tab);              // fwd with BN: [2][src_c] scale, shift
  T* const As = reinterpret_cast<T*>(smem);        // [2][BM][kLds]
  T* const Bs = As + 2 * BM * kLds;                // [2][BN][kLds]
  float* const Cs = reinterpret_cast<float*>(smem);  // [BM][kLdc], after the main loop

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int tile_m = blockIdx.x / p.col_tiles;
  const int tile_n = blockIdx.x - tile_m * p.col_tiles;
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const bool a_bn = !kDgrad && p.bn.source != BnSource::kNone;

  // ---- prologue: the loader's BN fold into shared memory; block 0 publishes it ---------------
  if (a_bn) {
    for (int c = tid; c < p.src_c; c += Cfg::kThreads) {
      const Fold f = fold_channel(p.bn, c);
      fold_tab[c] = f.scale;
      fold_tab[p.src_c + c] = f.shift;
    }
    if (blockIdx.x == 0 && p.bn.fold_out != nullptr) write_fold_block(p.bn);
  }
  auto chan_fold = [&](int c, float& sc, float& sh) {
    sc = fold_tab[c];
    sh = fold_tab[p.src_c + c];
  };

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
  uint32_t b_reg[Cfg::kBWords];

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
          a_sc[j] = 0.f;
          a_sh[j] = 0.f;
          if (kvalid) chan_fold(c + j, a_sc[j], a_sh[j]);
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
          float sc = 1.f, sf = 0.f;
          if (a_bn) chan_fold(c, sc, sf);
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

  // ---- B: kBPer consecutive reduction elements of one column, straight from torch's weight ----
  // fwd: consecutive threads take consecutive k of a column (contiguous for 1x1 kernels);
  // dgrad: consecutive threads take consecutive columns ci (contiguous for 1x1 kernels).
  const int b_row = kDgrad ? tid % BN : tid / Cfg::kBThreadsPerRow;
  const int b_kk0 = (kDgrad ? tid / BN : tid % Cfg::kBThreadsPerRow) * kBPer;
  const bool b_row_ok = n0 + b_row < p.cols;
  const int b_row_off = (n0 + b_row) * p.w_row_stride;

  auto load_b = [&](int chunk) {
    const int k0 = chunk * BK + b_kk0;
    int tap = k0 / p.src_c;
    int c = k0 - tap * p.src_c;
#pragma unroll
    for (int w = 0; w < Cfg::kBWords; ++w) b_reg[w] = 0u;
#pragma unroll
    for (int e = 0; e < kBPer; ++e) {
      float v = 0.f;
      if (b_row_ok && k0 + e < p.k) v = load_any(p.wt, p.w_dtype, b_row_off + c * p.w_c_stride + tap * p.w_tap_stride);
      if constexpr (sizeof(T) == 4) {
        b_reg[e] = __float_as_uint(v);
      } else {
        b_reg[e >> 1] |= float_to_bits<T>(v) << ((e & 1) * 16);
      }
      if (++c == p.src_c) {
        c = 0;
        ++tap;
      }
    }
  };

  auto store_b = [&](int buf) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(Bs + buf * BN * kLds + b_row * kLds + b_kk0);
#pragma unroll
    for (int w = 0; w < Cfg::kBWords; ++w) dst[w] = b_reg[w];
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
          const T* r0 = Ab + (warp * kWarpRows + mt * 16 + g) * kLds + ks * 16 + 2 * t4;
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
          for (int h = 0; h < 2; ++h) av[mt][h] = to_float(Ab[(warp * kWarpRows + mt * 16 + h * 8 + g) * kLds + kk]);
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
  const int chunks = ceil_div_dev(p.k, BK);
  __syncthreads();  // the fold table is complete
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
      const int row = warp * kWarpRows + mt * 16 + g, col = nt * 8 + 2 * t4;
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
  const int groups = ceil_div_dev(p.tiles, kTreeGroup);
  int* const counters = p.counters != nullptr ? p.counters + static_cast<long long>(tile_n) * (groups + 1) : nullptr;

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
          for (int j = 0; j < kVec; ++j) Cs[r * kLdc + cc * kVec + j] = v[j];
        }
      }
    }
    if (p.stats != nullptr) {  // block-uniform
      // Summary of the tile's stored values per column: pivot = row 0, offset = mean - pivot, M2.
      __syncthreads();
      if (tid < BN) col_b[tid] = Cs[tid];
      __syncthreads();
      float s1[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) s1[j] = 0.f;
#pragma unroll
      for (int ps = 0; ps < Cfg::kPasses; ++ps) {
        const int r = rr + ps * kRpp;
        if (r < count && col_in) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) s1[j] += Cs[r * kLdc + cc * kVec + j] - col_b[cc * kVec + j];
        }
      }
      reduce_to_smem(s1, 0);
      __syncthreads();
      if (tid < BN) col_a[tid] = block_total(0, tid) / static_cast<float>(count);
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
            const float d = (Cs[r * kLdc + cc * kVec + j] - col_b[cc * kVec + j]) - col_a[cc * kVec + j];
            s2[j] = fmaf(d, d, s2[j]);
          }
        }
      }
      reduce_to_smem(s2, 1);
      __syncthreads();
      float mine[4] = {0.f, 0.f, 0.f, 0.f};
      if (tid < BN) {
        mine[0] = static_cast<float>(count);
        mine[1] = col_b[tid];
        mine[2] = col_a[tid];
        mine[3] = block_total(1, tid);
      }
      const long long cols = p.cols;
      tree_reduce<4>(p.ws, counters, p.tiles, tile_m, p.cols, n0, BN, mine, MergeSummary{},
                     [&](int col, const float (&t)[4]) {
                       p.stats[col] = t[0];
                       p.stats[cols + col] = t[1];
                       p.stats[2 * cols + col] = t[2];
                       p.stats[3 * cols + col] = t[3];
                     },
                     &flag);
    }
  } else {
    const bool bn = p.ex != nullptr;
    const long long cols = p.cols;
    float sc[kVec], sf[kVec], mu[kVec], sg[kVec], sgx[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool in = bn && col0 + j < p.cols;
      mu[j] = in ? __ldg(p.e_fold + col0 + j) : 0.f;
      sc[j] = in ? __ldg(p.e_fold + 2 * cols + col0 + j) : 0.f;
      sf[j] = in ? __ldg(p.e_fold + 3 * cols + col0 + j) : 0.f;
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
            // g = da where the forward's ReLU passes (!(z <= 0): z > 0 or NaN), else 0; the sums
            // are of g before it is rounded.
            const float gv = bn_affine(xf[j], sc[j], sf[j]) <= 0.f ? 0.f : v[j];
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
      float mine[2] = {0.f, 0.f};
      if (tid < BN) {
        mine[0] = block_total(0, tid);
        mine[1] = block_total(1, tid);
      }
      tree_reduce<2>(p.ws, counters, p.tiles, tile_m, p.cols, n0, BN, mine, MergeSums{},
                     [&](int col, const float (&t)[2]) {
                       p.sums[col] = t[0];
                       p.sums[cols + col] = t[1];
                       p.sums[2 * cols + col] = t[1] * __ldg(p.e_fold + cols + col);
                     },
                     &flag);
    }
  }
}

// Launch the kernel for a tile shape (BM from the host's conv_tile_rows, BN from conv_tile_cols).
template <typename T, int BM, int BN, bool kDgrad>
cudaError_t launch_igemm_tile(const IgemmParams<T>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.tiles) * static_cast<unsigned>(p.col_tiles));
  // The forward's BN fold table: scale and shift of every input channel.
  const int smem = (!kDgrad && p.bn.source != BnSource::kNone) ? 8 * p.src_c : 0;
  PF_RETURN_IF_ERROR(allow_dynamic_shared(igemm_conv_kernel<T, BM, BN, kDgrad>, smem));
  PF_LAUNCH_SMEM((igemm_conv_kernel<T, BM, BN, kDgrad>), grid, 128, smem, stream, p);
  return cudaGetLastError();
}

template <typename T, bool kDgrad, int BM>
cudaError_t launch_igemm_bm(const IgemmParams<T>& p, cudaStream_t stream) {
  switch (conv_tile_cols(p.cols)) {
    case 16: return launch_igemm_tile<T, BM, 16, kDgrad>(p, stream);
    case 32: return launch_igemm_tile<T, BM, 32, kDgrad>(p, stream);
    default: return launch_igemm_tile<T, BM, 64, kDgrad>(p, stream);
  }
}

template <typename T, bool kDgrad>
cudaError_t launch_igemm(const IgemmParams<T>& p, int tile_rows, cudaStream_t stream) {
  return tile_rows == 64 ? launch_igemm_bm<T, kDgrad, 64>(p, stream) : launch_igemm_bm<T, kDgrad, 128>(p, stream);
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The GEMM geometry shared by the forward and dgrad: rows are the pixels of the [s.n, row_h, row_w]
// grid, the gathered operand src is NHWC [s.n, src_h, src_w, src_c] (fwd: x, dgrad: dy), the
// reduction runs over the s.kh * s.kw taps of src_c channels against torch's weight (element
// (co, ci, kh, kw) at co*ws.co + ci*ws.ci + (kh*KW + kw)*ws.tap), and the
// output has `cols` columns. Loader and epilogue fields are left to the caller.
template <typename T>
void set_igemm_geometry(IgemmParams<T>& p, const ConvShape& s, bool dgrad, const void* src, int src_h, int src_w,
                        int src_c, int row_h, int row_w, int cols, const void* weight, DType w_dtype,
                        const WeightStrides& ws, int tile_rows) {
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
  p.wt = weight;
  p.w_dtype = w_dtype;
  p.w_row_stride = dgrad ? ws.ci : ws.co;
  p.w_c_stride = dgrad ? ws.co : ws.ci;
  p.w_tap_stride = ws.tap;
  p.cols = cols;
  p.tiles = ceil_div(p.rows, tile_rows);
  p.col_tiles = ceil_div(cols, conv_tile_cols(cols));
  p.a_vec = src_c % Elem<T>::kVec == 0 && aligned16(src);
}

}  // namespace preact_fused
