// Torch binding of the sm90 flash-attention forward and backward: checks tensors, passes raw
// pointers.
//
// Only torch/extension.h is included, so this file compiles with the host compiler; the caller
// passes the current stream as an integer handle (torch.cuda.current_stream().cuda_stream) and
// has made the tensors' device current. kpt/ops/flash_attention/_sm90.py validates every
// constraint first (with readable reasons); these checks only keep the entry point safe.

#include <torch/extension.h>

#include <cstdint>
#include <tuple>

#include "kpt/flash_attention_sm90.h"

namespace {

constexpr const char* kOp = "flash_attention[sm90]";

// (B, S, H, D) with q's batch and head dim, or for varlen (tokens, H, D) with q's head dim; on
// q's device, of q's dtype, with a unit last stride.
void check_layout(const at::Tensor& t, const at::Tensor& q, const char* name,
                  bool varlen = false) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), kOp, ": ", name, " must be on ",
              q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " dtype mismatch");
  if (varlen) {
    TORCH_CHECK(t.dim() == 3 && t.size(2) == q.size(2), kOp, ": ", name,
                " must be (tokens, H, D) like q");
  } else {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(3) == q.size(3), kOp, ": ",
                name, " must be (B, S, H, D) like q");
  }
  TORCH_CHECK(t.stride(-1) == 1, kOp, ": ", name, " needs a contiguous last dim");
}

// dtype, layouts and shapes of the tensors both directions take.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, bool varlen = false) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
              ": dtype must be float16 or bfloat16");
  check_layout(q, q, "q", varlen);
  check_layout(k, q, "k", varlen);
  check_layout(v, q, "v", varlen);
  check_layout(out, q, "out", varlen);
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape");
  TORCH_CHECK(out.sizes() == q.sizes(), kOp, ": out must be shaped like q");
}

// The counter words and workspace floats a forward launch of `variant` needs on the current
// device (kpt_fa90_forward_scratch).
std::tuple<int64_t, int64_t> forward_scratch(int64_t head_dim, int64_t batch, int64_t seqlen_q,
                                             int64_t seqlen_k, int64_t heads,
                                             int64_t window_left, int64_t window_right,
                                             int64_t variant) {
  int64_t words = 0, floats = 0;
  const int rc = kpt_fa90_forward_scratch(static_cast<int>(head_dim), batch, seqlen_q, seqlen_k,
                                          heads, window_left, window_right,
                                          static_cast<int>(variant), &words, &floats);
  TORCH_CHECK(rc == KPT_FA90_OK, kOp, ": kpt_fa90_forward_scratch failed: ",
              kpt_fa90_error_string(rc));
  return {words, floats};
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
             const at::Tensor& lse, double scale, double softcap, int64_t window_left,
             int64_t window_right, int64_t variant, int64_t stream) {
  check_inputs(q, k, v, out);
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              kOp, ": lse must be contiguous float32 (B, H, Sq)");
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int dtype = q.scalar_type() == at::kBFloat16 ? KPT_FA90_BF16 : KPT_FA90_FP16;
  // The dynamic variant's tile counter (and the counters of its split tiles): zeroed on the
  // current stream; the split's workspace; both freed (stream-ordered, by the caching
  // allocator) once the launch is done with them.
  at::Tensor counter, split;
  if (variant == KPT_FA90_VARIANT_DYNAMIC) {
    const auto [words, floats] = forward_scratch(q.size(3), q.size(0), q.size(1), k.size(1),
                                                 q.size(2), window_left, window_right, variant);
    counter = at::zeros({words}, q.options().dtype(at::kInt));
    if (floats > 0) split = at::empty({floats}, q.options().dtype(at::kFloat));
  }
  const int code = kpt_fa90_forward(
      dtype, static_cast<int>(q.size(3)), q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs,
      out.data_ptr(), os, lse.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2),
      k.size(2), static_cast<float>(scale), static_cast<float>(softcap), window_left,
      window_right, static_cast<int>(variant),
      counter.defined() ? reinterpret_cast<unsigned int*>(counter.data_ptr<int>()) : nullptr,
      split.defined() ? split.data_ptr<float>() : nullptr,
      reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(code == KPT_FA90_OK, kOp, ": kpt_fa90_forward failed: ",
              kpt_fa90_error_string(code), " (code ", code, ")");
}

