"""The specification of ``quantize_fp8`` and ``fp8_gemm`` in plain PyTorch.

A quantised tensor is a pair ``(x8, scale)`` with ``x ~= x8.float() * scale``, the float32
scale broadcast over its block: one for the tensor, one per row (``(..., 1)``), or one per
``block`` = (rows, cols) tile of a 2-D tensor (``(ceil(M / rows), ceil(K / cols))``, the edge
tiles partial). ``fp8_gemm`` is ``dequantize(a) @ dequantize(w).T (+ bias)`` in float32, one
rounding to the output dtype at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The smallest normal float32: the floor of every scale, so that 1 / scale is finite and a
# block of (sub)normal-tiny values still quantises to at most the fp8 maximum.
MIN_SCALE = 2.0**-126


def expand_scale(scale: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """A block scale (ceil(M / rows), ceil(K / cols)) repeated over its (M, K) elements."""
    rows, cols = block
    return scale.repeat_interleave(rows, 0)[: shape[0]].repeat_interleave(cols, 1)[:, : shape[1]]


def dequantize(x8: Tensor, scale: Tensor, block: tuple[int, int] | None) -> Tensor:
    """``x8.float() * scale`` in float32; ``block``: the tile of a block scale, else None (a
    per-tensor or per-row scale broadcasts as it is)."""
    if block is not None:
        scale = expand_scale(scale, tuple(x8.shape), block)
    return x8.float() * scale.float()


def _amax(x: Tensor, granularity: str, block: tuple[int, int] | None) -> Tensor:
    """|x|'s maximum per scale, float32, NaN where a NaN is among the values."""
    a = x.float().abs()
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.amax(dim=-1, keepdim=True)
    rows, cols = block
    m, k = a.shape
    mb, kb = -(-m // rows), -(-k // cols)
    # Zeros pad the edge tiles: they never raise a maximum of absolute values.
    padded = torch.nn.functional.pad(a, (0, kb * cols - k, 0, mb * rows - m))
    return padded.reshape(mb, rows, kb, cols).amax(dim=(1, 3))


def quantize(x: Tensor, granularity: str, dtype: torch.dtype,
             block: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """(x8, scale): scale = max(amax / fp8 max, MIN_SCALE) per block, 1 where the block is all
    zeros; x8 = x / scale clamped to +-fp8 max (saturating), then cast. A block holding a NaN
    or +-inf gets a NaN scale and all-NaN values: non-finite input propagates, never raises."""
    fmax = torch.finfo(dtype).max
    amax = _amax(x, granularity, block)
    # IEEE division on every device: a Python-number divisor would take torch's CUDA path for
    # CPU scalars, amax * (1 / fmax), one unit of the last place off for some amax (an H100
    # run caught it against the fused kernel's div_rn, while the CPU agreed bit for bit).
    scale = torch.where(amax > 0, amax / amax.new_tensor(fmax), 1.0).clamp_min(MIN_SCALE)
    scale = torch.where(torch.isfinite(amax), scale, float("nan"))
    full = scale if block is None else expand_scale(scale, tuple(x.shape), block)
    x8 = (x.float() / full).clamp(-fmax, fmax).to(dtype)
    return x8, scale


def forward(call) -> Tensor:
    """(M, N) float32 before the output rounding: dequantised a @ dequantised w.T + bias."""
    from . import A_BLOCK, W_BLOCK

    a = dequantize(call.a8, call.a_scale, A_BLOCK if call.a_granularity == "block" else None)
    w = dequantize(call.w8, call.w_scale, W_BLOCK if call.w_granularity == "block" else None)
    y = a @ w.T
    if call.bias is not None:
        y = y + call.bias.float()
    return y


def run(call, config: dict) -> None:
    """Reference backend of ``fp8_gemm``: write call.out."""
    call.out.copy_(forward(call))
