// Torch binding of the rmsnorm_qkv_rope kernels: checks tensors, passes raw pointers.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle (torch.cuda.current_stream().cuda_stream) and has made the tensors' device
// current.

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "kpt/rmsnorm_qkv_rope.h"

namespace {

constexpr const char* kOp = "rmsnorm_qkv_rope";

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return KPT_RQR_FP16;
  if (t.scalar_type() == at::kBFloat16) return KPT_RQR_BF16;
  TORCH_CHECK(false, kOp, ": dtype must be float16 or bfloat16, got ", t.scalar_type());
}

bool aligned16(const at::Tensor& t) {
  return (reinterpret_cast<std::uintptr_t>(t.data_ptr()) & 15) == 0;
}

void check_gpu(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA/HIP tensor");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(aligned16(t), kOp, ": ", name, " must be 16-byte aligned");
}

// A contiguous tensor of `like`'s dtype and device with the given sizes.
void check_dense(const at::Tensor& t, const at::Tensor& like, const char* name,
                 at::IntArrayRef sizes) {
  check_gpu(t, like, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, kOp, ": ", name, " has shape ", t.sizes(), ", expected ",
              sizes);
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// (rows, cols) with unit column stride and a row stride that keeps rows 16-byte aligned.
void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t rows,
                int64_t cols) {
  check_gpu(t, like, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " dtype mismatch");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, kOp, ": ", name,
              " must be (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 && (rows <= 1 || t.stride(0) % 8 == 0), kOp, ": ", name,
              " needs a contiguous last dim and a row stride that is a multiple of 8");
}

void raise_on_error(int code, const char* launcher) {
  TORCH_CHECK(code == 0, kOp, ": ", launcher, " failed: ", kpt_rqr_error_string(code),
              " (code ", code, ")");
}

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

void add_rmsnorm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& residual_out, const at::Tensor& weight,
                 const at::Tensor& xn, double eps, int64_t stream) {
  const int dtype = dtype_code(x);
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be (tokens, hidden)");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  check_rows(x, x, "x", tokens, hidden);
  check_dense(weight, x, "norm_weight", {hidden});
  check_dense(xn, x, "xn", {tokens, hidden});
  TORCH_CHECK(residual.has_value() == residual_out.has_value(), kOp,
              ": residual and residual_out come together");
  const void* res = nullptr;
  void* res_out = nullptr;
  int64_t res_stride = 0;
  if (residual) {
    check_rows(*residual, x, "residual", tokens, hidden);
    check_dense(*residual_out, x, "residual_out", {tokens, hidden});
    res = residual->data_ptr();
    res_out = residual_out->data_ptr();
    res_stride = residual->stride(0);
  }
  raise_on_error(kpt_rqr_add_rmsnorm(dtype, x.data_ptr(), x.stride(0), res, res_stride, res_out,
                                     weight.data_ptr(), xn.data_ptr(), tokens, hidden,
                                     static_cast<float>(eps), as_stream(stream)),
                 "kpt_rqr_add_rmsnorm");
}

void gemv(const at::Tensor& xn, const at::Tensor& weight, const at::Tensor& partials,
          int64_t impl, int64_t row_tiles, int64_t stream) {
  const int dtype = dtype_code(xn);
  TORCH_CHECK(xn.dim() == 2 && weight.dim() == 2, kOp, ": xn and qkv_weight must be 2-D");
  const int64_t tokens = xn.size(0), k = xn.size(1), n = weight.size(0);
  check_dense(xn, xn, "xn", {tokens, k});
  check_dense(weight, xn, "qkv_weight", {n, k});
  check_gpu(partials, xn, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat && partials.dim() == 3 &&
                  partials.size(1) == tokens && partials.size(2) == n && partials.is_contiguous(),
              kOp, ": partials must be contiguous float32 (splits, ", tokens, ", ", n, ")");
  raise_on_error(kpt_rqr_gemv(dtype, static_cast<int>(impl), static_cast<int>(row_tiles),
                              xn.data_ptr(), weight.data_ptr(), partials.data_ptr<float>(),
                              tokens, n, k, partials.size(0), as_stream(stream)),
                 "kpt_rqr_gemv");
}

