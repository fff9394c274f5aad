"""The specification of ``rmsnorm_qkv_rope`` in plain PyTorch.

Rounding points follow HuggingFace's eager Llama / Qwen3 modules, so that the fused kernels can
be held to "no further from HF than HF is from exact math":

1. ``h = x + residual`` rounded to the input dtype (the new residual);
2. RMSNorm in float32, the normalised row cast to the input dtype, then multiplied by the weight
   in the input dtype;
3. the QKV projection accumulated in float32 (+ bias in float32), rounded to the input dtype;
4. per-head q/k RMSNorm, same rounding as 2;
5. RoPE with cos/sin computed in float32 and cast to the input dtype, then
   ``x * cos + rotate(x) * sin`` with each product and the sum rounded to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or unchanged when float64: in float64 the reference is exact math,
    the ground truth of the tests and differentiable at full precision (gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm: float32 statistics, cast to the input dtype, then the weight multiply."""
    xf = _wide(x)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of ``positions * inv_freq`` in float32, cast to ``dtype``: shape (T, rd/2)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, neox: bool) -> Tensor:
    """Rotate the first ``rotary_dim`` features of every head of ``x`` (T, H, D).

    neox: pairs (i, i + rd/2) ("rotate_half"); gptj: pairs (2i, 2i+1) ("rotate_every_two").
    """
    half = rotary_dim // 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if neox:
        a, b = rot[..., :half], rot[..., half:]
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out_a = a * c + (-b) * s
    out_b = b * c + a * s
    if neox:
        rotated = torch.cat([out_a, out_b], dim=-1)
    else:
        rotated = torch.stack([out_a, out_b], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def rmsnorm_qkv_rope_reference(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    q_norm_weight: Tensor | None,
    k_norm_weight: Tensor | None,
    positions: Tensor,
    inv_freq: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    eps: float,
    neox: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """x, residual: (T, hidden); returns q (T, Hq, D), k and v (T, Hkv, D), new residual."""
    dtype = x.dtype
    h = x + residual if residual is not None else x
    xn = rms_norm(h, norm_weight, eps)
    acc = _wide(xn) @ _wide(qkv_weight).t()
    if qkv_bias is not None:
        acc = acc + _wide(qkv_bias)
    qkv = acc.to(dtype)
    tokens = x.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].reshape(tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    q = apply_rope(q, cos, sin, rotary_dim, neox)
    k = apply_rope(k, cos, sin, rotary_dim, neox)
    return q, k, v, (h if residual is not None else None)


def run(call, config: dict) -> None:
    """Reference backend: compute and write into the op's outputs."""
    q, k, v, res = rmsnorm_qkv_rope_reference(
        call.x, call.residual, call.norm_weight, call.qkv_weight, call.qkv_bias,
        call.q_norm_weight, call.k_norm_weight, call.positions, call.inv_freq,
        call.num_q_heads, call.num_kv_heads, call.head_dim, call.rotary_dim, call.eps, call.neox,
    )
    call.q.copy_(q)
    call.k.copy_(k)
    call.v.copy_(v)
    if res is not None:
        call.residual_out.copy_(res)


def eager_unfused(call) -> tuple[Tensor, Tensor, Tensor]:
    """The unfused sequence HF's eager modules run for the same work (norm, one GEMM through
    ``F.linear`` in the input dtype, q/k norm, RoPE): the baseline of benchmarks and the demo."""
    h = call.x + call.residual if call.residual is not None else call.x
    qkv = torch.nn.functional.linear(rms_norm(h, call.norm_weight, call.eps), call.qkv_weight,
                                     call.qkv_bias)
    q_size, kv_size = call.num_q_heads * call.head_dim, call.num_kv_heads * call.head_dim
    q = qkv[:, :q_size].view(call.tokens, -1, call.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(call.tokens, -1, call.head_dim)
    v = qkv[:, q_size + kv_size :].view(call.tokens, -1, call.head_dim)
    if call.q_norm_weight is not None:
        q, k = rms_norm(q, call.q_norm_weight, call.eps), rms_norm(k, call.k_norm_weight, call.eps)
    cos, sin = rope_cos_sin(call.positions, call.inv_freq, h.dtype)
    return (apply_rope(q, cos, sin, call.rotary_dim, call.neox),
            apply_rope(k, cos, sin, call.rotary_dim, call.neox), v)
