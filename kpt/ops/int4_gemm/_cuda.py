"""CUDA and HIP backends of ``int4_gemm``: JIT build of ``csrc/int4_gemm`` and the launcher that
serves both (one kernel source for nvcc and hipcc; the kernels' designs are described at the
top of each file in ``csrc/int4_gemm``).

On CUDA (sm_80+) the GEMM runs on tensor cores (mma.sync m16n8k16 in x's dtype, float32
accumulators), the packed weight streamed through cp.async stages and dequantised in registers
exactly as the reference rounds it; the HIP build runs portable CUDA-core tiles (``impl="simt"``,
also selectable on CUDA). One launch, plus a reduction launch when the K range is split: the
split workspace (float32, shares x M x N) comes from torch's caching allocator on the current
stream and is sized from shapes only, so a call is safe inside CUDA graph capture, and the
shares are added in a fixed order (deterministic).

Kernel limits, as reasons: N a multiple of 8 (K is one already). Layouts are the launcher's
business: x, the weight, scales, zeros, g_idx and bias are read in place when their rows are
aligned as the kernels read them (x rows of 16-byte chunks, weight / scales / zeros rows in runs
of 4 columns), else from a contiguous copy made per call; out goes through a temporary when it
is not a contiguous, 16-byte aligned (M, N).

Config keys: ``impl`` ("mma" | "simt" | "dequant"), ``block_m`` / ``block_n`` (a tile of
``MMA_TILES`` or ``SIMT_TILES``), ``split_k`` (K shares asked for; the kernels may use fewer,
never an empty one). Default by M: 16 x 128 for M <= 16 (decode: the weight stream is the
bound), 64 x 128 up to 64, above that the largest of 128 x 256 and 128 x 128 that still gives
every SM a CTA (else 64 x 128); split-K when the tiles alone leave SMs idle. From
``DEQUANT_MIN_M`` rows ``{"impl": "dequant"}``: one launch writes the dequantised weight (K, N)
in x's dtype to a temporary, then torch's 16-bit GEMM (cuBLAS / hipBLASLt) multiplies; the
same rounding points as the reference (the weight rounded once to x's dtype, float32 sums, one
final rounding).

Standing: compiled for sm_90a, sm_80 and gfx90a (``tests/jit/test_compile_kernels.py``); the
CUDA build passed ``tests/ops/test_int4_gemm_cuda.py`` on an H100 and was timed there
(bench/RESULTS.md); the HIP build is compile-checked only.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import is_rocm, jit_unavailable, kernel_output, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem
from kpt.ops.int4_gemm.reference import matmul_dequantized

OP = "int4_gemm"

SPEC = JitSpec(
    name="int4_gemm",
    sources=("int4_gemm/gemm_mma.cu", "int4_gemm/gemm_simt.cu", "int4_gemm/dequant.cu",
             "int4_gemm/launch.cu", "int4_gemm/binding.cpp"),
)

# Limits of the kernels (csrc/include/kpt/int4_gemm.h).
N_MULTIPLE = 8
MAX_DIM = 1 << 30
MAX_SPLIT = 64
MAX_GRID_X = 2**31 - 1
IMPLS = {"mma": 0, "simt": 1}
# The config that dequantises the weight once (csrc/int4_gemm/dequant.cu) and runs torch's
# 16-bit GEMM: the default from DEQUANT_MIN_M rows (where the fused tiles are bound by
# dequantising every weight tile once per row tile), offered to the tuner from DEQUANT_TUNE_M.
# It takes a (K, N) temporary of x's dtype from torch's caching allocator.
DEQUANT_CONFIG: Config = {"impl": "dequant"}
DEQUANT_MIN_M = 256
DEQUANT_TUNE_M = 64
# The tiles csrc/int4_gemm instantiates: (block_m, block_n) -> their K step.
MMA_TILES = {(16, 128): 128, (16, 256): 128, (64, 128): 64, (128, 128): 64, (128, 256): 64}
SIMT_TILES = {(16, 64): 32, (64, 64): 32}
# Default split-K: enough shares for about CTAS_PER_SM CTAs per SM (the 16 x 128 tile fits 2-3
# per SM: their cp.async stages together keep enough weight bytes in flight), each share at
# least MIN_SPLIT_STEPS K steps long (the pipeline's fill and the partial sums' traffic pay off),
# and at most DEFAULT_MAX_SPLIT shares.
CTAS_PER_SM = 2
MIN_SPLIT_STEPS = 4
DEFAULT_MAX_SPLIT = 16
# Rows up to which dispatch tries this backend before Triton on NVIDIA GPUs (see prefer()).
PREFER_MAX_M = 16

# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)


def _module():
    try:
        return SPEC.load()
    except BuildError as err:
        raise BackendUnavailable(f"int4_gemm: {err}") from err


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def supports(problem: Problem) -> list[str]:
    """Problem-level reasons (fp16/bf16 x; the dtype filter is the backend table's too). Every
    group size, symmetric and zero-point weights, act-order, bias, 16-bit scales and any M are
    served; N must be a multiple of 8."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    reasons = []
    if problem.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"x must be float16 or bfloat16, got {problem.dtype}")
    if n % N_MULTIPLE:
        reasons.append(f"N = {n} is not a multiple of {N_MULTIPLE} (each thread owns runs of 8 "
                       f"output columns and reads the weight in runs of 4)")
    if n >= MAX_DIM or k >= MAX_DIM:
        reasons.append(f"N = {n} and K = {k} must be below 2^30 (32-bit indices)")
    if _cdiv(m, 16) * _cdiv(n, 64) > MAX_GRID_X:
        reasons.append(f"M = {m} x N = {n} exceeds the grid (2^31 - 1 tiles)")
    return reasons


