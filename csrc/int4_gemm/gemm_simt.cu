// Portable tiles of int4_gemm on CUDA cores: the HIP build's kernel, and a second
// implementation the CUDA build can be asked for (tests check the HIP logic with it on NVIDIA
// GPUs; nothing here depends on the warp width).
//
// 256 threads as 16 x 16; a CTA owns block_m rows x 64 columns, a thread rows ty + 16 i and
// the 4 columns 4 tx .. 4 tx + 3. Per K step of 32 (4 packed rows), x is widened to float32
// in shared memory and each thread dequantises one packed word (8 channels of one column,
// each with its own group: act-order needs nothing more) to float32 (q - z) * scale rounded to
// x's dtype, the reference's own values; then every thread accumulates its outputs with FMAs.
// Split-K shares write float32 partial sums like the tensor-core tiles.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; correct-first, not tuned (one word per
// thread and step, scalar scale loads, no register blocking along k); its GPU tests pass on an H100 (2026-12-07).

#include "common.cuh"

namespace kpt_int4 {

namespace {

constexpr int kThreads = 256;
constexpr int kBN = 64;
constexpr int kBK = 32;

template <class T, int kBM>
__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) simt_kernel(Params p) {
  constexpr int RM = kBM / 16;
  __shared__ float xs[kBK][kBM];
  __shared__ __align__(16) float ws[kBK][kBN];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  int tm, tn;
  tile_of(blockIdx.x, int((p.m + kBM - 1) / kBM), (p.n + kBN - 1) / kBN, tm, tn);
  const int64_t m0 = int64_t(tm) * kBM;
  const int n0 = tn * kBN;
  const int share = blockIdx.y;
  const int k_begin = share * p.k_per_split;
  const int k_end = min(p.k, k_begin + p.k_per_split);

  float acc[RM][4];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int r = idx / kBK, kk = idx % kBK;
      const int64_t row = m0 + r;
      const int k = k0 + kk;
      float v = 0.f;
      if (row < p.m && k < k_end) {
        v = kpt::Half<T>::unpack(
                reinterpret_cast<const uint16_t*>(p.x)[row * p.x_row + k]).x;
      }
      xs[kk][r] = v;
    }
    {
      // 4 packed rows x 64 columns: one word per thread.
      const int wr = tid / kBN, c = tid % kBN;
      const int kw = k0 / 8 + wr, col = n0 + c;
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (kw < k_end / 8 && col < p.n) {
        const uint32_t word = uint32_t(p.packed[int64_t(kw) * p.packed_row + col]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int grp = group_of(p, kw * 8 + j);
          const float s =
              kpt::int4_scale(p.scales, p.scale_dtype, int64_t(grp) * p.scales_row + col);
          const float z = p.zeros != nullptr ? float(p.zeros[int64_t(grp) * p.zeros_row + col])
                                             : float(kpt::kInt4SymmetricZero);
          v[j] = kpt::int4_dequant<T>(word, j, z, s);
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ws[wr * 8 + j][c] = v[j];
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 b = *reinterpret_cast<const float4*>(&ws[kk][4 * tx]);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const float a = xs[kk][ty + 16 * i];
        acc[i][0] = fmaf(a, b.x, acc[i][0]);
        acc[i][1] = fmaf(a, b.y, acc[i][1]);
        acc[i][2] = fmaf(a, b.z, acc[i][2]);
        acc[i][3] = fmaf(a, b.w, acc[i][3]);
      }
    }
    __syncthreads();
  }

  const int col = n0 + 4 * tx;
  if (col >= p.n) return;
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row < p.m) store_cols<T, 4>(p, share, row, col, acc[i]);
  }
}

template <class T, int kBM>
int launch_tile(const Params& p, kpt::stream_t stream) {
  const int64_t ctas = (p.m + kBM - 1) / kBM * ((p.n + kBN - 1) / kBN);
  if (ctas > 0x7fffffff) return KPT_INT4_UNSUPPORTED;
  simt_kernel<T, kBM><<<dim3(unsigned(ctas), unsigned(p.split)), kThreads, 0, stream>>>(p);
  return static_cast<int>(kpt::last_error());
}

}  // namespace

int simt_tile_k(int block_m, int block_n) {
  return block_n == kBN && (block_m == 16 || block_m == 64) ? kBK : 0;
}

int launch_simt(const Params& p, int dtype, int block_m, int block_n, kpt::stream_t stream) {
  if (simt_tile_k(block_m, block_n) == 0) return KPT_INT4_UNSUPPORTED;
  if (dtype == KPT_INT4_BF16) {
    return block_m == 16 ? launch_tile<bf16, 16>(p, stream) : launch_tile<bf16, 64>(p, stream);
  }
  return block_m == 16 ? launch_tile<fp16, 16>(p, stream) : launch_tile<fp16, 64>(p, stream);
}

}  // namespace kpt_int4
