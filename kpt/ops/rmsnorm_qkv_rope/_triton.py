"""Triton backend of ``rmsnorm_qkv_rope``: norm, QKV GEMM, q/k norm and RoPE in one or two kernels.

Kernels (``TRITON_NOTES.md`` has the measurements behind the choices):

* ``_row_kernel`` (one program per token): ``h = rnd(x + residual)`` written as the new residual,
  and its fp32 inverse RMS; with ``stats="prenorm"`` also the normalised row
  ``rnd(rnd(h * rstd) * w)`` into a workspace.
* ``_qkv_kernel``: the GEMM ``xn @ W.T``. Its A-operand prologue applies the norm to the A tile
  in registers (exactly the reference's rounding points), unless the A operand was prenormalised;
  with ``stats="fused"`` it also computes ``h`` and the inverse RMS itself in a first pass over
  the row (decode: the row is a few KB in L2, and this saves the row kernel's launch). Its
  epilogue adds the bias, rounds, applies q/k RMSNorm and RoPE, and writes q, k, v in their
  (T, H, D) layout.
* ``_splitk_epilogue_kernel``: with ``SPLIT_K > 1`` the GEMM writes fp32 partial sums and this
  kernel reduces them and runs the same epilogue. That is how a decode step with q/k norm (whose
  programs must own whole heads) still fills the GPU.

Layout trick: a program does not own a contiguous range of output columns. It owns a set of RoPE
*pairs* and keeps them in two accumulators, ``acc_a`` (neox: column i; gptj: column 2i) and
``acc_b`` (neox: column i + rd/2; gptj: column 2i + 1), whose W rows are gathered with strided
row pointers. The rotation is then elementwise between the two accumulators. Features past
``rotary_dim`` live in a third accumulator ``acc_p``. The pair space of a head is padded to a
power of two (``HALF_P``); a program covers ``BLOCK_P`` pairs, i.e. ``BLOCK_P // HALF_P`` whole
heads, or ``1 / NSPLIT`` of one head when ``BLOCK_P < HALF_P`` (only without q/k norm, which
needs the whole head). V heads go through the same layout with the rotation switched off, so
every program runs the same code.

fp32 inputs use tf32 tensor-core dots (Triton's default for fp32 ``tl.dot``); fp16 and bf16
accumulate in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import cos_sin as _cos_sin
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import rnd as _rnd

# ---- helpers --------------------------------------------------------------------------------

@triton.jit
def _inv_rms(sum_sq, n, eps):
    return 1.0 / tl.sqrt_rn(sum_sq / n + eps)


# ---- kernel 1: residual add, statistics (and optionally the normalised row) ---------------------


@triton.jit
def _row_kernel(
    x_ptr, res_ptr, h_ptr, nw_ptr, xn_ptr, rstd_ptr,
    stride_x, stride_r, stride_h, eps,
    K: tl.constexpr, HAS_RES: tl.constexpr, WRITE_XN: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)
    # Phase 1: h = rnd(x + residual), stored as the new residual; fp32 sum of squares.
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_H):
        cols = k0 + offs
        ok = cols < K
        h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            h = _rnd(h, dtype)
            tl.store(h_ptr + row * stride_h + cols, h.to(dtype), mask=ok)
        acc += h * h
    rstd = _inv_rms(tl.sum(acc, 0), K, eps)
    tl.store(rstd_ptr + row, rstd)
    # Phase 2 (prenorm only): xn = rnd(rnd(h * rstd) * w), recomputing h from the (cached) inputs
    # rather than reading back the residual another thread may have written.
    if WRITE_XN:
        for k0 in range(0, K, BLOCK_H):
            cols = k0 + offs
            ok = cols < K
            h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
                h = _rnd(h, dtype)
            w = tl.load(nw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            xn = _rnd(h * rstd, dtype) * w
            tl.store(xn_ptr + row * K + cols, _cast(xn, dtype), mask=ok)


# ---- kernel 2: GEMM with norm prologue and bias / q-k norm / RoPE epilogue ----------------------


@triton.jit
def _columns(
    pid_n, H: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, NEOX: tl.constexpr,
    HALF_P: tl.constexpr, BLOCK_P: tl.constexpr, NSPLIT: tl.constexpr, HPP: tl.constexpr,
    PASS_PAD: tl.constexpr, PASS_SPAN: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Output columns (= W rows) of this program's pairs (a, b) and pass-through features."""
    HALF: tl.constexpr = RD // 2
    group = pid_n // NSPLIT
    part = pid_n % NSPLIT
    i = tl.arange(0, BLOCK_P)
    head_a = group * HPP + i // HALF_P
    pair = part * BLOCK_P + i % HALF_P
    ok_a = (pair < HALF) & (head_a < H)
    if NEOX:
        col_a = head_a * D + pair
        col_b = col_a + HALF
    else:
        col_a = head_a * D + 2 * pair
        col_b = col_a + 1
    j = tl.arange(0, BLOCK_PASS)
    head_p = group * HPP + j // PASS_PAD
    feat = RD + part * PASS_SPAN + j % PASS_PAD
    ok_p = (j % PASS_PAD < PASS_SPAN) & (feat < D) & (head_p < H)
    col_p = head_p * D + feat
    return head_a, pair, ok_a, col_a, col_b, head_p, ok_p, col_p


