// Tensor-core backward (FA2 scheme, two kernels, no atomics), included by bwd_d{64,128}.cu.
// The preprocess (delta = rowsum(dO * O) - dlse) is simt.cu's. Both kernels recompute
// P = exp2(s2 - lse2) from Q, K and the saved lse, in the exp2 domain of the forward, and
//   dP = dO V^T,  dS = P * (dP - delta)  (times 1 - tanh^2 under a soft-cap),
//   dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.
//
// dK/dV kernel: one CTA per (key tile of 16 * kWarps keys, kv head, sequence), each warp owns
// 16 keys and keeps their dK and dV (2 x D / 2 floats a thread) in registers while it walks the
// query tiles (kBM queries) of every q head of the GQA group that the band lets see the tile.
// Everything is computed transposed (keys are the mma rows): S^T = K Q^T, dP^T = V dO^T, so the
// C fragments of P^T and dS^T are directly the A fragments of P^T dO and dS^T Q.
// dQ kernel: one CTA per (query tile of 16 * kWarps rows, q head, sequence), the forward's
// loop over key tiles with dQ in registers.
// Each gradient element is summed by one thread in a fixed order and written once: bitwise
// deterministic. Streamed tiles go through a kStages cp.async ring as in the forward; rows past
// a sequence end and features past head_dim are zero-filled, never read, and their lse2 is
// +inf so that their P (and hence dS) is exactly 0.
#pragma once

#include "mma.cuh"

#ifdef KPT_CUDA
namespace kpt_fa {

// dS from the raw qk, P and dP of one element (the soft-cap derivative needs the raw qk).
KPT_DEVICE float bwd_ds(const Logit& logit, float qk, float pe, float dp, float delta) {
  float ds = pe * (dp - delta);
  if (logit.capped) {
    const float th = logit.tanh_of(qk);
    ds *= 1.f - th * th;
  }
  return ds;
}

// acc[n-tiles of D] += A (16 x kBK, from the C fragments c[kBK / 8]) @ B, with B a row-major
// [kBK][kD] tile read through the transposing ldmatrix. A is rounded to T (as P in the
// forward); padded feature tiles are skipped.
template <class T, int kD, int kBK>
KPT_DEVICE void mma_c_by_tile(float (&acc)[kD / 8][4], const float (&c)[kBK / 8][4],
                              const uint16_t* tile, int k16) {
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(c[2 * kk][0], c[2 * kk][1]),
                           pack2<T>(c[2 * kk][2], c[2 * kk][3]),
                           pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]),
                           pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
    for (int nn = 0; nn < kD / 16; ++nn) {
      if (nn < k16) {
        uint32_t bb[4];
        load_b_t<kD>(bb, tile, kk * 16, nn);
        kpt::mma_m16n8k16<T>(acc[2 * nn], a, bb[0], bb[1]);
        kpt::mma_m16n8k16<T>(acc[2 * nn + 1], a, bb[2], bb[3]);
      }
    }
  }
}

// c (16 rows r0.. of `a_tile` x kBN rows of `b_tile`) = A B^T over the first k16 feature
// steps: S = Q K^T and friends.
template <class T, int kD, int kBN>
KPT_DEVICE void mma_rows_by_rows(float (&c)[kBN / 8][4], const uint16_t* a_tile, int r0,
                                 const uint16_t* b_tile, int k16) {
#pragma unroll
  for (int n = 0; n < kBN / 8; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    if (kk < k16) {
      uint32_t a[4];
      load_a<kD>(a, a_tile, r0, kk);
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bb[4];
        load_b<kD>(bb, b_tile, np * 16, kk);
        kpt::mma_m16n8k16<T>(c[2 * np], a, bb[0], bb[1]);
        kpt::mma_m16n8k16<T>(c[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
}

// 4-byte stores of one thread's two rows (C layout) of a 16 x kD accumulator, times mul.
template <class T, int kD>
KPT_DEVICE void store_rows(uint16_t* base, int64_t stride, int r_lo, int rows,
                           const float (&acc)[kD / 8][4], float mul, int head_dim) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r_lo + r * 8;
    if (i < rows) {
      uint16_t* row = base + int64_t(i) * stride;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (c < head_dim) {
          *reinterpret_cast<uint32_t*>(row + c) =
              pack2<T>(acc[n][2 * r] * mul, acc[n][2 * r + 1] * mul);
        }
      }
    }
  }
}

template <int kN, int kD>
KPT_DEVICE void zero(float (&x)[kN][kD]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < kD; ++e) x[n][e] = 0.f;
  }
}

