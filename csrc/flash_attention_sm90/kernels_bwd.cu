// kpt-targets: sm_90a
// Flash-attention backward for Hopper: TMA + mbarrier pipeline feeding wgmma, dQ summed with
// fp32 bulk reductions (not deterministic; the Triton backward is).
//
// One CTA owns a 128-key block of one (batch, kv head) and keeps its dK and dV in registers
// while it walks every query block that sees those keys, for every q head of the GQA group (so
// GQA needs no reduction of dK/dV afterwards). Three warpgroups:
//   warpgroup 0  producer: one thread loads K and V once, then per item (q head, block of
//                kRows queries: 64 at D = 128, 128 at D = 64) Q, dO, the log2-domain lse and
//                delta = rowsum(dO * O) into a 2-stage ring;
//   warpgroups 1, 2  consumers: each owns 64 of the keys and computes, per item, with the
//                keys as the M dimension (so P^T and dS^T come out of the accumulators already
//                in the A-fragment layout of the next products):
//                  S^T = K Q^T, dP^T = V dO^T            (both operands from shared memory)
//                  P^T = exp2(S^T * scale - lse), dS^T = P^T * (dP^T - delta) * scale
//                  dV += P^T dO, dK += dS^T Q            (A from registers)
//                  dQ = dS K                             (dS^T stored to shared memory, read
//                                                         transposed)
//                The two warpgroups share the dQ product over all 128 keys (at D = 128 each
//                takes 64 of the columns, at D = 64 64 of the 128 rows), so each dQ element
//                gets one addition per CTA. A warpgroup's 64 x 64 fp32 part is
//                staged in shared memory and added to an fp32 dQ buffer by one bulk reduce.
//                Schedule per item: dQ is issued before dK so that its staging stores run
//                under the dK product, and the next item's S^T and dP^T are issued before the
//                fence, barrier and reduce that send this item's dQ.
// At the end dK and dV leave through the freed Q/dO ring and TMA stores (register stores where
// their strides do not allow TMA).
// Around the kernel: a preprocess kernel forms lse2 = lse * log2(e) (+inf for rows that see no
// key and for the padding rows, so their P is 0) and delta (minus dlse when lse has a
// gradient); a postprocess kernel casts the fp32 dQ buffer into dq. Both run near the memory
// bandwidth (16-byte accesses; the cast transposes through shared memory).
// Speed and what was tried: kpt/ops/flash_attention/SM90_NOTES.md ("Backward").

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kpt/flash_attention_sm90.h"

namespace kpt_fa90 {
namespace {

constexpr int kBwdKeys = 128;  // keys per CTA: 64 per consumer warpgroup (wgmma M)
// Queries per item (the N of S^T and dP^T): 128 at D = 64, where 64-query items made products
// too small for the per-item waits and barriers; 64 at D = 128, where the registers hold no
// more. The dQ buffer is kept in 64-row blocks either way.
template <int kD>
constexpr int bwd_rows() { return kD == 64 ? 128 : 64; }
constexpr int kDQRows = 64;
constexpr int kBwdStages = 2;
constexpr int kBwdThreads = 384;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "registers");

struct BwdParams {
  CUtensorMap tma_q, tma_k, tma_v, tma_do;
  CUtensorMap tma_dk, tma_dv;  // box [64 x 64]; used when store_tma is set
  int store_tma;               // dk and dv have TMA-aligned strides: stored through shared memory
  const float* lse2;   // (B, H, Sq_pad): log2-domain lse, +inf where P must be 0
  const float* delta;  // (B, H, Sq_pad): rowsum(dO * O) - dlse
  float* dq_accum;     // (B, H, Sq_pad, D), zeroed before the launch
  void* dk;
  void* dv;
  int64_t dk_batch, dk_seq, dk_head, dv_batch, dv_seq, dv_head;
  int seqlen_q, seqlen_k, seqlen_q_pad, heads, group;
  float score_scale;   // scale * log2(e), or scale / softcap with a soft cap
  float softcap_log2;  // softcap * log2(e); 0 without soft cap
  float ds_scale;      // the softmax scale (dS carries it into dK and dQ)
  int window_left, window_right;
};

// Shared memory: K and V [128 x kD] once, a ring of Q and dO [kRows x kD] with their lse2 and
// delta rows, two dS^T buffers [128 keys x kRows queries] (alternating items; kRows / 64
// chunks of 64 queries, each one 128-byte swizzled row per key), the mbarriers.
template <int kD>
struct BwdSmem {
  static constexpr int kRows = bwd_rows<kD>();
  static constexpr int kKVChunk = kBwdKeys * kRowBytes;  // one 64-column TMA box of K or V
  static constexpr int kQChunk = kRows * kRowBytes;      // one 64-column box of Q or dO
  static constexpr int kKVBytes = kBwdKeys * kD * 2;
  static constexpr int kQBytes = kRows * kD * 2;
  static constexpr int kDSChunk = kBwdKeys * kRowBytes;  // dS^T of 64 queries
  static constexpr int kDSBytes = kBwdKeys * kRows * 2;
  static constexpr int kDQBytes = kDQRows * 64 * 4;
  static constexpr int kK = 0;
  static constexpr int kV = kK + kKVBytes;
  static constexpr int kQ = kV + kKVBytes;
  static constexpr int kDO = kQ + kBwdStages * kQBytes;
  static constexpr int kDS = kDO + kBwdStages * kQBytes;
  static constexpr int kDQ = kDS + 2 * kDSBytes;  // per warpgroup: 64 x 64 fp32 dQ staging
  static constexpr int kLse = kDQ + 2 * kDQBytes;
  static constexpr int kDelta = kLse + kBwdStages * kRows * 4;
  static constexpr int kBars = kDelta + kBwdStages * kRows * 4;
  static constexpr int kBytes = kBars + 8 * (1 + 2 * kBwdStages);
  static constexpr int kAlloc = kBytes + 1024;  // 1024-byte alignment of the swizzled tiles
  static constexpr uint32_t kStageTx = 2 * kQBytes + 2 * kRows * 4;
  static_assert(kAlloc <= 227 * 1024, "shared memory");
};

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// dst[i] += src[i] for `bytes` / 4 floats, asynchronously (one bulk_group).
__device__ __forceinline__ void bulk_reduce_add(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n\t"
      "cp.async.bulk.commit_group;" ::"l"(dst), "r"(src), "r"(bytes)
      : "memory");
}

