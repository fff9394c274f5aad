"""Triton kernels of ``moe_route`` and ``fused_moe`` (design notes: ``TRITON_NOTES.md``).

``moe_route``: one kernel; a program scores BLOCK_T tokens held as a (BLOCK_T, groups,
experts per group) tile, padded to powers of two.

``fused_moe``: five launches (fp8: six; top_k == 1: four), all sized from shapes only (no host
sync, graph-safe):

1. ``_align_count`` / ``_align_scatter``: the pairs (token, slot j) sorted by local expert,
   each expert padded to BLOCK_M, as ``kpt.ops.moe.align`` specifies (stable, sentinel T*k).
2. fp8 only, ``_quant_x``: x quantised 1x128 along H, exactly as ``quantize_fp8(x, "block")``.
3. ``_gemm1``: a BLOCK_M block of one expert's pairs gathers its x rows and runs the gate and up
   tiles of w13 in one K loop (two accumulators), then writes ``act(gate) * up`` rounded to
   x's dtype into the intermediate (P, I), row = sorted position (fp8: quantised 1x128 in the
   epilogue, the tile being one 128-column block).
4. ``_gemm2``: intermediate rows (contiguous, no gather) @ w2[e].T times the pair's routing
   weight, into a per-pair buffer (T*k, H), float32 or x's dtype (``PARTIAL_FP32``; top_k ==
   1: straight into out).
5. ``_sum_k``: out[t] = sum over j of the pair rows with a local expert, in order j = 0..k-1
   (deterministic), one rounding to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._common import triton_interpreting
from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import grouped_tile
from kpt.ops._triton_compat import rnd as _rnd
from kpt.ops.moe.reference import Alignment, capacity

MAX_EXPERTS = 1024  # a routing row / the align one-hot is one register tile of <= 1024 experts
SCALE_BLOCK = 128  # fp8 block scales: 1x128 activations, 128x128 weights
FP8_MAX = tl.constexpr(448.0)  # float8_e4m3fn
MIN_SCALE = tl.constexpr(2.0**-126)  # quantize_fp8's floor of a scale (smallest normal float32)
QUANTS = {"none": 0, "fp8": 1, "int4": 2}
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# A selection key below every real one (a real key is >= key(-inf) << 32).
_DEAD = tl.constexpr(-(2**63))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _reasons_common(p) -> list[str]:
    reasons = []
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


if triton_interpreting():

    @triton.jit
    def _to_e4m3(v):
        """fp32 (|v| <= 448 or NaN) to e4m3, to nearest even. The interpreter's own cast drops
        the carry of a mantissa that rounds up into the next binade (124.3 -> 64) and turns
        NaN into 384, so the bits are built here: the value rounded in float32 (3 mantissa
        bits for normals, multiples of 2^-9 below 2^-6), then encoded."""
        bits = v.to(tl.uint32, bitcast=True)
        mag = tl.abs(v)
        rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000
        normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
        sub = (((mag + 16384.0) - 16384.0) * 512.0).to(tl.uint32)  # ulp at 2^14 is 2^-9
        code = tl.where(mag < 0.015625, sub, normal) | ((bits >> 24) & 0x80)
        code = tl.where(v == v, code, 0x7F)
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)

else:

    @triton.jit
    def _to_e4m3(v):
        return v.to(tl.float8e4nv)  # cvt.rn.satfinite: to nearest even


# ---- moe_route ------------------------------------------------------------------------------


@triton.jit
def _order_key(v):
    """int32 whose signed order is v's float order (v not NaN, -0.0 normalised)."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _route_kernel(
    LOGITS, BIAS, W_OUT, ID_OUT, T, stride_lt, stride_le, scaling,
    E: tl.constexpr, TOP_K: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, EG_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    # Experts sit at (g, j) -> g * PER + j: a real group per g when grouped, else rows of
    # EG_PAD experts (a 3-D tile without a size-1 middle dim keeps registers low).
    PER: tl.constexpr = E // GROUPS if GROUPS > 1 else EG_PAD
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    g = tl.arange(0, G_PAD)
    j = tl.arange(0, EG_PAD)
    flat = g[:, None] * PER + j[None, :]
    e_ok = (j[None, :] < PER) & (flat < E)
    expert = tl.where(e_ok, flat, E)  # padding: id E, never real
    ok = t_ok[:, None, None] & e_ok[None, :, :]
    x = tl.load(LOGITS + offs_t[:, None, None].to(tl.int64) * stride_lt
                + expert[None, :, :] * stride_le, mask=ok, other=float("-inf")).to(tl.float32)

    # Scores in float32; padding experts score 0 and never reach a selection.
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = tl.max(tl.max(x, 2), 1)
        p = tl.where(ok, tl.exp(x - m[:, None, None]), 0.0)
        s = tl.math.div_rn(p, tl.sum(tl.sum(p, 2), 1)[:, None, None])
    s = tl.where(ok, s, 0.0)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(BIAS + expert, mask=e_ok, other=0.0)[None, :, :]
    # NaN selects as -inf; -0.0 as +0.0, so that equal values tie on the id.
    sel = tl.where(sel == sel, sel, float("-inf"))
    sel = tl.where(sel == 0.0, 0.0, sel)
    live = ok
    if GROUPS > 1:
        # Group score: the sum of the group's two largest (the largest alone for one expert).
        j3 = j[None, None, :]
        pad_sel = tl.where(ok, sel, float("-inf"))
        m1 = tl.max(pad_sel, 2)
        if PER > 1:
            first = tl.min(tl.where(pad_sel == m1[:, :, None], j3, EG_PAD), 2)
            m2 = tl.max(tl.where(j3 == first[:, :, None], float("-inf"), pad_sel), 2)
            score = m1 + m2
        else:
            score = m1
        score = tl.where(score == score, score, float("-inf"))
        score = tl.where(score == 0.0, 0.0, score)
        # Keep TOPK_GROUPS groups: packed (score key, reversed id) maxima, ties to the lower id.
        gkey = (_order_key(score).to(tl.int64) << 32) | (G_PAD - 1 - g)[None, :].to(tl.int64)
        gkey = tl.where((g < GROUPS)[None, :], gkey, _DEAD)
        kept = tl.zeros((BLOCK_T, G_PAD), tl.int32)
        for _ in range(TOPK_GROUPS):
            best = tl.max(gkey, 1)
            hit = gkey == best[:, None]
            kept = kept | hit.to(tl.int32)
            gkey = tl.where(hit, _DEAD, gkey)
        live = live & (kept[:, :, None] > 0)

    # Top-k: one int64 max per step over (key of sel, 2^31 - 1 - expert id) picks the largest
    # sel, ties to the lower id; dropped groups and padding sit at _DEAD, below -inf's key.
    key = (_order_key(sel).to(tl.int64) << 32) | (2147483647 - expert)[None, :, :].to(tl.int64)
    key = tl.where(live, key, _DEAD)
    kk = tl.arange(0, K_PAD)
    weights = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for i in range(TOP_K):
        best = tl.max(tl.max(key, 2), 1)
        chosen = 2147483647 - best.to(tl.int32)
        hit = expert[None, :, :] == chosen[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, s, 0.0), 2), 1)
        key = tl.where(hit, _DEAD, key)
        weights = tl.where(kk[None, :] == i, w[:, None], weights)
        ids = tl.where(kk[None, :] == i, chosen[:, None], ids)
    if RENORM:
        weights = tl.math.div_rn(weights, tl.sum(weights, 1)[:, None])
    weights = weights * scaling
    out_ok = t_ok[:, None] & (kk < TOP_K)[None, :]
    dst = offs_t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    tl.store(W_OUT + dst, weights, mask=out_ok)
    tl.store(ID_OUT + dst, ids, mask=out_ok)


