"""CUDA and HIP backends of ``fp8_gemm``: JIT builds of ``csrc/fp8_gemm`` and the launcher that
serves both (one kernel source for nvcc and hipcc; each kernel's design is described at the
top of its file).

Three implementations, chosen by the config's ``impl``:

* ``"mma"`` (CUDA sm_80+; the default except on Hopper above 64 rows):
  ``mma.sync`` tiles with cp.async pipelines, fp8 ``m16n8k32`` on sm_89+ and codes widened to
  fp16 on sm_80; blockwise scales promote each 128-wide k-tile into float32 accumulators; an
  optional K split (``split_k``) whose float32 partial tiles are summed in split order;
* ``"sm90"`` (sm_90 only, a separate sm_90a build ``fp8_gemm_sm90``): persistent CTAs of
  128 x 128 tiles, TMA loads into 128-byte swizzled shared memory through an mbarrier ring fed
  by one producer thread (its warpgroup's registers go to the consumers), two consumer
  warpgroups issuing fp8 ``wgmma m64n128k32``, every k-tile promoted into float32 (DeepGEMM's
  scheme);
* ``"simt"`` (the HIP build's only one, selectable on CUDA): CUDA-core tiles that dequantise
  exactly as the reference does.

Config keys: ``impl``, ``block_m`` / ``block_n`` (an instantiated tile of that impl),
``split_k`` (mma only). The workspace of a K split comes from torch's caching allocator on the
current stream, sized from shapes only: every call is safe inside CUDA graph capture.

Operands are read in place when their last dim is contiguous and their base and row stride
are 16-byte aligned (cp.async / TMA chunks); any other view is copied first (a transposed
``a8`` costs one copy). Scales and bias are read through their strides as they are.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import is_rocm, jit_unavailable, kernel_output, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem

OP = "fp8_gemm"
log = logging.getLogger("kpt")

SPEC = JitSpec(
    name="fp8_gemm",
    sources=("fp8_gemm/gemm_mma.cu", "fp8_gemm/gemm_simt.cu", "fp8_gemm/api.cu",
             "fp8_gemm/errors.cu", "fp8_gemm/binding.cpp"),
)
# The same binding compiled against the sm_90a kernel: built only on sm_90 devices.
SM90_SPEC = JitSpec(
    name="fp8_gemm_sm90",
    sources=("fp8_gemm/gemm_sm90.cu", "fp8_gemm/errors.cu", "fp8_gemm/binding.cpp"),
    extra_cflags=("-DKPT_FP8_GEMM_SM90_BUILD",),
)

# Codes of csrc/include/kpt/fp8_gemm.h.
GRANULARITIES = {"tensor": 0, "row": 1, "block": 2}
IMPLS = {"mma": 0, "simt": 1, "sm90": 2}
# The tiles each implementation instantiates, (block_m, block_n), and the shared memory of an
# mma tile (its stages: csrc/fp8_gemm/gemm_mma.cu's launch_typed).
TILES = {"mma": ((16, 64), (64, 64), (64, 128), (128, 128)),
         "simt": ((16, 64), (64, 64)),
         "sm90": ((128, 128),)}
MMA_SMEM = {(16, 64): 61440, (64, 64): 65536, (64, 128): 98304, (128, 128): 98304}
MAX_SPLIT_K = 16
SCALE_K = 128  # the k-tile of every kernel, one block scale
GROUP_M = 8  # tile rows per group of the launch order (L2 reuse of the weight)
MAX_GRID_X = 2**31 - 1
# A K split pays for itself only with enough k-tiles per split to stream.
MIN_K_TILES_PER_SPLIT = 4

# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)
sm90_unavailable = jit_unavailable(lambda: SM90_SPEC)


_SM90_FAILED: list[str] = []  # why the sm_90a build failed in this process, once it did


def _load(spec: JitSpec):
    try:
        return spec.load()
    except BuildError as err:
        raise BackendUnavailable(f"{OP}: {err}") from err


def _sm90_module():
    """The sm_90a build, or None once it failed: the mma tiles then serve its calls (a failed
    wgmma build must not take the whole cuda backend down)."""
    if _SM90_FAILED:
        return None
    try:
        return SM90_SPEC.load()
    except BuildError as err:
        _SM90_FAILED.append(str(err))
        log.warning("%s: the sm_90a kernel cannot be built (%s); the mma tiles run instead",
                    OP, str(err).splitlines()[0])
        return None


@functools.cache
def device_info(index: int) -> tuple[tuple[int, int], int, int]:
    """(compute capability, SM count, opt-in shared memory per block) of CUDA device
    ``index``; Hopper's values where no device is visible (configs listed on a CPU machine)."""
    if not torch.cuda.is_available():
        return (9, 0), 132, 227 * 1024
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return (props.major, props.minor), props.multi_processor_count, smem


