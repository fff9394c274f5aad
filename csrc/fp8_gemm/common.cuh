// Pieces every fp8_gemm kernel shares (gemm_mma.cu, gemm_simt.cu, api.cu, gemm_sm90.cu): fp8
// code conversions, the launch order of tiles, the K split, and the epilogue (scales constant
// along K, bias, one rounding to the output dtype), on top of kpt/compat.h.
#pragma once

#include <math.h>

#include "kpt/compat.h"
#include "kpt/fp8_gemm.h"

namespace kpt_fp8 {

using Args = kpt_fp8_gemm_args;
using kpt::bf16;
using kpt::fp16;

constexpr int kScaleK = KPT_FP8_GEMM_SCALE_K;  // one block scale, and every kernel's k-tile

// ---- fp8 codes ------------------------------------------------------------------------------

// Four codes (one 32-bit word, element 0 in the low byte) -> two fp16x2 words: lo holds
// elements 0 and 1, hi 2 and 3. One byte permute puts each code on top of a zero byte.
//   e5m2: that is the fp16 bit pattern of the same value (e5m2 is fp16's top byte: same
//         exponent bias, subnormals, infinities and NaNs), exactly.
//   e4m3: exponent and mantissa then move one bit down, which gives the fp16 pattern of
//         value / 2^8 exactly, subnormals included (4-bit exponent, bias 7, inside fp16's 5-bit
//         one, bias 15). The NaN codes (0x7f, 0xff) become +-1.875: callers that must keep NaN
//         test for them (widen_e4m3 is used only where that is documented).
KPT_DEVICE void widen_e5m2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404u);
  hi = __byte_perm(w, 0u, 0x3424u);
}

KPT_DEVICE void widen_e4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  widen_e5m2(w, lo, hi);
  lo = (lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u);
  hi = (hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u);
}

// The value of one code as a float, exactly (NaN codes give NaN).
template <int kFmt>
KPT_DEVICE float code_to_float(uint8_t c) {
  uint32_t lo, hi;
  if constexpr (kFmt == KPT_FP8_GEMM_E5M2) {
    widen_e5m2(uint32_t(c), lo, hi);
    return kpt::Half<fp16>::unpack(lo).x;
  } else {
    if ((c & 0x7fu) == 0x7fu) return __uint_as_float(0x7fc00000u);
    widen_e4m3(uint32_t(c), lo, hi);
    return kpt::Half<fp16>::unpack(lo).x * 256.f;
  }
}

// ---- launch order ---------------------------------------------------------------------------

// Tile (tm, tn) of launch index `pid`: groups of group_m tile rows, column by column inside a
// group, so that the CTAs running at once share the weight tiles of a few columns in L2.
KPT_DEVICE void grouped_tile(int64_t pid, int64_t tiles_m, int64_t tiles_n, int group_m,
                             int64_t& tm, int64_t& tn) {
  const int64_t per_group = int64_t(group_m) * tiles_n;
  const int64_t first = pid / per_group * group_m;
  const int64_t rows = tiles_m - first < group_m ? tiles_m - first : group_m;
  const int64_t in_group = pid % per_group;
  tm = first + in_group % rows;
  tn = in_group / rows;
}

// k-tiles [begin, end) of split `split` when every split takes `per_split` of them.
KPT_DEVICE void split_range(int64_t k, int per_split, int split, int& begin, int& end) {
  const int tiles = int((k + kScaleK - 1) / kScaleK);
  begin = split * per_split;
  end = begin + per_split < tiles ? begin + per_split : tiles;
}

// ---- scales ---------------------------------------------------------------------------------

// The k-tile's block scale of a row of a (1 where a's scale is not blockwise).
KPT_DEVICE float a_block_scale(const Args& p, int64_t row, int kt) {
  if (p.a_gran != KPT_FP8_GEMM_BLOCK || row >= p.m) return 1.f;
  return p.a_scale[row * p.a_scale_s0 + int64_t(kt) * p.a_scale_s1];
}

// The k-tile's block scale of w's rows n0.. (one 128-row block; 1 where not blockwise).
KPT_DEVICE float w_block_scale(const Args& p, int64_t n0, int kt) {
  if (p.w_gran != KPT_FP8_GEMM_BLOCK) return 1.f;
  return p.w_scale[(n0 / kScaleK) * p.w_scale_s0 + int64_t(kt) * p.w_scale_s1];
}

// The scales constant along K of a row of a / an output channel (1 where blockwise).
KPT_DEVICE float a_out_scale(const Args& p, int64_t row) {
  if (p.a_gran == KPT_FP8_GEMM_TENSOR) return p.a_scale[0];
  return p.a_gran == KPT_FP8_GEMM_ROW ? p.a_scale[row * p.a_scale_s0] : 1.f;
}

KPT_DEVICE float w_out_scale(const Args& p, int64_t col) {
  if (p.w_gran == KPT_FP8_GEMM_TENSOR) return p.w_scale[0];
  return p.w_gran == KPT_FP8_GEMM_ROW ? p.w_scale[col * p.w_scale_s0] : 1.f;
}

// ---- epilogue -------------------------------------------------------------------------------

KPT_DEVICE float load_as_float(const void* base, int dtype, int64_t i) {
  if (dtype == KPT_FP8_GEMM_FP32) return reinterpret_cast<const float*>(base)[i];
  const uint32_t bits = reinterpret_cast<const uint16_t*>(base)[i];
  return dtype == KPT_FP8_GEMM_BF16 ? kpt::Half<bf16>::unpack(bits).x
                                    : kpt::Half<fp16>::unpack(bits).x;
}

