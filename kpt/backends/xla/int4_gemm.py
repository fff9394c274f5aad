"""``int4_gemm`` on XLA: the reference's dequantise-then-matmul, with the nibbles unpacked by
``torch.bitwise_right_shift`` (torch_xla 2.9's ``>>`` operator gives wrong values; see
:mod:`kpt.backends.xla`).

No Pallas form: torch_xla's quantized-matmul kernel (``quantized_matmul_int8``) takes int8
weights, one scale per output channel or block and its own zero-point algebra, not 4-bit codes
packed 8 per int32 with kpt's rounding points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.backends.xla import XLA_CONFIG
from kpt.ops.int4_gemm import reference as _reference

PALLAS_REASON = ("torch_xla's Pallas quantized matmul takes int8 weights (quantized_matmul_int8)"
                 ", not packed int4")


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


def unpack(packed: Tensor) -> Tensor:
    """(K // 8, N) int32 -> (N, K) int32 codes 0..15, as ``reference.unpack``."""
    words, n = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device).view(1, 8, 1)
    codes = torch.bitwise_right_shift(packed.unsqueeze(1), shifts) & 0xF
    return codes.reshape(words * 8, n).t()


def forward(call) -> Tensor:
    q = unpack(call.packed).t()  # (K, N)
    g = _reference.group_index(q.shape[0], call.group_size, call.g_idx, q.device,
                               call.scales.shape[0])
    s = call.scales.float()[g]
    z = call.zeros.float()[g] if call.zeros is not None else float(_reference.SYMMETRIC_ZERO)
    w = ((q.float() - z) * s).to(call.x.dtype)  # (K, N): rounded once, as the reference
    out = call.x.float() @ w.float()
    if call.bias is not None:
        out = out + call.bias.float()
    return out.to(call.x.dtype)


def run(call, config: dict) -> None:
    call.out.copy_(forward(call))
