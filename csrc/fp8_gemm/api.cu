// kpt_fp8_gemm: checks the arguments, runs the tiles of the requested implementation
// (gemm_mma.cu or gemm_simt.cu) and, with a K split, the reduce kernel that sums the float32
// partial tiles in split order (deterministic) and applies the epilogue.
//
// Nothing is read back and the workspace is the caller's: safe inside CUDA graph capture.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; ran on an H100 (2026-12-07): its GPU tests pass (HIP build not run).

#include "common.cuh"

namespace kpt_fp8 {

namespace {

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceMaxBlocks = 4096;

// out[row, col..col+1] = epilogue(sum over splits of partial[split, row, col..col+1]).
__global__ void KPT_LAUNCH_BOUNDS(kReduceThreads, 1) reduce_kernel(const Args p, int splits) {
  const int64_t half_n = p.n / 2, pairs = p.m * half_n, mn = p.m * p.n;
  for (int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; i < pairs;
       i += int64_t(gridDim.x) * kReduceThreads) {
    const int64_t row = i / half_n, col = (i % half_n) * 2;
    const float* src = p.workspace + row * p.n + col;
    float2 sum = make_float2(0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      const float2 v = *reinterpret_cast<const float2*>(src + s * mn);
      sum.x += v.x;
      sum.y += v.y;
    }
    store_pair(p, row, col, sum.x, sum.y, false);
  }
}

}  // namespace

}  // namespace kpt_fp8

extern "C" int kpt_fp8_gemm_tile_supported(int impl, int block_m, int block_n) {
  if (impl == KPT_FP8_GEMM_IMPL_MMA) return kpt_fp8::mma_tile(block_m, block_n) ? 1 : 0;
  if (impl == KPT_FP8_GEMM_IMPL_SIMT) return kpt_fp8::simt_tile(block_m, block_n) ? 1 : 0;
  return 0;
}

extern "C" int kpt_fp8_gemm(const kpt_fp8_gemm_args* args, void* stream) {
  using namespace kpt_fp8;
  if (args == nullptr) return KPT_FP8_GEMM_BAD_ARGUMENT;
  const Args& p = *args;
  int code = check_args(p);
  if (code != 0 || p.m == 0) return code;
  const auto st = static_cast<kpt::stream_t>(stream);
  if (p.impl == KPT_FP8_GEMM_IMPL_SIMT) {
    if (p.split_k != 1) return KPT_FP8_GEMM_UNSUPPORTED;
    return launch_simt(p, st);
  }
  if (p.impl != KPT_FP8_GEMM_IMPL_MMA || !mma_tile(p.block_m, p.block_n)) {
    return KPT_FP8_GEMM_UNSUPPORTED;
  }
  if (!chunk_aligned(p)) return KPT_FP8_GEMM_BAD_ARGUMENT;
  int per_split, splits;
  split_plan(p.k, p.split_k, per_split, splits);
  code = launch_mma(p, per_split, splits, st);
  if (code != 0 || splits == 1) return code;
  const int64_t pairs = p.m * (p.n / 2);
  int64_t blocks = (pairs + kReduceThreads - 1) / kReduceThreads;
  if (blocks > kReduceMaxBlocks) blocks = kReduceMaxBlocks;
  reduce_kernel<<<unsigned(blocks), kReduceThreads, 0, st>>>(p, splits);
  return static_cast<int>(kpt::last_error());
}
