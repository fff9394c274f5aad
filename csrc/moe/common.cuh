// Device helpers shared by the moe kernels: warp shuffles of ints, maxima, fp8 conversions and
// the activations, on top of kpt/compat.h (one source for nvcc and hipcc).
#pragma once

#include <math.h>

#include "kpt/compat.h"
#include "kpt/moe.h"

namespace kpt_moe {

using kpt::bf16;
using kpt::fp16;
using kpt::kWarpSize;

KPT_DEVICE float neg_inf() { return __uint_as_float(0xff800000u); }

KPT_DEVICE int shfl_xor_int(int v, int mask) {
#ifdef KPT_HIP
  return __shfl_xor(v, mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

KPT_DEVICE float warp_max(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = fmaxf(v, kpt::shfl_xor(v, m));
  return v;
}

// One 16-bit value (raw bits) to float.
template <class T>
KPT_DEVICE float half_to_float(uint16_t u) {
  return kpt::Half<T>::unpack(uint32_t(u)).x;
}

// The local expert of a global id, or -1 (not on this rank, or an id / map entry out of range:
// the tables are never trusted, a bad entry drops the pair instead of reading out of bounds).
KPT_DEVICE int local_expert(int global, const int32_t* map, int64_t global_experts,
                            int64_t local_experts) {
  if (global < 0 || global >= global_experts) return -1;
  const int local = map != nullptr ? map[global] : global;
  return local >= 0 && local < local_experts ? local : -1;
}

// ---- fp8 e4m3 ------------------------------------------------------------------------------------

constexpr float kE4m3Max = 448.f;

// float -> e4m3 (float8_e4m3fn) code, round to nearest even, NaN -> 0x7f. The caller has
// saturated |v| <= 448, so no value rounds past the largest finite code (0x7e). In software:
// gfx90a has no fp8 conversion and the same bits are wanted from both builds.
KPT_DEVICE uint8_t float_to_e4m3(float v) {
  const uint32_t bits = __float_as_uint(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const float a = fabsf(v);
  if (!(a == a)) return uint8_t(sign | 0x7fu);
  uint32_t code;
  if (a < 0.015625f) {
    // Subnormal range (below 2^-6): multiples of 2^-9. a * 512 is exact and rintf rounds to
    // nearest even; 8 (= 2^-6) is the smallest normal, whose code is 0x08 as well.
    code = uint32_t(rintf(a * 512.f));
  } else {
    // Normal: keep 3 mantissa bits of the float with round to nearest even on the rest.
    const uint32_t u = __float_as_uint(a);
    const uint32_t rounded = u + 0x7ffffu + ((u >> 20) & 1u);
    const uint32_t exp = (rounded >> 23) - 127u + 7u;
    code = (exp << 3) | ((rounded >> 20) & 7u);
  }
  return uint8_t(sign | code);
}

// Four e4m3 codes (one 32-bit word, element 0 in the low byte) -> the fp16 bit patterns of
// value / 2^8, exactly (subnormals included): one byte permute puts each code on top of a zero
// byte, then exponent and mantissa move one bit down. lo holds elements 0 and 1, hi 2 and 3.
KPT_DEVICE void e4m3x4_to_half(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404u);
  hi = __byte_perm(w, 0u, 0x3424u);
  lo = (lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u);
  hi = (hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u);
}

// The value of one e4m3 code as a float (exact).
KPT_DEVICE float e4m3_to_float(uint8_t c) {
  uint32_t lo, hi;
  e4m3x4_to_half(uint32_t(c), lo, hi);
  return kpt::Half<fp16>::unpack(lo).x * 256.f;
}

// ---- activations ---------------------------------------------------------------------------------

// act(gate) * up in float32, as torch computes them (silu: x / (1 + exp(-x)); gelu: the erf
// form; gelu_tanh: torch's tanh approximation).
KPT_DEVICE float gated(int activation, float gate, float up) {
  float a;
  if (activation == KPT_MOE_SILU) {
    a = gate / (1.f + expf(-gate));
  } else if (activation == KPT_MOE_GELU) {
    a = 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f));
  } else {
    const float inner = 0.79788456080286536f * (gate + 0.044715f * gate * gate * gate);
    a = 0.5f * gate * (1.f + tanhf(inner));
  }
  return a * up;
}

}  // namespace kpt_moe
