"""W4A16 GEMM: fp16/bf16 activations times a 4-bit weight quantised per group.

Equivalent PyTorch (see ``reference.py``)::

    out = (x.float() @ dequantize_int4(packed, scales, zeros, group_size=group_size,
                                       g_idx=g_idx, dtype=x.dtype).float().T
           + bias.float()).to(x.dtype)

Storage format (kpt's own; GPTQ/AWQ checkpoint import will convert to it). For an nn.Linear
weight ``w`` of shape (N, K), G = K // group_size groups (1 for ``group_size=-1``,
per-channel):

* ``packed``: (K // 8, N) int32. Word ``packed[i, n]`` holds the unsigned 4-bit codes
  ``q[n, 8i .. 8i + 7]``: code ``q[n, 8i + j]`` in bits ``4j .. 4j + 3`` (nibble 0 the least
  significant, no interleaving), read as a two's-complement int32 (nibble 7 >= 8 makes the word
  negative). This is GPTQ's ``qweight`` orientation: N contiguous, so a weight tile loads
  coalesced along N and each word serves 8 consecutive input channels. K must be a multiple
  of 8; N is free.
* ``scales``: (G, N), float32 from ``pack_int4``; float16 and bfloat16 are accepted too (for
  imported checkpoints). Read as float32, exactly.
* ``zeros``: (G, N) uint8 zero points 0..15 (zero-point quantisation), or None: symmetric, with
  the implied zero point 8 (codes 0..15 hold -8..7).
* ``g_idx`` (act-order, GPTQ ``desc_act``): (K,) int32, the group of each input channel, in
  0..G-1. Without it channel ``k`` belongs to group ``k // group_size``.

Dequantisation and its rounding points: ``w[n, k] = float32(q - z) * float32(scale)`` for the
channel's group, computed in float32 (``q - z`` is an exact small integer, so this product is
the only rounding), then rounded once (to nearest even) to x's dtype; the product with x
accumulates in float32, the bias (x's dtype or float32) is added to the float32 sum, and the
result is rounded once to x's dtype. Every backend follows these points exactly; backends
differ only in the order of the float32 sums.

Backends: ``cuda`` / ``hip`` (``csrc/int4_gemm``, one source: tensor-core tiles with the weight
dequantised in registers on CUDA sm_80+, portable CUDA-core tiles on HIP; fp16/bf16 x, N a
multiple of 8; ``_cuda.py``), ``triton`` (fp16/bf16 x, CUDA, or the CPU under
``TRITON_INTERPRET=1``) and ``reference`` (fp16/bf16/fp32 x, any device). On NVIDIA GPUs
cuda comes first for decode (M <= 16) and from 256 rows (its dequantise-then-GEMM config),
where it measured faster on an H100 (``_cuda.prefer``), triton between. Inference only: no
backward.
"""

from __future__ import annotations

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
    read_content,
    reference_backend,
    triton_backend,
    triton_interpreting,
)
from kpt.ops._registry import Op, Problem

from . import reference as _reference

OP = "int4_gemm"
OP_PACK = "pack_int4"
OP_DEQUANT = "dequantize_int4"

GROUP_SIZES = (32, 64, 128, 256, -1)
_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Call:
    """A validated call: x (M, K); packed (K // 8, N) int32; scales (G, N); zeros (G, N) uint8
    or None; g_idx (K,) int32 or None; bias (N,) or None; group_size > 0 or -1; out (M, N)
    of x's dtype."""

    x: Tensor
    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    g_idx: Tensor | None
    bias: Tensor | None
    group_size: int
    out: Tensor


def problem_of(call: Call) -> Problem:
    m, k = call.x.shape
    return Problem.of(call.x.device, call.x.dtype, m=m, n=call.packed.shape[1], k=k,
                      group_size=call.group_size, zero_point=call.zeros is not None,
                      act_order=call.g_idx is not None, bias=call.bias is not None,
                      scale_dtype=call.scales.dtype)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _bucket(p: Problem) -> str:
    return (f"m{_pow2(p['m'])}-n{p['n']}-k{p['k']}-g{p['group_size']}"
            f"-{'zp' if p['zero_point'] else 'sym'}-s{dtype_name(p['scale_dtype'])}"
            f"{'-act' if p['act_order'] else ''}{'-bias' if p['bias'] else ''}")


# ---- backends ------------------------------------------------------------------------------


def _triton_supports(p: Problem) -> list[str]:
    reasons = []
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    if (p.dtype == torch.bfloat16 and p.device_type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(p.device_index) < (8, 0)):
        reasons.append("bfloat16 tl.dot needs sm_80 or newer")
    return reasons


BACKENDS = (
    triton_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports,
                   configs="problem_configs"),
    # One kernel source for nvcc and hipcc (csrc/int4_gemm); supports() and configs() in _cuda.py.
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run_cuda", run_hip="run_hip"),
    reference_backend(_reference.run, _FLOATS),
    xla_backend("int4_gemm", dtypes=_FLOATS),
    xpu_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports),
)


