// kpt-targets: sm_90a
// Flash-attention forward for Hopper: TMA + mbarrier pipeline feeding wgmma.
//
// One CTA computes a 128-row query tile of one (batch, head) and is three warpgroups:
//   warpgroup 0  producer: one thread issues TMA loads of Q once and of K/V per 128-key block
//                into a 2-stage ring of 128B-swizzled shared-memory tiles;
//   warpgroups 1, 2  consumers: each owns 64 query rows; S = Q K^T with wgmma (both operands
//                from shared memory), online softmax in registers, O += P V with wgmma taking
//                P from registers (its accumulator layout is the A-fragment layout) and V from
//                shared memory (transposed descriptor, so V needs no transpose in memory).
// The producer gives its registers to the consumers (setmaxnreg): S, O and P stay in registers.
// While one consumer runs its softmax, the other's wgmma keeps the tensor cores busy.
//
// Everything here is raw PTX (wgmma, cp.async.bulk.tensor, mbarrier): the instruction set is
// small, the operand layouts are fixed by the PTX ISA, and compiling takes seconds instead of
// the minutes CuTe templates need. Every mbarrier wait is bounded (see wait()): a fault that
// stops a TMA turns into a failed launch (a CUDA error: abort_launch in kpt/sm90.h), never a hang.

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kpt/flash_attention_sm90.h"
#include "common.cuh"

namespace kpt_fa90 {

constexpr int kBlockM = 128;  // query rows per CTA: 64 per consumer warpgroup (wgmma M = 64)
constexpr int kStages = 2;
constexpr int kThreads = 384;
// ---- the kernel ------------------------------------------------------------------------------

template <int kD>
using Smem = SmemLayout<kD, kBlockM, kBlockN, kStages>;

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Compiled for another arch because TORCH_CUDA_ARCH_LIST names several; supports() only
  // launches this on sm_90, where the sm_90a cubin is picked.
  __trap();
#else
  using L = Smem<kD>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  const uint32_t bars = base + L::kBars;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return ring_bar(bars, s, 1); };
  auto k_empty = [&](int s) { return ring_bar(bars, s, 2); };
  auto v_full = [&](int s) { return ring_bar(bars, s, 3); };
  auto v_empty = [&](int s) { return ring_bar(bars, s, 4); };

  // Long (causal) tiles first: the last wave of CTAs is then made of short ones.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const Seq sq = sequence<false>(p, batch);  // dense batches only (varlen: the overlap kernel)
  int n_begin, n_end;
  key_range(p, sq, m0, kBlockM, n_begin, n_end);
  const int n_first = n_begin / kBlockN;
  const int n_last = n_end > n_begin ? (n_end - 1) / kBlockN : n_first - 1;
  const int blocks = n_last - n_first + 1;  // <= 0: no row of this tile sees any key

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    bar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      bar_init(k_full(s), 1);
      bar_init(v_full(s), 1);
      bar_init(k_empty(s), 2 * 128);  // every consumer thread releases a stage
      bar_init(v_empty(s), 2 * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0 || blocks <= 0) return;
    produce<L, kD, kStages>(p, sq, base, bars, m0, head, n_last, blocks);
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int warp = tid / 32, lane = tid % 32;
  // Accumulator layout of wgmma m64nN: thread row r and r + 8, columns 8j + 2 (lane % 4) + {0,1}.
  const int row0 = m0 + wg * 64 + warp * 16 + lane / 4;
  const int col0 = 2 * (lane % 4);

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's partial sums; reduced over the quad at the end

  if (blocks > 0) wait(q_full, 0);
  const uint32_t q_tile = base + L::kQ + wg * 64 * kRowBytes;
  for (int it = 0; it < blocks; ++it) {
    const int n0 = (n_last - it) * kBlockN;
    const int s = it % kStages;
    const uint32_t parity = (it / kStages) & 1;
    const uint32_t k_tile = base + L::kK + s * L::kKVBytes;
    const uint32_t v_tile = base + L::kV + s * L::kKVBytes;

    // S = Q K^T.
    float sc[kBlockN / 2];
    wait(k_full(s), parity);
    pin(sc);
    wgmma_fence();
    issue_qk<L, kBf16, kD>(sc, q_tile, k_tile);
    wgmma_commit();
    wgmma_wait_all();
    pin(sc);
    bar_arrive(k_empty(s));

    // Scores to the log2 domain, soft cap, mask; online softmax, then rescale O.
    const float fold = scale_and_mask(p, sq, sc, n0, m0 + wg * 64, row0, col0);
    float correction[2];
    softmax(sc, fold, row_max, row_sum, correction);
    rescale<kD>(o, correction);

    // P in the A-fragment layout of wgmma (m64k16: registers = accumulator pairs in order).
    uint32_t pa[kBlockN / 4];
#pragma unroll
    for (int i = 0; i < kBlockN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);

    // O += P V.
    pv_and_release<L, kBf16, kD>(o, pa, v_tile, v_full(s), parity, v_empty(s));
  }

  store_output<kBf16, kD>(p, sq, batch, head, row0, col0, lane, o, row_max, row_sum);
