// paged_attention: attention of new queries over a paged KV cache (decode, chunked prefill).
//
// One source for nvcc and hipcc, behind the C ABI of kpt/paged_attention.h.
//
// Work split. A CTA (128 threads) owns R "rows" of one sequence and one kv head: rows are
// (query token, query head) pairs of that kv head's group, flattened token-major, so decode
// puts the whole GQA group (up to 8 heads) in one CTA and each key is read once for all of
// them; chunked prefill packs several tokens' rows the same way. blockIdx.x also carries the
// KV split: `splits` CTAs share a sequence's visible keys in equal contiguous ranges (each
// sequence's own length decides the range, read on the device, so nothing is planned from
// host-side lengths). With splits > 1 every CTA writes a normalised partial (o, log2-lse) to
// an fp32 workspace and combine_kernel merges them; empty ranges write lse = -inf.
//
// Inside a CTA each warp streams its own chunks of CHUNK consecutive keys (chunk w, w + W,
// ...). A key is read by TPK = D/8 lanes, 8 features each (one 16-byte vector, 8 bytes for
// fp8), so a warp covers KPW = warp/TPK keys per step and STEPS steps per chunk. On CUDA
// sm_80+ each lane copies the vectors it will itself use into a private shared-memory ring
// with cp.async, kStages - 1 chunks ahead (no registers held by loads in flight, no block
// barrier in the loop); elsewhere (HIP) the next chunk is loaded into registers while the
// current one is computed.
//
// Scores. A lane holds its 8 features of q for all R rows, forms R partial dot products per
// key (each then multiplied by scale * log2(e), or scale / softcap, and the fp8 k_scale: after
// the product, so that only the logit itself can overflow, as in the references), and the TPK
// lanes of a key reduce them with a reduce-scatter (each round sends half the rows' values
// to the partner lane): R - 1 + log2(TPK / R) shuffles per key instead of R * log2(TPK), and
// each lane ends up with the full score of one row. Softmax is online per chunk in the exp2
// domain with fp32 accumulators; the probabilities go back to the feature lanes by R
// shuffles per key for the P.V update. At the end the warps' states merge through shared
// memory. A query that sees no key gets 0 and lse = -inf; P stays fp32 (not rounded).
//
// Tables are never trusted: lengths are clamped to [0, max_pages * page_size], page ids to
// [0, num_pages), and nothing at or past a sequence's end is read (zero-filled copies), so
// poisoned slots and bad ids never reach the arithmetic or fault.
//
// Templates: q dtype (fp16, bf16) x cache (q's dtype, e4m3, e5m2) x head dim (64, 128, 256;
// any other multiple of 8 runs in the next one up with the extra lanes idle) x R (1, 2, 4,
// 8). Chunked prefill runs the same kernel: a CTA reads its visible keys once for its 8
// (token, head) rows, so a long query chunk re-reads them once per 8 rows (mostly from L2),
// on CUDA cores: correct for every shape, not tensor-core speed.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a without spills or scratch (ptxas -v, the
// AMDGPU resource remarks); tested and timed on an H100 (bench/RESULTS.md, 2026-12-06); the
// HIP build is compile-checked only.

#include "kpt/compat.h"
#include "kpt/softmax.h"
#include "kpt/paged_attention.h"