__device__ __forceinline__ void warpgroup_sync(int wg) {
  asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");  // ids 2, 3 (1: both consumers)
}

__device__ __forceinline__ void st_shared(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

template <bool kBf16>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (kBf16) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

// The query rows [m_begin, m_end) some key of [n0, n0 + 128) is visible to.
__device__ __forceinline__ void query_range(const BwdParams& p, int n0, int& m_begin,
                                            int& m_end) {
  const int diag = p.seqlen_k - p.seqlen_q;
  const int last_key = min(n0 + kBwdKeys, p.seqlen_k) - 1;
  m_begin = p.window_right >= 0 ? max(0, n0 - diag - p.window_right) : 0;
  m_end = p.window_left >= 0 ? min(p.seqlen_q, last_key - diag + p.window_left + 1)
                             : p.seqlen_q;
}

// kSoftcap is a template argument: with a runtime flag ptxas cannot tell which accumulators
// the two paths read between wgmma waits and serializes the wgmmas (warning C7514).
template <bool kBf16, int kD, bool kSoftcap>
__global__ void __launch_bounds__(kBwdThreads, 1)
    attention_bwd(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // see kernels.cu: only the sm_90a cubin is ever launched
#else
  using L = BwdSmem<kD>;
  constexpr int kRows = L::kRows;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t bars = base + L::kBars;
  const uint32_t kv_full = bars;
  auto full = [&](int s) { return bars + 8 * (1 + 2 * s); };
  auto empty = [&](int s) { return bars + 8 * (2 + 2 * s); };

  const int n0 = blockIdx.x * kBwdKeys;
  const int head_kv = blockIdx.y, batch = blockIdx.z;
  int m_begin, m_end;
  query_range(p, n0, m_begin, m_end);
  const int m_first = m_begin / kRows;
  const int per_head = m_end > m_begin ? (m_end - 1) / kRows - m_first + 1 : 0;
  const int items = per_head * p.group;  // the same for both consumer warpgroups

  // Through a shuffle so that the compiler knows it is warp-uniform: the descriptors built
  // from it then stay in uniform registers.
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);
  if (threadIdx.x == 0) {
    bar_init(kv_full, 1);
    for (int s = 0; s < kBwdStages; ++s) {
      bar_init(full(s), 1);
      bar_init(empty(s), 256);  // every consumer thread releases a stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x != 0 || items == 0) return;
    bar_expect_tx(kv_full, 2 * L::kKVBytes);
#pragma unroll
    for (int c = 0; c < kD / kSwizzleElems; ++c) {
      tma_load(base + L::kK + c * L::kKVChunk, &p.tma_k, kv_full, c * kSwizzleElems, n0,
               head_kv, batch);
      tma_load(base + L::kV + c * L::kKVChunk, &p.tma_v, kv_full, c * kSwizzleElems, n0,
               head_kv, batch);
    }
    for (int it = 0; it < items; ++it) {
      const int head = head_kv * p.group + it / per_head;
      const int m0 = (m_first + it % per_head) * kRows;
      const int s = it % kBwdStages;
      wait(empty(s), ((it / kBwdStages) & 1) ^ 1);  // fresh barriers pass parity 1
      bar_expect_tx(full(s), L::kStageTx);
#pragma unroll
      for (int c = 0; c < kD / kSwizzleElems; ++c) {
        tma_load(base + L::kQ + s * L::kQBytes + c * L::kQChunk, &p.tma_q, full(s),
                 c * kSwizzleElems, m0, head, batch);
        tma_load(base + L::kDO + s * L::kQBytes + c * L::kQChunk, &p.tma_do, full(s),
                 c * kSwizzleElems, m0, head, batch);
      }
      const int64_t row = (static_cast<int64_t>(batch) * p.heads + head) * p.seqlen_q_pad + m0;
      bulk_load(base + L::kLse + s * kRows * 4, p.lse2 + row, kRows * 4, full(s));
      bulk_load(base + L::kDelta + s * kRows * 4, p.delta + row, kRows * 4, full(s));
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int warp = tid / 32, lane = tid % 32;
  const int key_lo = n0 + wg * 64;              // this warpgroup's 64 keys
  const int krow = warp * 16 + lane / 4;        // accumulator rows krow and krow + 8
  const int col0 = 2 * (lane % 4);              // accumulator columns 8j + col0 + {0, 1}
  const int diag = p.seqlen_k - p.seqlen_q;

  float dk[kD / 2], dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;

  if (items > 0) wait(kv_full, 0);
  // wgmma descriptors, built once; per product and k-step only a constant offset is added.
  // K-major reads (S^T, dP^T): this warpgroup's 64 rows of K / V, and stage 0 of Q / dO.
  const uint64_t k_desc = make_desc(base + L::kK + wg * 64 * kRowBytes, 16, 1024);
  const uint64_t v_desc = make_desc(base + L::kV + wg * 64 * kRowBytes, 16, 1024);
  const uint64_t q_desc = make_desc(base + L::kQ, 16, 1024);
  const uint64_t do_desc = make_desc(base + L::kDO, 16, 1024);
  // MN-major reads: Q / dO as the B of dK / dV, dS^T as the A and K as the B of dQ.
  const uint64_t q_mn_desc = make_desc(base + L::kQ, L::kQChunk, 1024);
  const uint64_t do_mn_desc = make_desc(base + L::kDO, L::kQChunk, 1024);
  const uint64_t ds_mn_desc = make_desc(base + L::kDS, L::kDSBytes, 1024);
  const uint64_t k_mn_desc = make_desc(base + L::kK, L::kKVChunk, 1024);

  uint32_t pa[kRows / 4], ds[kRows / 4];
  float dq[32];
  // dQ leaves through shared memory: each warpgroup stages its 64 x 64 fp32 part in fragment
  // order (thread t's 32 values as 8 float4 at k * 128 + t: conflict-free stores) and one
  // thread adds the 16 KiB to the matching block of the dQ buffer with a bulk reduce, which
  // moves whole lines instead of 2048 scattered atomics. attention_bwd_dq undoes the order.
  const bool dq_leader = tid == 0;
  float4* dq_stage = reinterpret_cast<float4*>(smem + L::kDQ + wg * L::kDQBytes);
  // Waits until the previous item's reduce has read the staging buffer, then fills it.
  auto stage_dq = [&]() {
    if (dq_leader) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    warpgroup_sync(wg);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      dq_stage[k * 128 + tid] = make_float4(dq[4 * k], dq[4 * k + 1], dq[4 * k + 2], dq[4 * k + 3]);
    }
  };
  // Makes the staged part visible to the async proxy and adds it to the dQ buffer.
  auto send_dq = [&](int head, int m0) {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    warpgroup_sync(wg);
    if (dq_leader) {
      // D = 128: this warpgroup's 64 columns; D = 64: its 64 of the item's 128 rows.
      const int64_t block =
          ((static_cast<int64_t>(batch) * p.heads + head) * p.seqlen_q_pad + m0) * kD +
          wg * 4096;
      bulk_reduce_add(p.dq_accum + block, base + L::kDQ + wg * L::kDQBytes, L::kDQBytes);
    }
  };

  // acc = A B^T over kD for A = this warpgroup's 64 rows of a [128 x kD] tile (K or V) and
  // B = a [kRows x kD] tile (Q or dO); one commit group each.
  auto issue_transposed = [&](float* acc, uint64_t a_desc, uint64_t b_desc) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t offset = (kk % 4) * 32;
      const uint64_t a = desc_at(a_desc, (kk / 4) * L::kKVChunk + offset);
      const uint64_t b = desc_at(b_desc, (kk / 4) * L::kQChunk + offset);
      if constexpr (kRows == 64) {
        wgmma_ss_n64<kBf16, false>(acc, a, b, kk > 0);
      } else if constexpr (kBf16) {
        wgmma_ss_Bf16_n128(acc, a, b, kk > 0);
      } else {
        wgmma_ss_F16_n128(acc, a, b, kk > 0);
      }
    }
    wgmma_commit();
  };
  // S^T = K Q^T and dP^T = V dO^T of item `it`: [64 keys x kRows queries], both K-major.
  float sc[kRows / 2], dp[kRows / 2];
  auto issue_scores = [&](int it) {
    const int s = it % kBwdStages;
    if (it < items) wait(full(s), (it / kBwdStages) & 1);
    pin(sc);
    pin(dp);
    wgmma_fence();
    issue_transposed(sc, k_desc, desc_at(q_desc, s * L::kQBytes));
    issue_transposed(dp, v_desc, desc_at(do_desc, s * L::kQBytes));
  };
  if (items > 0) issue_scores(0);

  // Item it is (head, query block mb): the blocks of one head, then the next head.
  int head = head_kv * p.group, mb = m_first;
  for (int it = 0; it < items; ++it) {
    const int m0 = mb * kRows;
    const int s = it % kBwdStages;
    const float* lse_s = reinterpret_cast<const float*>(smem + L::kLse + s * kRows * 4);
    const float* delta_s = reinterpret_cast<const float*>(smem + L::kDelta + s * kRows * 4);
    // S^T and dP^T of this item were issued at the end of the previous one (or above).

    // This thread's kRows / 4 query columns, 8j + col0 + {0, 1}, of lse2 and delta: 8-byte
    // loads, issued before the waits so that their latency hides under the products.
    float lse_r[kRows / 4], delta_r[kRows / 4];
    auto load_cols = [&](float (&dst)[kRows / 4], const float* src) {
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
        const float2 v = *reinterpret_cast<const float2*>(src + 8 * j + col0);
        dst[2 * j] = v.x;
        dst[2 * j + 1] = v.y;
      }
    };

    // Element i of sc / dp: key krow + 8 ((i / 2) % 2) of this warpgroup, query
    // m0 + 8 (i / 4) + col0 + i % 2.
    const bool visible_all =
        key_lo + 64 <= p.seqlen_k &&
        (p.window_right < 0 || key_lo + 63 <= m0 + diag + p.window_right) &&
        (p.window_left < 0 || key_lo >= m0 + kRows - 1 + diag - p.window_left);
    // Per key row h, the visible queries as offsets [lo, hi) from this thread's first query
    // column m0 + col0, so that an element costs two compares against its compile-time
    // offset 8 (i / 4) + i % 2 and a select (64-bit, then clamped: windows may be huge).
    auto bounds = [&](int (&lo)[2], int (&hi)[2]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int key = key_lo + krow + 8 * h;
        const int64_t k0 = static_cast<int64_t>(key) - diag - (m0 + col0);  // its diagonal
        const int64_t begin = p.window_right >= 0 ? k0 - p.window_right : -1;
        const int64_t end = key >= p.seqlen_k ? -1
                            : p.window_left >= 0 ? k0 + p.window_left + 1 : kRows;
        lo[h] = static_cast<int>(min(max(begin, int64_t{-1}), int64_t{kRows}));
        hi[h] = static_cast<int>(min(max(end, int64_t{-1}), int64_t{kRows}));
      }
    };
    auto inside = [&](int i, const int (&lo)[2], const int (&hi)[2]) {
      const int off = 8 * (i / 4) + i % 2;
      return (off >= lo[(i / 2) % 2]) & (off < hi[(i / 2) % 2]);
    };
    // Zeroes P where the key is invisible; one branch per item, taken only at a mask's edge.
    auto mask_p = [&]() {
      if (!visible_all) {
        int lo[2], hi[2];
        bounds(lo, hi);
#pragma unroll
        for (int i = 0; i < kRows / 2; ++i) sc[i] = inside(i, lo, hi) ? sc[i] : 0.f;
      }
    };

    if constexpr (kSoftcap) {
      // P and dS in one pass once dP^T is done too: both need t = tanh(s * scale / cap).
      // (lse2 and delta are read per element here: hoisting them spills at D = 128.)
      wgmma_wait<0>();
      pin(sc);
      pin(dp);
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) {
        const int col = 8 * (i / 4) + col0 + i % 2;
        const float t = fast_tanh(sc[i] * p.score_scale);
        const float prob = fast_exp2(fmaf(p.softcap_log2, t, -lse_s[col]));
        // The plain per-element test here: the bounds' four registers spill at D = 128.
        const int key = key_lo + krow + 8 * ((i / 2) % 2);
        const int rel = key - (m0 + col) - diag;  // key - diagonal
        const bool visible = (key < p.seqlen_k) &
                             ((p.window_right < 0) | (rel <= p.window_right)) &
                             ((p.window_left < 0) | (rel >= -p.window_left));
        sc[i] = visible_all | visible ? prob : 0.f;
        dp[i] = sc[i] * (dp[i] - delta_s[col]) * (1.f - t * t) * p.ds_scale;
      }
    } else {
      load_cols(lse_r, lse_s);
      wgmma_wait<1>();
      pin(sc);
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) {
        sc[i] = fast_exp2(fmaf(sc[i], p.score_scale, -lse_r[2 * (i / 4) + i % 2]));
      }
      mask_p();
    }

    // acc += A B over the item's queries: A (P^T or dS^T) from registers, B = a [kRows x kD]
    // tile (dO or Q), MN-major as V is in the forward; one commit group.
    auto accumulate_rs = [&](float (&acc)[kD / 2], uint32_t (&a)[kRows / 4],
                             uint64_t b_desc) {
      pin(acc);
      pin(a);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kRows / 16; ++kk) {
        pv_gemm<kBf16, kD>(acc, &a[4 * kk], desc_at(b_desc, kk * 16 * kRowBytes));
      }
      wgmma_commit();
    };

    // dV += P^T dO.
