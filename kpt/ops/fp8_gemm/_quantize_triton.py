"""Triton kernel of ``quantize_fp8`` for activations: per-row scales, or 1 x ``cols`` blocks.

``quantize_fp8``'s reference is a chain of torch ops (abs, amax, two selects, a clamp, a
division, a clamp, the cast): about ten launches per call, each a few microseconds, which in a
decode step of an FP8 model (one call per projection per layer) cost more than the fp8 GEMMs
save. Here one launch does the same arithmetic: one program per (row, group of ``GROUP``
columns) reads its values once for the amax and once for the cast (the second read comes from
L1/L2), in float32, with the reference's rounding points:

    scale = max(amax / fp8_max, 2^-126) (1 for an all-zero group, NaN where a value is NaN or
    +-inf);  x8 = cast(clamp(x / scale, -fp8_max, fp8_max))

IEEE division (``div_rn``), NaN kept through the clamp, the cast rounding to nearest even, so
the codes and scales equal the reference's bit for bit. Used by ``quantize_fp8`` for
granularity "row" and "block" with one-row blocks on NVIDIA sm_89+ (fp8 conversions in
hardware) outside torch.compile tracing; everything else runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._common import triton_interpreting

from .reference import MIN_SCALE

BLOCK = 1024  # columns per step (a row of up to BLOCK columns is one read)


if triton_interpreting():

    @triton.jit
    def _div(x, y):
        return x / y  # numpy's float32 division: IEEE

else:

    @triton.jit
    def _div(x, y):
        return tl.math.div_rn(x, y)  # `/` would be the approximate div.full.f32


@triton.jit
def _quantize_kernel(X, X8, SCALE, K, stride_xm, stride_xk, stride_qm, stride_sm,
                     FMAX: tl.constexpr, MIN: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    k0 = group * GROUP
    amax = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int1)
    for start in range(0, GROUP, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ks = k0 + cols
        ok = (cols < GROUP) & (ks < K)
        x = tl.load(X + row * stride_xm + ks * stride_xk, mask=ok, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        bad = bad | (ax != ax) | (ax == float("inf"))
        amax = tl.maximum(amax, ax)
    top = tl.max(amax, axis=0)
    scale = tl.where(top > 0, tl.maximum(_div(top, FMAX), MIN), 1.0)
    scale = tl.where(tl.max(bad.to(tl.int32), axis=0) > 0, float("nan"), scale)
    tl.store(SCALE + row * stride_sm + group, scale)
    for start in range(0, GROUP, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ks = k0 + cols
        ok = (cols < GROUP) & (ks < K)
        x = tl.load(X + row * stride_xm + ks * stride_xk, mask=ok, other=0.0).to(tl.float32)
        q = tl.clamp(_div(x, scale), -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(X8 + row * stride_qm + ks, q.to(X8.dtype.element_ty), mask=ok)


def quantize(x: torch.Tensor, dtype: torch.dtype, group: int | None) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(x8, scale) of a 2-D (M, K) x: per row (``group`` None: scale (M, 1)) or per 1 x
    ``group`` block (scale (M, ceil(K / group))); x8 contiguous."""
    m, k = x.shape
    cols = k if group is None else group
    groups = triton.cdiv(k, cols)
    # The interpreter's float32 -> fp8 conversion does not round to nearest (a carry out of the
    # mantissa is lost): there the kernel stores the clamped float32 quotient and torch casts.
    interpreting = triton_interpreting()
    x8 = torch.empty((m, k), dtype=torch.float32 if interpreting else dtype, device=x.device)
    scale = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return x8.to(dtype), scale
    block = min(BLOCK, triton.next_power_of_2(cols))
    _quantize_kernel[(m, groups)](
        x, x8, scale, k, x.stride(0), x.stride(1), x8.stride(0), scale.stride(0),
        FMAX=float(torch.finfo(dtype).max), MIN=MIN_SCALE, GROUP=cols, BLOCK=block, num_warps=4)
    return (x8.to(dtype) if interpreting else x8), scale
