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
// int4 experts (int4_gemm's packing, k-major words; its own kernel below): block_m x 64
// columns of each half, k-tiles of 64 channels, warps (block_m / 32 or 1) x 2, warp wn owning
// the 32-column run wn of each half. A stage holds block_m A rows of 128 bytes (chunk c of
// row r at c ^ (r & 1) * 4), 8 packed rows of halves * 64 words (chunk c of packed row r at
// c ^ (r & 3) * 2), and the scale and zero rows of the groups that start in it. The fragment
// mapping is csrc/int4_gemm/gemm_mma.cu's: in a k32 block lane (g, t) owns channels 8t .. 8t
// + 7 (one word per column; the k slots of both k16 steps are the same permutation for A and
// B, so each A row is one 16-byte load), and n8 tile a puts column 4j + a of the run at mma
// column j, so one 16-byte load gives the lane its 4 columns' words of all four tiles. Each
// word is dequantised in registers (kpt/int4.h: nibble OR-ed into a float's mantissa, minus
// 2^(23 - 4j) + zero, times the scale, one cvt.rn per pair: exactly the reference's value in
// x's dtype); the group constants are reloaded only when the group changes. Each lane then
// holds 8 consecutive columns of its rows: one 16-byte store per row (two for float32).
//
// Epilogue (16-bit, fp8): straight from the accumulator fragments, two values (4 bytes) per
// store.
//
// Standing: compiles for sm_90a and sm_80 without spills (ptxas -v); GPU tests pass on an
// H200 and an H100 (the int4 kernel: 2026-12-07, on the H100).

#include <type_traits>

#include "gemm.cuh"
#include "kpt/ptx.h"

namespace kpt_moe {

#if defined(KPT_CUDA)

namespace {

// Byte offset of chunk `chunk` of row `row` in a swizzled tile of 128-byte rows.
KPT_DEVICE int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// One output value from the accumulators of an element in each half (0: gate, 1: up):
// act(gate) * up, or with a single half, the routing weight times its sum.
template <int kHalves>
KPT_DEVICE float out_value(const Gemm& g, const Slot& sl, float h0, float h1) {
  if constexpr (kHalves == 2) {
    return gated(g.activation, h0, h1);
  } else {
    return sl.weight * h0;
  }
}

// The cp.async pipeline of both kernels: k-tile kt lives in stage kt % kStages, one commit
// group per k-tile (empty past the last one, so that the wait count stays the same). `load`
// (stage, kt) issues a k-tile's copies. First the k-tiles 0 .. kStages - 2:
template <int kStages, class Load>
KPT_DEVICE void pipeline_start(int k_tiles, const Load& load) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load(s, s);
    kpt::cp_async_commit();
  }
}

