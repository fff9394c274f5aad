"""paged_attention's Triton kernel on what only it has: fp8 caches (e4m3 / e5m2, per-tensor and
per-kv-head scales) and split-KV (the key range of a program cut into shares, merged by lse),
against the reference on odd sizes (head dim 40, page sizes 1, 3 and 16, ragged lengths with 0
and 1, GQA groups of 3 and 4), NaN-poisoned unused pages and slots, shuffled page tables. Splits
are forced through the kernel's config; the automatic rule is checked on its own (shapes only)
and end to end with a GPU's SM count patched in."""

from __future__ import annotations

import sys

import pytest
import torch

from kpt.ops import paged_attention
from kpt.ops._common import compare, triton_interpreting
from kpt.ops.paged_attention import FP8, SPEC, Call, problem_of
from tests.ops.test_paged_attention import (
    DEVICE_CASES,
    FEATURES,
    LSE_TOLERANCE,
    TOLERANCE,
    _case,
    check_close,
)

_triton = pytest.importorskip("kpt.ops.paged_attention._triton")

FP8_TYPES = sorted(FP8, key=str)
# Not powers of two, so that float(fp8) * scale is not a 16-bit value: a kernel that rounded
# the dequantised cache to bf16 would be caught (see test_fp8_lse_sees_no_16_bit_rounding).
# Tests built on CPU tensors run the kernel under the interpreter (CI); on a GPU machine the
# DEVICE_CASES tests above run the same kernel paths on the device instead.
on_cpu = pytest.mark.skipif(not triton_interpreting(),
                            reason="runs the Triton kernel on CPU tensors: TRITON_INTERPRET=1")
K_SCALES = {"per-tensor": [0.37], "per-head": [0.61, 0.29]}
V_SCALES = {"per-tensor": [1.3], "per-head": [0.83, 2.1]}


def _reasons(q, kc, vc, table, lens, cu, k_scale=None, layout="NHD") -> list[str]:
    call = Call(q, kc, vc, table, lens, cu, 1, 0.25, -1, 0, 0.0, k_scale, k_scale, layout, q, q)
    return SPEC.reasons("triton", problem_of(call))


def _quantise(cache, scale, fp8, layout):
    """The fp8 cache of float32 values (NaN poison stays NaN): cache / scale, saturated."""
    mult = scale.reshape(-1, 1) if layout == "NHD" else scale.reshape(-1, 1, 1)
    limit = torch.finfo(fp8).max
    return (cache.float() / mult).clamp(-limit, limit).to(fp8)


def _fp8_case(seed, fp8, scales, layout, page_size, lengths, heads, heads_kv, dtype, device,
              queries=None):
    q, kc, vc, table, lens, cu = _case(seed, len(lengths), heads, heads_kv, 40, page_size,
                                       lengths, layout, torch.float32, queries=queries)
    ks = torch.tensor(K_SCALES[scales])
    vs = torch.tensor(V_SCALES[scales])
    kq, vq = _quantise(kc, ks, fp8, layout), _quantise(vc, vs, fp8, layout)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (q.to(device, dtype), move(kq), move(vq), move(table), move(lens), move(cu),
            move(ks), move(vs))


def _check(out, lse, want, want_lse, dtype):
    # The kernel rounds P to q's dtype before P @ V and sums in another order than the
    # reference: within 2 units of the last place norm-wise (TOLERANCE, as for every kernel of
    # test_paged_attention). Split, each share rounds P against its own running maximum and
    # the shares merge in float32 before the one rounding of the output: the same bound. lse is
    # float32 throughout on both sides: 1e-5 (LSE_TOLERANCE).
    check_close(out, lse, want, want_lse, dtype)


@pytest.fixture
def force_splits(monkeypatch):
    """``force_splits(n, **config)``: every Triton launch of this test runs with that config."""

    def force(splits: int, **config) -> None:
        run = _triton.run
        monkeypatch.setattr(_triton, "run",
                            lambda call, cfg: run(call, cfg | config | {"SPLITS": splits}))

    return force


