// Tensor-core tiles of int4_gemm, CUDA sm_80+: mma.sync m16n8k16 (bf16 or fp16, float32
// accumulators), the 4-bit weight dequantised in registers. The HIP build compiles only the
// stub launcher (its tiles are gemm_simt.cu).
//
// Layout to fragments, with kpt's packed layout kept as it is (no offline reordering):
//   * k order. Within a block of 32 input channels, lane (g = lane / 4, t = lane % 4) owns
//     the 8 channels 8t .. 8t + 7, i.e. one packed word per column. The mma's k slots are a
//     permutation of the channels, the same for x and w, which leaves every dot product as
//     it is: step s (0, 1) puts channels 8t + 4s + {0, 1} in slots 2t, 2t + 1 and 8t + 4s +
//     {2, 3} in slots 2t + 8, 2t + 9. So nibbles 4s .. 4s + 3 of a word are the B fragment
//     of step s, and the A fragments of both steps are one 16-byte shared-memory load per row.
//   * n order. Within a run of 32 columns, n8 tile a (0..3) puts column 4j + a at mma column
//     j. Lane (g, t) then needs columns 4g .. 4g + 3 of a packed row: one 16-byte load gives
//     the B words of all four tiles, and the scales and zeros of those 4 columns come as one
//     16-byte (4-byte) load. The accumulators of lane (g, t) hold columns 8t .. 8t + 7 of
//     rows g and g + 8: one 16-byte store per row.
//   * dequantisation (kpt/int4.h), exact to the contract (w = round(float32(q - z) *
//     float32(s))): the nibble j of a word (j < 4; nibbles 4..7 after one 16-bit shift) is
//     OR-ed in place into the mantissa of a float of exponent 2^(23 - 4j), which gives
//     2^(23 - 4j) + q exactly (one LOP3, no shift, no int-to-float); subtracting
//     2^(23 - 4j) + z (a per-column constant, exact) leaves q - z exactly, then one FMUL by
//     the float32 scale and one round-to-nearest conversion per pair
//     (cvt.rn.{bf16x2,f16x2}.f32): the reference's rounding points, for float32, float16 and
//     bfloat16 scales alike. 3.6 ALU operations per weight (sm_90a SASS of the 16 x 128
//     tile, per k32 block and warp: 32 LOP3, 32 FADD, 32 FMUL, 16 F2FP, 4 SHF, 8 HMMA,
//     3 LDS.128 and ~25 moves into the A fragments).
//   * act-order (g_idx): the stage also holds g_idx of its channels, and each weight looks
//     up its own scale and zero in global memory (L1/L2): the slow path, correct first.
//
// Pipeline: kStages shared-memory stages filled by cp.async (x tile, packed tile; the scale
// and zero rows of the groups that start in the stage, or the stage's g_idx), kStages - 1 in
// flight while one is computed. Swizzles make every 16-byte shared load conflict-free: x rows
// XOR chunk by (row & 1) * 4, packed rows by (row & 3) * 2.
//
// Tiles (block_m x block_n, K step, warps M x N x K): 16 x 128 and 16 x 256 for decode (the
// weight stream is the bound; the 16 x 128 tile splits each stage's k blocks over two warp
// groups and adds their sums through shared memory at the end, in a fixed order), 64 x 128,
// 128 x 128 and 128 x 256 for prefill. Split-K (grid.y) writes float32 partial sums that
// launch.cu's reduce kernel adds in share order: deterministic, no atomics.
//
// Standing: compiles for sm_90a and sm_80 (ptxas -v: no spills); ran on an H100 (2026-12-07): its GPU tests pass.

#include <type_traits>

#include "common.cuh"
#include "kpt/ptx.h"