// then, before computing k-tile kt: wait for it, and refill the stage that every thread has
// finished reading (k-tile kt - 1's) with k-tile kt + kStages - 1.
template <int kStages, class Load>
KPT_DEVICE void pipeline_next(int kt, int k_tiles, const Load& load) {
  kpt::cp_async_wait<kStages - 2>();
  __syncthreads();
  const int next = kt + kStages - 1;
  if (next < k_tiles) load(next % kStages, next);
  kpt::cp_async_commit();
}

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

  pipeline_start<kStages>(k_tiles, load);

  const int grp = lane / 4, quad = lane % 4;
  for (int kt = 0; kt < k_tiles; ++kt) {
    pipeline_next<kStages>(kt, k_tiles, load);
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
        const float v0 =
            out_value<kHalves>(g, sl, acc[0][mi][ni][2 * q], acc[kHalves - 1][mi][ni][2 * q]);
        const float v1 = out_value<kHalves>(g, sl, acc[0][mi][ni][2 * q + 1],
                                            acc[kHalves - 1][mi][ni][2 * q + 1]);
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

// ---- int4 experts ---------------------------------------------------------------------------

template <int kBM, int kWM, int kHalves, int kStages>
struct Int4Tile {
  static constexpr int kBN = 64, kWN = 2, kBK = 64;  // columns per half, warps along n, k-tile
  static constexpr int kThreads = 32 * kWM * kWN;
  static constexpr int TM = kBM / kWM, MI = TM / 16;  // one warp's rows and m16 tiles
  static constexpr int kCols = kHalves * kBN;         // B columns: the halves side by side
  static constexpr int kA = kBM * kBK * 2;            // A rows of 128 bytes
  static constexpr int kB = kBK / 8 * kCols * 4;      // packed rows
  static constexpr int kS = kBK / 32 * kCols * 4;     // scale rows (float32 at most)
  static constexpr int kZ = kBK / 32 * kCols;         // zero rows
  static constexpr int kStageBytes = kA + kB + kS + kZ;
  static constexpr int kSmem = kStages * kStageBytes;
  static_assert(TM % 16 == 0 && kBN == kWN * 32, "warps own m16 blocks x one 32-column run");
};

template <class T, int kBM, int kWM, int kHalves, int kStages, int kMinBlocks>
__global__ void __launch_bounds__(64 * kWM, kMinBlocks) mma_int4_kernel(Gemm g) {
#if KPT_SM80
  using Cfg = Int4Tile<kBM, kWM, kHalves, kStages>;
  constexpr int MI = Cfg::MI, TM = Cfg::TM, kBN = Cfg::kBN, kBK = Cfg::kBK;
  constexpr int kCols = Cfg::kCols, kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) char smem[];
  __shared__ Slot slots[kBM];
  __shared__ const char* row_src[kBM];  // A row of each slot (null: padding, zero-filled)

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= *g.num_padded) return;
  const int expert = g.block_expert[blockIdx.x];
  if (expert < 0) return;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  const char* b_base = g.b + int64_t(expert) * g.b_expert_bytes;
  const int es = g.q_scale_type == kpt::kInt4ScaleF32 ? 4 : 2;
  const char* s_base = static_cast<const char*>(g.q_scale) + int64_t(expert) * g.q_expert * es;
  const uint8_t* z_base =
      g.q_zeros != nullptr ? g.q_zeros + int64_t(expert) * g.q_expert : nullptr;
  for (int r = tid; r < kBM; r += kThreads) {
    const Slot sl = slot_of(g, m0 + r);
    slots[r] = sl;
    row_src[r] = sl.row >= 0 ? g.a + int64_t(sl.row) * g.a_row_bytes : nullptr;
  }
  __syncthreads();

  const int k = int(g.k);  // < 2^30 (experts.cu)
  const int k_tiles = (k + kBK - 1) / kBK;
  const int group_mask = (1 << g.group_shift) - 1;

  // One stage: A rows, packed rows (4 columns = one 16-byte chunk; n is a multiple of 8, so a
  // chunk is wholly inside or past it), and the scale / zero rows of the groups of the
  // stage's channels where one starts here (elsewhere the threads still hold the group's
  // constants from an earlier stage). Past k, n or a padding slot: zero-filled, nothing read.
  auto load = [&](int stage, int kt) {
    char* sa = smem + stage * Cfg::kStageBytes;
    char* sb = sa + Cfg::kA;
    char* ss = sb + Cfg::kB;
    char* sz = ss + Cfg::kS;
    const int k0 = kt * kBK;
    for (int idx = tid; idx < kBM * 8; idx += kThreads) {
      const int r = idx / 8, c = idx % 8;
      const char* src = row_src[r];
      const bool ok = src != nullptr && k0 + c * 8 < k;
      kpt::cp_async16(sa + r * 128 + ((c ^ ((r & 1) << 2)) << 4),
                      ok ? src + int64_t(k0 + c * 8) * 2 : g.b, ok);
    }
    for (int idx = tid; idx < kBK / 8 * (kCols / 4); idx += kThreads) {
      const int r = idx / (kCols / 4), c = idx % (kCols / 4);
      const int64_t n = n0 + c * 4 % kBN, col = c * 4 / kBN * g.up + n;
      const int kw = k0 / 8 + r;
      const bool ok = n < g.n && kw < k / 8;
      kpt::cp_async16(sb + r * (kCols * 4) + ((c ^ ((r & 3) << 1)) << 4),
                      ok ? b_base + int64_t(kw) * g.b_row_bytes + col * 4 : g.b, ok);
    }
    if ((k0 & group_mask) == 0) {
      const int g0 = k0 >> g.group_shift;
      const int rows = ((min(k0 + kBK, k) - 1) >> g.group_shift) - g0 + 1;
      for (int idx = tid; idx < rows * (kCols / 4); idx += kThreads) {
        const int r = idx / (kCols / 4), c = idx % (kCols / 4);
        const int64_t n = n0 + c * 4 % kBN;
        const int64_t at = int64_t(g0 + r) * g.q_row + c * 4 / kBN * g.up + n;
        const bool ok = n < g.n;
        char* dst = ss + (r * kCols + c * 4) * es;
        if (es == 4) {
          kpt::cp_async_ca<16>(dst, ok ? s_base + at * 4 : g.b, ok);
        } else {
          kpt::cp_async_ca<8>(dst, ok ? s_base + at * 2 : g.b, ok);
        }
        if (z_base != nullptr) {
          kpt::cp_async_ca<4>(sz + r * kCols + c * 4, ok ? z_base + at : z_base, ok);
        }
      }
    }
  };

  float acc[kHalves][MI][4][4];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[h][mi][a][q] = 0.f;

  // The scale and 2^(23 - 4j) + zero of this thread's 4 columns of each half, in cur_group.
  float sc[kHalves][4], cz[kHalves][4][4];
  int cur_group = -1;

  pipeline_start<kStages>(k_tiles, load);

  const int grp = lane / 4, quad = lane % 4;
  for (int kt = 0; kt < k_tiles; ++kt) {
    pipeline_next<kStages>(kt, k_tiles, load);
    const char* sa = smem + (kt % kStages) * Cfg::kStageBytes;
    const char* sb = sa + Cfg::kA;
    const char* ss = sb + Cfg::kB;
    const char* sz = ss + Cfg::kS;
    const int k0 = kt * kBK;
#pragma unroll
    for (int kb = 0; kb < kBK / 32; ++kb) {
      const int kk = k0 + kb * 32;  // the k32 block's first channel
      if (kk >= k) break;
      const int group = kk >> g.group_shift;
      if (group != cur_group) {
        cur_group = group;
        const int row = group - (k0 >> g.group_shift);
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const int col = h * kBN + wn * 32 + 4 * grp;
          kpt::int4_scales4(ss + (row * kCols + col) * es, g.q_scale_type, sc[h]);
          const uint32_t z4 = z_base != nullptr
                                  ? *reinterpret_cast<const uint32_t*>(sz + row * kCols + col)
                                  : 0x01010101u * kpt::kInt4SymmetricZero;
          kpt::int4_zero_constants(z4, cz[h]);
        }
      }
      // One k32 block: B fragments (a 16-byte load per half: 4 columns x 8 channels), A
      // fragments (rows grp, grp + 8; channels 8 quad .. 8 quad + 7 = both k16 steps), mma.
      auto block = [&](auto tail) {
        // In the block where k ends (an instantiation of its own) a lane whose 8 channels lie
        // past k gets zero fragments, not (0 - z) * s, which a non-finite scale would turn
        // into NaN against the zero-filled A.
        constexpr bool kTail = decltype(tail)::value;
        const bool valid = !kTail || kk + 8 * quad < k;
        uint32_t bf[kHalves][4][2][2];
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const int chunk = h * (kBN / 4) + wn * 8 + grp, r = kb * 4 + quad;
          const uint4 wq = *reinterpret_cast<const uint4*>(sb + r * (kCols * 4) +
                                                           ((chunk ^ ((r & 3) << 1)) << 4));
          const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            kpt::int4_dequant_word<T>(words[a], sc[h][a], cz[h][a], bf[h][a]);
            if (kTail && !valid) {
              bf[h][a][0][0] = bf[h][a][0][1] = 0u;
              bf[h][a][1][0] = bf[h][a][1][1] = 0u;
            }
          }
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const int ra = wm * TM + mi * 16 + grp, rb = ra + 8, chunk = kb * 4 + quad;
          const int sw = (chunk ^ ((ra & 1) << 2)) << 4;  // rb & 1 == ra & 1
          const uint4 xa = *reinterpret_cast<const uint4*>(sa + ra * 128 + sw);
          const uint4 xb = *reinterpret_cast<const uint4*>(sa + rb * 128 + sw);
#pragma unroll
          for (int h = 0; h < kHalves; ++h) kpt::int4_mma_k32<T>(acc[h][mi], xa, xb, bf[h]);
        }
      };
      if (kk + 32 <= k) {
        block(std::false_type{});
      } else {
        block(std::true_type{});
      }
    }
  }
  kpt::cp_async_wait<0>();

  // Epilogue: row grp (+ 8) of each m16 block, columns 8 quad .. 8 quad + 7 of the warp's run:
  // c0 of tile a is column 8 quad + a, c1 column 8 quad + 4 + a (c2, c3: row grp + 8).
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const Slot sl = slots[wm * TM + mi * 16 + grp + 8 * q];
      const int64_t col = n0 + wn * 32 + 8 * quad;
      if (sl.row < 0 || col >= g.n) continue;
      char* out = g.c + int64_t(sl.out_row) * g.c_row_bytes;
      float v[8];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        v[a] = out_value<kHalves>(g, sl, acc[0][mi][a][2 * q], acc[kHalves - 1][mi][a][2 * q]);
        v[4 + a] = out_value<kHalves>(g, sl, acc[0][mi][a][2 * q + 1],
                                      acc[kHalves - 1][mi][a][2 * q + 1]);
      }
      if (kHalves == 1 && g.c_fp32) {
        float* dst = reinterpret_cast<float*>(out + col * 4);
        *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        kpt::store16(out + col * 2, kpt::pack8<T>(v));
      }
    }
  }
