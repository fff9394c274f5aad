"""Triton backend of ``int4_gemm``: W4A16 GEMM that unpacks and dequantises in registers.

One program owns a ``BLOCK_M x BLOCK_N`` tile of the output and walks its share of K in steps
of ``BLOCK_K``. Per step it loads the x tile, the packed words of the weight tile once
((BLOCK_K / 8, BLOCK_N) int32), shifts the 8 nibbles of each word out into a (BLOCK_K / 8, 8,
BLOCK_N) tile folded to the (BLOCK_K, BLOCK_N) rows they encode, subtracts the
zero point and multiplies by the group's scale in float32, rounds to x's dtype exactly as the
reference does, and accumulates ``tl.dot`` in float32. ``BLOCK_K`` divides the group size, so
without act-order a step lies in one group and loads one scale (and zero) row of ``BLOCK_N``;
with act-order (``g_idx``) every row of the step gathers its own group's scale and zero.

Split-K (``SPLIT_K`` > 1): small M (decode) gives too few output tiles to fill the GPU, so the
K range is cut into ``SPLIT_K`` shares of whole steps; each share writes float32 partial sums
to a workspace, and the sum over shares, the bias and the rounding to x's dtype follow in
torch. The split count comes from shapes and the SM count only (no host sync).

Config keys: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, ``GROUP_M`` (tile swizzle for
L2 reuse), ``num_warps``, ``num_stages``; or ``{"DEQUANT": True}``, the default from
``DEQUANT_MIN_M`` rows: ``_dequant_kernel`` writes the dequantised weight (K, N) in x's dtype to
a temporary (the same unpacking and rounding), then torch's 16-bit GEMM multiplies
(``reference.matmul_dequantized``: float32 sums, the bias, one rounding).

Standing: the earlier version, which gathered each row's word (8 loads of every word), ran on
an H100 (2026-12-06, bench/RESULTS.md): 4.4x the weight-read floor at M = 1 and 3.1x cuBLAS's
bf16 GEMM at M = 4096, far from the targets. This version (each word loaded once, unpacked by a
3-D shift and a reshape) ran on an H200 and an H100 (2026-12-07): 3.4x the floor at M = 1, 3.1x
cuBLAS at M = 4096 (bench/RESULTS.md). The dequantise-then-GEMM default from 256 rows ran on an
H100 (2026-12-07): 1.13x cuBLAS's bf16 GEMM at M = 4096, 2.1x at M = 256. Not tried yet: a
GEMV path without tensor cores for M = 1, and Marlin-style offline reordering for act-order
(sorting K by group so that a step loads one scale row again).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import grouped_tile
from kpt.ops.int4_gemm.reference import matmul_dequantized

MAX_SPLIT_K = 16
# The dequantise-then-GEMM config (one kernel writes the weight (K, N) in x's dtype, then
# torch's 16-bit GEMM): the default from DEQUANT_MIN_M rows, where the fused kernel is bound by
# dequantising every weight tile once per row tile; offered to the tuner from DEQUANT_TUNE_M.
DEQUANT_CONFIG = {"DEQUANT": True}
DEQUANT_MIN_M = 256
DEQUANT_TUNE_M = 64
DEQUANT_BLOCK_K, DEQUANT_BLOCK_N = 64, 128
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the dequantise kernel's columns)


@triton.jit
def _dequantize(q, S, Z, G_IDX, ks, k_ok, offs_n, n_ok, k0, num_groups, stride_sg, stride_sn,
                stride_zg, stride_zn, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                ACT_ORDER: tl.constexpr, DTYPE: tl.constexpr):
    """Codes q (float32, rows ks x columns offs_n) as weights of DTYPE: float32 (q - z) * scale
    of each row's group, rounded once, as the reference. Without act-order the rows from k0
    lie in one group (the K step divides the group size): one scale (and zero) row."""
    if ACT_ORDER:
        # Clamped as the reference does: whatever g_idx holds, no read leaves the scales.
        wk_ok = k_ok[:, None] & n_ok[None, :]
        g = tl.minimum(tl.maximum(tl.load(G_IDX + ks, mask=k_ok, other=0), 0), num_groups - 1)
        s = tl.load(S + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=wk_ok,
                    other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(Z + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=wk_ok,
                        other=0).to(tl.float32)
        else:
            z = 8.0
    else:
        g = k0 // GROUP_SIZE
        s = tl.load(S + g * stride_sg + offs_n * stride_sn, mask=n_ok,
                    other=0.0).to(tl.float32)[None, :]
        if HAS_ZERO:
            z = tl.load(Z + g * stride_zg + offs_n * stride_zn, mask=n_ok,
                        other=0).to(tl.float32)[None, :]
        else:
            z = 8.0
    # (q - z) is an exact small integer: the float32 product is the one rounding before DTYPE.
    return _cast((q - z) * s, DTYPE)


@triton.jit
def _int4_gemm_kernel(
    X, W, S, Z, G_IDX, BIAS, OUT,
    M, N, K, k_per_split, num_groups,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, ACT_ORDER: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    share = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64) * stride_xm
    shift = (tl.arange(0, 8) * 4)[None, :, None]
    k_lo = share * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_hi
        x = tl.load(X + rows[:, None] + ks[None, :].to(tl.int64) * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # Each packed word once: (BLOCK_K / 8, BLOCK_N) words, their 8 nibbles spread to
        # (BLOCK_K / 8, 8, BLOCK_N) and folded to rows k = 8 i + j (K steps start at
        # multiples of 8 and K is one, so a word's rows are all in or all out).
        wrow = k0 // 8 + offs_w
        words = tl.load(W + wrow[:, None].to(tl.int64) * stride_wk
                        + offs_n[None, :] * stride_wn,
                        mask=(wrow < k_hi // 8)[:, None] & n_ok[None, :], other=0)
        # int32 >> is arithmetic; the mask keeps the nibble (nibble 7 carries the sign bits).
        q = tl.reshape((words[:, None, :] >> shift) & 0xF, (BLOCK_K, BLOCK_N))
        q = q.to(tl.float32)
        # Dequantise: (q - z) is an exact small integer, so the float32 product is the one
        # rounding before the cast to x's dtype, as in the reference.
        w = _dequantize(q, S, Z, G_IDX, ks, k_ok, offs_n, n_ok, k0, num_groups, stride_sg,
                        stride_sn, stride_zg, stride_zn, GROUP_SIZE, HAS_ZERO, ACT_ORDER,
                        X.dtype.element_ty)
        acc = _dot(x, w, acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    dst = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    if SPLIT:
        tl.store(dst + share.to(tl.int64) * stride_os, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(dst, _cast(acc, OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(
    W, S, Z, G_IDX, OUT,
    N, K, num_groups,
    stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ok, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, ACT_ORDER: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT (K, N) of the activations' dtype = the dequantised weight, transposed: one
    (BLOCK_K, BLOCK_N) tile per program, unpacked and rounded as in the GEMM kernel."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    wrow = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    k_ok = ks < K
    n_ok = offs_n < N
    words = tl.load(W + wrow[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(wrow < K // 8)[:, None] & n_ok[None, :], other=0)
    shift = (tl.arange(0, 8) * 4)[None, :, None]
    q = tl.reshape((words[:, None, :] >> shift) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
    w = _dequantize(q, S, Z, G_IDX, ks, k_ok, offs_n, n_ok, tl.program_id(0) * BLOCK_K,
                    num_groups, stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, HAS_ZERO,
                    ACT_ORDER, OUT.dtype.element_ty)
    tl.store(OUT + ks[:, None].to(tl.int64) * stride_ok + offs_n[None, :] * stride_on, w,
             mask=k_ok[:, None] & n_ok[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs (CUs on ROCm) of a GPU; 0 for the CPU (the interpreter never splits by itself)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_k(group_size: int, act_order: bool, wanted: int) -> int:
    """The K step: ``wanted`` (a power of two >= 16), lowered to the group size when groups are
    contiguous, so that one step never straddles two groups."""
    if group_size > 0 and not act_order:
        return min(wanted, group_size)
    return wanted


def default_config(m: int, n: int, k: int, group_size: int, act_order: bool,
                   sms: int) -> dict:
    """Tile sizes by M (first estimates, untuned), and the split count for small M: enough
    shares that the grid covers every SM about twice, each share at least 4 steps long."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    cfg["BLOCK_K"] = block_k(group_size, act_order, cfg["BLOCK_K"])
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    if sms > 0 and tiles < sms:
        steps = triton.cdiv(k, cfg["BLOCK_K"])
        split = max(1, min(MAX_SPLIT_K, triton.cdiv(2 * sms, tiles), steps // 4))
    cfg["SPLIT_K"] = split
    cfg["GROUP_M"] = 8
    return cfg


def configs(m: int, n: int, k: int, group_size: int, act_order: bool, sms: int) -> list[dict]:
    """The default first, then variants for the tuner; from DEQUANT_MIN_M rows the
    dequantise-then-GEMM config leads, from DEQUANT_TUNE_M it comes last."""
    first = default_config(m, n, k, group_size, act_order, sms)
    out = [first]
    if m >= DEQUANT_MIN_M:
        out.insert(0, dict(DEQUANT_CONFIG))
    for bm, bn, bk, warps, stages in ((16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                      (128, 128, 128, 8, 3)):
        if bm > 2 * max(m, 16):
            continue
        for split in sorted({1, first["SPLIT_K"]}):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k(group_size, act_order, bk),
                       SPLIT_K=split, GROUP_M=8, num_warps=warps, num_stages=stages)
            if cfg not in out:
                out.append(cfg)
    if DEQUANT_TUNE_M <= m < DEQUANT_MIN_M:
        out.append(dict(DEQUANT_CONFIG))
    return out


def problem_configs(problem) -> list[dict]:
    """``configs`` for a dispatch Problem (the registry's hook): the first is the default."""
    sms = (_sm_count(torch.device("cuda", problem.device_index))
           if problem.device_type == "cuda" else 0)
    return configs(problem["m"], problem["n"], problem["k"], problem["group_size"],
                   problem["act_order"], sms)


def _run_dequant(call, config: dict) -> None:
    """The weight dequantised once into a (K, N) temporary of x's dtype, then torch's 16-bit
    GEMM (``matmul_dequantized``)."""
    if set(config) - {"DEQUANT"}:
        raise ValueError(f"int4_gemm: the triton DEQUANT config takes no other keys, got {config}")
    x, packed, scales, zeros = call.x, call.packed, call.scales, call.zeros
    m, k = x.shape
    n = call.out.shape[1]
    act_order = call.g_idx is not None
    bk = block_k(call.group_size, act_order, DEQUANT_BLOCK_K)
    grid = (triton.cdiv(k, bk), triton.cdiv(n, DEQUANT_BLOCK_N))
    if grid[1] > MAX_GRID_Y:  # CUDA caps a grid's second dimension: the fused kernel instead
        run(call, default_config(m, n, k, call.group_size, act_order, _sm_count(x.device)))
        return
    w = torch.empty((k, n), dtype=x.dtype, device=x.device)
    _dequant_kernel[grid](
        packed, scales, zeros, call.g_idx, w, n, k, scales.shape[0],
        packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
        w.stride(0), w.stride(1),
        GROUP_SIZE=call.group_size if call.group_size > 0 else k, HAS_ZERO=zeros is not None,
        ACT_ORDER=act_order, BLOCK_K=bk, BLOCK_N=DEQUANT_BLOCK_N, num_warps=4)
    matmul_dequantized(x, w, call.bias, call.out)


def run(call, config: dict) -> None:
    """Write call.out (M, N)."""
    x, out = call.x, call.out
    m, k = x.shape
    n = out.shape[1]
    if m == 0 or n == 0:
        return
    if config.get("DEQUANT"):
        _run_dequant(call, config)
        return
    act_order = call.g_idx is not None
    cfg = default_config(m, n, k, call.group_size, act_order, _sm_count(x.device)) | config
    bk = cfg["BLOCK_K"]
    if call.group_size > 0 and not act_order and call.group_size % bk:
        raise ValueError(f"int4_gemm: triton config BLOCK_K={bk} must divide the group size "
                         f"{call.group_size}")
    # Shares of whole K steps; the count actually used may be below the one asked for.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg["SPLIT_K"]), bk) * bk
    split = triton.cdiv(k, k_per_split)
    if split > 1:
        dst = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        dst_strides = dst.stride()
    else:
        dst = out
        dst_strides = (0, *out.stride())
    zeros, g_idx, bias = call.zeros, call.g_idx, call.bias
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _int4_gemm_kernel[grid](
        x, call.packed, call.scales, zeros, g_idx, bias, dst,
        m, n, k, k_per_split, call.scales.shape[0],
        x.stride(0), x.stride(1), call.packed.stride(0), call.packed.stride(1),
        call.scales.stride(0), call.scales.stride(1),
        zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
        *dst_strides,
        GROUP_SIZE=call.group_size if call.group_size > 0 else k, HAS_ZERO=zeros is not None,
        ACT_ORDER=act_order, HAS_BIAS=bias is not None, SPLIT=split > 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        total = dst.sum(0)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
