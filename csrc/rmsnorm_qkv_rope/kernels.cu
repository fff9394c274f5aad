// rmsnorm_qkv_rope: (residual add +) RMSNorm -> QKV projection -> q/k RMSNorm -> RoPE.
//
// Three kernels behind a C ABI (kpt/rmsnorm_qkv_rope.h); one source for nvcc and hipcc.
//
//  1. add_rmsnorm: one block per token row, 16-byte vectors held in registers between the
//     sum-of-squares pass and the scaling pass, so the row is read from memory once.
//  2. gemv (decode, tokens <= 32): the projection is a stream over the weight (50 MB for
//     Llama-3-8B), so it is organised around reading W exactly once with 16-byte loads,
//     several in flight per thread, and using every W vector for all tokens. One warp owns
//     16*RT output rows of one K-slice; blockIdx.y is the K-slice (split-K), which is what
//     gives enough warps to keep HBM busy: N/16 = 384 row tiles alone would leave most of
//     132 SMs idle. Partial sums go to an fp32 (splits, tokens, n) buffer that kernel 3 sums
//     in a fixed order: deterministic, no atomics, no extra launch.
//     On NVIDIA the products run on tensor cores (mma.sync m16n8k16, W as the 16-row A
//     operand, tokens as the 8-column B operand). At 16 tokens CUDA-core FMAs would need
//     as many fp32 operations per second as the SMs can issue just to keep pace with HBM;
//     mma removes that limit and the bf16->fp32 conversions with it. HIP gets a portable
//     FMA version behind the same launcher (also selectable on NVIDIA for comparison).
//  3. epilogue: per (token, head): sum partials + bias (or read the rounded cuBLAS result),
//     round, per-head RMSNorm for q/k, RoPE with cos/sin computed once per token and block,
//     write q, k, v. A group of threads (a power of two >= head_dim/8) holds one head, eight
//     features per thread.
//
// Rounding points are those of reference.py (HF eager): every tensor op of the reference that
// produces a 16-bit tensor is a round_to<T>() here, everything else is fp32.

#include "kpt/compat.h"
#include "kpt/rmsnorm_qkv_rope.h"

namespace {

using kpt::bf16;
using kpt::fp16;
using kpt::kWarpSize;
using kpt::round_to;

// ---- kernel 1: residual add + RMSNorm ----------------------------------------------------------

constexpr int kNormMaxThreads = 1024;

template <class T, int kVecsPerThread>
__global__ KPT_LAUNCH_BOUNDS(kNormMaxThreads, 1) void add_rmsnorm_kernel(
    const uint16_t* KPT_RESTRICT x, int64_t x_stride, const uint16_t* KPT_RESTRICT residual,
    int64_t res_stride, uint16_t* KPT_RESTRICT residual_out, const uint16_t* KPT_RESTRICT weight,
    uint16_t* KPT_RESTRICT xn, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int vecs = hidden / 8;
  uint4 h[kVecsPerThread];
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vecs) {
      h[i] = kpt::load16(x + row * x_stride + 8 * v);
      if (residual != nullptr) {
        float a[8], b[8];
        kpt::unpack8<T>(h[i], a);
        kpt::unpack8<T>(kpt::load16(residual + row * res_stride + 8 * v), b);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] += b[e];
        h[i] = kpt::pack8<T>(a);  // h = x + residual rounded: the new residual
        kpt::store16(residual_out + row * hidden + 8 * v, h[i]);
      }
      float f[8];
      kpt::unpack8<T>(h[i], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) sumsq += f[e] * f[e];
    }
  }
  const float rstd = rsqrtf(kpt::block_sum(sumsq, scratch) / float(hidden) + eps);
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vecs) {
      float f[8], w[8];
      kpt::unpack8<T>(h[i], f);
      kpt::unpack8<T>(kpt::load16(weight + 8 * v), w);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = round_to<T>(f[e] * rstd) * w[e];
      kpt::store16(xn + row * hidden + 8 * v, kpt::pack8<T>(f));
    }
  }
}

