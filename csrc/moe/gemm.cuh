// The grouped GEMM both expert projections run, over the rows of the alignment (csrc/moe/
// align.cu): CTA (m, n) owns block m of block_m sorted slots, all of one local expert, and
// block_n output columns of each half.
//
//   GEMM1 (halves = 2): A = x rows gathered by token (sorted[s] / top_k), B = the expert's
//     gate rows n0.. and up rows inter + n0..; the epilogue writes act(gate) * up, rounded to
//     x's dtype, to row s of the act workspace.
//   GEMM2 (halves = 1): A = act rows (slot s), B = the expert's down rows; the epilogue writes
//     weight * down to row `pair` of the partial workspace, float32 or rounded to x's dtype
//     (c_fp32), or straight to out's row `token` when top_k == 1 (the only rounding there).
//
// Both read A and B as rows with k contiguous (y = a @ b.T, b in nn.Linear layout). Slots
// holding the sentinel (padding) read nothing (zero-filled copies) and store nothing.
//
// fp8 (e4m3, 128x128 weight blocks, 1x128 activation blocks): A and B hold codes, a_scale one
// float per (row, 128 columns of k), b_scale one per (128 rows, 128 columns) of an expert.
//
// int4 (kpt.ops.int4_gemm's packing of each expert's weight): A is x's dtype as for 16-bit
// experts; B is k-major instead, b_row_bytes apart per packed row of 8 channels, n
// contiguous (32-bit words: code j of word (kw, n) is channel 8 kw + j of column n); the up
// half starts at column `up`. q_scale / q_zeros: (experts, groups, columns), element
// q_expert * e + q_row * group + column; the group of channel k is k >> group_shift (30: one
// group). Dequantised as int4_gemm's reference (kpt/int4.h), rounded to x's dtype.
#pragma once

#include "common.cuh"
#include "kpt/int4.h"

namespace kpt_moe {

struct Gemm {
  const char* a;        // A rows
  int64_t a_row_bytes;  // row stride of A in bytes
  const float* a_scale;  // fp8: (rows, k blocks), row stride a_scale_row
  int64_t a_scale_row;
  const char* b;  // B rows of expert 0
  int64_t b_expert_bytes, b_row_bytes;
  const float* b_scale;  // fp8: (experts, n blocks, k blocks) strides in floats
  int64_t b_scale_expert, b_scale_row;
  const void* q_scale;  // int4: group scales of q_scale_type (kpt::kInt4Scale*)
  int q_scale_type;
  const uint8_t* q_zeros;  // int4: zero points, or null (symmetric: 8)
  int64_t q_expert, q_row;
  int group_shift;
  int64_t n;   // output columns of one half (GEMM1: inter; GEMM2: hidden)
  int64_t k;   // reduction length in elements (GEMM1: hidden; GEMM2: inter)
  int64_t up;  // first B row of the up half (GEMM1: inter)
  const int32_t* sorted;
  const int32_t* block_expert;
  const int32_t* num_padded;
  int64_t pairs;
  int top_k;
  int gather;  // 1: A row of slot s is token sorted[s] / top_k (GEMM1); 0: row s (GEMM2)
  int activation;
  char* c;  // output rows
  int64_t c_row_bytes;
  int c_fp32;            // GEMM2: c holds float32 (else x's dtype)
  const float* weights;  // GEMM2: routing weight per pair
  int by_token;          // GEMM2: store row sorted[s] / top_k instead of sorted[s]
};

// A slot's A row (token or slot), or -1 for padding; the routing weight and the output row.
struct Slot {
  int row;
  int out_row;
  float weight;
};

KPT_DEVICE Slot slot_of(const Gemm& g, int64_t s) {
  const int pair = g.sorted[s];
  Slot r;
  if (pair < 0 || pair >= g.pairs) {
    r.row = -1;
    r.out_row = -1;
    r.weight = 0.f;
    return r;
  }
  r.row = g.gather ? pair / g.top_k : int(s);
  if (g.gather) {
    r.out_row = int(s);
    r.weight = 0.f;
  } else {
    r.out_row = g.by_token ? pair / g.top_k : pair;
    r.weight = g.weights[pair];
  }
  return r;
}

// Launch one GEMM over grid_x blocks of block_m slots; returns a KPT_MOE_* / CUDA error code.
// dtype: KPT_MOE_FP16 / BF16 (the output, and A and B unless quantised); quant: KPT_MOE_QUANT_*;
// halves: 2 (GEMM1) or 1.
int launch_gemm_mma(const Gemm& g, int dtype, int quant, int block_m, int block_n, int halves,
                    int64_t grid_x, kpt::stream_t stream);
int launch_gemm_simt(const Gemm& g, int dtype, int quant, int block_m, int block_n, int halves,
                     int64_t grid_x, kpt::stream_t stream);

// The tiles each implementation instantiates (block_m, block_n) per quant; see the .cu files.
bool mma_tile(int quant, int block_m, int block_n);
bool simt_tile(int quant, int block_m, int block_n);

}  // namespace kpt_moe
