"""``rmsnorm_qkv_rope`` through IPEX's fused ops: ``rmsnorm`` (also the per-head q/k norm of
Qwen3), the QKV projection as one ``F.linear`` in the input dtype (oneDNN accumulates in float32
and rounds once, with the bias), and ``ipex.llm.functional.rotary_embedding`` (in place on q and
k, cos/sin in float32). The residual sum is one torch add, rounded as the reference rounds it.

Rounding differs from the reference (which rounds the normalised row before the weight multiply,
and each RoPE product): IPEX keeps those in float32, so results are a little closer to exact
math and within 2 units of the reference's (tests/xpu).

Limits: full rotary only (IPEX's RoPE takes cos/sin of head_dim or head_dim / 2 values).

Measured 2026-12-06 on this project's 2-core CPU machine, shared with other jobs, so over
several runs (IPEX 2.8.0, torch 2.8.0, residual, hidden 4096, 32 / 8 heads of 128;
``tests/xpu/timings.py``): bf16 at 64 tokens 1.9-8.7x the reference's speed, at 1 token 3-13x
(the reference widens the whole weight to float32 on every call); fp16 0.99-1.5x and float32
0.83-1.7x, not a consistent win, so those keep the reference on the CPU (:func:`supports`).
"""

from __future__ import annotations

import torch

from kpt.backends.xpu import ipex_ops


def supports(p) -> list[str]:
    reasons = []
    if p["rotary_dim"] != p["head_dim"]:
        reasons.append("partial rotary: IPEX's RoPE rotates the whole head")
    if p.device_type == "cpu" and p.dtype != torch.bfloat16:
        reasons.append(f"{str(p.dtype).removeprefix('torch.')}: not measurably faster than the "
                       f"reference on the CPU (tests/xpu/timings.py)")
    return reasons


def _rope(q, k, cos, sin, neox: bool) -> None:
    from intel_extension_for_pytorch.llm.functional import rotary_embedding

    rotary_embedding(q, k, sin, cos, q.shape[-1], neox)


def run(call, config: dict) -> None:
    ops = ipex_ops()
    dtype = call.x.dtype
    h = call.x + call.residual if call.residual is not None else call.x
    xn = ops.rmsnorm(h, call.norm_weight, call.eps)
    qkv = torch.nn.functional.linear(xn, call.qkv_weight, call.qkv_bias)
    tokens, d = call.tokens, call.head_dim
    q_size, kv_size = call.num_q_heads * d, call.num_kv_heads * d
    q = qkv[:, :q_size].reshape(tokens, call.num_q_heads, d)
    k = qkv[:, q_size : q_size + kv_size].reshape(tokens, call.num_kv_heads, d)
    v = qkv[:, q_size + kv_size :].reshape(tokens, call.num_kv_heads, d)
    if call.q_norm_weight is not None:
        q = ops.rmsnorm(q.contiguous(), call.q_norm_weight, call.eps)
    if call.k_norm_weight is not None:
        k = ops.rmsnorm(k.contiguous(), call.k_norm_weight, call.eps)
    q, k = q.contiguous(), k.contiguous()
    freqs = call.positions.reshape(-1).float()[:, None] * call.inv_freq.float()[None, :]
    _rope(q, k, freqs.cos(), freqs.sin(), call.neox)
    call.q.copy_(q.to(dtype))
    call.k.copy_(k.to(dtype))
    call.v.copy_(v)
    if call.residual_out is not None:
        call.residual_out.copy_(h)