// ---- kernel 2: split-K GEMV over few tokens ----------------------------------------------------

constexpr int kGemvWarps = 4;

struct GemvParams {
  const uint16_t* xn;  // (tokens, k)
  const uint16_t* w;   // (n, k)
  float* partials;     // (splits, tokens, n)
  int tokens, n, k, splits;
};

#ifdef KPT_CUDA
template <class T>
struct Mma;

// D = A (16x16, row) * B (16x8, col) + D with fp32 accumulators.
template <>
struct Mma<bf16> {
  KPT_DEVICE static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<fp16> {
  KPT_DEVICE static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// U chunks of 32 columns starting at chunk c: all loads first (in flight together), then the
// mmas. Chunks at or past c_end and vectors past k read as zeros (predicated loads, no branch).
template <class T, int RT, int NT, int U>
KPT_DEVICE void gemv_mma_step(float (&acc)[RT][NT][4], const uint16_t* (&wrow)[RT][2],
                              const uint16_t* (&xrow)[NT], int c, int c_end, int k, int j) {
  uint4 wv[U][RT][2], xv[U][NT];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int kk = (c + u) * 32;
    const bool ok = c + u < c_end && kk + 8 * j < k;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        wv[u][rt][hh] = ok ? kpt::load16_stream(wrow[rt][hh] + kk) : zero;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xv[u][nt] = ok ? kpt::load16(xrow[nt] + kk) : zero;
  }
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4& lo = wv[u][rt][0];
        const uint4& hi = wv[u][rt][1];
        Mma<T>::run(acc[rt][nt], lo.x, hi.x, lo.y, hi.y, xv[u][nt].x, xv[u][nt].y);
        Mma<T>::run(acc[rt][nt], lo.z, hi.z, lo.w, hi.w, xv[u][nt].z, xv[u][nt].w);
      }
}

// Tensor-core GEMV. A warp owns RT tiles of 16 rows of W and walks its K-slice 32 columns (one
// "chunk") at a time; lane (g = lane/4, j = lane%4) loads 16 bytes of W rows g and g+8 and of
// xn row (token) g, all at columns 8j..8j+7 of the chunk. A dot product does not care in which
// order k is summed, as long as A and B agree, so those plain 16-byte loads are used directly as
// mma fragments: elements 0-3 of each vector feed one m16n8k16 (logical k 2j,2j+1 and 2j+8,
// 2j+9 map to physical 8j+0..3), elements 4-7 a second one. No shared memory, no shuffles, and
// each W byte is loaded once. Rows >= n and tokens >= `tokens` read a clamped valid row whose
// results are never stored; only the K tail is zero-filled (on both operands).
// NT = ceil(tokens / 8) n-tiles; U chunks are loaded before the first mma (loads in flight).
template <class T, int RT, int NT, int U, int kMinBlocks>
__global__ KPT_LAUNCH_BOUNDS(kGemvWarps * 32, kMinBlocks) void gemv_mma_kernel(GemvParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;
  const int row0 = (blockIdx.x * kGemvWarps + warp) * 16 * RT;
  if (row0 >= p.n) return;  // warp-uniform; the kernel has no block-level barrier
  const int split = blockIdx.y;
  const int chunks = (p.k + 31) / 32;
  const int c_begin = int(int64_t(split) * chunks / p.splits);
  const int c_end = int(int64_t(split + 1) * chunks / p.splits);

  const uint16_t* wrow[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      wrow[rt][hh] = p.w + int64_t(min(row0 + 16 * rt + 8 * hh + g, p.n - 1)) * p.k + 8 * j;
  const uint16_t* xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    xrow[nt] = p.xn + int64_t(min(8 * nt + g, p.tokens - 1)) * p.k + 8 * j;

  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][nt][i] = 0.f;

  for (int c = c_begin; c < c_end; c += U)
    gemv_mma_step<T, RT, NT, U>(acc, wrow, xrow, c, c_end, p.k, j);

  // Accumulator i of n-tile nt holds row g (+8 for i >= 2), token 8nt + 2j + (i & 1).
  float* out = p.partials + int64_t(split) * p.tokens * p.n;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row0 + 16 * rt + g + 8 * (i >> 1);
        const int t = 8 * nt + 2 * j + (i & 1);
        if (row < p.n && t < p.tokens) out[int64_t(t) * p.n + row] = acc[rt][nt][i];
      }
}
#endif  // KPT_CUDA

