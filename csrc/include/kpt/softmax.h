// How an online softmax ends: the one rule every kpt attention kernel (CUDA and HIP) applies to
// a query row, written once so that the kernels cannot drift apart, and tested on the host
// (tests/jit/test_softmax_rule.py compiles this header into a host program).
//
// A row keeps its running maximum m and sum l = sum_j 2^(s_j - m) of its logits s_j in log2
// units (s_j = -inf for a key it cannot see). The rule matches kpt's references
// (kpt/ops/flash_attention/reference.py):
//   * m == +inf (a logit overflowed float32 to +inf): lse +inf, out NaN (the inf / inf of the
//     softmax), whatever l is. Kernels that shift by m get l = 0 (a product fused into the
//     exponent's fma never overflows) or NaN (inf - inf); both end here.
//   * l == 0 (no key visible, or every visible logit -inf): out 0, lse -inf, as
//     FlashAttention and torch's flex_attention treat a row without a finite logit.
//   * l NaN (a NaN logit): out and lse NaN, through the arithmetic itself.
//   * otherwise out = o / l and lse = m + log2(l).
// Partial results are merged by `MergeLse` below under the same rule.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KPT_HOST_DEVICE inline
#endif

namespace kpt {

// What a row's accumulator o is multiplied by, and the row's lse in log2 units.
struct RowEnd {
  float inv;
  float lse2;
};

KPT_HOST_DEVICE RowEnd row_end(float m, float l) {
  if (m == INFINITY) return RowEnd{NAN, INFINITY};
  if (l == 0.f) return RowEnd{0.f, -INFINITY};
  return RowEnd{1.f / l, m + log2f(l)};
}

// The shift a row (or a merge) subtracts from its logits, given their maximum: 0 while that
// maximum is -inf, so that no (-inf) - (-inf) NaN forms; m itself otherwise (+inf included:
// the row then ends by the first case of row_end, whatever its sum became).
KPT_HOST_DEVICE float softmax_shift(float m) { return m == -INFINITY ? 0.f : m; }

// Merging parts of one row, each given as (o_s, weight) with o_s already divided by its own
// sum or not: construct with the maximum of the parts' log2 maxima (fmaxf skips NaN), call
// weight() for each part's log2 max (or lse2) and accumulate o += weight * o_s (and, for
// unnormalised parts, the sum += weight * l_s through add_sum), then end() gives the row's
// RowEnd. A NaN part makes its weight, the sum and so the row NaN; parts at -inf weigh 0.
struct MergeLse {
  float m, shift, l;
  KPT_HOST_DEVICE explicit MergeLse(float max_part)
      : m(max_part), shift(softmax_shift(max_part)), l(0.f) {}
  KPT_HOST_DEVICE float weight(float part) const { return exp2f(part - shift); }
  // A normalised part (o_s divided by its sum, `part` its lse2): its weight also counts once
  // in the sum.
  KPT_HOST_DEVICE float add(float part) {
    const float w = weight(part);
    l += w;
    return w;
  }
  // An unnormalised part with maximum `part` and sum `sum`.
  KPT_HOST_DEVICE float add_sum(float part, float sum) {
    const float w = weight(part);
    l = fmaf(w, sum, l);
    return w;
  }
  KPT_HOST_DEVICE RowEnd end() const { return row_end(m, l); }
};

}  // namespace kpt
