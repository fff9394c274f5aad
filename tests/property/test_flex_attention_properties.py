"""Properties of ``kpt.ops.flex_attention``, its ``create_block_mask`` and the named ``mods``
on generated inputs (issue 27).

* valid calls (score mods: named, hand-written, integer-valued, untranslatable; masks: every
  named mask and combinations, built by kpt's or torch's ``create_block_mask`` with odd block
  sizes; GQA, broadcast kv batch, Dv != D, odd sizes and layouts, four dtypes): the reference
  equals float64 math, and every backend that declares it can run the call (``SPEC.reasons``)
  plus the default dispatch equal the reference; a backend that declares it cannot run the
  call refuses it with a ValueError naming ``flex_attention``;
* gradients of every runnable backward equal the reference's (autograd through it);
* ``create_block_mask``: every block is listed exactly as full / partial / skipped by the
  mask's values, in both directions;
* named mods: the masks and scores they compute are their documented formulas;
  ``alibi_slopes`` is the ALiBi paper's ``get_slopes``;
* invalid arguments of ``flex_attention``, ``create_block_mask`` and the mod constructors:
  a ValueError / TypeError naming ``flex_attention`` (or the constructor);
* known bugs, one ``xfail(strict=True)`` test (or parameter) each, at the bottom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops._common import MAX_SCALE, compare, triton_interpreting
from kpt.ops.flash_attention import TOLERANCE as FLASH_TOLERANCE
from kpt.ops.flash_attention import compare_lse
from kpt.ops.flex_attention import (
    SPEC,
    _codegen,
    _default_block,
    create_block_mask,
    flex_attention,
    mods,
    problem_of,
)
from kpt.ops.flex_attention import block_mask as kbm
from tests.property.strategies import (
    check_close,
    check_specials,
    expect_named_error,
    layouts,
    props,
    random_tensor,
    relayout,
    seeds,
)

try:
    from torch.nn.attention import flex_attention as tflex
except ImportError:  # torch < 2.5: kpt's create_block_mask only
    tflex = None

pytestmark = [pytest.mark.filterwarnings("ignore:.*flex_attention.*"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]

OP = "flex_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# flex_attention documents no TOLERANCE of its own. Kernels vs the reference:
# * fp32: the same float32 math summed in another order (online softmax over 16-wide tiles),
#   a few float32 ulps on values of order 1: 2e-5, as tests/ops/test_flex_attention.py;
# * fp16 / bf16: like flash_attention, kernels round P to the input dtype before P @ V:
#   flash_attention's bound of 2 ulps (its TOLERANCE).
# * fp64: only the reference runs it (the default dispatch picks it): identical results.
# lse is float32 from the same logits in every backend: 2e-5 relative.
TOLERANCE = {torch.float32: 2e-5, torch.float16: FLASH_TOLERANCE[torch.float16],
             torch.bfloat16: FLASH_TOLERANCE[torch.bfloat16], torch.float64: 1e-12}
LSE_TOLERANCE = 2e-5
# Gradients: fp32 as tests/ops (5e-5); halves: flash_attention's backward bound, 4 ulps.
BACKWARD_TOLERANCE = {torch.float32: 5e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}
# The reference vs float64 math: it computes in float32 (float64 for float64 inputs) and
# rounds once, so half an ulp of the dtype plus float32 arithmetic on logits of order 10. For
# float64 the bound is loose (1e-5, not ~1e-12) because the translated mods' float constants
# are evaluated in float32 (test_float64_mod_constants_keep_float64_precision).
REFERENCE_VS_FLOAT64 = {torch.float16: FLASH_TOLERANCE[torch.float16],
                        torch.bfloat16: FLASH_TOLERANCE[torch.bfloat16],
                        torch.float32: 2e-5, torch.float64: 1e-5}


# ---- mods, as data (so a failing example prints what it was) -----------------------------------

score_specs = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("softcap"), st.floats(0.5, 50.0)),
    st.tuples(st.just("alibi"), st.sampled_from(["paper", "random"])),
    st.tuples(st.just("softcap_alibi"), st.floats(0.5, 50.0)),
    # a hand-written lambda with closure scalars (translated, scalars read per call)
    st.tuples(st.just("linear"), st.floats(-2.0, 2.0), st.floats(-0.5, 0.5)),
    st.just(("integer",)),  # an integer-valued score (allowed: "a float or integer value")
    st.just(("table",)),  # a captured 2-D tensor indexed by h and kv_idx
    st.just(("erf",)),  # untranslatable: Triton declares a reason, the reference runs it
)
mask_specs = st.one_of(
    st.just(("none",)),
    st.just(("causal",)),
    st.tuples(st.just("sliding_window"), st.integers(0, 20)),
    st.tuples(st.just("prefix_lm"), st.integers(0, 20)),
    st.just(("prefix_lm_tensor",)),
    st.tuples(st.just("document"), st.integers(1, 4), st.booleans()),
    st.just(("document_causal",)),
    st.tuples(st.just("window_or_prefix"), st.integers(0, 5), st.integers(0, 5)),
    st.just(("all_false",)),
    st.just(("mod3",)),
)
block_sizes = st.sampled_from([16, 32, 128, (16, 32), (32, 16), 8, (8, 24), 1])


def make_score_mod(spec: tuple, gen: torch.Generator, heads: int, skv: int):
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "softcap":
        return mods.softcap(spec[1])
    if kind in ("alibi", "softcap_alibi"):
        slopes = (mods.alibi_slopes(heads) if kind == "softcap_alibi" or spec[1] == "paper"
                  else torch.rand(heads, generator=gen))
        alibi = mods.alibi(slopes)
        return alibi if kind == "alibi" else mods.compose(mods.softcap(spec[1]), alibi)
    if kind == "linear":
        a, c = spec[1], spec[2]

        def linear(score, b, h, q_idx, kv_idx):
            return score * a + (q_idx - kv_idx) * c
        return linear
    if kind == "integer":
        return lambda score, b, h, q_idx, kv_idx: q_idx - 2 * kv_idx
    if kind == "table":
        table = torch.randn(heads, skv, generator=gen)
        return lambda score, b, h, q_idx, kv_idx: score + table[h, kv_idx]
    if kind == "erf":
        return lambda score, b, h, q_idx, kv_idx: score + torch.erf(score)
    raise AssertionError(spec)


def make_mask_mod(spec: tuple, gen: torch.Generator, batch: int, sq: int, skv: int):
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "causal":
        return mods.causal()
    if kind == "sliding_window":
        return mods.sliding_window(spec[1])
    if kind == "prefix_lm":
        return mods.prefix_lm(spec[1])
    if kind == "prefix_lm_tensor":
        return mods.prefix_lm(torch.randint(0, skv + 1, (batch,), generator=gen))
    if kind in ("document", "document_causal"):
        docs, per_batch = (spec[1], spec[2]) if kind == "document" else (3, False)
        length = max(sq, skv)
        shape = (batch, length) if per_batch else (length,)
        ids = torch.randint(0, docs, shape, generator=gen).sort(dim=-1).values
        doc = mods.document(ids)
        return doc if kind == "document" else mods.and_masks(doc, mods.causal())
    if kind == "window_or_prefix":
        return mods.or_masks(mods.sliding_window(spec[1]), mods.prefix_lm(spec[2]))
    if kind == "all_false":
        return lambda b, h, q_idx, kv_idx: q_idx < 0
    if kind == "mod3":
        return lambda b, h, q_idx, kv_idx: (q_idx + kv_idx) % 3 != 0
    raise AssertionError(spec)


# ---- float64 truth ------------------------------------------------------------------------------


def float64_flex(q, k, v, score_mod, mask_mod, scale):
    """The module docstring's formula on dense broadcast index tensors, in float64."""
    B, H, sq, d = q.shape
    group = H // k.shape[1]
    kk = k.double().repeat_interleave(group, 1).expand(B, -1, -1, -1)
    vv = v.double().repeat_interleave(group, 1).expand(B, -1, -1, -1)
    s = q.double() @ kk.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    qi = torch.arange(sq).view(1, 1, sq, 1)
    kvi = torch.arange(k.shape[2]).view(1, 1, 1, -1)
    if score_mod is not None:
        s = torch.as_tensor(score_mod(s, b, h, qi, kvi)).double().expand(s.shape)
    if mask_mod is not None:
        s = s.masked_fill(~torch.as_tensor(mask_mod(b, h, qi, kvi)).expand(s.shape), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # fully masked rows: out 0, lse -inf
    return p @ vv, lse


# ---- cases --------------------------------------------------------------------------------------


@st.composite
def flex_calls(draw, max_len: int = 20, dtypes: tuple = DTYPES, scores=score_specs,
               masks=mask_specs) -> dict:
    dtype = draw(st.sampled_from(dtypes))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    kv_batch = draw(st.sampled_from([1, batch]))
    d = draw(st.sampled_from([1, 3, 8, 16, 24]))
    dv = draw(st.sampled_from([d, 1, 5, 16]))
    sq, skv = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    mask = draw(masks)
    builder = "none" if mask == ("none",) else draw(
        st.sampled_from(["kpt", "torch"] if tflex is not None else ["kpt"]))
    shapes = {"query": (batch, hkv * group, sq, d), "key": (kv_batch, hkv, skv, d),
              "value": (kv_batch, hkv, skv, dv)}
    # B=None builds the block tables for batch 0 and broadcasts them (torch's semantics too):
    # only right for a mask that does not read b.
    per_batch = mask[0] == "prefix_lm_tensor" or mask[0] == "document" and mask[2]
    return dict(
        dtype=dtype, shapes=shapes, score=draw(scores), mask=mask, builder=builder,
        block_size=draw(block_sizes),
        mask_batch=batch if per_batch else draw(st.sampled_from([None, batch])),
        mask_heads=draw(st.sampled_from([None, hkv * group])),
        scale=draw(st.one_of(st.none(), st.floats(-2.0, 2.0))),
        enable_gqa=group > 1 or draw(st.booleans()), seed=draw(seeds),
        layouts={name: (draw(layouts), draw(st.integers(0, 3))) for name in shapes})


def make_call(case: dict, requires_grad: bool = False) -> tuple[dict, list, object, object]:
    """flex_attention's keyword arguments, the q/k/v leaves, and the score and mask mods."""
    gen = torch.Generator().manual_seed(case["seed"])
    args, leaves = {}, []
    for name, shape in case["shapes"].items():
        leaf = random_tensor(gen, shape, case["dtype"]).requires_grad_(requires_grad)
        leaves.append(leaf)
        args[name] = relayout(leaf, *case["layouts"][name])
    B, H, sq, _ = case["shapes"]["query"]
    skv = case["shapes"]["key"][2]
    score_mod = make_score_mod(case["score"], gen, H, skv)
    mask_mod = make_mask_mod(case["mask"], gen, B, sq, skv)
    block_mask = None
    if case["builder"] == "kpt":
        block_mask = create_block_mask(mask_mod, case["mask_batch"], case["mask_heads"], sq,
                                       skv, "cpu", case["block_size"])
    elif case["builder"] == "torch":
        block_mask = tflex.create_block_mask(mask_mod, case["mask_batch"], case["mask_heads"],
                                             sq, skv, device="cpu",
                                             BLOCK_SIZE=case["block_size"])
    args.update(score_mod=score_mod, block_mask=block_mask, scale=case["scale"],
                enable_gqa=case["enable_gqa"])
    return args, leaves, score_mod, mask_mod


def problem(args: dict, grad: bool):
    """The dispatch problem of a call, built as flex_attention builds it."""
    q, k, v = args["query"], args["key"], args["value"]
    B, H, sq, _ = q.shape
    skv = k.shape[2]
    bm = args["block_mask"]
    if bm is None or kbm.is_noop_mask(bm):
        tables = kbm.all_full(sq, skv, _default_block(sq, skv), q.device)
    else:
        tables = kbm.normalize(bm, B, H, sq, skv, q.device)
    mask_mod = tables.mask_mod if tables.has_partial else None
    translated = _codegen.translate(args["score_mod"], mask_mod)
    return problem_of(q, k, v, translated, tables, grad)


def runnable(args: dict, grad: bool = False) -> list[str]:
    p = problem(args, grad)
    names = [b.name for b in SPEC.backends if not SPEC.reasons(b, p)]
    assert "reference" in names, "the reference must run every valid call"
    return names


# ---- valid inputs -------------------------------------------------------------------------------


# The mods the `flash` backend lowers to a flash_attention call (a band and a soft-cap).
flash_lowerable = dict(
    dtypes=(torch.float16, torch.bfloat16),
    scores=st.one_of(st.just(("none",)), st.tuples(st.just("softcap"), st.floats(0.5, 50.0))),
    masks=st.one_of(st.just(("none",)), st.just(("causal",)),
                    st.tuples(st.just("sliding_window"), st.integers(0, 20))))


@props(150)
@given(st.one_of(flex_calls(), flex_calls(**flash_lowerable)))
def test_valid_calls_match_reference(case):
    args, _, score_mod, mask_mod = make_call(case)
    dtype = case["dtype"]
    ref_out, ref_lse = flex_attention(**args, return_lse=True, backend="reference")
    want_out, want_lse = float64_flex(args["query"], args["key"], args["value"], score_mod,
                                      mask_mod, case["scale"])
    check_close(compare("reference.out", ref_out, want_out, REFERENCE_VS_FLOAT64[dtype]))
    check_close(compare_lse("reference.lse", ref_lse, want_lse, 1e-5))
    names = runnable(args)
    if dtype != torch.float64 and case["score"] != ("erf",) and max(
            case["shapes"]["query"][-1], case["shapes"]["value"][-1]) <= 256 and (
            min(kbm._block_sizes(case["block_size"])) >= 16 or case["builder"] == "none") \
            and triton_interpreting():
        assert "triton" in names, "Triton (interpreter) must take this call"
    for backend in [b.name for b in SPEC.backends]:
        if backend not in names:  # dispatch's reasons and the public function agree
            expect_named_error(lambda b=backend: flex_attention(**args, backend=b), OP,
                               f"backend {backend!r}, which declares reasons")
    for backend in [*names, None]:
        if backend == "reference":
            continue
        out, lse = flex_attention(**args, return_lse=True, backend=backend)
        event(f"compared {backend}")  # hypothesis statistics: what ran
        tol = TOLERANCE[dtype]
        check_close(compare(f"{backend}.out", out, ref_out, tol))
        check_close(compare_lse(f"{backend}.lse", lse, ref_lse, LSE_TOLERANCE))


@props(30)
@given(flex_calls(max_len=12).filter(
    # float64: only the reference; a score that ignores `score` crashes the reference
    # backward, a known bug (test_backward_of_a_score_mod_that_ignores_the_score).
    lambda c: c["dtype"] != torch.float64 and c["score"] != ("integer",)), st.booleans())
def test_gradients_match_reference(case, with_lse_grad):
    results = {}
    for backend in runnable(make_call(case)[0], grad=True):
        args, leaves, _, _ = make_call(case, requires_grad=True)
        out, lse = flex_attention(**args, return_lse=True, backend=backend)
        outputs = [out]
        grads = [random_tensor(torch.Generator().manual_seed(case["seed"] + 1), out.shape,
                               out.dtype)]
        if with_lse_grad:
            outputs.append(lse)
            grads.append(random_tensor(torch.Generator().manual_seed(case["seed"] + 2),
                                       lse.shape, lse.dtype))
        results[backend] = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
        event(f"compared {backend}")  # hypothesis statistics: what ran
    tol = BACKWARD_TOLERANCE[case["dtype"]]
    for backend, got in results.items():
        for name, g, want in zip(("dq", "dk", "dv"), got, results["reference"]):
            assert (g is None) == (want is None), name
            if g is not None:
                check_close(compare(f"{backend}.{name}", g, want, tol))


@props(150)
@given(mask_specs.filter(lambda m: m != ("none",)), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from([None, 1, 2]), st.sampled_from([None, 1, 3]), block_sizes, seeds)
def test_create_block_mask_lists_every_block_by_its_values(spec, sq, skv, b, h, bs, seed):
    """A block is full iff every element of it (inside the sequences) is visible and it does
    not cross a sequence's end, partial iff some but not all are, else skipped; the
    q-direction tables are the transpose of the kv-direction ones."""
    gen = torch.Generator().manual_seed(seed)
    mask_mod = make_mask_mod(spec, gen, b or 1, sq, skv)
    bm = create_block_mask(mask_mod, b, h, sq, skv, "cpu", bs)
    bq, bkv = kbm._block_sizes(bs)
    B, H = b or 1, h or 1
    assert bm.shape == (B, H, sq, skv) and tuple(bm.BLOCK_SIZE) == (bq, bkv)
    nq, nkv = -(-sq // bq), -(-skv // bkv)
    grid = kbm.mask_grid(mask_mod, B, H, torch.arange(sq), torch.arange(skv))
    padded = torch.zeros(B, H, nq * bq, nkv * bkv, dtype=torch.bool)
    padded[:, :, :sq, :skv] = grid
    blocks = padded.view(B, H, nq, bq, nkv, bkv)
    full = blocks.all(dim=5).all(dim=3)
    partial = blocks.any(dim=5).any(dim=3) & ~full
    want = partial.to(torch.int8) + 2 * full.to(torch.int8)
    got = kbm._dense_from_lists(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                bm.full_kv_indices)
    assert torch.equal(got, want), "kv-direction tables list the wrong blocks"
    got_t = kbm._dense_from_lists(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                                  bm.full_q_indices)
    assert torch.equal(got_t, want.transpose(-1, -2)), "q-direction tables disagree"


@props(40)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 12), st.integers(0, 12), seeds)
def test_named_mods_are_their_formulas(sq, skv, window, prefix, seed):
    b = torch.arange(2).view(2, 1, 1, 1)
    h = torch.arange(3).view(1, 3, 1, 1)
    i = torch.arange(sq).view(1, 1, -1, 1)
    j = torch.arange(skv).view(1, 1, 1, -1)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (max(sq, skv),), generator=gen)
    lengths = torch.randint(0, skv + 1, (2,), generator=gen)
    slopes = torch.rand(3, generator=gen)
    score = torch.randn(2, 3, sq, skv, generator=gen)
    masks = {
        "causal": (mods.causal(), i >= j),
        "sliding_window": (mods.sliding_window(window), (i >= j) & (i - j <= window)),
        "prefix_lm": (mods.prefix_lm(prefix), (j < prefix) | (i >= j)),
        "prefix_lm_tensor": (mods.prefix_lm(lengths), (j < lengths.view(2, 1, 1, 1)) | (i >= j)),
        "document": (mods.document(ids), ids[i] == ids[j]),
        "and_masks": (mods.and_masks(mods.causal(), mods.sliding_window(window)),
                      (i >= j) & (i - j <= window)),
        "or_masks": (mods.or_masks(mods.causal(), mods.prefix_lm(prefix)), (i >= j) | (j < prefix)),
    }
    for name, (mod, want) in masks.items():
        got = mod(b, h, i, j)
        assert torch.equal(torch.broadcast_to(got, (2, 3, sq, skv)),
                           torch.broadcast_to(want, (2, 3, sq, skv))), name
    cap = 1.0 + window
    scores = {
        "softcap": (mods.softcap(cap), cap * torch.tanh(score / cap)),
        "alibi": (mods.alibi(slopes), score + slopes.view(1, 3, 1, 1) * (j - i)),
        "compose": (mods.compose(mods.softcap(cap), mods.alibi(slopes)),
                    cap * torch.tanh(score / cap) + slopes.view(1, 3, 1, 1) * (j - i)),
    }
    for name, (mod, want) in scores.items():
        torch.testing.assert_close(mod(score, b, h, i, j), want, msg=name)
    assert mods.describe(mods.sliding_window(window)).params == {"window": window}


