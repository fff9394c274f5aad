"""Every op on torch_xla's PJRT CPU device, dispatched to the ``xla`` backend, against the
op's reference on the CPU (same inputs, same dtype, the op's own tolerance). Each call runs
twice through ``xla_run``: no host read inside a call, and no recompilation on the repeat."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla run in .venv-xla "
                    "(bash scripts/setup_xla.sh)")

import torch_xla  # noqa: E402

from kpt.ops import (  # noqa: E402
    append_paged_kv,
    cascade_attention,
    flash_attention,
    flex_attention,
    fp8_gemm,
    fused_moe,
    int4_gemm,
    moe_route,
    pack_int4,
    paged_attention,
    quantize_fp8,
    rmsnorm_qkv_rope,
)
from kpt.ops._common import compare  # noqa: E402
from kpt.ops.flash_attention import LSE_TOLERANCE, TOLERANCE, compare_lse  # noqa: E402
from kpt.ops.flex_attention import create_block_mask, mods  # noqa: E402

DEV = torch_xla.device()
# Gradients round dS and P once more than the forward: the op's backward bound (4 units).
GRAD_TOLERANCE = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}


def rand(gen, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def xla(*tensors):
    return tuple(None if t is None else t.to(DEV) for t in tensors)


def close(name, got, want, tol):
    reason = compare(name, got, want, tol)
    assert reason is None, reason


# ---- flash_attention ----------------------------------------------------------------------

MASKS = {"full": dict(causal=False), "causal": dict(causal=True),
         "window": dict(causal=False, window=(3, 2)), "softcap": dict(causal=True, softcap=5.0)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask", list(MASKS))
def test_flash_attention_batched(xla_run, mask, dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = rand(gen, 2, 9, 4, 32, dtype=dtype), rand(gen, 2, 11, 2, 32, dtype=dtype), \
        rand(gen, 2, 11, 2, 32, dtype=dtype)
    want, want_lse = flash_attention(q, k, v, return_lse=True, backend="reference",
                                     **MASKS[mask])
    qx, kx, vx = xla(q, k, v)
    out, lse = xla_run(lambda: flash_attention(qx, kx, vx, return_lse=True, **MASKS[mask]))
    close("out", out, want, TOLERANCE[dtype])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def test_flash_attention_masked_nan_never_reaches_a_row(xla_run):
    """The reference's rule: a NaN in a key or value a query cannot see takes no part in its
    output (causal: the last key and value are seen by the last query only)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = rand(gen, 1, 6, 4, 32), rand(gen, 1, 6, 2, 32), rand(gen, 1, 6, 2, 32)
    k[:, -1, :, :3] = float("nan")
    v[:, -1, :, 5:] = float("nan")
    want = flash_attention(q, k, v, causal=True, backend="reference")
    qx, kx, vx = xla(q, k, v)
    got = xla_run(lambda: flash_attention(qx, kx, vx, causal=True))
    assert torch.isfinite(got[:, :-1]).all() and torch.isnan(got[:, -1]).all()
    close("out", got, want, TOLERANCE[torch.bfloat16])


def _varlen(gen, dtype):
    """Three sequences (one empty) and two tokens past the last: NaN-poisoned."""
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    q, k, v = (rand(gen, 14, h, 32, dtype=dtype) for h in (4, 2, 2))
    for t in (q, k, v):
        t[12:] = float("nan")
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_varlen(xla_run, causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v, cu = _varlen(gen, torch.bfloat16)
    kw = dict(causal=causal, max_seqlen_q=7, max_seqlen_k=7, return_lse=True)
    want, want_lse = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                     backend="reference", **kw)
    qx, kx, vx, cux = xla(q, k, v, cu)
    out, lse = xla_run(lambda: flash_attention(qx, kx, vx, cu_seqlens_q=cux, cu_seqlens_k=cux,
                                               **kw))
    close("out", out, want, TOLERANCE[torch.bfloat16])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def _grads(q, k, v, **kw):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attention(*leaves, return_lse=True, **kw)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device)
    # Rows without keys have lse -inf; their lse gradient is ignored by definition.
    torch.autograd.backward([out, torch.where(torch.isfinite(lse), lse, 0.0)], [dout, dlse])
    return tuple(t.grad for t in leaves)


