"""CUDA and HIP backends of ``rmsnorm_qkv_rope``: JIT build of ``csrc/rmsnorm_qkv_rope`` and the
launcher that serves both (one kernel source for nvcc and hipcc).

Each call runs three stages on the current stream, with workspaces from torch's caching
allocator (CUDA-graph safe, no host synchronisation):

1. ``add_rmsnorm``: ``h = x + residual`` (written to ``residual_out``) and the normalised,
   weighted rows ``xn`` (tokens, hidden).
2. the projection. Up to ``gemv_max_tokens`` tokens (decode) a split-K GEMV kernel streams the
   weight once and leaves fp32 partial sums (splits, tokens, N). Above it the projection is
   cuBLAS/hipBLAS through ``torch.mm`` / ``torch.addmm`` into a (tokens, N) workspace: fp32
   accumulation rounded once, with the bias added before the rounding, which is exactly the
   rounding point of HF's ``nn.Linear``.
3. ``epilogue``: partial sums + bias (or the GEMM result), per-head q/k RMSNorm, RoPE, and the
   q, k, v outputs.

Every rounding point is that of ``reference.py``.
"""

from __future__ import annotations

import functools
import math

import torch

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import is_rocm, jit_unavailable, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem

OP = "rmsnorm_qkv_rope"

SPEC = JitSpec(
    name="rmsnorm_qkv_rope",
    sources=("rmsnorm_qkv_rope/kernels.cu", "rmsnorm_qkv_rope/binding.cpp"),
)

# What the kernels handle (kernels.cu returns KPT_RQR_UNSUPPORTED beyond these).
MAX_HIDDEN = 65536  # add_rmsnorm keeps a row in registers: 8 vectors x 1024 threads
MAX_HEAD_DIM = 256
MAX_GEMV_TOKENS = {"mma": 32, "simt": 16}
# Rows of W one GEMV block covers: 4 warps x (16 x row_tiles) rows for mma, 4 x 2 for simt.
_GEMV_ROWS = {"mma": 64, "simt": 8}
# Blocks an SM needs to keep enough loads in flight to saturate its share of HBM bandwidth
# (16 warps of 8-16 outstanding 16-byte loads each).
_MIN_BLOCKS_PER_SM = 4
_HALF = (torch.float16, torch.bfloat16)


# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)


