// Tensor-core forward (FA2 scheme), included by fwd_d{64,128,256}.cu: one CTA per
// (query tile of 16 * kWarps rows, q head, sequence); each warp owns 16 query rows.
//
// Per key tile (kBN keys, visited from the last visible tile down to the first):
//   S = Q K^T   (mma m16n8k16; Q fragments re-read from shared memory every tile, which keeps
//                the registers for the fp32 O accumulator: D / 2 floats a thread)
//   logits -> exp2 domain, soft-cap, ALiBi, mask (only on tiles the band/bounds/hooks cut)
//   online softmax (row max/sum across the 4 lanes of a quad)
//   O += P V    (P rounded to the input dtype straight from the S accumulators: the C
//                fragment of two n-tiles is the A fragment of one k-step, no shuffles)
// K and V tiles stream through a kStages-deep cp.async ring, prefetching kStages - 1 tiles
// ahead. Rows past the sequence end and features past head_dim are zero-filled, never read.
#pragma once

#include "mma.cuh"

#ifdef KPT_CUDA
namespace kpt_fa {

template <class T, int kD, int kBN, int kWarps, int kStages>
__global__ KPT_LAUNCH_BOUNDS(kWarps * 32, 1) void fwd_mma_kernel(kpt_fa_params p) {
  constexpr int kBM = 16 * kWarps, kThreads = kWarps * 32, kNT = kBN / 8, kDT = kD / 8;
  static_assert(KPT_FA_Q_BLOCK % kBM == 0, "query tiles must not straddle kv_block_range");
  extern __shared__ uint4 smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + kBM * kD;
  uint16_t* sV = sK + kStages * kBN * kD;

  const int b = blockIdx.z, h = blockIdx.y;
  // Tiles launch last-first: under a causal mask the bottom tiles see the most keys, so the
  // longest CTAs start first and the grid's tail is short.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBM;
  const Seq s = seq_of(p, b);
  if (m0 >= s.q_len) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  Mask mask = make_mask(p, s, b);
  apply_range(p, mask, b, h, m0 / KPT_FA_Q_BLOCK);
  const Logit logit = make_logit(p, h);
  const int m_last = min(m0 + kBM, s.q_len) - 1;
  int lo, hi;
  key_range(mask, m0, m_last, lo, hi);
  const int nb_lo = max(lo, 0) / kBN, nb_hi = hi > lo ? (hi + kBN - 1) / kBN : nb_lo;
  const int tiles = nb_hi - nb_lo;
  const int chunks = p.head_dim / 8, k16 = (p.head_dim + 15) / 16;
  // Whole-tile conditions checked once per tile, so unmasked tiles skip the element tests.
  const bool hooks = mask.doc_q != nullptr || p.kv_block_range != nullptr;

  const auto* q = static_cast<const uint16_t*>(p.q) + row_offset(p.q_st, b, s.q_start, m0, h);
  const auto* k = static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, 0, hk);
  const auto* v = static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, 0, hk);

  auto load_kv = [&](int tile, int stage) {
    const int n0 = (nb_hi - 1 - tile) * kBN, rows = min(kBN, s.k_len - n0);
    load_tile<kBN, kD, kThreads>(sK + stage * kBN * kD, k + n0 * p.k_st.token, p.k_st.token,
                                 rows, chunks);
    load_tile<kBN, kD, kThreads>(sV + stage * kBN * kD, v + n0 * p.v_st.token, p.v_st.token,
                                 rows, chunks);
  };
  load_tile<kBM, kD, kThreads>(sQ, q, p.q_st.token, s.q_len - m0, chunks);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < tiles) load_kv(st, st);
    kpt::cp_async_commit();  // empty groups keep the wait count uniform
  }

  float o[kDT][4];
