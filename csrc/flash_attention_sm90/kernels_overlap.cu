// kpt-targets: sm_90a
// Flash-attention forward for Hopper, "overlap" variant: the FA3 schedule on the same TMA +
// mbarrier + wgmma building blocks as kernels.cu (the "base" variant).
//
// Differences from kernels.cu, all about keeping the tensor cores busy during the softmax:
//   * intra-warpgroup overlap: a consumer issues S(j) = Q K(j)^T, rescales O to the running
//     max of block j-1 while that GEMM runs, issues O += P(j-1) V(j-1), waits only for the
//     first group (wait_group 1), runs the softmax of block j while the PV GEMM still runs,
//     then waits for it (wait_group 0) and packs P(j). Registers hold S(j), P(j-1) and O,
//     and at D = 128 also Q's A fragments: S = Q K^T reads Q from registers, so only K crosses
//     from shared memory for it (less energy per FLOP, see SM90_NOTES.md "Session 19").
//   * ping-pong: the consumer warpgroups take turns issuing their GEMMs (a ring of named
//     barriers), so one group's softmax runs while the others' GEMMs occupy the tensor cores;
//   * per head_dim tiles: D=128 uses 2 consumers (128 rows) and a 2-stage K/V ring of 128-key
//     blocks (160 KiB); D=64, whose softmax is as long as its GEMMs, uses 3 consumers (192
//     rows) and 3 stages.
// Persistent CTAs (variants "persistent" and "dynamic"): one CTA per SM walks query tiles
// blockIdx.x, + gridDim.x, ... or, with dynamic scheduling, takes the next tile nobody has
// taken from a counter (the non-persistent grid runs the same loop once per CTA). The
// producer loads the next tile's Q as soon as every consumer has read Q (D = 128: its
// fragments, at the tile's start) or issued its last S GEMM (D = 64), and its K/V as ring
// stages free up, so loads, barrier set-up and the CTA launch no longer sit between tiles; O
// leaves through its own shared-memory buffer and TMA stores.
// Masks are applied only to key blocks that are not fully visible to a warpgroup's 64 rows,
// and a warpgroup skips the leading key blocks none of its rows can see (192-row tiles at
// D = 64: the causal diagonal, and rows past seqlen_q); it still takes their turns.
// Every mbarrier wait is bounded (wait() ends the launch with an error); the named barriers
// cannot hang because every consumer warpgroup runs the same number of turns (see the ring).

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kpt/flash_attention_sm90.h"

namespace kpt_fa90 {
namespace {

// Both head dims overlap S(j) with P(j-1) V(j-1) inside a warpgroup; S, packed P and O live
// together (kN / 2 + kN / 4 + kD / 2 registers), which fits the consumers' setmaxnreg budget
// since no `trap` makes ptxas ignore it (see abort_launch in kpt/sm90.h). D = 64 runs three
// consumer warpgroups (192 query rows, 3 stages) on 160 registers each; D = 128 runs two
// (2 stages) on 232, which also hold Q's fragments (kD / 4 registers; ptxas: 0 spills, and
// the same 4 warpgroup.arrive per kernel as without them). At D = 64 the fragments spill and
// serialise the wgmmas (C7512), so Q stays in shared memory there.
template <int kD>
constexpr int consumers_for() {
  return kD == 64 ? 3 : 2;
}

template <int kD>
struct Tile : SmemLayout<kD, 64 * consumers_for<kD>(), kBlockN, kD == 64 ? 3 : 2> {
  using Base = SmemLayout<kD, 64 * consumers_for<kD>(), kBlockN, kD == 64 ? 3 : 2>;
  // q_empty (all consumer threads release Q) after the ring's barriers, then the tile
  // channel of the dynamic scheduler: id_full[2], id_empty[2] and two 16-byte slots (tile
  // index, first query row, head, batch; 16-byte aligned for one vector access).
  static constexpr int kQEmpty = Base::kBytes;
  static constexpr int kIdFull = kQEmpty + 8;
  static constexpr int kIdEmpty = kIdFull + 16;
  static constexpr int kIdSlot = (kIdEmpty + 16 + 15) / 16 * 16;
  static constexpr int kEnd = kIdSlot + 32;
  // O's own staging buffer [rows x kD] (kD / 64 chunks like Q).
  static constexpr int kO = (kEnd + 1023) / 1024 * 1024;
  static constexpr int kTotal = kO + Base::kQBytes + 1024;
  static_assert(kTotal <= 227 * 1024, "shared memory");
  // Q's A fragments in registers (see consumers_for).
  static constexpr bool kQRegs = kD == 128;
  static constexpr int kConsumers = consumers_for<kD>();
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // setmaxnreg budgets: 128 x (producer + consumers x kConsumers) <= 64 Ki registers.
  static constexpr int kProducerRegs = kConsumers == 3 ? 32 : 40;
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : 232;
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

// Q's wgmma A fragments of this warp's 16 rows for all kD / 16 k-steps (4 registers each, the
// m64k16 A layout), read once per tile from the 128-byte-swizzled Q rows of the warpgroup:
// ldmatrix x4 gives matrix 0 (rows 0-7, k 0-7), 1 (rows 8-15, k 0-7), 2 (rows 0-7, k 8-15) and
// 3 (rows 8-15, k 8-15), which are a0..a3 of the fragment.
template <int kD, int kQChunk>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[kD / 4], uint32_t q_tile,
                                                 int warp, int lane) {
  const int mat = lane / 8;
  const int row = 16 * warp + lane % 8 + 8 * (mat % 2);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const int col = (kk % 4) * 16 + 8 * (mat / 2);
    const uint32_t addr = q_tile + (kk / 4) * kQChunk + swizzled(row, col);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(qa[4 * kk]), "=r"(qa[4 * kk + 1]), "=r"(qa[4 * kk + 2]),
                   "=r"(qa[4 * kk + 3])
                 : "r"(addr)
                 : "memory");
  }
}