template <class T, int kD, int kBM, int kWarps, int kStages>
__global__ KPT_LAUNCH_BOUNDS(kWarps * 32, 1) void bwd_dkdv_mma_kernel(kpt_fa_params p) {
  constexpr int kBN = 16 * kWarps, kThreads = kWarps * 32, kNT = kBM / 8, kDT = kD / 8;
  static_assert(KPT_FA_Q_BLOCK % kBM == 0, "query tiles must not straddle kv_block_range");
  static_assert(kBM <= kThreads, "one thread loads each row's lse and delta");
  extern __shared__ uint4 smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + kBN * kD;
  uint16_t* sQ = sV + kBN * kD;
  uint16_t* sG = sQ + kStages * kBM * kD;  // dO
  float* sL = reinterpret_cast<float*>(sG + kStages * kBM * kD);  // lse2 per query row
  float* sDl = sL + kStages * kBM;                                // delta per query row

  const int b = blockIdx.z, hk = blockIdx.y;
  const int n0 = blockIdx.x * kBN;  // under a causal mask the first key tiles see most queries
  const Seq s = seq_of(p, b);
  if (n0 >= s.k_len) return;
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const Mask base = make_mask(p, s, b);
  const int n_last = min(n0 + kBN, s.k_len) - 1;
  int lo, hi;
  query_range(base, s.q_len, n0, n_last, lo, hi);
  const int qt_lo = lo / kBM, qt_hi = hi > lo ? (hi + kBM - 1) / kBM : qt_lo;
  const int ntiles = qt_hi - qt_lo, total = ntiles * group;
  const int chunks = p.head_dim / 8, k16 = (p.head_dim + 15) / 16;
  const bool hooks = base.doc_q != nullptr || p.kv_block_range != nullptr;

  const auto* q = static_cast<const uint16_t*>(p.q);
  const auto* dout = static_cast<const uint16_t*>(p.dout);
  load_tile<kBN, kD, kThreads>(
      sK, static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, n0, hk),
      p.k_st.token, s.k_len - n0, chunks);
  load_tile<kBN, kD, kThreads>(
      sV, static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, n0, hk),
      p.v_st.token, s.k_len - n0, chunks);

  // Step `it` visits q head hk * group + it / ntiles, query tile qt_lo + it % ntiles.
  auto load_q = [&](int it, int stage) {
    const int h = hk * group + it / ntiles, m0 = (qt_lo + it % ntiles) * kBM;
    load_tile<kBM, kD, kThreads>(sQ + stage * kBM * kD,
                                 q + row_offset(p.q_st, b, s.q_start, m0, h), p.q_st.token,
                                 s.q_len - m0, chunks);
    load_tile<kBM, kD, kThreads>(sG + stage * kBM * kD,
                                 dout + row_offset(p.do_st, b, s.q_start, m0, h),
                                 p.do_st.token, s.q_len - m0, chunks);
    if (threadIdx.x < kBM) {
      const int i = m0 + threadIdx.x;
      float l2 = -neg_inf(), dl = 0.f;  // rows past the end: P = 0
      if (i < s.q_len) {
        const int64_t at = lse_offset(p, b, s.q_start, i, h);
        l2 = bwd_lse2(p.lse[at]);
        dl = p.delta[at];
      }
      sL[stage * kBM + threadIdx.x] = l2;
      sDl[stage * kBM + threadIdx.x] = dl;
    }
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < total) load_q(st, st);
    kpt::cp_async_commit();  // K and V ride in the first group
  }

  float dk[kDT][4], dv[kDT][4];
  zero(dk);
  zero(dv);
  const int j_lo = n0 + warp * 16 + g;  // this thread's keys: j_lo and j_lo + 8

  for (int it = 0; it < total; ++it) {
    if (it + kStages - 1 < total) load_q(it + kStages - 1, (it + kStages - 1) % kStages);
    kpt::cp_async_commit();
    kpt::cp_async_wait<kStages - 1>();
    __syncthreads();  // also publishes the plain smem stores of lse2 / delta
    const int stage = it % kStages;
    const int h = hk * group + it / ntiles, m0 = (qt_lo + it % ntiles) * kBM;
    Mask mask = base;
    apply_range(p, mask, b, h, m0 / KPT_FA_Q_BLOCK);
    // Uniform: a range that misses this key tile leaves nothing to add.
    if (mask.hi > n0 && mask.lo <= n_last) {
      const uint16_t* tq = sQ + stage * kBM * kD;
      const uint16_t* tg = sG + stage * kBM * kD;
      const float* l2 = sL + stage * kBM;
      const float* dl = sDl + stage * kBM;
      const Logit logit = make_logit(p, h);
      float sc[kNT][4], dp[kNT][4];
      mma_rows_by_rows<T, kD, kBM>(sc, sK, warp * 16, tq, k16);  // S^T = K Q^T
      mma_rows_by_rows<T, kD, kBM>(dp, sV, warp * 16, tg, k16);  // dP^T = V dO^T

      const bool full = !hooks && m0 + kBM <= s.q_len && n0 + kBN <= s.k_len &&
                        (mask.right < 0 || n0 + kBN - 1 <= m0 + mask.diag + mask.right) &&
                        (mask.left < 0 || n0 >= m0 + kBM - 1 + mask.diag - mask.left);
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * t + (e & 1);
          const int i = m0 + c, j = j_lo + (e >> 1) * 8;
          const float qk = sc[n][e];
          const float pe =
              (full || mask.visible(i, j)) ? exp2f(logit(qk, i, j) - l2[c]) : 0.f;
          sc[n][e] = pe;
          dp[n][e] = bwd_ds(logit, qk, pe, dp[n][e], dl[c]);
        }
      }
      mma_c_by_tile<T, kD, kBM>(dv, sc, tg, k16);  // dV += P^T dO
      mma_c_by_tile<T, kD, kBM>(dk, dp, tq, k16);  // dK += dS^T Q
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  kpt::cp_async_wait<0>();

  const int rows = s.k_len - n0;
  store_rows<T, kD>(static_cast<uint16_t*>(p.dk) + row_offset(p.dk_st, b, s.k_start, n0, hk),
                    p.dk_st.token, warp * 16 + g, rows, dk, p.scale, p.head_dim);
  store_rows<T, kD>(static_cast<uint16_t*>(p.dv) + row_offset(p.dv_st, b, s.k_start, n0, hk),
                    p.dv_st.token, warp * 16 + g, rows, dv, 1.f, p.head_dim);
}

