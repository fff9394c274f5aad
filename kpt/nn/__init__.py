"""Thin ``torch.nn`` modules over kpt ops."""

from kpt.nn.rmsnorm_qkv_rope import RMSNormQKVRoPE

__all__ = ["RMSNormQKVRoPE"]
