// flash_attention tensor-core backward (dK/dV and dQ kernels) for head dims <= 64: one
// translation unit per bucket so the JIT build compiles them in parallel. Tiles: dK/dV 4 warps
// = 64 keys x 32-query steps, dQ 4 warps = 64 queries x 64-key steps, 2 cp.async stages (the
// Triton backward's best tiles on the H200); see CUDA_NOTES.md for registers and shared memory.
#include "bwd_kernel.cuh"

#ifdef KPT_CUDA
namespace kpt_fa {

template <>
int launch_bwd_mma<kpt::fp16, 64>(const kpt_fa_params& p, kpt::stream_t stream) {
  return launch_bwd_tiles<kpt::fp16, 64, 4, 32, 4, 64, 2>(p, stream);
}

template <>
int launch_bwd_mma<kpt::bf16, 64>(const kpt_fa_params& p, kpt::stream_t stream) {
  return launch_bwd_tiles<kpt::bf16, 64, 4, 32, 4, 64, 2>(p, stream);
}

}  // namespace kpt_fa
#endif  // KPT_CUDA
