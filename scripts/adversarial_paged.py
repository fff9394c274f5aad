"""Adversarial scenarios of attention over a paged KV cache (``paged_attention``,
``append_paged_kv``, ``plan`` / ``Plan.run``) and of cascade attention (``cascade_attention``,
``merge_attention_states``), registered into ``scripts/adversarial.py``'s table (which imports
this file; run that one): valid calls against float64 attention over the gathered keys
(reference and Triton-interpreter backends, both layouts, fp8 caches, views of a shared KV
buffer), wrong shapes / dtypes / devices / types, page tables, lengths and offsets out of range
on the CPU, NaN / inf scalars, empty batches and absurd ``max_seqlen_q`` hints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adversarial import (
    AREAS,
    TOL,
    Lazy,
    Outcome,
    T,
    add,
    expect_close,
    expect_ok,
    meta,
    mismatch,
    naive_attention,
    overflow_inputs,
    overflow_truth,
    randn,
    resolve,
)
from adversarial_gemm import ints, refuse, torch_

AREAS.update({"paged": "paged_attention", "cascade": "cascade_attention"})
PA = ("paged_attention",)
AP = ("append_paged_kv",)
CA = ("cascade_attention",)
MS = ("merge_attention_states",)


# ---- a paged cache ---------------------------------------------------------------------------


def paged_cache(lengths: list[int], page_size: int = 4, hkv: int = 2, d: int = 16,
                layout: str = "NHD", dtype: str = "float32", spare: int = 2,
                poison: float = math.nan, seed: int = 0) -> dict:
    """Random keys and values of each sequence on shuffled pages; every other slot (unused
    pages, slots past a sequence's end) holds ``poison``; unused table entries are -7."""
    torch = torch_()
    gen = torch.Generator().manual_seed(seed)
    per = [-(-n // page_size) for n in lengths]
    pages = sum(per) + spare
    shape = (pages, page_size, hkv, d) if layout == "NHD" else (pages, hkv, page_size, d)
    k_cache = torch.full(shape, poison)
    v_cache = torch.full(shape, poison)
    perm = torch.randperm(pages, generator=gen)
    table = torch.full((len(lengths), max(per + [1]) + 1), -7, dtype=torch.int32)
    keys, values, at = [], [], 0
    for b, (n, p) in enumerate(zip(lengths, per)):
        table[b, :p] = perm[at:at + p].int()
        at += p
        k = torch.randn(n, hkv, d, generator=gen)
        v = torch.randn(n, hkv, d, generator=gen)
        for j in range(n):
            page, slot = int(table[b, j // page_size]), j % page_size
            if layout == "NHD":
                k_cache[page, slot], v_cache[page, slot] = k[j], v[j]
            else:
                k_cache[page, :, slot], v_cache[page, :, slot] = k[j], v[j]
        keys.append(k)
        values.append(v)
    kind = getattr(torch, dtype)
    return dict(k_cache=k_cache.to(kind), v_cache=v_cache.to(kind), block_table=table,
                seq_lens=torch.tensor(lengths, dtype=torch.int32),
                keys=[k.to(kind) for k in keys], values=[v.to(kind) for v in values])


def naive_paged(q: Any, keys: list, values: list, queries: list[int] | None, *,
                causal: bool = True, window: Any = None, softcap: float = 0.0,
                scale: float | None = None) -> tuple[Any, Any]:
    """float64 attention of each sequence's queries (its last tokens) over its keys: out like
    q, lse (B, Hq) for decode or (Hq, Tq) with queries."""
    torch = torch_()
    counts = queries if queries is not None else [1] * len(keys)
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float64)
    at = 0
    for k, v, m in zip(keys, values, counts):
        if m:
            o, s = naive_attention(q[None, at:at + m], k[None], v[None], causal=causal,
                                   window=tuple(window) if window else (-1, -1),
                                   softcap=softcap, scale=scale)
            out[at:at + m], lse[at:at + m] = o[0], s[0].T
        at += m
    return out, (lse if queries is None else lse.T)


def queries_of(counts: list[int], heads: int = 4, d: int = 16, dtype: str = "float32"
               ) -> tuple[Any, Any]:
    torch = torch_()
    q = randn(sum(counts), heads, d, dtype=dtype, seed=40)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return q, offsets


def paged_case(backend: str, lengths: list[int], *, queries: list[int] | None = None,
               page_size: int = 4, layout: str = "NHD", dtype: str = "float32",
               view: Callable[[dict], dict] | None = None, fp8: bool = False,
               **given: Any) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import paged_attention

        torch = torch_()
        options = dict(given, kv_layout=layout)
        c = paged_cache(lengths, page_size, layout=layout, dtype=dtype)
        q, offsets = queries_of(queries or [1] * len(lengths), dtype=dtype)
        if queries is None:
            q = q[: len(lengths)]
        args = dict(q=q, k_cache=c["k_cache"], v_cache=c["v_cache"],
                    block_table=c["block_table"], seq_lens=c["seq_lens"])
        keys, values = c["keys"], c["values"]
        if fp8:  # an e4m3 cache of k / 0.5 and v / 0.25: reads back as cache * scale
            f8 = torch.float8_e4m3fn
            args["k_cache"] = (c["k_cache"].float() / 0.5).to(f8)
            args["v_cache"] = (c["v_cache"].float() / 0.25).to(f8)
            options = dict(options, k_scale=0.5, v_scale=torch.tensor([0.25, 0.25]))
            keys = [(k.float() / 0.5).to(f8).double() * 0.5 for k in keys]
            values = [(v.float() / 0.25).to(f8).double() * 0.25 for v in values]
        if queries is not None:
            args["cu_seqlens_q"] = offsets
        if view is not None:
            args = view(args)
        truth = {n: options[n] for n in ("causal", "window", "softcap", "scale") if n in options}
        want = naive_paged(args["q"], keys, values, queries, **truth)
        return expect_close(lambda: paged_attention(**args, return_lse=True, backend=backend,
                                                    **options), want, TOL[dtype], PA)

    return run


def _shared_kv_buffer(args: dict) -> dict:
    """k_cache and v_cache as views of one (pages, page_size, 2, Hkv, D) buffer (vLLM-style)."""
    torch = torch_()
    k, v = args["k_cache"], args["v_cache"]
    both = torch.stack([k, v], 2)
    return {**args, "k_cache": both[:, :, 0], "v_cache": both[:, :, 1]}


def _q_heads_strided(args: dict) -> dict:
    """q as a (B, Hq, D) view of a (Hq, B, D) tensor (last dim contiguous)."""
    return {**args, "q": args["q"].transpose(0, 1).contiguous().transpose(0, 1)}


def _q_expanded(args: dict) -> dict:
    return {**args, "q": args["q"][:1].expand_as(args["q"])}


def _cache_expanded(args: dict) -> dict:
    """Every page a stride-0 view of page 0 (a test pattern: one page repeated)."""
    k, v = args["k_cache"], args["v_cache"]
    return {**args, "k_cache": k[:1].expand_as(k), "v_cache": v[:1].expand_as(v)}


LENGTHS = [5, 0, 9, 4, 1]
for _name, _backend, _kw in [
    ("decode NHD fp32, reference", "reference", {}),
    ("decode NHD bf16, triton", "triton", dict(dtype="bfloat16")),
    ("decode HND fp16, triton", "triton", dict(dtype="float16", layout="HND")),
    ("decode page size 1, triton", "triton", dict(dtype="bfloat16", page_size=1)),
    ("decode window (3, 0) and softcap 2, triton", "triton",
     dict(dtype="bfloat16", window=(3, 0), softcap=2.0)),
    ("decode scale 0 (uniform), triton", "triton", dict(dtype="bfloat16", scale=0.0)),
    ("chunked prefill (queries 2, 0, 4, 4, 1), triton", "triton",
     dict(dtype="bfloat16", queries=[2, 0, 4, 4, 1])),
    ("chunked prefill not causal, window (2, 1), triton", "triton",
     dict(dtype="bfloat16", queries=[2, 0, 4, 4, 1], causal=False, window=(2, 1))),
    ("fp8 e4m3 cache with scales, reference", "reference", dict(fp8=True)),
    ("fp8 e4m3 cache with scales, triton", "triton", dict(dtype="bfloat16", fp8=True)),
    ("caches as views of one K/V buffer, triton", "triton",
     dict(dtype="bfloat16", view=_shared_kv_buffer)),
    ("caches as views of one K/V buffer, HND, triton", "triton",
     dict(dtype="bfloat16", layout="HND", view=_shared_kv_buffer)),
    ("q a head-major view, triton", "triton", dict(dtype="bfloat16", view=_q_heads_strided)),
    ("q rows expanded (stride 0), triton", "triton", dict(dtype="bfloat16", view=_q_expanded)),
]:
    add("paged", _name, f"paged_attention {_name}: out and lse against float64 attention over "
        "the gathered keys (unused slots NaN)", paged_case(_backend, LENGTHS, **_kw))


def _paged_expanded_cache(backend: str) -> Callable[[Path], Outcome]:
    """Caches whose pages are all one stride-0 page: every key is page 0's slot."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import paged_attention

        torch = torch_()
        c = paged_cache([6, 3], 4, dtype="bfloat16", poison=0.0)
        k, v = c["k_cache"][:1].expand_as(c["k_cache"]), c["v_cache"][:1].expand_as(c["v_cache"])
        q = randn(2, 4, 16, dtype="bfloat16", seed=41)
        keys = [k[0].repeat(2, 1, 1)[:n] for n in (6, 3)]
        values = [v[0].repeat(2, 1, 1)[:n] for n in (6, 3)]
        want = naive_paged(q, keys, values, None)
        table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
        return expect_close(lambda: paged_attention(q, k, v, table, c["seq_lens"],
                                                    return_lse=True, backend=backend),
                            want, TOL["bfloat16"], PA)

    return run


add("paged", "caches expanded from one page (stride 0), triton", "paged_attention with "
    "k_cache/v_cache = page0.expand(pages, ...)", _paged_expanded_cache("triton"))


def _paged_empty(backend: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import paged_attention

        c = paged_cache([3], 4, dtype="bfloat16")
        q = randn(0, 4, 16, dtype="bfloat16")
        table = c["block_table"][:0]
        lens = c["seq_lens"][:0]

        def check() -> str | None:
            out, lse = paged_attention(q, c["k_cache"], c["v_cache"], table, lens,
                                       return_lse=True, backend=backend)
            return None if out.shape == (0, 4, 16) and lse.shape == (0, 4) else \
                f"out {tuple(out.shape)}, lse {tuple(lse.shape)}"

        return expect_ok(check, PA)

    return run


add("paged", "empty batch, triton", "paged_attention of B = 0 sequences: empty out and lse",
    _paged_empty("triton"))


def _nan_invisible(backend: str, what: str) -> Callable[[Path], Outcome]:
    """A NaN key/value a query cannot see must not reach it: decode with a window leaves
    position 0 out; chunked prefill (causal) hides the last key from the earlier queries."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import paged_attention

        torch = torch_()
        c = paged_cache([9], 4, dtype="bfloat16")
        page_of = lambda j: int(c["block_table"][0, j // 4])  # noqa: E731
        if what == "window":
            q = randn(1, 4, 16, dtype="bfloat16", seed=42)
            kw = dict(window=(3, 0))
            c["v_cache"][page_of(0), 0] = math.nan
            c["k_cache"][page_of(1), 1] = math.nan
            rows = slice(0, 1)
        else:
            q, offsets = queries_of([4], dtype="bfloat16")
            kw = dict(cu_seqlens_q=offsets)
            c["v_cache"][page_of(8), 0] = math.nan
            rows = slice(0, 3)  # queries at positions 5..7 do not see key 8

        def check() -> str | None:
            out = paged_attention(q, c["k_cache"], c["v_cache"], c["block_table"],
                                  c["seq_lens"], backend=backend, **kw)
            bad = int(torch.isnan(out[rows]).any(-1).any(-1).sum())
            return f"{bad} queries got NaN from a key they cannot see" if bad else None

        return expect_ok(check, PA)

    return run


for _backend in ("reference", "triton"):
    add("paged", f"NaN in a key/value outside the window, {_backend}", "decode with window "
        "(3, 0) over 9 keys, NaN in v[0] and k[1]: the query never sees them",
        _nan_invisible(_backend, "window"))
    add("paged", f"NaN in the last value, earlier prefill queries, {_backend}", "chunked "
        "prefill of 4 queries over 9 keys, NaN in v[8]: queries 5..7 do not see key 8",
        _nan_invisible(_backend, "causal"))


def _plan_case(update: bool) -> Callable[[Path], Outcome]:
    """plan() once, run() per layer: equal to paged_attention; seq_lens updated in place
    between runs (documented: the plan keeps the tensors by reference)."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops.paged_attention import paged_attention, plan

        torch = torch_()
        c = paged_cache([5, 8, 3], 4, dtype="bfloat16")
        q = randn(3, 4, 16, dtype="bfloat16", seed=43)

        def check() -> str | None:
            p = plan(q, c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"],
                     backend="triton")
            if update:
                c["seq_lens"].copy_(torch.tensor([4, 8, 2], dtype=torch.int32))
            out = torch.empty_like(q)
            got = p.run(q, c["k_cache"], c["v_cache"], out=out)
            want = paged_attention(q, c["k_cache"], c["v_cache"], c["block_table"],
                                   c["seq_lens"], backend="triton")
            if got is not out:
                return "run(out=...) returned another tensor"
            return mismatch(got, want, 0.0, "plan.run")

        return expect_ok(check, PA)

    return run


add("paged", "plan/run equals paged_attention", "plan(...).run(q, k, v, out=out) equals "
    "paged_attention(...) bit for bit and writes out", _plan_case(False))
add("paged", "plan/run sees seq_lens updated in place", "seq_lens changed in place after "
    "plan(): run() uses the new lengths, as documented", _plan_case(True))


def _append_case(varlen: bool, fp8: bool, layout: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import append_paged_kv

        torch = torch_()
        new = [2, 1, 3] if varlen else [1, 1, 1]
        lens = torch.tensor([5 + new[0], new[1], 7 + new[2]], dtype=torch.int32)
        c = paged_cache(lens.tolist(), 4, layout=layout, poison=0.0)
        table = c["block_table"]
        k = randn(sum(new), 2, 16, seed=44)
        v = randn(sum(new), 2, 16, seed=45)
        kw: dict = {"kv_layout": layout}
        if varlen:
            kw["cu_seqlens"] = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
        kc, vc = c["k_cache"], c["v_cache"]
        if fp8:
            kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
            kw.update(k_scale=0.5, v_scale=0.5)
        want_k, want_v = kc.clone(), vc.clone()
        at = 0
        for b, m in enumerate(new):
            for i in range(m):
                pos = int(lens[b]) - m + i
                page, slot = int(table[b, pos // 4]), pos % 4
                for cache, src in ((want_k, k), (want_v, v)):
                    row = src[at + i] / 0.5 if fp8 else src[at + i]
                    row = row.clamp(-448, 448).to(cache.dtype) if fp8 else row
                    if layout == "NHD":
                        cache[page, slot] = row
                    else:
                        cache[page, :, slot] = row
            at += m

        def check() -> str | None:
            append_paged_kv(k, v, kc, vc, table, lens, **kw)
            for name, got, want in (("k_cache", kc, want_k), ("v_cache", vc, want_v)):
                if not torch.equal(got.float(), want.float()):
                    n = int((got.float() != want.float()).sum())
                    return f"{name}: {n} elements differ from the expected writes"
            return None

        return expect_ok(check, AP)

    return run


for _varlen, _fp8, _layout in [(False, False, "NHD"), (True, False, "HND"), (True, True, "NHD")]:
    _n = f"append_paged_kv {'varlen' if _varlen else 'decode'} {_layout}" \
         f"{' fp8 cache' if _fp8 else ''}"
    add("paged", _n, f"{_n}: exactly the new tokens' slots written", _append_case(
        _varlen, _fp8, _layout))


# -- must be refused -----------------------------------------------------------------------------


def pa_bad(lengths: list[int] | None = None, **override: Any) -> Callable[[], Any]:
    """paged_attention decode of 3 sequences (5, 9, 2 keys; 4-slot pages) with ``override``."""

    def call() -> Any:
        from kpt.ops import paged_attention

        c = paged_cache(lengths or [5, 9, 2], 4)
        args = dict(q=randn(3, 4, 16), k_cache=c["k_cache"], v_cache=c["v_cache"],
                    block_table=c["block_table"], seq_lens=c["seq_lens"])
        args.update(resolve(override))
        return paged_attention(**args)

    return call


def _table_with(value: int, row: int = 1, col: int = 1) -> Lazy:
    def make() -> Any:
        t = paged_cache([5, 9, 2], 4)["block_table"].clone()
        t[row, col] = value
        return t

    return Lazy(make)


def _varlen(**override: Any) -> dict:
    """Chunked prefill: 2 + 3 + 1 queries."""
    return {**dict(q=T(6, 4, 16), cu_seqlens_q=ints(0, 2, 5, 6)), **override}


PA_BAD: dict[str, tuple[str, dict]] = {
    "q 4-D": ("q (3, 1, 4, 16)", dict(q=T(3, 1, 4, 16))),
    "q float64": ("float64 q", dict(q=T(3, 4, 16, dtype="float64"))),
    "q int": ("integer q", dict(q=ints(*[0] * 192, shape=(3, 4, 16)))),
    "q bf16 over a fp32 cache": ("bf16 q, fp32 caches", dict(q=T(3, 4, 16, dtype="bfloat16"))),
    "q last dim strided": ("q[..., ::2] of a (3, 4, 32) tensor",
                           dict(q=Lazy(lambda: randn(3, 4, 32)[..., ::2]))),
    "q of 2 rows for 3 sequences": ("decode q (2, 4, 16)", dict(q=T(2, 4, 16))),
    "q head_dim 8": ("q head_dim 8, caches 16", dict(q=T(3, 4, 8))),
    "q heads 3 over 2 kv heads": ("3 query heads", dict(q=T(3, 3, 16))),
    "q on meta": ("q on the meta device", dict(q=meta(3, 4, 16))),
    "k_cache 3-D": ("k_cache (pages, 4, 32)", dict(k_cache=T(6, 4, 32), v_cache=T(6, 4, 32))),
    "v_cache shape differs": ("v_cache with one page fewer", dict(v_cache=T(6, 4, 2, 16))),
    "caches of page size 0": ("caches (7, 0, 2, 16)", dict(k_cache=T(7, 0, 2, 16),
                                                          v_cache=T(7, 0, 2, 16))),
    "caches of page size 257": ("caches (2, 257, 2, 16)", dict(k_cache=T(2, 257, 2, 16),
                                                              v_cache=T(2, 257, 2, 16))),
    "caches of no pages": ("caches (0, 4, 2, 16)", dict(k_cache=T(0, 4, 2, 16),
                                                       v_cache=T(0, 4, 2, 16))),
    "k_cache last dim strided": ("k_cache[..., ::2] views", dict(
        k_cache=Lazy(lambda: randn(7, 4, 2, 32)[..., ::2]),
        v_cache=Lazy(lambda: randn(7, 4, 2, 32)[..., ::2]))),
    "kv_layout 'nhd'": ("kv_layout='nhd'", dict(kv_layout="nhd")),
    "block_table int64": ("int64 block_table", dict(block_table=Lazy(
        lambda: paged_cache([5, 9, 2], 4)["block_table"].long()))),
    "block_table 1-D": ("block_table (3,)", dict(block_table=ints(0, 1, 2))),
    "block_table not contiguous": ("block_table[:, ::2] of a wider one", dict(
        block_table=Lazy(lambda: paged_cache([5, 9, 2], 4)["block_table"].repeat_interleave(
            2, 1)[:, ::2]))),
    "block_table on meta": ("block_table on meta", dict(block_table=meta(3, 4, dtype="int32"))),
    "seq_lens int64": ("int64 seq_lens", dict(seq_lens=ints(5, 9, 2, dtype="int64"))),
    "seq_lens of 2": ("seq_lens of 2 entries", dict(seq_lens=ints(5, 9))),
    "a page id past the cache": ("block_table[1, 1] = 999", dict(block_table=_table_with(999))),
    "a negative page id in use": ("block_table[1, 2] = -1", dict(block_table=_table_with(-1, 1,
                                                                                         2))),
    "seq_lens past the table's capacity": ("seq_lens [5, 99, 2]", dict(seq_lens=ints(5, 99, 2))),
    "seq_lens negative": ("seq_lens [5, -1, 2]", dict(seq_lens=ints(5, -1, 2))),
    "seq_lens 2**31 - 1": ("seq_lens [5, 2**31 - 1, 2]", dict(seq_lens=ints(5, 2**31 - 1, 2))),
    "max_seqlen_q without cu_seqlens_q": ("decode with max_seqlen_q=1", dict(max_seqlen_q=1)),
    "cu_seqlens_q decreasing": ("cu_seqlens_q [0, 5, 2, 6]",
                                _varlen(cu_seqlens_q=ints(0, 5, 2, 6))),
    "cu_seqlens_q past the queries": ("cu_seqlens_q [0, 2, 5, 7] over 6 queries",
                                      _varlen(cu_seqlens_q=ints(0, 2, 5, 7))),
    "cu_seqlens_q short of the queries": ("cu_seqlens_q [0, 2, 5, 5] over 6 queries",
                                          _varlen(cu_seqlens_q=ints(0, 2, 5, 5))),
    "cu_seqlens_q of 3 entries": ("cu_seqlens_q [0, 2, 6] for 3 sequences",
                                  _varlen(cu_seqlens_q=ints(0, 2, 6))),
    "cu_seqlens_q int64": ("int64 cu_seqlens_q", _varlen(cu_seqlens_q=ints(0, 2, 5, 6,
                                                                        dtype="int64"))),
    "more queries than keys": ("4 queries of a 2-key sequence (causal: allowed, must match)",
                               {}),
    "max_seqlen_q below the longest run": ("max_seqlen_q=2 with a run of 3",
                                           _varlen(max_seqlen_q=2)),
    "max_seqlen_q -1": ("max_seqlen_q=-1", _varlen(max_seqlen_q=-1)),
    "max_seqlen_q 3.0": ("max_seqlen_q=3.0", _varlen(max_seqlen_q=3.0)),
    "max_seqlen_q True": ("max_seqlen_q=True", _varlen(max_seqlen_q=True)),
    "causal 1": ("causal=1", dict(causal=1)),
    "return_lse 'yes'": ("return_lse='yes'", dict(return_lse="yes")),
    "scale nan": ("scale=nan", dict(scale=math.nan)),
    "scale inf": ("scale=inf", dict(scale=math.inf)),
    "softcap -1": ("softcap=-1", dict(softcap=-1.0)),
    "softcap nan": ("softcap=nan", dict(softcap=math.nan)),
    "window (-2, 0)": ("window=(-2, 0)", dict(window=(-2, 0))),
    "window (2**31, 0)": ("window=(2**31, 0)", dict(window=(2**31, 0))),
    "causal with a right window": ("causal=True, window=(4, 2)", dict(window=(4, 2))),
    "k_scale for a fp32 cache": ("k_scale=0.5 on a float32 cache", dict(k_scale=0.5,
                                                                         v_scale=0.5)),
    "backend 'magic'": ("backend='magic'", dict(backend="magic")),
    "backend 'cuda' on the CPU": ("backend='cuda'", dict(backend="cuda")),
    "triton on fp32": ("backend='triton' with fp32 q and caches", dict(backend="triton")),
}
del PA_BAD["more queries than keys"]
refuse("paged", PA_BAD, pa_bad, "paged_attention", PA)


def _fp8_cache(**scales: Any) -> dict:
    def make(which: str) -> Lazy:
        return Lazy(lambda: paged_cache([5, 9, 2], 4, poison=0.0)[which].to(
            torch_().float8_e4m3fn))

    return dict(k_cache=make("k_cache"), v_cache=make("v_cache"), q=T(3, 4, 16,
                                                                       dtype="bfloat16"),
                **scales)


refuse("paged", {
    "fp8 cache without k_scale": ("an e4m3 cache, no scales", _fp8_cache()),
    "fp8 k_scale 0": ("k_scale=0", _fp8_cache(k_scale=0.0, v_scale=1.0)),
    "fp8 k_scale -1": ("k_scale=-1", _fp8_cache(k_scale=-1.0, v_scale=1.0)),
    "fp8 k_scale nan": ("k_scale=nan", _fp8_cache(k_scale=math.nan, v_scale=1.0)),
    "fp8 v_scale inf tensor": ("v_scale=tensor([inf])",
                               _fp8_cache(k_scale=1.0, v_scale=Lazy(
                                   lambda: torch_().tensor([math.inf])))),
    "fp8 k_scale of 3 values for 2 kv heads": ("k_scale of 3 values", _fp8_cache(
        k_scale=T(3), v_scale=1.0)),
    "fp8 k_scale (2, 1)": ("k_scale of shape (2, 1)", _fp8_cache(k_scale=T(2, 1), v_scale=1.0)),
    "fp8 k_scale True": ("k_scale=True", _fp8_cache(k_scale=True, v_scale=1.0)),
    "fp8 k_scale '0.5'": ("k_scale='0.5'", _fp8_cache(k_scale="0.5", v_scale=1.0)),
}, pa_bad, "paged_attention", PA)


def _more_queries_than_keys(_tmp: Path) -> Outcome:
    """A chunk of 4 queries over a 2-key sequence: the first two see nothing (out 0, lse
    -inf), as flash_attention documents for more queries than keys."""
    from kpt.ops import paged_attention

    c = paged_cache([2, 5], 4, dtype="bfloat16")
    q, offsets = queries_of([4, 1], dtype="bfloat16")
    want = naive_paged(q, c["keys"], c["values"], [4, 1])
    return expect_close(lambda: paged_attention(q, c["k_cache"], c["v_cache"], c["block_table"],
                                                c["seq_lens"], cu_seqlens_q=offsets,
                                                return_lse=True, backend="triton"),
                        want, TOL["bfloat16"], PA)


add("paged", "more queries than keys, triton", "chunked prefill of 4 queries over a 2-key "
    "sequence: queries without keys give 0 and lse -inf", _more_queries_than_keys)


def _hint_case(hint: int) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import paged_attention

        c = paged_cache([5, 9, 2], 4, dtype="bfloat16")
        q, offsets = queries_of([2, 3, 1], dtype="bfloat16")
        want = naive_paged(q, c["keys"], c["values"], [2, 3, 1])
        return expect_close(lambda: paged_attention(
            q, c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"],
            cu_seqlens_q=offsets, max_seqlen_q=hint, return_lse=True, backend="triton"),
            want, TOL["bfloat16"], PA)

    return run


add("paged", "max_seqlen_q 10**9 (clamped), triton", "chunked prefill with max_seqlen_q=10**9 "
    "for runs of 2, 3, 1 queries: the grid is sized from the tensors", _hint_case(10**9),
    timeout=60)
add("paged", "max_seqlen_q 2**70, triton", "chunked prefill with max_seqlen_q=2**70 (beyond "
    "int64)", _hint_case(2**70))


def run_bad(**override: Any) -> Callable[[], Any]:
    """Plan.run with ``override`` of q / out / lse (planned on 3 decode sequences)."""

    def call() -> Any:
        from kpt.ops.paged_attention import plan

        c = paged_cache([5, 9, 2], 4, dtype="bfloat16")
        q = randn(3, 4, 16, dtype="bfloat16")
        p = plan(q, c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"])
        args = {**dict(q=q, k_cache=c["k_cache"], v_cache=c["v_cache"]), **resolve(override)}
        return p.run(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)

    return call


refuse("paged", {
    "Plan.run q of other heads": ("q (3, 2, 16) after planning (3, 4, 16)",
                                  dict(q=T(3, 2, 16, dtype="bfloat16"))),
    "Plan.run out float32": ("out float32 for bf16 q", dict(out=T(3, 4, 16))),
    "Plan.run lse (4, 3)": ("lse (4, 3) for decode", dict(lse=T(4, 3))),
    "Plan.run caches of another head_dim": ("caches with head_dim 8", dict(
        k_cache=T(7, 4, 2, 8, dtype="bfloat16"), v_cache=T(7, 4, 2, 8, dtype="bfloat16"))),
    "Plan.run caches of another dtype": ("fp16 caches after planning bf16", dict(
        k_cache=T(7, 4, 2, 16, dtype="float16"), v_cache=T(7, 4, 2, 16, dtype="float16"))),
    "Plan.run caches with fewer pages": ("caches of 2 pages (the table names more)", dict(
        k_cache=T(2, 4, 2, 16, dtype="bfloat16"), v_cache=T(2, 4, 2, 16, dtype="bfloat16"))),
    "Plan.run q float32": ("float32 q after planning bf16", dict(q=T(3, 4, 16))),
}, run_bad, "Plan.run", PA)


def append_bad(**override: Any) -> Callable[[], Any]:
    """append_paged_kv of one token for each of 3 sequences (lengths after: 5, 9, 2)."""

    def call() -> Any:
        from kpt.ops import append_paged_kv

        c = paged_cache([5, 9, 2], 4, poison=0.0)
        args = dict(k=randn(3, 2, 16), v=randn(3, 2, 16), k_cache=c["k_cache"],
                    v_cache=c["v_cache"], block_table=c["block_table"], seq_lens=c["seq_lens"])
        args.update(resolve(override))
        return append_paged_kv(**args)

    return call


refuse("paged", {
    "append k/v shapes differ": ("v (3, 2, 8)", dict(v=T(3, 2, 8))),
    "append k bf16 into a fp32 cache": ("bf16 k and v", dict(k=T(3, 2, 16, dtype="bfloat16"),
                                                             v=T(3, 2, 16, dtype="bfloat16"))),
    "append k of 3 kv heads": ("k, v (3, 3, 16)", dict(k=T(3, 3, 16), v=T(3, 3, 16))),
    "append 2 rows for 3 sequences": ("k, v (2, 2, 16) without cu_seqlens",
                                      dict(k=T(2, 2, 16), v=T(2, 2, 16))),
    "append a page id past the cache": ("block_table[1, 2] = 999",
                                        dict(block_table=_table_with(999, 1, 2))),
    "append seq_lens 0 for a new token": ("seq_lens [5, 0, 2]", dict(seq_lens=ints(5, 0, 2))),
    "append seq_lens past the capacity": ("seq_lens [5, 99, 2]", dict(seq_lens=ints(5, 99, 2))),
    "append cu_seqlens decreasing": ("cu_seqlens [0, 2, 1, 3]", dict(cu_seqlens=ints(0, 2, 1, 3))),
    "append cu_seqlens past the tokens": ("cu_seqlens [0, 1, 2, 4] over 3 tokens",
                                          dict(cu_seqlens=ints(0, 1, 2, 4))),
    "append cu_seqlens of 2": ("cu_seqlens [0, 3]", dict(cu_seqlens=ints(0, 3))),
    "append more new tokens than seq_lens": ("cu_seqlens [0, 0, 0, 3] with seq_lens[2] = 2",
                                             dict(cu_seqlens=ints(0, 0, 0, 3))),
    "append k on meta": ("k on the meta device", dict(k=meta(3, 2, 16))),
    "append fp8 cache without scales": ("an e4m3 cache, no scales", dict(
        k_cache=Lazy(lambda: randn(7, 4, 2, 16).to(torch_().float8_e4m3fn)),
        v_cache=Lazy(lambda: randn(7, 4, 2, 16).to(torch_().float8_e4m3fn)))),
    "append kv_layout 'XYZ'": ("kv_layout='XYZ'", dict(kv_layout="XYZ")),
}, append_bad, "append_paged_kv", AP)


# =============================================================================================
# cascade_attention / merge_attention_states
# =============================================================================================


def cascade_setup(prefix: int = 6, suffixes: tuple[int, ...] = (3, 5, 0), page_size: int = 4,
                  dtype: str = "bfloat16") -> dict:
    """Level 0: one shared prefix for all requests; level 1: each request's own suffix (a
    request with suffix 0 has only the prefix). One cache holds every page."""
    torch = torch_()
    c = paged_cache([prefix, *suffixes], page_size, dtype=dtype)
    b = len(suffixes)
    levels = [(c["block_table"][:1].contiguous(), c["seq_lens"][:1].contiguous(),
               torch.tensor([0, b], dtype=torch.int32)),
              (c["block_table"][1:].contiguous(), c["seq_lens"][1:].contiguous(),
               torch.arange(b + 1, dtype=torch.int32))]
    keys = [torch.cat([c["keys"][0], c["keys"][1 + r]]) for r in range(b)]
    values = [torch.cat([c["values"][0], c["values"][1 + r]]) for r in range(b)]
    return dict(k_cache=c["k_cache"], v_cache=c["v_cache"], levels=levels, keys=keys,
                values=values)


def cascade_case(backend: str | None, queries: list[int] | None = None,
                 dtype: str = "bfloat16", **options: Any) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops.cascade_attention import cascade_attention

        s = cascade_setup(dtype=dtype)
        q, offsets = queries_of(queries or [1, 1, 1], dtype=dtype)
        kw = dict(options)
        if queries is not None:
            kw["cu_seqlens_q"] = offsets
        truth = {n: options[n] for n in ("causal", "softcap", "scale") if n in options}
        out, lse = naive_paged(q, s["keys"], s["values"], queries, **truth)
        want = (out, lse.T if queries is not None else lse)
        return expect_close(lambda: cascade_attention(q, s["k_cache"], s["v_cache"], s["levels"],
                                                      return_lse=True, backend=backend, **kw),
                            want, TOL[dtype], CA)

    return run


for _name, _args, _kw in [
    ("decode, reference", ("reference",), {}),
    ("decode, default backend", (None,), {}),
    ("decode, triton", ("triton",), {}),
    ("decode fp32, reference", ("reference", None, "float32"), {}),
    ("decode with softcap 3, triton", ("triton",), dict(softcap=3.0)),
    ("chunked prefill (2, 3, 1 queries), triton", ("triton", [2, 3, 1]), {}),
    ("chunked prefill, reference", ("reference", [2, 3, 1]), {}),
    ("not causal prefill, triton", ("triton", [2, 3, 1]), dict(causal=False)),
]:
    add("cascade", _name, f"cascade_attention {_name}: out and lse against float64 attention "
        "over each request's prefix + suffix keys", cascade_case(*_args, **_kw))


def _merge_case(empty: str) -> Callable[[Path], Outcome]:
    """merge of attention over two halves of the keys equals attention over all of them."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import flash_attention
        from kpt.ops.cascade_attention import merge_attention_states

        q = randn(1, 5, 2, 16, seed=50)
        k, v = randn(1, 9, 2, 16, seed=51), randn(1, 9, 2, 16, seed=52)
        cut = {"none": 4, "a": 0, "b": 9}[empty]
        parts = []
        for lo, hi in ((0, cut), (cut, 9)):
            o, lse = flash_attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
            parts += [o[0], lse[0].T.contiguous()]
        want = naive_attention(q, k, v)
        return expect_close(lambda: merge_attention_states(*parts),
                            (want[0][0], want[1][0].T), 1e-5, MS)

    return run


for _empty, _what in (("none", "4 and 5 keys"), ("a", "an empty first part (lse -inf)"),
                      ("b", "an empty second part")):
    add("cascade", f"merge_attention_states, {_what}", f"merge of attention over {_what}: "
        "equal to attention over all 9 keys", _merge_case(_empty))


def _merge_overflow(_tmp: Path) -> Outcome:
    """Parts at scale 1e38: keys 0..3 are tiny (finite logits), the others give every row +inf
    or -inf logits, so a row's parts are at (finite, -inf), (finite or +inf, +inf). The merge
    must give what one call over all the keys gives by the documented rule: out NaN and lse
    +inf where a part is at +inf (two such parts once merged to lse NaN)."""
    from kpt.ops import flash_attention
    from kpt.ops.cascade_attention import merge_attention_states

    q, k, v = overflow_inputs(2)
    k[:, :4] *= 1e-36  # |q . k| * 1e38 * log2(e) in the thousands: finite
    k[:, 4] *= -1  # the sign of keys 5.. : +inf in both parts for the same rows
    parts = []
    for lo, hi in ((0, 5), (5, 13)):
        o, lse = flash_attention(q, k[:, lo:hi], v[:, lo:hi], scale=1e38, return_lse=True)
        parts += [o[0], lse[0].T.contiguous()]
    want_o, want_lse = overflow_truth(q, k, v, 1e38)
    return expect_close(lambda: merge_attention_states(*parts),
                        (want_o[0].to(q.dtype), want_lse[0].T), 2e-2, MS)


add("cascade", "merge_attention_states, parts past float32 (scale 1e38)", "merge of two parts "
    "whose rows are at lse +inf or -inf: out NaN / 0 and lse +-inf as one call over all keys",
    _merge_overflow)


def _merge_both_empty(_tmp: Path) -> Outcome:
    from kpt.ops.cascade_attention import merge_attention_states

    torch = torch_()
    lse = torch.full((3, 2), -math.inf)

    def check() -> str | None:
        out, l_ = merge_attention_states(torch.zeros(3, 2, 8), lse, torch.zeros(3, 2, 8), lse)
        if not (out == 0).all() or not (l_ == -math.inf).all():
            return f"out {out.flatten()[:3].tolist()}, lse {l_.flatten()[:3].tolist()}"
        return None

    return expect_ok(check, MS)


add("cascade", "merge_attention_states of two empty parts", "both lse -inf: out 0 and lse "
    "-inf (no NaN)", _merge_both_empty)


def ca_bad(backend: str | None = None, **override: Any) -> Callable[[], Any]:
    """cascade_attention decode of 3 requests over a shared prefix, with ``override``."""

    def call() -> Any:
        from kpt.ops.cascade_attention import cascade_attention

        s = cascade_setup()
        args = dict(q=randn(3, 4, 16, dtype="bfloat16"), k_cache=s["k_cache"],
                    v_cache=s["v_cache"], levels=s["levels"], backend=backend)
        for name, value in resolve(override).items():
            if name.startswith("lvl"):  # lvl0_table, lvl1_lens, ...
                i, part = int(name[3]), name[5:]
                level = list(args["levels"][i])
                level[("table", "lens", "indptr").index(part)] = value
                args["levels"] = [*args["levels"][:i], tuple(level), *args["levels"][i + 1:]]
            else:
                args[name] = value
        return cascade_attention(**args)

    return call


CA_BAD: dict[str, tuple[str, dict]] = {
    "levels empty": ("levels=[]", dict(levels=[])),
    "levels a tensor": ("levels=torch.zeros(3)", dict(levels=T(3))),
    "a level of two tensors": ("levels=[(table, lens)]", dict(levels=Lazy(
        lambda: [cascade_setup()["levels"][0][:2]]))),
    "level tables int64": ("an int64 block_table", dict(lvl0_table=ints(0, 1, dtype="int64",
                                                                       shape=(1, 2)))),
    "group_indptr short of the requests": ("level 0 group_indptr [0, 2] for 3 requests",
                                           dict(lvl0_indptr=ints(0, 2))),
    "group_indptr decreasing": ("level 1 group_indptr [0, 2, 1, 3]",
                                dict(lvl1_indptr=ints(0, 2, 1, 3))),
    "level lengths of 2 for 3 groups": ("level 1 seq_lens of 2 entries",
                                        dict(lvl1_lens=ints(3, 5))),
    "a page id past the cache in a level": ("level 0 block_table [[999, 0, 0]]",
                                            dict(lvl0_table=ints(999, 0, 0, shape=(1, 3)))),
    "a level length past its table": ("level 0 seq_lens [99]", dict(lvl0_lens=ints(99))),
    "a negative level length": ("level 1 seq_lens [3, -5, 0]", dict(lvl1_lens=ints(3, -5, 0))),
    "q float64": ("float64 q", dict(q=T(3, 4, 16, dtype="float64"))),
    "q 2-D": ("q (3, 64)", dict(q=T(3, 64, dtype="bfloat16"))),
    "q head_dim 8": ("q head_dim 8 (caches 16)", dict(q=T(3, 4, 8, dtype="bfloat16"))),
    "cu_seqlens_q decreasing": ("cu_seqlens_q [0, 2, 1, 3]", dict(
        q=T(3, 4, 16, dtype="bfloat16"), cu_seqlens_q=ints(0, 2, 1, 3))),
    "max_seqlen_q below the longest run": ("max_seqlen_q=1 for runs of 2", dict(
        q=T(4, 4, 16, dtype="bfloat16"), cu_seqlens_q=ints(0, 2, 3, 4), max_seqlen_q=1)),
    "max_seqlen_q -1": ("max_seqlen_q=-1", dict(q=T(3, 4, 16, dtype="bfloat16"),
                                                cu_seqlens_q=ints(0, 1, 2, 3), max_seqlen_q=-1)),
    "max_seqlen_q 1.5": ("max_seqlen_q=1.5", dict(q=T(3, 4, 16, dtype="bfloat16"),
                                                  cu_seqlens_q=ints(0, 1, 2, 3),
                                                  max_seqlen_q=1.5)),
    "causal 1": ("causal=1", dict(causal=1)),
    "return_lse 'yes'": ("return_lse='yes'", dict(return_lse="yes")),
    "scale nan": ("scale=nan", dict(scale=math.nan)),
    "softcap -1": ("softcap=-1", dict(softcap=-1.0)),
    "kv_layout 'nhd'": ("kv_layout='nhd'", dict(kv_layout="nhd")),
    "k_cache 3-D": ("k_cache (pages, 4, 32)", dict(k_cache=T(9, 4, 32, dtype="bfloat16"),
                                                  v_cache=T(9, 4, 32, dtype="bfloat16"))),
    "backend 'magic'": ("backend='magic'", dict(backend="magic")),
}
for _backend in (None, "reference"):
    _suffix = "" if _backend is None else ", reference"
    refuse("cascade", {f"{name}{_suffix}": value for name, value in CA_BAD.items()},
           lambda _b=_backend, **o: ca_bad(**{"backend": _b, **o}), "cascade_attention", CA)


def ms_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops.cascade_attention import merge_attention_states

        args = dict(o_a=randn(3, 2, 8), lse_a=randn(3, 2), o_b=randn(3, 2, 8), lse_b=randn(3, 2))
        args.update(resolve(override))
        return merge_attention_states(**args)

    return call


refuse("cascade", {
    "merge o_b of another shape": ("o_b (3, 2, 4)", dict(o_b=T(3, 2, 4))),
    "merge o_b of another dtype": ("o_b bf16", dict(o_b=T(3, 2, 8, dtype="bfloat16"))),
    "merge lse float16": ("lse_a float16", dict(lse_a=T(3, 2, dtype="float16"))),
    "merge lse (2, 3)": ("lse_a transposed (2, 3)", dict(lse_a=T(2, 3))),
    "merge o 1-D": ("o_a, o_b (8,), lse 0-d", dict(o_a=T(8), o_b=T(8),
                                                    lse_a=Lazy(lambda: randn(1)[0]),
                                                    lse_b=Lazy(lambda: randn(1)[0]))),
    "merge o int": ("integer o_a", dict(o_a=ints(*[0] * 48, shape=(3, 2, 8)))),
    "merge lse on meta": ("lse_b on meta", dict(lse_b=meta(3, 2))),
}, ms_bad, "merge_attention_states", MS)