void epilogue(const at::Tensor& qkv, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& q_norm_weight,
              const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions,
              const at::Tensor& inv_freq, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, int64_t rotary_dim, double eps, bool neox, int64_t stream) {
  const int dtype = dtype_code(q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, kOp, ": q, k, v must be (tokens, heads, head_dim)");
  const int64_t tokens = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2);
  const int64_t n = (hq + 2 * hkv) * d;
  check_dense(q, q, "q", {tokens, hq, d});
  check_dense(k, q, "k", {tokens, hkv, d});
  check_dense(v, q, "v", {tokens, hkv, d});
  int64_t splits = 0;
  check_gpu(qkv, q, "qkv workspace");
  TORCH_CHECK(qkv.is_contiguous(), kOp, ": qkv workspace must be contiguous");
  if (qkv.scalar_type() == at::kFloat) {
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == tokens && qkv.size(2) == n, kOp,
                ": partials must be (splits, ", tokens, ", ", n, "), got ", qkv.sizes());
    splits = qkv.size(0);
    TORCH_CHECK(splits > 0, kOp, ": partials need at least one split");
  } else {
    check_dense(qkv, q, "qkv workspace", {tokens, n});
    TORCH_CHECK(!bias, kOp, ": the bias of a rounded projection is added by the GEMM");
  }
  const void* bias_ptr = nullptr;
  if (bias) {
    check_dense(*bias, q, "qkv_bias", {n});
    bias_ptr = bias->data_ptr();
  }
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(), kOp,
              ": q_norm_weight and k_norm_weight come together");
  const void* qn = nullptr;
  const void* kn = nullptr;
  if (q_norm_weight) {
    check_dense(*q_norm_weight, q, "q_norm_weight", {d});
    check_dense(*k_norm_weight, q, "k_norm_weight", {d});
    qn = q_norm_weight->data_ptr();
    kn = k_norm_weight->data_ptr();
  }
  TORCH_CHECK(positions.is_cuda() && positions.device() == q.device(), kOp,
              ": positions must be on ", q.device());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == tokens, kOp,
              ": positions must be (", tokens, ",)");
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, kOp,
              ": positions must be int32 or int64");
  TORCH_CHECK(inv_freq.is_cuda() && inv_freq.device() == q.device() &&
                  inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
                  inv_freq.dim() == 1 && inv_freq.size(0) == rotary_dim / 2,
              kOp, ": inv_freq must be contiguous float32 (rotary_dim / 2,) on ", q.device());
  raise_on_error(
      kpt_rqr_epilogue(dtype, qkv.data_ptr(), splits, bias_ptr, qn, kn, positions.data_ptr(),
                       positions.scalar_type() == at::kLong, positions.stride(0),
                       inv_freq.data_ptr<float>(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                       tokens, hq, hkv, d, rotary_dim, static_cast<float>(eps), neox,
                       as_stream(stream)),
      "kpt_rqr_epilogue");
}

// `t` itself when its start and every row are 16-byte aligned with a unit last stride (what
// the kernels' 16-byte vectors need), else a contiguous copy in a fresh allocation.
at::Tensor aligned_or_copy(const at::Tensor& t) {
  bool rows_ok = t.dim() > 0 && t.stride(t.dim() - 1) == 1 && aligned16(t);
  for (int64_t i = 0; rows_ok && i + 1 < t.dim(); ++i) {
    rows_ok = t.size(i) <= 1 || t.stride(i) % 8 == 0;
  }
  return rows_ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::optional<at::Tensor> aligned_or_copy(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return aligned_or_copy(*t);
}

// The whole op in one call from Python (its per-call host cost is what decode pays per layer):
// residual add + RMSNorm, the projection (split-K GEMV when `gemv_impl` >= 0, else the BLAS
// GEMM through ATen, bias added before its rounding), then the epilogue. Workspaces come from
// torch's caching allocator on the current stream; `x`, `q`, `k`, `v` (and `residual_out`) are
// the op's (tokens, ...) tensors, every shape is checked by the entry points above.
void forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
             const std::optional<at::Tensor>& residual_out, const at::Tensor& norm_weight,
             const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
             const std::optional<at::Tensor>& q_norm_weight,
             const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions,
             const at::Tensor& inv_freq, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& v, int64_t rotary_dim, double eps, bool neox, int64_t gemv_impl,
             int64_t row_tiles, int64_t splits, int64_t stream) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be (tokens, hidden)");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  if (tokens == 0) return;
  const at::Tensor weight = aligned_or_copy(qkv_weight);
  std::optional<at::Tensor> bias = aligned_or_copy(qkv_bias);
  const std::optional<at::Tensor> res = aligned_or_copy(residual);
  const at::Tensor xn = at::empty({tokens, hidden}, x.options());
  add_rmsnorm(aligned_or_copy(x), res, res ? residual_out : std::nullopt,
              aligned_or_copy(norm_weight), xn, eps, stream);
  const int64_t n = weight.size(0);
  at::Tensor qkv;
  if (gemv_impl >= 0) {
    TORCH_CHECK(splits > 0, kOp, ": the GEMV needs at least one split");
    qkv = at::empty({splits, tokens, n}, x.options().dtype(at::kFloat));
    gemv(xn, weight, qkv, gemv_impl, row_tiles, stream);
  } else {
    qkv = at::empty({tokens, n}, x.options());
    if (bias) {
      at::addmm_out(qkv, *bias, xn, weight.t());
    } else {
      at::mm_out(qkv, xn, weight.t());
    }
    bias = std::nullopt;  // added by the GEMM, before its rounding
  }
  epilogue(qkv, bias, aligned_or_copy(q_norm_weight), aligned_or_copy(k_norm_weight), positions,
           inv_freq.contiguous(), q, k, v, rotary_dim, eps, neox, stream);
}

