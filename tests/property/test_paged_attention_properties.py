"""Properties of attention over a paged KV cache on generated inputs (issue 27):
``paged_attention``, ``plan`` / ``Plan.run``, ``append_paged_kv``, ``cascade_attention`` and
``merge_attention_states``.

* valid calls (ragged lengths including 0, page sizes 1..16, both layouts, GQA, decode and
  chunked prefill, windows, soft-caps, fp8 caches, shuffled pages, unused slots and pages
  poisoned with NaN, caches as views of one K/V buffer): the reference equals float64
  attention over the gathered keys, and every backend that can run the call plus the default
  dispatch (and ``plan(...).run``) equal the reference;
* a NaN or inf in a key or value a query cannot see (outside its window, after it in a
  chunk) never reaches that query, on any backend;
* ``append_paged_kv`` writes exactly the new tokens' slots;
* cascade attention equals attention over each request's concatenated levels;
* invalid arguments and malformed tables (page ids, lengths and offsets out of range on the
  CPU, hints, scales): a ValueError / TypeError naming the op.
"""

from __future__ import annotations

import math

import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops import append_paged_kv, flash_attention, paged_attention
from kpt.ops._common import compare
from kpt.ops.cascade_attention import cascade_attention, merge_attention_states
from kpt.ops.paged_attention import SPEC, Call, _validate, plan, problem_of
from tests.property.strategies import check_close, expect_named_error, props, seeds

# A backend against the reference: P rounded to the cache dtype before P @ V and float32 sums
# in another order: up to two units norm-wise (bf16 2^-7, fp16 2^-10), as flash_attention's.
# The reference against float64: its one output rounding, within the same bound; fp32 1e-5.
TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
LSE_TOLERANCE = 1e-5  # float32 logsumexp of the same logits in another order


