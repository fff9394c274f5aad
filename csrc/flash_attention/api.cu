// flash_attention C ABI (kpt/flash_attention.h): argument checks and dispatch to the
// tensor-core (NVIDIA) or SIMT (portable) kernels by dtype and head-dim bucket.

#include "common.cuh"

namespace {

using kpt_fa::launch_bwd_preprocess;
using kpt_fa::launch_bwd_simt;
using kpt_fa::launch_fwd_simt;

int check(const kpt_fa_params* p, int dtype, int impl) {
  if (dtype != KPT_FA_FP16 && dtype != KPT_FA_BF16) return KPT_FA_BAD_DTYPE;
  if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr) {
    return KPT_FA_BAD_ARGUMENT;
  }
  if (p->batch < 0 || p->seqlen_q < 0 || p->seqlen_k < 0 || p->heads_kv <= 0 ||
      p->heads_q <= 0 || p->heads_q % p->heads_kv != 0) {
    return KPT_FA_BAD_ARGUMENT;
  }
  if ((p->cu_seqlens_q == nullptr) != (p->cu_seqlens_k == nullptr)) return KPT_FA_BAD_ARGUMENT;
  if ((p->doc_q == nullptr) != (p->doc_k == nullptr)) return KPT_FA_BAD_ARGUMENT;
  if (p->kv_block_range != nullptr &&
      (p->range_q_blocks < (p->seqlen_q + KPT_FA_Q_BLOCK - 1) / KPT_FA_Q_BLOCK ||
       (p->range_heads != 1 && p->range_heads != p->heads_q))) {
    return KPT_FA_BAD_ARGUMENT;
  }
  // 16-byte vectors (cp.async, and 4-byte stores of the MMA epilogue) need D % 8 == 0.
  if (p->head_dim <= 0 || p->head_dim > KPT_FA_MAX_HEAD_DIM || p->head_dim % 8 != 0) {
    return KPT_FA_UNSUPPORTED;
  }
  if (impl != KPT_FA_IMPL_MMA && impl != KPT_FA_IMPL_SIMT) return KPT_FA_BAD_ARGUMENT;
#ifdef KPT_HIP
  if (impl == KPT_FA_IMPL_MMA) return KPT_FA_UNSUPPORTED;
#endif
  return 0;
}

#ifdef KPT_CUDA
template <class T>
int forward_mma(const kpt_fa_params& p, kpt::stream_t s) {
  if (p.head_dim <= 64) return kpt_fa::launch_fwd_mma<T, 64>(p, s);
  if (p.head_dim <= 128) return kpt_fa::launch_fwd_mma<T, 128>(p, s);
  return kpt_fa::launch_fwd_mma<T, 256>(p, s);
}
#endif

template <class T>
int forward(const kpt_fa_params& p, int impl, kpt::stream_t s) {
#ifdef KPT_CUDA
  if (impl == KPT_FA_IMPL_MMA) return forward_mma<T>(p, s);
#endif
  return launch_fwd_simt<T>(p, s);
}

template <class T>
int backward(const kpt_fa_params& p, int impl, kpt::stream_t s) {
  const int err = launch_bwd_preprocess<T>(p, s);
  if (err != 0) return err;
#ifdef KPT_CUDA
  // The dK/dV kernel keeps dK and dV (D floats a thread) in registers: buckets up to 128.
  if (impl == KPT_FA_IMPL_MMA && p.head_dim <= 64) return kpt_fa::launch_bwd_mma<T, 64>(p, s);
  if (impl == KPT_FA_IMPL_MMA && p.head_dim <= 128) return kpt_fa::launch_bwd_mma<T, 128>(p, s);
#endif
  (void)impl;
  return launch_bwd_simt<T>(p, s);
}

}  // namespace

extern "C" {

int kpt_fa_forward(const kpt_fa_params* p, int dtype, int impl, void* stream) {
  const int bad = check(p, dtype, impl);
  if (bad != 0) return bad;
  if (p->out == nullptr || p->lse == nullptr) return KPT_FA_BAD_ARGUMENT;
  if (p->batch == 0 || p->seqlen_q == 0) return 0;
  const auto s = static_cast<kpt::stream_t>(stream);
  return dtype == KPT_FA_BF16 ? forward<kpt::bf16>(*p, impl, s) : forward<kpt::fp16>(*p, impl, s);
}

int kpt_fa_backward(const kpt_fa_params* p, int dtype, int impl, void* stream) {
  const int bad = check(p, dtype, impl);
  if (bad != 0) return bad;
  if (p->out == nullptr || p->lse == nullptr || p->dout == nullptr || p->delta == nullptr ||
      p->dq == nullptr || p->dk == nullptr || p->dv == nullptr) {
    return KPT_FA_BAD_ARGUMENT;
  }
  if (p->batch == 0 || (p->seqlen_q == 0 && p->seqlen_k == 0)) return 0;
  const auto s = static_cast<kpt::stream_t>(stream);
  return dtype == KPT_FA_BF16 ? backward<kpt::bf16>(*p, impl, s)
                              : backward<kpt::fp16>(*p, impl, s);
}

const char* kpt_fa_error_string(int code) {
  switch (code) {
    case 0:
      return "success";
    case KPT_FA_BAD_DTYPE:
      return "dtype must be float16 or bfloat16";
    case KPT_FA_UNSUPPORTED:
      return "unsupported size or feature (head_dim must be a multiple of 8 and <= 256; the "
             "tensor-core kernels are NVIDIA-only)";
    case KPT_FA_BAD_ARGUMENT:
      return "bad argument (null pointer or inconsistent sizes)";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown error";
  }
}

}  // extern "C"
