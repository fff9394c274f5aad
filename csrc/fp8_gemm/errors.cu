// kpt_fp8_gemm_error_string: in both fp8_gemm builds (the portable one and the sm_90a one),
// so that each binding names the failure of its own launcher.

#include "kpt/compat.h"
#include "kpt/fp8_gemm.h"

extern "C" const char* kpt_fp8_gemm_error_string(int code) {
  switch (code) {
    case 0:
      return "success";
    case KPT_FP8_GEMM_BAD_DTYPE:
      return "unsupported dtype code";
    case KPT_FP8_GEMM_UNSUPPORTED:
      return "tile, size or variant not instantiated";
    case KPT_FP8_GEMM_BAD_ARGUMENT:
      return "bad argument (null or misaligned pointer, size, stride or split)";
    case KPT_FP8_GEMM_NO_DRIVER_API:
      return "cuTensorMapEncodeTiled not found in the CUDA driver";
    case KPT_FP8_GEMM_TENSOR_MAP:
      return "cuTensorMapEncodeTiled rejected a tensor map";
    default:
      return code > 0 ? kpt::error_string(code) : "unknown error code";
  }
}
