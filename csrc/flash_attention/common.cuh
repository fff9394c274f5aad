// Shared device code of the flash_attention kernels: sequence bounds, the visibility rule,
// band-limited loop bounds and the logit transform. Used by the SIMT (portable) and the
// tensor-core kernels alike, so that both apply exactly one definition of the mask.
#pragma once

#include <math.h>

#include "kpt/compat.h"
#include "kpt/flash_attention.h"
#include "kpt/softmax.h"

namespace kpt_fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

KPT_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// Where sequence b lives: token offsets (varlen) or 0 with the batch stride (batched).
struct Seq {
  int64_t q_start, k_start;
  int q_len, k_len;
};

KPT_DEVICE int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

KPT_DEVICE Seq seq_of(const kpt_fa_params& p, int b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    // Clamped to the tensors whatever the boundaries hold (the host checks them where it can
    // read them): a start in [0, total], an end in [start, total].
    s.q_start = clamp_index(p.cu_seqlens_q[b], 0, p.total_q);
    s.q_len = static_cast<int>(clamp_index(p.cu_seqlens_q[b + 1], s.q_start, p.total_q) -
                               s.q_start);
    s.k_start = clamp_index(p.cu_seqlens_k[b], 0, p.total_k);
    s.k_len = static_cast<int>(clamp_index(p.cu_seqlens_k[b + 1], s.k_start, p.total_k) -
                               s.k_start);
  } else {
    s.q_start = s.k_start = 0;
    s.q_len = p.seqlen_q;
    s.k_len = p.seqlen_k;
  }
  return s;
}

// Element offset of row `token` (in-sequence) of head h of sequence b.
KPT_DEVICE int64_t row_offset(const kpt_fa_strides& st, int b, int64_t start, int token, int h) {
  return b * st.batch + (start + token) * st.token + h * st.head;
}

KPT_DEVICE int64_t lse_offset(const kpt_fa_params& p, int b, int64_t start, int token, int h) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + start + token;
}

// The backward's lse in the exp2 domain. Rows at lse -inf (no visible key, or only -inf
// logits: out 0 by kpt/softmax.h) map to +inf, so that exp2(s2 - lse2) = 0 for every key of
// them instead of exp2(-inf + inf) = NaN.
KPT_DEVICE float bwd_lse2(float lse) { return lse == neg_inf() ? -neg_inf() : lse * kLog2e; }

// The visibility rule of one (sequence, q head), with in-sequence indices i (query), j (key):
//   (band(i, j) or j < prefix) and doc_q[i] == doc_k[j] and lo <= j < hi, and j < k_len.
// lo/hi come from kv_block_range for the query block of i (set per block by the caller).
struct Mask {
  int diag, left, right, prefix, q_len, k_len;
  int lo, hi;
  const int32_t* doc_q;
  const int32_t* doc_k;

  KPT_DEVICE bool visible(int i, int j) const {
    // Bounds first: the document ids past either sequence end must not be read.
    if (j >= k_len || i >= q_len || j < lo || j >= hi) return false;
    bool band = (right < 0 || j <= i + diag + right) && (left < 0 || j >= i + diag - left);
    band = band || j < prefix;
    return band && (doc_q == nullptr || doc_q[i] == doc_k[j]);
  }
};

KPT_DEVICE Mask make_mask(const kpt_fa_params& p, const Seq& s, int b) {
  Mask m;
  m.diag = s.k_len - s.q_len;
  m.left = p.window_left;
  m.right = p.window_right;
  m.prefix = p.prefix_len != nullptr ? p.prefix_len[b] : 0;
  m.q_len = s.q_len;
  m.k_len = s.k_len;
  m.lo = 0;
  m.hi = s.k_len;
  m.doc_q = p.doc_q != nullptr ? p.doc_q + b * p.doc_q_batch_stride : nullptr;
  m.doc_k = p.doc_k != nullptr ? p.doc_k + b * p.doc_k_batch_stride : nullptr;
  return m;
}

// Narrow the mask to kv_block_range of query block qb (no-op when the hook is off).
KPT_DEVICE void apply_range(const kpt_fa_params& p, Mask& m, int b, int h, int qb) {
  if (p.kv_block_range == nullptr) return;
  const int hr = p.range_heads == 1 ? 0 : h;
  const int32_t* r =
      p.kv_block_range + ((int64_t(b) * p.range_heads + hr) * p.range_q_blocks + qb) * 2;
  m.lo = r[0];
  m.hi = r[1];
}