// S = Q K^T with Q's fragments in registers (K K-major, as issue_qk reads it).
template <class L, bool kBf16, int kD>
__device__ __forceinline__ void issue_qk_regs(float* sc, const uint32_t* qa, uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint64_t b = make_desc(k_tile + (kk / 4) * L::kKVChunk + (kk % 4) * 32, 16, 1024);
    wgmma_rs_kmajor_n128<kBf16>(sc, &qa[4 * kk], b, kk > 0);
  }
}

// Varlen (kVarlen): a sequence's last key block may run into the next sequence's keys (the
// tensor maps span them all; a dense batch's maps end at each sequence, and TMA fills zeros
// past them). Their scores are masked, but P = 0 times a non-finite V would still reach O, so
// the consumers zero that block's V rows from the sequence's end on, in shared memory, before
// any PV reads it: rows [from, kN) of the stage at `tile`, spread over `threads` threads.
template <class L, int kD>
__device__ __forceinline__ void zero_rows(uint32_t tile, int from, int thread, int threads) {
  constexpr int kPerRow = kD / 64 * 8;  // 16-byte pieces of a key row over the column chunks
  for (int i = from * kPerRow + thread; i < L::kN * kPerRow; i += threads) {
    const int row = i / kPerRow, piece = i % kPerRow;
    const uint32_t addr = tile + (piece / 8) * L::kKVChunk + row * kRowBytes + (piece % 8) * 16;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(addr), "r"(0) : "memory");
  }
}