namespace {

using kpt::bf16;
using kpt::fp16;
using kpt::kWarpSize;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kStages = 3;  // cp.async ring: two chunks in flight while one is computed
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if defined(KPT_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define KPT_PA_ASYNC 1
#else
#define KPT_PA_ASYNC 0
#endif

KPT_DEVICE float neg_inf() { return __uint_as_float(0xff800000u); }

KPT_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
KPT_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

KPT_DEVICE float shfl_idx(float v, int src) {
#ifdef KPT_HIP
  return __shfl(v, src);
#else
  return __shfl_sync(0xffffffffu, v, src);
#endif
}

// ---- cache vectors ------------------------------------------------------------------------------

// fp8 -> the bit patterns of fp16 values, four at a time (w holds elements 0..3, low byte
// first; lo gets 0 and 1, hi 2 and 3): one byte permute per pair puts each byte on top of a
// zero byte. e5m2 is then exactly the fp16. For e4m3 exponent and mantissa move one bit down,
// which is an fp16 of value / 2^8, exactly, subnormals included; Fp8::factor() restores the
// 2^8 through the q and output multipliers.
KPT_DEVICE void fp8x4_as_half(uint32_t w, bool e4m3, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404u);
  hi = __byte_perm(w, 0u, 0x3424u);
  if (e4m3) {
    lo = (lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u);
    hi = (hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u);
  }
}

// How 8 consecutive features of one cache row are fetched and widened to floats.
template <class T, int kKind>
struct Cache {
  using Elem = uint16_t;
  using Vec = uint4;
  static constexpr int kSteps = 4;  // 4 x 2 x 16 bytes a lane per chunk
  KPT_DEVICE static float factor() { return 1.f; }
  KPT_DEVICE static Vec zero() { return make_uint4(0u, 0u, 0u, 0u); }
  KPT_DEVICE static void widen(const Vec& u, float (&f)[8]) { kpt::unpack8<T>(u, f); }
};

template <int kKind>
struct Fp8 {
  using Elem = uint8_t;
  using Vec = uint2;
  static constexpr int kSteps = 8;  // as many bytes a chunk as the 16-bit caches
  KPT_DEVICE static float factor() { return kKind == KPT_PA_KV_E4M3 ? 256.f : 1.f; }
  KPT_DEVICE static Vec zero() { return make_uint2(0u, 0u); }
  KPT_DEVICE static void widen(const Vec& u, float (&f)[8]) {
    uint32_t h[4];
    fp8x4_as_half(u.x, kKind == KPT_PA_KV_E4M3, h[0], h[1]);
    fp8x4_as_half(u.y, kKind == KPT_PA_KV_E4M3, h[2], h[3]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = kpt::Half<fp16>::unpack(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};

template <class T>
struct Cache<T, KPT_PA_KV_E4M3> : Fp8<KPT_PA_KV_E4M3> {};
template <class T>
struct Cache<T, KPT_PA_KV_E5M2> : Fp8<KPT_PA_KV_E5M2> {};

#if KPT_PA_ASYNC
// kBytes global -> shared; ok = false writes zeros and reads nothing.
template <int kBytes>
KPT_DEVICE void cp_async(void* dst, const void* src, bool ok) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
  } else {
    static_assert(kBytes == 8, "cp.async copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src),
                 "r"(ok ? 8 : 0)
                 : "memory");
  }
}

KPT_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
KPT_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

// ---- parameters and sequence geometry -----------------------------------------------------------

struct Params {
  const uint16_t* q;
  uint16_t* out;
  float* lse;
  const void* k;
  const void* v;
  const int32_t* table;
  const int32_t* lens;
  const int32_t* cu_q;
  const float* k_scale;
  const float* v_scale;
  float* part_o;
  float* part_lse;
  int64_t q_st, q_sh, o_st, o_sh, l_st, l_sh;
  int64_t k_sp, k_ss, k_sh, v_sp, v_ss, v_sh, table_stride;
  int64_t window_left, window_right;
  int scale_per_head;
  int num_pages, max_pages, page_size, page_shift;  // page_shift -1: not a power of two
  int tokens, heads_q, group, head_dim, splits, min_split_keys;
  float qmul;     // score multiplier: scale * log2(e), or scale / softcap
  float cap_out;  // softcap * log2(e), 0 without a soft cap
};

struct Seq {
  int64_t n;   // keys, clamped to the table's capacity
  int64_t q0;  // first query token
  int64_t m;   // query tokens
};

KPT_DEVICE Seq sequence(const Params& p, int b) {
  Seq s;
  const int64_t capacity = int64_t(p.max_pages) * p.page_size;
  s.n = min64(max64(int64_t(p.lens[b]), 0), capacity);
  if (p.cu_q != nullptr) {
    s.q0 = min64(max64(int64_t(p.cu_q[b]), 0), p.tokens);
    s.m = min64(max64(int64_t(p.cu_q[b + 1]), s.q0), p.tokens) - s.q0;
  } else {
    s.q0 = b;
    s.m = 1;
  }
  return s;
}

// Where row `flat` of a sequence writes: (token, query head).
struct Row {
  int64_t token;
  int head;
};

KPT_DEVICE Row row_of(const Params& p, const Seq& s, int64_t flat, int kvh) {
  return {s.q0 + flat / p.group, kvh * p.group + int(flat % p.group)};
}

// ---- the score reduction ------------------------------------------------------------------------

// Rounds of the reduce-scatter over the TPK lanes of a key: v[0 .. 2*kHalf) are partial sums
// of as many rows; the partner (lane ^ kMask) takes the other half. Afterwards v[0] holds
// row (c / (TPK / R)) summed over the lanes that differ in the bits used so far.
template <int kHalf, int kMask, int R>
KPT_DEVICE void scatter_rounds(float (&v)[R], int lane) {
  if constexpr (kHalf >= 1) {
    const bool upper = (lane & kMask) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float send = upper ? v[i] : v[i + kHalf];
      const float keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + kpt::shfl_xor(send, kMask);
    }
    scatter_rounds<kHalf / 2, kMask / 2, R>(v, lane);
  }
}

// The full score of row c / (TPK / R) of this lane's key, from R partial sums per lane.
template <int R, int TPK>
KPT_DEVICE float reduce_scatter(float (&v)[R], int lane) {
  scatter_rounds<R / 2, TPK / 2, R>(v, lane);
  float x = v[0];
#pragma unroll
  for (int mask = TPK / (2 * R); mask >= 1; mask /= 2) x += kpt::shfl_xor(x, mask);
  return x;
}

// ---- one chunk ----------------------------------------------------------------------------------

template <int R>
struct State {
  float m;  // running max (log2 domain) of this lane's row, the same in all its lanes
  float l;  // running sum of this lane's key row only (summed over the warp at the end)
  float acc[R][8];
};

struct Mask {
  int64_t lo, hi;          // keys this lane's row sees, within the split (hi exclusive)
  int64_t all_lo, all_hi;  // keys every row of the CTA sees, within the split
};

// Fold one chunk of CHUNK keys starting at `first` into the warp's state; kv / vv are this
// lane's vectors of its key row at each step.
template <class C, int D, int R>
KPT_DEVICE void attend(State<R>& st, const float (&qf)[R][8],
                       const typename C::Vec (&kv)[C::kSteps],
                       const typename C::Vec (&vv)[C::kSteps], const Mask& mask, int64_t first,
                       float smul, float cap_out, int lane) {
  constexpr int TPK = D / 8;
  constexpr int KPW = kWarpSize / TPK;
  constexpr int STEPS = C::kSteps;
  constexpr int SPREAD = TPK / R;
  const int c = lane % TPK, r = lane / TPK;

  float s[STEPS];
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    float kf[8];
    C::widen(kv[i], kf);
    float part[R];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) a = fmaf(qf[q][e], kf[e], a);
      part[q] = a;
    }
    // Scaled after the dot product, as the references do: a scale folded into q overflows
    // per feature (inf - inf = NaN) where the reference's logit is +-inf.
    s[i] = reduce_scatter<R, TPK>(part, lane) * smul;
  }
  if (cap_out > 0.f) {
#pragma unroll
    for (int i = 0; i < STEPS; ++i) s[i] = cap_out * tanhf(s[i]);
  }
  // Masks only where the chunk crosses a boundary of some row's keys or of the split.
  const bool edge = !(first >= mask.all_lo && first + STEPS * KPW <= mask.all_hi);
  bool hidden[STEPS];
