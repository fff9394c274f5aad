"""CUDA and HIP backends of ``moe_route`` and ``fused_moe``: JIT build of ``csrc/moe`` and the
launchers that serve both (one kernel source for nvcc and hipcc; the kernels' designs are
described at the top of each file in ``csrc/moe``).

``moe_route``: one launch, one warp per token (``csrc/moe/route.cu``), up to 512 experts.

``fused_moe``: alignment (two launches), GEMM1 (gate and up with the activation fused),
GEMM2 (down times the routing weight) and the sum over top_k; fp8 experts add two
quantisation launches. On CUDA the GEMMs run on tensor cores (mma.sync, sm_80+; fp8 codes are
widened to fp16 in registers, then the mma runs in fp16); the HIP build runs portable
CUDA-core tiles (``impl="simt"``, also selectable on CUDA). Workspace is allocated per call
from torch's caching allocator on the current stream and sized from shapes only: a call is
safe inside CUDA graph capture.

INT4 experts (``int4_gemm``'s packing per expert; float32, float16 or bfloat16 scales,
symmetric or with zero points, every group size ``fused_moe`` accepts: 32, 64, 128, 256 or
one group) are dequantised inside the GEMM tiles, each packed word loaded once and unpacked in
registers to exactly ``int4_gemm``'s weight in x's dtype (tensor cores: 64-column tiles per
half, k-tiles of 64; portable tiles: k-tiles of 32). Their GPU tests (both implementations,
every tile) pass on an H100 (2026-12-07); not yet timed; the HIP build is compile-checked.

Config keys: ``impl`` ("mma" | "simt"), ``block_m`` (rows of a tile and the alignment's
block: 16, 64 or 128), ``partial_fp32`` (the per-pair buffer summed over top_k is float32,
else x's dtype: half the bytes, one more rounding the contract allows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import is_rocm, jit_unavailable, kernel_output, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem

from .reference import Alignment, capacity

OP_ROUTE = "moe_route"
OP = "fused_moe"

SPEC = JitSpec(
    name="moe",
    sources=("moe/route.cu", "moe/align.cu", "moe/gemm_mma.cu", "moe/gemm_simt.cu",
             "moe/experts.cu", "moe/binding.cpp"),
)

# Limits of the kernels (csrc/include/kpt/moe.h).
ROUTE_MAX_EXPERTS = 512  # a token's row in one warp's registers
MAX_LOCAL_EXPERTS = 1024  # per-expert counters of the alignment in shared memory
MAX_INT32 = 2**31 - 1
MAX_GRID_Y = 65535
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
IMPLS = {"mma": 0, "simt": 1}
QUANTS = {"none": 0, "fp8": 1, "int4": 2}
# (block_m, block_n) tiles csrc/moe instantiates, per quant: block_n per block_m.
MMA_TILES = {"none": {16: 64, 64: 64, 128: 128}, "fp8": {16: 64, 64: 64, 128: 64},
             "int4": {16: 64, 64: 64, 128: 64}}
SIMT_TILES = {quant: {16: 64, 64: 64, 128: 64} for quant in QUANTS}
BLOCK_MS = (16, 64, 128)
# int4 group sizes besides one group over all of K (csrc/moe/experts.cu's group_shift).
INT4_GROUPS = (32, 64, 128, 256)

# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)


def _module():
    try:
        return SPEC.load()
    except BuildError as err:
        raise BackendUnavailable(f"moe: {err}") from err


def _require_gpu(op: str, t: Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{op}: the cuda/hip backend needs GPU tensors, got {t.device}")


# ---- moe_route -----------------------------------------------------------------------------------


def route_supports(problem: Problem) -> list[str]:
    """Problem-level reasons: every scoring, grouping, bias and top_k is served up to 512
    experts."""
    e = problem["e"]
    reasons = []
    if e > ROUTE_MAX_EXPERTS:
        reasons.append(f"{e} experts > {ROUTE_MAX_EXPERTS} (a token's scores live in one "
                       f"warp's registers)")
    if -(-problem["t"] // 4) > MAX_INT32:
        reasons.append(f"{problem['t']} tokens exceed the grid (4 tokens per CTA)")
    return reasons


def route_configs(problem: Problem) -> list[Config]:
    """One launch shape (a warp per token); nothing to tune."""
    return [{}]


def run_route(call, config: Config) -> None:
    """The ``cuda`` and ``hip`` backends of ``moe_route``: write ``call.weights``/``call.ids``."""
    logits = call.logits
    if logits.shape[0] == 0:
        return
    _require_gpu(OP_ROUTE, logits)
    module = _module()
    dev = logits.device
    with on_device(dev):
        module.route(logits, call.correction_bias, call.weights, call.ids, call.top_k,
                     call.scoring == "sigmoid", call.renormalize, call.groups,
                     call.topk_groups, call.scaling, raw_stream(dev))


run_route_cuda = run_route_hip = run_route


# ---- alignment -----------------------------------------------------------------------------------


def align(ids: Tensor, num_experts: int, block_m: int,
          expert_map: Tensor | None = None) -> Alignment:
    """``kpt.ops.moe.align`` by the alignment kernels (GPU tensors; graph-safe: shapes only,
    no host sync). ``ids`` (T, top_k) and ``expert_map`` are converted to contiguous int32."""
    _require_gpu("moe.align", ids)
    if not 1 <= num_experts <= MAX_LOCAL_EXPERTS:
        raise ValueError(f"moe.align: the cuda/hip kernels take 1..{MAX_LOCAL_EXPERTS} local "
                         f"experts, got {num_experts}")
    if not 1 <= block_m <= 1024:
        raise ValueError(f"moe.align: block_m must be in 1..1024 for the cuda/hip kernels, "
                         f"got {block_m}")
    ids = ids.to(torch.int32).contiguous()
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32).contiguous()
    cap = capacity(ids.numel(), num_experts, block_m)
    if cap > MAX_INT32:
        raise ValueError(f"moe.align: {cap} slots exceed int32")
    dev = ids.device
    out = Alignment(torch.empty(cap, dtype=torch.int32, device=dev),
                    torch.empty(cap // block_m, dtype=torch.int32, device=dev),
                    torch.empty(1, dtype=torch.int32, device=dev))
    with on_device(dev):
        _module().align(ids, expert_map, num_experts, block_m, *out, raw_stream(dev))
    return out


# ---- fused_moe -----------------------------------------------------------------------------------


def _int4_group_reason(name: str, group: int, k: int) -> str | None:
    if group == k or (group in INT4_GROUPS and k % group == 0):
        return None
    return (f"int4 {name} = {group} must be one of {INT4_GROUPS} dividing K = {k}, or K "
            f"(one group)")


def supports(problem: Problem) -> list[str]:
    """Problem-level reasons (bf16/fp16 x; the dtype filter is the backend table's).

    int4 experts need nothing beyond the common rules (H and I multiples of 8, which their
    packing implies): every group size ``fused_moe`` accepts is served. A problem that names
    its group sizes (``group13`` over K = H, ``group2`` over K = I) is checked against
    them."""
    h, i, e, t, k = problem["h"], problem["i"], problem["e"], problem["t"], problem["top_k"]
    quant = problem["quant"]
    reasons = []
    if quant == "int4":
        for name, kk in (("group13", h), ("group2", i)):
            group = problem.get(name)
            reason = None if group is None else _int4_group_reason(name, group, kk)
            if reason:
                reasons.append(reason)
    if problem.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"x must be float16 or bfloat16, got {problem.dtype}")
    if h % 8 or i % 8:
        reasons.append(f"H = {h} and I = {i} must be multiples of 8 (16-byte rows)")
    if quant == "fp8" and (h % 16 or i % 128):
        reasons.append(f"fp8 experts need H = {h} % 16 == 0 and I = {i} % 128 == 0")
    if e > MAX_LOCAL_EXPERTS:
        reasons.append(f"{e} local experts > {MAX_LOCAL_EXPERTS} (alignment counters in "
                       f"shared memory)")
    if t * k >= MAX_INT32 or capacity(t * k, e, max(BLOCK_MS)) > MAX_INT32:
        reasons.append(f"{t} x {k} pairs exceed int32 slot indices")
    if -(-max(h, i) // 64) > MAX_GRID_Y:
        reasons.append(f"max(H, I) = {max(h, i)} exceeds the grid (64 columns per CTA)")
    return reasons


def _block_m(problem: Problem) -> int:
    """Rows per tile from the pairs an expert gets on average: 16 for decode (the weight read
    dominates and padding is cheap), 64 in between, 128 once an expert fills more than one
    such tile (the larger tile reads each weight tile for twice the rows)."""
    per_expert = problem["t"] * problem["top_k"] / max(1, problem["e_global"])
    if per_expert <= 24:
        return 16
    if per_expert < 192:
        return 64
    return 128


def configs(problem: Problem) -> list[Config]:
    """Tile variants; the first is the default (block_m by pairs per expert, float32
    per-pair sums). ROCm builds have only the portable tiles."""
    impl = "simt" if is_rocm() else "mma"
    first = _block_m(problem)
    base: Config = {"impl": impl, "block_m": first, "partial_fp32": True}
    out = [base]
    for bm in BLOCK_MS:
        if bm != first:
            out.append(dict(base, block_m=bm))
    if problem["top_k"] > 1:
        out.append(dict(base, partial_fp32=False))
    return out


def _tile(impl: str, quant: str, block_m: int) -> tuple[int, int]:
    table = (MMA_TILES if impl == "mma" else SIMT_TILES)[quant]
    if impl not in IMPLS or block_m not in table:
        raise ValueError(f"{OP}: no {impl!r} tile with block_m {block_m} for {quant} experts; "
                         f"block_m is one of {sorted(table)}")
    return block_m, table[block_m]


def _aligned(t: Tensor) -> bool:
    """Whether the kernels read ``t`` in 16-byte chunks in place: the last dim contiguous, a
    16-byte aligned base and row strides of whole chunks."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all((st * t.element_size()) % 16 == 0 or size == 1
               for st, size in zip(t.stride()[:-1], t.shape[:-1]))


