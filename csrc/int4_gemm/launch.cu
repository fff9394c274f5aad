// int4_gemm's C entry points: kpt_int4_gemm checks the arguments against what the kernels
// handle, runs one GEMM launch (gemm_mma.cu or gemm_simt.cu) and, for split-K, the reduction
// below; kpt_int4_dequantize checks the weight's arguments and runs dequant.cu.
//
// Split-K reduction: out[row, col] = round(sum over shares s = 0, 1, ... of partial[s, row,
// col] + bias), the shares added in index order whatever order their CTAs ran in
// (deterministic), one rounding. Eight columns per thread, 16-byte loads and stores.
//
// Everything is sized from the arguments alone: no host sync, safe in CUDA graph capture.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; ran on an H100 (2026-12-07): its GPU tests pass (HIP build not run).

#include "common.cuh"

namespace {

using namespace kpt_int4;

constexpr int kReduceThreads = 256;

template <class T>
__global__ void KPT_LAUNCH_BOUNDS(kReduceThreads, 1) reduce_kernel(Params p) {
  const int64_t runs = p.n / 8;
  const int64_t total = p.m * runs;
  const int64_t stride = int64_t(gridDim.x) * kReduceThreads;
  for (int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / runs;
    const int col = int(i % runs) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < p.split; ++s) {
      const float* src = p.partial + (int64_t(s) * p.m + row) * p.n + col;
      const uint4 lo = kpt::load16(src), hi = kpt::load16(src + 4);
      acc[0] += __uint_as_float(lo.x), acc[1] += __uint_as_float(lo.y);
      acc[2] += __uint_as_float(lo.z), acc[3] += __uint_as_float(lo.w);
      acc[4] += __uint_as_float(hi.x), acc[5] += __uint_as_float(hi.y);
      acc[6] += __uint_as_float(hi.z), acc[7] += __uint_as_float(hi.w);
    }
    store_final<T, 8>(p, row, col, acc);
  }
}

template <class T>
int launch_reduce(const Params& p, kpt::stream_t stream) {
  const int64_t total = p.m * (p.n / 8);
  const int64_t blocks = (total + kReduceThreads - 1) / kReduceThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(p);
  return static_cast<int>(kpt::last_error());
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return (1 << s) == v ? s : -1;
}

// The dtypes and sizes both entry points check (x's / the dequantised weight's dtype).
int check_types_and_sizes(const kpt_int4_gemm_args* a) {
  if ((a->dtype != KPT_INT4_FP16 && a->dtype != KPT_INT4_BF16) ||
      (a->scale_dtype != KPT_INT4_FP32 && a->scale_dtype != KPT_INT4_FP16 &&
       a->scale_dtype != KPT_INT4_BF16)) {
    return KPT_INT4_BAD_DTYPE;
  }
  if (a->n <= 0 || a->k <= 0 || a->n % KPT_INT4_N_MULTIPLE || a->k % 8 ||
      a->n >= KPT_INT4_MAX_DIM || a->k >= KPT_INT4_MAX_DIM) {
    return KPT_INT4_UNSUPPORTED;
  }
  return 0;
}

// Groups: contiguous runs of a power of two >= 32 channels dividing K (the shift is its log2),
// or one per channel (shift 30: every k < 2^30 is in group 0); -1 for anything else.
int group_shift(const kpt_int4_gemm_args* a) {
  if (a->group_size == -1) return a->groups == 1 ? 30 : -1;
  const int shift = log2_exact(a->group_size);
  if (shift < 5 || a->k % a->group_size || a->groups != a->k / a->group_size) return -1;
  return shift;
}

// Whether the weight, scales, zeros and g_idx are as the kernels read them: rows in runs of
// 4 columns, 16-byte weight and 4-element scale vectors.
bool weight_readable(const kpt_int4_gemm_args* a, int scale_bytes) {
  return a->packed != nullptr && a->scales != nullptr && aligned(a->packed, 16) &&
         a->packed_row % 4 == 0 && a->packed_row >= a->n &&
         aligned(a->scales, 4 * scale_bytes) && a->scales_row % 4 == 0 &&
         a->scales_row >= a->n &&
         (a->zeros == nullptr ||
          (aligned(a->zeros, 4) && a->zeros_row % 4 == 0 && a->zeros_row >= a->n)) &&
         (a->g_idx == nullptr || aligned(a->g_idx, 16));
}

// Params' weight fields from checked arguments.
void weight_params(const kpt_int4_gemm_args* a, int shift, int scale_bytes, Params& p) {
  p.packed = a->packed;
  p.packed_row = a->packed_row;
  p.scales = static_cast<const char*>(a->scales);
  p.scales_row = a->scales_row;
  p.scale_dtype = a->scale_dtype;
  p.scale_bytes = scale_bytes;
  p.zeros = a->zeros;
  p.zeros_row = a->zeros_row;
  p.g_idx = a->g_idx;
  p.n = a->n;
  p.k = a->k;
  p.groups = a->groups;
  p.group_shift = shift;
}

}  // namespace

