// NVIDIA-only building blocks of the tensor-core flash_attention kernels (sm_80+): the
// XOR-swizzled shared-memory tile layout, tile copies into it and fragment loads out of it, on
// top of kpt/ptx.h (cp.async with zero-fill, ldmatrix plain and transposed, mma.sync m16n8k16
// with fp32 accumulators).
#pragma once

#include "common.cuh"
#include "kpt/ptx.h"

#ifdef KPT_CUDA
namespace kpt_fa {

// Tiles are rows of kD 16-bit values stored as 16-byte chunks; chunk c of row r lives at
// chunk c ^ (r % 8). ldmatrix reads one chunk column of 8 consecutive rows, which the XOR
// spreads over 8 distinct 16-byte bank groups: no bank conflicts (kD / 8 >= 8 chunks a row).
template <int kD>
KPT_DEVICE int swz(int row, int chunk) {
  static_assert(kD % 64 == 0, "the swizzle needs at least 8 chunks per row");
  return row * kD + ((chunk ^ (row & 7)) << 3);
}

// Copy rows [0, rows) x chunks [0, chunks) of a kRows x kD tile (row stride in elements);
// the rest of the tile is zero-filled: rows past the sequence end, features past head_dim. Those
// chunks read nothing, so rows past a sequence's end (NaN-poisoned in the tests) are never touched.
template <int kRows, int kD, int kThreads>
KPT_DEVICE void load_tile(uint16_t* s, const uint16_t* g, int64_t stride, int rows, int chunks) {
  constexpr int kChunks = kD / 8;
  static_assert(kRows * kChunks % kThreads == 0, "tile copy must split evenly over threads");
#pragma unroll
  for (int n = 0; n < kRows * kChunks / kThreads; ++n) {
    const int c = threadIdx.x + n * kThreads;
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < rows && ch < chunks;
    kpt::cp_async16(s + swz<kD>(r, ch), ok ? g + r * stride + ch * 8 : g, ok);
  }
}

// A fragment (16 x 16) of rows r0.. and feature chunks 2kk, 2kk+1 of a swizzled tile.
template <int kD>
KPT_DEVICE void load_a(uint32_t (&a)[4], const uint16_t* s, int r0, int kk) {
  const int lane = threadIdx.x % 32;
  kpt::ldsm_x4(a, s + swz<kD>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
}

// B fragments of two n-tiles (rows n0.. and n0+8.. of a row-major [n][k] tile), k chunks
// 2kk, 2kk+1: b[0], b[1] for the first n-tile, b[2], b[3] for the second.
template <int kD>
KPT_DEVICE void load_b(uint32_t (&b)[4], const uint16_t* s, int n0, int kk) {
  const int lane = threadIdx.x % 32;
  kpt::ldsm_x4(b, s + swz<kD>(n0 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
}

// B fragments from a row-major [k][n] tile (V as the B of P @ V): k rows k0..k0+15, n chunks
// 2nn (b[0], b[1]) and 2nn+1 (b[2], b[3]), through the transposing ldmatrix.
template <int kD>
KPT_DEVICE void load_b_t(uint32_t (&b)[4], const uint16_t* s, int k0, int nn) {
  const int lane = threadIdx.x % 32;
  kpt::ldsm_x4_t(b, s + swz<kD>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, nn * 2 + (lane >> 4)));
}

template <class T>
KPT_DEVICE uint32_t pack2(float lo, float hi) {
  return kpt::Half<T>::pack(lo, hi);
}

KPT_DEVICE float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

KPT_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace kpt_fa
#endif  // KPT_CUDA