def supports(problem: Problem) -> list[str]:
    """Problem-level reasons (every granularity, dtype, bias and M >= 0 is served)."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    reasons = []
    if n % 16 or k % 16:
        reasons.append(f"N = {n} and K = {k} must be multiples of 16 (16-byte rows)")
    if -(-m // 16) * -(-n // 64) > MAX_GRID_X:
        reasons.append(f"M x N = {m} x {n} exceeds the grid (16 x 64 tiles)")
    return reasons


def _k_tiles(problem: Problem) -> int:
    return -(-problem["k"] // SCALE_K)


def _split_k(problem: Problem, block_m: int, block_n: int, sms: int) -> int:
    """K splits that fill the SMs when the output tiles cannot (decode shapes with small N):
    about one CTA per SM, each streaming at least MIN_K_TILES_PER_SPLIT k-tiles. A split costs
    a float32 partial tile per split and one reduce launch, so wide outputs never split."""
    tiles = -(-problem["m"] // block_m) * -(-problem["n"] // block_n)
    if tiles == 0 or tiles >= sms // 2:  # M = 0: nothing to split (nothing launches)
        return 1
    k_tiles = _k_tiles(problem)
    want = max(1, min(-(-sms // tiles), k_tiles // MIN_K_TILES_PER_SPLIT, MAX_SPLIT_K))
    # The splits the kernel makes of it (common.cuh's split_plan): equal k-tile counts.
    per_split = -(-k_tiles // want)
    return -(-k_tiles // per_split)


def _mma_tile(problem: Problem, smem: int) -> tuple[int, int]:
    """Rows per tile by M: 16 for decode (the weight read dominates: more, narrower CTAs), 64
    up to 64 rows, 64 x 128 up to 128, then 128 x 128; only tiles whose stages fit."""
    m = problem["m"]
    order = ((16, 64), (64, 64), (64, 128), (128, 128))
    want = order[0] if m <= 16 else order[1] if m <= 64 else order[2] if m <= 128 else order[3]
    fitting = [t for t in order if MMA_SMEM[t] <= smem]
    return want if want in fitting else fitting[-1]


def configs(problem: Problem) -> list[Config]:
    """Tile variants, the untuned default first: on Hopper the wgmma kernel above 64 rows,
    else the mma tile for M with the K split that fills the SMs. ROCm builds have only the
    portable tiles."""
    if is_rocm():
        first = (16, 64) if problem["m"] <= 16 else (64, 64)
        return [{"impl": "simt", "block_m": bm, "block_n": bn, "split_k": 1}
                for bm, bn in (first, *(t for t in TILES["simt"] if t != first))]
    cap, sms, smem = device_info(problem.device_index)
    mma = [{"impl": "mma", "block_m": bm, "block_n": bn,
            "split_k": _split_k(problem, bm, bn, sms)}
           for bm, bn in TILES["mma"] if MMA_SMEM[(bm, bn)] <= smem]
    bm, bn = _mma_tile(problem, smem)
    default = next(c for c in mma if (c["block_m"], c["block_n"]) == (bm, bn))
    out = [default] + [c for c in mma if c is not default]
    # The K splits of the decode tile, for the tuner.
    for split in (2, 4, 8):
        if split <= _k_tiles(problem) and all(
                c["split_k"] != split or c["block_m"] != 16 for c in out):
            out.append({"impl": "mma", "block_m": 16, "block_n": 64, "split_k": split})
    if cap == (9, 0) and not _SM90_FAILED and sm90_unavailable() is None:
        sm90 = {"impl": "sm90", "block_m": 128, "block_n": 128, "split_k": 1}
        out.insert(0 if problem["m"] > 64 else len(out), sm90)
    return out


def prefer(problem: Problem) -> tuple[str, ...]:
    """Dispatch's ``prefer`` hook: on sm_90 the cuda backend before Triton for blockwise-scaled
    problems above 64 rows, where its wgmma kernel is the default. Measured on an H100
    (2026-12-06, ``bench/bench_fp8_gemm.py``): blockwise M = 4096, N = K = 8192 took 789 us
    against Triton's 899. At 16 rows Triton led (1.18x the weight-read floor against 1.90x), and
    the per-tensor and per-row GEMMs stay Triton's (1058 / 1065 us against 1305 / 1380)."""
    if (problem.device_type != "cuda" or is_rocm() or problem["m"] <= 64
            or problem["w_granularity"] != "block"):
        return ()
    cap = device_info(problem.device_index)[0]
    usable = cap == (9, 0) and not _SM90_FAILED and sm90_unavailable() is None
    return ("cuda",) if usable else ()