template <class T, int kD, int kBN, int kWarps, int kStages>
__global__ KPT_LAUNCH_BOUNDS(kWarps * 32, 1) void bwd_dq_mma_kernel(kpt_fa_params p) {
  constexpr int kBM = 16 * kWarps, kThreads = kWarps * 32, kNT = kBN / 8, kDT = kD / 8;
  static_assert(KPT_FA_Q_BLOCK % kBM == 0, "query tiles must not straddle kv_block_range");
  extern __shared__ uint4 smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sG = sQ + kBM * kD;  // dO
  uint16_t* sK = sG + kBM * kD;
  uint16_t* sV = sK + kStages * kBN * kD;

  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBM;  // longest causal rows first
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
  const bool hooks = mask.doc_q != nullptr || p.kv_block_range != nullptr;

  const auto* k = static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, 0, hk);
  const auto* v = static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, 0, hk);
  auto load_kv = [&](int tile, int stage) {
    const int n0 = (nb_lo + tile) * kBN, rows = min(kBN, s.k_len - n0);
    load_tile<kBN, kD, kThreads>(sK + stage * kBN * kD, k + n0 * p.k_st.token, p.k_st.token,
                                 rows, chunks);
    load_tile<kBN, kD, kThreads>(sV + stage * kBN * kD, v + n0 * p.v_st.token, p.v_st.token,
                                 rows, chunks);
  };
  load_tile<kBM, kD, kThreads>(
      sQ, static_cast<const uint16_t*>(p.q) + row_offset(p.q_st, b, s.q_start, m0, h),
      p.q_st.token, s.q_len - m0, chunks);
  load_tile<kBM, kD, kThreads>(
      sG, static_cast<const uint16_t*>(p.dout) + row_offset(p.do_st, b, s.q_start, m0, h),
      p.do_st.token, s.q_len - m0, chunks);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < tiles) load_kv(st, st);
    kpt::cp_async_commit();  // Q and dO ride in the first group
  }

  const int r_lo = m0 + warp * 16 + g;  // this thread's rows: r_lo and r_lo + 8
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r_lo + r * 8;
    l2[r] = -neg_inf();  // rows past the end: P = 0
    dl[r] = 0.f;
    if (i < s.q_len) {
      const int64_t at = lse_offset(p, b, s.q_start, i, h);
      l2[r] = bwd_lse2(p.lse[at]);
      dl[r] = p.delta[at];
    }
  }
  float dq[kDT][4];
  zero(dq);

  for (int it = 0; it < tiles; ++it) {
    if (it + kStages - 1 < tiles) load_kv(it + kStages - 1, (it + kStages - 1) % kStages);
    kpt::cp_async_commit();
    kpt::cp_async_wait<kStages - 1>();
    __syncthreads();
    const uint16_t* tk = sK + (it % kStages) * kBN * kD;
    const uint16_t* tv = sV + (it % kStages) * kBN * kD;
    const int n0 = (nb_lo + it) * kBN;

    float sc[kNT][4], dp[kNT][4];
    mma_rows_by_rows<T, kD, kBN>(sc, sQ, warp * 16, tk, k16);  // S = Q K^T
    mma_rows_by_rows<T, kD, kBN>(dp, sG, warp * 16, tv, k16);  // dP = dO V^T

    const bool full = n0 + kBN <= s.k_len && !hooks &&
                      (mask.right < 0 || n0 + kBN - 1 <= m0 + mask.diag + mask.right) &&
                      (mask.left < 0 || n0 >= m0 + kBM - 1 + mask.diag - mask.left);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, i = r_lo + r * 8, j = n0 + n * 8 + 2 * t + (e & 1);
        const float qk = sc[n][e];
        const float pe = (full || mask.visible(i, j)) ? exp2f(logit(qk, i, j) - l2[r]) : 0.f;
        sc[n][e] = bwd_ds(logit, qk, pe, dp[n][e], dl[r]);
      }
    }
    mma_c_by_tile<T, kD, kBN>(dq, sc, tk, k16);  // dQ += dS K
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  kpt::cp_async_wait<0>();

  store_rows<T, kD>(static_cast<uint16_t*>(p.dq) + row_offset(p.dq_st, b, s.q_start, m0, h),
                    p.dq_st.token, warp * 16 + g, s.q_len - m0, dq, p.scale, p.head_dim);
}

