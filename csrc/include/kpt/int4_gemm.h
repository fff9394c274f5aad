// C ABI of the int4_gemm kernels (csrc/int4_gemm): W4A16, out = x @ dequant(packed).T (+ bias).
//
// Plain C with no CUDA/HIP include, so the torch binding compiles with the host compiler alone.
// The stream travels as an opaque pointer (a cudaStream_t or hipStream_t; null = default
// stream). The launcher returns 0 on success, a positive CUDA/HIP error code when a launch
// failed, or a negative KPT_INT4_* code for arguments the kernels do not handle; nothing
// aborts. Nothing is read back on the host: the launcher is safe inside CUDA graph capture.
//
// Layout (kpt.ops.int4_gemm's docstring): packed (K / 8, N) int32, code q[n, 8i + j] in bits
// 4j..4j+3 of word (i, n); scales (G, N); zeros (G, N) uint8 or null (symmetric: 8); g_idx
// (K,) int32 or null (group of k = k / group_size). w = round(float(q - z) * float(scale)) to
// x's dtype, float32 sums, bias added to the float32 sum, one final rounding.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_INT4_FP16 = 0,
  KPT_INT4_BF16 = 1,
  KPT_INT4_FP32 = 2,  // scales and bias only
};

enum {
  KPT_INT4_IMPL_MMA = 0,   // tensor cores (mma.sync m16n8k16, sm_80+ CUDA builds only)
  KPT_INT4_IMPL_SIMT = 1,  // portable CUDA-core tiles: the HIP build, or forced for testing
};

enum {
  KPT_INT4_BAD_DTYPE = -1,
  KPT_INT4_UNSUPPORTED = -2,   // a size, tile or variant outside what the kernels handle
  KPT_INT4_BAD_ARGUMENT = -3,  // null or misaligned pointer, bad size or stride
};

// N must be a multiple of this: every thread owns whole runs of 8 output columns (one 16-byte
// store), and reads the weight, scales and zeros in runs of 4 columns.
#define KPT_INT4_N_MULTIPLE 8
// K (a multiple of 8, as the API requires) and N stay below this: 32-bit k and n indices,
// and a group shift of 30 stands for "one group" (per-channel).
#define KPT_INT4_MAX_DIM (1 << 30)
// Split-K shares at most this many.
#define KPT_INT4_MAX_SPLIT 64

typedef struct {
  int dtype;        // KPT_INT4_FP16 / BF16: x and out
  int scale_dtype;  // KPT_INT4_FP32 / FP16 / BF16
  int bias_dtype;   // KPT_INT4_FP32 or x's dtype; ignored without bias
  int impl;         // KPT_INT4_IMPL_*
  int block_m, block_n;  // an instantiated tile (kpt_int4_gemm_tile_k(impl, ...) > 0)
  int split;             // split-K shares asked for (>= 1); kpt_int4_gemm_split gives the
                         // number actually used, which sizes `partial`
  const void* x;         // (m, k), row stride x_row elements; 16-byte aligned rows
  int64_t x_row;
  const int32_t* packed;  // (k / 8, n), row stride packed_row words (a multiple of 4)
  int64_t packed_row;
  const void* scales;  // (groups, n), row stride scales_row elements (a multiple of 4)
  int64_t scales_row;
  const uint8_t* zeros;  // (groups, n), row stride zeros_row (a multiple of 4), or null
  int64_t zeros_row;
  const int32_t* g_idx;  // (k,) contiguous, or null; entries are clamped into 0..groups-1
  const void* bias;      // (n,) contiguous, or null
  void* out;             // (m, n) x's dtype, row stride out_row (a multiple of 8)
  int64_t out_row;
  float* partial;  // workspace (split used, m, n) float32 contiguous when it is > 1, else
                   // unused; every element is written before it is read
  int64_t m;
  int n, k;
  int groups;      // G: rows of scales / zeros
  int group_size;  // 32, 64, 128, 256, or -1 (per channel: groups == 1)
} kpt_int4_gemm_args;

// The K step of an instantiated tile (a multiple of 32), or 0 when (impl, block_m, block_n)
// is not one; on the HIP build only the portable tiles exist.
int kpt_int4_gemm_tile_k(int impl, int block_m, int block_n);

// Split-K shares actually used for `split` asked: every share gets whole K steps and at least
// one, so the count may come out lower. 1 means no workspace.
static inline int kpt_int4_gemm_split(int k, int tile_k, int split) {
  const int steps = (k + tile_k - 1) / tile_k;
  if (steps < 1 || split < 1) return 1;
  if (split > KPT_INT4_MAX_SPLIT) split = KPT_INT4_MAX_SPLIT;
  if (split > steps) split = steps;
  const int per = (steps + split - 1) / split;
  return (steps + per - 1) / per;
}

// out = x @ dequant(packed).T (+ bias); m == 0 launches nothing.
int kpt_int4_gemm(const kpt_int4_gemm_args* args, void* stream);

// The weight alone, dequantised as the GEMM kernels do: w (k, n) of args->dtype, row stride
// w_row elements (a multiple of 4, >= n), 8-byte aligned; w[k, c] is column c's weight for
// input channel k (the transpose of the nn.Linear weight). Reads args' packed, scales, zeros,
// g_idx, n, k, groups and group_size; x, bias, out, m, impl and the tile are ignored.
int kpt_int4_dequantize(const kpt_int4_gemm_args* args, void* w, int64_t w_row, void* stream);

// Message for any code returned above.
const char* kpt_int4_gemm_error_string(int code);

#ifdef __cplusplus
}
#endif