// Keys [lo, hi) that queries i0..i1 (inclusive) may see: the band's hull, widened to the
// prefix, narrowed to the range. Keys outside are never loaded.
KPT_DEVICE void key_range(const Mask& m, int i0, int i1, int& lo, int& hi) {
  lo = 0;
  hi = m.k_len;
  if (m.right >= 0) hi = min(hi, i1 + m.diag + m.right + 1);
  if (m.left >= 0) lo = max(lo, i0 + m.diag - m.left);
  if (m.prefix > 0) {
    lo = 0;
    hi = max(hi, min(m.prefix, m.k_len));
  }
  lo = max(lo, m.lo);
  hi = min(hi, m.hi);
}

// Queries [lo, hi) that may see keys j0..j1 (inclusive) through the band or the prefix (the
// range hook is applied per query block by the caller).
KPT_DEVICE void query_range(const Mask& m, int q_len, int j0, int j1, int& lo, int& hi) {
  lo = 0;
  hi = q_len;
  if (j0 < m.prefix) return;
  if (m.right >= 0) lo = max(lo, j0 - m.diag - m.right);
  if (m.left >= 0) hi = min(hi, j1 - m.diag + m.left + 1);
}

// Logits in the exp2 domain: s2 = log2(e) * s, with s = scale * qk, soft-capped, plus ALiBi.
// With a soft-cap, `t` (the tanh) is what the backward needs: ds *= 1 - t^2.
struct Logit {
  float scale2;      // log2(e) * scale (no soft-cap)
  float cap_in;      // scale / softcap
  float cap2;        // log2(e) * softcap
  float slope2;      // log2(e) * alibi slope of this head (0 when off)
  bool capped;

  KPT_DEVICE float operator()(float qk, int i, int j) const {
    float s = capped ? cap2 * tanhf(qk * cap_in) : qk * scale2;
    return s + slope2 * float(j - i);
  }
  KPT_DEVICE float tanh_of(float qk) const { return tanhf(qk * cap_in); }
};

KPT_DEVICE Logit make_logit(const kpt_fa_params& p, int h) {
  Logit l;
  l.capped = p.softcap > 0.f;
  l.scale2 = p.scale * kLog2e;
  l.cap_in = l.capped ? p.scale / p.softcap : 0.f;
  l.cap2 = p.softcap * kLog2e;
  l.slope2 = p.alibi_slopes != nullptr ? p.alibi_slopes[h] * kLog2e : 0.f;
  return l;
}

// 16-bit element <-> float through compat.h's packed conversions (fp16 and bf16 alike).
template <class T>
KPT_DEVICE float to_float(uint16_t u) {
  return kpt::Half<T>::unpack(uint32_t(u)).x;
}

template <class T>
KPT_DEVICE uint16_t from_float(float f) {
  return uint16_t(kpt::Half<T>::pack(f, 0.f) & 0xffffu);
}

}  // namespace kpt_fa

// Internal launchers shared between the translation units (one per head-dim bucket so that
// ninja compiles them in parallel). Each returns 0 or a CUDA/HIP error code.
namespace kpt_fa {
template <class T>
int launch_fwd_simt(const kpt_fa_params& p, kpt::stream_t stream);
template <class T>
int launch_bwd_simt(const kpt_fa_params& p, kpt::stream_t stream);
template <class T>
int launch_bwd_preprocess(const kpt_fa_params& p, kpt::stream_t stream);
#ifdef KPT_CUDA
// Specialised (defined) per head-dim bucket in fwd_d<D>.cu / bwd_d<D>.cu; the backward has
// buckets 64 and 128 only (D = 256 needs 256 accumulator floats a thread: SIMT, see CUDA_NOTES).
template <class T, int kD>
int launch_fwd_mma(const kpt_fa_params& p, kpt::stream_t stream);
template <class T, int kD>
int launch_bwd_mma(const kpt_fa_params& p, kpt::stream_t stream);
#define KPT_FA_DECLARE(FN, D)                                                  \
  template <>                                                                 \
  int FN<kpt::fp16, D>(const kpt_fa_params& p, kpt::stream_t stream);          \
  template <>                                                                 \
  int FN<kpt::bf16, D>(const kpt_fa_params& p, kpt::stream_t stream);
KPT_FA_DECLARE(launch_fwd_mma, 64)
KPT_FA_DECLARE(launch_fwd_mma, 128)
KPT_FA_DECLARE(launch_fwd_mma, 256)
KPT_FA_DECLARE(launch_bwd_mma, 64)
KPT_FA_DECLARE(launch_bwd_mma, 128)
#undef KPT_FA_DECLARE
#endif
}  // namespace kpt_fa