extern "C" {

int kpt_int4_gemm_tile_k(int impl, int block_m, int block_n) {
  if (impl == KPT_INT4_IMPL_MMA) return mma_tile_k(block_m, block_n);
  if (impl == KPT_INT4_IMPL_SIMT) return simt_tile_k(block_m, block_n);
  return 0;
}

int kpt_int4_gemm(const kpt_int4_gemm_args* a, void* stream) {
  if (a == nullptr) return KPT_INT4_BAD_ARGUMENT;
  const int checked = check_types_and_sizes(a);
  if (checked != 0) return checked;
  if (a->bias != nullptr && a->bias_dtype != KPT_INT4_FP32 && a->bias_dtype != a->dtype) {
    return KPT_INT4_BAD_DTYPE;
  }
  if (a->m < 0) return KPT_INT4_UNSUPPORTED;
  const int tile_k = kpt_int4_gemm_tile_k(a->impl, a->block_m, a->block_n);
  if (tile_k == 0) return KPT_INT4_UNSUPPORTED;
  if (a->m == 0) return 0;
  const int shift = group_shift(a);
  if (shift < 0) return KPT_INT4_BAD_ARGUMENT;
  const int es = a->scale_dtype == KPT_INT4_FP32 ? 4 : 2;
  // Every pointer and row as the kernels read them: rows of 16-byte x chunks and 8-column
  // output runs, the weight's as weight_readable says.
  if (a->x == nullptr || a->out == nullptr || !aligned(a->x, 16) || a->x_row % 8 ||
      a->x_row < a->k || !aligned(a->out, 16) || a->out_row % 8 || a->out_row < a->n ||
      !weight_readable(a, es) || (a->bias != nullptr && !aligned(a->bias, 16))) {
    return KPT_INT4_BAD_ARGUMENT;
  }
  const int split = kpt_int4_gemm_split(a->k, tile_k, a->split);
  if (split > 1 && (a->partial == nullptr || !aligned(a->partial, 16))) {
    return KPT_INT4_BAD_ARGUMENT;
  }
  const int steps = (a->k + tile_k - 1) / tile_k;

  Params p{};
  weight_params(a, shift, es, p);
  p.x = static_cast<const char*>(a->x);
  p.x_row = a->x_row;
  p.bias = static_cast<const char*>(a->bias);
  p.bias_fp32 = a->bias_dtype == KPT_INT4_FP32;
  p.out = static_cast<char*>(a->out);
  p.out_row = a->out_row;
  p.partial = a->partial;
  p.m = a->m;
  p.k_per_split = (steps + split - 1) / split * tile_k;
  p.split = split;

  const kpt::stream_t s = static_cast<kpt::stream_t>(stream);
  const int err = a->impl == KPT_INT4_IMPL_MMA
                      ? launch_mma(p, a->dtype, a->block_m, a->block_n, s)
                      : launch_simt(p, a->dtype, a->block_m, a->block_n, s);
  if (err != 0 || split == 1) return err;
  return a->dtype == KPT_INT4_BF16 ? launch_reduce<bf16>(p, s) : launch_reduce<fp16>(p, s);
}

int kpt_int4_dequantize(const kpt_int4_gemm_args* a, void* w, int64_t w_row, void* stream) {
  if (a == nullptr) return KPT_INT4_BAD_ARGUMENT;
  const int checked = check_types_and_sizes(a);
  if (checked != 0) return checked;
  const int shift = group_shift(a);
  const int es = a->scale_dtype == KPT_INT4_FP32 ? 4 : 2;
  if (shift < 0 || w == nullptr || !aligned(w, 8) || w_row % 4 || w_row < a->n ||
      !weight_readable(a, es)) {
    return KPT_INT4_BAD_ARGUMENT;
  }
  Params p{};
  weight_params(a, shift, es, p);
  p.out = static_cast<char*>(w);
  p.out_row = w_row;
  return launch_dequant(p, a->dtype, static_cast<kpt::stream_t>(stream));
}

const char* kpt_int4_gemm_error_string(int code) {
  switch (code) {
    case 0:
      return "no error";
    case KPT_INT4_BAD_DTYPE:
      return "unsupported dtype (fp16/bf16 x; fp32/fp16/bf16 scales; bias fp32 or x's dtype)";
    case KPT_INT4_UNSUPPORTED:
      return "size, tile or variant not supported by these kernels";
    case KPT_INT4_BAD_ARGUMENT:
      return "invalid argument (null or misaligned pointer, bad size, stride or group size)";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown kpt error";
  }
}

}  // extern "C"
