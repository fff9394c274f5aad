"""kpt ops: every public op function, dispatched per call to the best backend."""

from kpt.ops.rmsnorm_qkv_rope import rmsnorm_qkv_rope

__all__ = ["rmsnorm_qkv_rope"]