#pragma unroll
    for (int i = 0; i < kRows / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);
    accumulate_rs(dv, pa, desc_at(do_mn_desc, s * L::kQBytes));

    if constexpr (!kSoftcap) {
      load_cols(delta_r, delta_s);
      wgmma_wait<1>();  // dP^T (the dV product may still run)
      pin(dp);
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) {
        // With 128-query items the fp32 P cannot stay live next to dP^T, the dV product's
        // operands and the accumulators (ptxas spills and serializes the wgmmas): dS takes P as
        // rounded for the dV product, one more rounding before dS's own.
        float prob = sc[i];
        if constexpr (kRows == 128) {
          const float2 pair = unpack2<kBf16>(pa[i / 2]);
          prob = i % 2 == 0 ? pair.x : pair.y;
        }
        dp[i] = prob * (dp[i] - delta_r[2 * (i / 4) + i % 2]) * p.ds_scale;
      }
    }

    // dS^T to registers (A of dK) and to shared memory (A of dQ, read transposed): rows are
    // keys; each 64 queries = one 128-byte swizzled row of a chunk, where 16-byte piece j of
    // row r sits at j ^ (r % 8).
#pragma unroll
    for (int i = 0; i < kRows / 4; ++i) ds[i] = pack2<kBf16>(dp[2 * i], dp[2 * i + 1]);
    const uint32_t ds_buf = base + L::kDS + (it & 1) * L::kDSBytes;
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wg * 64 + krow + 8 * h;
        st_shared(ds_buf + (j / 8) * L::kDSChunk + r * kRowBytes + (((j % 8) ^ (lane / 4)) * 16) +
                      col0 * 2,
                  ds[2 * j + h]);
      }
    }

    // dQ = dS K over all 128 keys: A = dS^T in shared memory read MN-major, B = K [keys x kD]
    // MN-major. Each warpgroup takes a 64 x 64 part: at D = 128 its 64 columns of the item's
    // 64 rows, at D = 64 its 64 of the item's 128 rows. The generic-proxy stores must be
    // visible to the async proxy (wgmma) first, and both warpgroups' keys written.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("bar.sync 1, 256;" ::: "memory");
    pin(dq);
    wgmma_fence();
    {
      const uint32_t ds_part = (it & 1) * L::kDSBytes + (kRows == 128 ? wg * L::kDSChunk : 0);
      const uint32_t k_part = kD == 128 ? wg * L::kKVChunk : 0;
#pragma unroll
      for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
        wgmma_ss_n64<kBf16, true>(dq, desc_at(ds_mn_desc, ds_part + kk * 16 * kRowBytes),
                                  desc_at(k_mn_desc, k_part + kk * 16 * kRowBytes), kk > 0);
      }
    }
    wgmma_commit();
    // dK += dS^T Q, issued after dQ so that dQ's staging runs under it.
    accumulate_rs(dk, ds, desc_at(q_mn_desc, s * L::kQBytes));
    wgmma_wait<1>();  // dV and dQ
    pin(dq);
    pin(dv);
    pin(pa);
    stage_dq();
    wgmma_wait<0>();  // dK: the stage's Q and dO are no longer read
    pin(dk);
    pin(ds);
    bar_arrive(empty(s));
    // The next item's S^T and dP^T run under the fence, barrier and reduce of this item's dQ.
    // After the last item they read a stale stage and their results are dropped (there is no
    // load to wait for).
    issue_scores(it + 1);  // unconditional: under a branch ptxas serializes the wgmmas (C7515)
    send_dq(head, m0);
    if (++mb == m_first + per_head) {
      mb = m_first;
      ++head;
    }
  }
  wgmma_wait_all();
  pin(sc);
  pin(dp);
  if (dq_leader) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");

  // dK and dV rows of this warpgroup's keys (zeros where no query sees them).
  if (p.store_tma) {
    // Through the Q/dO ring, free once both warpgroups' products are done (the other one's
    // last dK product reads the same Q stage): per warpgroup kD / 64 boxes of dK then of dV,
    // each 64 keys x 128 B in the TMA swizzle; TMA clips the keys past seqlen_k.
    asm volatile("bar.sync 1, 256;" ::: "memory");
    constexpr uint32_t kBox = 64 * kRowBytes;
    const uint32_t stage = base + L::kQ + wg * 2 * (kD / 64) * kBox;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = krow + 8 * h;
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        const uint32_t at = stage + (j / 8) * kBox + swizzled(r, 8 * (j % 8) + col0);
        st_shared(at, pack2<kBf16>(dk[4 * j + 2 * h], dk[4 * j + 2 * h + 1]));
        st_shared(at + (kD / 64) * kBox, pack2<kBf16>(dv[4 * j + 2 * h], dv[4 * j + 2 * h + 1]));
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    warpgroup_sync(wg);
    if (tid == 0) {
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        tma_store(&p.tma_dk, stage + c * kBox, c * kSwizzleElems, key_lo, head_kv, batch);
        tma_store(&p.tma_dv, stage + (kD / 64 + c) * kBox, c * kSwizzleElems, key_lo, head_kv,
                  batch);
      }
      bulk_wait_read();
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key_lo + krow + 8 * h;
      if (key >= p.seqlen_k) continue;
      uint32_t* dk_dst = reinterpret_cast<uint32_t*>(
          static_cast<uint16_t*>(p.dk) + batch * p.dk_batch + head_kv * p.dk_head +
          static_cast<int64_t>(key) * p.dk_seq + col0);
      uint32_t* dv_dst = reinterpret_cast<uint32_t*>(
          static_cast<uint16_t*>(p.dv) + batch * p.dv_batch + head_kv * p.dv_head +
          static_cast<int64_t>(key) * p.dv_seq + col0);
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        dk_dst[4 * j] = pack2<kBf16>(dk[4 * j + 2 * h], dk[4 * j + 2 * h + 1]);
        dv_dst[4 * j] = pack2<kBf16>(dv[4 * j + 2 * h], dv[4 * j + 2 * h + 1]);
      }
    }
  }
