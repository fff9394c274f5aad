"""``fp8_gemm`` on XLA: the reference (dequantise both operands in float32, one matmul), which
is static already; XLA holds float8_e4m3fn / float8_e5m2 tensors and converts them exactly.

No Pallas form: torch_xla ships no fp8 matmul kernel (its quantized matmul is int8).
"""

from __future__ import annotations

from kpt.backends.xla import XLA_CONFIG
from kpt.ops.fp8_gemm import reference as _reference

PALLAS_REASON = "torch_xla ships no fp8 Pallas matmul (its quantized matmul is int8)"


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


def run(call, config: dict) -> None:
    call.out.copy_(_reference.forward(call))
