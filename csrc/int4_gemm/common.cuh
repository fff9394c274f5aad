// What the int4_gemm kernels share: the call as they read it, group lookups, and the two
// epilogue stores (the final one: bias, one rounding to x's dtype; the split-K one: float32
// partial sums); scales and dequantisation are kpt/int4.h's (shared with moe's int4 experts).
// On top of kpt/compat.h: one source for nvcc and hipcc.
#pragma once

#include "kpt/compat.h"
#include "kpt/int4.h"
#include "kpt/int4_gemm.h"

namespace kpt_int4 {

using kpt::bf16;
using kpt::fp16;

// The kernels read scales and dequantise with kpt/int4.h, which takes scale_dtype as it is.
static_assert(KPT_INT4_FP16 == kpt::kInt4ScaleF16 && KPT_INT4_BF16 == kpt::kInt4ScaleBF16 &&
                  KPT_INT4_FP32 == kpt::kInt4ScaleF32,
              "int4 scale types are numbered as kpt/int4_gemm.h's dtypes");

// A checked call (launch.cu builds it from kpt_int4_gemm_args). Strides in elements.
struct Params {
  const char* x;
  int64_t x_row;
  const int32_t* packed;
  int64_t packed_row;
  const char* scales;
  int64_t scales_row;
  int scale_dtype;  // KPT_INT4_FP32 / FP16 / BF16
  int scale_bytes;  // 4 or 2
  const uint8_t* zeros;  // null: symmetric, zero point 8
  int64_t zeros_row;
  const int32_t* g_idx;  // null: group of k = k >> group_shift
  const char* bias;      // null: none
  int bias_fp32;         // else x's dtype
  char* out;
  int64_t out_row;
  float* partial;  // (split, m, n) when split > 1
  int64_t m;
  int n, k, groups;
  int group_shift;  // log2(group_size); 30 for per-channel (every k < 2^30 is in group 0)
  int k_per_split;  // K channels per split share, a multiple of the tile's K step
  int split;        // shares used (gridDim.y); > 1: partial sums to `partial`
};

// Tile order of a launch: GROUP_M row tiles take each column tile in turn, so that a wave of
// CTAs reads a band of x rows and a band of weight columns that both stay in L2.
KPT_DEVICE void tile_of(int pid, int m_tiles, int n_tiles, int& tm, int& tn) {
  constexpr int kGroupM = 8;
  const int per_group = kGroupM * n_tiles;
  const int first_m = (pid / per_group) * kGroupM;
  const int rows = m_tiles - first_m < kGroupM ? m_tiles - first_m : kGroupM;
  tm = first_m + (pid % per_group) % rows;
  tn = (pid % per_group) / rows;
}

// The group of input channel k. g_idx entries are clamped into 0..groups-1 (its content is
// never checked on a GPU; a bad entry must not read outside the scales).
KPT_DEVICE int group_of(const Params& p, int k) {
  if (p.g_idx != nullptr) {
    const int g = p.g_idx[k];
    return g < 0 ? 0 : (g >= p.groups ? p.groups - 1 : g);
  }
  return k >> p.group_shift;
}

template <class T>
KPT_DEVICE float bias_value(const Params& p, int col) {
  if (p.bias_fp32) return reinterpret_cast<const float*>(p.bias)[col];
  return kpt::Half<T>::unpack(reinterpret_cast<const uint16_t*>(p.bias)[col]).x;
}

// out[row, col .. col + W - 1] = round(v + bias): the only rounding of the result.
template <class T, int W>
KPT_DEVICE void store_final(const Params& p, int64_t row, int col, const float (&v)[W]) {
  static_assert(W == 4 || W == 8, "runs of 4 or 8 columns");
  float f[8];
#pragma unroll
  for (int i = 0; i < W; ++i) f[i] = p.bias != nullptr ? v[i] + bias_value<T>(p, col + i) : v[i];
  char* dst = p.out + (row * p.out_row + col) * 2;
  if constexpr (W == 8) {
    kpt::store16(dst, kpt::pack8<T>(f));
  } else {
    *reinterpret_cast<uint2*>(dst) =
        make_uint2(kpt::Half<T>::pack(f[0], f[1]), kpt::Half<T>::pack(f[2], f[3]));
  }
}

// Share `share`'s float32 partial sums of (row, col .. col + W - 1).
template <int W>
KPT_DEVICE void store_partial(const Params& p, int share, int64_t row, int col,
                              const float (&v)[W]) {
  float* dst = p.partial + (int64_t(share) * p.m + row) * p.n + col;
#pragma unroll
  for (int i = 0; i < W; i += 4) {
    *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}

template <class T, int W>
KPT_DEVICE void store_cols(const Params& p, int share, int64_t row, int col,
                           const float (&v)[W]) {
  if (p.split > 1) {
    store_partial<W>(p, share, row, col, v);
  } else {
    store_final<T, W>(p, row, col, v);
  }
}

// The launchers of each implementation (0 or an error code) and their tiles' K steps (0: no
// such tile). The HIP build has no tensor-core tiles.
int launch_mma(const Params& p, int dtype, int block_m, int block_n, kpt::stream_t stream);
int launch_simt(const Params& p, int dtype, int block_m, int block_n, kpt::stream_t stream);
// dequant.cu: p.out (K, N) of dtype = the dequantised weight, transposed (x, m unused).
int launch_dequant(const Params& p, int dtype, kpt::stream_t stream);
int mma_tile_k(int block_m, int block_n);
int simt_tile_k(int block_m, int block_n);

}  // namespace kpt_int4
