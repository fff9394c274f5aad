// flash_attention, portable SIMT kernels: one warp (wavefront) per query or key row, FMA only.
//
// This is the HIP implementation (gfx90a; no mma.sync there) and, on NVIDIA, the fallback the
// tensor-core kernels are checked against. Lane l holds features l, l + W, l + 2W, ... of a
// row (W = warp width), so loads are coalesced 2-byte reads and a dot product is one warp_sum.
// Rows are independent, keys visited in increasing order: results are deterministic, and the
// backward needs no atomics (dK/dV rows loop over the queries of every head of their group).
// The preprocess (delta = rowsum(dO * O) - dlse) serves the tensor-core backward too.

#include "common.cuh"

namespace kpt_fa {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each
constexpr int kE = KPT_FA_MAX_HEAD_DIM / kpt::kWarpSize;  // features per lane

template <class T>
KPT_DEVICE void load_row(const uint16_t* row, int d, float (&x)[kE]) {
  const int lane = threadIdx.x % kpt::kWarpSize;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const int c = lane + e * kpt::kWarpSize;
    x[e] = c < d ? to_float<T>(row[c]) : 0.f;
  }
}

template <class T>
KPT_DEVICE void store_row(uint16_t* row, int d, const float (&x)[kE], float mul) {
  const int lane = threadIdx.x % kpt::kWarpSize;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const int c = lane + e * kpt::kWarpSize;
    if (c < d) row[c] = from_float<T>(x[e] * mul);
  }
}

KPT_DEVICE float dot(const float (&a)[kE], const float (&b)[kE]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kE; ++e) s += a[e] * b[e];
  return kpt::warp_sum(s);
}

// grid (ceil(Sq / rows), Hq, B)
template <class T>
__global__ KPT_LAUNCH_BOUNDS(kRowsPerBlock* kpt::kWarpSize, 1) void fwd_simt_kernel(
    kpt_fa_params p) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / kpt::kWarpSize;
  const Seq s = seq_of(p, b);
  if (i >= s.q_len) return;
  const int hk = h / (p.heads_q / p.heads_kv), d = p.head_dim;
  Mask mask = make_mask(p, s, b);
  apply_range(p, mask, b, h, i / KPT_FA_Q_BLOCK);
  const Logit logit = make_logit(p, h);
  const auto* q = static_cast<const uint16_t*>(p.q) + row_offset(p.q_st, b, s.q_start, i, h);
  const auto* k = static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, 0, hk);
  const auto* v = static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, 0, hk);
  float qf[kE], kf[kE], acc[kE];
  load_row<T>(q, d, qf);
#pragma unroll
  for (int e = 0; e < kE; ++e) acc[e] = 0.f;
  float m = neg_inf(), l = 0.f;
  int lo, hi;
  key_range(mask, i, i, lo, hi);
  for (int j = lo; j < hi; ++j) {
    if (!mask.visible(i, j)) continue;  // uniform over the warp
    load_row<T>(k + j * p.k_st.token, d, kf);
    const float s2 = logit(dot(qf, kf), i, j);
    const float m_new = fmaxf(m, s2);
    const float shift = kpt::softmax_shift(m_new);  // -inf logits so far: no (-inf) - (-inf)
    const float corr = exp2f(m - shift), pj = exp2f(s2 - shift);
    l = l * corr + pj;
    load_row<T>(v + j * p.v_st.token, d, kf);
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[e] = acc[e] * corr + pj * kf[e];
    m = m_new;
  }
  auto* out = static_cast<uint16_t*>(p.out) + row_offset(p.out_st, b, s.q_start, i, h);
  const kpt::RowEnd end = kpt::row_end(m, l);  // kpt/softmax.h
  store_row<T>(out, d, acc, end.inv);
  if (threadIdx.x % kpt::kWarpSize == 0) p.lse[lse_offset(p, b, s.q_start, i, h)] = end.lse2 * kLn2;
}

