// Pieces shared by the sm90 attention kernels (kernels.cu, kernels_overlap.cu): launch
// parameters, the pipeline's producer and consumer steps and fragment helpers, on top of
// kpt/sm90.h (the bounded mbarrier wait, TMA, wgmma descriptors).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kpt/sm90.h"
#include "kpt/softmax.h"
#include "wgmma.cuh"

namespace kpt_fa90 {

constexpr int kBlockN = 128;  // keys per pipeline stage (both kernels)
constexpr int kSwizzleElems = 64;  // 128-byte swizzle rows hold 64 16-bit elements
constexpr int kRowBytes = 128;
// Row/column arithmetic (row + diag + window, windows clamped to Sq + Sk) stays inside int32.
constexpr int64_t kMaxSeqlen = int64_t{1} << 28;

struct Params {
  CUtensorMap tma_q, tma_k, tma_v;
  CUtensorMap tma_o;    // box [64 x 64]; used by the overlap kernel when store_tma is set
  int store_tma;        // out has TMA-aligned strides: O leaves through shared memory + TMA
  void* out;
  int64_t out_batch, out_seq, out_head;
  float* lse;
  int seqlen_q, seqlen_k, heads, group, batch;
  float score_scale;    // to the log2 domain: scale * log2(e), or scale / softcap with softcap
  float softcap_log2;   // softcap * log2(e); 0 without soft cap
  int window_left, window_right;
  // Persistent overlap kernel only: a zeroed counter the CTAs take query tiles from (dynamic
  // scheduling), or nullptr for the static stride; and how many (batch, head) pairs its tile
  // order groups together (1: a head's tiles, longest first, then the next head's).
  unsigned int* tile_counter;
  int head_group;
  // Dynamic scheduling without a mask: the last query tiles, which would otherwise run alone at
  // the end on a few SMs, are split over their key blocks into split_pieces pieces (0: no
  // split). Work items below split_from are whole tiles; the others are pieces, whose partial
  // O and statistics go to split_ws, and split_count (zeroed, one per tail tile and consumer
  // warp) tells the last piece to finish that it merges them (see kernels_overlap.cu).
  int split_from, split_pieces;
  float4* split_ws;
  unsigned int* split_count;
  // Varlen (the overlap kernel only): q, k, v and out are packed (tokens, heads, head_dim)
  // and sequence b's rows are [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and out and
  // [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (int32 device arrays, batch + 1
  // entries); seqlen_q / seqlen_k hold the longest sequences, total_q the tokens of q (lse is
  // (heads, total_q)). nullptr for a dense (B, S, H, D) batch.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int total_q;
};

// One sequence of the launch: its query and key lengths and its first query and key rows in
// the tensors (the TMA row coordinates) and the batch coordinate of its boxes. A dense batch
// gives every sequence Params' lengths at rows 0 of batch `batch`; a varlen batch (kVarlen)
// reads them from cu_seqlens, with batch coordinate 0 (the maps then have one batch).
struct Seq {
  int len_q, len_k, off_q, off_k, coord_batch;
};

template <bool kVarlen>
__device__ __forceinline__ Seq sequence(const Params& p, int batch) {
  if constexpr (kVarlen) {
    const int q0 = __ldg(p.cu_seqlens_q + batch), q1 = __ldg(p.cu_seqlens_q + batch + 1);
    const int k0 = __ldg(p.cu_seqlens_k + batch), k1 = __ldg(p.cu_seqlens_k + batch + 1);
    return {q1 - q0, k1 - k0, q0, k0, 0};
  } else {
    return {p.seqlen_q, p.seqlen_k, 0, 0, batch};
  }
}

// ---- PTX helpers -----------------------------------------------------------------------------

// mbarriers, TMA and wgmma come from kpt/sm90.h (shared with fp8_gemm's sm_90a kernel).
using kpt::smem_addr;
using kpt::sm90::bar_arrive, kpt::sm90::bar_expect_tx, kpt::sm90::bar_init, kpt::sm90::wait;
using kpt::sm90::bulk_wait_read, kpt::sm90::tma_load, kpt::sm90::tma_store;
using kpt::sm90::desc_at, kpt::sm90::make_desc, kpt::sm90::pin;
using kpt::sm90::wgmma_commit, kpt::sm90::wgmma_fence, kpt::sm90::wgmma_wait,
    kpt::sm90::wgmma_wait_all;

// Byte offset of the 4-byte pair at (row, col) of a [rows x 64] 16-bit tile in the 128-byte
// swizzle a TMA box uses: 16-byte chunk col / 8 of row `row` sits at (col / 8) ^ (row % 8). With
// the accumulator layout (8 rows per warp, 4 threads per row) a warp's stores hit 32 banks.
__device__ __forceinline__ uint32_t swizzled(int row, int col) {
  return row * kRowBytes + ((((col / 8) ^ row) & 7) * 16) + (col % 8) * 2;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(|x|) = (1 - e) / (1 + e) with e = 2^(-2 log2(e) |x|) in (0, 1]: never overflows, one
// ex2 and one fast division instead of libm's tanhf (the soft cap's cost); the error is an
// absolute ~1e-7 near 0 and a few ulp elsewhere.
__device__ __forceinline__ float fast_tanh(float x) {
  const float e = fast_exp2(-2.8853900817779268f * fabsf(x));
  return copysignf(__fdividef(1.f - e, 1.f + e), x);
}

template <bool kBf16, int kN = kBlockN>
__device__ __forceinline__ void qk_gemm(float* acc, uint64_t a, uint64_t b, int accumulate) {
  static_assert(kN == 128, "key block");
  if constexpr (kBf16) {
    wgmma_ss_Bf16_n128(acc, a, b, accumulate);
  } else {
    wgmma_ss_F16_n128(acc, a, b, accumulate);
  }
}

template <bool kBf16, int kD>
__device__ __forceinline__ void pv_gemm(float* acc, const uint32_t* a, uint64_t b) {
  if constexpr (kBf16 && kD == 128) {
    wgmma_rs_Bf16_n128(acc, a, b, 1);
  } else if constexpr (kBf16) {
    wgmma_rs_Bf16_n64(acc, a, b, 1);
  } else if constexpr (kD == 128) {
    wgmma_rs_F16_n128(acc, a, b, 1);
  } else {
    wgmma_rs_F16_n64(acc, a, b, 1);
  }
}

// Shared memory of one CTA: Q [kRows x kD], then kStages K and kStages V tiles [kKeys x kD],
// then the mbarriers (see ring_bar). A tile is kD / 64 column chunks, each [rows x 128 B] as
// one TMA box writes it.
template <int kD, int kRows, int kKeys, int kRing>
struct SmemLayout {
  static constexpr int kBlockM = kRows;
  static constexpr int kN = kKeys;
  static constexpr int kStages = kRing;
  static constexpr int kQBytes = kRows * kD * 2;
  static constexpr int kKVBytes = kKeys * kD * 2;
  static constexpr int kQChunk = kRows * kRowBytes;
  static constexpr int kKVChunk = kKeys * kRowBytes;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kRing * kKVBytes;
  static constexpr int kBars = kV + kRing * kKVBytes;
  static constexpr int kBytes = kBars + 8 * (1 + 4 * kRing);
  // Dynamic shared memory is only guaranteed 16-byte aligned; the swizzle needs 1024.
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kKeys % 16 == 0 && kKeys <= 256 && kRows <= 256, "wgmma N and TMA box rows");
  static_assert(kAlloc <= 227 * 1024, "shared memory");
};

// S = Q K^T for one key block: both K-major; a 16-wide k step is 32 bytes inside a 128-byte
// swizzle row, every 64 columns the next chunk; 8-row groups repeat every 1024 bytes (SBO).
// L gives kQChunk, kKVChunk and the key block kN.
template <class L, bool kBf16, int kD>
__device__ __forceinline__ void issue_qk(float* sc, uint32_t q_tile, uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t offset = (kk % 4) * 32;
    const uint64_t a = make_desc(q_tile + (kk / 4) * L::kQChunk + offset, 16, 1024);
    const uint64_t b = make_desc(k_tile + (kk / 4) * L::kKVChunk + offset, 16, 1024);
    qk_gemm<kBf16, L::kN>(sc, a, b, kk > 0);
  }
}