template <class Kernel>
int set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return 0;
  return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// dK/dV: kKeyWarps warps (16 keys each) x kBMq-query steps; dQ: kQWarps warps (16 queries
// each) x kBNk-key steps. Both kernels read the delta the preprocess wrote before them.
template <class T, int kD, int kKeyWarps, int kBMq, int kQWarps, int kBNk, int kStages>
int launch_bwd_tiles(const kpt_fa_params& p, kpt::stream_t stream) {
  if (p.seqlen_q > 0) {
    constexpr int kBM = 16 * kQWarps;
    constexpr int kSmem = (2 * kBM + 2 * kStages * kBNk) * kD * 2;
    auto kernel = bwd_dq_mma_kernel<T, kD, kBNk, kQWarps, kStages>;
    const int err = set_smem(kernel, kSmem);
    if (err != 0) return err;
    const dim3 grid((p.seqlen_q + kBM - 1) / kBM, p.heads_q, p.batch);
    kernel<<<grid, kQWarps * 32, kSmem, stream>>>(p);
  }
  if (p.seqlen_k > 0) {
    constexpr int kBN = 16 * kKeyWarps;
    constexpr int kSmem = (2 * kBN + 2 * kStages * kBMq) * kD * 2 + 2 * kStages * kBMq * 4;
    auto kernel = bwd_dkdv_mma_kernel<T, kD, kBMq, kKeyWarps, kStages>;
    const int err = set_smem(kernel, kSmem);
    if (err != 0) return err;
    const dim3 grid((p.seqlen_k + kBN - 1) / kBN, p.heads_kv, p.batch);
    kernel<<<grid, kKeyWarps * 32, kSmem, stream>>>(p);
  }
  return int(kpt::last_error());
}

}  // namespace kpt_fa
#endif  // KPT_CUDA