namespace kpt_int4 {

#if defined(KPT_CUDA)

namespace {

// The instantiated tiles: block_m, block_n, K step (launch_typed below instantiates each;
// kpt/ops/int4_gemm/_cuda.py's MMA_TILES lists the same).
constexpr int kTiles[][3] = {{16, 128, 128}, {16, 256, 128}, {64, 128, 64}, {128, 128, 64},
                             {128, 256, 64}};

constexpr int tile_k_of(int block_m, int block_n) {
  for (const auto& tile : kTiles) {
    if (tile[0] == block_m && tile[1] == block_n) return tile[2];
  }
  return 0;
}

template <int BM, int BN, int BK, int WM, int WN, int WK, int kStages>
struct Tile {
  static constexpr int kWarps = WM * WN * WK;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int TM = BM / WM, TN = BN / WN;  // one warp's rows and columns
  static constexpr int MI = TM / 16, NC = TN / 32;  // its m16 tiles and 32-column runs
  static constexpr int KB = BK / 32;                // k32 blocks per stage
  static constexpr int kA = BM * BK * 2;            // x tile
  static constexpr int kB = BK / 8 * BN * 4;        // packed tile
  static constexpr int kS = KB * BN * 4;            // scale rows (float32 at most), or g_idx
  static constexpr int kZ = KB * BN;                // zero rows
  static constexpr int kStage = kA + kB + kS + kZ;
  static constexpr int kSmem = kStages * kStage;
  static constexpr int kReduce = (WK - 1) * WM * WN * 32 * MI * NC * 16 * 4;
  static_assert(TM % 16 == 0 && TN % 32 == 0, "warp tiles are m16 x 32-column runs");
  static_assert(BK % 64 == 0 && KB % WK == 0, "x rows of >= 128 bytes; k blocks per warp");
  static_assert(BM * BK / 8 % kThreads == 0 && BK / 8 * BN / 4 % kThreads == 0,
                "a stage's 16-byte chunks split evenly over the threads");
  static_assert(BK * 4 <= kS, "act-order's g_idx of a stage fits the scale rows");
  static_assert(kReduce <= kSmem, "the k-warp sums fit the pipeline's shared memory");
  static_assert(tile_k_of(BM, BN) == BK, "a tile of kTiles, with its K step");
};

// kMinBlocks: CTAs an SM should hold (the register budget ptxas gets). kAct: act-order (its
// own instantiation, so that the common path carries none of its code or registers).
template <class T, bool kAct, int BM, int BN, int BK, int WM, int WN, int WK, int kStages,
          int kMinBlocks>
__global__ void __launch_bounds__(32 * WM * WN * WK, kMinBlocks) mma_kernel(Params p) {
#if KPT_SM80
  using C = Tile<BM, BN, BK, WM, WN, WK, kStages>;
  constexpr int MI = C::MI, NC = C::NC, KB = C::KB, kThreads = C::kThreads;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wk = warp / (WM * WN), wmn = warp % (WM * WN);
  const int wm = wmn / WN, wn = wmn % WN;
  const int g = lane / 4, t = lane % 4;

  int tm, tn;
  tile_of(blockIdx.x, int((p.m + BM - 1) / BM), (p.n + BN - 1) / BN, tm, tn);
  const int64_t m0 = int64_t(tm) * BM;
  const int n0 = tn * BN;
  const int share = blockIdx.y;
  const int k_begin = share * p.k_per_split;
  const int k_end = min(p.k, k_begin + p.k_per_split);
  const int tiles = (k_end - k_begin + BK - 1) / BK;
  const int es = p.scale_bytes;
  const int group_mask = (1 << p.group_shift) - 1;

  // This thread's 16-byte copies of each stage, the same every stage: x chunk xc of rows xr,
  // xr + kXRows, ...; packed chunk wc of rows wr, wr + kWRows, ... (the row steps are even and
  // multiples of 4, so the swizzle of every copy is the first one's).
  constexpr int kXChunks = BK / 8, kWChunks = BN / 4;
  constexpr int kXRows = kThreads / kXChunks, kWRows = kThreads / kWChunks;
  static_assert(kThreads % kXChunks == 0 && BM % kXRows == 0 && kThreads % kWChunks == 0 &&
                    BK / 8 % kWRows == 0,
                "the copies of a stage split evenly over the threads");
  static_assert(kXRows % 2 == 0 && kWRows % 4 == 0, "copies keep their swizzle");
  const int xr = tid / kXChunks, xc = tid % kXChunks;
  const int wr = tid / kWChunks, wc = tid % kWChunks;
  const int x_dst = xr * (BK * 2) + ((xc ^ ((xr & 1) << 2)) << 4);
  const int w_dst = C::kA + wr * (BN * 4) + ((wc ^ ((wr & 3) << 1)) << 4);
  const char* x_src = p.x + ((m0 + xr) * p.x_row + k_begin + xc * 8) * 2;
  const int32_t* w_src = p.packed + int64_t(k_begin / 8 + wr) * p.packed_row + n0 + wc * 4;
  const bool w_col_ok = n0 + wc * 4 < p.n;

  // One stage: x rows m0.., packed rows and columns n0.., and either the scale / zero rows of
  // the groups this stage's channels fall in (only where one of them starts here or this is
  // the share's first stage: elsewhere the group is the previous stage's, whose constants the
  // threads still hold) or act-order's g_idx. Out-of-range chunks are zero-filled.
  auto load = [&](int stage, int kt) {
    char* sa = smem + stage * C::kStage;
    char* ss = sa + C::kA + C::kB;
    char* sz = ss + C::kS;
    const int k0 = k_begin + kt * BK;
    const bool x_k_ok = k0 + xc * 8 < k_end;
#pragma unroll
    for (int i = 0; i < BM / kXRows; ++i) {
      const bool ok = x_k_ok && m0 + xr + i * kXRows < p.m;
      const char* src = x_src + (int64_t(kt) * BK + int64_t(i) * kXRows * p.x_row) * 2;
      kpt::cp_async16(sa + x_dst + i * kXRows * (BK * 2), ok ? src : p.x, ok);
    }
#pragma unroll
    for (int i = 0; i < BK / 8 / kWRows; ++i) {
      const bool ok = w_col_ok && k0 / 8 + wr + i * kWRows < k_end / 8;
      const int32_t* src = w_src + (int64_t(kt) * (BK / 8) + i * kWRows) * p.packed_row;
      kpt::cp_async16(sa + w_dst + i * kWRows * (BN * 4), ok ? src : p.packed, ok);
    }
    if constexpr (kAct) {
      for (int i = tid; i < BK / 4; i += kThreads) {
        const int k = k0 + i * 4;
        const bool ok = k < k_end;
        kpt::cp_async16(ss + i * 16, ok ? p.g_idx + k : p.g_idx, ok);
      }
    } else if (kt == 0 || (k0 & group_mask) == 0) {
      const int g0 = k0 >> p.group_shift;
      const int rows = ((min(k0 + BK, k_end) - 1) >> p.group_shift) - g0 + 1;
      for (int idx = tid; idx < rows * (BN / 4); idx += kThreads) {
        const int r = idx / (BN / 4), c = idx % (BN / 4);
        const int grp = g0 + r, col = n0 + c * 4;
        const bool ok = grp < p.groups && col < p.n;
        const char* src = ok ? p.scales + (int64_t(grp) * p.scales_row + col) * es : p.scales;
        char* dst = ss + (r * BN + c * 4) * es;
        if (es == 4) {
          kpt::cp_async_ca<16>(dst, src, ok);
        } else {
          kpt::cp_async_ca<8>(dst, src, ok);
        }
        if (p.zeros != nullptr) {
          kpt::cp_async_ca<4>(sz + r * BN + c * 4,
                              ok ? p.zeros + int64_t(grp) * p.zeros_row + col : p.zeros, ok);
        }
      }
    }
  };

  float acc[MI][NC][4][4];
  // f(accumulator, its index in row-major order) for each of this thread's accumulators.
  auto each_acc = [&](auto f) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int nc = 0; nc < NC; ++nc)
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int q = 0; q < 4; ++q) f(acc[mi][nc][a][q], ((mi * NC + nc) * 4 + a) * 4 + q);
  };
  each_acc([](float& v, int) { v = 0.f; });

  // The scale and 2^(23 - 4j) + zero of this thread's columns (4 per run) in group cur_group.
  float sc[NC][4], cz[NC][4][4];
  int cur_group = -1;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load(s, s);
    kpt::cp_async_commit();
  }

  for (int kt = 0; kt < tiles; ++kt) {
    kpt::cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int next = kt + kStages - 1;
      if (next < tiles) load(next % kStages, next);
      kpt::cp_async_commit();
    }
    const char* sa = smem + (kt % kStages) * C::kStage;
    const char* sb = sa + C::kA;
    const char* ss = sb + C::kB;
    const char* sz = ss + C::kS;
    const int k0 = k_begin + kt * BK;