@triton.jit
def _per_head(v, BM: tl.constexpr, HPP: tl.constexpr, WIDTH: tl.constexpr):
    """Sum of each head's lanes of ``v`` (BM, HPP * WIDTH) -> (BM, HPP)."""
    return tl.sum(tl.reshape(v, (BM, HPP, WIDTH)), 2)


@triton.jit
def _spread(s, BM: tl.constexpr, HPP: tl.constexpr, WIDTH: tl.constexpr):
    """Broadcast per-head values (BM, HPP) back over each head's lanes: (BM, HPP * WIDTH)."""
    return tl.reshape(tl.broadcast_to(s[:, :, None], (BM, HPP, WIDTH)), (BM, HPP * WIDTH))


@triton.jit
def _epilogue(
    acc_a, acc_b, acc_p, rows, row_ok, pid_n,
    bias_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr,
    stride_q, stride_k, stride_v, eps,
    DTYPE: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    RD: tl.constexpr, NEOX: tl.constexpr, HALF_P: tl.constexpr, BLOCK_P: tl.constexpr,
    NSPLIT: tl.constexpr, HPP: tl.constexpr, PASS_PAD: tl.constexpr, PASS_SPAN: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr, BM: tl.constexpr,
):
    H: tl.constexpr = HQ + 2 * HKV
    head_a, pair, ok_a, col_a, col_b, head_p, ok_p, col_p = _columns(
        pid_n, H, D, RD, NEOX, HALF_P, BLOCK_P, NSPLIT, HPP, PASS_PAD, PASS_SPAN, BLOCK_PASS)
    # Bias in fp32, then the projection's rounding to the input dtype.
    if HAS_BIAS:
        acc_a += tl.load(bias_ptr + col_a, mask=ok_a, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(bias_ptr + col_b, mask=ok_a, other=0.0).to(tl.float32)[None, :]
        if HAS_PASS:
            acc_p += tl.load(bias_ptr + col_p, mask=ok_p, other=0.0).to(tl.float32)[None, :]
    ya = _rnd(acc_a, DTYPE)
    yb = _rnd(acc_b, DTYPE)
    yp = _rnd(acc_p, DTYPE)
    # Per-head q/k RMSNorm (program owns whole heads): masked lanes hold junk from clamped
    # W rows, so they are zeroed out of the sums.
    if QK_NORM:
        sq = tl.where(ok_a[None, :], ya * ya + yb * yb, 0.0)
        if HAS_PASS:
            sqp = tl.where(ok_p[None, :], yp * yp, 0.0)
        if HPP == 1:
            total = tl.sum(sq, 1)
            if HAS_PASS:
                total += tl.sum(sqp, 1)
            r = _inv_rms(total, D, eps)[:, None]
            r_a = r
            r_p = r
        else:
            total = _per_head(sq, BM, HPP, HALF_P)
            if HAS_PASS:
                total += _per_head(sqp, BM, HPP, PASS_PAD)
            r = _inv_rms(total, D, eps)
            r_a = _spread(r, BM, HPP, HALF_P)
            if HAS_PASS:
                r_p = _spread(r, BM, HPP, PASS_PAD)
        is_q_a = head_a < HQ
        normed_a = ok_a & (head_a < HQ + HKV)
        wa_q = tl.load(qw_ptr + col_a - head_a * D, mask=ok_a & is_q_a, other=0.0)
        wa_k = tl.load(kw_ptr + col_a - head_a * D, mask=ok_a & ~is_q_a, other=0.0)
        wb_q = tl.load(qw_ptr + col_b - head_a * D, mask=ok_a & is_q_a, other=0.0)
        wb_k = tl.load(kw_ptr + col_b - head_a * D, mask=ok_a & ~is_q_a, other=0.0)
        wa = tl.where(is_q_a, wa_q, wa_k).to(tl.float32)[None, :]
        wb = tl.where(is_q_a, wb_q, wb_k).to(tl.float32)[None, :]
        ya = tl.where(normed_a[None, :], _rnd(_rnd(ya * r_a, DTYPE) * wa, DTYPE), ya)
        yb = tl.where(normed_a[None, :], _rnd(_rnd(yb * r_a, DTYPE) * wb, DTYPE), yb)
        if HAS_PASS:
            is_q_p = head_p < HQ
            wp_q = tl.load(qw_ptr + col_p - head_p * D, mask=ok_p & is_q_p, other=0.0)
            wp_k = tl.load(kw_ptr + col_p - head_p * D, mask=ok_p & ~is_q_p, other=0.0)
            wp = tl.where(is_q_p, wp_q, wp_k).to(tl.float32)[None, :]
            normed_p = (ok_p & (head_p < HQ + HKV))[None, :]
            yp = tl.where(normed_p, _rnd(_rnd(yp * r_p, DTYPE) * wp, DTYPE), yp)
    # RoPE on q and k heads: cos/sin of float(pos) * inv_freq in fp32, rounded to the dtype, and
    # every product and sum rounded like HF's eager ops in that dtype.
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    freq = tl.load(freq_ptr + pair, mask=ok_a, other=0.0)
    cos, sin = _cos_sin(pos[:, None] * freq[None, :])
    cos = _rnd(cos, DTYPE)
    sin = _rnd(sin, DTYPE)
    out_a = _rnd(_rnd(ya * cos, DTYPE) - _rnd(yb * sin, DTYPE), DTYPE)
    out_b = _rnd(_rnd(yb * cos, DTYPE) + _rnd(ya * sin, DTYPE), DTYPE)
    rotated = (head_a < HQ + HKV)[None, :]
    ya = tl.where(rotated, out_a, ya)
    yb = tl.where(rotated, out_b, yb)
    # Stores straight into q, k and v (T, H, D); the three masks split the heads by kind.
    r2 = rows.to(tl.int64)[:, None]
    ok2 = row_ok[:, None] & ok_a[None, :]
    is_q = (head_a < HQ)[None, :]
    is_k = (head_a >= HQ)[None, :] & (head_a < HQ + HKV)[None, :]
    is_v = (head_a >= HQ + HKV)[None, :]
    ca = col_a[None, :]
    cb = col_b[None, :]
    tl.store(q_ptr + r2 * stride_q + ca, ya.to(DTYPE), mask=ok2 & is_q)
    tl.store(q_ptr + r2 * stride_q + cb, yb.to(DTYPE), mask=ok2 & is_q)
    tl.store(k_ptr + r2 * stride_k + ca - HQ * D, ya.to(DTYPE), mask=ok2 & is_k)
    tl.store(k_ptr + r2 * stride_k + cb - HQ * D, yb.to(DTYPE), mask=ok2 & is_k)
    tl.store(v_ptr + r2 * stride_v + ca - (HQ + HKV) * D, ya.to(DTYPE), mask=ok2 & is_v)
    tl.store(v_ptr + r2 * stride_v + cb - (HQ + HKV) * D, yb.to(DTYPE), mask=ok2 & is_v)
    if HAS_PASS:
        okp = row_ok[:, None] & ok_p[None, :]
        cp = col_p[None, :]
        hp = head_p[None, :]
        yp = yp.to(DTYPE)
        tl.store(q_ptr + r2 * stride_q + cp, yp, mask=okp & (hp < HQ))
        tl.store(k_ptr + r2 * stride_k + cp - HQ * D, yp, mask=okp & (hp >= HQ) & (hp < HQ + HKV))
        tl.store(v_ptr + r2 * stride_v + cp - (HQ + HKV) * D, yp, mask=okp & (hp >= HQ + HKV))


# T stays unspecialised: one compile per regime serves every token count a server sees.
@triton.jit(do_not_specialize=["T"])
def _qkv_kernel(
    a_ptr, res_ptr, hout_ptr, nw_ptr, rstd_ptr, w_ptr, ws_ptr,
    bias_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr,
    T, stride_a, stride_r, stride_h, stride_q, stride_k, stride_v, eps,
    K: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
    NEOX: tl.constexpr, HALF_P: tl.constexpr, BLOCK_P: tl.constexpr, NSPLIT: tl.constexpr,
    HPP: tl.constexpr, PASS_PAD: tl.constexpr, PASS_SPAN: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr, HAS_RES: tl.constexpr, NORM_A: tl.constexpr, FUSE_STATS: tl.constexpr,
    SPLIT_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, N_PROGS: tl.constexpr,
):
    dtype = w_ptr.dtype.element_ty
    H: tl.constexpr = HQ + 2 * HKV
    N: tl.constexpr = H * D
    # Grouped ordering: GROUP_M row blocks sweep the column programs together, so W tiles are
    # reused from L2 across row blocks while the A rows stay resident.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(T, BLOCK_M)
    per_group = GROUP_M * N_PROGS
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    head_a, pair, ok_a, col_a, col_b, head_p, ok_p, col_p = _columns(
        pid_n, H, D, RD, NEOX, HALF_P, BLOCK_P, NSPLIT, HPP, PASS_PAD, PASS_SPAN, BLOCK_PASS)
    # Padded lanes read W row 0 instead of being masked: unmasked, vectorised weight loads, and
    # their junk never reaches memory (epilogue masks).
    wa_ptrs = w_ptr + tl.where(ok_a, col_a, 0).to(tl.int64)[None, :] * K + offs_k[:, None]
    wb_ptrs = w_ptr + tl.where(ok_a, col_b, 0).to(tl.int64)[None, :] * K + offs_k[:, None]
    wp_ptrs = w_ptr + tl.where(ok_p, col_p, 0).to(tl.int64)[None, :] * K + offs_k[:, None]
    a_ptrs = a_ptr + rows64[:, None] * stride_a + offs_k[None, :]

    # Statistics: either read the row kernel's rstd, or (decode) compute h = rnd(x + res) and
    # its rstd here in a first pass over the row; one program column writes the new residual.
    if FUSE_STATS:
        writer = ((rows * 0 + pid_n + pid_k) == 0)[:, None]  # tensor-shaped: one writer column
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            ok = row_ok[:, None] & (kk < K)[None, :]
            h = tl.load(a_ptrs + k0, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:
                r_ptrs = res_ptr + rows64[:, None] * stride_r + kk[None, :]
                h = _rnd(h + tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32), dtype)
                h_ptrs = hout_ptr + rows64[:, None] * stride_h + kk[None, :]
                tl.store(h_ptrs, h.to(dtype), mask=ok & writer)
            sum_sq += tl.sum(h * h, 1)
        rstd = _inv_rms(sum_sq, K, eps)
    elif NORM_A:
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)

    # Main loop over this split's K range; the A tile is normalised in registers with the
    # reference's two roundings before it feeds the dot.
    acc_a = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_PASS], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
            wa = tl.load(wa_ptrs + k0)
            wb = tl.load(wb_ptrs + k0)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wa = tl.load(wa_ptrs + k0, mask=k_ok[:, None], other=0.0)
            wb = tl.load(wb_ptrs + k0, mask=k_ok[:, None], other=0.0)
        if NORM_A:
            h = a.to(tl.float32)
            if FUSE_STATS and HAS_RES:
                r_ptrs = res_ptr + rows64[:, None] * stride_r + (k0 + offs_k)[None, :]
                r_ok = row_ok[:, None] & ((k0 + offs_k) < K)[None, :]
                h = _rnd(h + tl.load(r_ptrs, mask=r_ok, other=0.0).to(tl.float32), dtype)
            nw = tl.load(nw_ptr + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0)
            a = _cast(_rnd(h * rstd[:, None], dtype) * nw.to(tl.float32)[None, :], dtype)
        acc_a = _dot(a, wa, acc_a)
        acc_b = _dot(a, wb, acc_b)
        if HAS_PASS:
            if EVEN_K:
                wp = tl.load(wp_ptrs + k0)
            else:
                wp = tl.load(wp_ptrs + k0, mask=((k0 + offs_k) < K)[:, None], other=0.0)
            acc_p = _dot(a, wp, acc_p)

    if SPLIT_K == 1:
        _epilogue(acc_a, acc_b, acc_p, rows, row_ok, pid_n,
                  bias_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr,
                  stride_q, stride_k, stride_v, eps,
                  dtype, HQ, HKV, D, RD, NEOX, HALF_P, BLOCK_P, NSPLIT, HPP, PASS_PAD,
                  PASS_SPAN, BLOCK_PASS, HAS_PASS, HAS_BIAS, QK_NORM, BLOCK_M)
    else:
        # fp32 partial sums in (SPLIT_K, T, N) column order; the epilogue kernel reduces them.
        base = ws_ptr + (rows64[:, None] + pid_k * T) * N
        tl.store(base + col_a[None, :], acc_a, mask=row_ok[:, None] & ok_a[None, :])
        tl.store(base + col_b[None, :], acc_b, mask=row_ok[:, None] & ok_a[None, :])
        if HAS_PASS:
            tl.store(base + col_p[None, :], acc_p, mask=row_ok[:, None] & ok_p[None, :])


