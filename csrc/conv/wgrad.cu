// conv_wgrad: dW[co, (kh, kw, ci)] = sum over output pixels m of dy[m, co] * P(x)[pixel(m) + tap, ci].
//
// GEMM with rows j = (kh, kw, ci) (the forward's reduction index), columns co, reduction over the
// N*Ho*Wo output pixels. The P(x) tile is gathered exactly like the forward's A operand (BN affine
// + ReLU recomputed from the pre-BN x, zero padding after the activation).
// Block: 128 threads, tile 64 rows (j) x BN columns (co), 4 warps of 16 rows; reduction chunks of
// 64 bytes per row (32 pixels bf16/fp16, 16 pixels fp32), register-staged double buffering.
// Both operands are pixel-major in global memory ([pixel][j], [pixel][co]) and are stored so in
// shared memory; bf16/fp16 fragments come from ldmatrix .trans, fp32 is exact FFMA.
// Split-K: blockIdx.y takes a contiguous slice of pixels and writes its partial tile (zeros for an
// empty slice) to partials[split]; the last split of a tile to arrive (arrival counter per output
// tile, reset by it) sums the splits' partials in split order 0..S-1 (deterministic, whatever the
// arrival order) and writes dW in torch's [cout, cin, kh, kw] layout. One split writes dW directly.
// conv_wgrad_bn_backward: dy is computed in the dy loader as bn_backward(g, bn_x) of the BatchNorm
// that follows the conv (backward.cuh's formula, rounded to T, 0 off the tile), applied when the
// registers are written to shared memory; the blocks of row tile 0 also store it, each element once.
#include "../bn/backward.cuh"
#include "../reduce.cuh"