#pragma unroll
  for (int i = 0; i < STEPS; ++i) hidden[i] = false;
  if (edge) {
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t j = first + i * KPW + r;
      hidden[i] = j < mask.lo || j >= mask.hi;
      if (hidden[i]) s[i] = neg_inf();
    }
  }
  float mx = s[0];
#pragma unroll
  for (int i = 1; i < STEPS; ++i) mx = fmaxf(mx, s[i]);
#pragma unroll
  for (int o = TPK; o < kWarpSize; o <<= 1) mx = fmaxf(mx, kpt::shfl_xor(mx, o));
  const float m_new = fmaxf(st.m, mx);
  const float m_use = kpt::softmax_shift(m_new);  // no key yet: keep exp2 away from NaN
  const float alpha = exp2f(st.m - m_use);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    s[i] = exp2f(s[i] - m_use);
    sum += s[i];
    // A hidden key's probability is -0 (exp2 never gives it): the P.V update below skips it,
    // so a NaN or inf value of a key this row cannot see never meets 0 * v.
    if (hidden[i]) s[i] = -0.f;
  }
  st.l = st.l * alpha + sum;
  st.m = m_new;
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float a = shfl_idx(alpha, q * SPREAD);
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[q][e] *= a;
  }
  const int group_lane = lane - c;
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    float vf[8];
    C::widen(vv[i], vf);
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const float pr = shfl_idx(s[i], group_lane + q * SPREAD);
      if (edge) {  // warp-uniform: only chunks that cross a boundary pay for the select
        const bool skip = signbit(pr);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          st.acc[q][e] = skip ? st.acc[q][e] : fmaf(pr, vf[e], st.acc[q][e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[q][e] = fmaf(pr, vf[e], st.acc[q][e]);
      }
    }
  }
}