template <bool kBf16, int kD, bool kVarlen>
__global__ void __launch_bounds__(Tile<kD>::kThreads, 1)
    attention_fwd_overlap(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // see kernels.cu: only the sm_90a cubin is ever launched
#else
  using T = Tile<kD>;
  constexpr int kN = T::kN;
  constexpr int kStages = T::kStages;
  constexpr int kConsumers = T::kConsumers;
  // Only D = 128 splits its last tiles (p.split_pieces; see the epilogue), and not varlen.
  constexpr bool kCanSplit = kD == 128 && !kVarlen;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = base + T::kBars;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return ring_bar(bars, s, 1); };
  auto k_empty = [&](int s) { return ring_bar(bars, s, 2); };
  auto v_full = [&](int s) { return ring_bar(bars, s, 3); };
  auto v_empty = [&](int s) { return ring_bar(bars, s, 4); };

  const uint32_t q_empty = base + T::kQEmpty;
  // Dynamic scheduling: the producer takes the next tile from p.tile_counter and hands its
  // index to the consumers through two slots (id_full: published, id_empty: read by all).
  const bool dynamic = p.tile_counter != nullptr;
  auto id_full = [&](int n) { return base + T::kIdFull + 8 * (n & 1); };
  auto id_empty = [&](int n) { return base + T::kIdEmpty + 8 * (n & 1); };
  auto id_slot = [&](int n) { return base + T::kIdSlot + 16 * (n & 1); };
  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    bar_init(q_full, 1);
    bar_init(q_empty, kConsumers * 128);
    for (int n = 0; n < 2; ++n) {
      bar_init(id_full(n), 1);
      bar_init(id_empty(n), kConsumers * 128);
    }
    for (int s = 0; s < kStages; ++s) {
      bar_init(k_full(s), 1);
      bar_init(v_full(s), 1);
      bar_init(k_empty(s), kConsumers * 128);
      bar_init(v_empty(s), kConsumers * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // Tile order: (batch, head) pairs in groups of p.head_group; inside a group the longest
  // (last) query block of each pair first, then the next longest. With groups of 1 this is the
  // launch order (a head's tiles, longest first, then the next head). A CTA takes every
  // gridDim.x-th tile, or with dynamic scheduling the next one nobody has taken.
  // (The launcher keeps the tile count below 2^31; its memory could not hold more.)
  const int m_blocks = (p.seqlen_q + T::kBlockM - 1) / T::kBlockM;
  const int pairs = p.heads * p.batch;
  const int tiles = m_blocks * pairs;
  const int group_tiles = m_blocks * p.head_group;
  struct TileInfo {
    int m0, head, batch, n_last, blocks;
    Seq sq;  // the tile's sequence (Params' lengths for a dense batch)
  };
  // Where tile t sits (the integer divisions: with dynamic scheduling only the producer runs
  // them, and publishes the result with the index).
  auto tile_coords = [&](int t, TileInfo& ti) {
    const int group = t / group_tiles;
    const int in_group = t - group * group_tiles;
    const int width = min(p.head_group, pairs - group * p.head_group);
    const int bh = group * p.head_group + in_group % width;
    ti.m0 = (m_blocks - 1 - in_group / width) * T::kBlockM;
    ti.head = static_cast<int>(bh % p.heads);
    ti.batch = static_cast<int>(bh / p.heads);
  };
  // Its key blocks, from the highest (n_last) down: the same for every consumer warpgroup.
  auto tile_keys = [&](TileInfo& ti) {
    ti.sq = sequence<kVarlen>(p, ti.batch);
    int n_begin, n_end;
    key_range(p, ti.sq, ti.m0, T::kBlockM, n_begin, n_end);
    const int n_first = n_begin / kN;
    ti.n_last = n_end > n_begin ? (n_end - 1) / kN : n_first - 1;
    ti.blocks = ti.n_last - n_first + 1;
  };
  // Piece `piece` of a split tile: its share of the key blocks (split_pieces <= blocks, so no
  // piece is empty).
  auto piece_keys = [&](TileInfo& ti, int piece) {
    const int begin = piece * ti.blocks / p.split_pieces;
    const int end = (piece + 1) * ti.blocks / p.split_pieces;
    ti.n_last -= begin;
    ti.blocks = end - begin;
  };
  // Where the published or strided tile t (piece `piece`, or -1) starts and what it visits:
  // the same for the producer and the consumers.
  auto tile_plan = [&](int t, int piece, TileInfo& ti) {
    if (!dynamic) tile_coords(t, ti);
    tile_keys(ti);
    if (kCanSplit && piece >= 0) piece_keys(ti, piece);
  };
  // Work items of the dynamic scheduler: tiles below split_from whole, then split_pieces
  // pieces of each remaining tile.
  const int items = kCanSplit && p.split_pieces > 0
                        ? p.split_from + (tiles - p.split_from) * p.split_pieces
                        : tiles;

  if (warpgroup == 0) {
    // ---- producer: per tile, Q once Q is released, then K and V of each key block ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(T::kProducerRegs));
    if (threadIdx.x != 0) return;
    int ring = 0, q_uses = 0;
    int t = blockIdx.x, w = blockIdx.x;
    for (int n = 0;; ++n) {
      TileInfo ti;
      int piece = -1;
      if (dynamic) {
        // Taken as soon as the previous tile's loads are issued, so the index is ready well
        // before the consumers finish that tile; the end (t >= tiles) is published too.
        if (n > 0) w = static_cast<int>(min(gridDim.x + atomicAdd(p.tile_counter, 1u),
                                            static_cast<unsigned>(items)));
        t = w < items ? w : tiles;
        if (kCanSplit && w >= p.split_from && w < items && p.split_pieces > 0) {
          const int q = w - p.split_from;
          t = p.split_from + q / p.split_pieces;
          piece = q - (t - p.split_from) * p.split_pieces;
        }
        if (t < tiles) tile_coords(t, ti);
        wait(id_empty(n), ((n >> 1) & 1) ^ 1);
        // Head and batch share a word (both below 2^16: the launcher checks).
        asm volatile("st.shared.v4.s32 [%0], {%1, %2, %3, %4};" ::"r"(id_slot(n)), "r"(t),
                     "r"(ti.m0),
                     "r"(static_cast<int>(static_cast<unsigned>(ti.head) |
                                          (static_cast<unsigned>(ti.batch) << 16))),
                     "r"(piece)
                     : "memory");
        bar_arrive(id_full(n));  // release: the slot's store is visible to the waiters
      } else if (n > 0) {
        t += gridDim.x;
      }
      if (t >= tiles) break;
      tile_plan(t, piece, ti);
      if (ti.blocks <= 0) continue;
      wait(q_empty, (q_uses & 1) ^ 1);  // fresh barriers pass parity 1
      ++q_uses;
      produce<T, kD, kStages>(p, ti.sq, base, bars, ti.m0, ti.head, ti.n_last, ti.blocks, ring);
      ring += ti.blocks;
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(T::kConsumerRegs));
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int warp = tid / 32, lane = tid % 32;
  const int col0 = 2 * (lane % 4);
  const uint32_t q_tile = base + T::kQ + wg * 64 * kRowBytes;
  // D = 128: Q's fragments, read once per tile; Q's shared memory is released right after.
  constexpr bool kQRegs = T::kQRegs;
  uint32_t qa[kQRegs ? kD / 4 : 1];
  const uint32_t o_stage = base + T::kO + wg * 64 * kRowBytes;
  // Turn ring: warpgroup g waits on barrier 1 + g and passes to the next one. It runs on
  // across tiles (every warpgroup takes `blocks` turns per tile), so a warpgroup that finishes
  // a tile starts the next one's first S GEMM while the others still run their last GEMMs and
  // epilogues, instead of the tile's first turn waiting for every epilogue. The last warpgroup
  // hands out the very first turn; the first one takes the one pass left over at the end, so
  // every barrier gets as many arrivals as waits (nothing is left pending at exit).
  const int my_turn = 1 + wg;
  const int next_turn = 1 + (wg + 1) % kConsumers;
  const bool last_wg = wg == kConsumers - 1;
  const int o_bar = 1 + kConsumers + wg;  // this warpgroup's own named barrier
  constexpr int kZeroBar = 2 * kConsumers + 1;  // all consumers (varlen: zero_rows)
  int ring = 0, q_uses = 0;

  if (last_wg) turn_pass(1);
  int t = blockIdx.x;
  for (int n = 0;; ++n) {
    TileInfo ti;
    int piece = -1;
    if (dynamic) {
      int head_batch;
      wait(id_full(n), (n >> 1) & 1);
      asm volatile("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(t), "=r"(ti.m0), "=r"(head_batch), "=r"(piece)
                   : "r"(id_slot(n))
                   : "memory");
      bar_arrive(id_empty(n));
      ti.head = head_batch & 0xffff;
      ti.batch = static_cast<int>(static_cast<unsigned>(head_batch) >> 16);
      if (!kCanSplit) piece = -1;
      piece = __shfl_sync(0xffffffffu, piece, 0);  // warp-uniform (a uniform register)
    } else if (n > 0) {
      t += gridDim.x;
    }
    if (t >= tiles) break;
    tile_plan(t, piece, ti);
    const int m0 = ti.m0, head = ti.head, batch = ti.batch;
    const int blocks = ti.blocks;
    const int wg_row_lo = m0 + wg * 64;
    const int row0 = wg_row_lo + warp * 16 + lane / 4;  // and row0 + 8 (accumulator layout)
    // The tile's first `skip` key blocks (its highest keys) are invisible to all of this
    // warpgroup's rows: it only takes their turns and releases their stages. With 192-row
    // tiles over 128-key blocks (D = 64) that is one block in about ten of a causal tile at
    // 2048 tokens; and all but one of them for a warpgroup whose rows all lie past seqlen_q
    // (at least one block runs the normal path, so the loop below keeps its shape).
    int skip = 0;
    const int len_q = ti.sq.len_q, len_k = ti.sq.len_k;
    if (kConsumers * 64 > kN && blocks > 0 && (p.window_right >= 0 || wg_row_lo >= len_q)) {
      // The keys this warpgroup's last row sees end before key_end (int32 is safe: the
      // lengths are below kMaxSeqlen and the windows clamped to seqlen_q + seqlen_k).
      const int key_end =
          wg_row_lo >= len_q
              ? 0
              : min(len_k, min(wg_row_lo + 63, len_q - 1) + (len_k - len_q) + p.window_right + 1);
      skip = key_end <= 0 ? blocks - 1
                          : min(max(ti.n_last - (key_end - 1) / kN, 0), blocks - 1);
    }
    // Warp-uniform, and through the shuffle the compiler knows it: skip then lives in a
    // uniform register. As a per-thread value it cost the 160-register D = 64 consumers
    // 24-48 bytes of spills (and ~30% of their speed).
    skip = __shfl_sync(0xffffffffu, skip, 0);
    const int n_last = ti.n_last;
    // The iterations whose key block is fully visible to this warpgroup's rows (no mask),
    // warp-uniform like skip.
    int full_first, full_last;
    fully_visible_iterations<kN>(p, ti.sq, n_last, wg_row_lo, full_first, full_last);
    full_first = __shfl_sync(0xffffffffu, full_first, 0);
    full_last = __shfl_sync(0xffffffffu, full_last, 0);

    float o[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};  // this thread's partial sums; reduced over the quad at the end

    if (blocks > 0) {
      float sc[kN / 2];
      uint32_t pa[kN / 4];
      float correction[2];
      bool moved;  // some row of this warp moved its max: O needs the correction

      wait(q_full, q_uses & 1);
      ++q_uses;
      if constexpr (kQRegs) {
        load_q_fragments<kD, T::kQChunk>(qa, q_tile, warp, lane);
        bar_arrive(q_empty);  // Q's rows are read: the next tile's Q may load now
      }
      if constexpr (kVarlen) {
        // The tile's first block (it = 0) holds the sequence's last keys (see zero_rows); all
        // consumers take part (the same tile, so the same condition), then meet before any
        // of them can reach a PV. No turn is held here, so the ring cannot block the meeting.
        const int valid = len_k - n_last * kN;
        if (valid < kN) {
          const int s0 = ring % kStages;
          wait(v_full(s0), (ring / kStages) & 1);
          zero_rows<T, kD>(base + T::kV + s0 * T::kKVBytes, valid, wg * 128 + tid,
                           kConsumers * 128);
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // st.shared -> wgmma
          asm volatile("bar.sync %0, %1;" ::"n"(kZeroBar), "n"(kConsumers * 128) : "memory");
        }
      }
      for (int it = 0; it < skip; ++it) {  // invisible blocks: the turn and the releases only
        const int s = (ring + it) % kStages;
        const uint32_t parity = ((ring + it) / kStages) & 1;
        turn_wait(my_turn);
        wait(k_full(s), parity);
        bar_arrive(k_empty(s));
        // V(j)'s load proves that every warpgroup released the stage's previous V, so this
        // arrival counts towards this use of the stage.
        wait(v_full(s), parity);
        bar_arrive(v_empty(s));
        turn_pass(next_turn);
      }
      {
        // The first visible block: S only (no P yet).
        const int s0 = (ring + skip) % kStages;
        turn_wait(my_turn);
        wait(k_full(s0), ((ring + skip) / kStages) & 1);
        pin(sc);
        wgmma_fence();
        if constexpr (kQRegs) {
          issue_qk_regs<T, kBf16, kD>(sc, qa, base + T::kK + s0 * T::kKVBytes);
        } else {
          issue_qk<T, kBf16, kD>(sc, q_tile, base + T::kK + s0 * T::kKVBytes);
        }
        wgmma_commit();
        turn_pass(next_turn);
        wgmma_wait_all();
        pin(sc);
        bar_arrive(k_empty(s0));
        const float fold = scale_and_mask_known(p, ti.sq, sc, (n_last - skip) * kN, row0, col0,
                                                skip >= full_first && skip <= full_last);
        moved = softmax(sc, fold, row_max, row_sum, correction);  // O is 0: harmless
#pragma unroll
        for (int i = 0; i < kN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);

        for (int it = skip + 1; it < blocks; ++it) {
          const int s = (ring + it) % kStages;
          const uint32_t parity = ((ring + it) / kStages) & 1;
          const int sp = (ring + it - 1) % kStages;
          const uint32_t parity_p = ((ring + it - 1) / kStages) & 1;

          // Issue S(it) and O += P(it-1) V(it-1) in this warpgroup's turn.
          turn_wait(my_turn);
          wait(k_full(s), parity);
          pin(sc);
          pin(o);
          pin(pa);
          wgmma_fence();
          if constexpr (kQRegs) {
            issue_qk_regs<T, kBf16, kD>(sc, qa, base + T::kK + s * T::kKVBytes);
          } else {
            issue_qk<T, kBf16, kD>(sc, q_tile, base + T::kK + s * T::kKVBytes);
          }
          wgmma_commit();
          // O to the running max of block it - 1 while the S GEMM runs (the PV GEMM that read
          // O last finished in the previous iteration), then O += P(it-1) V(it-1). The max
          // rarely moves after the first blocks (kLazyMax), and then the warp skips it.
          if (moved) rescale<kD>(o, correction);
          pin(o);
          wait(v_full(sp), parity_p);
          wgmma_fence();
          issue_pv<T, kBf16, kD>(o, pa, base + T::kV + sp * T::kKVBytes);
          wgmma_commit();
          turn_pass(next_turn);

          // Softmax of S(it) while the PV GEMM runs; it must not touch o or pa.
          wgmma_wait<1>();
          pin(sc);
          bar_arrive(k_empty(s));
          const float fold = scale_and_mask_known(p, ti.sq, sc, (n_last - it) * kN, row0, col0,
                                                  it >= full_first && it <= full_last);
          moved = softmax(sc, fold, row_max, row_sum, correction);

          wgmma_wait_all();
          pin(o);
          pin(pa);
          bar_arrive(v_empty(sp));
#pragma unroll
          for (int i = 0; i < kN / 4; ++i) pa[i] = pack2<kBf16>(sc[2 * i], sc[2 * i + 1]);
        }

        // Every S GEMM of this tile is done: the producer may load the next tile's Q (with
        // Q in registers that happened at the tile's start).
        if constexpr (!kQRegs) bar_arrive(q_empty);
        // The last block's PV, outside the turn ring.
        const int sl = (ring + blocks - 1) % kStages;
        if (moved) rescale<kD>(o, correction);
        pv_and_release<T, kBf16, kD>(o, pa, base + T::kV + sl * T::kKVBytes, v_full(sl),
                                     ((ring + blocks - 1) / kStages) & 1, v_empty(sl));
      }
      ring += blocks;
    }

    if (kCanSplit && piece >= 0) {
      // A piece of a split tile. Each warp writes its unnormalised O and its rows' max and
      // partial sums to the workspace (17 float4 per thread, in the accumulator layout, so the
      // thread at the same position of another piece reads them back), then counts itself
      // done for its 16 rows; the warp that completes the count merges the other pieces into
      // its registers (O and sums rescaled to the larger max) and stores O and lse.
      constexpr int kSlots = kD / 8 + 1;
      const int tail = t - p.split_from;
      const int me = wg * 128 + tid;
      auto slot = [&](int pc, int j) {
        return p.split_ws +
               ((static_cast<int64_t>(tail) * p.split_pieces + pc) * kSlots + j) *
                   (kConsumers * 128) +
               me;
      };
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        *slot(piece, j) = make_float4(o[4 * j], o[4 * j + 1], o[4 * j + 2], o[4 * j + 3]);
      }
      *slot(piece, kD / 8) = make_float4(row_max[0], row_max[1], row_sum[0], row_sum[1]);
      __threadfence();  // the partials before the count (the merging warp reads them after)
      __syncwarp();
      unsigned done = 0;
      if (lane == 0) {
        done = atomicAdd(p.split_count + tail * (kConsumers * 4) + wg * 4 + warp, 1u);
      }
      done = __shfl_sync(0xffffffffu, done, 0);
      if (done == static_cast<unsigned>(p.split_pieces - 1)) {
        __threadfence();
        for (int pc = 0; pc < p.split_pieces; ++pc) {
          if (pc == piece) continue;
          const float4 stats = __ldcg(slot(pc, kD / 8));
          const float other_max[2] = {stats.x, stats.y};
          const float other_sum[2] = {stats.z, stats.w};
          float a[2], b[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float m = fmaxf(row_max[h], other_max[h]);  // -inf for rows without keys
            a[h] = row_max[h] == m ? 1.f : exp2f(row_max[h] - m);
            b[h] = other_max[h] == m ? 1.f : exp2f(other_max[h] - m);
            row_sum[h] = row_sum[h] * a[h] + other_sum[h] * b[h];
            row_max[h] = m;
          }
#pragma unroll
          for (int j = 0; j < kD / 8; ++j) {
            const float4 v = __ldcg(slot(pc, j));
            o[4 * j] = o[4 * j] * a[0] + v.x * b[0];
            o[4 * j + 1] = o[4 * j + 1] * a[0] + v.y * b[0];
            o[4 * j + 2] = o[4 * j + 2] * a[1] + v.z * b[1];
            o[4 * j + 3] = o[4 * j + 3] * a[1] + v.w * b[1];
          }
        }
        store_output<kBf16, kD>(p, ti.sq, batch, head, row0, col0, lane, o, row_max, row_sum);
      }
    } else if (!kVarlen && p.store_tma) {
      // O through its own shared-memory buffer; a previous tile's store must have read it
      // first.
      if (tid == 0) bulk_wait_read();
      asm volatile("bar.sync %0, 128;" ::"r"(o_bar) : "memory");
      store_output_tma<kBf16, kD>(p, batch, head, wg_row_lo, row0, col0, tid, o_stage,
                                  T::kQChunk, o_bar, o, row_max, row_sum, false);
    } else {
      store_output<kBf16, kD>(p, ti.sq, batch, head, row0, col0, lane, o, row_max, row_sum);
    }
  }
  if (wg == 0) turn_wait(1);  // the last warpgroup's final pass
  if (!kVarlen && p.store_tma && tid == 0) bulk_wait_read();
#endif
}

// With a causal or window mask, dynamic scheduling orders the tiles longest first across groups
// of (batch, head) pairs whose K and V together take about this many bytes, so the CTAs
// running at one time still share them in L2. Measured on the H200 (B8 H16 S2048 D64 causal):
// groups of one pair (a head's tiles longest first, then the next head's) leave the last
// heads' long tiles for the end and the SMs ~10% idle (Nsight Compute); 16 MiB groups gave
// 314 -> 333 TFLOP/s there, 64 MiB 328. Session 13, four processes of interleaved runs:
// 8 MiB groups matched 16 MiB at D = 64 causal (398-412 vs 398-408) and with a 1024-key window,
// and beat them at B4 H32 S4096 D128 causal (558-566 vs 538-549; 16 MiB is 8 pairs there,
// probably too many to stay in L2 beside the streamed Q and O). Without a mask all tiles are
// equally long and a head's tiles stay together (groups of one).
#ifndef KPT_FA90_L2_GROUP_BYTES
#define KPT_FA90_L2_GROUP_BYTES (8 << 20)
#endif

template <bool kBf16, int kD, bool kVarlen>
int launch(Params params, int64_t seqlen_q, int64_t heads, int64_t batch, bool persistent,
           cudaStream_t stream) {
  using T = Tile<kD>;
  auto kernel = attention_fwd_overlap<kBf16, kD, kVarlen>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kTotal) !=
      cudaSuccess) {
    return KPT_FA90_CUDA_ERROR;
  }
  const int64_t tiles = (seqlen_q + T::kBlockM - 1) / T::kBlockM * heads * batch;
  int64_t ctas = tiles;
  int sms = 0;
  if (persistent) {  // one CTA per SM (one fits: shared memory)
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return KPT_FA90_CUDA_ERROR;
    }
    ctas = std::min<int64_t>(tiles, sms);
  }
  // The dynamic variant's split of its last tiles, where the caller gave the workspace
  // (sized by overlap_split_plan for the same problem and device).
  params.split_pieces = 0;
  int64_t items = tiles;
  if (!kVarlen && params.tile_counter != nullptr && persistent && params.split_ws != nullptr) {
    const bool masked = params.window_left >= 0 || params.window_right >= 0;
    int pieces = 0;
    int64_t split_from = 0, words = 0, float4s = 0;
    overlap_split_plan(kD, masked, seqlen_q, params.seqlen_k, heads, batch, sms, pieces,
                       split_from, words, float4s);
    if (pieces > 0 && kD == 128) {
      params.split_pieces = pieces;
      params.split_from = static_cast<int>(split_from);
      params.split_count = params.tile_counter + 1;
      items = split_from + (tiles - split_from) * pieces;
    }
  }
  // Tile indices are int32 in the kernel (and 32-bit in the dynamic counter, which ends at
  // the work items + CTAs).
  if (items + ctas > 0x7fffffff) return KPT_FA90_UNSUPPORTED;
  params.head_group = 1;
  if (params.tile_counter != nullptr) {
    if (!persistent) params.tile_counter = nullptr;
    const bool masked = params.window_left >= 0 || params.window_right >= 0;
    const int64_t pair_bytes = static_cast<int64_t>(params.seqlen_k) * kD * 2 * 2;
    const int64_t group_bytes = masked ? KPT_FA90_L2_GROUP_BYTES : 0;
    params.head_group = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(heads * batch, group_bytes / pair_bytes)));
  }
  kernel<<<static_cast<unsigned>(ctas), T::kThreads, T::kTotal, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? KPT_FA90_OK : KPT_FA90_CUDA_ERROR;
}

}  // namespace