def _paper_slopes(n: int) -> list[float]:
    """``get_slopes`` of the ALiBi paper's code (ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@props(30)
@given(st.integers(1, 80))
def test_alibi_slopes_are_the_papers(heads):
    got = mods.alibi_slopes(heads)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got, torch.tensor(_paper_slopes(heads), dtype=torch.float32))


# ---- invalid inputs -----------------------------------------------------------------------------


def causal_fn(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _base(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from(DTYPES))
    q = random_tensor(gen, (2, 2, 5, 8), dtype)
    k = random_tensor(gen, (2, 2, 6, 8), dtype)
    return dict(query=q, key=k, value=k.clone())


not_a_tensor = st.sampled_from([[[1.0]], 1.0, None, "q", np.zeros((2, 2, 5, 8), np.float32)])
bad_scale = st.sampled_from([math.nan, math.inf, -math.inf, "0.5", [0.5], np.float32(0.5),
                             torch.tensor(0.5), 1j])


def _bad_score_mod():
    def branches(score, b, h, q_idx, kv_idx):
        if score > 0:
            return score
        return -score
    return st.sampled_from([
        3, "softcap", [lambda *a: a[0]],
        lambda score: score,  # wrong arity
        lambda score, b, h, q_idx, kv_idx: None,
        lambda score, b, h, q_idx, kv_idx: "score",
        lambda score, b, h, q_idx, kv_idx: score > 0,  # a bool "score"
        lambda score, b, h, q_idx, kv_idx: score - score.max(),  # a reduction
        lambda score, b, h, q_idx, kv_idx: score[..., :1],  # a slice
        lambda score, b, h, q_idx, kv_idx: score * 1j,  # complex
        branches,  # data-dependent Python control flow
    ])


def _bad_mask_mod():
    return st.sampled_from([
        lambda b, h, q_idx, kv_idx: q_idx - kv_idx,  # an integer "mask"
        lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) * 0.5,  # a float "mask"
        lambda b, h, q_idx: q_idx > 0,  # wrong arity
        lambda b, h, q_idx, kv_idx: bool(q_idx >= kv_idx),  # data-dependent conversion
        lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).all(),  # a reduction
        lambda b, h, q_idx, kv_idx: None,
    ])


@st.composite
def invalid_calls(draw) -> dict:
    a = _base(draw)
    q, k, v = a["query"], a["key"], a["value"]
    kind = draw(st.sampled_from([
        "not_tensor", "dtype", "mixed_dtype", "rank", "head_dim", "value_shape", "kv_batch",
        "heads_no_gqa", "heads_not_multiple", "empty", "device", "score_mod", "block_mask",
        "mask_mod", "scale", "flag", "backend"]))
    if kind == "not_tensor":
        a[draw(st.sampled_from(["query", "key", "value"]))] = draw(not_a_tensor)
    elif kind == "dtype":
        dt = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64,
                                   torch.uint8]))
        a["query"], a["key"], a["value"] = q.to(dt), k.to(dt), v.to(dt)
    elif kind == "mixed_dtype":
        name = draw(st.sampled_from(["key", "value"]))
        a[name] = a[name].to(draw(st.sampled_from([d for d in DTYPES if d != q.dtype])))
    elif kind == "rank":
        name = draw(st.sampled_from(["query", "key", "value"]))
        t = a[name]
        a[name] = draw(st.sampled_from([t[0], t[None], t.reshape(-1)]))
    elif kind == "head_dim":
        a["key"] = k[..., :-1]
    elif kind == "value_shape":
        a["value"] = draw(st.sampled_from([v[:, :, :-1], v[:, :1], v[:1]]))
    elif kind == "kv_batch":
        if draw(st.booleans()):
            a["query"] = q[:1]  # kv batch 2 for a query batch of 1
        else:
            a["key"], a["value"] = torch.cat([k, k[:1]]), torch.cat([v, v[:1]])  # 3 for 2
    elif kind == "heads_no_gqa":
        a["key"], a["value"] = k[:, :1], v[:, :1]
    elif kind == "heads_not_multiple":
        a["query"] = torch.cat([q, q[:, :1]], dim=1)  # 3 query heads over 2
        a["enable_gqa"] = True
    elif kind == "empty":
        which = draw(st.sampled_from(["q_len", "kv_len", "head_dim", "value_dim"]))
        if which == "q_len":
            a["query"] = q[:, :, :0]
        elif which == "kv_len":
            a["key"], a["value"] = k[:, :, :0], v[:, :, :0]
        elif which == "head_dim":
            a["query"], a["key"] = q[..., :0], k[..., :0]
        else:
            a["value"] = v[..., :0]
    elif kind == "device":
        name = draw(st.sampled_from(["key", "value"]))
        a[name] = a[name].to("meta")
    elif kind == "score_mod":
        a["score_mod"] = draw(_bad_score_mod())
    elif kind == "block_mask":
        a["block_mask"] = draw(st.sampled_from([
            "causal", 3, causal_fn, {"kv_num_blocks": 1},
            create_block_mask(causal_fn, 1, 1, 6, 6, "cpu", 16),  # built for q_len 6
            create_block_mask(causal_fn, 1, 1, 5, 7, "cpu", 16),  # built for kv_len 7
            create_block_mask(causal_fn, 3, 1, 5, 6, "cpu", 16),  # batch 3
            create_block_mask(causal_fn, 1, 4, 5, 6, "cpu", 16),  # 4 heads
            create_block_mask(causal_fn, 1, 1, 5, 6, "meta", 16),  # another device
        ]))
    elif kind == "mask_mod":
        mask_mod = draw(_bad_mask_mod())
        # create_block_mask is where a mask_mod is first evaluated: its error counts too.
        a["deferred_block_mask"] = lambda: create_block_mask(mask_mod, 2, 2, 5, 6, "cpu", 16)
    elif kind == "scale":
        a["scale"] = draw(bad_scale)
    elif kind == "flag":
        a[draw(st.sampled_from(["enable_gqa", "return_lse"]))] = draw(
            st.sampled_from(["no", 1, 0, None, np.bool_(True), [True]]))
    else:
        a["backend"] = draw(st.sampled_from(["nope", "", "Flash", 1, ["triton"]]))
    a.setdefault("backend", draw(st.sampled_from([None, "reference", "triton"])))
    return a


@props(300)
@given(invalid_calls())
def test_invalid_arguments_raise_named_errors(args):
    def call():
        deferred = args.pop("deferred_block_mask", None)
        if deferred is not None:
            args["block_mask"] = deferred()
        return flex_attention(**args)
    expect_named_error(call, OP)


@st.composite
def invalid_block_masks(draw) -> dict:
    """create_block_mask arguments with one wrong thing, among those it rejects today (the
    ones it does not are xfail parameters of test_create_block_mask_rejects_bad_sizes)."""
    a = dict(mask_mod=causal_fn, B=2, H=2, Q_LEN=5, KV_LEN=6, device="cpu", BLOCK_SIZE=16)
    kind = draw(st.sampled_from(["mask_mod", "not_callable", "block_size"]))
    if kind == "mask_mod":
        a["mask_mod"] = draw(_bad_mask_mod())
    elif kind == "not_callable":
        a["mask_mod"] = draw(st.sampled_from([3, "causal", [causal_fn]]))
    else:
        a["BLOCK_SIZE"] = draw(st.sampled_from([0, -16, (0, 16), (16, -1)]))
    return a


@props(60)
@given(invalid_block_masks())
def test_create_block_mask_rejects_bad_arguments(args):
    expect_named_error(lambda: create_block_mask(**args), ("create_block_mask", OP))


@props(80)
@given(st.sampled_from([
    ("sliding_window", [-1, -100, 1.5, "3", None, [3], np.int64(3), True]),
    ("prefix_lm", [-1, 2.5, "3", None, torch.tensor([[1]]), torch.tensor([1.0]), True]),
    ("softcap", [0, -1.0, math.nan, -math.inf, "30", None, np.float32(30), True, [30.0]]),
    ("alibi", [[0.5], torch.tensor([1, 2]), torch.ones(2, 2), None, np.ones(2, np.float32)]),
    ("alibi_slopes", [0, -3, 2.0, True, "4", None, np.int64(4)]),
    ("document", [[0, 1], torch.tensor([0.0, 1.0]), torch.zeros(1, 1, 3, dtype=torch.long),
                  None, np.zeros(3, np.int64)]),
    ("and_masks", [(), (3,), (causal_fn, "causal")]),
    ("or_masks", [(), (None,)]),
    ("compose", [(), (1.0,), (mods.softcap(1.0), 2)]),
]), st.data())
def test_mod_constructors_reject_bad_arguments(constructor, data):
    name, values = constructor
    value = data.draw(st.sampled_from(values))
    fn = getattr(mods, name)
    args = value if name in ("and_masks", "or_masks", "compose") else (value,)
    message = expect_named_error(lambda: fn(*args), OP)
    assert name in message, f"the error does not name mods.{name}: {message}"


# ---- known bugs ---------------------------------------------------------------------------------


def _qkv(heads=2, kv_heads=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (random_tensor(gen, (1, heads, 5, 16), dtype),
            random_tensor(gen, (1, kv_heads, 7, 16), dtype),
            random_tensor(gen, (1, kv_heads, 7, 16), dtype))


@pytest.mark.parametrize("heads", [(2, 0), (0, 0)], ids=["kv_heads0", "heads0"])
def test_zero_heads_raise_named_error(heads):
    q, k, v = _qkv()
    expect_named_error(lambda: flex_attention(q[:, : heads[0]], k[:, : heads[1]],
                                              v[:, : heads[1]], enable_gqa=True), OP)


def test_bool_scale_is_rejected():
    q, k, v = _qkv()
    expect_named_error(lambda: flex_attention(q, k, v, scale=True), OP, "scale=True")


def test_softcap_rejects_infinity():
    expect_named_error(lambda: mods.softcap(math.inf), f"{OP}.mods.softcap")


@pytest.mark.parametrize("bad", [dict(Q_LEN=-5), dict(KV_LEN=True), dict(Q_LEN=5.5),
                                 dict(B=-1), dict(H=2.5), dict(BLOCK_SIZE=16.7),
                                 dict(BLOCK_SIZE="16"), dict(BLOCK_SIZE=True),
                                 dict(BLOCK_SIZE=(16, 16, 16))],
                         ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()))
def test_create_block_mask_rejects_bad_sizes(bad):
    args = dict(mask_mod=causal_fn, B=1, H=1, Q_LEN=5, KV_LEN=6, device="cpu", BLOCK_SIZE=16)
    args.update(bad)
    expect_named_error(lambda: create_block_mask(**args), ("create_block_mask", OP))


@pytest.mark.parametrize("mask", ["document", "prefix_lm", "and_masks"])
def test_short_captured_index_tensor(mask):
    """Regression (issue 27): a captured index tensor shorter than the sequence (document ids,
    prefix lengths per batch) raised a bare IndexError in create_block_mask, while the
    kernels read such an index as 0; both now refuse it by name, before evaluating."""
    mod = {"document": lambda: mods.document(torch.tensor([0, 0, 1])),
           "prefix_lm": lambda: mods.prefix_lm(torch.tensor([1])),
           "and_masks": lambda: mods.and_masks(causal_fn, mods.document(torch.tensor([0, 1])))
           }[mask]()
    expect_named_error(lambda: create_block_mask(mod, 2, 1, 5, 5, "cpu", 16),
                       ("create_block_mask", OP))


@pytest.mark.parametrize("table", ["slopes", "ids"])
def test_short_captured_score_table(table):
    """A score_mod reading a captured table shorter than its index range (alibi slopes for
    fewer heads, document ids for fewer tokens): refused by name (the kernels used to read the
    missing entries as 0)."""
    q, k, v = _qkv()
    ids = torch.tensor([0, 0, 1])
    score = (mods.alibi(torch.ones(1)) if table == "slopes" else
             lambda s, b, h, q_idx, kv_idx: torch.where(ids[q_idx] == ids[kv_idx], s, -s))
    expect_named_error(lambda: flex_attention(q, k, v, score), OP)


def test_mask_mod_of_two_arguments_after_one_of_four():
    """Regression (issue 27): a mask_mod `lambda b, h: True` has the bytecode of `lambda b, h,
    q_idx, kv_idx: True`; once the latter had passed the checks, the former skipped them and
    failed later with a bare TypeError."""
    create_block_mask(lambda b, h, q_idx, kv_idx: True, 1, 1, 5, 5, "cpu", 16)
    expect_named_error(lambda: create_block_mask(lambda b, h: True, 1, 1, 5, 5, "cpu", 16),
                       ("create_block_mask", OP))


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_triton_softcap_far_above_scores():
    """mods.softcap(cap) far above the scores: the generated kernels' tanh stays accurate for
    tiny arguments (it once cancelled: 3.5e-4 off at cap 1e4 against the 2e-5 fp32 bound)."""
    q, k, v = _qkv()
    out, lse = flex_attention(q, k, v, mods.softcap(1e4), return_lse=True, backend="triton")
    ref_out, ref_lse = flex_attention(q, k, v, mods.softcap(1e4), return_lse=True,
                                      backend="reference")
    check_close(compare("triton.out", out, ref_out, TOLERANCE[torch.float32]))
    check_close(compare_lse("triton.lse", lse, ref_lse, LSE_TOLERANCE))


@pytest.mark.parametrize("scale", [1e39, 1e300, -1e300])
def test_scale_that_overflows_float32_is_rejected(scale):
    """Regression (found by this suite): scale=1e300 (finite in Python, inf in float32) was
    accepted, and the backends overflowed differently (lse inf vs -inf / NaN). Scales whose
    exp2-domain factor (scale * log2(e)) is not finite in float32 are now a ValueError before
    any launch; the largest allowed one still runs."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="flex_attention: .scale. must be at most"):
        flex_attention(q, k, v, scale=scale, return_lse=True)
    flex_attention(q, k, v, scale=MAX_SCALE, backend="reference")


