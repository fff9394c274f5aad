// Torch binding of the fp8_gemm kernels: checks tensors, allocates the K-split workspace, passes
// raw pointers. One file serves both builds: the portable one (kpt_fp8_gemm: mma.sync and
// CUDA-core tiles) and, compiled with -DKPT_FP8_GEMM_SM90_BUILD, the sm_90a one
// (kpt_fp8_gemm_sm90: TMA + wgmma), so both check the same things the same way.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle and has made the tensors' device current. The workspace comes from torch's
// caching allocator on that stream (graph capture takes it from the graph's pool) and is sized
// from shapes only; nothing is read back.

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "kpt/fp8_gemm.h"

namespace {

constexpr const char* kOp = "fp8_gemm";

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

void check_gpu(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA/HIP tensor");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return KPT_FP8_GEMM_FP16;
    case at::kBFloat16:
      return KPT_FP8_GEMM_BF16;
    case at::kFloat:
      return KPT_FP8_GEMM_FP32;
    default:
      TORCH_CHECK(false, kOp, ": ", name, " must be float16, bfloat16 or float32, got ",
                  t.scalar_type());
  }
}

// A scale of granularity `gran` for `rows` rows (rows_per_block of them per block row) and k
// columns: float32, 2-D, the shape the granularity says; strides are read as they are.
void check_scale(const at::Tensor& s, const at::Tensor& like, const char* name, int64_t gran,
                 int64_t rows, int64_t rows_per_block, int64_t k) {
  check_gpu(s, like, name);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2, kOp, ": ", name,
              " must be a 2-D float32 tensor");
  const int64_t kb = (k + KPT_FP8_GEMM_SCALE_K - 1) / KPT_FP8_GEMM_SCALE_K;
  bool ok = false;
  if (gran == KPT_FP8_GEMM_TENSOR) ok = s.numel() == 1;
  if (gran == KPT_FP8_GEMM_ROW) ok = s.size(0) == rows && s.size(1) == 1;
  if (gran == KPT_FP8_GEMM_BLOCK) {
    ok = s.size(0) == (rows + rows_per_block - 1) / rows_per_block && s.size(1) == kb;
  }
  TORCH_CHECK(ok, kOp, ": ", name, " of shape ", s.sizes(), " does not fit granularity ", gran);
}

#ifdef KPT_FP8_GEMM_SM90_BUILD
int launch(const kpt_fp8_gemm_args* a, void* stream) { return kpt_fp8_gemm_sm90(a, stream); }
#else
int launch(const kpt_fp8_gemm_args* a, void* stream) { return kpt_fp8_gemm(a, stream); }
#endif

