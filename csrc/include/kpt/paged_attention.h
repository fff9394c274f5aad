// C ABI of the paged_attention kernels (csrc/paged_attention/kernels.cu).
//
// Plain C with no CUDA/HIP include, so the torch binding compiles with the host compiler alone.
// The stream travels as an opaque pointer (a cudaStream_t or hipStream_t; null = default
// stream). The launcher returns 0 on success, a positive CUDA/HIP error code when a launch
// failed, or a negative KPT_PA_* code for arguments the kernels do not handle; nothing aborts.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_PA_FP16 = 0,
  KPT_PA_BF16 = 1,
};

// The caches' element type: q's 16-bit type, or fp8 read back as value * scale.
enum {
  KPT_PA_KV_SAME = 0,
  KPT_PA_KV_E4M3 = 1,  // float8_e4m3fn (its NaN code 0x7f reads as 480)
  KPT_PA_KV_E5M2 = 2,
};

enum {
  KPT_PA_BAD_DTYPE = -1,
  KPT_PA_UNSUPPORTED = -2,   // a size or variant outside what the kernels handle
  KPT_PA_BAD_ARGUMENT = -3,  // null or misaligned pointer, bad size or stride
};

// Query rows (token, head) one CTA owns: a power of two <= KPT_PA_MAX_ROWS.
#define KPT_PA_MAX_ROWS 8
#define KPT_PA_MAX_HEAD_DIM 256
#define KPT_PA_MAX_SPLITS 256

// One call. Strides are in elements; every last dim is contiguous. q/out rows and cache rows
// must be 16-byte aligned (8-byte for fp8 caches): base pointers and every stride.
typedef struct {
  int dtype;     // KPT_PA_FP16 / KPT_PA_BF16: q and out
  int kv_dtype;  // KPT_PA_KV_*
  const void* q;  // (tokens, heads_q, head_dim)
  int64_t q_stride_token, q_stride_head;
  void* out;  // like q
  int64_t out_stride_token, out_stride_head;
  float* lse;  // natural log; element (token, head) at token * stride_token + head * stride_head
  int64_t lse_stride_token, lse_stride_head;
  const void* k_cache;  // pages of (page_size, heads_kv, head_dim) or (heads_kv, page_size, ...)
  int64_t k_stride_page, k_stride_slot, k_stride_head;
  const void* v_cache;
  int64_t v_stride_page, v_stride_slot, v_stride_head;
  const int32_t* block_table;  // (batch, max_pages), row stride table_stride
  int64_t table_stride;
  const int32_t* seq_lens;      // (batch,)
  const int32_t* cu_seqlens_q;  // (batch + 1,) token offsets; null: decode, token b = sequence b
  const float* k_scale;         // fp8 caches: 1 or heads_kv values (scale_per_head); else null
  const float* v_scale;
  int scale_per_head;
  // Split-KV workspace, (splits, tokens, heads_q, head_dim) and (splits, tokens, heads_q) float32,
  // contiguous; null when splits == 1.
  float* partial_out;
  float* partial_lse;
  int64_t batch, tokens, heads_q, heads_kv, head_dim;
  int64_t num_pages, max_pages, page_size;
  int64_t max_seqlen_q;  // decode: 1
  int64_t rows_per_cta;  // 1, 2, 4 or 8
  int64_t splits;        // CTAs sharing one sequence's keys, 1..KPT_PA_MAX_SPLITS
  int64_t min_split_keys;
  float scale, softcap;  // softcap 0: none
  int64_t window_left, window_right;  // -1: unbounded
} kpt_pa_args;

// out = softmax(scale * q k^T (soft-capped, masked)) v over each sequence's pages, lse with it.
int kpt_pa_forward(const kpt_pa_args* args, void* stream);

// Message for any code returned above.
const char* kpt_pa_error_string(int code);

#ifdef __cplusplus
}
#endif