#endif  // KPT_SM80
}

template <class T, int kBM, int kWM, int kHalves, int kStages, int kMinBlocks>
int launch_int4_halves(const Gemm& g, int64_t grid_x, kpt::stream_t stream) {
  using Cfg = Int4Tile<kBM, kWM, kHalves, kStages>;
  auto kernel = mma_int4_kernel<T, kBM, kWM, kHalves, kStages, kMinBlocks>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(unsigned(grid_x), unsigned((g.n + Cfg::kBN - 1) / Cfg::kBN));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(g);
  return static_cast<int>(kpt::last_error());
}

// The int4 tiles: block_m -> warps along m, stages, CTAs per SM (block_n is 64).
template <class T>
int launch_int4(const Gemm& g, int block_m, int halves, int64_t grid_x, kpt::stream_t stream) {
  if (block_m == 16) {
    return halves == 2 ? launch_int4_halves<T, 16, 1, 2, 4, 4>(g, grid_x, stream)
                       : launch_int4_halves<T, 16, 1, 1, 4, 4>(g, grid_x, stream);
  }
  if (block_m == 64) {
    return halves == 2 ? launch_int4_halves<T, 64, 2, 2, 4, 2>(g, grid_x, stream)
                       : launch_int4_halves<T, 64, 2, 1, 4, 2>(g, grid_x, stream);
  }
  if (block_m == 128) {
    return halves == 2 ? launch_int4_halves<T, 128, 4, 2, 3, 1>(g, grid_x, stream)
                       : launch_int4_halves<T, 128, 4, 1, 3, 1>(g, grid_x, stream);
  }
  return KPT_MOE_UNSUPPORTED;
}