#pragma unroll
  for (int n = 0; n < kDT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f};
  const int r_lo = m0 + warp * 16 + g;  // this thread's rows: r_lo and r_lo + 8

  for (int it = 0; it < tiles; ++it) {
    if (it + kStages - 1 < tiles) load_kv(it + kStages - 1, (it + kStages - 1) % kStages);
    kpt::cp_async_commit();
    kpt::cp_async_wait<kStages - 1>();
    __syncthreads();
    const uint16_t* tk = sK + (it % kStages) * kBN * kD;
    const uint16_t* tv = sV + (it % kStages) * kBN * kD;
    const int n0 = (nb_hi - 1 - it) * kBN;

    float sc[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk < k16) {  // padded features are zero: skip their mmas
        uint32_t a[4];
        load_a<kD>(a, sQ, warp * 16, kk);
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t bb[4];
          load_b<kD>(bb, tk, np * 16, kk);
          kpt::mma_m16n8k16<T>(sc[2 * np], a, bb[0], bb[1]);
          kpt::mma_m16n8k16<T>(sc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

    const bool full = n0 + kBN <= s.k_len && !hooks &&
                      (mask.right < 0 || n0 + kBN - 1 <= m0 + mask.diag + mask.right) &&
                      (mask.left < 0 || n0 >= m0 + kBM - 1 + mask.diag - mask.left);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = r_lo + (e >> 1) * 8, j = n0 + n * 8 + 2 * t + (e & 1);
        const float x = logit(sc[n][e], i, j);
        sc[n][e] = (full || mask.visible(i, j)) ? x : neg_inf();
      }
    }

    // Online softmax; a row whose max is still -inf shifts by 0 (no inf - inf).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
      mx = quad_max(mx);
      const float shift = kpt::softmax_shift(mx);
      const float corr = exp2f(row_max[r] - shift);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        sc[n][2 * r] = exp2f(sc[n][2 * r] - shift);
        sc[n][2 * r + 1] = exp2f(sc[n][2 * r + 1] - shift);
        sum += sc[n][2 * r] + sc[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                             pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                             pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int nn = 0; nn < kD / 16; ++nn) {
        if (nn < k16) {
          uint32_t bb[4];
          load_b_t<kD>(bb, tv, kk * 16, nn);
          kpt::mma_m16n8k16<T>(o[2 * nn], a, bb[0], bb[1]);
          kpt::mma_m16n8k16<T>(o[2 * nn + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  kpt::cp_async_wait<0>();

  // Epilogue: O / l rounded to T, 4-byte stores (a quad writes 16 contiguous bytes a row).
  auto* out = static_cast<uint16_t*>(p.out) + row_offset(p.out_st, b, s.q_start, 0, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r_lo + r * 8;
    const kpt::RowEnd end = kpt::row_end(row_max[r], quad_sum(row_sum[r]));  // kpt/softmax.h
    if (i < s.q_len) {
      uint16_t* row = out + int64_t(i) * p.out_st.token;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
        const int c = n * 8 + 2 * t;
        if (c < p.head_dim) {
          *reinterpret_cast<uint32_t*>(row + c) = pack2<T>(o[n][2 * r] * end.inv,
                                                           o[n][2 * r + 1] * end.inv);
        }
      }
      if (t == 0) {
        p.lse[lse_offset(p, b, s.q_start, i, h)] = end.lse2 * kLn2;
      }
    }
  }
}

template <class T, int kD, int kBN, int kWarps, int kStages>
int launch_fwd_tiles(const kpt_fa_params& p, kpt::stream_t stream) {
  constexpr int kBM = 16 * kWarps;
  constexpr int kSmem = (kBM + 2 * kStages * kBN) * kD * 2;
  auto kernel = fwd_mma_kernel<T, kD, kBN, kWarps, kStages>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return int(err);
  }
  const dim3 grid((p.seqlen_q + kBM - 1) / kBM, p.heads_q, p.batch);
  kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
  return int(kpt::last_error());
}

}  // namespace kpt_fa
#endif  // KPT_CUDA