# ---- fp8 caches ------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), DEVICE_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("fp8", FP8_TYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("scales", list(K_SCALES))
@pytest.mark.parametrize(("layout", "page_size"), [("NHD", 3), ("HND", 16), ("NHD", 1)])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_fp8_cache_matches_reference(device, dtype, fp8, scales, layout, page_size, chunked):
    lengths = [0, 1, page_size + 1, 3 * page_size + 5, 40]
    queries = [min(4, n + 1) for n in lengths] if chunked else None
    heads = (8, 2) if not chunked else (6, 2)  # GQA groups of 4 and 3
    q, kc, vc, table, lens, cu, ks, vs = _fp8_case(
        page_size + chunked, fp8, scales, layout, page_size, lengths, *heads, dtype, device,
        queries)
    if _reasons(q, kc, vc, table, lens, cu, ks, layout):
        pytest.skip("triton: " + "; ".join(_reasons(q, kc, vc, table, lens, cu, ks, layout)))
    kw = dict(cu_seqlens_q=cu, kv_layout=layout, k_scale=ks, v_scale=vs, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, dtype)


@on_cpu
@pytest.mark.parametrize("feature", list(FEATURES))
def test_fp8_cache_with_masks_and_softcap(feature):
    fp8 = FP8_TYPES[0]
    q, kc, vc, table, lens, cu, ks, vs = _fp8_case(
        31, fp8, "per-head", "NHD", 4, [9, 0, 23, 2], 6, 2, torch.bfloat16, "cpu", [3, 1, 5, 2])
    kw = FEATURES[feature] | dict(cu_seqlens_q=cu, k_scale=ks, v_scale=vs, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, torch.bfloat16)


@on_cpu
def test_fp8_lse_sees_no_16_bit_rounding():
    """The reference dequantises in float32 (``float(cache) * scale``). The kernel's lse agrees
    to LSE_TOLERANCE, which a kernel rounding the dequantised keys to bf16 would miss: the
    check can fail."""
    fp8 = FP8_TYPES[0]
    q, kc, vc, table, lens, _, ks, vs = _fp8_case(
        32, fp8, "per-head", "NHD", 16, [70, 33], 8, 2, torch.bfloat16, "cpu")
    _, lse = paged_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs, return_lse=True,
                             backend="triton")
    _, want = paged_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs,
                              return_lse=True, backend="reference")
    torch.testing.assert_close(lse, want, rtol=LSE_TOLERANCE, atol=LSE_TOLERANCE)
    rounded = (kc.float().nan_to_num() * ks.reshape(-1, 1)).bfloat16()
    _, lse16 = paged_attention(q, rounded, rounded, table, lens, return_lse=True,
                               backend="reference")
    assert (lse16 - want).abs().max() > 10 * LSE_TOLERANCE


