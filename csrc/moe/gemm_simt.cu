// Portable tiles of the moe grouped GEMMs (csrc/moe/gemm.cuh) on CUDA cores: the HIP build's
// GEMMs, and a second implementation the CUDA build can be asked for (tests check the HIP
// logic with it on NVIDIA GPUs; nothing here depends on the warp width).
//
// 256 threads as 16 x 16; a CTA owns block_m rows x 64 columns of each half, a thread rows
// ty + 16 i and columns tx + 16 j. Per k-tile of 32, A and B are widened to float32 in shared
// memory (fp8: code * scale, the reference's own dequantisation, so the fp32 products are the
// reference's), then every thread accumulates its outputs with FMAs.
//
// int4: the k-tile is 4 packed rows; each thread takes whole words (8 channels of one column,
// adjacent threads adjacent columns: coalesced), reads the word's group scale and zero once
// (a group is a multiple of 8 channels, so a word never straddles two) and unpacks the 8
// nibbles in registers to float32 (q - z) * scale rounded to x's dtype: the reference's
// values, stored as float32 like the other paths'.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; correct-first, not tuned (no vector loads,
// no register blocking along k); GPU tests pass on an H100 (2026-12-07; HIP build not run).

#include "gemm.cuh"

namespace kpt_moe {

namespace {

constexpr int kThreads = 256;
constexpr int kBN = 64;
constexpr int kBK = 32;  // divides 128: a k-tile never straddles an fp8 scale block

constexpr int kInt4 = KPT_MOE_QUANT_INT4;

template <class T, bool kFp8>
KPT_DEVICE float load_elem(const char* row, int64_t k) {
  if constexpr (kFp8) {
    return e4m3_to_float(reinterpret_cast<const uint8_t*>(row)[k]);
  } else {
    return half_to_float<T>(reinterpret_cast<const uint16_t*>(row)[k]);
  }
}

template <class T, int kQuant, int kBM, int kHalves>
__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) simt_kernel(Gemm g) {
  constexpr bool kFp8 = kQuant == KPT_MOE_QUANT_FP8;
  constexpr int RM = kBM / 16, RN = kBN / 16;
  constexpr int kRowsB = kHalves * kBN;
  __shared__ float as[kBK][kBM];
  __shared__ float bs[kBK][kRowsB];
  __shared__ Slot slots[kBM];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= *g.num_padded) return;
  const int expert = g.block_expert[blockIdx.x];
  if (expert < 0) return;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  for (int r = tid; r < kBM; r += kThreads) slots[r] = slot_of(g, m0 + r);
  __syncthreads();
  const char* b_base = g.b + int64_t(expert) * g.b_expert_bytes;
  const float* b_scale = kFp8 ? g.b_scale + int64_t(expert) * g.b_scale_expert : nullptr;
  // int4: this expert's group scales (element size by type) and zero points.
  const int64_t q_first = kQuant == kInt4 ? int64_t(expert) * g.q_expert : 0;
  const void* q_scale =
      kQuant == kInt4 ? static_cast<const char*>(g.q_scale) +
                            q_first * (g.q_scale_type == kpt::kInt4ScaleF32 ? 4 : 2)
                      : nullptr;
  const uint8_t* q_zeros =
      kQuant == kInt4 && g.q_zeros != nullptr ? g.q_zeros + q_first : nullptr;

  float acc[kHalves][RM][RN];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[h][i][j] = 0.f;

