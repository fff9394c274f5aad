// Tensor-core tiles of the moe grouped GEMMs (csrc/moe/gemm.cuh), CUDA sm_80+: mma.sync
// m16n8k16 with fp32 accumulators, cp.async multi-stage copies. The HIP build compiles only
// the stub launcher (its GEMMs are gemm_simt.cu).
//
// Shared memory: every stage holds block_m A rows and halves * block_n B rows of 128 bytes
// (64 bf16/fp16 values, or 128 fp8 codes), as 16-byte chunks with chunk c of row r at
// c ^ (r % 8): ldmatrix (8 rows of one chunk column) and the fp8 word loads (8 rows of 4
// lanes) then hit 32 distinct banks. kStages - 1 k-tiles are in flight while one is computed.
//
// 16-bit experts: fragments by ldmatrix, mma in x's dtype.
// fp8 experts: the codes are widened in registers to fp16 holding value / 2^8 (exact, e4m3
// subnormals included), and the mma runs in fp16. A k-tile of 128 is one scale block of both
// operands, so each k-tile accumulates into a temporary that is added to the result times
// a_scale(row) * b_scale(block) * 2^16. Each lane reads its 4 consecutive codes of a row as
// one word: the k order inside a k16 step is permuted (codes 4c..4c+3 stand for k = 2c, 2c+1,
// 2c+8, 2c+9 of the fragment), identically for A and B, so the dot products are unchanged.
//
// Epilogue: straight from the accumulator fragments, two values (4 bytes) per store.
//
// Standing: compiles for sm_90a and sm_80 without spills (ptxas -v); not yet run on a GPU.

#include "gemm.cuh"
#include "kpt/ptx.h"

namespace kpt_moe {

#if defined(KPT_CUDA)

namespace {

// Byte offset of chunk `chunk` of row `row` in a swizzled tile of 128-byte rows.
KPT_DEVICE int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

template <int kBM, int kBN, int kWM, int kWN, int kHalves, int kStages>
struct Tile {
  static constexpr int kThreads = 32 * kWM * kWN;
  static constexpr int kRows = kBM + kHalves * kBN;  // A rows, then B rows of each half
  static constexpr int kStageBytes = kRows * 128;
  static constexpr int kSmem = kStages * kStageBytes;
  static constexpr int TM = kBM / kWM, TN = kBN / kWN;  // one warp's rows and columns
  static constexpr int MI = TM / 16, NI = TN / 8;
  static_assert(TM % 16 == 0 && TN % 16 == 0, "warp tiles are whole m16 x (2 x n8) blocks");
  static_assert(kRows * 8 % kThreads == 0, "a stage's chunks split evenly over the threads");
};

// kMinBlocks: CTAs an SM should hold (the register budget ptxas gets).
template <class T, bool kFp8, int kBM, int kBN, int kWM, int kWN, int kHalves, int kStages,
          int kMinBlocks>
__global__ void __launch_bounds__(32 * kWM * kWN, kMinBlocks) mma_kernel(Gemm g) {
#if KPT_SM80
  using Cfg = Tile<kBM, kBN, kWM, kWN, kHalves, kStages>;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) char smem[];
  __shared__ Slot slots[kBM];
  // Where each tile row comes from (null: zero-fill). Kept in shared memory and read per copy:
  // the cp.async asm clobbers memory, so the compiler cannot hoist them into registers.
  __shared__ const char* row_src[Cfg::kRows];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / kWN, wn = warp % kWN;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= *g.num_padded) return;
  const int expert = g.block_expert[blockIdx.x];
  if (expert < 0) return;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  const char* b_base = g.b + int64_t(expert) * g.b_expert_bytes;
  for (int r = tid; r < Cfg::kRows; r += kThreads) {
    if (r < kBM) {
      const Slot sl = slot_of(g, m0 + r);
      slots[r] = sl;
      row_src[r] = sl.row >= 0 ? g.a + int64_t(sl.row) * g.a_row_bytes : nullptr;
    } else {
      const int j = r - kBM;
      const int64_t n = n0 + j % kBN;
      row_src[r] = n < g.n ? b_base + ((j / kBN) * g.up + n) * g.b_row_bytes : nullptr;
    }
  }
  __syncthreads();

  const int64_t k_bytes = g.k * (kFp8 ? 1 : 2);
  const int k_tiles = int((k_bytes + 127) / 128);