#endif
}


// Row r of lse2 and delta (see BwdParams) for query q of (batch * heads + head) bh, from the
// row's rowsum(dO * O) `acc`: padding rows (q >= seqlen_q) get P = 0 through lse2 = +inf.
__device__ __forceinline__ void write_prep_row(int64_t r, int q, int64_t bh, int seqlen_q,
                                               float acc, const float* lse, const float* dlse,
                                               float* lse2, float* delta) {
  if (q >= seqlen_q) {
    lse2[r] = INFINITY;
    delta[r] = 0.f;
    return;
  }
  const int64_t li = bh * seqlen_q + q;
  const float l = lse[li];
  delta[r] = dlse == nullptr ? acc : acc - dlse[li];
  lse2[r] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
}

// lse2 and delta (see BwdParams) of one (batch, head, padded query row) per kLanes = D / 8
// threads: each loads 16 bytes of O and of dO (8 elements) and the group sums its products
// with shuffles. Needs 16-byte aligned rows of out and dout (kpt_fa90_backward checks; the
// scalar kernel below covers the rest). 256 threads = 256 / kLanes rows per block.
template <bool kBf16, int kLanes>
__global__ void __launch_bounds__(256) attention_bwd_prep_vec(
    const uint16_t* __restrict__ out, int64_t out_batch, int64_t out_seq, int64_t out_head,
    const uint16_t* __restrict__ dout, int64_t dout_batch, int64_t dout_seq, int64_t dout_head,
    const float* __restrict__ lse, const float* __restrict__ dlse, float* __restrict__ lse2,
    float* __restrict__ delta, int64_t rows, int heads, int seqlen_q, int seqlen_q_pad) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (256 / kLanes) + threadIdx.x / kLanes;
  const int part = threadIdx.x % kLanes;
  const bool valid = r < rows;  // no early return: the whole warp takes part in the shuffles
  const int q = static_cast<int>(r % seqlen_q_pad);
  const int64_t bh = r / seqlen_q_pad;
  const int64_t b = bh / heads, h = bh % heads;
  float acc = 0.f;
  if (valid && q < seqlen_q) {
    const uint4 o = *reinterpret_cast<const uint4*>(out + b * out_batch + q * out_seq +
                                                    h * out_head + 8 * part);
    const uint4 g = *reinterpret_cast<const uint4*>(dout + b * dout_batch + q * dout_seq +
                                                    h * dout_head + 8 * part);
    const uint32_t ow[4] = {o.x, o.y, o.z, o.w}, gw[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = unpack2<kBf16>(ow[i]), c = unpack2<kBf16>(gw[i]);
      acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (valid && part == 0) write_prep_row(r, q, bh, seqlen_q, acc, lse, dlse, lse2, delta);
}

// The same for any even strides and 4-byte aligned rows: one warp per row, 4-byte loads.
template <bool kBf16>
__global__ void __launch_bounds__(256) attention_bwd_prep(
    const uint16_t* out, int64_t out_batch, int64_t out_seq, int64_t out_head,
    const uint16_t* dout, int64_t dout_batch, int64_t dout_seq, int64_t dout_head,
    const float* lse, const float* dlse, float* lse2, float* delta, int64_t rows, int heads,
    int seqlen_q, int seqlen_q_pad, int head_dim) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps: one row per warp
  const int q = static_cast<int>(r % seqlen_q_pad);
  const int64_t bh = r / seqlen_q_pad;
  const int64_t b = bh / heads, h = bh % heads;
  float acc = 0.f;
  if (q < seqlen_q) {
    const uint16_t* o = out + b * out_batch + q * out_seq + h * out_head;
    const uint16_t* g = dout + b * dout_batch + q * dout_seq + h * dout_head;
    for (int d = 2 * lane; d < head_dim; d += 64) {
      const float2 a = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(o + d));
      const float2 c = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(g + d));
      acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) write_prep_row(r, q, bh, seqlen_q, acc, lse, dlse, lse2, delta);
}

