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
//   * per head_dim tiles: D=128 uses 2 consumers (128 rows) and a 2-stage K/V ring of 128-key
//     blocks (160 KiB), or of 176-key blocks without a mask when the keys pad well (209 KiB);
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

// Both head dims overlap S(j) with P(j-1) V(j-1) inside a warpgroup; S, packed P and O live
// together (kN / 2 + kN / 4 + kD / 2 registers), which fits the consumers' setmaxnreg budget
// since no `trap` makes ptxas ignore it (see abort_launch in common.cuh). D = 64 runs three
// consumer warpgroups (192 query rows, 3 stages) on 160 registers each; D = 128 runs two
// (2 stages), and with 176-key blocks (no causal/window mask) gives the consumers 240 and the
// producer 24.
template <int kD>
constexpr int consumers_for() {
  return kD == 64 ? 3 : 2;
}

template <int kD, int kBlockKeys>
struct Tile : SmemLayout<kD, 64 * consumers_for<kD>(), kBlockKeys, kD == 64 ? 3 : 2> {
  static constexpr int kConsumers = consumers_for<kD>();
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // setmaxnreg budgets: 128 x (producer + consumers x kConsumers) <= 64 Ki registers.
  static constexpr int kProducerRegs = kConsumers == 3 ? 32 : kBlockKeys == 176 ? 24 : 40;
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : kBlockKeys == 176 ? 240 : 232;
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

template <bool kBf16, int kD, int kBlockKeys>
__global__ void __launch_bounds__(Tile<kD, kBlockKeys>::kThreads, 1)
    attention_fwd_overlap(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // see kernels.cu: only the sm_90a cubin is ever launched
#else
  using T = Tile<kD, kBlockKeys>;
  constexpr int kN = T::kN;
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
  const int n_first = n_begin / kN;
  const int n_last = n_end > n_begin ? (n_end - 1) / kN : n_first - 1;
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

    float sc[kN / 2];
    uint32_t pa[kN / 4];
    float correction[2];

    wait(q_full, 0);
    {
      // Block 0: S only (no P yet).
      turn_wait(my_turn);
      wait(k_full(0), 0);
      pin(sc);
      wgmma_fence();
      issue_qk<T, kBf16, kD>(sc, q_tile, base + T::kK);
      wgmma_commit();
      if (!(last_wg && blocks == 1)) turn_pass(next_turn);
      wgmma_wait_all();
      pin(sc);
      bar_arrive(k_empty(0));
      const float fold = scale_and_mask(p, sc, n_last * kN, wg_row_lo, row0, col0);
      softmax(sc, fold, row_max, row_sum, correction);  // O is 0: its rescale is harmless
#pragma unroll
      for (int i = 0; i < kN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);

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
        issue_qk<T, kBf16, kD>(sc, q_tile, base + T::kK + s * T::kKVBytes);
        wgmma_commit();
        // O to the running max of block it - 1 while the S GEMM runs (the PV GEMM that read O
        // last finished in the previous iteration), then O += P(it-1) V(it-1).
        rescale<kD>(o, correction);
        pin(o);
        wait(v_full(sp), parity_p);
        wgmma_fence();
        issue_pv<T, kBf16, kD>(o, pa, base + T::kV + sp * T::kKVBytes);
        wgmma_commit();
        if (!(last_wg && it == blocks - 1)) turn_pass(next_turn);

        // Softmax of S(it) while the PV GEMM runs; it must not touch o or pa.
        wgmma_wait<1>();
        pin(sc);
        bar_arrive(k_empty(s));
        const float fold = scale_and_mask(p, sc, (n_last - it) * kN, wg_row_lo, row0, col0);
        softmax(sc, fold, row_max, row_sum, correction);

        wgmma_wait_all();
        pin(o);
        pin(pa);
        bar_arrive(v_empty(sp));
#pragma unroll
        for (int i = 0; i < kN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);
      }

      // The last block's PV, outside the turn ring.
      const int sl = (blocks - 1) % kStages;
      rescale<kD>(o, correction);
      pv_and_release<T, kBf16, kD>(o, pa, base + T::kV + sl * T::kKVBytes, v_full(sl),
                                   ((blocks - 1) / kStages) & 1, v_empty(sl));
    }
  }

  store_output<kBf16, kD>(p, batch, head, row0, col0, lane, o, row_max, row_sum);
#endif
}

template <bool kBf16, int kD, int kN>
int launch(const Params& params, int64_t seqlen_q, int64_t heads, int64_t batch,
           cudaStream_t stream) {
  using T = Tile<kD, kN>;
  auto kernel = attention_fwd_overlap<kBf16, kD, kN>;
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
  return head_dim == 64 ? Tile<64, 128>::kBlockM : Tile<128, 128>::kBlockM;
}

int overlap_block_n(int head_dim, bool masked, int64_t seqlen_k) {
  if (head_dim != 128 || masked) return 128;
  // 176-key blocks pay for the keys padding their last block: measured on the H200, +3.5% at
  // Sk = 16384 (1% more padded keys than 128-key blocks), -2.6% at Sk = 4096 (3.1% more).
  const int64_t keys176 = (seqlen_k + 175) / 176 * 176;
  const int64_t keys128 = (seqlen_k + 127) / 128 * 128;
  return keys176 * 1000 <= keys128 * 1015 ? 176 : 128;
}

int launch_overlap(const Params& params, bool bf16, int head_dim, int64_t seqlen_q,
                   int64_t heads, int64_t batch, cudaStream_t stream) {
  const bool masked = params.window_left >= 0 || params.window_right >= 0;
  if (overlap_block_n(head_dim, masked, params.seqlen_k) == 176) {
    return bf16 ? launch<true, 128, 176>(params, seqlen_q, heads, batch, stream)
                : launch<false, 128, 176>(params, seqlen_q, heads, batch, stream);
  }
  if (head_dim == 128) {
    return bf16 ? launch<true, 128, 128>(params, seqlen_q, heads, batch, stream)
                : launch<false, 128, 128>(params, seqlen_q, heads, batch, stream);
  }
  return bf16 ? launch<true, 64, 128>(params, seqlen_q, heads, batch, stream)
              : launch<false, 64, 128>(params, seqlen_q, heads, batch, stream);
}

}  // namespace kpt_fa90