def _tile(config: Config, impl: str) -> tuple[int, int, int]:
    bm, bn = int(config.get("block_m", 64)), int(config.get("block_n", 64))
    split = int(config.get("split_k", 1))
    if impl not in IMPLS or (bm, bn) not in TILES[impl]:
        raise ValueError(f"{OP}: no {impl!r} tile {bm} x {bn}; the tiles are "
                         f"{TILES.get(impl, ())}")
    if not 1 <= split <= MAX_SPLIT_K or (split > 1 and impl != "mma"):
        raise ValueError(f"{OP}: split_k = {split} must be 1..{MAX_SPLIT_K}, and 1 unless "
                         f"impl is 'mma'")
    return bm, bn, split


def _chunked(t: Tensor) -> bool:
    """Whether the kernels read ``t`` (rows of fp8 codes) in 16-byte chunks in place: a
    contiguous last dim, a 16-byte aligned base and a row stride of whole chunks that covers
    a row (a one-row view may carry any stride)."""
    row = t.stride(0)
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and row % 16 == 0
            and row >= t.shape[1])


def _plain(t: Tensor) -> Tensor:
    """``t`` in place when readable as chunks, else a fresh contiguous (16-byte aligned) copy."""
    return t if _chunked(t) else t.clone(memory_format=torch.contiguous_format)


def _writable(out: Tensor) -> bool:
    """Two-column stores: a contiguous last dim, an even row stride, an aligned base."""
    return (out.stride(1) == 1 and out.stride(0) % 2 == 0 and out.stride(0) >= out.shape[1]
            and out.data_ptr() % (2 * out.element_size()) == 0)


def _launch(call, config: Config, impl: str) -> None:
    a8, w8, out = call.a8, call.w8, call.out
    if a8.shape[0] == 0:
        return
    if a8.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip backend needs GPU tensors, got {a8.device}")
    bm, bn, split = _tile(config, impl)
    if impl == "sm90" and device_info(a8.device.index or 0)[0] != (9, 0):
        raise ValueError(f"{OP}: impl 'sm90' needs an sm_90 device")
    module = _sm90_module() if impl == "sm90" else _load(SPEC)
    if module is None:
        impl, (bm, bn, split), module = "mma", (128, 128, 1), _load(SPEC)
    dev = a8.device
    with kernel_output(out, _writable(out)) as target, on_device(dev):
        module.forward(_plain(a8), _plain(w8), call.a_scale, call.w_scale, call.bias, target,
                       GRANULARITIES[call.a_granularity], GRANULARITIES[call.w_granularity],
                       IMPLS[impl], bm, bn, split, GROUP_M, raw_stream(dev))


def run_cuda(call, config: Config) -> None:
    """The ``cuda`` backend: write ``call.out`` (mma.sync tiles unless the config asks for the
    wgmma kernel or the portable tiles)."""
    _launch(call, config, str(config.get("impl", "mma")))


def run_hip(call, config: Config) -> None:
    """The ``hip`` backend: the portable tiles (no fp8 matrix instructions on gfx90a)."""
    _launch(call, dict(config, split_k=1), "simt")


run = run_cuda
