// Torch binding of the moe kernels: checks tensors, allocates workspace, passes raw pointers.
//
// Only torch/extension.h is included (no c10/cuda or CUDA/HIP header), so this file compiles
// with the host compiler against a CPU-only torch; the caller passes the current stream as an
// integer handle and has made the tensors' device current. Workspace comes from torch's
// caching allocator on that stream (graph capture takes it from the graph's pool); its size
// depends on shapes only, never on the routing, so nothing is read back.

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "kpt/moe.h"

namespace {

constexpr const char* kRoute = "moe_route";
constexpr const char* kAlign = "moe align";
constexpr const char* kFused = "fused_moe";

void* as_stream(int64_t handle) { return reinterpret_cast<void*>(static_cast<intptr_t>(handle)); }

void check_gpu(const char* op, const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA/HIP tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

void check_contiguous(const char* op, const at::Tensor& t, const at::Tensor& like,
                      const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  check_gpu(op, t, like, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == sizes && t.is_contiguous(), op, ": ",
              name, " must be a contiguous ", dtype, " tensor of shape ", sizes, ", got ",
              t.scalar_type(), " ", t.sizes());
}

void raise_on_error(const char* op, const char* what, int code) {
  TORCH_CHECK(code == 0, op, ": ", what, " failed: ", kpt_moe_error_string(code), " (code ",
              code, ")");
}

int half_code(const char* op, const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return KPT_MOE_FP16;
  if (t.scalar_type() == at::kBFloat16) return KPT_MOE_BF16;
  TORCH_CHECK(false, op, ": x must be float16 or bfloat16, got ", t.scalar_type());
}

// Writes weights (T, top_k) float32 and ids (T, top_k) int32 for logits (T, E).
void route(const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
           const at::Tensor& weights, const at::Tensor& ids, int64_t top_k, bool sigmoid,
           bool renormalize, int64_t groups, int64_t topk_groups, double scaling,
           int64_t stream) {
  check_gpu(kRoute, logits, logits, "logits");
  TORCH_CHECK(logits.dim() == 2, kRoute, ": logits must be (tokens, experts)");
  int dtype;
  if (logits.scalar_type() == at::kFloat) {
    dtype = KPT_MOE_FP32;
  } else if (logits.scalar_type() == at::kBFloat16) {
    dtype = KPT_MOE_BF16;
  } else if (logits.scalar_type() == at::kHalf) {
    dtype = KPT_MOE_FP16;
  } else {
    TORCH_CHECK(false, kRoute, ": logits must be float32, bfloat16 or float16, got ",
                logits.scalar_type());
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  check_contiguous(kRoute, weights, logits, "weights", at::kFloat, {T, top_k});
  check_contiguous(kRoute, ids, logits, "ids", at::kInt, {T, top_k});
  if (correction_bias) {
    check_contiguous(kRoute, *correction_bias, logits, "correction_bias", at::kFloat, {E});
  }
  kpt_moe_route_args a{};
  a.dtype = dtype;
  a.logits = logits.data_ptr();
  a.stride_token = logits.stride(0);
  a.stride_expert = logits.stride(1);
  a.correction_bias = correction_bias ? correction_bias->data_ptr<float>() : nullptr;
  a.weights = weights.data_ptr<float>();
  a.ids = ids.data_ptr<int32_t>();
  a.tokens = T;
  a.experts = E;
  a.top_k = static_cast<int>(top_k);
  a.sigmoid = sigmoid ? 1 : 0;
  a.renormalize = renormalize ? 1 : 0;
  a.groups = static_cast<int>(groups);
  a.topk_groups = static_cast<int>(topk_groups);
  a.scaling = static_cast<float>(scaling);
  raise_on_error(kRoute, "kpt_moe_route", kpt_moe_route(&a, as_stream(stream)));
}

// kpt.ops.moe.align into preallocated sorted_pairs (P,), block_expert (P / block_m,) and
// num_padded (1,), all int32; ids (T, top_k) int32 contiguous.
void align(const at::Tensor& ids, const std::optional<at::Tensor>& expert_map,
           int64_t local_experts, int64_t block_m, const at::Tensor& sorted_pairs,
           const at::Tensor& block_expert, const at::Tensor& num_padded, int64_t stream) {
  check_gpu(kAlign, ids, ids, "ids");
  TORCH_CHECK(ids.scalar_type() == at::kInt && ids.is_contiguous(), kAlign,
              ": ids must be contiguous int32");
  const int64_t pairs = ids.numel();
  const int64_t capacity = kpt_moe_padded_capacity(pairs, local_experts, block_m);
  check_contiguous(kAlign, sorted_pairs, ids, "sorted_pairs", at::kInt, {capacity});
  check_contiguous(kAlign, block_expert, ids, "block_expert", at::kInt, {capacity / block_m});
  check_contiguous(kAlign, num_padded, ids, "num_padded", at::kInt, {1});
  int64_t global_experts = local_experts;
  if (expert_map) {
    check_gpu(kAlign, *expert_map, ids, "expert_map");
    TORCH_CHECK(expert_map->scalar_type() == at::kInt && expert_map->dim() == 1 &&
                    expert_map->is_contiguous(),
                kAlign, ": expert_map must be a contiguous 1-D int32 tensor");
    global_experts = expert_map->size(0);
  }
  at::Tensor counts = at::empty({kpt_moe_align_chunks(pairs), local_experts},
                                ids.options().dtype(at::kInt));
  kpt_moe_align_args a{};
  a.ids = ids.data_ptr<int32_t>();
  a.expert_map = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  a.pairs = pairs;
  a.global_experts = global_experts;
  a.local_experts = local_experts;
  a.block_m = block_m;
  a.counts = counts.data_ptr<int32_t>();
  a.sorted_pairs = sorted_pairs.data_ptr<int32_t>();
  a.block_expert = block_expert.data_ptr<int32_t>();
  a.num_padded = num_padded.data_ptr<int32_t>();
  raise_on_error(kAlign, "kpt_moe_align", kpt_moe_align(&a, as_stream(stream)));
}

int scale_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return KPT_MOE_FP32;
  if (t.scalar_type() == at::kHalf) return KPT_MOE_FP16;
  if (t.scalar_type() == at::kBFloat16) return KPT_MOE_BF16;
  TORCH_CHECK(false, kFused, ": int4 scales must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// An int4 weight's group size against its reduction length k: 32, 64, 128 or 256 dividing k,
// or k itself (one group); returns the number of groups.
int64_t int4_groups(const char* name, int64_t group, int64_t k) {
  const bool listed = group == 32 || group == 64 || group == 128 || group == 256;
  TORCH_CHECK(group == k || (listed && k % group == 0), kFused, ": ", name, " = ", group,
              " must be 32, 64, 128 or 256 dividing K = ", k, ", or K itself (one group)");
  return k / group;
}

// Writes out (T, H) like x: the fused experts over x (T, H), w13 (E, 2I, H), w2 (E, H, I)
// (x's dtype, or float8_e4m3fn with w13_scale / w2_scale block scales), or int4 experts: w13
// (E, H / 8, 2I), w2 (E, I / 8, H) int32 (int4_gemm's packing), w13_scale (E, H / group13,
// 2I) and w2_scale (E, I / group2, H) float32 / float16 / bfloat16 (one dtype), w13_zeros /
// w2_zeros uint8 of the scales' shapes or None (symmetric), all contiguous; routed by weights
// / ids (T, top_k). impl: KPT_MOE_IMPL_*; (block_m, block_n): an instantiated tile.
void forward(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
             const std::optional<at::Tensor>& w13_scale,
             const std::optional<at::Tensor>& w2_scale,
             const std::optional<at::Tensor>& w13_zeros,
             const std::optional<at::Tensor>& w2_zeros, int64_t group13, int64_t group2,
             const at::Tensor& weights, const at::Tensor& ids,
             const std::optional<at::Tensor>& expert_map, const at::Tensor& out,
             int64_t activation, int64_t impl, int64_t block_m, int64_t block_n,
             bool partial_fp32, int64_t stream) {
  const int dtype = half_code(kFused, x);
  check_gpu(kFused, x, x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, kFused,
              ": x must be (tokens, hidden) with a contiguous last dim");
  const int64_t T = x.size(0), H = x.size(1);
  check_gpu(kFused, w13, x, "w13");
  check_gpu(kFused, w2, x, "w2");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.stride(2) == 1 && w2.stride(2) == 1,
              kFused, ": w13 and w2 must be 3-D with a contiguous last dim");
  const bool fp8 = w13.scalar_type() == at::ScalarType::Float8_e4m3fn;
  const bool int4 = w13.scalar_type() == at::kInt;
  TORCH_CHECK(w2.scalar_type() == w13.scalar_type() &&
                  (fp8 || int4 || w13.scalar_type() == x.scalar_type()),
              kFused, ": w13 and w2 must both be ", x.scalar_type(),
              ", float8_e4m3fn or int32 (int4), got ", w13.scalar_type(), " and ",
              w2.scalar_type());
  const int64_t E = w13.size(0);
  const int64_t I = int4 ? w13.size(2) / 2 : w13.size(1) / 2;
  if (int4) {
    TORCH_CHECK(H % 8 == 0 && I % 8 == 0 && w13.size(1) * 8 == H && w13.size(2) == 2 * I &&
                    w2.size(0) == E && w2.size(1) * 8 == I && w2.size(2) == H,
                kFused, ": int4 w13 ", w13.sizes(), " and w2 ", w2.sizes(),
                " must be (E, H / 8, 2I) and (E, I / 8, H) for hidden ", H);
  } else {
    TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E &&
                    w2.size(1) == H && w2.size(2) == I,
                kFused, ": w13 ", w13.sizes(), " and w2 ", w2.sizes(), " do not fit hidden ",
                H);
  }
  const int64_t k = ids.dim() == 2 ? ids.size(1) : 0;
  check_contiguous(kFused, ids, x, "ids", at::kInt, {T, k});
  check_contiguous(kFused, weights, x, "weights", at::kFloat, {T, k});
  check_contiguous(kFused, out, x, "out", x.scalar_type(), {T, H});
  const int64_t hb = (H + 127) / 128, ib = (I + 127) / 128;
  TORCH_CHECK((fp8 || int4) == (w13_scale.has_value() && w2_scale.has_value()), kFused,
              ": w13_scale and w2_scale come with float8_e4m3fn or int4 experts, and only "
              "with them");
  TORCH_CHECK(int4 || (!w13_zeros.has_value() && !w2_zeros.has_value()), kFused,
              ": w13_zeros and w2_zeros are for int4 experts");
  if (fp8) {
    check_contiguous(kFused, *w13_scale, x, "w13_scale", at::kFloat, {E, (2 * I + 127) / 128, hb});
    check_contiguous(kFused, *w2_scale, x, "w2_scale", at::kFloat, {E, hb, ib});
  }
  int scale_dtype = KPT_MOE_FP32;
  if (int4) {
    scale_dtype = scale_code(*w13_scale);
    const at::ScalarType st = w13_scale->scalar_type();
    const int64_t g13 = int4_groups("group13", group13, H), g2 = int4_groups("group2", group2, I);
    check_contiguous(kFused, *w13_scale, x, "w13_scale", st, {E, g13, 2 * I});
    check_contiguous(kFused, *w2_scale, x, "w2_scale", st, {E, g2, H});
    if (w13_zeros) check_contiguous(kFused, *w13_zeros, x, "w13_zeros", at::kByte, {E, g13, 2 * I});
    if (w2_zeros) check_contiguous(kFused, *w2_zeros, x, "w2_zeros", at::kByte, {E, g2, H});
  }
  int64_t global_experts = E;
  if (expert_map) {
    check_gpu(kFused, *expert_map, x, "expert_map");
    TORCH_CHECK(expert_map->scalar_type() == at::kInt && expert_map->dim() == 1 &&
                    expert_map->is_contiguous(),
                kFused, ": expert_map must be a contiguous 1-D int32 tensor");
    global_experts = expert_map->size(0);
  }
  if (T == 0) return;

  const int64_t pairs = T * k;
  const int64_t capacity = kpt_moe_padded_capacity(pairs, E, block_m);
  const auto i32 = x.options().dtype(at::kInt);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto u8 = x.options().dtype(at::kByte);
  at::Tensor counts = at::empty({kpt_moe_align_chunks(pairs), E}, i32);
  at::Tensor sorted = at::empty({capacity}, i32);
  at::Tensor block_expert = at::empty({capacity / block_m}, i32);
  at::Tensor num_padded = at::empty({1}, i32);
  at::Tensor act = at::empty({capacity, I}, x.options());
  at::Tensor partial =
      k > 1 ? at::empty({pairs, H}, partial_fp32 ? f32 : x.options()) : at::Tensor();
  at::Tensor x_fp8, x_scale, act_fp8, act_scale;
  if (fp8) {
    x_fp8 = at::empty({T, H}, u8);
    x_scale = at::empty({T, hb}, f32);
    act_fp8 = at::empty({capacity, I}, u8);
    act_scale = at::empty({capacity, ib}, f32);
  }

  kpt_moe_args a{};
  a.dtype = dtype;
  a.quant = fp8 ? KPT_MOE_QUANT_FP8 : (int4 ? KPT_MOE_QUANT_INT4 : KPT_MOE_QUANT_NONE);
  a.activation = static_cast<int>(activation);
  a.impl = static_cast<int>(impl);
  a.block_m = static_cast<int>(block_m);
  a.block_n = static_cast<int>(block_n);
  a.partial_fp32 = partial_fp32 ? 1 : 0;
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.w13 = w13.data_ptr();
  a.w13_stride_expert = w13.stride(0);
  a.w13_stride_row = w13.stride(1);
  a.w2 = w2.data_ptr();
  a.w2_stride_expert = w2.stride(0);
  a.w2_stride_row = w2.stride(1);
  a.w13_scale = fp8 ? w13_scale->data_ptr<float>() : nullptr;
  a.w2_scale = fp8 ? w2_scale->data_ptr<float>() : nullptr;
  if (int4) {
    a.int4_scale_dtype = scale_dtype;
    a.w13_int4_scale = w13_scale->data_ptr();
    a.w2_int4_scale = w2_scale->data_ptr();
    a.w13_zeros = w13_zeros ? w13_zeros->data_ptr<uint8_t>() : nullptr;
    a.w2_zeros = w2_zeros ? w2_zeros->data_ptr<uint8_t>() : nullptr;
    a.group13 = group13;
    a.group2 = group2;
  }
  a.weights = weights.data_ptr<float>();
  a.ids = ids.data_ptr<int32_t>();
  a.expert_map = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr();
  a.tokens = T;
  a.hidden = H;
  a.inter = I;
  a.experts = E;
  a.global_experts = global_experts;
  a.top_k = k;
  a.counts = counts.data_ptr<int32_t>();
  a.sorted_pairs = sorted.data_ptr<int32_t>();
  a.block_expert = block_expert.data_ptr<int32_t>();
  a.num_padded = num_padded.data_ptr<int32_t>();
  a.act = act.data_ptr();
  a.partial = k > 1 ? partial.data_ptr() : nullptr;
  if (fp8) {
    a.x_fp8 = x_fp8.data_ptr<uint8_t>();
    a.x_scale = x_scale.data_ptr<float>();
    a.act_fp8 = act_fp8.data_ptr<uint8_t>();
    a.act_scale = act_scale.data_ptr<float>();
  }
  raise_on_error(kFused, "kpt_moe_forward", kpt_moe_forward(&a, as_stream(stream)));
}

// quant: KPT_MOE_QUANT_* (kpt.ops.moe._cuda.QUANTS).
bool tile_supported(int64_t impl, int64_t quant, int64_t block_m, int64_t block_n) {
  return kpt_moe_tile_supported(static_cast<int>(impl), static_cast<int>(quant),
                                static_cast<int>(block_m), static_cast<int>(block_n)) != 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kpt moe kernels (CUDA/HIP): routing, alignment, fused experts";
  m.def("route", &route, "top-k routing into weights and ids", py::arg("logits"),
        py::arg("correction_bias"), py::arg("weights"), py::arg("ids"), py::arg("top_k"),
        py::arg("sigmoid"), py::arg("renormalize"), py::arg("groups"), py::arg("topk_groups"),
        py::arg("scaling"), py::arg("stream"));
  m.def("align", &align, "pairs grouped by local expert, padded to block_m", py::arg("ids"),
        py::arg("expert_map"), py::arg("local_experts"), py::arg("block_m"),
        py::arg("sorted_pairs"), py::arg("block_expert"), py::arg("num_padded"),
        py::arg("stream"));
  m.def("forward", &forward, "fused experts into out", py::arg("x"), py::arg("w13"),
        py::arg("w2"), py::arg("w13_scale"), py::arg("w2_scale"), py::arg("w13_zeros"),
        py::arg("w2_zeros"), py::arg("group13"), py::arg("group2"), py::arg("weights"),
        py::arg("ids"), py::arg("expert_map"), py::arg("out"), py::arg("activation"),
        py::arg("impl"), py::arg("block_m"), py::arg("block_n"), py::arg("partial_fp32"),
        py::arg("stream"));
  m.def("tile_supported", &tile_supported, "whether a tile is instantiated", py::arg("impl"),
        py::arg("quant"), py::arg("block_m"), py::arg("block_n"));
  m.attr("ROUTE_MAX_EXPERTS") = static_cast<int>(KPT_MOE_ROUTE_MAX_EXPERTS);
  m.attr("MAX_LOCAL_EXPERTS") = static_cast<int>(KPT_MOE_MAX_LOCAL_EXPERTS);
}