// dq (B, Sq, H, D) strided from the fp32 buffer: one 128-thread block per staged 64 x 64 part
// (batch, head, 64-row block, 64-column half), in the fragment order stage_dq wrote it. All 8
// loads of a thread are issued first (coalesced float4), the part is transposed to row-major
// through shared memory (row pitch 72 floats: the float2 stores of a half-warp hit 32
// different banks), then 16 threads write a row's 64 columns as 4 values each (128 contiguous
// bytes per row; 8-byte stores where dq allows them, else two 4-byte ones).
template <bool kBf16>
__global__ void __launch_bounds__(128) attention_bwd_dq(
    const float* __restrict__ dq_accum, uint16_t* __restrict__ dq, int64_t dq_batch,
    int64_t dq_seq, int64_t dq_head, int heads, int seqlen_q, int row_blocks, int halves,
    int store8) {
  constexpr int kPitch = 72;
  __shared__ float tile[64 * kPitch];
  const int64_t part = blockIdx.x;
  const int half = static_cast<int>(part % halves);
  const int row_block = static_cast<int>(part / halves % row_blocks);
  const int64_t bh = part / halves / row_blocks;
  const int64_t b = bh / heads, h = bh % heads;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const float4* src = reinterpret_cast<const float4*>(dq_accum + part * 4096);
  float4 v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = src[k * 128 + t];
  const int r = warp * 16 + lane / 4, c = 2 * (lane % 4);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    *reinterpret_cast<float2*>(&tile[r * kPitch + 8 * k + c]) = make_float2(v[k].x, v[k].y);
    *reinterpret_cast<float2*>(&tile[(r + 8) * kPitch + 8 * k + c]) = make_float2(v[k].z, v[k].w);
  }
  __syncthreads();
  uint16_t* base = dq + b * dq_batch + h * dq_head + half * 64 + 4 * (t % 16);
