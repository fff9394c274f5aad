"""Properties of ``kpt.ops.flash_attention`` on generated inputs (issue 27).

* valid batched and varlen calls: the reference equals plain float64 math, and every backend
  that declares it can run the call (``SPEC.reasons``; Triton under the interpreter on this
  machine) plus the default dispatch equal the reference, out and lse, within ``TOLERANCE``;
* gradients (dq, dk, dv through out and lse) of every runnable backward equal the
  reference's within ``BACKWARD_TOLERANCE``;
* NaN in q or k: every backend puts NaN exactly where the reference does;
* invalid arguments (wrong types, shapes, dtypes, devices, scalars, windows, cu_seqlens,
  max_seqlen hints, flags, backend names): a ValueError / TypeError naming ``flash_attention``,
  whichever backend is asked for;
* known bugs, one ``xfail(strict=True)`` test each, at the bottom.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops._common import compare, triton_interpreting
from kpt.ops.flash_attention import (
    BACKWARD_TOLERANCE,
    SPEC,
    SPEC_BACKWARD,
    TOLERANCE,
    Call,
    _validate,
    compare_lse,
    flash_attention,
    problem_of,
)
from tests.property.strategies import (
    HALF,
    check_close,
    expect_named_error,
    layouts,
    props,
    random_tensor,
    relayout,
    same_specials,
    seeds,
)

OP = "flash_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference computes in float32 and rounds once at the end. Against exact float64 math
# that rounding is half an ulp of fp16/bf16, inside TOLERANCE's 2 ulps; in fp32 what is left
# is float32 arithmetic on logits of at most ~50 here, inside the 1e-5 the op documents.
REFERENCE_VS_FLOAT64 = {torch.float16: TOLERANCE[torch.float16],
                        torch.bfloat16: TOLERANCE[torch.bfloat16], torch.float32: 1e-5}
REFERENCE_LSE_VS_FLOAT64 = 1e-5

# A window side: unbounded, a small band, or so wide that it must behave as unbounded (sides
# must be below 2**31). Sides within a block of 2**31 - 1 overflow int32 in the Triton
# kernels: a known bug, left to test_window_side_near_int32_max below.
window_sides = st.one_of(st.just(-1), st.integers(0, 9),
                         st.sampled_from([2**30, 2**31 - 2**16]))


# ---- float64 truth ----------------------------------------------------------------------------


def float64_attention(q, k, v, cu_q, cu_k, scale, left, right, softcap):
    """out (float64, q's shape) and lse of the docstring's formula, one sequence at a time."""
    varlen = cu_q is not None
    heads, group = q.shape[-2], q.shape[-2] // k.shape[-2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    if varlen:
        lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float64)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        segments = [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]))
                    for b in range(len(cq) - 1)]
    else:
        lse = torch.full((q.shape[0], heads, q.shape[1]), -math.inf, dtype=torch.float64)
        segments = [(b, b) for b in range(q.shape[0])]
    for qi, ki in segments:
        qs, ks, vs = (t.double() for t in (q[qi], k[ki], v[ki]))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        sq, sk = qs.shape[0], ks.shape[0]
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if right >= 0:
            visible &= j <= i + (sk - sq) + right
        if left >= 0:
            visible &= j >= i + (sk - sq) - left
        s = s.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)  # rows without keys: p = 0
        out[qi] = torch.einsum("hij,jhd->ihd", p, vs)
        if varlen:
            lse[:, qi] = row_lse
        else:
            lse[qi] = row_lse
    return out, lse


# ---- cases ------------------------------------------------------------------------------------


@st.composite
def options(draw) -> dict:
    """The keyword options of a valid call: causal, window, softcap, scale."""
    causal = draw(st.booleans())
    left = draw(window_sides)
    right = draw(st.sampled_from([-1, 0]) if causal else window_sides)
    # softcap: off, a Gemma-like cap (30, 50), smaller ones that bend every logit, or caps
    # far above the logits (tanh of tiny arguments, where an exp-based tanh cancels).
    softcap = draw(st.one_of(st.just(0.0), st.floats(0.25, 100.0),
                             st.sampled_from([1e4, 1e6, 1e8])))
    # scale: default, or any sign and size that keeps logits inside float32 (huge scales are
    # test_scale_that_overflows_float32).
    scale = draw(st.one_of(st.none(), st.just(0.0), st.floats(-3.0, 3.0)))
    return dict(causal=causal, window=(left, right), softcap=softcap, scale=scale,
                deterministic=draw(st.booleans()))


@st.composite
def batched_calls(draw, max_len: int = 19, dtypes: tuple = DTYPES) -> dict:
    dtype = draw(st.sampled_from(dtypes))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 3, 8, 16, 24, 40, 64]))
    b = draw(st.integers(0, 2) if draw(st.integers(0, 9)) == 0 else st.integers(1, 2))
    sq, sk = draw(st.integers(0, max_len)), draw(st.integers(0, max_len))
    shapes = {"q": (b, sq, hkv * group, d), "k": (b, sk, hkv, d), "v": (b, sk, hkv, d)}
    return dict(dtype=dtype, shapes=shapes, opts=draw(options()), seed=draw(seeds),
                layouts={name: (draw(layouts), draw(st.integers(0, 3))) for name in shapes})


@st.composite
def varlen_calls(draw) -> dict:
    """(T, H, D) inputs with int32 cu_seqlens: empty sequences, tokens before the first and
    after the last sequence (ignored: out 0, lse -inf), and max_seqlen hints that are absent,
    exact, loose or absurdly large (clamped to the tokens)."""
    dtype = draw(st.sampled_from(DTYPES))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 8, 16, 24, 40]))
    batch = draw(st.integers(0, 3))
    lens_q = draw(st.lists(st.integers(0, 9), min_size=batch, max_size=batch))
    lens_k = draw(st.lists(st.integers(0, 9), min_size=batch, max_size=batch))
    cus, hints, totals = {}, {}, {}
    for name, lens in (("q", lens_q), ("k", lens_k)):
        start, tail = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        cus[name] = [start + sum(lens[:i]) for i in range(batch + 1)]
        totals[name] = cus[name][-1] + tail
        longest = max(lens, default=0)
        hints[name] = draw(st.sampled_from([None, longest, longest + 3, 2**40]))
    shapes = {"q": (totals["q"], hkv * group, d), "k": (totals["k"], hkv, d),
              "v": (totals["k"], hkv, d)}
    return dict(dtype=dtype, shapes=shapes, opts=draw(options()), seed=draw(seeds),
                cu_seqlens_q=cus["q"], cu_seqlens_k=cus["k"], max_seqlen_q=hints["q"],
                max_seqlen_k=hints["k"],
                layouts={name: (draw(layouts), draw(st.integers(0, 2))) for name in shapes})


def make_inputs(case: dict, requires_grad: bool = False) -> tuple[dict, list[torch.Tensor]]:
    """The call's keyword arguments (q, k, v in their drawn layouts) and the leaf tensors."""
    gen = torch.Generator().manual_seed(case["seed"])
    leaves, args = [], {}
    for name, shape in case["shapes"].items():
        leaf = random_tensor(gen, shape, case["dtype"]).requires_grad_(requires_grad)
        leaves.append(leaf)
        args[name] = relayout(leaf, *case["layouts"][name])
    args.update(case["opts"])
    if "cu_seqlens_q" in case:
        for name in ("cu_seqlens_q", "cu_seqlens_k"):
            args[name] = torch.tensor(case[name], dtype=torch.int32)
        args["max_seqlen_q"], args["max_seqlen_k"] = case["max_seqlen_q"], case["max_seqlen_k"]
    return args, leaves


def validated(args: dict) -> tuple[float, int, int, int, int]:
    """(scale, window_left, window_right, max_seqlen_q, max_seqlen_k) as the op computes them."""
    return _validate(args["q"], args["k"], args["v"], args["causal"], args["scale"],
                     args["window"], args["softcap"], args.get("cu_seqlens_q"),
                     args.get("cu_seqlens_k"), args.get("max_seqlen_q"),
                     args.get("max_seqlen_k"), {})


def runnable(spec, args: dict) -> list[str]:
    """The backends that declare they can run this call (no reasons), in declaration order."""
    scale, left, right, max_q, max_k = validated(args)
    q = args["q"]
    call = Call(q, args["k"], args["v"], args.get("cu_seqlens_q"), args.get("cu_seqlens_k"),
                max_q, max_k, scale, left, right, float(args["softcap"]), q, q)
    problem = problem_of(call)
    names = [b.name for b in spec.backends if not spec.reasons(b, problem)]
    assert "reference" in names, "the reference must run every valid call"
    if q.dtype in HALF and q.shape[-1] <= 256 and triton_interpreting():
        assert "triton" in names, "Triton (interpreter) must take every half-precision call"
    return names


def check_forward(case: dict) -> None:
    args, _ = make_inputs(case)
    dtype = case["dtype"]
    ref_out, ref_lse = flash_attention(**args, return_lse=True, backend="reference")
    # The reference is the specification: check it against float64 math first.
    scale, left, right, _, _ = validated(args)
    want_out, want_lse = float64_attention(args["q"], args["k"], args["v"],
                                           args.get("cu_seqlens_q"), args.get("cu_seqlens_k"),
                                           scale, left, right, float(args["softcap"]))
    check_close(compare("reference.out", ref_out, want_out, REFERENCE_VS_FLOAT64[dtype]))
    check_close(compare_lse("reference.lse", ref_lse, want_lse, REFERENCE_LSE_VS_FLOAT64))
    assert ref_out.shape == args["q"].shape and ref_out.dtype == dtype
    for backend in [*runnable(SPEC, args), None]:
        out, lse = flash_attention(**args, return_lse=True, backend=backend)
        event(f"compared {backend}")  # hypothesis statistics: what ran
        check_close(compare(f"{backend}.out", out, ref_out, TOLERANCE[dtype]))
        check_close(compare_lse(f"{backend}.lse", lse, ref_lse))


# ---- valid inputs -----------------------------------------------------------------------------


@props(100)
@given(batched_calls())
def test_batched_calls_match_reference(case):
    check_forward(case)


@props(80)
@given(varlen_calls())
def test_varlen_calls_match_reference(case):
    check_forward(case)


@props(30)
@given(st.one_of(batched_calls(max_len=12), varlen_calls()), st.booleans())
def test_gradients_match_reference(case, with_lse_grad):
    results = {}
    for backend in runnable(SPEC_BACKWARD, make_inputs(case)[0]):
        # Fresh leaves (same values) per backend: the layout views are part of the graph.
        args, leaves = make_inputs(case, requires_grad=True)
        out, lse = flash_attention(**args, return_lse=True, backend=backend)
        # The same output gradients for every backend (fresh generators, same seeds).
        outputs = [out]
        grads = [random_tensor(torch.Generator().manual_seed(case["seed"] + 1), out.shape,
                               out.dtype)]
        if with_lse_grad:
            outputs.append(lse)
            grads.append(random_tensor(torch.Generator().manual_seed(case["seed"] + 2),
                                       lse.shape, torch.float32))
        results[backend] = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
        event(f"compared {backend}")  # hypothesis statistics: what ran
    tol = BACKWARD_TOLERANCE[case["dtype"]]
    for backend, got in results.items():
        for name, g, want in zip(("dq", "dk", "dv"), got, results["reference"]):
            assert (g is None) == (want is None), name
            if g is not None:
                check_close(compare(f"{backend}.{name}", g, want, tol))


@props(40)
@given(batched_calls(max_len=12, dtypes=HALF), st.sampled_from(["q", "k"]), st.data())
def test_nan_inputs_propagate_like_the_reference(case, where, data):
    """A NaN in q (one query) or k (one key) makes exactly the outputs that read it NaN: every
    backend puts NaN where the reference does and matches it elsewhere. (v is left out: a NaN
    value times a zero probability is NaN in the reference's dense P @ V but skipped by a
    kernel that never loads a masked-out block, a difference in garbage only.)"""
    args, _ = make_inputs(case)
    t = args[where].clone()  # a clone of a broadcast view is a plain tensor: writable
    if t.numel() == 0:
        return
    flat = data.draw(st.integers(0, t.numel() - 1))
    t[tuple(int(i) for i in np.unravel_index(flat, t.shape))] = float("nan")
    args[where] = t
    ref_out, _ = flash_attention(**args, return_lse=True, backend="reference")
    for backend in runnable(SPEC, args):
        out, _ = flash_attention(**args, return_lse=True, backend=backend)
        event(f"compared {backend}")  # hypothesis statistics: what ran
        assert torch.equal(out.isnan(), ref_out.isnan()), f"{backend}: NaN pattern differs"
        check_close(compare(f"{backend}.out", out.nan_to_num(0.0), ref_out.nan_to_num(0.0),
                            TOLERANCE[case["dtype"]]))


# ---- invalid inputs ---------------------------------------------------------------------------
#
# Each corruption takes the keyword arguments of a valid (batched or varlen) call and a draw
# function, and returns the arguments with one thing wrong.

def _base(draw, varlen: bool) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from(DTYPES))
    if varlen:
        q, k = random_tensor(gen, (6, 2, 8), dtype), random_tensor(gen, (7, 1, 8), dtype)
        return dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32))
    q, k = random_tensor(gen, (1, 5, 2, 8), dtype), random_tensor(gen, (1, 6, 1, 8), dtype)
    return dict(q=q, k=k, v=k.clone())


