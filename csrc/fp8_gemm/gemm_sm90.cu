// kpt-targets: sm_90a
// fp8_gemm for Hopper: TMA loads into 128-byte-swizzled shared memory, an mbarrier ring, and
// fp8 wgmma (m64n128k32) with every 128-wide k-tile promoted into float32 accumulators.
//
// Persistent CTAs, one per SM (the launch is min(tiles, SMs) CTAs), each computing 128 x 128
// tiles of out blockIdx.x, + gridDim.x, ... in common.cuh's grouped order (the CTAs of one
// round share a few weight columns in L2). A CTA is three warpgroups:
//   warpgroup 0  producer: one thread issues, per k-tile of 128, the TMA loads of a's 128 rows
//                and w's 128 rows (128 codes = one 128-byte swizzle row each; rows past M / N
//                and codes past K are zero-filled by the TMA unit) into a kStages ring, each
//                stage guarded by a `full` (expect-tx) and an `empty` (consumer arrivals)
//                mbarrier, running on into the next tile while the consumers store this one;
//                it gives its registers to the consumers (setmaxnreg).
//   warpgroups 1, 2  consumers: 64 rows of the tile each. Per k-tile: four wgmma
//                m64n128k32 (both operands K-major from shared memory, the descriptor stepping
//                32 bytes inside the swizzled rows) into a fresh accumulator set, wait, release
//                the stage, then add that set into the float32 result: times a_scale(row,
//                k-tile) * w_scale(block, k-tile) where blockwise, as it is otherwise. Hopper's
//                fp8 tensor cores accumulate with about 14 mantissa bits (DeepGEMM's finding):
//                promoting every 128 products leaves that rounding on one k-tile's partial sum
//                (~2^-13 of it) instead of letting it grow with K, for every granularity, not
//                only the blockwise one (cuBLAS's default, use_fast_accum=False, also
//                promotes). While one consumer promotes, the other's wgmma keeps the tensor
//                cores busy.
// Epilogue: scales constant along K, bias and one rounding, straight from the accumulator
// registers (row g and g + 8 of each warp's 16, two columns per store).
//
// Every mbarrier wait is bounded (wait()): a TMA that never completes turns into a failed
// launch (an illegal-address CUDA error, see abort_launch), never a hang. The descriptor and
// barrier helpers are kpt/sm90.h's, shared with csrc/flash_attention_sm90 (hardware-verified
// there); both tiles are K-major SW128: SBO = 1024 bytes between 8-row groups, LBO unused (16).
//
// Standing: compiles for sm_90a (ptxas -v: no spills, no wgmma serialisation); ran on an H100
// (2026-12-07): its GPU tests pass; 0.65x torch._scaled_mm at 8192^3 per tensor.

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kpt/sm90.h"

namespace kpt_fp8 {

namespace {

constexpr int kBlockM = 128;  // two consumer warpgroups of wgmma M = 64
constexpr int kBlockN = 128;
constexpr int kBlockK = kScaleK;  // bytes of codes per row and k-tile: one 128-byte swizzle row
constexpr int kStages = 5;
constexpr int kThreads = 384;
constexpr int kTileBytes = kBlockM * kBlockK;  // a's and w's tile of one stage (16 KiB each)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kBarsOffset = kStages * kStageBytes;
constexpr int kSmemBytes = kBarsOffset + 8 * 2 * kStages;
// Dynamic shared memory is only guaranteed 16-byte aligned; the 128-byte swizzle needs 1024.
constexpr int kSmemAlloc = kSmemBytes + 1024;
static_assert(kBlockN == kBlockM, "one box shape serves a and w");
static_assert(kSmemAlloc <= 227 * 1024, "shared memory");

struct Sm90Params {
  CUtensorMap tma_a, tma_w;  // 2-D (k, rows) uint8 maps, box 128 x 128, 128-byte swizzle
  Args p;
};

// ---- PTX helpers -----------------------------------------------------------------------------

// mbarriers, TMA and wgmma come from kpt/sm90.h (shared with csrc/flash_attention_sm90).
using kpt::smem_addr;
using kpt::sm90::bar_arrive, kpt::sm90::bar_expect_tx, kpt::sm90::bar_init, kpt::sm90::wait;
using kpt::sm90::make_desc, kpt::sm90::pin, kpt::sm90::tma_load;
using kpt::sm90::wgmma_commit, kpt::sm90::wgmma_fence, kpt::sm90::wgmma_wait_all;

// D[64 x 128] (+)= A[64 x 32] B[32 x 128]^T, fp8 codes of TYPE, both from shared memory
// (K-major); scale-d = 0 overwrites D.
#define KPT_FP8_WGMMA_N128(TYPE)                                                                \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n128k32.f32." TYPE "." TYPE " "                            \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),              \
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),           \
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),           \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),           \
        "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
        "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),           \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),           \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),           \
        "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),           \
        "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                   \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

