"""paged_attention's CUDA/HIP backends (``kpt.ops.paged_attention._cuda``).

On any machine: the backends' registration and reasons, the launch plan (query rows per CTA,
KV splits), alignment rules, and that the Python launcher, the binding and the C header agree.
On a GPU, what test_paged_attention.py does not reach: fp8 caches, every head-dim template with
page size 256, forced KV splits over long sequences, the automatic split of a one-sequence
decode, and a split launch captured in a CUDA graph.

The registry-level behaviour (page sizes, layouts, masks, chunked prefill, NaN-poisoned slots,
malformed tables) is covered by test_paged_attention.py, which parametrizes these backends.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest
import torch

from kpt.jit import csrc_dir
from kpt.ops import paged_attention
from kpt.ops._common import attention_options, compare
from kpt.ops._registry import Problem
from kpt.ops.paged_attention import FP8, SPEC, Call, _cuda, plan, reference
from tests.ops.test_paged_attention import TOLERANCE, _case

H100_SMS = 132


def _problem(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, **dims) -> Problem:
    base = dict(batch=4, seqlen_q=1, capacity=4096, heads_q=32, heads_kv=8, head_dim=128,
                page_size=16, kv_layout="NHD", kv_dtype=dtype, varlen=False, mask="causal",
                softcap=False)
    return Problem.of(torch.device(device, 0), dtype, **(base | dims))


# ---- registration and reasons ----------------------------------------------------------------


def test_backends_are_registered_and_first_on_gpus():
    cuda, hip = SPEC.backend("cuda"), SPEC.backend("hip")
    assert SPEC.priority["cuda"][:2] == ("cuda", "hip")
    assert (cuda.rocm, cuda.min_capability) == (False, (8, 0))
    assert hip.rocm is True
    assert cuda.dtypes == hip.dtypes == frozenset({torch.float16, torch.bfloat16})


def test_cpu_problems_get_reasons_not_errors():
    problem = _problem("cpu")
    for name in ("cuda", "hip"):
        reasons = SPEC.reasons(name, problem)
        assert any("device cpu" in r for r in reasons), reasons
    if torch.version.cuda is None and torch.version.hip is None:
        reason = _cuda.cuda_unavailable()
        assert isinstance(reason, str) and "CPU-only" in reason


@pytest.mark.parametrize("dims", [
    dict(head_dim=64), dict(head_dim=128), dict(head_dim=256), dict(head_dim=8),
    dict(head_dim=40), dict(head_dim=200), dict(page_size=1), dict(page_size=7),
    dict(page_size=256), dict(kv_layout="HND"), dict(mask="window", softcap=True),
    dict(varlen=True, seqlen_q=300), dict(heads_q=8, heads_kv=1), dict(batch=65535),
] + [dict(kv_dtype=t) for t in sorted(FP8, key=str)], ids=str)
def test_supported_problems(dims):
    assert _cuda.supports(_problem(**dims)) == []


@pytest.mark.parametrize(("dims", "text"), [
    (dict(head_dim=20), "not a multiple of 8"),
    (dict(head_dim=264), "head_dim 264 > 256"),
    (dict(batch=65536), "batch 65536"),
])
def test_unsupported_problems_say_why(dims, text):
    reasons = _cuda.supports(_problem(**dims))
    assert len(reasons) == 1 and text in reasons[0], reasons


# ---- launch plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "max_q", "rows"), [
    (1, 1, 1), (2, 1, 2), (3, 1, 4), (4, 1, 4), (7, 1, 8), (8, 1, 8), (16, 1, 8),
    (1, 3, 4), (2, 5, 8), (4, 300, 8), (1, 0, 1),
])
def test_rows_cover_the_group_up_to_eight(group, max_q, rows):
    assert _cuda.rows_per_cta(group, max_q) == rows


def test_a_full_batch_is_not_split():
    """B64 x 8 kv heads = 512 CTAs: ~4 per SM already keep HBM busy on an H100."""
    assert _cuda.choose_splits(64 * 8, 4096, 2 * 128 * 2, H100_SMS) == 1


def test_one_long_sequence_is_split_to_fill_the_gpu():
    """B1 x 8 kv heads over 65536 keys: enough CTAs for every SM (the model's saturating
    count), each split still long."""
    splits = _cuda.choose_splits(8, 65536, 2 * 128 * 2, H100_SMS)
    assert 8 * splits >= _cuda.SATURATING_CTAS_PER_SM * H100_SMS
    assert 65536 // splits >= 4 * _cuda.MIN_SPLIT_KEYS
    assert splits <= _cuda.MAX_SPLITS


@pytest.mark.parametrize("keys", [1, 100, 128, 129, 700, 5000])
def test_splits_keep_a_minimum_of_keys(keys):
    splits = _cuda.choose_splits(1, keys, 256, H100_SMS)
    assert splits <= max(1, -(-keys // _cuda.MIN_SPLIT_KEYS))


def test_fewer_ctas_never_get_fewer_splits():
    counts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    splits = [_cuda.choose_splits(c, 32768, 512, H100_SMS) for c in counts]
    assert splits == sorted(splits, reverse=True), splits
    assert splits[-1] == 1


def test_plan_follows_the_config():
    args = dict(batch=1, max_seqlen_q=1, heads_q=32, heads_kv=8, capacity=65536, head_dim=128,
                kv_bytes=2, sms=H100_SMS)
    rows, auto = _cuda.plan_launch(**args, rows=0, splits=0, split_scale=1.0)
    assert rows == 4 and auto > 1
    assert _cuda.plan_launch(**args, rows=0, splits=1, split_scale=1.0) == (4, 1)
    assert _cuda.plan_launch(**args, rows=2, splits=0, split_scale=1.0)[0] == 2
    assert _cuda.plan_launch(**args, rows=0, splits=0, split_scale=2.0)[1] == min(
        _cuda.MAX_SPLITS, 2 * auto)
    assert _cuda.plan_launch(**args, rows=0, splits=0, split_scale=1e-3)[1] == 1


def test_configs_start_with_the_default_and_differ():
    decode = _cuda.configs(_problem())
    assert decode[0] == {"rows": 0, "splits": 0, "split_scale": 1.0}
    assert len({tuple(sorted(c.items())) for c in decode}) == len(decode)
    assert dict(decode[0], rows=2) in decode  # group 4: half the rows per CTA is a variant
    mha = _cuda.configs(_problem(heads_q=8, heads_kv=8))
    assert all(c["rows"] == 0 for c in mha)


# ---- alignment and the launcher's contract ---------------------------------------------------


def test_alignment_rules():
    t = torch.zeros(4, 3, 16, dtype=torch.bfloat16)
    assert _cuda._misaligned(t, 16) is None
    assert "stride" in _cuda._misaligned(torch.zeros(4, 3, 20, dtype=torch.bfloat16)[..., :16],
                                         16)
    assert "pointer" in _cuda._misaligned(t.view(-1)[1:17].view(1, 16), 16)
    fp8 = torch.zeros(4, 3, 24, dtype=torch.uint8)  # 24-byte rows: 8-byte vectors fit
    assert _cuda._misaligned(fp8, 8) is None
    assert "last dim" in _cuda._misaligned(t.transpose(1, 2), 16)


def test_run_needs_gpu_tensors_and_skips_empty_calls():
    q, kc, vc, table, lens, _ = _case(0, 2, 4, 2, 16, 4, [3, 5], "NHD", torch.bfloat16)
    out, lse = torch.zeros_like(q), torch.zeros(2, 4)
    call = Call(q, kc, vc, table, lens, None, 1, 0.25, -1, 0, 0.0, None, None, "NHD", out, lse)
    with pytest.raises(ValueError, match="needs GPU tensors"):
        _cuda.run(call, {})
    empty = Call(q[:0], kc, vc, table[:0], lens[:0], None, 0, 0.25, -1, 0, 0.0, None, None,
                 "NHD", out[:0], lse[:0])
    _cuda.run(empty, {})  # nothing to launch, nothing built


def _binding_args() -> list[str]:
    text = (csrc_dir() / "paged_attention" / "binding.cpp").read_text()
    body = text[text.index('m.def("forward"'):]
    body = body[: body.index(";")]
    return re.findall(r'py::arg\("(\w+)"\)', body)


def test_launcher_passes_every_binding_argument_in_order():
    """The binding first compiles on a GPU machine: check here that the launcher's call has
    as many arguments as the binding declares, and the C++ signature the same count."""
    tree = ast.parse(open(_cuda.__file__).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "forward"]
    assert len(calls) == 1
    names = _binding_args()
    assert len(calls[0].args) == len(names) and not calls[0].keywords
    text = (csrc_dir() / "paged_attention" / "binding.cpp").read_text()
    signature = text[text.index("void forward("):]
    signature = signature[: signature.index(")")]
    assert signature.count(",") + 1 == len(names)


def test_python_limits_match_the_header():
    header = (csrc_dir() / "include" / "kpt" / "paged_attention.h").read_text()
    value = lambda name: int(re.search(rf"#define {name} (\d+)", header).group(1))  # noqa: E731
    assert value("KPT_PA_MAX_ROWS") == _cuda.MAX_ROWS
    assert value("KPT_PA_MAX_HEAD_DIM") == _cuda.MAX_HEAD_DIM
    assert value("KPT_PA_MAX_SPLITS") == _cuda.MAX_SPLITS


# ---- on a GPU --------------------------------------------------------------------------------


def _usable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA/HIP device"
    name = "hip" if torch.version.hip else "cuda"
    reasons = SPEC.reasons(name, _problem())
    return "; ".join(reasons) if reasons else None


needs_backend = pytest.mark.skipif(_usable() is not None, reason=str(_usable()))
BACKEND = "hip" if torch.version.hip else "cuda"


def _call(q, kc, vc, table, lens, cu, layout, *, causal=True, window=None, softcap=0.0,
          k_scale=None, v_scale=None) -> Call:
    scale, left, right, cap = attention_options("test", causal, window, None, softcap,
                                                q.shape[-1])
    max_q = int((cu[1:] - cu[:-1]).max()) if cu is not None else 1
    varlen = cu is not None
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1]),
                     float("nan"), device=q.device)
    return Call(q, kc, vc, table, lens, cu, max_q, scale, left, right, cap, k_scale, v_scale,
                layout, out, lse)


def _check(call: Call, config: dict) -> None:
    _cuda.run(call, config)
    torch.cuda.synchronize()
    want, want_lse = reference.forward(call)
    tol = TOLERANCE[call.q.dtype]
    assert compare("out", call.out, want, tol) is None, compare("out", call.out, want, tol)
    assert torch.equal(torch.isinf(call.lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(call.lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)


@needs_backend
@pytest.mark.parametrize("fp8", sorted(FP8, key=str), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_fp8_cache_matches_the_reference(fp8, per_head, chunked):
    lengths = [0, 1, 17, 100, 257]
    queries = [min(4, n + 1) for n in lengths] if chunked else None
    q, kc, vc, table, lens, cu = _case(21, len(lengths), 8, 2, 128, 16, lengths, "HND",
                                       torch.float32, "cuda", queries)
    scales = [torch.rand(2 if per_head else 1, device="cuda") + 0.25 for _ in range(2)]
    mult = [s.reshape(-1, 1, 1) for s in scales]  # HND: (pages, Hkv, slot, D)
    kq, vq = (kc.nan_to_num() / mult[0]).to(fp8), (vc.nan_to_num() / mult[1]).to(fp8)
    call = _call(q.bfloat16(), kq, vq, table, lens, cu, "HND", softcap=5.0,
                 k_scale=scales[0], v_scale=scales[1])
    _check(call, _cuda.configs(_problem())[0])


@needs_backend
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_head_dim_template_with_page_size_256(head_dim, dtype):
    lengths = [255, 256, 257, 600]
    q, kc, vc, table, lens, _ = _case(22, len(lengths), 12, 4, head_dim, 256, lengths, "NHD",
                                      dtype, "cuda")
    _check(_call(q, kc, vc, table, lens, None, "NHD", window=(300, 0)), {})


@needs_backend
@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_forced_splits_and_rows(splits, rows, chunked):
    lengths = [0, 5, 700, 3000]
    queries = [min(6, n + 1) for n in lengths] if chunked else None
    q, kc, vc, table, lens, cu = _case(23, len(lengths), 8, 2, 128, 16, lengths, "NHD",
                                       torch.bfloat16, "cuda", queries)
    call = _call(q, kc, vc, table, lens, cu, "NHD", causal=False, window=(900, 40),
                 softcap=20.0)
    _check(call, {"rows": rows, "splits": splits})


@needs_backend
def test_one_long_decode_is_split_automatically():
    n = 20000
    q, kc, vc, table, lens, _ = _case(24, 1, 32, 8, 128, 16, [n], "NHD", torch.bfloat16,
                                      "cuda")
    index = torch.cuda.current_device()
    _, splits = _cuda.plan_launch(1, 1, 32, 8, table.shape[1] * 16, 128, 2,
                                  _cuda._sm_count(index), 0, 0, 1.0)
    assert splits > 1
    _check(_call(q, kc, vc, table, lens, None, "NHD"), {})


@needs_backend
def test_split_launch_in_a_cuda_graph_sees_new_tables(monkeypatch):
    """A plan's run with a forced KV split captured once, replayed after the lengths and a page
    id changed in place: the partial buffers come from the graph's pool, nothing is read on
    the host."""
    q, kc, vc, table, lens, _ = _case(25, 3, 8, 2, 64, 16, [400, 17, 1000], "NHD",
                                      torch.bfloat16, "cuda")
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    native = SPEC.backend(BACKEND)
    forced = dataclasses.replace(native, configs=lambda problem: [
        dict(native.configs(problem)[0], splits=5)])
    monkeypatch.setattr(SPEC, "backends", tuple(forced if b is native else b
                                                 for b in SPEC.backends))
    SPEC.clear_cache()
    p = plan(q, kc, vc, table, lens, backend=BACKEND)
    out, lse = torch.empty_like(q), torch.empty(3, 8, device="cuda")
    p.run(q, kc, vc, out=out, lse=lse)  # warm: build, dispatch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p.run(q, kc, vc, out=out, lse=lse)
    lens.copy_(torch.tensor([401, 3, 900], dtype=torch.int32))
    table[1, 0] = table[0, 2]
    graph.replay()
    torch.cuda.synchronize()
    want, want_lse = paged_attention(q, kc, vc, table, lens, return_lse=True,
                                     backend="reference")
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@needs_backend
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("mask", ["window", "chunk"])
def test_hidden_non_finite_keys_stay_out(mask, which, poison):
    """A NaN / inf in a key or value a query cannot see (before its window; after it in the
    same prefill chunk) never reaches that query: the kernel skips hidden keys in the P.V
    update instead of multiplying them by a zero probability. Keys span several chunks and
    pages, so both the interior path and the boundary path run."""
    gen = torch.Generator().manual_seed(7)
    n, d, heads = 300, 128, 2
    k, v = torch.randn(n, heads, d, generator=gen), torch.randn(n, heads, d, generator=gen)
    target = k if which == "k" else v
    m = 1 if mask == "window" else 5
    # window (64, 0) at position n - 1 sees keys n - 65 .. n - 1: key n - 66 is the first
    # hidden one, read with the visible keys of its chunk
    hidden = n - 66 if mask == "window" else n - 1
    target[hidden, :, 3] = poison
    page = 16
    table = torch.arange(n // page + 1, dtype=torch.int32)[None].cuda()
    caches = []
    for t in (k, v):
        c = torch.zeros(table.shape[1] * page, heads, d)
        c[:n] = t
        caches.append(c.view(-1, page, heads, d).to(torch.bfloat16).cuda())
    q = torch.randn(m, heads * 4, d, generator=gen).to(torch.bfloat16).cuda()
    kw = (dict(window=(64, 0)) if mask == "window"
          else dict(cu_seqlens_q=torch.tensor([0, m], dtype=torch.int32, device="cuda")))
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    out = paged_attention(q, *caches, table, lens, backend=BACKEND, **kw)
    blind = slice(0, m) if mask == "window" else slice(0, m - 1)
    assert torch.isfinite(out[blind]).all(), f"a hidden {poison} in {which} reached a query"
    want = paged_attention(q, *caches, table, lens, backend="reference", **kw)
    assert compare("out", out[blind], want[blind], TOLERANCE[torch.bfloat16]) is None