// Portable GEMV: a warp owns R rows of one K-slice, lanes stride along k with 16-byte vectors
// and keep R x TM fp32 sums (TM >= tokens, a power of two, <= 16), reduced across the warp
// once at the end. Activations come through L1 (every warp of the SM reads the same xn rows).
template <class T, int R, int TM, int U>
__global__ KPT_LAUNCH_BOUNDS(kGemvWarps * kWarpSize, TM >= 16 ? 2 : 4) void gemv_simt_kernel(
    GemvParams p) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int row0 = (blockIdx.x * kGemvWarps + warp) * R;
  if (row0 >= p.n) return;  // warp-uniform
  const int split = blockIdx.y;
  const int vecs = p.k / 8;
  const int v_begin = int(int64_t(split) * vecs / p.splits);
  const int v_end = int(int64_t(split + 1) * vecs / p.splits);

  const uint16_t* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = p.w + int64_t(min(row0 + r, p.n - 1)) * p.k;
  const uint16_t* xrow[TM];
#pragma unroll
  for (int t = 0; t < TM; ++t) xrow[t] = p.xn + int64_t(min(t, p.tokens - 1)) * p.k;

  float acc[R][TM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TM; ++t) acc[r][t] = 0.f;

  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int v0 = v_begin + lane; v0 < v_end; v0 += U * kWarpSize) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + u * kWarpSize;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = v < v_end ? kpt::load16_stream(wrow[r] + 8 * v) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + u * kWarpSize;
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) kpt::unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
      for (int t = 0; t < TM; ++t) {
        float xf[8];
        kpt::unpack8<T>(v < v_end ? kpt::load16(xrow[t] + 8 * v) : zero, xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][t] += wf[r][e] * xf[e];
      }
    }
  }

  float* out = p.partials + int64_t(split) * p.tokens * p.n;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TM; ++t) {
      const float s = kpt::warp_sum(acc[r][t]);
      if (lane == 0 && row0 + r < p.n && t < p.tokens) out[int64_t(t) * p.n + row0 + r] = s;
    }
}

// ---- kernel 3: bias, q/k RMSNorm, RoPE, split into q, k, v -------------------------------------

constexpr int kEpiThreads = 256;
constexpr int kMaxHalfRotary = 128;  // rotary_dim <= head_dim <= 256

struct EpiParams {
  const void* qkv;  // fp32 (splits, tokens, n) partials, or T (tokens, n) when splits == 0
  const uint16_t* bias;
  const uint16_t* q_norm;
  const uint16_t* k_norm;
  const void* positions;
  const float* inv_freq;
  uint16_t* q;
  uint16_t* k;
  uint16_t* v;
  int64_t pos_stride;
  int pos_is_64, splits, tokens, hq, hkv, head_dim, rotary_dim, group, heads_per_block, neox;
  float eps;
};