template <int kFmt>
__device__ __forceinline__ void wgmma_n128(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                           int accumulate) {
  if constexpr (kFmt == KPT_FP8_GEMM_E4M3) {
    KPT_FP8_WGMMA_N128("e4m3");
  } else {
    KPT_FP8_WGMMA_N128("e5m2");
  }
}
#undef KPT_FP8_WGMMA_N128

// ---- the kernel ------------------------------------------------------------------------------

// Barriers after the stages: full[s] at 16 s, empty[s] at 16 s + 8.
__device__ __forceinline__ uint32_t full_bar(uint32_t bars, int s) { return bars + 16 * s; }
__device__ __forceinline__ uint32_t empty_bar(uint32_t bars, int s) { return bars + 16 * s + 8; }

template <int kFmt, bool kBlock>
__global__ void __launch_bounds__(kThreads, 1) sm90_kernel(const __grid_constant__ Sm90Params q) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Compiled for another arch because several were asked for; the launcher runs this only
  // on sm_90, where the sm_90a cubin is picked.
  __trap();
#else
  const Args& p = q.p;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = base + kBarsOffset;

  const int64_t tiles_m = (p.m + kBlockM - 1) / kBlockM, tiles_n = (p.n + kBlockN - 1) / kBlockN;
  const int64_t tiles = tiles_m * tiles_n;
  const int k_tiles = int((p.k + kBlockK - 1) / kBlockK);

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      bar_init(full_bar(bars, s), 1);
      bar_init(empty_bar(bars, s), 2 * 128);  // every consumer thread releases a stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // Persistent CTAs: tiles blockIdx.x, + gridDim.x, ... (in grouped order, so the CTAs of one
  // round share weight columns in L2); the ring's use count `it` runs on across tiles.
  if (warpgroup == 0) {
    // ---- producer: runs up to kStages k-tiles ahead, into the next tile too ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    int64_t it = 0;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      int64_t tm, tn;
      grouped_tile(t, tiles_m, tiles_n, p.group_m, tm, tn);
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = int(it % kStages);
        const uint32_t free_parity = uint32_t((it / kStages) & 1) ^ 1;  // fresh: parity 1 passes
        wait(empty_bar(bars, s), free_parity);
        bar_expect_tx(full_bar(bars, s), kStageBytes);
        const uint32_t stage = base + s * kStageBytes;
        tma_load(stage, &q.tma_a, full_bar(bars, s), kt * kBlockK, int(tm * kBlockM));
        tma_load(stage + kTileBytes, &q.tma_w, full_bar(bars, s), kt * kBlockK, int(tn * kBlockN));
      }
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x - 128 * warpgroup;
  const int warp = tid / 32, lane = tid % 32;
  float acc[64], part[64];
  int64_t it = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int64_t tm, tn;
    grouped_tile(t, tiles_m, tiles_n, p.group_m, tm, tn);
    const int64_t m0 = tm * kBlockM, n0 = tn * kBlockN;
    // Accumulator layout of wgmma m64nN: rows r and r + 8, columns 8 j + 2 (lane % 4) + {0, 1}
    // in registers 4 j + {0, 1} and 4 j + {2, 3}.
    const int64_t row0 = m0 + wg * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = int(it % kStages);
      // Scales of this k-tile, loaded before the wait so that their latency hides under it.
      float f[2] = {1.f, 1.f};
      if constexpr (kBlock) {
        const float ws = w_block_scale(p, n0, kt);
        f[0] = a_block_scale(p, row0, kt) * ws;
        f[1] = a_block_scale(p, row0 + 8, kt) * ws;
      }
      wait(full_bar(bars, s), uint32_t((it / kStages) & 1));
      const uint32_t a_tile = base + s * kStageBytes + wg * 64 * kBlockK;
      const uint32_t w_tile = base + s * kStageBytes + kTileBytes;
      pin(part);
      wgmma_fence();
      // +32 bytes: the next 32 codes (one k32) along the swizzled rows.
