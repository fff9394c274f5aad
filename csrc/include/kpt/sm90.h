// PTX building blocks of kpt's Hopper kernels (sm_90a: flash_attention_sm90, fp8_gemm's
// gemm_sm90.cu): mbarriers with a bounded wait, TMA loads and stores, wgmma descriptors,
// fences and register pins, and the driver's tensor-map encoder.
//
// Everything here is raw PTX: the instruction set is small, the operand layouts are fixed by
// the PTX ISA, and compiling takes seconds instead of the minutes CuTe templates need. Only
// files built for sm_90a alone (`// kpt-targets: sm_90a`) include it; with hipcc it declares
// nothing. An inline helper is compiled only where a kernel calls it.
#pragma once

#include "kpt/ptx.h"  // smem_addr

#ifdef KPT_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>

namespace kpt::sm90 {

// A wait this long means a TMA never completed (a fault): end the launch instead of hanging.
constexpr uint64_t kWaitLimitNs = 4000000000ull;

// ---- mbarriers -------------------------------------------------------------------------------

KPT_DEVICE void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

KPT_DEVICE void bar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

KPT_DEVICE void bar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

KPT_DEVICE bool bar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

KPT_DEVICE uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Ends a launch that can no longer finish: a store to address 0 (never mapped) fails the launch
// with cudaErrorIllegalAddress, then the thread exits. Not `trap`: a trap anywhere in the kernel
// makes ptxas ignore the consumers' `setmaxnreg.inc` and allocate them only the launch bound's
// 168 registers (found by bisecting ptxas -v output; a store + exit keeps the 232).
KPT_DEVICE void abort_launch() {
  asm volatile("st.global.u32 [%0], 0;\n\texit;" ::"l"(0ull) : "memory");
}

// Waits for the phase of parity `parity` to complete. The timer is read only after 1024 failed
// polls, so the common (short) wait costs nothing extra.
KPT_DEVICE void wait(uint32_t bar, uint32_t parity) {
  if (bar_try_wait(bar, parity)) return;
  uint64_t start = 0;
  for (uint32_t polls = 1;; ++polls) {
    if (bar_try_wait(bar, parity)) return;
    if ((polls & 1023) == 0) {
      const uint64_t now = global_timer_ns();
      if (start == 0) {
        start = now;
      } else if (now - start > kWaitLimitNs) {
        abort_launch();
      }
    }
  }
}

// ---- TMA -------------------------------------------------------------------------------------

// The box of `map` at coordinates (c0, c1) into shared memory at `dst`; completes `bar`'s
// expected transaction bytes.
KPT_DEVICE void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// The same for a 4-D map, at (c0, c1, c2, c3).
KPT_DEVICE void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                         int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// The box at smem `src` to the 4-D tensor of `map` at (c0, c1, c2, c3); one bulk group.
KPT_DEVICE void tma_store(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n\t"
      "cp.async.bulk.commit_group;" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Waits until every bulk group of this thread has finished reading shared memory.
KPT_DEVICE void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

// ---- wgmma -----------------------------------------------------------------------------------

// wgmma shared-memory descriptor for a 128B-swizzled tile (PTX ISA "matrix descriptor"):
// start address, leading and stride byte offsets (all >> 4), swizzle mode 1 = 128B in bits
// 62-63. The tile base is 1024-byte aligned, so the base-offset field stays 0; stepping the
// start address by 32 bytes moves 32 bytes (16 16-bit values, 32 fp8 codes) along a swizzled
// row (the hardware applies the XOR pattern to the final address).
KPT_DEVICE uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// The descriptor of the tile `bytes` (a multiple of 16) past the one `desc` describes: one
// 64-bit add instead of rebuilding the fields. Shared memory ends below 256 KiB, so the 14-bit
// start-address field (address / 16) never carries into the next field.
KPT_DEVICE uint64_t desc_at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

KPT_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
KPT_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
KPT_DEVICE void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Waits until at most kPending committed wgmma groups of this warpgroup are still running.
template <int kPending>
KPT_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Registers read or written by an in-flight wgmma must not be touched or moved by the compiler
// across the issue/wait pair; an empty asm that "modifies" them pins them in place.
template <int N>
KPT_DEVICE void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
KPT_DEVICE void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// ---- host: tensor maps -----------------------------------------------------------------------

using EncodeFn = PFN_cuTensorMapEncodeTiled_v12000;

// cuTensorMapEncodeTiled from the driver the runtime uses (no -lcuda link), looked up once;
// nullptr where the driver lacks it.
inline EncodeFn tensor_map_encoder() {
  static EncodeFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<EncodeFn>(nullptr);
    }
    return reinterpret_cast<EncodeFn>(ptr);
  }();
  return fn;
}

}  // namespace kpt::sm90
#endif  // KPT_CUDA