@pytest.mark.parametrize(("device", "dtype"), DEVICE_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_fp8_bf16_query_beyond_fp16_range(device, dtype):
    """fp8 tiles convert to q's dtype: a bf16 query with values past fp16's 65504 (here up to
    ~4e6, with a scale that keeps the logits ordinary) gives the reference's result, not inf
    (a kernel multiplying in fp16, which converts fp8 faster, would overflow: module doc).
    One head also holds an inf: its rows are non-finite as the reference's are, and the other
    heads of its tile are untouched."""
    if dtype != torch.bfloat16:
        pytest.skip("bf16 queries only: an fp16 query cannot hold these values")
    fp8 = FP8_TYPES[0]
    q, kc, vc, table, lens, _, ks, vs = _fp8_case(
        34, fp8, "per-head", "NHD", 16, [70, 1, 33], 8, 2, dtype, device)
    if _reasons(q, kc, vc, table, lens, None, ks):
        pytest.skip("triton: " + "; ".join(_reasons(q, kc, vc, table, lens, None, ks)))
    q = (q.float() * 1e6).to(dtype)
    assert q.float().abs().max() > 65504
    kw = dict(scale=1e-6 * 40**-0.5, k_scale=ks, v_scale=vs, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, dtype)
    q[0, 5, 7] = float("inf")  # head 5: kv head 1's group of 4 (heads 4..7)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    keep = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    keep[0, 5] = False
    _check(out[keep], lse[keep], want[keep], want_lse[keep], dtype)
    assert torch.isfinite(out[0, 5]).tolist() == torch.isfinite(want[0, 5]).tolist()
    assert not torch.isfinite(want[0, 5]).all()


# ---- split-KV --------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), DEVICE_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_split_kv_matches_reference(device, dtype, splits, layout, chunked, force_splits):
    # BLOCK_N 16 so that the longest sequence spans several tiles per share, and short ones
    # leave shares empty (lse -inf there, weight 0 in the merge); length 0 leaves all empty.
    lengths = [0, 1, 15, 57, 130]
    queries = [min(5, n + 2) for n in lengths] if chunked else None
    heads = (8, 2) if not chunked else (6, 2)
    q, kc, vc, table, lens, cu = _case(40 + splits, len(lengths), *heads, 40, 16, lengths,
                                       layout, dtype, device, queries)
    if _reasons(q, kc, vc, table, lens, cu, layout=layout):
        pytest.skip("triton: " + "; ".join(_reasons(q, kc, vc, table, lens, cu, layout=layout)))
    force_splits(splits, BLOCK_N=16)
    kw = dict(cu_seqlens_q=cu, kv_layout=layout, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, dtype)


@on_cpu
@pytest.mark.parametrize("feature", list(FEATURES))
def test_split_kv_with_masks_softcap_and_fp8(feature, force_splits):
    """Windows cut the key range before the shares do; an fp8 cache's scales apply per share."""
    q, kc, vc, table, lens, cu, ks, vs = _fp8_case(
        33, FP8_TYPES[-1], "per-head", "HND", 3, [41, 0, 77, 6], 8, 2, torch.bfloat16, "cpu",
        [4, 1, 6, 3])
    force_splits(4, BLOCK_N=16)
    kw = FEATURES[feature] | dict(cu_seqlens_q=cu, kv_layout="HND", k_scale=ks, v_scale=vs,
                                  return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, torch.bfloat16)


@on_cpu
def test_split_kv_stays_inside_the_cache_whatever_the_tables(monkeypatch, force_splits):
    """As test_paged_attention's check, with shares: bad ids and lengths clamp into range."""
    module = sys.modules["kpt.ops.paged_attention"]
    monkeypatch.setattr(module, "_check_tables", lambda *args: None)
    q, kc, vc, table, lens, _ = _case(34, 2, 4, 2, 16, 4, [5, 7], "NHD", torch.bfloat16)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    force_splits(3, BLOCK_N=16)
    bad_table = table.clone()
    bad_table[0, 1] = 10**6
    bad_table[1, 0] = -5
    bad_lens = torch.tensor([5, 10**6], dtype=torch.int32)
    got = paged_attention(q, kc, vc, bad_table, bad_lens, backend="triton")
    want = paged_attention(q, kc, vc, bad_table.clamp(0, kc.shape[0] - 1),
                           bad_lens.clamp(max=table.shape[1] * 4), backend="reference")
    assert compare("out", got, want, TOLERANCE[torch.bfloat16]) is None


@on_cpu
def test_split_kv_leaves_tokens_outside_every_sequence_alone(force_splits):
    """Varlen rows past the last sequence keep out = 0 and lse = -inf, as unsplit."""
    q, kc, vc, table, lens, _ = _case(35, 2, 4, 2, 16, 4, [9, 6], "NHD", torch.bfloat16)
    q = torch.randn(5, 4, 16).bfloat16()
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)  # tokens 3 and 4 belong to no sequence
    call = Call(q, kc, vc, table, lens, cu, 2, 0.25, -1, 0, 0.0, None, None, "NHD",
                torch.zeros_like(q), torch.full((4, 5), float("-inf")))
    _triton.run(call, {"SPLITS": 3, "BLOCK_N": 16})
    assert not call.out[3:].any() and torch.isinf(call.lse[:, 3:]).all()
    assert call.out[:3].abs().sum() > 0


