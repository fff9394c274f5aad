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
def nonfinite_pv(p, ok, v, acc):
    """``acc`` plus IEEE's sum over the visible keys of p * v for v's non-finite entries only:
    NaN from a NaN, from +inf and -inf together, or from an inf times a probability that
    underflowed to 0 (0 * inf); else +-inf where an inf meets a positive p.

    Counts, not products: dots of 0/1 (and 256) indicators in v's 16-bit dtype, exact in their
    float32 sums, so the rare branch needs two 16-bit operand tiles of shared memory (float32
    copies of p and v took four times that and pushed Hopper configs past 227 KB). Each count
    is folded into ``acc`` as soon as it is made, so one float32 count tile is live at a time:
    holding three at once took the flash forward past 255 registers, and ptxas then serialised
    every wgmma of the kernel, the unmasked loop's too (C7512; sm_90a compiles, Triton 3.6 and
    3.9: 6552 SASS instructions and 848 bytes of stack against 2328 and none without the
    branch). A tile must hold fewer than 256 keys, so that the two counts packed in one sum
    stay apart."""
    tl.static_assert(v.shape[0] < 256, "nonfinite_pv: a key tile of 256 or more")
    vf = v.to(tl.float32)
    # Over the keys with a positive p, +inf counts 1 and -inf 256: h = h_pos + 256 h_neg.
    # Booleans go through float32 (the interpreter cannot cast them to bf16 directly).
    code = tl.where(vf == float("inf"), 1.0, tl.where(vf == float("-inf"), 256.0, 0.0))
    h = mm((p > 0).to(tl.float32).to(v.dtype), code.to(v.dtype))
    h_neg = tl.floor(h / 256.0)
    h_pos = h - 256.0 * h_neg
    acc += tl.where((h_pos > 0) & (h_neg > 0), float("nan"),
                    tl.where(h_pos > 0, float("inf"), tl.where(h_neg > 0, float("-inf"), 0.0)))
    # A visible key whose p underflowed to 0 with an inf value: 0 * inf.
    under = (ok & (p == 0)).to(tl.float32).to(v.dtype)
    z = mm(under, (tl.abs(vf) == float("inf")).to(tl.float32).to(v.dtype))
    acc = tl.where(z > 0, float("nan"), acc)
    n_nan = mm(ok.to(tl.float32).to(v.dtype), (vf != vf).to(tl.float32).to(v.dtype))
    return tl.where(n_nan > 0, float("nan"), acc)


@triton.jit
def masked_pv(p, v, ok, acc):
    """``acc + p @ v`` summed over the visible keys only (``ok``: (rows, keys); p is 0
    elsewhere). A plain dot would give 0 * NaN = NaN: a NaN or inf value of a key that a row
    cannot see (a causal or window mask, a page slot past the band) would reach that row.
    Non-finite values leave the dot and come back only where visible, by IEEE's rules; a tile
    without one (the usual case) costs a compare and a reduction more than the dot."""
    vf = v.to(tl.float32)  # (the interpreter compares bf16 as raw bits)
    bad = (vf != vf) | (tl.abs(vf) == float("inf"))
    acc = dot(cast(p, v.dtype), tl.where(bad, tl.zeros_like(v), v), acc)
    if tl.sum(tl.sum(bad.to(tl.int32), 1), 0) > 0:
        acc = nonfinite_pv(p, ok, v, acc)
    return acc


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