not_a_tensor = st.sampled_from([[[1.0]], 1.0, None, "q", np.zeros((1, 5, 2, 8), np.float32)])
bad_flag = st.sampled_from([1, 0, "yes", None, np.bool_(True), [True]])
bad_scalar = st.sampled_from([math.nan, math.inf, -math.inf, True, "0.5", [0.5],
                              np.float32(0.5), torch.tensor(0.5)])
bad_window = st.sampled_from([(-2, 0), (0, -5), (1.0, 2), (True, 0), (0, False), (1, 2, 3), (1,),
                              "1,2", None, 3, (None, 1), (np.int64(1), 0), {0: 1, 1: 2},
                              (2**31, -1), (0, 2**40)])
bad_hint = st.sampled_from([-1, True, 3.0, "3", np.int64(3), [3]])


def _swap_tensor(name: str):
    def corrupt(draw, a, varlen):
        a[name] = draw(not_a_tensor)
    return corrupt


def _bad_dtype(draw, a, varlen):
    name = draw(st.sampled_from(["q", "k", "v"]))
    other = [dt for dt in (*DTYPES, torch.float64, torch.int32, torch.bool, torch.complex64)
             if dt != a["q"].dtype]
    # q alone in a dtype no backend takes; k or v in any dtype other than q's.
    choices = [torch.float64, torch.int32, torch.bool, torch.complex64] if name == "q" else other
    a[name] = a[name].to(draw(st.sampled_from(choices)))