#endif
}

// ---- host side -------------------------------------------------------------------------------

// A 4-D map (head_dim, seq, heads, batch) whose box is [64 x rows] of one (batch, head): rows
// past seq are zero-filled by the TMA unit, which is what masks the tail tiles.
int make_map(CUtensorMap* map, int dtype, const void* ptr, const int64_t* strides, int64_t batch,
             int64_t seq, int64_t heads, int head_dim, int rows) {
  const kpt::sm90::EncodeFn encode = kpt::sm90::tensor_map_encoder();
  if (encode == nullptr) return KPT_FA90_NO_DRIVER_API;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seq),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // The stride of a size-1 dimension is never used but must still be a multiple of 16 bytes.
  const int64_t sizes[3] = {seq, heads, batch};
  const int64_t order[3] = {strides[1], strides[2], strides[0]};
  cuuint64_t byte_strides[3];
  for (int i = 0; i < 3; ++i) {
    byte_strides[i] = static_cast<cuuint64_t>(sizes[i] == 1 ? head_dim : order[i]) * 2;
  }
  const cuuint32_t box[4] = {kSwizzleElems, static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = encode(
      map, dtype == KPT_FA90_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      4, const_cast<void*>(ptr), dims, byte_strides, box, elem_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? KPT_FA90_OK : KPT_FA90_TENSOR_MAP;
}

template <bool kBf16, int kD>
int launch(const Params& params, int64_t m_blocks, int64_t heads, int64_t batch,
           cudaStream_t stream) {
  auto kernel = attention_fwd<kBf16, kD>;
  // Above 48 KiB, dynamic shared memory must be opted into; set on every call because the
  // attribute is per device and the call is cheap (no stream work, fine under graph capture).
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           Smem<kD>::kAlloc) != cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  kernel<<<grid, kThreads, Smem<kD>::kAlloc, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? KPT_FA90_OK : KPT_FA90_CUDA_ERROR;
}

// Windows wider than any sequence are unbounded (-1); this keeps the int arithmetic in range.
int normalized_window(int64_t window, int64_t seqlen_q, int64_t seqlen_k) {
  return window < 0 || window > seqlen_k + seqlen_q ? -1 : static_cast<int>(window);
}

bool aligned_strides(const int64_t* strides) {
  for (int i = 0; i < 3; ++i) {
    if (strides[i] % 8 != 0) return false;  // 16 bytes of 16-bit elements (TMA)
  }
  return true;
}

