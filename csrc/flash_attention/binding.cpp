// Torch binding of the flash_attention kernels: checks tensors, fills kpt_fa_params.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle and has made the tensors' device current. Every tensor is (B, S, H, D) or
// varlen (T, H, D) with any strides and a contiguous last dim.

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "kpt/flash_attention.h"

namespace {

constexpr const char* kOp = "flash_attention";
using Opt = std::optional<at::Tensor>;

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return KPT_FA_FP16;
  if (t.scalar_type() == at::kBFloat16) return KPT_FA_BF16;
  TORCH_CHECK(false, kOp, ": dtype must be float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), kOp, ": ", name, " must be on ",
              like.device(), ", got ", t.device());
}

// (B, S, H, D) or (T, H, D) of q's dtype: contiguous last dim, 16-byte aligned start and
// rows (cp.async copies 16-byte chunks).
kpt_fa_strides rows(const at::Tensor& t, const at::Tensor& like, const char* name, bool varlen,
                    int64_t heads) {
  check_device(t, like, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == (varlen ? 3 : 4), kOp, ": ", name, " must be ",
              varlen ? "(tokens, heads, head_dim)" : "(batch, seq, heads, head_dim)");
  TORCH_CHECK(t.size(-2) == heads && t.size(-1) == like.size(-1), kOp, ": ", name,
              " has shape ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, kOp, ": ", name, " needs a contiguous last dim");
  TORCH_CHECK((reinterpret_cast<std::uintptr_t>(t.data_ptr()) & 15) == 0, kOp, ": ", name,
              " must be 16-byte aligned");
  for (int d = 0; d < t.dim() - 1; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) <= 1, kOp, ": ", name,
                " strides must be multiples of 8 elements (16 bytes)");
  }
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// fp32 (B, H, S) or (H, T) with a unit token stride; returns (batch, head) strides.
std::pair<int64_t, int64_t> lse_strides(const at::Tensor& t, const at::Tensor& q,
                                        const char* name, bool varlen) {
  check_device(t, q, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32");
  const int64_t h = q.size(-2);
  if (varlen) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == h && t.size(1) == q.size(0) && t.stride(1) == 1,
                kOp, ": ", name, " must be (heads, tokens) with unit token stride");
    return {0, t.stride(0)};
  }
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == h &&
                  t.size(2) == q.size(1) && t.stride(2) == 1,
              kOp, ": ", name, " must be (batch, heads, seq) with unit seq stride");
  return {t.stride(0), t.stride(1)};
}

const int32_t* int_ptr(const Opt& t, const at::Tensor& q, const char* name, int64_t dims) {
  if (!t) return nullptr;
  check_device(*t, q, name);
  TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == dims && t->stride(-1) == 1, kOp, ": ",
              name, " must be int32 with ", dims, " dims and a contiguous last dim");
  return t->data_ptr<int32_t>();
}

// Everything the forward and the backward share.
kpt_fa_params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const Opt& cu_q,
                          const Opt& cu_k, int64_t max_q, int64_t max_k, double scale,
                          int64_t left, int64_t right, double softcap, const Opt& alibi,
                          const Opt& prefix, const Opt& doc_q, const Opt& doc_k,
                          const Opt& range) {
  kpt_fa_params p{};
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), kOp, ": cu_seqlens_q/k come together");
  const int64_t hq = q.size(-2), hkv = k.size(-2);
  p.q_st = rows(q, q, "q", varlen, hq);
  p.k_st = rows(k, q, "k", varlen, hkv);
  p.v_st = rows(v, q, "v", varlen, hkv);
  p.out_st = rows(out, q, "out", varlen, hq);
  std::tie(p.lse_batch_stride, p.lse_head_stride) = lse_strides(lse, q, "lse", varlen);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (varlen) {
    p.cu_seqlens_q = int_ptr(cu_q, q, "cu_seqlens_q", 1);
    p.cu_seqlens_k = int_ptr(cu_k, q, "cu_seqlens_k", 1);
    TORCH_CHECK(cu_q->size(0) == cu_k->size(0) && cu_q->size(0) >= 1, kOp,
                ": cu_seqlens_q/k must both be (batch + 1,)");
    p.batch = static_cast<int>(cu_q->size(0) - 1);
    p.total_q = q.size(0);
    p.total_k = k.size(0);
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), kOp, ": q and k/v batch sizes differ");
    p.batch = static_cast<int>(q.size(0));
  }
  p.heads_q = static_cast<int>(hq);
  p.heads_kv = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(q.size(-1));
  p.seqlen_q = static_cast<int>(max_q);
  p.seqlen_k = static_cast<int>(max_k);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(left);
  p.window_right = static_cast<int>(right);
  if (alibi) {
    check_device(*alibi, q, "alibi_slopes");
    TORCH_CHECK(alibi->scalar_type() == at::kFloat && alibi->dim() == 1 &&
                    alibi->size(0) == hq && alibi->stride(0) == 1,
                kOp, ": alibi_slopes must be contiguous float32 (", hq, ",)");
    p.alibi_slopes = alibi->data_ptr<float>();
  }
  p.prefix_len = int_ptr(prefix, q, "prefix_len", 1);
  if (prefix) {
    TORCH_CHECK(prefix->size(0) == p.batch, kOp, ": prefix_len must be (", p.batch, ",)");
  }
  TORCH_CHECK(doc_q.has_value() == doc_k.has_value(), kOp, ": doc_q and doc_k come together");
  p.doc_q = int_ptr(doc_q, q, "doc_q", 2);
  p.doc_k = int_ptr(doc_k, q, "doc_k", 2);
  if (doc_q) {
    TORCH_CHECK(doc_q->size(0) == p.batch && doc_q->size(1) >= max_q && doc_k->size(0) == p.batch &&
                    doc_k->size(1) >= max_k,
                kOp, ": doc_q/doc_k must be (batch, >= max_seqlen_q/k)");
    p.doc_q_batch_stride = doc_q->stride(0);
    p.doc_k_batch_stride = doc_k->stride(0);
  }
  p.kv_block_range = int_ptr(range, q, "kv_block_range", 4);
  if (range) {
    TORCH_CHECK(range->is_contiguous() && range->size(0) == p.batch &&
                    (range->size(1) == 1 || range->size(1) == hq) && range->size(3) == 2 &&
                    range->size(2) >= (max_q + KPT_FA_Q_BLOCK - 1) / KPT_FA_Q_BLOCK,
                kOp, ": kv_block_range must be contiguous int32 (batch, heads or 1, q blocks, 2)");
    p.range_heads = static_cast<int>(range->size(1));
    p.range_q_blocks = static_cast<int>(range->size(2));
  }
  return p;
}

