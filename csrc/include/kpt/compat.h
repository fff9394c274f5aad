// CUDA / HIP portability for kpt kernels: one kernel source builds with nvcc and with hipcc.
//
// What differs between the two toolchains and is hidden here:
//   * runtime types (stream, error) and the last-error / error-string calls;
//   * the warp width: 32 on NVIDIA, 64 on CDNA (gfx90a, gfx942) wavefronts;
//   * xor-shuffles (CUDA wants a lane mask, HIP does not take one);
//   * 16-bit float types and their conversions: cuda_bf16.h/cuda_fp16.h vs ROCm 5.x's
//     hip_bfloat16 (a struct with no packed conversions) and hip_fp16.h;
//   * __launch_bounds__' second argument (CUDA: min blocks per SM; HIP: min waves per EU);
//   * streaming 16-byte loads that should not displace reused data from L1.
//
// Kernels keep 16-bit values as raw bits inside uint32/uint4 words and convert through
// `Half<T>`, so that the same loads, shuffles and stores serve fp16 and bf16.
#pragma once

#include <stdint.h>

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define KPT_HIP 1
#include <hip/hip_bfloat16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#else
#define KPT_CUDA 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define KPT_RESTRICT __restrict__
#define KPT_DEVICE __device__ __forceinline__

// The occupancy hint means different things on the two platforms, so HIP only gets the size.
#ifdef KPT_HIP
#define KPT_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads)
#else
#define KPT_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
#endif

namespace kpt {

#ifdef KPT_HIP
using stream_t = hipStream_t;
using error_t = hipError_t;
using bf16 = hip_bfloat16;
using fp16 = __half;
// CDNA GPUs (the HIP targets kpt builds for) run 64-wide wavefronts; RDNA would need
// -mwavefrontsize64 to keep host-side launch math and device code in agreement.
constexpr int kWarpSize = 64;
inline error_t last_error() { return hipGetLastError(); }
inline const char* error_string(int code) {
  return hipGetErrorString(static_cast<hipError_t>(code));
}
#else
using stream_t = cudaStream_t;
using error_t = cudaError_t;
using bf16 = __nv_bfloat16;
using fp16 = __half;
constexpr int kWarpSize = 32;
inline error_t last_error() { return cudaGetLastError(); }
inline const char* error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
#endif

// ---- shuffles and reductions -----------------------------------------------------------------

KPT_DEVICE float shfl_xor(float v, int mask) {
#ifdef KPT_HIP
  return __shfl_xor(v, mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

// Sum over aligned groups of `width` lanes (a power of two <= kWarpSize). Every lane of the
// warp must call it: the xor pattern pairs lanes across the whole warp.
template <int kMaxWidth = kWarpSize>
KPT_DEVICE float group_sum(float v, int width) {
#pragma unroll
  for (int m = kMaxWidth / 2; m > 0; m >>= 1) {
    if (m < width) v += shfl_xor(v, m);
  }
  return v;
}

KPT_DEVICE float warp_sum(float v) { return group_sum<kWarpSize>(v, kWarpSize); }

// Sum over the whole block; `scratch` holds one float per warp (<= 32). Every thread must
// call it; the result is returned to all of them. A second call on the same scratch needs a
// __syncthreads() in between.
KPT_DEVICE float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// ---- 16-bit floats ---------------------------------------------------------------------------

// Conversions between two packed 16-bit values (one 32-bit word) and floats, round to nearest
// even, NaN kept NaN. Unpacking bf16 is a shift on every platform.
template <class T>
struct Half;

template <>
struct Half<bf16> {
  KPT_DEVICE static float2 unpack(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  KPT_DEVICE static uint32_t pack(float lo, float hi) {
#ifdef KPT_HIP
    // gfx90a has no bf16 convert instruction; this is hip_bfloat16's RNE conversion.
    return uint32_t(bf16::round_to_bfloat16(lo).data) |
           (uint32_t(bf16::round_to_bfloat16(hi).data) << 16);
#else
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
#endif
  }
};

template <>
struct Half<fp16> {
  KPT_DEVICE static float2 unpack(uint32_t u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
  KPT_DEVICE static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// The float that rounding `v` to T gives back: the rounding point of a T-typed tensor op.
template <class T>
KPT_DEVICE float round_to(float v) {
  return Half<T>::unpack(Half<T>::pack(v, 0.f)).x;
}

// Eight 16-bit values (one 16-byte vector) <-> eight floats.
template <class T>
KPT_DEVICE void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = Half<T>::unpack(w[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <class T>
KPT_DEVICE uint4 pack8(const float (&f)[8]) {
  return make_uint4(Half<T>::pack(f[0], f[1]), Half<T>::pack(f[2], f[3]),
                    Half<T>::pack(f[4], f[5]), Half<T>::pack(f[6], f[7]));
}

// ---- 16-byte memory access -------------------------------------------------------------------

KPT_DEVICE uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

KPT_DEVICE void store16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// A load of data read exactly once (weights streamed by a GEMV): the streaming cache policy
// (evict first) so that it does not push the reused activations out of L1.
KPT_DEVICE uint4 load16_stream(const void* p) {
#ifdef KPT_HIP
  return *reinterpret_cast<const uint4*>(p);
#else
  return __ldcs(reinterpret_cast<const uint4*>(p));
#endif
}

}  // namespace kpt