def _overflow_case(case: str):
    """(q, k, v, score_mod, scale) whose scores pass float32's range (kernels' exp2 domain)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.rand(1, 2, 20, 16, generator=gen) + 1
    k = torch.rand(1, 2, 40, 16, generator=gen) + 1
    v = torch.randn(1, 2, 40, 16, generator=gen)
    q[:, :, ::3] *= -1  # rows of either sign
    k[:, 0] *= -1       # head 0: every score of a row has one sign (all +inf or all -inf)
    k[:, 1, ::2] *= -1  # head 1: both signs in every row
    if case == "threshold":  # q . k * scale finite (<= 2.9e38), times log2(e) past FLT_MAX
        q, k = q.abs(), k.abs()
        return q, k, v, None, 2.9e38 / float((q @ k.transpose(-1, -2)).min())
    if case == "nan":  # NaN scores beside +inf ones: score + (-inf) where the score is +inf
        return q, k, v, lambda score, b, h, qi, ki: torch.where(ki < 10, score - math.inf,
                                                                 score), 1e38
    return q, k, v, None, 1e38


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
@pytest.mark.parametrize("case", ["scale", "threshold", "nan"])
def test_scores_past_float32_follow_one_rule(case):
    """Regression (found with flash_attention's overflow rule): Triton gave lse NaN for a row
    with a +inf score where the reference (torch's logsumexp) gives +inf; scores whose product
    with log2(e) overflows (the kernels' exp2 domain) were finite in the reference and +inf in
    the kernels; and beside NaN scores the reference's logsumexp gave NaN where the kernels,
    whose running max skips NaN, give +inf. The reference now defines overflow as the kernels
    meet it (its module doc) and Triton's epilogue writes lse +inf for a +inf max: NaN at the
    same places, the same +-inf lse, equal finite values."""
    q, k, v, score_mod, scale = _overflow_case(case)
    got = flex_attention(q, k, v, score_mod, scale=scale, return_lse=True, backend="triton")
    want = flex_attention(q, k, v, score_mod, scale=scale, return_lse=True, backend="reference")
    assert torch.isposinf(want[1]).any()  # the case reaches the rule
    for name, g, w in zip(("out", "lse"), got, want):
        check_specials(name, g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_triton_bf16_interpreted():
    """Regression (found by this suite): the generated kernels called tl.dot on bf16
    operands, which the interpreter multiplies as raw 16-bit integers
    (kpt/ops/_triton_compat.py), so backend='triton' on bf16 returned values ~8e8."""
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = flex_attention(q, k, v, backend="triton")
    ref = flex_attention(q, k, v, backend="reference")
    check_close(compare("triton.out", out, ref, TOLERANCE[torch.bfloat16]))


def test_backward_of_a_score_mod_that_ignores_the_score():
    """Regression (found by this suite): the reference backward differentiated lse too, which
    depends on no input when the score_mod ignores the score (q_idx - kv_idx), and raised
    'element 1 of tensors does not require grad'. dv is softmax(bias)^T dout, checked against
    the same math in float64; dq and dk are 0."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = flex_attention(q, k, v, lambda score, b, h, q_idx, kv_idx: q_idx - kv_idx)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    sq, sk = q.shape[-2], k.shape[-2]
    bias = (torch.arange(sq)[:, None] - torch.arange(sk)[None, :]).double()
    p = torch.softmax(bias, dim=-1)
    want = (p.T @ torch.ones(sq, v.shape[-1], dtype=torch.float64)).expand(v.shape)
    check_close(compare("reference.dv", dv, want, 1e-5))
    for name, g in (("dq", dq), ("dk", dk)):
        assert g is None or not g.any(), f"{name} should be 0"


def test_float64_mod_constants_keep_float64_precision():
    """Regression (found by this suite): the reference evaluated a translated mod's float
    constants in float32 on float64 inputs (score * 0.1 used 0.1f: ~5e-10 off float64 math);
    _codegen.evaluate now builds them in the scores' dtype."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (random_tensor(gen, (1, 1, 4, 8), torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, lambda score, b, h, q_idx, kv_idx: score * 0.1)
    want = torch.softmax(q @ k.transpose(-1, -2) * (8**-0.5 * 0.1), dim=-1) @ v
    check_close(compare("reference.out", out, want, 1e-12))
