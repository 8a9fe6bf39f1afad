// The BatchNorm backward's formula given the masked gradient g, per channel, on the device:
//
//   dx = ((A*g + B*x) + C), each step rounded as the reference's torch ops round it, with
//   A = scale, B = -scale * invstd * invstd * sum_gx / count, C = -scale * sum_g / count - B * mean
//   (B = C = 0 with running statistics: dx = A*g)
//
// bn_backward (bn.cu) and the weight gradient that computes its own dy from the next BatchNorm
// (conv_wgrad_bn_backward, wgrad.cu) both use these two functions, so their dx are the same bits.
#pragma once

#include "../common.cuh"

namespace preact_fused {

struct Coef {
  float a, b, c;
};

// fold: [4, c] mean, invstd, scale, shift; sums: [3, c] sum_g, sum_gx, dgamma (read in training).
__device__ __forceinline__ Coef bn_backward_coef(const float* fold, const float* sums, float count, bool training,
                                                 int c, int ch) {
  const long long cs = c;
  const float scale = __ldg(fold + 2 * cs + ch);
  Coef k{scale, 0.f, 0.f};
  if (training) {
    const float mean = __ldg(fold + ch), invstd = __ldg(fold + cs + ch);
    const float sum_g = __ldg(sums + ch), sum_gx = __ldg(sums + cs + ch);
    k.b = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(-scale, invstd), invstd), sum_gx), count);
    k.c = __fadd_rn(__fdiv_rn(__fmul_rn(-scale, sum_g), count), -__fmul_rn(k.b, mean));
  }
  return k;
}

// dx of one element (x is read only in training).
__device__ __forceinline__ float bn_backward_value(float g, float x, const Coef& k, bool training) {
  float d = __fmul_rn(g, k.a);
  if (training) d = __fadd_rn(__fadd_rn(d, __fmul_rn(x, k.b)), k.c);
  return d;
}

}  // namespace preact_fused