#pragma unroll
    for (int kq = 0; kq < KB / WK; ++kq) {
      const int kb = kq * WK + wk;   // k32 blocks wk, wk + WK, ... of the stage
      const int kk = k0 + kb * 32;  // the block's first channel
      if (kk >= k_end) break;

      // The group's constants, when it changed (a group starts here or the share does).
      if constexpr (!kAct) {
        const int grp = kk >> p.group_shift;
        if (grp != cur_group) {
          cur_group = grp;
          const int row = grp - (k0 >> p.group_shift);
#pragma unroll
          for (int nc = 0; nc < NC; ++nc) {
            const int col = (wn * NC + nc) * 32 + 4 * g;
            kpt::int4_scales4(ss + (row * BN + col) * es, p.scale_dtype, sc[nc]);
            const uint32_t z4 = p.zeros != nullptr
                                    ? *reinterpret_cast<const uint32_t*>(sz + row * BN + col)
                                    : 0x01010101u * kpt::kInt4SymmetricZero;
            kpt::int4_zero_constants(z4, cz[nc]);
          }
        }
      }
      // One k32 block: B fragments (one 16-byte load per run gives 4 columns x 8 channels),
      // then A fragments (rows g, g + 8; channels 8t .. 8t + 7 = both k steps) and the mma.
      auto block = [&](auto tail) {
        uint32_t bf[NC][4][2][2];
        // In the tail block (K ends inside it; an instantiation of its own, so the common one
        // carries no test) the fragments of a thread whose 8 channels lie past K are zeros, not
        // (0 - z) * s, which a non-finite scale would turn into NaN against the zero-filled x.
        constexpr bool kTail = decltype(tail)::value;
        const bool valid = !kTail || kk + 8 * t < k_end;
#pragma unroll
        for (int nc = 0; nc < NC; ++nc) {
          const int chunk = (wn * NC + nc) * 8 + g, r = kb * 4 + t;
          const char* src = sb + r * (BN * 4) + ((chunk ^ ((r & 3) << 1)) << 4);
          const uint4 wq = *reinterpret_cast<const uint4*>(src);
          const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
          if constexpr (!kAct) {
#pragma unroll
            for (int a = 0; a < 4; ++a) {
              kpt::int4_dequant_word<T>(words[a], sc[nc][a], cz[nc][a], bf[nc][a]);
            }
          } else {
            // Per channel: its group's scale and zero of the 4 columns, from global memory.
            const int col = n0 + chunk * 4;
            const int32_t* gi = reinterpret_cast<const int32_t*>(ss) + kb * 32 + 8 * t;
            float v[4][8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              int grp = gi[j];
              grp = grp < 0 ? 0 : (grp >= p.groups ? p.groups - 1 : grp);
              float s4[4] = {0.f, 0.f, 0.f, 0.f};
              uint32_t z4 = 0x01010101u * kpt::kInt4SymmetricZero;
              if (col < p.n && valid) {
                kpt::int4_scales4(p.scales + (int64_t(grp) * p.scales_row + col) * es,
                                  p.scale_dtype, s4);
                if (p.zeros != nullptr) {
                  z4 = *reinterpret_cast<const uint32_t*>(p.zeros + int64_t(grp) * p.zeros_row +
                                                          col);
                }
              }
#pragma unroll
              for (int a = 0; a < 4; ++a) {
                const float z = float((z4 >> (8 * a)) & 0xffu);
                const uint32_t w = j < 4 ? words[a] : words[a] >> 16;
                v[a][j] =
                    (kpt::int4_nibble_float(w, j % 4) - (kpt::int4_magic(j % 4) + z)) * s4[a];
              }
            }
#pragma unroll
            for (int a = 0; a < 4; ++a) kpt::int4_fragments<T>(v[a], bf[nc][a]);
          }
          if (kTail && !valid) {
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
              for (int s = 0; s < 2; ++s) bf[nc][a][s][0] = bf[nc][a][s][1] = 0u;
          }
        }

#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const int r0 = wm * C::TM + mi * 16;
          if (m0 + r0 >= p.m) break;
          const int ra = r0 + g, rb = ra + 8, chunk = kb * 4 + t;
          const uint4 xa = *reinterpret_cast<const uint4*>(sa + ra * (BK * 2) +
                                                           ((chunk ^ ((ra & 1) << 2)) << 4));
          uint4 xb = make_uint4(0u, 0u, 0u, 0u);
          if (m0 + r0 + 8 < p.m) {
            xb = *reinterpret_cast<const uint4*>(sa + rb * (BK * 2) +
                                                 ((chunk ^ ((rb & 1) << 2)) << 4));
          }
#pragma unroll
          for (int nc = 0; nc < NC; ++nc) kpt::int4_mma_k32<T>(acc[mi][nc], xa, xb, bf[nc]);
        }
      };
      if (kk + 32 <= k_end) {
        block(std::false_type{});
      } else {
        block(std::true_type{});
      }
    }
  }
  kpt::cp_async_wait<0>();

  // The k warp groups' sums, added to group 0's in a fixed order through shared memory.
  if constexpr (WK > 1) {
    constexpr int kPer = MI * NC * 16, kSlots = WM * WN * 32;
    float* red = reinterpret_cast<float*>(smem);
    const int slot = wmn * 32 + lane;
    __syncthreads();  // every warp is past its last read of the pipeline's stages
    if (wk > 0) {
      float* dst = red + (wk - 1) * kPer * kSlots + slot;
      each_acc([&](float& v, int i) { dst[i * kSlots] = v; });
    }
    __syncthreads();
    if (wk > 0) return;
    for (int w = 1; w < WK; ++w) {
      const float* src = red + (w - 1) * kPer * kSlots + slot;
      each_acc([&](float& v, int i) { v += src[i * kSlots]; });
    }
  }

  // Epilogue: row g (+ 8), columns 8t .. 8t + 7 of each run: c0 of tile a is column 8t + a,
  // c1 column 8t + 4 + a (c2, c3: the same for row g + 8).
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wm * C::TM + mi * 16 + g + 8 * h;
      if (row >= p.m) continue;