void raise_on_error(int code, const char* launcher) {
  TORCH_CHECK(code == 0, kOp, ": ", launcher, " failed: ", kpt_fa_error_string(code), " (code ",
              code, ")");
}

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, const Opt& cu_q, const Opt& cu_k,
             int64_t max_q, int64_t max_k, double scale, int64_t left, int64_t right,
             double softcap, const Opt& alibi, const Opt& prefix, const Opt& doc_q,
             const Opt& doc_k, const Opt& range, int64_t impl, int64_t stream) {
  const kpt_fa_params p = make_params(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left,
                                      right, softcap, alibi, prefix, doc_q, doc_k, range);
  raise_on_error(kpt_fa_forward(&p, dtype_code(q), static_cast<int>(impl), as_stream(stream)),
                 "kpt_fa_forward");
}

void backward(const at::Tensor& dout, const Opt& dlse, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
              const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const Opt& cu_q, const Opt& cu_k, int64_t max_q,
              int64_t max_k, double scale, int64_t left, int64_t right, double softcap,
              const Opt& alibi, const Opt& prefix, const Opt& doc_q, const Opt& doc_k,
              const Opt& range, int64_t impl, int64_t stream) {
  kpt_fa_params p = make_params(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right,
                                softcap, alibi, prefix, doc_q, doc_k, range);
  const bool varlen = cu_q.has_value();
  p.do_st = rows(dout, q, "dout", varlen, q.size(-2));
  p.dq_st = rows(dq, q, "dq", varlen, q.size(-2));
  p.dk_st = rows(dk, q, "dk", varlen, k.size(-2));
  p.dv_st = rows(dv, q, "dv", varlen, k.size(-2));
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() &&
                  dout.sizes() == q.sizes(),
              kOp, ": dout/dq/dk/dv must be shaped like q/q/k/v");
  // delta and dlse are read with lse's strides.
  TORCH_CHECK(delta.sizes() == lse.sizes() && delta.strides() == lse.strides() &&
                  delta.scalar_type() == at::kFloat,
              kOp, ": delta must be float32 with lse's shape and strides");
  check_device(delta, q, "delta");
  if (dlse) {
    check_device(*dlse, q, "dlse");
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->strides() == lse.strides() &&
                    dlse->scalar_type() == at::kFloat,
                kOp, ": dlse must be float32 with lse's shape and strides");
    p.dlse = dlse->data_ptr<float>();
  }
  p.dout = dout.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  raise_on_error(kpt_fa_backward(&p, dtype_code(q), static_cast<int>(impl), as_stream(stream)),
                 "kpt_fa_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt flash_attention kernels (CUDA/HIP)";
  m.def("forward", &forward, "out and lse", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"),
        py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("alibi_slopes"), py::arg("prefix_len"), py::arg("doc_q"), py::arg("doc_k"),
        py::arg("kv_block_range"), py::arg("impl"), py::arg("stream"));
  m.def("backward", &backward, "dq, dk, dv", py::arg("dout"), py::arg("dlse"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("delta"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("scale"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("alibi_slopes"), py::arg("prefix_len"), py::arg("doc_q"), py::arg("doc_k"),
        py::arg("kv_block_range"), py::arg("impl"), py::arg("stream"));
  m.attr("IMPL_MMA") = static_cast<int>(KPT_FA_IMPL_MMA);
  m.attr("IMPL_SIMT") = static_cast<int>(KPT_FA_IMPL_SIMT);
  m.attr("Q_BLOCK") = static_cast<int>(KPT_FA_Q_BLOCK);
}
