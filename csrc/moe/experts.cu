// fused_moe: the launcher of the expert pipeline, and its two small kernels.
//
//   1. kpt_moe_align (align.cu): slots grouped by local expert, padded to block_m.
//   2. fp8 only: quantize_kernel, x -> e4m3 per token and 128 columns (quantize_fp8 "block").
//   3. GEMM1 (gemm_mma.cu / gemm_simt.cu): act[s] = act(x W1^T) * (x W3^T), rounded to x's
//      dtype, for every slot s holding a pair. int4 experts are dequantised inside the GEMM
//      tiles (as int4_gemm does, rounded to x's dtype): no extra launch, no dequantised copy.
//   4. fp8 only: quantize_kernel again, act -> e4m3 per slot and 128 columns.
//   5. GEMM2: partial[pair] = weight * act[s] W2^T, float32 or rounded to x's dtype (the
//      contract allows either; float32 costs twice the bytes), and for top_k == 1 straight
//      into out[token], the only rounding there.
//   6. combine_kernel: out[t] = sum over j of partial[t * top_k + j] in fp32, j ascending (the
//      order never depends on the schedule: deterministic), rounded once; pairs whose expert
//      is not local add nothing, and a token without any gets zeros.
//
// Everything is sized from the arguments alone: no host sync, safe in CUDA graph capture.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; GPU tests pass on an H200 and an H100
// (bf16/fp16, fp8 and, 2026-12-07, int4 experts); bf16 timed in bench/RESULTS.md.

#include <float.h>

#include "gemm.cuh"

namespace {

using namespace kpt_moe;

constexpr int kSmallThreads = 256;

// ---- fp8 activations -----------------------------------------------------------------------------

struct Quant {
  const uint16_t* src;
  int64_t src_row;  // elements
  int64_t rows, cols;
  uint8_t* dst;  // (rows, cols) codes, contiguous
  float* scale;  // (rows, ceil(cols / 128)), contiguous
  const int32_t* sorted;  // act: skip slots without a pair (their rows were never written)
  const int32_t* num_padded;
  int64_t pairs;
};

// One warp per (row, 128 columns): scale = max(amax / 448, 2^-126), 1 for an all-zero block,
// NaN when the block holds a NaN or an infinity; codes = e4m3(clamp(x / scale, +-448)).
template <class T>
__global__ void KPT_LAUNCH_BOUNDS(kSmallThreads, 1) quantize_kernel(Quant q) {
  constexpr int kWarps = kSmallThreads / kWarpSize;
  constexpr int kPer = 128 / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t blocks = (q.cols + 127) / 128;
  const int64_t item = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t row = item / blocks, blk = item % blocks;
  if (row >= q.rows) return;
  if (q.sorted != nullptr) {
    if (row >= *q.num_padded) return;
    const int pair = q.sorted[row];
    if (pair < 0 || pair >= q.pairs) return;
  }
  float v[kPer];
  float amax = 0.f, bad = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = blk * 128 + i * kWarpSize + lane;
    v[i] = c < q.cols ? half_to_float<T>(q.src[row * q.src_row + c]) : 0.f;
    const float a = fabsf(v[i]);
    if (!(a <= FLT_MAX)) bad = 1.f;
    amax = fmaxf(amax, a);
  }
  amax = warp_max(amax);
  bad = warp_max(bad);
  float scale = amax > 0.f ? amax / kE4m3Max : 1.f;
  scale = fmaxf(scale, FLT_MIN);
  if (bad > 0.f) scale = __uint_as_float(0x7fc00000u);
  if (lane == 0) q.scale[row * blocks + blk] = scale;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = blk * 128 + i * kWarpSize + lane;
    if (c < q.cols) {
      float x = v[i] / scale;
      x = x > kE4m3Max ? kE4m3Max : (x < -kE4m3Max ? -kE4m3Max : x);  // NaN stays NaN
      q.dst[row * q.cols + c] = float_to_e4m3(x);
    }
  }
}

