// C ABI of the moe kernels (csrc/moe/route.cu, align.cu, experts.cu).
//
// Plain C with no CUDA/HIP include, so the torch binding compiles with the host compiler alone.
// The stream travels as an opaque pointer (a cudaStream_t or hipStream_t; null = default
// stream). Every launcher returns 0 on success, a positive CUDA/HIP error code when a launch
// failed, or a negative KPT_MOE_* code for arguments the kernels do not handle; nothing aborts.
// Nothing is read back on the host: every launcher is safe inside CUDA graph capture.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_MOE_FP16 = 0,
  KPT_MOE_BF16 = 1,
  KPT_MOE_FP32 = 2,  // routing logits only
};

enum {
  KPT_MOE_SILU = 0,
  KPT_MOE_GELU = 1,       // erf form
  KPT_MOE_GELU_TANH = 2,  // tanh approximation
};

enum {
  KPT_MOE_QUANT_NONE = 0,  // experts in x's dtype
  KPT_MOE_QUANT_FP8 = 1,   // e4m3 experts with 128x128 block scales, activations 1x128
  KPT_MOE_QUANT_INT4 = 2,  // int4_gemm's packing per expert, group scales (+ zero points)
};

enum {
  KPT_MOE_IMPL_MMA = 0,   // tensor cores (mma.sync, sm_80+ CUDA builds only)
  KPT_MOE_IMPL_SIMT = 1,  // portable CUDA-core tiles: the HIP build, or forced for testing
};

enum {
  KPT_MOE_BAD_DTYPE = -1,
  KPT_MOE_UNSUPPORTED = -2,   // a size or variant outside what the kernels handle
  KPT_MOE_BAD_ARGUMENT = -3,  // null or misaligned pointer, bad size or stride
};

// Routing: experts per token, 1..KPT_MOE_ROUTE_MAX_EXPERTS (one warp holds a token's row).
#define KPT_MOE_ROUTE_MAX_EXPERTS 512
// Alignment and the expert GEMMs: local experts (per-expert counters in shared memory).
#define KPT_MOE_MAX_LOCAL_EXPERTS 1024
// The alignment runs at most KPT_MOE_ALIGN_MAX_CTAS CTAs of KPT_MOE_ALIGN_THREADS threads,
// each ranking a chunk of pairs (a multiple of the thread count).
#define KPT_MOE_ALIGN_THREADS 256
#define KPT_MOE_ALIGN_MAX_CTAS 64

// ---- routing -----------------------------------------------------------------------------------

typedef struct {
  int dtype;                     // KPT_MOE_FP32 / BF16 / FP16 logits
  const void* logits;            // (tokens, experts), strides in elements, any sign
  int64_t stride_token, stride_expert;
  const float* correction_bias;  // (experts,) or null
  float* weights;                // (tokens, top_k) contiguous, written
  int32_t* ids;                  // (tokens, top_k) contiguous, written
  int64_t tokens, experts;
  int top_k;        // 1..experts
  int sigmoid;      // 0: softmax over experts, 1: sigmoid per expert
  int renormalize;  // weights /= their sum
  int groups;       // expert groups (1: not grouped); experts % groups == 0
  int topk_groups;  // groups kept, 1..groups
  float scaling;    // routed_scaling_factor
} kpt_moe_route_args;

int kpt_moe_route(const kpt_moe_route_args* args, void* stream);

// ---- alignment -----------------------------------------------------------------------------------

// Length of sorted_pairs: round_up(pairs + local_experts * (block_m - 1), block_m).
static inline int64_t kpt_moe_padded_capacity(int64_t pairs, int64_t local_experts,
                                              int64_t block_m) {
  const int64_t n = pairs + local_experts * (block_m - 1);
  return (n + block_m - 1) / block_m * block_m;
}

// Pairs per alignment CTA, and the CTAs (at least one: an empty call still writes padding).
static inline int64_t kpt_moe_align_chunk(int64_t pairs) {
  const int64_t per_cta = KPT_MOE_ALIGN_THREADS * (int64_t)KPT_MOE_ALIGN_MAX_CTAS;
  const int64_t rounds = (pairs + per_cta - 1) / per_cta;
  return KPT_MOE_ALIGN_THREADS * (rounds > 0 ? rounds : 1);
}

static inline int64_t kpt_moe_align_chunks(int64_t pairs) {
  const int64_t chunk = kpt_moe_align_chunk(pairs);
  const int64_t c = (pairs + chunk - 1) / chunk;
  return c > 0 ? c : 1;
}