// ---- the attention kernel -----------------------------------------------------------------------

template <class T, int kKind, int D, int R>
__global__ KPT_LAUNCH_BOUNDS(kThreads, R <= 4 ? 4 : 2) void paged_kernel(const Params p) {
  using C = Cache<T, kKind>;
  using Vec = typename C::Vec;
  using Elem = typename C::Elem;
  constexpr int TPK = D / 8;
  constexpr int KPW = kWarpSize / TPK;
  constexpr int STEPS = C::kSteps;
  constexpr int CHUNK = STEPS * KPW;
  constexpr int SPREAD = TPK / R;
  static_assert(R <= TPK && kWarpSize % TPK == 0, "tile shape");
#if KPT_PA_ASYNC
  constexpr int kRingBytes = kStages * STEPS * 2 * kThreads * int(sizeof(Vec));
#else
  constexpr int kRingBytes = 0;
#endif
  constexpr int kMergeBytes = kWarps * R * (D + 2) * int(sizeof(float));
  __shared__ __align__(16) unsigned char smem[kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes];

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int c = lane % TPK, r = lane / TPK;
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int split = blockIdx.x % p.splits;
  const int64_t row0 = int64_t(blockIdx.x / p.splits) * R;
  const Seq seq = sequence(p, b);
  const int64_t rows = seq.m * p.group;
  if (row0 >= rows) return;

  // Keys the tile can see: the union of its rows' windows (query i sits at n - m + i).
  const int64_t first_pos = seq.n - seq.m + row0 / p.group;
  const int64_t last_pos = seq.n - seq.m + (min64(row0 + R, rows) - 1) / p.group;
  const bool has_left = p.window_left >= 0, has_right = p.window_right >= 0;
  const int64_t lo = has_left ? max64(first_pos - p.window_left, 0) : 0;
  const int64_t hi = has_right ? min64(last_pos + p.window_right + 1, seq.n) : seq.n;
  // This split's share of them, in whole chunks.
  int64_t per = max64((max64(hi - lo, 0) + p.splits - 1) / p.splits, p.min_split_keys);
  per = (per + CHUNK - 1) / CHUNK * CHUNK;
  const int64_t s_lo = lo + split * per;
  const int64_t s_hi = min64(hi, s_lo + per);
  const int chunks = s_hi > s_lo ? int((s_hi - s_lo + CHUNK - 1) / CHUNK) : 0;
  const int mine = chunks > warp ? (chunks - warp + kWarps - 1) / kWarps : 0;

  Mask mask;
  {
    const int64_t pos = seq.n - seq.m + (row0 + c / SPREAD) / p.group;
    mask.lo = has_left ? pos - p.window_left : 0;
    mask.hi = has_right ? min64(pos + p.window_right + 1, s_hi) : s_hi;
    mask.all_lo = has_left ? last_pos - p.window_left : 0;
    mask.all_hi = has_right ? min64(first_pos + p.window_right + 1, s_hi) : s_hi;
  }

  // q rows, widened; lanes past head_dim (padding) hold zeros. The score multiplier applies
  // to each dot product (attend).
  const bool vec_ok = c * 8 < p.head_dim;
  float kmul = 1.f, vmul = 1.f;
  if (p.k_scale != nullptr) {
    const int i = p.scale_per_head ? kvh : 0;
    kmul = p.k_scale[i] * C::factor();
    vmul = p.v_scale[i] * C::factor();
  }
  const float smul = p.qmul * kmul;
  float qf[R][8];
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[q][e] = 0.f;
    if (vec_ok && row0 + q < rows) {
      const Row row = row_of(p, seq, row0 + q, kvh);
      kpt::unpack8<T>(kpt::load16(p.q + row.token * p.q_st + row.head * p.q_sh + c * 8), qf[q]);
    }
  }

  State<R> st;
  st.m = neg_inf();
  st.l = 0.f;
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[q][e] = 0.f;
  }

  const Elem* k_all = static_cast<const Elem*>(p.k);
  const Elem* v_all = static_cast<const Elem*>(p.v);
  const Elem* k_head = k_all + kvh * p.k_sh + c * 8;
  const Elem* v_head = v_all + kvh * p.v_sh + c * 8;
  const int32_t* pages = p.table + b * p.table_stride;
  // This lane's vector of key j (< s_hi, so its table entry is within the row).
  auto locate = [&](int64_t j, const Elem*& kp, const Elem*& vp) {
    const int key = int(j);
    const int idx = p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size;
    const int slot = key - idx * p.page_size;
    const int64_t page = min(max(pages[idx], 0), p.num_pages - 1);
    kp = k_head + page * p.k_sp + slot * p.k_ss;
    vp = v_head + page * p.v_sp + slot * p.v_ss;
  };
  auto chunk_first = [&](int t) { return s_lo + int64_t(warp + t * kWarps) * CHUNK; };

