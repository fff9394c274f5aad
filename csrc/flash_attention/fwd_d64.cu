// flash_attention tensor-core forward for head dims in (32, 64] (<= 64 for the first bucket):
// one translation unit per bucket so the JIT build compiles them in parallel.
// Tile (key tile, warps, cp.async stages) = (64, 8, 3): see CUDA_NOTES.md for the budget.
#include "fwd_kernel.cuh"

#ifdef KPT_CUDA
namespace kpt_fa {

template <>
int launch_fwd_mma<kpt::fp16, 64>(const kpt_fa_params& p, kpt::stream_t stream) {
  return launch_fwd_tiles<kpt::fp16, 64, 64, 8, 3>(p, stream);
}

template <>
int launch_fwd_mma<kpt::bf16, 64>(const kpt_fa_params& p, kpt::stream_t stream) {
  return launch_fwd_tiles<kpt::bf16, 64, 64, 8, 3>(p, stream);
}

}  // namespace kpt_fa
#endif  // KPT_CUDA
