// Tensor-core tiles of fp8_gemm, CUDA sm_80+: mma.sync with float32 accumulators, cp.async
// multi-stage copies. The HIP build compiles only the stub launcher (its tiles: gemm_simt.cu).
//
// A CTA owns a block_m x block_n tile of out (launch order: common.cuh's grouped_tile) and the
// k-tiles of its K split (grid y). Every stage holds block_m rows of a and block_n rows of w of
// 128 codes each (one k-tile = one block scale along K), as 16-byte chunks with chunk c of row
// r at c ^ (r % 8): ldmatrix (8 rows of one chunk column) hits 32 distinct banks. kStages - 1
// k-tiles are in flight while one is computed. Rows past M or N and chunks past K are
// zero-filled by cp.async (nothing outside the tensors is read; K is a multiple of 16, so a
// chunk is wholly inside or outside).
//
// Fragments: ldmatrix.x4 of 8-bit data gives lane l the 4 consecutive codes 4 (l % 4) .. +3
// of row l / 4 of each 8 x 16-byte matrix, which is mma.m16n8k32's fragment for 8-bit types
// (A: registers {rows g, g + 8} x {k 0-15, 16-31}; B: n = g, k 4t.. and 16 + 4t..).
//   sm_89+: mma.sync.m16n8k32 .e4m3 / .e5m2 straight from those registers (Ada runs it
//           natively; on Hopper ptxas lowers it to exact conversions and f16 mma);
//   sm_80:  each 4-code word is widened in registers to two fp16x2 words (common.cuh: exact;
//           e4m3 as value / 2^8, the factor 2^16 of a product given back in float32), and the
//           k32 step runs as two m16n8k16 f16 mmas. Codes 4t..4t+3 stand for the k16 slots
//           2t, 2t+1, 2t+8, 2t+9, identically for A and B, so the dot products are unchanged.
//           An e4m3 NaN code (0x7f / 0xff) counts as +-1.875 there: NaN reaches the output
//           only through the scales (quantize_fp8 gives a block holding NaN a NaN scale).
//
// Scales: per tensor and per row / channel the K sum accumulates in one float32 accumulator and
// the epilogue multiplies it. Blockwise, each k-tile's product goes to a fresh accumulator set,
// which is added to the result times a_scale(row, k-tile) * w_scale(128 rows, k-tile): two sets
// of accumulators, hence the register-bound tile sizes.
//
// Epilogue: straight from the accumulator fragments, two columns per store; with a K split,
// float32 partial tiles to the workspace, summed in split order by api.cu's reduce kernel.
//
// Standing: compiles for sm_90a and sm_80 (ptxas -v: no spills); ran on an H100 (2026-12-07): its GPU tests pass.

#include "common.cuh"
#include "kpt/ptx.h"

namespace kpt_fp8 {

#if defined(KPT_CUDA)

namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define KPT_FP8_NATIVE 1
#else
#define KPT_FP8_NATIVE 0
#endif

#if KPT_SM80
#if KPT_FP8_NATIVE
// The k32 fragments as loaded: A {a0, a1, a2, a3}, B {b0, b1} (see the file comment).
struct AFrag {
  uint32_t r[4];
};
struct BFrag {
  uint32_t r[2];
};

template <int kFmt>
KPT_DEVICE AFrag make_a(const uint32_t (&raw)[4]) {
  return AFrag{{raw[0], raw[1], raw[2], raw[3]}};
}

template <int kFmt>
KPT_DEVICE BFrag make_b(uint32_t b0, uint32_t b1) {
  return BFrag{{b0, b1}};
}

template <int kFmt>
KPT_DEVICE void mma(float (&c)[4], const AFrag& a, const BFrag& b) {
  if constexpr (kFmt == KPT_FP8_GEMM_E4M3) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
}

// What a product of two codes' mma values is worth: 1 (exact values).
template <int kFmt>
constexpr float kUnit = 1.f;
#else
// Two m16n8k16 f16 fragments: r[0] the k16 step over codes 0-15, r[1] over 16-31.
struct AFrag {
  uint32_t r[2][4];
};
struct BFrag {
  uint32_t r[2][2];
};

template <int kFmt>
KPT_DEVICE void widen(uint32_t w, uint32_t& lo, uint32_t& hi) {
  if constexpr (kFmt == KPT_FP8_GEMM_E4M3) {
    widen_e4m3(w, lo, hi);
  } else {
    widen_e5m2(w, lo, hi);
  }
}

// f16 A fragment of m16n8k16: {row g slots 2t,2t+1; row g+8 same; row g slots 2t+8,2t+9;
// row g+8 same} = {lo(row g), lo(row g+8), hi(row g), hi(row g+8)}.
template <int kFmt>
KPT_DEVICE AFrag make_a(const uint32_t (&raw)[4]) {
  AFrag f;
  uint32_t lo[4], hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) widen<kFmt>(raw[i], lo[i], hi[i]);
  f.r[0][0] = lo[0];
  f.r[0][1] = lo[1];
  f.r[0][2] = hi[0];
  f.r[0][3] = hi[1];
  f.r[1][0] = lo[2];
  f.r[1][1] = lo[3];
  f.r[1][2] = hi[2];
  f.r[1][3] = hi[3];
  return f;
}