#if KPT_PA_ASYNC
  Vec* ring = reinterpret_cast<Vec*>(smem);  // [stage][step][k, v][thread]: conflict-free
  auto fetch = [&](int t) {
    Vec* dst = ring + (t % kStages) * STEPS * 2 * kThreads + threadIdx.x;
    const int64_t first = chunk_first(t);
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t j = first + i * KPW + r;
      const bool ok = vec_ok && j < s_hi;
      const Elem* kp = k_all;
      const Elem* vp = v_all;
      if (ok) locate(j, kp, vp);
      cp_async<int(sizeof(Vec))>(dst + (2 * i) * kThreads, kp, ok);
      cp_async<int(sizeof(Vec))>(dst + (2 * i + 1) * kThreads, vp, ok);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < mine) fetch(t);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int t = 0; t < mine; ++t) {
    // The stage refilled now was read by this lane in the previous iteration: order those
    // shared-memory reads before the new copies.
    __syncwarp();
    if (t + kStages - 1 < mine) fetch(t + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    const Vec* src = ring + (t % kStages) * STEPS * 2 * kThreads + threadIdx.x;
    Vec kv[STEPS], vv[STEPS];
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      kv[i] = src[(2 * i) * kThreads];
      vv[i] = src[(2 * i + 1) * kThreads];
    }
    attend<C, D, R>(st, qf, kv, vv, mask, chunk_first(t), smul, p.cap_out, lane);
  }
  cp_async_wait<0>();
#else
  Vec nk[STEPS], nv[STEPS];
  auto load = [&](int t) {
    const int64_t first = chunk_first(t);
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t j = first + i * KPW + r;
      nk[i] = C::zero();
      nv[i] = C::zero();
      if (vec_ok && j < s_hi) {
        const Elem* kp;
        const Elem* vp;
        locate(j, kp, vp);
        nk[i] = *reinterpret_cast<const Vec*>(kp);
        nv[i] = *reinterpret_cast<const Vec*>(vp);
      }
    }
  };
  if (mine > 0) load(0);
  for (int t = 0; t < mine; ++t) {
    Vec kv[STEPS], vv[STEPS];
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      kv[i] = nk[i];
      vv[i] = nv[i];
    }
    if (t + 1 < mine) load(t + 1);  // in flight while this chunk is computed
    attend<C, D, R>(st, qf, kv, vv, mask, chunk_first(t), smul, p.cap_out, lane);
  }
#endif

  // The warp's key rows (lanes of equal c) hold disjoint keys: sum them.
