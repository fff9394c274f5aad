// The weight of int4_gemm dequantised once, for problems with many rows: w (K, N) in x's
// dtype, w[k, n] = round(float32(q - z) * float32(scale)) exactly as the reference (and the
// GEMM kernels' registers) round it. The caller then runs a 16-bit GEMM (cuBLAS / hipBLASLt
// through torch) on it: from a few hundred rows up, the fused kernels are bound by
// dequantising every weight tile once per row tile, and one pass that writes the 16-bit
// weight (4 bytes of traffic per weight more) costs less than that.
//
// One thread per packed word run: packed row i (channels 8i .. 8i + 7) and columns 4c ..
// 4c + 3 (one 16-byte load of the weight, the 4 columns' scales and zero points), writing 8
// rows of 4 columns (8-byte stores; a warp covers 128 consecutive columns of each row).
// Act-order (g_idx) reads each channel's group; without it the 8 channels of a word share one
// (group sizes are multiples of 8). Grid-stride loop, no shared memory, no host sync.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; ran on an H100 (2026-12-07): bit-exact against
// the reference (tests/ops/test_int4_gemm_cuda.py); N = K = 8192 dequantises in about 60 us, at
// copy bandwidth (bench/RESULTS.md). HIP build not run.

#include "common.cuh"

namespace kpt_int4 {

namespace {

constexpr int kDequantThreads = 256;

// The 4 columns' scales and zero points (as floats) of group g.
KPT_DEVICE void group_constants(const Params& p, int g, int col, float (&s)[4], float (&z)[4]) {
  kpt::int4_scales4(p.scales + (int64_t(g) * p.scales_row + col) * p.scale_bytes, p.scale_dtype,
                    s);
  if (p.zeros == nullptr) {
#pragma unroll
    for (int a = 0; a < 4; ++a) z[a] = float(kpt::kInt4SymmetricZero);
    return;
  }
  const uint32_t z4 = *reinterpret_cast<const uint32_t*>(p.zeros + int64_t(g) * p.zeros_row + col);
#pragma unroll
  for (int a = 0; a < 4; ++a) z[a] = float((z4 >> (8 * a)) & 0xffu);
}

template <class T>
__global__ void KPT_LAUNCH_BOUNDS(kDequantThreads, 1) dequant_kernel(Params p) {
  const int runs = p.n / 4;
  const int64_t total = int64_t(p.k / 8) * runs;
  const int64_t stride = int64_t(gridDim.x) * kDequantThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kDequantThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int i = int(idx / runs), col = int(idx % runs) * 4;
    const uint4 u = kpt::load16(p.packed + int64_t(i) * p.packed_row + col);
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
    float s[4], z[4];
    if (p.g_idx == nullptr) group_constants(p, (8 * i) >> p.group_shift, col, s, z);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (p.g_idx != nullptr) group_constants(p, group_of(p, 8 * i + j), col, s, z);
      float v[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) v[a] = kpt::int4_dequant<T>(words[a], j, z[a], s[a]);
      uint2 out;
      out.x = kpt::Half<T>::pack(v[0], v[1]);
      out.y = kpt::Half<T>::pack(v[2], v[3]);
      *reinterpret_cast<uint2*>(p.out + ((int64_t(8 * i + j)) * p.out_row + col) * 2) = out;
    }
  }
}

}  // namespace

int launch_dequant(const Params& p, int dtype, kpt::stream_t stream) {
  const int64_t total = int64_t(p.k / 8) * (p.n / 4);
  const int64_t blocks = (total + kDequantThreads - 1) / kDequantThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  if (dtype == KPT_INT4_BF16) {
    dequant_kernel<bf16><<<grid, kDequantThreads, 0, stream>>>(p);
  } else {
    dequant_kernel<fp16><<<grid, kDequantThreads, 0, stream>>>(p);
  }
  return static_cast<int>(kpt::last_error());
}

}  // namespace kpt_int4