def _bad_rank(draw, a, varlen):
    name = draw(st.sampled_from(["q", "k", "v"]))
    t = a[name]
    a[name] = draw(st.sampled_from([t[0], t[None], t.reshape(-1), t.reshape(t.shape + (1,))]))


def _mismatched_shape(draw, a, varlen):
    kind = draw(st.sampled_from(["v_len", "head_dim", "k_head_dim", "batch", "gqa", "heads0",
                                 "dim0"]))
    q, k = a["q"], a["k"]
    if kind == "v_len":
        a["v"] = a["v"][:-1]
    elif kind == "head_dim":
        a["v"] = a["v"][..., :-1]
    elif kind == "k_head_dim":
        a["k"], a["v"] = k[..., :-1], a["v"][..., :-1]
    elif kind == "batch":
        if varlen:
            a["cu_seqlens_k"] = torch.tensor([0, 7], dtype=torch.int32)
        else:
            a["k"], a["v"] = torch.cat([k, k]), torch.cat([a["v"], a["v"]])
    elif kind == "gqa":  # 2 query heads over 3 kv heads, or 3 over 2
        a["k"] = a["v"] = torch.cat([k, k, k], dim=-2)
        if draw(st.booleans()):
            a["q"] = torch.cat([q, q[..., :1, :]], dim=-2)
            a["k"] = a["v"] = torch.cat([k, k], dim=-2)
    elif kind == "heads0":
        a["k"] = a["v"] = k[..., :0, :]
    else:
        a["q"], a["k"], a["v"] = q[..., :0], k[..., :0], a["v"][..., :0]