#pragma unroll
  for (int o = TPK; o < kWarpSize; o <<= 1) {
    st.l += kpt::shfl_xor(st.l, o);
#pragma unroll
    for (int q = 0; q < R; ++q) {
#pragma unroll
      for (int e = 0; e < 8; ++e) st.acc[q][e] += kpt::shfl_xor(st.acc[q][e], o);
    }
  }

  // Merge the warps through shared memory (the ring's space once every copy has landed).
  __syncthreads();
  float* acc_s = reinterpret_cast<float*>(smem);  // [warp][row][D]
  float* m_s = acc_s + kWarps * R * D;            // [warp][row]
  float* l_s = m_s + kWarps * R;
  if (r == 0) {
#pragma unroll
    for (int q = 0; q < R; ++q) {
      float4* dst = reinterpret_cast<float4*>(acc_s + (warp * R + q) * D + c * 8);
      dst[0] = make_float4(st.acc[q][0], st.acc[q][1], st.acc[q][2], st.acc[q][3]);
      dst[1] = make_float4(st.acc[q][4], st.acc[q][5], st.acc[q][6], st.acc[q][7]);
    }
    if (c % SPREAD == 0) {
      m_s[warp * R + c / SPREAD] = st.m;
      l_s[warp * R + c / SPREAD] = st.l;
    }
  }
  __syncthreads();

  for (int task = threadIdx.x; task < R * TPK; task += kThreads) {
    const int q = task / TPK, cv = task % TPK;
    if (row0 + q >= rows || cv * 8 >= p.head_dim) continue;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w * R + q]);
    // The warps' (max, sum, o) merged and ended by the rule of kpt/softmax.h: a NaN sum (NaN
    // logits) or a +inf max (an overflowed logit) reaches out and lse.
    kpt::MergeLse merge(mx);
    float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wgt = merge.add_sum(m_s[w * R + q], l_s[w * R + q]);
      const float* a = acc_s + (w * R + q) * D + cv * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(wgt, a[e], o[e]);
    }
    const kpt::RowEnd end = merge.end();
    const float inv = end.inv * vmul;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const float lse2 = end.lse2;
    const Row row = row_of(p, seq, row0 + q, kvh);
    if (p.splits == 1) {
      kpt::store16(p.out + row.token * p.o_st + row.head * p.o_sh + cv * 8, kpt::pack8<T>(o));
      if (cv == 0) p.lse[row.token * p.l_st + row.head * p.l_sh] = lse2 * kLn2;
    } else {
      const int64_t at = (int64_t(split) * p.tokens + row.token) * p.heads_q + row.head;
      float4* dst = reinterpret_cast<float4*>(p.part_o + at * p.head_dim + cv * 8);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (cv == 0) p.part_lse[at] = lse2;
    }
  }
}

// ---- split-KV combine ---------------------------------------------------------------------------

// Same grid as the attention kernel without the split factor: each CTA merges the partials of
// the rows the matching attention CTAs wrote (out = sum_s 2^(lse_s - M) o_s / sum_s 2^(...)).
template <class T>
__global__ KPT_LAUNCH_BOUNDS(kThreads, 4) void combine_kernel(const Params p, int rows_per_cta) {
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_cta;
  const Seq seq = sequence(p, b);
  const int64_t rows = seq.m * p.group;
  if (row0 >= rows) return;
  const int vecs = p.head_dim / 8;
  const int64_t split_stride = int64_t(p.tokens) * p.heads_q;
  for (int task = threadIdx.x; task < rows_per_cta * vecs; task += kThreads) {
    const int q = task / vecs, cv = task % vecs;
    if (row0 + q >= rows) continue;
    const Row row = row_of(p, seq, row0 + q, kvh);
    const int64_t at = row.token * p.heads_q + row.head;
    float mx = neg_inf();
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.part_lse[s * split_stride + at]);
    // Normalised parts merged by the rule of kpt/softmax.h, as the unsplit kernel ends a row.
    kpt::MergeLse merge(mx);
    float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < p.splits; ++s) {
      const float wgt = merge.add(p.part_lse[s * split_stride + at]);
      const float* part = p.part_o + (s * split_stride + at) * p.head_dim + cv * 8;
      const float4* src = reinterpret_cast<const float4*>(part);
      const float4 a = src[0], z = src[1];
      o[0] = fmaf(wgt, a.x, o[0]);
      o[1] = fmaf(wgt, a.y, o[1]);
      o[2] = fmaf(wgt, a.z, o[2]);
      o[3] = fmaf(wgt, a.w, o[3]);
      o[4] = fmaf(wgt, z.x, o[4]);
      o[5] = fmaf(wgt, z.y, o[5]);
      o[6] = fmaf(wgt, z.z, o[6]);
      o[7] = fmaf(wgt, z.w, o[7]);
    }
    const kpt::RowEnd end = merge.end();
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= end.inv;
    kpt::store16(p.out + row.token * p.o_st + row.head * p.o_sh + cv * 8, kpt::pack8<T>(o));
    if (cv == 0) p.lse[row.token * p.l_st + row.head * p.l_sh] = end.lse2 * kLn2;
  }
}

// ---- launchers ----------------------------------------------------------------------------------

