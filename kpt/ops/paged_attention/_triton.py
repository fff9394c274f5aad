"""Triton backend of ``paged_attention``: decode and chunked prefill in one kernel.

One program owns ``BLOCK_M`` (query token, head) rows of one kv head of one sequence: the
``GROUP`` query heads that share a kv head are packed into the rows, so each key tile is read
once per group (decode: all of a group's heads in one tile). Keys are visited in tiles of
``BLOCK_N`` positions; each position's page comes from the block table (``j // PAGE_SIZE``), so
any page size from 1 to 256 and both layouts (through the strides) run the same code. Page ids
are clamped to the cache and lengths to the table's capacity: whatever the tables hold, no
access leaves the tensors. Softmax is flash_attention's: exp2 domain, fp32 accumulators, P
rounded to the cache dtype before the P @ V product, rows that see no key give 0 and lse -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import mm as _mm
from kpt.ops.flash_attention._triton import _tanh

LOG2E = 1.4426950408889634


@triton.jit
def _paged_kernel(
    Q, K, V, OUT, LSE, TABLE, LENS, CU_Q,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_table,
    num_pages, max_pages, total_q, mul_in, mul_out, window_left, window_right,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2)
    kh = tl.program_id(1)
    n = tl.minimum(tl.maximum(tl.load(LENS + b), 0), max_pages * PAGE_SIZE)
    if VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b).to(tl.int64), 0), total_q)
        q_end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1).to(tl.int64), q_start), total_q)
        m = (q_end - q_start).to(tl.int32)
    else:
        q_start = b.to(tl.int64)
        m = 1
    row0 = tl.program_id(0) * BLOCK_M
    if row0 >= m * GROUP:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kh * GROUP + rows % GROUP
    row_ok = tok < m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t64 = q_start + tok.to(tl.int64)
    q = tl.load(Q + t64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Absolute position of each query: the sequence's queries are its last m tokens.
    qpos = n - m + tok
    diag_lo = n - m + row0 // GROUP
    diag_hi = n - m + tl.minimum((row0 + BLOCK_M - 1) // GROUP, m - 1)
    lo = 0
    hi = n
    if HAS_LEFT:
        lo = tl.maximum(diag_lo - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(diag_hi + window_right + 1, n)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        page = tl.load(TABLE + b.to(tl.int64) * stride_table + cols // PAGE_SIZE, mask=col_ok,
                       other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        slot = (cols % PAGE_SIZE).to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_ks + kh * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vs + kh * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _mm(q, tl.trans(k))
        if SOFTCAP:
            s = _tanh(qk * mul_in) * mul_out
        else:
            s = qk * mul_in
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_RIGHT:
            ok = ok & (cols[None, :] <= qpos[:, None] + window_right)
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= qpos[:, None] - window_left)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(OUT + t64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + t64 * stride_lt + head * stride_lh, lse, mask=row_ok)


def _cache_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(page, slot, head) strides in elements."""
    if layout == "NHD":
        return cache.stride(0), cache.stride(1), cache.stride(2)
    return cache.stride(0), cache.stride(2), cache.stride(1)


def run(call, config: dict) -> None:
    """Write call.out and call.lse."""
    q, out, lse = call.q, call.out, call.lse
    batch, heads_kv = call.batch, call.heads_kv
    if batch == 0 or call.max_seqlen_q == 0 or q.shape[1] == 0:
        return
    group = q.shape[1] // heads_kv
    d = q.shape[-1]
    block_m = max(16, min(64, triton.next_power_of_2(call.max_seqlen_q * group)))
    block_n = config.get("BLOCK_N", 64)
    block_d = max(16, triton.next_power_of_2(d))
    softcap = call.softcap > 0
    mul_in = call.scale / call.softcap if softcap else call.scale * LOG2E
    mul_out = call.softcap * LOG2E if softcap else 1.0
    lse_t, lse_h = (lse.stride(1), lse.stride(0)) if call.varlen else lse.stride()
    cu = call.cu_seqlens_q if call.varlen else call.seq_lens
    grid = (triton.cdiv(call.max_seqlen_q * group, block_m), heads_kv, batch)
    _paged_kernel[grid](
        q, call.k_cache, call.v_cache, out, lse, call.block_table, call.seq_lens, cu,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse_t, lse_h,
        *_cache_strides(call.k_cache, call.kv_layout), *_cache_strides(call.v_cache,
                                                                       call.kv_layout),
        call.block_table.stride(0), call.k_cache.shape[0], call.block_table.shape[1],
        q.shape[0], mul_in, mul_out, call.window_left, call.window_right,
        GROUP=group, PAGE_SIZE=call.page_size, HEAD_DIM=d, VARLEN=call.varlen,
        HAS_LEFT=call.window_left >= 0, HAS_RIGHT=call.window_right >= 0, SOFTCAP=softcap,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