// Writes out (M, N) = (a8 * a_scale) @ (w8 * w_scale)^T (+ bias): a8 (M, K) and w8 (N, K)
// float8_e4m3fn or float8_e5m2 with a contiguous last dim; a_gran / w_gran KPT_FP8_GEMM_*;
// impl KPT_FP8_GEMM_IMPL_*, (block_m, block_n) an instantiated tile, split_k K splits.
void forward(const at::Tensor& a8, const at::Tensor& w8, const at::Tensor& a_scale,
             const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
             const at::Tensor& out, int64_t a_gran, int64_t w_gran, int64_t impl,
             int64_t block_m, int64_t block_n, int64_t split_k, int64_t group_m,
             int64_t stream) {
  check_gpu(a8, a8, "a8");
  check_gpu(w8, a8, "w8");
  int fmt;
  if (a8.scalar_type() == at::ScalarType::Float8_e4m3fn) {
    fmt = KPT_FP8_GEMM_E4M3;
  } else if (a8.scalar_type() == at::ScalarType::Float8_e5m2) {
    fmt = KPT_FP8_GEMM_E5M2;
  } else {
    TORCH_CHECK(false, kOp, ": a8 must be float8_e4m3fn or float8_e5m2, got ",
                a8.scalar_type());
  }
  TORCH_CHECK(w8.scalar_type() == a8.scalar_type(), kOp, ": w8 must be ", a8.scalar_type(),
              " like a8, got ", w8.scalar_type());
  TORCH_CHECK(a8.dim() == 2 && w8.dim() == 2 && a8.size(1) == w8.size(1), kOp,
              ": a8 (M, K) and w8 (N, K) must be 2-D with one K, got ", a8.sizes(), " and ",
              w8.sizes());
  TORCH_CHECK(a8.stride(1) == 1 && w8.stride(1) == 1, kOp,
              ": a8 and w8 must have a contiguous last dim");
  const int64_t M = a8.size(0), N = w8.size(0), K = a8.size(1);
  check_gpu(out, a8, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.stride(1) == 1, kOp,
              ": out must be (", M, ", ", N, ") with a contiguous last dim, got ", out.sizes());
  check_scale(a_scale, a8, "a_scale", a_gran, M, 1, K);
  check_scale(w_scale, a8, "w_scale", w_gran, N, KPT_FP8_GEMM_SCALE_K, K);
  if (bias) {
    check_gpu(*bias, a8, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kOp, ": bias must be (", N, ",), got ",
                bias->sizes());
  }
  if (M == 0) return;

  at::Tensor workspace;
  const int64_t ws = kpt_fp8_gemm_workspace(M, N, static_cast<int>(split_k));
  if (ws > 0) workspace = at::empty({ws}, a8.options().dtype(at::kFloat));

  kpt_fp8_gemm_args a{};
  a.fmt = fmt;
  a.impl = static_cast<int>(impl);
  a.block_m = static_cast<int>(block_m);
  a.block_n = static_cast<int>(block_n);
  a.split_k = static_cast<int>(split_k);
  a.group_m = static_cast<int>(group_m);
  a.a = a8.data_ptr();
  a.a_row = a8.stride(0);
  a.w = w8.data_ptr();
  a.w_row = w8.stride(0);
  a.m = M;
  a.n = N;
  a.k = K;
  a.a_gran = static_cast<int>(a_gran);
  a.w_gran = static_cast<int>(w_gran);
  a.a_scale = a_scale.data_ptr<float>();
  a.a_scale_s0 = a_scale.stride(0);
  a.a_scale_s1 = a_scale.stride(1);
  a.w_scale = w_scale.data_ptr<float>();
  a.w_scale_s0 = w_scale.stride(0);
  a.w_scale_s1 = w_scale.stride(1);
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.bias_dtype = bias ? dtype_code(*bias, "bias") : KPT_FP8_GEMM_FP32;
  a.bias_stride = bias ? bias->stride(0) : 0;
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out, "out");
  a.out_row = out.stride(0);
  a.workspace = ws > 0 ? workspace.data_ptr<float>() : nullptr;
  const int code = launch(&a, as_stream(stream));
  TORCH_CHECK(code == 0, kOp, ": the kernel launch failed: ", kpt_fp8_gemm_error_string(code),
              " (code ", code, ")");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef KPT_FP8_GEMM_SM90_BUILD
  m.doc() = "kpt fp8_gemm kernels for sm_90a (TMA + wgmma)";
#else
  m.doc() = "kpt fp8_gemm kernels (CUDA/HIP): mma.sync and CUDA-core tiles";
  m.def(
      "tile_supported",
      [](int64_t impl, int64_t block_m, int64_t block_n) {
        return kpt_fp8_gemm_tile_supported(static_cast<int>(impl), static_cast<int>(block_m),
                                           static_cast<int>(block_n)) != 0;
      },
      "whether a tile is instantiated", py::arg("impl"), py::arg("block_m"), py::arg("block_n"));
#endif
  m.def("forward", &forward, "out = (a8 * a_scale) @ (w8 * w_scale)^T (+ bias)", py::arg("a8"),
        py::arg("w8"), py::arg("a_scale"), py::arg("w_scale"), py::arg("bias"), py::arg("out"),
        py::arg("a_gran"), py::arg("w_gran"), py::arg("impl"), py::arg("block_m"),
        py::arg("block_n"), py::arg("split_k"), py::arg("group_m"), py::arg("stream"));
  m.attr("MAX_SPLIT_K") = static_cast<int>(KPT_FP8_GEMM_MAX_SPLIT_K);
}