typedef struct {
  const int32_t* ids;         // (pairs,) global expert ids, pair p = token * top_k + slot
  const int32_t* expert_map;  // (global_experts,) global -> local or -1; null: identity
  int64_t pairs, global_experts, local_experts, block_m;
  int32_t* counts;        // workspace: (kpt_moe_align_chunks(pairs), local_experts)
  int32_t* sorted_pairs;  // (kpt_moe_padded_capacity(...),) written
  int32_t* block_expert;  // (capacity / block_m,) written
  int32_t* num_padded;    // (1,) written
} kpt_moe_align_args;

// kpt.ops.moe.align: pairs grouped by local expert, stable, each expert's run padded to a
// multiple of block_m with the sentinel `pairs`; ids outside [0, global_experts) and map
// entries outside [0, local_experts) drop the pair, like a -1.
int kpt_moe_align(const kpt_moe_align_args* args, void* stream);

// ---- fused experts -------------------------------------------------------------------------------

typedef struct {
  int dtype;       // KPT_MOE_FP16 / BF16: x, out and (quant none) the experts
  int quant;       // KPT_MOE_QUANT_*
  int activation;  // KPT_MOE_SILU / GELU / GELU_TANH
  int impl;        // KPT_MOE_IMPL_*
  int block_m, block_n;  // a tile the launcher instantiates (kpt_moe_tile_supported)
  int partial_fp32;      // the per-pair buffer holds float32 (else x's dtype)
  const void* x;         // (tokens, hidden), row stride x_stride
  int64_t x_stride;
  const void* w13;  // (experts, 2 * inter, hidden): gate rows, then up rows
  int64_t w13_stride_expert, w13_stride_row;
  const void* w2;  // (experts, hidden, inter)
  int64_t w2_stride_expert, w2_stride_row;
  const float* w13_scale;  // fp8: (experts, ceil(2 inter / 128), ceil(hidden / 128)) contiguous
  const float* w2_scale;   // fp8: (experts, ceil(hidden / 128), inter / 128) contiguous
  // int4 experts (quant KPT_MOE_QUANT_INT4): w13 (experts, hidden / 8, 2 * inter) and w2
  // (experts, inter / 8, hidden) int32 words, kpt.ops.int4_gemm's packing of each expert's
  // (N, K) weight (the strides above then count words, and a row is 8 channels of K);
  // scales (experts, K / group, N) of int4_scale_dtype and zero points (uint8, the scales'
  // shapes; null: symmetric, zero point 8), contiguous; group 32, 64, 128, 256 dividing K,
  // or K itself (one group, per channel). K = hidden for w13, inter for w2.
  int int4_scale_dtype;  // KPT_MOE_FP32 / FP16 / BF16, both weights
  const void* w13_int4_scale;
  const void* w2_int4_scale;
  const uint8_t* w13_zeros;
  const uint8_t* w2_zeros;
  int64_t group13, group2;
  const float* weights;    // (tokens, top_k) contiguous
  const int32_t* ids;      // (tokens, top_k) contiguous
  const int32_t* expert_map;  // (global_experts,) or null
  void* out;                  // (tokens, hidden) contiguous, written fully
  int64_t tokens, hidden, inter, experts, global_experts, top_k;
  // Workspace (kpt_moe_workspace gives the sizes); every byte is written before it is read.
  int32_t* counts;
  int32_t* sorted_pairs;
  int32_t* block_expert;
  int32_t* num_padded;
  void* act;           // (capacity, inter) x dtype: act(gate) * up per sorted row
  void* partial;       // (tokens * top_k, hidden) float32 or x dtype: weight * down per
                       // pair; top_k > 1 only
  uint8_t* x_fp8;      // fp8: (tokens, hidden)
  float* x_scale;      // fp8: (tokens, ceil(hidden / 128))
  uint8_t* act_fp8;    // fp8: (capacity, inter)
  float* act_scale;    // fp8: (capacity, inter / 128)
} kpt_moe_args;

// Whether (impl, quant, block_m, block_n) is an instantiated tile.
int kpt_moe_tile_supported(int impl, int quant, int block_m, int block_n);

// out[t] = sum_j weights[t, j] * W2[e] (act(W1[e] x[t]) * W3[e] x[t]), e = local id of ids[t, j].
int kpt_moe_forward(const kpt_moe_args* args, void* stream);

// Message for any code returned above.
const char* kpt_moe_error_string(int code);

#ifdef __cplusplus
}
#endif
