"""Triton kernel of ``fp8_gemm``: y = (a8 * a_scale) @ (w8 * w_scale).T (+ bias).

One program computes a (BLOCK_M, BLOCK_N) tile of y, walking K in BLOCK_K steps; programs are
ordered in groups of GROUP_M tile rows so that neighbours share the weight tiles in L2. The fp8
tiles go to ``tl.dot`` as they are (native fp8 tensor-core MMA on sm_89 / sm_90), accumulating
float32. Where the scales go:

* per-tensor and per-row / per-channel scales are constant along K: the whole K sum runs in one
  float32 accumulator and the scales multiply it once in the epilogue;
* a blockwise scale (1x128 for a, 128x128 for w) changes every 128 K: each K tile's product is
  a fresh ``tl.dot``, multiplied by its block's scales and added to the accumulator. BLOCK_K
  divides 128, so a K tile never straddles two scale blocks. Doing so also bounds how far the
  Hopper tensor cores' reduced-precision fp8 accumulation runs before its partial sum is promoted
  into the float32 accumulator (DeepGEMM promotes every 128 K for the same reason).

Operands are read through their strides (transposed views run without a copy); loads are masked
to M, N and K, so nothing outside a tensor is read. The output is rounded once, to ``out``'s
dtype, after the bias.

Standing: checked against the reference under the interpreter, and run on an H100 by
``bench/bench_fp8_gemm.py`` (each row there checked against the reference at K = 8192 first;
2026-12-06, bench/RESULTS.md): 0.84-0.88x cuBLASLt's ``_scaled_mm`` per tensor / per row at
M=N=K=8192, 0.50x with 1x128 / 128x128 block scales, 1.10-1.18x the weight-read floor for
M = 16. The kernel test file has not yet had a complete GPU run (its kernel tests used CPU
tensors until they moved to the GPU where there is one). Not done: split-K for decode shapes
(M=16 gives N / BLOCK_N programs, 128 at N = 8192 with 64-column tiles), a persistent / TMA
(warp-specialised) variant, a fused activation-quantisation prologue.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import grouped_tile

# Granularity codes, as the kernel's constexprs A_GRAN / W_GRAN take them.
CODES = {"tensor": 0, "row": 1, "block": 2}
SCALE_K = 128  # K extent of one blockwise scale (both a's 1x128 and w's 128x128)


@triton.jit
def _fp8_gemm_kernel(
    A, W, A_SCALE, W_SCALE, BIAS, OUT, M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_sam, stride_sak, stride_swn,
    stride_swk, stride_bias, stride_om, stride_on,
    A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    # The w tile is read as (BLOCK_K, BLOCK_N): w.T's, the dot's right operand. The blockwise
    # scales' 128 (K, and N for w) is the op's fixed A_BLOCK / W_BLOCK.
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # Main loop over K: the fp8 product, scaled per K tile where a scale is blockwise.
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A_GRAN == 2 or W_GRAN == 2:
            part = tl.dot(a, w)
            kb = k0 // 128
            if A_GRAN == 2:
                sa = tl.load(A_SCALE + offs_m * stride_sam + kb * stride_sak, mask=m_ok,
                             other=0.0)
                part = part * sa[:, None]
            if W_GRAN == 2:
                sw = tl.load(W_SCALE + (offs_n // 128) * stride_swn + kb * stride_swk,
                             mask=n_ok, other=0.0)
                part = part * sw[None, :]
            acc += part
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the scales constant along K, the bias, one rounding to the output dtype.
    if A_GRAN == 0:
        acc = acc * tl.load(A_SCALE)
    elif A_GRAN == 1:
        acc = acc * tl.load(A_SCALE + offs_m * stride_sam, mask=m_ok, other=0.0)[:, None]
    if W_GRAN == 0:
        acc = acc * tl.load(W_SCALE)
    elif W_GRAN == 1:
        acc = acc * tl.load(W_SCALE + offs_n * stride_swn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n * stride_bias, mask=n_ok, other=0.0).to(
            tl.float32)[None, :]
    tl.store(OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
             _cast(acc, OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def configs(problem) -> list[dict]:
    """Tile configs, the untuned default first: 16-row tiles for decode-sized M (the weight
    read dominates: narrow N tiles give more programs), 64 and 128 rows above."""
    m = problem["m"]
    if m <= 16:
        default = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4,
                       num_stages=4)
    elif m <= 64:
        default = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4,
                       num_stages=4)
    else:
        default = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8,
                       num_stages=3)
    others = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=s)
              for bm, bn, w, s in ((128, 256, 8, 3), (64, 256, 4, 4), (128, 64, 4, 4),
                                   (16, 128, 4, 5), (32, 64, 4, 5))]
    return [default] + [c for c in others if c != default]


MIN_BLOCK_K = 32  # tl.dot's smallest K for fp8 operands on NVIDIA GPUs (16 for 16-bit ones)


def _fit(config: dict, m: int, n: int, k: int) -> tuple[int, int, int]:
    """The config's tile, shrunk to the problem (powers of two, at least 16 rows and columns
    and MIN_BLOCK_K deep: tl.dot's minimums for fp8) so that tiny problems, as under the
    interpreter, do not compute mostly padding."""
    if config.get("BLOCK_K", 128) < MIN_BLOCK_K:
        raise ValueError(f"fp8_gemm: BLOCK_K={config['BLOCK_K']} is below {MIN_BLOCK_K}, "
                         f"the smallest K of a Triton fp8 dot")
    bm = min(config.get("BLOCK_M", 128), max(16, triton.next_power_of_2(m)))
    bn = min(config.get("BLOCK_N", 128), max(16, triton.next_power_of_2(n)))
    bk = min(config.get("BLOCK_K", 128), max(MIN_BLOCK_K, triton.next_power_of_2(k)))
    return bm, bn, bk


def run(call, config: dict) -> None:
    """Write call.out."""
    a8, w8, out = call.a8, call.w8, call.out
    m, k = a8.shape
    n = w8.shape[0]
    if m == 0:
        return
    block_m, block_n, block_k = _fit(config, m, n, k)
    blocked = "block" in (call.a_granularity, call.w_granularity)
    if blocked and SCALE_K % block_k:
        raise ValueError(f"fp8_gemm: BLOCK_K={block_k} must divide {SCALE_K} (a K tile inside "
                         f"one scale block)")
    sa, sw = call.a_scale, call.w_scale
    bias = call.bias
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        a8, w8, sa, sw, bias if bias is not None else out, out, m, n, k,
        a8.stride(0), a8.stride(1), w8.stride(0), w8.stride(1),
        sa.stride(0), sa.stride(1), sw.stride(0), sw.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        A_GRAN=CODES[call.a_granularity], W_GRAN=CODES[call.w_granularity],
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=config.get("GROUP_M", 8),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