// O += P V for one key block: V is [keys x kD] with kD contiguous, i.e. MN-major for B; along
// K (keys) 8-row groups repeat every 1024 B (SBO), along N each 64-column chunk is a separate
// TMA box (LBO); a 16-key step is 16 rows = 2048 bytes. P comes packed from registers.
template <class L, bool kBf16, int kD>
__device__ __forceinline__ void issue_pv(float* o, const uint32_t* pa, uint32_t v_tile) {
  const uint64_t v_desc = make_desc(v_tile, L::kKVChunk, 1024);
#pragma unroll
  for (int kk = 0; kk < L::kN / 16; ++kk) {
    pv_gemm<kBf16, kD>(o, &pa[4 * kk], desc_at(v_desc, kk * 16 * kRowBytes));
  }
}

// O += P V for one key block run to completion: waits for the V stage (`full`, `parity`),
// issues the GEMM, waits for it and releases the stage (`empty`).
template <class L, bool kBf16, int kD>
__device__ __forceinline__ void pv_and_release(float (&o)[kD / 2], uint32_t (&pa)[L::kN / 4],
                                               uint32_t v_tile, uint32_t full, uint32_t parity,
                                               uint32_t empty) {
  wait(full, parity);
  pin(o);
  pin(pa);
  wgmma_fence();
  issue_pv<L, kBf16, kD>(o, pa, v_tile);
  wgmma_commit();
  wgmma_wait_all();
  pin(o);
  pin(pa);
  bar_arrive(empty);
}