// v (the K sum of one output) -> times the scales constant along K (`scaled`: the caller
// applied every scale already), plus the bias, in float32 (the reference's rounding points up
// to the order of the float32 products).
KPT_DEVICE float finish(const Args& p, int64_t row, int64_t col, float v, bool scaled) {
  if (!scaled) v = v * a_out_scale(p, row) * w_out_scale(p, col);
  if (p.bias != nullptr) v += load_as_float(p.bias, p.bias_dtype, col * p.bias_stride);
  return v;
}

// Stores outputs (row, col) and (row, col + 1): col is even and N a multiple of 16, so both
// exist once col < n; one 4-byte (8-byte for float32) store.
KPT_DEVICE void store_pair(const Args& p, int64_t row, int64_t col, float v0, float v1,
                           bool scaled) {
  v0 = finish(p, row, col, v0, scaled);
  v1 = finish(p, row, col + 1, v1, scaled);
  char* dst = static_cast<char*>(p.out);
  const int64_t i = row * p.out_row + col;
  if (p.out_dtype == KPT_FP8_GEMM_FP32) {
    *reinterpret_cast<float2*>(dst + i * 4) = make_float2(v0, v1);
  } else if (p.out_dtype == KPT_FP8_GEMM_BF16) {
    *reinterpret_cast<uint32_t*>(dst + i * 2) = kpt::Half<bf16>::pack(v0, v1);
  } else {
    *reinterpret_cast<uint32_t*>(dst + i * 2) = kpt::Half<fp16>::pack(v0, v1);
  }
}

// One output (the portable tiles' columns are not adjacent).
KPT_DEVICE void store_one(const Args& p, int64_t row, int64_t col, float v, bool scaled) {
  v = finish(p, row, col, v, scaled);
  char* dst = static_cast<char*>(p.out);
  const int64_t i = row * p.out_row + col;
  if (p.out_dtype == KPT_FP8_GEMM_FP32) {
    reinterpret_cast<float*>(dst)[i] = v;
  } else if (p.out_dtype == KPT_FP8_GEMM_BF16) {
    reinterpret_cast<uint16_t*>(dst)[i] = uint16_t(kpt::Half<bf16>::pack(v, 0.f) & 0xffffu);
  } else {
    reinterpret_cast<uint16_t*>(dst)[i] = uint16_t(kpt::Half<fp16>::pack(v, 0.f) & 0xffffu);
  }
}

// ---- host side ------------------------------------------------------------------------------

// k-tiles per split and the splits that get any (every split >= 1 k-tile; <= split_k).
inline void split_plan(int64_t k, int split_k, int& per_split, int& splits) {
  const int tiles = int((k + kScaleK - 1) / kScaleK);
  const int want = split_k < 1 ? 1 : (split_k > tiles ? tiles : split_k);
  per_split = (tiles + want - 1) / want;
  splits = (tiles + per_split - 1) / per_split;
}

// The checks every launcher makes before touching the GPU: 0 or a KPT_FP8_GEMM_* code.
inline int check_args(const Args& p) {
  if (p.fmt != KPT_FP8_GEMM_E4M3 && p.fmt != KPT_FP8_GEMM_E5M2) return KPT_FP8_GEMM_BAD_DTYPE;
  for (int dtype : {p.out_dtype, p.bias_dtype}) {
    if (dtype != KPT_FP8_GEMM_FP16 && dtype != KPT_FP8_GEMM_BF16 && dtype != KPT_FP8_GEMM_FP32) {
      return KPT_FP8_GEMM_BAD_DTYPE;
    }
  }
  for (int gran : {p.a_gran, p.w_gran}) {
    if (gran < KPT_FP8_GEMM_TENSOR || gran > KPT_FP8_GEMM_BLOCK) return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  if (p.m < 0 || p.n <= 0 || p.k <= 0 || p.n % KPT_FP8_GEMM_ALIGN || p.k % KPT_FP8_GEMM_ALIGN) {
    return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  if (p.m == 0) return 0;
  if (p.a == nullptr || p.w == nullptr || p.out == nullptr || p.a_scale == nullptr ||
      p.w_scale == nullptr || p.a_row < p.k || p.w_row < p.k || p.out_row < p.n) {
    return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  if (p.split_k < 1 || p.split_k > KPT_FP8_GEMM_MAX_SPLIT_K || p.group_m < 1 ||
      (p.split_k > 1 && p.workspace == nullptr)) {
    return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  // Two-column stores of the output: 4 bytes (8 for float32) aligned.
  const int out_bytes = p.out_dtype == KPT_FP8_GEMM_FP32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(p.out) % (2 * out_bytes) || p.out_row % 2) {
    return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  return 0;
}

// Whether a and w can be read as 16-byte chunks (cp.async, TMA): bases and row strides.
inline bool chunk_aligned(const Args& p) {
  return reinterpret_cast<uintptr_t>(p.a) % 16 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0 &&
         p.a_row % 16 == 0 && p.w_row % 16 == 0;
}

// The tile launchers (gemm_mma.cu, gemm_simt.cu): the GEMM of p over `splits` K splits of
// `per_split` k-tiles, writing out (splits == 1) or the float32 workspace; 0 or an error code.
int launch_mma(const Args& p, int per_split, int splits, kpt::stream_t stream);
int launch_simt(const Args& p, kpt::stream_t stream);
bool mma_tile(int block_m, int block_n);
bool simt_tile(int block_m, int block_n);

}  // namespace kpt_fp8