// delta = rowsum(dO * O) - dlse, fp32, in the lse layout. grid like the forward.
template <class T>
__global__ KPT_LAUNCH_BOUNDS(kRowsPerBlock* kpt::kWarpSize, 1) void bwd_preprocess_kernel(
    kpt_fa_params p) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / kpt::kWarpSize;
  const Seq s = seq_of(p, b);
  if (i >= s.q_len) return;
  float o[kE], g[kE];
  load_row<T>(static_cast<const uint16_t*>(p.out) + row_offset(p.out_st, b, s.q_start, i, h),
              p.head_dim, o);
  load_row<T>(static_cast<const uint16_t*>(p.dout) + row_offset(p.do_st, b, s.q_start, i, h),
              p.head_dim, g);
  float delta = dot(o, g);
  const int64_t at = lse_offset(p, b, s.q_start, i, h);
  if (p.dlse != nullptr) delta -= p.dlse[at];
  if (threadIdx.x % kpt::kWarpSize == 0) p.delta[at] = delta;
}

// dq of one query row: loops over its visible keys. grid like the forward.
template <class T>
__global__ KPT_LAUNCH_BOUNDS(kRowsPerBlock* kpt::kWarpSize, 1) void bwd_dq_simt_kernel(
    kpt_fa_params p) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / kpt::kWarpSize;
  const Seq s = seq_of(p, b);
  if (i >= s.q_len) return;
  const int hk = h / (p.heads_q / p.heads_kv), d = p.head_dim;
  Mask mask = make_mask(p, s, b);
  apply_range(p, mask, b, h, i / KPT_FA_Q_BLOCK);
  const Logit logit = make_logit(p, h);
  const auto* k = static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, 0, hk);
  const auto* v = static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, 0, hk);
  float qf[kE], gf[kE], kf[kE], acc[kE];
  load_row<T>(static_cast<const uint16_t*>(p.q) + row_offset(p.q_st, b, s.q_start, i, h), d, qf);
  load_row<T>(static_cast<const uint16_t*>(p.dout) + row_offset(p.do_st, b, s.q_start, i, h), d,
              gf);
#pragma unroll
  for (int e = 0; e < kE; ++e) acc[e] = 0.f;
  const int64_t at = lse_offset(p, b, s.q_start, i, h);
  const float lse2 = bwd_lse2(p.lse[at]), delta = p.delta[at];
  int lo, hi;
  key_range(mask, i, i, lo, hi);
  if (p.lse[at] == neg_inf()) hi = lo;  // p = 0 for every key: zero gradient
  for (int j = lo; j < hi; ++j) {
    if (!mask.visible(i, j)) continue;
    load_row<T>(k + j * p.k_st.token, d, kf);
    const float qk = dot(qf, kf);
    const float pj = exp2f(logit(qk, i, j) - lse2);
    float vf[kE];
    load_row<T>(v + j * p.v_st.token, d, vf);
    float ds = pj * (dot(gf, vf) - delta);
    if (logit.capped) {
      const float t = logit.tanh_of(qk);
      ds *= 1.f - t * t;
    }
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[e] += ds * kf[e];
  }
  store_row<T>(static_cast<uint16_t*>(p.dq) + row_offset(p.dq_st, b, s.q_start, i, h), d, acc,
               p.scale);
}