@triton.jit(do_not_specialize=["T"])
def _splitk_epilogue_kernel(
    ws_ptr, bias_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr,
    T, stride_q, stride_k, stride_v, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
    NEOX: tl.constexpr, HALF_P: tl.constexpr, BLOCK_P: tl.constexpr, NSPLIT: tl.constexpr,
    HPP: tl.constexpr, PASS_PAD: tl.constexpr, PASS_SPAN: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, HAS_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    dtype = q_ptr.dtype.element_ty
    H: tl.constexpr = HQ + 2 * HKV
    N: tl.constexpr = H * D
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    head_a, pair, ok_a, col_a, col_b, head_p, ok_p, col_p = _columns(
        pid_n, H, D, RD, NEOX, HALF_P, BLOCK_P, NSPLIT, HPP, PASS_PAD, PASS_SPAN, BLOCK_PASS)
    # Reduce the partial sums in a fixed order (deterministic), then the shared epilogue.
    acc_a = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_PASS], dtype=tl.float32)
    ok = row_ok[:, None] & ok_a[None, :]
    okp = row_ok[:, None] & ok_p[None, :]
    for s in tl.static_range(SPLIT_K):
        base = ws_ptr + (rows64[:, None] + s * T) * N
        acc_a += tl.load(base + col_a[None, :], mask=ok, other=0.0)
        acc_b += tl.load(base + col_b[None, :], mask=ok, other=0.0)
        if HAS_PASS:
            acc_p += tl.load(base + col_p[None, :], mask=okp, other=0.0)
    _epilogue(acc_a, acc_b, acc_p, rows, row_ok, pid_n,
              bias_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr,
              stride_q, stride_k, stride_v, eps,
              dtype, HQ, HKV, D, RD, NEOX, HALF_P, BLOCK_P, NSPLIT, HPP, PASS_PAD,
              PASS_SPAN, BLOCK_PASS, HAS_PASS, HAS_BIAS, QK_NORM, BLOCK_M)


