// moe routing: scores, optional DeepSeek grouped top-k, top-k experts and their weights.
//
// One warp (a 64-wide wavefront on CDNA) per token, four per CTA. Lane l holds experts
// l, l + W, l + 2W, ... (kVpl of them, E <= kVpl * W), so the logits load coalesced. In fp32:
// softmax over the row (warp max and sum) or a sigmoid per expert, then sel = s + bias with NaN
// read as -inf, so that every id written is a real expert whatever the input holds.
//
// Grouped top-k: the warp writes sel to shared memory, lane g scans group g for its two largest
// values (the group's score), then topk_groups rounds of warp argmax keep the best groups; the
// experts of the other groups leave the candidate set (a bitmask per lane).
//
// Top-k: top_k rounds of warp argmax over the candidates. The order is (sel descending, expert
// id ascending), a total order once NaN is gone, so the xor butterfly leaves every lane with
// the same winner and ties go to the lower id, as the reference's. The weight travels with
// the winner (s, not sel); lane r % W keeps round r's result in registers and writes it at the
// end, divided by the sum of the weights (renormalize) and multiplied by the scaling.
//
// Every warp of a CTA runs the group phase (it has a __syncthreads); warps past the last token
// compute on -inf and write nothing.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; not yet timed on a GPU (launch-bound: about
// 2 us of logits traffic at T=4096, E=256).

#include "common.cuh"

namespace {

using namespace kpt_moe;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kNone = 0x7fffffff;  // the id of "no candidate"; loses to any real expert

struct RouteParams {
  const void* logits;
  int64_t st, se;
  const float* bias;
  float* weights;
  int32_t* ids;
  int64_t tokens;
  int experts, top_k, groups, topk_groups;
  int sigmoid, renormalize;
  float scaling;
};

template <class T>
KPT_DEVICE float load_logit(const void* base, int64_t offset) {
  return half_to_float<T>(static_cast<const uint16_t*>(base)[offset]);
}

template <>
KPT_DEVICE float load_logit<float>(const void* base, int64_t offset) {
  return static_cast<const float*>(base)[offset];
}

// (v, i) beats (w, j) when v > w, or v == w and i < j.
KPT_DEVICE bool beats(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// The warp's best (value, id) and the payload that travels with it, on every lane.
KPT_DEVICE void warp_argmax(float& v, int& i, float& payload) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const float ov = kpt::shfl_xor(v, m);
    const int oi = shfl_xor_int(i, m);
    const float op = kpt::shfl_xor(payload, m);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
      payload = op;
    }
  }
}

template <class T, int kVpl>
__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) route_kernel(RouteParams p) {
  static_assert(kVpl <= 32, "candidate bitmasks are 32 bits");
  __shared__ float sel_smem[kWarps][kVpl * kWarpSize];
  __shared__ unsigned char keep_smem[kWarps][kVpl * kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t = int64_t(blockIdx.x) * kWarps + warp;
  const bool active = t < p.tokens;
  const int E = p.experts;

  // Scores.
  float s[kVpl], sel[kVpl];
  uint32_t cand = 0;  // bit i: expert i * W + lane is a candidate
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    const int e = i * kWarpSize + lane;
    const bool valid = active && e < E;
    s[i] = valid ? load_logit<T>(p.logits, t * p.st + e * p.se) : neg_inf();
    if (valid) cand |= 1u << i;
  }
  if (p.sigmoid) {
#pragma unroll
    for (int i = 0; i < kVpl; ++i) s[i] = 1.f / (1.f + expf(-s[i]));
  } else {
    float mx = neg_inf();
#pragma unroll
    for (int i = 0; i < kVpl; ++i) mx = fmaxf(mx, s[i]);
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      s[i] = (cand >> i) & 1u ? expf(s[i] - mx) : 0.f;
      sum += s[i];
    }
    sum = kpt::warp_sum(sum);
#pragma unroll
    for (int i = 0; i < kVpl; ++i) s[i] = s[i] / sum;
  }
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    const int e = i * kWarpSize + lane;
    float v = s[i];
    if (p.bias != nullptr && e < E) v += p.bias[e];
    sel[i] = (cand >> i) & 1u && v == v ? v : neg_inf();
  }

  // Grouped top-k: keep the topk_groups groups with the largest sum of their two best sels.
  if (p.groups > 1 && p.topk_groups < p.groups) {
    float* ss = sel_smem[warp];
    unsigned char* keep = keep_smem[warp];
#pragma unroll
    for (int i = 0; i < kVpl; ++i) ss[i * kWarpSize + lane] = sel[i];
    __syncthreads();
    const int size = E / p.groups;
    float score[kVpl];  // group m * W + lane (groups <= E <= kVpl * W)
    uint32_t open = 0;
#pragma unroll
    for (int m = 0; m < kVpl; ++m) {
      const int g = m * kWarpSize + lane;
      score[m] = neg_inf();
      if (g < p.groups) {
        float top1 = neg_inf(), top2 = neg_inf();
        for (int j = 0; j < size; ++j) {
          const float v = ss[g * size + j];
          if (v > top1) {
            top2 = top1;
            top1 = v;
          } else if (v > top2) {
            top2 = v;
          }
        }
        const float sc = size == 1 ? top1 : top1 + top2;
        score[m] = sc == sc ? sc : neg_inf();  // +inf + -inf
        open |= 1u << m;
      }
    }
    uint32_t chosen = 0;
    for (int r = 0; r < p.topk_groups; ++r) {
      float bv = neg_inf(), unused = 0.f;
      int bi = kNone;
#pragma unroll
      for (int m = 0; m < kVpl; ++m) {
        if (((open >> m) & 1u) && (bi == kNone || score[m] > bv)) {
          bv = score[m];
          bi = m * kWarpSize + lane;
        }
      }
      warp_argmax(bv, bi, unused);
      if (bi != kNone && bi % kWarpSize == lane) {
        open &= ~(1u << (bi / kWarpSize));
        chosen |= 1u << (bi / kWarpSize);
      }
    }
#pragma unroll
    for (int m = 0; m < kVpl; ++m) {
      const int g = m * kWarpSize + lane;
      if (g < p.groups) keep[g] = (chosen >> m) & 1u;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      const int e = i * kWarpSize + lane;
      if (((cand >> i) & 1u) && !keep[e / size]) cand &= ~(1u << i);
    }
  }

  // Top-k: round r's winner is kept by lane r % W in slot r / W.
  float my_w[kVpl];
  int my_id[kVpl];