#pragma unroll
  for (int pass = 0; pass < 8; ++pass) {
    const int row = pass * 8 + t / 16;
    const int q = row_block * 64 + row;
    if (q >= seqlen_q) continue;
    const float4 x = *reinterpret_cast<const float4*>(&tile[row * kPitch + 4 * (t % 16)]);
    const uint32_t lo = pack2<kBf16>(x.x, x.y), hi = pack2<kBf16>(x.z, x.w);
    uint32_t* dst = reinterpret_cast<uint32_t*>(base + q * dq_seq);
    if (store8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
    } else {
      dst[0] = lo;
      dst[1] = hi;
    }
  }
}

template <bool kBf16, int kD>
int launch_bwd(const BwdParams& params, int64_t batch, int64_t heads_kv, cudaStream_t stream) {
  using L = BwdSmem<kD>;
  auto kernel = params.softcap_log2 > 0.f ? attention_bwd<kBf16, kD, true>
                                          : attention_bwd<kBf16, kD, false>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kAlloc) !=
      cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const dim3 grid(static_cast<unsigned>((params.seqlen_k + kBwdKeys - 1) / kBwdKeys),
                  static_cast<unsigned>(heads_kv), static_cast<unsigned>(batch));
  kernel<<<grid, kBwdThreads, L::kAlloc, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? KPT_FA90_OK : KPT_FA90_CUDA_ERROR;
}