def configs(problem: Problem) -> list[Config]:
    """Tunable variants for this problem; the first is the default.

    Only variants that change what runs for this token count are listed: above the GEMV range
    every variant would run the same GEMM path.
    """
    impl = "simt" if is_rocm() else "mma"
    base: Config = {"gemv_max_tokens": 16, "gemv": impl, "row_tiles": 1, "split_scale": 1.0}
    gemm = dict(base, gemv_max_tokens=0)
    tokens = problem["tokens"]
    if tokens <= base["gemv_max_tokens"]:
        if impl == "simt":
            return [base, gemm]
        return [
            base,
            dict(base, row_tiles=2),
            dict(base, split_scale=2.0),
            dict(base, split_scale=0.5),
            dict(base, gemv="simt"),
            gemm,
        ]
    if tokens <= MAX_GEMV_TOKENS[impl]:
        longer = dict(base, gemv_max_tokens=MAX_GEMV_TOKENS[impl])
        return [base, longer, dict(longer, row_tiles=2)]
    return [base]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _auto_splits(n: int, k: int, tokens: int, rows_per_block: int, sms: int) -> int:
    """Split-K factor for the GEMV: keep every SM busy and balanced at little extra traffic.

    Modelled time is the work of the busiest SM, counted in 32-column chunks of W per block:
    its blocks x (chunks per split + one chunk of fixed cost + the fp32 partial sums it writes
    and the epilogue reads back, tokens/8 chunks), stretched when the SMs hold too few blocks
    to saturate HBM. Among near-equal choices the smallest split wins.
    """
    groups = -(-n // rows_per_block)
    chunks = -(-k // 32)
    best_cost, best = math.inf, 1
    for splits in range(1, min(chunks, 64) + 1):
        blocks = groups * splits
        per_block = -(-chunks // splits) + 1 + tokens / 8
        cost = -(-blocks // sms) * per_block / min(1.0, blocks / (_MIN_BLOCKS_PER_SM * sms))
        if cost < 0.97 * best_cost:
            best_cost, best = cost, splits
    return best


def _validate(call) -> None:
    x = call.x
    if x.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip backend needs GPU tensors, got {x.device}")
    if x.dtype not in _HALF:
        raise TypeError(f"{OP}: the cuda/hip backend takes float16/bfloat16, got {x.dtype}")
    if call.hidden % 8 or call.hidden > MAX_HIDDEN:
        raise ValueError(f"{OP}: hidden size {call.hidden} must be a multiple of 8 and "
                         f"<= {MAX_HIDDEN} for the cuda/hip backend")
    d = call.head_dim
    if d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head_dim {d} must be a multiple of 8 and <= {MAX_HEAD_DIM} "
                         "for the cuda/hip backend")


# The binding's codes for config["gemv"] (KPT_RQR_GEMV_* in kpt/rmsnorm_qkv_rope.h).
KPT_GEMV = {"mma": 0, "simt": 1}
_PLANS: dict[tuple, tuple[Config, tuple[int, int, int]]] = {}


def _plan(config: Config, n: int, hidden: int, tokens: int, device_index: int,
          simt: bool) -> tuple[int, int, int]:
    """(GEMV code, or -1 for the GEMM; row tiles; splits) of ``config`` at this size, ``simt``
    forcing the portable GEMV; remembered per config object (dispatch hands out the same dict
    for a problem on every call), so the split model runs once per size."""
    key = (id(config), n, hidden, tokens, device_index, simt)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is config:
        return hit[1]
    impl = "simt" if simt else config.get("gemv", "mma")
    row_tiles = config.get("row_tiles", 1)
    plan = (-1, 1, 0)
    if tokens <= min(config.get("gemv_max_tokens", 16), MAX_GEMV_TOKENS[impl]):
        rows = _GEMV_ROWS[impl] * (row_tiles if impl == "mma" else 1)
        splits = _auto_splits(n, hidden, tokens, rows, _sm_count(device_index))
        splits = max(1, min(round(splits * config.get("split_scale", 1.0)), hidden // 8))
        code = KPT_GEMV[impl]
        plan = (code, row_tiles, splits)
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = (config, plan)
    return plan


def _run(call, config: Config, simt: bool = False) -> None:
    _validate(call)
    try:
        module = SPEC.load()
    except BuildError as err:
        raise BackendUnavailable(f"{OP}: {err}") from err
    x = call.x
    dev = x.device
    n = (call.num_q_heads + 2 * call.num_kv_heads) * call.head_dim
    impl, row_tiles, splits = _plan(config, n, call.hidden, call.tokens,
                                    dev.index if dev.index is not None else 0, simt)
    with on_device(dev):
        # One native call: the three stages, their workspaces and the alignment copies.
        module.forward(x, call.residual, call.residual_out, call.norm_weight, call.qkv_weight,
                       call.qkv_bias, call.q_norm_weight, call.k_norm_weight, call.positions,
                       call.inv_freq, call.q, call.k, call.v, call.rotary_dim, call.eps,
                       call.neox, impl, row_tiles, splits, raw_stream(dev))


def _fast(call, config: Config, simt: bool):
    """``Backend.fast``: ``_run``'s native call for repeats of ``call``, with the binding
    allocating the outputs; the launcher takes the op's prepared (tokens, ...) inputs
    ``(x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight,
    positions)`` and returns ``(q, k, v, residual_out)``."""
    module = SPEC.load()
    new = getattr(module, "forward_new", None)
    stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if new is None or stream is None or call.tokens == 0:
        return None
    dev = call.x.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    n = (call.num_q_heads + 2 * call.num_kv_heads) * call.head_dim
    plan = _plan(config, n, call.hidden, call.tokens, index, simt)
    inv_freq = call.inv_freq
    options = (call.num_q_heads, call.num_kv_heads, call.head_dim, call.rotary_dim, call.eps,
               call.neox, *plan)

    def launch(x, residual, norm_weight, weight, bias, q_norm, k_norm, positions):
        if torch.cuda.current_device() != index:
            with torch.cuda.device(index):
                return new(x, residual, norm_weight, weight, bias, q_norm, k_norm, positions,
                           inv_freq, *options, stream(index))
        return new(x, residual, norm_weight, weight, bias, q_norm, k_norm, positions, inv_freq,
                   *options, stream(index))

    return launch


def fast_cuda(call, config: Config):
    return _fast(call, config, simt=False)


def fast_hip(call, config: Config):
    return _fast(call, config, simt=True)


def run_cuda(call, config: Config) -> None:
    """The ``cuda`` backend: write ``call.q/k/v`` (and ``call.residual_out``)."""
    _run(call, config)


def run_hip(call, config: Config) -> None:
    """The ``hip`` backend: the same kernels built with hipcc; GEMV through the FMA variant."""
    _run(call, config, simt=True)