// O rows row0 and row0 + 8 times their softmax correction.
template <int kD>
__device__ __forceinline__ void rescale(float (&o)[kD / 2], const float (&correction)[2]) {
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      o[4 * j + 2 * h] *= correction[h];
      o[4 * j + 2 * h + 1] *= correction[h];
    }
  }
}

// The mbarriers after the shared-memory tiles: q_full, then per stage k_full (1), k_empty (2),
// v_full (3), v_empty (4).
__device__ __forceinline__ uint32_t ring_bar(uint32_t bars, int stage, int which) {
  return bars + 8 * (which + 4 * stage);
}

// The producer warpgroup's one thread: Q once, then K and V of key blocks n_last, n_last - 1,
// ... into the kStages ring (continuing after `ring` earlier blocks), each stage reloaded once
// the consumers released it. L gives the
// tile offsets and sizes (kQ, kQBytes, kQChunk, kK, kV, kKVBytes, kKVChunk) and the key block kN.
template <class L, int kD, int kStages>
__device__ __forceinline__ void produce(const Params& p, const Seq& sq, uint32_t base,
                                        uint32_t bars, int m0, int head, int n_last, int blocks,
                                        int ring = 0) {
  const int head_kv = head / p.group;
  bar_expect_tx(bars, L::kQBytes);
#pragma unroll
  for (int c = 0; c < kD / kSwizzleElems; ++c) {
    tma_load(base + L::kQ + c * L::kQChunk, &p.tma_q, bars, c * kSwizzleElems, sq.off_q + m0,
             head, sq.coord_batch);
  }
  for (int it = 0; it < blocks; ++it) {
    const int n0 = (n_last - it) * L::kN;
    const int s = (ring + it) % kStages;  // `ring` blocks went through the ring before
    const uint32_t free_parity = (((ring + it) / kStages) & 1) ^ 1;  // fresh barriers pass 1
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {  // K, then V
      wait(ring_bar(bars, s, 2 + 2 * kv), free_parity);
      bar_expect_tx(ring_bar(bars, s, 1 + 2 * kv), L::kKVBytes);
#pragma unroll
      for (int c = 0; c < kD / kSwizzleElems; ++c) {
        tma_load(base + (kv ? L::kV : L::kK) + s * L::kKVBytes + c * L::kKVChunk,
                 kv ? &p.tma_v : &p.tma_k, ring_bar(bars, s, 1 + 2 * kv), c * kSwizzleElems,
                 sq.off_k + n0, head_kv, sq.coord_batch);
      }
    }
  }
}

// Whether key block n0 (kN keys) is fully visible to all 64 rows from wg_row_lo: inside the
// keys, and inside the window of every row.
template <int kN>
__device__ __forceinline__ bool block_fully_visible(const Params& p, const Seq& sq, int n0,
                                                    int wg_row_lo) {
  const int diag = sq.len_k - sq.len_q;
  return n0 + kN <= sq.len_k &&
         (p.window_right < 0 || n0 + kN - 1 <= wg_row_lo + diag + p.window_right) &&
         (p.window_left < 0 || n0 >= wg_row_lo + 63 + diag - p.window_left);
}