// Both C entry points: a dense batch (cu_q == nullptr; the maps have `batch` batches of
// seqlen_q / seqlen_k rows) or a varlen one (sequences at cu_q / cu_k in tensors of total_q /
// total_k rows, one batch in the maps; seqlen_q / seqlen_k the longest sequences).
int forward(int dtype, int head_dim, const void* q, const int64_t* q_strides, const void* k,
            const int64_t* k_strides, const void* v, const int64_t* v_strides, void* out,
            const int64_t* out_strides, float* lse, int64_t batch, int64_t seqlen_q,
            int64_t seqlen_k, int64_t heads, int64_t heads_kv, float scale, float softcap,
            int64_t window_left, int64_t window_right, int variant, unsigned int* tile_counter,
            float* split_workspace, const int* cu_q, const int* cu_k, int64_t total_q,
            int64_t total_k, void* stream) {
  const bool varlen = cu_q != nullptr;
  // The Python launcher validates all of this first; these checks keep the C entry point safe.
  if ((dtype != KPT_FA90_FP16 && dtype != KPT_FA90_BF16) || (head_dim != 64 && head_dim != 128) ||
      (varlen && (cu_k == nullptr || variant == KPT_FA90_VARIANT_BASE || total_q < 1 ||
                  total_k < 1 || total_q >= kMaxSeqlen || total_k >= kMaxSeqlen)) ||
      batch < 1 || batch > 65535 || heads < 1 || heads > 65535 || heads_kv < 1 ||
      heads % heads_kv != 0 || seqlen_q < 1 || seqlen_k < 1 || seqlen_q >= kMaxSeqlen ||
      seqlen_k >= kMaxSeqlen || !aligned_strides(q_strides) || !aligned_strides(k_strides) ||
      !aligned_strides(v_strides) || out_strides[0] % 2 || out_strides[1] % 2 ||
      out_strides[2] % 2 ||
      (variant != KPT_FA90_VARIANT_BASE && variant != KPT_FA90_VARIANT_OVERLAP &&
       variant != KPT_FA90_VARIANT_PERSISTENT && variant != KPT_FA90_VARIANT_DYNAMIC) ||
      (variant == KPT_FA90_VARIANT_DYNAMIC) != (tile_counter != nullptr)) {
    return KPT_FA90_UNSUPPORTED;
  }
  for (const void* ptr : {q, k, v}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return KPT_FA90_UNSUPPORTED;
  }
  if (reinterpret_cast<uintptr_t>(out) % 4 != 0) return KPT_FA90_UNSUPPORTED;
  Params params{};
  params.out = out;
  params.out_batch = out_strides[0];
  params.out_seq = out_strides[1];
  params.out_head = out_strides[2];
  params.lse = lse;
  params.tile_counter = tile_counter;
  params.head_group = 1;
  params.split_ws = varlen ? nullptr : reinterpret_cast<float4*>(split_workspace);
  params.cu_seqlens_q = cu_q;
  params.cu_seqlens_k = cu_k;
  params.total_q = static_cast<int>(total_q);
  if (varlen) params.out_batch = 0;
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.seqlen_k = static_cast<int>(seqlen_k);
  params.heads = static_cast<int>(heads);
  params.batch = static_cast<int>(batch);
  params.group = static_cast<int>(heads / heads_kv);
  constexpr float kLog2e = 1.4426950408889634f;
  if (softcap > 0.f) {
    params.score_scale = scale / softcap;
    params.softcap_log2 = softcap * kLog2e;
  } else {
    params.score_scale = scale * kLog2e;
    params.softcap_log2 = 0.f;
  }
  params.window_left = normalized_window(window_left, seqlen_q, seqlen_k);
  params.window_right = normalized_window(window_right, seqlen_q, seqlen_k);
  const bool overlap = variant != KPT_FA90_VARIANT_BASE;  // persistent: the overlap kernel
  const int block_m = overlap ? overlap_block_m(head_dim) : kBlockM;
  const int64_t map_batch = varlen ? 1 : batch;
  const int64_t rows_q = varlen ? total_q : seqlen_q, rows_k = varlen ? total_k : seqlen_k;
  int rc = make_map(&params.tma_q, dtype, q, q_strides, map_batch, rows_q, heads, head_dim,
                    block_m);
  if (rc == KPT_FA90_OK) {
    rc = make_map(&params.tma_k, dtype, k, k_strides, map_batch, rows_k, heads_kv, head_dim,
                  kBlockN);
  }
  if (rc == KPT_FA90_OK) {
    rc = make_map(&params.tma_v, dtype, v, v_strides, map_batch, rows_k, heads_kv, head_dim,
                  kBlockN);
  }
  if (rc != KPT_FA90_OK) return rc;
  // The overlap kernel stores O with TMA where out's rows allow it (else from registers);
  // varlen never: a box would write past its sequence into the next one's rows.
  params.store_tma = overlap && !varlen && aligned_strides(out_strides) &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                     make_map(&params.tma_o, dtype, out, out_strides, batch, seqlen_q, heads,
                              head_dim, 64) == KPT_FA90_OK;
  auto s = static_cast<cudaStream_t>(stream);
  const bool bf16 = dtype == KPT_FA90_BF16;
  if (overlap) {
    return launch_overlap(params, bf16, head_dim, seqlen_q, heads, batch,
                          variant == KPT_FA90_VARIANT_PERSISTENT ||
                              variant == KPT_FA90_VARIANT_DYNAMIC,
                          s);
  }
  const int64_t m_blocks = (seqlen_q + kBlockM - 1) / kBlockM;
  if (head_dim == 128) {
    return bf16 ? launch<true, 128>(params, m_blocks, heads, batch, s)
                : launch<false, 128>(params, m_blocks, heads, batch, s);
  }
  return bf16 ? launch<true, 64>(params, m_blocks, heads, batch, s)
              : launch<false, 64>(params, m_blocks, heads, batch, s);
}

}  // namespace kpt_fa90

