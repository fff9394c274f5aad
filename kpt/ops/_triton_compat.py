"""Triton helpers shared by kpt's kernels, with CPU-interpreter stand-ins.

Under ``TRITON_INTERPRET=1`` (how CI runs the kernels) the interpreter multiplies bf16 dot
operands as raw 16-bit integers, truncates fp32 -> bf16 where the GPU rounds to nearest even,
and has no libdevice. The stand-ins below keep the CPU check exact: fp32 dot operands (exact,
the values are already rounded to the input dtype), integer round-to-nearest-even for bf16, and
numpy's (correctly rounded) cos/sin. On a GPU they are the plain operations.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kpt.ops._common import triton_interpreting

if triton_interpreting():

    @triton.jit
    def rnd(x, DTYPE: tl.constexpr):
        """Round fp32 to DTYPE and back to fp32."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def cast(x, DTYPE: tl.constexpr):
        return rnd(x, DTYPE).to(DTYPE)

    @triton.jit
    def dot(a, b, acc):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)

    @triton.jit
    def mm(a, b):
        return tl.dot(a.to(tl.float32), b.to(tl.float32))

    @triton.jit
    def cos_sin(x):
        return tl.cos(x), tl.sin(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def rnd(x, DTYPE: tl.constexpr):
        """Round fp32 to DTYPE and back to fp32."""
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def cast(x, DTYPE: tl.constexpr):
        return x.to(DTYPE)

    @triton.jit
    def dot(a, b, acc):
        return tl.dot(a, b, acc)

    @triton.jit
    def mm(a, b):
        return tl.dot(a, b)

    # libdevice's cosf/sinf reduce large arguments exactly (RoPE angles reach 1e5 radians);
    # the fast hardware approximations would flip roundings to 16 bits.
    @triton.jit
    def cos_sin(x):
        return libdevice.cos(x), libdevice.sin(x)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` of a GEMM, GROUP_M row tiles at a time:
    consecutive programs share each column tile (a weight tile) while it is in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here