// Split pieces cover at least this many key blocks: a piece still pays a tile's start, its
// partial O's round trip through the workspace and, for the last one, the merge.
constexpr int kSplitMinBlocks = 4;

void overlap_split_plan(int head_dim, bool masked, int64_t seqlen_q, int64_t seqlen_k,
                        int64_t heads, int64_t batch, int sms, int& pieces, int64_t& split_from,
                        int64_t& counter_words, int64_t& workspace_float4) {
  using T = Tile<128>;
  pieces = 0;
  split_from = 0;
  counter_words = 1;  // the tile counter
  workspace_float4 = 0;
  // Without a mask all tiles are equally long, so the tiles past the last full round of the
  // SMs would run alone at the end (with a mask the longest-first order already ends on short
  // tiles). Those tiles are split into as many pieces as the idle SMs can take.
  if (head_dim != 128 || masked || sms <= 0) return;
  const int64_t tiles = (seqlen_q + T::kBlockM - 1) / T::kBlockM * heads * batch;
  const int64_t rest = tiles % sms;
  const int64_t blocks = (seqlen_k + T::kN - 1) / T::kN;
  if (tiles < sms || rest == 0) return;
  const int64_t n = std::min<int64_t>(sms / rest, blocks / kSplitMinBlocks);
  if (n < 2) return;
  pieces = static_cast<int>(n);
  split_from = tiles - rest;
  counter_words = 1 + rest * T::kConsumers * 4;
  workspace_float4 = rest * n * (128 / 8 + 1) * T::kConsumers * 128;
}