def float64_attention(q, keys, values, counts, causal, window, softcap, scale):
    """out (q's shape) and lse (T, Hq) float64: each sequence's queries (its last tokens)
    over its keys, the masks aligned bottom-right."""
    heads, d = q.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[0], heads), -math.inf, dtype=torch.float64)
    at = 0
    for k, v, m in zip(keys, values, counts):
        n = k.shape[0]
        group = heads // k.shape[1]
        for i in range(m):
            pos = n - m + i
            j = torch.arange(n)
            ok = torch.ones(n, dtype=torch.bool)
            if right >= 0:
                ok &= j <= pos + right
            if left >= 0:
                ok &= j >= pos - left
            if not ok.any():
                continue
            for h in range(heads):
                s = (k[ok, h // group].double() @ q[at + i, h].double()) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                lse[at + i, h] = torch.logsumexp(s, 0)
                out[at + i, h] = torch.softmax(s, 0) @ v[ok, h // group].double()
        at += m
    return out, lse


@st.composite
def paged_calls(draw) -> dict:
    """A batch on shuffled pages; every slot no sequence owns holds NaN."""
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    fp8 = dtype != torch.float32 and draw(st.booleans())
    page_size = draw(st.sampled_from([1, 3, 4, 16]))
    layout = draw(st.sampled_from(["NHD", "HND"]))
    hkv, group, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([16,
                                                                                          32]))
    lengths = draw(st.lists(st.integers(0, 13), min_size=0, max_size=4))
    varlen = draw(st.booleans())
    counts = [draw(st.integers(0, n)) for n in lengths] if varlen else [1] * len(lengths)
    if not varlen:
        lengths = [max(n, 0) for n in lengths]
    per = [-(-n // page_size) for n in lengths]
    pages = sum(per) + 2
    shape = (pages, page_size, hkv, d) if layout == "NHD" else (pages, hkv, page_size, d)
    k_cache, v_cache = torch.full(shape, math.nan), torch.full(shape, math.nan)
    table = torch.full((len(lengths), max(per + [1]) + 1), -3, dtype=torch.int32)
    perm, at, keys, values = torch.randperm(pages, generator=gen), 0, [], []
    for b, (n, p) in enumerate(zip(lengths, per)):
        table[b, :p] = perm[at:at + p].int()
        at += p
        k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
        for j in range(n):
            page, slot = int(table[b, j // page_size]), j % page_size
            for cache, src in ((k_cache, k), (v_cache, v)):
                if layout == "NHD":
                    cache[page, slot] = src[j]
                else:
                    cache[page, :, slot] = src[j]
        keys.append(k)
        values.append(v)
    args = dict(q=torch.randn(sum(counts), hkv * group, d, generator=gen).to(dtype),
                k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype), block_table=table,
                seq_lens=torch.tensor(lengths, dtype=torch.int32), kv_layout=layout)
    if fp8:  # the cache holds k / k_scale in e4m3, read back times the scale
        f8 = torch.float8_e4m3fn
        args["k_cache"], args["v_cache"] = (k_cache / 0.5).to(f8), (v_cache / 0.25).to(f8)
        args.update(k_scale=0.5, v_scale=torch.full((hkv,), 0.25))
        keys = [(k / 0.5).to(f8).double() * 0.5 for k in keys]
        values = [(v / 0.25).to(f8).double() * 0.25 for v in values]
    else:
        keys = [k.to(dtype).double() for k in keys]
        values = [v.to(dtype).double() for v in values]
    if varlen:
        args["cu_seqlens_q"] = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()],
                                            dtype=torch.int32)
    if draw(st.booleans()):  # the caches as views of one (pages, ..., 2, ...) K/V buffer
        both = torch.stack([args["k_cache"], args["v_cache"]], 2)
        args["k_cache"], args["v_cache"] = both[:, :, 0], both[:, :, 1]
    options = dict(causal=draw(st.booleans()),
                   window=draw(st.sampled_from([None, (2, 0), (3, 1), (0, 0)])),
                   softcap=draw(st.sampled_from([0.0, 2.0])),
                   scale=draw(st.sampled_from([None, 0.3])))
    if options["causal"] and options["window"] is not None:
        options["window"] = (options["window"][0], 0)
    return dict(args=args, options=options, keys=keys, values=values, counts=counts)


@props(40)
@given(paged_calls())
def test_valid_calls_match_reference(case):
    args, options = case["args"], case["options"]
    q = args["q"]
    out64, lse64 = float64_attention(q, case["keys"], case["values"], case["counts"],
                                     **options)
    varlen = "cu_seqlens_q" in args
    ref, ref_lse = paged_attention(**args, **options, return_lse=True, backend="reference")
    check_close(compare("reference.out", ref, out64, TOLERANCE[q.dtype]))
    check_close(compare("reference.lse", ref_lse, lse64.T if varlen else lse64, LSE_TOLERANCE))
    checked = _validate(q, args["k_cache"], args["v_cache"], args["block_table"],
                        args["seq_lens"], args.get("cu_seqlens_q"), None, options["causal"],
                        options["scale"], options["window"], options["softcap"],
                        args.get("k_scale"), args.get("v_scale"), args["kv_layout"], True)
    max_q, scale, left, right, softcap, ks, vs = checked
    call = Call(q, args["k_cache"], args["v_cache"], args["block_table"], args["seq_lens"],
                args.get("cu_seqlens_q"), max_q, scale, left, right, softcap, ks, vs,
                args["kv_layout"], ref, ref_lse)
    names = [b.name for b in SPEC.backends if not SPEC.reasons(b, problem_of(call))]
    for backend in [*names, None]:
        event(f"compared {backend}")
        out, lse = paged_attention(**args, **options, return_lse=True, backend=backend)
        check_close(compare(f"{backend}.out", out, ref, TOLERANCE[q.dtype]))
        check_close(compare(f"{backend}.lse", lse, ref_lse, LSE_TOLERANCE))
        ran = plan(**args, backend=backend, **options).run(q, args["k_cache"], args["v_cache"])
        check_close(compare(f"plan({backend}).run", ran, ref, TOLERANCE[q.dtype]))


@props(30)
@given(seeds, st.sampled_from(["reference", "triton"]), st.sampled_from(["window", "chunk"]),
       st.sampled_from([math.nan, math.inf, -math.inf]), st.sampled_from(["k", "v"]))
def test_unseen_non_finite_keys_stay_out(seed, backend, mask, poison, which):
    """A NaN / inf at a position the mask hides (before a window, after a query of the same
    chunk) reaches no query that cannot see it; flash_attention under the same mask too."""
    gen = torch.Generator().manual_seed(seed)
    n, d = 11, 16
    k, v = torch.randn(n, 2, d, generator=gen), torch.randn(n, 2, d, generator=gen)
    target = k if which == "k" else v
    hidden = 0 if mask == "window" else n - 1
    target[hidden, :, 3] = poison
    table = torch.arange(n, dtype=torch.int32)[None]  # page size 1, page j = position j
    caches = [t.to(torch.bfloat16)[:, None] for t in (k, v)]
    m = 1 if mask == "window" else 4
    q = torch.randn(m, 2, d, generator=gen).to(torch.bfloat16)
    kw = (dict(window=(3, 0)) if mask == "window"
          else dict(cu_seqlens_q=torch.tensor([0, m], dtype=torch.int32)))
    out = paged_attention(q, *caches, table, torch.tensor([n], dtype=torch.int32),
                          backend=backend, **kw)
    blind = slice(0, m) if mask == "window" else slice(0, m - 1)
    assert torch.isfinite(out[blind]).all(), f"{backend}: a hidden {poison} reached a query"
    flat = flash_attention(q[None], *(t.to(torch.bfloat16)[None] for t in (k, v)),
                           causal=True, backend=backend, **({"window": (3, 0)}
                                                           if mask == "window" else {}))
    assert torch.isfinite(flat[0, blind]).all(), f"flash_attention {backend}: leaked"


@props(30)
@given(seeds, st.lists(st.integers(0, 9), min_size=1, max_size=4), st.booleans(),
       st.sampled_from(["NHD", "HND"]), st.booleans())
def test_append_writes_exactly_the_new_slots(seed, old, varlen, layout, fp8):
    gen = torch.Generator().manual_seed(seed)
    new = [int(torch.randint(0, 3, (1,), generator=gen)) for _ in old] if varlen else [1] * len(
        old)
    lens = [a + b for a, b in zip(old, new)]
    page = 4
    per = [-(-n // page) for n in lens]
    pages = sum(per) + 1
    shape = (pages, page, 2, 16) if layout == "NHD" else (pages, 2, page, 16)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    table = torch.full((len(lens), max(per + [1])), -1, dtype=torch.int32)
    perm, at = torch.randperm(pages, generator=gen), 0
    for b, p in enumerate(per):
        table[b, :p] = perm[at:at + p].int()
        at += p
    k, v = torch.randn(sum(new), 2, 16, generator=gen), torch.randn(sum(new), 2, 16,
                                                                     generator=gen)
    kw: dict = {"kv_layout": layout}
    if varlen:
        kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()],
                                        dtype=torch.int32)
    if fp8:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        kw.update(k_scale=0.5, v_scale=0.5)
    want_k, want_v = k_cache.float().clone(), v_cache.float().clone()
    at = 0
    for b, m in enumerate(new):
        for i in range(m):
            pos = lens[b] - m + i
            pg, slot = int(table[b, pos // page]), pos % page
            for cache, src in ((want_k, k), (want_v, v)):
                row = src[at + i]
                row = (row / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float() if fp8 else row
                if layout == "NHD":
                    cache[pg, slot] = row
                else:
                    cache[pg, :, slot] = row
        at += m
    append_paged_kv(k, v, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), **kw)
    assert torch.equal(k_cache.float(), want_k) and torch.equal(v_cache.float(), want_v)


def _base(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(q=torch.randn(3, 4, 16, generator=gen), k_cache=torch.randn(8, 4, 2, 16,
                                                                             generator=gen),
                v_cache=torch.randn(8, 4, 2, 16, generator=gen),
                block_table=torch.tensor([[0, 1, 2], [3, 4, -1], [5, -1, -1]],
                                         dtype=torch.int32),
                seq_lens=torch.tensor([9, 5, 2], dtype=torch.int32))


def _varlen(a: dict, offsets: list[int], **extra) -> dict:
    return dict(a, q=torch.randn(offsets[-1] if offsets else 0, 4, 16),
                cu_seqlens_q=torch.tensor(offsets, dtype=torch.int32), **extra)


PAGED_BAD = {
    "q 4-D": lambda a: dict(a, q=a["q"][None]),
    "q float64": lambda a: dict(a, q=a["q"].double()),
    "q of another dtype than the caches": lambda a: dict(a, q=a["q"].bfloat16()),
    "q last dim strided": lambda a: dict(a, q=torch.randn(3, 4, 32)[..., ::2]),
    "q rows for another batch": lambda a: dict(a, q=a["q"][:2]),
    "q heads not a multiple": lambda a: dict(a, q=a["q"][:, :3]),
    "q on meta": lambda a: dict(a, q=a["q"].to("meta")),
    "caches of another shape": lambda a: dict(a, v_cache=a["v_cache"][:7]),
    "page size 0": lambda a: dict(a, k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0]),
    "kv_layout lower case": lambda a: dict(a, kv_layout="nhd"),
    "block_table int64": lambda a: dict(a, block_table=a["block_table"].long()),
    "block_table not contiguous": lambda a: dict(
        a, block_table=a["block_table"].repeat_interleave(2, 1)[:, ::2]),
    "a page id past the cache": lambda a: dict(a, block_table=a["block_table"].index_put(
        (torch.tensor([0]), torch.tensor([1])), torch.tensor([8], dtype=torch.int32))),
    "a negative page id in use": lambda a: dict(a, block_table=a["block_table"].index_put(
        (torch.tensor([1]), torch.tensor([1])), torch.tensor([-1], dtype=torch.int32))),
    "seq_lens past the capacity": lambda a: dict(a, seq_lens=torch.tensor([13, 5, 2],
                                                                          dtype=torch.int32)),
    "seq_lens negative": lambda a: dict(a, seq_lens=torch.tensor([9, -5, 2], dtype=torch.int32)),
    "seq_lens of another batch": lambda a: dict(a, seq_lens=a["seq_lens"][:2]),
    "max_seqlen_q for decode": lambda a: dict(a, max_seqlen_q=1),
    "cu_seqlens_q decreasing": lambda a: _varlen(a, [0, 3, 2, 5]),
    "cu_seqlens_q past the queries": lambda a: dict(_varlen(a, [0, 1, 2, 3]),
                                                    q=torch.randn(2, 4, 16)),
    "cu_seqlens_q of another batch": lambda a: _varlen(a, [0, 1, 2]),
    "max_seqlen_q below the longest run": lambda a: _varlen(a, [0, 2, 3, 3], max_seqlen_q=1),
    "max_seqlen_q negative": lambda a: _varlen(a, [0, 2, 3, 3], max_seqlen_q=-1),
    "max_seqlen_q a float": lambda a: _varlen(a, [0, 2, 3, 3], max_seqlen_q=2.0),
    "causal 1": lambda a: dict(a, causal=1),
    "return_lse a string": lambda a: dict(a, return_lse="yes"),
    "scale nan": lambda a: dict(a, scale=math.nan),
    "softcap negative": lambda a: dict(a, softcap=-1.0),
    "window of 2**31": lambda a: dict(a, window=(2**31, 0)),
    "causal with a right window": lambda a: dict(a, window=(3, 2)),
    "scales for a float cache": lambda a: dict(a, k_scale=0.5, v_scale=0.5),
    "fp8 cache without scales": lambda a: dict(a, q=a["q"].bfloat16(),
                                               k_cache=a["k_cache"].to(torch.float8_e4m3fn),
                                               v_cache=a["v_cache"].to(torch.float8_e4m3fn)),
    "fp8 scale 0": lambda a: dict(a, q=a["q"].bfloat16(),
                                  k_cache=a["k_cache"].to(torch.float8_e4m3fn),
                                  v_cache=a["v_cache"].to(torch.float8_e4m3fn),
                                  k_scale=0.0, v_scale=1.0),
    "backend unknown": lambda a: dict(a, backend="magic"),
    "triton on float32": lambda a: dict(a, backend="triton"),
}


@props(80)
@given(st.sampled_from(sorted(PAGED_BAD)), seeds)
def test_paged_rejects_bad_arguments(kind, seed):
    args = PAGED_BAD[kind](_base(seed))
    expect_named_error(lambda: paged_attention(**args), "paged_attention", kind)


APPEND_BAD = {
    "k and v shapes differ": lambda a: dict(a, v=a["v"][..., :8]),
    "k of another dtype than the caches": lambda a: dict(a, k=a["k"].half(), v=a["v"].half()),
    "rows for another batch": lambda a: dict(a, k=a["k"][:2], v=a["v"][:2]),
    "a page id past the cache": lambda a: dict(a, block_table=a["block_table"].index_put(
        (torch.tensor([0]), torch.tensor([2])), torch.tensor([9], dtype=torch.int32))),
    "seq_lens 0 for a new token": lambda a: dict(a, seq_lens=torch.tensor([9, 0, 2],
                                                                          dtype=torch.int32)),
    "cu_seqlens decreasing": lambda a: dict(a, cu_seqlens=torch.tensor([0, 2, 1, 3],
                                                                       dtype=torch.int32)),
    "more new tokens than seq_lens": lambda a: dict(a, cu_seqlens=torch.tensor(
        [0, 0, 0, 3], dtype=torch.int32)),
    "kv_layout unknown": lambda a: dict(a, kv_layout="XYZ"),
}


@props(40)
@given(st.sampled_from(sorted(APPEND_BAD)), seeds)
def test_append_rejects_bad_arguments(kind, seed):
    a = _base(seed)
    a = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=a["k_cache"],
             v_cache=a["v_cache"], block_table=a["block_table"], seq_lens=a["seq_lens"])
    args = APPEND_BAD[kind](a)
    expect_named_error(lambda: append_paged_kv(**args), "append_paged_kv", kind)


# ---- cascade ----------------------------------------------------------------------------------


@st.composite
def cascade_calls(draw) -> dict:
    """Level 0: one shared prefix for every request; level 1: each request's own suffix."""
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    page = draw(st.sampled_from([1, 4]))
    batch = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 9))
    suffixes = [draw(st.integers(0, 6)) for _ in range(batch)]
    lengths = [prefix, *suffixes]
    per = [-(-n // page) for n in lengths]
    pages = sum(per) + 1
    k_cache = torch.randn(pages, page, 2, 16, generator=gen).to(dtype)
    v_cache = torch.randn(pages, page, 2, 16, generator=gen).to(dtype)
    table = torch.zeros(len(lengths), max(per + [1]), dtype=torch.int32)
    perm, at = torch.randperm(pages, generator=gen), 0
    for b, p in enumerate(per):
        table[b, :p] = perm[at:at + p].int()
        at += p

    def gather(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = lengths[b]
        rows = [table[b, j // page] for j in range(n)]
        return (torch.stack([k_cache[int(r), j % page] for j, r in enumerate(rows)]) if n else
                torch.zeros(0, 2, 16, dtype=dtype),
                torch.stack([v_cache[int(r), j % page] for j, r in enumerate(rows)]) if n else
                torch.zeros(0, 2, 16, dtype=dtype))

    shared = gather(0)
    own = [gather(1 + r) for r in range(batch)]
    keys = [torch.cat([shared[0], own[r][0]]).double() for r in range(batch)]
    values = [torch.cat([shared[1], own[r][1]]).double() for r in range(batch)]
    levels = [(table[:1].clone(), torch.tensor([prefix], dtype=torch.int32),
               torch.tensor([0, batch], dtype=torch.int32)),
              (table[1:].clone(), torch.tensor(suffixes, dtype=torch.int32),
               torch.arange(batch + 1, dtype=torch.int32))]
    counts = [draw(st.integers(0, min(s, 3))) for s in suffixes]
    chunked = draw(st.booleans())
    if not chunked:
        counts = [1] * batch
    q = torch.randn(sum(counts), 4, 16, generator=gen).to(dtype)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, levels=levels,
                softcap=draw(st.sampled_from([0.0, 3.0])))
    if chunked:
        args["cu_seqlens_q"] = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()],
                                            dtype=torch.int32)
    return dict(args=args, keys=keys, values=values, counts=counts)


@props(30)
@given(cascade_calls(), st.sampled_from(["reference", None, "triton"]))
def test_cascade_equals_attention_over_the_levels(case, backend):
    args = case["args"]
    q = args["q"]
    if backend == "triton" and q.dtype == torch.float32:
        backend = "reference"  # the Triton kernels take fp16 / bf16
    event(f"backend {backend}")
    out64, _ = float64_attention(q, case["keys"], case["values"], case["counts"], True, None,
                                 args["softcap"], None)
    out = cascade_attention(**args, backend=backend)
    check_close(compare(f"cascade({backend})", out, out64, TOLERANCE[q.dtype]))


CASCADE_BAD = {
    "levels empty": lambda a: dict(a, levels=[]),
    "a level of two tensors": lambda a: dict(a, levels=[a["levels"][0][:2]]),
    "group_indptr short of the requests": lambda a: dict(a, levels=[
        (a["levels"][0][0], a["levels"][0][1], torch.tensor([0, 1], dtype=torch.int32))]),
    "a page id past the cache": lambda a: dict(a, levels=[
        (torch.full_like(a["levels"][0][0], 99), *a["levels"][0][1:])]),
    "a level length past its table": lambda a: dict(a, levels=[
        (a["levels"][0][0], torch.tensor([999], dtype=torch.int32), a["levels"][0][2])]),
    "q float64": lambda a: dict(a, q=a["q"].double()),
    "q head_dim of another size": lambda a: dict(a, q=a["q"][..., :8]),
    "causal 1": lambda a: dict(a, causal=1),
    "return_lse a string": lambda a: dict(a, return_lse="yes"),
    "scale nan": lambda a: dict(a, scale=math.nan),
    "softcap negative": lambda a: dict(a, softcap=-1.0),
    "max_seqlen_q a float": lambda a: dict(a, cu_seqlens_q=torch.arange(
        a["q"].shape[0] + 1, dtype=torch.int32), max_seqlen_q=1.5),
    "kv_layout lower case": lambda a: dict(a, kv_layout="nhd"),
    "backend unknown": lambda a: dict(a, backend="magic"),
}


@props(60)
@given(st.sampled_from(sorted(CASCADE_BAD)), seeds, st.sampled_from([None, "reference"]))
def test_cascade_rejects_bad_arguments(kind, seed, backend):
    a = _base(seed)
    batch = a["q"].shape[0]
    base = dict(q=a["q"].bfloat16(), k_cache=a["k_cache"].bfloat16(),
                v_cache=a["v_cache"].bfloat16(), backend=backend,
                levels=[(a["block_table"][:1], a["seq_lens"][:1],
                         torch.tensor([0, batch], dtype=torch.int32))])
    args = CASCADE_BAD[kind](base)
    expect_named_error(lambda: cascade_attention(**args), "cascade_attention", kind)


@props(30)
@given(seeds, st.integers(0, 9), st.sampled_from([torch.float32, torch.bfloat16]))
def test_merge_of_two_parts_is_attention_over_both(seed, cut, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, 2, 16, generator=gen).to(dtype) for s in (5, 9, 9))
    parts = []
    for lo, hi in ((0, cut), (cut, 9)):
        o, lse = flash_attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True,
                                 backend="reference")
        parts += [o[0], lse[0].T.contiguous()]
    out, lse = merge_attention_states(*parts)
    want, want_lse = flash_attention(q, k, v, return_lse=True, backend="reference")
    # the parts' outputs are rounded to the dtype before merging: one unit more than one pass
    check_close(compare("merge.out", out, want[0], 2 * TOLERANCE[dtype]))
    check_close(compare("merge.lse", lse, want_lse[0].T, LSE_TOLERANCE))
    expect_named_error(lambda: merge_attention_states(parts[0], parts[1].half(), *parts[2:]),
                       "merge_attention_states")
    expect_named_error(lambda: merge_attention_states(parts[0], parts[1].T, *parts[2:]),
                       "merge_attention_states")