def _wrong_device(draw, a, varlen):
    # "meta" tensors: another device on any machine, and nothing can be read from them.
    name = draw(st.sampled_from(["q", "k", "v"] + (["cu_seqlens_q"] if varlen else [])))
    if name == "q":
        a["q"] = a["q"].to("meta")
    else:
        a[name] = a[name].to("meta")


def _bad_flag(draw, a, varlen):
    a[draw(st.sampled_from(["causal", "return_lse", "deterministic"]))] = draw(bad_flag)


def _bad_scale(draw, a, varlen):
    a["scale"] = draw(bad_scalar)


def _bad_softcap(draw, a, varlen):
    a["softcap"] = draw(st.one_of(bad_scalar, st.floats(max_value=-1e-30, allow_nan=False)))


def _bad_window(draw, a, varlen):
    if draw(st.booleans()):
        a["window"] = draw(bad_window)
    else:  # causal fixes the right side to 0
        a["causal"], a["window"] = True, (draw(st.integers(-1, 5)), draw(st.integers(1, 2**40)))


def _hint_without_varlen(draw, a, varlen):
    if varlen:
        a["max_seqlen_q"] = draw(bad_hint)
    else:
        a[draw(st.sampled_from(["max_seqlen_q", "max_seqlen_k"]))] = draw(st.integers(0, 9))