// Query rows padded to whole items; the buffers below hold that many rows per (batch, head).
int item_rows(int head_dim) { return head_dim == 64 ? bwd_rows<64>() : bwd_rows<128>(); }
int64_t padded_rows(int64_t seqlen_q, int head_dim) {
  const int rows = item_rows(head_dim);
  return (seqlen_q + rows - 1) / rows * rows;
}

}  // namespace
}  // namespace kpt_fa90

extern "C" int64_t kpt_fa90_backward_workspace(int64_t batch, int64_t seqlen_q, int64_t heads,
                                               int head_dim) {
  return batch * heads * kpt_fa90::padded_rows(seqlen_q, head_dim) * (head_dim + 2);
}

extern "C" int kpt_fa90_backward(
    int dtype, int head_dim, const void* q, const int64_t* q_strides, const void* k,
    const int64_t* k_strides, const void* v, const int64_t* v_strides, const void* out,
    const int64_t* out_strides, const void* dout, const int64_t* dout_strides, const float* lse,
    const float* dlse, void* dq, const int64_t* dq_strides, void* dk, const int64_t* dk_strides,
    void* dv, const int64_t* dv_strides, float* workspace, int64_t batch, int64_t seqlen_q,
    int64_t seqlen_k, int64_t heads, int64_t heads_kv, float scale, float softcap,
    int64_t window_left, int64_t window_right, void* stream) {
  using namespace kpt_fa90;
  // The Python launcher validates all of this first; these checks keep the C entry point safe.
  auto even = [](const int64_t* s) { return s[0] % 2 == 0 && s[1] % 2 == 0 && s[2] % 2 == 0; };
  if ((dtype != KPT_FA90_FP16 && dtype != KPT_FA90_BF16) || (head_dim != 64 && head_dim != 128) ||
      batch < 1 || batch > 65535 || heads < 1 || heads_kv < 1 || heads_kv > 65535 ||
      heads % heads_kv != 0 || seqlen_q < 1 || seqlen_k < 1 || seqlen_q >= kMaxSeqlen ||
      seqlen_k >= kMaxSeqlen || !aligned_strides(q_strides) || !aligned_strides(k_strides) ||
      !aligned_strides(v_strides) || !aligned_strides(dout_strides) || !even(out_strides) ||
      !even(dq_strides) || !even(dk_strides) || !even(dv_strides) || workspace == nullptr) {
    return KPT_FA90_UNSUPPORTED;
  }
  for (const void* ptr : {q, k, v, dout, static_cast<const void*>(workspace)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return KPT_FA90_UNSUPPORTED;
  }
  for (const void* ptr : {out, static_cast<const void*>(dq), static_cast<const void*>(dk),
                          static_cast<const void*>(dv)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 4 != 0) return KPT_FA90_UNSUPPORTED;
  }
  const int64_t pad = padded_rows(seqlen_q, head_dim);
  const int64_t rows = batch * heads * pad;
  BwdParams params{};
  params.lse2 = workspace;
  params.delta = workspace + rows;
  params.dq_accum = workspace + 2 * rows;
  params.dk = dk;
  params.dv = dv;
  params.dk_batch = dk_strides[0];
  params.dk_seq = dk_strides[1];
  params.dk_head = dk_strides[2];
  params.dv_batch = dv_strides[0];
  params.dv_seq = dv_strides[1];
  params.dv_head = dv_strides[2];
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.seqlen_k = static_cast<int>(seqlen_k);
  params.seqlen_q_pad = static_cast<int>(pad);
  params.heads = static_cast<int>(heads);
  params.group = static_cast<int>(heads / heads_kv);
  constexpr float kLog2e = 1.4426950408889634f;
  params.score_scale = softcap > 0.f ? scale / softcap : scale * kLog2e;
  params.softcap_log2 = softcap > 0.f ? softcap * kLog2e : 0.f;
  params.ds_scale = scale;
  params.window_left = window_left < 0 || window_left > seqlen_k + seqlen_q
                           ? -1 : static_cast<int>(window_left);
  params.window_right = window_right < 0 || window_right > seqlen_k + seqlen_q
                            ? -1 : static_cast<int>(window_right);
  int rc = make_map(&params.tma_q, dtype, q, q_strides, batch, seqlen_q, heads, head_dim,
                    item_rows(head_dim));
  if (rc == KPT_FA90_OK) {
    rc = make_map(&params.tma_do, dtype, dout, dout_strides, batch, seqlen_q, heads, head_dim,
                  item_rows(head_dim));
  }
  if (rc == KPT_FA90_OK) {
    rc = make_map(&params.tma_k, dtype, k, k_strides, batch, seqlen_k, heads_kv, head_dim,
                  kBwdKeys);
  }
  if (rc == KPT_FA90_OK) {
    rc = make_map(&params.tma_v, dtype, v, v_strides, batch, seqlen_k, heads_kv, head_dim,
                  kBwdKeys);
  }
  if (rc != KPT_FA90_OK) return rc;
  // dK and dV leave through shared memory and TMA where their rows allow it.
  params.store_tma =
      aligned_strides(dk_strides) && aligned_strides(dv_strides) &&
      reinterpret_cast<uintptr_t>(dk) % 16 == 0 && reinterpret_cast<uintptr_t>(dv) % 16 == 0 &&
      make_map(&params.tma_dk, dtype, dk, dk_strides, batch, seqlen_k, heads_kv, head_dim, 64) ==
          KPT_FA90_OK &&
      make_map(&params.tma_dv, dtype, dv, dv_strides, batch, seqlen_k, heads_kv, head_dim, 64) ==
          KPT_FA90_OK;

  auto s = static_cast<cudaStream_t>(stream);
  const bool bf16 = dtype == KPT_FA90_BF16;
  if (cudaMemsetAsync(params.dq_accum, 0, rows * head_dim * sizeof(float), s) != cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const auto* out16 = static_cast<const uint16_t*>(out);
  const auto* dout16 = static_cast<const uint16_t*>(dout);
  // 16-byte rows of out and dout take the vectorised prep (dout always has them: TMA).
  const bool out16b = reinterpret_cast<uintptr_t>(out) % 16 == 0 && out_strides[0] % 8 == 0 &&
                      out_strides[1] % 8 == 0 && out_strides[2] % 8 == 0;
  if (out16b) {
    const int lanes = head_dim / 8;
    const unsigned blocks = static_cast<unsigned>((rows + 256 / lanes - 1) / (256 / lanes));
    auto prep = head_dim == 128 ? (bf16 ? attention_bwd_prep_vec<true, 16>
                                        : attention_bwd_prep_vec<false, 16>)
                                : (bf16 ? attention_bwd_prep_vec<true, 8>
                                        : attention_bwd_prep_vec<false, 8>);
    prep<<<blocks, 256, 0, s>>>(out16, out_strides[0], out_strides[1], out_strides[2], dout16,
                                dout_strides[0], dout_strides[1], dout_strides[2], lse, dlse,
                                workspace, workspace + rows, rows, params.heads, params.seqlen_q,
                                params.seqlen_q_pad);
  } else {
    const unsigned prep_blocks = static_cast<unsigned>((rows + 7) / 8);
    auto prep = bf16 ? attention_bwd_prep<true> : attention_bwd_prep<false>;
    prep<<<prep_blocks, 256, 0, s>>>(out16, out_strides[0], out_strides[1], out_strides[2],
                                     dout16, dout_strides[0], dout_strides[1], dout_strides[2],
                                     lse, dlse, workspace, workspace + rows, rows, params.heads,
                                     params.seqlen_q, params.seqlen_q_pad, head_dim);
  }
  if (cudaGetLastError() != cudaSuccess) return KPT_FA90_CUDA_ERROR;
  if (head_dim == 128) {
    rc = bf16 ? launch_bwd<true, 128>(params, batch, heads_kv, s)
              : launch_bwd<false, 128>(params, batch, heads_kv, s);
  } else {
    rc = bf16 ? launch_bwd<true, 64>(params, batch, heads_kv, s)
              : launch_bwd<false, 64>(params, batch, heads_kv, s);
  }
  if (rc != KPT_FA90_OK) return rc;
  const int halves = head_dim / 64;
  const unsigned parts = static_cast<unsigned>(rows / kDQRows * halves);
  auto* dq16 = static_cast<uint16_t*>(dq);
  const int store8 = reinterpret_cast<uintptr_t>(dq) % 8 == 0 && dq_strides[0] % 4 == 0 &&
                     dq_strides[1] % 4 == 0 && dq_strides[2] % 4 == 0;
  auto post = bf16 ? attention_bwd_dq<true> : attention_bwd_dq<false>;
  post<<<parts, 128, 0, s>>>(params.dq_accum, dq16, dq_strides[0], dq_strides[1], dq_strides[2],
                             params.heads, params.seqlen_q, params.seqlen_q_pad / kDQRows,
                             halves, store8);
  return cudaGetLastError() == cudaSuccess ? KPT_FA90_OK : KPT_FA90_CUDA_ERROR;
}
