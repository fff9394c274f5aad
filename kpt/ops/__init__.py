"""kpt ops: every public op function, dispatched per call to the best backend."""

from kpt.ops.cascade_attention import (
    cascade_attention,
    merge_attention_states,
    merge_attention_states_,
)
from kpt.ops.flash_attention import flash_attention
from kpt.ops.flex_attention import flex_attention
from kpt.ops.fp8_gemm import fp8_gemm, quantize_fp8
from kpt.ops.int4_gemm import dequantize_int4, int4_gemm, pack_int4
from kpt.ops.moe import fused_moe, moe_route
from kpt.ops.paged_attention import append_paged_kv, paged_attention
from kpt.ops.rmsnorm_qkv_rope import rmsnorm_qkv_rope

__all__ = ["flash_attention", "flex_attention", "paged_attention", "append_paged_kv",
           "cascade_attention", "merge_attention_states",
           "merge_attention_states_", "rmsnorm_qkv_rope",
           "int4_gemm", "pack_int4", "dequantize_int4",
           "fp8_gemm", "quantize_fp8", "moe_route", "fused_moe"]