// f16 B fragment of m16n8k16: {slots 2t,2t+1; slots 2t+8,2t+9} of column g.
template <int kFmt>
KPT_DEVICE BFrag make_b(uint32_t b0, uint32_t b1) {
  BFrag f;
  widen<kFmt>(b0, f.r[0][0], f.r[0][1]);
  widen<kFmt>(b1, f.r[1][0], f.r[1][1]);
  return f;
}

template <int kFmt>
KPT_DEVICE void mma(float (&c)[4], const AFrag& a, const BFrag& b) {
  kpt::mma_m16n8k16<fp16>(c, a.r[0], b.r[0][0], b.r[0][1]);
  kpt::mma_m16n8k16<fp16>(c, a.r[1], b.r[1][0], b.r[1][1]);
}

// e4m3 values are widened as value / 2^8: a product counts 2^-16.
template <int kFmt>
constexpr float kUnit = kFmt == KPT_FP8_GEMM_E4M3 ? 65536.f : 1.f;
#endif  // KPT_FP8_NATIVE
#endif  // KPT_SM80

// Byte offset of chunk `chunk` of row `row` in a swizzled tile of 128-byte rows.
KPT_DEVICE int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// A warp's accumulator fragments (MI x NI m16n8 tiles), all to 0.
template <int MI, int NI>
KPT_DEVICE void zero(float (&c)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) c[mi][ni][q] = 0.f;
}

template <int kBM, int kBN, int kWM, int kWN, int kStages>
struct Tile {
  static constexpr int kThreads = 32 * kWM * kWN;
  static constexpr int kRows = kBM + kBN;  // a rows, then w rows
  static constexpr int kStageBytes = kRows * 128;
  static constexpr int kSmem = kStages * kStageBytes;
  static constexpr int TM = kBM / kWM, TN = kBN / kWN;  // one warp's rows and columns
  static constexpr int MI = TM / 16, NI = TN / 8;
  static_assert(TM % 16 == 0 && TN % 16 == 0, "warp tiles are whole m16 x (2 x n8) blocks");
  static_assert(kRows * 8 % kThreads == 0, "a stage's chunks split evenly over the threads");
  static_assert(kBN <= kScaleK && kScaleK % kBN == 0, "a tile's columns share one w block");
};