namespace preact_fused {

template <typename T, int BN_>
struct WgradConfig {
  static constexpr int kThreads = 128;
  static constexpr int BJ = 64;                                   // rows j per tile
  static constexpr int BN = BN_;                                  // columns co per tile
  static constexpr int kVec = Elem<T>::kVec;
  static constexpr int BP = 64 / static_cast<int>(sizeof(T));    // pixels per chunk
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLdx = BJ + kPad;                          // 144 / 272 bytes
  static constexpr int kLdd = BN + kPad;
  static constexpr int kXVecPerPix = BJ / kVec;                   // 8 / 16
  static constexpr int kXPixPerPass = kThreads / kXVecPerPix;     // 16 / 8
  static constexpr int kXIters = BP / kXPixPerPass;               // 2
  static constexpr int kDVecPerPix = BN / kVec;
  static constexpr int kDVecs = BP * kDVecPerPix;
  static constexpr int kDIters = (kDVecs + kThreads - 1) / kThreads;
  static constexpr int kNT = BN / 8;
  static_assert(kNT % 2 == 0, "ldmatrix x4 loads two n8 tiles");
  static_assert(kXIters * kXPixPerPass == BP, "x loader mapping");
};

template <typename T>
struct WgradParams {
  const T* x;              // [n, h, w, cin]
  const T* dy;             // [n, ho, wo, cout]
  int h, w, cin, ho, wo, cout;
  int kw, stride, pad;
  int kfwd;                // kh*kw*cin
  int pixels;              // n*ho*wo
  const float* fold;       // [4, cin] mean, invstd, scale, shift, or nullptr (identity)
  const T* bn_x;           // conv_wgrad_bn_backward, training: [n, ho, wo, cout] the next BN's input, else nullptr
  const float* bn_fold;    // conv_wgrad_bn_backward: [4, cout] its fold, else nullptr (dy given)
  const float* bn_sums;    // conv_wgrad_bn_backward, training: [3, cout] its sums
  float bn_count;          // its element count per channel
  bool bn_training;
  T* dy_out;               // conv_wgrad_bn_backward: [n, ho, wo, cout] the dy computed
  bool x_vec;              // cin % kVec == 0 and x 16-byte aligned
  bool d_vec;              // cout % kVec == 0 and dy 16-byte aligned
  int chunks_per_split;    // pixel chunks (BP pixels) per split
  int col_tiles;           // ceil(cout / BN)
  int splits;
  float* partials;         // [splits, cout, kfwd] when splits > 1
  int* counters;           // [tiles] zeroed arrival counters when splits > 1
  float* dw;               // [cout, cin, kh, kw] with strides dw_stride (the weight's memory format)
  int dw_stride[4];        // dW has far fewer than 2^31 elements (the bindings check)
};

template <typename T, int BN>
__global__ void __launch_bounds__(128, 4) wgrad_kernel(const WgradParams<T> p) {
  using Cfg = WgradConfig<T, BN>;
  constexpr int BJ = Cfg::BJ, BP = Cfg::BP, kVec = Cfg::kVec, kLdx = Cfg::kLdx, kLdd = Cfg::kLdd;
  constexpr int kNT = Cfg::kNT;
  constexpr bool kTensorCores = sizeof(T) == 2;

  __shared__ __align__(16) T Xs[2][BP][kLdx];
  __shared__ __align__(16) T Ds[2][BP][kLdd];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int tile_j = blockIdx.x / p.col_tiles;
  const int tile_n = blockIdx.x - tile_j * p.col_tiles;
  const int j0 = tile_j * BJ, n0 = tile_n * BN;
  const int split = blockIdx.y;
  const long long pbeg = static_cast<long long>(split) * p.chunks_per_split * BP;
  const int pend = static_cast<int>(min(static_cast<long long>(p.pixels), pbeg + static_cast<long long>(p.chunks_per_split) * BP));
  const int chunks = pbeg < pend ? static_cast<int>((pend - pbeg + BP - 1) / BP) : 0;
  const bool has_bn = p.fold != nullptr;
  const int plane = p.ho * p.wo;

  // ---- x loader: fixed j vector, pixels x_p0 + kXPixPerPass * i of each chunk -----------------
  const int x_jv = tid % Cfg::kXVecPerPix;
  const int x_p0 = tid / Cfg::kXVecPerPix;
  const int xj = j0 + x_jv * kVec;
  // Vector path: the thread's tap and channels are fixed for the whole block.
  const bool xj_valid = xj < p.kfwd;
  int x_kh = 0, x_kw = 0, x_ci = 0;
  if (p.x_vec) {
    const int tap = xj / p.cin;
    x_ci = xj - tap * p.cin;
    x_kh = tap / p.kw;
    x_kw = tap - x_kh * p.kw;
  }
  // BN scale/shift of the tile's rows j (channel j % cin), zero past kfwd.
  __shared__ float sc_s[BJ], sh_s[BJ];
  if (tid < BJ) {
    const int j = j0 + tid;
    const bool in = has_bn && j < p.kfwd;
    const int ci = in ? j % p.cin : 0;
    sc_s[tid] = in ? __ldg(p.fold + 2 * p.cin + ci) : 0.f;
    sh_s[tid] = in ? __ldg(p.fold + 3 * p.cin + ci) : 0.f;
  }
  __syncthreads();
  uint4 x_reg[Cfg::kXIters];
  uint32_t x_ok = 0;

  // Element offset of input pixel (n, oh*s - pad + kh, ow*s - pad + kw) for output pixel pix, or -1.
  auto x_pixel = [&](int pix, int kh, int kw) -> long long {
    const int n = pix / plane;
    const int rem = pix - n * plane;
    const int oh = rem / p.wo;
    const int ow = rem - oh * p.wo;
    const int ih = oh * p.stride - p.pad + kh;
    const int iw = ow * p.stride - p.pad + kw;
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(p.h) || static_cast<unsigned>(iw) >= static_cast<unsigned>(p.w))
      return -1;
    return ((static_cast<long long>(n) * p.h + ih) * p.w + iw) * p.cin;
  };