// dk, dv of one key row of one kv head: loops over the q heads of its group, then over the
// queries that may see it, in a fixed order. grid (ceil(Sk / rows), Hkv, B)
template <class T>
__global__ KPT_LAUNCH_BOUNDS(kRowsPerBlock* kpt::kWarpSize, 1) void bwd_dkdv_simt_kernel(
    kpt_fa_params p) {
  const int b = blockIdx.z, hk = blockIdx.y;
  const int j = blockIdx.x * kRowsPerBlock + threadIdx.x / kpt::kWarpSize;
  const Seq s = seq_of(p, b);
  if (j >= s.k_len) return;
  const int group = p.heads_q / p.heads_kv, d = p.head_dim;
  float kf[kE], vf[kE], qf[kE], gf[kE], dk[kE], dv[kE];
  load_row<T>(static_cast<const uint16_t*>(p.k) + row_offset(p.k_st, b, s.k_start, j, hk), d, kf);
  load_row<T>(static_cast<const uint16_t*>(p.v) + row_offset(p.v_st, b, s.k_start, j, hk), d, vf);
#pragma unroll
  for (int e = 0; e < kE; ++e) dk[e] = dv[e] = 0.f;
  const Mask base = make_mask(p, s, b);
  int lo, hi;
  query_range(base, s.q_len, j, j, lo, hi);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const Logit logit = make_logit(p, h);
    Mask mask = base;
    for (int i = lo; i < hi; ++i) {
      if (i % KPT_FA_Q_BLOCK == 0 || i == lo) apply_range(p, mask, b, h, i / KPT_FA_Q_BLOCK);
      if (!mask.visible(i, j)) continue;
      const int64_t at = lse_offset(p, b, s.q_start, i, h);
      const float lse2 = bwd_lse2(p.lse[at]);
      load_row<T>(static_cast<const uint16_t*>(p.q) + row_offset(p.q_st, b, s.q_start, i, h), d,
                  qf);
      load_row<T>(static_cast<const uint16_t*>(p.dout) + row_offset(p.do_st, b, s.q_start, i, h),
                  d, gf);
      const float qk = dot(qf, kf);
      const float pi = exp2f(logit(qk, i, j) - lse2);
      float ds = pi * (dot(gf, vf) - p.delta[at]);
      if (logit.capped) {
        const float t = logit.tanh_of(qk);
        ds *= 1.f - t * t;
      }
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        dv[e] += pi * gf[e];
        dk[e] += ds * qf[e];
      }
    }
  }
  store_row<T>(static_cast<uint16_t*>(p.dk) + row_offset(p.dk_st, b, s.k_start, j, hk), d, dk,
               p.scale);
  store_row<T>(static_cast<uint16_t*>(p.dv) + row_offset(p.dv_st, b, s.k_start, j, hk), d, dv,
               1.f);
}

dim3 row_grid(int rows, int heads, int batch) {
  return dim3((rows + kRowsPerBlock - 1) / kRowsPerBlock, heads, batch);
}

}  // namespace

template <class T>
int launch_fwd_simt(const kpt_fa_params& p, kpt::stream_t stream) {
  if (p.seqlen_q == 0) return 0;
  fwd_simt_kernel<T><<<row_grid(p.seqlen_q, p.heads_q, p.batch), kRowsPerBlock * kpt::kWarpSize,
                       0, stream>>>(p);
  return int(kpt::last_error());
}

template <class T>
int launch_bwd_preprocess(const kpt_fa_params& p, kpt::stream_t stream) {
  if (p.seqlen_q == 0) return 0;
  bwd_preprocess_kernel<T><<<row_grid(p.seqlen_q, p.heads_q, p.batch),
                             kRowsPerBlock * kpt::kWarpSize, 0, stream>>>(p);
  return int(kpt::last_error());
}

template <class T>
int launch_bwd_simt(const kpt_fa_params& p, kpt::stream_t stream) {
  const int threads = kRowsPerBlock * kpt::kWarpSize;
  // An empty grid is an invalid launch: skip the kernel whose rows do not exist.
  if (p.seqlen_q > 0) {
    bwd_dq_simt_kernel<T><<<row_grid(p.seqlen_q, p.heads_q, p.batch), threads, 0, stream>>>(p);
  }
  if (p.seqlen_k > 0) {
    bwd_dkdv_simt_kernel<T><<<row_grid(p.seqlen_k, p.heads_kv, p.batch), threads, 0, stream>>>(
        p);
  }
  return int(kpt::last_error());
}

#define KPT_FA_INSTANTIATE(T)                                                   \
  template int launch_fwd_simt<T>(const kpt_fa_params&, kpt::stream_t);        \
  template int launch_bwd_preprocess<T>(const kpt_fa_params&, kpt::stream_t);  \
  template int launch_bwd_simt<T>(const kpt_fa_params&, kpt::stream_t);
KPT_FA_INSTANTIATE(kpt::fp16)
KPT_FA_INSTANTIATE(kpt::bf16)
#undef KPT_FA_INSTANTIATE

}  // namespace kpt_fa