@pytest.mark.parametrize("varlen", [False, True])
def test_flash_attention_backward(xla_run, varlen):
    gen = torch.Generator().manual_seed(2)
    if varlen:
        q, k, v, cu = _varlen(gen, torch.bfloat16)
        q, k, v = (torch.nan_to_num(t) for t in (q, k, v))  # gradients of padding: zeros
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7)
    else:
        q, k, v = rand(gen, 2, 9, 4, 32), rand(gen, 2, 11, 2, 32), rand(gen, 2, 11, 2, 32)
        kw = {}
    want = _grads(q, k, v, causal=True, backend="reference", **kw)
    args = xla(q, k, v)
    kwx = {n: (t.to(DEV) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    got = xla_run(lambda: _grads(*args, causal=True, **kwx))
    for name, g, w in zip("qkv", got, want):
        close(f"d{name}", g, w, GRAD_TOLERANCE[torch.bfloat16])


# ---- paged_attention, append_paged_kv, cascade_attention ----------------------------------


def _paged(gen, lengths, layout, page_size=4, hkv=2, d=32, dtype=torch.bfloat16):
    """Caches NaN outside the sequences' keys, shuffled pages, invalid ids in unused slots."""
    per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(per_seq) + 2
    shape = ((num_pages, page_size, hkv, d) if layout == "NHD"
             else (num_pages, hkv, page_size, d))
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    table = torch.full((len(lengths), max(per_seq) + 1), -3, dtype=torch.int32)
    perm, at = torch.randperm(num_pages, generator=gen), 0
    for b, (n, p) in enumerate(zip(lengths, per_seq)):
        table[b, :p] = perm[at:at + p].int()
        at += p
        for j in range(n):
            page, slot = int(table[b, j // page_size]), j % page_size
            for cache in (k_cache, v_cache):
                row = torch.randn(hkv, d, generator=gen)
                if layout == "NHD":
                    cache[page, slot] = row
                else:
                    cache[page, :, slot] = row
    return (k_cache.to(dtype), v_cache.to(dtype), table,
            torch.tensor(lengths, dtype=torch.int32))


PAGED = {"decode": {}, "window-softcap": dict(window=(4, -1), softcap=4.0),
         "prefill": dict(queries=[3, 1, 4])}


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("case", list(PAGED))
def test_paged_attention(xla_run, case, layout):
    gen = torch.Generator().manual_seed(3)
    opts = dict(PAGED[case])
    queries = opts.pop("queries", None)
    k_cache, v_cache, table, lens = _paged(gen, [7, 0, 13] if queries is None else [7, 5, 13],
                                           layout)
    if queries is None:
        q, cu = rand(gen, 3, 4, 32), None
    else:
        q = rand(gen, sum(queries), 4, 32)
        cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
        opts.update(cu_seqlens_q=cu, max_seqlen_q=max(queries))
    want, want_lse = paged_attention(q, k_cache, v_cache, table, lens, kv_layout=layout,
                                     return_lse=True, backend="reference", **opts)
    qx, kx, vx, tx, lx, cux = xla(q, k_cache, v_cache, table, lens, cu)
    if cux is not None:
        opts["cu_seqlens_q"] = cux
    out, lse = xla_run(lambda: paged_attention(qx, kx, vx, tx, lx, kv_layout=layout,
                                               return_lse=True, **opts))
    close("out", out, want, TOLERANCE[torch.bfloat16])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def test_paged_attention_fp8_cache(xla_run):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, table, lens = _paged(gen, [6, 9], "NHD", dtype=torch.float32)
    scale = torch.tensor([0.5, 0.25])
    k8 = (k_cache / scale[:, None]).to(torch.float8_e4m3fn)
    v8 = (v_cache / scale[:, None]).to(torch.float8_e4m3fn)
    q = rand(gen, 2, 4, 32)
    # The reference on the dequantised float32 cache: the same float32 math (torch 2.9's CPU
    # indexing has no fp8 kernel, so the fp8 reference itself cannot run in this venv).
    deq = [(c.float() * scale[:, None]) for c in (k8, v8)]
    want, want_lse = paged_attention(q.float(), *deq, table, lens, backend="reference",
                                     return_lse=True)
    qx, kx, vx, tx, lx, sx = xla(q, k8, v8, table, lens, scale)
    out, lse = xla_run(lambda: paged_attention(qx, kx, vx, tx, lx, k_scale=sx, v_scale=sx,
                                               return_lse=True))
    close("out", out, want, TOLERANCE[torch.bfloat16])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def test_append_then_attend(xla_run):
    gen = torch.Generator().manual_seed(5)
    # The lengths count the new tokens (1 and 2), whose slots get overwritten.
    k_cache, v_cache, table, lens = _paged(gen, [6, 10], "HND")
    k_new, v_new = rand(gen, 3, 2, 32), rand(gen, 3, 2, 32)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    q = rand(gen, 2, 4, 32)

    def step(q, k_new, v_new, k_cache, v_cache, table, lens, cu):
        append_paged_kv(k_new, v_new, k_cache, v_cache, table, lens, cu_seqlens=cu,
                        kv_layout="HND")
        return paged_attention(q, k_cache, v_cache, table, lens, kv_layout="HND"), k_cache

    args = (q, k_new, v_new, k_cache, v_cache, table, lens, cu)
    want, want_cache = step(*(t.clone() for t in args))
    args_x = xla(*args)
    got, got_cache = xla_run(lambda: step(*args_x))
    close("out", got, want, TOLERANCE[torch.bfloat16])
    assert torch.equal(got_cache.isnan(), want_cache.isnan())
    assert torch.equal(got_cache.nan_to_num(), want_cache.nan_to_num())


def test_cascade_attention(xla_run):
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, table, lens = _paged(gen, [8, 3, 5], "NHD")
    # Level 0: one group (row 0, 8 shared keys) for both requests; level 1: rows 1 and 2.
    levels = [(table[:1], lens[:1], torch.tensor([0, 2], dtype=torch.int32)),
              (table[1:], lens[1:], torch.tensor([0, 1, 2], dtype=torch.int32))]
    q = rand(gen, 2, 4, 32)
    want = cascade_attention(q, k_cache, v_cache, levels, backend="reference")
    qx, kx, vx = xla(q, k_cache, v_cache)
    levels_x = [xla(*level) for level in levels]
    # The merge of the levels writes logaddexp out (torch_xla 2.9 has no lowering for it), so
    # the whole call stays on the device: no CPU fallback, no host read.
    got = xla_run(lambda: cascade_attention(qx, kx, vx, levels_x))
    close("out", got, want, TOLERANCE[torch.bfloat16])


# ---- rmsnorm_qkv_rope ---------------------------------------------------------------------


def _fused_args(gen, dtype, qwen3: bool):
    tokens, hidden, hq, hkv, d = 5, 64, 4, 2, 16
    n = (hq + 2 * hkv) * d
    args = dict(x=rand(gen, tokens, hidden, dtype=dtype),
                norm_weight=rand(gen, hidden, dtype=dtype, scale=0.1) + 1,
                qkv_weight=rand(gen, n, hidden, dtype=dtype, scale=hidden**-0.5),
                positions=torch.randint(0, 4096, (tokens,), generator=gen))
    opts = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6)
    if qwen3:
        args.update(residual=rand(gen, tokens, hidden, dtype=dtype),
                    qkv_bias=rand(gen, n, dtype=dtype, scale=0.1),
                    q_norm_weight=rand(gen, d, dtype=dtype, scale=0.1) + 1,
                    k_norm_weight=rand(gen, d, dtype=dtype, scale=0.1) + 1)
        opts.update(rope_theta=1e6)
    else:
        opts.update(rope_style="gptj", rotary_dim=8,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 1024})
    return args, opts


@pytest.mark.parametrize("dtype,qwen3", [(torch.bfloat16, True), (torch.float32, False)])
def test_rmsnorm_qkv_rope(xla_run, dtype, qwen3):
    from kpt.ops.rmsnorm_qkv_rope import TOLERANCE as FUSED_TOLERANCE

    args, opts = _fused_args(torch.Generator().manual_seed(8), dtype, qwen3)
    want = rmsnorm_qkv_rope(**args, **opts, backend="reference")
    args_x = {n: t.to(DEV) for n, t in args.items()}
    got = xla_run(lambda: rmsnorm_qkv_rope(**args_x, **opts))
    # XLA's default excess precision (xla_allow_excess_precision) skips some of the reference's
    # intermediate roundings to bf16: measured 2026-12-06, the result is closer to float64
    # (q: 4.0e-3 vs the reference's 4.7e-3) and 1.1-1.5 units of bf16 from the reference (bit
    # for bit with XLA_FLAGS=--xla_allow_excess_precision=false). Hence 2 units for bf16.
    tol = 2**-7 if dtype == torch.bfloat16 else FUSED_TOLERANCE[dtype]
    for name, g, w in zip(("q", "k", "v", "residual"), got, want):
        close(name, g, w, tol)


def test_rmsnorm_qkv_rope_backward(xla_run):
    from kpt.ops.rmsnorm_qkv_rope import TOLERANCE as FUSED_TOLERANCE

    args, opts = _fused_args(torch.Generator().manual_seed(9), torch.float32, True)

    def grads(args, **kw):
        leaves = {n: (t.detach().requires_grad_(True) if t.is_floating_point() else t)
                  for n, t in args.items()}
        q, k, v, res = rmsnorm_qkv_rope(**leaves, **opts, **kw)
        (q.sum() + (k * k).sum() + (v * 2).sum() + res.sum()).backward()
        return tuple(leaves[n].grad for n in ("x", "norm_weight", "qkv_weight", "residual"))

    want = grads(args, backend="reference")
    args_x = {n: t.to(DEV) for n, t in args.items()}
    got = xla_run(lambda: grads(args_x))
    for name, g, w in zip(("dx", "dnorm", "dqkv", "dres"), got, want):
        close(name, g, w, FUSED_TOLERANCE[torch.float32])


# ---- flex_attention -----------------------------------------------------------------------


def _flex_case(gen, dtype=torch.float32):
    q, k, v = rand(gen, 1, 4, 24, 16, dtype=dtype), rand(gen, 1, 2, 24, 16, dtype=dtype), \
        rand(gen, 1, 2, 24, 16, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("case", ["causal-softcap", "sliding-window"])
def test_flex_attention(xla_run, case):
    gen = torch.Generator().manual_seed(10)
    q, k, v = _flex_case(gen)
    mask_mod = mods.causal() if case == "causal-softcap" else mods.sliding_window(5)
    score_mod = mods.softcap(20.0) if case == "causal-softcap" else None

    def call(q, k, v, device, **kw):
        block_mask = create_block_mask(mask_mod, 1, None, 24, 24, device=device)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                              enable_gqa=True, return_lse=True, **kw)

    want, want_lse = call(q, k, v, "cpu", backend="reference")
    qx, kx, vx = xla(q, k, v)
    out, lse = xla_run(lambda: call(qx, kx, vx, DEV))
    close("out", out, want, TOLERANCE[torch.float32])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def test_flex_attention_backward(xla_run):
    gen = torch.Generator().manual_seed(11)
    q, k, v = _flex_case(gen)

    def grads(q, k, v, device, **kw):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        block_mask = create_block_mask(mods.causal(), 1, None, 24, 24, device=device)
        out = flex_attention(*leaves, block_mask=block_mask, enable_gqa=True, **kw)
        (out * out).sum().backward()
        return tuple(t.grad for t in leaves)

    want = grads(q, k, v, "cpu", backend="reference")
    args = xla(q, k, v)
    got = xla_run(lambda: grads(*args, DEV))
    for name, g, w in zip("qkv", got, want):
        close(f"d{name}", g, w, 1e-5)


# ---- fp8_gemm, int4_gemm ------------------------------------------------------------------


@pytest.mark.parametrize("a_gran,w_gran,bias", [("block", "block", False), ("row", "tensor", True)])
def test_fp8_gemm(xla_run, a_gran, w_gran, bias):
    gen = torch.Generator().manual_seed(12)
    a8, a_scale = quantize_fp8(torch.randn(5, 256, generator=gen), a_gran)
    w8, w_scale = quantize_fp8(torch.randn(144, 256, generator=gen), w_gran,
                               block=(128, 128) if w_gran == "block" else None)
    b = rand(gen, 144) if bias else None
    want = fp8_gemm(a8, w8, a_scale, w_scale, bias=b, backend="reference")
    args = xla(a8, w8, a_scale, w_scale, b)
    got = xla_run(lambda: fp8_gemm(*args[:4], bias=args[4]))
    # Same float32 products, summed in another order, one rounding to bf16: within 1 unit.
    close("out", got, want, 2**-8)


@pytest.mark.parametrize("group_size,symmetric,act_order", [(32, False, False), (-1, True, False),
                                                           (64, True, True)])
def test_int4_gemm(xla_run, group_size, symmetric, act_order):
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(40, 128, generator=gen)
    g_idx = (torch.randperm(128, generator=gen) % (128 // group_size)).int() if act_order \
        else None
    packed, scales, zeros = pack_int4(w, group_size, symmetric=symmetric, g_idx=g_idx)
    x, bias = rand(gen, 3, 128), rand(gen, 40)
    kw = dict(group_size=group_size, bias=bias, g_idx=g_idx)
    want = int4_gemm(x, packed, scales, zeros, backend="reference", **kw)
    xx, px, sx, zx, bx, gx = xla(x, packed, scales, zeros, bias, g_idx)
    got = xla_run(lambda: int4_gemm(xx, px, sx, zx, group_size=group_size, bias=bx, g_idx=gx))
    # The same dequantised bf16 weight; float32 sums in another order, one rounding: 1 unit.
    close("out", got, want, 2**-8)


# ---- moe ------------------------------------------------------------------------------------

ROUTINGS = {"softmax": dict(), "deepseek-v3": dict(scoring="sigmoid", num_expert_groups=4,
                                                   topk_groups=2, routed_scaling_factor=2.5)}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_moe_route(xla_run, routing):
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(9, 16, generator=gen)
    opts = dict(ROUTINGS[routing])
    if routing == "deepseek-v3":
        opts["correction_bias"] = torch.randn(16, generator=gen) * 0.1
    want_w, want_ids = moe_route(logits, 4, backend="reference", **opts)
    (lx,) = xla(logits)
    opts_x = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    got_w, got_ids = xla_run(lambda: moe_route(lx, 4, **opts_x))
    assert torch.equal(got_ids, want_ids)  # the same float32 scores, far from ties
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["bf16", "expert-map", "fp8"])
def test_fused_moe(xla_run, case):
    gen = torch.Generator().manual_seed(15)
    t, h, i, e, k = 7, 128, 128, 8, 2
    x = rand(gen, t, h)
    w13 = rand(gen, e, 2 * i, h, scale=h**-0.5)
    w2 = rand(gen, e, h, i, scale=i**-0.5)
    weights = torch.rand(t, k, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).int()
    kw = {}
    if case == "expert-map":
        kw["expert_map"] = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
        w13, w2 = w13[::2].contiguous(), w2[::2].contiguous()
    if case == "fp8":
        q13 = [quantize_fp8(w.float(), "block", block=(128, 128)) for w in w13]
        q2 = [quantize_fp8(w.float(), "block", block=(128, 128)) for w in w2]
        w13, w2 = torch.stack([q[0] for q in q13]), torch.stack([q[0] for q in q2])
        kw = dict(w13_scale=torch.stack([q[1] for q in q13]),
                  w2_scale=torch.stack([q[1] for q in q2]))
    want = fused_moe(x, w13, w2, weights, ids, backend="reference", **kw)
    xx, w13x, w2x, wx, idx = xla(x, w13, w2, weights, ids)
    kwx = {n: v.to(DEV) for n, v in kw.items()}
    got = xla_run(lambda: fused_moe(xx, w13x, w2x, wx, idx, **kwx))
    # The same rounding points; float32 sums in another order (XLA may also keep a value
    # in float32 past a bf16 rounding point, see rmsnorm_qkv_rope's case): 2 bf16 units.
    close("out", got, want, 2**-7)