// Eight projected values of token t at column `col`, rounded to T as the projection output is.
template <class T, bool kPartials>
KPT_DEVICE void load_projected(const EpiParams& p, int64_t t, int64_t col, int n, float (&f)[8]) {
  if (kPartials) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const float* src = static_cast<const float*>(p.qkv) + t * n + col;
    const int64_t split_stride = int64_t(p.tokens) * n;
#pragma unroll 4
    for (int s = 0; s < p.splits; ++s) {
      const float4 a = *reinterpret_cast<const float4*>(src + s * split_stride);
      const float4 b = *reinterpret_cast<const float4*>(src + s * split_stride + 4);
      acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
      acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
    }
    if (p.bias != nullptr) {
      float b[8];
      kpt::unpack8<T>(kpt::load16(p.bias + col), b);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += b[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = round_to<T>(acc[e]);
  } else {
    kpt::unpack8<T>(kpt::load16(static_cast<const uint16_t*>(p.qkv) + t * n + col), f);
  }
}

// out_a = a*c - b*s, out_b = b*c + a*s with every product and sum rounded to T, as HF's
// `x * cos + rotate_half(x) * sin` does in 16-bit tensor ops.
template <class T>
KPT_DEVICE float rope_first(float a, float b, float c, float s) {
  return round_to<T>(round_to<T>(a * c) + round_to<T>(-b * s));
}
template <class T>
KPT_DEVICE float rope_second(float a, float b, float c, float s) {
  return round_to<T>(round_to<T>(b * c) + round_to<T>(a * s));
}

template <class T, bool kPartials>
__global__ KPT_LAUNCH_BOUNDS(kEpiThreads, 1) void epilogue_kernel(EpiParams p) {
  __shared__ float cos_s[kMaxHalfRotary], sin_s[kMaxHalfRotary];
  __shared__ float exchange[kEpiThreads * 8];  // neox partners live in other threads' vectors
  const int64_t t = blockIdx.x;
  const int half = p.rotary_dim / 2;

  // cos/sin(float(pos) * inv_freq) in fp32 with the accurate (not fast-math) functions, then
  // rounded: computed once per block rather than once per head.
  const int64_t pidx = t * p.pos_stride;
  const float pos = p.pos_is_64 ? float(static_cast<const int64_t*>(p.positions)[pidx])
                                : float(static_cast<const int32_t*>(p.positions)[pidx]);
  for (int i = threadIdx.x; i < half; i += kEpiThreads) {
    float s, c;
    sincosf(pos * p.inv_freq[i], &s, &c);
    cos_s[i] = round_to<T>(c);
    sin_s[i] = round_to<T>(s);
  }
  __syncthreads();

  const int vecs = p.head_dim / 8;
  const int lane_g = threadIdx.x % p.group, grp = threadIdx.x / p.group;
  const int groups = kEpiThreads / p.group;
  const int heads = p.hq + 2 * p.hkv;
  const int n = heads * p.head_dim;
  const int h_begin = blockIdx.y * p.heads_per_block;
  const int h_end = min(heads, h_begin + p.heads_per_block);
  const int e0 = 8 * lane_g;
  float* mine = exchange + threadIdx.x * 8;
  const float* head = exchange + grp * p.group * 8;  // element e of this group's head

  // The trip count is the same for every thread: the barriers inside are reached by all.
  for (int hb = h_begin; hb < h_end; hb += groups) {
    const int h = hb + grp;
    const bool live = h < h_end && lane_g < vecs;
    const bool is_q = h < p.hq, is_v = h >= p.hq + p.hkv;
    const bool rotate = live && !is_v;
    float f[8];
    if (live) {
      load_projected<T, kPartials>(p, t, int64_t(h) * p.head_dim + e0, n, f);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = 0.f;
    }

    if (p.q_norm != nullptr) {
      float sumsq = 0.f;
      if (rotate) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sumsq += f[e] * f[e];
      }
      sumsq = kpt::group_sum<32>(sumsq, p.group);
      if (rotate) {
        const float rstd = rsqrtf(sumsq / float(p.head_dim) + p.eps);
        float w[8];
        kpt::unpack8<T>(kpt::load16((is_q ? p.q_norm : p.k_norm) + e0), w);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = round_to<T>(round_to<T>(f[e] * rstd) * w[e]);
      }
    }

    if (p.neox) {
#pragma unroll
      for (int e = 0; e < 8; ++e) mine[e] = f[e];
      __syncthreads();
    }
    float y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = f[e];
    if (rotate && e0 < p.rotary_dim) {
      if (p.neox) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int e = e0 + i;
          if (e < half) {
            y[i] = rope_first<T>(f[i], head[e + half], cos_s[e], sin_s[e]);
          } else if (e < p.rotary_dim) {
            y[i] = rope_second<T>(head[e - half], f[i], cos_s[e - half], sin_s[e - half]);
          }
        }
      } else {
        // gptj pairs (2i, 2i+1) never straddle a vector; rotary_dim is even.
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
          const int e = e0 + i;
          if (e < p.rotary_dim) {
            const float c = cos_s[e / 2], s = sin_s[e / 2];
            y[i] = rope_first<T>(f[i], f[i + 1], c, s);
            y[i + 1] = rope_second<T>(f[i], f[i + 1], c, s);
          }
        }
      }
    }
    if (p.neox) __syncthreads();  // the exchange slots are rewritten next round

    if (live) {
      uint16_t* dst;
      if (is_q) {
        dst = p.q + (t * p.hq + h) * p.head_dim;
      } else if (!is_v) {
        dst = p.k + (t * p.hkv + (h - p.hq)) * p.head_dim;
      } else {
        dst = p.v + (t * p.hkv + (h - p.hq - p.hkv)) * p.head_dim;
      }
      kpt::store16(dst + e0, kpt::pack8<T>(y));
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

int launch_status() { return static_cast<int>(kpt::last_error()); }

template <class F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case KPT_RQR_FP16:
      return f(fp16{});
    case KPT_RQR_BF16:
      return f(bf16{});
    default:
      return KPT_RQR_BAD_DTYPE;
  }
}

