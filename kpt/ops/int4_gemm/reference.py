"""The specification of ``int4_gemm``, ``pack_int4`` and ``dequantize_int4`` in plain PyTorch.

Layout and rounding are described in ``kpt/ops/int4_gemm/__init__.py``; in short: ``packed``
(K // 8, N) int32, nibble ``j`` (bits 4j..4j+3) of word ``packed[i, n]`` is the unsigned code
``q[n, 8 i + j]``; input channel ``k`` belongs to group ``g(k) = k // group_size`` (per-channel:
0; act-order: ``g_idx[k]``), and

    w[n, k] = round_to(dtype, float32(q[n, k] - z[g(k), n]) * float32(scales[g(k), n]))

with ``z = zeros`` (uint8 codes 0..15) or the constant 8 when ``zeros`` is None (symmetric). The
difference ``q - z`` is a small integer, exact in float32, so the float32 product is the only
rounding before the one to the activations' dtype. ``int4_gemm`` multiplies x by that rounded
weight with float32 accumulation, adds the bias in float32 and rounds once to x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

SYMMETRIC_ZERO = 8  # the zero point implied by zeros=None: codes 0..15 hold -8..7
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def group_index(k: int, group_size: int, g_idx: Tensor | None, device: torch.device,
                groups: int) -> Tensor:
    """(K,) int64 group of every input channel. ``g_idx`` entries are clamped into 0..groups-1,
    as the Triton kernel clamps them: its content is not read on the host per call, and a bad
    entry must never index outside the scales (no device-side fault)."""
    if g_idx is not None:
        return g_idx.long().clamp(0, groups - 1)
    if group_size < 0:
        return torch.zeros(k, dtype=torch.long, device=device)
    return torch.arange(k, device=device) // group_size


def pack(q: Tensor) -> Tensor:
    """(N, K) codes 0..15 (any integer dtype) -> (K // 8, N) int32 words, 8 nibbles along K."""
    n, k = q.shape
    codes = q.t().reshape(k // 8, 8, n).long()
    words = (codes << _SHIFTS.to(q.device).long().view(1, 8, 1)).sum(1)
    # Two's complement of the upper half: a word whose nibble 7 is >= 8 is negative in int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: Tensor) -> Tensor:
    """(K // 8, N) int32 -> (N, K) int32 codes 0..15 (the inverse of ``pack``)."""
    words, n = packed.shape
    # int32 >> is arithmetic: the mask drops the sign bits shifted into nibble 7.
    codes = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, 8, 1)) & 0xF
    return codes.reshape(words * 8, n).t()


def quantize(w: Tensor, group_size: int, symmetric: bool, g_idx: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest: (codes (N, K) int32, scales (G, N) float32, zeros (G, N) uint8 or None).

    Symmetric: ``scale = max|w| / 7`` over the group, codes ``clamp(round(w / scale), -8, 7) +
    8`` (the group's extreme lands on +-7). Zero-point: the group's range widened to hold 0,
    ``[lo, hi] = [min(w, 0), max(w, 0)]``, ``scale = (hi - lo) / 15``, ``zero = round(-lo /
    scale)`` (0..15), codes ``clamp(round(w / scale) + zero, 0, 15)``. Either way every element
    comes back within ``scale / 2`` (up to float32 rounding). A group of zeros gets scale 1.
    ``round`` is half to even (torch.round), all arithmetic float32.
    """
    n, k = w.shape
    groups = 1 if group_size < 0 else k // group_size
    g = group_index(k, group_size, g_idx, w.device, groups)
    wt = w.float().t()  # (K, N)
    index = g.view(k, 1).expand(k, n)
    base = torch.zeros(groups, n, dtype=torch.float32, device=w.device)
    if symmetric:
        absmax = base.scatter_reduce(0, index, wt.abs(), "amax", include_self=True)
        scales = absmax / 7
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.clamp(torch.round(wt / scales[g]), -8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        # include_self with a zero base: lo <= 0 <= hi, so 0 is always representable.
        lo = base.scatter_reduce(0, index, wt, "amin", include_self=True)
        hi = base.scatter_reduce(0, index, wt, "amax", include_self=True)
        scales = (hi - lo) / 15
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zero_f = torch.clamp(torch.round(-lo / scales), 0, 15)
        codes = torch.clamp(torch.round(wt / scales[g]) + zero_f[g], 0, 15)
        zeros = zero_f.to(torch.uint8)
    return codes.t().to(torch.int32), scales, zeros


def dequantize(packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
               g_idx: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(N, K) weight of ``dtype``: float32 ``(q - z) * scale``, rounded once to ``dtype``."""
    q = unpack(packed).t()  # (K, N)
    g = group_index(q.shape[0], group_size, g_idx, packed.device, scales.shape[0])
    s = scales.float()[g]
    z = zeros.float()[g] if zeros is not None else float(SYMMETRIC_ZERO)
    return ((q.float() - z) * s).t().to(dtype)


def forward(call) -> Tensor:
    """(M, N) in x's dtype: x @ w.T with float32 accumulation, w dequantised to x's dtype."""
    w = dequantize(call.packed, call.scales, call.zeros, call.group_size, call.g_idx,
                   call.x.dtype)
    out = call.x.float() @ w.float().t()
    if call.bias is not None:
        out = out + call.bias.float()
    return out.to(call.x.dtype)


def matmul_dequantized(x: Tensor, w: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out = x @ w (+ bias) with ``w`` the dequantised weight, (K, N) in x's dtype, at this
    op's rounding points: float32 sums (the GEMM's accumulator), the bias added to them, one
    rounding to out's dtype. The GPU backends' dequantise-then-GEMM configs end here: torch's
    16-bit GEMM (cuBLAS / hipBLASLt) rounds its float32 accumulator once, after the epilogue's
    bias of x's dtype; a float32 bias needs a float32 result first."""
    if bias is None:
        torch.mm(x, w, out=out)
    elif bias.dtype == x.dtype:
        torch.addmm(bias, x, w, out=out)
    elif x.device.type == "cuda" and torch.version.hip is None:
        out.copy_(torch.addmm(bias, x, w, out_dtype=torch.float32))
    else:  # float32 products of 16-bit values are exact: the same sums, more slowly
        out.copy_(torch.addmm(bias, x.float(), w.float()))


def run(call, config: dict) -> None:
    """Reference backend of ``int4_gemm``: write call.out."""
    call.out.copy_(forward(call))