def test_num_splits_rule():
    """Shapes only: no split once the grid fills the SMs twice over, none without an SM count
    (the CPU), many for one long sequence, never more than the key tiles or MAX_SPLITS."""
    sms = 132  # an H100
    assert _triton.num_splits(2 * sms, 4096, sms) == 1
    assert _triton.num_splits(8, 1024, 0) == 1
    long = _triton.num_splits(8, 1024, sms)  # B1, 8 kv heads, 65536 keys in 64-key tiles
    assert 16 <= long <= _triton.MAX_SPLITS and 8 * long >= sms
    assert _triton.num_splits(8, 3, sms) <= 3
    assert _triton.num_splits(64, 128, sms) > 1  # B8 at 8192 keys: 64 programs only
    for programs in (1, 3, 8, 40, 100, 263):
        for tiles in (1, 2, 17, 64, 1000):
            assert 1 <= _triton.num_splits(programs, tiles, sms) <= min(tiles, _triton.MAX_SPLITS)


@on_cpu
def test_auto_split_on_a_gpu_sized_grid_and_plan_run_with_new_lengths(monkeypatch):
    """With an H100's SM count patched in, a decode batch of two splits by itself; a plan then
    serves new lengths and a moved page written in place (as between CUDA graph replays): the
    split count depends on shapes only, the shares on the lengths read on the device."""
    from kpt.ops.paged_attention import plan

    monkeypatch.setattr(_triton, "_sm_count", lambda device: 132)
    chosen = []
    rule = _triton.num_splits
    monkeypatch.setattr(_triton, "num_splits", lambda *shape: chosen.append(rule(*shape))
                        or chosen[-1])
    q, kc, vc, table, lens, _ = _case(36, 2, 8, 2, 40, 16, [300, 45], "NHD", torch.bfloat16)
    p = plan(q, kc, vc, table, lens, backend="triton")
    out = torch.empty_like(q)
    p.run(q, kc, vc, out=out)
    assert chosen[-1] > 1
    want = paged_attention(q, kc, vc, table, lens, backend="reference")
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None
    lens.copy_(torch.tensor([17, 299], dtype=torch.int32))
    table[1, : -(-299 // 16)] = table[0, : -(-299 // 16)]  # sequence 1 reads 0's keys
    p.run(q, kc, vc, out=out)
    assert chosen[-1] == chosen[0]
    want = paged_attention(q, kc, vc, table, lens, backend="reference")
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None
    assert not out.isnan().any()


def test_cuda_graph_capture_with_split_kv_and_fp8():
    """One long-context decode step (split by the automatic rule on any GPU) captured in a CUDA
    graph over an fp8 cache, replayed after the lengths changed in place."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graph capture needs a GPU")
    fp8 = FP8_TYPES[-1]  # e5m2: Triton converts it on every CUDA arch it supports
    q, kc, vc, table, lens, _, ks, vs = _fp8_case(
        37, fp8, "per-head", "NHD", 16, [2000, 1500], 8, 2, torch.bfloat16, "cuda")
    step = lambda: paged_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs)  # noqa: E731
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    lens.copy_(torch.tensor([1999, 30], dtype=torch.int32))
    graph.replay()
    want = paged_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs, backend="reference")
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None



# ---- chunked prefill through flash_attention (the gather path) -------------------------------


def _flash_backends(device: str) -> list[str | None]:
    """flash_attention backends the gathered call is checked with: its own dispatch (the
    reference on the CPU) and, where Triton runs, its Triton kernel."""
    return [None, "triton"] if device == "cuda" or triton_interpreting() else [None]


GATHER_CASES = [(d, t, f) for d, t in DEVICE_CASES for f in _flash_backends(d)]


@pytest.mark.parametrize(("device", "dtype", "flash"), GATHER_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize(("layout", "page_size"), [("NHD", 1), ("HND", 3), ("NHD", 16)])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_gather_path_matches_reference(device, dtype, flash, layout, page_size, feature,
                                       monkeypatch):
    """Ragged lengths around the page size, a sequence of 0 keys and one with fewer keys than
    queries (its first rows see none), GQA of 3, head dim 40, shuffled NaN-poisoned pages: the
    gathered copy must read exactly each sequence's keys, in order."""
    lengths = [page_size + 1, 0, 2, 3 * page_size + 5, page_size - 1 or 1]
    queries = [3, 2, 4, page_size + 2, 1]
    q, kc, vc, table, lens, cu = _case(50 + page_size, len(lengths), 6, 2, 40, page_size,
                                       lengths, layout, dtype, device, queries)
    if _reasons(q, kc, vc, table, lens, cu, layout=layout):
        pytest.skip("triton: " + "; ".join(_reasons(q, kc, vc, table, lens, cu, layout=layout)))
    kw = FEATURES[feature] | dict(cu_seqlens_q=cu, kv_layout=layout, return_lse=True)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    run, taken = _triton.run, []
    config = {"GATHER": True} | ({} if flash is None else {"FLASH": flash})
    monkeypatch.setattr(_triton, "_run_gathered", lambda call, fb, inner=_triton._run_gathered:
                        taken.append(fb) or inner(call, fb))
    monkeypatch.setattr(_triton, "run", lambda call, cfg: run(call, config))
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    assert taken == [flash]
    _check(out, lse, want, want_lse, dtype)


@on_cpu
def test_gather_copies_each_sequences_keys_packed_and_clamped(monkeypatch):
    """The copy itself, exactly: sequence b's keys at rows cu_k[b]..cu_k[b+1] in order, lengths
    clamped to the table's capacity and page ids to the cache (bad tables read in range)."""
    module = sys.modules["kpt.ops.paged_attention"]
    monkeypatch.setattr(module, "_check_tables", lambda *args: None)
    for layout in ("NHD", "HND"):
        q, kc, vc, table, lens, cu = _case(60, 3, 4, 2, 24, 4, [6, 0, 9], layout,
                                           torch.float16, queries=[2, 1, 3])
        table[2, 0] = 10**6  # clamps to the last page
        table[2, 1] = -3  # clamps to page 0
        lens[0] = 10**6  # clamps to the table's capacity
        call = Call(q, kc, vc, table, lens, cu, 3, 0.25, -1, 0, 0.0, None, None, layout,
                    torch.zeros_like(q), torch.full((4, 6), float("-inf")))
        k, v, cu_k, max_k = _triton.gather(call)
        cap = table.shape[1] * 4
        assert max_k == cap and cu_k.tolist() == [0, cap, cap, cap + 9]
        pages = table.clamp(0, kc.shape[0] - 1).long()
        for cache, got in ((kc, k), (vc, v)):
            nhd = cache if layout == "NHD" else cache.transpose(1, 2)
            for b, n in enumerate([cap, 0, 9]):
                j = torch.arange(n)
                want = nhd[pages[b, j // 4], j % 4]
                start = cu_k[b].item()
                assert torch.equal(got[start:start + n].view(torch.int16),
                                   want.view(torch.int16))


def test_gather_rule_and_prefer_hook(monkeypatch):
    """Dispatch tries Triton first on a GPU for query runs of at least PREFILL_PREFER_ROWS rows
    per kv head (its tiles use tensor cores): chunked prefill, a cascade's stacked decode
    queries over a shared prefix, fp8 caches too; decode and short chunks keep the cuda
    kernel first. Within Triton the gather path is the default for prefill-sized chunks of
    16-bit caches only: not the cascade's queries (too few query tiles for flash's grid), fp8
    caches or oversized buffers (shapes only: an H100's SM count patched in)."""
    from kpt.ops._registry import Problem
    from kpt.ops.paged_attention import PREFILL_PREFER_ROWS, _prefer, prefill_sized

    module = sys.modules["kpt.ops.paged_attention"]
    monkeypatch.setattr(module, "_sm_count", lambda index: 132)
    base = dict(batch=4, seqlen_q=2048, capacity=10240, heads_q=32, heads_kv=8, head_dim=128,
                page_size=16, kv_layout="NHD", kv_dtype=torch.bfloat16, varlen=True,
                mask="causal", softcap=False)
    gpu = torch.device("cuda", 0)
    assert _prefer(Problem.of(gpu, torch.bfloat16, **base)) == ("triton",)
    assert _prefer(Problem.of(gpu, torch.bfloat16, **base | dict(batch=1, seqlen_q=640)))
    rows = PREFILL_PREFER_ROWS // 4 - 1  # GQA group of 4: just under the row threshold
    cascade = dict(batch=1, seqlen_q=64, capacity=16384)  # 64 requests' queries, one group
    for change in (dict(varlen=False, seqlen_q=1), dict(seqlen_q=rows)):
        assert _prefer(Problem.of(gpu, torch.bfloat16, **base | change)) == ()
    for change in (cascade, dict(kv_dtype=FP8_TYPES[0]), dict(seqlen_q=rows + 1)):
        assert _prefer(Problem.of(gpu, torch.bfloat16, **base | change)) == ("triton",)
    assert _prefer(Problem.of(torch.device("cpu"), torch.bfloat16, **base)) == ()
    assert prefill_sized(4, 2048, 32, 8, 0) and not prefill_sized(1, 64, 32, 8, 0)
    assert {"GATHER": True} in _triton.configs(Problem.of(gpu, torch.bfloat16, **base))
    assert _triton.configs(Problem.of(gpu, torch.bfloat16, **base | dict(varlen=False))) == [{}]
    assert _triton.gather_bytes(4, 10240, 8, 128, 2) == 2 * 4 * 10240 * 8 * 128 * 2
    assert _triton.gather_bytes(64, 131072, 8, 128, 2) > _triton.GATHER_MAX_BYTES


# ---- tile rows and warps ---------------------------------------------------------------------


@on_cpu
@pytest.mark.parametrize("causal", [False, True], ids=["shared_level", "causal"])
def test_block_m_128_and_the_default_warps(causal, force_splits):
    """A cascade-style level (many stacked queries, no causal bound: 4 warps by default) and a
    causal chunk (8 warps) against the reference, with the default rows and with BLOCK_M 128
    (a config key since the cascade sweep); a BLOCK_M the kernel has no tiles for is refused."""
    run = _triton.run  # before force_splits patches it
    lengths, queries = [70, 33], [40, 9]
    q, kc, vc, table, lens, cu = _case(11, 2, 4, 2, 40, 16, lengths, "NHD", torch.float32,
                                       queries=queries)
    q = q.to(torch.bfloat16)
    kc, vc = kc.to(torch.bfloat16), vc.to(torch.bfloat16)
    want, want_lse = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, max_seqlen_q=40,
                                     causal=causal, return_lse=True, backend="reference")
    for config in ({}, {"BLOCK_M": 128}):
        force_splits(2, **config)
        out, lse = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, max_seqlen_q=40,
                                   causal=causal, return_lse=True, backend="triton")
        _check(out, lse, want, want_lse, torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])
    call = Call(q, kc, vc, table, lens, cu, 40, 0.25, -1, 0 if causal else -1, 0.0, None, None,
                "NHD", out, lse)
    with pytest.raises(ValueError, match="BLOCK_M must be 16, 32, 64 or 128"):
        run(call, {"BLOCK_M": 48})


@on_cpu
def test_wide_tiles_for_a_shared_level(monkeypatch):
    """Stacked queries over keys they all see, 160 rows per kv head: the default launch takes
    128-row tiles at 8 warps, split into at most one block per SM (an H100's 132 SMs patched
    in: 2 query tiles x 2 kv heads x 2 sequences = 8 programs, so up to 16 shares, fewer
    where a sequence has fewer key tiles), against the reference. A causal chunk of the same
    rows, fewer rows, or a head dim past 128, keeps the usual tiles."""
    monkeypatch.setattr(_triton, "_sm_count", lambda device: 132)
    lengths, queries = [300, 97], [40, 21]
    q, kc, vc, table, lens, cu = _case(12, 2, 8, 2, 40, 16, lengths, "NHD", torch.float32,
                                       queries=queries)
    q, kc, vc = (t.to(torch.bfloat16) for t in (q, kc, vc))
    kw = dict(cu_seqlens_q=cu, max_seqlen_q=40, causal=False, return_lse=True)
    out, lse = paged_attention(q, kc, vc, table, lens, backend="triton", **kw)
    want, want_lse = paged_attention(q, kc, vc, table, lens, backend="reference", **kw)
    _check(out, lse, want, want_lse, torch.bfloat16)

    def call(max_q, right):
        return Call(q, kc, vc, table, lens, cu, max_q, 0.25, -1, right, 0.0, None, None, "NHD",
                    out, lse.T)

    assert _triton.wide_tiles(call(40, -1))
    assert not _triton.wide_tiles(call(40, 0)) and not _triton.wide_tiles(call(31, -1))
    wide_d = torch.empty(q.shape[0], q.shape[1], 136, dtype=q.dtype)  # head dim past 128
    assert not _triton.wide_tiles(Call(wide_d, kc, vc, table, lens, cu, 40, 0.25, -1, -1, 0.0,
                                       None, None, "NHD", wide_d, lse.T))


# ---- the repeat-call launcher (``_triton.fast``, ``kpt.ops._triton_launch``) -----------------


def test_triton_fast_launcher_is_declined_off_the_gpu():
    """Under the interpreter (or on the CPU) no launcher is bound: repeats keep the full path."""
    from kpt.ops._triton_launch import bind

    q, kc, vc, table, lens, _ = _case(5, 3, 4, 2, 16, 4, [5, 0, 11], "NHD", torch.float32)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:2])
    call = Call(q, kc, vc, table, lens, None, 1, 0.25, -1, 0, 0.0, None, None, "NHD", out, lse)
    assert _triton.fast(call, {}) is None
    assert bind(_triton._paged_kernel, (1, 1, 1), (q,), {}, (q,)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="binds compiled kernels: needs a GPU")