def _int4_tables(call) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(w13_scale, w2_scale, w13_zeros, w2_zeros) as the int4 kernels read them: one scale
    dtype for both weights (float32 when the two differ: exact), contiguous with 16-byte
    aligned bases (the scales and zero points are read 4 columns at a time)."""
    s13, s2 = call.w13_scale, call.w2_scale
    if s13.dtype != s2.dtype:
        s13, s2 = s13.float(), s2.float()
    return tuple(t if t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0)
                 else t.clone(memory_format=torch.contiguous_format)
                 for t in (s13, s2, call.w13_zeros, call.w2_zeros))


def _launch(call, config: Config, impl: str) -> None:
    x, out = call.x, call.out
    if call.t == 0:
        return
    _require_gpu(OP, x)
    if call.quant not in MMA_TILES:
        raise ValueError(f"{OP}: the cuda/hip backend does not serve {call.quant} experts")
    block_m, block_n = _tile(impl, call.quant, int(config.get("block_m", 64)))
    # A fresh contiguous copy is 16-byte aligned (the caching allocator's blocks are).
    x, w13, w2 = (t if _aligned(t) else t.clone(memory_format=torch.contiguous_format)
                  for t in (x, call.w13, call.w2))
    s13, s2, z13, z2 = (_int4_tables(call) if call.quant == "int4"
                        else (call.w13_scale, call.w2_scale, None, None))
    dev = x.device
    in_place = out.is_contiguous() and out.data_ptr() % 16 == 0
    with kernel_output(out, in_place) as target, on_device(dev):
        _module().forward(x, w13, w2, s13, s2, z13, z2, call.group13, call.group2,
                          call.weights, call.ids, call.expert_map, target,
                          ACTIVATIONS[call.activation], IMPLS[impl], block_m, block_n,
                          bool(config.get("partial_fp32", True)), raw_stream(dev))


def run_cuda(call, config: Config) -> None:
    """The ``cuda`` backend of ``fused_moe``: write ``call.out`` (tensor cores unless the
    config asks for the portable tiles)."""
    _launch(call, config, str(config.get("impl", "mma")))


def run_hip(call, config: Config) -> None:
    """The ``hip`` backend of ``fused_moe``: the portable tiles (no mma.sync on AMD GPUs)."""
    _launch(call, config, "simt")


run = run_cuda