// forward into new tensors: out (contiguous, q's shape and dtype) and lse (B, H, Sq) float32,
// allocated here (one native call for the whole eager forward).
std::tuple<at::Tensor, at::Tensor> forward_new(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, double scale, double softcap,
                                               int64_t window_left, int64_t window_right,
                                               int64_t variant, int64_t stream) {
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be (B, S, H, D)");
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  forward(q, k, v, out, lse, scale, softcap, window_left, window_right, variant, stream);
  return {out, lse};
}

// Varlen forward: q and out (Tq, H, D), k and v (Tk, Hkv, D), lse (H, Tq), cu_seqlens int32
// (B + 1). The caller has checked the boundaries (non-decreasing, inside the tensors, none
// longer than the max_seqlen given); rows outside every sequence are left as they are.
void forward_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                    double scale, double softcap, int64_t window_left, int64_t window_right,
                    int64_t variant, int64_t stream) {
  check_inputs(q, k, v, out, /*varlen=*/true);
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == q.size(1) &&
                  lse.size(1) == q.size(0),
              kOp, ": lse must be contiguous float32 (H, Tq)");
  for (const at::Tensor* cu : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(cu->is_cuda() && cu->device() == q.device() && cu->scalar_type() == at::kInt &&
                    cu->is_contiguous() && cu->dim() == 1 && cu->size(0) >= 2,
                kOp, ": cu_seqlens must be contiguous int32 (B + 1,) on ", q.device());
  }
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), kOp,
              ": cu_seqlens_q and cu_seqlens_k must have the same length");
  const int64_t qs[2] = {q.stride(0), q.stride(1)};
  const int64_t ks[2] = {k.stride(0), k.stride(1)};
  const int64_t vs[2] = {v.stride(0), v.stride(1)};
  const int64_t os[2] = {out.stride(0), out.stride(1)};
  const int dtype = q.scalar_type() == at::kBFloat16 ? KPT_FA90_BF16 : KPT_FA90_FP16;
  at::Tensor counter;
  if (variant == KPT_FA90_VARIANT_DYNAMIC) counter = at::zeros({1}, q.options().dtype(at::kInt));
  const int code = kpt_fa90_forward_varlen(
      dtype, static_cast<int>(q.size(2)), q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs,
      out.data_ptr(), os, lse.data_ptr<float>(), cu_seqlens_q.data_ptr<int>(),
      cu_seqlens_k.data_ptr<int>(), cu_seqlens_q.size(0) - 1, q.size(0), k.size(0),
      max_seqlen_q, max_seqlen_k, q.size(1), k.size(1), static_cast<float>(scale),
      static_cast<float>(softcap), window_left, window_right, static_cast<int>(variant),
      counter.defined() ? reinterpret_cast<unsigned int*>(counter.data_ptr<int>()) : nullptr,
      reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(code == KPT_FA90_OK, kOp, ": kpt_fa90_forward_varlen failed: ",
              kpt_fa90_error_string(code), " (code ", code, ")");
}

void check_lse(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kFloat &&
                  t.is_contiguous() && t.dim() == 3 && t.size(0) == q.size(0) &&
                  t.size(1) == q.size(2) && t.size(2) == q.size(1),
              kOp, ": ", name, " must be contiguous float32 (B, H, Sq)");
}

const int64_t* strides3(const at::Tensor& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
  return s;
}

void backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const at::Tensor& workspace, double scale, double softcap,
              int64_t window_left, int64_t window_right, int64_t stream) {
  check_inputs(q, k, v, out);
  check_layout(dout, q, "dout");
  check_layout(dq, q, "dq");
  check_layout(dk, q, "dk");
  check_layout(dv, q, "dv");
  TORCH_CHECK(dk.sizes() == k.sizes() && dv.sizes() == k.sizes(), kOp,
              ": dk and dv must be shaped like k");
  TORCH_CHECK(dout.sizes() == q.sizes() && dq.sizes() == q.sizes(), kOp,
              ": dout and dq must be shaped like q");
  check_lse(lse, q, "lse");
  if (dlse.has_value()) check_lse(*dlse, q, "dlse");
  const int dtype = q.scalar_type() == at::kBFloat16 ? KPT_FA90_BF16 : KPT_FA90_FP16;
  const int64_t need =
      kpt_fa90_backward_workspace(q.size(0), q.size(1), q.size(2), static_cast<int>(q.size(3)));
  TORCH_CHECK(workspace.is_cuda() && workspace.device() == q.device() &&
                  workspace.scalar_type() == at::kFloat && workspace.is_contiguous() &&
                  workspace.numel() >= need,
              kOp, ": workspace must be contiguous float32 with at least ", need, " elements");
  int64_t qs[3], ks[3], vs[3], os[3], gs[3], dqs[3], dks[3], dvs[3];
  const int code = kpt_fa90_backward(
      dtype, static_cast<int>(q.size(3)), q.data_ptr(), strides3(q, qs), k.data_ptr(),
      strides3(k, ks), v.data_ptr(), strides3(v, vs), out.data_ptr(), strides3(out, os),
      dout.data_ptr(), strides3(dout, gs), lse.data_ptr<float>(),
      dlse.has_value() ? dlse->data_ptr<float>() : nullptr, dq.data_ptr(), strides3(dq, dqs),
      dk.data_ptr(), strides3(dk, dks), dv.data_ptr(), strides3(dv, dvs),
      workspace.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
      static_cast<float>(scale), static_cast<float>(softcap), window_left, window_right,
      reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(code == KPT_FA90_OK, kOp, ": kpt_fa90_backward failed: ",
              kpt_fa90_error_string(code), " (code ", code, ")");
}

int64_t backward_workspace(int64_t batch, int64_t seqlen_q, int64_t heads, int64_t head_dim) {
  return kpt_fa90_backward_workspace(batch, seqlen_q, heads, static_cast<int>(head_dim));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt flash-attention forward and backward for Hopper (sm_90a: TMA + wgmma)";
  m.def("forward", &forward, "attention forward into out and lse", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("softcap"),
        py::arg("window_left"), py::arg("window_right"), py::arg("variant"),
        py::arg("stream"));
  m.def("forward_new", &forward_new, "attention forward into new (out, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("softcap"),
        py::arg("window_left"), py::arg("window_right"), py::arg("variant"), py::arg("stream"));
  m.def("forward_varlen", &forward_varlen,
        "varlen attention forward into out and lse (the overlap kernel's variants)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("window_right"), py::arg("variant"), py::arg("stream"));
  m.def("backward", &backward, "attention backward into dq, dk and dv (fp32 dq atomics)",
        py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("workspace"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("window_right"), py::arg("stream"));
  m.def("forward_scratch", &forward_scratch,
        "(zeroed uint32 counter words, float32 workspace elements) a forward launch of this "
        "variant uses on the current device; workspace > 0: the dynamic variant splits its last "
        "tiles over their key blocks",
        py::arg("head_dim"), py::arg("batch"), py::arg("seqlen_q"), py::arg("seqlen_k"),
        py::arg("heads"), py::arg("window_left"), py::arg("window_right"), py::arg("variant"));
  m.def("backward_workspace", &backward_workspace,
        "float32 elements of the backward's workspace", py::arg("batch"), py::arg("seqlen_q"),
        py::arg("heads"), py::arg("head_dim"));
}