// forward into new tensors: (q, k, v, residual_out) for `tokens` rows, allocated here
// (residual_out is empty without a residual), so that an eager call is one native call.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_new(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& norm_weight,
    const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& q_norm_weight,
    const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions,
    const at::Tensor& inv_freq, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t rotary_dim, double eps, bool neox, int64_t gemv_impl, int64_t row_tiles,
    int64_t splits, int64_t stream) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be (tokens, hidden)");
  const int64_t tokens = x.size(0);
  at::Tensor q = at::empty({tokens, num_q_heads, head_dim}, x.options());
  at::Tensor k = at::empty({tokens, num_kv_heads, head_dim}, x.options());
  at::Tensor v = at::empty({tokens, num_kv_heads, head_dim}, x.options());
  at::Tensor residual_out =
      residual ? at::empty({tokens, x.size(1)}, x.options()) : at::empty({0}, x.options());
  forward(x, residual, residual ? std::optional<at::Tensor>(residual_out) : std::nullopt,
          norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions, inv_freq,
          q, k, v, rotary_dim, eps, neox, gemv_impl, row_tiles, splits, stream);
  return {q, k, v, residual_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt rmsnorm_qkv_rope kernels (CUDA/HIP)";
  m.def("add_rmsnorm", &add_rmsnorm, "residual add + RMSNorm into xn", py::arg("x"),
        py::arg("residual"), py::arg("residual_out"), py::arg("weight"), py::arg("xn"),
        py::arg("eps"), py::arg("stream"));
  m.def("gemv", &gemv, "split-K GEMV partial sums", py::arg("xn"), py::arg("weight"),
        py::arg("partials"), py::arg("impl"), py::arg("row_tiles"), py::arg("stream"));
  m.def("epilogue", &epilogue, "bias, q/k RMSNorm, RoPE, split into q, k, v", py::arg("qkv"),
        py::arg("bias"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
        py::arg("positions"), py::arg("inv_freq"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("rotary_dim"), py::arg("eps"), py::arg("neox"), py::arg("stream"));
  m.def("forward", &forward, "the whole op: add_rmsnorm, projection, epilogue", py::arg("x"),
        py::arg("residual"), py::arg("residual_out"), py::arg("norm_weight"),
        py::arg("qkv_weight"), py::arg("qkv_bias"), py::arg("q_norm_weight"),
        py::arg("k_norm_weight"), py::arg("positions"), py::arg("inv_freq"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("rotary_dim"), py::arg("eps"), py::arg("neox"),
        py::arg("gemv_impl"), py::arg("row_tiles"), py::arg("splits"), py::arg("stream"));
  m.def("forward_new", &forward_new, "forward into new (q, k, v, residual_out)", py::arg("x"),
        py::arg("residual"), py::arg("norm_weight"), py::arg("qkv_weight"),
        py::arg("qkv_bias"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
        py::arg("positions"), py::arg("inv_freq"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("eps"),
        py::arg("neox"), py::arg("gemv_impl"), py::arg("row_tiles"), py::arg("splits"),
        py::arg("stream"));
  m.attr("GEMV_MMA") = static_cast<int>(KPT_RQR_GEMV_MMA);
  m.attr("GEMV_SIMT") = static_cast<int>(KPT_RQR_GEMV_SIMT);
}
