// Torch binding of the int4_gemm kernels: checks tensors, allocates the split-K workspace,
// passes raw pointers.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle and has made the tensors' device current. The workspace comes from torch's
// caching allocator on that stream (graph capture takes it from the graph's pool); its size
// depends on shapes only, and every element is written before it is read.

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "kpt/int4_gemm.h"

namespace {

constexpr const char* kOp = "int4_gemm";

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

void check_gpu(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA/HIP tensor");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// A 2-D tensor of `dtype` and `rows` x `cols` whose last dim is contiguous.
void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name,
                at::ScalarType dtype, int64_t rows, int64_t cols) {
  check_gpu(t, like, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols && (cols <= 1 || t.stride(1) == 1),
              kOp, ": ", name, " must be a ", dtype, " tensor of shape (", rows, ", ", cols,
              ") with a contiguous last dim, got ", t.scalar_type(), " ", t.sizes());
}

int dtype_code(at::ScalarType t) {
  if (t == at::kHalf) return KPT_INT4_FP16;
  if (t == at::kBFloat16) return KPT_INT4_BF16;
  if (t == at::kFloat) return KPT_INT4_FP32;
  return -1;
}

// Checks the quantised weight of K input channels and N columns (packed (K / 8, N), scales
// and zeros (G, N), g_idx (K,)) and fills its fields of `a` (scale_dtype, pointers, rows,
// n, k, groups, group_size).
void check_weight(const at::Tensor& packed, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& g_idx,
                  const at::Tensor& like, int64_t K, int64_t N, int64_t group_size,
                  kpt_int4_gemm_args& a) {
  check_rows(packed, like, "packed", at::kInt, K / 8, N);
  const int64_t G = scales.dim() == 2 ? scales.size(0) : -1;
  const int scale_dtype = dtype_code(scales.scalar_type());
  TORCH_CHECK(scale_dtype >= 0, kOp, ": scales must be float32, float16 or bfloat16, got ",
              scales.scalar_type());
  check_rows(scales, like, "scales", scales.scalar_type(), G, N);
  if (zeros) check_rows(*zeros, like, "zeros", at::kByte, G, N);
  if (g_idx) {
    check_gpu(*g_idx, like, "g_idx");
    TORCH_CHECK(g_idx->scalar_type() == at::kInt && g_idx->dim() == 1 && g_idx->size(0) == K &&
                    g_idx->is_contiguous(),
                kOp, ": g_idx must be a contiguous int32 tensor of K = ", K, " entries");
  }
  a.scale_dtype = scale_dtype;
  a.packed = packed.data_ptr<int32_t>();
  a.packed_row = packed.stride(0);
  a.scales = scales.data_ptr();
  a.scales_row = scales.stride(0);
  a.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  a.zeros_row = zeros ? zeros->stride(0) : 0;
  a.g_idx = g_idx ? g_idx->data_ptr<int32_t>() : nullptr;
  a.n = static_cast<int>(N);
  a.k = static_cast<int>(K);
  a.groups = static_cast<int>(G);
  a.group_size = static_cast<int>(group_size);
}

// Writes out (M, N) = x (M, K) @ dequant(packed (K / 8, N), scales (G, N), zeros (G, N) or
// none, g_idx (K,) or none).T (+ bias (N,)). impl: KPT_INT4_IMPL_*; (block_m, block_n): an
// instantiated tile; split: split-K shares asked for.
void forward(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& g_idx,
             const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t group_size,
             int64_t impl, int64_t block_m, int64_t block_n, int64_t split, int64_t stream) {
  check_gpu(x, x, "x");
  const int dtype = dtype_code(x.scalar_type());
  TORCH_CHECK(dtype == KPT_INT4_FP16 || dtype == KPT_INT4_BF16, kOp,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be (M, K), got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  check_rows(x, x, "x", x.scalar_type(), M, K);
  TORCH_CHECK(K % 8 == 0 && K < KPT_INT4_MAX_DIM, kOp, ": K = ", K,
              " must be a multiple of 8 below 2^30");
  const int64_t N = packed.dim() == 2 ? packed.size(1) : -1;
  kpt_int4_gemm_args a{};
  check_weight(packed, scales, zeros, g_idx, x, K, N, group_size, a);
  int bias_dtype = KPT_INT4_FP32;
  if (bias) {
    check_gpu(*bias, x, "bias");
    bias_dtype = dtype_code(bias->scalar_type());
    TORCH_CHECK((bias_dtype == KPT_INT4_FP32 || bias_dtype == dtype) && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                kOp, ": bias must be a contiguous (N,) float32 tensor or of x's dtype");
  }
  check_rows(out, x, "out", x.scalar_type(), M, N);

  const int tile_k = kpt_int4_gemm_tile_k(static_cast<int>(impl), static_cast<int>(block_m),
                                          static_cast<int>(block_n));
  TORCH_CHECK(tile_k > 0, kOp, ": no tile (impl ", impl, ", block_m ", block_m, ", block_n ",
              block_n, ") in this build");
  const int shares = kpt_int4_gemm_split(static_cast<int>(K), tile_k,
                                         static_cast<int>(split < 1 ? 1 : split));
  at::Tensor partial;
  if (shares > 1 && M > 0) {
    partial = at::empty({shares, M, N}, x.options().dtype(at::kFloat));
  }

  a.dtype = dtype;
  a.bias_dtype = bias_dtype;
  a.impl = static_cast<int>(impl);
  a.block_m = static_cast<int>(block_m);
  a.block_n = static_cast<int>(block_n);
  a.split = static_cast<int>(split < 1 ? 1 : split);
  a.x = x.data_ptr();
  a.x_row = x.stride(0);
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.out_row = out.stride(0);
  a.partial = shares > 1 && M > 0 ? partial.data_ptr<float>() : nullptr;
  a.m = M;
  const int code = kpt_int4_gemm(&a, as_stream(stream));
  TORCH_CHECK(code == 0, kOp, ": kpt_int4_gemm failed: ", kpt_int4_gemm_error_string(code),
              " (code ", code, ")");
}

// Writes w (K, N) of w's dtype (float16 / bfloat16) = the dequantised weight, transposed: the
// operand of a 16-bit GEMM x @ w for problems with many rows.
void dequantize(const at::Tensor& packed, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& g_idx,
                const at::Tensor& w, int64_t group_size, int64_t stream) {
  check_gpu(w, w, "w");
  const int dtype = dtype_code(w.scalar_type());
  TORCH_CHECK(dtype == KPT_INT4_FP16 || dtype == KPT_INT4_BF16, kOp,
              ": the dequantised weight must be float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, kOp, ": w must be (K, N), got ", w.sizes());
  const int64_t K = w.size(0), N = w.size(1);
  check_rows(w, w, "w", w.scalar_type(), K, N);
  TORCH_CHECK(K % 8 == 0 && K < KPT_INT4_MAX_DIM, kOp, ": K = ", K,
              " must be a multiple of 8 below 2^30");
  kpt_int4_gemm_args a{};
  check_weight(packed, scales, zeros, g_idx, w, K, N, group_size, a);
  a.dtype = dtype;
  const int code = kpt_int4_dequantize(&a, w.data_ptr(), w.stride(0), as_stream(stream));
  TORCH_CHECK(code == 0, kOp, ": kpt_int4_dequantize failed: ", kpt_int4_gemm_error_string(code),
              " (code ", code, ")");
}

int64_t tile_k(int64_t impl, int64_t block_m, int64_t block_n) {
  return kpt_int4_gemm_tile_k(static_cast<int>(impl), static_cast<int>(block_m),
                              static_cast<int>(block_n));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt int4_gemm kernels (CUDA/HIP): W4A16 GEMM";
  m.def("forward", &forward, "x @ dequant(packed).T (+ bias) into out", py::arg("x"),
        py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"),
        py::arg("bias"), py::arg("out"), py::arg("group_size"), py::arg("impl"),
        py::arg("block_m"), py::arg("block_n"), py::arg("split"), py::arg("stream"));
  m.def("dequantize", &dequantize, "w (K, N) = the dequantised weight, transposed",
        py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"), py::arg("w"),
        py::arg("group_size"), py::arg("stream"));
  m.def("tile_k", &tile_k, "the K step of a tile, 0 when this build has no such tile",
        py::arg("impl"), py::arg("block_m"), py::arg("block_n"));
}
