"""merge_attention_states: attention over two disjoint key sets merged through their lse equals
attention over all the keys (float32, odd sizes), empty parts (lse = -inf) leave the other part
unchanged and two empty parts give zeros without NaN; the in-place variant; bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from kpt.ops import flash_attention
from kpt.ops._common import triton_interpreting
from kpt.ops.cascade_attention import _merge, merge_attention_states, merge_attention_states_
from tests.property.strategies import check_specials


def _parts(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 5, 6, 24, generator=gen).to(dtype)  # (B, Sq, H, D)
    k = torch.randn(2, 19, 3, 24, generator=gen).to(dtype)
    v = torch.randn(2, 19, 3, 24, generator=gen).to(dtype)
    whole = flash_attention(q, k, v, return_lse=True, backend="reference")
    a = flash_attention(q, k[:, :7], v[:, :7], return_lse=True, backend="reference")
    b = flash_attention(q, k[:, 7:], v[:, 7:], return_lse=True, backend="reference")
    lse = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (B, H, Sq) -> (B, Sq, H)
    return (whole[0], lse(whole[1])), (a[0], lse(a[1])), (b[0], lse(b[1]))


# float32: the merge is exact math up to rounding (~1e-7 relative); bf16 inputs: the parts
# were each rounded to bf16 once, so the merged output is within ~1 bf16 ulp (2^-8) of the
# whole, norm-wise.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_merge_equals_attention_over_all_keys(dtype, tol):
    (o, lse), (o_a, lse_a), (o_b, lse_b) = _parts(1, dtype)
    got, got_lse = merge_attention_states(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(got_lse, lse, rtol=1e-5, atol=1e-5)
    err = (got.double() - o.double()).norm() / o.double().norm()
    assert err < tol, err
    # the check can fail: one part alone is not the whole
    assert (o_a.double() - o.double()).norm() / o.double().norm() > 0.05


def test_empty_parts():
    (_, _), (o_a, lse_a), (o_b, lse_b) = _parts(2, torch.float32)
    empty = torch.full_like(lse_b, float("-inf"))
    got, got_lse = merge_attention_states(o_a, lse_a, torch.randn_like(o_b), empty)
    torch.testing.assert_close(got, o_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_lse, lse_a)
    got, got_lse = merge_attention_states(o_a, empty, o_b, empty.clone())
    assert not got.isnan().any() and not got.any() and torch.isinf(got_lse).all()


def test_in_place_variant():
    (o, lse), (o_a, lse_a), (o_b, lse_b) = _parts(3, torch.float32)
    out, out_lse = merge_attention_states_(o_a, lse_a, o_b, lse_b)
    assert out is o_a and out_lse is lse_a
    torch.testing.assert_close(o_a, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_a, lse, rtol=1e-5, atol=1e-5)


# The Triton merge (what merge_attention_states and cascade_attention run on a GPU) against
# the torch math it replaces: on the GPU when there is one, else on CPU tensors under the
# interpreter.
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(_DEVICE == "cpu" and not triton_interpreting(),
                    reason="runs the Triton kernel on CPU tensors: TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.float16)])
def test_triton_merge_matches_the_torch_math(dtype, out_dtype):
    """Odd heads and head dim (masked tails), lse as a transposed view (varlen's (H, T)), rows
    where one part or both are empty (-inf), a strided o; out and lse against ``_merge``
    rounded to out_dtype once (float32 math both ways: a few float32 ulps apart)."""
    triton_merge = pytest.importorskip("kpt.ops.cascade_attention._triton").merge
    gen = torch.Generator().manual_seed(4)
    tokens, heads, d = 7, 5, 24
    o_a = torch.randn(tokens, heads, d + 8, generator=gen).to(dtype)[..., :d]  # strided rows
    o_b = torch.randn(tokens, heads, d, generator=gen).to(dtype)
    lse_a = (3 * torch.randn(heads, tokens, generator=gen)).T  # (T, H) view of (H, T)
    lse_b = 3 * torch.randn(tokens, heads, generator=gen)
    lse_a[1, 2] = float("-inf")                      # only b
    lse_b[3, 0] = float("-inf")                      # only a
    lse_a[5, :] = lse_b[5, :] = float("-inf")        # neither: zeros, lse -inf
    args = [t.to(_DEVICE) for t in (o_a, lse_a, o_b, lse_b)]
    got, got_lse = triton_merge(*args, out_dtype)
    want, want_lse = _merge(*args)
    assert got.dtype == out_dtype and got.shape == o_b.shape and got_lse.shape == lse_b.shape
    torch.testing.assert_close(got_lse.cpu(), want_lse.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want.to(out_dtype).cpu(), rtol=2**-7, atol=1e-6)
    assert not got.isnan().any() and not got[5].any()
    assert bool(torch.isneginf(got_lse[5]).all())
    # The same shapes again with fresh values: on a GPU the launcher bound by the first call
    # runs (kpt.ops._triton_launch.Launchers), and must give the torch math's result too.
    args = [t.to(_DEVICE) for t in (torch.randn(o_a.shape, generator=gen).to(dtype), lse_a * 0.5,
                                    torch.randn(o_b.shape, generator=gen).to(dtype), lse_b - 1)]
    args[0] = torch.empty(tokens, heads, d + 8, dtype=dtype, device=_DEVICE)[..., :d].copy_(
        args[0])  # the first call's strides
    got, got_lse = triton_merge(*args, out_dtype)
    want, want_lse = _merge(*args)
    torch.testing.assert_close(got_lse.cpu(), want_lse.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want.to(out_dtype).cpu(), rtol=2**-7, atol=1e-6)


def _overflow_parts(nan_key: bool):
    """Parts and whole at scale 1e38, where every logit is +-inf: a row's lse is +inf where some
    key of it gives +inf (out NaN), -inf where all give -inf (out 0); a NaN key (optional) makes
    the rows without a +inf logit NaN. Part a holds keys 0..6, part b the rest."""
    gen = torch.Generator().manual_seed(5)
    # Heads 0 and 2: every key negative (a positive query row: all -inf; a negative one: all
    # +inf). Head 1: part a negative, part b of mixed signs (every row: +inf in some part).
    sign = -torch.ones(19, 3)
    sign[7:, 1] = torch.where(torch.rand(12, generator=gen) < 0.5, -1.0, 1.0)
    q = torch.rand(1, 6, 3, 16, generator=gen) + 1
    q[:, ::2] *= -1  # rows of either sign
    k = (torch.rand(1, 19, 3, 16, generator=gen) + 1) * sign[:, :, None]
    v = torch.randn(1, 19, 3, 16, generator=gen)
    if nan_key:
        k[0, 3, 2, 0] = float("nan")  # head 2: NaN logits in part a
    lse = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    runs = [flash_attention(q, k[:, lo:hi], v[:, lo:hi], scale=1e38, return_lse=True,
                            backend="reference") for lo, hi in ((0, 19), (0, 7), (7, 19))]
    return [(o, lse(x)) for o, x in runs]


@pytest.mark.parametrize("nan_key", [False, True])
def test_merge_follows_the_overflow_rule_of_one_call(nan_key):
    """Regression (issue 27): a part with lse +inf (an overflowed logit) or NaN merged to o = 0
    (its weight exp(lse_part - lse) was set to 0 where lse is not finite); one call over all the
    keys gives NaN there. The torch math, and the Triton kernel where it can run, now agree with
    the single call: NaN at the same places, the same infinite lse, equal finite values."""
    (o, lse), (o_a, lse_a), (o_b, lse_b) = _overflow_parts(nan_key)
    assert torch.isposinf(lse).any() and torch.isneginf(lse).any()  # both kinds of rows occur
    assert torch.isnan(lse).any() == nan_key
    merges = [("torch", _merge)]
    if _DEVICE == "cuda" or triton_interpreting():
        triton_merge = importlib.import_module("kpt.ops.cascade_attention._triton").merge
        merges.append(("triton", lambda *a: triton_merge(*a, torch.float32)))
    for name, merge in merges:
        got, got_lse = merge(*(t.to(_DEVICE) for t in (o_a, lse_a, o_b, lse_b)))
        check_specials(f"{name}.lse", got_lse, lse, rtol=1e-6, atol=1e-6)
        check_specials(f"{name}.o", got, o, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("override", "error", "text"), [
    (dict(o_b=torch.randn(2, 5, 6, 23)), ValueError, "differ"),
    (dict(lse_a=torch.randn(2, 5, 6, dtype=torch.float64)), TypeError, "lse_a"),
    (dict(lse_b=torch.randn(2, 6, 5)), ValueError, "shaped like o"),
    (dict(o_a=torch.randn(4)), ValueError, "must be"),
    (dict(o_a=[1.0]), TypeError, "o_a must be a torch.Tensor"),
], ids=["o shapes", "lse dtype", "lse shape", "o 1-D", "o list"])
def test_bad_input(override, error, text):
    (_, _), (o_a, lse_a), (o_b, lse_b) = _parts(4, torch.float32)
    args = dict(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b) | override
    with pytest.raises(error, match=text) as info:
        merge_attention_states(**args)
    assert "merge_attention_states" in str(info.value)


# ---- cascade_attention ------------------------------------------------------------------------

from kpt.ops.cascade_attention import cascade_attention  # noqa: E402
from kpt.ops.paged_attention import SPEC as PAGED_SPEC  # noqa: E402

PAGE = 4


def _cascade(seed: int, dtype: torch.dtype, queries: list[int] | None):
    """Five requests: a 12-token prefix shared by all (one group), a second level of two groups
    (requests 0-2: 8 tokens, 3-4: 4 tokens), then each request's own tokens (ragged, 1-7).
    Shared lengths are page multiples, so each request's pages concatenate into one table."""
    gen = torch.Generator().manual_seed(seed)
    heads, heads_kv, d = 6, 2, 16
    own = [3, 7, 1, 5, 4]
    level_groups = [([0, 5], [12]), ([0, 3, 5], [8, 4]), (list(range(6)), own)]
    num_pages = 64
    k_cache = torch.randn(num_pages, PAGE, heads_kv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, PAGE, heads_kv, d, generator=gen).to(dtype)
    free = torch.randperm(num_pages, generator=gen).tolist()
    levels = []
    for indptr, lengths in level_groups:
        pages = [[free.pop() for _ in range(-(-n // PAGE))] for n in lengths]
        width = max(len(p) for p in pages)
        table = torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.int32)
        levels.append((table, torch.tensor(lengths, dtype=torch.int32),
                       torch.tensor(indptr, dtype=torch.int32)))
    # each request's concatenated table and total length
    rows, totals = [], []
    for r in range(5):
        row, total = [], 0
        for table, lens, indptr in levels:
            g = max(i for i, start in enumerate(indptr.tolist()[:-1]) if start <= r)
            n = int(lens[g])
            row += table[g, : -(-n // PAGE)].tolist()
            total += n
        rows.append(row)
        totals.append(total)
    width = max(len(r) for r in rows)
    flat = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    tokens = queries or [1] * 5
    q = torch.randn(sum(tokens), heads, d, generator=gen).to(dtype)
    cu = (torch.tensor([0, *torch.tensor(tokens).cumsum(0).tolist()], dtype=torch.int32)
          if queries else None)
    return q, k_cache, v_cache, levels, flat, torch.tensor(totals, dtype=torch.int32), cu


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_cascade_equals_paged_attention_over_the_concatenated_pages(chunked, softcap):
    queries = [2, 3, 1, 1, 4] if chunked else None
    q, kc, vc, levels, flat, totals, cu = _cascade(5, torch.float32, queries)
    kw = dict(cu_seqlens_q=cu, softcap=softcap, return_lse=True)
    want, want_lse = _paged_ref(q, kc, vc, flat, totals, **kw)
    for backend in ("reference", None):  # the specification, and the levels merged
        out, lse = cascade_attention(q, kc, vc, levels, backend=backend, **kw)
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)  # float32 sums reordered
        torch.testing.assert_close(lse, want_lse, rtol=2e-5, atol=2e-5)


def _paged_ref(q, kc, vc, table, lens, cu_seqlens_q, softcap, return_lse):
    from kpt.ops import paged_attention

    out, lse = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu_seqlens_q,
                               softcap=softcap, return_lse=True, backend="reference")
    return out, (lse if cu_seqlens_q is None else lse.transpose(0, 1))


def _triton_reasons() -> list[str]:
    """paged_attention's Triton backend's own reasons against this test's calls."""
    from kpt.ops.paged_attention import Call, problem_of

    q, kc, vc, levels, *_ = _cascade(0, torch.bfloat16, None)
    table, lens, _ = levels[-1]
    call = Call(q, kc, vc, table, lens, None, 1, 0.25, -1, 0, 0.0, None, None, "NHD", q, q)
    return PAGED_SPEC.reasons("triton", problem_of(call))


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_cascade_on_the_triton_kernel(chunked):
    if _triton_reasons():
        pytest.skip("triton: " + "; ".join(_triton_reasons()))
    queries = [1, 2, 1, 3, 1] if chunked else None
    q, kc, vc, levels, _, _, cu = _cascade(6, torch.bfloat16, queries)
    got = cascade_attention(q, kc, vc, levels, cu_seqlens_q=cu, backend="triton")
    want = cascade_attention(q, kc, vc, levels, cu_seqlens_q=cu, backend="reference")
    # each level's output is rounded to bf16 before the merge: within 2 bf16 units norm-wise
    err = (got.double() - want.double()).norm() / want.double().norm()
    assert err < 2**-7, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="two CUDA streams need a GPU")
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
def test_overlapped_levels_on_a_gpu(chunked, monkeypatch):
    """On a GPU the levels after the first run on a side stream (OVERLAP_LEVELS): the same
    result as the levels in sequence, eager and in a CUDA graph replayed with new queries."""
    cascade_module = importlib.import_module("kpt.ops.cascade_attention")

    queries = [1, 2, 1, 3, 1] if chunked else None
    q, kc, vc, levels, _, _, cu = _cascade(7, torch.bfloat16, queries)
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    levels = [tuple(t.cuda() for t in level) for level in levels]
    cu = None if cu is None else cu.cuda()

    # chunked: max_seqlen_q given, so that nothing is read back on the host (capturable)
    longest = max(queries) if chunked else None

    def run():
        return cascade_attention(q, kc, vc, levels, cu_seqlens_q=cu, max_seqlen_q=longest,
                                 return_lse=True)

    monkeypatch.setattr(cascade_module, "OVERLAP_LEVELS", False)
    want, want_lse = run()
    monkeypatch.setattr(cascade_module, "OVERLAP_LEVELS", True)
    out, lse = run()
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the same kernels, the same order
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_lse = run()
    q.copy_(torch.randn_like(q))
    graph.replay()
    monkeypatch.setattr(cascade_module, "OVERLAP_LEVELS", False)
    want, want_lse = run()
    torch.testing.assert_close(captured, want, rtol=0, atol=0)
    torch.testing.assert_close(captured_lse, want_lse, rtol=0, atol=0)


@pytest.mark.parametrize(("mutate", "error", "text"), [
    (lambda lv: [], TypeError, "non-empty list"),
    (lambda lv: [lv[0][:2]] + lv[1:], TypeError, "levels\\[0\\] must be"),
    (lambda lv: [(lv[0][0], lv[0][1], torch.tensor([0, 4], dtype=torch.int32))] + lv[1:],
     ValueError, "rise from 0 to the 5 requests"),
    (lambda lv: [(lv[0][0].long(), lv[0][1], lv[0][2])] + lv[1:], TypeError, "block_table"),
    (lambda lv: [(lv[0][0], torch.tensor([12, 1], dtype=torch.int32), lv[0][2])] + lv[1:],
     ValueError, "table rows"),
], ids=["empty", "pair", "indptr", "table dtype", "lengths"])
def test_bad_levels(mutate, error, text):
    q, kc, vc, levels, *_ = _cascade(7, torch.float32, None)
    with pytest.raises(error, match=text) as info:
        cascade_attention(q, kc, vc, mutate(levels))
    assert "cascade_attention" in str(info.value)