  auto load_x = [&](int chunk) {
    x_ok = 0;
#pragma unroll
    for (int i = 0; i < Cfg::kXIters; ++i) {
      x_reg[i] = zero_vec();
      const long long pl = pbeg + static_cast<long long>(chunk) * BP + x_p0 + i * Cfg::kXPixPerPass;
      if (pl >= pend) continue;
      const int pix = static_cast<int>(pl);
      if (p.x_vec) {
        if (!xj_valid) continue;
        const long long off = x_pixel(pix, x_kh, x_kw);
        if (off >= 0) {
          x_reg[i] = ldg_vec(p.x + off + x_ci);
          x_ok |= 1u << i;
        }
      } else {
        // Scalar fallback: every element has its own tap; the activation is applied right away.
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int j = xj + e;
          if (j < p.kfwd) {
            const int tap = j / p.cin;
            const int ci = j - tap * p.cin;
            const int kh = tap / p.kw;
            const int kw = tap - kh * p.kw;
            const long long off = x_pixel(pix, kh, kw);
            if (off >= 0) {
              float v = to_float(p.x[off + ci]);
              if (has_bn) v = bn_relu(v, sc_s[x_jv * kVec + e], sh_s[x_jv * kVec + e]);
              set_elem<T>(x_reg[i], e, v);
            }
          }
        }
      }
    }
  };

  auto store_x = [&](int buf) {
#pragma unroll
    for (int i = 0; i < Cfg::kXIters; ++i) {
      uint4 v = x_reg[i];
      if (p.x_vec && has_bn && ((x_ok >> i) & 1u)) {
        float f[kVec];
        unpack<T>(v, f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) f[e] = bn_relu(f[e], sc_s[x_jv * kVec + e], sh_s[x_jv * kVec + e]);
        v = pack<T>(f);
      }
      *reinterpret_cast<uint4*>(&Xs[buf][x_p0 + i * Cfg::kXPixPerPass][x_jv * kVec]) = v;
    }
  };

  // ---- dy loader (with bn_fold: g and the next BN's input, dy computed when stored) -------------
  const bool bn_bwd = p.bn_fold != nullptr;
  const bool stores_dy = bn_bwd && tile_j == 0;
  __shared__ float coef_s[3][BN];  // bn_bwd: A, B, C of the tile's columns co (0 past cout)
  if (bn_bwd && tid < BN) {
    const int co = n0 + tid;
    const Coef k = co < p.cout ? bn_backward_coef(p.bn_fold, p.bn_sums, p.bn_count, p.bn_training, p.cout, co)
                               : Coef{0.f, 0.f, 0.f};
    coef_s[0][tid] = k.a;
    coef_s[1][tid] = k.b;
    coef_s[2][tid] = k.c;
  }
  __syncthreads();
  uint4 d_reg[Cfg::kDIters], q_reg[Cfg::kDIters];
  uint32_t d_ok = 0;  // bit i: vector i lies on the tile (pixel in the split, first column < cout)
  auto load_d = [&](int chunk) {
    d_ok = 0;
#pragma unroll
    for (int i = 0; i < Cfg::kDIters; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      d_reg[i] = zero_vec();
      q_reg[i] = zero_vec();
      if (idx >= Cfg::kDVecs) continue;
      const int pr = idx / Cfg::kDVecPerPix, dv = idx % Cfg::kDVecPerPix;
      const long long pl = pbeg + static_cast<long long>(chunk) * BP + pr;
      const int co = n0 + dv * kVec;
      if (pl >= pend || co >= p.cout) continue;
      d_ok |= 1u << i;
      const long long off = pl * p.cout + co;
      const bool read_x = bn_bwd && p.bn_training;
      if (p.d_vec) {
        d_reg[i] = ldg_vec(p.dy + off);
        if (read_x) q_reg[i] = ldg_vec(p.bn_x + off);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          if (co + e < p.cout) {
            set_elem<T>(d_reg[i], e, to_float(p.dy[off + e]));
            if (read_x) set_elem<T>(q_reg[i], e, to_float(p.bn_x[off + e]));
          }
        }
      }
    }
  };
  auto store_d = [&](int buf, int chunk) {
#pragma unroll
    for (int i = 0; i < Cfg::kDIters; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      if (idx >= Cfg::kDVecs) continue;
      const int pr = idx / Cfg::kDVecPerPix, dv = idx % Cfg::kDVecPerPix;
      if (bn_bwd && ((d_ok >> i) & 1u)) {
        const long long pl = pbeg + static_cast<long long>(chunk) * BP + pr;
        const int co = n0 + dv * kVec;
        float gf[kVec], xf[kVec];
        unpack<T>(d_reg[i], gf);
        unpack<T>(q_reg[i], xf);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int col = dv * kVec + e;
          const Coef k{coef_s[0][col], coef_s[1][col], coef_s[2][col]};
          gf[e] = co + e < p.cout ? to_float(from_float<T>(bn_backward_value(gf[e], xf[e], k, p.bn_training))) : 0.f;
        }
        d_reg[i] = pack<T>(gf);
        if (stores_dy) {
          T* dst = p.dy_out + pl * p.cout + co;
          if (p.d_vec) {
            *reinterpret_cast<uint4*>(dst) = d_reg[i];
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e)
              if (co + e < p.cout) dst[e] = from_float<T>(gf[e]);
          }
        }
      }
      *reinterpret_cast<uint4*>(&Ds[buf][pr][dv * kVec]) = d_reg[i];
    }
  };

  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[nt][c] = 0.f;

  auto compute = [&](int buf) {
    if constexpr (kTensorCores) {
      const int q = lane >> 3, r8 = lane & 7;
#pragma unroll
      for (int ks = 0; ks < BP / 16; ++ks) {
        // A (rows j, reduction pixels): matrix q = (pixel half q>>1, j half q&1).
        uint32_t af[4];
        ldmatrix_x4_trans(af, &Xs[buf][ks * 16 + (q >> 1) * 8 + r8][warp * 16 + (q & 1) * 8]);
#pragma unroll
        for (int nt = 0; nt < kNT; nt += 2) {
          // B (reduction pixels, columns co): matrix q = (pixel half q&1, n8 tile nt + (q>>1)).
          uint32_t bq[4];
          ldmatrix_x4_trans(bq, &Ds[buf][ks * 16 + (q & 1) * 8 + r8][(nt + (q >> 1)) * 8]);
          const uint32_t b0[2] = {bq[0], bq[1]};
          const uint32_t b1[2] = {bq[2], bq[3]};
          mma_16816<T>(acc[nt], af, b0);
          mma_16816<T>(acc[nt + 1], af, b1);
        }
      }
    } else {
#pragma unroll 4
      for (int kk = 0; kk < BP; ++kk) {
        float av[2], bv[kNT][2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) av[hh] = to_float(Xs[buf][kk][warp * 16 + hh * 8 + g]);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) bv[nt][jj] = to_float(Ds[buf][kk][nt * 8 + 2 * t4 + jj]);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) acc[nt][hh * 2 + jj] = fmaf(av[hh], bv[nt][jj], acc[nt][hh * 2 + jj]);
      }
    }
  };

  if (chunks > 0) {
    load_x(0);
    load_d(0);
    store_x(0);
    store_d(0, 0);
    __syncthreads();
    for (int c = 0; c < chunks; ++c) {
      const int buf = c & 1;
      const bool more = c + 1 < chunks;
      if (more) {
        load_x(c + 1);
        load_d(c + 1);
      }
      compute(buf);
      if (more) {
        store_x(buf ^ 1);
        store_d(buf ^ 1, c + 1);
      }
      __syncthreads();
    }
  }

  // acc[nt][i]: row j = j0 + warp*16 + g + 8*(i/2), column co = n0 + nt*8 + 2*t4 + i%2.
  // dW offset of (co, j = (kh*KW + kw)*cin + ci) through dW's strides.
  auto dw_index = [&](int co, int j) {
    const int tap = j / p.cin;
    const int ci = j - tap * p.cin;
    const int kh = tap / p.kw, kw = tap - kh * p.kw;
    return co * p.dw_stride[0] + ci * p.dw_stride[1] + kh * p.dw_stride[2] + kw * p.dw_stride[3];
  };
  // fn(co, j, acc value) for each of this thread's accumulators inside dW.
  auto each_output = [&](auto&& fn) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + warp * 16 + g + 8 * (i >> 1);
        const int co = n0 + nt * 8 + 2 * t4 + (i & 1);
        if (j < p.kfwd && co < p.cout) fn(co, j, acc[nt][i]);
      }
    }
  };
  if (p.splits == 1) {
    each_output([&](int co, int j, float v) { p.dw[dw_index(co, j)] = v; });
    return;
  }
  const long long split_stride = static_cast<long long>(p.cout) * p.kfwd;
  float* out = p.partials + static_cast<long long>(split) * split_stride;
  each_output([&](int co, int j, float v) { out[static_cast<long long>(co) * p.kfwd + j] = v; });
  __shared__ int flag;
  if (!arrive_last(p.counters + blockIdx.x, p.splits, &flag)) return;
  // The last split of this tile: dW = sum of the partials in split order.
  each_output([&](int co, int j, float) {
    const float* src = p.partials + static_cast<long long>(co) * p.kfwd + j;
    float sum = 0.f;
    for (int z = 0; z < p.splits; ++z) sum += load_cg(src + z * split_stride);
    p.dw[dw_index(co, j)] = sum;
  });
}