#pragma unroll
      for (int nc = 0; nc < NC; ++nc) {
        const int col = n0 + (wn * NC + nc) * 32 + 8 * t;
        if (col >= p.n) continue;
        float v[8];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          v[a] = acc[mi][nc][a][2 * h];
          v[4 + a] = acc[mi][nc][a][2 * h + 1];
        }
        store_cols<T, 8>(p, share, row, col, v);
      }
    }
#endif  // KPT_SM80
}

template <class T, int BM, int BN, int BK, int WM, int WN, int WK, int kStages, int kMinBlocks>
int launch_tile(const Params& p, kpt::stream_t stream) {
  using C = Tile<BM, BN, BK, WM, WN, WK, kStages>;
  const int64_t ctas = (p.m + BM - 1) / BM * ((p.n + BN - 1) / BN);
  if (ctas > 0x7fffffff) return KPT_INT4_UNSUPPORTED;
  auto kernel = p.g_idx != nullptr
                    ? mma_kernel<T, true, BM, BN, BK, WM, WN, WK, kStages, kMinBlocks>
                    : mma_kernel<T, false, BM, BN, BK, WM, WN, WK, kStages, kMinBlocks>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<dim3(unsigned(ctas), unsigned(p.split)), C::kThreads, C::kSmem, stream>>>(p);
  return static_cast<int>(kpt::last_error());
}