  for (int64_t k0 = 0; k0 < g.k; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int r = idx / kBK, kk = idx % kBK;
      const int64_t k = k0 + kk;
      const int row = slots[r].row;
      float v = 0.f;
      if (row >= 0 && k < g.k) {
        v = load_elem<T, kFp8>(g.a + int64_t(row) * g.a_row_bytes, k);
        if (kFp8) v *= g.a_scale[int64_t(row) * g.a_scale_row + k / 128];
      }
      as[kk][r] = v;
    }
    if constexpr (kQuant == kInt4) {
      for (int idx = tid; idx < kBK / 8 * kRowsB; idx += kThreads) {
        const int wr = idx / kRowsB, j = idx % kRowsB;
        const int64_t kw = k0 / 8 + wr;  // packed row: channels 8 kw .. 8 kw + 7
        const int64_t n = n0 + j % kBN;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (n < g.n && kw * 8 < g.k) {
          const int64_t col = (j / kBN) * g.up + n;
          const uint32_t word =
              *reinterpret_cast<const uint32_t*>(b_base + kw * g.b_row_bytes + col * 4);
          const int64_t at = ((kw * 8) >> g.group_shift) * g.q_row + col;
          const float s = kpt::int4_scale(q_scale, g.q_scale_type, at);
          const float z = q_zeros != nullptr ? float(q_zeros[at]) : float(kpt::kInt4SymmetricZero);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = kpt::int4_dequant<T>(word, e, z, s);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) bs[wr * 8 + e][j] = v[e];
      }
    } else {
      for (int idx = tid; idx < kRowsB * kBK; idx += kThreads) {
        const int j = idx / kBK, kk = idx % kBK;
        const int64_t k = k0 + kk;
        const int64_t n = n0 + j % kBN;
        float v = 0.f;
        if (n < g.n && k < g.k) {
          const int64_t brow = (j / kBN) * g.up + n;
          v = load_elem<T, kFp8>(b_base + brow * g.b_row_bytes, k);
          if (kFp8) v *= b_scale[(brow / 128) * g.b_scale_row + k / 128];
        }
        bs[kk][j] = v;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float a[RM];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int j = 0; j < RN; ++j) {
          const float b = bs[kk][h * kBN + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < RM; ++i) acc[h][i][j] = fmaf(a[i], b, acc[h][i][j]);
        }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const Slot sl = slots[ty + 16 * i];
    if (sl.row < 0) continue;
    char* out = g.c + int64_t(sl.out_row) * g.c_row_bytes;
#pragma unroll
    for (int j = 0; j < RN; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= g.n) continue;
      const float v = kHalves == 2 ? gated(g.activation, acc[0][i][j], acc[kHalves - 1][i][j])
                                   : sl.weight * acc[0][i][j];
      if (kHalves == 1 && g.c_fp32) {
        reinterpret_cast<float*>(out)[col] = v;
      } else {
        reinterpret_cast<uint16_t*>(out)[col] = uint16_t(kpt::Half<T>::pack(v, 0.f) & 0xffffu);
      }
    }
  }
}

template <class T, int kQuant, int kBM>
int launch_tile(const Gemm& g, int halves, int64_t grid_x, kpt::stream_t stream) {
  const dim3 grid(unsigned(grid_x), unsigned((g.n + kBN - 1) / kBN));
  if (halves == 2) {
    simt_kernel<T, kQuant, kBM, 2><<<grid, kThreads, 0, stream>>>(g);
  } else {
    simt_kernel<T, kQuant, kBM, 1><<<grid, kThreads, 0, stream>>>(g);
  }
  return static_cast<int>(kpt::last_error());
}

template <class T, int kQuant>
int launch_typed(const Gemm& g, int block_m, int halves, int64_t grid_x, kpt::stream_t stream) {
  if (block_m == 16) return launch_tile<T, kQuant, 16>(g, halves, grid_x, stream);
  if (block_m == 64) return launch_tile<T, kQuant, 64>(g, halves, grid_x, stream);
  if (block_m == 128) return launch_tile<T, kQuant, 128>(g, halves, grid_x, stream);
  return KPT_MOE_UNSUPPORTED;
}

template <class T>
int launch_quant(const Gemm& g, int quant, int block_m, int halves, int64_t grid_x,
                 kpt::stream_t stream) {
  if (quant == KPT_MOE_QUANT_FP8) {
    return launch_typed<T, KPT_MOE_QUANT_FP8>(g, block_m, halves, grid_x, stream);
  }
  if (quant == kInt4) return launch_typed<T, kInt4>(g, block_m, halves, grid_x, stream);
  return launch_typed<T, KPT_MOE_QUANT_NONE>(g, block_m, halves, grid_x, stream);
}

}  // namespace

// The same tiles for every quant.
bool simt_tile(int, int block_m, int block_n) {
  return block_n == kBN && (block_m == 16 || block_m == 64 || block_m == 128);
}

int launch_gemm_simt(const Gemm& g, int dtype, int quant, int block_m, int block_n, int halves,
                     int64_t grid_x, kpt::stream_t stream) {
  if (!simt_tile(quant, block_m, block_n)) return KPT_MOE_UNSUPPORTED;
  if (dtype == KPT_MOE_BF16) return launch_quant<bf16>(g, quant, block_m, halves, grid_x, stream);
  return launch_quant<fp16>(g, quant, block_m, halves, grid_x, stream);
}

}  // namespace kpt_moe
