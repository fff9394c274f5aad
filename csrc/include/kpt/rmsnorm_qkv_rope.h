// C ABI of the rmsnorm_qkv_rope kernels (csrc/rmsnorm_qkv_rope/kernels.cu).
//
// Plain C with no CUDA/HIP include, so the torch binding compiles with the host compiler alone.
// The stream travels as an opaque pointer (a cudaStream_t or hipStream_t; null = default stream).
// Every launcher returns 0 on success, a positive CUDA/HIP error code when a launch failed, or a
// negative KPT_RQR_* code for arguments the kernels do not handle; nothing aborts.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_RQR_FP16 = 0,
  KPT_RQR_BF16 = 1,
};

enum {
  KPT_RQR_GEMV_MMA = 0,   // tensor-core mma.sync (NVIDIA sm_80+ only)
  KPT_RQR_GEMV_SIMT = 1,  // portable FMA version (HIP, and NVIDIA for comparison)
};

enum {
  KPT_RQR_BAD_DTYPE = -1,
  KPT_RQR_UNSUPPORTED = -2,  // a size or feature outside what the kernels handle
  KPT_RQR_BAD_ARGUMENT = -3,  // null or misaligned pointer, non-positive size
};

// h = x + residual (rounded; written to residual_out when residual is given), then
// xn = round(round(h * rstd) * weight) with fp32 statistics. x and residual rows are strided
// (elements), everything 16-byte aligned, hidden a multiple of 8.
int kpt_rqr_add_rmsnorm(int dtype, const void* x, int64_t x_row_stride, const void* residual,
                        int64_t residual_row_stride, void* residual_out, const void* weight,
                        void* xn, int64_t tokens, int64_t hidden, float eps, void* stream);

// Split-K partial products of the QKV projection: partials[s][t][n] = sum over the s-th slice
// of k of xn[t][k] * w[n][k], fp32. xn (tokens, k) and w (n, k) contiguous; tokens <= 32.
int kpt_rqr_gemv(int dtype, int impl, int row_tiles, const void* xn, const void* w,
                 float* partials, int64_t tokens, int64_t n, int64_t k, int64_t splits,
                 void* stream);

// Per (token, head): projected values -> optional per-head RMSNorm (q, k) -> RoPE (q, k),
// written to q (tokens, hq, d), k and v (tokens, hkv, d).
// splits > 0: qkv holds fp32 partials (splits, tokens, n) from kpt_rqr_gemv, summed in order,
// plus bias (may be null) in fp32, then rounded. splits == 0: qkv is the rounded (tokens, n)
// projection (bias already applied) and bias must be null.
// positions: int32 or int64 (pos_is_64), stride in elements; inv_freq: fp32 (rotary_dim / 2).
int kpt_rqr_epilogue(int dtype, const void* qkv, int64_t splits, const void* bias,
                     const void* q_norm_weight, const void* k_norm_weight, const void* positions,
                     int pos_is_64, int64_t pos_stride, const float* inv_freq, void* q, void* k,
                     void* v, int64_t tokens, int64_t hq, int64_t hkv, int64_t head_dim,
                     int64_t rotary_dim, float eps, int neox, void* stream);

// Message for any code returned above.
const char* kpt_rqr_error_string(int code);

#ifdef __cplusplus
}
#endif