// The same test for a whole tile at once: a tile visits key blocks n_last, n_last - 1, ...
// (iteration it reads block n_last - it), and the blocks fully visible to the 64 rows from
// wg_row_lo are the iterations [first, last] (the key tail and the right window edge are
// where the visit starts, the left window edge where it ends). The overlap kernel computes
// this once per tile, so that the per-block test compares two registers: computed per block,
// it reloaded the lengths and windows from constant memory (three dependent LDC + compare +
// branch steps) between the S GEMM's completion and the softmax.
__device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
template <int kN>
__device__ __forceinline__ void fully_visible_iterations(const Params& p, const Seq& sq,
                                                         int n_last, int wg_row_lo, int& first,
                                                         int& last) {
  const int64_t diag = static_cast<int64_t>(sq.len_k) - sq.len_q;
  // n0 + kN <= seqlen_k, n0 = (n_last - it) * kN.
  int64_t lo = n_last - floor_div(static_cast<int64_t>(sq.len_k) - kN, kN);
  if (p.window_right >= 0) {  // n0 + kN - 1 <= wg_row_lo + diag + window_right
    lo = max(lo, n_last - floor_div(wg_row_lo + diag + p.window_right - kN + 1, kN));
  }
  int64_t hi = int64_t{1} << 30;
  if (p.window_left >= 0) {  // n0 >= wg_row_lo + 63 + diag - window_left
    hi = n_last + floor_div(-(wg_row_lo + 63 + diag - p.window_left), kN);
  }
  first = static_cast<int>(min(max(lo, int64_t{0}), int64_t{1} << 30));
  last = static_cast<int>(min(max(hi, int64_t{-1}), int64_t{1} << 30));
}

// Scores of key block n0 for the softmax, then the mask where the block is not fully visible to
// all 64 rows of this warpgroup (rows row0 and row0 + 8 per thread; `full` is
// block_fully_visible for this block, which scale_and_mask below tests itself). Returns the
// factor the softmax still has to apply: with a positive scale and no soft cap the scores stay
// raw and the scale is folded into the exponent's FMA (one instruction less per score); a soft
// cap (or a non-positive scale, which would flip the row max) is applied here and 1 is
// returned.
template <int kHalf>  // kHalf = key block / 2 scores per thread
__device__ __forceinline__ float scale_and_mask_known(const Params& p, const Seq& sq,
                                                      float (&sc)[kHalf], int n0, int row0,
                                                      int col0, bool full) {
  constexpr int kN = 2 * kHalf;
  float fold = 1.f;
  if (p.softcap_log2 > 0.f) {
#pragma unroll
    for (int i = 0; i < kHalf; ++i) sc[i] = p.softcap_log2 * fast_tanh(sc[i] * p.score_scale);
  } else if (p.score_scale > 0.f) {
    fold = p.score_scale;
  } else {
#pragma unroll
    for (int i = 0; i < kHalf; ++i) sc[i] *= p.score_scale;
  }
  if (full) return fold;
  const int diag = sq.len_k - sq.len_q;
  // Per row, the visible columns as an interval [lo, hi) relative to this thread's first
  // column, so each score costs two compares against its compile-time offset and a select
  // (the per-score column arithmetic of the plain form compiled to ~10 instructions).
  // 64-bit, then clamped: the window sizes may be as large as the caller likes.
  const int base = n0 + col0;
  int lo[2], hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t key0 = static_cast<int64_t>(row0 + 8 * h) + diag;  // the diagonal's key
    int64_t end = sq.len_k;
    if (p.window_right >= 0) end = min(end, key0 + p.window_right + 1);
    const int64_t begin = p.window_left >= 0 ? key0 - p.window_left : 0;
    hi[h] = static_cast<int>(max(end - base, int64_t{-1}));
    lo[h] = static_cast<int>(min(max(begin - base, int64_t{-1}), int64_t{kN}));
  }
  if (p.window_left < 0) {  // causal or the key tail only: one compare per score
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      sc[i] = 8 * (i / 4) + i % 2 < hi[(i / 2) % 2] ? sc[i] : -INFINITY;
    }
    return fold;
  }
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const int off = 8 * (i / 4) + i % 2;  // the score's column - base
    const int h = (i / 2) % 2;
    sc[i] = (off >= lo[h]) & (off < hi[h]) ? sc[i] : -INFINITY;
  }
  return fold;
}