@functools.cache
def _sm_count(device_index: int) -> int:
    """SMs (CUs on ROCm) of a GPU; 0 where none is visible (the default then never splits)."""
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def prefer(problem: Problem) -> tuple[str, ...]:
    """Dispatch's ``prefer`` hook: on NVIDIA sm_80+ the cuda backend before Triton for decode
    (M <= PREFER_MAX_M) and from DEQUANT_MIN_M rows. Measured on an H100 (2026-12-07,
    ``bench/bench_int4_gemm.py``, N = K = 8192, g128, two runs): 37.7 / 38.2 us at M = 1 / 16
    against Triton's 48.8 / 45.6; at M = 4096 the dequantise-then-GEMM configs took 801.7 /
    812.1 us (csrc's dequantisation) against Triton's 839.7 / 842.0 (cuBLAS bf16: 741.9), at
    M = 256 117.7 / 117.6 against 118.7 / 118.8. Between, Triton's fused kernel leads."""
    m = problem["m"]
    if problem.device_type != "cuda" or is_rocm() or PREFER_MAX_M < m < DEQUANT_MIN_M:
        return ()
    return ("cuda",) if capability(problem.device_index) >= (8, 0) else ()


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    """A CUDA device's compute capability; (0, 0) where none is visible."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device_index)


def _tiles(impl: str) -> dict[tuple[int, int], int]:
    return MMA_TILES if impl == "mma" else SIMT_TILES


def default_tile(m: int, n: int, sms: int, impl: str = "mma") -> tuple[int, int]:
    """The tile by M: 16 rows for decode, 64 up to M = 64, else the largest tile that still
    gives every SM a CTA (sms = 0: unknown, the largest)."""
    if impl != "mma":
        return (16, 64) if m <= 16 else (64, 64)
    if m <= 16:
        return 16, 128
    if m <= 64:
        return 64, 128
    for bm, bn in ((128, 256), (128, 128)):
        if _cdiv(m, bm) * _cdiv(n, bn) >= sms:
            return bm, bn
    return 64, 128


def default_split(m: int, n: int, k: int, tile: tuple[int, int], sms: int,
                  impl: str = "mma") -> int:
    """Split-K shares for a tile: 1 when its tiles alone give every SM a CTA (or the SM count
    is unknown), else enough for about CTAS_PER_SM CTAs per SM, each share at least
    MIN_SPLIT_STEPS K steps long."""
    bm, bn = tile
    ctas = _cdiv(m, bm) * _cdiv(n, bn)
    if sms <= 0 or ctas == 0 or ctas >= sms:  # M = 0: nothing to split (nothing launches)
        return 1
    steps = _cdiv(k, _tiles(impl)[tile])
    return max(1, min(DEFAULT_MAX_SPLIT, _cdiv(CTAS_PER_SM * sms, ctas), steps // MIN_SPLIT_STEPS))


def default_config(m: int, n: int, k: int, sms: int, impl: str = "mma") -> Config:
    tile = default_tile(m, n, sms, impl)
    return {"impl": impl, "block_m": tile[0], "block_n": tile[1],
            "split_k": default_split(m, n, k, tile, sms, impl)}


def configs(problem: Problem) -> list[Config]:
    """The default first, then the other tiles of at most twice M's rows (at least 16), each
    unsplit and with its own default split. ROCm builds have only the portable tiles. From
    DEQUANT_MIN_M rows the dequantise-then-GEMM config leads; from DEQUANT_TUNE_M it is
    listed last, for the tuner."""
    impl = "simt" if is_rocm() else "mma"
    m, n, k = problem["m"], problem["n"], problem["k"]
    sms = _sm_count(problem.device_index) if problem.device_type == "cuda" else 0
    out = [default_config(m, n, k, sms, impl)]
    for tile in _tiles(impl):
        if tile[0] > 2 * max(m, 16):
            continue
        for split in sorted({1, default_split(m, n, k, tile, sms, impl)}):
            cfg = {"impl": impl, "block_m": tile[0], "block_n": tile[1], "split_k": split}
            if cfg not in out:
                out.append(cfg)
    if m >= DEQUANT_MIN_M:
        out.insert(0, dict(DEQUANT_CONFIG))
    elif m >= DEQUANT_TUNE_M:
        out.append(dict(DEQUANT_CONFIG))
    return out


def _tile(impl: str, config: Config) -> tuple[int, int]:
    tile = (int(config.get("block_m", 16)), int(config.get("block_n", 128 if impl == "mma"
                                                                     else 64)))
    if impl not in IMPLS or tile not in _tiles(impl):
        known = sorted(_tiles(impl)) if impl in IMPLS else []
        raise ValueError(f"{OP}: no {impl!r} tile {tile}; the tiles are {known}")
    return tile


def _split(config: Config) -> int:
    split = config.get("split_k", 1)
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= MAX_SPLIT:
        raise ValueError(f"{OP}: split_k must be an int in 1..{MAX_SPLIT}, got {split!r}")
    return split


def _fits(t: Tensor, unit: int, align: int) -> bool:
    """Whether the kernels read ``t`` in place: the last dim contiguous, rows (a 2-D ``t``)
    a multiple of ``unit`` elements apart and not overlapping, the base ``align``-byte
    aligned."""
    if t.data_ptr() % align or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    return t.dim() == 1 or (t.stride(0) % unit == 0 and t.stride(0) >= t.shape[1])


def _fit(t: Tensor | None, unit: int, align: int) -> Tensor | None:
    """``t``, or a fresh contiguous copy (whose rows of a multiple of 8 elements and whose
    allocator-aligned base fit every kernel read) where the kernels cannot read it in place."""
    if t is None or _fits(t, unit, align):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch(call, config: Config, impl: str) -> None:
    x, out = call.x, call.out
    if out.shape[0] == 0:
        return
    if x.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip backend needs GPU tensors, got {x.device}")
    block_m, block_n = _tile(impl, config)
    split = _split(config)
    es = call.scales.element_size()
    x = _fit(x, 8, 16)
    packed = _fit(call.packed, 4, 16)
    scales = _fit(call.scales, 4, 4 * es)
    zeros = _fit(call.zeros, 4, 4)
    g_idx = _fit(call.g_idx, 1, 16)
    bias = _fit(call.bias, 1, 16)
    dev = x.device
    with kernel_output(out, _fits(out, 8, 16)) as target, on_device(dev):
        _module().forward(x, packed, scales, zeros, g_idx, bias, target, call.group_size,
                          IMPLS[impl], block_m, block_n, split, raw_stream(dev))


def _launch_dequant(call, config: Config) -> None:
    """The weight dequantised once into a (K, N) temporary of x's dtype (csrc's dequant.cu,
    the reference's values), then torch's 16-bit GEMM into out (``matmul_dequantized``)."""
    if set(config) - {"impl"}:
        raise ValueError(f"{OP}: the 'dequant' config takes no other keys, got {config}")
    x, out = call.x, call.out
    if out.shape[0] == 0:
        return
    if x.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip backend needs GPU tensors, got {x.device}")
    es = call.scales.element_size()
    packed = _fit(call.packed, 4, 16)
    scales = _fit(call.scales, 4, 4 * es)
    zeros = _fit(call.zeros, 4, 4)
    g_idx = _fit(call.g_idx, 1, 16)
    bias, dev = call.bias, x.device
    with on_device(dev):
        w = torch.empty((x.shape[1], out.shape[1]), dtype=x.dtype, device=dev)
        _module().dequantize(packed, scales, zeros, g_idx, w, call.group_size, raw_stream(dev))
        matmul_dequantized(x, w, bias, out)


def run_cuda(call, config: Config) -> None:
    """The ``cuda`` backend of ``int4_gemm``: write ``call.out`` (tensor cores unless the config
    asks for the portable tiles)."""
    impl = str(config.get("impl", "mma"))
    if impl == "dequant":
        _launch_dequant(call, config)
    else:
        _launch(call, config, impl)


def run_hip(call, config: Config) -> None:
    """The ``hip`` backend of ``int4_gemm``: the portable tiles (no mma.sync on AMD GPUs), or
    the dequantise-then-GEMM config."""
    if config.get("impl") == "dequant":
        _launch_dequant(call, config)
    else:
        _launch(call, config, "simt")