def _example(device: torch.device, dtype: torch.dtype) -> Problem:
    """A Llama-3-8B down projection at decode: M=1, K=14336, N=4096, g128 zero-point."""
    return Problem.of(device, dtype, m=1, n=4096, k=14336, group_size=128, zero_point=True,
                      act_order=False, bias=False, scale_dtype=torch.float32)


SPEC = Op(
    name=OP,
    backends=BACKENDS,
    # Not the reference on xla: torch_xla 2.9's `>>` breaks its unpacking (kpt.backends.xla).
    priority={"cuda": ("triton", "cuda", "hip", "reference"), "cpu": ("reference",),
              "xla": ("xla",), "xpu": ("xpu", "reference")},
    bucket=_bucket,
    prefer=lazy(f"{__name__}._cuda", "prefer"),
    example=_example,
)


# ---- validation ----------------------------------------------------------------------------


def _check_group_size(op: str, group_size: Any, k: int) -> int:
    """The number of groups G; raises unless group_size is one of GROUP_SIZES dividing K."""
    # 32.0 == 32 and np.int64(32) == 32: only a Python int is a group size (a float would
    # index the scales with float tensors further on)
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES} (-1: per channel), "
                         f"got {group_size!r}")
    if k <= 0 or k % 8:
        raise ValueError(f"{op}: K (input features) must be a positive multiple of 8, got {k}")
    if group_size > 0 and k % group_size:
        raise ValueError(f"{op}: K={k} is not a multiple of group_size={group_size}")
    return 1 if group_size < 0 else k // group_size


def _check_quantized(op: str, packed: Any, scales: Any, zeros: Any, g_idx: Any,
                     group_size: Any, k: int | None, device: torch.device | None) -> int:
    """Checks the packed weight, scales, zeros and g_idx against each other (and against K,
    when the activations give it); returns N."""
    check_tensor(op, "packed", packed, ndim=2, dtypes=(torch.int32,), device=device)
    device = packed.device
    words, n = packed.shape
    if k is None:
        k = 8 * words
    elif words * 8 != k:
        raise ValueError(f"{op}: packed must be (K // 8, N) = ({k // 8}, N) int32 for K={k}, "
                         f"got shape {tuple(packed.shape)}")
    if n == 0:
        raise ValueError(f"{op}: packed has N = 0 output features")
    groups = _check_group_size(op, group_size, k)
    check_tensor(op, "scales", scales, ndim=2, dtypes=_SCALE_DTYPES, device=device)
    if tuple(scales.shape) != (groups, n):
        raise ValueError(f"{op}: scales must be (G, N) = ({groups}, {n}) for K={k}, "
                         f"group_size={group_size}, got {tuple(scales.shape)}")
    if zeros is not None:
        check_tensor(op, "zeros", zeros, ndim=2, dtypes=(torch.uint8,), device=device)
        if tuple(zeros.shape) != (groups, n):
            raise ValueError(f"{op}: zeros must be (G, N) = ({groups}, {n}) like scales, got "
                             f"{tuple(zeros.shape)}")
        if read_content(zeros) and zeros.numel() and int(zeros.max()) > 15:
            raise ValueError(f"{op}: zeros must hold 4-bit zero points 0..15, got "
                             f"{int(zeros.max())}")
    if g_idx is not None:
        check_tensor(op, "g_idx", g_idx, ndim=1, dtypes=(torch.int32,), device=device)
        if g_idx.shape[0] != k:
            raise ValueError(f"{op}: g_idx must have K={k} entries, got {g_idx.shape[0]}")
        if read_content(g_idx) and not bool(((g_idx >= 0) & (g_idx < groups)).all()):
            raise ValueError(f"{op}: g_idx must name groups in 0..{groups - 1}")
    return n


def _validate(x: Any, packed: Any, scales: Any, zeros: Any, group_size: Any, g_idx: Any,
              bias: Any) -> int:
    check_tensor(OP, "x", x, dtypes=tuple(_FLOATS))
    if x.dim() == 0:
        raise ValueError(f"{OP}: x must be (..., K), got a scalar")
    n = _check_quantized(OP, packed, scales, zeros, g_idx, group_size, x.shape[-1], x.device)
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, dtypes=(x.dtype, torch.float32), device=x.device)
        if bias.shape[0] != n:
            raise ValueError(f"{OP}: bias must have N={n} entries, got {bias.shape[0]}")
    return n


# ---- custom op -----------------------------------------------------------------------------


def _impl(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None,
          g_idx: Tensor | None, bias: Tensor | None, group_size: int, backend: str) -> Tensor:
    out = torch.empty((x.shape[0], packed.shape[1]), dtype=x.dtype, device=x.device)
    call = Call(x, packed, scales, zeros, g_idx, bias, group_size, out)
    key = (x.device, x.dtype, x.shape[0], packed.shape[1], x.shape[1], group_size,
           zeros is not None, g_idx is not None, bias is not None, scales.dtype)
    SPEC.launch_keyed(key, lambda: problem_of(call), call, backend or None)
    return out


