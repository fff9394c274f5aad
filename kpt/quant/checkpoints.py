"""Import of 4-bit GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoint tensors into
kpt's int4 format (``kpt/ops/int4_gemm/__init__.py``), without requantising: every weight
dequantises to exactly ``(q - z) * s`` of the checkpoint.

Published layouts, for an nn.Linear weight (N, K) with G groups, codes ``q[n, k]`` and zero
points ``z[g, n]`` in 0..15 (nibble j: bits 4j..4j+3 of an int32, two's complement):

* GPTQ ``qweight`` (K // 8, N): nibble j of ``qweight[i, n]`` is ``q[n, 8i + j]``. This is kpt's
  ``packed`` layout, taken as is. ``qzeros`` (G, N // 8): nibble j of ``qzeros[g, c]`` is the
  zero point of column ``8c + j``. ``scales`` (G, N) float16. ``g_idx`` (K,) int32: the group
  of input channel k (``k // group_size`` unless the checkpoint was made with ``desc_act``).
  Format ``"gptq"`` (AutoGPTQ's v1, what ``checkpoint_format`` ``"gptq"`` means in GPTQModel)
  stores ``z - 1`` in the nibble and its kernels add the 1 back; ``"gptq_v2"`` stores ``z``.
* AWQ GEMM ``qweight`` (K, N // 8): nibble i of ``qweight[k, c]`` is ``q[8c + ORDER[i], k]``
  with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (an interleave that suits AWQ's dequantisation
  in registers); ``qzeros`` (G, N // 8) packs zero points the same way, stored as ``z``;
  ``scales`` (G, N) float16; groups are contiguous (``k // group_size``).

Scales are returned as stored (float16 / bfloat16 / float32; kpt reads them as float32,
exactly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kpt.ops._common import check_tensor
from kpt.ops.int4_gemm import _check_group_size
from kpt.ops.int4_gemm import reference as _int4

from .gptq import Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column 8c + AWQ_ORDER[i]
GPTQ_FORMATS = ("gptq", "gptq_v2")
_SCALES = (torch.float16, torch.bfloat16, torch.float32)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _nibbles(words: Tensor) -> Tensor:
    """(R, C) int32 -> (R, C, 8) int32 nibbles, nibble j = bits 4j..4j+3."""
    return (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF


def _check_common(op: str, qzeros: Any, scales: Any, group_size: Any, k: int, n: int,
                  device: torch.device) -> int:
    groups = _check_group_size(op, group_size, k)
    check_tensor(op, "qzeros", qzeros, ndim=2, dtypes=(torch.int32,), device=device)
    if tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"{op}: qzeros must be (G, N // 8) = ({groups}, {n // 8}) for K={k}, "
                         f"N={n}, group_size={group_size}, got {tuple(qzeros.shape)}")
    check_tensor(op, "scales", scales, ndim=2, dtypes=_SCALES, device=device)
    if tuple(scales.shape) != (groups, n):
        raise ValueError(f"{op}: scales must be (G, N) = ({groups}, {n}), got "
                         f"{tuple(scales.shape)}")
    return groups


def from_gptq(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    *,
    checkpoint_format: str = "gptq",
) -> Int4Weight:
    """A GPTQ checkpoint's tensors (layouts: module docstring) as kpt's
    ``Int4Weight(packed, scales, zeros, g_idx)``.

    Args:
        qweight: (K // 8, N) int32. Returned as ``packed`` (the same layout; no copy when
            contiguous).
        qzeros: (G, N // 8) int32.
        scales: (G, N) float16, bfloat16 or float32.
        g_idx: (K,) integer tensor or None. Returned as int32, or None when it is the
            contiguous ``k // group_size`` every checkpoint without ``desc_act`` stores.
        bits: 4 (the only width kpt's int4_gemm reads).
        group_size: the checkpoint's (32, 64, 128, 256, or -1).
        sym: the checkpoint's ``sym``. True: every zero point must be 8 (kpt's implied
            symmetric zero), and zeros comes back None; False: zeros (G, N) uint8.
        checkpoint_format: ``"gptq"`` (v1: the nibble holds ``z - 1``, the 1 is added here)
            or ``"gptq_v2"`` (the nibble holds ``z``).

    v1 cannot store a zero point of 0: ``0 - 1`` wraps to nibble 15, which v1 kernels read as
    zero point 16, outside 4 bits. Such a checkpoint raises ValueError (its AutoGPTQ packing
    ORs the wrapped -1 over the neighbouring nibbles too, so its other zeros are unreliable).
    """
    op = "from_gptq"
    if bits != 4:
        raise ValueError(f"{op}: only bits=4 is supported, got {bits!r}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"{op}: checkpoint_format must be one of {GPTQ_FORMATS}, got "
                         f"{checkpoint_format!r}")
    if not isinstance(sym, bool):
        raise TypeError(f"{op}: sym must be a bool, got {sym!r}")
    check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
    words, n = qweight.shape
    k = 8 * words
    if n == 0 or n % 8:
        raise ValueError(f"{op}: N (qweight's columns) must be a positive multiple of 8, got {n}")
    groups = _check_common(op, qzeros, scales, group_size, k, n, qweight.device)

    zeros = _nibbles(qzeros).reshape(groups, n)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
        if bool((zeros > 15).any()):
            raise ValueError(f"{op}: a v1 ('gptq') qzeros nibble is 15, i.e. zero point 16 "
                             f"(a zero point of 0 wrapped by v1's 'zero - 1'); kpt's zero "
                             f"points are 0..15")
    if sym:
        if not bool((zeros == _int4.SYMMETRIC_ZERO).all()):
            raise ValueError(f"{op}: sym=True but the zero points are not all "
                             f"{_int4.SYMMETRIC_ZERO}; pass sym=False (or check "
                             f"checkpoint_format)")
        zeros_out = None
    else:
        zeros_out = zeros.to(torch.uint8)

    idx = None
    if g_idx is not None:
        check_tensor(op, "g_idx", g_idx, ndim=1,
                     dtypes=(torch.int32, torch.int64, torch.int16), device=qweight.device)
        if g_idx.shape[0] != k:
            raise ValueError(f"{op}: g_idx must have K={k} entries, got {g_idx.shape[0]}")
        if not bool(((g_idx >= 0) & (g_idx < groups)).all()):
            raise ValueError(f"{op}: g_idx must name groups in 0..{groups - 1}")
        contiguous = _int4.group_index(k, group_size, None, qweight.device, groups)
        if not torch.equal(g_idx.long(), contiguous):
            idx = g_idx.to(torch.int32).contiguous()
    return Int4Weight(qweight.contiguous(), scales, zeros_out, idx)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int = 128
             ) -> Int4Weight:
    """An AWQ GEMM checkpoint's tensors (layout: module docstring) as kpt's
    ``Int4Weight(packed, scales, zeros, None)``: qweight (K, N // 8) int32, qzeros (G, N // 8)
    int32, scales (G, N) float16 / bfloat16 / float32. The codes are unpacked and repacked
    along K (a new (K // 8, N) tensor); zeros (G, N) uint8. Only the GEMM layout (AutoAWQ
    ``version="gemm"``); GEMV and Marlin checkpoints pack differently.
    """
    op = "from_awq"
    check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int32,))
    k, cols = qweight.shape
    n = 8 * cols
    if n == 0:
        raise ValueError(f"{op}: qweight has N = 0 output features")
    groups = _check_common(op, qzeros, scales, group_size, k, n, qweight.device)
    # Column 8c + j sits in nibble AWQ_ORDER.index(j) of word c.
    take = torch.tensor([AWQ_ORDER.index(j) for j in range(8)], device=qweight.device)
    codes = _nibbles(qweight)[:, :, take].reshape(k, n)
    zeros = _nibbles(qzeros)[:, :, take].reshape(groups, n)
    return Int4Weight(_int4.pack(codes.t()), scales, zeros.to(torch.uint8), None)


__all__ = ["from_gptq", "from_awq", "AWQ_ORDER", "GPTQ_FORMATS"]
