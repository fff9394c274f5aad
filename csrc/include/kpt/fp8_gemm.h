// C ABI of the fp8_gemm kernels: y = (a8 * a_scale) @ (w8 * w_scale)^T (+ bias).
//
// csrc/fp8_gemm/api.cu serves kpt_fp8_gemm (tensor-core mma.sync tiles on sm_80+, portable
// CUDA-core tiles on any CUDA/HIP device); csrc/fp8_gemm/gemm_sm90.cu, built on its own for
// sm_90a, serves kpt_fp8_gemm_sm90 (TMA + wgmma). Plain C with no CUDA/HIP include, so the
// torch binding compiles with the host compiler alone. The stream travels as an opaque pointer
// (cudaStream_t / hipStream_t; null = default stream). Every launcher returns 0 on success, a
// positive CUDA/HIP error code when a launch failed, or a negative KPT_FP8_GEMM_* code for
// arguments the kernels do not handle; nothing aborts, nothing is read back on the host (safe
// inside CUDA graph capture).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_FP8_GEMM_E4M3 = 0,  // float8_e4m3fn codes
  KPT_FP8_GEMM_E5M2 = 1,  // float8_e5m2 codes
};

enum {  // output and bias dtypes
  KPT_FP8_GEMM_FP16 = 0,
  KPT_FP8_GEMM_BF16 = 1,
  KPT_FP8_GEMM_FP32 = 2,
};

enum {  // scale granularities (the Triton kernel's codes too)
  KPT_FP8_GEMM_TENSOR = 0,  // one float
  KPT_FP8_GEMM_ROW = 1,     // a: one per row (token); w: one per output channel
  KPT_FP8_GEMM_BLOCK = 2,   // a: one per (row, 128 k); w: one per (128 rows, 128 k)
};

enum {
  KPT_FP8_GEMM_IMPL_MMA = 0,   // mma.sync tensor-core tiles (CUDA sm_80+ builds only)
  KPT_FP8_GEMM_IMPL_SIMT = 1,  // portable CUDA-core tiles: the HIP build, or forced for testing
  KPT_FP8_GEMM_IMPL_SM90 = 2,  // TMA + wgmma (kpt_fp8_gemm_sm90, sm_90a builds only)
};

enum {
  KPT_FP8_GEMM_BAD_DTYPE = -1,
  KPT_FP8_GEMM_UNSUPPORTED = -2,   // a tile, size or variant the kernels do not instantiate
  KPT_FP8_GEMM_BAD_ARGUMENT = -3,  // null or misaligned pointer, bad size or stride
  KPT_FP8_GEMM_NO_DRIVER_API = -4,  // cuTensorMapEncodeTiled not found in the driver
  KPT_FP8_GEMM_TENSOR_MAP = -5,     // cuTensorMapEncodeTiled rejected a tensor map
};

// K extent of one block scale (a: 1x128, w: 128x128), and the k-tile of every kernel.
#define KPT_FP8_GEMM_SCALE_K 128
// N and K must be multiples of this (16-byte rows of fp8 codes; two-column stores).
#define KPT_FP8_GEMM_ALIGN 16
// Most K splits of one tile (grid y).
#define KPT_FP8_GEMM_MAX_SPLIT_K 16

typedef struct {
  int fmt;                // KPT_FP8_GEMM_E4M3 / E5M2: a and w alike
  int impl;               // KPT_FP8_GEMM_IMPL_*
  int block_m, block_n;   // an instantiated tile (kpt_fp8_gemm_tile_supported)
  int split_k;            // 1..KPT_FP8_GEMM_MAX_SPLIT_K: K tiles shared by that many CTAs
  int group_m;            // tile rows per group of the launch order (L2 reuse of w), >= 1
  const void* a;          // (m, k) codes, k contiguous, rows a_row bytes apart
  int64_t a_row;
  const void* w;          // (n, k) codes, k contiguous, rows w_row bytes apart
  int64_t w_row;
  int64_t m, n, k;        // m >= 0; n, k positive multiples of KPT_FP8_GEMM_ALIGN
  int a_gran, w_gran;     // KPT_FP8_GEMM_TENSOR / ROW / BLOCK
  const float* a_scale;   // element strides (0 allowed: broadcast views)
  int64_t a_scale_s0, a_scale_s1;
  const float* w_scale;
  int64_t w_scale_s0, w_scale_s1;
  const void* bias;       // (n,) or null, element stride bias_stride
  int bias_dtype;         // KPT_FP8_GEMM_FP16 / BF16 / FP32
  int64_t bias_stride;
  void* out;              // (m, n), unit column stride, rows out_row elements apart
  int out_dtype;          // KPT_FP8_GEMM_FP16 / BF16 / FP32
  int64_t out_row;
  float* workspace;       // split_k > 1: kpt_fp8_gemm_workspace(...) floats, else unused
} kpt_fp8_gemm_args;

// Floats of workspace a call needs (0 without a K split): one float32 partial tile per split.
static inline int64_t kpt_fp8_gemm_workspace(int64_t m, int64_t n, int split_k) {
  return split_k > 1 ? (int64_t)split_k * m * n : 0;
}

// Whether (impl, block_m, block_n) is an instantiated tile of kpt_fp8_gemm.
int kpt_fp8_gemm_tile_supported(int impl, int block_m, int block_n);

// out = (a * a_scale) @ (w * w_scale)^T (+ bias), impl MMA or SIMT.
int kpt_fp8_gemm(const kpt_fp8_gemm_args* args, void* stream);

// The same with impl SM90 (128 x 128 tiles, split_k 1); a separate build (sm_90a only).
int kpt_fp8_gemm_sm90(const kpt_fp8_gemm_args* args, void* stream);

// Message for any code returned above (csrc/fp8_gemm/errors.cu, in both builds): the runtime's
// own message for a positive CUDA/HIP error code.
const char* kpt_fp8_gemm_error_string(int code);

#ifdef __cplusplus
}
#endif
