// kpt-targets: sm_90a
// Flash-attention forward for Hopper, "overlap" variant: the FA3 schedule on the same TMA +
// mbarrier + wgmma building blocks as kernels.cu (the "base" variant).
//
// Differences from kernels.cu, all about keeping the tensor cores busy during the softmax:
//   * intra-warpgroup overlap: a consumer issues S(j) = Q K(j)^T, rescales O to the running
//     max of block j-1 while that GEMM runs, issues O += P(j-1) V(j-1), waits only for the
//     first group (wait_group 1), runs the softmax of block j while the PV GEMM still runs,
//     then waits for it (wait_group 0) and packs P(j). Registers hold S(j), P(j-1) and O.
//   * ping-pong: the consumer warpgroups take turns issuing their GEMMs (a ring of named
//     barriers), so one group's softmax runs while the others' GEMMs occupy the tensor cores;
//   * per head_dim tiles: D=128 uses 2 consumers (128 rows) and a 2-stage K/V ring (160 KiB);
//     D=64, whose softmax is as long as its GEMMs, uses 3 consumers (192 rows) and 3 stages.
// Masks are applied only to key blocks that are not fully visible to a warpgroup's 64 rows.
// Every mbarrier wait is bounded (wait() ends the launch with an error); the named barriers
// cannot hang because every consumer warpgroup runs the same number of turns (see the ring).

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kpt/flash_attention_sm90.h"

namespace kpt_fa90 {
namespace {

template <int kD>
struct Tile {
  // Both head dims overlap S(j) with P(j-1) V(j-1) inside a warpgroup; S, packed P and O live
  // together (64 + 32 + kD / 2 registers), which fits the consumers' setmaxnreg budget since no
  // `trap` makes ptxas ignore it (see abort_launch in common.cuh). D = 64 runs three consumer
  // warpgroups (192 query rows) on 160 registers each.
  static constexpr int kConsumers = kD == 64 ? 3 : 2;
  static constexpr int kStages = kD == 64 ? 3 : 2;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // setmaxnreg budgets: 128 x (producer + consumers x kConsumers) <= 64 Ki registers.
  static constexpr int kProducerRegs = kConsumers == 2 ? 40 : 32;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 232 : 160;
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kKVBytes = kBlockN * kD * 2;
  static constexpr int kQChunk = kBlockM * kRowBytes;
  static constexpr int kKVChunk = kBlockN * kRowBytes;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kKVBytes;
  static constexpr int kBars = kV + kStages * kKVBytes;
  static constexpr int kBytes = kBars + 8 * (1 + 4 * kStages);
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kAlloc <= 227 * 1024, "shared memory");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536, "registers");
};

