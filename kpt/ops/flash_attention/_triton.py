"""Triton backend of ``flash_attention``: forward, and the FA2 backward as three kernels.

Layout: every tensor is addressed through (batch, token, head) strides with a contiguous last
dim, so transposed views (B, H, S, D) -> (B, S, H, D) are read in place. Varlen calls use batch
stride 0 and take each sequence's first token and length from ``cu_seqlens``. A query head ``h``
reads kv head ``h // GROUP`` (GQA/MQA without repeating K/V). Head dims that are not a power of
two are padded to ``BLOCK_D`` lanes with masked loads.

Masking: query ``i`` sees key ``j`` when ``j <= i + diag + right`` (if a right bound exists;
causal is right = 0) and ``j >= i + diag - left`` (if a left bound exists), ``diag = Sk - Sq``.
For each tile the loop over the other sequence is split into three ranges: key blocks before
the fully visible ones (masked), fully visible blocks (no mask, no bounds checks: the hot loop),
and blocks after them (masked). Blocks outside the visible band are never visited.

Softmax runs in the exp2 domain (log2(e) is folded into the logit multiplier, so logits overflow
where the reference's do: reference.py); accumulators are fp32. The running maximum starts at
-FLT_MAX, not -inf: a row whose logits so far are all -inf (masked, or overflowed) shifts by a
finite value and no inf - inf NaN appears. A row with no visible key, or whose visible logits
are all -inf, ends with l = 0: output 0, lse = -inf. A +inf logit (overflow) leaves l = NaN, and
the epilogue gives lse = +inf, out NaN (the rule of reference.py and csrc/include/kpt/softmax.h).

Backward (FA2 scheme, no atomics, deterministic by construction): ``_bwd_preprocess`` forms
``delta = rowsum(dO * O) - dlse``; ``_bwd_dkdv_kernel`` owns a key block of one kv head and loops
over the query blocks of every query head of its group, so GQA's sum over heads happens in
registers; ``_bwd_dq_kernel`` owns a query block and loops over key blocks. Each output element
is written by exactly one program, in a fixed summation order. On Hopper both kernels read the
tiles they loop over (Q and dO, K and V) through tensor descriptors, like the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import masked_pv as _masked_pv
from kpt.ops._triton_compat import mm as _mm

try:  # host-built TMA descriptors (triton >= 3.4); older versions use the pointer path only
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

LOG2E = 1.4426950408889634  # host side; kernels spell constants out (no non-constexpr globals)


@triton.jit
def _tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: never overflows, and needs no
    # libdevice (absent in the interpreter); the error near 0 is an absolute ~1e-7.
    # Below |x| = 2^-6 the series x - x^3/3 + 2x^5/15 is exact to fp32 rounding, where the
    # formula's absolute error would dominate (a soft cap of 1e8 scales it back up).
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 - x2 * (0.3333333333333333 - x2 * 0.13333333333333333))
    return tl.where(tl.abs(x) < 0.015625, small, tl.where(x < 0, -t, t))


@triton.jit
def _visible(qi, kj, q_len, k_len, diag, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Which (query, key) pairs of a tile are real and inside the band (qi, kj broadcast)."""
    ok = (qi < q_len) & (kj < k_len)
    if HAS_RIGHT:
        ok = ok & (kj <= qi + (diag + window_right))
    if HAS_LEFT:
        ok = ok & (kj >= qi + (diag - window_left))
    return ok