static int wgrad_pixels_per_chunk(DType dtype) { return dtype == DType::kFloat32 ? 16 : 32; }

int conv_wgrad_tiles(const ConvShape& s) {
  return ceil_div(static_cast<long long>(s.kh) * s.kw * s.cin, 64) * ceil_div(s.cout, conv_tile_cols(s.cout));
}

int conv_wgrad_splits(const ConvShape& s, DType dtype, int num_sms) {
  const long long pixels = static_cast<long long>(s.n) * s.ho * s.wo;
  const int chunks = ceil_div(pixels, wgrad_pixels_per_chunk(dtype));
  if (chunks <= 1) return 1;
  const int tiles = conv_wgrad_tiles(s);
  // About two blocks per multiprocessor in total, at least two chunks per split, at most 1024 splits.
  const int target = ceil_div(2LL * (num_sms > 0 ? num_sms : 1), tiles);
  int splits = target < 1 ? 1 : target;
  splits = splits > 1024 ? 1024 : splits;
  const int max_splits = ceil_div(chunks, 2);
  splits = splits > max_splits ? max_splits : splits;
  const int per = ceil_div(chunks, splits);
  return ceil_div(chunks, per);
}

template <typename T>
static cudaError_t run_conv_wgrad(const ConvWgradArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  constexpr int kVec = Elem<T>::kVec;
  WgradParams<T> p{};
  p.x = static_cast<const T*>(a.x);
  p.dy = static_cast<const T*>(a.dy);
  p.h = s.h;
  p.w = s.w;
  p.cin = s.cin;
  p.ho = s.ho;
  p.wo = s.wo;
  p.cout = s.cout;
  p.kw = s.kw;
  p.stride = s.stride;
  p.pad = s.pad;
  p.kfwd = s.kh * s.kw * s.cin;
  p.pixels = s.n * s.ho * s.wo;
  p.fold = a.fold;
  p.bn_x = static_cast<const T*>(a.bn_x);
  p.bn_fold = a.bn_fold;
  p.bn_sums = a.bn_sums;
  p.bn_count = a.bn_count;
  p.bn_training = a.bn_training;
  p.dy_out = static_cast<T*>(a.dy_out);
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
  p.x_vec = s.cin % kVec == 0 && aligned(a.x);
  p.d_vec = s.cout % kVec == 0 && aligned(a.dy) && aligned(a.bn_x) && aligned(a.dy_out);
  const int chunks = ceil_div(p.pixels, wgrad_pixels_per_chunk(a.dtype));
  p.chunks_per_split = ceil_div(chunks, a.splits);
  const int bn = conv_tile_cols(s.cout);
  p.col_tiles = ceil_div(s.cout, bn);
  p.splits = a.splits;
  p.partials = a.partials;
  p.counters = a.counters;
  p.dw = a.dw;
  for (int d = 0; d < 4; ++d) p.dw_stride[d] = static_cast<int>(a.dw_stride[d]);
  if (p.kfwd == 0 || s.cout == 0 || p.pixels == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(conv_wgrad_tiles(s)), static_cast<unsigned>(a.splits));
  switch (bn) {
    case 16: PF_LAUNCH((wgrad_kernel<T, 16>), grid, 128, stream, p); break;
    case 32: PF_LAUNCH((wgrad_kernel<T, 32>), grid, 128, stream, p); break;
    default: PF_LAUNCH((wgrad_kernel<T, 64>), grid, 128, stream, p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_conv_wgrad(const ConvWgradArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto t) { return run_conv_wgrad<decltype(t)>(a, stream); });
}

}  // namespace preact_fused
