"""One Triton kernel for the merge of two attention states (``merge_attention_states`` and
cascade_attention's merge of its levels, on GPUs).

The torch form of the same math (``_merge`` in ``__init__``, the specification) is about twenty
elementwise launches over small tensors: on the cascade benchmark (64 decode requests, 32
heads, head dim 128; H100, CUDA-graph replay) they took ~50 µs per call, against ~185 µs for the
two levels' attention kernels. Here one program merges ``BLOCK_H`` heads of one token: it
reads both states once (any float dtype, any strides with a unit last one for o; lse of any
strides, e.g. varlen's (H, T) transposed) and writes o in the requested dtype and lse.

A merge whose shapes, strides and dtypes were launched before reuses the launcher bound then
(``kpt.ops._triton_launch``), skipping ``JITFunction.run``'s per-call specialisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._triton_launch import Launchers


@triton.jit
def _merge_kernel(
    o_a, o_b, o_out, l_a, l_b, l_out,
    heads, head_dim,
    s_a_t, s_a_h, s_b_t, s_b_h, s_o_t, s_o_h,
    s_la_t, s_la_h, s_lb_t, s_lb_h, s_lo_t, s_lo_h,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < heads
    a = tl.load(l_a + t * s_la_t + h * s_la_h, mask=h_ok, other=float("-inf"))
    b = tl.load(l_b + t * s_lb_t + h * s_lb_h, mask=h_ok, other=float("-inf"))
    # log(e^a + e^b) = max + log(1 + e^-|a - b|); an infinite max is the result (both -inf:
    # -inf, a +inf part: +inf; the gap may be NaN there), a NaN part makes it NaN.
    high = tl.maximum(a, b)
    edge = (high == float("-inf")) | (high == float("inf"))
    lse = tl.where(edge, high, high + tl.log(1.0 + tl.exp(-tl.abs(a - b))))
    lse = tl.where((a != a) | (b != b), float("nan"), lse)
    # Weights exp(lse_part - lse), 0 where lse is not finite (no NaN from -inf - -inf).
    finite = tl.abs(lse) < float("inf")
    shift = tl.where(finite, lse, 0.0)
    w_a = tl.where(finite, tl.exp(a - shift), 0.0)
    w_b = tl.where(finite, tl.exp(b - shift), 0.0)
    tl.store(l_out + t * s_lo_t + h * s_lo_h, lse, mask=h_ok)
    mask = h_ok[:, None] & (d[None, :] < head_dim)
    x = tl.load(o_a + t * s_a_t + h[:, None] * s_a_h + d[None, :], mask=mask, other=0.0)
    y = tl.load(o_b + t * s_b_t + h[:, None] * s_b_h + d[None, :], mask=mask, other=0.0)
    o = w_a[:, None] * x.to(tl.float32) + w_b[:, None] * y.to(tl.float32)
    # lse +inf or NaN: o NaN, as in the torch form.
    o = tl.where((finite | (lse == float("-inf")))[:, None], o, float("nan"))
    tl.store(o_out + t * s_o_t + h[:, None] * s_o_h + d[None, :],
             o.to(o_out.dtype.element_ty), mask=mask)


# Launchers bound per (shapes, strides, dtypes, device) of a merge (kpt.ops._triton_launch).
_LAUNCHERS = Launchers(_merge_kernel)


def merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of the two states, o in ``out_dtype`` (contiguous, o_a's shape), lse float32
    (contiguous, o's shape without the last dim). Shapes and dtypes were checked by the caller:
    o_a and o_b (..., H, D) alike, lse_a and lse_b (..., H) float32."""
    heads, head_dim = o_a.shape[-2], o_a.shape[-1]
    x = o_a.reshape(-1, heads, head_dim)
    y = o_b.reshape(-1, heads, head_dim)
    la, lb = lse_a.reshape(-1, heads), lse_b.reshape(-1, heads)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    tokens = x.shape[0]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    lse = torch.empty(tokens, heads, dtype=torch.float32, device=x.device)
    if tokens and heads and head_dim:
        block_d = triton.next_power_of_2(head_dim)
        block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
        grid = (tokens, triton.cdiv(heads, block_h))
        key = (x.shape, x.stride(), y.stride(), la.stride(), lb.stride(), x.dtype, y.dtype,
               out_dtype, x.device)
        _LAUNCHERS.launch(key, (x, y, out, la, lb, lse), grid, lambda: (
            (x, y, out, la, lb, lse, heads, head_dim, x.stride(0), x.stride(1), y.stride(0),
             y.stride(1), out.stride(0), out.stride(1), la.stride(0), la.stride(1),
             lb.stride(0), lb.stride(1), lse.stride(0), lse.stride(1)),
            dict(BLOCK_H=block_h, BLOCK_D=block_d)))
    return out.view(o_a.shape), lse.view(o_a.shape[:-1])