def _bad_cu_seqlens(draw, a, varlen):
    """Malformed boundaries (or a missing one, or a hint below the longest sequence) on a
    varlen call with 2 sequences."""
    if not varlen:  # the same inputs as one varlen batch of 2 sequences
        a["q"], a["k"], a["v"] = a["q"][0], a["k"][0], a["v"][0]
        a["cu_seqlens_q"] = torch.tensor([0, 2, a["q"].shape[0]], dtype=torch.int32)
        a["cu_seqlens_k"] = torch.tensor([0, 3, a["k"].shape[0]], dtype=torch.int32)
    name = draw(st.sampled_from(["cu_seqlens_q", "cu_seqlens_k"]))
    total = (a["q"] if name == "cu_seqlens_q" else a["k"]).shape[0]
    kind = draw(st.sampled_from(["negative", "decreasing", "past_end", "int64", "float", "list",
                                 "2d", "strided", "empty", "missing", "length", "hint_low"]))
    i32 = torch.int32
    if kind == "missing":
        del a[name]
    elif kind == "hint_low":
        a["max_seqlen_" + name[-1]] = 1  # both sequences are longer than 1
    else:
        a[name] = {
            "negative": lambda: torch.tensor([-1, 2, total], dtype=i32),
            "decreasing": lambda: torch.tensor([0, total, 1], dtype=i32),
            "past_end": lambda: torch.tensor(
                [0, 2, total + draw(st.integers(1, 2**31 - 1 - total))], dtype=i32),
            "int64": lambda: torch.tensor([0, 2, total]),
            "float": lambda: torch.tensor([0.0, 2.0, total]),
            "list": lambda: [0, 2, total],
            "2d": lambda: torch.tensor([[0, 2, total]], dtype=i32),
            "strided": lambda: torch.tensor([0, 9, 2, 9, total], dtype=i32)[::2],
            "empty": lambda: torch.zeros(0, dtype=i32),
            "length": lambda: torch.tensor([0, 1, 2, total], dtype=i32),
        }[kind]()


def _bad_backend(draw, a, varlen):
    a["backend"] = draw(st.sampled_from(["nope", "", "Triton", "reference ", 3, ["triton"]]))


CORRUPTIONS = [_swap_tensor("q"), _swap_tensor("k"), _swap_tensor("v"), _bad_dtype, _bad_rank,
               _mismatched_shape, _wrong_device, _bad_flag, _bad_scale, _bad_softcap,
               _bad_window, _hint_without_varlen, _bad_cu_seqlens, _bad_backend]


@st.composite
def invalid_calls(draw) -> dict:
    varlen = draw(st.booleans())
    args = _base(draw, varlen)
    corrupt = draw(st.sampled_from(CORRUPTIONS))
    corrupt(draw, args, varlen)
    args.setdefault("backend", draw(st.sampled_from([None, "reference", "triton"])))
    return args


@props(300)
@given(invalid_calls())
def test_invalid_arguments_raise_named_errors(args):
    expect_named_error(lambda: flash_attention(**args), OP)


# ---- known bugs -------------------------------------------------------------------------------


