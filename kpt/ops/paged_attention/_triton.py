"""Triton backend of ``paged_attention``: decode and chunked prefill in one kernel, split-KV when
the batch gives too few programs, fp8 caches.

One program owns ``BLOCK_M`` (query token, head) rows of one kv head of one sequence: the
``GROUP`` query heads that share a kv head are packed into the rows, so each key tile is read
once per group (decode: all of a group's heads in one tile). Keys are visited in tiles of
``BLOCK_N`` positions; each position's page comes from the block table (``j // PAGE_SIZE``), so
any page size from 1 to 256 and both layouts (through the strides) run the same code. Page ids
are clamped to the cache and lengths to the table's capacity: whatever the tables hold, no
access leaves the tensors. Softmax is flash_attention's: exp2 domain, fp32 accumulators, P
rounded to q's dtype before the P @ V product, rows that see no key give 0 and lse -inf, logits
past float32's range as its reference.py defines (lse +inf for a +inf logit; out NaN).

fp8 caches (e4m3 / e5m2): a tile is converted to q's dtype, which is exact (every fp8 value is
a bf16 and an fp16 value), and the scales go where the reference's float32 products are:
``k_scale`` into the logit multiplier (s = (q . k8) * k_scale * scale), ``v_scale`` into the
output (out = (P @ v8) * v_scale / l). The dequantised values are never rounded to 16 bits, as
in the reference (``float(cache) * scale`` in float32); only the order of float32 products
differs. On sm_90 Triton converts e4m3 to bf16 through fp16 and float32, one scalar F2F per
value (ptxas, decode B64 page 16); converting to fp16 instead (one packed instruction per two
values, with the products in fp16 after a power-of-two scaling of q into fp16's range) took
the F2Fs out but measured no faster: 284.8-292.3 µs on an H100 (2026-12-07, two timings of
the same tiles in one run), against 289.1-292.9 for the bf16 conversion on other H100s
(bench/RESULTS.md). The kernel keeps q's dtype: the conversion is not what holds fp8 decode
at 0.82-0.83x of the bf16 time.

fp8 decode: Nsight Compute on an H200 (2026-12-07, decode B64, 4096 keys, page 16, 32/8 heads,
e4m3, 128-key tiles, triton 3.6): 168 registers per thread allow 3 blocks per SM, so the 512
blocks run in 1.29 waves, the last one a third full; DRAM throughput 39% of peak, 0.49
instructions issued per cycle per scheduler with 2.3 active warps (no eligible warp in 51% of
cycles): latency- and issue-bound, not bandwidth-bound. A cap of ``FP8_DECODE_MAXNREG`` = 128
registers fits 4 blocks per SM, one wave for this grid: 264.3 µs against 285.8 uncapped in the
same run (bf16: 252.6, one wave at 128 registers already), with the same output; the cap is
the default for fp8 decode on NVIDIA GPUs. Splitting the keys in two instead gave the same
264 µs; other tiles, warps and stages (64- and 256-key tiles, 8 warps, 2 or 4 stages, with
and without a cap) ran at 265-595 µs (``KPT_BENCH_PAGED_CONFIG`` times any config). So fp8
decode runs at 1.05x the bf16 time on the H200 (whose bf16 decode is near its bandwidth), 0.6x
being the target: the remaining limit is the per-key instruction count at low occupancy.

Split-KV: decode of a few long sequences gives batch x kv heads programs, far fewer than the
SMs, each streaming a long key range. Then the key range of every program is cut into
``splits`` shares of whole key tiles; share ``i`` writes its normalised output and lse to
float32 workspaces (torch's allocator, so CUDA-graph capture takes them from the graph's pool)
and ``_combine_kernel`` merges the shares through their lse. The split count comes from shapes
only (batch, heads, the table's capacity, the SM count), on the host, never from the lengths;
the shares themselves are cut on the device from each sequence's actual length, so every share
of a short sequence stays busy. No host sync: safe under CUDA graphs and ``Plan.run``.

Chunked prefill (varlen queries under a causal bound): a query tile's keys before its first
query's diagonal are seen whole by all its rows and take the plain P V product; only the tiles
the diagonal cuts take ``masked_pv`` (whose rare non-finite branch holds three more
accumulators). Compiled for sm_90 (Triton 3.9, 64-row tiles, D = 128): with 4 warps the
varlen kernel needs 255 registers and 752-792 bytes of stack (it did before the split too:
the likely reason chunked prefill ran at 105 TFLOP/s on an H100, bench/RESULTS.md), with 8
warps 208 bytes, so causal varlen tiles of 64 rows default to 8 warps. Without a causal bound
or window (a cascade's shared level: every query sees the whole level) no tile is masked but
the key tail, and 64-row tiles run faster at 4 warps than at 8.

Wide tiles (``wide_tiles``): such unmasked varlen calls with at least ``WIDE_ROWS`` (query,
head) rows per kv head (head dims up to 128, NVIDIA GPUs) take 128-row tiles at 8 warps by
default, split-KV into at most one block per SM (not ``num_splits``'s two). Alone they run as
fast as the 64-row tiles at 4 warps split twice as finely, and they leave the SMs' other slots
to work beside them: a cascade's decode level on its own stream (cascade_attention's
benchmark, 64 queries x 32 heads over 16384 shared keys, H100, 2026-12-07, CUDA-graph replay
of the steps through this launcher: the shared level 87.7 µs against 88.1, both levels
overlapped 99.1 against 114.4; 64-row tiles at 8 warps 161.4, 128-row tiles split 16 ways 94.3
alone, 110.8 overlapped; bench/RESULTS.md).

Chunked prefill through flash_attention (``GATHER``): a prefill chunk is compute-bound, and
the paged kernel above computes at a fraction of flash_attention's rate (bench/RESULTS.md). So
for 16-bit caches, ``_gather_kernel`` copies each sequence's visible pages into one contiguous
(keys, Hkv, D) buffer per K and V (torch's allocator: graph capture takes them from the
graph's pool), packed by the clamped lengths' prefix sums computed on the device, and
flash_attention's varlen forward runs on it (its own dispatch, or ``FLASH`` names a backend),
writing this call's ``out`` and ``lse``. The copy reads and writes every visible key once: at
the issue's prefill shape (4 x 2048 new over 8192 cached, 8 kv heads, D 128) 168 MB each way,
under a tenth of the attention's time on an H100 (measured 2026-12-07: 158 µs, against 1799
µs for flash_attention's varlen forward, which on Hopper is the sm90 overlap kernel; 2116 µs
in all, 1.07x flash on the same keys as a dense batch, against 5.75x for the in-place kernel;
bench/RESULTS.md, scripts/paged_prefill_parts.py). Its cost is memory: the buffers hold the
whole batch's keys, so it is the default only for prefill-sized chunks (many query rows per kv
head, enough query tiles to fill flash_attention's grid: ``paged_attention.prefill_sized``)
and buffers up to ``GATHER_MAX_BYTES``. Page ids are clamped to the
cache and lengths to the table's capacity, as in the kernel above. fp8 caches stay on the
paged kernel (the copy would round the dequantised keys to 16 bits, which the reference never
does).

Repeat calls (``fast``): a call whose signature was validated and dispatched before
(``Op.launch_keyed``: decode, or chunked prefill with ``max_seqlen_q`` given and nothing read
back) goes to a launcher bound once for it (``kpt.ops._triton_launch.bind``): the launch
numbers of ``_Launch`` and the compiled kernels are fixed, and each call passes only its
tensors (and the split workspaces it allocates) to the kernels' launchers, skipping
``JITFunction.run``'s argument binding and specialisation. The gather path keeps the full
path.

Config keys (``run``'s ``config``): ``BLOCK_M`` ((query, head) rows per tile; default the
rows of a sequence's queries up to 64, 128 for wide tiles), ``BLOCK_N`` (keys per tile),
``SPLITS`` (1: never split; absent: ``num_splits``, or one block per SM for wide tiles),
``num_warps`` (default 4; 8 for masked varlen tiles of 64 rows and for wide tiles),
``num_stages`` (default ``DECODE_STAGES`` for decode, 2 for varlen), ``maxnreg`` (a register
cap per thread, NVIDIA only; absent: ``FP8_DECODE_MAXNREG`` for fp8 decode, else none);
``GATHER`` (True / False; absent: ``gathers``'s rule), ``FLASH`` (the flash_attention backend
of a gathered call; absent: its dispatch).

Standing (H100, 2026-12-07, bench/RESULTS.md): bf16 decode at 1.03x SDPA's time on the same
keys stored contiguously (page 16 and page 1) and 1.11x with split-KV (B1, 65536 keys); fp8
decode at 0.82-0.83x this kernel's bf16 time (target 0.6x). ``bench/bench_paged_attention.py`` has
the rows and their targets, and ``KPT_BENCH_PAGED_CONFIG`` times any config above; the split
model's constants (``MIN_BLOCKS_PER_SM``, ``BLOCK_OVERHEAD_TILES``) are first estimates.
Compiled for sm_90 without a GPU (Triton 3.9, ptxas; Llama-3-8B decode, 16-token pages), every
variant pipelines its K/V loads through cp.async without spills: unsplit bf16 128 registers and
38 KB shared (4 blocks per SM), split 150 (3), fp8 with 128-key tiles 170 (2).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kpt.ops._common import triton_interpreting
from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import masked_pv as _masked_pv
from kpt.ops._triton_compat import mm as _mm
from kpt.ops.flash_attention._triton import _tanh
from kpt.ops.paged_attention import prefill_sized

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Query rows per kv head from which an unmasked varlen call (no causal bound, no window: a
# cascade's shared level) takes WIDE_ROWS-row tiles at 8 warps, split-KV into at most one block
# per SM (module doc, "Wide tiles").
WIDE_ROWS = 128
# Pipeline stages of a decode launch (varlen launches keep 2). A config sweep of decode B64,
# context 4096, page 16, 32/8 heads, D 128 on an H100 (2026-12-07, CUDA-graph replay, 4 warps):
# bf16 64-key tiles 422.2 µs at 2 stages, 349.1 at 3 (SDPA on the same keys stored
# contiguously: 344.2); 128-key tiles 348.5 / 347.9; fp8 e4m3 128-key tiles 291.5 / 289.1.
DECODE_STAGES = 3
# Resident blocks an SM needs for HBM, not latency, to bound its bandwidth (a block's 2-stage
# pipeline keeps about one K+V tile in flight); below that the cost model stretches the time.
MIN_BLOCKS_PER_SM = 2
# Fixed cost of one block in key tiles: the pipeline's first load, the q tile, the output
# (and, when split, its float32 share written and read back once more by the combine).
BLOCK_OVERHEAD_TILES = 2


@triton.jit
def _attend(acc, m_i, l_i, q, start, hi, row_ok, qpos, b, kh, TABLE, K, V, stride_table,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, num_pages, mul,
            mul_out, window_left, window_right, PAGE_SIZE: tl.constexpr,
            HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            SOFTCAP: tl.constexpr, FP8: tl.constexpr, MASKED: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile from ``start``: its pages through the block table, the scores, the online
    softmax update. ``MASKED``: some row may not see some key of the tile (the band), so P V
    leaves hidden keys out (masked_pv); else (every row sees every key before ``hi``) the
    plain product."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
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
    if FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    qk = _mm(q, tl.trans(k))
    if SOFTCAP:
        s = _tanh(qk * mul) * mul_out
    else:
        s = qk * mul
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RIGHT:
        ok = ok & (cols[None, :] <= qpos[:, None] + window_right)
    if HAS_LEFT:
        ok = ok & (cols[None, :] >= qpos[:, None] - window_left)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # >= -FLT_MAX (the kernel's start): no inf - inf
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:  # a NaN / inf value of a key some row cannot see stays out of it
        acc = _masked_pv(p, v, ok, acc * alpha[:, None])
    else:
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _paged_kernel(
    Q, K, V, OUT, LSE, TABLE, LENS, CU_Q, K_SCALE, V_SCALE,
    stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, stride_lh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_table,
    stride_k_scale, stride_v_scale, num_pages, max_pages, total_q, splits, mul_in, mul_out,
    window_left, window_right,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, FP8: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2)
    # Keys before a sequence's end that a row does not see: only with a left window, or a
    # right bound on queries that are not the last token (chunked prefill). Decode under a
    # plain causal mask sees every key it loads (columns past the end load as 0).
    MASK_INSIDE: tl.constexpr = HAS_LEFT or (VARLEN and HAS_RIGHT)
    # Unsplit, the code is the plain kernel's (a dynamic start of the key loop alone costs
    # ~15 registers per thread on sm_90, one resident block per SM less).
    if SPLIT:
        kh = tl.program_id(1) // splits
        share = tl.program_id(1) % splits
    else:
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
    if SPLIT:  # this program's share of the keys [lo, hi): whole tiles, of the actual length
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), splits), BLOCK_N) * BLOCK_N
        lo = lo + share * chunk
        hi = tl.minimum(hi, lo + chunk)
    mul = mul_in
    if FP8:
        mul = mul_in * tl.load(K_SCALE + kh * stride_k_scale)
    # -FLT_MAX, not -inf, as in flash_attention: a row whose keys so far are all masked (or
    # overflowed to -inf) keeps a finite shift, and no other shift hides its later logits.
    m_i = tl.full((BLOCK_M,), -3.4028234663852886e38, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Chunked prefill under a causal bound (no left window): the key tiles before the tile's
    # first query's last visible key are seen whole by every row and take the plain product
    # (no mask, no masked_pv); only the tiles the diagonal cuts take the masked one.
    full_end = lo
    if MASK_INSIDE and not HAS_LEFT:
        full_end = tl.maximum(lo, tl.minimum(diag_lo + window_right + 1, hi) // BLOCK_N
                              * BLOCK_N)
        for start in range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, start, hi, row_ok, qpos, b, kh, TABLE, K, V, stride_table,
                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, num_pages,
                mul, mul_out, window_left, window_right, PAGE_SIZE, HEAD_DIM, HAS_LEFT,
                HAS_RIGHT, SOFTCAP, FP8, False, BLOCK_N, BLOCK_D)
    for start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, start, hi, row_ok, qpos, b, kh, TABLE, K, V, stride_table,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, num_pages, mul,
            mul_out, window_left, window_right, PAGE_SIZE, HEAD_DIM, HAS_LEFT, HAS_RIGHT,
            SOFTCAP, FP8, MASK_INSIDE, BLOCK_N, BLOCK_D)
    # As flash_attention's epilogue: NaN logits (or a +inf one) leave l_i NaN, NaN out; a row
    # without a logit above -inf in this range (no key, overflow, an inf in q) ends with
    # l_i = 0: out 0, lse -inf.
    seen = l_i != 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(V_SCALE + kh * stride_v_scale)
    # Unsplit: the op's out and lse. Split: this share's float32 slice of the workspaces.
    if SPLIT:
        OUT += share.to(tl.int64) * stride_os
        LSE += share.to(tl.int64) * stride_ls
    tl.store(OUT + t64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # lse +inf where a logit is +inf (l_i is NaN then; the max skips NaN logits)
    l_fin = tl.where(seen & (m_i != float("inf")), l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_fin)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + t64 * stride_lt + head * stride_lh, lse, mask=row_ok)


# The gather path (GATHER) is the default for prefill-sized chunks while the contiguous K + V
# copy stays within GATHER_MAX_BYTES.
GATHER_MAX_BYTES = 1 << 30
GATHER_BLOCK_T = 64


@triton.jit
def _gather_kernel(
    CACHE, DST, TABLE, CU_K,
    stride_page, stride_slot, stride_head, stride_table, stride_dt, stride_dh,
    num_pages, max_pages,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Keys [tile * BLOCK_T, +BLOCK_T) of sequence b, kv head h, to DST rows CU_K[b] + j.
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(CU_K + b).to(tl.int64)
    n = tl.load(CU_K + b + 1).to(tl.int64) - start
    if tile * BLOCK_T >= n:
        return
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < n
    page = tl.load(TABLE + b.to(tl.int64) * stride_table
                   + tl.minimum(offs_t // PAGE_SIZE, max_pages - 1), mask=t_ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
    ok = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(CACHE + page[:, None] * stride_page + (offs_t % PAGE_SIZE)[:, None] * stride_slot
                + h * stride_head + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DST + (start + offs_t)[:, None] * stride_dt + h * stride_dh + offs_d[None, :],
             x, mask=ok)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, LSE, CU_Q,
    stride_ps, stride_pt, stride_ph, stride_qs, stride_qt, stride_qh,
    stride_ot, stride_oh, stride_lt, stride_lh, total_q, splits,
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One (token, head): lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) o_i. Tokens
    # outside every sequence are left alone, as the unsplit kernel leaves them.
    b = tl.program_id(2)
    h = tl.program_id(1)
    if VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b).to(tl.int64), 0), total_q)
        q_end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1).to(tl.int64), q_start), total_q)
        t = q_start + tl.program_id(0)
        if t >= q_end:
            return
    else:
        t = b.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    lse_s = tl.load(LSE_PART + offs_s.to(tl.int64) * stride_qs + t * stride_qt + h * stride_qh,
                    mask=s_ok, other=float("-inf"))
    top = tl.max(lse_s, 0)  # skips NaN
    top = tl.where(top == float("-inf"), 0.0, top)  # every share empty: no (-inf) - (-inf)
    w = tl.exp(lse_s - top)
    total = tl.sum(w, 0)  # NaN from a NaN share or a +inf one: NaN out, as unsplit
    # Shares without a logit above -inf weigh 0 (their outputs, zeros, are not even read); a
    # NaN weight makes the sum NaN whatever o holds.
    o = tl.load(O_PART + offs_s.to(tl.int64)[:, None] * stride_ps + t * stride_pt
                + h * stride_ph + offs_d[None, :],
                mask=(w > 0)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    seen = total != 0.0
    out = tl.sum(o * w[:, None], 0) / tl.where(seen, total, 1.0)
    tl.store(OUT + t * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    fin = tl.where(seen & (top != float("inf")), total, 1.0)  # a +inf share: lse +inf
    tl.store(LSE + t * stride_lt + h * stride_lh,
             tl.where(seen, top + tl.log(fin), float("-inf")))


def _cache_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(page, slot, head) strides in elements."""
    if layout == "NHD":
        return cache.stride(0), cache.stride(1), cache.stride(2)
    return cache.stride(0), cache.stride(2), cache.stride(1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs (CUs on ROCm) of a GPU; 0 for the CPU (the interpreter never splits by itself)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def num_splits(programs: int, key_tiles: int, sms: int) -> int:
    """How many shares to cut each program's keys into: the count with the least modelled time.

    The model is the busiest SM's work in key tiles: its blocks x (tiles per share + a fixed
    cost per block), stretched when the whole grid holds fewer than ``MIN_BLOCKS_PER_SM`` blocks
    per SM (HBM is then not saturated). Among near-equal counts (3%) the smallest wins: each
    share adds a float32 partial output and the combine kernel. Shapes only: ``programs`` =
    query tiles x kv heads x batch, ``key_tiles`` = the table's capacity in ``BLOCK_N`` tiles.
    """
    if sms <= 0 or programs >= MIN_BLOCKS_PER_SM * sms:
        return 1
    best_cost, best = math.inf, 1
    for splits in range(1, min(key_tiles, MAX_SPLITS) + 1):
        blocks = programs * splits
        per_block = -(-key_tiles // splits) + BLOCK_OVERHEAD_TILES
        cost = -(-blocks // sms) * per_block / min(1.0, blocks / (MIN_BLOCKS_PER_SM * sms))
        if cost < 0.97 * best_cost:
            best_cost, best = cost, splits
    return best


def gather_bytes(batch: int, capacity: int, heads_kv: int, head_dim: int, elem: int) -> int:
    """Bytes of the gather path's contiguous K and V buffers (every sequence at capacity)."""
    return 2 * batch * capacity * heads_kv * head_dim * elem


def gathers(call) -> bool:
    """Whether ``run`` takes the gather path by default: a prefill-sized chunked prefill
    (``paged_attention.prefill_sized``) of 16-bit caches on a GPU, with buffers within
    ``GATHER_MAX_BYTES``."""
    q = call.q
    return (call.varlen and call.k_scale is None and q.device.type == "cuda"
            and prefill_sized(call.batch, call.max_seqlen_q, q.shape[1], call.heads_kv,
                              q.device.index)
            and gather_bytes(call.batch, call.block_table.shape[1] * call.page_size,
                             call.heads_kv, q.shape[2], call.k_cache.element_size())
            <= GATHER_MAX_BYTES)


def gather(call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(k, v, cu_seqlens_k, max_seqlen_k): the sequences' visible keys and values packed
    contiguously, (total, Hkv, D), with their prefix sums (lengths clamped to the table's
    capacity). No host sync: the buffers are sized by the capacity."""
    capacity = call.block_table.shape[1] * call.page_size
    batch, heads_kv, d = call.batch, call.heads_kv, call.q.shape[2]
    dev = call.q.device
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    torch.cumsum(call.seq_lens.clamp(0, capacity), 0, out=cu_k[1:])
    dtype = call.k_cache.dtype
    k = torch.empty((batch * capacity, heads_kv, d), dtype=dtype, device=dev)
    v = torch.empty_like(k)
    if batch * capacity == 0:
        return k, v, cu_k, 0
    grid = (triton.cdiv(capacity, GATHER_BLOCK_T), heads_kv, batch)
    for cache, dst in ((call.k_cache, k), (call.v_cache, v)):
        _gather_kernel[grid](
            cache, dst, call.block_table, cu_k, *_cache_strides(cache, call.kv_layout),
            call.block_table.stride(0), dst.stride(0), dst.stride(1), cache.shape[0],
            call.block_table.shape[1], PAGE_SIZE=call.page_size, HEAD_DIM=d,
            BLOCK_T=GATHER_BLOCK_T, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)
    return k, v, cu_k, capacity


def _run_gathered(call, flash_backend: str | None) -> None:
    """The gather path: pages to contiguous buffers, then flash_attention's varlen forward
    writes ``call.out`` and ``call.lse`` (same layouts: (Tq, H, D) and (H, Tq))."""
    from kpt.ops.flash_attention import SPEC as FLASH
    from kpt.ops.flash_attention import Call as FlashCall
    from kpt.ops.flash_attention import _key, problem_of

    k, v, cu_k, max_k = gather(call)
    fcall = FlashCall(call.q, k, v, call.cu_seqlens_q, cu_k, call.max_seqlen_q, max_k,
                      call.scale, call.window_left, call.window_right, call.softcap, call.out,
                      call.lse)
    FLASH.launch_keyed(_key(fcall), lambda: problem_of(fcall), fcall, flash_backend, None)


def wide_tiles(call) -> bool:
    """Whether a launch takes the wide tiles by default: stacked queries over keys they all
    see (varlen, no causal bound, no window: a cascade's shared level), WIDE_ROWS rows or more
    per kv head, on an NVIDIA GPU (or the interpreter) with head dims up to 128 (measured
    there; a 128-row tile of a larger head dim, or on an AMD GPU's 64 KB of LDS, may not fit
    the shared memory its pipeline needs)."""
    return (call.varlen and call.window_left < 0 and call.window_right < 0
            and call.q.shape[2] <= 128 and torch.version.hip is None
            and call.max_seqlen_q * (call.q.shape[1] // call.heads_kv) >= WIDE_ROWS)


def configs(problem) -> list[dict]:
    """Launch variants; the first (empty: every choice by rule) is the default. Varlen calls
    add the in-place kernel at 4 and 8 warps and, for 16-bit caches, the gather path."""
    variants: list[dict] = [{}]
    if not problem["varlen"]:
        return variants
    # The in-place kernel's varlen warps: 8 by default for masked 64-row tiles (ptxas: 208
    # bytes of stack against 752-792 at 4), 4 without a mask (measured faster: module doc).
    variants += [{"GATHER": False, "num_warps": 4}, {"GATHER": False, "num_warps": 8}]
    if problem["kv_dtype"] not in (getattr(torch, "float8_e4m3fn", None),
                                   getattr(torch, "float8_e5m2", None)):
        variants.insert(1, {"GATHER": True})
    return variants


def run(call, config: dict) -> None:
    """Write call.out and call.lse."""
    q = call.q
    if call.batch == 0 or call.max_seqlen_q == 0 or q.shape[1] == 0:
        return
    gathered = config.get("GATHER")
    if gathered is None:
        gathered = gathers(call)
    if gathered:
        if not call.varlen or call.k_scale is not None:
            raise ValueError("paged_attention: the gather path serves chunked prefill "
                             "(cu_seqlens_q) of 16-bit caches only")
        _run_gathered(call, config.get("FLASH"))
        return
    launch = _Launch(call, config)
    o_dst, lse_dst = launch.destinations(call.out, call.lse)
    _paged_kernel[launch.grid](*launch.args(call, o_dst, lse_dst), **launch.kwargs)
    if launch.splits > 1:
        _combine_kernel[launch.combine_grid](*launch.combine_args(call, o_dst, lse_dst),
                                             **launch.combine_kwargs)


# Register cap per thread of fp8 decode launches on NVIDIA GPUs (module doc, "fp8 decode").
FP8_DECODE_MAXNREG = 128


def _register_cap(config: dict, fp8_decode: bool) -> dict:
    """The launch's ``maxnreg`` option: the config's, else ``FP8_DECODE_MAXNREG`` for fp8
    decode compiled for an NVIDIA GPU (not HIP, not the interpreter), else none."""
    if "maxnreg" in config:
        return {"maxnreg": config["maxnreg"]}
    if fp8_decode and torch.version.hip is None and not triton_interpreting():
        return {"maxnreg": FP8_DECODE_MAXNREG}
    return {}


class _Launch:
    """What ``run`` launches for a call of the in-place kernel: tiles, split count, grids,
    workspace shapes and the constexprs; everything here depends on the call's shapes,
    strides, dtypes and options only, so a repeat call (``fast``) reuses it."""

    def __init__(self, call, config: dict) -> None:
        q = call.q
        heads_kv = call.heads_kv
        group = q.shape[1] // heads_kv
        d = q.shape[-1]
        wide = wide_tiles(call)
        block_m = config.get("BLOCK_M", WIDE_ROWS if wide else max(16, min(
            64, triton.next_power_of_2(call.max_seqlen_q * group))))
        if block_m not in (16, 32, 64, 128):
            raise ValueError(f"paged_attention[triton]: config BLOCK_M must be 16, 32, 64 or "
                             f"128, got {block_m!r}")
        fp8 = call.k_scale is not None
        # fp8: twice the keys per tile, the same bytes in flight as a 16-bit tile of 64.
        block_n = config.get("BLOCK_N", 128 if fp8 and not call.varlen else 64)
        block_d = max(16, triton.next_power_of_2(d))
        q_tiles = triton.cdiv(call.max_seqlen_q * group, block_m)
        splits = config.get("SPLITS")
        if splits is None:
            span = call.block_table.shape[1] * call.page_size
            if call.window_left >= 0:  # a tile sees at most its rows' window
                span = min(span, call.window_left + call.max_seqlen_q + block_n)
            programs, sms = q_tiles * heads_kv * call.batch, _sm_count(q.device)
            if wide and sms > 0:  # at most one block per SM
                splits = max(1, min(sms // programs, triton.cdiv(span, block_n), MAX_SPLITS))
            else:
                splits = num_splits(programs, triton.cdiv(span, block_n), sms)
        self.splits = splits
        self.grid = (q_tiles, heads_kv * splits, call.batch)
        softcap = call.softcap > 0
        self.mul_in = call.scale / call.softcap if softcap else call.scale * LOG2E
        self.mul_out = call.softcap * LOG2E if softcap else 1.0
        self.kwargs = dict(
            GROUP=group, PAGE_SIZE=call.page_size, HEAD_DIM=d, VARLEN=call.varlen,
            HAS_LEFT=call.window_left >= 0, HAS_RIGHT=call.window_right >= 0, SOFTCAP=softcap,
            FP8=fp8, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=config.get("num_warps", 8 if wide or (
                call.varlen and block_m >= 64 and (call.window_right >= 0
                                                   or call.window_left >= 0)) else 4),
            num_stages=config.get("num_stages", 2 if call.varlen else DECODE_STAGES),
            **_register_cap(config, fp8 and not call.varlen))
        self.workspace = (splits, *q.shape)
        self.combine_grid = (call.max_seqlen_q, q.shape[1], call.batch)
        self.combine_kwargs = dict(VARLEN=call.varlen, HEAD_DIM=d,
                                   BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
                                   num_warps=4)

    def destinations(self, out: torch.Tensor, lse: torch.Tensor):
        """Where the paged kernel writes: the split workspaces, or the op's outputs."""
        if self.splits == 1:
            return out, lse
        dev = out.device
        return (torch.empty(self.workspace, dtype=torch.float32, device=dev),
                torch.empty(self.workspace[:3], dtype=torch.float32, device=dev))

    def _dst_strides(self, call, o_dst: torch.Tensor, lse_dst: torch.Tensor) -> tuple:
        if self.splits > 1:
            return (*o_dst.stride()[:3], *lse_dst.stride())
        lse = call.lse
        lse_t, lse_h = (lse.stride(1), lse.stride(0)) if call.varlen else lse.stride()
        return (0, call.out.stride(0), call.out.stride(1), 0, lse_t, lse_h)

    def args(self, call, o_dst: torch.Tensor, lse_dst: torch.Tensor) -> tuple:
        q = call.q
        scale_strides = [0 if s is None or s.numel() == 1 else 1 for s in (call.k_scale,
                                                                            call.v_scale)]
        return (q, call.k_cache, call.v_cache, o_dst, lse_dst, call.block_table, call.seq_lens,
                call.cu_seqlens_q if call.varlen else call.seq_lens, call.k_scale,
                call.v_scale, q.stride(0), q.stride(1), *self._dst_strides(call, o_dst, lse_dst),
                *_cache_strides(call.k_cache, call.kv_layout),
                *_cache_strides(call.v_cache, call.kv_layout), call.block_table.stride(0),
                *scale_strides, call.k_cache.shape[0], call.block_table.shape[1], q.shape[0],
                self.splits, self.mul_in, self.mul_out, call.window_left, call.window_right)

    def combine_args(self, call, o_dst: torch.Tensor, lse_dst: torch.Tensor) -> tuple:
        out, lse = call.out, call.lse
        lse_t, lse_h = (lse.stride(1), lse.stride(0)) if call.varlen else lse.stride()
        return (o_dst, lse_dst, out, lse, call.cu_seqlens_q if call.varlen else call.seq_lens,
                *o_dst.stride()[:3], *lse_dst.stride(), out.stride(0), out.stride(1), lse_t,
                lse_h, call.q.shape[0], self.splits)


def fast(call, config: dict):
    """``Backend.fast``: a launcher ``(q, k_cache, v_cache, block_table, seq_lens, out, lse[,
    cu_seqlens_q])`` for repeats of ``call`` (decode, or chunked prefill on the in-place
    kernel) that launches the compiled kernels directly (``kpt.ops._triton_launch``); None
    where ``run`` does anything else (the gather path, fp8 scales, empty batches), or under the
    interpreter. Decode writes every row of ``out`` and ``lse``, so the caller may pass them
    uninitialised; chunked prefill leaves tokens past the last query run alone."""
    from kpt.ops._triton_launch import bind

    q = call.q
    if (call.k_scale is not None or call.batch == 0 or call.max_seqlen_q == 0 or q.shape[1] == 0
            or q.device.type != "cuda"):
        return None
    if config.get("GATHER", gathers(call)):
        return None
    launch = _Launch(call, config)
    o_dst, lse_dst = launch.destinations(call.out, call.lse)
    # Decode passes seq_lens again where varlen passes cu_seqlens_q: bound as one tensor.
    cu = (call.cu_seqlens_q,) if call.varlen else ()
    inputs = (q, call.k_cache, call.v_cache, call.block_table, call.seq_lens)
    main = bind(_paged_kernel, launch.grid, launch.args(call, o_dst, lse_dst), launch.kwargs,
                (*inputs, o_dst, lse_dst, *cu))
    if main is None or launch.splits == 1:
        return main
    combine = bind(_combine_kernel, launch.combine_grid,
                   launch.combine_args(call, o_dst, lse_dst), launch.combine_kwargs,
                   (o_dst, lse_dst, call.out, call.lse, *(cu or (call.seq_lens,))))
    if combine is None:
        return None
    workspace, dev = launch.workspace, q.device

    def split_launch(q, k_cache, v_cache, block_table, seq_lens, out, lse, *cu_seqlens_q):
        o_part = torch.empty(workspace, dtype=torch.float32, device=dev)
        lse_part = torch.empty(workspace[:3], dtype=torch.float32, device=dev)
        main(q, k_cache, v_cache, block_table, seq_lens, o_part, lse_part, *cu_seqlens_q)
        combine(o_part, lse_part, out, lse, *(cu_seqlens_q or (seq_lens,)))

    return split_launch
