"""paged_attention / append_paged_kv: the reference against float64 attention over the gathered
pages, every backend against the reference on shuffled page tables with ragged lengths, page
sizes 1 to 64, both layouts, GQA, windows, soft-caps, chunked prefill, NaN-poisoned unused
pages and slots, fp8 caches against their dequantised values, bad input, malformed tables
under the kernels, and torch.compile."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from kpt.ops import append_paged_kv, paged_attention
from kpt.ops._common import compare, triton_interpreting
from kpt.ops.paged_attention import FP8, SPEC, Call, problem_of
from tests.ops.rejects import assert_rejected_before_launch
from tests.property.strategies import same_specials

# Kernels round P to the cache dtype before P @ V and sum in another order than the reference:
# norm-wise a fraction of a unit in the last place of the output; the bound is 2 units (bf16
# u = 2^-8, fp16 2^-11), as for flash_attention. float32 (reference only) is exact up to 1e-5.
TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
LSE_TOLERANCE = 1e-5


def _case(seed: int, batch: int, heads: int, heads_kv: int, d: int, page_size: int,
          lengths: list[int], layout: str, dtype: torch.dtype, device: str = "cpu",
          queries: list[int] | None = None):
    """Caches poisoned with NaN except where a sequence's keys live, pages shuffled."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // page_size) for n in lengths]
    max_pages = max(per_seq + [1]) + 1  # one spare column: never read
    num_pages = sum(per_seq) + 3  # spare pages: never read
    shape = ((num_pages, page_size, heads_kv, d) if layout == "NHD"
             else (num_pages, heads_kv, page_size, d))
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((batch, max_pages), -7, dtype=torch.int32)  # unused entries: invalid ids
    at = 0
    for b, (n, p) in enumerate(zip(lengths, per_seq, strict=True)):
        table[b, :p] = perm[at:at + p].int()
        at += p
        for j in range(n):
            page, slot = int(table[b, j // page_size]), j % page_size
            for cache in (k_cache, v_cache):
                row = torch.randn(heads_kv, d, generator=gen)
                if layout == "NHD":
                    cache[page, slot] = row
                else:
                    cache[page, :, slot] = row
    if queries is None:
        q = torch.randn(batch, heads, d, generator=gen)
        cu = None
    else:
        q = torch.randn(sum(queries), heads, d, generator=gen)
        cu = torch.tensor([0, *itertools.accumulate(queries)], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype),
            move(table), move(seq_lens), move(cu))


def _dense64(q, k_cache, v_cache, table, seq_lens, cu, layout, causal, window, softcap,
             scale=None):
    """float64 attention, one query at a time over the gathered keys (the ground truth)."""
    page_size = k_cache.shape[1] if layout == "NHD" else k_cache.shape[2]
    heads, d = q.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[0], heads), float("-inf"), dtype=torch.float64)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    starts = cu.tolist()[:-1] if cu is not None else list(range(q.shape[0]))
    counts = (cu[1:] - cu[:-1]).tolist() if cu is not None else [1] * q.shape[0]
    for b, (t0, m, n) in enumerate(zip(starts, counts, seq_lens.tolist(), strict=True)):
        if n == 0:
            continue
        pages = table[b, : -(-n // page_size)].long()
        k, v = k_cache[pages].double(), v_cache[pages].double()
        if layout == "HND":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.reshape(-1, k.shape[2], d)[:n], v.reshape(-1, v.shape[2], d)[:n]
        group = heads // k.shape[1]
        for i in range(m):
            pos = n - m + i
            for h in range(heads):
                s = (k[:, h // group] @ q[t0 + i, h].double()) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                j = torch.arange(n)
                ok = torch.ones(n, dtype=torch.bool)
                if right >= 0:
                    ok &= j <= pos + right
                if left >= 0:
                    ok &= j >= pos - left
                if not ok.any():
                    continue
                s = s.masked_fill(~ok, float("-inf"))
                lse[t0 + i, h] = torch.logsumexp(s, 0)
                out[t0 + i, h] = torch.softmax(s, 0) @ v[:, h // group]
    return out, lse


FEATURES = {
    "plain": dict(causal=True, window=None, softcap=0.0),
    "window": dict(causal=True, window=(5, 0), softcap=0.0),
    "softcap": dict(causal=True, window=None, softcap=3.0),
    "not causal, both sides": dict(causal=False, window=(6, 2), softcap=2.0),
}
PAGE_SIZES = [1, 16, 64]


def _lengths(page_size: int) -> list[int]:
    """0, 1, page_size - 1, page_size, page_size + 1 and a longer one (all distinct)."""
    return sorted({0, 1, max(1, page_size - 1), page_size, page_size + 1, 3 * page_size + 5})


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_reference_matches_float64(feature, layout, chunked):
    lengths = _lengths(16)
    queries = [min(3, n) + (b % 2) for b, n in enumerate(lengths)] if chunked else None
    q, kc, vc, table, lens, cu = _case(1, len(lengths), 6, 2, 24, 16, lengths, layout,
                                       torch.float32, queries=queries)
    kw = FEATURES[feature]
    out, lse = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, kv_layout=layout,
                               return_lse=True, backend="reference", **kw)
    want, want_lse = _dense64(q, kc, vc, table, lens, cu, layout, **kw)
    assert compare("out", out, want, 1e-6) is None, compare("out", out, want, 1e-6)
    got_lse = lse if cu is None else lse.transpose(0, 1)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[finite].double(), want_lse[finite], rtol=1e-6, atol=1e-6)


def _kernel_backends(dtype: torch.dtype, device: str) -> list[str]:
    q, kc, vc, table, lens, _ = _case(0, 2, 4, 2, 16, 16, [3, 5], "NHD", dtype, device)
    call = Call(q, kc, vc, table, lens, None, 1, 0.25, -1, 0, 0.0, None, None, "NHD", q, q)
    return [b.name for b in SPEC.backends
            if b.name != "reference" and not SPEC.reasons(b, problem_of(call))]


DEVICE_CASES = [(d, t) for d, t in [("cpu", torch.bfloat16)]
                + ([("cuda", torch.bfloat16), ("cuda", torch.float16)]
                   if torch.cuda.is_available() else [])]
KERNEL_CASES = [(d, t, b) for d, t in DEVICE_CASES for b in _kernel_backends(t, d)]


@pytest.mark.parametrize(("device", "dtype", "backend"), KERNEL_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_kernel_matches_reference(device, dtype, backend, page_size, layout, feature, chunked):
    lengths = _lengths(page_size)
    queries = [min(5, n + 1) for n in lengths] if chunked else None
    group_heads = (8, 2) if not chunked else (6, 3)  # GQA groups of 4 and 2
    q, kc, vc, table, lens, cu = _case(page_size + len(feature), len(lengths), *group_heads,
                                       40, page_size, lengths, layout, dtype, device, queries)
    kw = FEATURES[feature] | dict(cu_seqlens_q=cu, kv_layout=layout, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend=backend, **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    check_close(out, lse, want, want_lse, dtype)


def check_close(out, lse, want, want_lse, dtype) -> None:
    """A kernel's out and lse against the reference's (TOLERANCE, LSE_TOLERANCE), with the
    same rows seeing no key (lse -inf), and no NaN read from a poisoned page or slot."""
    assert compare("out", out, want, TOLERANCE[dtype]) is None, \
        compare("out", out, want, TOLERANCE[dtype])
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=LSE_TOLERANCE,
                               atol=LSE_TOLERANCE)
    assert not out.isnan().any()  # the NaN pages and slots were never read


@pytest.mark.parametrize("fp8", sorted(FP8, key=str), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
def test_fp8_cache_matches_its_dequantised_values(fp8, per_head):
    """An fp8 cache with scales gives the result of the float32 cache it dequantises to."""
    lengths = [7, 18, 1]
    q, kc, vc, table, lens, _ = _case(4, 3, 4, 2, 16, 8, lengths, "NHD", torch.float32)
    k_scale = torch.tensor([0.5, 0.25]) if per_head else torch.tensor(0.3)
    v_scale = torch.tensor([0.75, 2.0]) if per_head else 0.6
    mult = lambda s: torch.as_tensor(s).reshape(-1, 1)  # noqa: E731
    kq = (kc.nan_to_num() / mult(k_scale)).to(fp8)
    vq = (vc.nan_to_num() / mult(v_scale)).to(fp8)
    got = paged_attention(q, kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale,
                          backend="reference")
    want = paged_attention(q, kq.float() * mult(k_scale), vq.float() * mult(v_scale), table,
                           lens, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same float32 values
    # ... and the quantisation is visible: the fp8 values are not the originals
    assert not torch.allclose(kq.float() * mult(k_scale), kc.nan_to_num())


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_append_then_attend(layout, chunked):
    """Appending the new tokens and attending equals attending over a cache that had them."""
    page_size, lengths = 4, [5, 9, 2]
    q, kc, vc, table, lens, _ = _case(6, 3, 4, 2, 16, page_size, lengths, layout,
                                      torch.float32)
    new = [2, 1, 2] if chunked else [1, 1, 1]
    gen = torch.Generator().manual_seed(8)
    k_new = torch.randn(sum(new), 2, 16, generator=gen)
    v_new = torch.randn(sum(new), 2, 16, generator=gen)
    cu = torch.tensor([0, *itertools.accumulate(new)], dtype=torch.int32) if chunked else None
    kc2, vc2 = kc.clone(), vc.clone()
    append_paged_kv(k_new, v_new, kc2, vc2, table, lens, cu_seqlens=cu, kv_layout=layout)
    # the expected cache: the same rows written by hand
    at = 0
    for b, (m, n) in enumerate(zip(new, lengths, strict=True)):
        for i in range(m):
            pos = n - m + i
            page, slot = int(table[b, pos // page_size]), pos % page_size
            for cache, rows in ((kc, k_new), (vc, v_new)):
                if layout == "NHD":
                    cache[page, slot] = rows[at + i]
                else:
                    cache[page, :, slot] = rows[at + i]
        at += m
    assert torch.equal(kc2.nan_to_num(7.0), kc.nan_to_num(7.0))
    assert torch.equal(vc2.nan_to_num(7.0), vc.nan_to_num(7.0))


def test_append_quantises_to_fp8_with_saturation():
    fp8 = sorted(FP8, key=str)[0]
    kc = torch.zeros(2, 4, 1, 16, dtype=fp8)
    vc = torch.zeros(2, 4, 1, 16, dtype=fp8)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    k = torch.full((1, 1, 16), 1e6)  # far past fp8's range: saturates, never inf/nan
    v = torch.randn(1, 1, 16)
    append_paged_kv(k, v, kc, vc, table, torch.tensor([6], dtype=torch.int32), k_scale=2.0,
                    v_scale=0.5)
    assert torch.equal(kc[0, 1].float(), torch.full((1, 16), torch.finfo(fp8).max))
    torch.testing.assert_close(vc[0, 1].float(), (v[0] / 0.5).to(fp8).float())
    assert kc.float().isfinite().all() and not kc[1].float().any()  # nothing else written


def _good():
    q, kc, vc, table, lens, _ = _case(9, 2, 4, 2, 16, 4, [3, 6], "NHD", torch.float32)
    return dict(q=q, k_cache=kc, v_cache=vc, block_table=table, seq_lens=lens)


BAD = {
    "q 2-D": (dict(q=torch.randn(2, 16)), ValueError, "q must have 3 dims"),
    "q int": (dict(q=torch.ones(2, 4, 16, dtype=torch.int32)), TypeError, "q must be one of"),
    "cache dtype": (dict(k_cache=torch.randn(4, 4, 2, 16, dtype=torch.float64)), TypeError,
                    "k_cache"),
    "cache shapes differ": (dict(v_cache=torch.randn(5, 4, 2, 16)), ValueError, "differ"),
    "layout": (dict(kv_layout="NDH"), ValueError, "kv_layout"),
    "page size 0": (dict(k_cache=torch.randn(4, 0, 2, 16), v_cache=torch.randn(4, 0, 2, 16)),
                    ValueError, "page size"),
    "page size 512": (dict(k_cache=torch.randn(1, 512, 2, 16),
                           v_cache=torch.randn(1, 512, 2, 16)), ValueError, "page size"),
    "head dim": (dict(q=torch.randn(2, 4, 8)), ValueError, "head_dim"),
    "heads": (dict(q=torch.randn(2, 3, 16)), ValueError, "multiple"),
    "table int64": (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), TypeError,
                    "block_table"),
    "table 1-D": (dict(block_table=torch.zeros(3, dtype=torch.int32)), ValueError,
                  "block_table"),
    "lens rows": (dict(seq_lens=torch.tensor([3], dtype=torch.int32)), ValueError,
                  "seq_lens has 1"),
    "length past capacity": (dict(seq_lens=torch.tensor([3, 99], dtype=torch.int32)),
                             ValueError, "outside 0.."),
    "negative length": (dict(seq_lens=torch.tensor([-1, 6], dtype=torch.int32)), ValueError,
                        "outside 0.."),
    "page id out of range": (dict(block_table=torch.tensor([[0, 1, 2], [3, 99, 0]],
                                                           dtype=torch.int32)),
                             ValueError, "pages outside"),
    "decode rows": (dict(q=torch.randn(3, 4, 16)), ValueError, "decode q"),
    "cu decreasing": (dict(q=torch.randn(4, 4, 16),
                           cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32)),
                      ValueError, "rise from 0"),
    "cu past q": (dict(q=torch.randn(4, 4, 16),
                       cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)),
                  ValueError, "rise from 0 to the 4 tokens"),
    "hint too small": (dict(q=torch.randn(4, 4, 16), max_seqlen_q=1,
                            cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32)),
                       ValueError, "below the longest"),
    "max without cu": (dict(max_seqlen_q=1), ValueError, "varlen"),
    "window": (dict(window=(-2, 0)), ValueError, "window"),
    "causal right": (dict(window=(3, 2)), ValueError, "causal"),
    "causal type": (dict(causal=1), TypeError, "causal must be a bool"),
    "scale nan": (dict(scale=float("nan")), ValueError, "scale"),
    "softcap negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "scale for bf16 cache": (dict(k_scale=1.0, v_scale=1.0), ValueError, "fp8 caches"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD[name]
    args = _good() | override
    inputs = [args.pop(n) for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    assert_rejected_before_launch(monkeypatch, SPEC, "paged_attention", error, text,
                                  lambda: paged_attention(*inputs, **args))


def test_fp8_scales_are_checked():
    fp8 = sorted(FP8, key=str)[0]
    args = _good()
    kc, vc = args["k_cache"].to(fp8), args["v_cache"].to(fp8)
    for kw, text in ((dict(), "needs k_scale"), (dict(k_scale=-1.0, v_scale=1.0), "> 0"),
                     (dict(k_scale=torch.ones(3), v_scale=1.0), "1 or Hkv=2")):
        with pytest.raises(ValueError, match=text):
            paged_attention(args["q"], kc, vc, args["block_table"], args["seq_lens"], **kw)


@pytest.mark.parametrize(("device", "dtype", "backend"),
                         KERNEL_CASES + [("cpu", torch.float32, "reference")],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_kernel_stays_inside_the_cache_whatever_the_tables(device, dtype, backend, monkeypatch):
    """With the host check out of the way (a GPU without KPT_CHECK), out-of-range page ids and
    lengths past the table's capacity read nothing outside the cache: the result is that of
    the tables clamped into range (ids to 0..pages-1, lengths to the capacity)."""
    module = sys.modules["kpt.ops.paged_attention"]
    monkeypatch.setattr(module, "_check_tables", lambda *args: None)
    q, kc, vc, table, lens, _ = _case(11, 2, 4, 2, 16, 4, [5, 7], "NHD", dtype, device)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    bad_table = table.clone()
    bad_table[0, 1] = 10**6
    bad_table[1, 0] = -5
    bad_lens = torch.tensor([5, 10**6], dtype=torch.int32, device=device)
    clamped_table = bad_table.clamp(0, kc.shape[0] - 1)
    clamped_lens = bad_lens.clamp(max=table.shape[1] * 4)
    got = paged_attention(q, kc, vc, bad_table, bad_lens, backend=backend)
    want = paged_attention(q, kc, vc, clamped_table, clamped_lens, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    q, kc, vc, table, lens, cu = _case(12, 3, 4, 2, 16, 4, [5, 0, 9], "HND", torch.float32,
                                       queries=[2, 1, 3])

    def step(q):
        return paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, max_seqlen_q=3,
                               kv_layout="HND", window=(4, 0)) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), step(q), rtol=0, atol=0)


def test_cuda_graph_capture_and_replay_with_new_lengths():
    """One decode step captured in a CUDA graph, replayed after the lengths and a page id
    changed in place: the replay sees the new tables (nothing was read on the host)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graph capture needs a GPU")
    q, kc, vc, table, lens, _ = _case(13, 3, 8, 2, 64, 16, [40, 17, 64], "NHD",
                                      torch.bfloat16, "cuda")
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    step = lambda: paged_attention(q, kc, vc, table, lens)  # noqa: E731
    step()  # warm: dispatch decision, kernel compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    lens.copy_(torch.tensor([41, 3, 60], dtype=torch.int32))
    table[1, 0] = table[0, 2]
    graph.replay()
    want = paged_attention(q, kc, vc, table, lens, backend="reference")
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None


def test_plan_run_matches_the_call_and_writes_out_in_place():
    from kpt.ops.paged_attention import plan

    q, kc, vc, table, lens, cu = _case(14, 3, 4, 2, 16, 4, [5, 9, 2], "HND", torch.float32,
                                       queries=[2, 3, 1])
    p = plan(q, kc, vc, table, lens, cu_seqlens_q=cu, kv_layout="HND", window=(3, 0),
             backend="reference")
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0])
    for layer in range(2):  # the same plan serves every layer's caches
        kl, vl = kc.nan_to_num() * (layer + 1), vc.nan_to_num() - layer
        got = p.run(q, kl, vl, out=out, lse=lse)
        want = paged_attention(q, kl, vl, table, lens, cu_seqlens_q=cu, kv_layout="HND",
                               window=(3, 0), backend="reference")
        assert got is out
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="as planned"):
        p.run(q[:, :2], kc, vc)
    with pytest.raises(ValueError, match="lse must be float32"):
        p.run(q, kc, vc, lse=torch.empty(q.shape[0], q.shape[1]))


def _overflow_backend(backend: str, splits: int, monkeypatch) -> str:
    """The device a backend's overflow test runs on, with ``splits`` forced on its kernel."""
    if backend == "triton":
        if not (triton_interpreting() or torch.cuda.is_available()):
            pytest.skip("runs the Triton kernel: TRITON_INTERPRET=1 or a CUDA device")
        from kpt.ops.paged_attention import _triton as module

        key = "SPLITS"
    else:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device: runs the CUDA kernel")
        from kpt.ops.paged_attention import _cuda as module

        key = "splits"
    run = module.run
    monkeypatch.setattr(module, "run", lambda call, cfg: run(call, cfg | {key: splits}))
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_logits_that_overflow_float32(backend, splits, chunked, monkeypatch):
    """Regression (found beside flash_attention's): logits past float32's range (scale=1e38)
    gave lse -inf (no visible key) from the Triton kernel, split or not, where the reference
    has +inf, and NaN logits gave -inf too. The CUDA kernel (its sum tested with ``l > 0``)
    gave out 0 and lse -inf for both, and (found on an H100) multiplied q by the scale before
    the dot product, so single features overflowed and inf - inf gave NaN where the reference's
    logit is +-inf: it now scales each dot product. Every backend now follows
    flash_attention/reference.py's rule (the CUDA one through csrc/include/kpt/softmax.h): a
    +inf logit gives lse +inf and out NaN, NaN logits NaN, a row whose visible logits are all
    -inf out 0 and lse -inf."""
    device = _overflow_backend(backend, splits, monkeypatch)
    lengths = [0, 5, 19, 40]
    queries = [1, 3, 0, 5] if chunked else None
    # head dim 64: the CUDA kernel's smallest
    q, kc, vc, table, lens, cu = _case(2, 4, 4, 2, 64, 4, lengths, "NHD", torch.float16,
                                       device=device, queries=queries)
    q_nan = q.clone()
    q_nan[1, 0, 0] = float("nan")  # a row that sees keys: out and lse NaN
    cases = [(q, kc, dict(scale=1e38)), (q, kc, dict(scale=-2e38, window=(6, 0))),
             (q.abs(), -kc.abs(), dict(scale=1e38)),  # every logit -inf
             (q_nan, kc, dict())]
    for qq, kk, kw in cases:
        kw |= dict(cu_seqlens_q=cu, return_lse=True)
        out, lse = paged_attention(qq, kk, vc, table, lens, backend=backend, **kw)
        want, want_lse = paged_attention(qq, kk, vc, table, lens, backend="reference", **kw)
        same_specials("out", out, want)
        same_specials("lse", lse, want_lse)
        assert compare("out", out, want, TOLERANCE[q.dtype]) is None
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[finite], want_lse[finite], rtol=LSE_TOLERANCE,
                                   atol=LSE_TOLERANCE)


@pytest.mark.skipif(not triton_interpreting(),
                    reason="runs the Triton kernel on CPU tensors: TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_masked_first_tile_then_very_negative_logits(splits, monkeypatch):
    """Regression (found beside flash_attention's): a row whose first key tile was all masked
    (a left window in chunked prefill) took 0 as its running max, so later logits all below
    -126 in log2 units (-160 here) underflowed to a zero sum: out NaN, lse -inf where the
    reference is finite. The running max now starts at -FLT_MAX and is never replaced."""
    from kpt.ops.paged_attention import _triton

    run = _triton.run
    monkeypatch.setattr(_triton, "run", lambda call, cfg: run(call, cfg | {"SPLITS": splits}))
    q, kc, vc, table, lens, cu = _case(0, 1, 2, 1, 16, 16, [70], "NHD", torch.float16,
                                       queries=[20])
    q = torch.full_like(q, 2.0)
    kc = torch.where(kc.isnan(), kc, 5.0)  # every logit -160 at scale -1 (poison stays NaN)
    kw = dict(cu_seqlens_q=cu, window=(3, 0), scale=-1.0, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    check_close(out, lse, want, want_lse, torch.float16)