def _small(dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (random_tensor(gen, (1, 5, 2, 16), dtype), random_tensor(gen, (1, 7, 2, 16), dtype),
            random_tensor(gen, (1, 7, 2, 16), dtype))


def _triton_vs_reference(q, k, v, **kw):
    out, lse = flash_attention(q, k, v, return_lse=True, backend="triton", **kw)
    ref_out, ref_lse = flash_attention(q, k, v, return_lse=True, backend="reference", **kw)
    check_close(compare("triton.out", out, ref_out, TOLERANCE[q.dtype]))
    check_close(compare_lse("triton.lse", lse, ref_lse))


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_triton_softcap_far_above_logits():
    """Regression (found by this suite, fixed in b75188f): Triton's exp-based tanh cancelled
    for tiny arguments, so softcap=1e6 gave out off by 6e-3 and a wrong lse."""
    _triton_vs_reference(*_small(), softcap=1e6)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
@pytest.mark.parametrize("seed", range(4))
def test_scale_that_overflows_float32(seed):
    """Regression (found by this suite): logits past float32's range (scale=1e38) gave lse NaN
    from Triton against +inf from the reference, and NaN out where the reference's was
    finite: Triton forms the logits in log2 units (scale * log2(e) folded in), so it overflowed
    first. The reference now forms them the same way and defines the overflow (its module doc:
    a +inf logit gives lse +inf and out NaN), which Triton's epilogue follows."""
    _triton_vs_reference(*_small(seed=seed), scale=1e38)
    _triton_vs_reference(*_small(seed=seed), scale=-1e38, causal=True)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_key_block_whose_logits_all_overflow_to_minus_inf():
    """Regression (found by this suite): a fully visible key block whose logits all overflowed
    to -inf gave Triton's rows a shift of -inf - (-inf) = NaN, so rows with finite logits in
    later blocks came out NaN. The running max now starts at -FLT_MAX."""
    gen = torch.Generator().manual_seed(0)
    q = random_tensor(gen, (1, 20, 1, 16), torch.float16).abs()
    k = random_tensor(gen, (1, 48, 1, 16), torch.float16).abs()
    v = random_tensor(gen, (1, 48, 1, 16), torch.float16)
    k[:, :16] *= -1000  # q . k about -1e4 there (-inf at scale 1e35), about +10 elsewhere
    for kw in ({}, {"causal": True}):
        _triton_vs_reference(q, k, v, scale=1e35, **kw)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_masked_first_block_then_very_negative_logits():
    """Regression (found with the two above): a row whose first key block was all masked took
    0 as its running max, so later logits all below -126 in log2 units (-160 here) underflowed
    to a zero sum: out NaN, lse -inf where the reference is finite. The running max now starts
    at -FLT_MAX and is never replaced."""
    gen = torch.Generator().manual_seed(0)
    q = torch.full((1, 32, 1, 16), 2.0, dtype=torch.float16)
    k = torch.full((1, 32, 1, 16), 5.0, dtype=torch.float16)  # every logit -160 at scale -1
    v = random_tensor(gen, (1, 32, 1, 16), torch.float16)
    _triton_vs_reference(q, k, v, scale=-1.0, window=(3, 0))


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (1, 0)}], ids=str)
def test_rows_whose_logits_all_overflow_backward(kw):
    """Regression (found by this suite): every logit +-inf at scale=1e38, so each row has lse
    +inf (a +inf logit: out NaN) or -inf (all -inf: out 0, as a row without keys). The
    reference's backward spread a NaN delta to keys the row cannot see (ds = 0 * NaN there); it
    masks ds now, as the kernels do, and the NaN of dq, dk, dv falls where Triton's does.
    Triton's dk/dv kernel also read an lse -inf row's p as exp2(-inf + inf) = NaN (its dq kernel
    mapped that lse to +inf, as it now does too)."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.tensor([-1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    q = (torch.rand(1, 5, 2, 16, generator=gen) + 1).half()
    k = ((torch.rand(1, 7, 2, 16, generator=gen) + 1) * sign[:, None, None]).half()
    v = torch.randn(1, 7, 2, 16, generator=gen).half()
    _triton_vs_reference(q, k, v, scale=1e38, **kw)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grads = {}
    for backend in ("triton", "reference"):
        out = flash_attention(q, k, v, scale=1e38, backend=backend, **kw)
        grads[backend] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for name, got, want in zip(("dq", "dk", "dv"), grads["triton"], grads["reference"]):
        assert torch.equal(got.isnan(), want.isnan()), f"triton.{name}: NaN pattern differs"
        check_close(compare(f"triton.{name}", got, want, BACKWARD_TOLERANCE[q.dtype]))


@functools.cache
def _overflow_cases() -> list[tuple[str, tuple, dict]]:
    """(name, (q, k, v), options) of the regressions above, and larger ones for the kernels
    with wider tiles (head dims 64 and 128, several key tiles, a NaN key)."""
    gen = torch.Generator().manual_seed(3)
    cases = [(f"small{seed}", _small(seed=seed), kw) for seed in range(2)
             for kw in ({"scale": 1e38}, {"scale": -1e38, "causal": True})]
    q = random_tensor(gen, (1, 20, 1, 16), torch.float16).abs()
    k = random_tensor(gen, (1, 48, 1, 16), torch.float16).abs()
    k[:, :16] *= -1000
    cases.append(("first block -inf", (q, k, random_tensor(gen, k.shape, torch.float16)),
                  {"scale": 1e35}))
    q = torch.full((1, 32, 1, 16), 2.0, dtype=torch.float16)
    k = torch.full((1, 32, 1, 16), 5.0, dtype=torch.float16)
    cases.append(("very negative", (q, k, random_tensor(gen, k.shape, torch.float16)),
                  {"scale": -1.0, "window": (3, 0)}))
    for d in (64, 128):
        q = random_tensor(gen, (2, 130, 4, d), torch.bfloat16)
        k = random_tensor(gen, (2, 300, 2, d), torch.bfloat16)
        v = random_tensor(gen, k.shape, torch.bfloat16)
        # Overflow: kv head 0's keys all negative, its query rows of either sign (all -inf or
        # a +inf logit); kv head 1 mixed (a +inf logit in every row).
        k_over = k.clone()
        k_over[:, :, 0] = -k[:, :, 0].abs()
        q_over = q.clone()
        q_over[:, :, :2] = q[:, :, :2].abs() * torch.where(torch.arange(130) % 3 == 0, -1, 1)[
            None, :, None, None].to(q.dtype)
        for kw in ({"scale": 1e38}, {"scale": 1e38, "causal": True}):
            cases.append((f"d{d} overflow {kw}", (q_over, k_over, v), kw))
        # Finite logits after -inf ones: kv head 0's first 70 keys are -inf, its queries
        # positive (logits -inf there); a NaN in key 17 of kv head 1 (NaN rows where visible).
        q_pos = q.clone()
        q_pos[:, :, :2] = q[:, :, :2].abs() + 0.1
        k_inf = k.clone()
        k_inf[:, :70, 0] = -math.inf
        k_inf[0, 17, 1, 3] = math.nan
        for kw in ({}, {"causal": True}, {"window": (100, 0)}):
            cases.append((f"d{d} -inf and NaN keys {kw}", (q_pos, k_inf, v), kw))
    return cases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: runs every GPU "
                    "backend and config (CUDA sm90 / mma / simt, Triton) on the overflow cases")
@pytest.mark.parametrize("case", range(len(_overflow_cases())))
def test_every_gpu_config_follows_the_overflow_rule(case):
    """The rule of reference.py on every backend and config that can run the call on this GPU
    (the CUDA kernels through csrc/include/kpt/softmax.h): NaN exactly where the reference has
    it, the same +-inf lse, equal finite values. Before that header the sm90 kernel gave out 0
    and lse -inf for a row with a +inf logit, the mma and simt kernels lse NaN, and the simt
    kernel NaN for a row whose first visible logit was -inf."""
    name, (q, k, v), kw = _overflow_cases()[case]
    ref_out, ref_lse = flash_attention(q, k, v, return_lse=True, backend="reference", **kw)
    args = dict(q=q.cuda(), k=k.cuda(), v=v.cuda(), causal=kw.get("causal", False),
                scale=kw.get("scale"), window=kw.get("window", (-1, -1)), softcap=0.0)
    scale, left, right, max_q, max_k = validated(args)
    ran = []
    for backend in SPEC.backends:
        problem = problem_of(Call(args["q"], args["k"], args["v"], None, None, max_q, max_k,
                                  scale, left, right, 0.0, args["q"], args["q"]))
        if backend.name == "reference" or SPEC.reasons(backend, problem):
            continue
        for config in backend.configs(problem):
            out = torch.full_like(args["q"], float("nan"))
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device="cuda")
            backend.run(Call(args["q"], args["k"], args["v"], None, None, max_q, max_k, scale,
                             left, right, 0.0, out, lse), config)
            label = f"{name}: {backend.name} {config}"
            out, lse = out.cpu(), lse.cpu()
            same_specials(f"{label}.out", out, ref_out)
            same_specials(f"{label}.lse", lse, ref_lse)
            check_close(compare(f"{label}.out", out.nan_to_num(0.0), ref_out.nan_to_num(0.0),
                                TOLERANCE[q.dtype]))
            check_close(compare_lse(f"{label}.lse", lse.nan_to_num(0.0, 0.0, 0.0),
                                    ref_lse.nan_to_num(0.0, 0.0, 0.0)))
            ran.append(backend.name)
    assert ran, "no GPU backend ran"


@pytest.mark.parametrize(("softcap", "scale"), [(1e39, None), (1e300, None), (1e-40, 1.0)])
def test_softcap_whose_factors_overflow_float32_is_rejected(softcap, scale):
    """Regression (found with the overflow rule above): a soft-cap past MAX_SCALE made the
    kernels' factor softcap * log2(e) inf in float32 (logits +-inf, NaN where tanh is 0), and
    a tiny one made scale / softcap inf; now a ValueError naming the op before any launch."""
    with pytest.raises(ValueError, match="flash_attention: softcap="):
        flash_attention(*_small(), softcap=softcap, scale=scale)


@pytest.mark.parametrize("scale", [1e39, 1e300, -1e300])
def test_scale_past_float32_is_rejected(scale):
    """Regression (found by this suite): scales finite in Python but whose exp2-domain factor
    is inf in float32 gave lse -inf from Triton and +inf from the reference; now a ValueError
    naming the op before any launch (paged and cascade attention share the check)."""
    with pytest.raises(ValueError, match="flash_attention: .scale. must be at most"):
        flash_attention(*_small(), scale=scale)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_window_side_near_int32_max():
    """Regression (found by this suite): Triton's key range m_last + diag + window_right + 1
    overflowed int32 for a side of 2**31 - 1 (out 0, lse -inf). Validation now makes sides
    wider than any row reaches unbounded (flash_attention._unbounded)."""
    _triton_vs_reference(*_small(), window=(-1, 2**31 - 1))


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_window_left_near_int32_max_backward():
    """Regression (found by this suite): the Triton backward's query range overflowed int32
    for window=(2**31 - 1, 0) (dk = dv = 0); fixed as above."""
    q, k, v = (t.requires_grad_() for t in _small())
    grads = {}
    for backend in ("triton", "reference"):
        out = flash_attention(q, k, v, window=(2**31 - 1, 0), backend=backend)
        grads[backend] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for name, got, want in zip(("dq", "dk", "dv"), grads["triton"], grads["reference"]):
        check_close(compare(f"triton.{name}", got, want, BACKWARD_TOLERANCE[q.dtype]))


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_nan_query_lse_is_nan():
    """Regression (found by this suite): Triton returned lse=-inf ('no visible key') for a
    query whose logits are NaN, so code merging partial attention by lse dropped the NaN. The
    kernels now test the row sum against 0, not > 0 (tests/ops/test_flash_attention.py checks
    every backend on its device)."""
    q, k, v = _small()
    q[0, 0, 0, 0] = float("nan")
    _, lse = flash_attention(q, k, v, return_lse=True, backend="triton")
    _, ref_lse = flash_attention(q, k, v, return_lse=True, backend="reference")
    assert ref_lse[0, 0, 0].isnan()
    assert lse[0, 0, 0].isnan(), f"triton lse {lse[0, 0, 0].item()} where the reference is NaN"


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
def test_inf_query_is_not_silently_zeroed():
    """Regression (found by this suite): a query whose every logit is -inf although its keys
    are visible (inf in q against keys of one sign) got out = 0 from Triton, as for a query
    that sees no key, where the reference returns NaN. The Triton forward now tells the two
    apart by the mask (which rows see a key)."""
    q, k, v = _small()
    q[0, 0, 0] = 0.0
    q[0, 0, 0, 0] = float("inf")  # query 0, head 0: logit inf * k[j, 0, 0] = -inf for all j
    k[0, :, 0, 0] = -k[0, :, 0, 0].abs() - 0.5
    out, _ = flash_attention(q, k, v, return_lse=True, backend="triton")
    ref_out, _ = flash_attention(q, k, v, return_lse=True, backend="reference")
    assert torch.equal(out.isfinite(), ref_out.isfinite()), (
        f"triton out {out[0, 0, 0, :3].tolist()} vs reference {ref_out[0, 0, 0, :3].tolist()}")
