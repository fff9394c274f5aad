// Torch binding of the paged_attention kernels: checks tensors, passes raw pointers.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle and has made the tensors' device current. The split-KV workspace comes from
// torch's caching allocator on that stream (graph capture takes it from the graph's pool).

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "kpt/paged_attention.h"

namespace {

constexpr const char* kOp = "paged_attention";

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return KPT_PA_FP16;
  if (t.scalar_type() == at::kBFloat16) return KPT_PA_BF16;
  TORCH_CHECK(false, kOp, ": q must be float16 or bfloat16, got ", t.scalar_type());
}

int kv_code(const at::Tensor& cache, const at::Tensor& q) {
  if (cache.scalar_type() == q.scalar_type()) return KPT_PA_KV_SAME;
  if (cache.scalar_type() == at::ScalarType::Float8_e4m3fn) return KPT_PA_KV_E4M3;
  if (cache.scalar_type() == at::ScalarType::Float8_e5m2) return KPT_PA_KV_E5M2;
  TORCH_CHECK(false, kOp, ": the caches must be ", q.scalar_type(),
              " like q, float8_e4m3fn or float8_e5m2, got ", cache.scalar_type());
}

void check_gpu(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA/HIP tensor");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(),
              ", expected ", like.device());
}

void check_index(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t dim) {
  check_gpu(t, like, name);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == dim && t.is_contiguous(), kOp, ": ",
              name, " must be a contiguous ", dim, "-D int32 tensor, got ", t.scalar_type(),
              " ", t.sizes());
}

void raise_on_error(int code) {
  TORCH_CHECK(code == 0, kOp, ": kpt_pa_forward failed: ", kpt_pa_error_string(code), " (code ",
              code, ")");
}

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