# One long sequence is split (2 programs); 140 short ones fill an H100/H200 twice (280
# programs): unsplit.
@pytest.mark.parametrize("lengths", [[3000], [37, 0, 9, 1] * 35], ids=["split", "unsplit"])
def test_triton_fast_launcher_matches_the_full_path(lengths):
    """A repeat decode call on the Triton backend runs the launcher ``fast`` bound (the
    compiled kernels called directly): bit for bit the full path's result on fresh queries,
    an empty sequence included; a block table that is a misaligned view (same signature)
    makes it take Triton's own launch, with the same result; inside a CUDA graph too."""
    q, kc, vc, table, lens, _ = _case(11, len(lengths), 8, 2, 128, 16, lengths, "NHD",
                                      torch.float32)
    q, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, kc, vc))
    table, lens = table.cuda(), lens.cuda()
    SPEC.clear_cache()
    run = lambda q, table: paged_attention(q, kc, vc, table, lens, return_lse=True,  # noqa: E731
                                           backend="triton")
    run(q, table)
    assert len(SPEC.fast) == 1  # the launcher stored for the signature
    splits = _triton._Launch(Call(q, kc, vc, table, lens, None, 1, 1.0, -1, 0, 0.0, None, None,
                                  "NHD", q, lens), {}).splits
    assert (splits > 1) == (len(lengths) == 1)
    q2 = torch.randn_like(q)
    got, got_lse = run(q2, table)
    SPEC.fast.clear()
    want, want_lse = run(q2, table)
    SPEC.fast.clear()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0)
    if 0 in lengths:
        empty = lengths.index(0)
        assert (got[empty] == 0).all() and torch.isneginf(got_lse[empty]).all()
    # a misaligned view of the same table: same shape and strides, 4 bytes off
    buffer = torch.empty(table.numel() + 1, dtype=torch.int32, device="cuda")
    shifted = buffer[1:].view(table.shape)
    shifted.copy_(table)
    assert shifted.data_ptr() % 16
    run(q, table)  # stores the launcher again
    got, got_lse = run(q2, shifted)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0)
    # captured in a graph and replayed with new queries
    q3 = q.clone()
    run(q3, table)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_lse = run(q3, table)
    q3.copy_(q2)
    graph.replay()
    torch.testing.assert_close(captured, want, rtol=0, atol=0)
    torch.testing.assert_close(captured_lse, want_lse, rtol=0, atol=0)
    SPEC.clear_cache()