  // This thread copies chunk tid % 8 of rows tid / 8, tid / 8 + kThreads / 8, ...
  constexpr int kCopies = Cfg::kRows * 8 / kThreads;
  const int chunk = tid % 8, first_row = tid / 8;
  auto load = [&](int stage, int kt) {
    char* base = smem + stage * Cfg::kStageBytes;
    const int64_t kb = int64_t(kt) * 128 + chunk * 16;
    const bool k_ok = kb < k_bytes;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int r = first_row + i * (kThreads / 8);
      const char* src = row_src[r];
      const bool ok = k_ok && src != nullptr;
      kpt::cp_async16(base + swz(r, chunk), ok ? src + kb : g.b, ok);
    }
  };

  float acc[kHalves][MI][NI][4];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[h][mi][ni][q] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load(s, s);
    kpt::cp_async_commit();
  }

  const int grp = lane / 4, quad = lane % 4;
  for (int kt = 0; kt < k_tiles; ++kt) {
    kpt::cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int next = kt + kStages - 1;
      if (next < k_tiles) load(next % kStages, next);
      kpt::cp_async_commit();
    }
    const char* sa = smem + (kt % kStages) * Cfg::kStageBytes;
    const char* sb = sa + kBM * 128;
    if constexpr (!kFp8) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t af[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const int r = wm * TM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          kpt::ldsm_x4(af[mi], sa + swz(r, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
#pragma unroll
          for (int ni = 0; ni < NI; ni += 2) {
            uint32_t bf[4];
            const int r = h * kBN + wn * TN + ni * 8 + (lane & 7) + (lane >> 4) * 8;
            kpt::ldsm_x4(bf, sb + swz(r, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              kpt::mma_m16n8k16<T>(acc[h][mi][ni], af[mi], bf[0], bf[1]);
              kpt::mma_m16n8k16<T>(acc[h][mi][ni + 1], af[mi], bf[2], bf[3]);
            }
          }
        }
      }
    } else {
      // Scales of this k-tile: the thread's rows (grp and grp + 8 of each m16) and each half's
      // weight block; padding rows get 0 and read nothing.
      float rs[MI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int row = slots[wm * TM + mi * 16 + grp + 8 * q].row;
          rs[mi][q] = row >= 0 ? g.a_scale[int64_t(row) * g.a_scale_row + kt] * 65536.f : 0.f;
        }
      float bs[kHalves];
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const int64_t nb = (h * g.up + n0) / 128;
        bs[h] = g.b_scale[int64_t(expert) * g.b_scale_expert + nb * g.b_scale_row + kt];
      }
      float part[kHalves][MI][NI][4];
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) part[h][mi][ni][q] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        uint32_t af[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const int r = wm * TM + mi * 16 + grp;
          const uint32_t w0 = *reinterpret_cast<const uint32_t*>(sa + swz(r, kk) + 4 * quad);
          const uint32_t w1 =
              *reinterpret_cast<const uint32_t*>(sa + swz(r + 8, kk) + 4 * quad);
          e4m3x4_to_half(w0, af[mi][0], af[mi][2]);
          e4m3x4_to_half(w1, af[mi][1], af[mi][3]);
        }
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            const int r = h * kBN + wn * TN + ni * 8 + grp;
            const uint32_t w = *reinterpret_cast<const uint32_t*>(sb + swz(r, kk) + 4 * quad);
            uint32_t b0, b1;
            e4m3x4_to_half(w, b0, b1);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              kpt::mma_m16n8k16<fp16>(part[h][mi][ni], af[mi], b0, b1);
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q)
              acc[h][mi][ni][q] = fmaf(part[h][mi][ni][q], rs[mi][q / 2] * bs[h],
                                       acc[h][mi][ni][q]);
    }
  }
  kpt::cp_async_wait<0>();

  // Epilogue: c0, c1 of a fragment are row grp, columns 2 quad, 2 quad + 1; c2, c3 row grp + 8.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const Slot sl = slots[wm * TM + mi * 16 + grp + 8 * q];
      if (sl.row < 0) continue;
      char* out = g.c + int64_t(sl.out_row) * g.c_row_bytes;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int64_t col = n0 + wn * TN + ni * 8 + 2 * quad;
        if (col >= g.n) continue;
        float v0, v1;
        if constexpr (kHalves == 2) {
          v0 = gated(g.activation, acc[0][mi][ni][2 * q], acc[1][mi][ni][2 * q]);
          v1 = gated(g.activation, acc[0][mi][ni][2 * q + 1], acc[1][mi][ni][2 * q + 1]);
        } else {
          v0 = sl.weight * acc[0][mi][ni][2 * q];
          v1 = sl.weight * acc[0][mi][ni][2 * q + 1];
        }
        if (kHalves == 1 && g.c_fp32) {
          *reinterpret_cast<float2*>(out + col * 4) = make_float2(v0, v1);
        } else {
          *reinterpret_cast<uint32_t*>(out + col * 2) = kpt::Half<T>::pack(v0, v1);
        }
      }
    }
  }