// kMinBlocks: CTAs an SM should hold (the register budget ptxas gets).
template <int kFmt, bool kBlock, int kBM, int kBN, int kWM, int kWN, int kStages, int kMinBlocks>
__global__ void __launch_bounds__(32 * kWM * kWN, kMinBlocks)
    mma_kernel(const Args p, int per_split) {
#if KPT_SM80
  using Cfg = Tile<kBM, kBN, kWM, kWN, kStages>;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / kWN, wn = warp % kWN;
  const int grp = lane / 4, quad = lane % 4;
  int64_t tm, tn;
  grouped_tile(blockIdx.x, (p.m + kBM - 1) / kBM, (p.n + kBN - 1) / kBN, p.group_m, tm, tn);
  const int64_t m0 = tm * kBM, n0 = tn * kBN;
  int kt_begin, kt_end;
  split_range(p.k, per_split, blockIdx.y, kt_begin, kt_end);
  const int k_tiles = kt_end - kt_begin;

  // This thread copies chunk tid % 8 of tile rows tid / 8, tid / 8 + kThreads / 8, ...
  constexpr int kCopies = Cfg::kRows * 8 / kThreads;
  const int chunk = tid % 8, first_row = tid / 8;
  const char* a = static_cast<const char*>(p.a);
  const char* w = static_cast<const char*>(p.w);
  auto load = [&](int stage, int kt) {
    char* base = smem + stage * Cfg::kStageBytes;
    const int64_t kb = int64_t(kt) * kScaleK + chunk * 16;
    const bool k_ok = kb < p.k;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int r = first_row + i * (kThreads / 8);
      const bool is_a = r < kBM;
      const int64_t row = is_a ? m0 + r : n0 + (r - kBM);
      const bool ok = k_ok && row < (is_a ? p.m : p.n);
      const char* src = is_a ? a + row * p.a_row + kb : w + row * p.w_row + kb;
      kpt::cp_async16(base + swz(r, chunk), ok ? src : a, ok);
    }
  };

  float acc[MI][NI][4];
  zero(acc);

  // One k-tile (4 k32 steps) of c += a_tile w_tile^T from shared memory.
  auto compute = [&](float (&c)[MI][NI][4], const char* sa, const char* sb) {
#pragma unroll 1
    for (int s = 0; s < 4; ++s) {
      AFrag af[MI];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        uint32_t raw[4];
        const int r = wm * TM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        kpt::ldsm_x4(raw, sa + swz(r, 2 * s + (lane >> 4)));
        af[mi] = make_a<kFmt>(raw);
      }
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        uint32_t raw[4];
        const int r = wn * TN + ni * 8 + (lane & 7) + (lane >> 4) * 8;
        kpt::ldsm_x4(raw, sb + swz(r, 2 * s + ((lane >> 3) & 1)));
        const BFrag b0 = make_b<kFmt>(raw[0], raw[1]);
        const BFrag b1 = make_b<kFmt>(raw[2], raw[3]);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma<kFmt>(c[mi][ni], af[mi], b0);
          mma<kFmt>(c[mi][ni + 1], af[mi], b1);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load(s, kt_begin + s);
    kpt::cp_async_commit();
  }

  for (int it = 0; it < k_tiles; ++it) {
    kpt::cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int next = it + kStages - 1;
      if (next < k_tiles) load(next % kStages, kt_begin + next);
      kpt::cp_async_commit();
    }
    const char* sa = smem + (it % kStages) * Cfg::kStageBytes;
    const char* sb = sa + kBM * 128;
    if constexpr (kBlock) {
      // This k-tile's scales: the thread's rows (g and g + 8 of each m16; 1 past M) and the
      // w block of the tile's columns, loaded before the products so their latency hides.
      const int kt = kt_begin + it;
      float rs[MI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          rs[mi][q] = a_block_scale(p, m0 + wm * TM + mi * 16 + grp + 8 * q, kt);
        }
      const float ws = w_block_scale(p, n0, kt) * kUnit<kFmt>;
      float part[MI][NI][4];
      zero(part);
      compute(part, sa, sb);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[mi][ni][q] = fmaf(part[mi][ni][q], rs[mi][q / 2] * ws, acc[mi][ni][q]);
          }
    } else {
      compute(acc, sa, sb);
    }
  }
  kpt::cp_async_wait<0>();

  // Epilogue: c0, c1 of a fragment are row g, columns 2 quad, 2 quad + 1; c2, c3 row g + 8.
  const float unit = kBlock ? 1.f : kUnit<kFmt>;
  float* partial = gridDim.y > 1 ? p.workspace + int64_t(blockIdx.y) * p.m * p.n : nullptr;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t row = m0 + wm * TM + mi * 16 + grp + 8 * q;
      if (row >= p.m) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int64_t col = n0 + wn * TN + ni * 8 + 2 * quad;
        if (col >= p.n) continue;
        const float v0 = acc[mi][ni][2 * q] * unit, v1 = acc[mi][ni][2 * q + 1] * unit;
        if (partial != nullptr) {
          *reinterpret_cast<float2*>(partial + row * p.n + col) = make_float2(v0, v1);
        } else {
          store_pair(p, row, col, v0, v1, false);
        }
      }
    }
  }
