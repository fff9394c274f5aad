// C interface of the Hopper (sm_90a) flash-attention kernels: raw pointers, element strides
// and a stream, no torch. Forward in csrc/flash_attention_sm90/kernels.cu, backward in
// kernels_bwd.cu.
#pragma once

#include <cstdint>

#define KPT_FA90_FP16 0
#define KPT_FA90_BF16 1

// Kernel variants (see kpt/ops/flash_attention/SM90_NOTES.md).
#define KPT_FA90_VARIANT_BASE 0     // one S accumulator, no explicit warpgroup scheduling
#define KPT_FA90_VARIANT_OVERLAP 1  // next QK^T overlapped with softmax, ping-pong, deeper ring
#define KPT_FA90_VARIANT_PERSISTENT 2  // the overlap kernel with one CTA per SM walking tiles
#define KPT_FA90_VARIANT_DYNAMIC 3     // persistent, taking tiles from a counter (load balance)

#define KPT_FA90_OK 0
#define KPT_FA90_UNSUPPORTED 1      // a shape/stride/dtype the kernel does not handle
#define KPT_FA90_NO_DRIVER_API 2    // cuTensorMapEncodeTiled could not be resolved
#define KPT_FA90_TENSOR_MAP 3       // cuTensorMapEncodeTiled rejected a descriptor
#define KPT_FA90_CUDA_ERROR 4       // a CUDA runtime call or the launch failed

#ifdef __cplusplus
extern "C" {
#endif

// q (B, Sq, H, D), k and v (B, Sk, Hkv, D), out like q: strides in elements, given as
// {batch, seq, head} (the head_dim stride is 1). lse is contiguous float32 (B, H, Sq).
// window_left / window_right < 0 mean unbounded; causal is window_right == 0. softcap <= 0
// disables the soft cap. variant is a KPT_FA90_VARIANT_* value; KPT_FA90_VARIANT_DYNAMIC needs
// tile_counter, zeroed uint32 words in device memory that the launch counts tiles with (stream-
// ordered: one buffer per launch in flight), and every other variant NULL. split_workspace:
// NULL, or (dynamic only) float32 device memory that lets the launch split its last tiles.
// kpt_fa90_forward_scratch gives both sizes for a problem on the current device (the counter
// words must all be zero; the workspace need not be initialised). Returns KPT_FA90_OK or an
// error code (see kpt_fa90_error_string).
int kpt_fa90_forward(int dtype, int head_dim, const void* q, const int64_t* q_strides,
                     const void* k, const int64_t* k_strides, const void* v,
                     const int64_t* v_strides, void* out, const int64_t* out_strides, float* lse,
                     int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads,
                     int64_t heads_kv, float scale, float softcap, int64_t window_left,
                     int64_t window_right, int variant, unsigned int* tile_counter,
                     float* split_workspace, void* stream);
// Varlen: q and out (total_q, H, D), k and v (total_k, Hkv, D), strides {seq, head} in
// elements; sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and out and
// [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (int32 device arrays of batch + 1
// entries, non-decreasing, within the tensors, no sequence longer than max_seqlen_q /
// max_seqlen_k: the caller checks). lse is contiguous float32 (H, total_q); rows outside
// every sequence are not written. The overlap kernel's variants only (not
// KPT_FA90_VARIANT_BASE); the dynamic one needs one zeroed counter word and splits no tile.
int kpt_fa90_forward_varlen(int dtype, int head_dim, const void* q, const int64_t* q_strides,
                            const void* k, const int64_t* k_strides, const void* v,
                            const int64_t* v_strides, void* out, const int64_t* out_strides,
                            float* lse, const int* cu_seqlens_q, const int* cu_seqlens_k,
                            int64_t batch, int64_t total_q, int64_t total_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, int64_t heads, int64_t heads_kv, float scale,
                            float softcap, int64_t window_left, int64_t window_right, int variant,
                            unsigned int* tile_counter, void* stream);
int kpt_fa90_forward_scratch(int head_dim, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                             int64_t heads, int64_t window_left, int64_t window_right,
                             int variant, int64_t* counter_words, int64_t* workspace_floats);

// Backward (kernels_bwd.cu): dq like q, dk and dv like k and v (strides in elements, the
// head_dim stride 1). dout is shaped like out; lse is the forward's contiguous float32
// (B, H, Sq); dlse is its gradient in the same layout, or NULL. workspace holds at least
// kpt_fa90_backward_workspace(...) float32 elements (16-byte aligned; overwritten). dq is
// accumulated with fp32 atomics, so the result is not bitwise reproducible.
int64_t kpt_fa90_backward_workspace(int64_t batch, int64_t seqlen_q, int64_t heads,
                                    int head_dim);
int kpt_fa90_backward(int dtype, int head_dim, const void* q, const int64_t* q_strides,
                      const void* k, const int64_t* k_strides, const void* v,
                      const int64_t* v_strides, const void* out, const int64_t* out_strides,
                      const void* dout, const int64_t* dout_strides, const float* lse,
                      const float* dlse, void* dq, const int64_t* dq_strides, void* dk,
                      const int64_t* dk_strides, void* dv, const int64_t* dv_strides,
                      float* workspace, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                      int64_t heads, int64_t heads_kv, float scale, float softcap,
                      int64_t window_left, int64_t window_right, void* stream);

const char* kpt_fa90_error_string(int code);

#ifdef __cplusplus
}
#endif