int launch_status() { return static_cast<int>(kpt::last_error()); }

bool aligned(const void* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & uintptr_t(bytes - 1)) == 0;
}

template <class T, int kKind, int D>
int launch_rows(const Params& p, int rows, dim3 grid, kpt::stream_t s) {
  switch (rows) {
    case 1:
      paged_kernel<T, kKind, D, 1><<<grid, kThreads, 0, s>>>(p);
      break;
    case 2:
      paged_kernel<T, kKind, D, 2><<<grid, kThreads, 0, s>>>(p);
      break;
    case 4:
      paged_kernel<T, kKind, D, 4><<<grid, kThreads, 0, s>>>(p);
      break;
    case 8:
      paged_kernel<T, kKind, D, 8><<<grid, kThreads, 0, s>>>(p);
      break;
    default:
      return KPT_PA_UNSUPPORTED;
  }
  return launch_status();
}

// Head dims are templated on 64, 128 and 256; a smaller one runs in the next template up with
// the extra lanes idle (zero q, nothing loaded, nothing written).
template <class T, int kKind>
int launch_dim(const Params& p, int rows, dim3 grid, kpt::stream_t s) {
  if (p.head_dim <= 64) return launch_rows<T, kKind, 64>(p, rows, grid, s);
  if (p.head_dim <= 128) return launch_rows<T, kKind, 128>(p, rows, grid, s);
  return launch_rows<T, kKind, 256>(p, rows, grid, s);
}

template <class T>
int launch(const Params& p, int kv_dtype, int rows, dim3 grid, dim3 combine_grid,
           kpt::stream_t s) {
  int code;
  switch (kv_dtype) {
    case KPT_PA_KV_SAME:
      code = launch_dim<T, KPT_PA_KV_SAME>(p, rows, grid, s);
      break;
    case KPT_PA_KV_E4M3:
      code = launch_dim<T, KPT_PA_KV_E4M3>(p, rows, grid, s);
      break;
    case KPT_PA_KV_E5M2:
      code = launch_dim<T, KPT_PA_KV_E5M2>(p, rows, grid, s);
      break;
    default:
      return KPT_PA_BAD_DTYPE;
  }
  if (code != 0 || p.splits == 1) return code;
  combine_kernel<T><<<combine_grid, kThreads, 0, s>>>(p, rows);
  return launch_status();
}

}  // namespace