#endif  // KPT_SM80
}

template <int kFmt, bool kBlock, int kBM, int kBN, int kWM, int kWN, int kStages, int kMinBlocks>
int launch_tile(const Args& p, int per_split, int splits, kpt::stream_t stream) {
  using Cfg = Tile<kBM, kBN, kWM, kWN, kStages>;
  const int64_t tiles = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
  if (tiles > 0x7fffffff) return KPT_FP8_GEMM_UNSUPPORTED;
  auto kernel = mma_kernel<kFmt, kBlock, kBM, kBN, kWM, kWN, kStages, kMinBlocks>;
  // Above 48 KiB, dynamic shared memory must be opted into (per device; no stream work, so
  // fine under graph capture).
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p, per_split);
  return static_cast<int>(kpt::last_error());
}

// The instantiated tiles: (block_m, block_n) -> warps (M x N), stages, CTAs per SM. Shared
// memory per CTA: 60, 64, 96 and 96 KiB (Ada allows 99 KiB).
template <int kFmt, bool kBlock>
int launch_typed(const Args& p, int per_split, int splits, kpt::stream_t stream) {
  const int bm = p.block_m, bn = p.block_n;
  if (bm == 16 && bn == 64) {
    return launch_tile<kFmt, kBlock, 16, 64, 1, 4, 6, 3>(p, per_split, splits, stream);
  }
  if (bm == 64 && bn == 64) {
    return launch_tile<kFmt, kBlock, 64, 64, 2, 2, 4, 2>(p, per_split, splits, stream);
  }
  if (bm == 64 && bn == 128) {
    return launch_tile<kFmt, kBlock, 64, 128, 2, 4, 4, 1>(p, per_split, splits, stream);
  }
  if (bm == 128 && bn == 128) {
    return launch_tile<kFmt, kBlock, 128, 128, 2, 4, 3, 1>(p, per_split, splits, stream);
  }
  return KPT_FP8_GEMM_UNSUPPORTED;
}

}  // namespace

bool mma_tile(int block_m, int block_n) {
  return (block_m == 16 && block_n == 64) || (block_m == 64 && block_n == 64) ||
         (block_m == 64 && block_n == 128) || (block_m == 128 && block_n == 128);
}

int launch_mma(const Args& p, int per_split, int splits, kpt::stream_t stream) {
  const bool block = p.a_gran == KPT_FP8_GEMM_BLOCK || p.w_gran == KPT_FP8_GEMM_BLOCK;
  if (p.fmt == KPT_FP8_GEMM_E4M3) {
    return block ? launch_typed<KPT_FP8_GEMM_E4M3, true>(p, per_split, splits, stream)
                 : launch_typed<KPT_FP8_GEMM_E4M3, false>(p, per_split, splits, stream);
  }
  return block ? launch_typed<KPT_FP8_GEMM_E5M2, true>(p, per_split, splits, stream)
               : launch_typed<KPT_FP8_GEMM_E5M2, false>(p, per_split, splits, stream);
}

#else  // KPT_HIP: no tensor-core tiles; the launcher runs gemm_simt.cu

bool mma_tile(int, int) { return false; }

int launch_mma(const Args&, int, int, kpt::stream_t) { return KPT_FP8_GEMM_UNSUPPORTED; }

#endif

}  // namespace kpt_fp8