#ifdef KPT_CUDA
// U (chunks in flight) shrinks as the per-chunk fragments grow. The decode shapes (one or two
// 8-token tiles) get an 80-register cap, 6 blocks (24 warps) per SM: at 64 registers ptxas
// interleaved the mmas with the loads and a stalled mma held back the loads behind it; at 80
// all U chunks' loads issue before the first mma. Larger tiles get 128 registers, 4 blocks.
// (Checked with -Xptxas -v and the SASS: no spills, predicated 128-bit loads.)
template <class T, int RT, int NT>
int launch_gemv_mma(const GemvParams& p, kpt::stream_t stream) {
  constexpr int kLoads = 2 * RT + NT;
  constexpr int U = kLoads <= 3 ? 4 : kLoads <= 6 ? 2 : 1;
  constexpr int kMinBlocks = RT * NT <= 2 ? 6 : 4;
  const dim3 grid((p.n + 64 * RT - 1) / (64 * RT), p.splits);
  gemv_mma_kernel<T, RT, NT, U, kMinBlocks><<<grid, kGemvWarps * 32, 0, stream>>>(p);
  return launch_status();
}

template <class T, int RT>
int gemv_mma_tiles(const GemvParams& p, kpt::stream_t stream) {
  switch ((p.tokens + 7) / 8) {
    case 1:
      return launch_gemv_mma<T, RT, 1>(p, stream);
    case 2:
      return launch_gemv_mma<T, RT, 2>(p, stream);
    case 3:
      return launch_gemv_mma<T, RT, 3>(p, stream);
    default:
      return launch_gemv_mma<T, RT, 4>(p, stream);
  }
}
#endif

template <class T, int TM>
int launch_gemv_simt(const GemvParams& p, kpt::stream_t stream) {
  constexpr int R = 2;
  const dim3 grid((p.n + kGemvWarps * R - 1) / (kGemvWarps * R), p.splits);
  gemv_simt_kernel<T, R, TM, 2><<<grid, kGemvWarps * kWarpSize, 0, stream>>>(p);
  return launch_status();
}

