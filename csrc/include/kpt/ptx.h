// PTX building blocks of kpt's sm_80-class tensor-core kernels (moe, int4_gemm and fp8_gemm
// gemm_mma.cu, flash_attention's mma kernels): shared-memory addresses, cp.async copies,
// ldmatrix and mma.sync m16n8k16 with float32 accumulators.
//
// NVIDIA only: with hipcc this header declares nothing. The helpers are visible in every nvcc
// pass, host included, so that kernel templates naming them parse there; an inline helper is
// compiled only where a kernel calls it, so only the device pass of an sm_80+ target ever
// meets these instructions. Kernels whose whole body is built on them compile it under
// `#if KPT_SM80` (empty in the host pass and for older targets).
#pragma once

#include <type_traits>

#include "kpt/compat.h"

#if defined(KPT_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define KPT_SM80 1
#else
#define KPT_SM80 0
#endif

#ifdef KPT_CUDA
namespace kpt {

// The 32-bit shared-state-space address that cp.async, ldmatrix, mbarrier and TMA operands take.
KPT_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async --------------------------------------------------------------------------------

// 16 bytes global -> shared through L2 only (data streamed once); ok = false writes zeros and
// reads nothing, which is how rows and columns past a tensor's end are never touched.
KPT_DEVICE void cp_async16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(ok ? 16 : 0)
               : "memory");
}

// kBytes (4, 8 or 16) global -> shared, cached in L1 (data reread by other CTAs, such as
// scales); ok = false writes zeros and reads nothing.
template <int kBytes>
KPT_DEVICE void cp_async_ca(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)),
               "l"(src), "n"(kBytes), "r"(ok ? kBytes : 0)
               : "memory");
}

KPT_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending committed groups of this thread are still in flight.
template <int kPending>
KPT_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- ldmatrix --------------------------------------------------------------------------------

// Four 8 x 8 matrices of 16-bit values: lanes 8 i .. 8 i + 7 give the row addresses of matrix
// i, and r[i] receives this lane's pair of it (row lane / 4, columns 2 (lane % 4) + {0, 1}).
KPT_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The same, each matrix transposed on the way (a row-major [k][n] tile as mma's B operand).
KPT_DEVICE void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// ---- mma.sync --------------------------------------------------------------------------------

// c += a (16x16, row-major fragment) * b (16x8, column fragment {b0, b1}) in T (bf16 or fp16),
// float32 accumulators.
#define KPT_MMA_M16N8K16(TYPE)                                                                     \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "       \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <class T>
KPT_DEVICE void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, fp16>, "bf16 or fp16 operands");
  if constexpr (std::is_same_v<T, bf16>) {
    KPT_MMA_M16N8K16("bf16");
  } else {
    KPT_MMA_M16N8K16("f16");
  }
}
#undef KPT_MMA_M16N8K16

}  // namespace kpt
#endif  // KPT_CUDA