@torch.library.custom_op("kpt::int4_gemm", mutates_args=())
def _int4_gemm_op(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None,
                  g_idx: Tensor | None, bias: Tensor | None, group_size: int,
                  backend: str) -> Tensor:
    return _impl(x, packed, scales, zeros, g_idx, bias, group_size, backend)


@_int4_gemm_op.register_fake
def _(x, packed, scales, zeros, g_idx, bias, group_size, backend):
    return x.new_empty((x.shape[0], packed.shape[1]))


def int4_gemm(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    *,
    group_size: int = 128,
    g_idx: Tensor | None = None,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``x @ dequantize_int4(packed, scales, zeros, ...).T (+ bias)``: an nn.Linear with a
    4-bit weight (W4A16).

    Args:
        x: (..., K) activations, float16 or bfloat16 (float32 on the reference); any strides.
        packed, scales, zeros, g_idx, group_size: the quantised (N, K) weight, as returned by
            ``pack_int4`` (format in the module docstring): (K // 8, N) int32; (G, N) float32,
            float16 or bfloat16; (G, N) uint8 or None (symmetric); (K,) int32 act-order group
            of each input channel or None; 32, 64, 128, 256 or -1 (per channel).
        bias: (N,) of x's dtype or float32, added to the float32 sum.
        backend: ``"cuda"``, ``"hip"``, ``"triton"`` or ``"reference"``.

    Returns (..., N) in x's dtype: float32 accumulation of x times the weight rounded to x's
    dtype, one final rounding (``reference.py`` is the specification).
    """
    n = _validate(x, packed, scales, zeros, group_size, g_idx, bias)
    if backend is not None:
        SPEC.backend(backend)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = (x2, packed, scales, zeros, g_idx, bias, group_size, backend or "")
    if plain_eager(x2, packed, scales, zeros, g_idx, bias):
        out = _impl(*args)
    else:
        out = torch.ops.kpt.int4_gemm(*args)
    return out.reshape(*lead, n)


# ---- packing -------------------------------------------------------------------------------


def pack_int4(w: Tensor, group_size: int = 128, symmetric: bool = False, *,
              g_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantise an nn.Linear weight ``w`` (N, K) to 4 bits, round to nearest, per group.

    Returns ``(packed, scales, zeros)`` in the module docstring's format: packed (K // 8, N)
    int32, scales (G, N) float32, zeros (G, N) uint8 (zero-point) or None (``symmetric``).

    * symmetric: ``scale = max|w| / 7`` per group, codes ``round(w / scale) + 8``;
    * zero-point: the group's range ``[min(w, 0), max(w, 0)]`` in 16 levels, ``scale = (max -
      min) / 15``, ``zero = round(-min / scale)``, codes ``round(w / scale) + zero``, clamped
      to 0..15.

    Every element dequantises to within ``scale / 2`` of ``w`` (``reference.quantize``).
    ``g_idx`` (K,) int32 forms act-order groups (channel ``k`` in group ``g_idx[k]``, G =
    K // group_size) instead of contiguous runs. Runs on w's device; reads w on the host once to
    check that it is finite.
    """
    check_tensor(OP_PACK, "w", w, ndim=2, dtypes=tuple(_FLOATS))
    if not isinstance(symmetric, bool):
        raise TypeError(f"{OP_PACK}: symmetric must be a bool, got {symmetric!r}")
    n, k = w.shape
    if n == 0:
        raise ValueError(f"{OP_PACK}: w has N = 0 output features")
    groups = _check_group_size(OP_PACK, group_size, k)
    if g_idx is not None:
        check_tensor(OP_PACK, "g_idx", g_idx, ndim=1, dtypes=(torch.int32,), device=w.device)
        if g_idx.shape[0] != k or not bool(((g_idx >= 0) & (g_idx < groups)).all()):
            raise ValueError(f"{OP_PACK}: g_idx must hold K={k} groups in 0..{groups - 1}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{OP_PACK}: w must be finite")
    codes, scales, zeros = _reference.quantize(w, group_size, symmetric, g_idx)
    return _reference.pack(codes), scales, zeros


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor | None, *,
                    group_size: int = 128, g_idx: Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight ``int4_gemm`` multiplies by: float32 ``(q - zero) * scale`` per
    group, rounded once to ``dtype`` (pass x's dtype for exactly the kernels' weight)."""
    _check_quantized(OP_DEQUANT, packed, scales, zeros, g_idx, group_size, None, None)
    if dtype not in _FLOATS and dtype != torch.float64:
        raise TypeError(f"{OP_DEQUANT}: dtype must be a float dtype, got {dtype}")
    return _reference.dequantize(packed, scales, zeros, group_size, g_idx, dtype)


__all__ = ["int4_gemm", "pack_int4", "dequantize_int4", "Call", "SPEC", "GROUP_SIZES"]