extern "C" {

int kpt_pa_forward(const kpt_pa_args* a, void* stream) {
  if (a == nullptr) return KPT_PA_BAD_ARGUMENT;
  if (a->dtype != KPT_PA_FP16 && a->dtype != KPT_PA_BF16) return KPT_PA_BAD_DTYPE;
  const int64_t d = a->head_dim;
  if (d <= 0 || d % 8 || d > KPT_PA_MAX_HEAD_DIM) return KPT_PA_UNSUPPORTED;
  const int64_t rows = a->rows_per_cta;
  if (rows != 1 && rows != 2 && rows != 4 && rows != 8) return KPT_PA_UNSUPPORTED;
  if (a->splits < 1 || a->splits > KPT_PA_MAX_SPLITS) return KPT_PA_UNSUPPORTED;
  if (a->batch < 0 || a->tokens < 0 || a->heads_kv <= 0 || a->heads_q <= 0 ||
      a->heads_q % a->heads_kv || a->num_pages <= 0 || a->max_pages <= 0 ||
      a->page_size <= 0 || a->max_seqlen_q < 0 || a->min_split_keys < 0 ||
      a->min_split_keys > 0x7fffffff || a->window_left < -1 || a->window_right < -1)
    return KPT_PA_BAD_ARGUMENT;
  if (a->batch == 0 || a->tokens == 0 || a->max_seqlen_q == 0) return 0;
  if (a->batch > 65535 || a->heads_kv > 65535 || a->tokens > 0x7fffffff ||
      a->num_pages > 0x7fffffff || a->max_pages > 0x7fffffff ||
      a->max_pages * a->page_size > (int64_t(1) << 40))
    return KPT_PA_UNSUPPORTED;
  const int64_t group = a->heads_q / a->heads_kv;
  const int64_t tiles = (a->max_seqlen_q * group + rows - 1) / rows;
  if (tiles * a->splits > 0x7fffffff) return KPT_PA_UNSUPPORTED;

  // 16-byte vectors of q/out rows and of the caches (8 bytes for fp8).
  const int vec = a->kv_dtype == KPT_PA_KV_SAME ? 16 : 8;
  if (a->q == nullptr || a->out == nullptr || a->lse == nullptr || a->k_cache == nullptr ||
      a->v_cache == nullptr || a->block_table == nullptr || a->seq_lens == nullptr ||
      !aligned(a->q, 16) || !aligned(a->out, 16) || !aligned(a->k_cache, vec) ||
      !aligned(a->v_cache, vec))
    return KPT_PA_BAD_ARGUMENT;
  for (int64_t st : {a->q_stride_token, a->q_stride_head, a->out_stride_token,
                     a->out_stride_head, a->k_stride_page, a->k_stride_slot, a->k_stride_head,
                     a->v_stride_page, a->v_stride_slot, a->v_stride_head})
    if (st % 8) return KPT_PA_BAD_ARGUMENT;
  const bool fp8 = a->kv_dtype != KPT_PA_KV_SAME;
  if (fp8 != (a->k_scale != nullptr) || fp8 != (a->v_scale != nullptr))
    return KPT_PA_BAD_ARGUMENT;
  if (a->splits > 1 && (a->partial_out == nullptr || a->partial_lse == nullptr ||
                        !aligned(a->partial_out, 16)))
    return KPT_PA_BAD_ARGUMENT;

  Params p;
  p.q = static_cast<const uint16_t*>(a->q);
  p.out = static_cast<uint16_t*>(a->out);
  p.lse = a->lse;
  p.k = a->k_cache;
  p.v = a->v_cache;
  p.table = a->block_table;
  p.lens = a->seq_lens;
  p.cu_q = a->cu_seqlens_q;
  p.k_scale = a->k_scale;
  p.v_scale = a->v_scale;
  p.part_o = a->partial_out;
  p.part_lse = a->partial_lse;
  p.q_st = a->q_stride_token;
  p.q_sh = a->q_stride_head;
  p.o_st = a->out_stride_token;
  p.o_sh = a->out_stride_head;
  p.l_st = a->lse_stride_token;
  p.l_sh = a->lse_stride_head;
  p.k_sp = a->k_stride_page;
  p.k_ss = a->k_stride_slot;
  p.k_sh = a->k_stride_head;
  p.v_sp = a->v_stride_page;
  p.v_ss = a->v_stride_slot;
  p.v_sh = a->v_stride_head;
  p.table_stride = a->table_stride;
  p.window_left = a->window_left;
  p.window_right = a->window_right;
  p.scale_per_head = a->scale_per_head ? 1 : 0;
  p.num_pages = int(a->num_pages);
  p.max_pages = int(a->max_pages);
  p.page_size = int(a->page_size);
  p.page_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((int64_t(1) << sh) == a->page_size) p.page_shift = sh;
  p.tokens = int(a->tokens);
  p.heads_q = int(a->heads_q);
  p.group = int(group);
  p.head_dim = int(d);
  p.splits = int(a->splits);
  p.min_split_keys = int(a->min_split_keys);
  const bool capped = a->softcap > 0.f;
  p.qmul = capped ? a->scale / a->softcap : a->scale * kLog2e;
  p.cap_out = capped ? a->softcap * kLog2e : 0.f;

  const dim3 grid(unsigned(tiles * a->splits), unsigned(a->heads_kv), unsigned(a->batch));
  const dim3 combine_grid(unsigned(tiles), unsigned(a->heads_kv), unsigned(a->batch));
  const auto s = static_cast<kpt::stream_t>(stream);
  if (a->dtype == KPT_PA_FP16) {
    return launch<fp16>(p, a->kv_dtype, int(rows), grid, combine_grid, s);
  }
  return launch<bf16>(p, a->kv_dtype, int(rows), grid, combine_grid, s);
}

const char* kpt_pa_error_string(int code) {
  switch (code) {
    case 0:
      return "no error";
    case KPT_PA_BAD_DTYPE:
      return "unsupported dtype (fp16/bf16 queries; same-type, e4m3 or e5m2 caches)";
    case KPT_PA_UNSUPPORTED:
      return "size or variant not supported by these kernels";
    case KPT_PA_BAD_ARGUMENT:
      return "invalid argument (null or misaligned pointer, bad size or stride)";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown kpt error";
  }
}

}  // extern "C"
