// C ABI of the flash_attention kernels (csrc/flash_attention/*.cu).
//
// Plain C with no CUDA/HIP include, so the torch binding compiles with the host compiler alone.
// Every tensor is addressed by (batch, token, head) strides in elements with a contiguous last
// dim: (B, S, H, D) views, (B, H, S, D) tensors transposed to (B, S, H, D), and varlen
// (T, H, D) tensors (batch stride 0, token offsets from cu_seqlens) all go through one path.
// Launchers return 0 on success, a positive CUDA/HIP error code when a launch failed, or a
// negative KPT_FA_* code for arguments the kernels do not handle; nothing aborts.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KPT_FA_FP16 = 0,
  KPT_FA_BF16 = 1,
};

enum {
  KPT_FA_IMPL_MMA = 0,   // tensor-core mma.sync / ldmatrix / cp.async (NVIDIA sm_80+ only)
  KPT_FA_IMPL_SIMT = 1,  // one warp per row, FMA only: the portable (HIP) version
};

enum {
  KPT_FA_BAD_DTYPE = -1,
  KPT_FA_UNSUPPORTED = -2,   // a size or feature outside what the kernels handle
  KPT_FA_BAD_ARGUMENT = -3,  // null pointer, inconsistent sizes
};

// The query block that kv_block_range refers to: range[b][h][qb] covers queries
// [qb * KPT_FA_Q_BLOCK, (qb + 1) * KPT_FA_Q_BLOCK) of sequence b. Every kernel's query tile
// divides it, so one tile never straddles two ranges.
#define KPT_FA_Q_BLOCK 128
#define KPT_FA_MAX_HEAD_DIM 256

// (batch, token, head) strides of one (B, S, H, D) or (T, H, D) tensor, in elements.
typedef struct {
  int64_t batch, token, head;
} kpt_fa_strides;

typedef struct {
  // ---- forward inputs / outputs
  const void* q;  // (B, Sq, Hq, D) or (Tq, Hq, D)
  const void* k;  // (B, Sk, Hkv, D) or (Tk, Hkv, D)
  const void* v;
  void* out;   // like q
  float* lse;  // natural-log logsumexp: (B, Hq, Sq) or (Hq, Tq); unit token stride
  kpt_fa_strides q_st, k_st, v_st, out_st;
  int64_t lse_batch_stride, lse_head_stride;  // lse_batch_stride = 0 for varlen
  const int32_t* cu_seqlens_q;  // (B + 1,) or null (then every sequence has seqlen_q)
  const int32_t* cu_seqlens_k;
  // Varlen: the tokens of q and of k/v. Sequence bounds are clamped to [0, total], so that no
  // content of cu_seqlens makes a kernel access memory outside the tensors.
  int64_t total_q, total_k;
  int batch, heads_q, heads_kv, head_dim;
  int seqlen_q, seqlen_k;  // batched lengths, or the varlen maxima (they size the grid)
  float scale;    // logit scale
  float softcap;  // > 0: s = softcap * tanh(s / softcap), before the bias and the mask
  int window_left, window_right;  // bottom-right band, -1 = unbounded; causal = (-1, 0)

  // ---- flex hooks: null = off; each costs one uniform branch when off.
  // score += alibi_slopes[h] * (kv_idx - q_idx), after the soft-cap (positions in-sequence).
  const float* alibi_slopes;  // (Hq,) fp32
  // key j is also visible when j < prefix_len[b] (visible = band OR prefix), then doc/range
  // still apply.
  const int32_t* prefix_len;  // (B,)
  // visible additionally requires doc_q[b, i] == doc_k[b, j] (in-sequence positions).
  const int32_t* doc_q;  // (B, >= Sq), batch stride doc_q_batch_stride, unit token stride
  const int32_t* doc_k;  // (B, >= Sk)
  int64_t doc_q_batch_stride, doc_k_batch_stride;
  // [lo, hi) key indices visible to query block qb (see KPT_FA_Q_BLOCK); keys outside are
  // masked and whole key tiles outside are skipped. Contiguous int32 (B, range_heads,
  // range_q_blocks, 2) with range_heads = Hq or 1 (shared by all heads).
  const int32_t* kv_block_range;
  int range_heads, range_q_blocks;

  // ---- backward (ignored by the forward)
  const void* dout;     // like out
  const float* dlse;    // like lse (same strides), or null
  float* delta;         // workspace like lse (same strides): rowsum(dO * O) - dlse
  void* dq;             // like q
  void* dk;             // like k
  void* dv;             // like v
  kpt_fa_strides do_st, dq_st, dk_st, dv_st;
} kpt_fa_params;

// out and lse. Varlen rows outside every sequence are not written.
int kpt_fa_forward(const kpt_fa_params* p, int dtype, int impl, void* stream);

// delta, then dq, dk, dv. impl KPT_FA_IMPL_MMA uses the tensor-core kernels where the head dim
// has them and falls back to SIMT otherwise. Every kernel is deterministic (no atomics): each
// gradient element is written once, summed in a fixed order. Varlen rows outside every
// sequence are not written.
int kpt_fa_backward(const kpt_fa_params* p, int dtype, int impl, void* stream);

// Message for any code returned above.
const char* kpt_fa_error_string(int code);

#ifdef __cplusplus
}
#endif