# ---- configs ------------------------------------------------------------------------------------

SMALL_T = 16  # decode: one 16-row tile holds every token; the weight read is the whole cost
LARGE_T = 512  # from here on the GEMM is compute-bound and wants 128-row Hopper tiles


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cfg(bm: int, bp: int, bk: int, split: int, warps: int, stages: int, stats: str,
         group: int = 8) -> dict:
    return {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group,
            "num_warps": warps, "num_stages": stages, "stats": stats}


def configs(problem) -> list[dict]:
    """Tunable configs for this problem; the first is the untuned default for its token count.

    ``BLOCK_P`` counts RoPE pairs per program (a head has ``HALF_P`` padded pairs, so ``BLOCK_P``
    below ``HALF_P`` splits a head over programs, above it packs several heads); ``stats`` is
    ``"fused"`` (no row kernel), ``"row"`` (row kernel writes rstd, the GEMM normalises its A
    tile) or ``"prenorm"`` (row kernel writes the normalised rows, plain GEMM).
    """
    tokens = problem["tokens"]
    whole = max(_pow2(problem["rotary_dim"] // 2), 16)  # BLOCK_P of one whole head
    quarter = max(whole // 4, 16)
    qk = problem["qk_norm"]
    if tokens <= SMALL_T:
        if qk:  # whole heads per program: split K to fill the SMs
            out = [_cfg(16, whole, 256, 4, 4, 4, "fused"), _cfg(16, whole, 128, 8, 4, 4, "fused"),
                   _cfg(16, whole, 256, 2, 4, 4, "fused"), _cfg(16, whole, 256, 4, 4, 4, "row"),
                   _cfg(16, whole, 512, 4, 8, 3, "fused")]
        else:  # split each head over programs instead: no partial sums, no second kernel
            # Defaults in this branch and the two below are the fastest of the tuner's run on
            # an H200 (Llama-3-8B, bf16; TRITON_NOTES.md): "row" beat "fused" at T 1/16 (40.8
            # vs 45.3 us) and "prenorm" beat "row" at T 128 (41.9 vs 48.4) and 4096 (506 vs 662).
            q4 = quarter
            out = [_cfg(16, q4, 256, 1, 4, 4, "row"), _cfg(16, q4, 256, 1, 4, 4, "fused"),
                   _cfg(16, q4, 512, 1, 4, 3, "fused"), _cfg(16, q4, 128, 2, 4, 4, "fused"),
                   _cfg(16, whole, 256, 4, 4, 4, "fused"), _cfg(16, 2 * q4, 256, 2, 4, 4, "fused"),
                   _cfg(16, q4, 256, 1, 2, 4, "fused")]
    elif tokens < LARGE_T:
        split = 2 if qk else 1
        bp = whole if qk else max(whole // 2, 16)
        out = [_cfg(64, bp, 64, split, 4, 4, "prenorm"), _cfg(64, bp, 64, split, 4, 4, "row"),
               _cfg(64, bp, 128, split, 4, 3, "row"), _cfg(32, bp, 128, split, 4, 4, "row"),
               _cfg(64, whole, 64, 1, 4, 4, "row"), _cfg(128, whole, 64, 1, 8, 3, "row")]
    else:
        two = 2 * whole if whole >= 64 else whole  # 256 output columns for 128-wide heads
        out = [_cfg(128, whole, 64, 1, 8, 4, "prenorm"), _cfg(128, whole, 64, 1, 8, 4, "row"),
               _cfg(128, two, 64, 1, 8, 3, "row"), _cfg(128, whole, 64, 1, 8, 3, "row"),
               _cfg(128, two, 64, 1, 8, 3, "prenorm"), _cfg(64, whole, 64, 1, 4, 4, "row")]
    limit = _smem_limit(problem.device_type, problem.device_index)
    seen, unique = set(), []
    for c in out:
        c = _fit(c, problem, limit)
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


# Triton keeps num_stages - 1 tiles of A and W in flight in shared memory; the epilogue's layout
# conversions (and reshapes for per-head sums) take up to ~34 KB more (seen on an H200: a
# 3 x 72 KB pipeline asked for 250 KB).
_EPILOGUE_SMEM = 40 * 1024


@functools.cache
def _smem_limit(device_type: str, index: int) -> int | None:
    if device_type != "cuda":
        return None  # the interpreter has no shared memory limit
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def _fit(cfg: dict, problem, limit: int | None) -> dict:
    """Shrink BLOCK_K, then num_stages, until the pipeline fits the device's shared memory."""
    if limit is None:
        return cfg
    cfg = dict(cfg)
    half_p = _pow2(problem["rotary_dim"] // 2)
    npass = problem["head_dim"] - problem["rotary_dim"]
    pass_cols = 0 if npass == 0 else max(_pow2(npass), 16) * max(cfg["BLOCK_P"] // half_p, 1)
    size = problem.dtype.itemsize
    while True:
        stage = (cfg["BLOCK_M"] + 2 * cfg["BLOCK_P"] + pass_cols) * cfg["BLOCK_K"] * size
        if (cfg["num_stages"] - 1) * stage + _EPILOGUE_SMEM <= limit:
            return cfg
        if cfg["BLOCK_K"] > 32:
            cfg["BLOCK_K"] //= 2
        elif cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        else:
            return cfg


# ---- launcher -----------------------------------------------------------------------------------

_PLANS: dict[tuple, dict] = {}


def _make_plan(call, config: dict) -> dict:
    """Everything derivable from the problem and config: constexprs, grids, launch options."""
    op = "rmsnorm_qkv_rope(triton)"
    d, rd, hq, hkv = call.head_dim, call.rotary_dim, call.num_q_heads, call.num_kv_heads
    heads = hq + 2 * hkv
    qk = call.q_norm_weight is not None
    bm, bp, bk, split = (config[k] for k in ("BLOCK_M", "BLOCK_P", "BLOCK_K", "SPLIT_K"))
    stats = config["stats"]
    for name, value in (("BLOCK_M", bm), ("BLOCK_P", bp), ("BLOCK_K", bk)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{op}: config {name}={value} must be a power of two >= 16")
    if stats not in ("fused", "row", "prenorm"):
        raise ValueError(f"{op}: config stats={stats!r} must be 'fused', 'row' or 'prenorm'")
    if split < 1:
        raise ValueError(f"{op}: config SPLIT_K={split} must be >= 1")
    half_p = _pow2(rd // 2)
    npass = d - rd
    if bp >= half_p:  # whole heads: HPP heads per program, pass lanes padded per head
        nsplit, hpp = 1, bp // half_p
        pass_pad = max(_pow2(npass), 16 // hpp)
        block_pass, span = hpp * pass_pad, pass_pad
    else:  # one head over NSPLIT programs, pass features dealt out in spans
        if qk:
            raise ValueError(f"{op}: q/k norm needs whole heads per program: BLOCK_P={bp} < "
                             f"{half_p} pairs per head")
        nsplit, hpp = half_p // bp, 1
        span = max(_pow2(npass) // nsplit, 1)
        block_pass = pass_pad = max(span, 16)
    k = call.hidden
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    n_progs = triton.cdiv(heads, hpp) * nsplit
    tokens = call.tokens
    row_block = min(_pow2(k), 8192)
    return {
        "stats": stats,
        "split": split,
        "row_grid": (tokens,),
        "row_meta": dict(K=k, HAS_RES=call.residual is not None, WRITE_XN=stats == "prenorm",
                         BLOCK_H=row_block, num_warps=4 if row_block <= 1024 else 8),
        "grid": (triton.cdiv(tokens, bm) * n_progs, split),
        "epi_grid": (triton.cdiv(tokens, bm), n_progs),
        "shared": dict(HQ=hq, HKV=hkv, D=d, RD=rd, NEOX=call.neox, HALF_P=half_p, BLOCK_P=bp,
                       NSPLIT=nsplit, HPP=hpp, PASS_PAD=pass_pad, PASS_SPAN=span,
                       BLOCK_PASS=block_pass, HAS_PASS=npass > 0,
                       HAS_BIAS=call.qkv_bias is not None, QK_NORM=qk),
        "gemm_meta": dict(K=k, HAS_RES=call.residual is not None, NORM_A=stats != "prenorm",
                          FUSE_STATS=stats == "fused", SPLIT_K=split, K_PER_SPLIT=k_per_split,
                          EVEN_K=k % bk == 0 and k_per_split * split == k, BLOCK_M=bm,
                          BLOCK_K=bk, GROUP_M=config["GROUP_M"], N_PROGS=n_progs,
                          num_warps=config["num_warps"], num_stages=config["num_stages"]),
        "epi_meta": dict(SPLIT_K=split, BLOCK_M=bm, num_warps=4),
    }


def _check(call) -> None:
    op = "rmsnorm_qkv_rope(triton)"
    if call.x.stride(1) != 1 or (call.residual is not None and call.residual.stride(1) != 1):
        raise ValueError(f"{op}: x and residual need a contiguous last dim")
    if not call.qkv_weight.is_contiguous() or not call.norm_weight.is_contiguous():
        raise ValueError(f"{op}: qkv_weight and norm_weight must be contiguous")
    for name, t in (("q", call.q), ("k", call.k), ("v", call.v)):
        if t.stride(2) != 1 or t.stride(1) != call.head_dim:
            raise ValueError(f"{op}: output {name} must have contiguous (H, D) rows")
    if call.residual_out is not None and call.residual_out.stride(1) != 1:
        raise ValueError(f"{op}: residual_out needs a contiguous last dim")
    if call.positions.shape != (call.tokens,) or call.inv_freq.dtype != torch.float32:
        raise ValueError(f"{op}: positions must be (T,), inv_freq float32")
    if call.inv_freq.shape != (call.rotary_dim // 2,) or not call.inv_freq.is_contiguous():
        raise ValueError(f"{op}: inv_freq must be a contiguous (rotary_dim/2,) tensor")


def run(call, config: dict) -> None:
    """Write call.q, call.k, call.v (and call.residual_out) with the given config."""
    x = call.x
    key = (x.device, x.dtype, call.tokens, call.hidden, call.num_q_heads, call.num_kv_heads,
           call.head_dim, call.rotary_dim, call.neox, call.residual is not None,
           call.qkv_bias is not None, call.q_norm_weight is not None,
           tuple(sorted(config.items())))
    plan = _PLANS.get(key)
    if plan is None:
        _check(call)
        if len(_PLANS) >= 4096:  # one plan per token count: bound it for long-running servers
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(call, config)
    tokens = call.tokens
    if tokens == 0:
        return
    res, h_out = call.residual, call.residual_out
    # The kernels index positions as a dense vector: a broadcast (stride 0) view is copied.
    pos = call.positions if call.positions.stride(0) == 1 else call.positions.contiguous()
    stats = plan["stats"]
    rstd = xn = x  # placeholders for pointer arguments a configuration does not read
    if stats != "fused":
        rstd = torch.empty(tokens, device=x.device, dtype=torch.float32)
        if stats == "prenorm":
            xn = torch.empty(tokens, call.hidden, device=x.device, dtype=x.dtype)
        _row_kernel[plan["row_grid"]](
            x, res if res is not None else x, h_out if h_out is not None else x,
            call.norm_weight, xn, rstd,
            x.stride(0), res.stride(0) if res is not None else 0,
            h_out.stride(0) if h_out is not None else 0, call.eps, **plan["row_meta"])
    # A operand: the normalised rows (prenorm), the new residual h, or x itself.
    if stats == "prenorm":
        a = xn
    elif stats == "row" and h_out is not None:
        a = h_out
    else:
        a = x
    split = plan["split"]
    ws = x
    if split > 1:
        ws = torch.empty(split, tokens, call.qkv_weight.shape[0], device=x.device,
                         dtype=torch.float32)
    bias = call.qkv_bias if call.qkv_bias is not None else x
    qw = call.q_norm_weight if call.q_norm_weight is not None else x
    kw = call.k_norm_weight if call.k_norm_weight is not None else x
    q, k, v = call.q, call.k, call.v
    _qkv_kernel[plan["grid"]](
        a, res if res is not None else x, h_out if h_out is not None else x,
        call.norm_weight, rstd, call.qkv_weight, ws,
        bias, qw, kw, pos, call.inv_freq, q, k, v,
        tokens, a.stride(0), res.stride(0) if res is not None else 0,
        h_out.stride(0) if h_out is not None else 0,
        q.stride(0), k.stride(0), v.stride(0), call.eps,
        **plan["shared"], **plan["gemm_meta"])
    if split > 1:
        _splitk_epilogue_kernel[plan["epi_grid"]](
            ws, bias, qw, kw, pos, call.inv_freq, q, k, v,
            tokens, q.stride(0), k.stride(0), v.stride(0), call.eps,
            **plan["shared"], **plan["epi_meta"])