#pragma unroll
  for (int m = 0; m < kVpl; ++m) {
    my_w[m] = 0.f;
    my_id[m] = 0;
  }
  float total = 0.f;
  for (int r = 0; r < p.top_k; ++r) {
    float bv = neg_inf(), bw = 0.f;
    int bi = kNone;
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      // Ids grow with i, so the first of equal values is the lower id.
      if (((cand >> i) & 1u) && (bi == kNone || sel[i] > bv)) {
        bv = sel[i];
        bi = i * kWarpSize + lane;
        bw = s[i];
      }
    }
    warp_argmax(bv, bi, bw);
    if (bi == kNone) {  // fewer candidates than top_k: excluded by the launcher's checks
      bi = 0;
      bw = 0.f;
    } else if (bi % kWarpSize == lane) {
      cand &= ~(1u << (bi / kWarpSize));
    }
    total += bw;
#pragma unroll
    for (int m = 0; m < kVpl; ++m) {
      if (m * kWarpSize + lane == r) {
        my_w[m] = bw;
        my_id[m] = bi;
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int m = 0; m < kVpl; ++m) {
    const int j = m * kWarpSize + lane;
    if (j < p.top_k) {
      float w = my_w[m];
      if (p.renormalize) w = w / total;
      p.weights[t * p.top_k + j] = w * p.scaling;
      p.ids[t * p.top_k + j] = my_id[m];
    }
  }
}

template <class T>
int launch(const RouteParams& p, kpt::stream_t stream) {
  const unsigned grid = unsigned((p.tokens + kWarps - 1) / kWarps);
  const int vpl = (p.experts + kWarpSize - 1) / kWarpSize;
  if (vpl <= 1) {
    route_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  } else if (vpl <= 2) {
    route_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p);
  } else if (vpl <= 4) {
    route_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p);
  } else if (vpl <= 8) {
    route_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p);
  } else if (vpl <= 16) {
    route_kernel<T, 16><<<grid, kThreads, 0, stream>>>(p);
  } else {
    return KPT_MOE_UNSUPPORTED;
  }
  return static_cast<int>(kpt::last_error());
}

}  // namespace

extern "C" int kpt_moe_route(const kpt_moe_route_args* a, void* stream) {
  if (a == nullptr) return KPT_MOE_BAD_ARGUMENT;
  if (a->dtype != KPT_MOE_FP32 && a->dtype != KPT_MOE_BF16 && a->dtype != KPT_MOE_FP16)
    return KPT_MOE_BAD_DTYPE;
  if (a->experts < 1 || a->experts > KPT_MOE_ROUTE_MAX_EXPERTS) return KPT_MOE_UNSUPPORTED;
  const int64_t E = a->experts;
  if (a->tokens < 0 || a->top_k < 1 || a->top_k > E || a->groups < 1 || E % a->groups ||
      a->topk_groups < 1 || a->topk_groups > a->groups)
    return KPT_MOE_BAD_ARGUMENT;
  if (a->groups > 1 && a->top_k > int64_t(a->topk_groups) * (E / a->groups))
    return KPT_MOE_BAD_ARGUMENT;
  if (a->tokens == 0) return 0;
  if (a->logits == nullptr || a->weights == nullptr || a->ids == nullptr)
    return KPT_MOE_BAD_ARGUMENT;
  if ((a->tokens + kWarps - 1) / kWarps > 0x7fffffff) return KPT_MOE_UNSUPPORTED;

  RouteParams p;
  p.logits = a->logits;
  p.st = a->stride_token;
  p.se = a->stride_expert;
  p.bias = a->correction_bias;
  p.weights = a->weights;
  p.ids = a->ids;
  p.tokens = a->tokens;
  p.experts = int(E);
  p.top_k = a->top_k;
  p.groups = a->groups;
  p.topk_groups = a->topk_groups;
  p.sigmoid = a->sigmoid ? 1 : 0;
  p.renormalize = a->renormalize ? 1 : 0;
  p.scaling = a->scaling;
  const auto s = static_cast<kpt::stream_t>(stream);
  if (a->dtype == KPT_MOE_FP32) return launch<float>(p, s);
  if (a->dtype == KPT_MOE_BF16) return launch<bf16>(p, s);
  return launch<fp16>(p, s);
}
