"""``rmsnorm_qkv_rope`` on XLA: the reference, which is static already (one GEMM and
elementwise work that XLA fuses; no loop, no host read). Its backward (``_backward.py``) is the
op's own PyTorch one, whichever backend ran the forward.

No Pallas form: torch_xla ships no kernel for RMSNorm, QKV projection or RoPE.
"""

from __future__ import annotations

from kpt.backends.xla import XLA_CONFIG
from kpt.ops.rmsnorm_qkv_rope import reference as _reference

PALLAS_REASON = "torch_xla ships no Pallas kernel for RMSNorm / QKV projection / RoPE"


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


run = _reference.run