// Writes out (like q) and lse (float32: (tokens, heads_q) for decode, (heads_q, tokens) with
// cu_seqlens_q). The caches are (pages, page_size, heads_kv, D), or (pages, heads_kv,
// page_size, D) with hnd; `rows` and `splits` are the launch plan (kpt/paged_attention.h).
void forward(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
             const at::Tensor& block_table, const at::Tensor& seq_lens,
             const std::optional<at::Tensor>& cu_seqlens_q,
             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
             const at::Tensor& out, const at::Tensor& lse, bool hnd, int64_t max_seqlen_q,
             double scale, double softcap, int64_t window_left, int64_t window_right,
             int64_t rows, int64_t splits, int64_t min_split_keys, int64_t stream) {
  const int dtype = dtype_code(q);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, kOp,
              ": q must be (tokens, heads_q, head_dim) with a contiguous last dim");
  const int64_t tokens = q.size(0), heads_q = q.size(1), d = q.size(2);
  check_gpu(q, q, "q");
  check_gpu(k_cache, q, "k_cache");
  check_gpu(v_cache, q, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              kOp, ": k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " must be 4-D of one shape and dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, kOp,
              ": the caches need a contiguous last dim");
  TORCH_CHECK(k_cache.size(3) == d, kOp, ": head_dim of q (", d, ") and the caches (",
              k_cache.size(3), ") differ");
  const int kv_dtype = kv_code(k_cache, q);
  const int64_t heads_kv = k_cache.size(hnd ? 1 : 2), page_size = k_cache.size(hnd ? 2 : 1);
  const int slot_axis = hnd ? 2 : 1, head_axis = hnd ? 1 : 2;

  check_gpu(out, q, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes() &&
                  out.stride(2) == 1,
              kOp, ": out must be shaped like q with a contiguous last dim");
  check_gpu(lse, q, "lse");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t lse_rows = varlen ? heads_q : tokens, lse_cols = varlen ? tokens : heads_q;
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == lse_rows &&
                  lse.size(1) == lse_cols,
              kOp, ": lse must be float32 (", lse_rows, ", ", lse_cols, "), got ",
              lse.scalar_type(), " ", lse.sizes());

  check_index(block_table, q, "block_table", 2);
  check_index(seq_lens, q, "seq_lens", 1);
  const int64_t batch = block_table.size(0);
  TORCH_CHECK(seq_lens.size(0) == batch, kOp, ": seq_lens has ", seq_lens.size(0),
              " entries, block_table ", batch, " rows");
  if (varlen) {
    check_index(*cu_seqlens_q, q, "cu_seqlens_q", 1);
    TORCH_CHECK(cu_seqlens_q->size(0) == batch + 1, kOp, ": cu_seqlens_q must have ",
                batch + 1, " entries");
  } else {
    TORCH_CHECK(tokens == batch, kOp, ": decode q has ", tokens, " rows for ", batch,
                " sequences");
  }
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), kOp,
              ": k_scale and v_scale come together");
  if (k_scale) {
    for (const at::Tensor* s : {&*k_scale, &*v_scale}) {
      check_gpu(*s, q, "k_scale/v_scale");
      TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() &&
                      (s->numel() == 1 || s->numel() == heads_kv) &&
                      s->numel() == k_scale->numel(),
                  kOp, ": k_scale and v_scale must be contiguous float32 of 1 or ", heads_kv,
                  " values each");
    }
  }

  kpt_pa_args a{};
  a.dtype = dtype;
  a.kv_dtype = kv_dtype;
  a.q = q.data_ptr();
  a.q_stride_token = q.stride(0);
  a.q_stride_head = q.stride(1);
  a.out = out.data_ptr();
  a.out_stride_token = out.stride(0);
  a.out_stride_head = out.stride(1);
  a.lse = lse.data_ptr<float>();
  a.lse_stride_token = varlen ? lse.stride(1) : lse.stride(0);
  a.lse_stride_head = varlen ? lse.stride(0) : lse.stride(1);
  a.k_cache = k_cache.data_ptr();
  a.k_stride_page = k_cache.stride(0);
  a.k_stride_slot = k_cache.stride(slot_axis);
  a.k_stride_head = k_cache.stride(head_axis);
  a.v_cache = v_cache.data_ptr();
  a.v_stride_page = v_cache.stride(0);
  a.v_stride_slot = v_cache.stride(slot_axis);
  a.v_stride_head = v_cache.stride(head_axis);
  a.block_table = block_table.data_ptr<int32_t>();
  a.table_stride = block_table.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.cu_seqlens_q = varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  a.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
  a.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
  a.scale_per_head = k_scale && k_scale->numel() > 1 ? 1 : 0;
  a.batch = batch;
  a.tokens = tokens;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.head_dim = d;
  a.num_pages = k_cache.size(0);
  a.max_pages = block_table.size(1);
  a.page_size = page_size;
  a.max_seqlen_q = max_seqlen_q;
  a.rows_per_cta = rows;
  a.splits = splits;
  a.min_split_keys = min_split_keys;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.window_left = window_left;
  a.window_right = window_right;
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    partial_out = at::empty({splits, tokens, heads_q, d}, f32);
    partial_lse = at::empty({splits, tokens, heads_q}, f32);
    a.partial_out = partial_out.data_ptr<float>();
    a.partial_lse = partial_lse.data_ptr<float>();
  }
  raise_on_error(kpt_pa_forward(&a, as_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt paged_attention kernels (CUDA/HIP)";
  m.def("forward", &forward, "paged attention into out and lse", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("seq_lens"),
        py::arg("cu_seqlens_q"), py::arg("k_scale"), py::arg("v_scale"), py::arg("out"),
        py::arg("lse"), py::arg("hnd"), py::arg("max_seqlen_q"), py::arg("scale"),
        py::arg("softcap"), py::arg("window_left"), py::arg("window_right"), py::arg("rows"),
        py::arg("splits"), py::arg("min_split_keys"), py::arg("stream"));
  m.attr("MAX_ROWS") = static_cast<int>(KPT_PA_MAX_ROWS);
  m.attr("MAX_SPLITS") = static_cast<int>(KPT_PA_MAX_SPLITS);
}
