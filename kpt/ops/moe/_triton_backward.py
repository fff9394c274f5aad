"""Triton backward of ``fused_moe`` for bf16/fp16 experts: the gradients of x, w13, w2 and the
routing weights from ``dout`` (T, H), without a host sync (every size comes from shapes, so the
backward is CUDA-graph safe) and deterministic (no float atomics: every sum runs in a fixed
order). float32 experts stay with the PyTorch recompute (``_backward.py``): a float32
``tl.dot`` is TF32 unless asked otherwise, and the reused ``_gemm2`` does not ask.

For a pair (t, j) with local expert e, g / u the gate / up halves of ``x[t] @ w13[e].T`` and
``a = rnd(act(g) * u)`` the forward's intermediate, with ``w`` the routing weight:

    d      = dout[t] @ w2[e]                      (I,)   unweighted
    dweights[t, j] = d . a                        (= dout[t] . y_pair, y_pair = a @ w2[e].T)
    dh     = [d * u * act'(g), d * act(g)]        (2I,)  unweighted
    dx[t]  = sum_j w * dh @ w13[e]
    dw13[e] = sum over e's pairs of outer(dh, w * x[t])
    dw2[e]  = sum over e's pairs of outer(w * dout[t], a)

The routing weight multiplies the token-side operand, not dh: dh then feeds ``_gemm2`` of the
forward unchanged (dh @ w13[e] times the pair's weight is exactly its shape).

Steps (with every gradient: eight Triton launches and three small torch ops, none syncing;
a step whose gradients are not wanted is skipped):

1. ``_triton.align`` with the hidden pass's BLOCK_M: the forward's slot layout (pairs sorted by
   local expert, each expert padded to BLOCK_M with the sentinel T*k).
2. ``_hidden_bwd``: a BLOCK_M block of one expert's slots gathers its x and dout rows and runs
   one K loop over H into three accumulators (gate and up from w13[e], d from w2[e] read as
   (H, I)). The epilogue writes dh (P, 2I) and a (P, I) in x's dtype at the block's slot
   rows (padding slots: zeros), and ``d . a`` over its I tile into a per-(pair, I tile)
   float32 partial. Nothing (T*k, 2I) in float32 ever exists.
3. ``_gemm2`` of the forward: dh rows @ w13[e] (K = 2I) times the pair's weight, per pair
   into (T*k, H) (float32 or x's dtype, ``PARTIAL_FP32``; top_k == 1: straight into dx), then
   ``_sum_k``: j = 0..k-1 in order.
4. ``_wgrad`` twice: a grouped GEMM whose K is the expert's slot range (found on the device
   by torch.searchsorted over ``block_expert``), one program per (output tile, expert); padding
   slots are masked by the sentinel; an expert without pairs writes zeros. dw13[e] =
   dh^T @ (w x) and dw2[e]^T = a^T @ (w dout), the latter stored transposed through strides.
5. ``_sum_dweights``: the I-tile partials of each pair in order; pairs without a local expert
   get 0.

Rounding points: every product accumulates in float32. dh, a and the weighted token rows of
the weight gradients (w * x, w * dout) are rounded to x's dtype as GEMM operands (a is the
forward's intermediate, recomputed by the forward's formula: only the float32 sum order of g
and u may differ); d, g and u stay float32 in the epilogue, so dweights = d . a rounds only at
the end. dx's per-pair partials are float32 by default. Each gradient is rounded once to its
input's dtype.

Standing: tests/ops/test_moe_backward.py passes under TRITON_INTERPRET=1 and on an H100
(2026-12-07); forward + backward at T=4096 E=128 top8 H=2048 I=768 takes 4894 us there against
4775 us for torch's _grouped_mm pipeline under autograd (0.98x; bench/bench_moe.py train rows,
bench/RESULTS.md). Every config compiles for sm_90a with Triton 3.9 (the test
checks it) within 232448 bytes of shared memory: at most 172032 for the hidden pass, 196608
for dx, 66304 for the weight gradients; no spills (cuobjdump: 146-224 registers in the hidden
pass, up to 200 in dx, 136 in the weight gradients).
Known limit: ``_wgrad`` gives one program per output tile the whole slot range of its expert,
so an expert holding most pairs serialises its K loop (a fixed-order split-K over slot chunks
would fix the balance without atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpt.ops._triton_compat import cast as _cast
from kpt.ops._triton_compat import dot as _dot
from kpt.ops._triton_compat import grouped_tile
from kpt.ops._triton_compat import rnd as _rnd
from kpt.ops.moe import _triton as _fwd
from kpt.ops.moe._triton import (
    ACTS,
    _act,
    _gemm2,
    _local_expert,
    _pow2,
    _regime,
    _slot_pairs,
    _slot_tile,
    _sum_k,
)

OP = "fused_moe backward"
DTYPES = (torch.bfloat16, torch.float16)
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """act'(g) in float32 for the forward's ``_act``."""
    if ACT == 0:  # silu: s (1 + g (1 - s))
        s = 1.0 / (1.0 + tl.exp(-g))
        return s * (1.0 + g * (1.0 - s))
    elif ACT == 1:  # gelu, erf form: Phi(g) + g phi(g)
        return (0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
                + g * tl.exp(-0.5 * g * g) * 0.3989422804014327)
    else:  # g * sigmoid(2 z), z = c (g + 0.044715 g^3): s + 2 g s (1 - s) z'
        c = 0.7978845608028654
        s = 1.0 / (1.0 + tl.exp(-2.0 * c * (g + 0.044715 * g * g * g)))
        return s + 2.0 * c * g * s * (1.0 - s) * (1.0 + 0.134145 * g * g)


@triton.jit
def _hidden_bwd(
    X, DOUT, W13, W2, SORTED, BLOCK_EXPERT, DH, A_OUT, DW_PART, tk, top_k, N, K, P,
    stride_xm, stride_xk, stride_gm, stride_gk, stride_ue, stride_un, stride_uk,
    stride_ve, stride_vk, stride_vn, stride_hm, stride_hn, stride_am, stride_an,
    stride_pm, stride_pn,
    ACT: tl.constexpr, DTYPE: tl.constexpr, WITH_D: tl.constexpr, STORE_DH: tl.constexpr,
    STORE_A: tl.constexpr, STORE_DW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    e, rows, pid_n, offs_n, n_ok = _slot_tile(BLOCK_EXPERT, P, N, BLOCK_M, BLOCK_N, GROUP_M)
    if e < 0:  # past num_padded
        return
    e = e.to(tl.int64)
    pair, r_ok, tok = _slot_pairs(SORTED, rows, tk, top_k)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    d_ptrs = DOUT + tok[:, None] * stride_gm + offs_k[None, :] * stride_gk
    # Gate rows n and up rows I + n of w13[e] as (BLOCK_K, BLOCK_N) tiles; w2[e] is (H, I),
    # already K-major for d = dout @ w2[e].
    g_ptrs = W13 + e * stride_ue + offs_n[None, :] * stride_un + offs_k[:, None] * stride_uk
    u_ptrs = g_ptrs + N * stride_un
    v_ptrs = W2 + e * stride_ve + offs_k[:, None] * stride_vk + offs_n[None, :] * stride_vn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # Main loop over H: gate and up against the gathered x rows, d against the dout rows.
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        rmask = r_ok[:, None] & k_ok[None, :]
        wmask = k_ok[:, None] & n_ok[None, :]
        xa = tl.load(x_ptrs, mask=rmask, other=0.0)
        acc_g = _dot(xa, tl.load(g_ptrs, mask=wmask, other=0.0), acc_g)
        acc_u = _dot(xa, tl.load(u_ptrs, mask=wmask, other=0.0), acc_u)
        if WITH_D:
            da = tl.load(d_ptrs, mask=rmask, other=0.0)
            acc_d = _dot(da, tl.load(v_ptrs, mask=wmask, other=0.0), acc_d)
            d_ptrs += BLOCK_K * stride_gk
            v_ptrs += BLOCK_K * stride_vk
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_uk
        u_ptrs += BLOCK_K * stride_uk

    # Epilogue, ordered so that g dies before a is formed and u before du (234-254 registers
    # on sm_90 became 170-224). a is the forward's intermediate, rounded as it was; padding
    # rows (all loads masked) hold zeros in every output and are written too.
    act = _act(acc_g, ACT)
    if STORE_DH:
        dact = _act_grad(acc_g, ACT)
    a = _rnd(act * acc_u, DTYPE)
    if STORE_DH:
        dst = DH + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn
        tl.store(dst, _cast(acc_d * acc_u * dact, DTYPE), mask=n_ok[None, :])
        tl.store(dst + N * stride_hn, _cast(acc_d * act, DTYPE), mask=n_ok[None, :])
    if STORE_DW:
        tl.store(DW_PART + pair.to(tl.int64) * stride_pm + pid_n * stride_pn,
                 tl.sum(acc_d * a, 1), mask=r_ok)
    if STORE_A:
        tl.store(A_OUT + rows[:, None].to(tl.int64) * stride_am + offs_n[None, :] * stride_an,
                 _cast(a, DTYPE), mask=n_ok[None, :])


@triton.jit
def _wgrad(
    S, G, SORTED, BOUNDS, WEIGHTS, OUT, tk, top_k, M, N,
    stride_sp, stride_sc, stride_gt, stride_gn, stride_wt, stride_wj,
    stride_oe, stride_om, stride_on,
    DTYPE: tl.constexpr, ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[e][m, n] = sum over e's slots s of S[s, m] * w_s * G[token of s, n]."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    e = tl.program_id(1)
    lo = tl.load(BOUNDS + e).to(tl.int32) * ALIGN_M
    hi = tl.load(BOUNDS + e + 1).to(tl.int32) * ALIGN_M
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_s = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # K loop over the expert's slots (none: zeros); padding slots carry the sentinel pair.
    for s0 in range(lo, hi, BLOCK_K):
        slot = s0 + offs_s
        pair = tl.load(SORTED + slot, mask=slot < hi, other=tk)
        ok = pair < tk
        tok = (pair // top_k).to(tl.int64)
        wt = tl.load(WEIGHTS + tok * stride_wt + (pair % top_k) * stride_wj, mask=ok,
                     other=0.0)
        s = tl.load(S + slot[None, :].to(tl.int64) * stride_sp + offs_m[:, None] * stride_sc,
                    mask=m_ok[:, None] & ok[None, :], other=0.0)
        g = tl.load(G + tok[:, None] * stride_gt + offs_n[None, :] * stride_gn,
                    mask=ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(s, _cast(g.to(tl.float32) * wt[:, None], DTYPE), acc)

    tl.store(OUT + e.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om
             + offs_n[None, :] * stride_on, _cast(acc, OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_dweights(PART, IDS, EMAP, DW, tk, top_k, n_tiles, e_local, e_global, stride_it,
                  stride_ij, stride_map, stride_pm, stride_pn, stride_wt, stride_wj,
                  HAS_MAP: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pair < tk
    e = _local_expert(IDS, EMAP, pair, ok, top_k, stride_it, stride_ij, stride_map, e_local,
                      e_global, HAS_MAP)
    acc = tl.zeros((BLOCK,), tl.float32)
    # Tiles in order; pairs without a local expert were never written: masked, never read.
    for nt in range(n_tiles):
        acc += tl.load(PART + pair.to(tl.int64) * stride_pm + nt * stride_pn, mask=e >= 0,
                       other=0.0)
    tl.store(DW + (pair // top_k).to(tl.int64) * stride_wt + (pair % top_k) * stride_wj,
             _cast(acc, DW.dtype.element_ty), mask=ok)


# ---- configs, launcher ------------------------------------------------------------------------

# Per regime (the forward's, by pairs per expert): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages) of the hidden pass, (BLOCK_N2, BLOCK_K2, num_warps2, num_stages2) of dx (the
# forward's GEMM2 tiles), (BLOCK_M3, BLOCK_N3, BLOCK_K3, num_warps3, num_stages3) of the weight
# gradients, GROUP_M, PARTIAL_FP32. The hidden pass holds three float32 accumulators and five
# operand tiles per stage (x, dout, gate, up, w2), hence narrower N tiles and fewer stages
# than GEMM1. The weight gradients' K runs over slots: a short BLOCK_K3 where an expert holds
# few of them (decode: one 16-slot block).
_TILES = {
    "decode": ((16, 64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 16, 8, 3), 1, True),
    "small": ((32, 64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 32, 8, 3), 8, True),
    "medium": ((64, 64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 64, 8, 3), 8, True),
    "large": ((128, 64, 64, 8, 3), (256, 64, 8, 4), (128, 128, 64, 8, 3), 8, True),
}
_KEYS1 = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_KEYS2 = ("BLOCK_N2", "BLOCK_K2", "num_warps2", "num_stages2")
_KEYS3 = ("BLOCK_M3", "BLOCK_N3", "BLOCK_K3", "num_warps3", "num_stages3")


def _as_config(entry: tuple) -> dict:
    g1, g2, g3, group_m, partial_fp32 = entry
    return (dict(zip(_KEYS1, g1)) | dict(zip(_KEYS2, g2)) | dict(zip(_KEYS3, g3))
            | dict(GROUP_M=group_m, PARTIAL_FP32=partial_fp32))


def configs(t: int, top_k: int, e_global: int) -> list[dict]:
    """The regime's default first, then the other regimes' tiles."""
    default = _as_config(_TILES[_regime(t, top_k, e_global)])
    return [default] + [c for c in map(_as_config, _TILES.values()) if c != default]


def _fit(cfg: dict, h: int, i: int) -> dict:
    """Tiles shrunk to the problem (powers of two >= 16)."""
    fit = lambda b, n: min(b, max(16, _pow2(n)))  # noqa: E731
    return cfg | dict(BLOCK_N=fit(cfg["BLOCK_N"], i), BLOCK_K=fit(cfg["BLOCK_K"], h),
                      BLOCK_N2=fit(cfg["BLOCK_N2"], h), BLOCK_K2=fit(cfg["BLOCK_K2"], 2 * i),
                      BLOCK_N3=fit(cfg["BLOCK_N3"], h))


def _check(dout, x, w13, w2, weights, ids, expert_map, activation) -> None:
    if activation not in ACTS:
        raise ValueError(f"{OP}: activation must be one of {tuple(ACTS)}, got {activation!r}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{OP}: the Triton backward takes bf16/fp16 experts, x is {x.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"{OP}: w13 ({w13.dtype}) and w2 ({w2.dtype}) must have x's dtype "
                        f"({x.dtype})")
    t, h = x.shape
    e, two_i = w13.shape[:2]
    if tuple(w13.shape) != (e, two_i, h) or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"{OP}: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be "
                         f"(E, 2I, H = {h}) and (E, H, I)")
    if tuple(dout.shape) != (t, h):
        raise ValueError(f"{OP}: dout of shape {tuple(dout.shape)} must be x's ({t}, {h})")
    if ids.ndim != 2 or ids.shape[0] != t or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"{OP}: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} "
                         f"must both be (T = {t}, top_k)")
    if expert_map is not None and expert_map.ndim != 1:
        raise ValueError(f"{OP}: expert_map must be 1-D, got {tuple(expert_map.shape)}")


def backward(dout: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
             weights: torch.Tensor, ids: torch.Tensor, expert_map: torch.Tensor | None,
             activation: str, needs: tuple[bool, ...],
             config: dict | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dx, dw13, dw2, dweights) of ``fused_moe``, None where ``needs`` says no gradient is
    wanted; the contract of ``_backward.backward`` for bf16/fp16 experts. ``config``
    overrides the regime's default tiles (keys of ``configs``)."""
    _check(dout, x, w13, w2, weights, ids, expert_map, activation)
    need_dx, need_dw13, need_dw2, need_dw = (bool(n) for n in needs[:4])
    t, h = x.shape
    e = w13.shape[0]
    i = w13.shape[1] // 2
    top_k = ids.shape[1]
    dev = x.device
    # The gradients come from the _workspace seam too: every element is written (the poisoned
    # tests check it), except dx rows of tokens without a local expert under top_k == 1, where
    # the GEMM writes dx directly: those are zeroed first.
    new = _fwd._workspace
    dx = dw13 = dw2 = dweights = None
    if need_dx:
        dx = (torch.zeros((t, h), dtype=x.dtype, device=dev) if top_k == 1
              else new((t, h), x.dtype, dev))
    if need_dw13:
        dw13 = new((e, 2 * i, h), x.dtype, dev)
    if need_dw2:
        dw2 = new((e, h, i), x.dtype, dev)
    if need_dw:
        dweights = new(tuple(ids.shape), weights.dtype, dev)
    if not (need_dx or need_dw13 or need_dw2 or need_dw):
        return dx, dw13, dw2, dweights
    if t == 0:
        for g in (dw13, dw2):
            if g is not None:
                g.zero_()
        return dx, dw13, dw2, dweights

    e_global = e if expert_map is None else expert_map.shape[0]
    cfg = _fit(_as_config(_TILES[_regime(t, top_k, e_global)]) | (config or {}), h, i)
    dtype = _TL[x.dtype]
    tk = t * top_k
    bm = cfg["BLOCK_M"]
    dout = dout.to(x.dtype)
    w32 = weights.to(torch.float32)  # the forward reads the routing weights as float32
    sorted_pairs, block_expert, _ = _fwd.align(ids, e, bm, expert_map)
    p = sorted_pairs.shape[0]

    # Hidden pass: dh (dx, dw13), a (dw2), per-tile d . a (dweights).
    bn = cfg["BLOCK_N"]
    n_tiles = triton.cdiv(i, bn)
    dh = new((p, 2 * i), x.dtype, dev) if need_dx or need_dw13 else None
    a = new((p, i), x.dtype, dev) if need_dw2 else None
    dw_part = new((tk, n_tiles), torch.float32, dev) if need_dw else None
    dh_arg = x if dh is None else dh  # a pointer the kernel never reads where a tensor is absent
    a_arg = x if a is None else a
    part_arg = w32 if dw_part is None else dw_part
    _hidden_bwd[(p // bm * n_tiles,)](
        x, dout, w13, w2, sorted_pairs, block_expert, dh_arg, a_arg, part_arg, tk, top_k, i, h,
        p, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), *w13.stride(),
        *w2.stride(), dh_arg.stride(0), dh_arg.stride(1), a_arg.stride(0), a_arg.stride(1),
        part_arg.stride(0), part_arg.stride(1),
        ACT=ACTS[activation], DTYPE=dtype, WITH_D=need_dx or need_dw13 or need_dw,
        STORE_DH=dh is not None, STORE_A=a is not None, STORE_DW=need_dw, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    stride_map = expert_map.stride(0) if has_map else 0
    if need_dw:
        block = 128
        _sum_dweights[(triton.cdiv(tk, block),)](
            dw_part, ids, emap, dweights, tk, top_k, n_tiles, e, e_global, ids.stride(0),
            ids.stride(1), stride_map, dw_part.stride(0), dw_part.stride(1),
            dweights.stride(0), dweights.stride(1), HAS_MAP=has_map, BLOCK=block, num_warps=4)

    if need_dx:
        # dh @ w13[e] (K = 2I, N = H) times the pair's weight: the forward's GEMM2 with w13[e]
        # read through (n, k) = (H, 2I) strides.
        direct = top_k == 1
        dst = dx if direct else new((tk, h), torch.float32 if cfg["PARTIAL_FP32"] else x.dtype,
                                    dev)
        bn2 = cfg["BLOCK_N2"]
        _gemm2[(p // bm * triton.cdiv(h, bn2),)](
            dh, dh, w13, dh, dh, sorted_pairs, block_expert, w32, dst, tk, top_k, h, 2 * i, p,
            dh.stride(0), dh.stride(1), 0, 0, w13.stride(0), w13.stride(2), w13.stride(1),
            0, 0, 0, 0, 0, 0, w32.stride(0), w32.stride(1), dst.stride(0), dst.stride(1),
            QUANT=0, HAS_ZERO=False, GROUP_SIZE=1, DTYPE=dtype, DIRECT=direct, BLOCK_M=bm,
            BLOCK_N=bn2, BLOCK_K=cfg["BLOCK_K2"], GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps2"], num_stages=cfg["num_stages2"])
        if not direct:
            block_t, block_n = 16, min(256, max(16, _pow2(h)))
            _sum_k[(triton.cdiv(t, block_t), triton.cdiv(h, block_n))](
                dst, ids, emap, dx, t, h, top_k, e, e_global, ids.stride(0), ids.stride(1),
                stride_map, dst.stride(0), dst.stride(1), dx.stride(0), dx.stride(1),
                HAS_MAP=has_map, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)

    if need_dw13 or need_dw2:
        # Expert e's slots are blocks bounds[e] .. bounds[e + 1] of block_expert (ascending,
        # -1 past num_padded), found on the device.
        key = torch.where(block_expert >= 0, block_expert, e)
        bounds = torch.searchsorted(key, torch.arange(e + 1, dtype=key.dtype, device=dev))
        bm3, bn3 = cfg["BLOCK_M3"], cfg["BLOCK_N3"]
        common = dict(DTYPE=dtype, ALIGN_M=bm, BLOCK_N=bn3, BLOCK_K=cfg["BLOCK_K3"],
                      GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps3"],
                      num_stages=cfg["num_stages3"])
        # dw13[e] (2I, H) = dh^T @ (w x); dw2[e] (H, I) stored as its transpose a^T @ (w dout).
        for out, s, g, m, om, on in (
                (dw13, dh, x, 2 * i, 1, 2), (dw2, a, dout, i, 2, 1)):
            if out is None:
                continue
            bm3_fit = min(bm3, max(16, _pow2(m)))
            grid = (triton.cdiv(m, bm3_fit) * triton.cdiv(h, bn3), e)
            _wgrad[grid](
                s, g, sorted_pairs, bounds, w32, out, tk, top_k, m, h, s.stride(0),
                s.stride(1), g.stride(0), g.stride(1), w32.stride(0), w32.stride(1),
                out.stride(0), out.stride(om), out.stride(on), BLOCK_M=bm3_fit, **common)
    return dx, dw13, dw2, dweights