def test_fp8_decode_register_cap_is_the_default_on_nvidia(monkeypatch):
    """fp8 decode launches cap registers at FP8_DECODE_MAXNREG on NVIDIA GPUs (one wave of 4
    blocks per SM: module doc); a config's own cap wins; bf16, varlen, HIP and the interpreter
    get none."""
    monkeypatch.setattr(_triton, "triton_interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    cap = _triton._register_cap
    assert cap({}, True) == {"maxnreg": _triton.FP8_DECODE_MAXNREG}
    assert cap({"maxnreg": 96}, True) == {"maxnreg": 96}
    assert cap({}, False) == {}
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert cap({}, True) == {}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_triton, "triton_interpreting", lambda: True)
    assert cap({}, True) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="binds compiled kernels: needs a GPU")
@pytest.mark.parametrize("queries", [[3, 0, 70], [64]], ids=["chunked", "stacked"])
def test_triton_fast_launcher_matches_the_full_path_chunked(queries):
    """Chunked prefill with max_seqlen_q given (a cascade level's calls): the repeat runs the
    bound launcher on zeroed outputs, bit for bit the full path's result on fresh queries;
    tokens past the last query run keep zeros and lse -inf."""
    # stacked: a cascade's shared level, 64 queries x 4 heads per kv head over 4000 keys (wide
    # tiles, split), no causal bound
    lengths = [600, 0, 900] if len(queries) == 3 else [4000]
    q, kc, vc, table, lens, cu = _case(13, len(lengths), 8, 2, 128, 16, lengths, "NHD",
                                       torch.float32, queries=queries)
    q = torch.cat([q, torch.randn(2, *q.shape[1:])])  # two tokens past the last run
    q, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, kc, vc))
    table, lens, cu = table.cuda(), lens.cuda(), cu.cuda()
    SPEC.clear_cache()
    run = lambda q: paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu,  # noqa: E731
                                    max_seqlen_q=max(queries), causal=len(queries) == 3,
                                    return_lse=True, backend="triton")
    run(q)
    assert len(SPEC.fast) == 1
    q2 = torch.randn_like(q)
    got, got_lse = run(q2)
    SPEC.fast.clear()
    want, want_lse = run(q2)
    SPEC.clear_cache()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0)
    assert (got[-2:] == 0).all() and torch.isneginf(got_lse[:, -2:]).all()