#pragma unroll
      for (int kk = 0; kk < kBlockK / 32; ++kk) {
        wgmma_n128<kFmt>(part, make_desc(a_tile + 32 * kk, 16, 1024),
                         make_desc(w_tile + 32 * kk, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait_all();
      pin(part);
      bar_arrive(empty_bar(bars, s));
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        if constexpr (kBlock) {
          acc[i] = fmaf(part[i], f[(i / 2) % 2], acc[i]);
        } else {
          acc[i] += part[i];
        }
      }
    }

    // Epilogue (the producer meanwhile loads the next tile): the scales constant along K,
    // bias, one rounding; two columns per store.
    const int64_t col0 = n0 + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 8 * h;
      if (row >= p.m) continue;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int64_t col = col0 + 8 * j;
        if (col < p.n) store_pair(p, row, col, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], false);
      }
    }
  }
#endif
}

// ---- host side -------------------------------------------------------------------------------

// A 2-D map of `rows` rows of k codes (row stride `row_bytes`) whose box is 128 rows x 128
// codes in the 128-byte swizzle: boxes past the rows or past k are zero-filled.
int make_map(CUtensorMap* map, const void* ptr, int64_t rows, int64_t k, int64_t row_bytes) {
  const kpt::sm90::EncodeFn encode = kpt::sm90::tensor_map_encoder();
  if (encode == nullptr) return KPT_FP8_GEMM_NO_DRIVER_API;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {kBlockK, kBlockM};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims,
                              strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? 0 : KPT_FP8_GEMM_TENSOR_MAP;
}

template <int kFmt, bool kBlock>
int launch(const Sm90Params& q, int64_t ctas, cudaStream_t stream) {
  auto kernel = sm90_kernel<kFmt, kBlock>;
  // Above 48 KiB, dynamic shared memory must be opted into (per device; no stream work).
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemAlloc);
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemAlloc, stream>>>(q);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

}  // namespace kpt_fp8

extern "C" int kpt_fp8_gemm_sm90(const kpt_fp8_gemm_args* args, void* stream) {
  using namespace kpt_fp8;
  if (args == nullptr) return KPT_FP8_GEMM_BAD_ARGUMENT;
  const Args& p = *args;
  int code = check_args(p);
  if (code != 0 || p.m == 0) return code;
  if (p.impl != KPT_FP8_GEMM_IMPL_SM90 || p.block_m != kBlockM || p.block_n != kBlockN ||
      p.split_k != 1) {
    return KPT_FP8_GEMM_UNSUPPORTED;
  }
  // TMA: 16-byte aligned bases and row strides; coordinates are int32.
  if (!chunk_aligned(p) || p.m > 0x7fffffff || p.n > 0x7fffffff || p.k > 0x7fffffff) {
    return KPT_FP8_GEMM_BAD_ARGUMENT;
  }
  // One CTA per SM (shared memory allows no second), each walking its tiles.
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t tiles = ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  const int64_t ctas = tiles < sms ? tiles : sms;
  Sm90Params q;
  q.p = p;
  code = make_map(&q.tma_a, p.a, p.m, p.k, p.a_row);
  if (code == 0) code = make_map(&q.tma_w, p.w, p.n, p.k, p.w_row);
  if (code != 0) return code;
  const auto st = static_cast<cudaStream_t>(stream);
  const bool block = p.a_gran == KPT_FP8_GEMM_BLOCK || p.w_gran == KPT_FP8_GEMM_BLOCK;
  if (p.fmt == KPT_FP8_GEMM_E4M3) {
    return block ? launch<KPT_FP8_GEMM_E4M3, true>(q, ctas, st)
                 : launch<KPT_FP8_GEMM_E4M3, false>(q, ctas, st);
  }
  return block ? launch<KPT_FP8_GEMM_E5M2, true>(q, ctas, st)
               : launch<KPT_FP8_GEMM_E5M2, false>(q, ctas, st);
}