#endif  // KPT_SM80
}

template <class T, bool kFp8, int kBM, int kBN, int kWM, int kWN, int kStages, int kMinBlocks>
int launch_tile(const Gemm& g, int halves, int64_t grid_x, kpt::stream_t stream) {
  const dim3 grid(unsigned(grid_x), unsigned((g.n + kBN - 1) / kBN));
  if (halves == 2) {
    using Cfg = Tile<kBM, kBN, kWM, kWN, 2, kStages>;
    auto kernel = mma_kernel<T, kFp8, kBM, kBN, kWM, kWN, 2, kStages, kMinBlocks>;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    if (err != cudaSuccess) return static_cast<int>(err);
    kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(g);
  } else {
    using Cfg = Tile<kBM, kBN, kWM, kWN, 1, kStages>;
    auto kernel = mma_kernel<T, kFp8, kBM, kBN, kWM, kWN, 1, kStages, kMinBlocks>;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    if (err != cudaSuccess) return static_cast<int>(err);
    kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(g);
  }
  return static_cast<int>(kpt::last_error());
}

// The instantiated tiles: (block_m, block_n) -> warps (M x N), stages, CTAs per SM.
template <class T, bool kFp8>
int launch_typed(const Gemm& g, int block_m, int block_n, int halves, int64_t grid_x,
                 kpt::stream_t stream) {
  if (block_m == 16 && block_n == 64) {
    return launch_tile<T, kFp8, 16, 64, 1, 4, 4, 4>(g, halves, grid_x, stream);
  }
  if (block_m == 64 && block_n == 64) {
    return launch_tile<T, kFp8, 64, 64, 2, 2, 3, kFp8 ? 2 : 3>(g, halves, grid_x, stream);
  }
  if constexpr (kFp8) {
    // Two accumulator sets (result and k-tile) bound fp8 to a 128 x 64 tile.
    if (block_m == 128 && block_n == 64) {
      return launch_tile<T, kFp8, 128, 64, 4, 2, 3, 1>(g, halves, grid_x, stream);
    }
  } else {
    if (block_m == 128 && block_n == 128) {
      return launch_tile<T, kFp8, 128, 128, 2, 4, 3, 1>(g, halves, grid_x, stream);
    }
  }
  return KPT_MOE_UNSUPPORTED;
}

}  // namespace

bool mma_tile(bool fp8, int block_m, int block_n) {
  if (block_n == 64 && (block_m == 16 || block_m == 64)) return true;
  return block_m == 128 && block_n == (fp8 ? 64 : 128);
}

int launch_gemm_mma(const Gemm& g, int dtype, bool fp8, int block_m, int block_n, int halves,
                    int64_t grid_x, kpt::stream_t stream) {
  if (dtype == KPT_MOE_BF16) {
    return fp8 ? launch_typed<bf16, true>(g, block_m, block_n, halves, grid_x, stream)
               : launch_typed<bf16, false>(g, block_m, block_n, halves, grid_x, stream);
  }
  return fp8 ? launch_typed<fp16, true>(g, block_m, block_n, halves, grid_x, stream)
             : launch_typed<fp16, false>(g, block_m, block_n, halves, grid_x, stream);
}

#else  // KPT_HIP: no tensor-core tiles; the launcher runs gemm_simt.cu

bool mma_tile(bool, int, int) { return false; }

int launch_gemm_mma(const Gemm&, int, bool, int, int, int, int64_t, kpt::stream_t) {
  return KPT_MOE_UNSUPPORTED;
}

#endif

}  // namespace kpt_moe