@triton.jit
def _load_tile(base, rows, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr,
               ROW_CHECK: tl.constexpr, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) tile; masks only what may be out of range, zeros where masked."""
    ptrs = base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    if ROW_CHECK:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                       other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _kv_ranges(m_start, q_len, k_len, diag, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key range [lo, hi) of a query block, and [mid_lo, mid_hi) of fully visible key blocks."""
    m_last = tl.minimum(m_start + BLOCK_M, q_len) - 1
    lo = 0
    hi = k_len
    full_lo = 0
    full_hi = k_len
    if HAS_LEFT:
        lo = tl.maximum(m_start + diag - window_left, 0)
        full_lo = tl.maximum(m_last + diag - window_left, 0)
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(m_last + diag + window_right + 1, k_len), 0)
        full_hi = tl.maximum(tl.minimum(m_start + diag + window_right + 1, k_len), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _q_ranges(n_start, q_len, k_len, diag, window_left, window_right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Query range [lo, hi) that sees a key block, and [mid_lo, mid_hi) of fully visible,
    fully in-range query blocks (the mirror image of ``_kv_ranges``)."""
    n_last = tl.minimum(n_start + BLOCK_N, k_len) - 1
    lo = 0
    hi = q_len
    full_lo = 0
    full_hi = q_len
    if HAS_RIGHT:
        lo = tl.maximum(n_start - diag - window_right, 0)
        full_lo = tl.maximum(n_last - diag - window_right, 0)
    if HAS_LEFT:
        hi = tl.maximum(tl.minimum(n_last - diag + window_left + 1, q_len), 0)
        full_hi = tl.maximum(tl.minimum(n_start - diag + window_left + 1, q_len), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo), hi)
    mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK_M) * BLOCK_M, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _part(part: tl.constexpr, lo, mid_lo, mid_hi, hi):
    """Range ``part`` of a loop split by ``_kv_ranges`` / ``_q_ranges``: 0 the fully visible
    blocks, 1 and 2 the masked edges before and after them."""
    if part == 0:
        return mid_lo, mid_hi
    elif part == 1:
        return lo, mid_lo
    else:
        return mid_hi, hi


@triton.jit
def _query_block(CU_Q, CU_K, seqlen_q, seqlen_k, total_q, total_k, VARLEN: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """(head, batch, q start/length, k start/length, first query row) of this program. Query
    blocks run in reverse order: with a causal mask the last blocks do the most work, and
    starting them first evens out the tail of the grid."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, total_k, VARLEN)
    m_start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    return h, b, q_start, q_len, k_start, k_len, m_start


@triton.jit
def _bases(A, B, b64, start, h64, stride_ab, stride_as, stride_ah, stride_bb, stride_bs,
           stride_bh, TMA: tl.constexpr):
    """Where a kernel reads two tensors from: descriptors as they are (their loads take
    coordinates), pointers moved to (batch, first token, head)."""
    if TMA:
        return A, B
    else:
        return (A + b64 * stride_ab + start * stride_as + h64 * stride_ah,
                B + b64 * stride_bb + start * stride_bs + h64 * stride_bh)


@triton.jit
def _seq_bounds(CU, b, seqlen, total, VARLEN: tl.constexpr):
    """(first token, length) of sequence ``b``. Varlen boundaries are clamped to the ``total``
    tokens of the tensor, so that whatever ``CU`` holds (validated on the host when it can be
    read there) no access leaves the tensor."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + b).to(tl.int64), 0), total)
        end = tl.minimum(tl.maximum(tl.load(CU + b + 1).to(tl.int64), start), total)
        length = (end - start).to(tl.int32)
    else:
        start = b.to(tl.int64) * 0
        length = seqlen
    return start, length


# ---- forward ----------------------------------------------------------------------------------


@triton.jit
def _kv_tiles(k_base, v_base, stride_ks, stride_vs, start_n, cols, k_len, offs_d, b, kh,
              MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The K and V tiles of key block ``start_n`` (the forward's and the dQ kernel's loop)."""
    if TMA:  # (B, H, S, D) descriptors: rows past the sequence arrive as zeros
        k = k_base.load([b, kh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_base.load([b, kh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = _load_tile(k_base, cols, stride_ks, k_len, offs_d, HEAD_DIM, MASKED, EVEN_D)
        v = _load_tile(v_base, cols, stride_vs, k_len, offs_d, HEAD_DIM, MASKED, EVEN_D)
    return k, v


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, q_len,
              k_len, diag, window_left, window_right, mul_in, mul_out, b, kh,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Fold key block ``start_n`` into the running (acc, max, sum)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    k, v = _kv_tiles(k_base, v_base, stride_ks, stride_vs, start_n, cols, k_len, offs_d, b, kh,
                     MASKED, HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D, TMA)
    qk = _mm(q, tl.trans(k))
    if SOFTCAP:
        s = _tanh(qk * mul_in) * mul_out
    else:
        s = qk * mul_in
    if MASKED:
        ok = _visible(offs_m[:, None], cols[None, :], q_len, k_len, diag, window_left,
                      window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # >= -FLT_MAX: finite, or +inf (overflow)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:  # a NaN / inf value of a key some row cannot see stays out of that row
        acc = _masked_pv(p, v, ok, acc * alpha[:, None])
    else:
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _fwd_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo, hi, offs_m, q_len,
               k_len, diag, window_left, window_right, mul_in, mul_out, b, kh,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    if MASKED:
        # Edge blocks (one or two per query block) run unpipelined: the clean copy of V that
        # masked_pv hands to the dot needs shared memory of its own, which next to the main
        # loop's multi-stage K/V buffers would not fit. Compiled for sm_90a (Triton 3.6 and
        # 3.9), the TMA 128 x 128 config at D = 128 takes 229400 of the 232448 bytes a block
        # may use this way, 263168 pipelined (tests/ops/test_triton_shared_memory.py).
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                      start_n, offs_m, q_len, k_len, diag, window_left,
                                      window_right, mul_in, mul_out, b, kh, True, HAS_LEFT,
                                      HAS_RIGHT, SOFTCAP, HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D,
                                      TMA)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                      start_n, offs_m, q_len, k_len, diag, window_left,
                                      window_right, mul_in, mul_out, b, kh, False, HAS_LEFT,
                                      HAS_RIGHT, SOFTCAP, HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D,
                                      TMA)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, total_q, total_k, mul_in, mul_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):
    """With ``TMA``, Q, K, V and OUT are (B, H, S, D) tensor descriptors (Hopper's bulk copy
    engine: asynchronous, multi-stage, no address arithmetic in registers); otherwise pointers
    addressed through the (batch, token, head) strides."""
    h, b, q_start, q_len, k_start, k_len, m_start = _query_block(
        CU_Q, CU_K, seqlen_q, seqlen_k, total_q, total_k, VARLEN, BLOCK_M)
    if m_start >= q_len:
        return
    diag = k_len - q_len
    kh = h // GROUP
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    if TMA:
        k_base = K
        v_base = V
        q = Q.load([b, h, m_start, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_base = (Q + b.to(tl.int64) * stride_qb + q_start * stride_qs
                  + h.to(tl.int64) * stride_qh)
        k_base = (K + b.to(tl.int64) * stride_kb + k_start * stride_ks
                  + kh.to(tl.int64) * stride_kh)
        v_base = (V + b.to(tl.int64) * stride_vb + k_start * stride_vs
                  + kh.to(tl.int64) * stride_vh)
        q = _load_tile(q_base, offs_m, stride_qs, q_len, offs_d, HEAD_DIM, True, EVEN_D)

    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)  # -FLT_MAX (module doc)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _kv_ranges(m_start, q_len, k_len, diag, window_left, window_right,
                                        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # Fully visible blocks first, then the masked edges before and after them.
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, mid_lo,
                               mid_hi, offs_m, q_len, k_len, diag, window_left, window_right,
                               mul_in, mul_out, b, kh, False, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                               HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D, TMA)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo,
                               mid_lo, offs_m, q_len, k_len, diag, window_left, window_right,
                               mul_in, mul_out, b, kh, True, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                               HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D, TMA)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, mid_hi,
                               hi, offs_m, q_len, k_len, diag, window_left, window_right,
                               mul_in, mul_out, b, kh, True, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                               HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D, TMA)

    # NaN logits give a NaN sum: NaN out and lse, as in the reference. A row without a visible
    # logit above -inf (no key, or an inf in q, overflow) ends with l_i = 0: out 0, lse -inf.
    seen = l_i != 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # A +inf logit made l_i NaN (inf - inf): lse +inf (the max skips NaN logits), out NaN.
    # Back to natural log: * ln(2).
    l_fin = tl.where(seen & (m_i != float("inf")), l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_fin)) * 0.6931471805599453, float("-inf"))
    row_ok = offs_m < q_len
    if TMA:  # rows and columns past the tensor's bounds are dropped by the copy engine
        OUT.store([b, h, m_start, 0], _cast(out, OUT.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        o_base = (OUT + b.to(tl.int64) * stride_ob + q_start * stride_os
                  + h.to(tl.int64) * stride_oh)
        o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
        tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(l_base + offs_m, lse, mask=row_ok)


# ---- backward ---------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    OUT, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    stride_gb, stride_gh, stride_gs, stride_lb, stride_lh, seqlen_q, total_q,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, in the lse layout (the softmax Jacobian's row term)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, VARLEN)
    m_start = tl.program_id(0) * BLOCK_M
    if m_start >= q_len:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_base = OUT + b.to(tl.int64) * stride_ob + q_start * stride_os + h.to(tl.int64) * stride_oh
    d_base = DO + b.to(tl.int64) * stride_db + q_start * stride_ds + h.to(tl.int64) * stride_dh
    o = _load_tile(o_base, offs_m, stride_os, q_len, offs_d, HEAD_DIM, True, False)
    do = _load_tile(d_base, offs_m, stride_ds, q_len, offs_d, HEAD_DIM, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ok = offs_m < q_len
    if HAS_DLSE:
        g_base = DLSE + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        g = tl.load(g_base + (q_start + offs_m) * stride_gs, mask=row_ok, other=0.0)
        delta -= g.to(tl.float32)
    l_base = DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(l_base + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds,
                lo, hi, offs_n, q_len, k_len, diag, window_left, window_right, mul_in, mul_out,
                b, h,
                MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        if TMA:  # rows past the sequence arrive as zeros (and are masked below)
            q = q_base.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_base.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = _load_tile(q_base, rows, stride_qs, q_len, offs_d, HEAD_DIM, MASKED, EVEN_D)
            do = _load_tile(do_base, rows, stride_ds, q_len, offs_d, HEAD_DIM, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < q_len, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < q_len, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        # As in _bwd_dq_kernel: a row at lse -inf (no key, or only -inf logits: out 0) has
        # p = 0 for every key; +inf keeps exp2's argument from becoming (-inf) - (-inf).
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        # Transposed tile (keys x queries): dK and dV are then plain row-major products.
        qk_t = _mm(k, tl.trans(q))
        if SOFTCAP:
            t = _tanh(qk_t * mul_in)
            s = t * mul_out
        else:
            s = qk_t * mul_in
        p_t = tl.exp2(s - lse2[None, :])
        if MASKED:
            ok = _visible(rows[None, :], offs_n[:, None], q_len, k_len, diag, window_left,
                          window_right, HAS_LEFT, HAS_RIGHT)
            p_t = tl.where(ok, p_t, 0.0)
        dv = _dot(_cast(p_t, do.dtype), do, dv)
        dp_t = _mm(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:  # dp_t of a pair that is not visible may be NaN (a NaN value): p_t is 0
            ds_t = tl.where(ok, ds_t, 0.0)
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t * t)
        dk = _dot(_cast(ds_t, q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
    stride_kgb, stride_kgs, stride_kgh, stride_vgb, stride_vgs, stride_vgh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, total_q, total_k, scale, mul_in, mul_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):
    """With ``TMA``, Q and DO are (B, H, S, D) descriptors."""
    pid_n = tl.program_id(0)
    kh = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, total_k, VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= k_len:
        return
    diag = k_len - q_len
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b64 = b.to(tl.int64)
    kh64 = kh.to(tl.int64)
    k = _load_tile(K + b64 * stride_kb + k_start * stride_ks + kh64 * stride_kh, offs_n,
                   stride_ks, k_len, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_tile(V + b64 * stride_vb + k_start * stride_vs + kh64 * stride_vh, offs_n,
                   stride_vs, k_len, offs_d, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _q_ranges(n_start, q_len, k_len, diag, window_left, window_right,
                                       HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = kh * GROUP + g
        h64 = h.to(tl.int64)
        q_base, do_base = _bases(Q, DO, b64, q_start, h64, stride_qb, stride_qs, stride_qh,
                                 stride_db, stride_ds, stride_dh, TMA)
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + q_start
        for part in tl.static_range(3):  # fully visible query blocks, then the two edges
            start, stop = _part(part, lo, mid_lo, mid_hi, hi)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qs, stride_ds, start, stop, offs_n, q_len, k_len, diag,
                                 window_left, window_right, mul_in, mul_out, b, h, part != 0,
                                 HAS_LEFT, HAS_RIGHT, SOFTCAP, HEAD_DIM, EVEN_D, BLOCK_M,
                                 BLOCK_D, TMA)
    mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_n[:, None].to(tl.int64)
    dk_base = DK + b64 * stride_kgb + k_start * stride_kgs + kh64 * stride_kgh
    dv_base = DV + b64 * stride_vgb + k_start * stride_vgs + kh64 * stride_vgh
    tl.store(dk_base + rows * stride_kgs + offs_d[None, :], _cast(dk * scale, DK.dtype.element_ty),
             mask=mask)
    tl.store(dv_base + rows * stride_vgs + offs_d[None, :], _cast(dv, DV.dtype.element_ty),
             mask=mask)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, lo, hi, offs_m,
              q_len, k_len, diag, window_left, window_right, mul_in, mul_out, b, kh,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _kv_tiles(k_base, v_base, stride_ks, stride_vs, start_n, cols, k_len, offs_d, b,
                         kh, MASKED, HEAD_DIM, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        qk = _mm(q, tl.trans(k))
        if SOFTCAP:
            t = _tanh(qk * mul_in)
            s = t * mul_out
        else:
            s = qk * mul_in
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            ok = _visible(offs_m[:, None], cols[None, :], q_len, k_len, diag, window_left,
                          window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = _mm(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if MASKED:  # dp of a key this row cannot see may be NaN (a NaN value): p is 0 there
            ds = tl.where(ok, ds, 0.0)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(_cast(ds, k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
    stride_qgb, stride_qgs, stride_qgh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, total_q, total_k, scale, mul_in, mul_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):
    """With ``TMA``, K and V are (B, H, S, D) descriptors."""
    h, b, q_start, q_len, k_start, k_len, m_start = _query_block(
        CU_Q, CU_K, seqlen_q, seqlen_k, total_q, total_k, VARLEN, BLOCK_M)
    if m_start >= q_len:
        return
    diag = k_len - q_len
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kh = h // GROUP
    kh64 = kh.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    row_ok = offs_m < q_len
    q = _load_tile(Q + b64 * stride_qb + q_start * stride_qs + h64 * stride_qh, offs_m,
                   stride_qs, q_len, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_tile(DO + b64 * stride_db + q_start * stride_ds + h64 * stride_dh, offs_m,
                    stride_ds, q_len, offs_d, HEAD_DIM, True, EVEN_D)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start
    lse = tl.load(LSE + l_off + offs_m, mask=row_ok, other=0.0)
    # A row without visible keys has lse = -inf and every p masked to 0; +inf keeps the unused
    # exp2 argument from becoming inf - inf.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + l_off + offs_m, mask=row_ok, other=0.0)
    k_base, v_base = _bases(K, V, b64, k_start, kh64, stride_kb, stride_ks, stride_kh,
                            stride_vb, stride_vs, stride_vh, TMA)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _kv_ranges(m_start, q_len, k_len, diag, window_left, window_right,
                                        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for part in tl.static_range(3):  # fully visible key blocks, then the two edges
        start, stop = _part(part, lo, mid_lo, mid_hi, hi)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start,
                       stop, offs_m, q_len, k_len, diag, window_left, window_right, mul_in,
                       mul_out, b, kh, part != 0, HAS_LEFT, HAS_RIGHT, SOFTCAP, HEAD_DIM,
                       EVEN_D, BLOCK_N, BLOCK_D, TMA)
    dq_base = DQ + b64 * stride_qgb + q_start * stride_qgs + h64 * stride_qgh
    tl.store(dq_base + offs_m[:, None].to(tl.int64) * stride_qgs + offs_d[None, :],
             _cast(dq * scale, DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---- configs ----------------------------------------------------------------------------------


def _fwd(bm: int, bn: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def _bwd(m1: int, n1: int, w1: int, s1: int, m2: int, n2: int, w2: int, s2: int) -> dict:
    """dK/dV kernel: key block N1, query step M1; dQ kernel: query block M2, key step N2."""
    return {"BLOCK_M1": m1, "BLOCK_N1": n1, "WARPS1": w1, "STAGES1": s1,
            "BLOCK_M2": m2, "BLOCK_N2": n2, "WARPS2": w2, "STAGES2": s2}


def _tma_ready(problem) -> bool:
    """Tensor descriptors: this triton has them, the GPU is Hopper or newer, batched layout."""
    if TensorDescriptor is None or problem.device_type != "cuda" or problem["varlen"]:
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def configs(problem) -> list[dict]:
    """Forward configs, the first the untuned default.

    Hopper: 128-query tiles keep the tensor cores busy; the K/V tile shrinks as the head dim
    grows so that Q plus ``num_stages`` K/V tiles fit in 227 KB of shared memory (D=256: 64 KB
    of Q + 2 x 64 KB of K/V). Defaults are the ones with no register spills when compiled for
    sm_90a (NOTES.md has the table); 4 warps with 128-row tiles spill at D >= 128. Short query
    sequences (decode-like) get small query tiles instead of mostly-empty 128-row ones.
    """
    if problem.device_type == "cpu":  # interpreter: small tiles so tests cross block edges
        tma = TensorDescriptor is not None and not problem["varlen"]
        return [_fwd(16, 16, 4, 1), _fwd(32, 16, 4, 1)] + [dict(_fwd(16, 16, 4, 1), TMA=True)] * tma
    d = problem["head_dim"]
    if problem["seqlen_q"] <= 32:
        # (16, 128, 4, 3) compiles to a pathological 18 KB of spills on sm_90a; these do not.
        return [_fwd(16, 64, 4, 2), _fwd(16, 64, 2, 3), _fwd(64, 64, 4, 3)]
    # Measured on the H200 (NOTES.md, "Measured configs"): TMA descriptors with 128 x 128
    # tiles win for D <= 128 by 1.06-1.28x over the best pointer config; pointer configs stay
    # for older GPUs (and as tuner candidates).
    if d <= 64:
        pointer = [_fwd(128, 64, 8, 3), _fwd(128, 64, 4, 3), _fwd(64, 64, 4, 3),
                   _fwd(128, 128, 8, 3)]
        tma = [_fwd(128, 128, 4, 3), _fwd(128, 64, 4, 3), _fwd(128, 128, 8, 3)]
    elif d <= 128:
        pointer = [_fwd(128, 64, 8, 3), _fwd(128, 128, 8, 2), _fwd(64, 64, 4, 3),
                   _fwd(128, 32, 8, 3)]
        tma = [_fwd(128, 128, 8, 3), _fwd(128, 64, 8, 3), _fwd(128, 64, 4, 3),
               _fwd(128, 128, 8, 2)]
    else:  # not measured: the spill-free pointer config stays the default
        pointer = [_fwd(128, 64, 8, 2), _fwd(128, 32, 8, 2), _fwd(64, 32, 4, 2)]
        return pointer + [_fwd(128, 64, 8, 2) | {"TMA": True}] * _tma_ready(problem)
    if _tma_ready(problem):
        return [dict(c, TMA=True) for c in tma] + pointer
    return pointer


def backward_configs(problem) -> list[dict]:
    """Backward configs, the first the untuned default.

    The dK/dV kernel keeps two fp32 (N1, D) accumulators plus its K and V tiles live for the
    whole loop, so its key block shrinks with D and its query step is small (the transposed
    score tile is N1 x M1); the dQ kernel mirrors it with one accumulator. For D <= 128 the
    defaults are the H200 sweep's winners (NOTES.md, "Measured configs"); for D = 256 the
    least-spilling config (every D = 256 variant spills somewhat).
    """
    if problem.device_type == "cpu":  # both load paths, tiles that cross block edges
        small, other = _bwd(16, 16, 4, 1, 16, 16, 4, 1), _bwd(16, 32, 4, 1, 32, 16, 4, 1)
        tma = TensorDescriptor is not None and not problem["varlen"]
        return [small, other] + [dict(small, TMA=True), dict(other, TMA=True)] * tma
    d = problem["head_dim"]
    # Hopper's wgmma gives each warpgroup (4 warps) a 64-row slice of the accumulator: the dK/dV
    # tile (N1 rows) and the dQ tile (M2 rows) want 64 rows per 4 warps; narrower slices fall
    # back to mma.sync. TMA descriptors for the looped-over tiles (Q and dO in dK/dV, K and V
    # in dQ) won 1.04-1.07x at equal tiles, and with them 128-key dK/dV tiles over 8 warps
    # (torch's flex backward uses the same shape) 1.14-1.27x over the pointer default
    # (NOTES.md, "Measured configs").
    if d <= 64:
        pointer = [_bwd(64, 64, 4, 3, 128, 64, 8, 3), _bwd(32, 64, 4, 3, 64, 64, 4, 2),
                   _bwd(32, 128, 8, 2, 128, 64, 8, 2), _bwd(64, 128, 8, 2, 128, 64, 8, 2)]
        tma = [_bwd(64, 64, 4, 3, 128, 64, 8, 3), _bwd(64, 128, 8, 3, 128, 64, 8, 3),
               _bwd(32, 64, 4, 3, 64, 64, 4, 3)]
    elif d <= 128:
        pointer = [_bwd(32, 64, 4, 2, 64, 64, 4, 2), _bwd(64, 128, 8, 3, 128, 64, 8, 3),
                   _bwd(32, 64, 4, 3, 64, 64, 4, 3), _bwd(64, 64, 4, 2, 128, 32, 8, 2),
                   _bwd(16, 64, 4, 3, 64, 32, 4, 3)]
        tma = [_bwd(64, 128, 8, 3, 128, 64, 8, 3), _bwd(64, 64, 4, 2, 64, 64, 4, 2),
               _bwd(32, 64, 4, 3, 64, 64, 4, 3), _bwd(64, 128, 8, 2, 128, 64, 8, 2)]
    else:
        return [_bwd(32, 32, 8, 1, 32, 32, 8, 1), _bwd(16, 32, 4, 1, 32, 32, 4, 1),
                _bwd(32, 64, 8, 1, 64, 32, 8, 1)]
    if _tma_ready(problem):
        return [dict(c, TMA=True) for c in tma] + pointer
    return pointer


# ---- launchers --------------------------------------------------------------------------------

_OP = "flash_attention(triton)"


def _block(config: dict, key: str) -> int:
    value = config[key]
    if value < 16 or value & (value - 1):
        raise ValueError(f"{_OP}: config {key}={value} must be a power of two >= 16")
    return value


def _bsh(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; the last dim must be contiguous."""
    if t.stride(-1) != 1:
        raise ValueError(f"{_OP}: tensors need a contiguous last dim, got strides {t.stride()}")
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of an lse-shaped tensor whose token stride is 1."""
    if t.stride(-1) != 1:
        raise ValueError(f"{_OP}: lse needs a contiguous token dim, got strides {t.stride()}")
    return (0, t.stride(0)) if varlen else (t.stride(0), t.stride(1))


def _shared(call) -> dict:
    """Scalars and constexprs common to every kernel of a call."""
    softcap = call.softcap > 0
    # exp2 domain: log2(e) folded into the multiplier applied after the dot (or after tanh).
    mul_in = call.scale / call.softcap if softcap else call.scale * LOG2E
    mul_out = call.softcap * LOG2E if softcap else 1.0
    d = call.q.shape[-1]
    return dict(
        args=dict(seqlen_q=call.max_seqlen_q, seqlen_k=call.max_seqlen_k,
                  total_q=call.q.shape[0], total_k=call.k.shape[0], mul_in=mul_in,
                  mul_out=mul_out, window_left=call.window_left,
                  window_right=call.window_right),
        meta=dict(HEAD_DIM=d, GROUP=call.q.shape[-2] // call.k.shape[-2], VARLEN=call.varlen,
                  HAS_LEFT=call.window_left >= 0, HAS_RIGHT=call.window_right >= 0,
                  SOFTCAP=softcap, BLOCK_D=max(16, triton.next_power_of_2(d))),
    )


def _tma_fits(call, tensors) -> bool:
    """Descriptors need a batched call, 16-byte aligned bases and strides (the copy engine's
    rule); a call that misses it runs the pointer path of the same config."""
    if call.varlen or TensorDescriptor is None:
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0
                                              for st in t.stride()[:-1])
               for t in tensors)


def _descriptor(t: torch.Tensor, rows: int, block_d: int):
    """A (B, H, S, D) descriptor over a (B, S, H, D)-strided tensor: TMA takes the dims in any
    stride order, and a (1, 1, rows, D) box keeps the tile's two dims innermost."""
    view = t.transpose(1, 2)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [1, 1, rows, block_d])


def run(call, config: dict) -> None:
    """Write call.out and call.lse."""
    bm, bn = _block(config, "BLOCK_M"), _block(config, "BLOCK_N")
    q, k, v, out, lse = call.q, call.k, call.v, call.out, call.lse
    batch, heads = call.batch, q.shape[-2]
    if batch == 0 or heads == 0 or call.max_seqlen_q == 0:
        return
    cu_q = call.cu_seqlens_q if call.varlen else q
    cu_k = call.cu_seqlens_k if call.varlen else q
    shared = _shared(call)
    grid = (triton.cdiv(call.max_seqlen_q, bm), heads, batch)
    tensors = (q, k, v, out)
    tma = config.get("TMA", False) and _tma_fits(call, (q, k, v, out))
    if tma:
        block_d = shared["meta"]["BLOCK_D"]
        tensors = tuple(_descriptor(t, rows, block_d)
                        for t, rows in ((q, bm), (k, bn), (v, bn), (out, bm)))
    _fwd_kernel[grid](
        *tensors, lse, cu_q, cu_k,
        *_bsh(q, call.varlen), *_bsh(k, call.varlen), *_bsh(v, call.varlen),
        *_bsh(out, call.varlen), *_lse_strides(lse, call.varlen),
        **shared["args"], **shared["meta"], BLOCK_M=bm, BLOCK_N=bn, TMA=tma,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def run_backward(call, config: dict) -> None:
    """Write call.dq, call.dk and call.dv (no atomics: deterministic whatever the flag)."""
    m1, n1 = _block(config, "BLOCK_M1"), _block(config, "BLOCK_N1")
    m2, n2 = _block(config, "BLOCK_M2"), _block(config, "BLOCK_N2")
    q, k, v, varlen = call.q, call.k, call.v, call.varlen
    batch, heads, kv_heads = call.batch, q.shape[-2], k.shape[-2]
    if batch == 0 or heads == 0 or (call.max_seqlen_q == 0 and call.max_seqlen_k == 0):
        return
    cu_q = call.cu_seqlens_q if varlen else q
    cu_k = call.cu_seqlens_k if varlen else q
    shared = _shared(call)
    meta, args = shared["meta"], shared["args"]
    lse = call.lse
    delta = torch.empty_like(lse)
    lse_strides = _lse_strides(lse, varlen)
    if call.max_seqlen_q > 0:
        dlse = call.dlse if call.dlse is not None else lse
        if call.dlse is None:
            g_strides = (0, 0, 0)
        elif varlen:
            g_strides = (0, dlse.stride(0), dlse.stride(1))
        else:
            g_strides = dlse.stride()
        _bwd_preprocess[(triton.cdiv(call.max_seqlen_q, 64), heads, batch)](
            call.out, call.dout, dlse, delta, cu_q,
            *_bsh(call.out, varlen), *_bsh(call.dout, varlen), *g_strides, *lse_strides,
            call.max_seqlen_q, q.shape[0], HEAD_DIM=meta["HEAD_DIM"], VARLEN=varlen,
            HAS_DLSE=call.dlse is not None, BLOCK_M=64, BLOCK_D=meta["BLOCK_D"], num_warps=4)
    strides = (*_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(call.dout, varlen))
    tma = config.get("TMA", False) and _tma_fits(call, (q, k, v, call.dout))
    block_d = meta["BLOCK_D"]
    if call.max_seqlen_k > 0:
        q_in, do_in = q, call.dout
        if tma:
            q_in, do_in = _descriptor(q, m1, block_d), _descriptor(call.dout, m1, block_d)
        _bwd_dkdv_kernel[(triton.cdiv(call.max_seqlen_k, n1), kv_heads, batch)](
            q_in, k, v, do_in, lse, delta, call.dk, call.dv, cu_q, cu_k, *strides,
            *_bsh(call.dk, varlen), *_bsh(call.dv, varlen), *lse_strides,
            scale=call.scale, **args, **meta, BLOCK_M=m1, BLOCK_N=n1, TMA=tma,
            num_warps=config["WARPS1"], num_stages=config["STAGES1"])
    if call.max_seqlen_q > 0:
        k_in, v_in = k, v
        if tma:
            k_in, v_in = _descriptor(k, n2, block_d), _descriptor(v, n2, block_d)
        _bwd_dq_kernel[(triton.cdiv(call.max_seqlen_q, m2), heads, batch)](
            q, k_in, v_in, call.dout, lse, delta, call.dq, cu_q, cu_k, *strides,
            *_bsh(call.dq, varlen), *lse_strides,
            scale=call.scale, **args, **meta, BLOCK_M=m2, BLOCK_N=n2, TMA=tma,
            num_warps=config["WARPS2"], num_stages=config["STAGES2"])
