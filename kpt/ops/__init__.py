"""kpt ops: every public op function, dispatched per call to the best backend."""

from kpt.ops.flex_attention import flex_attention
from kpt.ops.rmsnorm_qkv_rope import rmsnorm_qkv_rope

__all__ = ["flex_attention", "rmsnorm_qkv_rope"]
