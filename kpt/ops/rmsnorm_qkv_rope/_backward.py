"""Backward of ``rmsnorm_qkv_rope``: one device-agnostic implementation in plain PyTorch.

It is the exact gradient of ``reference.rmsnorm_qkv_rope_reference`` with the reference's
rounding casts taken as identity, whichever backend ran the forward. Elementwise parts run in
float32 (float64 for float64 inputs, so that gradcheck can hold it to exact math); the two GEMMs
(``d_proj @ W`` and ``d_proj^T @ xn``) run in the input dtype through ``torch.mm``, which
accumulates in float32 (cuBLAS, and the CPU kernels for 16-bit types).

What the forward keeps: only tensors that exist anyway. ``h`` is ``x``, or the new residual (an
output) when a residual was added; the rest are the weights, positions and inverse frequencies.
The fused kernels emit neither the per-row inverse RMS nor the pre-norm projection, so both are
recomputed here: the inverse RMS of ``h`` is one pass over (T, hidden), and with q/k norm the
q/k columns of the projection are recomputed by a GEMM over the q/k rows of ``qkv_weight``.
Recovering them from the outputs instead (inverse RoPE, then dividing by ``q_norm_weight``) would
be ill-conditioned wherever a norm weight is near zero.

The backward is built from differentiable PyTorch ops, so eager double backward works (it is
the derivative of this formula; ``torch.compile`` does not support double backward itself).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _normalise(xf: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x * rstd`` and ``rstd`` over the last dim of a float32 ``x``, as ``reference.rms_norm``."""
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return xf * rstd, rstd


def _rms_norm_backward(grad: Tensor, xhat: Tensor, rstd: Tensor,
                       weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``weight * xhat`` (xhat = x * rstd) w.r.t. x and weight, in grad's dtype.

    d xhat_j / d x_i = rstd * (delta_ij - xhat_i * xhat_j / n), hence
    dx = rstd * (g - xhat * mean(g * xhat)) with g = grad * weight.
    """
    g = grad * weight.to(grad.dtype)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    return dx, dweight


def _inverse_rope(grad: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int,
                  neox: bool) -> Tensor:
    """The transpose of ``reference.apply_rope`` on a float32 (T, H, D) gradient.

    RoPE rotates each pair (a, b) by +angle; the transpose of a rotation is the rotation by
    -angle: da = ga * cos + gb * sin, db = gb * cos - ga * sin. Features past rotary_dim pass.
    """
    half = rotary_dim // 2
    rot, rest = grad[..., :rotary_dim], grad[..., rotary_dim:]
    if neox:
        ga, gb = rot[..., :half], rot[..., half:]
    else:
        ga, gb = rot[..., 0::2], rot[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    da = ga * c + gb * s
    db = gb * c - ga * s
    if neox:
        rotated = torch.cat([da, db], dim=-1)
    else:
        rotated = torch.stack([da, db], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def rmsnorm_qkv_rope_backward(
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dh_out: Tensor | None,
    h: Tensor,
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
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients (dh, d_norm_weight, d_qkv_weight, d_qkv_bias, d_q_norm_weight,
    d_k_norm_weight), each in the input dtype, None where ``needs`` (same order) is False.

    dq (T, Hq, D), dk and dv (T, Hkv, D): gradients of the outputs; ``dh_out``: gradient of the
    new residual (None without a residual). ``dh`` is the gradient of ``h = x + residual``,
    hence of both x and residual. ``qkv_bias`` is read only with q/k norm (to recompute the
    pre-norm q/k); its gradient is computed whenever ``needs`` asks for it.
    """
    need_dh, need_dnw, need_dw, need_db, need_dqn, need_dkn = needs
    dtype, tokens = h.dtype, h.shape[0]
    acc = torch.promote_types(dtype, torch.float32)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim

    hhat, rstd = _normalise(h.to(acc), eps)
    xn = (hhat * norm_weight.to(acc)).to(dtype)

    # The angle is formed in float32 whatever the dtype, as the reference (and HF) form it.
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = freqs.cos().to(acc), freqs.sin().to(acc)
    gq = _inverse_rope(dq.to(acc), cos, sin, rotary_dim, neox)
    gk = _inverse_rope(dk.to(acc), cos, sin, rotary_dim, neox)

    d_q_norm_weight = d_k_norm_weight = None
    if q_norm_weight is not None:
        w_qk = qkv_weight[: q_size + kv_size]
        if qkv_bias is None:
            proj = torch.mm(xn, w_qk.t())
        else:
            proj = torch.addmm(qkv_bias[: q_size + kv_size], xn, w_qk.t())
        q_hat, q_rstd = _normalise(proj[:, :q_size].to(acc).view(tokens, num_q_heads, -1), eps)
        k_hat, k_rstd = _normalise(proj[:, q_size:].to(acc).view(tokens, num_kv_heads, -1), eps)
        gq, dqw = _rms_norm_backward(gq, q_hat, q_rstd, q_norm_weight)
        gk, dkw = _rms_norm_backward(gk, k_hat, k_rstd, k_norm_weight)
        d_q_norm_weight = dqw.to(dtype) if need_dqn else None
        d_k_norm_weight = dkw.to(dtype) if need_dkn else None

    d_proj = torch.cat([gq.reshape(tokens, q_size).to(dtype),
                        gk.reshape(tokens, kv_size).to(dtype),
                        dv.reshape(tokens, kv_size)], dim=1)
    d_qkv_bias = None
    if need_db:  # summed from the float32 gradients, before d_proj's rounding
        d_qkv_bias = torch.cat([gq.sum(0).flatten(), gk.sum(0).flatten(),
                                dv.to(acc).sum(0).flatten()]).to(dtype)
    d_qkv_weight = torch.mm(d_proj.t(), xn) if need_dw else None

    dh = d_norm_weight = None
    if need_dh or need_dnw:
        dxn = torch.mm(d_proj, qkv_weight).to(acc)
        dh, d_norm_weight = _rms_norm_backward(dxn, hhat, rstd, norm_weight)
        if dh_out is not None:
            dh = dh + dh_out.to(acc)
        dh = dh.to(dtype) if need_dh else None
        d_norm_weight = d_norm_weight.to(dtype) if need_dnw else None
    return dh, d_norm_weight, d_qkv_weight, d_qkv_bias, d_q_norm_weight, d_k_norm_weight