def _route_tile(e: int, groups: int) -> tuple[int, int]:
    """(G_PAD, EG_PAD) of the route tile: the groups and their experts, powers of two;
    ungrouped, rows of up to 32 experts."""
    if groups > 1:
        return _pow2(groups), _pow2(e // groups)
    eg_pad = min(32, _pow2(e))
    return _pow2(e) // eg_pad, eg_pad


def _route_block_t(width: int, scores: int = 1024) -> int:
    """Tokens per program for ``scores`` scores per program (the default: ~1024, 8 per thread
    of 4 warps; 2048 doubles the registers, 96 -> 165 at E = 128 on sm_90)."""
    return max(1, min(128, scores // width))


def route_configs(problem) -> list[dict]:
    """BLOCK_T tokens per program and warps; the default first."""
    g_pad, eg_pad = _route_tile(problem["e"], problem["groups"])
    width = g_pad * eg_pad
    default = dict(BLOCK_T=_route_block_t(width), num_warps=4)
    others = [dict(BLOCK_T=_route_block_t(width, n), num_warps=w)
              for n, w in ((512, 2), (2048, 4), (2048, 8), (4096, 8))]
    return [default] + [c for i, c in enumerate(others) if c != default and c not in others[:i]]


def route_supports(problem) -> list[str]:
    reasons = _reasons_common(problem)
    g_pad, eg_pad = _route_tile(problem["e"], problem["groups"])
    if g_pad * eg_pad > MAX_EXPERTS:
        reasons.append(f"E={problem['e']} with {problem['groups']} groups pads to "
                       f"{g_pad * eg_pad} > {MAX_EXPERTS} scores per token (one register tile)")
    return reasons


def run_route(call, config: dict) -> None:
    """Write call.weights and call.ids."""
    logits = call.logits
    t, e = logits.shape
    if t == 0:
        return
    g_pad, eg_pad = _route_tile(e, call.groups)
    block_t = config.get("BLOCK_T") or _route_block_t(g_pad * eg_pad)
    bias = call.correction_bias
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, call.weights, call.ids, t, logits.stride(0), logits.stride(1),
        float(call.scaling), E=e, TOP_K=call.top_k, GROUPS=call.groups,
        TOPK_GROUPS=call.topk_groups, SIGMOID=call.scoring == "sigmoid",
        RENORM=bool(call.renormalize), HAS_BIAS=bias is not None, BLOCK_T=block_t,
        G_PAD=g_pad, EG_PAD=eg_pad, K_PAD=_pow2(call.top_k),
        num_warps=config.get("num_warps", 4))


# ---- alignment --------------------------------------------------------------------------------


@triton.jit
def _local_expert(IDS, EMAP, pair, ok, top_k, stride_it, stride_ij, stride_map, e_local,
                  e_global, HAS_MAP: tl.constexpr):
    """The local expert of each pair, -1 where none (not on this rank, or an id out of range:
    such ids never index anything)."""
    e = tl.load(IDS + (pair // top_k).to(tl.int64) * stride_it + (pair % top_k) * stride_ij,
                mask=ok, other=-1)
    ok = ok & (e >= 0) & (e < e_global)
    if HAS_MAP:
        e = tl.load(EMAP + e * stride_map, mask=ok, other=-1)
        ok = ok & (e >= 0) & (e < e_local)
    return tl.where(ok, e, -1)


@triton.jit
def _align_count(IDS, EMAP, COUNTS, tk, top_k, e_local, e_global, stride_it, stride_ij,
                 stride_map, HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                 E_PAD: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), tl.int32)
    for s0 in range(0, CHUNK, SUB):
        pair = c * CHUNK + s0 + tl.arange(0, SUB)
        e = _local_expert(IDS, EMAP, pair, pair < tk, top_k, stride_it, stride_ij, stride_map,
                          e_local, e_global, HAS_MAP)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
    tl.store(COUNTS + c * E_PAD + cols, counts)


@triton.jit
def _align_scatter(IDS, EMAP, COUNTS, SORTED, BLOCK_EXPERT, NUM_PADDED, tk, top_k, e_local,
                   e_global, stride_it, stride_ij, stride_map, n_chunks, p, share,
                   HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                   E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    # Every program sums all chunks' counts (a few KB from L2) instead of a serial scan pass.
    total = tl.zeros((E_PAD,), tl.int32)
    before = tl.zeros((E_PAD,), tl.int32)
    for r0 in range(0, n_chunks, SUB):
        r = r0 + tl.arange(0, SUB)
        tile = tl.load(COUNTS + r[:, None] * E_PAD + cols[None, :], mask=(r < n_chunks)[:, None],
                       other=0)
        total += tl.sum(tile, 0)
        before += tl.sum(tl.where((r < c)[:, None], tile, 0), 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    num_padded = tl.sum(padded, 0)
    if c == 0:
        tl.store(NUM_PADDED, num_padded)

    # This chunk's pairs, in pair order: slot = expert start + earlier chunks + earlier here.
    base = start + before
    for s0 in range(0, CHUNK, SUB):
        pair = c * CHUNK + s0 + tl.arange(0, SUB)
        e = _local_expert(IDS, EMAP, pair, pair < tk, top_k, stride_it, stride_ij, stride_map,
                          e_local, e_global, HAS_MAP)
        hot = (e[:, None] == cols[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, 0)
        slot = tl.sum(tl.where(hot > 0, base[None, :] + rank - 1, 0), 1)
        tl.store(SORTED + slot, pair, mask=e >= 0)
        base += tl.sum(hot, 0)

    # This program's share of [0, P): sentinels where no pair lands, and block_expert.
    real_end = start + total
    lo = c * share
    hi = tl.minimum(lo + share, p)
    for q0 in range(lo, hi, SUB):
        q = q0 + tl.arange(0, SUB)
        q_ok = q < hi
        # The expert holding slot q (E_PAD at or past num_padded: no column matches).
        owner = tl.sum((end[None, :] <= q[:, None]).to(tl.int32), 1)
        owner_end = tl.sum(tl.where(cols[None, :] == owner[:, None], real_end[None, :], 0), 1)
        tl.store(SORTED + q, tk, mask=q_ok & (q >= owner_end))
        tl.store(BLOCK_EXPERT + q // BLOCK_M, tl.where(q < num_padded, owner, -1),
                 mask=q_ok & (q % BLOCK_M == 0))


def align(ids: torch.Tensor, num_experts: int, block_m: int,
          expert_map: torch.Tensor | None = None) -> Alignment:
    """``kpt.ops.moe.align`` (same arguments and result, see ``reference.align``) in two
    launches instead of a dozen torch ops."""
    t, top_k = ids.shape
    tk = t * top_k
    e_local = num_experts
    e_global = e_local if expert_map is None else expert_map.shape[0]
    p = capacity(tk, e_local, block_m)
    dev = ids.device
    sorted_pairs = _workspace((p,), torch.int32, dev)
    block_expert = _workspace((p // block_m,), torch.int32, dev)
    num_padded = _workspace((1,), torch.int32, dev)
    e_pad = _pow2(e_local)
    sub = max(2, min(64, 4096 // e_pad))
    # About 128 chunks: every scatter program reads all chunks' counts (n_chunks x E_PAD).
    chunk = max(sub, _pow2(triton.cdiv(tk, 128)))
    n_chunks = max(1, triton.cdiv(tk, chunk))
    counts = _workspace((n_chunks, e_pad), torch.int32, dev)
    progs = max(n_chunks, triton.cdiv(p, 1024))
    share = triton.cdiv(triton.cdiv(p, progs), sub) * sub
    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    stride_map = expert_map.stride(0) if has_map else 0
    common = (tk, top_k, e_local, e_global, ids.stride(0), ids.stride(1), stride_map)
    _align_count[(n_chunks,)](ids, emap, counts, *common, HAS_MAP=has_map, CHUNK=chunk,
                              SUB=sub, E_PAD=e_pad, num_warps=4)
    _align_scatter[(progs,)](ids, emap, counts, sorted_pairs, block_expert, num_padded, *common,
                             n_chunks, p, share, HAS_MAP=has_map, CHUNK=chunk, SUB=sub,
                             E_PAD=e_pad, BLOCK_M=block_m, num_warps=4)
    return Alignment(sorted_pairs, block_expert, num_padded)


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised scratch (a seam: tests poison it to show no unwritten element is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---- fused_moe kernels --------------------------------------------------------------------------


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:  # gelu, erf form
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # gelu, tanh form: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z), without cancellation
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def _quant_rows(v):
    """quantize_fp8's 1x128 blocks of a (rows, 128) float32 tile: (fp8 tile, scale per row).
    A block holding NaN or +-inf gets a NaN scale and NaN values, as in the reference."""
    mag = tl.abs(v)
    amax = tl.max(tl.where(mag == mag, mag, float("inf")), 1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
    scale = tl.maximum(scale, MIN_SCALE)
    scale = tl.where(amax < float("inf"), scale, float("nan"))
    q = tl.math.div_rn(v, scale[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    return _to_e4m3(q), scale


@triton.jit
def _quant_x(X, Q, S, T, H, stride_xm, stride_xk, stride_qm, stride_sm, stride_sk,
             BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.program_id(1) * 128 + tl.arange(0, 128)
    ok = (rows < T)[:, None] & (ks < H)[None, :]
    v = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk, mask=ok,
                other=0.0).to(tl.float32)
    q, scale = _quant_rows(v)
    tl.store(Q + rows[:, None].to(tl.int64) * stride_qm + ks[None, :], q, mask=ok)
    tl.store(S + rows * stride_sm + tl.program_id(1) * stride_sk, scale, mask=rows < T)


@triton.jit
def _int4_tile(W, S, Z, k0, cols, n_ok, K, stride_wk, stride_wn, stride_sk, stride_sn,
               stride_zk, stride_zn, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
               HAS_ZERO: tl.constexpr, DTYPE: tl.constexpr):
    """(BLOCK_K, BLOCK_N) weight tile of kpt's int4 layout, dequantised and rounded to DTYPE
    exactly as int4_gemm does. Each packed word is loaded once ((BLOCK_K / 8, BLOCK_N)
    int32, a quarter of the bf16 tile's bytes) and its 8 nibbles unpacked in registers;
    BLOCK_K divides the group, so the step reads one scale (and zero) row."""
    BLOCK_N: tl.constexpr = cols.shape[0]
    word_rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(W + word_rows[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(word_rows < K // 8)[:, None] & n_ok[None, :], other=0)
    # int32 >> is arithmetic; the mask keeps the nibble. Row 8 w + j of the tile is nibble j.
    q = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
    q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)
    grp = k0 // GROUP_SIZE
    s = tl.load(S + grp * stride_sk + cols * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(Z + grp * stride_zk + cols * stride_zn, mask=n_ok, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N,), 8.0, tl.float32)
    return _cast((q - z[None, :]) * s[None, :], DTYPE)


@triton.jit
def _slot_tile(BLOCK_EXPERT, P, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUP_M: tl.constexpr):
    """This program's tile of the sorted slots x N: (its expert, -1 past num_padded; its slot
    rows; its column tile, columns and their bound)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), P, N, BLOCK_M, BLOCK_N, GROUP_M)
    e = tl.load(BLOCK_EXPERT + pid_m)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n, offs_n, offs_n < N


@triton.jit
def _slot_pairs(SORTED, rows, tk, top_k):
    """The pairs at slot ``rows``, which of them are real (padding holds tk), their tokens."""
    pair = tl.load(SORTED + rows)
    return pair, pair < tk, (pair // top_k).to(tl.int64)


@triton.jit
def _gemm1(
    X, XS, W, WS, WZ, SORTED, BLOCK_EXPERT, INTER, INTER_S, tk, top_k, N, K, P,
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
    stride_im, stride_in, stride_ism, stride_isk,
    QUANT: tl.constexpr, ACT: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    e, rows, pid_n, offs_n, n_ok = _slot_tile(BLOCK_EXPERT, P, N, BLOCK_M, BLOCK_N, GROUP_M)
    if e < 0:  # past num_padded
        return
    e = e.to(tl.int64)
    pair, r_ok, tok = _slot_pairs(SORTED, rows, tk, top_k)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = X + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    W = W + e * stride_we
    if QUANT != 2:
        # The gate rows n and the up rows I + n of w13[e], read as (BLOCK_K, BLOCK_N) tiles.
        g_ptrs = W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + N * stride_wn

    # Main loop over H: both tiles against the same gathered x tile.
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANT == 2:
            wg = _int4_tile(W, WS + e * stride_se, WZ + e * stride_ze, k0, offs_n, n_ok, K,
                            stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn,
                            BLOCK_K, GROUP_SIZE, HAS_ZERO, DTYPE)
            wu = _int4_tile(W, WS + e * stride_se, WZ + e * stride_ze, k0, offs_n + N, n_ok, K,
                            stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn,
                            BLOCK_K, GROUP_SIZE, HAS_ZERO, DTYPE)
            acc_g = _dot(a, wg, acc_g)
            acc_u = _dot(a, wu, acc_u)
        else:
            wg = tl.load(g_ptrs, mask=wmask, other=0.0)
            wu = tl.load(u_ptrs, mask=wmask, other=0.0)
            if QUANT == 1:
                # A fresh fp8 product per 128-K block, scaled and promoted to float32.
                kb = k0 // 128
                xs = tl.load(XS + tok * stride_xsm + kb * stride_xsk, mask=r_ok, other=0.0)
                s_row = WS + e * stride_se + kb * stride_sk
                sg = tl.load(s_row + (offs_n // 128) * stride_sn, mask=n_ok, other=0.0)
                su = tl.load(s_row + ((offs_n + N) // 128) * stride_sn, mask=n_ok, other=0.0)
                acc_g += tl.dot(a, wg) * xs[:, None] * sg[None, :]
                acc_u += tl.dot(a, wu) * xs[:, None] * su[None, :]
            else:
                acc_g = _dot(a, wg, acc_g)
                acc_u = _dot(a, wu, acc_u)
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_xk

    # Epilogue: act(gate) * up in float32, rounded to x's dtype (fp8: then quantised 1x128;
    # the tile is one 128-column block). Padding rows hold zeros and are written too.
    h = _act(acc_g, ACT) * acc_u
    dst = INTER + rows[:, None].to(tl.int64) * stride_im + offs_n[None, :] * stride_in
    if QUANT == 1:
        q, scale = _quant_rows(_rnd(h, DTYPE))
        tl.store(dst, q)
        tl.store(INTER_S + rows.to(tl.int64) * stride_ism + pid_n * stride_isk, scale)
    else:
        tl.store(dst, _cast(h, DTYPE), mask=n_ok[None, :])


@triton.jit
def _gemm2(
    A, AS, W, WS, WZ, SORTED, BLOCK_EXPERT, WEIGHTS, DST, tk, top_k, N, K, P,
    stride_am, stride_ak, stride_asm, stride_ask, stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
    stride_wt, stride_wj, stride_dm, stride_dn,
    QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, DTYPE: tl.constexpr,
    DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    e, rows, pid_n, offs_n, n_ok = _slot_tile(BLOCK_EXPERT, P, N, BLOCK_M, BLOCK_N, GROUP_M)
    if e < 0:
        return
    e = e.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    W = W + e * stride_we
    if QUANT != 2:
        w_ptrs = W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # Main loop over I; the intermediate's rows are this block's, contiguous.
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if QUANT == 2:
            w = _int4_tile(W, WS + e * stride_se, WZ + e * stride_ze, k0, offs_n, n_ok, K,
                           stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn,
                           BLOCK_K, GROUP_SIZE, HAS_ZERO, DTYPE)
            acc = _dot(a, w, acc)
        else:
            w = tl.load(w_ptrs, mask=wmask, other=0.0)
            if QUANT == 1:
                kb = k0 // 128
                sa = tl.load(AS + rows.to(tl.int64) * stride_asm + kb * stride_ask)
                sw = tl.load(WS + e * stride_se + (offs_n // 128) * stride_sn + kb * stride_sk,
                             mask=n_ok, other=0.0)
                acc += tl.dot(a, w) * sa[:, None] * sw[None, :]
            else:
                acc = _dot(a, w, acc)
            w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    # Epilogue: times the routing weight, to the pair's row (top_k == 1: the token's row).
    pair = tl.load(SORTED + rows)
    r_ok = pair < tk
    tok = pair // top_k
    wt = tl.load(WEIGHTS + tok.to(tl.int64) * stride_wt + (pair % top_k) * stride_wj, mask=r_ok,
                 other=0.0)
    y = acc * wt[:, None]
    row = tok if DIRECT else pair
    tl.store(DST + row[:, None].to(tl.int64) * stride_dm + offs_n[None, :] * stride_dn,
             _cast(y, DST.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_k(PART, IDS, EMAP, OUT, T, N, top_k, e_local, e_global, stride_it, stride_ij,
           stride_map, stride_pm, stride_pn, stride_om, stride_on, HAS_MAP: tl.constexpr,
           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    # Pairs without a local expert were never written: masked, never read.
    for j in range(top_k):
        pair = t * top_k + j
        e = _local_expert(IDS, EMAP, pair, t < T, top_k, stride_it, stride_ij, stride_map,
                          e_local, e_global, HAS_MAP)
        acc += tl.load(PART + pair[:, None].to(tl.int64) * stride_pm + n[None, :] * stride_pn,
                       mask=(e >= 0)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + t[:, None].to(tl.int64) * stride_om + n[None, :] * stride_on,
             _cast(acc, OUT.dtype.element_ty), mask=(t < T)[:, None] & n_ok[None, :])


# ---- fused_moe configs, reasons, launcher -------------------------------------------------------

# Per quant and regime: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of GEMM1,
# (BLOCK_N2, BLOCK_K2, num_warps2, num_stages2) of GEMM2, GROUP_M, PARTIAL_FP32. Spill-free
# and within 227 KB of shared memory on sm_90 (Triton 3.9, checked by compiling offline).
# fp8: GEMM1's N tile is one 128-column scale block (its epilogue quantises it) and K steps
# are one scale block; each step's fresh product lives beside the accumulators, so fp8 tiles
# stop at 64 rows (128 spills). Per-pair partials are float32 where they are small, x's dtype
# where their traffic counts (T*k*H*4 bytes written and read again).
_TILES = {
    "none": {
        "decode": ((16, 64, 128, 4, 4), (64, 128, 4, 4), 1, True),
        "small": ((32, 64, 128, 4, 4), (128, 64, 4, 4), 8, True),
        "medium": ((64, 128, 64, 8, 4), (128, 64, 4, 4), 8, False),
        "large": ((128, 128, 64, 8, 4), (256, 64, 8, 4), 8, False),
    },
    "fp8": {
        "decode": ((16, 128, 128, 4, 4), (64, 128, 4, 4), 1, True),
        "small": ((32, 128, 128, 8, 4), (128, 128, 4, 4), 8, True),
        "medium": ((64, 128, 128, 8, 4), (128, 128, 8, 4), 8, False),
        "large": ((64, 128, 128, 8, 4), (256, 128, 8, 3), 8, False),
    },
    "int4": {
        "decode": ((16, 64, 128, 4, 4), (64, 128, 4, 4), 1, True),
        "small": ((32, 64, 128, 4, 4), (128, 64, 4, 4), 8, True),
        "medium": ((64, 128, 64, 8, 4), (128, 64, 4, 4), 8, False),
        "large": ((128, 128, 64, 8, 3), (256, 64, 8, 3), 8, False),
    },
}
# Tuning variants beyond the regimes' defaults (same tuple layout).
_EXTRA = {
    "none": (((16, 128, 128, 4, 4), (128, 128, 4, 4), 1, True),
             ((64, 128, 64, 4, 4), (256, 64, 8, 3), 8, False),
             ((128, 64, 64, 8, 4), (128, 64, 8, 4), 8, False),
             ((128, 128, 64, 8, 3), (256, 64, 8, 3), 8, True)),
    "fp8": (((16, 128, 128, 4, 5), (128, 128, 4, 4), 1, True),
            ((64, 128, 128, 8, 5), (256, 128, 8, 3), 8, True)),
    "int4": (((16, 128, 128, 4, 4), (128, 128, 4, 4), 1, True),),
}
_KEYS1 = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_KEYS2 = ("BLOCK_N2", "BLOCK_K2", "num_warps2", "num_stages2")


def _as_config(entry: tuple) -> dict:
    g1, g2, group_m, partial_fp32 = entry
    return (dict(zip(_KEYS1, g1)) | dict(zip(_KEYS2, g2))
            | dict(GROUP_M=group_m, PARTIAL_FP32=partial_fp32))


# Pairs per expert above which the "large" tiles are the forward's default, per quant. bf16:
# from 128, where an expert's rows fill a 128-row tile on average; measured on an H100
# (2026-12-07, scripts/moe_profile.py, T 4096, 128 experts, top 8: 256 pairs per expert) the
# large tiles took 868.2 µs against 1028.8 for the medium ones (the bound was 512). fp8 and
# int4 keep 512 (not measured there; fp8's large tiles have 64 rows like its medium ones).
LARGE_FROM = {"none": 128, "fp8": 512, "int4": 512}


def _regime(t: int, top_k: int, e_global: int, large_from: int = 512) -> str:
    """The tile regime by pairs per expert; ``large_from``: the forward's LARGE_FROM[quant]
    (the backward keeps 512, where its tiles were chosen)."""
    per_expert = t * top_k / max(1, e_global)
    if per_expert <= 16:
        return "decode"
    if per_expert <= 48:
        return "small"
    if per_expert <= large_from:
        return "medium"
    return "large"


def configs(problem) -> list[dict]:
    """The default for the regime of pairs per expert first (decode: 16-row blocks, the
    weight read dominates), then the other regimes' tiles and a few variants, with the
    per-pair partials in the other dtype as well."""
    table = _TILES[problem["quant"]]
    default = _as_config(table[_regime(problem["t"], problem["top_k"], problem["e_global"],
                                       LARGE_FROM[problem["quant"]])])
    out = [default]
    for entry in (*table.values(), *_EXTRA[problem["quant"]]):
        for cfg in (_as_config(entry), _as_config(entry) | dict(
                PARTIAL_FP32=not entry[3])):
            if cfg not in out:
                out.append(cfg)
    return out


def supports(problem) -> list[str]:
    reasons = _reasons_common(problem)
    if problem.dtype not in _TL:
        reasons.append(f"x must be float16 or bfloat16, got {problem.dtype}")
    if problem["e"] > MAX_EXPERTS:
        reasons.append(f"{problem['e']} local experts > {MAX_EXPERTS} (the align kernels "
                       f"count experts in one register tile)")
    if problem.device_type == "cuda":
        cap = torch.cuda.get_device_capability(problem.device_index)
        if problem["quant"] == "fp8":
            if torch.version.hip is not None:
                reasons.append("fp8 experts are not validated on ROCm (OCP e4m3fn dot needs "
                               "gfx950)")
            elif cap < (8, 9):
                reasons.append(f"fp8 tl.dot needs sm_89 or newer (Ada, Hopper), device is "
                               f"sm_{cap[0]}{cap[1]}")
        elif torch.version.hip is None and cap < (8, 0):
            reasons.append(f"bf16/fp16 tl.dot with float32 accumulation needs sm_80 or newer, "
                           f"device is sm_{cap[0]}{cap[1]}")
    return reasons


def _fit(cfg: dict, call) -> dict:
    """The config's tiles shrunk to the problem (powers of two >= 16), with the K steps each
    inside one scale block (fp8: 128) or quantisation group (int4)."""
    h, i = call.h, call.i
    fit = lambda b, n: min(b, max(16, _pow2(n)))  # noqa: E731
    cfg = cfg | dict(BLOCK_N=fit(cfg["BLOCK_N"], i), BLOCK_K=fit(cfg["BLOCK_K"], h),
                     BLOCK_N2=fit(cfg["BLOCK_N2"], h), BLOCK_K2=fit(cfg["BLOCK_K2"], i))
    if call.quant == "fp8":
        cfg |= dict(BLOCK_N=SCALE_BLOCK, BLOCK_K=min(cfg["BLOCK_K"], SCALE_BLOCK),
                    BLOCK_K2=min(cfg["BLOCK_K2"], SCALE_BLOCK))
    elif call.quant == "int4":
        if call.group13 < h:
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], call.group13)
        if call.group2 < i:
            cfg["BLOCK_K2"] = min(cfg["BLOCK_K2"], call.group2)
    return cfg


def _weight_strides(w: torch.Tensor, quant: str) -> tuple[int, int, int]:
    """(expert, n, k) strides: (E, N, K) for bf16/fp16/fp8, (E, K // 8, N) words for int4."""
    if quant == "int4":
        return w.stride(0), w.stride(2), w.stride(1)
    return w.stride(0), w.stride(1), w.stride(2)


def _scale_strides(s: torch.Tensor | None, quant: str) -> tuple[int, int, int]:
    """(expert, n, k) strides of a weight's scales or zeros: fp8 (E, N/128, K/128), int4
    (E, K/group, N)."""
    if s is None:
        return 0, 0, 0
    return _weight_strides(s, quant)


def run(call, config: dict) -> None:
    """Write call.out (T, H)."""
    x, out = call.x, call.out
    t, h, i, top_k = call.t, call.h, call.i, call.top_k
    if t == 0:
        return
    quant = call.quant
    default = _as_config(_TILES[quant][_regime(t, top_k, call.e_global, LARGE_FROM[quant])])
    cfg = _fit(default | config, call)
    dev = x.device
    dtype = _TL[x.dtype]
    block_m = cfg["BLOCK_M"]
    tk = t * top_k
    ids, emap = call.ids, call.expert_map
    sorted_pairs, block_expert, _ = align(ids, call.e, block_m, emap)
    p = sorted_pairs.shape[0]
    fp8 = quant == "fp8"
    group13 = call.group13 if quant == "int4" else 0
    group2 = call.group2 if quant == "int4" else 0

    if fp8:
        a_in = _workspace((t, h), torch.float8_e4m3fn, dev)
        a_scale = _workspace((t, triton.cdiv(h, SCALE_BLOCK)), torch.float32, dev)
        _quant_x[(triton.cdiv(t, 16), triton.cdiv(h, SCALE_BLOCK))](
            x, a_in, a_scale, t, h, x.stride(0), x.stride(1), a_in.stride(0),
            a_scale.stride(0), a_scale.stride(1), BLOCK_T=16, num_warps=4)
        inter = _workspace((p, i), torch.float8_e4m3fn, dev)
        inter_s = _workspace((p, i // SCALE_BLOCK), torch.float32, dev)
    else:
        a_in, a_scale = x, None
        inter = _workspace((p, i), x.dtype, dev)
        inter_s = None

    w13, w2 = call.w13, call.w2
    s13, s2 = call.w13_scale, call.w2_scale
    z13, z2 = call.w13_zeros, call.w2_zeros
    # A pointer is needed where a tensor is absent; the kernels never read it (HAS_ZERO).
    z13_ptr, z2_ptr = (w13 if z13 is None else z13), (w2 if z2 is None else z2)
    bn, bm = cfg["BLOCK_N"], block_m
    _gemm1[(p // bm * triton.cdiv(i, bn),)](
        a_in, a_scale, w13, s13, z13_ptr, sorted_pairs, block_expert, inter, inter_s,
        tk, top_k, i, h, p, a_in.stride(0), a_in.stride(1),
        a_scale.stride(0) if fp8 else 0, a_scale.stride(1) if fp8 else 0,
        *_weight_strides(w13, quant), *_scale_strides(s13, quant), *_scale_strides(z13, quant),
        inter.stride(0), inter.stride(1), inter_s.stride(0) if fp8 else 0,
        inter_s.stride(1) if fp8 else 0,
        QUANT=QUANTS[quant], ACT=ACTS[call.activation], HAS_ZERO=z13 is not None,
        GROUP_SIZE=max(1, group13), DTYPE=dtype, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])

    direct = top_k == 1
    if direct:
        if emap is not None:
            out.zero_()  # tokens whose one expert is elsewhere
        dst = out
    else:
        dst = _workspace((tk, h), torch.float32 if cfg["PARTIAL_FP32"] else x.dtype, dev)
    bn2 = cfg["BLOCK_N2"]
    weights = call.weights
    _gemm2[(p // bm * triton.cdiv(h, bn2),)](
        inter, inter_s, w2, s2, z2_ptr, sorted_pairs, block_expert, weights, dst,
        tk, top_k, h, i, p, inter.stride(0), inter.stride(1),
        inter_s.stride(0) if fp8 else 0, inter_s.stride(1) if fp8 else 0,
        *_weight_strides(w2, quant), *_scale_strides(s2, quant), *_scale_strides(z2, quant),
        weights.stride(0), weights.stride(1), dst.stride(0), dst.stride(1),
        QUANT=QUANTS[quant], HAS_ZERO=z2 is not None, GROUP_SIZE=max(1, group2), DTYPE=dtype,
        DIRECT=direct, BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=cfg["BLOCK_K2"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg.get("num_warps2", 4),
        num_stages=cfg.get("num_stages2", 3))
    if direct:
        return
    block_t, block_n = 16, min(256, max(16, _pow2(h)))
    has_map = emap is not None
    _sum_k[(triton.cdiv(t, block_t), triton.cdiv(h, block_n))](
        dst, ids, emap if has_map else ids, out, t, h, top_k, call.e, call.e_global,
        ids.stride(0), ids.stride(1), emap.stride(0) if has_map else 0,
        dst.stride(0), dst.stride(1), out.stride(0), out.stride(1), HAS_MAP=has_map,
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)