// ---- dispatch ----------------------------------------------------------------------------------

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

bool mma_tile(int quant, int block_m, int block_n) {
  if (block_n == 64 && (block_m == 16 || block_m == 64)) return true;
  return block_m == 128 && block_n == (quant == KPT_MOE_QUANT_NONE ? 128 : 64);
}

int launch_gemm_mma(const Gemm& g, int dtype, int quant, int block_m, int block_n, int halves,
                    int64_t grid_x, kpt::stream_t stream) {
  if (!mma_tile(quant, block_m, block_n)) return KPT_MOE_UNSUPPORTED;
  const bool bf = dtype == KPT_MOE_BF16;
  if (quant == KPT_MOE_QUANT_INT4) {
    return bf ? launch_int4<bf16>(g, block_m, halves, grid_x, stream)
              : launch_int4<fp16>(g, block_m, halves, grid_x, stream);
  }
  if (quant == KPT_MOE_QUANT_FP8) {
    return bf ? launch_typed<bf16, true>(g, block_m, block_n, halves, grid_x, stream)
              : launch_typed<fp16, true>(g, block_m, block_n, halves, grid_x, stream);
  }
  return bf ? launch_typed<bf16, false>(g, block_m, block_n, halves, grid_x, stream)
            : launch_typed<fp16, false>(g, block_m, block_n, halves, grid_x, stream);
}

#else  // KPT_HIP: no tensor-core tiles; the launcher runs gemm_simt.cu

bool mma_tile(int, int, int) { return false; }

int launch_gemm_mma(const Gemm&, int, int, int, int, int, int64_t, kpt::stream_t) {
  return KPT_MOE_UNSUPPORTED;
}

#endif

}  // namespace kpt_moe