extern "C" int kpt_fa90_forward(int dtype, int head_dim, const void* q, const int64_t* q_strides,
                                const void* k, const int64_t* k_strides, const void* v,
                                const int64_t* v_strides, void* out, const int64_t* out_strides,
                                float* lse, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                int64_t heads, int64_t heads_kv, float scale, float softcap,
                                int64_t window_left, int64_t window_right, int variant,
                                unsigned int* tile_counter, float* split_workspace,
                                void* stream) {
  return kpt_fa90::forward(dtype, head_dim, q, q_strides, k, k_strides, v, v_strides, out,
                           out_strides, lse, batch, seqlen_q, seqlen_k, heads, heads_kv, scale,
                           softcap, window_left, window_right, variant, tile_counter,
                           split_workspace, nullptr, nullptr, 0, 0, stream);
}

extern "C" int kpt_fa90_forward_varlen(int dtype, int head_dim, const void* q,
                                       const int64_t* q_strides, const void* k,
                                       const int64_t* k_strides, const void* v,
                                       const int64_t* v_strides, void* out,
                                       const int64_t* out_strides, float* lse,
                                       const int* cu_seqlens_q, const int* cu_seqlens_k,
                                       int64_t batch, int64_t total_q, int64_t total_k,
                                       int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads,
                                       int64_t heads_kv, float scale, float softcap,
                                       int64_t window_left, int64_t window_right, int variant,
                                       unsigned int* tile_counter, void* stream) {
  if (cu_seqlens_q == nullptr || cu_seqlens_k == nullptr) return KPT_FA90_UNSUPPORTED;
  // {seq, head} strides of the packed tensors in the {batch, seq, head} slots (one batch).
  const int64_t qs[3] = {0, q_strides[0], q_strides[1]};
  const int64_t ks[3] = {0, k_strides[0], k_strides[1]};
  const int64_t vs[3] = {0, v_strides[0], v_strides[1]};
  const int64_t os[3] = {0, out_strides[0], out_strides[1]};
  return kpt_fa90::forward(dtype, head_dim, q, qs, k, ks, v, vs, out, os, lse, batch,
                           max_seqlen_q, max_seqlen_k, heads, heads_kv, scale, softcap,
                           window_left, window_right, variant, tile_counter, nullptr,
                           cu_seqlens_q, cu_seqlens_k, total_q, total_k, stream);
}

extern "C" int kpt_fa90_forward_scratch(int head_dim, int64_t batch, int64_t seqlen_q,
                                        int64_t seqlen_k, int64_t heads, int64_t window_left,
                                        int64_t window_right, int variant,
                                        int64_t* counter_words, int64_t* workspace_floats) {
  using namespace kpt_fa90;
  *counter_words = variant == KPT_FA90_VARIANT_DYNAMIC ? 1 : 0;
  *workspace_floats = 0;
  if (variant != KPT_FA90_VARIANT_DYNAMIC) return KPT_FA90_OK;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const bool masked = normalized_window(window_left, seqlen_q, seqlen_k) >= 0 ||
                      normalized_window(window_right, seqlen_q, seqlen_k) >= 0;
  int pieces = 0;
  int64_t split_from = 0, float4s = 0;
  overlap_split_plan(head_dim, masked, seqlen_q, seqlen_k, heads, batch, sms, pieces,
                     split_from, *counter_words, float4s);
  *workspace_floats = 4 * float4s;
  return KPT_FA90_OK;
}

extern "C" const char* kpt_fa90_error_string(int code) {
  switch (code) {
    case KPT_FA90_OK:
      return "ok";
    case KPT_FA90_UNSUPPORTED:
      return "unsupported shape, stride, alignment or dtype";
    case KPT_FA90_NO_DRIVER_API:
      return "cuTensorMapEncodeTiled not found in the CUDA driver";
    case KPT_FA90_TENSOR_MAP:
      return "cuTensorMapEncodeTiled rejected a tensor map";
    case KPT_FA90_CUDA_ERROR:
      return "CUDA error (shared-memory attribute or launch)";
    default:
      return "unknown error";
  }
}