template <int kHalf>
__device__ __forceinline__ float scale_and_mask(const Params& p, const Seq& sq,
                                                float (&sc)[kHalf], int n0, int wg_row_lo,
                                                int row0, int col0) {
  return scale_and_mask_known(p, sq, sc, n0, row0, col0,
                              block_fully_visible<2 * kHalf>(p, sq, n0, wg_row_lo));
}

// Online softmax of one block in place: sc (log2-domain scores once multiplied by `fold` > 0)
// becomes exp2(fold * s - max); row_max is kept in the scaled domain. Returns through
// `correction` the factor O must be scaled by, which the caller applies once the PV GEMM
// reading the old O has finished, and returns whether any row of this warp moved its max
// (when none did, every correction is 1 and the caller skips the rescale of O).
// The max a row uses moves only when the block's max exceeds it by more than kLazyMax (log2
// units), so after the first blocks O is rarely rescaled. Exact either way: O and the sum are
// kept relative to the same max, and the probabilities stay below 2^kLazyMax (256), far inside
// fp16/bf16 range and with the same relative precision.
constexpr float kLazyMax = 8.f;

template <int kHalf>
__device__ __forceinline__ bool softmax(float (&sc)[kHalf], float fold, float (&row_max)[2],
                                        float (&row_sum)[2], float (&correction)[2]) {
  bool moved = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kHalf / 4; ++j) {
      mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * h], sc[4 * j + 2 * h + 1]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx *= fold;
    // -inf + kLazyMax is -inf: a row's first visible block always sets its max.
    const bool move = mx > row_max[h] + kLazyMax;
    const float use = move ? mx : row_max[h];
    // Nothing visible yet: max stays -inf and the shift 0 avoids (-inf) - (-inf) = NaN.
    const float shift = kpt::softmax_shift(use);
    correction[h] = move ? fast_exp2(row_max[h] - shift) : 1.f;
    moved |= move;
    row_max[h] = use;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kHalf / 4; ++j) {
      sc[4 * j + 2 * h] = fast_exp2(fmaf(sc[4 * j + 2 * h], fold, -shift));
      sc[4 * j + 2 * h + 1] = fast_exp2(fmaf(sc[4 * j + 2 * h + 1], fold, -shift));
      sum += sc[4 * j + 2 * h] + sc[4 * j + 2 * h + 1];
    }
    row_sum[h] = row_sum[h] * correction[h] + sum;
  }
  return __any_sync(0xffffffffu, moved);
}

// A row's softmax sum from this thread's partial one: the 4 threads of a quad hold the row.
__device__ __forceinline__ float quad_sum(float partial) {
  partial += __shfl_xor_sync(0xffffffffu, partial, 1);
  return partial + __shfl_xor_sync(0xffffffffu, partial, 2);
}

// Stores the natural-log lse of `row` from its log2 one (kpt::row_end). `row` is in-sequence;
// lse is (B, H, Sq), or (H, total_q) for varlen.
__device__ __forceinline__ void store_lse(const Params& p, const Seq& sq, int batch, int head,
                                          int row, float lse2) {
  const float lse = lse2 * 0.69314718055994531f;
  const int64_t at = p.cu_seqlens_q != nullptr
                         ? static_cast<int64_t>(head) * p.total_q + sq.off_q + row
                         : (static_cast<int64_t>(batch) * p.heads + head) * p.seqlen_q + row;
  p.lse[at] = lse;
}

// Epilogue of a consumer thread: normalise its O rows (row0, row0 + 8), store those below
// seqlen_q from registers, and (one thread per row) the natural-log lse.
template <bool kBf16, int kD>
__device__ __forceinline__ void store_output(const Params& p, const Seq& sq, int batch, int head,
                                             int row0, int col0, int lane,
                                             const float (&o)[kD / 2],
                                             const float (&row_max)[2], float (&row_sum)[2]) {
  // Varlen: out_batch is 0 and the sequence's rows start at off_q.
  const int64_t out_base = batch * p.out_batch + head * p.out_head +
                           static_cast<int64_t>(sq.off_q) * p.out_seq;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // The row's end by kpt/softmax.h: a +inf max (an overflowed logit) gives NaN and lse +inf.
    const kpt::RowEnd end = kpt::row_end(row_max[h], quad_sum(row_sum[h]));
    const int row = row0 + 8 * h;
    if (row >= sq.len_q) continue;
    uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.out) + out_base +
                                                static_cast<int64_t>(row) * p.out_seq + col0);
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      dst[4 * j] = pack2<kBf16>(o[4 * j + 2 * h] * end.inv, o[4 * j + 2 * h + 1] * end.inv);
    }
    if (lane % 4 == 0) store_lse(p, sq, batch, head, row, end.lse2);
  }
}