int overlap_block_m(int head_dim) {
  return head_dim == 64 ? Tile<64>::kBlockM : Tile<128>::kBlockM;
}

int launch_overlap(const Params& params, bool bf16, int head_dim, int64_t seqlen_q,
                   int64_t heads, int64_t batch, bool persistent, cudaStream_t stream) {
  // persistent with params.tile_counter set: dynamic scheduling (see the kernel).
  const bool p = persistent;
  if (params.cu_seqlens_q != nullptr) {  // varlen: seqlen_q is the longest sequence
    if (head_dim == 128) {
      return bf16 ? launch<true, 128, true>(params, seqlen_q, heads, batch, p, stream)
                  : launch<false, 128, true>(params, seqlen_q, heads, batch, p, stream);
    }
    return bf16 ? launch<true, 64, true>(params, seqlen_q, heads, batch, p, stream)
                : launch<false, 64, true>(params, seqlen_q, heads, batch, p, stream);
  }
  if (head_dim == 128) {
    return bf16 ? launch<true, 128, false>(params, seqlen_q, heads, batch, p, stream)
                : launch<false, 128, false>(params, seqlen_q, heads, batch, p, stream);
  }
  return bf16 ? launch<true, 64, false>(params, seqlen_q, heads, batch, p, stream)
              : launch<false, 64, false>(params, seqlen_q, heads, batch, p, stream);
}

}  // namespace kpt_fa90
