"""Thin ``torch.nn`` modules over kpt ops."""

from kpt.nn.moe import MoE
from kpt.nn.quantized import FP8Linear, Int4Linear, QuantizedExperts
from kpt.nn.rmsnorm_qkv_rope import RMSNormQKVRoPE

__all__ = ["FP8Linear", "Int4Linear", "MoE", "QuantizedExperts", "RMSNormQKVRoPE"]
