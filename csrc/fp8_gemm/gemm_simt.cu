// Portable tiles of fp8_gemm on CUDA cores: the HIP build's GEMM (gfx90a has no fp8 matrix
// instructions), and a second implementation the CUDA build can be asked for (tests check the
// HIP logic with it on NVIDIA GPUs; nothing here depends on the warp width).
//
// 256 threads as 16 x 16; a CTA owns block_m rows x 64 columns of out (grouped launch order),
// a thread rows ty + 16 i and columns tx + 16 j. Per k-tile of 32, a and w are dequantised to
// float32 in shared memory as the reference does it (code * its scale, every granularity, so
// the float32 products are the reference's; NaN codes stay NaN), then every thread accumulates
// its outputs with FMAs; the epilogue adds the bias and rounds once.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; correct-first, not tuned (byte loads, no
// register blocking along k); its GPU tests pass on an H100 (2026-12-07).

#include "common.cuh"

namespace kpt_fp8 {

namespace {

constexpr int kThreads = 256;
constexpr int kBN = 64;
constexpr int kBK = 32;  // divides 128: a k-tile never straddles a block scale

// The full scale of a's element (row, k) and of w's (col, k).
KPT_DEVICE float a_scale_at(const Args& p, int64_t row, int64_t k) {
  if (p.a_gran == KPT_FP8_GEMM_TENSOR) return p.a_scale[0];
  if (p.a_gran == KPT_FP8_GEMM_ROW) return p.a_scale[row * p.a_scale_s0];
  return p.a_scale[row * p.a_scale_s0 + (k / kScaleK) * p.a_scale_s1];
}

KPT_DEVICE float w_scale_at(const Args& p, int64_t col, int64_t k) {
  if (p.w_gran == KPT_FP8_GEMM_TENSOR) return p.w_scale[0];
  if (p.w_gran == KPT_FP8_GEMM_ROW) return p.w_scale[col * p.w_scale_s0];
  return p.w_scale[(col / kScaleK) * p.w_scale_s0 + (k / kScaleK) * p.w_scale_s1];
}

// Rows row0 .. row0 + kRows - 1 of a (kW false) or of w, codes k0 .. k0 + kBK - 1, dequantised
// to float32 (code * its scale) and transposed into tile[k][row]; zeros past the rows or past K
// (K is a multiple of 16 and kBK of 16: only whole 16-wide halves of a tile are past K).
template <int kFmt, bool kW, int kRows>
KPT_DEVICE void dequant_tile(const Args& p, int64_t row0, int64_t k0,
                             float (&tile)[kBK][kRows]) {
  const uint8_t* codes = static_cast<const uint8_t*>(kW ? p.w : p.a);
  const int64_t rows = kW ? p.n : p.m, row_bytes = kW ? p.w_row : p.a_row;
  for (int idx = threadIdx.x; idx < kRows * kBK; idx += kThreads) {
    const int r = idx / kBK, kk = idx % kBK;
    const int64_t row = row0 + r, k = k0 + kk;
    float v = 0.f;
    if (row < rows && k < p.k) {
      v = code_to_float<kFmt>(codes[row * row_bytes + k]) *
          (kW ? w_scale_at(p, row, k) : a_scale_at(p, row, k));
    }
    tile[kk][r] = v;
  }
}

template <int kFmt, int kBM>
__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) simt_kernel(const Args p) {
  constexpr int RM = kBM / 16, RN = kBN / 16;
  __shared__ float as[kBK][kBM];
  __shared__ float bs[kBK][kBN];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  int64_t tm, tn;
  grouped_tile(blockIdx.x, (p.m + kBM - 1) / kBM, (p.n + kBN - 1) / kBN, p.group_m, tm, tn);
  const int64_t m0 = tm * kBM, n0 = tn * kBN;

  float acc[RM][RN];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < p.k; k0 += kBK) {
    dequant_tile<kFmt, false>(p, m0, k0, as);
    dequant_tile<kFmt, true>(p, n0, k0, bs);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float av[RM];
#pragma unroll
      for (int i = 0; i < RM; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const float b = bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < RM; ++i) acc[i][j] = fmaf(av[i], b, acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= p.m) continue;
#pragma unroll
    for (int j = 0; j < RN; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < p.n) store_one(p, row, col, acc[i][j], true);
    }
  }
}

template <int kFmt, int kBM>
int launch_tile(const Args& p, kpt::stream_t stream) {
  const int64_t tiles = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
  if (tiles > 0x7fffffff) return KPT_FP8_GEMM_UNSUPPORTED;
  simt_kernel<kFmt, kBM><<<unsigned(tiles), kThreads, 0, stream>>>(p);
  return static_cast<int>(kpt::last_error());
}

template <int kFmt>
int launch_typed(const Args& p, kpt::stream_t stream) {
  if (p.block_m == 16) return launch_tile<kFmt, 16>(p, stream);
  if (p.block_m == 64) return launch_tile<kFmt, 64>(p, stream);
  return KPT_FP8_GEMM_UNSUPPORTED;
}

}  // namespace

bool simt_tile(int block_m, int block_n) {
  return block_n == kBN && (block_m == 16 || block_m == 64);
}

int launch_simt(const Args& p, kpt::stream_t stream) {
  if (!simt_tile(p.block_m, p.block_n)) return KPT_FP8_GEMM_UNSUPPORTED;
  return p.fmt == KPT_FP8_GEMM_E4M3 ? launch_typed<KPT_FP8_GEMM_E4M3>(p, stream)
                                    : launch_typed<KPT_FP8_GEMM_E5M2>(p, stream);
}

}  // namespace kpt_fp8
