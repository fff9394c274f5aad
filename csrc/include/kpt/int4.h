// Dequantisation of kpt's int4 weight packing (kpt.ops.int4_gemm's layout: 8 unsigned 4-bit
// codes per 32-bit word, code j in bits 4j .. 4j + 3) exactly as its reference does:
//
//   w = round_to(T, float32(q - z) * float32(scale)),  z = zero point, or 8 when symmetric
//
// (q - z is a small integer, exact in float32, so the product is the one float32 rounding).
// Device helpers on top of kpt/compat.h; the in-register fast path (int4_magic ..
// int4_mma_k32: nibble floats, mma.sync fragments) is NVIDIA-only, the rest is portable.
#pragma once

#include "kpt/compat.h"
#include "kpt/ptx.h"

namespace kpt {

// Scale element types, numbered as KPT_INT4_* (kpt/int4_gemm.h) and KPT_MOE_* (kpt/moe.h).
constexpr int kInt4ScaleF16 = 0, kInt4ScaleBF16 = 1, kInt4ScaleF32 = 2;

// The zero point implied by symmetric quantisation: codes 0..15 hold -8..7.
constexpr int kInt4SymmetricZero = 8;

// One scale, read exactly as float32.
KPT_DEVICE float int4_scale(const void* base, int type, int64_t index) {
  if (type == kInt4ScaleF32) return static_cast<const float*>(base)[index];
  const uint32_t bits = static_cast<const uint16_t*>(base)[index];
  return type == kInt4ScaleF16 ? Half<fp16>::unpack(bits).x : Half<bf16>::unpack(bits).x;
}

// Four consecutive scales from p (16 bytes of float32 or 8 of a 16-bit type, aligned to that
// size), read exactly as float32.
KPT_DEVICE void int4_scales4(const void* p, int type, float (&s)[4]) {
  if (type == kInt4ScaleF32) {
    const uint4 u = *static_cast<const uint4*>(p);
    s[0] = __uint_as_float(u.x), s[1] = __uint_as_float(u.y);
    s[2] = __uint_as_float(u.z), s[3] = __uint_as_float(u.w);
    return;
  }
  const uint2 u = *static_cast<const uint2*>(p);
  float2 lo, hi;
  if (type == kInt4ScaleF16) {
    lo = Half<fp16>::unpack(u.x), hi = Half<fp16>::unpack(u.y);
  } else {
    lo = Half<bf16>::unpack(u.x), hi = Half<bf16>::unpack(u.y);
  }
  s[0] = lo.x, s[1] = lo.y, s[2] = hi.x, s[3] = hi.y;
}

// Code j (0..7) of `word` dequantised and rounded to T, the portable way.
template <class T>
KPT_DEVICE float int4_dequant(uint32_t word, int j, float zero, float scale) {
  return round_to<T>((float((word >> (4 * j)) & 0xfu) - zero) * scale);
}

#ifdef KPT_CUDA

// 2^(23 - 4j): the float whose mantissa takes nibble j (0..3) in place.
KPT_DEVICE float int4_magic(int j) { return __uint_as_float(uint32_t(150 - 4 * j) << 23); }

// Nibble j (0..3) of `w` as the float 2^(23 - 4j) + q, exactly: (w & mask) | exponent in one
// LOP3 (written out: the compiler splits an AND and an OR of two immediates into two).
template <int j>
KPT_DEVICE float int4_nibble_float(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n"
      : "=r"(r)
      : "r"(w), "n"(0xfu << (4 * j)), "n"(uint32_t(150 - 4 * j) << 23));
  return __uint_as_float(r);
}

// int4_nibble_float for a j known only after unrolling.
KPT_DEVICE float int4_nibble_float(uint32_t w, int j) {
  return j == 0   ? int4_nibble_float<0>(w)
         : j == 1 ? int4_nibble_float<1>(w)
         : j == 2 ? int4_nibble_float<2>(w)
                  : int4_nibble_float<3>(w);
}

// Channels 0..7 of a packed word, dequantised to float32, as the two k16 B fragments of
// mma.sync m16n8k16 in the k order of csrc/int4_gemm/gemm_mma.cu: b[s] holds channels
// 4s .. 4s + 3 as pairs {4s, 4s + 1}, {4s + 2, 4s + 3}, each rounded to T (cvt.rn).
template <class T>
KPT_DEVICE void int4_fragments(const float (&v)[8], uint32_t (&b)[2][2]) {
  b[0][0] = Half<T>::pack(v[0], v[1]);
  b[0][1] = Half<T>::pack(v[2], v[3]);
  b[1][0] = Half<T>::pack(v[4], v[5]);
  b[1][1] = Half<T>::pack(v[6], v[7]);
}

// One packed word (8 channels of one column) as int4_fragments, each channel float32
// (q - z) * scale. c[j] = int4_magic(j) + z: subtracting it from the nibble float leaves q - z
// exactly.
template <class T>
KPT_DEVICE void int4_dequant_word(uint32_t w, float scale, const float (&c)[4],
                                  uint32_t (&b)[2][2]) {
  const uint32_t hi = w >> 16;
  float v[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = (int4_nibble_float(w, j) - c[j]) * scale;
    v[j + 4] = (int4_nibble_float(hi, j) - c[j]) * scale;
  }
  int4_fragments<T>(v, b);
}

// int4_dequant_word's c for 4 columns, whose zero points are the 4 bytes of z4 (column a in
// bits 8a .. 8a + 7): c[a][j] = int4_magic(j) + zero point of column a.
KPT_DEVICE void int4_zero_constants(uint32_t z4, float (&c)[4][4]) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const float z = float((z4 >> (8 * a)) & 0xffu);
#pragma unroll
    for (int j = 0; j < 4; ++j) c[a][j] = int4_magic(j) + z;
  }
}

// acc[a] += one k32 block of rows g, g + 8 (xa, xb: their 16-byte chunk of channels 8t ..
// 8t + 7, lane (g, t)) times n8 tile a's int4_dequant_word fragments b[a]: both k16 steps.
template <class T>
KPT_DEVICE void int4_mma_k32(float (&acc)[4][4], const uint4& xa, const uint4& xb,
                             const uint32_t (&b)[4][2][2]) {
  const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y};
  const uint32_t a1[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    mma_m16n8k16<T>(acc[a], a0, b[a][0][0], b[a][0][1]);
    mma_m16n8k16<T>(acc[a], a1, b[a][1][0], b[a][1][1]);
  }
}

#endif  // KPT_CUDA

}  // namespace kpt