template <class T>
int gemv_simt_tokens(const GemvParams& p, kpt::stream_t stream) {
  if (p.tokens <= 1) return launch_gemv_simt<T, 1>(p, stream);
  if (p.tokens <= 2) return launch_gemv_simt<T, 2>(p, stream);
  if (p.tokens <= 4) return launch_gemv_simt<T, 4>(p, stream);
  if (p.tokens <= 8) return launch_gemv_simt<T, 8>(p, stream);
  if (p.tokens <= 16) return launch_gemv_simt<T, 16>(p, stream);
  return KPT_RQR_UNSUPPORTED;  // 32 sums per row would spill; such batches go to the GEMM
}

}  // namespace

extern "C" {

int kpt_rqr_add_rmsnorm(int dtype, const void* x, int64_t x_row_stride, const void* residual,
                        int64_t residual_row_stride, void* residual_out, const void* weight,
                        void* xn, int64_t tokens, int64_t hidden, float eps, void* stream) {
  if (tokens < 0 || hidden <= 0 || hidden % 8 || tokens > 0x7fffffff) return KPT_RQR_BAD_ARGUMENT;
  if (tokens == 0) return 0;
  const bool has_res = residual != nullptr;
  if (!aligned16(x) || !aligned16(weight) || !aligned16(xn) || x_row_stride % 8 ||
      (has_res && (!aligned16(residual) || !aligned16(residual_out) || residual_out == nullptr ||
                   residual_row_stride % 8)))
    return KPT_RQR_BAD_ARGUMENT;
  const int vecs = int(hidden / 8);
  // The row stays in registers: 4 vectors per thread (hidden <= 32768) or 8 (<= 65536), the
  // most that 1024 threads can hold without spilling.
  const int per_thread = vecs <= 4 * kNormMaxThreads ? 4 : 8;
  if (vecs > per_thread * kNormMaxThreads) return KPT_RQR_UNSUPPORTED;
  int threads = (vecs + per_thread - 1) / per_thread;
  threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  const auto s = static_cast<kpt::stream_t>(stream);
  const auto* xp = static_cast<const uint16_t*>(x);
  const auto* rp = static_cast<const uint16_t*>(residual);
  auto* rop = static_cast<uint16_t*>(residual_out);
  const auto* wp = static_cast<const uint16_t*>(weight);
  auto* xnp = static_cast<uint16_t*>(xn);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (per_thread == 4) {
      add_rmsnorm_kernel<T, 4><<<unsigned(tokens), threads, 0, s>>>(
          xp, x_row_stride, rp, residual_row_stride, rop, wp, xnp, int(hidden), eps);
    } else {
      add_rmsnorm_kernel<T, 8><<<unsigned(tokens), threads, 0, s>>>(
          xp, x_row_stride, rp, residual_row_stride, rop, wp, xnp, int(hidden), eps);
    }
    return launch_status();
  });
}

int kpt_rqr_gemv(int dtype, int impl, int row_tiles, const void* xn, const void* w,
                 float* partials, int64_t tokens, int64_t n, int64_t k, int64_t splits,
                 void* stream) {
  if (tokens <= 0 || n <= 0 || k <= 0 || k % 8 || splits < 1 || n > 0x7fffffff ||
      k > 0x7fffffff || splits > 65535 || tokens * n * splits > (int64_t(1) << 40))
    return KPT_RQR_BAD_ARGUMENT;
  if (tokens > 32 || splits > k / 8) return KPT_RQR_UNSUPPORTED;
  if (!aligned16(xn) || !aligned16(w) || partials == nullptr) return KPT_RQR_BAD_ARGUMENT;
  const GemvParams p{static_cast<const uint16_t*>(xn), static_cast<const uint16_t*>(w), partials,
                     int(tokens), int(n), int(k), int(splits)};
  const auto s = static_cast<kpt::stream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (impl == KPT_RQR_GEMV_SIMT) return gemv_simt_tokens<T>(p, s);
#ifdef KPT_CUDA
    if (impl == KPT_RQR_GEMV_MMA && row_tiles == 1) return gemv_mma_tiles<T, 1>(p, s);
    if (impl == KPT_RQR_GEMV_MMA && row_tiles == 2) return gemv_mma_tiles<T, 2>(p, s);
#endif
    return int(KPT_RQR_UNSUPPORTED);
  });
}