// The same epilogue through shared memory: a warpgroup writes its 64 normalised O rows (rows
// row0 - wg_row_lo and + 8 of the tile, in the TMA box's swizzle) to `stage` (kD / 64 chunks of
// 64 rows x 128 B, chunk_bytes apart; the caller guarantees nothing else reads it any more),
// then one thread stores the chunks with TMA, which clips rows past seqlen_q (dense batches
// only: a varlen sequence's rows are followed by the next one's), and (with
// `wait_read`) waits until they have read `stage`. `bar_id` is a named barrier for this
// warpgroup's 128 threads.
template <bool kBf16, int kD>
__device__ __forceinline__ void store_output_tma(const Params& p, int batch, int head,
                                                 int wg_row_lo, int row0, int col0, int tid,
                                                 uint32_t stage, uint32_t chunk_bytes, int bar_id,
                                                 const float (&o)[kD / 2],
                                                 const float (&row_max)[2], float (&row_sum)[2],
                                                 bool wait_read = true) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const kpt::RowEnd end = kpt::row_end(row_max[h], quad_sum(row_sum[h]));  // as above
    const int row = row0 + 8 * h;
    const int r = row - wg_row_lo;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      const uint32_t addr = stage + (j / 8) * chunk_bytes + swizzled(r, 8 * (j % 8) + col0);
      const uint32_t v = pack2<kBf16>(o[4 * j + 2 * h] * end.inv, o[4 * j + 2 * h + 1] * end.inv);
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
    }
    if (row < p.seqlen_q && tid % 4 == 0) store_lse(p, Seq{}, batch, head, row, end.lse2);
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("bar.sync %0, 128;" ::"r"(bar_id) : "memory");
  if (tid == 0) {
#pragma unroll
    for (int c = 0; c < kD / 64; ++c) {
      tma_store(&p.tma_o, stage + c * chunk_bytes, c * kSwizzleElems, wg_row_lo, head, batch);
    }
    if (wait_read) bulk_wait_read();  // the shared memory must outlive the reads
  }
}

// The key columns [n_begin, n_end) some row of the query tile [m0, m0 + block_m) can see
// (none when the tile starts past the sequence's queries).
__device__ __forceinline__ void key_range(const Params& p, const Seq& sq, int m0, int block_m,
                                          int& n_begin, int& n_end) {
  const int diag = sq.len_k - sq.len_q;
  const int last_row = min(m0 + block_m, sq.len_q) - 1;
  n_end = m0 < sq.len_q ? sq.len_k : 0;
  if (p.window_right >= 0) n_end = min(n_end, last_row + diag + p.window_right + 1);
  n_begin = 0;
  if (p.window_left >= 0) n_begin = max(0, m0 + diag - p.window_left);
}

// Host (kernels.cu): a 4-D TMA map (head_dim, seq, heads, batch) with a [64 x rows] box, and
// whether {batch, seq, head} element strides are 16-byte multiples (TMA).
int make_map(CUtensorMap* map, int dtype, const void* ptr, const int64_t* strides, int64_t batch,
             int64_t seq, int64_t heads, int head_dim, int rows);
bool aligned_strides(const int64_t* strides);

// Host: the overlap variant (kernels_overlap.cu). Its query tile height depends on head_dim
// and sizes the box of the Q tensor map.
int overlap_block_m(int head_dim);
int launch_overlap(const Params& params, bool bf16, int head_dim, int64_t seqlen_q,
                   int64_t heads, int64_t batch, bool persistent, cudaStream_t stream);
// The dynamic variant's split of its last tiles on a device with `sms` SMs: pieces per split
// tile (0: none) and the first split tile; and the scratch it needs: uint32 counter words (the
// tile counter, then the split counters) and float4 elements of workspace.
void overlap_split_plan(int head_dim, bool masked, int64_t seqlen_q, int64_t seqlen_k,
                        int64_t heads, int64_t batch, int sms, int& pieces, int64_t& split_from,
                        int64_t& counter_words, int64_t& workspace_float4);

}  // namespace kpt_fa90