template <class T>
int launch_quantize(const Quant& q, kpt::stream_t stream) {
  constexpr int kWarps = kSmallThreads / kWarpSize;
  const int64_t items = q.rows * ((q.cols + 127) / 128);
  if (items == 0) return 0;
  quantize_kernel<T><<<unsigned((items + kWarps - 1) / kWarps), kSmallThreads, 0, stream>>>(q);
  return static_cast<int>(kpt::last_error());
}

// ---- the sum over top_k --------------------------------------------------------------------------

struct Combine {
  const void* partial;  // (tokens * top_k, hidden); null: top_k == 1, GEMM2 wrote out
  int partial_fp32;     // partial holds float32 (else x's dtype)
  const int32_t* ids;
  const int32_t* map;
  int64_t global_experts, local_experts, tokens, hidden;
  int top_k;
  uint16_t* out;
};

// Eight columns of one token per thread.
template <class T>
__global__ void KPT_LAUNCH_BOUNDS(kSmallThreads, 1) combine_kernel(Combine c) {
  const int64_t vecs = c.hidden / 8;
  const int64_t total = c.tokens * vecs;
  const int64_t stride = int64_t(gridDim.x) * kSmallThreads;
  for (int64_t i = int64_t(blockIdx.x) * kSmallThreads + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / vecs, col = (i % vecs) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    bool any = false;
    for (int j = 0; j < c.top_k; ++j) {
      const int64_t pair = t * c.top_k + j;
      if (local_expert(c.ids[pair], c.map, c.global_experts, c.local_experts) < 0) continue;
      any = true;
      if (c.partial == nullptr) break;
      float f[8];
      if (c.partial_fp32) {
        const float* p = static_cast<const float*>(c.partial) + pair * c.hidden + col;
        const uint4 lo = kpt::load16(p), hi = kpt::load16(p + 4);
        f[0] = __uint_as_float(lo.x), f[1] = __uint_as_float(lo.y);
        f[2] = __uint_as_float(lo.z), f[3] = __uint_as_float(lo.w);
        f[4] = __uint_as_float(hi.x), f[5] = __uint_as_float(hi.y);
        f[6] = __uint_as_float(hi.z), f[7] = __uint_as_float(hi.w);
      } else {
        kpt::unpack8<T>(
            kpt::load16(static_cast<const uint16_t*>(c.partial) + pair * c.hidden + col), f);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += f[e];
    }
    if (c.partial == nullptr && any) continue;  // GEMM2 wrote this row
    kpt::store16(c.out + t * c.hidden + col, kpt::pack8<T>(acc));
  }
}

template <class T>
int launch_combine(const Combine& c, kpt::stream_t stream) {
  const int64_t total = c.tokens * (c.hidden / 8);
  if (total == 0) return 0;
  const int64_t blocks = (total + kSmallThreads - 1) / kSmallThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  combine_kernel<T><<<grid, kSmallThreads, 0, stream>>>(c);
  return static_cast<int>(kpt::last_error());
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int run_gemm(const kpt_moe_args* a, const Gemm& g, int halves, int64_t grid_x,
             kpt::stream_t s) {
  if (a->impl == KPT_MOE_IMPL_MMA) {
    return launch_gemm_mma(g, a->dtype, a->quant, a->block_m, a->block_n, halves, grid_x, s);
  }
  return launch_gemm_simt(g, a->dtype, a->quant, a->block_m, a->block_n, halves, grid_x, s);
}

// The group shift of an int4 weight with reduction length k: log2(group), or 30 for one group
// over all of k (every k < 2^30 is then in group 0); -1 for a group the kernels do not take.
int group_shift(int64_t group, int64_t k) {
  if (group == k) return 30;
  for (int shift = 5; shift <= 8; ++shift) {
    if (group == (int64_t(1) << shift)) return k % group == 0 ? shift : -1;
  }
  return -1;
}

// Bytes of one int4 scale; the kernels read the type as kpt::kInt4Scale*.
int scale_bytes(int dtype) { return dtype == KPT_MOE_FP32 ? 4 : 2; }
static_assert(KPT_MOE_FP16 == kpt::kInt4ScaleF16 && KPT_MOE_BF16 == kpt::kInt4ScaleBF16 &&
                  KPT_MOE_FP32 == kpt::kInt4ScaleF32,
              "int4 scale types are numbered as kpt/moe.h's dtypes");

template <class T>
int forward(const kpt_moe_args* a, kpt::stream_t s) {
  const bool fp8 = a->quant == KPT_MOE_QUANT_FP8, int4 = a->quant == KPT_MOE_QUANT_INT4;
  const int64_t T_ = a->tokens, H = a->hidden, I = a->inter, k = a->top_k;
  const int64_t pairs = T_ * k;
  const int64_t capacity = kpt_moe_padded_capacity(pairs, a->experts, a->block_m);
  const int64_t blocks = capacity / a->block_m;
  const int64_t h_blocks = (H + 127) / 128, i_blocks = (I + 127) / 128;
  int err;

  kpt_moe_align_args al;
  al.ids = a->ids;
  al.expert_map = a->expert_map;
  al.pairs = pairs;
  al.global_experts = a->global_experts;
  al.local_experts = a->experts;
  al.block_m = a->block_m;
  al.counts = a->counts;
  al.sorted_pairs = a->sorted_pairs;
  al.block_expert = a->block_expert;
  al.num_padded = a->num_padded;
  if ((err = kpt_moe_align(&al, s)) != 0) return err;

  if (fp8) {
    Quant q{static_cast<const uint16_t*>(a->x), a->x_stride, T_, H, a->x_fp8, a->x_scale,
            nullptr, nullptr, pairs};
    if ((err = launch_quantize<T>(q, s)) != 0) return err;
  }

  const int esize = fp8 ? 1 : (int4 ? 4 : 2);  // int4: strides count 32-bit words
  Gemm g1{};
  g1.a = fp8 ? reinterpret_cast<const char*>(a->x_fp8) : static_cast<const char*>(a->x);
  g1.a_row_bytes = fp8 ? H : a->x_stride * 2;
  g1.a_scale = a->x_scale;
  g1.a_scale_row = h_blocks;
  g1.b = static_cast<const char*>(a->w13);
  g1.b_expert_bytes = a->w13_stride_expert * esize;
  g1.b_row_bytes = a->w13_stride_row * esize;
  g1.b_scale = a->w13_scale;
  g1.b_scale_expert = ((2 * I + 127) / 128) * h_blocks;
  g1.b_scale_row = h_blocks;
  if (int4) {
    g1.q_scale = a->w13_int4_scale;
    g1.q_scale_type = a->int4_scale_dtype;
    g1.q_zeros = a->w13_zeros;
    g1.q_row = 2 * I;
    g1.q_expert = H / a->group13 * g1.q_row;
    g1.group_shift = group_shift(a->group13, H);
  }
  g1.n = I;
  g1.k = H;
  g1.up = I;
  g1.sorted = a->sorted_pairs;
  g1.block_expert = a->block_expert;
  g1.num_padded = a->num_padded;
  g1.pairs = pairs;
  g1.top_k = int(k);
  g1.gather = 1;
  g1.activation = a->activation;
  g1.c = static_cast<char*>(a->act);
  g1.c_row_bytes = I * 2;
  if ((err = run_gemm(a, g1, 2, blocks, s)) != 0) return err;

  if (fp8) {
    Quant q{static_cast<const uint16_t*>(a->act), I, capacity, I, a->act_fp8, a->act_scale,
            a->sorted_pairs, a->num_padded, pairs};
    if ((err = launch_quantize<T>(q, s)) != 0) return err;
  }

  const bool direct = k == 1;
  Gemm g2 = g1;
  g2.a = fp8 ? reinterpret_cast<const char*>(a->act_fp8) : static_cast<const char*>(a->act);
  g2.a_row_bytes = fp8 ? I : I * 2;
  g2.a_scale = a->act_scale;
  g2.a_scale_row = i_blocks;
  g2.b = static_cast<const char*>(a->w2);
  g2.b_expert_bytes = a->w2_stride_expert * esize;
  g2.b_row_bytes = a->w2_stride_row * esize;
  g2.b_scale = a->w2_scale;
  g2.b_scale_expert = h_blocks * i_blocks;
  g2.b_scale_row = i_blocks;
  if (int4) {
    g2.q_scale = a->w2_int4_scale;
    g2.q_zeros = a->w2_zeros;
    g2.q_row = H;
    g2.q_expert = I / a->group2 * g2.q_row;
    g2.group_shift = group_shift(a->group2, I);
  }
  g2.n = H;
  g2.k = I;
  g2.up = 0;
  g2.gather = 0;
  g2.c = static_cast<char*>(direct ? a->out : a->partial);
  g2.c_fp32 = !direct && a->partial_fp32;
  g2.c_row_bytes = H * (g2.c_fp32 ? 4 : 2);
  g2.weights = a->weights;
  g2.by_token = direct ? 1 : 0;
  if ((err = run_gemm(a, g2, 1, blocks, s)) != 0) return err;

  Combine c{direct ? nullptr : a->partial,
            g2.c_fp32,
            a->ids,
            a->expert_map,
            a->global_experts,
            a->experts,
            T_,
            H,
            int(k),
            static_cast<uint16_t*>(a->out)};
  return launch_combine<T>(c, s);
}

}  // namespace

extern "C" {

int kpt_moe_tile_supported(int impl, int quant, int block_m, int block_n) {
  if (quant < KPT_MOE_QUANT_NONE || quant > KPT_MOE_QUANT_INT4) return 0;
  if (impl == KPT_MOE_IMPL_MMA) return mma_tile(quant, block_m, block_n);
  if (impl == KPT_MOE_IMPL_SIMT) return simt_tile(quant, block_m, block_n);
  return 0;
}

int kpt_moe_forward(const kpt_moe_args* a, void* stream) {
  if (a == nullptr) return KPT_MOE_BAD_ARGUMENT;
  if (a->dtype != KPT_MOE_FP16 && a->dtype != KPT_MOE_BF16) return KPT_MOE_BAD_DTYPE;
  if (a->quant != KPT_MOE_QUANT_NONE && a->quant != KPT_MOE_QUANT_FP8 &&
      a->quant != KPT_MOE_QUANT_INT4)
    return KPT_MOE_UNSUPPORTED;
  if (a->activation < KPT_MOE_SILU || a->activation > KPT_MOE_GELU_TANH)
    return KPT_MOE_BAD_ARGUMENT;
  if (!kpt_moe_tile_supported(a->impl, a->quant, a->block_m, a->block_n))
    return KPT_MOE_UNSUPPORTED;
  const bool fp8 = a->quant == KPT_MOE_QUANT_FP8, int4 = a->quant == KPT_MOE_QUANT_INT4;
  const int64_t T_ = a->tokens, H = a->hidden, I = a->inter, k = a->top_k;
  if (T_ < 0 || H < 1 || I < 1 || k < 1 || a->global_experts < 1) return KPT_MOE_BAD_ARGUMENT;
  if (a->experts < 1 || a->experts > KPT_MOE_MAX_LOCAL_EXPERTS) return KPT_MOE_UNSUPPORTED;
  // 16-byte chunks of every row; fp8 blocks of 128 along inter (one scale per GEMM2 k-tile).
  if (H % 8 || I % 8 || (fp8 && (H % 16 || I % 128))) return KPT_MOE_UNSUPPORTED;
  // int4: 32-bit channel indices and the one-group shift of 30 (gemm.cuh).
  if (int4 && (H >= (int64_t(1) << 30) || I >= (int64_t(1) << 30) ||
               group_shift(a->group13, H) < 0 || group_shift(a->group2, I) < 0))
    return KPT_MOE_UNSUPPORTED;
  if (T_ == 0) return 0;
  const int64_t capacity = kpt_moe_padded_capacity(T_ * k, a->experts, a->block_m);
  if (capacity >= 0x7fffffff || T_ * k >= 0x7fffffff || (H + 63) / 64 > 65535 ||
      (I + 63) / 64 > 65535)
    return KPT_MOE_UNSUPPORTED;
  if (a->x == nullptr || a->w13 == nullptr || a->w2 == nullptr || a->weights == nullptr ||
      a->ids == nullptr || a->out == nullptr || a->counts == nullptr ||
      a->sorted_pairs == nullptr || a->block_expert == nullptr || a->num_padded == nullptr ||
      a->act == nullptr || (k > 1 && a->partial == nullptr))
    return KPT_MOE_BAD_ARGUMENT;
  if (fp8 && (a->w13_scale == nullptr || a->w2_scale == nullptr || a->x_fp8 == nullptr ||
              a->x_scale == nullptr || a->act_fp8 == nullptr || a->act_scale == nullptr))
    return KPT_MOE_BAD_ARGUMENT;
  if (int4 && (a->w13_int4_scale == nullptr || a->w2_int4_scale == nullptr ||
               (a->int4_scale_dtype != KPT_MOE_FP32 && a->int4_scale_dtype != KPT_MOE_FP16 &&
                a->int4_scale_dtype != KPT_MOE_BF16)))
    return KPT_MOE_BAD_ARGUMENT;
  if (a->expert_map == nullptr && a->global_experts != a->experts) return KPT_MOE_BAD_ARGUMENT;
  // cp.async and the vector loads/stores move 16 bytes: rows and bases must keep that alignment.
  const int64_t esize = fp8 ? 1 : (int4 ? 4 : 2);
  if (!aligned(a->x, 16) || a->x_stride % 8 || !aligned(a->w13, 16) || !aligned(a->w2, 16) ||
      (a->w13_stride_expert * esize) % 16 || (a->w13_stride_row * esize) % 16 ||
      (a->w2_stride_expert * esize) % 16 || (a->w2_stride_row * esize) % 16 ||
      !aligned(a->out, 16) || !aligned(a->act, 16) ||
      (a->partial != nullptr && !aligned(a->partial, 16)) ||
      (fp8 && (!aligned(a->x_fp8, 16) || !aligned(a->act_fp8, 16))))
    return KPT_MOE_BAD_ARGUMENT;
  if (a->x_stride < H) return KPT_MOE_BAD_ARGUMENT;
  if (!int4 && (a->w13_stride_row < H || a->w2_stride_row < I)) return KPT_MOE_BAD_ARGUMENT;
  // int4 rows are packed rows of 8 channels, N words each; the scales and zero points are
  // read 4 columns at a time (16 / 8 bytes of scales, 4 of zeros: N is a multiple of 8).
  if (int4) {
    const int sb = scale_bytes(a->int4_scale_dtype);
    if (a->w13_stride_row < 2 * I || a->w2_stride_row < H ||
        a->w13_stride_expert < H / 8 * a->w13_stride_row ||
        a->w2_stride_expert < I / 8 * a->w2_stride_row ||
        !aligned(a->w13_int4_scale, 4 * sb) || !aligned(a->w2_int4_scale, 4 * sb) ||
        (a->w13_zeros != nullptr && !aligned(a->w13_zeros, 4)) ||
        (a->w2_zeros != nullptr && !aligned(a->w2_zeros, 4)))
      return KPT_MOE_BAD_ARGUMENT;
  }
  const auto s = static_cast<kpt::stream_t>(stream);
  return a->dtype == KPT_MOE_BF16 ? forward<bf16>(a, s) : forward<fp16>(a, s);
}

const char* kpt_moe_error_string(int code) {
  switch (code) {
    case 0:
      return "no error";
    case KPT_MOE_BAD_DTYPE:
      return "unsupported dtype (fp16/bf16 activations; fp32/bf16/fp16 routing logits)";
    case KPT_MOE_UNSUPPORTED:
      return "size, tile or variant not supported by these kernels";
    case KPT_MOE_BAD_ARGUMENT:
      return "invalid argument (null or misaligned pointer, bad size or stride)";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown kpt error";
  }
}

}  // extern "C"