int kpt_rqr_epilogue(int dtype, const void* qkv, int64_t splits, const void* bias,
                     const void* q_norm_weight, const void* k_norm_weight, const void* positions,
                     int pos_is_64, int64_t pos_stride, const float* inv_freq, void* q, void* k,
                     void* v, int64_t tokens, int64_t hq, int64_t hkv, int64_t head_dim,
                     int64_t rotary_dim, float eps, int neox, void* stream) {
  if (tokens < 0 || hq <= 0 || hkv <= 0 || splits < 0 || tokens > 0x7fffffff ||
      (hq + 2 * hkv) * head_dim > 0x7fffffff)
    return KPT_RQR_BAD_ARGUMENT;
  if (head_dim <= 0 || head_dim % 8 || head_dim > 256 || rotary_dim <= 0 || rotary_dim % 2 ||
      rotary_dim > head_dim)
    return KPT_RQR_UNSUPPORTED;
  if (tokens == 0) return 0;
  if ((splits == 0 && bias != nullptr) || (q_norm_weight == nullptr) != (k_norm_weight == nullptr))
    return KPT_RQR_BAD_ARGUMENT;
  for (const void* ptr : {qkv, bias, q_norm_weight, k_norm_weight, static_cast<const void*>(q),
                          static_cast<const void*>(k), static_cast<const void*>(v)})
    if (!aligned16(ptr)) return KPT_RQR_BAD_ARGUMENT;
  if (qkv == nullptr || positions == nullptr || inv_freq == nullptr || q == nullptr ||
      k == nullptr || v == nullptr)
    return KPT_RQR_BAD_ARGUMENT;

  EpiParams p;
  p.qkv = qkv;
  p.bias = static_cast<const uint16_t*>(bias);
  p.q_norm = static_cast<const uint16_t*>(q_norm_weight);
  p.k_norm = static_cast<const uint16_t*>(k_norm_weight);
  p.positions = positions;
  p.inv_freq = inv_freq;
  p.q = static_cast<uint16_t*>(q);
  p.k = static_cast<uint16_t*>(k);
  p.v = static_cast<uint16_t*>(v);
  p.pos_stride = pos_stride;
  p.pos_is_64 = pos_is_64 ? 1 : 0;
  p.splits = int(splits);
  p.tokens = int(tokens);
  p.hq = int(hq);
  p.hkv = int(hkv);
  p.head_dim = int(head_dim);
  p.rotary_dim = int(rotary_dim);
  p.neox = neox ? 1 : 0;
  p.eps = eps;
  p.group = 1;
  while (p.group < head_dim / 8) p.group *= 2;
  const int heads = p.hq + 2 * p.hkv;
  // Few tokens: spread one token's heads over several blocks (one round each) so the GPU has
  // work; many tokens: one block per token and cos/sin computed once for all its heads.
  p.heads_per_block = tokens >= 1024 ? heads : kEpiThreads / p.group;
  const dim3 grid(unsigned(tokens), (heads + p.heads_per_block - 1) / p.heads_per_block);
  const auto s = static_cast<kpt::stream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (splits > 0) {
      epilogue_kernel<T, true><<<grid, kEpiThreads, 0, s>>>(p);
    } else {
      epilogue_kernel<T, false><<<grid, kEpiThreads, 0, s>>>(p);
    }
    return launch_status();
  });
}

const char* kpt_rqr_error_string(int code) {
  switch (code) {
    case 0:
      return "no error";
    case KPT_RQR_BAD_DTYPE:
      return "unsupported dtype (fp16 and bf16 only)";
    case KPT_RQR_UNSUPPORTED:
      return "size or variant not supported by these kernels";
    case KPT_RQR_BAD_ARGUMENT:
      return "invalid argument (null or misaligned pointer, bad size or stride)";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown kpt error";
  }
}

}  // extern "C"
