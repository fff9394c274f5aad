"""Weight quantisation to the formats kpt's GEMMs read: round-to-nearest (``rtn_int4``,
``rtn_fp8``), GPTQ (``gptq_int4``, ``gptq_fp8``, ``Calibrator``, ``quantize_model``;
``gptq.py``) and import of GPTQ and AWQ checkpoints (``from_gptq``, ``from_awq``;
``checkpoints.py``).

Every int4 result is kpt's format (``kpt/ops/int4_gemm/__init__.py``): packed (K // 8, N)
int32, scales (G, N), zeros (G, N) uint8 or None (symmetric: zero point 8), g_idx (K,) int32
or None, for ``int4_gemm`` and ``dequantize_int4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.ops.fp8_gemm import GRANULARITIES, W_BLOCK, quantize_fp8
from kpt.ops.int4_gemm import pack_int4

from .checkpoints import from_awq, from_gptq
from .gptq import (
    Calibrator,
    Int4Weight,
    gptq_fp8,
    gptq_int4,
    hessian_from_inputs,
    quantize_model,
)


def rtn_int4(weight: Tensor, group_size: int = 128, symmetric: bool = False
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest int4 of an nn.Linear weight (N, K): ``pack_int4`` (same arguments,
    result and errors): ``(packed, scales, zeros)``."""
    return pack_int4(weight, group_size, symmetric)


def rtn_fp8(weight: Tensor, granularity: str = "row", dtype: torch.dtype = torch.float8_e4m3fn
            ) -> tuple[Tensor, Tensor]:
    """Round-to-nearest fp8 of an nn.Linear weight (N, K) as ``fp8_gemm`` reads it:
    ``(w8, w_scale)`` from ``quantize_fp8``, with float32 scales per output channel (``"row"``:
    (N, 1)), per 128x128 block (``"block"``: (ceil(N / 128), ceil(K / 128))) or one for the
    tensor (``"tensor"``: 0-dim)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"rtn_fp8: granularity must be one of {GRANULARITIES}, got "
                         f"{granularity!r}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"rtn_fp8: weight must be a 2-D (N, K) tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    block = W_BLOCK if granularity == "block" else None
    return quantize_fp8(weight, granularity, dtype, block=block)


__all__ = ["rtn_int4", "rtn_fp8", "gptq_int4", "gptq_fp8", "hessian_from_inputs", "Calibrator",
           "quantize_model", "Int4Weight", "from_gptq", "from_awq"]
