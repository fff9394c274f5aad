"""FP8 GEMM with scales (``fp8_gemm``) and the quantiser that makes its operands
(``quantize_fp8``).

Equivalent PyTorch (see ``reference.py``)::

    y = (a8.float() * a_scale) @ (w8.float() * w_scale).T + bias    # float32, then out_dtype

with each scale broadcast over its block. ``w`` is an ``nn.Linear`` weight (N, K), so ``y`` is
``F.linear`` of the dequantised operands. Scales are float32 and may be, independently for a
and w (the granularity is read from the scale's shape):

=========== ========================= =============================================
granularity a (M, K)                  w (N, K)
=========== ========================= =============================================
tensor      one element               one element
row         (M, 1): per token         (N, 1): per output channel
block       (M, ceil(K/128)): 1x128   (ceil(N/128), ceil(K/128)): 128x128
=========== ========================= =============================================

Backends:

* ``cuda`` (sm_80+) and ``hip`` (``_cuda.py``, kernels in ``csrc/fp8_gemm``, one source for nvcc
  and hipcc): mma.sync tiles (fp8 ``m16n8k32`` on sm_89+, codes widened to fp16 on sm_80) with a
  K split for decode shapes; on Hopper a TMA + wgmma kernel (its own sm_90a build) above 64
  rows; the HIP build runs portable CUDA-core tiles. Block scales promote each 128-wide k-tile
  into float32. Tested on an H100 (2026-12-07, both the mma and wgmma kernels); slower than
  ``triton`` there except for block scales (bench/RESULTS.md), so dispatch puts them after
  ``triton`` (first where Triton cannot run: sm_80, ROCm) except for blockwise weights above
  64 rows on sm_90 (``_cuda.prefer``); the HIP build is compile-checked;
* ``triton`` (CUDA sm_89+; on the CPU only under ``TRITON_INTERPRET=1``);
* ``reference`` (any device).

Inference only: no backward. ``quantize_fp8`` is plain PyTorch (memory-bound elementwise work
that torch.compile fuses); it is not dispatched through the registry.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import xpu_backend
from kpt.ops._common import (
    check_tensor,
    dtype_name,
    lazy,
    native_backends,
    plain_eager,
    reference_backend,
    triton_backend,
    triton_interpreting,
    triton_unavailable,
)
from kpt.ops._registry import Op, Problem

from . import reference as _reference

OP = "fp8_gemm"
OP_QUANTIZE = "quantize_fp8"

FP8 = frozenset(t for t in (getattr(torch, "float8_e4m3fn", None),
                            getattr(torch, "float8_e5m2", None)) if t is not None)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GRANULARITIES = ("tensor", "row", "block")
A_BLOCK = (1, 128)  # blockwise scales of activations: one per token and 128 K
W_BLOCK = (128, 128)  # of weights: one per 128 output channels x 128 K
ALIGN = 16  # N and K: fp8 tensor-core tiles (and _scaled_mm) need multiples of 16


@dataclass
class Call:
    """A validated call. a8 (M, K), w8 (N, K) fp8 of one dtype, any strides; a_scale, w_scale
    float32, 2-D (a per-tensor scale as a (1, 1) view); bias (N,) or None; out (M, N)."""

    a8: Tensor
    w8: Tensor
    a_scale: Tensor
    w_scale: Tensor
    a_granularity: str
    w_granularity: str
    bias: Tensor | None
    out: Tensor


def problem_of(call: Call) -> Problem:
    return Problem.of(
        call.a8.device, call.a8.dtype, m=call.a8.shape[0], n=call.w8.shape[0],
        k=call.a8.shape[1], a_granularity=call.a_granularity,
        w_granularity=call.w_granularity, out_dtype=call.out.dtype,
        bias=call.bias is not None)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _bucket(p: Problem) -> str:
    return (f"m{_pow2(p['m'])}-n{p['n']}-k{p['k']}-{p['a_granularity']}x{p['w_granularity']}"
            f"-{dtype_name(p['out_dtype'])}{'-bias' if p['bias'] else ''}")


# ---- backends ------------------------------------------------------------------------------


def _triton_supports(p: Problem) -> list[str]:
    reasons = []
    if p.device_type == "cuda":
        if torch.version.hip is not None:
            reasons.append("not validated on ROCm (OCP fp8 e4m3fn/e5m2 dot needs gfx950, "
                           "kpt has not run it there)")
        elif torch.cuda.get_device_capability(p.device_index) < (8, 9):
            cap = "sm_{}{}".format(*torch.cuda.get_device_capability(p.device_index))
            reasons.append(f"fp8 tl.dot needs sm_89 or newer (Ada, Hopper), device is {cap}")
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


BACKENDS = (
    triton_backend(f"{__name__}._triton", dtypes=FP8, supports=_triton_supports,
                   configs="configs"),
    # One kernel source for nvcc and hipcc (csrc/fp8_gemm); supports() and configs() in _cuda.py.
    *native_backends(f"{__name__}._cuda", dtypes=FP8, run_cuda="run_cuda", run_hip="run_hip"),
    reference_backend(_reference.run, FP8, devices=frozenset({"cuda", "cpu", "xpu"})),
    xla_backend("fp8_gemm", dtypes=FP8),
    xpu_backend(f"{__name__}._triton", dtypes=FP8, supports=_triton_supports, configs="configs"),
)


def _example(device: torch.device, dtype: torch.dtype) -> Problem:
    """A Llama-3-8B MLP down projection of 16 tokens, DeepSeek-V3-style blockwise scales
    (``dtype``: the output's where it is one, bf16 otherwise)."""
    out = dtype if dtype in OUT_DTYPES else torch.bfloat16
    return Problem.of(device, torch.float8_e4m3fn, m=16, n=4096, k=14336,
                      a_granularity="block", w_granularity="block", out_dtype=out, bias=False)


SPEC = Op(
    name=OP,
    backends=BACKENDS,
    priority={"cuda": ("triton", "cuda", "hip", "reference"), "cpu": ("reference",),
              "xla": ("xla",),
              "xpu": ("xpu", "reference")},
    bucket=_bucket,
    prefer=lazy(f"{__name__}._cuda", "prefer"),
    example=_example,
)


# ---- validation ----------------------------------------------------------------------------


def _granularity(name: str, scale: Any, rows: int, k: int, block: tuple[int, int],
                 device: torch.device) -> tuple[str, Tensor]:
    """The granularity a scale's shape says, and the scale as a 2-D tensor."""
    check_tensor(OP, name, scale, dtypes=(torch.float32,), device=device)
    shapes = {"row": (rows, 1), "block": (-(-rows // block[0]), -(-k // block[1]))}
    if scale.numel() == 1:
        return "tensor", scale.reshape(1, 1)
    for granularity, shape in shapes.items():
        if tuple(scale.shape) == shape:
            return granularity, scale
    raise ValueError(f"{OP}: {name} of shape {tuple(scale.shape)} must be one element (per "
                     f"tensor), {shapes['row']} (per row) or {shapes['block']} (blocks of "
                     f"{block[0]}x{block[1]})")


def _validate(a8: Any, w8: Any, a_scale: Any, w_scale: Any, out_dtype: Any,
              bias: Any) -> tuple[str, Tensor, str, Tensor]:
    check_tensor(OP, "a8", a8, ndim=2, dtypes=tuple(sorted(FP8, key=str)))
    dev = a8.device
    check_tensor(OP, "w8", w8, ndim=2, dtypes=(a8.dtype,), device=dev)
    (m, k), n = a8.shape, w8.shape[0]
    if w8.shape[1] != k:
        raise ValueError(f"{OP}: a8 {tuple(a8.shape)} and w8 {tuple(w8.shape)} (N, K) differ "
                         f"in K")
    for dim, size in (("N", n), ("K", k)):
        if size == 0 or size % ALIGN:
            raise ValueError(f"{OP}: {dim} = {size} must be a positive multiple of {ALIGN}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{OP}: out_dtype must be one of "
                        f"({', '.join(dtype_name(d) for d in OUT_DTYPES)}), got {out_dtype!r}")
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, dtypes=OUT_DTYPES, device=dev)
        if bias.shape[0] != n:
            raise ValueError(f"{OP}: bias has {bias.shape[0]} elements for N = {n}")
    a_gran, a_scale = _granularity("a_scale", a_scale, m, k, A_BLOCK, dev)
    w_gran, w_scale = _granularity("w_scale", w_scale, n, k, W_BLOCK, dev)
    return a_gran, a_scale, w_gran, w_scale


# ---- custom op and public function ---------------------------------------------------------


def _impl(a8: Tensor, w8: Tensor, a_scale: Tensor, w_scale: Tensor, a_granularity: str,
          w_granularity: str, bias: Tensor | None, out_dtype: torch.dtype,
          backend: str) -> Tensor:
    out = torch.empty((a8.shape[0], w8.shape[0]), dtype=out_dtype, device=a8.device)
    call = Call(a8, w8, a_scale, w_scale, a_granularity, w_granularity, bias, out)
    key = (a8.device, a8.dtype, a8.shape[0], w8.shape[0], a8.shape[1], a_granularity,
           w_granularity, out_dtype, bias is not None)
    SPEC.launch_keyed(key, lambda: problem_of(call), call, backend or None)
    return out


@torch.library.custom_op("kpt::fp8_gemm", mutates_args=())
def _fp8_gemm_op(a8: Tensor, w8: Tensor, a_scale: Tensor, w_scale: Tensor, a_granularity: str,
                 w_granularity: str, bias: Tensor | None, out_dtype: torch.dtype,
                 backend: str) -> Tensor:
    return _impl(a8, w8, a_scale, w_scale, a_granularity, w_granularity, bias, out_dtype,
                 backend)


@_fp8_gemm_op.register_fake
def _(a8, w8, a_scale, w_scale, a_granularity, w_granularity, bias, out_dtype, backend):
    return a8.new_empty((a8.shape[0], w8.shape[0]), dtype=out_dtype)


def fp8_gemm(
    a8: Tensor,
    w8: Tensor,
    a_scale: Tensor,
    w_scale: Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y = (a8 * a_scale) @ (w8 * w_scale).T + bias``, (M, N) in ``out_dtype``.

    Args:
        a8: (M, K) activations, float8_e4m3fn or float8_e5m2; any M (1 included).
        w8: (N, K) weight (``nn.Linear`` layout), a8's dtype. N and K: multiples of 16.
            Either may be a strided view (e.g. ``x.T`` of a (K, M) tensor): the Triton kernel
            reads the strides; the cuda/hip kernels read rows of 16-byte aligned chunks in
            place and copy any other view first.
        a_scale, w_scale: float32 scales (``quantize_fp8``'s): one element (per tensor), (M, 1)
            / (N, 1) (per row / output channel), or (M, ceil(K/128)) / (ceil(N/128),
            ceil(K/128)) (blockwise, 1x128 / 128x128). The two granularities are independent.
            Their content is not read on the host: a NaN or inf scale (``quantize_fp8``'s for
            a block holding a NaN or inf) propagates into the outputs that use it.
        out_dtype: bfloat16, float16 or float32; the float32 result is rounded once.
        bias: (N,) bf16/fp16/fp32, added in float32 before that rounding.
        backend: ``"cuda"``, ``"hip"``, ``"triton"`` or ``"reference"``; None chooses.
    """
    a_gran, a_scale, w_gran, w_scale = _validate(a8, w8, a_scale, w_scale, out_dtype, bias)
    if backend is not None:
        SPEC.backend(backend)
    args = (a8, w8, a_scale, w_scale, a_gran, w_gran, bias, out_dtype, backend or "")
    if plain_eager(a8, w8, a_scale, w_scale, bias):
        return _impl(*args)
    return torch.ops.kpt.fp8_gemm(*args)


def quantize_fp8(
    x: Tensor,
    granularity: str = "tensor",
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    block: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantise ``x`` to fp8: ``(x8, scale)`` with ``x ~= x8.float() * scale`` per block.

    Args:
        x: float16 / bfloat16 / float32. Any shape for ``"tensor"``, (..., K) for ``"row"``,
            (M, K) for ``"block"``.
        granularity: ``"tensor"`` (scale: 0-dim), ``"row"`` (scale (..., 1): per token of an
            activation, per output channel of a weight) or ``"block"`` (scale (ceil(M /
            rows), ceil(K / cols)); edge blocks partial).
        dtype: float8_e4m3fn (max 448) or float8_e5m2 (max 57344).
        block: (rows, cols) of ``"block"``: ``A_BLOCK`` = (1, 128), the default, for
            activations, ``W_BLOCK`` = (128, 128) for weights (what ``fp8_gemm`` reads).

    Scale: ``amax / fp8 max`` of the block (float32), at least 2^-126 (the smallest normal
    float32, so a block of tiny values never overflows), and 1 for an all-zero block. Values
    are divided by it and saturated to +-fp8 max before the cast (rounding may carry amax past
    the maximum). Non-finite input propagates, nothing is checked on the host: a block that
    holds a NaN or +-inf gets a NaN scale and NaN values.

    Round trip: the cast rounds to nearest, so ``|x - x8.float() * scale| <= 2^-(m+1) |x| +
    2^-(s+1) scale`` elementwise (m = 3 mantissa bits and fp8 subnormal spacing 2^-s = 2^-9
    for e4m3; m = 2, s = 16 for e5m2), up to float32 rounding of the division.
    """
    op = OP_QUANTIZE
    check_tensor(op, "x", x, dtypes=OUT_DTYPES)
    if dtype not in FP8:
        raise TypeError(f"{op}: dtype must be float8_e4m3fn or float8_e5m2, got {dtype!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {GRANULARITIES}, got "
                         f"{granularity!r}")
    if block is not None and granularity != "block":
        raise ValueError(f"{op}: block is for granularity='block', got {granularity!r}")
    if granularity == "tensor" and x.numel() == 0:
        raise ValueError(f"{op}: an empty tensor has no per-tensor scale")
    if granularity == "row" and (x.dim() == 0 or x.shape[-1] == 0):
        raise ValueError(f"{op}: per-row scales need rows of at least one element, got shape "
                         f"{tuple(x.shape)}")
    if granularity == "block":
        block = A_BLOCK if block is None else block
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                           for b in block)):
            raise ValueError(f"{op}: block must be (rows, cols) positive ints, got {block!r}")
        block = (int(block[0]), int(block[1]))
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"{op}: blockwise scales need a 2-D (M, K) x with K > 0, got shape "
                             f"{tuple(x.shape)}")
    if _fused_quantize(x, granularity, block):
        from . import _quantize_triton

        if granularity == "row":
            x8, scale = _quantize_triton.quantize(x.reshape(-1, x.shape[-1]), dtype, None)
            return x8.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)
        return _quantize_triton.quantize(x, dtype, block[1])
    return _reference.quantize(x, granularity, dtype, block)


@functools.cache
def _fp8_convert_in_hardware(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 9)


def _fused_quantize(x: Tensor, granularity: str, block: tuple[int, int] | None) -> bool:
    """Whether quantize_fp8 runs its one-launch Triton kernel (``_quantize_triton``, the
    reference's codes and scales bit for bit) instead of the reference's chain of torch ops:
    activation granularities (per row, 1 x cols blocks) of a non-empty x on an NVIDIA sm_89+
    GPU, in plain eager execution (torch.compile fuses the reference itself)."""
    if x.device.type != "cuda" or x.numel() == 0 or not plain_eager(x):
        return False
    return (_activation_granularity(granularity, block, x.shape[-1])
            and triton_unavailable() is None and _fp8_convert_in_hardware(x.device.index or 0))


# The fused quantizer's grid is (rows, column groups); CUDA caps a grid's second dimension.
MAX_FUSED_GROUPS = 65535


def _activation_granularity(granularity: str, block: tuple[int, int] | None, k: int) -> bool:
    """Per-row scales, or one-row blocks of at most MAX_FUSED_GROUPS groups per row: what the
    fused quantizer computes."""
    if granularity == "row":
        return True
    return granularity == "block" and block[0] == 1 and -(-k // block[1]) <= MAX_FUSED_GROUPS