// Named barriers 1..kConsumers (0 is __syncthreads); each completes with 256 threads: the
// warpgroup whose turn it is (bar.sync) and the one handing the turn over (bar.arrive).
__device__ __forceinline__ void turn_wait(int id) {
  asm volatile("bar.sync %0, 256;" ::"r"(id) : "memory");
}
__device__ __forceinline__ void turn_pass(int id) {
  asm volatile("bar.arrive %0, 256;" ::"r"(id) : "memory");
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(Tile<kD>::kThreads, 1)
    attention_fwd_overlap(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // see kernels.cu: only the sm_90a cubin is ever launched
#else
  using T = Tile<kD>;
  constexpr int kStages = T::kStages;
  constexpr int kConsumers = T::kConsumers;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = base + T::kBars;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return ring_bar(bars, s, 1); };
  auto k_empty = [&](int s) { return ring_bar(bars, s, 2); };
  auto v_full = [&](int s) { return ring_bar(bars, s, 3); };
  auto v_empty = [&](int s) { return ring_bar(bars, s, 4); };

  const int m_block = gridDim.x - 1 - blockIdx.x;  // long (causal) tiles first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int m0 = m_block * T::kBlockM;
  int n_begin, n_end;
  key_range(p, m0, T::kBlockM, n_begin, n_end);
  const int n_first = n_begin / kBlockN;
  const int n_last = n_end > n_begin ? (n_end - 1) / kBlockN : n_first - 1;
  const int blocks = n_last - n_first + 1;  // the same for every consumer warpgroup

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    bar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      bar_init(k_full(s), 1);
      bar_init(v_full(s), 1);
      bar_init(k_empty(s), kConsumers * 128);
      bar_init(v_empty(s), kConsumers * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: Q once, then K and V of each key block into the ring ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(T::kProducerRegs));
    if (threadIdx.x != 0 || blocks <= 0) return;
    produce<T, kD, T::kStages>(p, base, bars, m0, head, batch, n_last, blocks);
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(T::kConsumerRegs));
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int warp = tid / 32, lane = tid % 32;
  const int wg_row_lo = m0 + wg * 64;
  const int row0 = wg_row_lo + warp * 16 + lane / 4;  // and row0 + 8 (accumulator layout)
  const int col0 = 2 * (lane % 4);

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's partial sums; reduced over the quad at the end

  if (blocks > 0) {
    const uint32_t q_tile = base + T::kQ + wg * 64 * kRowBytes;
    // Turn ring: warpgroup g waits on barrier 1 + g and passes to the next one. The last
    // warpgroup hands out the first turn and skips its final pass, so every barrier gets as
    // many arrivals as waits (nothing is left pending at exit).
    const int my_turn = 1 + wg;
    const int next_turn = 1 + (wg + 1) % kConsumers;
    const bool last_wg = wg == kConsumers - 1;
    if (last_wg) turn_pass(1);

    auto issue_qk = [&](float (&sc)[kBlockN / 2], int s) {
      const uint32_t k_tile = base + T::kK + s * T::kKVBytes;
      // Both K-major; a 16-wide k step is 32 bytes inside a 128-byte swizzle row, every 64
      // columns the next chunk; 8-row groups repeat every 1024 bytes (SBO).
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t offset = (kk % 4) * 32;
        const uint64_t a = make_desc(q_tile + (kk / 4) * T::kQChunk + offset, 16, 1024);
        const uint64_t b = make_desc(k_tile + (kk / 4) * T::kKVChunk + offset, 16, 1024);
        qk_gemm<kBf16>(sc, a, b, kk > 0);
      }
    };
    auto issue_pv = [&](const uint32_t (&pa)[kBlockN / 4], int s) {
      // V is MN-major for B: 8-key groups every 1024 B (SBO), 64-column chunks LBO apart.
      const uint32_t v_tile = base + T::kV + s * T::kKVBytes;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint64_t b = make_desc(v_tile + kk * 16 * kRowBytes, T::kKVChunk, 1024);
        pv_gemm<kBf16, kD>(o, &pa[4 * kk], b);
      }
    };

    float sc[kBlockN / 2];
    uint32_t pa[kBlockN / 4];
    float correction[2];
    auto rescale = [&](const float (&c)[2]) {
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          o[4 * j + 2 * h] *= c[h];
          o[4 * j + 2 * h + 1] *= c[h];
        }
      }
    };

    wait(q_full, 0);
    {
      // Block 0: S only (no P yet).
      turn_wait(my_turn);
      wait(k_full(0), 0);
      pin(sc);
      wgmma_fence();
      issue_qk(sc, 0);
      wgmma_commit();
      if (!(last_wg && blocks == 1)) turn_pass(next_turn);
      wgmma_wait_all();
      pin(sc);
      bar_arrive(k_empty(0));
      const float fold = scale_and_mask(p, sc, n_last * kBlockN, wg_row_lo, row0, col0);
      softmax(sc, fold, row_max, row_sum, correction);  // O is 0: its rescale is harmless
#pragma unroll
      for (int i = 0; i < kBlockN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);

      for (int it = 1; it < blocks; ++it) {
        const int s = it % kStages;
        const uint32_t parity = (it / kStages) & 1;
        const int sp = (it - 1) % kStages;
        const uint32_t parity_p = ((it - 1) / kStages) & 1;

        // Issue S(it) and O += P(it-1) V(it-1) in this warpgroup's turn.
        turn_wait(my_turn);
        wait(k_full(s), parity);
        pin(sc);
        pin(o);
        pin(pa);
        wgmma_fence();
        issue_qk(sc, s);
        wgmma_commit();
        // O to the running max of block it - 1 while the S GEMM runs (the PV GEMM that read O
        // last finished in the previous iteration), then O += P(it-1) V(it-1).
        rescale(correction);
        pin(o);
        wait(v_full(sp), parity_p);
        wgmma_fence();
        issue_pv(pa, sp);
        wgmma_commit();
        if (!(last_wg && it == blocks - 1)) turn_pass(next_turn);

        // Softmax of S(it) while the PV GEMM runs; it must not touch o or pa.
        wgmma_wait<1>();
        pin(sc);
        bar_arrive(k_empty(s));
        const float fold = scale_and_mask(p, sc, (n_last - it) * kBlockN, wg_row_lo, row0, col0);
        softmax(sc, fold, row_max, row_sum, correction);

        wgmma_wait_all();
        pin(o);
        pin(pa);
        bar_arrive(v_empty(sp));
#pragma unroll
        for (int i = 0; i < kBlockN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);
      }

      // The last block's PV, outside the turn ring.
      const int sl = (blocks - 1) % kStages;
      rescale(correction);
      pin(o);
      wait(v_full(sl), ((blocks - 1) / kStages) & 1);
      pin(pa);
      wgmma_fence();
      issue_pv(pa, sl);
      wgmma_commit();
      wgmma_wait_all();
      pin(o);
      pin(pa);
      bar_arrive(v_empty(sl));
    }
  }

  store_output<kBf16, kD>(p, batch, head, row0, col0, lane, o, row_max, row_sum);
#endif
}

template <bool kBf16, int kD>
int launch(const Params& params, int64_t seqlen_q, int64_t heads, int64_t batch,
           cudaStream_t stream) {
  using T = Tile<kD>;
  auto kernel = attention_fwd_overlap<kBf16, kD>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kAlloc) !=
      cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const int64_t m_blocks = (seqlen_q + T::kBlockM - 1) / T::kBlockM;
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  kernel<<<grid, T::kThreads, T::kAlloc, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? KPT_FA90_OK : KPT_FA90_CUDA_ERROR;
}

}  // namespace

int overlap_block_m(int head_dim) {
  return head_dim == 64 ? Tile<64>::kBlockM : Tile<128>::kBlockM;
}

int launch_overlap(const Params& params, bool bf16, int head_dim, int64_t seqlen_q,
                   int64_t heads, int64_t batch, cudaStream_t stream) {
  if (head_dim == 128) {
    return bf16 ? launch<true, 128>(params, seqlen_q, heads, batch, stream)
                : launch<false, 128>(params, seqlen_q, heads, batch, stream);
  }
  return bf16 ? launch<true, 64>(params, seqlen_q, heads, batch, stream)
              : launch<false, 64>(params, seqlen_q, heads, batch, stream);
}

}  // namespace kpt_fa90
