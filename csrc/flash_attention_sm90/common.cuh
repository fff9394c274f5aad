// Pieces shared by the sm90 attention kernels (kernels.cu, kernels_overlap.cu): launch
// parameters, the bounded mbarrier wait, TMA, wgmma descriptors and fragment helpers.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "wgmma.cuh"

namespace kpt_fa90 {

constexpr int kBlockN = 128;  // keys per pipeline stage (both kernels)
constexpr int kSwizzleElems = 64;  // 128-byte swizzle rows hold 64 16-bit elements
constexpr int kRowBytes = 128;
// A wait this long means a TMA never completed (a fault): trap instead of hanging.
constexpr uint64_t kWaitLimitNs = 4000000000ull;
// Row/column arithmetic (row + diag + window, windows clamped to Sq + Sk) stays inside int32.
constexpr int64_t kMaxSeqlen = int64_t{1} << 28;

struct Params {
  CUtensorMap tma_q, tma_k, tma_v;
  void* out;
  int64_t out_batch, out_seq, out_head;
  float* lse;
  int seqlen_q, seqlen_k, heads, group;
  float score_scale;    // to the log2 domain: scale * log2(e), or scale / softcap with softcap
  float softcap_log2;   // softcap * log2(e); 0 without soft cap
  int window_left, window_right;
};

// ---- PTX helpers -----------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void bar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool bar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Waits for the phase of parity `parity` to complete. The timer is read only after 1024 failed
// polls, so the common (short) wait costs nothing extra.
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
  if (bar_try_wait(bar, parity)) return;
  uint64_t start = 0;
  for (uint32_t polls = 1;; ++polls) {
    if (bar_try_wait(bar, parity)) return;
    if ((polls & 1023) == 0) {
      const uint64_t now = global_timer_ns();
      if (start == 0) {
        start = now;
      } else if (now - start > kWaitLimitNs) {
        __trap();
      }
    }
  }
}

__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                         int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// wgmma shared-memory descriptor for a 128B-swizzled tile (PTX ISA "matrix descriptor"):
// start address, leading and stride byte offsets (all >> 4), swizzle mode 1 = 128B in bits
// 62-63. The tile base is 1024-byte aligned, so the base-offset field stays 0; stepping the
// start address by 32 bytes moves 16 elements along a swizzled row (the hardware applies the
// XOR pattern to the final address).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// Waits until at most kPending committed wgmma groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Registers read or written by an in-flight wgmma must not be touched or moved by the compiler
// across the issue/wait pair; an empty asm that "modifies" them pins them in place.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
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

template <bool kBf16>
__device__ __forceinline__ void qk_gemm(float* acc, uint64_t a, uint64_t b, int accumulate) {
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

// The key columns [n_begin, n_end) some row of the query tile [m0, m0 + block_m) can see.
__device__ __forceinline__ void key_range(const Params& p, int m0, int block_m, int& n_begin,
                                          int& n_end) {
  const int diag = p.seqlen_k - p.seqlen_q;
  const int last_row = min(m0 + block_m, p.seqlen_q) - 1;
  n_end = p.seqlen_k;
  if (p.window_right >= 0) n_end = min(n_end, last_row + diag + p.window_right + 1);
  n_begin = 0;
  if (p.window_left >= 0) n_begin = max(0, m0 + diag - p.window_left);
}

// Host: the overlap variant (kernels_overlap.cu). Its query tile height depends on head_dim
// and sizes the box of the Q tensor map.
int overlap_block_m(int head_dim);
int launch_overlap(const Params& params, bool bf16, int head_dim, int64_t seqlen_q,
                   int64_t heads, int64_t batch, cudaStream_t stream);

}  // namespace kpt_fa90