// Every tile of kTiles: (block_m, block_n) -> K step, warps M x N x K, stages, CTAs per SM.
template <class T>
int launch_typed(const Params& p, int block_m, int block_n, kpt::stream_t stream) {
  if (block_m == 16 && block_n == 128) {
    return launch_tile<T, 16, 128, 128, 1, 4, 2, 4, 2>(p, stream);
  }
  if (block_m == 16 && block_n == 256) {
    return launch_tile<T, 16, 256, 128, 1, 8, 1, 4, 1>(p, stream);
  }
  if (block_m == 64 && block_n == 128) {
    return launch_tile<T, 64, 128, 64, 1, 4, 1, 4, 2>(p, stream);
  }
  if (block_m == 128 && block_n == 128) {
    return launch_tile<T, 128, 128, 64, 2, 4, 1, 4, 1>(p, stream);
  }
  if (block_m == 128 && block_n == 256) {
    return launch_tile<T, 128, 256, 64, 1, 8, 1, 4, 1>(p, stream);
  }
  return KPT_INT4_UNSUPPORTED;
}

}  // namespace

int mma_tile_k(int block_m, int block_n) { return tile_k_of(block_m, block_n); }

int launch_mma(const Params& p, int dtype, int block_m, int block_n, kpt::stream_t stream) {
  if (dtype == KPT_INT4_BF16) return launch_typed<bf16>(p, block_m, block_n, stream);
  return launch_typed<fp16>(p, block_m, block_n, stream);
}

#else  // KPT_HIP: no tensor-core tiles; kpt_int4_gemm runs gemm_simt.cu

int mma_tile_k(int, int) { return 0; }

int launch_mma(const Params&, int, int, int, kpt::stream_t) { return KPT_INT4_UNSUPPORTED; }

#endif

}  // namespace kpt_int4
